//! How the pipeline cuts steps into work: what a chunk of rows costs in working memory,
//! which steps may be cut into row chunks, which must be streamed in passes, how many rows
//! a chunk gets, in what order copies and computed chunks go, and the peak-memory estimate
//! the dry run prints. All of the chunking policy lives here.

use crate::methods::mergekit::Capability;
use crate::model::Layout;
use crate::plan::{DeltaLayout, Method, Operand, Plan, Recipe, Step, TensorRef};
use crate::shape::RowMajor;

/// Bytes a chunk should cost: big enough to amortize per-chunk work, small enough that
/// several chunks are in flight within the budget.
pub fn chunk_target(memory_limit: u64) -> u64 {
    (memory_limit / 8).clamp(4 << 20, 16 << 20)
}

/// Bytes of working memory one chunk of `rows` rows of `step` needs: input bytes, LoRA
/// factors (stored and as f32) and products, f32 operands when the method works on the
/// whole chunk at once (elementwise methods work in small cache tiles), and the output.
pub fn chunk_cost(plan: &Plan, step: &Step, rows: u64) -> u64 {
    let cols = step.row_elems().max(1);
    let out = rows * cols * step.dtype.bits() / 8;
    match &step.recipe {
        Recipe::Copy(_) => out,
        Recipe::Compute { operands, method } => {
            // f32 copies of each operand a whole-tensor method holds at once.
            let copies = match method {
                Method::Mergekit(r) if r.capability() != Capability::Elementwise => {
                    r.merge.copies_per_operand()
                }
                _ => 0,
            };
            let mut total = out;
            for op in operands {
                let r = rows.min(op.rows);
                // Vocabulary-aligned operands arrive as f32 rows.
                total += r * op.stored(plan).1;
                total += r * cols * 4 * copies;
                for p in &op.patches {
                    let (a, b) = (plan.tensor(p.a), plan.tensor(p.b));
                    total += a.len + b.len + (a.numel() + b.numel()) * 4 + r * cols * 4;
                    if let Some(m) = p.magnitude {
                        total += plan.tensor(m).len;
                    }
                }
            }
            total
        }
    }
}

/// Whether a tensor is a view gathered whole from its storage.
fn gathered(plan: &Plan, r: TensorRef) -> bool {
    !matches!(plan.tensor(r).layout, Layout::Contiguous)
}

/// DoRA on transposed layouts needs whole columns, so its rows cannot be cut.
fn patches_split_by_rows(step: &Step) -> bool {
    match &step.recipe {
        Recipe::Copy(_) => true,
        Recipe::Compute { operands, .. } => operands.iter().all(|op| {
            op.patches
                .iter()
                .all(|p| p.magnitude.is_none() || p.layout == DeltaLayout::Rows)
        }),
    }
}

/// Whether a step can be split into independent row chunks.
pub fn chunkable(plan: &Plan, step: &Step) -> bool {
    match &step.recipe {
        Recipe::Copy(t) => !gathered(plan, *t),
        Recipe::Compute { operands, method } => {
            let method_ok = match method {
                Method::Mergekit(r) => r.capability() == Capability::Elementwise,
                _ => true,
            };
            method_ok
                && !operands.iter().any(|op| gathered(plan, op.tensor))
                && patches_split_by_rows(step)
        }
    }
}

/// Whether a step that cannot be chunked can instead be streamed in passes over its row
/// chunks (methods with whole-tensor statistics).
pub fn streamable(plan: &Plan, step: &Step) -> bool {
    match &step.recipe {
        // 1-D tensors are one row for the row-wise methods; views are gathered whole.
        Recipe::Compute {
            operands,
            method: Method::Mergekit(r),
        } => {
            step.shape.len() > 1
                && r.capability() == Capability::Streamed
                && !operands.iter().any(|op| gathered(plan, op.tensor))
                && patches_split_by_rows(step)
        }
        _ => false,
    }
}

/// Whether a streamable step should stream even though it fits in memory (the method says
/// when streaming is cheaper).
pub fn prefers_streaming(step: &Step) -> bool {
    match &step.recipe {
        Recipe::Compute {
            method: Method::Mergekit(r),
            ..
        } => r.merge.prefers_streaming(step.shape.iter().product()),
        _ => false,
    }
}

/// `items` with the copied ones (`class` gives whether an item is a copy, and its bytes)
/// spread evenly by bytes among the rest, each kind in its own order. Copies cost the
/// cores nothing and computed chunks little disk: in file order the seed recipe copies its
/// embeddings and lm_head first, the cores idle, then computes with the disk half idle
/// (seed recipe + LoRA: see README).
pub fn spread_copies<T>(items: Vec<T>, class: impl Fn(&T) -> (bool, u64)) -> Vec<T> {
    let (mut copies, mut computed) = (Vec::new(), Vec::new());
    for item in items {
        let (copy, bytes) = class(&item);
        match copy {
            true => copies.push((item, bytes)),
            false => computed.push((item, bytes)),
        }
    }
    let total = |v: &[(T, u64)]| v.iter().map(|(_, b)| u128::from(*b)).sum::<u128>();
    let (copy_total, computed_total) = (total(&copies), total(&computed));
    let mut out = Vec::with_capacity(copies.len() + computed.len());
    let (mut copies, mut computed) = (
        copies.into_iter().peekable(),
        computed.into_iter().peekable(),
    );
    let (mut copy_done, mut computed_done) = (0u128, 0u128);
    loop {
        // The next copy goes when the copies' share done is behind the computed one's.
        let take_copy = match (copies.peek(), computed.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(_), Some(_)) => copy_done * computed_total <= computed_done * copy_total,
        };
        let next = match take_copy {
            true => copies.next(),
            false => computed.next(),
        };
        let Some((item, bytes)) = next else { break };
        match take_copy {
            true => copy_done += u128::from(bytes),
            false => computed_done += u128::from(bytes),
        }
        out.push(item);
    }
    out
}

