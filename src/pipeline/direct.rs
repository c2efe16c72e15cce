//! Output writes that bypass the page cache (`O_DIRECT`).
//!
//! A buffered `pwrite` copies every output byte into freshly allocated page-cache pages and
//! leaves them dirty for writeback: a kernel copy per byte, page allocation, and on a
//! machine low on RAM the output evicting the inputs still to be read. With `O_DIRECT` the
//! disk reads the bytes from our buffer instead. On the 2-core VM this was measured on,
//! writing 1.8 GiB took 1.0–1.6 s directly and 2.8–12.8 s in 32 MiB buffered writes (kernel
//! time: large page-cache folios on memory the VM had handed back to its host).
//!
//! `O_DIRECT` needs offsets, lengths and memory aligned to the device's block, but chunks
//! land at any byte offset. So each write is cut in three: the whole `unit`-sized blocks
//! inside it are copied into aligned buffers that writer threads put on disk
//! ([`WriteBehind`], so the worker goes back to computing); the partial blocks at its ends
//! wait in memory until the neighbouring chunks fill them (then go as one block), or until
//! a flush, which reads the block back from disk, lays the waiting bytes over it and writes
//! it whole. A chunk built in an [`AlignedOut`] (its bytes placed in memory at the same
//! offset within a block as in the file) skips the copy: the queue holds the chunk itself,
//! with its share of the budget, until its blocks are on disk. The file's last block, when
//! it is partial, is written through the page cache (a whole-block write would extend the
//! file) and only through it; the unit is at least the page size, so no page-cache page
//! ever holds bytes that were also written directly.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, unbounded};

pub use crate::aligned::{AlignedOut, direct_unit};

/// Bytes of one queued direct write (larger writes measured no faster on their own).
const PIECE_BYTES: usize = 1 << 20;
/// Pieces waiting for the disk at most: the write-behind memory, outside the budget.
const PIECES: usize = 32;
/// Bytes of held chunks waiting for the disk at most: a longer backlog only grows the
/// process (measured 7× the page faults for the same time). Chunks hold their budget permit
/// while they wait; a streamed step's outputs, written while its passes go on, are outside
/// it, like the copy buffers above.
const HELD_BYTES: usize = 64 << 20;
/// Threads putting queued pieces on disk: each waits on one write, so this is the queue
/// depth the disk sees (2 → 4 took linear from 1.66 to 1.37 s; 8 gained nothing clear).
const WRITER_THREADS: usize = 4;

/// Bytes the write-behind queue may keep until they are on disk instead of copying them
/// (a finished chunk, with its budget permit).
pub trait HeldBytes: Send + Sync {
    fn bytes(&self) -> &[u8];
}

impl HeldBytes for AlignedOut {
    fn bytes(&self) -> &[u8] {
        AlignedOut::bytes(self)
    }
}

/// A buffer of `len` bytes whose start is aligned to `align` (a power of two).
pub(crate) struct AlignedBuf {
    v: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub(crate) fn new(len: usize, align: usize) -> AlignedBuf {
        let v = vec![0u8; len + align];
        let addr = v.as_ptr() as usize;
        let start = addr.next_multiple_of(align) - addr;
        AlignedBuf { v, start, len }
    }

    fn get(&self) -> &[u8] {
        &self.v[self.start..self.start + self.len]
    }

    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.start..self.start + self.len]
    }
}

/// A block some of whose bytes have arrived.
struct Partial {
    block: AlignedBuf,
    /// Which bytes of `block` have arrived (a bit each).
    arrived: Vec<u64>,
    count: usize,
    /// Bytes arrived since the last flush wrote the block.
    dirty: bool,
}

impl Partial {
    fn new(unit: usize) -> Partial {
        Partial {
            block: AlignedBuf::new(unit, unit),
            arrived: vec![0; unit.div_ceil(64)],
            count: 0,
            dirty: false,
        }
    }

