//! The streaming pipeline: reader → compute workers → writer, joined by bounded crossbeam
//! channels, with a byte budget over everything in flight.
//!
//! The reader walks the plan's steps in input-file order, splits each into row chunks that
//! fit the budget, takes a permit, and hands the chunk to a compute worker, which reads its
//! input bytes (a short-lived mapping or an owned buffer: positional reads copy on every
//! core, not on one thread; remote inputs are read by the reader, in order), runs the
//! step's arithmetic into memory placed for its file offset, and writes the bytes there
//! (around the page cache where the filesystem allows it, straight from that memory, see
//! [`writer`]). Once computed, the chunk's permit shrinks to its output bytes, which it
//! holds until they are on disk. No stage ever holds a whole tensor larger than the budget,
//! let alone a whole model or shard.

mod allocator;
mod arithmetic;
pub mod budget;
pub mod chunking;
mod compute;
mod direct;
pub mod extract_lora;
mod factors;
pub mod journal;
pub mod reader;
pub mod writer;

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;

use crate::error::{Error, ErrorKind, Result};
use crate::plan::{Operand, Plan, Recipe, Step};
use crate::progress::{Observer, Progress};
use crate::shape::RowMajor;
use budget::{Budget, Permit};
use chunking::{
    chunk_cost, chunk_target, chunkable, held_bytes, prefers_streaming, rows_per_chunk,
    spread_copies, stream_rows, streamable,
};
use reader::{Buf, InputFile, IoMode};
use writer::ShardFiles;
pub use writer::WriteMode;

#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Bytes of working memory the pipeline may hold.
    pub memory_limit: u64,
    /// Compute workers.
    pub threads: usize,
    pub io: IoMode,
    /// How output shards are written (around the page cache by default).
    pub write: WriteMode,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Set it to stop the run: every stage checks it, and the run ends with
    /// [`ErrorKind::Interrupted`] and leaves nothing behind (the CLI's signal handler sets it).
    pub cancel: Arc<AtomicBool>,
    /// Told the bytes written after each chunk.
    pub observer: Option<Observer>,
    /// Continue the work of a killed earlier run of the same plan to the same output, when
    /// its staging folder is there (see [`journal`]).
    pub resume: bool,
    /// How much finished output to let pile up before it is flushed and recorded in the
    /// resume journal (also every [`JOURNAL_INTERVAL`]): what a killed run can lose at most.
    pub journal_every: u64,
}

/// The longest time finished output goes unrecorded in the resume journal.
pub const JOURNAL_INTERVAL: Duration = Duration::from_secs(30);

/// Default of [`RunOptions::journal_every`].
pub const DEFAULT_JOURNAL_EVERY: u64 = 1 << 30;

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            memory_limit: default_memory_limit(),
            threads: default_threads(),
            io: IoMode::Auto,
            write: WriteMode::Auto,
            progress: false,
            cancel: Arc::new(AtomicBool::new(false)),
            observer: None,
            resume: true,
            journal_every: DEFAULT_JOURNAL_EVERY,
        }
    }
}

impl RunOptions {
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// Compute workers by default: one per core plus one, so a core never idles while a worker
/// waits on its write.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) + 1
}

/// The smaller of 1 GiB and half the available RAM.
pub fn default_memory_limit() -> u64 {
    let gib = 1u64 << 30;
    let Ok(mut sys) = sysinfo::System::new() else {
        return gib;
    };
    sys.refresh_memory();
    let half = sys.available_memory() / 2;
    if half == 0 { gib } else { half.min(gib) }
}

#[derive(Clone, Debug, Default)]
pub struct RunStats {
    pub bytes_written: u64,
    /// Bytes fetched from remote inputs (headers included only when read during the run).
    pub bytes_fetched: u64,
    pub peak_budget: u64,
    pub elapsed: Duration,
    /// Staging folders of killed earlier runs to the same output, removed before this one.
    pub swept_staging: Vec<std::path::PathBuf>,
    /// Tensors (and their bytes) a killed earlier run had finished, reused by this one.
    pub resumed: Option<(usize, u64)>,
}

