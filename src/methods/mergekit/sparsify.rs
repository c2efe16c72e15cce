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
    /// DELLA: Bernoulli masks whose probability rises with the magnitude rank in the row
    /// (ties ranked in index order).
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

/// DARE's mask of a run of elements whose first is element `first` of the tensor.
pub(crate) fn dare_mask(seed: u64, k: usize, density: f64, first: usize, mask: &mut [bool]) {
    for (e, m) in mask.iter_mut().enumerate() {
        *m = uniform(seed, k, first + e) < density;
    }
}

/// DELLA's mask of one row whose first element is element `first` of the tensor: element j
/// kept with the probability of its ascending magnitude rank in the row.
pub(crate) fn della_row_mask(
    p: &TaskInput,
    seed: u64,
    k: usize,
    first: usize,
    row: &[f32],
    mask: &mut [bool],
    order: &mut MagnitudeOrder,
) {
    for (rank0, &j) in order.sort(row).iter().enumerate() {
        let j = j as usize;
        mask[j] = uniform(seed, k, first + j) < della_probability(p, rank0, row.len()) as f64;
    }
}

/// Ascending order of a row's magnitudes (NaN last), ties in index order: a stable LSD radix
/// sort of `|x|`'s bit patterns, 11 bits a pass, skipping a pass whose digit every key shares
/// (the low one whenever the values came from f16 or bf16). Reuses its buffers across rows.
#[derive(Default)]
pub(crate) struct MagnitudeOrder {
    keys: Vec<u32>,
    order: Vec<u32>,
    spare: Vec<u32>,
    counts: Vec<u32>,
}

impl MagnitudeOrder {
    const DIGITS: [(u32, u32); 3] = [(0, 11), (11, 11), (22, 10)];

    /// The row's indices in ascending magnitude order.
    pub fn sort(&mut self, row: &[f32]) -> &[u32] {
        let n = row.len();
        self.keys.clear();
        self.keys
            .extend(row.iter().map(|x| x.to_bits() & 0x7FFF_FFFF));
        self.order.clear();
        self.order.extend(0..n as u32);
        self.spare.resize(n, 0);
        self.counts.clear();
        self.counts.resize(3 << 11, 0);
        for &key in &self.keys {
            for (d, &(shift, bits)) in Self::DIGITS.iter().enumerate() {
                self.counts[(d << 11) + ((key >> shift) & ((1 << bits) - 1)) as usize] += 1;
            }
        }
        for (d, &(shift, bits)) in Self::DIGITS.iter().enumerate() {
            let counts = &mut self.counts[d << 11..(d + 1) << 11];
            if counts.iter().any(|&c| c as usize == n) {
                continue; // every key has the same digit: this pass would not move anything
            }
            let mut at = 0u32;
            for c in counts.iter_mut() {
                let here = *c;
                *c = at;
                at += here;
            }
            for &i in &self.order {
                let digit = ((self.keys[i as usize] >> shift) & ((1 << bits) - 1)) as usize;
                self.spare[counts[digit] as usize] = i;
                counts[digit] += 1;
            }
            std::mem::swap(&mut self.order, &mut self.spare);
        }
        &self.order
    }
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
        Sparsify::Random => dare_mask(seed, k, density, 0, &mut mask),
        Sparsify::Della => {
            // 1-D tensors are one row.
            let cols = if rows * cols == n && rows > 0 {
                cols
            } else {
                n
            }
            .max(1);
            let mut order = MagnitudeOrder::default();
            for (r, (row, m)) in delta.chunks(cols).zip(mask.chunks_mut(cols)).enumerate() {
                della_row_mask(p, seed, k, r * cols, row, m, &mut order);
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
