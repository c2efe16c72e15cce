//! Scalar reference kernels: the definition every SIMD kernel is tested against.
//!
//! Rounding is IEEE round-to-nearest-even everywhere. f32→bf16 sends every NaN to 0x7FC0 as
//! PyTorch's `c10::BFloat16` does; f16 conversions follow the `half` crate, which matches the
//! F16C instructions bit for bit (quiet NaNs keep their top payload bits). No fused
//! multiply-add anywhere: the references we reproduce round between operations. A NaN
//! produced by arithmetic is a NaN; its payload and sign are not part of the contract (they
//! depend on operand order, which compilers may swap).

use half::f16;

#[inline]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    f16::from_bits(h).to_f32()
}

#[inline]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

#[inline]
pub fn bf16_bits_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[inline]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7FC0;
    }
    let b = x.to_bits();
    let rounding_bias = 0x7FFF + ((b >> 16) & 1);
    ((b + rounding_bias) >> 16) as u16
}

pub fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f16_bits_to_f32(s);
    }
}

pub fn bf16_to_f32(src: &[u16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16_bits_to_f32(s);
    }
}

pub fn f32_to_f16(src: &[f32], dst: &mut [u16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32_to_f16_bits(s);
    }
}

pub fn f32_to_bf16(src: &[f32], dst: &mut [u16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32_to_bf16_bits(s);
    }
}

/// BlockMerge's fp16 blend: `f16(f16(a·wa) + f16(b·wb))`, each product and the sum computed
/// in f32 and rounded to fp16, as PyTorch does for fp16 tensors on the CPU.
pub fn blend_f16(a: &[u16], b: &[u16], wa: f32, wb: f32, dst: &mut [u16]) {
    for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        let px = f16_bits_to_f32(f32_to_f16_bits(f16_bits_to_f32(x) * wa));
        let py = f16_bits_to_f32(f32_to_f16_bits(f16_bits_to_f32(y) * wb));
        *d = f32_to_f16_bits(px + py);
    }
}

/// `dst = a·wa + b·wb` in f32, each product rounded (no FMA).
pub fn blend_f32(a: &[f32], b: &[f32], wa: f32, wb: f32, dst: &mut [f32]) {
    for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        let px = x * wa;
        let py = y * wb;
        *d = px + py;
    }
}

/// `dst += delta·s`, the product rounded before the add (PyTorch's `W += Δ * s`).
pub fn add_scaled(dst: &mut [f32], delta: &[f32], s: f32) {
    for (d, &x) in dst.iter_mut().zip(delta) {
        let p = x * s;
        *d += p;
    }
}

/// `acc = fma(x, w, acc)`: PyTorch's `addcmul_` on the CPU is a fused multiply-add.
pub fn fma_acc(acc: &mut [f32], x: &[f32], w: f32) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a = v.mul_add(w, *a);
    }
}

/// Round f32 values to fp16 precision in place.
pub fn round_f16(v: &mut [f32]) {
    for x in v {
        *x = f16_bits_to_f32(f32_to_f16_bits(*x));
    }
}

/// Round f32 values to bf16 precision in place.
pub fn round_bf16(v: &mut [f32]) {
    for x in v {
        *x = bf16_bits_to_f32(f32_to_bf16_bits(*x));
    }
}

/// DELLA's draws and their magnitude buckets, with the keep limits at each rank: the
/// inputs of [`bounded_keep`]. The draws and limits are coarse (the top bits of the exact
/// ones). Bucket b holds the ranks `starts[b]..starts[b + 1]`; a draw in it below the
/// limit at its lowest rank is kept whatever its rank, and one at or above the limit at its
/// highest rank is dropped.
#[derive(Clone, Copy)]
pub struct BucketDraws<'a> {
    pub draws: &'a [u32],
    pub bins: &'a [u16],
    /// Per bucket, and one past the last: its lowest rank.
    pub starts: &'a [u32],
    /// Per rank r: the limit at r, rounded down (its entries are the buckets' lowest).
    pub lowest: &'a [u32],
    /// Per rank r + 1: the limit at r, rounded up (entries at the buckets' ends).
    pub highest: &'a [u32],
    /// The row's bounds, [`bucket_bounds`]-packed: a draw below its `lowest` is kept and one
    /// at or above its `highest` dropped whatever its bucket, so only the draws between
    /// them (about 2ε of a row) need their bucket's bounds.
    pub row: u64,
}

/// Bounds packed in one word: `highest << 32 | lowest`.
pub fn bucket_bounds(lowest: u32, highest: u32) -> u64 {
    u64::from(highest) << 32 | u64::from(lowest)
}

impl BucketDraws<'_> {
    /// How many elements [`bounded_keep`] decides: the common length of the per-element
    /// slices (`open` holds 64 a word).
    pub fn len(&self, keep: &[bool], open: &[u64]) -> usize {
        self.draws
            .len()
            .min(self.bins.len())
            .min(keep.len())
            .min(open.len().saturating_mul(64))
    }

    /// The same draws from element `at` on (tables whole).
    pub fn from(&self, at: usize) -> Self {
        BucketDraws {
            draws: self.draws.get(at..).unwrap_or_default(),
            bins: self.bins.get(at..).unwrap_or_default(),
            ..*self
        }
    }

    /// Bucket `bin`'s bounds `(lowest, highest)`: the bucket clamped to the last one, its
    /// starts to the tables' last entries; (0, 0) without buckets or limits.
    pub fn bounds(&self, bin: u16) -> (u32, u32) {
        let b = usize::from(bin).min(self.starts.len().saturating_sub(2));
        let (Some(&at), Some(&end)) = (self.starts.get(b), self.starts.get(b + 1)) else {
            return (0, 0);
        };
        let limit = |table: &[u32], i: u32| {
            let i = (i as usize).min(table.len().saturating_sub(1));
            table.get(i).copied().unwrap_or(0)
        };
        (limit(self.lowest, at), limit(self.highest, end))
    }
}

