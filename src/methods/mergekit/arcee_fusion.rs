//! `arcee_fusion`: take the other model's value only where it matters most. The importance of
//! an element is `|other − base|` times the KL divergence of the softmaxes of its row (along
//! the last dimension) in the two models; elements whose importance reaches
//! `median + 1.5·(q3 − q1)` of all importances take the other model's value, the rest keep
//! the base's.

use std::sync::Arc;

use super::arith::D;
use super::method::{
    Capability, InputCount, MergeMethod, Param, PrepareError, Resolved, TensorMerge,
};
use super::nearswap::exactly_two;
use super::stream::{RadixSelect, StreamCtx, from_order_key, order_key};
use crate::dtype::DType;
use crate::error::Result;

pub struct ArceeFusion;

impl MergeMethod for ArceeFusion {
    fn name(&self) -> &'static str {
        "arcee_fusion"
    }

    fn params(&self) -> &'static [Param] {
        &[]
    }

    fn needs_base(&self) -> bool {
        true
    }

    fn check_inputs(&self, n: InputCount) -> std::result::Result<(), String> {
        exactly_two("arcee_fusion", n)
    }

    /// A float32 factor (the mask) promotes a float16/bfloat16 result to float32, and
    /// mergekit writes it so.
    fn result_dtype(&self, compute: DType) -> DType {
        match compute {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        }
    }

    fn prepare(&self, p: &Resolved) -> std::result::Result<Arc<dyn TensorMerge>, PrepareError> {
        let base = p.base.unwrap_or(0);
        Ok(Arc::new(FusionMerge {
            base,
            other: (0..p.inputs).find(|&i| i != base).unwrap_or(base),
            last_dim: p.shape.last().map(|&n| n as usize),
        }))
    }
}

#[derive(Debug)]
struct FusionMerge {
    base: usize,
    other: usize,
    /// The softmax runs along the last dimension (the whole tensor when 1-D).
    last_dim: Option<usize>,
}

/// `softmax(x) + 1e-8` of one row, as ATen's AVX2 `_vec_softmax_lastdim` computes it in f32
/// (also for f16/bf16 inputs): `exp(x − max)` with SLEEF's `expf_u10` (not the MKL exp behind
/// `torch.exp`), summed in 8 lanes, times the reciprocal of the sum. Bit for bit with torch
/// 2.15 under AVX2 dispatch, which golden2 was made with; torch on an AVX-512 CPU sums in 16
/// lanes, which moves the KL of many rows and flips a few elements of the mask.
fn softmax_eps(row: &[f32], d: D) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, |m, x| {
        if x > m || x.is_nan() { x } else { m }
    });
    let e: Vec<f32> = row.iter().map(|&x| sleef_expf(x - max)).collect();
    let inv = 1.0 / lane_sum(&e);
    let mut p: Vec<f32> = e.iter().map(|&x| x * inv).collect();
    d.q(&mut p);
    d.map(&p, |x| x + 1e-8)
}

/// SLEEF 3's `xexpf` (the u10 single-precision exp), with fused multiply-adds as its AVX-512
/// build has them.
fn sleef_expf(d: f32) -> f32 {
    // ln 2 split in two (SLEEF's L2Uf, L2Lf), by their bits.
    let l2u = f32::from_bits(0x3f31_7200);
    let l2l = f32::from_bits(0x35bf_be8e);
    let q = (d * std::f32::consts::LOG2_E).round_ties_even() as i32;
    let qf = q as f32;
    let s = qf.mul_add(-l2u, d);
    let s = qf.mul_add(-l2l, s);
    let mut u = 0.000_198_527_62_f32;
    for c in [
        0.001_393_043_6_f32,
        0.008_333_361,
        0.041_666_485,
        0.166_666_67,
        0.5,
    ] {
        u = u.mul_add(s, c);
    }
    let u = 1.0 + (s * s).mul_add(u, s);
    // vldexp2: two half steps, so an exponent of up to ±254 stays representable.
    let pow2i = |e: i32| f32::from_bits((e.wrapping_add(0x7f) as u32) << 23);
    let u = u * pow2i(q >> 1) * pow2i(q.wrapping_sub(q >> 1));
    if d < -104.0 {
        0.0
    } else if d > 1e38 {
        f32::INFINITY
    } else {
        u
    }
}

/// ATen's `vec::reduce_all` sum over AVX2's `Vectorized<float>` of 8 lanes: lane-wise over whole
/// vectors, the tail into the first lanes, then the lanes folded in halves; rows shorter
/// than a vector are summed in order.
fn lane_sum(v: &[f32]) -> f32 {
    const L: usize = 8;
    if v.len() < L {
        return v.iter().fold(0.0, |a, &x| a + x);
    }
    let mut acc = [0f32; L];
    acc.copy_from_slice(&v[..L]);
    let mut chunks = v[L..].chunks_exact(L);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a += x;
    }
    let mut half = L / 2;
    while half > 0 {
        for i in 0..half {
            acc[i] += acc[i + half];
        }
        half /= 2;
    }
    acc[0]
}

