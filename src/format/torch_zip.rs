//! Index of a zip-format PyTorch checkpoint (torch >= 1.6, `torch.save` default).
//!
//! Layout: one top-level folder `<archive>/` holding `data.pkl` (the pickle), `data/<key>`
//! (one raw storage per key), `byteorder` (`little` or `big`; absent in older files, which
//! means little), `version` and a few dot-files. torch writes every entry STORED, with
//! each storage's data 64-byte aligned, so a reader can map storages in place.
//!
//! This module reads the central directory with the `zip` crate (which handles ZIP64 and
//! finds the end record), then checks each entry's local file header itself: signature,
//! method STORED, no encryption, the same name, and sizes that agree with the central
//! directory (or, when the data-descriptor flag is set as torch sets it, a data descriptor
//! that agrees). The result is the pickle's bytes and, per storage key, the absolute
//! offset and length of its bytes in the file; storage data is never read here.
//!
//! Refused, each with its own error: a compressed or encrypted entry (torch itself would
//! inflate it, but then it could not be mapped), entries outside the single top-level
//! folder (torch refuses those too), duplicate names, a byteorder other than
//! little/big, a data.pkl over [`MAX_PICKLE_BYTES`].

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use thiserror::Error;

/// Largest data.pkl accepted. A real checkpoint's pickle is ~200 bytes per tensor.
pub const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// Where a storage's bytes are: absolute offset in the file and length in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StorageLocation {
    pub offset: u64,
    pub len: u64,
}

/// What a zip checkpoint holds, with storages located but not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZipCheckpoint {
    /// The top-level folder name (torch names it after the file, or `archive`).
    pub folder: String,
    /// Contents of `<folder>/data.pkl`.
    pub pickle: Vec<u8>,
    /// `<folder>/data/<key>` by key.
    pub storages: HashMap<String, StorageLocation>,
    /// `byteorder` says `big`: every multi-byte element must be byte-swapped.
    pub big_endian: bool,
}

#[derive(Debug, Error)]
pub enum ZipError {
    #[error("I/O error reading zip checkpoint: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a readable zip archive: {0}")]
    Archive(String),
    #[error("zip archive is empty")]
    Empty,
    #[error("zip central directory lists the same entry name twice")]
    DuplicateName,
    #[error(
        "zip entry {name:?} is not inside a single top-level folder (first folder is {folder:?})"
    )]
    NotInFolder { name: String, folder: String },
    #[error("zip entry name is not UTF-8 (entry #{index})")]
    NonUtf8Name { index: u64 },
    #[error("zip checkpoint has no {name}")]
    Missing { name: String },
    #[error(
        "zip entry {name:?} is compressed (method {method}); torch checkpoints store entries uncompressed"
    )]
    Compressed { name: String, method: u16 },
    #[error("zip entry {name:?} is encrypted")]
    Encrypted { name: String },
    #[error("zip entry {name:?}: {reason}")]
    BadLocalHeader { name: String, reason: String },
    #[error("zip entry {name:?} extends past the end of the file ({end} > {file_len})")]
    PastEnd {
        name: String,
        end: u64,
        file_len: u64,
    },
    #[error("zip entry {name:?} is {len} bytes, more than the limit of {limit}")]
    TooLarge { name: String, len: u64, limit: u64 },
    #[error("data.pkl fails its CRC check (stored {stored:08x}, computed {computed:08x})")]
    Crc { stored: u32, computed: u32 },
    #[error("byteorder record holds {0:?}, expected \"little\" or \"big\"")]
    BadByteorder(String),
}

/// What the central directory says about one entry.
struct Entry {
    name: String,
    name_raw: Vec<u8>,
    method: u16,
    encrypted: bool,
    compressed_size: u64,
    size: u64,
    crc: u32,
    header_start: u64,
}

