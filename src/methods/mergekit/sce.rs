//! `sce` (select, calculate, erase): the task vectors δᵢ = xᵢ − base, optionally reduced to
//! the `select_topk` fraction of elements where the models' δs vary most; each model weighed
//! by its mean δ² (normalized to sum 1); signs elected as TIES does; the agreeing δs averaged
//! with those weights and added to the base.

use std::ops::Range;
use std::sync::Arc;

use super::arith::D;
use super::method::{
    Capability, MergeMethod, Need, Param, PrepareError, Resolved, Scope, TensorMerge, Value,
};
use super::stream::{RadixSelect, StreamCtx, order_key};
use crate::dtype::DType;
use crate::error::Result;
use crate::methods::torch_compat as tc;

pub struct Sce;

impl MergeMethod for Sce {
    fn name(&self) -> &'static str {
        "sce"
    }

    fn params(&self) -> &'static [Param] {
        const P: &[Param] = &[
            // Only the masks' storage type in mergekit: 0/1 multiply alike in int8.
            Param::flag("int8_mask", false),
            Param::number(
                "select_topk",
                Scope::Tensor,
                Need::Default(Value::Number(1.0)),
            ),
        ];
        P
    }

    fn needs_base(&self) -> bool {
        true
    }

    fn prepare(&self, p: &Resolved) -> std::result::Result<Arc<dyn TensorMerge>, PrepareError> {
        let base = p.base.unwrap_or(0);
        p.need_flag("int8_mask")?;
        Ok(Arc::new(SceMerge {
            select_topk: p.need_number("select_topk")?,
            base,
            others: (0..p.inputs).filter(|&i| i != base).collect(),
        }))
    }
}

#[derive(Debug)]
struct SceMerge {
    select_topk: f64,
    base: usize,
    others: Vec<usize>,
}

/// Which elements the selection keeps, as a pass walks the tensor in index order.
#[derive(Clone, Debug)]
enum Selection {
    All,
    Nothing,
    /// Streamed: keys above `key`, and the first `ties` elements equal to it in index order
    /// (`torch.topk` picks among ties by its own partition moves, which need the whole tensor).
    Top { key: u32, ties: u64 },
    /// Whole tensor: exactly the elements `torch.topk` returns.
    Mask(Vec<bool>),
}

impl SceMerge {
    fn task_vectors(&self, xs: &[Vec<f32>], t: Range<usize>, d: D) -> Vec<Vec<f32>> {
        let b = &xs[self.base][t.clone()];
        self.others
            .iter()
            .map(|&i| d.zip(&xs[i][t.clone()], b, |x, y| x - y))
            .collect()
    }

    /// The selection's ordering keys: the population variance across models per element,
    /// rounded to D (torch's CPU `var` runs Welford in f64).
    fn variance_keys(tvs: &[Vec<f32>], d: D) -> Vec<u32> {
        Self::variance(tvs, d).into_iter().map(order_key).collect()
    }

    fn variance(tvs: &[Vec<f32>], d: D) -> Vec<f32> {
        let n = tvs.first().map_or(0, Vec::len);
        let mut var: Vec<f32> = (0..n)
            .map(|e| {
                let (mut mean, mut m2) = (0f64, 0f64);
                for (k, tv) in tvs.iter().enumerate() {
                    let x = tv[e] as f64;
                    let delta = x - mean;
                    mean += delta / (k + 1) as f64;
                    m2 += delta * (x - mean);
                }
                (m2 / tvs.len() as f64) as f32
            })
            .collect();
        d.q(&mut var);
        var
    }

    /// `int(count_nonzero(var) * select_topk)`: an int64 tensor times a float is float32.
    fn top_count(&self, nonzero: u64) -> u64 {
        (nonzero as f32 * self.select_topk as f32) as u64
    }

