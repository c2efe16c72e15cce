//! Writing shards in place: each file is created at its final size with its header first,
//! and chunks are written at their planned offsets in whatever order they come, so no shard
//! is ever buffered in memory. Writes bypass the page cache (`O_DIRECT`, see `pipeline::direct`)
//! where the filesystem allows it, and go through it (`pwrite`) elsewhere.
//!

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::direct::{DirectFile, HeldBytes, QueuedWriteError, WriteBehind, direct_unit};
use crate::error::{Error, Result};
use crate::plan::Shard;

/// How output shards are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteMode {
    /// Direct where the filesystem allows it, except on network filesystems (where the
    /// page cache batches small writes into large requests).
    Auto,
    /// Around the page cache (`O_DIRECT`); an error where the filesystem refuses it.
    Direct,
    /// Through the page cache.
    Buffered,
}

struct ShardFile {
    path: PathBuf,
    file: File,
    direct: Option<DirectFile>,
}

pub struct ShardFiles {
    files: Vec<ShardFile>,
}

/// The writer threads of direct writes, unless every write goes through the page cache.
fn write_behind(mode: WriteMode) -> Result<Option<Arc<WriteBehind>>> {
    if mode == WriteMode::Buffered {
        return Ok(None);
    }
    match WriteBehind::new(direct_unit()) {
        Ok(w) => Ok(Some(Arc::new(w))),
        Err(e) if mode == WriteMode::Direct => {
            Err(Error::io("cannot start the direct writer threads", e))
        }
        // Where no thread may start, write through the page cache instead.
        Err(_) => Ok(None),
    }
}

impl ShardFiles {
    /// Create every shard in `dir`, reserve its space and write its header.
    pub fn create(dir: &Path, shards: &[Shard], mode: WriteMode) -> Result<ShardFiles> {
        let behind = write_behind(mode)?;
        let mut files = Vec::with_capacity(shards.len());
        for s in shards {
            let path = dir.join(&s.file_name);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| Error::io("cannot create", e).in_file(&path))?;
            reserve(&f, s.size).map_err(|e| Error::io("cannot reserve space", e).in_file(&path))?;
            let shard = ShardFile::new(path, f, s.size, mode, &behind)?;
            shard.write_at(0, &s.header)?;
            // The whole header now: a killed run's shard is recognized by it.
            shard.flush()?;
            files.push(shard);
        }
        Ok(ShardFiles { files })
    }

    /// Reopen the shards a killed run of the same plan left in `dir` (see
    /// [`shards_match`]); their headers are already written.
    pub fn open_existing(dir: &Path, shards: &[Shard], mode: WriteMode) -> Result<ShardFiles> {
        let behind = write_behind(mode)?;
        let mut files = Vec::with_capacity(shards.len());
        for s in shards {
            let path = dir.join(&s.file_name);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| Error::io("cannot reopen", e).in_file(&path))?;
            if !shard_matches(&f, s) {
                return Err(Error::invalid(
                    "the shard left by the killed run does not match this run's plan",
                )
                .in_file(&path));
            }
            files.push(ShardFile::new(path, f, s.size, mode, &behind)?);
        }
        Ok(ShardFiles { files })
    }

    pub fn write_at(&self, shard: usize, offset: u64, bytes: &[u8]) -> Result<()> {
        self.files[shard].write_at(offset, bytes)
    }

    /// [`write_at`](Self::write_at) for bytes a direct write may keep until they are on
    /// disk, instead of copying them.
    pub fn write_held(&self, shard: usize, offset: u64, held: Arc<dyn HeldBytes>) -> Result<()> {
        let s = &self.files[shard];
        let written = match &s.direct {
            Some(d) => d.write_held(held, offset),
            None => write_in_pieces(&s.file, held.bytes(), offset),
        };
        written.map_err(|e| write_error(e, &s.path))
    }

    /// Flush the shards' data to disk (for the resume journal: a tensor is recorded as done
    /// only after its bytes are durable).
    pub fn sync_data(&self) -> Result<()> {
        for s in &self.files {
            s.flush()?;
            s.file
                .sync_data()
                .map_err(|e| Error::io("fsync failed", e).in_file(&s.path))?;
        }
        Ok(())
    }

    /// Flush every shard to disk: one fsync per shard.
    pub fn sync(&self) -> Result<()> {
        for s in &self.files {
            s.flush()?;
            s.file
                .sync_all()
                .map_err(|e| Error::io("fsync failed", e).in_file(&s.path))?;
        }
        Ok(())
    }
}

