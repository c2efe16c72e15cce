//! Applying a LoRA patch to a chunk of rows: `W += s·Δ` with Δ from a real GEMM.

use std::borrow::Cow;

use gemm::{Parallelism, gemm};
use zerocopy::FromBytes;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::active;
use crate::kernels::bytes::{decode_append, round_to};

/// How a LoRA delta's rows map onto the weight's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaLayout {
    /// Δ = B @ A: weight rows are B's rows (Linear layers).
    Rows,
    /// Δ = (B @ A)ᵀ: weight rows are A's columns (embeddings, `fan_in_fan_out` layers).
    Transposed,
}

/// A patch's factor tensors, as stored.
pub struct PatchData<'a> {
    pub a: &'a [u8],
    pub a_dtype: DType,
    pub a_shape: [usize; 2],
    pub b: &'a [u8],
    pub b_dtype: DType,
    pub b_shape: [usize; 2],
    pub magnitude: Option<(&'a [u8], DType)>,
}

/// Values `range` of a factor as f32: borrowed where the file stores them as aligned
/// little-endian f32 (PEFT's usual dtype), decoded otherwise. Every chunk of a weight needs
/// the factors, so copying them whole each time was a tenth of a LoRA merge's CPU time.
fn factor_values(bytes: &[u8], dtype: DType, range: std::ops::Range<usize>) -> Cow<'_, [f32]> {
    let size = dtype.size();
    // Callers check the factors' sizes first; out of range is a bug, never a panic.
    let Some(part) = bytes.get(range.start * size..range.end * size) else {
        return Cow::Owned(vec![f32::NAN; range.len()]);
    };
    #[cfg(target_endian = "little")]
    if dtype == DType::F32
        && let Ok(v) = <[f32]>::ref_from_bytes(part)
    {
        return Cow::Borrowed(v);
    }
    let mut v = Vec::with_capacity(range.len());
    decode_append(dtype, part, range.len(), &mut v);
    Cow::Owned(v)
}

/// Why a LoRA product cannot be computed with the given shapes: the plan checks them
/// against the weight, so this is a bug, but the GEMM below must never see them.
fn shape_error(what: String) -> Error {
    Error::internal(format!("LoRA product with {what}"))
}

/// Δ for rows `r0..r0+nrows` of the weight, written row-major into `delta` (nrows × cols).
/// Single-threaded: the pipeline runs one GEMM per compute worker, so all cores are busy.
pub fn delta_rows(
    layout: DeltaLayout,
    d: &PatchData<'_>,
    r0: usize,
    nrows: usize,
    cols: usize,
    delta: &mut [f32],
) -> Result<()> {
    delta_rows_threads(layout, d, r0, nrows, cols, delta, 1)
}