/// Working memory of [`bounded_keep`]'s SIMD kernels, kept from one row to the next so they
/// do not allocate (the reference needs none).
#[derive(Default)]
pub struct KeepScratch {
    /// The packed draws (those between the row's bounds) and their buckets.
    pub(super) draws: Vec<u32>,
    pub(super) bins: Vec<u32>,
    /// Their decisions, 8 a byte in packed order: kept, and left open.
    pub(super) kept: Vec<u8>,
    pub(super) open: Vec<u8>,
    /// Per 64 elements, those the row's bounds keep.
    pub(super) words: Vec<u64>,
}

/// Draws decided by the row's bounds, then per-bucket bounds (DELLA's masks): element j is
/// kept when `draws[j]` is below the row's `lowest`, dropped when it is at or above the
/// row's `highest`, and otherwise decided by the bounds `(lowest, highest)` of its bucket
/// `bins[j]` ([`BucketDraws::bounds`]): kept when `draws[j] < lowest`; when it is not but
/// `draws[j] < highest`, bit j of `open` is set (its bucket cannot decide it). Every word
/// of `open` holding an element is overwritten.
pub fn bounded_keep(
    x: &BucketDraws<'_>,
    keep: &mut [bool],
    open: &mut [u64],
    _scratch: &mut KeepScratch,
) {
    let n = x.len(keep, open);
    open[..n.div_ceil(64)].fill(0);
    let (row_lo, row_hi) = (x.row as u32, (x.row >> 32) as u32);
    for j in 0..n {
        let d = x.draws[j];
        if d < row_lo || d >= row_hi {
            keep[j] = d < row_lo;
            continue;
        }
        let (lo, hi) = x.bounds(x.bins[j]);
        keep[j] = d < lo;
        open[j / 64] |= u64::from(!keep[j] & (d < hi)) << (j % 64);
    }
}

/// The odd constant SplitMix64 steps its counter by (2⁶⁴ over the golden ratio).
pub const SPLITMIX_STEP: u64 = 0x9E37_79B9_7F4A_7C15;
/// SplitMix64's two finalizer multipliers.
pub const SPLITMIX_MUL: [u64; 2] = [0xBF58_476D_1CE4_E5B9, 0x94D0_49BB_1331_11EB];

/// The random stream behind DARE's and DELLA's masks: SplitMix64's output for counter `i` of
/// `stream` (a seed salted per model). Counter-based, so any run of a tensor's elements can
/// be drawn on its own, in any pass, with the same result.
#[inline(always)]
pub fn splitmix(stream: u64, i: u64) -> u64 {
    let mut z = stream ^ i.wrapping_mul(SPLITMIX_STEP);
    z = (z ^ (z >> 30)).wrapping_mul(SPLITMIX_MUL[0]);
    z = (z ^ (z >> 27)).wrapping_mul(SPLITMIX_MUL[1]);
    z ^ (z >> 31)
}

/// The top 31 bits of the draws for counters `first..` (DELLA's coarse draws: the 53-bit
/// draw `splitmix >> 11`, shifted right by 22 more).
pub fn top_draws(stream: u64, first: u64, out: &mut [u32]) {
    for (e, d) in out.iter_mut().enumerate() {
        *d = (splitmix(stream, first.wrapping_add(e as u64)) >> 33) as u32;
    }
}

/// Bits `first..first + out.len()` of `bits` (64 a word, low bit first) as bools: how a
/// mask kept as bits between passes is read back. Bits past `bits` read as false.
pub fn spread_bits(bits: &[u64], first: usize, out: &mut [bool]) {
    for (e, o) in out.iter_mut().enumerate() {
        let bit = first + e;
        *o = bits.get(bit / 64).is_some_and(|w| w >> (bit % 64) & 1 == 1);
    }
}

/// Where `v` holds `x`: bit i of `bits` (64 a word) for `v[i]`. Every word holding an
/// element is overwritten. (DELLA finds the few elements of a bucket this way.)
pub fn equal_bits(v: &[u16], x: u16, bits: &mut [u64]) {
    let n = v.len().min(bits.len().saturating_mul(64));
    for (word, chunk) in bits.iter_mut().zip(v[..n].chunks(64)) {
        *word = (0..)
            .zip(chunk)
            .fold(0, |m, (i, &b)| m | u64::from(b == x) << i);
    }
}

/// Whether each 53-bit draw for counters `first..` is below `limit` (DARE's keep: a draw
/// `m / 2⁵³` below the density).
pub fn draws_below(stream: u64, first: u64, limit: u64, keep: &mut [bool]) {
    for (e, k) in keep.iter_mut().enumerate() {
        *k = splitmix(stream, first.wrapping_add(e as u64)) >> 11 < limit;
    }
}