impl ShardFile {
    fn new(
        path: PathBuf,
        file: File,
        size: u64,
        mode: WriteMode,
        behind: &Option<Arc<WriteBehind>>,
    ) -> Result<ShardFile> {
        let wanted = match mode {
            WriteMode::Buffered => false,
            WriteMode::Direct => true,
            WriteMode::Auto => !path.parent().is_some_and(super::reader::is_network_fs),
        };
        let direct = match behind.as_ref().filter(|_| wanted && size > 0) {
            Some(behind) => match DirectFile::open(&path, &file, size, behind) {
                Ok(d) => Some(d),
                Err(e) if mode == WriteMode::Direct => {
                    return Err(
                        Error::io("cannot write with O_DIRECT (--write direct)", e).in_file(&path)
                    );
                }
                Err(_) => None,
            },
            None => None,
        };
        Ok(ShardFile { path, file, direct })
    }

    fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        let written = match &self.direct {
            Some(d) => d.write_at(bytes, offset),
            None => write_in_pieces(&self.file, bytes, offset),
        };
        written.map_err(|e| write_error(e, &self.path))
    }

    /// Write the bytes that wait in partial blocks (direct writes only).
    fn flush(&self) -> Result<()> {
        match &self.direct {
            Some(d) => d.flush().map_err(|e| write_error(e, &self.path)),
            None => Ok(()),
        }
    }
}

/// A failed write, naming the shard it was for: a queued direct write that failed is
/// reported by whichever shard writes next.
fn write_error(e: std::io::Error, own: &Path) -> Error {
    let path = e
        .get_ref()
        .and_then(|r| r.downcast_ref::<QueuedWriteError>())
        .map_or_else(|| own.to_path_buf(), |q| q.path.clone());
    Error::io("write failed", e).in_file(path)
}

/// Whether `dir` holds every shard of the plan at its full size with the plan's header, as a
/// killed run of the same plan leaves them.
pub fn shards_match(dir: &Path, shards: &[Shard]) -> bool {
    shards
        .iter()
        .all(|s| File::open(dir.join(&s.file_name)).is_ok_and(|f| shard_matches(&f, s)))
}

fn shard_matches(f: &File, s: &Shard) -> bool {
    if f.metadata().map(|m| m.len()).ok() != Some(s.size) {
        return false;
    }
    let mut header = vec![0u8; s.header.len()];
    f.read_exact_at(&mut header, 0).is_ok() && header == s.header
}

/// The most bytes one buffered `pwrite` copies. Larger writes make the kernel fill them
/// with large page-cache folios, whose allocation was measured up to 10× slower than the
/// copy itself on a VM that returns free memory to its host (free page reporting).
const BUFFERED_PIECE: usize = 64 << 10;

/// `pwrite` in pieces of [`BUFFERED_PIECE`], each then queued for writeback.
fn write_in_pieces(f: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    let mut at = offset;
    for piece in bytes.chunks(BUFFERED_PIECE) {
        f.write_all_at(piece, at)?;
        at += piece.len() as u64;
    }
    start_writeback(f, offset, bytes.len() as u64);
    Ok(())
}

/// Ask the kernel to start writing these bytes to disk now (without waiting), so writeback
/// overlaps the rest of the run instead of piling up for the final fsync.
fn start_writeback(f: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return;
    };
    // SAFETY: a valid descriptor; the call only schedules I/O. Failure is harmless: the
    // final fsync writes everything anyway.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Give the file its final size, allocating the blocks now so a full disk fails here with
/// a clear error rather than halfway through the run.
fn reserve(f: &File, size: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if size == 0 {
        return Ok(());
    }
    let len = libc::off_t::try_from(size).map_err(|_| std::io::Error::other("file too large"))?;
    // SAFETY: a valid open file descriptor and a non-negative length.
    let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len) };
    match rc {
        0 => Ok(()),
        // Filesystems without fallocate: fall back to a sparse file of the right size.
        libc::EOPNOTSUPP | libc::EINVAL => f.set_len(size),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}