/// The quantile positions `(q · (n − 1)).long()` of q = 0.25, 0.5, 0.75 (a float32 product).
/// mergekit samples 1M elements at random from larger tensors; the exact quantiles are used
/// here instead (its sample is not reproducible outside torch's generator).
fn quantile_ranks(n: u64) -> [u64; 3] {
    let m = n.saturating_sub(1) as f32;
    [0.25f32, 0.5, 0.75].map(|q| (q * m) as u64)
}

impl FusionMerge {
    /// The importance of each element of whole last-dimension rows.
    fn importance(&self, x: &[f32], b: &[f32], d: D) -> Vec<f32> {
        let cols = self.last_dim.filter(|&c| c > 0).unwrap_or(x.len()).max(1);
        let mut out = Vec::with_capacity(x.len());
        for (xr, br) in x.chunks(cols).zip(b.chunks(cols)) {
            let p = softmax_eps(xr, d);
            let q = softmax_eps(br, d);
            let ratio = d.zip(&p, &q, |a, c| a / c);
            // Correctly rounded; torch's log differs in the last bit for ~0.3% of values near
            // 1, which moves a row's KL by a few ulps but the mask only for an element within
            // those ulps of the threshold (none in golden2).
            let log = d.map(&ratio, |r| (r as f64).ln() as f32);
            let kl = d.sum(&d.zip(&p, &log, |a, l| a * l));
            let diff = d.zip(xr, br, |a, c| (a - c).abs());
            out.extend(d.map(&diff, |v| v * kl));
        }
        out
    }

    fn keys(&self, xs: &[Vec<f32>], d: D) -> Vec<u32> {
        self.importance(&xs[self.other], &xs[self.base], d)
            .into_iter()
            .map(order_key)
            .collect()
    }

    /// `median + 1.5·(q3 − q1)` from the quantiles' keys.
    fn threshold(rs: &RadixSelect, d: D) -> f32 {
        let v: Vec<f32> = rs
            .result()
            .iter()
            .map(|r| from_order_key(r.key))
            .collect();
        let (q1, median, q3) = (v[0], v[1], v[2]);
        d.qs(median + d.qs(1.5 * d.qs(q3 - q1)))
    }

    /// `base + (other − base) · mask`: the mask is float32, so for f16/bf16 the product and
    /// the sum are float32 and the result is rounded only to the output dtype.
    fn apply(&self, xs: &[Vec<f32>], threshold: f32, d: D) -> Vec<f32> {
        let (x, b) = (&xs[self.other], &xs[self.base]);
        let imp = self.importance(x, b, d);
        let delta = d.zip(x, b, |a, c| a - c);
        b.iter()
            .zip(&delta)
            .zip(&imp)
            .map(|((&bv, &dv), &i)| bv + dv * if i >= threshold { 1.0 } else { 0.0 })
            .collect()
    }
}

impl TensorMerge for FusionMerge {
    /// Softmaxes, importance, mask and the result: 3.06 copies at 4M elements, 4.0 at 256K
    /// (measured by `tests/method_memory`).
    fn copies_per_operand(&self) -> u64 {
        5
    }

    fn capability(&self) -> Capability {
        Capability::Streamed
    }

    fn merge(&self, xs: &[Vec<f32>], _rows: usize, _cols: usize, d: D) -> Vec<f32> {
        let keys = self.keys(xs, d);
        let mut rs = RadixSelect::new();
        rs.count(&keys);
        rs.target(&quantile_ranks(keys.len() as u64));
        rs.refine(&keys);
        self.apply(xs, Self::threshold(&rs, d), d)
    }

    /// Three passes: the importances' quantiles (two, radix select) and the output. The
    /// importance is row-local, so every chunk of whole rows computes its own.
    fn stream(&self, ctx: &StreamCtx<'_>, d: D) -> Result<()> {
        let mut rs = RadixSelect::new();
        ctx.pass(|_, xs| {
            rs.count(&self.keys(&xs, d));
            Ok(())
        })?;
        rs.target(&quantile_ranks(ctx.rows * ctx.cols as u64));
        ctx.pass(|_, xs| {
            rs.refine(&self.keys(&xs, d));
            Ok(())
        })?;
        let threshold = Self::threshold(&rs, d);
        ctx.pass(|rows, xs| ctx.emit(rows, &self.apply(&xs, threshold, d)))
    }
}