/// The resume journal of a run: where finished tensors are recorded, and which ones a killed
/// earlier run already finished (their bytes are in the shards, which then already exist).
pub struct Resumable<'a> {
    pub journal: &'a journal::Journal,
    pub done: &'a [usize],
    pub existing_shards: bool,
}

/// Finished tensors waiting to be recorded in the journal, flushed in batches.
struct Recorder<'a> {
    journal: &'a journal::Journal,
    every: u64,
    pending: Mutex<(Vec<usize>, u64, Instant)>,
    syncing: Mutex<()>,
}

impl Recorder<'_> {
    /// Step `step` (of `len` bytes) is completely written. Every `every` bytes or
    /// [`JOURNAL_INTERVAL`], flush the shards and then record the batch: a recorded tensor's
    /// bytes are always on disk.
    fn finished(&self, step: usize, len: u64, shards: &ShardFiles) -> Result<()> {
        let batch = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.0.push(step);
            p.1 += len;
            if p.1 >= self.every || p.2.elapsed() >= JOURNAL_INTERVAL {
                let batch = std::mem::take(&mut p.0);
                *p = (Vec::new(), 0, Instant::now());
                batch
            } else {
                return Ok(());
            }
        };
        // Batches taken by two workers may be written in either order: each one's steps
        // were written before it was taken, so either flush covers them.
        let _one_at_a_time = self.syncing.lock().unwrap_or_else(|e| e.into_inner());
        shards.sync_data()?;
        self.journal.append(&batch).map_err(|e| {
            Error::io("cannot write the resume journal", e).in_file(self.journal.path())
        })
    }
}

/// What a compute worker receives.
pub(crate) enum Work {
    /// One chunk of rows of local inputs to read, compute and write: the worker reads it,
    /// so positional reads (`--io read`) copy on every core instead of one reader thread.
    Rows {
        step: usize,
        rows: Range<u64>,
        permit: Permit,
    },
    /// One chunk the reader has read already: remote inputs are read in order by one thread
    /// (their block reads are then fetched once each, in sequence).
    Read(Chunk),
    /// A whole step whose method needs whole-tensor statistics and which is too large to
    /// hold at once: the worker streams over its row chunks several times (one pass per
    /// statistic, then the output), reading and writing by itself under one permit.
    Streamed {
        step: usize,
        chunk_rows: u64,
        /// Bytes of the operands' chunks to keep between passes (the permit covers them).
        hold: u64,
        _permit: Permit,
    },
}

/// One chunk of one step, with its input bytes.
pub(crate) struct Loaded {
    step: usize,
    rows: Range<u64>,
    operands: Vec<LoadedOperand>,
    permit: Permit,
}

pub(crate) struct LoadedOperand {
    /// The operand's rows, read (empty when `window` is set).
    bytes: Buf,
    /// The operand's rows, to be read a window at a time as the chunk is computed
    /// ([`reader::windowed_rows`]), in place of `bytes`.
    window: Option<reader::FileRange>,
    patches: Vec<Factors>,
}

/// A patch's LoRA factors A and B and its DoRA magnitude, shared by a step's chunks
/// ([`factors`]).
pub(crate) type Factors = (Arc<Buf>, Arc<Buf>, Option<Arc<Buf>>);

/// Output bytes ready for the writer.
pub(crate) struct Written {
    step: usize,
    shard: usize,
    offset: u64,
    /// How many bytes the plan has for this chunk.
    expected: u64,
    bytes: Out,
    permit: Permit,
}

pub(crate) enum Out {
    Computed(direct::AlignedOut),
    Copied(Buf),
}

/// A written chunk stays alive, with its permit, until the direct writes of its bytes end.
impl direct::HeldBytes for Written {
    fn bytes(&self) -> &[u8] {
        match &self.bytes {
            Out::Computed(o) => o.bytes(),
            Out::Copied(b) => b,
        }
    }
}

/// Run `plan`, writing its shards into the existing empty folder `dir`.
pub fn execute(plan: &Plan, dir: &Path, opts: &RunOptions) -> Result<RunStats> {
    execute_resumable(plan, dir, opts, None)
}

