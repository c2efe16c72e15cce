//! mergekit methods that need whole-tensor statistics, streamed in passes over row chunks,
//! for tensors too large to hold within the memory budget.
//!
//! Each pass reloads the operands chunk by chunk: slerp and nuslerp take norms, then the dot
//! product of the normalized tensors, then write; model_stock takes norms and dot products
//! of the offsets, then writes; DARE/DELLA take the L1 sums for the rescale, then write;
//! TIES and breadcrumbs find their magnitude thresholds by a two-pass radix select over the
//! f32 bit patterns (16 bits a pass), then (if rescaling) the kept L1 sum, then write.
//!
//! Sums here accumulate in f64 and elements tied at a magnitude threshold are kept in index
//! order, where the whole-tensor path follows PyTorch's reduction order and sort exactly;
//! PyTorch's own results for tensors this large depend on its thread count.

use std::ops::Range;

use crate::error::Result;
use crate::plan::mergekit::{InputParams, MergekitRecipe, MethodKind, Sparsify};

use super::{
    D, NuCoeffs, combine, della_probability, masked, model_stock_apply, model_stock_cos,
    model_stock_t, nuslerp_apply, nuslerp_coefficients, nuslerp_eps, nuslerp_pair, nuslerp_t,
    outlier_window, rescale_factor, slerp_apply, slerp_coefficients, slerp_norm, slerp_pair,
    task_weights, uniform,
};
use crate::methods::torch_compat as tc;

/// Loads the operands of a row range.
pub type LoadFn<'a> = &'a dyn Fn(Range<u64>) -> Result<Vec<Vec<f32>>>;
/// Writes output values of a row range.
pub type EmitFn<'a> = &'a dyn Fn(Range<u64>, &[f32]) -> Result<()>;

/// Elements per tile of the per-element work inside a chunk (stays in L2).
const TILE_ELEMS: usize = 32 * 1024;

/// Access to one step's data: operands by row range, and the output.
pub struct StreamCtx<'a> {
    pub rows: u64,
    pub cols: usize,
    pub chunk_rows: u64,
    /// The operands' values (decoded, patched, rounded) for a row range.
    pub load: LoadFn<'a>,
    /// Write output values (in the compute dtype's precision) for a row range.
    pub emit: EmitFn<'a>,
}

impl StreamCtx<'_> {
    /// One pass over the tensor, chunk by chunk in row order.
    fn pass(&self, mut f: impl FnMut(Range<u64>, Vec<Vec<f32>>) -> Result<()>) -> Result<()> {
        let mut r0 = 0;
        while r0 < self.rows {
            let r1 = (r0 + self.chunk_rows).min(self.rows);
            f(r0..r1, (self.load)(r0..r1)?)?;
            r0 = r1;
        }
        Ok(())
    }
}

/// Whether `run` handles this recipe.
pub fn supports(r: &MergekitRecipe) -> bool {
    match r.kind {
        MethodKind::Slerp | MethodKind::NuSlerp | MethodKind::ModelStock => true,
        MethodKind::TaskArithmetic { sparsify, .. } => sparsify != Sparsify::None,
        MethodKind::Linear | MethodKind::Passthrough => false,
    }
}

pub fn run(r: &MergekitRecipe, ctx: &StreamCtx<'_>) -> Result<()> {
    let d = D(r.compute);
    match r.kind {
        MethodKind::Slerp => slerp(r, ctx, d),
        MethodKind::NuSlerp => nuslerp(r, ctx, d),
        MethodKind::ModelStock => model_stock(r, ctx, d),
        MethodKind::TaskArithmetic {
            consensus,
            sparsify,
        } => task_arithmetic(r, ctx, d, consensus, sparsify),
        // Elementwise methods are chunked by the pipeline; computing them whole is the same.
        MethodKind::Linear | MethodKind::Passthrough => ctx.pass(|rows, xs| {
            let n = (rows.end - rows.start) as usize;
            (ctx.emit)(rows, &super::merge(r, &xs, n, ctx.cols))
        }),
    }
}

fn sum_sq(v: &[f32]) -> f64 {
    v.iter().map(|&x| (x as f64) * (x as f64)).sum()
}

