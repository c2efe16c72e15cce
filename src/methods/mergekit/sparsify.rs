//! Sparsifying a model's delta: TIES keeps the top-k by magnitude, breadcrumbs a window
//! below the largest outliers, DARE a Bernoulli(density) mask, DELLA a mask whose keep
//! probability rises with the magnitude rank in the row; then (if asked) the L1 norm is
//! restored.

use super::arith::D;
use super::stream::{KeyRange, MagnitudeOrder, magnitude_key};
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

/// The random stream of input `k`: the seed salted with the input's index.
#[inline]
fn stream(seed: u64, k: usize) -> u64 {
    seed ^ ((k as u64) << 56)
}

/// The 53 random bits behind [`uniform`] ([`crate::kernels::scalar::splitmix`]).
#[inline]
fn draw53(seed: u64, k: usize, i: usize) -> u64 {
    crate::kernels::scalar::splitmix(stream(seed, k), i as u64) >> 11
}

/// DELLA's keep probability for ascending magnitude rank `rank0` (0-based) of `n` in a row:
/// rising linearly from density − ε to density + ε.
pub(crate) fn della_probability(density: f64, epsilon: f64, rank0: usize, n: usize) -> f32 {
    let lo = (density - epsilon) as f32;
    let span = (2.0 * epsilon) as f32;
    // (rank − min)/(max − min); a one-element row divides 0 by 0 as mergekit does.
    let rn = (rank0 as f32 / (n as f32 - 1.0)).clamp(0.0, 1.0);
    lo + rn * span
}

/// DARE's mask of a run of elements whose first is element `first` of the tensor.
pub(crate) fn dare_mask(seed: u64, k: usize, density: f64, first: usize, mask: &mut [bool]) {
    // `uniform < density` in integers: m/2⁵³ < p ⇔ m < ⌈p·2⁵³⌉ (scaling by 2⁵³ is exact; a
    // NaN density keeps nothing, as the float comparison does).
    let limit = (density.clamp(0.0, 1.0) * (1u64 << 53) as f64).ceil() as u64;
    crate::kernels::draws_below(stream(seed, k), first as u64, limit, mask);
}

/// DELLA's masks, row by row, for one model: element j of a row is kept with the
/// probability of its ascending magnitude rank in the row (ties in index order).
///
/// Most elements need no rank. While the keep limit rises with the rank (ε ≥ 0), a draw
/// below the limit at rank 0 keeps its element and one at or above the limit at the last
/// rank drops it: all but about 2ε of a row. For the rest, a histogram of the row's
/// magnitudes in about n/4 buckets gives the ranks each bucket spans; an element whose draw
/// is below the limit at its bucket's lowest rank is kept, and one at or above the limit at
/// the bucket's highest rank is dropped, wherever it falls in the bucket
/// ([`crate::kernels::bounded_keep`], with gathers). The few elements left (about two a row
/// of f16 deltas) are ranked one at a time within their bucket, and a row with many (long
/// runs of ties, such as zeros) is ranked whole.
pub struct DellaRows {
    density: f64,
    epsilon: f64,
    seed: u64,
    k: usize,
    order: MagnitudeOrder,
    /// Per rank, for rows of `limits.len()`: the draws below it keep the element.
    limits: Vec<u64>,
    /// Whether `limits` never falls as the rank rises (what the bounds rely on).
    rising: bool,
    /// Each element's magnitude bucket.
    bins: Vec<u16>,
    /// Per bucket (and one past the last): its lowest rank, the number of elements in the
    /// buckets below it. 2^16 entries, of which the row's buckets use the first.
    starts: Vec<u32>,
    /// Per rank (and one past the last): the coarse limits bucket bounds are made of (see
    /// `crate::kernels::BucketDraws`).
    coarse_lowest: Vec<u32>,
    coarse_highest: Vec<u32>,
    /// Each element's coarse draw: its top bits, `draw53 >> COARSE`.
    draws: Vec<u32>,
    /// One bit per element its bucket leaves undecided.
    open: Vec<u64>,
    /// The elements whose bucket leaves them undecided.
    undecided: Vec<usize>,
    /// Where the row's bins hold an undecided element's bucket, one bit each.
    hits: Vec<u64>,
    scratch: crate::kernels::KeepScratch,
}

