//! A compute worker's jobs: turn one loaded chunk into output bytes, or stream a whole step
//! in passes (methods with whole-tensor statistics on tensors too large to hold).

use std::ops::Range;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::methods::lora::PatchData;
use crate::methods::mergekit::{Chunk, ReadAt, StreamCtx};
use crate::plan::{Method, Operand, Plan, Recipe};
use crate::progress::Progress;
use crate::shape::RowMajor;

use super::arithmetic::{OperandData, compute_chunk, later_roundings, operand_f32};
use super::direct::AlignedOut;
use super::reader::{self, InputFile};
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
            patches: op
                .patches
                .iter()
                .zip(&lo.patches)
                .map(|(p, (a, b, m))| {
                    let at = plan.tensor(p.a);
                    let bt = plan.tensor(p.b);
                    PatchData {
                        a,
                        a_dtype: at.dtype,
                        a_shape: [at.shape[0] as usize, at.shape[1] as usize],
                        b,
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
    let range = reader::windowed_rows(&inputs[op.tensor.source][t.file], t, rows)?;
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

pub(crate) fn run_streamed(io: &StreamIo<'_>, si: usize, chunk_rows: u64) -> Result<()> {
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
    let load = |rows: Range<u64>| -> Result<Chunk> {
        if (io.stopped)() {
            return Err(Error::new(ErrorKind::Interrupted));
        }
        let mut chunk = Chunk::default();
        for op in operands {
            let n = (rows.end.min(op.rows).max(rows.start) - rows.start) as usize;
            let (dtype, _) = op.stored(plan);
            // Without patches the bytes are decoded (and rounded) a block at a time where
            // the method reads them: from a window of the file, or from the chunk read whole.
            let roundings = || {
                let mut r: Vec<_> = op.load_as.into_iter().collect();
                r.extend(later_roundings(op, dtype));
                r
            };
            let plain = op.patches.is_empty() && dtype.bits() >= 8;
            let own = rows.start..rows.start + n as u64;
            if plain && let Some(read) = windowed(plan, io.inputs, op, own)? {
                chunk.push_windowed(read, dtype, n * cols, roundings());
                continue;
            }
            let lo = load_operand(plan, io.inputs, op, rows.clone(), true)?;
            if plain && lo.bytes.len() >= n * cols * dtype.size() {
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