fn slerp(r: &MergekitRecipe, ctx: &StreamCtx<'_>, d: D) -> Result<()> {
    let (i0, i1) = slerp_pair(r);
    let (mut s0, mut s1) = (0f64, 0f64);
    ctx.pass(|_, xs| {
        s0 += sum_sq(&xs[i0]);
        s1 += sum_sq(&xs[i1]);
        Ok(())
    })?;
    let na = slerp_norm(s0.sqrt() as f32);
    let nb = slerp_norm(s1.sqrt() as f32);
    let mut dot = 0f64;
    ctx.pass(|_, xs| {
        dot += xs[i0]
            .iter()
            .zip(&xs[i1])
            .map(|(&a, &b)| ((a / na) * (b / nb)) as f64)
            .sum::<f64>();
        Ok(())
    })?;
    let (ca, cb) = slerp_coefficients((dot as f32).clamp(-1.0, 1.0), r.t as f32);
    ctx.pass(|rows, xs| (ctx.emit)(rows, &slerp_apply(ca, cb, &xs[i0], &xs[i1], d)))
}

fn nuslerp(r: &MergekitRecipe, ctx: &StreamCtx<'_>, d: D) -> Result<()> {
    let cols = ctx.cols.max(1);
    let n_ops = r.inputs.len();
    let (i0, i1) = nuslerp_pair(r, n_ops);
    let t = nuslerp_t(r.inputs[i0].weight, r.inputs[i1].weight);
    // Task vectors relative to the base, when there is one.
    let vectors = |xs: &[Vec<f32>]| -> (Vec<f32>, Vec<f32>) {
        match r.base {
            Some(b) => (
                d.zip(&xs[i0], &xs[b], |x, y| x - y),
                d.zip(&xs[i1], &xs[b], |x, y| x - y),
            ),
            None => (xs[i0].clone(), xs[i1].clone()),
        }
    };
    let finish = |xs: &[Vec<f32>], out: Vec<f32>| match r.base {
        Some(b) => d.zip(&xs[b], &out, |x, y| x + y),
        None => out,
    };
    let eps = nuslerp_eps(d);
    if !r.flatten && !r.row_wise {
        // Per row: every chunk holds whole rows.
        return ctx.pass(|rows, xs| {
            let (v0, v1) = vectors(&xs);
            let mut out = Vec::with_capacity(v0.len());
            for (a, b) in v0.chunks(cols).zip(v1.chunks(cols)) {
                let n0 = d.norm(a).max(eps);
                let n1 = d.norm(b).max(eps);
                let u: Vec<f32> = d.zip(&d.map(a, |x| x / n0), &d.map(b, |x| x / n1), |x, y| x * y);
                let c = d.sum(&u).clamp(-1.0, 1.0);
                out.extend(nuslerp_apply(nuslerp_coefficients(t, c, d), a, b, d));
            }
            (ctx.emit)(rows, &finish(&xs, out))
        });
    }
    // One group (flatten) or one per column (row_wise): norms, then cosines, then output.
    let groups = if r.row_wise { cols } else { 1 };
    let group = |j: usize| if r.row_wise { j % cols } else { 0 };
    let (mut ss0, mut ss1) = (vec![0f64; groups], vec![0f64; groups]);
    ctx.pass(|_, xs| {
        let (v0, v1) = vectors(&xs);
        for (j, (&a, &b)) in v0.iter().zip(&v1).enumerate() {
            ss0[group(j)] += (a as f64) * (a as f64);
            ss1[group(j)] += (b as f64) * (b as f64);
        }
        Ok(())
    })?;
    let n0: Vec<f32> = ss0.iter().map(|s| d.qs(s.sqrt() as f32).max(eps)).collect();
    let n1: Vec<f32> = ss1.iter().map(|s| d.qs(s.sqrt() as f32).max(eps)).collect();
    let mut dots = vec![0f64; groups];
    ctx.pass(|_, xs| {
        let (v0, v1) = vectors(&xs);
        for (j, (&a, &b)) in v0.iter().zip(&v1).enumerate() {
            let g = group(j);
            let u = d.qs(d.qs(a / n0[g]) * d.qs(b / n1[g]));
            dots[g] += u as f64;
        }
        Ok(())
    })?;
    let coeffs: Vec<NuCoeffs> = dots
        .iter()
        .map(|&c| nuslerp_coefficients(t, d.qs(c as f32).clamp(-1.0, 1.0), d))
        .collect();
    ctx.pass(|rows, xs| {
        let (v0, v1) = vectors(&xs);
        let out = if groups == 1 {
            nuslerp_apply(coeffs[0], &v0, &v1, d)
        } else {
            v0.iter()
                .zip(&v1)
                .enumerate()
                .map(|(j, (&a, &b))| nuslerp_apply(coeffs[group(j)], &[a], &[b], d)[0])
                .collect()
        };
        (ctx.emit)(rows, &finish(&xs, out))
    })
}

