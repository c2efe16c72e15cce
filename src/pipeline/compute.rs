//! A compute worker's jobs: turn one loaded chunk into output bytes, or stream a whole step
//! in passes (methods with whole-tensor statistics on tensors too large to hold).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ops::{Deref, Range};
use std::rc::Rc;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::methods::lora::PatchData;
use crate::methods::mergekit::{Chunk, ReadAt, StreamCtx};
use crate::plan::{Method, Operand, Plan, Recipe};
use crate::progress::Progress;
use crate::shape::RowMajor;

use super::arithmetic::{OperandData, compute_chunk, later_roundings, operand_f32};
use super::chunking::keepable;
use super::direct::AlignedOut;
use super::reader::{self, Buf, InputFile};
use super::writer::ShardFiles;
use super::{Loaded, LoadedOperand, Out, Written, chunk_len, chunk_offset, load_operand};

/// Borrow loaded bytes as the methods' view of them.
fn operand_data<'a>(
    plan: &Plan,
    operands: &[Operand],
    loaded: &'a [LoadedOperand],
) -> Vec<OperandData<'a>> {
    operands
        .iter()
        .zip(loaded)
        .map(|(op, lo)| OperandData {
            bytes: &lo.bytes,
            window: lo.window.as_ref(),
            patches: op
                .patches
                .iter()
                .zip(&lo.patches)
                .map(|(p, (a, b, m))| {
                    let at = plan.tensor(p.a);
                    let bt = plan.tensor(p.b);
                    PatchData {
                        a: &a[..],
                        a_dtype: at.dtype,
                        a_shape: [at.shape[0] as usize, at.shape[1] as usize],
                        b: &b[..],
                        b_dtype: bt.dtype,
                        b_shape: [bt.shape[0] as usize, bt.shape[1] as usize],
                        magnitude: m
                            .as_ref()
                            .zip(p.magnitude)
                            .map(|(mb, mr)| (&mb[..], plan.tensor(mr).dtype)),
                    }
                })
                .collect(),
        })
        .collect()
}

pub(crate) fn run(plan: &Plan, item: Loaded) -> Result<Written> {
    let step = &plan.steps[item.step];
    let operands: &[Operand] = match &step.recipe {
        Recipe::Compute { operands, .. } => operands,
        Recipe::Copy(_) => &[],
    };
    let data = operand_data(plan, operands, &item.operands);
    let offset = step.offset + chunk_offset(step, item.rows.start);
    let expected = chunk_len(step, &item.rows);
    // Placed for a direct write without a copy (the length is only a capacity hint).
    let mut out = AlignedOut::new(usize::try_from(expected).unwrap_or(0), offset);
    compute_chunk(plan, step, item.rows.clone(), &data, out.append())
        .map_err(|e| e.at_tensor(&step.name))?;
    Ok(Written {
        step: item.step,
        shard: step.shard,
        offset,
        expected,
        bytes: Out::Computed(out),
        permit: item.permit,
    })
}

/// A reader of operand `op`'s rows `rows`, a window at a time, when its input reads it that
/// way ([`reader::windowed_rows`]): a plain tensor of a local file.
fn windowed(
    plan: &Plan,
    inputs: &[Vec<InputFile>],
    op: &Operand,
    rows: Range<u64>,
) -> Result<Option<ReadAt>> {
    if op.vocab.is_some() {
        return Ok(None);
    }
    let t = plan.tensor(op.tensor);
    let range = reader::windowed_rows(&inputs[op.tensor.source][t.file], t, rows, true)?;
    Ok(range.map(|range| -> ReadAt { Box::new(move |at, buf| range.read_at(at, buf)) }))
}

/// What a worker streaming a step needs: the inputs to read, the shards to write.
pub(crate) struct StreamIo<'a> {
    pub plan: &'a Plan,
    pub inputs: &'a [Vec<InputFile>],
    pub shards: &'a ShardFiles,
    pub progress: &'a Progress,
    pub stopped: &'a (dyn Fn() -> bool + Sync),
}

