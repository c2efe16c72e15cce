//! Reading tensor bytes: memory maps released after each chunk, or positional reads.
//!
//! `mmap` is fastest on local disks; the mapping covers only the chunk and is dropped with
//! it, so page-cache pages do not pile up in the process's RSS. `read` uses only positional
//! reads into owned buffers: on network filesystems a file truncated under a mapping would
//! kill the process with SIGBUS, and large sequential reads are faster there anyway.
//! `auto` picks `read` for files on NFS, SMB/CIFS, FUSE, 9p and Ceph, and everywhere for the
//! operands of methods with whole-tensor statistics, which are gone over several times (a
//! copy in the CPU cache beats a mapping read from DRAM: see [`ReadHints::repeated`]). Files a
//! [`Source`](crate::source::Source) cannot map (remote ones) are always read.
//!
//! [`read_rows`] is the one question the pipeline asks: the bytes of rows `r0..r1` of a
//! tensor, row-major and little-endian, whatever its layout in the file.

use std::ops::{Deref, Range};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::model::{Layout, TensorInfo};
use crate::shape::RowMajor;
use crate::source::{Mapped, SourceFile};

use super::direct::direct_unit;

pub use crate::source::is_network_fs;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    Auto,
    Mmap,
    Read,
}

/// Bytes of one tensor chunk.
pub enum Buf {
    /// A mapping of a local file, released when the chunk drops.
    Mapped(Mapped),
    Owned(Vec<u8>),
    /// A positional read into a recycled buffer.
    Pooled(Pooled),
}

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Buf::Mapped(m) => m,
            Buf::Owned(v) => v,
            Buf::Pooled(p) => p,
        }
    }
}

/// Idle read buffers. Reusing them saves the page faults and zeroing a fresh allocation of
/// tens of MiB costs; at most `POOL_MAX` wait here (they are not counted by the budget).
static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
const POOL_MAX: usize = 4;

/// A buffer that goes back to the pool when dropped: its bytes `start..start + len` are the
/// read.
pub struct Pooled {
    v: Vec<u8>,
    start: usize,
    len: usize,
}

impl Pooled {
    /// A buffer of `len` initialized bytes, recycled when one is big enough. With `place`,
    /// the bytes start at the same offset within a [`direct_unit`] block of memory as `place`
    /// within one of the file: bytes bound for that file offset are then written with
    /// `O_DIRECT` straight from here.
    fn take(len: usize, place: Option<u64>) -> Pooled {
        let unit = direct_unit();
        let room = len + if place.is_some() { unit } else { 0 };
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let caps: Vec<usize> = pool.iter().map(Vec::capacity).collect();
        let mut v = pick(&caps, room)
            .map(|i| pool.swap_remove(i))
            .unwrap_or_default();
        drop(pool);
        // A recycled buffer keeps its initialized length, so only bytes never used before
        // are zeroed (the read overwrites them all anyway). Growth leaves some room over.
        if v.len() < room {
            if v.capacity() < room {
                v.reserve_exact(room + room / 16 - v.len());
            }
            v.resize(room, 0);
        }
        let start = place.map_or(0, |at| {
            let phase = (at % unit as u64) as usize;
            (phase + unit - v.as_ptr() as usize % unit) % unit
        });
        Pooled { v, start, len }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.start..self.start + self.len]
    }
}

impl Deref for Pooled {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.v[self.start..self.start + self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.v);
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOL_MAX {
            pool.push(v);
        } else {
            let caps: Vec<usize> = pool.iter().map(Vec::capacity).collect();
            if let Some(i) = evict(&caps, v.capacity()) {
                pool[i] = v;
            }
        }
    }
}

/// Which idle buffer (by capacity) serves a read of `len` bytes: the smallest with the
/// room, failing that the largest, to be grown (chunk sizes differ by a few rows from tensor
/// to tensor, so exact fits are rare and a pool of near misses would never be used).
fn pick(caps: &[usize], len: usize) -> Option<usize> {
    let fits = (0..caps.len()).filter(|&i| caps[i] >= len);
    fits.min_by_key(|&i| caps[i])
        .or_else(|| (0..caps.len()).max_by_key(|&i| caps[i]))
}