/// [`execute`], recording finished tensors in a resume journal and skipping those a killed
/// earlier run already finished (`resume.done`, whose shards are in `dir`).
pub fn execute_resumable(
    plan: &Plan,
    dir: &Path,
    opts: &RunOptions,
    resume: Option<Resumable<'_>>,
) -> Result<RunStats> {
    let start = Instant::now();
    allocator::keep_freed_buffers();
    let inputs = open_inputs(plan, opts.io)?;
    let shards = match &resume {
        Some(r) if r.existing_shards => ShardFiles::open_existing(dir, &plan.shards, opts.write)?,
        _ => ShardFiles::create(dir, &plan.shards, opts.write)?,
    };
    let mut skip = vec![false; plan.steps.len()];
    for &d in resume.as_ref().map_or(&[][..], |r| r.done) {
        if let Some(s) = skip.get_mut(d) {
            *s = true;
        }
    }
    let resumed = resume.as_ref().filter(|r| !r.done.is_empty()).map(|r| {
        let bytes = r
            .done
            .iter()
            .filter_map(|&d| plan.steps.get(d))
            .map(|s| s.len);
        (r.done.len(), bytes.sum::<u64>())
    });
    let recorder = resume.as_ref().map(|r| Recorder {
        journal: r.journal,
        every: opts.journal_every.max(1),
        pending: Mutex::new((Vec::new(), 0, Instant::now())),
        syncing: Mutex::new(()),
    });
    // Bytes of each step not yet written: the chunk that brings it to zero finishes it.
    let unwritten: Vec<AtomicU64> = plan.steps.iter().map(|s| AtomicU64::new(s.len)).collect();
    let finished = |step: usize| -> Result<()> {
        match &recorder {
            Some(r) => r.finished(step, plan.steps[step].len, &shards),
            None => Ok(()),
        }
    };
    let budget = Budget::new(opts.memory_limit);
    let target = chunk_target(opts.memory_limit);
    let workers = opts.threads.clamp(1, 256);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let cancel = AtomicBool::new(false);
    let fail = |e: Error| {
        let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        cancel.store(true, Ordering::Relaxed);
    };
    let stopped = || cancel.load(Ordering::Relaxed) || opts.cancelled();
    let remote: Vec<Arc<dyn crate::source::Source>> = plan
        .sources
        .iter()
        .filter(|m| m.source.bytes_fetched().is_some())
        .map(|m| Arc::clone(&m.source))
        .collect();
    let read_here = !remote.is_empty();
    let fetched: Option<crate::progress::Fetched> = (!remote.is_empty()).then(|| {
        Box::new(move || remote.iter().filter_map(|s| s.bytes_fetched()).sum::<u64>())
            as crate::progress::Fetched
    });
    let progress = Progress::new(
        plan.steps
            .iter()
            .zip(&skip)
            .filter(|(_, done)| !**done)
            .map(|(s, _)| s.len)
            .sum(),
        opts.progress,
        opts.observer.clone(),
        fetched,
    );
    // Steps that need whole-tensor statistics are processed whole when that fits in three
    // quarters of the budget (exact PyTorch reduction order), streamed in passes otherwise;
    // the estimate counts the f32 copies each method really holds (tests/method_memory).
    let whole_limit = opts.memory_limit * 3 / 4;

    // Write one finished chunk at its offset. Its permit now covers only its output bytes,
    // released when the last of them is on disk (or handed to the page cache).
    let write = |mut w: Written| -> Result<()> {
        use direct::HeldBytes;
        let n = w.bytes().len() as u64;
        if n != w.expected {
            return Err(Error::internal(format!(
                "{n} bytes computed where the plan has {}",
                w.expected
            ))
            .at_tensor(&plan.steps[w.step].name));
        }
        let (step, shard, offset) = (w.step, w.shard, w.offset);
        w.permit.shrink(n);
        shards.write_held(shard, offset, Arc::new(w))?;
        progress.add(n);
        if unwritten[step].fetch_sub(n, Ordering::AcqRel) == n {
            finished(step)?;
        }
        Ok(())
    };

    std::thread::scope(|s| {
        let (work_tx, work_rx) = bounded::<Work>(workers * 2);

        // Workers compute and write at the planned offsets, so a worker waiting on the disk
        // leaves the cores to the others.
        let (inputs, budget) = (&inputs, &budget);
        let (fail, stopped, write, finished) = (&fail, &stopped, &write, &finished);
        let (shards, progress) = (&shards, &progress);
        for _ in 0..workers {
            let rx = work_rx.clone();
            let worker = move || {
                let _kept = factors::scope();
                for item in &rx {
                    if stopped() {
                        continue; // drain: dropping items returns their permits
                    }
                    let result = match item {
                        Work::Rows { step, rows, permit } => {
                            load_chunk(plan, inputs, step, rows, permit)
                                .map_err(|e| e.at_tensor(&plan.steps[step].name))
                                .and_then(|c| run_chunk(plan, c, write))
                        }
                        Work::Read(c) => run_chunk(plan, c, write),
                        Work::Streamed {
                            step,
                            chunk_rows,
                            hold,
                            _permit,
                        } => {
                            let ctx = compute::StreamIo {
                                plan,
                                inputs,
                                shards,
                                progress,
                                stopped,
                            };
                            compute::run_streamed(&ctx, step, chunk_rows, hold)
                                .map_err(|e| e.at_tensor(&plan.steps[step].name))
                                .and_then(|()| finished(step))
                        }
                    };
                    if let Err(e) = result {
                        fail(e);
                    }
                    if rx.is_empty() {
                        factors::leave();
                    }
                }
            };
            // A system that refuses threads (`ulimit -u`) gets an error, not a panic.
            if let Err(e) = std::thread::Builder::new().spawn_scoped(s, worker) {
                fail(Error::io("cannot start a compute thread", e));
                break;
            }
        }
        drop(work_rx);

        // Reader (this thread): steps in input order, chunked, each chunk under a permit;
        // the worker that takes a chunk of local inputs reads it.
        let _kept = factors::scope();
        // Every chunk and streamed step first (cheap: row ranges), so that copied chunks can
        // be spread among the computed ones.
        let mut items = Vec::new();
        for &si in &read_order(plan) {
            let step = &plan.steps[si];
            if step.len == 0 || skip[si] {
                continue;
            }
            if !chunkable(plan, step)
                && streamable(plan, step)
                && (chunk_cost(plan, step, step.rows().max(1)) > whole_limit
                    || prefers_streaming(step))
            {
                items.push(Planned::Streamed(si));
                continue;
            }
            let per_chunk = rows_per_chunk(plan, step, target);
            let rows = step.rows().max(1);
            let mut r0 = 0;
            while r0 < rows {
                let r1 = (r0 + per_chunk).min(rows);
                items.push(Planned::Rows(si, r0..r1));
                r0 = r1;
            }
        }
        // Remote inputs are fetched in file order; local ones may be read in any.
        if !read_here {
            items = spread_copies(items, |item| match item {
                Planned::Rows(si, rows) => {
                    let step = &plan.steps[*si];
                    (
                        matches!(step.recipe, Recipe::Copy(_)),
                        chunk_len(step, rows),
                    )
                }
                Planned::Streamed(si) => (false, plan.steps[*si].len),
            });
        }
        for item in items {
            if stopped() {
                break;
            }
            let work = match item {
                Planned::Streamed(si) => {
                    let step = &plan.steps[si];
                    let chunk_rows = stream_rows(plan, step, target);
                    let cost = chunk_cost(plan, step, chunk_rows) * 2;
                    let hold = held_bytes(plan, step, opts.memory_limit, workers);
                    let Some(permit) = budget.acquire(cost + hold, stopped) else {
                        break;
                    };
                    Work::Streamed {
                        step: si,
                        chunk_rows,
                        hold,
                        _permit: permit,
                    }
                }
                Planned::Rows(si, rows) => {
                    let step = &plan.steps[si];
                    if read_here && matches!(step.recipe, Recipe::Compute { .. }) {
                        // Another step's factors go before waiting on the budget.
                        factors::enter(si);
                    }
                    let cost = chunk_cost(plan, step, rows.end - rows.start);
                    let Some(permit) = budget.acquire(cost, stopped) else {
                        break;
                    };
                    if read_here {
                        match load_chunk(plan, inputs, si, rows, permit) {
                            Ok(c) => Work::Read(c),
                            Err(e) => {
                                fail(e.at_tensor(&step.name));
                                break;
                            }
                        }
                    } else {
                        Work::Rows {
                            step: si,
                            rows,
                            permit,
                        }
                    }
                }
            };
            if work_tx.send(work).is_err() {
                break;
            }
        }
        drop(work_tx);
    });
    progress.finish();

    // An interrupt explains whatever failed after it.
    if opts.cancelled() {
        return Err(Error::new(ErrorKind::Interrupted));
    }
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    shards.sync()?;
    Ok(RunStats {
        bytes_written: progress.written(),
        bytes_fetched: progress.fetched(),
        swept_staging: Vec::new(),
        resumed,
        peak_budget: budget.peak(),
        elapsed: start.elapsed(),
    })
}