/// The stored bytes of a streamed step's chunks, kept from the pass that first reads them
/// for the later ones while they fit `allowance` bytes (the step's permit covers them).
/// A kept chunk costs no read on a later pass: for a local file under `auto` or `mmap` it
/// stays mapped (its page tables set up once, nothing copied), under `read` it stays in
/// owned memory (copied out of the page cache once, not once per pass).
///
/// Only the passes before the output pass keep chunks: a method writes output in its last
/// pass only (its statistics come first), so once output is written nothing read will be
/// read again, and each kept chunk is let go as that pass reads it. A one-pass method thus
/// keeps at most its first chunk.
struct HeldChunks {
    allowance: u64,
    used: Cell<u64>,
    /// Set by the first output write.
    last_pass: Cell<bool>,
    kept: RefCell<HashMap<ChunkKey, Rc<Buf>>>,
}

/// A chunk of one operand: its index and rows.
type ChunkKey = (usize, Range<u64>);

/// A kept chunk's bytes, shared by the passes that read them.
struct Held(Rc<Buf>);

impl Deref for Held {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl HeldChunks {
    fn new(allowance: u64) -> HeldChunks {
        HeldChunks {
            allowance,
            used: Cell::new(0),
            last_pass: Cell::new(false),
            kept: RefCell::new(HashMap::new()),
        }
    }

    /// Operand `op`'s kept bytes of `rows`, if any (given up in the last pass).
    fn get(&self, op: usize, rows: &Range<u64>) -> Option<Held> {
        let key = (op, rows.clone());
        let mut kept = self.kept.borrow_mut();
        let b = if self.last_pass.get() {
            kept.remove(&key)
        } else {
            kept.get(&key).map(Rc::clone)
        };
        b.map(Held)
    }

    /// Whether a chunk of `len` bytes read now is to be kept.
    fn keeps(&self, len: u64) -> bool {
        !self.last_pass.get() && self.used.get().saturating_add(len) <= self.allowance
    }