/// [`delta_rows`] with the GEMM crate's own threading over `threads` threads.
pub fn delta_rows_threads(
    layout: DeltaLayout,
    d: &PatchData<'_>,
    r0: usize,
    nrows: usize,
    cols: usize,
    delta: &mut [f32],
    threads: usize,
) -> Result<()> {
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    let [rank, a_cols] = d.a_shape;
    let [b_rows, b_rank] = d.b_shape;
    // Every bound the GEMM's pointer arithmetic relies on, checked here (this function is
    // safe and public): factor sizes, the inner dimension, the rows asked for, the output.
    let elems = |shape: [usize; 2]| shape[0].checked_mul(shape[1]);
    let fits = |bytes: &[u8], dtype: DType, shape| {
        elems(shape)
            .and_then(|n| n.checked_mul(dtype.size()))
            .is_some_and(|n| n == bytes.len())
    };
    if !fits(d.a, d.a_dtype, d.a_shape) || !fits(d.b, d.b_dtype, d.b_shape) || b_rank != rank {
        return Err(shape_error(format!(
            "A {:?} ({} bytes of {}) and B {:?} ({} bytes of {})",
            d.a_shape,
            d.a.len(),
            d.a_dtype,
            d.b_shape,
            d.b.len(),
            d.b_dtype
        )));
    }
    let (weight_rows, weight_cols) = match layout {
        DeltaLayout::Rows => (b_rows, a_cols),
        DeltaLayout::Transposed => (a_cols, b_rows),
    };
    let end = r0.checked_add(nrows);
    if weight_cols != cols
        || end.is_none_or(|e| e > weight_rows)
        || nrows.checked_mul(cols) != Some(delta.len())
    {
        return Err(shape_error(format!(
            "a {weight_rows}x{weight_cols} product asked for rows {r0}..+{nrows} of {cols} columns into {} values",
            delta.len()
        )));
    }
    if nrows == 0 || cols == 0 || rank == 0 {
        delta.fill(0.0);
        return Ok(());
    }
    let a = factor_values(d.a, d.a_dtype, 0..rank * a_cols);
    // Rows: only B's rows r0..r0+nrows take part; Transposed: all of B.
    let b = match layout {
        DeltaLayout::Rows => factor_values(d.b, d.b_dtype, r0 * rank..(r0 + nrows) * rank),
        DeltaLayout::Transposed => factor_values(d.b, d.b_dtype, 0..b_rows * rank),
    };
    // SAFETY: checked above: A holds rank × a_cols f32 values; for Rows, `b` holds B's rows
    // r0..r0+nrows (nrows × rank) and A has `cols` columns; for Transposed, `b` is B
    // (b_rows × rank, with b_rows = cols) and columns r0..r0+nrows of A exist; `delta` holds
    // nrows × cols values. Each pointer/stride pair below addresses only elements inside
    // those buffers.
    unsafe {
        match layout {
            DeltaLayout::Rows => gemm(
                nrows,
                cols,
                rank,
                delta.as_mut_ptr(),
                1,
                cols as isize,
                false,
                b.as_ptr(),
                1,
                rank as isize,
                a.as_ptr(),
                1,
                a_cols as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            ),
            // M = B @ A[:, r0..r0+nrows] is (cols × nrows); Δ = Mᵀ, so write M transposed.
            DeltaLayout::Transposed => gemm(
                cols,
                nrows,
                rank,
                delta.as_mut_ptr(),
                cols as isize,
                1,
                false,
                b.as_ptr(),
                1,
                rank as isize,
                a.as_ptr().add(r0),
                1,
                a_cols as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            ),
        }
    }
    Ok(())
}

/// Apply one patch to `w` (nrows × cols f32 values of rows `r0..`), given its unscaled
/// LoRA product `delta` for those rows.
#[allow(clippy::too_many_arguments)]
pub fn apply_delta(
    scale: f32,
    round_delta: Option<DType>,
    d: &PatchData<'_>,
    r0: usize,
    nrows: usize,
    cols: usize,
    delta: &[f32],
    w: &mut [f32],
) {
    let k = active();
    if let Some(dt) = round_delta {
        // PEFT rounds the scaled embedding delta to the weight's dtype before adding it.
        let mut scaled: Vec<f32> = delta.iter().map(|&x| x * scale).collect();
        round_to(dt, &mut scaled);
        for (x, &dx) in w.iter_mut().zip(&scaled) {
            *x += dx;
        }
    } else {
        (k.add_scaled)(w, delta, scale);
    }
    if let Some((mbytes, mdtype)) = d.magnitude {
        // DoRA: rescale each row of V = W + Δ to the learned magnitude.
        let m = factor_values(mbytes, mdtype, r0..r0 + nrows);
        for (row, v) in w.chunks_mut(cols.max(1)).enumerate() {
            let norm = v
                .iter()
                .map(|&x| (x as f64) * (x as f64))
                .sum::<f64>()
                .sqrt() as f32;
            let factor = m[row] / norm;
            for x in v.iter_mut() {
                *x *= factor;
            }
        }
    }
}