/// Rows per chunk for `step` so that a chunk costs about `target` bytes.
pub fn rows_per_chunk(plan: &Plan, step: &Step, target: u64) -> u64 {
    let rows = step.rows();
    // Rows of sub-byte types (F4, F6) may not start on a byte boundary: never split them.
    if rows <= 1 || !chunkable(plan, step) || step.dtype.bits() < 8 {
        return rows.max(1);
    }
    rows_fitting(plan, step, target)
}

/// Rows per pass chunk of a streamed step (as if it were chunkable).
pub fn stream_rows(plan: &Plan, step: &Step, target: u64) -> u64 {
    rows_fitting(plan, step, target)
}

/// Bytes of a streamed step's stored operand chunks to keep from one pass to the next (see
/// `compute::HeldChunks`): all of them when they fit the step's share of the budget, else
/// as many chunks as fit. Each worker's share is half the budget over the workers, so
/// steps streamed side by side leave the other half to the chunks queued behind them
/// (nuslerp, three passes: CPU −10 to −18%, ties and slerp −8 to −18%; peak RSS ~0.55 GiB
/// at the default budget).
pub fn held_bytes(plan: &Plan, step: &Step, memory_limit: u64, workers: usize) -> u64 {
    let Recipe::Compute { operands, .. } = &step.recipe else {
        return 0;
    };
    let stored: u64 = operands
        .iter()
        .filter(|op| keepable(plan, op))
        .map(|op| op.rows.min(step.rows()) * op.stored(plan).1)
        .sum();
    let share = memory_limit / 2 / workers.max(1) as u64;
    stored.min(share)
}

/// Whether a streamed step's operand can be kept between passes as its stored bytes: a
/// tensor of whole-byte elements read as is (no LoRA patches, no vocabulary alignment).
pub fn keepable(plan: &Plan, op: &Operand) -> bool {
    op.patches.is_empty() && op.vocab.is_none() && op.stored(plan).0.bits() >= 8
}

/// How many rows of `step` cost about `target` bytes (chunk cost is a fixed part, such as
/// LoRA factors, plus a per-row part).
fn rows_fitting(plan: &Plan, step: &Step, target: u64) -> u64 {
    let one = chunk_cost(plan, step, 1);
    let per_row = chunk_cost(plan, step, 2).saturating_sub(one).max(1);
    let fixed = one.saturating_sub(per_row);
    let fit = if fixed < target {
        (target - fixed) / per_row
    } else {
        target / per_row
    };
    fit.clamp(1, step.rows().max(1))
}

/// Peak memory: the budget (or everything, if the whole run needs less), or the largest
/// single chunk if that exceeds it, plus a fixed allowance for the program itself.
pub fn peak_memory_estimate(plan: &Plan, memory_limit: u64) -> u64 {
    const BASE: u64 = 32 << 20;
    let target = chunk_target(memory_limit);
    let mut largest = 0u64;
    let mut total = 0u64;
    for step in &plan.steps {
        let rows = rows_per_chunk(plan, step, target);
        let c = chunk_cost(plan, step, rows.min(step.rows()).max(1));
        largest = largest.max(c);
        total = total.saturating_add(chunk_cost(plan, step, step.rows().max(1)));
    }
    BASE + total.min(memory_limit).max(largest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Copies are spread by bytes among the computed items, each kind kept in its order.
    #[test]
    fn copies_spread_evenly_by_bytes_among_computed_items() {
        // (name, is a copy, bytes)
        let items = vec![
            ("e1", true, 50),
            ("e2", true, 50),
            ("c1", false, 100),
            ("c2", false, 100),
            ("c3", false, 100),
            ("c4", false, 100),
            ("h1", true, 100),
        ];
        let order: Vec<&str> = spread_copies(items, |(_, copy, b)| (*copy, *b))
            .into_iter()
            .map(|(n, _, _)| n)
            .collect();
        // Copies 200 bytes of 400 computed: one copy byte per two computed bytes.
        assert_eq!(order, ["e1", "c1", "e2", "c2", "h1", "c3", "c4"]);
        // One kind alone, or nothing, comes back as it was.
        let only = vec![(1, true, 5), (2, true, 0), (3, true, 7)];
        let back: Vec<i32> = spread_copies(only, |(_, c, b)| (*c, *b))
            .into_iter()
            .map(|(n, _, _)| n)
            .collect();
        assert_eq!(back, [1, 2, 3]);
        assert!(spread_copies(Vec::<u8>::new(), |_| (true, 1)).is_empty());
        // Zero-byte items on either side still all come out once.
        let zeros = vec![(1, true, 0), (2, false, 0), (3, true, 0), (4, false, 9)];
        let mut got: Vec<i32> = spread_copies(zeros, |(_, c, b)| (*c, *b))
            .into_iter()
            .map(|(n, _, _)| n)
            .collect();
        got.sort();
        assert_eq!(got, [1, 2, 3, 4]);
    }
}
