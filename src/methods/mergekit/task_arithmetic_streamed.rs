//! The task-arithmetic family streamed in passes over row chunks, for tensors too large to
//! hold: TIES and breadcrumbs find their magnitude thresholds by a two-pass radix select
//! over the f32 bit patterns (16 bits a pass), then (if rescaling) the kept L1 sums are
//! taken, then the output is written. DARE/DELLA masks are counter-based, so every pass
//! draws the same mask.

use std::ops::Range;

use super::arith::D;
use super::sparsify::{
    Sparsify, della_probability, masked, outlier_window, rescale_factor, uniform,
};
use super::stream::{StreamCtx, TILE_ELEMS};
use super::task_arithmetic::{TaskInput, TaskMerge};
use crate::error::Result;
use crate::methods::torch_compat as tc;

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

/// Stream a task-arithmetic merge: the sparsifying thresholds (radix select), then the
/// rescale sums, then the output.
pub(crate) fn stream(r: &TaskMerge, ctx: &StreamCtx<'_>, d: D) -> Result<()> {
    let sparse = r.sparsify;
    let b = r.base;
    let others = &r.others;
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
    for &i in others {
        let p: &TaskInput = &r.inputs[i];
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

    let w = r.weights(d);
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
            out.extend(r.combine(d, &xs[b][t.clone()], sparse, &w));
        }
        (ctx.emit)(rows, &out)
    })
}