const LOCAL_SIG: u32 = 0x0403_4b50;
const DESCRIPTOR_SIG: u32 = 0x0807_4b50;
const FLAG_ENCRYPTED: u16 = 1;
const FLAG_DESCRIPTOR: u16 = 1 << 3;
const ZIP64_EXTRA: u16 = 0x0001;

/// Reads the central directory and locates `data.pkl` and every storage.
pub fn index_zip<R: Read + Seek>(mut r: R) -> Result<ZipCheckpoint, ZipError> {
    let file_len = r.seek(SeekFrom::End(0))?;
    r.seek(SeekFrom::Start(0))?;
    let entries = central_directory(r.by_ref())?;

    let first = entries.first().ok_or(ZipError::Empty)?;
    let folder = match first.name.split_once('/') {
        Some((f, _)) if !f.is_empty() => f.to_string(),
        _ => {
            return Err(ZipError::NotInFolder {
                name: first.name.clone(),
                folder: String::new(),
            });
        }
    };
    let prefix = format!("{folder}/");

    let mut pickle_entry = None;
    let mut byteorder_entry = None;
    let mut storages = HashMap::new();
    for e in &entries {
        let Some(rel) = e.name.strip_prefix(&prefix) else {
            return Err(ZipError::NotInFolder {
                name: e.name.clone(),
                folder,
            });
        };
        match rel {
            "data.pkl" => pickle_entry = Some(e),
            "byteorder" => byteorder_entry = Some(e),
            _ => {
                if let Some(key) = rel.strip_prefix("data/")
                    && !key.is_empty()
                    && !key.contains('/')
                {
                    let loc = locate(&mut r, e, file_len)?;
                    storages.insert(key.to_string(), loc);
                }
                // Other records (version, .format_version, .storage_alignment,
                // .data/serialization_id, ...) carry nothing a reader needs.
            }
        }
    }

    let pe = pickle_entry.ok_or_else(|| ZipError::Missing {
        name: format!("{prefix}data.pkl"),
    })?;
    if pe.size > MAX_PICKLE_BYTES {
        return Err(ZipError::TooLarge {
            name: pe.name.clone(),
            len: pe.size,
            limit: MAX_PICKLE_BYTES,
        });
    }
    let pickle = read_entry(&mut r, pe, file_len)?;
    let computed = crc32fast::hash(&pickle);
    if computed != pe.crc {
        return Err(ZipError::Crc {
            stored: pe.crc,
            computed,
        });
    }

    let big_endian = match byteorder_entry {
        None => false,
        Some(be) => {
            if be.size > 16 {
                return Err(ZipError::TooLarge {
                    name: be.name.clone(),
                    len: be.size,
                    limit: 16,
                });
            }
            let raw = read_entry(&mut r, be, file_len)?;
            match raw.as_slice() {
                b"little" => false,
                b"big" => true,
                other => {
                    return Err(ZipError::BadByteorder(
                        String::from_utf8_lossy(other).into_owned(),
                    ));
                }
            }
        }
    };

    Ok(ZipCheckpoint {
        folder,
        pickle,
        storages,
        big_endian,
    })
}

fn central_directory<R: Read + Seek>(r: R) -> Result<Vec<Entry>, ZipError> {
    let archive = zip::ZipArchive::new(r).map_err(|e| ZipError::Archive(e.to_string()))?;
    if archive.has_duplicate_names() {
        // The zip crate keeps one entry per name, so which name repeated is not known.
        return Err(ZipError::DuplicateName);
    }
    let mut entries = Vec::with_capacity(archive.len());
    for i in 0..archive.len() {
        let e = archive
            .by_index_data(i)
            .map_err(|e| ZipError::Archive(e.to_string()))?;
        let name_raw = e.name_raw().to_vec();
        let name = String::from_utf8(name_raw.clone()).map_err(|_| ZipError::NonUtf8Name {
            index: u64::try_from(i).unwrap_or(u64::MAX),
        })?;
        // to_u16 is deprecated but is the only way to get the raw method number.
        #[allow(deprecated)]
        let method = e.compression().to_u16();
        entries.push(Entry {
            name,
            name_raw,
            method,
            encrypted: e.encrypted(),
            compressed_size: e.compressed_size(),
            size: e.size(),
            crc: e.crc32(),
            header_start: e.header_start(),
        });
    }
    Ok(entries)
}

