//! The streaming pipeline: reader → compute workers → writer, joined by bounded crossbeam
//! channels, with a byte budget over everything in flight.
//!
//! The reader walks the plan's steps in input-file order, splits each into row chunks that
//! fit the budget, takes a permit, and hands the chunk's input bytes (a short-lived mapping
//! or an owned buffer) to a compute worker. Workers run the step's arithmetic; the writer
//! puts the bytes at their planned offset and drops the permit. No stage ever holds a whole
//! tensor larger than the budget, let alone a whole model or shard.

pub mod budget;
pub mod compute;
pub mod reader;
pub mod writer;

use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;

use crate::error::{Error, ErrorKind, Result};
use crate::plan::{Plan, Recipe, Step};
use budget::{Budget, Permit};
use reader::{Buf, InputFile, IoMode};
use writer::ShardFiles;

/// Set by the CLI's signal handler; every stage checks it and stops.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Bytes of working memory the pipeline may hold.
    pub memory_limit: u64,
    /// Compute workers.
    pub threads: usize,
    pub io: IoMode,
    pub progress: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            memory_limit: default_memory_limit(),
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            io: IoMode::Auto,
            progress: false,
        }
    }
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
    pub peak_budget: u64,
    pub elapsed: Duration,
}

/// Bytes a chunk should cost: big enough to amortize per-chunk work, small enough that
/// several chunks are in flight within the budget.
pub fn chunk_target(memory_limit: u64) -> u64 {
    (memory_limit / 8).clamp(4 << 20, 64 << 20)
}

/// Rows per chunk for `step` so that a chunk costs about `target` bytes.
pub fn rows_per_chunk(plan: &Plan, step: &Step, target: u64) -> u64 {
    let rows = step.rows();
    // Rows of sub-byte types (F4, F6) may not start on a byte boundary: never split them.
    if rows <= 1 || !plan.chunkable(step) || step.dtype.bits() < 8 {
        return rows.max(1);
    }
    let one = plan.chunk_cost(step, 1);
    let per_row = plan.chunk_cost(step, 2).saturating_sub(one).max(1);
    let fixed = one.saturating_sub(per_row);
    let fit = if fixed < target {
        (target - fixed) / per_row
    } else {
        target / per_row
    };
    fit.clamp(1, rows)
}

/// One chunk of one step, with its input bytes.
pub(crate) struct Loaded {
    step: usize,
    rows: Range<u64>,
    operands: Vec<LoadedOperand>,
    permit: Permit,
}

pub(crate) struct LoadedOperand {
    bytes: Buf,
    patches: Vec<(Buf, Buf, Option<Buf>)>,
}

/// Output bytes ready for the writer.
pub(crate) struct Written {
    shard: usize,
    offset: u64,
    bytes: Out,
    _permit: Permit,
}

pub(crate) enum Out {
    Computed(Vec<u8>),
    Copied(Buf),
}

