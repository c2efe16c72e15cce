//! Applying a LoRA patch to a chunk of rows: `W += s·Δ` with Δ from a real GEMM.

use gemm::{Parallelism, gemm};

use crate::dtype::DType;
use crate::kernels::active;
use crate::kernels::bytes::{decode, round_to};
use crate::plan::{DeltaLayout, LoraPatch};

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

fn to_f32(bytes: &[u8], dtype: DType, n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    decode(dtype, bytes, &mut v);
    v
}

/// Δ for rows `r0..r0+nrows` of the weight, written row-major into `delta` (nrows × cols).
/// Single-threaded: the pipeline runs one GEMM per compute worker, so all cores are busy.
pub fn delta_rows(
    p: &LoraPatch,
    d: &PatchData<'_>,
    r0: usize,
    nrows: usize,
    cols: usize,
    delta: &mut [f32],
) {
    delta_rows_threads(p, d, r0, nrows, cols, delta, 1)
}

/// [`delta_rows`] with the GEMM crate's own threading over `threads` threads.
pub fn delta_rows_threads(
    p: &LoraPatch,
    d: &PatchData<'_>,
    r0: usize,
    nrows: usize,
    cols: usize,
    delta: &mut [f32],
    threads: usize,
) {
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    let [rank, a_cols] = d.a_shape;
    let [b_rows, _] = d.b_shape;
    let a = to_f32(d.a, d.a_dtype, rank * a_cols);
    let b = to_f32(d.b, d.b_dtype, b_rows * rank);
    debug_assert_eq!(delta.len(), nrows * cols);
    if nrows == 0 || cols == 0 {
        return;
    }
    // SAFETY: every pointer/stride pair below addresses only elements inside the buffers:
    // shapes were validated against the weight when the plan was built (B is [out, r],
    // A is [r, in]; Rows: out == rows of W, in == cols; Transposed: in == rows, out == cols),
    // and r0 + nrows <= rows of W.
    unsafe {
        match p.layout {
            DeltaLayout::Rows => gemm(
                nrows,
                cols,
                rank,
                delta.as_mut_ptr(),
                1,
                cols as isize,
                false,
                b.as_ptr().add(r0 * rank),
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
}

/// Apply one patch to `w` (nrows × cols f32 values of rows `r0..`), given its unscaled
/// LoRA product `delta` for those rows.
pub fn apply_delta(
    p: &LoraPatch,
    d: &PatchData<'_>,
    r0: usize,
    nrows: usize,
    cols: usize,
    delta: &[f32],
    w: &mut [f32],
) {
    let k = active();
    if let Some(dt) = p.round_delta {
        // PEFT rounds the scaled embedding delta to the weight's dtype before adding it.
        let mut scaled: Vec<f32> = delta.iter().map(|&x| x * p.scale).collect();
        round_to(dt, &mut scaled);
        for (x, &dx) in w.iter_mut().zip(&scaled) {
            *x += dx;
        }
    } else {
        (k.add_scaled)(w, delta, p.scale);
    }
    if let Some((mbytes, mdtype)) = d.magnitude {
        // DoRA: rescale each row of V = W + Δ to the learned magnitude.
        let m = to_f32(mbytes, mdtype, r0 + nrows);
        for (row, v) in w.chunks_mut(cols.max(1)).enumerate() {
            let norm = v
                .iter()
                .map(|&x| (x as f64) * (x as f64))
                .sum::<f64>()
                .sqrt() as f32;
            let factor = m[r0 + row] / norm;
            for x in v.iter_mut() {
                *x *= factor;
            }
        }
    }
}
