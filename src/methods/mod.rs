//! The arithmetic of a step, applied to one chunk of rows.
//!
//! Operands are decoded to f32, patched with their LoRA deltas and rounded as the plan says;
//! the method combines them; the result is encoded in the output dtype. The fp16
//! reproduction blend takes a fast path on fp16 bits that never materializes f32 operands.

pub mod lora;
pub mod mergekit;
pub mod torch_compat;

use std::borrow::Cow;
use std::ops::Range;

use zerocopy::IntoBytes;

use crate::dtype::DType;
use crate::kernels::active;
use crate::kernels::bytes::{decode, encode, halves, round_to};
use crate::plan::{Method, Operand, Plan, Recipe, Step};

pub use lora::PatchData;

/// One operand's bytes for the chunk: its rows (clamped to the rows it provides) and the
/// data of its patches.
pub struct OperandData<'a> {
    pub bytes: &'a [u8],
    pub patches: Vec<PatchData<'a>>,
}

/// Compute rows `rows` of `step`. `data` holds one entry per operand (empty for `Copy`,
/// where `copy` holds the bytes). Returns the output bytes of the chunk.
pub fn compute_chunk(
    plan: &Plan,
    step: &Step,
    rows: Range<u64>,
    data: &[OperandData<'_>],
) -> Vec<u8> {
    let Recipe::Compute { operands, method } = &step.recipe else {
        // Copies never reach here: the pipeline moves their bytes directly.
        return data.first().map(|d| d.bytes.to_vec()).unwrap_or_default();
    };
    let cols = step.row_elems() as usize;
    let nrows = (rows.end - rows.start) as usize;
    let n = nrows * cols;
    let k = active();
    match method {
        Method::Convert => {
            let v = operand_f32(plan, &operands[0], &data[0], rows.start, nrows, cols);
            encode(step.dtype, &v)
        }
        Method::GradientFp16 { ratio } => {
            let wa = (1.0 - ratio) as f32;
            let wb = *ratio as f32;
            let a = operand_f16(plan, &operands[0], &data[0], rows.start, nrows, cols);
            let m = blend_rows(&operands[1], &rows, cols);
            let b = operand_f16(
                plan,
                &operands[1],
                &data[1],
                rows.start,
                m / cols.max(1),
                cols,
            );
            let mut out = vec![0u16; n];
            (k.blend_f16)(&a[..m], &b[..m], wa, wb, &mut out[..m]);
            out[m..].copy_from_slice(&a[m..]);
            out.as_bytes().to_vec()
        }
        Method::GradientPrecise { ratio } => {
            let wa = (1.0 - ratio) as f32;
            let wb = *ratio as f32;
            let a = operand_f32(plan, &operands[0], &data[0], rows.start, nrows, cols);
            let m = blend_rows(&operands[1], &rows, cols);
            let b = operand_f32(
                plan,
                &operands[1],
                &data[1],
                rows.start,
                m / cols.max(1),
                cols,
            );
            let mut out = a.clone();
            (k.blend_f32)(&a[..m], &b[..m], wa, wb, &mut out[..m]);
            encode(step.dtype, &out)
        }
        Method::Mergekit(r) => {
            let xs: Vec<Vec<f32>> = operands
                .iter()
                .zip(data)
                .map(|(op, d)| operand_f32(plan, op, d, rows.start, nrows, cols))
                .collect();
            let out = mergekit::merge(r, &xs, nrows, cols);
            encode(step.dtype, &out)
        }
        Method::BlendChain { ratios } => {
            let mut cur = operand_f32(plan, &operands[0], &data[0], rows.start, nrows, cols);
            let m = blend_rows(&operands[1], &rows, cols);
            let b = operand_f32(
                plan,
                &operands[1],
                &data[1],
                rows.start,
                m / cols.max(1),
                cols,
            );
            let mut next = vec![0f32; m];
            for r in ratios {
                (k.blend_f32)(&cur[..m], &b, (1.0 - r) as f32, *r as f32, &mut next);
                cur[..m].copy_from_slice(&next);
            }
            encode(step.dtype, &cur)
        }
    }
}

/// Elements of the chunk that the second operand covers (the vocab rule: rows past its
/// own row count keep the first operand).
fn blend_rows(op: &Operand, rows: &Range<u64>, cols: usize) -> usize {
    let covered = op.rows.clamp(rows.start, rows.end) - rows.start;
    covered as usize * cols
}

/// An operand's rows as f32: decoded, rounded on load, patched, rounded.
pub fn operand_f32(
    plan: &Plan,
    op: &Operand,
    data: &OperandData<'_>,
    r0: u64,
    nrows: usize,
    cols: usize,
) -> Vec<f32> {
    let t = plan.tensor(op.tensor);
    let mut v = vec![0f32; nrows * cols];
    decode(t.dtype, data.bytes, &mut v);
    if let Some(d) = op.load_as {
        round_to(d, &mut v);
    }
    for (p, pd) in op.patches.iter().zip(&data.patches) {
        lora::apply(p, pd, r0 as usize, nrows, cols, &mut v);
    }
    for &d in &op.roundings {
        round_to(d, &mut v);
    }
    v
}

/// An operand's rows as fp16 bits; borrowed straight from the input when it is stored as
/// fp16 and needs no arithmetic.
fn operand_f16<'a>(
    plan: &Plan,
    op: &Operand,
    data: &'a OperandData<'a>,
    r0: u64,
    nrows: usize,
    cols: usize,
) -> Cow<'a, [u16]> {
    let t = plan.tensor(op.tensor);
    let plain = op.patches.is_empty() && op.load_as.is_none();
    if plain && t.dtype == DType::F16 && op.roundings.iter().all(|&d| d == DType::F16) {
        return halves(data.bytes);
    }
    let v = operand_f32(plan, op, data, r0, nrows, cols);
    let mut h = vec![0u16; v.len()];
    (active().f32_to_f16)(&v, &mut h);
    Cow::Owned(h)
}