impl DellaRows {
    /// Buckets over a row of n: 2^(⌈log2 n⌉ + this) (at most 2^`MAX_BUCKET_BITS`). More
    /// buckets leave fewer elements undecided but make the tables larger.
    const BUCKET_BITS_OVER_N: i32 = -2;
    const MAX_BUCKET_BITS: u32 = 14;
    /// Above this many undecided elements, ranking the whole row is cheaper than counting
    /// one rank at a time (one pass over the row each).
    const MAX_UNDECIDED: usize = 8;
    /// Low bits the coarse draws and limits leave out: 53-bit draws and limits (at most
    /// 2^53) fit in 32 bits. A coarse draw below `lowest >> COARSE` is below `lowest`; one at
    /// or above `highest` rounded up is at or above `highest`; in between (2^-31 of the draws
    /// more than the exact bounds) is left to the exact ranking.
    const COARSE: u32 = 22;

    /// A 53-bit draw's top bits: what `kernels::top_draws` gives (53 − 22 = 31 bits).
    #[cfg(test)]
    fn coarse_draw(d: u64) -> u32 {
        (d >> Self::COARSE) as u32
    }

    /// A keep limit's top bits, rounded down (for `lowest`) or `up` (for `highest`).
    fn coarse_limit(l: u64, up: bool) -> u32 {
        let c = if up {
            l.div_ceil(1 << Self::COARSE)
        } else {
            l >> Self::COARSE
        };
        u32::try_from(c).unwrap_or(u32::MAX)
    }

    /// Masks for model `k` (its index in the merge: it picks the random stream) with its
    /// density and ε.
    pub fn new(density: f64, epsilon: f64, seed: u64, k: usize) -> Self {
        DellaRows {
            density,
            epsilon,
            seed,
            k,
            order: MagnitudeOrder::default(),
            limits: Vec::new(),
            rising: false,
            bins: Vec::new(),
            starts: Vec::new(),
            coarse_lowest: Vec::new(),
            coarse_highest: Vec::new(),
            draws: Vec::new(),
            open: Vec::new(),
            undecided: Vec::new(),
            hits: Vec::new(),
            scratch: Default::default(),
        }
    }