    fn put(&mut self, at: usize, bytes: &[u8]) {
        self.block.get_mut()[at..at + bytes.len()].copy_from_slice(bytes);
        for i in at..at + bytes.len() {
            let (w, bit) = (i / 64, 1u64 << (i % 64));
            if self.arrived[w] & bit == 0 {
                self.arrived[w] |= bit;
                self.count += 1;
            }
        }
        self.dirty = true;
    }

    fn has(&self, i: usize) -> bool {
        bit(&self.arrived, i)
    }

    /// The runs of arrived bytes, as ranges within the block.
    fn runs(&self, len: usize) -> Vec<std::ops::Range<usize>> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < len {
            if self.has(i) {
                let s = i;
                while i < len && self.has(i) {
                    i += 1;
                }
                runs.push(s..i);
            } else {
                i += 1;
            }
        }
        runs
    }
}

fn bit(set: &[u64], i: usize) -> bool {
    set[i / 64] & (1 << (i % 64)) != 0
}

/// Whole blocks on their way to disk. A worker copies them into pooled aligned buffers
/// and goes back to computing while writer threads put them on disk, as the page cache
/// would; it waits only when all [`PIECES`] buffers are in flight. The first failed write
/// is reported by the next write or flush.
pub struct WriteBehind {
    jobs: Option<Sender<Job>>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

struct Job {
    file: Arc<File>,
    path: Arc<Path>,
    offset: u64,
    data: JobData,
}

enum JobData {
    /// The first `len` bytes of a pooled buffer they were copied into.
    Copied(AlignedBuf, usize),
    /// A range of bytes held until written (its start aligned).
    Held(Arc<dyn HeldBytes>, std::ops::Range<usize>),
}

struct Shared {
    unit: usize,
    /// Idle buffers, and how many exist.
    pool: Mutex<(Vec<AlignedBuf>, usize)>,
    freed: Condvar,
    state: Mutex<State>,
    /// Signalled whenever a queued write ends.
    idle: Condvar,
}

#[derive(Default)]
struct State {
    /// Pieces queued or being written.
    pending: usize,
    /// Bytes of held pieces among them.
    held: usize,
    /// The first error, with the file it hit.
    failed: Option<Failed>,
}

/// The first queued write that failed.
struct Failed {
    kind: io::ErrorKind,
    message: String,
    path: Arc<Path>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl WriteBehind {
    /// Writer threads for pieces aligned to `unit`.
    pub fn new(unit: usize) -> io::Result<WriteBehind> {
        let shared = Arc::new(Shared {
            unit,
            pool: Mutex::new((Vec::new(), 0)),
            freed: Condvar::new(),
            state: Mutex::new(State::default()),
            idle: Condvar::new(),
        });
        let (tx, rx) = unbounded::<Job>();
        let mut threads = Vec::with_capacity(WRITER_THREADS);
        for i in 0..WRITER_THREADS {
            let (rx, shared) = (rx.clone(), Arc::clone(&shared));
            let t = std::thread::Builder::new()
                .name(format!("direct-writer-{i}"))
                .spawn(move || {
                    for job in rx {
                        let written = match &job.data {
                            JobData::Copied(buf, len) => buf.get().get(..*len),
                            JobData::Held(held, range) => held.bytes().get(range.clone()),
                        }
                        .map_or_else(
                            || Err(io::Error::other("a queued write lost its bytes")),
                            |bytes| job.file.write_all_at(bytes, job.offset),
                        );
                        let held = match job.data {
                            JobData::Copied(buf, _) => {
                                lock(&shared.pool).0.push(buf);
                                shared.freed.notify_one();
                                0
                            }
                            // The last piece of a held chunk frees it (and its permit),
                            // before a flush waiting for this write may return.
                            JobData::Held(held, range) => {
                                drop(held);
                                range.len()
                            }
                        };
                        let mut st = lock(&shared.state);
                        st.pending -= 1;
                        st.held -= held;
                        if let Err(e) = written {
                            st.failed.get_or_insert(Failed {
                                kind: e.kind(),
                                message: e.to_string(),
                                path: job.path,
                            });
                        }
                        shared.idle.notify_all();
                    }
                })?;
            threads.push(t);
        }
        Ok(WriteBehind {
            jobs: Some(tx),
            shared,
            threads,
        })
    }

    /// Queue `bytes` (whole blocks) for `file` at `offset`.
    fn submit(
        &self,
        file: &Arc<File>,
        path: &Arc<Path>,
        offset: u64,
        bytes: &[u8],
    ) -> io::Result<()> {
        self.check()?;
        let mut at = offset;
        for piece in bytes.chunks(self.piece_bytes()) {
            let mut buf = self.take();
            buf.get_mut()[..piece.len()].copy_from_slice(piece);
            self.send(file, path, at, JobData::Copied(buf, piece.len()))?;
            at += piece.len() as u64;
        }
        Ok(())
    }

    /// Queue `range` of `held` (whole blocks, aligned in memory) for `file` at `offset`,
    /// without copying: the pieces keep `held` alive until the last is on disk.
    fn submit_held(
        &self,
        file: &Arc<File>,
        path: &Arc<Path>,
        offset: u64,
        held: &Arc<dyn HeldBytes>,
        range: std::ops::Range<usize>,
    ) -> io::Result<()> {
        self.check()?;
        {
            // Wait while the backlog is full (but never with nothing queued).
            let mut st = lock(&self.shared.state);
            while st.held > 0 && st.held + range.len() > HELD_BYTES {
                st = self.shared.idle.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
        let mut at = range.start;
        while at < range.end {
            let end = (at + self.piece_bytes()).min(range.end);
            let data = JobData::Held(Arc::clone(held), at..end);
            self.send(file, path, offset + (at - range.start) as u64, data)?;
            at = end;
        }
        Ok(())
    }

    /// Bytes per queued write: [`PIECE_BYTES`] in whole units.
    fn piece_bytes(&self) -> usize {
        PIECE_BYTES.max(self.shared.unit) / self.shared.unit * self.shared.unit
    }

    fn send(
        &self,
        file: &Arc<File>,
        path: &Arc<Path>,
        offset: u64,
        data: JobData,
    ) -> io::Result<()> {
        let held = match &data {
            JobData::Copied(..) => 0,
            JobData::Held(_, range) => range.len(),
        };
        {
            let mut st = lock(&self.shared.state);
            st.pending += 1;
            st.held += held;
        }
        let job = Job {
            file: Arc::clone(file),
            path: Arc::clone(path),
            offset,
            data,
        };
        let sent = self.jobs.as_ref().is_some_and(|tx| tx.send(job).is_ok());
        if !sent {
            let mut st = lock(&self.shared.state);
            st.pending -= 1;
            st.held -= held;
            return Err(io::Error::other("the direct writer threads are gone"));
        }
        Ok(())
    }

    /// An idle buffer, made while fewer than [`PIECES`] exist.
    fn take(&self) -> AlignedBuf {
        let unit = self.shared.unit;
        let mut pool = lock(&self.shared.pool);
        loop {
            if let Some(b) = pool.0.pop() {
                return b;
            }
            if pool.1 < PIECES {
                pool.1 += 1;
                return AlignedBuf::new(PIECE_BYTES.max(unit), unit);
            }
            pool = self
                .shared
                .freed
                .wait(pool)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The first failed write so far, as an error carrying a [`QueuedWriteError`] (the
    /// queue is shared by every shard: the file it names may not be the caller's).
    fn check(&self) -> io::Result<()> {
        match &lock(&self.shared.state).failed {
            Some(f) => Err(io::Error::new(
                f.kind,
                QueuedWriteError {
                    path: f.path.to_path_buf(),
                    message: f.message.clone(),
                },
            )),
            None => Ok(()),
        }
    }

    /// Wait until every queued piece is on disk (or failed).
    pub fn wait(&self) -> io::Result<()> {
        let mut st = lock(&self.shared.state);
        while st.pending > 0 {
            st = self.shared.idle.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        drop(st);
        self.check()
    }
}

/// A queued write that failed, and the file it was for.
#[derive(Debug)]
pub struct QueuedWriteError {
    pub path: PathBuf,
    message: String,
}

impl std::fmt::Display for QueuedWriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for QueuedWriteError {}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One output file written with `O_DIRECT`, of a size fixed at creation.
pub struct DirectFile {
    direct: Arc<File>,
    path: Arc<Path>,
    behind: Arc<WriteBehind>,
    /// The same file without `O_DIRECT`, for its last block when that is partial.
    buffered: File,
    size: u64,
    unit: usize,
    partial: Mutex<HashMap<u64, Partial>>,
}

impl DirectFile {
    /// Open `path` (already `size` bytes long) for direct writes, when its filesystem allows
    /// them at `unit` alignment (checked with one direct read of the first block).
    pub fn open(
        path: &Path,
        buffered: &File,
        size: u64,
        behind: &Arc<WriteBehind>,
    ) -> io::Result<DirectFile> {
        let unit = behind.shared.unit;
        let direct = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        let mut probe = AlignedBuf::new(unit, unit);
        direct.read_at(probe.get_mut(), 0)?;
        DirectFile::over(path, direct, buffered.try_clone()?, size, behind)
    }

    /// A writer over `direct` (opened with `O_DIRECT`, or not: the logic is the same, which
    /// the tests use on any filesystem).
    pub(crate) fn over(
        path: &Path,
        direct: File,
        buffered: File,
        size: u64,
        behind: &Arc<WriteBehind>,
    ) -> io::Result<DirectFile> {
        let unit = behind.shared.unit;
        if !unit.is_power_of_two() || !unit.is_multiple_of(64) {
            return Err(io::Error::other(format!("bad direct I/O unit {unit}")));
        }
        Ok(DirectFile {
            direct: Arc::new(direct),
            path: Arc::from(path),
            behind: Arc::clone(behind),
            buffered,
            size,
            unit,
            partial: Mutex::new(HashMap::new()),
        })
    }

    /// Where the file's partial last block starts (`size` when the last block is whole).
    fn tail_start(&self) -> u64 {
        self.size - self.size % self.unit as u64
    }

    /// Write `bytes` at `offset`: whole blocks now, partial ones when complete or flushed.
    pub fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        let Some((first, last)) = self.whole_blocks(offset, bytes.len())? else {
            return self.stash(offset, bytes);
        };
        let at = |o: u64| (o - offset) as usize;
        self.stash(offset, &bytes[..at(first)])?;
        self.write_blocks(first, &bytes[at(first)..at(last)])?;
        self.stash(last, &bytes[at(last)..])
    }

    /// [`write_at`](Self::write_at) for bytes the queue may keep: when their whole blocks
    /// are aligned in memory (an [`AlignedOut`]) they are written from `held` itself.
    pub fn write_held(&self, held: Arc<dyn HeldBytes>, offset: u64) -> io::Result<()> {
        let bytes = held.bytes();
        let Some((first, last)) = self.whole_blocks(offset, bytes.len())? else {
            return self.stash(offset, bytes);
        };
        let at = |o: u64| (o - offset) as usize;
        let blocks = at(first)..at(last);
        self.stash(offset, &bytes[..blocks.start])?;
        self.stash(last, &bytes[blocks.end..])?;
        if (bytes[blocks.start..].as_ptr() as usize).is_multiple_of(self.unit) {
            self.behind
                .submit_held(&self.direct, &self.path, first, &held, blocks)
        } else {
            self.write_blocks(first, &bytes[blocks])
        }
    }

    /// The whole blocks `first..last` inside a write of `len` bytes at `offset` (none at the
    /// file's partial last block), or `None`; an error past the file's end.
    fn whole_blocks(&self, offset: u64, len: usize) -> io::Result<Option<(u64, u64)>> {
        let unit = self.unit as u64;
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                io::Error::other(format!(
                    "bytes {offset}..+{len} lie past the file's {} bytes",
                    self.size
                ))
            })?;
        let first = offset.next_multiple_of(unit);
        let last = end.min(self.tail_start()) / unit * unit;
        Ok((first < last).then_some((first, last)))
    }

    /// Whole blocks at an aligned offset, queued.
    fn write_blocks(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.behind.submit(&self.direct, &self.path, offset, bytes)
    }

    /// Keep the bytes of partial blocks; a block that becomes whole is written at once.
    fn stash(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let unit = self.unit as u64;
        let mut done = 0;
        while done < bytes.len() {
            let at = offset + done as u64;
            let (index, within) = (at / unit, (at % unit) as usize);
            let n = (self.unit - within).min(bytes.len() - done);
            let whole = {
                let mut map = lock(&self.partial);
                let p = map.entry(index).or_insert_with(|| Partial::new(self.unit));
                p.put(within, &bytes[done..done + n]);
                if p.count == self.unit {
                    map.remove(&index)
                } else {
                    None
                }
            };
            if let Some(p) = whole {
                self.direct.write_all_at(p.block.get(), index * unit)?;
            }
            done += n;
        }
        Ok(())
    }

    /// Write every partial block that got bytes since the last flush: the file's partial
    /// last block through the page cache, others by reading the block back and writing it
    /// whole. The blocks stay here until their other bytes arrive.
    pub fn flush(&self) -> io::Result<()> {
        self.behind.wait()?;
        let unit = self.unit as u64;
        let mut map = lock(&self.partial);
        let mut disk = None;
        for (&index, p) in map.iter_mut().filter(|(_, p)| p.dirty) {
            let start = index * unit;
            if start >= self.tail_start() {
                let len = (self.size - start) as usize;
                for r in p.runs(len) {
                    let bytes = &p.block.get()[r.clone()];
                    self.buffered.write_all_at(bytes, start + r.start as u64)?;
                }
            } else {
                let disk = disk.get_or_insert_with(|| AlignedBuf::new(self.unit, self.unit));
                self.direct.read_exact_at(disk.get_mut(), start)?;
                let block = p.block.get_mut();
                for (i, (b, &d)) in block.iter_mut().zip(disk.get()).enumerate() {
                    if !bit(&p.arrived, i) {
                        *b = d;
                    }
                }
                self.direct.write_all_at(p.block.get(), start)?;
            }
            p.dirty = false;
        }
        Ok(())
    }

    /// Bytes waiting in partial blocks (for tests).
    #[cfg(test)]
    fn waiting(&self) -> usize {
        let map = lock(&self.partial);
        map.values().map(|p| p.count).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `size` zero bytes and a writer over it without `O_DIRECT`.
    fn plain(dir: &Path, size: u64, unit: usize) -> (std::path::PathBuf, DirectFile) {
        let path = dir.join("f");
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        let rw = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap()
        };
        let behind = Arc::new(WriteBehind::new(unit).unwrap());
        let w = DirectFile::over(&path, rw(), rw(), size, &behind).unwrap();
        (path, w)
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8 | 1).collect()
    }

    /// Writes of every alignment, in a scrambled order, end as the same bytes written at
    /// once; whole blocks never wait.
    #[test]
    fn pieces_in_any_order_make_the_file() {
        let unit = 64;
        for size in [0u64, 1, 63, 64, 65, 1000, 1024, 4097] {
            let dir = tempfile::tempdir().unwrap();
            let (path, w) = plain(dir.path(), size, unit);
            let want = pattern(size as usize);
            // Cuts at odd places: pieces within one block, across several, ending at the tail.
            let mut cuts = vec![0usize];
            let mut at = 0usize;
            let mut k = 0;
            while at < want.len() {
                at = (at + [1, 5, 64, 130, 17, 200, 63][k % 7]).min(want.len());
                cuts.push(at);
                k += 1;
            }
            let mut pieces: Vec<_> = cuts.windows(2).map(|c| c[0]..c[1]).collect();
            // Scramble deterministically: reverse halves, then interleave.
            pieces.reverse();
            let (a, b) = pieces.split_at(pieces.len() / 2);
            let order: Vec<_> = a
                .iter()
                .zip(b)
                .flat_map(|(x, y)| [x, y])
                .chain(b.get(a.len()..).into_iter().flatten())
                .cloned()
                .collect();
            assert_eq!(order.len(), pieces.len());
            for r in &order {
                w.write_at(&want[r.clone()], r.start as u64).unwrap();
            }
            // Only the partial last block may still wait.
            assert!(
                w.waiting() <= (size % unit as u64) as usize,
                "size {size}: {} waiting",
                w.waiting()
            );
            w.flush().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), want, "size {size}");
        }
    }

    /// A flush with blocks still partial writes the arrived bytes over what the disk has and
    /// keeps the rest of the disk's bytes; the block can still complete afterwards.
    #[test]
    fn flush_lays_partial_blocks_over_the_disk() {
        let unit = 64;
        let dir = tempfile::tempdir().unwrap();
        let (path, w) = plain(dir.path(), 200, unit);
        // What an earlier run left on disk.
        let old: Vec<u8> = vec![0xAA; 200];
        std::fs::write(&path, &old).unwrap();
        w.write_at(&[1, 2, 3], 70).unwrap();
        w.write_at(&[9; 10], 190).unwrap(); // in the partial last block (192..200 and before)
        w.flush().unwrap();
        let mut want = old.clone();
        want[70..73].copy_from_slice(&[1, 2, 3]);
        want[190..200].copy_from_slice(&[9; 10]);
        assert_eq!(std::fs::read(&path).unwrap(), want);
        // The rest of block 1 arrives: it is written whole, with no flush.
        let rest: Vec<u8> = (64..128)
            .filter(|i| !(70..73).contains(i))
            .map(|i| i as u8)
            .collect();
        w.write_at(&rest[..6], 64).unwrap();
        w.write_at(&rest[6..], 73).unwrap();
        for i in (64..128).filter(|i| !(70..73).contains(i)) {
            want[i] = i as u8;
        }
        assert_eq!(std::fs::read(&path).unwrap(), want);
        // Nothing dirty: a second flush writes nothing (the disk's bytes change under it).
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&[0x55], 71)
            .unwrap();
        w.flush().unwrap();
        assert_eq!(std::fs::read(&path).unwrap()[71], 0x55);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Any cutting of a file into writes, in any order, with flushes anywhere between
        /// them, leaves exactly the file's bytes; whole blocks never wait for a flush.
        #[test]
        fn any_pieces_any_order_any_flushes(
            size in 0usize..1500,
            unit_shift in 6u32..9,
            cuts in proptest::collection::vec(0usize..1500, 0..24),
            order in proptest::collection::vec(proptest::prelude::any::<u32>(), 24),
            flushes in proptest::collection::vec(proptest::prelude::any::<bool>(), 24),
            how in proptest::collection::vec(0u8..3, 24),
        ) {
            let unit = 1usize << unit_shift;
            let dir = tempfile::tempdir().unwrap();
            let (path, w) = plain(dir.path(), size as u64, unit);
            // What an earlier run left: every byte must be overwritten.
            std::fs::write(&path, vec![0xEEu8; size]).unwrap();
            let want = pattern(size);
            let mut points: Vec<usize> = cuts.into_iter().filter(|&c| c < size).collect();
            points.extend([0, size]);
            points.sort_unstable();
            points.dedup();
            let mut pieces: Vec<_> = points.windows(2).map(|p| p[0]..p[1]).collect();
            // A permutation from the random keys.
            let mut keyed: Vec<_> = pieces.drain(..).enumerate().map(|(i, r)| (order[i % 24], i, r)).collect();
            keyed.sort_unstable_by_key(|(k, i, _)| (*k, *i));
            for (n, (_, _, r)) in keyed.iter().enumerate() {
                let at = r.start as u64;
                match how[n % 24] {
                    0 => w.write_at(&want[r.clone()], at).unwrap(),
                    // Held, placed for its offset (written from itself) or one byte off
                    // (copied).
                    h => {
                        let mut out = AlignedOut::new(r.len(), at + u64::from(h - 1));
                        out.append().extend_from_slice(&want[r.clone()]);
                        w.write_held(Arc::new(out), at).unwrap();
                    }
                }
                if flushes[n % 24] {
                    w.flush().unwrap();
                }
            }
            w.flush().unwrap();
            proptest::prop_assert_eq!(std::fs::read(&path).unwrap(), want);
            // Without a flush before the last write, every block went out whole when its
            // last piece came: only the partial last block may still be held.
            let early_flush = (0..keyed.len().saturating_sub(1)).any(|n| flushes[n % 24]);
            if !early_flush {
                proptest::prop_assert!(w.waiting() <= size % unit, "{} held", w.waiting());
            }
        }
    }