fn le16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = at.checked_add(2).and_then(|end| b.get(at..end)) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = at.checked_add(4).and_then(|end| b.get(at..end)) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = at.checked_add(8).and_then(|end| b.get(at..end)) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn read_at<R: Read + Seek>(r: &mut R, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    r.seek(SeekFrom::Start(offset))?;
    r.read_exact(buf)
}

/// Verifies an entry's local header against the central directory and returns where its
/// data is. Only STORED, unencrypted entries pass.
fn locate<R: Read + Seek>(
    r: &mut R,
    e: &Entry,
    file_len: u64,
) -> Result<StorageLocation, ZipError> {
    let bad = |reason: String| ZipError::BadLocalHeader {
        name: e.name.clone(),
        reason,
    };
    if e.method != 0 {
        return Err(ZipError::Compressed {
            name: e.name.clone(),
            method: e.method,
        });
    }
    if e.encrypted {
        return Err(ZipError::Encrypted {
            name: e.name.clone(),
        });
    }
    if e.compressed_size != e.size {
        return Err(bad(format!(
            "stored entry has compressed size {} != size {}",
            e.compressed_size, e.size
        )));
    }
    let past_end = |end: u64| ZipError::PastEnd {
        name: e.name.clone(),
        end,
        file_len,
    };
    let fixed_end = e
        .header_start
        .checked_add(30)
        .ok_or_else(|| past_end(u64::MAX))?;
    if fixed_end > file_len {
        return Err(past_end(fixed_end));
    }
    let mut h = [0u8; 30];
    read_at(r, e.header_start, &mut h)?;
    if le32(&h, 0) != LOCAL_SIG {
        return Err(bad(format!(
            "no local header signature at offset {}",
            e.header_start
        )));
    }
    let flags = le16(&h, 6);
    if flags & FLAG_ENCRYPTED != 0 {
        return Err(ZipError::Encrypted {
            name: e.name.clone(),
        });
    }
    let method = le16(&h, 8);
    if method != 0 {
        return Err(ZipError::Compressed {
            name: e.name.clone(),
            method,
        });
    }
    let crc = le32(&h, 14);
    let (csize32, usize32) = (le32(&h, 18), le32(&h, 22));
    let name_len = u64::from(le16(&h, 26));
    let extra_len = u64::from(le16(&h, 28));

    let var_end = fixed_end
        .checked_add(name_len)
        .and_then(|x| x.checked_add(extra_len))
        .ok_or_else(|| past_end(u64::MAX))?;
    if var_end > file_len {
        return Err(past_end(var_end));
    }
    // name_len and extra_len are u16, so this buffer is at most 128 KiB.
    let mut var = vec![0u8; usize::from(le16(&h, 26)).saturating_add(usize::from(le16(&h, 28)))];
    read_at(r, fixed_end, &mut var)?;
    let (name, extra) = var.split_at(usize::from(le16(&h, 26)));
    if name != e.name_raw.as_slice() {
        return Err(bad(format!(
            "local header names {:?}",
            String::from_utf8_lossy(name)
        )));
    }

    let data_offset = var_end;
    let data_end = data_offset
        .checked_add(e.size)
        .ok_or_else(|| past_end(u64::MAX))?;
    if data_end > file_len {
        return Err(past_end(data_end));
    }

    if flags & FLAG_DESCRIPTOR != 0 {
        // Sizes live in a data descriptor after the data (torch writes it this way); the
        // local header's sizes are zero or placeholders, so check the descriptor instead.
        check_descriptor(r, e, data_end, file_len)?;
    } else {
        let (csize, usize_) = if csize32 == u32::MAX || usize32 == u32::MAX {
            zip64_sizes(extra, usize32, csize32).ok_or_else(|| {
                bad("sizes are 0xFFFFFFFF but there is no ZIP64 extra field".into())
            })?
        } else {
            (u64::from(csize32), u64::from(usize32))
        };
        if csize != e.size || usize_ != e.size {
            return Err(bad(format!(
                "local sizes {csize}/{usize_} differ from the central directory's {}",
                e.size
            )));
        }
        if crc != e.crc {
            return Err(bad(format!(
                "local CRC {crc:08x} differs from the central directory's {:08x}",
                e.crc
            )));
        }
    }
    Ok(StorageLocation {
        offset: data_offset,
        len: e.size,
    })
}