    /// Apply the selection to a chunk's task vectors (`tv * mask`: kept or ±0).
    fn select(tvs: &mut [Vec<f32>], keys: Option<&[u32]>, sel: &mut Selection) {
        let keep: Vec<bool> = match (&mut *sel, keys) {
            (Selection::All, _) => return,
            (Selection::Mask(m), _) => std::mem::take(m),
            (Selection::Nothing, _) | (Selection::Top { .. }, None) => {
                vec![false; tvs.first().map_or(0, Vec::len)]
            }
            (Selection::Top { key, ties }, Some(keys)) => keys
                .iter()
                .map(|&k| {
                    if k > *key {
                        true
                    } else if k == *key && *ties > 0 {
                        *ties -= 1;
                        true
                    } else {
                        false
                    }
                })
                .collect(),
        };
        for tv in tvs.iter_mut() {
            for (x, &k) in tv.iter_mut().zip(&keep) {
                if !k {
                    *x *= 0.0;
                }
            }
        }
    }

    /// Whether the selection needs the variance at all.
    fn selecting(&self) -> bool {
        self.select_topk > 0.0 && self.select_topk < 1.0
    }

    /// The selection before any pass: everything, nothing, or (to be found) the top k.
    fn initial_selection(&self) -> Selection {
        if self.select_topk <= 0.0 {
            Selection::Nothing
        } else {
            Selection::All
        }
    }

    /// How many elements the top-k keeps, with the radix select aimed at the k-th largest;
    /// `None` when it keeps nothing.
    fn aim_top(&self, n: u64, nonzero: u64, rs: &mut RadixSelect) -> Option<u64> {
        let k = self.top_count(nonzero).min(n);
        if k == 0 {
            return None;
        }
        rs.target(&[n - k]);
        Some(k)
    }

    /// The streamed top-k from the k-th largest key: everything above it, and as many of
    /// the elements equal to it as k still needs.
    fn top_from(n: u64, k: u64, rs: &RadixSelect) -> Selection {
        match rs.result().first() {
            Some(r) => Selection::Top {
                key: r.key,
                ties: k.saturating_sub(n - r.below - r.equal),
            },
            None => Selection::Nothing,
        }
    }

    /// Model weights from their mean squared (selected) task vectors: normalized to sum 1, or
    /// all 1/N when that sum is below 1e-6.
    fn weights(&self, means: &[f32], d: D) -> Vec<f32> {
        let s = d.sum(means);
        if (s as f64).abs() < 1e-6 {
            let w = d.qs(1.0 / means.len() as f32);
            return vec![w; means.len()];
        }
        means.iter().map(|&m| d.qs(m / s)).collect()
    }

    /// Elect signs, weigh the agreeing task vectors, average and add to the base.
    fn combine(base: &[f32], tvs: &[Vec<f32>], w: &[f32], d: D) -> Vec<f32> {
        let refs: Vec<&[f32]> = tvs.iter().map(|v| v.as_slice()).collect();
        let total = d.outer_sum(&refs);
        let sign = |x: f32| {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                x * 0.0
            }
        };
        // `erased_weights = w · (sign(δ) == majority)`, a bool mask: w or w·0.
        let ew: Vec<Vec<f32>> = tvs
            .iter()
            .zip(w)
            .map(|(tv, &wi)| {
                tv.iter()
                    .zip(&total)
                    .map(|(&x, &s)| {
                        let majority = if s >= 0.0 { 1.0 } else { -1.0 };
                        if sign(x) == majority { wi } else { wi * 0.0 }
                    })
                    .collect()
            })
            .collect();
        let prods: Vec<Vec<f32>> = tvs
            .iter()
            .zip(&ew)
            .map(|(tv, e)| d.zip(tv, e, |x, y| x * y))
            .collect();
        let prefs: Vec<&[f32]> = prods.iter().map(|v| v.as_slice()).collect();
        let merged = d.outer_sum(&prefs);
        let erefs: Vec<&[f32]> = ew.iter().map(|v| v.as_slice()).collect();
        let floor = d.qs(1e-6);
        let den = d.outer_sum(&erefs);
        let fin = d.zip(&merged, &den, |x, y| x / if y < floor { floor } else { y });
        d.zip(base, &fin, |x, y| x + y)
    }
}

/// `sum` of a tensor as `mean` on the CPU takes it: f32 accumulation in torch's order, not
/// rounded to f16/bf16 before the division.
fn raw_sum(x: &[f32], d: D) -> f32 {
    match d.0 {
        DType::F16 => tc::sum_f16(x),
        DType::BF16 => tc::sum_bf16(x),
        _ => tc::sum_f32(x),
    }
}

