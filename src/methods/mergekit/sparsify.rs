//! Sparsifying a model's delta: TIES keeps the top-k by magnitude, breadcrumbs a window
//! below the largest outliers, DARE a Bernoulli(density) mask, DELLA a mask whose keep
//! probability rises with the magnitude rank in the row; then (if asked) the L1 norm is
//! restored.

use super::arith::D;
use super::stream::MagnitudeOrder;
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
/// every pass over a tensor draws the same mask. The masks compare its 53 bits in integers;
/// this is the float form they are tested against.
#[cfg(test)]
pub(crate) fn uniform(seed: u64, k: usize, i: usize) -> f64 {
    draw53(seed, k, i) as f64 / (1u64 << 53) as f64
}

/// The 53 random bits behind [`uniform`].
#[inline]
fn draw53(seed: u64, k: usize, i: usize) -> u64 {
    let mut z = seed ^ ((k as u64) << 56) ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z >> 11
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
    // `uniform < density` in integers: m/2⁵³ < p ⇔ m < ⌈p·2⁵³⌉ (scaling by 2⁵³ is exact; a
    // NaN density keeps nothing, as the float comparison does).
    let limit = (density.clamp(0.0, 1.0) * (1u64 << 53) as f64).ceil() as u64;
    crate::kernels::vectorized(
        #[inline(always)]
        || {
            for (e, m) in mask.iter_mut().enumerate() {
                *m = draw53(seed, k, first + e) < limit;
            }
        },
    );
}

/// DELLA's masks, row by row, for one model: element j of a row is kept with the
/// probability of its ascending magnitude rank in the row.
pub(crate) struct DellaRows<'a> {
    p: &'a TaskInput,
    seed: u64,
    k: usize,
    order: MagnitudeOrder,
    /// Per rank, for rows of `limits.len()`: the draws below it keep the element.
    limits: Vec<u64>,
}

impl<'a> DellaRows<'a> {
    pub fn new(p: &'a TaskInput, seed: u64, k: usize) -> Self {
        DellaRows {
            p,
            seed,
            k,
            order: MagnitudeOrder::default(),
            limits: Vec::new(),
        }
    }