fn model_stock(r: &MergekitRecipe, ctx: &StreamCtx<'_>, d: D) -> Result<()> {
    let b = r.base.unwrap_or(0);
    if r.filter_wise {
        // Per row: every chunk holds whole rows.
        return ctx.pass(|rows, xs| {
            let n = (rows.end - rows.start) as usize;
            (ctx.emit)(rows, &super::merge(r, &xs, n, ctx.cols))
        });
    }
    let others: Vec<usize> = (0..r.inputs.len()).filter(|&i| i != b).collect();
    let m = others.len();
    let mut ss = vec![0f64; m];
    let mut dots = vec![vec![0f64; m]; m];
    ctx.pass(|_, xs| {
        let offs: Vec<Vec<f32>> = others
            .iter()
            .map(|&i| d.zip(&xs[i], &xs[b], |x, y| x - y))
            .collect();
        for i in 0..m {
            ss[i] += sum_sq(&offs[i]);
            for j in i + 1..m {
                dots[i][j] += d
                    .zip(&offs[i], &offs[j], |x, y| x * y)
                    .iter()
                    .map(|&v| v as f64)
                    .sum::<f64>();
            }
        }
        Ok(())
    })?;
    let norms: Vec<f32> = ss.iter().map(|s| d.qs(s.sqrt() as f32)).collect();
    let mut cos = Vec::new();
    for i in 0..m {
        for j in i + 1..m {
            cos.push(model_stock_cos(
                norms[i],
                norms[j],
                d.qs(dots[i][j] as f32),
                d,
            ));
        }
    }
    let t = model_stock_t(&cos, m, d);
    ctx.pass(|rows, xs| {
        let ws: Vec<&[f32]> = others.iter().map(|&i| xs[i].as_slice()).collect();
        (ctx.emit)(rows, &model_stock_apply(t, &xs[b], &ws, d))
    })
}

/// The magnitude bit pattern used for ranking: |x| as f32 bits (monotonic; NaN largest).
fn mag_bits(x: f32) -> u32 {
    x.to_bits() & 0x7FFF_FFFF
}

/// One ascending rank to locate in a tensor of magnitudes, found 16 bits per pass.
#[derive(Clone, Debug)]
struct RankQuery {
    rank: u64,
    /// High 16 bits of the value at `rank`, and how many elements lie in lower buckets.
    bucket: Option<(u32, u64)>,
    /// The value at `rank`, how many elements are smaller, and how many equal it.
    value: Option<(u32, u64, u64)>,
}

fn locate(hist: &[u64], rank: u64) -> (u32, u64) {
    let mut below = 0u64;
    for (b, &c) in hist.iter().enumerate() {
        if below + c > rank {
            return (b as u32, below);
        }
        below += c;
    }
    (hist.len().saturating_sub(1) as u32, below)
}

/// How a model's deltas are masked once its thresholds are known.
#[derive(Clone, Debug)]
enum Rule {
    /// Keep everything (density ≥ 1).
    All,
    /// Keep nothing (density ≤ 0 for TIES, DARE, DELLA).
    Zero,
    /// Keep ascending ranks [lo, hi): values strictly between the boundary values, and the
    /// boundary values' ties in index order.
    Window {
        lo: u64,
        hi: u64,
        low: (u32, u64, u64),
        high: (u32, u64, u64),
    },
    /// Bernoulli masks (DARE / DELLA).
    Random,
}

/// Per-model mask state for one pass (the counters of tied boundary values seen so far).
struct Masker<'a> {
    rule: &'a Rule,
    seen_low: u64,
    seen_high: u64,
}

impl Masker<'_> {
    fn keep(&mut self, x: f32) -> bool {
        match self.rule {
            Rule::All => true,
            Rule::Zero => false,
            Rule::Random => unreachable!("random masks are drawn per element index"),
            Rule::Window { lo, hi, low, high } => {
                let v = mag_bits(x);
                // rank of this element = (count below its value) + (its index among equals)
                let rank = if v == low.0 {
                    let r = low.1 + self.seen_low;
                    self.seen_low += 1;
                    if high.0 == low.0 {
                        self.seen_high += 1;
                    }
                    r
                } else if v == high.0 {
                    let r = high.1 + self.seen_high;
                    self.seen_high += 1;
                    r
                } else if v > low.0 && v < high.0 {
                    *lo // any rank inside the window
                } else {
                    u64::MAX
                };
                rank >= *lo && rank < *hi
            }
        }
    }
}

