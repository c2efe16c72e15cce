//! Index of a legacy (pre-zip, `_use_new_zipfile_serialization=False`) PyTorch checkpoint.
//!
//! Layout, all back to back: five pickles — the magic number 0x1950a86a20f9469cfc6c, the
//! protocol version 1001, a sys-info dict, the object itself, the sorted list of storage
//! keys — then, for each key in that list's order, an 8-byte little-endian element count
//! followed by the storage's raw bytes (always little-endian: torch byte-swaps on
//! big-endian hosts when writing). Persistent ids in the object pickle are
//! `('storage', storage_type, root_key, location, numel, view_metadata)`.
//!
//! The pickles are parsed from a prefix of the file that starts small and doubles (up to
//! [`MAX_PICKLE_REGION`]) only when a pickle runs past it, so a 26 GB file costs a few
//! reads. Storages are then located by walking the counts with 8-byte reads and seeks;
//! storage bytes are never read. Each count must equal the size the pickle declared for
//! that key (torch checks the same), every storage the object uses must have a record,
//! every record a user, and the last record must end exactly at the end of the file.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};

use thiserror::Error;

use super::pickle::{
    Limits, PickleError, PidFlavor, Plain, StateDict, elem_bytes, parse_plain, parse_state_dict,
};
use super::torch_zip::StorageLocation;

/// The magic number torch writes first, as LONG1's little-endian bytes.
const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const PROTOCOL_VERSION: i64 = 1001;
/// How far into the file the five pickles may reach.
pub const MAX_PICKLE_REGION: u64 = 256 << 20;
const FIRST_READ: u64 = 64 << 10;

#[derive(Clone, Debug, PartialEq)]
pub struct LegacyCheckpoint {
    pub state_dict: StateDict,
    /// Each storage's bytes (after its 8-byte count) by key.
    pub storages: HashMap<String, StorageLocation>,
    /// `sys_info['little_endian']` as written (informational: the data is little-endian
    /// either way).
    pub writer_little_endian: Option<bool>,
}

#[derive(Debug, Error)]
pub enum LegacyError {
    #[error("I/O error reading legacy checkpoint: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a legacy torch checkpoint: the first pickle is not torch's magic number")]
    BadMagic,
    #[error("legacy checkpoint protocol version is {0:?}, expected 1001")]
    BadProtocolVersion(String),
    #[error("legacy checkpoint sys_info is not a dict")]
    BadSysInfo,
    #[error("legacy checkpoint storage key list is not a list of strings")]
    BadKeyList,
    #[error("{which} pickle (at byte {offset}): {source}")]
    Pickle {
        which: &'static str,
        offset: u64,
        source: PickleError,
    },
    #[error("legacy pickles run past {limit} bytes")]
    PicklesTooLarge { limit: u64 },
    #[error("storage key {key:?} is listed twice")]
    DuplicateKey { key: String },
    #[error("storage key {key:?} is listed but no tensor uses it")]
    UnusedKey { key: String },
    #[error("storage {key:?} is used by a tensor but has no record in the file")]
    MissingStorage { key: String },
    #[error(
        "storage {key:?} record at byte {offset} holds {found} elements, the pickle declared {expected}"
    )]
    WrongRecordSize {
        key: String,
        offset: u64,
        found: i64,
        expected: u64,
    },
    #[error(
        "storage {key:?} record at byte {offset} runs past the end of the file ({end} > {file_len})"
    )]
    Truncated {
        key: String,
        offset: u64,
        end: u64,
        file_len: u64,
    },
    #[error("{0} bytes after the last storage record")]
    TrailingBytes(u64),
    #[error("storage size arithmetic overflows for {key:?}")]
    Overflow { key: String },
}