/// Which idle buffer a returning one of capacity `cap` replaces in a full pool: the
/// smallest, when smaller (larger buffers serve every request).
fn evict(caps: &[usize], cap: usize) -> Option<usize> {
    (0..caps.len())
        .min_by_key(|&i| caps[i])
        .filter(|&i| caps[i] < cap)
}

/// How a read will be used, which decides where its bytes go.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadHints {
    /// The output file offset the bytes are copied to, for a read into owned memory (see
    /// `Pooled::take`).
    pub place: Option<u64>,
    /// The bytes are read again pass after pass (a streamed step), or belong to a method
    /// with whole-tensor statistics. Under `auto` they are then copied into owned memory
    /// rather than mapped: the copy leaves them in the CPU cache for the pass's blocks,
    /// where a mapping is set up anew each pass and read from DRAM (ties: 4.96 → 4.13 s of
    /// CPU, nuslerp 5.13 → 4.59 s; model_stock held whole: 6.82 → 6.09 s).
    pub repeated: bool,
}

/// An open input file and how to read it.
pub struct InputFile {
    file: Arc<dyn SourceFile>,
    mode: IoMode,
    /// Whether `mode` was chosen by `auto` (which may read a repeated read instead).
    chosen: bool,
}

impl InputFile {
    /// Read `file` in `mode`; `auto` maps local files and reads network and remote ones.
    pub fn new(file: Box<dyn SourceFile>, mode: IoMode) -> InputFile {
        let chosen = mode == IoMode::Auto;
        let mode = match mode {
            IoMode::Auto if file.prefers_reads() => IoMode::Read,
            IoMode::Auto => IoMode::Mmap,
            m => m,
        };
        InputFile {
            file: Arc::from(file),
            mode,
            chosen,
        }
    }

    pub fn mode(&self) -> IoMode {
        self.mode
    }

    /// How messages name the file.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The file, for reading bytes `offset..offset+len` a window at a time (checked to lie
    /// within it), when this file reads that way (see [`windowed_rows`]); `repeated` as in
    /// [`ReadHints`].
    fn windowed(
        &self,
        offset: u64,
        len: u64,
        repeated: bool,
    ) -> std::io::Result<Option<Arc<dyn SourceFile>>> {
        let copied = self.mode == IoMode::Read || (repeated && self.chosen);
        if !copied || self.file.prefers_reads() {
            return Ok(None);
        }
        self.check_range(offset, len)?;
        Ok(Some(Arc::clone(&self.file)))
    }

    fn check_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let file_len = self.file.len();
        if offset.checked_add(len).is_none_or(|end| end > file_len) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "bytes {offset}..+{len} lie past the end of the file ({file_len} bytes); was it truncated?"
                ),
            ));
        }
        Ok(())
    }

    /// Bytes `offset..offset+len` of the file, used as `hints` says.
    pub fn read(&self, offset: u64, len: u64, hints: ReadHints) -> std::io::Result<Buf> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(Buf::Owned(Vec::new()));
        }
        let n = usize::try_from(len)
            .map_err(|_| std::io::Error::other(format!("{len} bytes do not fit in memory")))?;
        if self.mode == IoMode::Mmap
            && !(hints.repeated && self.chosen)
            && let Some(mapped) = self.file.map(offset, n)
        {
            return Ok(Buf::Mapped(mapped?));
        }
        let mut v = Pooled::take(n, hints.place);
        self.file.read_at(offset, v.bytes_mut())?;
        Ok(Buf::Pooled(v))
    }
}

/// A tensor's rows in an input file, read piece by piece with positional reads
/// ([`windowed_rows`]).
pub struct FileRange {
    file: Arc<dyn SourceFile>,
    offset: u64,
    len: u64,
    /// The tensor, for errors.
    tensor: String,
}

impl FileRange {
    /// Fill `buf` with the range's bytes from `at` on; errors name the file and tensor.
    pub fn read_at(&self, at: u64, buf: &mut [u8]) -> Result<()> {
        let end = at.checked_add(buf.len() as u64);
        let read = if end.is_none_or(|end| end > self.len) {
            Err(std::io::Error::other(format!(
                "bytes {at}..+{} lie outside the {}-byte range read",
                buf.len(),
                self.len
            )))
        } else {
            self.file.read_at(self.offset + at, buf)
        };
        read.map_err(|e| read_failed(e, self.file.path(), &self.tensor))
    }
}