/// Open every input file once.
fn open_inputs(plan: &Plan, io: IoMode) -> Result<Vec<Vec<InputFile>>> {
    plan.sources
        .iter()
        .map(|m| {
            (0..m.files.len())
                .map(|i| Ok(InputFile::new(m.open_file(i)?, io)))
                .collect()
        })
        .collect()
}

/// A unit of the reader's work, before its permit: a chunk of rows of a step, or a whole
/// step to stream in passes.
enum Planned {
    Rows(usize, Range<u64>),
    Streamed(usize),
}

/// Steps ordered so that each input file is read front to back.
fn read_order(plan: &Plan) -> Vec<usize> {
    let mut order: Vec<usize> = (0..plan.steps.len()).collect();
    let key = |i: &usize| {
        let step = &plan.steps[*i];
        let first = match &step.recipe {
            Recipe::Copy(t) => *t,
            Recipe::Compute { operands, .. } => operands[0].tensor,
        };
        let t = plan.tensor(first);
        (first.source, t.file, t.offset)
    };
    order.sort_by_key(key);
    order
}

pub(crate) enum Chunk {
    Work(Loaded),
    Done(Written),
}

/// Compute (or pass through) a chunk that has been read, and write it.
fn run_chunk(plan: &Plan, c: Chunk, write: impl Fn(Written) -> Result<()>) -> Result<()> {
    match c {
        Chunk::Work(c) => compute::run(plan, c).and_then(write),
        Chunk::Done(w) => write(w),
    }
}

