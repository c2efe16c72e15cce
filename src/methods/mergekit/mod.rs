//! mergekit's merge methods, numerically as mergekit 0.1.5 computes them with PyTorch.
//!
//! `linear` and `slerp` compute in f32 and round to the compute dtype D once. Every other
//! method runs its elementwise operations in D — each result rounded to D, which is what
//! PyTorch does for f16/bf16 tensors — while reductions accumulate in f32 in PyTorch's order
//! (`torch_compat`) and round once. For D = f32 all of this is plain f32 arithmetic.
//! Operands arrive already rounded to the config's `dtype` (mergekit casts at load).
//!
//! This module holds the whole-tensor versions (exact); `streamed` runs the methods that
//! need whole-tensor statistics in passes over row chunks when a tensor is too large to hold.

pub mod streamed;

use crate::dtype::DType;
use crate::kernels::bytes::round_to;
use crate::methods::torch_compat as tc;
use crate::plan::mergekit::{InputParams, MergekitRecipe, MethodKind, Sparsify};

/// Arithmetic in the compute dtype D: every result rounded to D.
#[derive(Clone, Copy)]
pub(crate) struct D(pub DType);

impl D {
    pub(crate) fn q(self, v: &mut [f32]) {
        round_to(self.0, v);
    }
    pub(crate) fn qs(self, x: f32) -> f32 {
        let mut a = [x];
        round_to(self.0, &mut a);
        a[0]
    }
    pub(crate) fn sum(self, x: &[f32]) -> f32 {
        self.qs(match self.0 {
            DType::F16 => tc::sum_f16(x),
            DType::BF16 => tc::sum_bf16(x),
            _ => tc::sum_f32(x),
        })
    }
    pub(crate) fn norm(self, x: &[f32]) -> f32 {
        self.qs(match self.0 {
            DType::F16 => tc::norm_f16(x),
            DType::BF16 => tc::norm_bf16(x),
            _ => tc::norm_f32(x),
        })
    }
    /// `torch.stack(xs).sum(0)`: f32 accumulation in PyTorch's order, rounded to D.
    pub(crate) fn outer_sum(self, xs: &[&[f32]]) -> Vec<f32> {
        let mut out = vec![0f32; xs.first().map_or(0, |x| x.len())];
        tc::outer_sum_f32(xs, &mut out);
        self.q(&mut out);
        out
    }
    // PyTorch uses MKL's vsAcos/vsSin on f32; correctly rounded values differ from them in
    // the last bit now and then (a handful of elements per 100k in slerp/nuslerp).
    pub(crate) fn acos(self, x: f32) -> f32 {
        self.qs((x as f64).acos() as f32)
    }
    pub(crate) fn sin(self, x: f32) -> f32 {
        self.qs((x as f64).sin() as f32)
    }
    /// Elementwise `f(a, b)`, rounded to D.
    pub(crate) fn zip(self, a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> Vec<f32> {
        let mut v: Vec<f32> = a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect();
        self.q(&mut v);
        v
    }
    pub(crate) fn map(self, a: &[f32], f: impl Fn(f32) -> f32) -> Vec<f32> {
        let mut v: Vec<f32> = a.iter().map(|&x| f(x)).collect();
        self.q(&mut v);
        v
    }
}

/// Merge the operands (each `rows × cols` values, row-major) into the output values, in D
/// precision (the caller encodes them to the output dtype).
pub fn merge(r: &MergekitRecipe, xs: &[Vec<f32>], rows: usize, cols: usize) -> Vec<f32> {
    let d = D(r.compute);
    match r.kind {
        MethodKind::Linear => linear(r, xs, d),
        MethodKind::Slerp => slerp(r, xs, d),
        MethodKind::NuSlerp => nuslerp(r, xs, rows, cols, d),
        MethodKind::ModelStock => model_stock(r, xs, rows, cols, d),
        MethodKind::Passthrough => match r.inputs[0].scale {
            None => xs[0].clone(),
            Some(s) => d.map(&xs[0], |x| x * s as f32),
        },
        MethodKind::TaskArithmetic {
            consensus,
            sparsify,
        } => task_arithmetic(r, xs, rows, cols, d, consensus, sparsify),
    }
}

/// `Σ fma(x_i, w_i)` in config order (`addcmul_` is fused on the CPU), divided by the f32
/// sum of the weights.
fn linear(r: &MergekitRecipe, xs: &[Vec<f32>], d: D) -> Vec<f32> {
    let w: Vec<f32> = r.inputs.iter().map(|p| p.weight as f32).collect();
    let mut acc = vec![0f32; xs[0].len()];
    for (x, &wi) in xs.iter().zip(&w) {
        crate::kernels::fma_acc(&mut acc, x, wi);
    }
    if r.normalize {
        let den = tc::sum_f32(&w);
        for a in acc.iter_mut() {
            *a /= den;
        }
    }
    d.q(&mut acc);
    acc
}

/// Which operands slerp interpolates from (the base) and to.
pub(crate) fn slerp_pair(r: &MergekitRecipe) -> (usize, usize) {
    let b = r.base.unwrap_or(0);
    (b, if b == 0 { 1 } else { 0 })
}

/// Spherical interpolation from the base (v0) towards the other model (v1), whole tensor.
fn slerp(r: &MergekitRecipe, xs: &[Vec<f32>], d: D) -> Vec<f32> {
    let (i0, i1) = slerp_pair(r);
    let (v0, v1) = (&xs[i0], &xs[i1]);
    let na = slerp_norm(tc::norm_f32(v0));
    let nb = slerp_norm(tc::norm_f32(v1));
    let prod: Vec<f32> = v0
        .iter()
        .zip(v1.iter())
        .map(|(&a, &b)| (a / na) * (b / nb))
        .collect();
    let dot = tc::sum_f32(&prod).clamp(-1.0, 1.0);
    let (ca, cb) = slerp_coefficients(dot, r.t as f32);
    slerp_apply(ca, cb, v0, v1, d)
}

/// The norm slerp divides by: ‖v‖, or 1 for a (near) zero tensor.
pub(crate) fn slerp_norm(n: f32) -> f32 {
    if n <= 1e-8 { 1.0 } else { n }
}

/// slerp's coefficients of the unnormalized tensors, from the normalized dot product.
pub(crate) fn slerp_coefficients(dot: f32, t: f32) -> (f32, f32) {
    let one_t = 1.0f32 - t;
    if (dot as f64).abs() > 0.9995 {
        return (one_t, t);
    }
    let d = D(DType::F32);
    let theta = d.acos(dot);
    let s = d.sin(theta);
    (d.sin(one_t * theta) / s, d.sin(t * theta) / s)
}

/// `f32(ca·v0) + f32(cb·v1)`, rounded to D.
pub(crate) fn slerp_apply(ca: f32, cb: f32, v0: &[f32], v1: &[f32], d: D) -> Vec<f32> {
    let mut out: Vec<f32> = v0
        .iter()
        .zip(v1.iter())
        .map(|(&a, &b)| (ca * a) + (cb * b))
        .collect();
    d.q(&mut out);
    out
}

/// How nuslerp combines v0 and v1 once the cosine is known.
#[derive(Clone, Copy, Debug)]
pub(crate) enum NuCoeffs {
    /// Colinear: `(1−t)·v0 + t·v1`.
    Lerp(f32, f32),
    /// `(s0·v0 + s1·v1) / sin θ`.
    Slerp(f32, f32, f32),
}

/// nuslerp's interpolation weight from the two models' weights.
pub(crate) fn nuslerp_t(w0: f64, w1: f64) -> f64 {
    let total = w0 + w1;
    if total.abs() < 1e-6 { 0.5 } else { w1 / total }
}

pub(crate) fn nuslerp_coefficients(t: f64, c: f32, d: D) -> NuCoeffs {
    let one_t = (1.0 - t) as f32;
    let tt = t as f32;
    if d.qs(1.0 - d.qs(c * c)) <= d.qs(1e-16) {
        return NuCoeffs::Lerp(one_t, tt);
    }
    let theta = d.acos(c);
    let st = d.sin(theta);
    NuCoeffs::Slerp(d.sin(d.qs(one_t * theta)), d.sin(d.qs(tt * theta)), st)
}

pub(crate) fn nuslerp_apply(c: NuCoeffs, v0: &[f32], v1: &[f32], d: D) -> Vec<f32> {
    match c {
        NuCoeffs::Lerp(a0, a1) => {
            let a = d.map(v0, |x| a0 * x);
            let b = d.map(v1, |x| a1 * x);
            d.zip(&a, &b, |x, y| x + y)
        }
        NuCoeffs::Slerp(s0, s1, st) => {
            let a = d.map(v0, |x| s0 * x);
            let b = d.map(v1, |x| s1 * x);
            let sum = d.zip(&a, &b, |x, y| x + y);
            d.map(&sum, |x| x / st)
        }
    }
}

/// nuslerp's normalizing floor.
pub(crate) fn nuslerp_eps(d: D) -> f32 {
    d.qs(1e-7)
}

/// NuSLERP of one vector pair (mergekit's `nuslerp`), in D.
fn nuslerp_vec(t: f64, v0: &[f32], v1: &[f32], d: D) -> Vec<f32> {
    let eps = nuslerp_eps(d);
    let n0 = d.norm(v0).max(eps);
    let n1 = d.norm(v1).max(eps);
    let u0 = d.map(v0, |x| x / n0);
    let u1 = d.map(v1, |x| x / n1);
    let c = d.sum(&d.zip(&u0, &u1, |a, b| a * b)).clamp(-1.0, 1.0);
    nuslerp_apply(nuslerp_coefficients(t, c, d), v0, v1, d)
}

/// The two non-base operands of nuslerp.
pub(crate) fn nuslerp_pair(r: &MergekitRecipe, n: usize) -> (usize, usize) {
    let others: Vec<usize> = (0..n).filter(|&i| Some(i) != r.base).collect();
    (others[0], others[1])
}

fn nuslerp(r: &MergekitRecipe, xs: &[Vec<f32>], rows: usize, cols: usize, d: D) -> Vec<f32> {
    let (i0, i1) = nuslerp_pair(r, xs.len());
    let t = nuslerp_t(r.inputs[i0].weight, r.inputs[i1].weight);
    let (v0, v1) = match r.base {
        Some(b) => (
            d.zip(&xs[i0], &xs[b], |x, y| x - y),
            d.zip(&xs[i1], &xs[b], |x, y| x - y),
        ),
        None => (xs[i0].clone(), xs[i1].clone()),
    };
    let mut out = if r.row_wise {
        // Per column: gather, interpolate, scatter.
        let mut out = vec![0f32; rows * cols];
        for c in 0..cols {
            let a: Vec<f32> = (0..rows).map(|i| v0[i * cols + c]).collect();
            let b: Vec<f32> = (0..rows).map(|i| v1[i * cols + c]).collect();
            for (i, v) in nuslerp_vec(t, &a, &b, d).into_iter().enumerate() {
                out[i * cols + c] = v;
            }
        }
        out
    } else if !r.flatten {
        let mut out = Vec::with_capacity(rows * cols);
        for (a, b) in v0.chunks(cols.max(1)).zip(v1.chunks(cols.max(1))) {
            out.extend(nuslerp_vec(t, a, b, d));
        }
        out
    } else {
        nuslerp_vec(t, &v0, &v1, d)
    };
    if let Some(b) = r.base {
        out = d.zip(&xs[b], &out, |x, y| x + y);
    }
    out
}

fn model_stock(r: &MergekitRecipe, xs: &[Vec<f32>], rows: usize, cols: usize, d: D) -> Vec<f32> {
    let b = r.base.unwrap_or(0);
    if r.filter_wise {
        let mut out = Vec::with_capacity(rows * cols);
        for row in 0..rows {
            let span = row * cols..(row + 1) * cols;
            let sub: Vec<Vec<f32>> = xs.iter().map(|x| x[span.clone()].to_vec()).collect();
            out.extend(model_stock_vec(&sub, b, d));
        }
        out
    } else {
        model_stock_vec(xs, b, d)
    }
}

fn model_stock_vec(xs: &[Vec<f32>], b: usize, d: D) -> Vec<f32> {
    let w0 = &xs[b];
    let ws: Vec<&[f32]> = xs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != b)
        .map(|(_, x)| x.as_slice())
        .collect();
    let offs: Vec<Vec<f32>> = ws.iter().map(|w| d.zip(w, w0, |x, y| x - y)).collect();
    let mut cos = Vec::new();
    for i in 0..offs.len() {
        for j in i + 1..offs.len() {
            let dot = d.sum(&d.zip(&offs[i], &offs[j], |x, y| x * y));
            cos.push(model_stock_cos(d.norm(&offs[i]), d.norm(&offs[j]), dot, d));
        }
    }
    let t = model_stock_t(&cos, ws.len(), d);
    model_stock_apply(t, w0, &ws, d)
}