impl TensorMerge for SceMerge {
    /// Task vectors, variances with their order keys, masks and weights: 4.67 copies (measured by `tests/method_memory`).
    fn copies_per_operand(&self) -> u64 {
        5
    }

    fn capability(&self) -> Capability {
        Capability::Streamed
    }

    fn merge(&self, xs: &[Vec<f32>], _rows: usize, _cols: usize, d: D) -> Vec<f32> {
        let b = &xs[self.base];
        if self.others.is_empty() {
            return b.clone();
        }
        let n = b.len();
        let mut tvs = self.task_vectors(xs, 0..n, d);
        let mut sel = self.initial_selection();
        if self.selecting() {
            // `torch.topk` of the variance, with its tie-breaking (exact variances tie often:
            // the task vectors of f16 models take few distinct values).
            let var = Self::variance(&tvs, d);
            let nonzero = var.iter().filter(|&&v| v != 0.0).count() as u64;
            let mut keep = vec![false; n];
            let abs: Vec<f32> = var.iter().map(|v| v.abs()).collect();
            for i in tc::topk_desc(&abs, self.top_count(nonzero) as usize) {
                keep[i] = true;
            }
            sel = Selection::Mask(keep);
        }
        Self::select(&mut tvs, None, &mut sel);
        let means: Vec<f32> = tvs
            .iter()
            .map(|tv| {
                let sq = d.map(tv, |x| x * x);
                d.qs(raw_sum(&sq, d) / n as f32)
            })
            .collect();
        Self::combine(b, &tvs, &self.weights(&means, d), d)
    }

    /// Passes: the variance's order statistics (two, when selecting), the selected task
    /// vectors' mean squares (f64 sums), then the output.
    fn stream(&self, ctx: &StreamCtx<'_>, d: D) -> Result<()> {
        let b = self.base;
        if self.others.is_empty() {
            return ctx.pass(|rows, xs| ctx.emit(rows, &xs[b]));
        }
        let n = ctx.rows * ctx.cols as u64;
        let tvs_of = |xs: &[Vec<f32>]| self.task_vectors(xs, 0..xs[b].len(), d);
        let mut sel = self.initial_selection();
        if self.selecting() {
            let mut rs = RadixSelect::new();
            let mut nonzero = 0u64;
            ctx.pass(|_, xs| {
                let keys = Self::variance_keys(&tvs_of(&xs), d);
                nonzero += keys.iter().filter(|&&k| k != order_key(0.0)).count() as u64;
                rs.count(&keys);
                Ok(())
            })?;
            sel = match self.aim_top(n, nonzero, &mut rs) {
                None => Selection::Nothing,
                Some(k) => {
                    ctx.pass(|_, xs| {
                        rs.refine(&Self::variance_keys(&tvs_of(&xs), d));
                        Ok(())
                    })?;
                    Self::top_from(n, k, &rs)
                }
            };
        }
        let selected = |xs: &[Vec<f32>], sel: &mut Selection| {
            let mut tvs = tvs_of(xs);
            let keys = matches!(sel, Selection::Top { .. }).then(|| Self::variance_keys(&tvs, d));
            Self::select(&mut tvs, keys.as_deref(), sel);
            tvs
        };
        let mut sums = vec![0f64; self.others.len()];
        let mut s = sel.clone();
        ctx.pass(|_, xs| {
            for (acc, tv) in sums.iter_mut().zip(selected(&xs, &mut s)) {
                *acc += d.map(&tv, |x| x * x).iter().map(|&v| v as f64).sum::<f64>();
            }
            Ok(())
        })?;
        let means: Vec<f32> = sums
            .iter()
            .map(|&s| d.qs((s / n.max(1) as f64) as f32))
            .collect();
        let w = self.weights(&means, d);
        let mut s = sel;
        ctx.pass(|rows, xs| {
            let tvs = selected(&xs, &mut s);
            ctx.emit(rows, &Self::combine(&xs[b], &tvs, &w, d))
        })
    }

    /// The whole-tensor top-k holds a (key, index) pair per element besides the variances:
    /// above 4M elements (as for TIES) the streamed radix select bounds the memory, at the
    /// price of torch's tie-breaking at the threshold.
    fn prefers_streaming(&self, numel: u64) -> bool {
        self.selecting() && numel > 1 << 22
    }
}
