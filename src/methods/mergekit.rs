//! mergekit's merge methods, numerically as mergekit 0.1.5 computes them with PyTorch.
//!
//! `linear` and `slerp` compute in f32 and round to the compute dtype D once. Every other
//! method runs its elementwise operations in D — each result rounded to D, which is what
//! PyTorch does for f16/bf16 tensors — while reductions accumulate in f32 in PyTorch's order
//! (`torch_compat`) and round once. For D = f32 all of this is plain f32 arithmetic.
//! Operands arrive already rounded to the config's `dtype` (mergekit casts at load).

use crate::dtype::DType;
use crate::kernels::bytes::round_to;
use crate::methods::torch_compat as tc;
use crate::plan::mergekit::{MergekitRecipe, MethodKind, Sparsify};

/// Rounding to the compute dtype.
#[derive(Clone, Copy)]
struct D(DType);

impl D {
    fn q(self, v: &mut [f32]) {
        round_to(self.0, v);
    }
    fn qs(self, x: f32) -> f32 {
        let mut a = [x];
        round_to(self.0, &mut a);
        a[0]
    }
    fn sum(self, x: &[f32]) -> f32 {
        self.qs(match self.0 {
            DType::F16 => tc::sum_f16(x),
            DType::BF16 => tc::sum_bf16(x),
            _ => tc::sum_f32(x),
        })
    }
    fn norm(self, x: &[f32]) -> f32 {
        self.qs(match self.0 {
            DType::F16 => tc::norm_f16(x),
            DType::BF16 => tc::norm_bf16(x),
            _ => tc::norm_f32(x),
        })
    }
    /// `torch.stack(xs).sum(0)`: f32 accumulation in PyTorch's order, rounded to D.
    fn outer_sum(self, xs: &[&[f32]]) -> Vec<f32> {
        let mut out = vec![0f32; xs.first().map_or(0, |x| x.len())];
        tc::outer_sum_f32(xs, &mut out);
        self.q(&mut out);
        out
    }
    fn acos(self, x: f32) -> f32 {
        self.qs((x as f64).acos() as f32)
    }
    fn sin(self, x: f32) -> f32 {
        self.qs((x as f64).sin() as f32)
    }
    /// Elementwise `a op b`, rounded to D.
    fn zip(self, a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> Vec<f32> {
        let mut v: Vec<f32> = a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect();
        self.q(&mut v);
        v
    }
    fn map(self, a: &[f32], f: impl Fn(f32) -> f32) -> Vec<f32> {
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

/// `Σ fma(x_i, w_i)` in config order, divided by the f32 sum of the weights.
fn linear(r: &MergekitRecipe, xs: &[Vec<f32>], d: D) -> Vec<f32> {
    let w: Vec<f32> = r.inputs.iter().map(|p| p.weight as f32).collect();
    let mut acc = vec![0f32; xs[0].len()];
    for (x, &wi) in xs.iter().zip(&w) {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a = v.mul_add(wi, *a);
        }
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

/// Spherical interpolation from the base (v0) towards the other model (v1), whole tensor.
fn slerp(r: &MergekitRecipe, xs: &[Vec<f32>], d: D) -> Vec<f32> {
    let bi = r.base.unwrap_or(0);
    let (v0, v1) = (&xs[bi], &xs[1 - bi.min(1)]);
    let t = r.t as f32;
    let mut na = tc::norm_f32(v0);
    let mut nb = tc::norm_f32(v1);
    if na <= 1e-8 {
        na = 1.0;
    }
    if nb <= 1e-8 {
        nb = 1.0;
    }
    let prod: Vec<f32> = v0
        .iter()
        .zip(v1.iter())
        .map(|(&a, &b)| (a / na) * (b / nb))
        .collect();
    let dot = tc::sum_f32(&prod).clamp(-1.0, 1.0);
    let one_t = 1.0f32 - t;
    let (ca, cb) = if (dot as f64).abs() > 0.9995 {
        (one_t, t)
    } else {
        let theta = (dot as f64).acos() as f32;
        let s = (theta as f64).sin() as f32;
        let sa = ((one_t * theta) as f64).sin() as f32;
        let sb = ((t * theta) as f64).sin() as f32;
        (sa / s, sb / s)
    };
    let mut out: Vec<f32> = v0
        .iter()
        .zip(v1.iter())
        .map(|(&a, &b)| (ca * a) + (cb * b))
        .collect();
    d.q(&mut out);
    out
}

/// NuSLERP of one vector pair (mergekit's `nuslerp`), in D.
fn nuslerp_vec(t: f64, v0: &[f32], v1: &[f32], d: D) -> Vec<f32> {
    let eps = d.qs(1e-7);
    let n0 = d.norm(v0).max(eps);
    let n1 = d.norm(v1).max(eps);
    let u0 = d.map(v0, |x| x / n0);
    let u1 = d.map(v1, |x| x / n1);
    let c = d.sum(&d.zip(&u0, &u1, |a, b| a * b)).clamp(-1.0, 1.0);
    let one_t = (1.0 - t) as f32;
    let tt = t as f32;
    if d.qs(1.0 - d.qs(c * c)) <= d.qs(1e-16) {
        let a = d.map(v0, |x| one_t * x);
        let b = d.map(v1, |x| tt * x);
        return d.zip(&a, &b, |x, y| x + y);
    }
    let theta = d.acos(c);
    let st = d.sin(theta);
    let s0 = d.sin(d.qs(one_t * theta));
    let s1 = d.sin(d.qs(tt * theta));
    let a = d.map(v0, |x| s0 * x);
    let b = d.map(v1, |x| s1 * x);
    let sum = d.zip(&a, &b, |x, y| x + y);
    d.map(&sum, |x| x / st)
}

fn nuslerp(r: &MergekitRecipe, xs: &[Vec<f32>], rows: usize, cols: usize, d: D) -> Vec<f32> {
    let others: Vec<usize> = (0..xs.len()).filter(|&i| Some(i) != r.base).collect();
    let (i0, i1) = (others[0], others[1]);
    let (w0, w1) = (r.inputs[i0].weight, r.inputs[i1].weight);
    let total = w0 + w1;
    let t = if total.abs() < 1e-6 { 0.5 } else { w1 / total };
    let (v0, v1) = match r.base {
        Some(b) => (
            d.zip(&xs[i0], &xs[b], |x, y| x - y),
            d.zip(&xs[i1], &xs[b], |x, y| x - y),
        ),
        None => (xs[i0].clone(), xs[i1].clone()),
    };
    let mut out = if r.row_wise {
        // Columns: gather, interpolate, scatter.
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
    let ws: Vec<&Vec<f32>> = xs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != b)
        .map(|(_, x)| x)
        .collect();
    let offs: Vec<Vec<f32>> = ws.iter().map(|w| d.zip(w, w0, |x, y| x - y)).collect();
    let mut cos = Vec::new();
    for i in 0..offs.len() {
        for j in i + 1..offs.len() {
            let npd = d.qs(d.norm(&offs[i]) * d.norm(&offs[j]));
            let dot = d.sum(&d.zip(&offs[i], &offs[j], |x, y| x * y));
            let c = d.qs(dot / npd.max(d.qs(1e-6)));
            cos.push(c.clamp(-1.0, 1.0));
        }
    }
    let ct = if cos.len() == 1 {
        cos[0]
    } else {
        d.qs(d.sum(&cos) / cos.len() as f32)
    };
    let n = ws.len() as f32;
    let den = d.qs(1.0 + d.qs((n - 1.0) * ct));
    let t = if (den as f64).abs() < 1e-6 {
        0.0
    } else {
        d.qs(d.qs(n * ct) / den)
    };
    let mut avg = ws[0].clone();
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
fn uniform(seed: u64, k: usize, i: usize) -> f64 {
    let mut z = seed ^ ((k as u64) << 56) ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// mergekit's `rescaled_masked_tensor`: mask, then (if asked) restore the L1 norm of the
/// whole tensor.
fn rescaled(t: &[f32], mask: &[bool], rescale: bool, d: D) -> Vec<f32> {
    let masked: Vec<f32> = t
        .iter()
        .zip(mask)
        .map(|(&x, &m)| if m { x } else { 0.0 * x })
        .collect();
    if !rescale {
        return masked;
    }
    let before = d.sum(&t.iter().map(|x| x.abs()).collect::<Vec<_>>());
    let after = d.sum(&masked.iter().map(|x| x.abs()).collect::<Vec<_>>());
    if (before as f64) < 1e-7 || (after as f64) < 1e-7 {
        return masked;
    }
    let factor = d.qs(before / after);
    d.map(&masked, |x| x * factor)
}

fn sparsify(
    kind: Sparsify,
    delta: Vec<f32>,
    p: &crate::plan::mergekit::InputParams,
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
    match kind {
        Sparsify::None => delta,
        Sparsify::Magnitude => {
            if density <= 0.0 || n == 0 {
                return vec![0.0; n];
            }
            let keep = ((density * n as f64) as usize).max(1);
            let mag: Vec<f32> = delta.iter().map(|x| x.abs()).collect();
            let order = tc::argsort_desc(&mag);
            let mut mask = vec![false; n];
            for &i in &order[..keep.min(n)] {
                mask[i] = true;
            }
            rescaled(&delta, &mask, rescale, d)
        }
        Sparsify::MagnitudeOutliers => {
            let target = (density * n as f64) as usize;
            let n_top = (p.gamma * n as f64) as usize;
            let n_bot = n.saturating_sub(target + n_top);
            let mag: Vec<f32> = delta.iter().map(|x| x.abs()).collect();
            let order = tc::argsort_asc(&mag);
            let mut mask = vec![false; n];
            for &i in order.iter().skip(n_bot).take(target) {
                mask[i] = true;
            }
            rescaled(&delta, &mask, rescale, d)
        }
        Sparsify::Random => {
            if density <= 0.0 {
                return vec![0.0; n];
            }
            let mask: Vec<bool> = (0..n).map(|i| uniform(seed, k, i) < density).collect();
            rescaled(&delta, &mask, rescale, d)
        }
        Sparsify::Della => {
            if density <= 0.0 {
                return vec![0.0; n];
            }
            // 1-D tensors are one row.
            let (rows, cols) = if rows * cols == n && cols > 0 && rows > 0 {
                (rows, cols)
            } else {
                (1, n)
            };
            let (lo, span) = ((density - p.epsilon) as f32, (2.0 * p.epsilon) as f32);
            let mut mask = vec![false; n];
            for r in 0..rows {
                let row = &delta[r * cols..(r + 1) * cols];
                let mag: Vec<f32> = row.iter().map(|x| x.abs()).collect();
                let order = tc::argsort_asc(&mag);
                for (rank0, &j) in order.iter().enumerate() {
                    // rank 1..=n normalized to [0, 1]
                    let rn = if cols > 1 {
                        rank0 as f32 / (cols - 1) as f32
                    } else {
                        0.0
                    };
                    let prob = lo + rn * span;
                    let i = r * cols + j;
                    mask[i] = uniform(seed, k, i) < prob as f64;
                }
            }
            rescaled(&delta, &mask, rescale, d)
        }
    }
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
    let mut deltas: Vec<Vec<f32>> = Vec::with_capacity(others.len());
    for &i in &others {
        let delta = d.zip(&xs[i], base, |x, y| x - y);
        deltas.push(sparsify(
            sparse,
            delta,
            &r.inputs[i],
            r.rescale,
            rows,
            cols,
            r.seed,
            i,
            d,
        ));
    }
    let w: Vec<f32> = others
        .iter()
        .map(|&i| d.qs(r.inputs[i].weight as f32))
        .collect();
    for (delta, &wi) in deltas.iter_mut().zip(&w) {
        *delta = d.map(delta, |x| x * wi);
    }
    let refs: Vec<&[f32]> = deltas.iter().map(|v| v.as_slice()).collect();
    let (mut mixed, div): (Vec<f32>, Vec<f32>) = if consensus {
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
            .map(|(dl, m)| {
                dl.iter()
                    .zip(m)
                    .map(|(&x, &k)| if k { x } else { 0.0 * x })
                    .collect()
            })
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
        let mut s = d.sum(&w);
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