/// model_stock's cosine of two offsets from their norms and dot product.
pub(crate) fn model_stock_cos(norm_a: f32, norm_b: f32, dot: f32, d: D) -> f32 {
    let npd = d.qs(norm_a * norm_b);
    d.qs(dot / npd.max(d.qs(1e-6))).clamp(-1.0, 1.0)
}

/// t = N·cos / (1 + (N−1)·cos) from the mean pairwise cosine.
pub(crate) fn model_stock_t(cos: &[f32], n: usize, d: D) -> f32 {
    let ct = if cos.len() == 1 {
        cos[0]
    } else {
        d.qs(d.sum(cos) / cos.len() as f32)
    };
    let n = n as f32;
    let den = d.qs(1.0 + d.qs((n - 1.0) * ct));
    if (den as f64).abs() < 1e-6 {
        0.0
    } else {
        d.qs(d.qs(n * ct) / den)
    }
}

/// `t·mean(w_i) + (1−t)·w0`.
pub(crate) fn model_stock_apply(t: f32, w0: &[f32], ws: &[&[f32]], d: D) -> Vec<f32> {
    let n = ws.len() as f32;
    let mut avg = ws[0].to_vec();
    for w in &ws[1..] {
        avg = d.zip(&avg, w, |x, y| x + y);
    }
    let avg = d.map(&avg, |x| x / n);
    let one_t = d.qs(1.0 - t);
    let a = d.map(&avg, |x| t * x);
    let c = d.map(w0, |x| one_t * x);
    d.zip(&a, &c, |x, y| x + y)
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
pub(crate) fn della_probability(p: &InputParams, rank0: usize, n: usize) -> f32 {
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

#[allow(clippy::too_many_arguments)]
fn sparsify(
    kind: Sparsify,
    delta: Vec<f32>,
    p: &InputParams,
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
pub(crate) fn outlier_window(p: &InputParams, n: usize) -> (usize, usize) {
    let target = ((p.density * n as f64) as usize).min(n);
    let n_top = (p.gamma * n as f64) as usize;
    (n.saturating_sub(target + n_top), target)
}

#[allow(clippy::too_many_arguments)]
fn task_arithmetic(
    r: &MergekitRecipe,
    xs: &[Vec<f32>],
    rows: usize,
    cols: usize,
    d: D,
    consensus: bool,
    sparse: Sparsify,
) -> Vec<f32> {
    let b = r.base.unwrap_or(0);
    let base = &xs[b];
    let others: Vec<usize> = (0..xs.len()).filter(|&i| i != b).collect();
    if others.is_empty() {
        return base.clone();
    }
    let deltas: Vec<Vec<f32>> = others
        .iter()
        .map(|&i| {
            let delta = d.zip(&xs[i], base, |x, y| x - y);
            sparsify(
                sparse,
                delta,
                &r.inputs[i],
                r.rescale,
                rows,
                cols,
                r.seed,
                i,
                d,
            )
        })
        .collect();
    let w = task_weights(r, &others, d);
    combine(r, d, consensus, base, deltas, &w)
}

/// The non-base models' weights, rounded to D (`torch.tensor(weights, dtype=D)`).
pub(crate) fn task_weights(r: &MergekitRecipe, others: &[usize], d: D) -> Vec<f32> {
    others
        .iter()
        .map(|&i| d.qs(r.inputs[i].weight as f32))
        .collect()
}

/// Weight the (sparsified) deltas, elect signs if asked, sum, normalize, scale by lambda and
/// add to the base. Elementwise: works on any chunk.
pub(crate) fn combine(
    r: &MergekitRecipe,
    d: D,
    consensus: bool,
    base: &[f32],
    mut deltas: Vec<Vec<f32>>,
    w: &[f32],
) -> Vec<f32> {
    for (delta, &wi) in deltas.iter_mut().zip(w) {
        *delta = d.map(delta, |x| x * wi);
    }
    let refs: Vec<&[f32]> = deltas.iter().map(|v| v.as_slice()).collect();
    let (mut mixed, div): (Vec<f32>, Vec<f32>) = if consensus {
        // Sign election: the sign of the weighted sum; zeros never agree.
        let total = d.outer_sum(&refs);
        let sign = |x: f32| {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        };
        let masks: Vec<Vec<bool>> = deltas
            .iter()
            .map(|dl| {
                dl.iter()
                    .zip(&total)
                    .map(|(&x, &s)| sign(x) == if s >= 0.0 { 1.0 } else { -1.0 })
                    .collect()
            })
            .collect();
        let kept: Vec<Vec<f32>> = deltas
            .iter()
            .zip(&masks)
            .map(|(dl, m)| dl.iter().zip(m).map(|(&x, &k)| masked(x, k)).collect())
            .collect();
        let kept_refs: Vec<&[f32]> = kept.iter().map(|v| v.as_slice()).collect();
        let mixed = d.outer_sum(&kept_refs);
        let wm: Vec<Vec<f32>> = w
            .iter()
            .zip(&masks)
            .map(|(&wi, m)| m.iter().map(|&k| if k { wi } else { 0.0 }).collect())
            .collect();
        let wm_refs: Vec<&[f32]> = wm.iter().map(|v| v.as_slice()).collect();
        let mut div = d.outer_sum(&wm_refs);
        for v in div.iter_mut() {
            if *v == 0.0 {
                *v = 1.0;
            }
        }
        (mixed, div)
    } else {
        let mixed = d.outer_sum(&refs);
        let mut s = d.sum(w);
        if (s as f64).abs() < 1e-8 {
            s = 1.0;
        }
        (mixed, vec![s])
    };
    if r.normalize {
        mixed = if div.len() == 1 {
            let s = div[0];
            d.map(&mixed, |x| x / s)
        } else {
            d.zip(&mixed, &div, |x, y| x / y)
        };
    }
    if r.lambda != 1.0 {
        let l = r.lambda as f32;
        mixed = d.map(&mixed, |x| x * l);
    }
    d.zip(base, &mixed, |x, y| x + y)
}