fn task_arithmetic(
    r: &MergekitRecipe,
    ctx: &StreamCtx<'_>,
    d: D,
    consensus: bool,
    sparse: Sparsify,
) -> Result<()> {
    let b = r.base.unwrap_or(0);
    let others: Vec<usize> = (0..r.inputs.len()).filter(|&i| i != b).collect();
    if others.is_empty() {
        // Only the base in this slice: it passes through.
        return ctx.pass(|rows, xs| (ctx.emit)(rows, &xs[b]));
    }
    let n = ctx.rows * ctx.cols as u64;
    let cols = ctx.cols.max(1);
    // The deltas of one cache-sized tile of a chunk (whole rows, so DELLA sees full rows).
    let deltas = |xs: &[Vec<f32>], t: &Range<usize>| -> Vec<Vec<f32>> {
        others
            .iter()
            .map(|&i| d.zip(&xs[i][t.clone()], &xs[b][t.clone()], |x, y| x - y))
            .collect()
    };
    let tile_len = (TILE_ELEMS / cols).max(1) * cols;
    let tiles = move |len: usize| {
        (0..len)
            .step_by(tile_len)
            .map(move |a| a..(a + tile_len).min(len))
    };

    // The rule per model.
    let mut rules: Vec<Rule> = Vec::with_capacity(others.len());
    let mut queries: Vec<Vec<RankQuery>> = Vec::new();
    for &i in &others {
        let p: &InputParams = &r.inputs[i];
        let rule_queries: Vec<u64> = if p.density >= 1.0 {
            rules.push(Rule::All);
            vec![]
        } else {
            match sparse {
                Sparsify::Magnitude if p.density > 0.0 && n > 0 => {
                    let k = ((p.density * n as f64) as u64).clamp(1, n);
                    rules.push(Rule::All); // placeholder, replaced once thresholds are known
                    vec![n - k, n - 1]
                }
                Sparsify::MagnitudeOutliers if n > 0 => {
                    let (n_bot, target) = outlier_window(p, n as usize);
                    if target == 0 {
                        rules.push(Rule::Zero);
                        vec![]
                    } else {
                        rules.push(Rule::All);
                        vec![n_bot as u64, (n_bot + target - 1) as u64]
                    }
                }
                Sparsify::Random | Sparsify::Della if p.density > 0.0 => {
                    rules.push(Rule::Random);
                    vec![]
                }
                _ => {
                    rules.push(Rule::Zero);
                    vec![]
                }
            }
        };
        queries.push(
            rule_queries
                .into_iter()
                .map(|rank| RankQuery {
                    rank,
                    bucket: None,
                    value: None,
                })
                .collect(),
        );
    }

    // Radix select: high 16 bits, then low 16 bits within the located buckets.
    if queries.iter().any(|q| !q.is_empty()) {
        let mut hi = vec![vec![0u64; 1 << 16]; others.len()];
        ctx.pass(|_, xs| {
            for t in tiles(xs[b].len()) {
                for (k, dl) in deltas(&xs, &t).iter().enumerate() {
                    if !queries[k].is_empty() {
                        for &x in dl {
                            hi[k][(mag_bits(x) >> 16) as usize] += 1;
                        }
                    }
                }
            }
            Ok(())
        })?;
        for (k, qs) in queries.iter_mut().enumerate() {
            for q in qs.iter_mut() {
                q.bucket = Some(locate(&hi[k], q.rank));
            }
        }
        let mut lo: Vec<Vec<Vec<u64>>> = queries
            .iter()
            .map(|q| vec![vec![0u64; 1 << 16]; q.len()])
            .collect();
        ctx.pass(|_, xs| {
            for t in tiles(xs[b].len()) {
                for (k, dl) in deltas(&xs, &t).iter().enumerate() {
                    for (qi, q) in queries[k].iter().enumerate() {
                        let Some((bucket, _)) = q.bucket else {
                            continue;
                        };
                        for &x in dl {
                            let v = mag_bits(x);
                            if v >> 16 == bucket {
                                lo[k][qi][(v & 0xFFFF) as usize] += 1;
                            }
                        }
                    }
                }
            }
            Ok(())
        })?;
        for (k, qs) in queries.iter_mut().enumerate() {
            for (qi, q) in qs.iter_mut().enumerate() {
                if let Some((bucket, below)) = q.bucket {
                    let (low, below_lo) = locate(&lo[k][qi], q.rank - below);
                    let value = bucket << 16 | low;
                    q.value = Some((value, below + below_lo, lo[k][qi][low as usize]));
                }
            }
        }
        for (k, qs) in queries.iter().enumerate() {
            if let [a, z] = qs.as_slice()
                && let (Some(low), Some(high)) = (a.value, z.value)
            {
                rules[k] = Rule::Window {
                    lo: a.rank,
                    hi: z.rank + 1,
                    low,
                    high,
                };
            }
        }
    }

    // Bernoulli masks: element i of model k is kept with its probability.
    let random_mask = |k: usize, row0: u64, dl: &[f32]| -> Vec<bool> {
        let i = others[k];
        let p = &r.inputs[i];
        let base_index = (row0 as usize) * cols;
        match sparse {
            Sparsify::Della => {
                let mut mask = vec![false; dl.len()];
                for (ri, row) in dl.chunks(cols).enumerate() {
                    let mag: Vec<f32> = row.iter().map(|x| x.abs()).collect();
                    for (rank0, &j) in tc::argsort_asc(&mag).iter().enumerate() {
                        let e = ri * cols + j;
                        mask[e] = uniform(r.seed, i, base_index + e)
                            < della_probability(p, rank0, row.len()) as f64;
                    }
                }
                mask
            }
            _ => (0..dl.len())
                .map(|e| uniform(r.seed, i, base_index + e) < p.density)
                .collect(),
        }
    };
    let masks_for = |row0: u64, dls: &[Vec<f32>], maskers: &mut [Masker<'_>]| -> Vec<Vec<bool>> {
        dls.iter()
            .enumerate()
            .map(|(k, dl)| match rules[k] {
                Rule::Random => random_mask(k, row0, dl),
                _ => dl.iter().map(|&x| maskers[k].keep(x)).collect(),
            })
            .collect()
    };
    let fresh = || -> Vec<Masker<'_>> {
        rules
            .iter()
            .map(|rule| Masker {
                rule,
                seen_low: 0,
                seen_high: 0,
            })
            .collect()
    };

    // The rescale factors: Σ|δ| / Σ|kept δ| over the whole tensor.
    let mut factors: Vec<Option<f32>> = vec![None; others.len()];
    if r.rescale && rules.iter().any(|x| !matches!(x, Rule::All | Rule::Zero)) {
        let mut before = vec![0f64; others.len()];
        let mut after = vec![0f64; others.len()];
        let mut maskers = fresh();
        ctx.pass(|rows, xs| {
            for t in tiles(xs[b].len()) {
                let dls = deltas(&xs, &t);
                let masks = masks_for(rows.start + (t.start / cols) as u64, &dls, &mut maskers);
                for (k, (dl, m)) in dls.iter().zip(&masks).enumerate() {
                    for (&x, &keep) in dl.iter().zip(m) {
                        before[k] += x.abs() as f64;
                        after[k] += masked(x, keep).abs() as f64;
                    }
                }
            }
            Ok(())
        })?;
        for k in 0..others.len() {
            if !matches!(rules[k], Rule::All | Rule::Zero) {
                factors[k] = rescale_factor(d.qs(before[k] as f32), d.qs(after[k] as f32), d);
            }
        }
    }

    let w = task_weights(r, &others, d);
    let mut maskers = fresh();
    ctx.pass(|rows, xs| {
        let mut out = Vec::with_capacity(xs[b].len());
        for t in tiles(xs[b].len()) {
            let dls = deltas(&xs, &t);
            let masks = masks_for(rows.start + (t.start / cols) as u64, &dls, &mut maskers);
            let sparse: Vec<Vec<f32>> = dls
                .iter()
                .zip(&masks)
                .zip(&factors)
                .map(|((dl, m), f)| {
                    let kept: Vec<f32> = dl.iter().zip(m).map(|(&x, &k)| masked(x, k)).collect();
                    match f {
                        Some(f) => d.map(&kept, |x| x * f),
                        None => kept,
                    }
                })
                .collect();
            out.extend(combine(r, d, consensus, &xs[b][t.clone()], sparse, &w));
        }
        (ctx.emit)(rows, &out)
    })
}