/// A failed read of `tensor` in `path`.
fn read_failed(e: std::io::Error, path: &Path, tensor: &str) -> Error {
    Error::io("read failed", e).in_file(path).at_tensor(tensor)
}

/// Rows `rows` of tensor `t` in `file`, to be read a window at a time as they are used, when
/// a read of them would copy them from a local file's page cache (`read`, or `auto`'s
/// choice for a `repeated` read; see [`ReadHints::repeated`]) and `t` is stored row-major (a
/// gathered view is read whole, by [`read_rows`]); `None` in other modes and for network
/// files (read in large pieces). Windows that stay in the CPU cache save writing a whole
/// chunk's copy to DRAM and reading it back (one pass over a model with a trivial decode:
/// 0.58–0.68 s with 16 MiB reads, 0.28–0.30 s with 1 MiB windows; nuslerp's CPU: −5%, the
/// page cache's own copy being most of the rest). Errors name the file and the tensor.
pub fn windowed_rows(
    file: &InputFile,
    t: &TensorInfo,
    rows: Range<u64>,
    repeated: bool,
) -> Result<Option<FileRange>> {
    if !matches!(t.layout, Layout::Contiguous) {
        return Ok(None);
    }
    let rb = t.row_bytes();
    let (offset, len) = (t.offset + rows.start * rb, (rows.end - rows.start) * rb);
    let range = file
        .windowed(offset, len, repeated)
        .map_err(|e| read_failed(e, file.path(), &t.name))?;
    Ok(range.map(|file| FileRange {
        file,
        offset,
        len,
        tensor: t.name.clone(),
    }))
}

/// Rows `rows` of tensor `t` (all of it when `None`), row-major and little-endian, read from
/// `file`, the file `t` lives in. Errors name the file and the tensor.
pub fn read_rows(file: &InputFile, t: &TensorInfo, rows: Option<Range<u64>>) -> Result<Buf> {
    read_rows_with(file, t, rows, ReadHints::default())
}