    /// Held bytes placed for their offset go to disk from themselves (no pooled buffer is
    /// ever made) and are let go once written; misplaced ones are copied.
    #[test]
    fn placed_held_bytes_are_written_without_a_copy() {
        let unit = 64;
        let dir = tempfile::tempdir().unwrap();
        let size = 10 * unit + 17;
        let (path, w) = plain(dir.path(), size as u64, unit);
        let want = pattern(size);
        let mut out = AlignedOut::new(size - 3, 3);
        out.append().extend_from_slice(&want[3..]);
        assert_eq!(out.bytes().as_ptr() as usize % unit, 3);
        let held = Arc::new(out);
        w.write_held(held.clone(), 3).unwrap();
        w.write_at(&want[..3], 0).unwrap();
        w.flush().unwrap();
        assert_eq!(Arc::strong_count(&held), 1, "the queue let go of it");
        assert_eq!(lock(&w.behind.shared.pool).1, 0, "no copy was made");
        assert_eq!(std::fs::read(&path).unwrap(), want);

        let mut off = AlignedOut::new(size, 1);
        off.append().extend_from_slice(&want);
        w.write_held(Arc::new(off), 0).unwrap();
        w.flush().unwrap();
        assert!(
            lock(&w.behind.shared.pool).1 > 0,
            "misplaced bytes are copied"
        );
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }

