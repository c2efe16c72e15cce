//! Reading tensor bytes: memory maps released after each chunk, or positional reads.
//!
//! `mmap` is fastest on local disks; the mapping covers only the chunk and is dropped with
//! it, so page-cache pages do not pile up in the process's RSS. `read` uses only positional
//! reads into owned buffers: on network filesystems a file truncated under a mapping would
//! kill the process with SIGBUS, and large sequential reads are faster there anyway.
//! `auto` picks `read` for files on NFS, SMB/CIFS, FUSE, 9p and Ceph.

use std::fs::File;
use std::ops::Deref;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use memmap2::{Advice, Mmap, MmapOptions};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    Auto,
    Mmap,
    Read,
}

/// Bytes of one tensor chunk.
pub enum Buf {
    Mapped {
        map: Mmap,
        start: usize,
        len: usize,
    },
    Owned(Vec<u8>),
    /// A positional read into a recycled buffer.
    Pooled(Pooled),
}

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Buf::Mapped { map, start, len } => &map[*start..*start + *len],
            Buf::Owned(v) => v,
            Buf::Pooled(p) => &p.0,
        }
    }
}

/// Idle read buffers. Reusing them saves the page faults and zeroing a fresh allocation of
/// tens of MiB costs; at most `POOL_MAX` wait here (they are not counted by the budget).
static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
const POOL_MAX: usize = 4;

/// A buffer that goes back to the pool when dropped.
pub struct Pooled(Vec<u8>);

impl Pooled {
    /// A buffer of exactly `len` initialized bytes, recycled when one is big enough.
    fn take(len: usize) -> Pooled {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = match pool.iter().position(|b| b.capacity() >= len) {
            Some(i) => pool.swap_remove(i),
            None => Vec::with_capacity(len),
        };
        drop(pool);
        // Shrinking keeps old bytes (they are overwritten by the read); only growth zeroes.
        v.truncate(len);
        v.resize(len, 0);
        Pooled(v)
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOL_MAX {
            pool.push(v);
        }
    }
}

/// An open input file and how to read it.
pub struct InputFile {
    file: File,
    mode: IoMode,
    len: u64,
}

impl InputFile {
    pub fn open(path: &Path, mode: IoMode) -> Result<InputFile> {
        let file = File::open(path).map_err(|e| Error::io("cannot open", e).in_file(path))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("cannot stat", e).in_file(path))?
            .len();
        let mode = match mode {
            IoMode::Auto if is_network_fs(path) => IoMode::Read,
            IoMode::Auto => IoMode::Mmap,
            m => m,
        };
        Ok(InputFile { file, mode, len })
    }

    pub fn mode(&self) -> IoMode {
        self.mode
    }

    /// Bytes `offset..offset+len` of the file.
    pub fn read(&self, offset: u64, len: u64) -> std::io::Result<Buf> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "bytes {offset}..+{len} lie past the end of the file ({} bytes); was it truncated?",
                    self.len
                ),
            ));
        }
        if len == 0 {
            return Ok(Buf::Owned(Vec::new()));
        }
        match self.mode {
            IoMode::Mmap => {
                let page = page_size();
                let aligned = offset - offset % page;
                let start = (offset - aligned) as usize;
                let map_len = start + len as usize;
                // SAFETY: the mapping is read-only and private to this chunk. If another
                // process truncates the file while it is mapped, reads fault (SIGBUS);
                // `--io read` exists for filesystems where that can happen.
                // MAP_POPULATE: the reader thread takes the page faults (and any disk reads)
                // up front, so compute workers never stall on them.
                let map = unsafe {
                    MmapOptions::new()
                        .offset(aligned)
                        .len(map_len)
                        .populate()
                        .map(&self.file)?
                };
                let _ = map.advise(Advice::Sequential);
                Ok(Buf::Mapped {
                    map,
                    start,
                    len: len as usize,
                })
            }
            _ => {
                let mut v = Pooled::take(len as usize);
                self.file.read_exact_at(&mut v.0, offset)?;
                Ok(Buf::Pooled(v))
            }
        }
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

/// Whether `path` lives on a network or FUSE filesystem (statfs magic numbers).
pub fn is_network_fs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    const NETWORK: &[i64] = &[
        0x6969,                // NFS
        0x517B,                // SMB
        0xFE53_4D42u32 as i64, // SMB2
        0xFF53_4D42u32 as i64, // CIFS
        0x6573_5546,           // FUSE
        0x0102_1997,           // 9p
        0x00C3_6400,           // Ceph
        0x0BD0_0BD0,           // Lustre
    ];
    #[allow(clippy::unnecessary_cast)]
    let t = st.f_type as i64;
    NETWORK.contains(&t) || NETWORK.contains(&(t & 0xFFFF_FFFF))
}