/// Run `plan`, writing its shards into the existing empty folder `dir`.
pub fn execute(plan: &Plan, dir: &Path, opts: &RunOptions) -> Result<RunStats> {
    let start = Instant::now();
    let inputs = open_inputs(plan, opts.io)?;
    let shards = ShardFiles::create(dir, &plan.shards)?;
    let budget = Budget::new(opts.memory_limit);
    let target = chunk_target(opts.memory_limit);
    let workers = opts.threads.max(1);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let cancel = AtomicBool::new(false);
    let fail = |e: Error| {
        let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        cancel.store(true, Ordering::Relaxed);
    };
    let stopped = || cancel.load(Ordering::Relaxed) || INTERRUPTED.load(Ordering::Relaxed);
    let progress = crate::progress::bar(plan.output_bytes(), opts.progress);
    let mut written = 0u64;

    std::thread::scope(|s| {
        let (work_tx, work_rx) = bounded::<Loaded>(workers * 2);
        let (out_tx, out_rx) = bounded::<Written>(workers * 2);

        // Reader: steps in input order, chunked, each chunk under a permit.
        let reader_out = out_tx.clone();
        let (inputs, budget) = (&inputs, &budget);
        let (fail, stopped) = (&fail, &stopped);
        s.spawn(move || {
            let order = read_order(plan);
            for &si in &order {
                let step = &plan.steps[si];
                if step.len == 0 {
                    continue;
                }
                let per_chunk = rows_per_chunk(plan, step, target);
                let mut r0 = 0;
                while r0 < step.rows().max(1) {
                    let r1 = (r0 + per_chunk).min(step.rows().max(1));
                    if stopped() {
                        return;
                    }
                    let Some(permit) = budget.acquire(plan.chunk_cost(step, r1 - r0), stopped)
                    else {
                        return;
                    };
                    match load_chunk(plan, inputs, si, r0..r1, permit) {
                        Ok(Chunk::Work(w)) => {
                            if work_tx.send(w).is_err() {
                                return;
                            }
                        }
                        Ok(Chunk::Done(w)) => {
                            if reader_out.send(w).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            fail(e.at_tensor(&step.name));
                            return;
                        }
                    }
                    r0 = r1;
                }
            }
        });

        for _ in 0..workers {
            let rx = work_rx.clone();
            let tx = out_tx.clone();
            s.spawn(move || {
                for item in rx {
                    if stopped() {
                        return;
                    }
                    let done = compute::run(plan, item);
                    if tx.send(done).is_err() {
                        return;
                    }
                }
            });
        }
        drop(work_rx);
        drop(out_tx);

        // Writer (this thread): bytes at their offsets, then the permit goes.
        for w in out_rx {
            if stopped() {
                continue; // drain so the other stages can finish
            }
            let bytes: &[u8] = match &w.bytes {
                Out::Computed(v) => v,
                Out::Copied(b) => b,
            };
            if let Err(e) = shards.write_at(w.shard, w.offset, bytes) {
                fail(e);
                continue;
            }
            written += bytes.len() as u64;
            progress.inc(bytes.len() as u64);
        }
    });
    progress.finish_and_clear();

    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    if INTERRUPTED.load(Ordering::Relaxed) {
        return Err(Error::new(ErrorKind::Interrupted));
    }
    shards.sync()?;
    Ok(RunStats {
        bytes_written: written,
        peak_budget: budget.peak(),
        elapsed: start.elapsed(),
    })
}

/// Open every input file once.
fn open_inputs(plan: &Plan, io: IoMode) -> Result<Vec<Vec<InputFile>>> {
    plan.sources
        .iter()
        .map(|m| m.files.iter().map(|f| InputFile::open(f, io)).collect())
        .collect()
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

enum Chunk {
    Work(Loaded),
    Done(Written),
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
    let read = |r: crate::plan::TensorRef, range: Option<Range<u64>>| -> Result<Buf> {
        let t = plan.tensor(r);
        let (off, len) = match range {
            Some(rr) => {
                let rb = t.row_bytes();
                (t.offset + rr.start * rb, (rr.end - rr.start) * rb)
            }
            None => (t.offset, t.len),
        };
        let file = &plan.sources[r.source].files[t.file];
        inputs[r.source][t.file]
            .read(off, len)
            .map_err(|e| Error::io("read failed", e).in_file(file).at_tensor(&t.name))
    };
    match &step.recipe {
        Recipe::Copy(t) => {
            let bytes = read(*t, Some(rows.clone()))?;
            let out_row_bytes = step.row_elems() * step.dtype.bits() / 8;
            Ok(Chunk::Done(Written {
                shard: step.shard,
                offset: step.offset + rows.start * out_row_bytes,
                bytes: Out::Copied(bytes),
                _permit: permit,
            }))
        }
        Recipe::Compute { operands, .. } => {
            let mut loaded = Vec::with_capacity(operands.len());
            for op in operands {
                let end = rows.end.min(op.rows).max(rows.start);
                let bytes = read(op.tensor, Some(rows.start..end))?;
                let mut patches = Vec::with_capacity(op.patches.len());
                for p in &op.patches {
                    let a = read(p.a, None)?;
                    let b = read(p.b, None)?;
                    let m = p.magnitude.map(|m| read(m, None)).transpose()?;
                    patches.push((a, b, m));
                }
                loaded.push(LoadedOperand { bytes, patches });
            }
            Ok(Chunk::Work(Loaded {
                step: si,
                rows,
                operands: loaded,
                permit,
            }))
        }
    }
}