/// Read the bytes a chunk needs.
fn load_chunk(
    plan: &Plan,
    inputs: &[Vec<InputFile>],
    si: usize,
    rows: Range<u64>,
    permit: Permit,
) -> Result<Chunk> {
    let step = &plan.steps[si];
    match &step.recipe {
        Recipe::Copy(t) => {
            let offset = step.offset + chunk_offset(step, rows.start);
            let hints = reader::ReadHints {
                place: Some(offset),
                repeated: false,
            };
            let bytes = read_tensor(plan, inputs, *t, Some(rows.clone()), hints)?;
            Ok(Chunk::Done(Written {
                step: si,
                shard: step.shard,
                offset,
                expected: chunk_len(step, &rows),
                bytes: Out::Copied(bytes),
                permit,
            }))
        }
        Recipe::Compute { operands, .. } => {
            // (Not for copies: spread among a step's chunks, they would let its factors go.)
            factors::enter(si);
            let whole = whole_statistics(step);
            let operands = operands
                .iter()
                .map(|op| match whole {
                    true => load_operand(plan, inputs, op, rows.clone(), true),
                    false => load_elementwise(plan, inputs, op, rows.clone()),
                })
                .collect::<Result<_>>()?;
            Ok(Chunk::Work(Loaded {
                step: si,
                operands,
                rows,
                permit,
            }))
        }
    }
}

/// Whether a step's method takes whole-tensor statistics: its operands are gone over
/// several times, so `auto` reads rather than maps them (see [`reader::ReadHints`]).
fn whole_statistics(step: &Step) -> bool {
    use crate::methods::mergekit::Capability;
    matches!(&step.recipe, Recipe::Compute { method: crate::plan::Method::Mergekit(r), .. }
        if r.capability() != Capability::Elementwise)
}

