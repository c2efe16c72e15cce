//! Sparsifying a model's delta: TIES keeps the top-k by magnitude, breadcrumbs a window
//! below the largest outliers, DARE a Bernoulli(density) mask, DELLA a mask whose keep
//! probability rises with the magnitude rank in the row; then (if asked) the L1 norm is
//! restored.

use super::arith::D;
use super::task_arithmetic::TaskInput;
use crate::methods::torch_compat as tc;

/// How sparse deltas are made in the task-arithmetic family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sparsify {
    None,
    /// TIES: keep the top-k by magnitude.
    Magnitude,
    /// Breadcrumbs: drop the largest gamma·N and the smallest, keep density·N.
    MagnitudeOutliers,
    /// DARE: Bernoulli(density) masks.
    Random,
    /// DELLA: Bernoulli masks whose probability rises with the magnitude rank in the row.
    Della,
}

/// A uniform number in [0, 1) for element `i` of input `k`: counter-based (SplitMix64), so
/// every pass over a tensor draws the same mask.
pub(crate) fn uniform(seed: u64, k: usize, i: usize) -> f64 {
    let mut z = seed ^ ((k as u64) << 56) ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// DELLA's keep probability for ascending magnitude rank `rank0` (0-based) of `n` in a row:
/// rising linearly from density − ε to density + ε.
pub(crate) fn della_probability(p: &TaskInput, rank0: usize, n: usize) -> f32 {
    let lo = (p.density - p.epsilon) as f32;
    let span = (2.0 * p.epsilon) as f32;
    // (rank − min)/(max − min); a one-element row divides 0 by 0 as mergekit does.
    let rn = (rank0 as f32 / (n as f32 - 1.0)).clamp(0.0, 1.0);
    lo + rn * span
}

/// Keep `x` where `keep`, else `0·x` (PyTorch's `t * mask`).
pub(crate) fn masked(x: f32, keep: bool) -> f32 {
    if keep { x } else { 0.0 * x }
}

/// mergekit's `rescaled_masked_tensor`: mask, then (if asked) restore the L1 norm of the
/// whole tensor.
fn rescaled(t: &[f32], mask: &[bool], rescale: bool, d: D) -> Vec<f32> {
    let m: Vec<f32> = t.iter().zip(mask).map(|(&x, &k)| masked(x, k)).collect();
    if !rescale {
        return m;
    }
    let before = d.sum(&t.iter().map(|x| x.abs()).collect::<Vec<_>>());
    let after = d.sum(&m.iter().map(|x| x.abs()).collect::<Vec<_>>());
    match rescale_factor(before, after, d) {
        Some(f) => d.map(&m, |x| x * f),
        None => m,
    }
}

/// `Σ|t| / Σ|masked|`, unless either sum is below 1e-7.
pub(crate) fn rescale_factor(before: f32, after: f32, d: D) -> Option<f32> {
    if (before as f64) < 1e-7 || (after as f64) < 1e-7 {
        None
    } else {
        Some(d.qs(before / after))
    }
}

/// Sparsify one model's delta over the whole tensor (exact: PyTorch's sort order).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sparsify(
    kind: Sparsify,
    delta: Vec<f32>,
    p: &TaskInput,
    rescale: bool,
    rows: usize,
    cols: usize,
    seed: u64,
    k: usize,
    d: D,
) -> Vec<f32> {
    let n = delta.len();
    let density = p.density;
    if kind == Sparsify::None || density >= 1.0 {
        return delta;
    }
    if density <= 0.0 && kind != Sparsify::MagnitudeOutliers {
        return vec![0.0; n];
    }
    let mut mask = vec![false; n];
    match kind {
        Sparsify::None => return delta,
        Sparsify::Magnitude => {
            if n == 0 {
                return delta;
            }
            let keep = ((density * n as f64) as usize).clamp(1, n);
            let mag: Vec<f32> = delta.iter().map(|x| x.abs()).collect();
            for &i in &tc::argsort_desc(&mag)[..keep] {
                mask[i] = true;
            }
        }
        Sparsify::MagnitudeOutliers => {
            let (n_bot, target) = outlier_window(p, n);
            let mag: Vec<f32> = delta.iter().map(|x| x.abs()).collect();
            for &i in tc::argsort_asc(&mag).iter().skip(n_bot).take(target) {
                mask[i] = true;
            }
        }
        Sparsify::Random => {
            for (i, m) in mask.iter_mut().enumerate() {
                *m = uniform(seed, k, i) < density;
            }
        }
        Sparsify::Della => {
            // 1-D tensors are one row.
            let (rows, cols) = if rows * cols == n && rows > 0 {
                (rows, cols)
            } else {
                (1, n)
            };
            for r in 0..rows {
                let row = &delta[r * cols..(r + 1) * cols];
                let mag: Vec<f32> = row.iter().map(|x| x.abs()).collect();
                for (rank0, &j) in tc::argsort_asc(&mag).iter().enumerate() {
                    let i = r * cols + j;
                    mask[i] = uniform(seed, k, i) < della_probability(p, rank0, cols) as f64;
                }
            }
        }
    }
    rescaled(&delta, &mask, rescale, d)
}

/// Breadcrumbs: skip the `n_bot` smallest magnitudes, keep the next `target`.
pub(crate) fn outlier_window(p: &TaskInput, n: usize) -> (usize, usize) {
    let target = ((p.density * n as f64) as usize).min(n);
    let n_top = (p.gamma * n as f64) as usize;
    (n.saturating_sub(target + n_top), target)
}