    fn keep(&self, op: usize, rows: Range<u64>, bytes: Buf) -> Held {
        self.used.set(self.used.get() + bytes.len() as u64);
        let b = Rc::new(bytes);
        self.kept.borrow_mut().insert((op, rows), Rc::clone(&b));
        Held(b)
    }
}

/// Stream step `si` in chunks of `chunk_rows` rows, keeping up to `hold` bytes of its
/// operands' stored chunks from one pass to the next ([`HeldChunks`]).
pub(crate) fn run_streamed(io: &StreamIo<'_>, si: usize, chunk_rows: u64, hold: u64) -> Result<()> {
    let plan = io.plan;
    let step = &plan.steps[si];
    let Recipe::Compute {
        operands,
        method: Method::Mergekit(recipe),
    } = &step.recipe
    else {
        return Err(Error::internal("only mergekit methods are streamed"));
    };
    let cols = step.row_elems() as usize;
    let held = HeldChunks::new(hold);
    super::factors::enter(si);
    let load = |rows: Range<u64>| -> Result<Chunk> {
        if (io.stopped)() {
            return Err(Error::new(ErrorKind::Interrupted));
        }
        let mut chunk = Chunk::default();
        for (k, op) in operands.iter().enumerate() {
            let own = super::provided_rows(op, &rows);
            let n = (own.end - own.start) as usize;
            let (dtype, _) = op.stored(plan);
            // Without patches the bytes are decoded (and rounded) a block at a time where
            // the method reads them: from a window of the file, or from the chunk read whole.
            let roundings = || {
                let mut r: Vec<_> = op.load_as.into_iter().collect();
                r.extend(later_roundings(op, dtype));
                r
            };
            let plain = op.patches.is_empty() && dtype.bits() >= 8;
            let stored = n * cols * dtype.size();
            // A chunk read to be kept but found short is used as read, not read again.
            let mut read_once = None;
            if keepable(plan, op) {
                if let Some(bytes) = held.get(k, &rows) {
                    chunk.push_stored(Box::new(bytes), dtype, n * cols, roundings());
                    continue;
                }
                if held.keeps(stored as u64) {
                    let lo = load_operand(plan, io.inputs, op, rows.clone(), false)?;
                    if lo.bytes.len() < stored {
                        read_once = Some(lo);
                    } else {
                        let bytes = held.keep(k, rows.clone(), lo.bytes);
                        chunk.push_stored(Box::new(bytes), dtype, n * cols, roundings());
                        continue;
                    }
                }
            }
            if read_once.is_none()
                && plain
                && let Some(read) = windowed(plan, io.inputs, op, own)?
            {
                chunk.push_windowed(read, dtype, n * cols, roundings());
                continue;
            }
            let lo = match read_once {
                Some(lo) => lo,
                None => load_operand(plan, io.inputs, op, rows.clone(), true)?,
            };
            if plain && lo.bytes.len() >= stored {
                chunk.push_stored(Box::new(lo.bytes), dtype, n * cols, roundings());
            } else {
                let data = operand_data(plan, std::slice::from_ref(op), std::slice::from_ref(&lo));
                chunk.push_values(operand_f32(plan, op, &data[0], rows.start, n, cols)?);
            }
        }
        Ok(chunk)
    };
    // Outside the step's permit, like the direct-write queue's own buffers: the queue holds
    // at most 64 MiB of them.
    let write = |rows: Range<u64>, out: AlignedOut| -> Result<()> {
        held.last_pass.set(true);
        let n = out.bytes().len() as u64;
        if n != chunk_len(step, &rows) {
            return Err(Error::internal(format!(
                "{n} bytes computed where the plan has {}",
                chunk_len(step, &rows)
            )));
        }
        let offset = step.offset + chunk_offset(step, rows.start);
        io.shards.write_held(step.shard, offset, Arc::new(out))?;
        io.progress.add(n);
        Ok(())
    };
    let ctx = StreamCtx {
        rows: step.rows().max(1),
        cols,
        chunk_rows: chunk_rows.max(1),
        load: &load,
        out_dtype: step.dtype,
        out_offset: step.offset,
        write: &write,
    };
    recipe.stream(&ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_chunks_serve_the_later_passes_until_the_output_pass() {
        let held = HeldChunks::new(10);
        // The statistics passes keep what fits, in the order read.
        assert!(held.keeps(4));
        let a = held.keep(0, 0..2, Buf::Owned(vec![1, 2, 3, 4]));
        assert_eq!(&*a, &[1, 2, 3, 4]);
        assert!(held.keeps(6) && !held.keeps(7));
        held.keep(1, 0..2, Buf::Owned(vec![5; 6]));
        assert!(!held.keeps(1), "the allowance is used up");
        // A later pass reads the same bytes, as often as it asks, by operand and rows.
        for _ in 0..2 {
            assert_eq!(held.get(0, &(0..2)).as_deref(), Some(&[1, 2, 3, 4][..]));
        }
        assert!(held.get(0, &(2..4)).is_none());
        assert!(held.get(0, &(0..3)).is_none());
        assert!(held.get(2, &(0..2)).is_none());
        // Once output is written, kept chunks are served once and let go, and nothing new
        // is kept however much room there is.
        held.last_pass.set(true);
        assert_eq!(held.get(1, &(0..2)).as_deref(), Some(&[5; 6][..]));
        assert!(held.get(1, &(0..2)).is_none());
        assert_eq!(held.kept.borrow().len(), 1);
        let roomy = HeldChunks::new(1 << 20);
        roomy.last_pass.set(true);
        assert!(!roomy.keeps(1));
    }
}