    /// A queued write that fails is reported by the next write or flush of any file on the
    /// same queue, naming the file it was for.
    #[test]
    fn a_failed_queued_write_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let behind = Arc::new(WriteBehind::new(64).unwrap());
        let (bad, good) = (dir.path().join("bad"), dir.path().join("good"));
        std::fs::write(&bad, [0u8; 256]).unwrap();
        std::fs::write(&good, [0u8; 256]).unwrap();
        // Opened read-only: every write to it fails.
        let ro = || File::open(&bad).unwrap();
        let rw = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&good)
                .unwrap()
        };
        let b = DirectFile::over(&bad, ro(), ro(), 256, &behind).unwrap();
        let g = DirectFile::over(&good, rw(), rw(), 256, &behind).unwrap();
        b.write_at(&[1; 128], 0).unwrap(); // queued: fails in a writer thread
        let e = g.flush().unwrap_err();
        let q = e
            .get_ref()
            .and_then(|r| r.downcast_ref::<QueuedWriteError>())
            .unwrap();
        assert_eq!(q.path, bad);
        assert!(g.write_at(&[2; 64], 64).is_err(), "later writes fail too");
    }

    #[test]
    fn writes_past_the_end_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, w) = plain(dir.path(), 100, 64);
        assert!(w.write_at(&[0; 2], 99).is_err());
        assert!(w.write_at(&[0; 1], u64::MAX).is_err());
        w.write_at(&[0; 1], 99).unwrap();
    }

    /// The real thing, where the filesystem of the temp folder allows `O_DIRECT`.
    #[test]
    fn direct_writes_match_when_supported() {
        // Under target/, on the build's disk (a tmpfs /tmp would refuse O_DIRECT).
        let dir =
            tempfile::tempdir_in(Path::new(env!("CARGO_MANIFEST_DIR")).join("target")).unwrap();
        let path = dir.path().join("f");
        let size = 3 * 4096 + 1000;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        f.set_len(size).unwrap();
        let behind = Arc::new(WriteBehind::new(direct_unit()).unwrap());
        let Ok(w) = DirectFile::open(&path, &f, size, &behind) else {
            eprintln!("O_DIRECT not supported here; skipped");
            return;
        };
        let want = pattern(size as usize);
        for r in [5000..size as usize, 0..5000] {
            w.write_at(&want[r.clone()], r.start as u64).unwrap();
        }
        w.flush().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }
}