    /// The mask of one row whose first element is element `first` of the tensor.
    pub fn mask(&mut self, first: usize, row: &[f32], mask: &mut [bool]) {
        let n = row.len();
        if self.limits.len() != n {
            // `uniform < p` in integers, as `dare_mask` does, once per rank rather than
            // once per element (a NaN probability keeps nothing, as the float comparison).
            self.limits = (0..n)
                .map(|r| {
                    (della_probability(self.p, r, n) as f64 * (1u64 << 53) as f64).ceil() as u64
                })
                .collect();
        }
        let ranks = self.order.ranks(row);
        let (seed, k, limits) = (self.seed, self.k, &self.limits[..]);
        crate::kernels::vectorized(
            #[inline(always)]
            || {
                for (j, (m, &rank0)) in mask.iter_mut().zip(ranks).enumerate() {
                    let limit = limits.get(rank0 as usize).copied().unwrap_or(0);
                    *m = draw53(seed, k, first + j) < limit;
                }
            },
        );
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
            let mut della = DellaRows::new(p, seed, k);
            for (r, (row, m)) in delta.chunks(cols).zip(mask.chunks_mut(cols)).enumerate() {
                della.mask(r * cols, row, m);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dare_mask_matches_the_uniform_draw() {
        for density in [0.0, 1e-9, 0.1, 0.3, 0.5, 0.999_999, 1.0, f64::NAN] {
            let mut mask = vec![false; 4099];
            dare_mask(7, 2, density, 123, &mut mask);
            for (e, &m) in mask.iter().enumerate() {
                assert_eq!(
                    m,
                    uniform(7, 2, 123 + e) < density,
                    "density {density}, {e}"
                );
            }
        }
    }

    /// Each rank's integer limit keeps exactly the draws the float comparison
    /// `uniform < della_probability` keeps: over densities and epsilons that put the
    /// probabilities below 0, above 1, at NaN, and on one-element rows (0/0).
    #[test]
    fn della_mask_matches_the_probability_draw() {
        let row: Vec<f32> = (0..1001)
            .map(|i| ((i * 7919 % 613) as f32 - 306.0) * 1.37e-3)
            .collect();
        let mut order = MagnitudeOrder::default();
        for (density, epsilon) in [
            (0.5, 0.1),
            (0.3, 0.3),
            (0.05, 0.2),
            (0.9, 0.2),
            (0.5, f64::NAN),
            (0.5, 0.0),
        ] {
            let p = TaskInput {
                weight: 1.0,
                density,
                gamma: 0.01,
                epsilon,
            };
            let mut della = DellaRows::new(&p, 11, 3);
            for len in [1usize, 2, 1001] {
                let row = &row[..len];
                let mut mask = vec![false; len];
                della.mask(40, row, &mut mask);
                let ranks = order.ranks(row).to_vec();
                let kept: Vec<bool> = (0..len)
                    .map(|j| {
                        uniform(11, 3, 40 + j)
                            < della_probability(&p, ranks[j] as usize, len) as f64
                    })
                    .collect();
                assert_eq!(
                    mask, kept,
                    "density {density}, epsilon {epsilon}, len {len}"
                );
            }
        }
    }

    /// Rows of f16 and bf16 deltas (few distinct magnitudes, zeros, tiny values) take the
    /// counting sort; f32-valued rows and rows with many zeros the radix sort: every way
    /// gives the stable order's ranks.
    #[test]
    fn magnitude_ranks_are_the_stable_order() {
        let mut order = MagnitudeOrder::default();
        for len in [1usize, 2, 7, 100, 5120, 13824] {
            for (kind, zeros_every) in [(0, 0), (0, 50), (0, 3), (1, 0), (1, 40), (2, 0)] {
                let row: Vec<f32> = (0..len)
                    .map(|i| {
                        let r = ((i * 7919 + 13) % 10007) as f32 / 10007.0 - 0.5;
                        let x = if zeros_every > 0 && i % zeros_every == 0 {
                            if i % 2 == 0 { 0.0 } else { -0.0 }
                        } else if i % 211 == 5 {
                            r * 1e-7 // below the span
                        } else {
                            r * r * r * 0.02
                        };
                        match kind {
                            0 => half::f16::from_f32(x).to_f32(),
                            1 => half::bf16::from_f32(x).to_f32(),
                            _ => x,
                        }
                    })
                    .collect();
                let mut want = vec![0u32; len];
                let mut idx: Vec<u32> = (0..len as u32).collect();
                idx.sort_by_key(|&i| (row[i as usize].to_bits() & 0x7FFF_FFFF, i));
                for (r, &j) in idx.iter().enumerate() {
                    want[j as usize] = r as u32;
                }
                assert_eq!(
                    order.ranks(&row),
                    &want[..],
                    "len {len}, kind {kind}, zeros every {zeros_every}"
                );
            }
        }
        assert_eq!(order.ranks(&[0.0, -0.0, 0.0]), &[0, 1, 2]);
    }

    /// Rows with ties, signed zeros, NaN and infinities, as f32 and as f16-valued data.
    #[test]
    fn magnitude_order_is_a_stable_sort_by_magnitude() {
        let mut order = MagnitudeOrder::default();
        for len in [0usize, 1, 2, 7, 64, 1001, 5120] {
            for f16_valued in [false, true] {
                let row: Vec<f32> = (0..len)
                    .map(|i| {
                        let x = match i % 97 {
                            0 => f32::NAN,
                            1 => -0.0,
                            2 => f32::NEG_INFINITY,
                            3 => 0.0,
                            _ => ((i * 7919 % 613) as f32 - 306.0) * 1.37e-3,
                        };
                        if f16_valued {
                            half::f16::from_f32(x).to_f32()
                        } else {
                            x
                        }
                    })
                    .collect();
                let mut want: Vec<u32> = (0..len as u32).collect();
                want.sort_by_key(|&i| (row[i as usize].to_bits() & 0x7FFF_FFFF, i));
                assert_eq!(order.sort(&row), &want[..], "len {len}, f16 {f16_valued}");
                let mut ranks = vec![0u32; len];
                for (r, &j) in want.iter().enumerate() {
                    ranks[j as usize] = r as u32;
                }
                assert_eq!(order.ranks(&row), &ranks[..], "len {len}, f16 {f16_valued}");
            }
        }
    }
}