/// Byte offset of row `r` within a step's data.
pub(crate) fn chunk_offset(step: &Step, r: u64) -> u64 {
    r * step.row_elems() * step.dtype.bits() / 8
}

/// Bytes of rows `rows` of a step (the whole tensor's length when they cover every row).
pub(crate) fn chunk_len(step: &Step, rows: &Range<u64>) -> u64 {
    if rows.start == 0 && rows.end >= step.rows() {
        step.len
    } else {
        chunk_offset(step, rows.end) - chunk_offset(step, rows.start)
    }
}

/// Read one tensor's bytes (rows `range`, or all of it), row-major and little-endian, for
/// the use `hints` describes.
fn read_tensor(
    plan: &Plan,
    inputs: &[Vec<InputFile>],
    r: crate::plan::TensorRef,
    range: Option<Range<u64>>,
    hints: reader::ReadHints,
) -> Result<Buf> {
    let t = plan.tensor(r);
    reader::read_rows_with(&inputs[r.source][t.file], t, range, hints)
}

/// Hints for reads that are not copied to the output: `repeated` as the caller says.
fn operand_hints(repeated: bool) -> reader::ReadHints {
    reader::ReadHints {
        place: None,
        repeated,
    }
}

/// The rows of chunk `rows` that operand `op` provides (the vocabulary rule lets an operand
/// have fewer rows than the step). A chunk wholly past them gets the empty range at their
/// end, not one at its own start: that offset may lie past the tensor, even past the end of
/// its file, and would fail the read.
pub(crate) fn provided_rows(op: &Operand, rows: &Range<u64>) -> Range<u64> {
    let start = rows.start.min(op.rows);
    start..rows.end.min(op.rows).max(start)
}

/// Operand `op` of an elementwise step for rows `rows`: a plain tensor of a local file read
/// with copies (`--io read`) is left to be read a window at a time as the chunk is computed,
/// so each window is still in the CPU cache when it is used (seed recipe, `--io read`: see
/// README); anything else is read now ([`load_operand`]).
fn load_elementwise(
    plan: &Plan,
    inputs: &[Vec<InputFile>],
    op: &Operand,
    rows: Range<u64>,
) -> Result<LoadedOperand> {
    let t = plan.tensor(op.tensor);
    if op.vocab.is_none() && t.dtype.bits() >= 8 {
        let file = &inputs[op.tensor.source][t.file];
        if let Some(window) = reader::windowed_rows(file, t, provided_rows(op, &rows), false)? {
            return Ok(LoadedOperand {
                bytes: Buf::Owned(Vec::new()),
                window: Some(window),
                patches: load_patches(plan, inputs, op, operand_hints(false))?,
            });
        }
    }
    load_operand(plan, inputs, op, rows, false)
}

/// The bytes of an operand of a computed step for rows `rows` (clamped to the rows it
/// provides), with its LoRA factors; `repeated` for a pass of a streamed step or a method
/// with whole-tensor statistics.
pub(crate) fn load_operand(
    plan: &Plan,
    inputs: &[Vec<InputFile>],
    op: &Operand,
    rows: Range<u64>,
    repeated: bool,
) -> Result<LoadedOperand> {
    let hints = operand_hints(repeated);
    let own = provided_rows(op, &rows);
    let bytes = match &op.vocab {
        Some((v, slot)) => aligned_rows(plan, inputs, v, *slot, own, repeated)?,
        None => read_tensor(plan, inputs, op.tensor, Some(own), hints)?,
    };
    Ok(LoadedOperand {
        bytes,
        window: None,
        patches: load_patches(plan, inputs, op, hints)?,
    })
}

/// The LoRA factors (and magnitudes) of operand `op`'s patches, read whole, or kept from
/// an earlier chunk of the step by this thread ([`factors`]).
fn load_patches(
    plan: &Plan,
    inputs: &[Vec<InputFile>],
    op: &Operand,
    hints: reader::ReadHints,
) -> Result<Vec<Factors>> {
    let read = |r| factors::factor(r, || read_tensor(plan, inputs, r, None, hints));
    op.patches
        .iter()
        .map(|p| Ok((read(p.a)?, read(p.b)?, p.magnitude.map(read).transpose()?)))
        .collect()
}