/// [`read_rows`] for a read used as `hints` says.
pub fn read_rows_with(
    file: &InputFile,
    t: &TensorInfo,
    rows: Option<Range<u64>>,
    hints: ReadHints,
) -> Result<Buf> {
    let io_err = |e: std::io::Error| read_failed(e, file.path(), &t.name);
    let rb = t.row_bytes();
    // A range covering every row is the whole tensor (the only way sub-byte types, whose
    // rows need not end on a byte, are ever read).
    let rows = rows.filter(|rr| !(rr.start == 0 && rr.end >= t.rows()));
    if let Layout::Gathered(view) = &t.layout {
        // Views and big-endian storages: read the span, gather, then cut the rows.
        let span = file.read(t.offset, view.span, hints).map_err(io_err)?;
        let mut bytes = view.gather(&span).map_err(|e| {
            Error::invalid(e.to_string())
                .in_file(file.path())
                .at_tensor(&t.name)
        })?;
        if let Some(rr) = rows {
            let (a, b) = ((rr.start * rb) as usize, (rr.end * rb) as usize);
            bytes = bytes.get(a..b).map(<[u8]>::to_vec).ok_or_else(|| {
                Error::invalid(format!("gathered {} bytes, rows need {b}", bytes.len()))
                    .in_file(file.path())
                    .at_tensor(&t.name)
            })?;
        }
        return Ok(Buf::Owned(bytes));
    }
    let (off, len) = match rows {
        Some(rr) => (t.offset + rr.start * rb, (rr.end - rr.start) * rb),
        None => (t.offset, t.len),
    };
    file.read(off, len, hints).map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_serves_near_misses_and_keeps_large_buffers() {
        // Best fit among those with the room.
        assert_eq!(pick(&[100, 50, 70], 60), Some(2));
        // None with the room: the largest, to grow (the case that allocated every read).
        assert_eq!(pick(&[5_584_896, 10_240, 5_000_000], 5_591_040), Some(0));
        assert_eq!(pick(&[], 1), None);
        assert_eq!(evict(&[10_240, 5_584_896], 5_591_040), Some(0));
        assert_eq!(evict(&[6_000_000, 7_000_000], 5_591_040), None);
    }

    /// A local file `x` of 20 000 patterned bytes, in a temporary folder (kept alive by the
    /// first value), with a source over that folder.
    fn test_file() -> (tempfile::TempDir, Vec<u8>, crate::source::LocalSource) {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("x"), &data).unwrap();
        let src = crate::source::LocalSource::new(dir.path());
        (dir, data, src)
    }

    /// `auto` maps a read once and copies one read pass after pass; an explicit mode is
    /// kept for both. Either way the bytes are the file's.
    #[test]
    fn auto_copies_repeated_reads_and_maps_the_rest() {
        use crate::source::Source;
        let (_dir, data, src) = test_file();
        let once = ReadHints::default();
        let passes = ReadHints {
            repeated: true,
            ..once
        };
        let kind = |mode, hints| {
            let f = InputFile::new(src.open("x").unwrap(), mode);
            let b = f.read(100, 9000, hints).unwrap();
            assert_eq!(&b[..], &data[100..9100]);
            match b {
                Buf::Mapped(_) => "mapped",
                Buf::Pooled(_) => "read",
                Buf::Owned(_) => "owned",
            }
        };
        assert_eq!(kind(IoMode::Auto, once), "mapped");
        assert_eq!(kind(IoMode::Auto, passes), "read");
        assert_eq!(kind(IoMode::Mmap, passes), "mapped");
        assert_eq!(kind(IoMode::Read, once), "read");
    }

    /// Windowed ranges exist where a read would copy from a local file (`read`, and `auto`
    /// for a repeated read), not under `mmap`; they read the range's bytes, refuse reads outside it and
    /// ranges past the end of the file, and report a file truncated under them.
    #[test]
    fn windowed_ranges_read_their_bytes_and_report_truncation() {
        use crate::source::Source;
        let (dir, data, src) = test_file();
        let open = |mode| InputFile::new(src.open("x").unwrap(), mode);
        assert!(open(IoMode::Mmap).windowed(0, 10, true).unwrap().is_none());
        assert!(open(IoMode::Auto).windowed(0, 10, false).unwrap().is_none());
        assert!(open(IoMode::Read).windowed(0, 10, false).unwrap().is_some());
        let past = open(IoMode::Read)
            .windowed(19_000, 2000, false)
            .err()
            .unwrap();
        assert_eq!(past.kind(), std::io::ErrorKind::UnexpectedEof);
        let f = open(IoMode::Auto);
        let range = FileRange {
            file: f.windowed(1000, 5000, true).unwrap().unwrap(),
            offset: 1000,
            len: 5000,
            tensor: "layer.weight".into(),
        };
        let mut buf = vec![0u8; 300];
        range.read_at(4700, &mut buf).unwrap();
        assert_eq!(buf, &data[5700..6000]);
        let outside = range.read_at(4701, &mut buf).unwrap_err();
        let outside = outside.report().to_string();
        assert!(outside.contains("outside the 5000-byte range"), "{outside}");
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("x"))
            .unwrap()
            .set_len(3000)
            .unwrap();
        let e = range.read_at(4000, &mut buf).unwrap_err();
        let e = e.report().to_string();
        let path = dir.path().join("x");
        assert!(e.contains(&*path.to_string_lossy()), "{e}");
        assert!(e.contains("layer.weight"), "{e}");
        assert!(e.contains("read failed"), "{e}");
    }

    #[test]
    fn recycled_buffers_hold_exactly_the_asked_length() {
        let unit = direct_unit();
        for len in [5_584_896, 10, 5_591_040, 0, 16_773_120] {
            let b = Pooled::take(len, None);
            assert_eq!(b.len(), len);
            for at in [0u64, 1, 4095, 4096 * 7 + 100] {
                let mut b = Pooled::take(len, Some(at));
                assert_eq!(b.len(), len);
                assert_eq!(b.bytes_mut().len(), len);
                let phase = b.as_ptr() as usize % unit;
                assert_eq!(phase as u64, at % unit as u64, "placed for {at}");
            }
        }
    }
}