    /// The mask of one row whose first element is element `first` of the tensor.
    pub fn mask(&mut self, first: usize, row: &[f32], mask: &mut [bool]) {
        let n = row.len().min(mask.len());
        let (row, mask) = (&row[..n], &mut mask[..n]);
        if self.limits.len() != n {
            // `uniform < p` in integers, as `dare_mask` does, once per rank rather than
            // once per element (a NaN probability keeps nothing, as the float comparison).
            self.limits = (0..n)
                .map(|r| {
                    let p = della_probability(self.density, self.epsilon, r, n);
                    (p as f64 * (1u64 << 53) as f64).ceil() as u64
                })
                .collect();
            self.rising = self.limits.windows(2).all(|w| w[0] <= w[1]);
            // The coarse limits a bucket of ranks `at..end` is bounded by: the lowest at
            // `at`, the highest at `end − 1` (see `COARSE`); n + 1 entries each, so every
            // `at` and `end` of a bucket indexes them.
            let limits = &self.limits;
            self.coarse_lowest = (0..=n)
                .map(|r| limits.get(r).map_or(0, |&l| Self::coarse_limit(l, false)))
                .collect();
            self.coarse_highest = (0..=n)
                .map(|e| {
                    let l = e.checked_sub(1).and_then(|r| limits.get(r));
                    l.map_or(0, |&l| Self::coarse_limit(l, true))
                })
                .collect();
        }
        if self.rising && self.mask_by_bounds(first, row, mask) {
            return;
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

    /// The mask from the bucket bounds, ranking the few undecided elements by counting;
    /// false (the mask unfinished) when too many are undecided.
    fn mask_by_bounds(&mut self, first: usize, row: &[f32], mask: &mut [bool]) -> bool {
        if row.is_empty() {
            return true;
        }
        let (seed, k) = (self.seed, self.k);
        let key = magnitude_key;
        let KeyRange { min_nz, max, .. } = KeyRange::of(row);
        // Zero is bucket 0 alone; nonzero keys count from 1 at the smallest, and buckets
        // `2^shift` keys wide hold them from bucket 1 (branchless: zero saturates to 0).
        // The last bucket is at most 2^wanted.
        let wanted = (row.len().next_power_of_two().trailing_zeros() as i32
            + Self::BUCKET_BITS_OVER_N)
            .clamp(0, Self::MAX_BUCKET_BITS as i32) as u32;
        let top = max.saturating_sub(min_nz);
        let shift = (u32::BITS - top.leading_zeros()).saturating_sub(wanted);
        let round = (1u32 << shift) - 1;
        let bucket = move |k: u32| ((k.saturating_sub(min_nz) + round) >> shift) as u16;
        let buckets = usize::from(bucket(max)) + 1;

        // Filled by `extend` (no zeroing first: these are written once per element).
        let bins = &mut self.bins;
        bins.clear();
        crate::kernels::vectorized(
            #[inline(always)]
            || bins.extend(row.iter().map(|&x| bucket(key(x)))),
        );
        // Each bucket's count, then where its ranks start (n at the end).
        // A table for every u16, so the counts need no bounds checks (a quarter faster);
        // only the buckets' entries are used, and cleared.
        if self.starts.len() != 1 << 16 {
            self.starts = vec![0; 1 << 16];
        }
        let Ok(starts) = <&mut [u32; 1 << 16]>::try_from(&mut self.starts[..]) else {
            return false;
        };
        let bins = &bins[..];
        starts[..=buckets].fill(0);
        for &b in bins {
            starts[usize::from(b)] += 1;
        }
        let starts = &mut starts[..=buckets];
        let mut at = 0u32;
        for s in starts.iter_mut() {
            (*s, at) = (at, at + *s);
        }
        let starts = &*starts;
        let n = row.len();
        let (lowest, highest) = (&self.coarse_lowest[..], &self.coarse_highest[..]);
        let limits = &self.limits[..];
        let limit = |rank: usize| limits.get(rank).copied().unwrap_or(0);

        let draws = &mut self.draws;
        draws.resize(n, 0);
        crate::kernels::top_draws(stream(seed, k), first as u64, draws);
        let open = &mut self.open;
        open.clear();
        open.resize(n.div_ceil(64), 0);
        let bucketed = crate::kernels::BucketDraws {
            draws,
            bins,
            starts,
            lowest,
            highest,
            // Rising limits: no bucket's bounds are outside the row's (both tables have
            // n + 1 entries, made with `limits`).
            row: crate::kernels::bucket_bounds(
                lowest.first().copied().unwrap_or(0),
                highest.get(n).copied().unwrap_or(0),
            ),
        };
        crate::kernels::bounded_keep(&bucketed, mask, open, &mut self.scratch);
        let undecided = &mut self.undecided;
        undecided.clear();
        for (w, &word) in open.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                undecided.push(w * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
        if undecided.len() > Self::MAX_UNDECIDED {
            return false;
        }
        // The stable rank: every smaller key, and the equal ones before j. Buckets rise with
        // the key, so the elements of lower buckets are all smaller and those of higher ones
        // all larger: only bucket bj's need their keys compared. They are found as bits
        // (a vectorized compare of the bins), so only they are visited.
        let hits = &mut self.hits;
        hits.resize(n.div_ceil(64), 0);
        for &j in undecided.iter() {
            let (bj, kj) = (bins[j], key(row[j]));
            crate::kernels::equal_bits(bins, bj, hits);
            let mut rank = starts[usize::from(bj)] as usize;
            for (w, &word) in hits.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let i = w * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let ki = key(row[i]);
                    rank += usize::from(ki < kj || (ki == kj && i < j));
                }
            }
            mask[j] = draw53(seed, k, first + j) < limit(rank);
        }
        true
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
            let mut della = DellaRows::new(p.density, p.epsilon, seed, k);
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

    /// Rows for the DELLA mask tests: many ties, f16 deltas of normal weights, f16 deltas a
    /// third of them zero, special values (NaN, infinities, signed zeros, subnormals, f32),
    /// and all zeros.
    fn della_rows() -> Vec<(&'static str, Vec<f32>)> {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut uniform = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let f16 = |x: f32| half::f16::from_f32(x).to_f32();
        let normal: Vec<f32> = (0..5120)
            .map(|_| f16((0..4).map(|_| uniform()).sum::<f32>() * 0.05))
            .collect();
        let specials = [
            f32::NAN,
            f32::INFINITY,
            -0.0,
            0.0,
            1e-40,
            -f32::INFINITY,
            3.5,
        ];
        vec![
            (
                "ties",
                (0..1001)
                    .map(|i| ((i * 7919 % 613) as f32 - 306.0) * 1.37e-3)
                    .collect(),
            ),
            ("f16 deltas", normal.clone()),
            (
                "a third zeros",
                normal
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| if i % 3 == 0 { 0.0 } else { x })
                    .collect(),
            ),
            (
                "specials",
                (0..1037)
                    .map(|i| specials.get(i % 41).copied().unwrap_or(uniform()))
                    .collect(),
            ),
            ("zeros", vec![0.0; 300]),
        ]
    }

    /// The coarse compares `bounded_keep` makes keep or drop only draws the exact 53-bit
    /// compares keep or drop.
    #[test]
    fn coarse_draws_and_limits_decide_only_what_the_exact_ones_do() {
        // Draws below 2^53, limits up to 2^53 and beyond (probabilities over 1), at and
        // around multiples of the dropped bits.
        let unit = 1u64 << DellaRows::COARSE;
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        let mut values: Vec<u64> = (0..2000)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s >> 11
            })
            .collect();
        for m in [0u64, 1, 2, 1 << 20, (1 << 31) - 1, 1 << 31] {
            for e in [0, 1, unit - 1] {
                values.push((m * unit).wrapping_add(e));
                values.push((m * unit).wrapping_sub(e));
            }
        }
        values.extend([1 << 53, (1 << 53) + 1, 1 << 54, u64::MAX >> 1]);
        for &d in values.iter().filter(|&&d| d < 1 << 53) {
            for &l in &values {
                let c = DellaRows::coarse_draw(d);
                if c < DellaRows::coarse_limit(l, false) {
                    assert!(d < l, "kept {d} against {l}");
                }
                if c >= DellaRows::coarse_limit(l, true) {
                    assert!(d >= l, "dropped {d} against {l}");
                }
            }
        }
    }

    /// The coarse draws the masks use are the top bits of the exact ones, under every
    /// kernel set, wherever a run starts.
    #[test]
    fn coarse_draws_are_the_top_bits_of_the_draws() {
        for k in crate::kernels::available() {
            for (first, len) in [
                (0usize, 1usize),
                (3, 37),
                (1 << 40, 1031),
                (usize::MAX - 20, 20),
            ] {
                let mut got = vec![0u32; len];
                (k.top_draws)(stream(9, 2), first as u64, &mut got);
                let want: Vec<u32> = (0..len)
                    .map(|e| DellaRows::coarse_draw(draw53(9, 2, first + e)))
                    .collect();
                assert_eq!(got, want, "{} from {first}", k.name);
            }
        }
    }

    /// Each rank's integer limit keeps exactly the draws the float comparison
    /// `uniform < della_probability` keeps, whichever way the row is decided (bucket
    /// bounds, counted ranks, or the whole row ranked): over densities and epsilons that
    /// put the probabilities below 0, above 1, at NaN, falling with the rank (ε < 0), on
    /// one-element rows (0/0) and on rows ending inside a 64-element word.
    #[test]
    fn della_mask_matches_the_probability_draw() {
        let mut order = MagnitudeOrder::default();
        for (kind, row) in della_rows() {
            for (density, epsilon) in [
                (0.5, 0.1),
                (0.3, 0.3),
                (0.05, 0.2),
                (0.9, 0.2),
                (0.5, -0.1),
                (0.5, f64::NAN),
                (0.5, 0.0),
            ] {
                let mut della = DellaRows::new(density, epsilon, 11, 3);
                for len in [1usize, 2, 63, 65, row.len()] {
                    let row = &row[..len.min(row.len())];
                    let mut mask = vec![false; row.len()];
                    della.mask(40, row, &mut mask);
                    let ranks = order.ranks(row).to_vec();
                    let kept: Vec<bool> = (0..row.len())
                        .map(|j| {
                            let p =
                                della_probability(density, epsilon, ranks[j] as usize, row.len());
                            uniform(11, 3, 40 + j) < p as f64
                        })
                        .collect();
                    assert_eq!(
                        mask,
                        kept,
                        "{kind}: density {density}, epsilon {epsilon}, len {}",
                        row.len()
                    );
                }
            }
        }
    }

    /// The tests above see every way of deciding: bucket bounds with elements left to count
    /// (f16 deltas), and too many left (a third zeros: one bucket of thousands), which ranks
    /// the whole row.
    #[test]
    fn della_rows_take_each_way() {
        let rows = della_rows();
        let row = |name: &str| {
            rows.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, r)| r.clone())
        };
        let (Some(normal), Some(zeros)) = (row("f16 deltas"), row("a third zeros")) else {
            panic!("missing test rows");
        };
        let mut della = DellaRows::new(0.5, 0.1, 11, 3);
        let mut mask = vec![false; normal.len()];
        della.mask(0, &normal, &mut mask); // sets the limits for this length
        let mut counted = 0;
        for first in (0..20).map(|r| r * 5120) {
            assert!(della.mask_by_bounds(first, &normal, &mut mask));
            counted += della.undecided.len();
        }
        assert!(counted > 0, "no element was left to count");
        assert!(!della.mask_by_bounds(0, &zeros, &mut mask));
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