/// Rows `rows` of slot `slot`'s tensor aligned to the merged vocabulary, as f32 (see
/// [`crate::plan::VocabRows`]): runs of its own rows read at once, default rows copied or
/// averaged from the models that have the token, padding rows the mean of its aligned token
/// rows (computed over them in row chunks, within the chunk's own memory).
fn aligned_rows(
    plan: &Plan,
    inputs: &[Vec<InputFile>],
    v: &crate::plan::VocabRows,
    slot: usize,
    rows: Range<u64>,
    repeated: bool,
) -> Result<Buf> {
    use crate::kernels::bytes::decode;
    use crate::tokenizer::{DefaultRow, RowSource};
    let own = v.slots[slot];
    let cols = plan.tensor(own).row_elems() as usize;
    let (start, end) = (rows.start as usize, rows.end as usize);
    let mut out = vec![0f32; (end - start) * cols];
    let read = |s: usize, r: Range<u64>, dst: &mut [f32]| -> Result<()> {
        let t = v.slots[s];
        let b = read_tensor(plan, inputs, t, Some(r), operand_hints(repeated))?;
        decode(plan.tensor(t).dtype, &b, dst);
        Ok(())
    };
    let mut pad: Option<Vec<f32>> = None;
    let mut i = start;
    while i < end {
        let dst = (i - start) * cols;
        match v.plan.source(slot, i) {
            RowSource::Row(r) => {
                // A run of consecutive own rows: one read.
                let mut j = i + 1;
                while j < end && v.plan.source(slot, j) == RowSource::Row(r + (j - i) as u32) {
                    j += 1;
                }
                let (a, b) = (r as u64, r as u64 + (j - i) as u64);
                read(slot, a..b, &mut out[dst..(j - start) * cols])?;
                i = j;
                continue;
            }
            RowSource::Default(k) => match &v.plan.defaults[k] {
                DefaultRow::Copy { slot: s, row } => {
                    read(*s, *row as u64..*row as u64 + 1, &mut out[dst..dst + cols])?
                }
                DefaultRow::Average(list) => {
                    // mergekit: ((0 + r1) + r2 + ...) / count, in f32.
                    let mut tmp = vec![0f32; cols];
                    for (s, r) in list {
                        read(*s, *r as u64..*r as u64 + 1, &mut tmp)?;
                        for (o, x) in out[dst..dst + cols].iter_mut().zip(&tmp) {
                            *o += *x;
                        }
                    }
                    let n = list.len().max(1) as f32;
                    out[dst..dst + cols].iter_mut().for_each(|o| *o /= n);
                }
                DefaultRow::Zero => {}
            },
            RowSource::Missing => {}
            RowSource::Pad => {
                if pad.is_none() {
                    pad = Some(pad_mean(plan, inputs, v, slot, cols)?);
                }
                if let Some(p) = &pad {
                    out[dst..dst + cols].copy_from_slice(p);
                }
            }
        }
        i += 1;
    }
    let mut bytes = Vec::with_capacity(out.len() * 4);
    for x in out {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    Ok(Buf::Owned(bytes))
}

/// The mean of slot `slot`'s aligned token rows (torch.mean over them), summed in f64 over
/// chunks of rows so the tensor is never held whole.
fn pad_mean(
    plan: &Plan,
    inputs: &[Vec<InputFile>],
    v: &crate::plan::VocabRows,
    slot: usize,
    cols: usize,
) -> Result<Vec<f32>> {
    let tokens = v.plan.tokens as u64;
    let step = ((1u64 << 22) / (cols as u64 * 4).max(1)).max(1);
    let mut sum = vec![0f64; cols];
    let mut r = 0;
    while r < tokens {
        let e = (r + step).min(tokens);
        let b = aligned_rows(plan, inputs, v, slot, r..e, false)?;
        for row in b.chunks_exact(cols * 4) {
            for (s, x) in sum.iter_mut().zip(row.chunks_exact(4)) {
                *s += f32::from_le_bytes([x[0], x[1], x[2], x[3]]) as f64;
            }
        }
        r = e;
    }
    Ok(sum
        .into_iter()
        .map(|s| (s / tokens.max(1) as f64) as f32)
        .collect())
}