/// Parses the pickles and locates every storage record.
pub fn index_legacy<R: Read + Seek>(mut r: R) -> Result<LegacyCheckpoint, LegacyError> {
    let file_len = r.seek(SeekFrom::End(0))?;
    let limits = Limits::default();
    let mut want = FIRST_READ.min(file_len);
    let mut buf = Vec::new();
    let (state_dict, keys, little, data_start) = loop {
        read_prefix(&mut r, &mut buf, want)?;
        match parse_pickles(&buf, &limits) {
            Ok(parsed) => break parsed,
            // A pickle ran past what we read: read more if the file has more.
            Err(LegacyError::Pickle { source, .. })
                if source.is_truncation() && want < file_len.min(MAX_PICKLE_REGION) =>
            {
                want = want.saturating_mul(2).min(file_len).min(MAX_PICKLE_REGION);
            }
            Err(LegacyError::Pickle { source, .. })
                if source.is_truncation() && file_len > MAX_PICKLE_REGION =>
            {
                return Err(LegacyError::PicklesTooLarge {
                    limit: MAX_PICKLE_REGION,
                });
            }
            Err(e) => return Err(e),
        }
    };
    drop(buf);

    // Element size per storage, from the object pickle's persistent ids (a key always maps
    // to one kind and size: the unpickler refuses conflicting declarations).
    let mut declared: HashMap<&str, (u64, u64)> = HashMap::new();
    for (_, t) in &state_dict.tensors {
        declared.insert(
            &t.storage_key,
            (t.storage_numel, elem_bytes(t.storage_kind.element())),
        );
    }

    let mut storages = HashMap::with_capacity(keys.len());
    let mut seen = HashSet::new();
    let mut offset = u64::try_from(data_start).map_err(|_| LegacyError::TrailingBytes(0))?;
    for key in &keys {
        if !seen.insert(key.as_str()) {
            return Err(LegacyError::DuplicateKey { key: key.clone() });
        }
        let &(numel, elem) = declared
            .get(key.as_str())
            .ok_or_else(|| LegacyError::UnusedKey { key: key.clone() })?;
        let count_end = offset
            .checked_add(8)
            .ok_or_else(|| LegacyError::Overflow { key: key.clone() })?;
        if count_end > file_len {
            return Err(LegacyError::Truncated {
                key: key.clone(),
                offset,
                end: count_end,
                file_len,
            });
        }
        let mut c = [0u8; 8];
        r.seek(SeekFrom::Start(offset))?;
        r.read_exact(&mut c)?;
        let count = i64::from_le_bytes(c);
        if u64::try_from(count).ok() != Some(numel) {
            return Err(LegacyError::WrongRecordSize {
                key: key.clone(),
                offset,
                found: count,
                expected: numel,
            });
        }
        let len = numel
            .checked_mul(elem)
            .ok_or_else(|| LegacyError::Overflow { key: key.clone() })?;
        let end = count_end
            .checked_add(len)
            .ok_or_else(|| LegacyError::Overflow { key: key.clone() })?;
        if end > file_len {
            return Err(LegacyError::Truncated {
                key: key.clone(),
                offset,
                end,
                file_len,
            });
        }
        storages.insert(
            key.clone(),
            StorageLocation {
                offset: count_end,
                len,
            },
        );
        offset = end;
    }
    if let Some(missing) = declared.keys().find(|k| !seen.contains(**k)) {
        return Err(LegacyError::MissingStorage {
            key: (*missing).to_string(),
        });
    }
    if offset != file_len {
        return Err(LegacyError::TrailingBytes(file_len.saturating_sub(offset)));
    }
    Ok(LegacyCheckpoint {
        state_dict,
        storages,
        writer_little_endian: little,
    })
}

/// Makes `buf` hold the first `want` bytes of the file.
fn read_prefix<R: Read + Seek>(r: &mut R, buf: &mut Vec<u8>, want: u64) -> Result<(), LegacyError> {
    let have = u64::try_from(buf.len()).unwrap_or(u64::MAX);
    if want <= have {
        return Ok(());
    }
    let more =
        usize::try_from(want.saturating_sub(have)).map_err(|_| LegacyError::PicklesTooLarge {
            limit: MAX_PICKLE_REGION,
        })?;
    r.seek(SeekFrom::Start(have))?;
    let start = buf.len();
    buf.resize(start.saturating_add(more), 0);
    r.read_exact(buf.get_mut(start..).unwrap_or(&mut []))?;
    Ok(())
}

type Parsed = (StateDict, Vec<String>, Option<bool>, usize);

/// Parses the five pickles from the start of `data`; returns the state dict, the storage
/// key list, sys_info's little_endian, and where the storage records begin.
fn parse_pickles(data: &[u8], limits: &Limits) -> Result<Parsed, LegacyError> {
    let mut at = 0usize;
    let mut next_plain = |which: &'static str| -> Result<Plain, LegacyError> {
        let rest = data.get(at..).unwrap_or(&[]);
        let (v, used) = parse_plain(rest, limits).map_err(|source| LegacyError::Pickle {
            which,
            offset: u64::try_from(at).unwrap_or(u64::MAX),
            source,
        })?;
        at = at.saturating_add(used);
        Ok(v)
    };

    match next_plain("magic number")? {
        Plain::BigInt(b) if b == MAGIC => {}
        _ => return Err(LegacyError::BadMagic),
    }
    match next_plain("protocol version")? {
        Plain::Int(PROTOCOL_VERSION) => {}
        other => {
            return Err(LegacyError::BadProtocolVersion(
                format!("{other:?}").chars().take(80).collect(),
            ));
        }
    }
    let little = match next_plain("sys_info")? {
        Plain::Dict(pairs) => pairs.iter().find_map(|(k, v)| match (k, v) {
            (Plain::Str(k), Plain::Bool(b)) if k == "little_endian" => Some(*b),
            _ => None,
        }),
        _ => return Err(LegacyError::BadSysInfo),
    };

    let rest = data.get(at..).unwrap_or(&[]);
    let (state_dict, used) =
        parse_state_dict(rest, PidFlavor::Legacy, limits).map_err(|source| {
            LegacyError::Pickle {
                which: "object",
                offset: u64::try_from(at).unwrap_or(u64::MAX),
                source,
            }
        })?;
    at = at.saturating_add(used);

    let rest = data.get(at..).unwrap_or(&[]);
    let (keys, used) = parse_plain(rest, limits).map_err(|source| LegacyError::Pickle {
        which: "storage key list",
        offset: u64::try_from(at).unwrap_or(u64::MAX),
        source,
    })?;
    at = at.saturating_add(used);
    let keys = match keys {
        Plain::List(items) => items
            .into_iter()
            .map(|k| match k {
                Plain::Str(s) => Ok(s),
                _ => Err(LegacyError::BadKeyList),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err(LegacyError::BadKeyList),
    };
    Ok((state_dict, keys, little, at))
}