/// ZIP64 extended information in a local header: uncompressed then compressed size, each
/// present only when its 32-bit field is 0xFFFFFFFF... except that local headers must hold
/// both, so both are read when either is saturated.
fn zip64_sizes(extra: &[u8], usize32: u32, csize32: u32) -> Option<(u64, u64)> {
    let mut at = 0usize;
    while at.checked_add(4)? <= extra.len() {
        let id = le16(extra, at);
        let len = usize::from(le16(extra, at.checked_add(2)?));
        let body_start = at.checked_add(4)?;
        let body = extra.get(body_start..body_start.checked_add(len)?)?;
        if id == ZIP64_EXTRA {
            let mut p = 0usize;
            let mut next = || -> Option<u64> {
                let v = body.get(p..p.checked_add(8)?).map(|_| le64(body, p))?;
                p = p.checked_add(8)?;
                Some(v)
            };
            let u = if usize32 == u32::MAX {
                next()?
            } else {
                u64::from(usize32)
            };
            let c = if csize32 == u32::MAX {
                next()?
            } else {
                u64::from(csize32)
            };
            return Some((c, u));
        }
        at = body_start.checked_add(len)?;
    }
    None
}

/// A data descriptor: optional signature, CRC, then 32- or 64-bit sizes. Accepts whichever
/// form agrees with the central directory.
fn check_descriptor<R: Read + Seek>(
    r: &mut R,
    e: &Entry,
    at: u64,
    file_len: u64,
) -> Result<(), ZipError> {
    let bad = |reason: String| ZipError::BadLocalHeader {
        name: e.name.clone(),
        reason,
    };
    let avail = usize::try_from(file_len.saturating_sub(at).min(24)).unwrap_or(24);
    let mut d = vec![0u8; avail];
    read_at(r, at, &mut d)?;
    let body = if d.len() >= 4 && le32(&d, 0) == DESCRIPTOR_SIG {
        d.get(4..).unwrap_or(&[])
    } else {
        d.as_slice()
    };
    let matches32 = body.len() >= 12
        && le32(body, 0) == e.crc
        && u64::from(le32(body, 4)) == e.size
        && u64::from(le32(body, 8)) == e.size;
    let matches64 = body.len() >= 20
        && le32(body, 0) == e.crc
        && le64(body, 4) == e.size
        && le64(body, 12) == e.size;
    if matches32 || matches64 {
        Ok(())
    } else {
        Err(bad(format!(
            "data descriptor at offset {at} does not match the central directory (size {}, CRC {:08x})",
            e.size, e.crc
        )))
    }
}

fn read_entry<R: Read + Seek>(r: &mut R, e: &Entry, file_len: u64) -> Result<Vec<u8>, ZipError> {
    let loc = locate(r, e, file_len)?;
    let len = usize::try_from(loc.len).map_err(|_| ZipError::TooLarge {
        name: e.name.clone(),
        len: loc.len,
        limit: MAX_PICKLE_BYTES,
    })?;
    let mut buf = vec![0u8; len];
    read_at(r, loc.offset, &mut buf)?;
    Ok(buf)
}
