//! `ram` and `ramplus_tl` (Reinforced Agent Merging): each model's task vector δᵢ = xᵢ − base
//! counts where |δᵢ| > epsilon. An element changed by one model only takes that model's δ; one
//! changed by several takes their mean. `ramplus_tl` also scales each model's unique entries by
//! `λᵢ = 1 + r·clamp(sharedᵢ / uniqueᵢ, 0, alpha)`, from its counts of shared and unique
//! entries over the whole tensor.

use std::ops::Range;
use std::sync::Arc;

use super::arith::D;
use super::method::{
    Capability, MergeMethod, Need, Param, PrepareError, Resolved, Scope, TensorMerge, Value,
};
use super::stream::StreamCtx;
use crate::dtype::DType;
use crate::error::Result;
use crate::methods::torch_compat as tc;

const EPSILON: Param = Param::number("epsilon", Scope::Tensor, Need::Default(Value::Number(1e-5)));

pub struct Ram;
pub struct RamPlusTl;

impl MergeMethod for Ram {
    fn name(&self) -> &'static str {
        "ram"
    }

    fn params(&self) -> &'static [Param] {
        const P: &[Param] = &[EPSILON];
        P
    }

    fn needs_base(&self) -> bool {
        true
    }

    fn prepare(&self, p: &Resolved) -> std::result::Result<Arc<dyn TensorMerge>, PrepareError> {
        Ok(Arc::new(RamMerge::new(p, None)?))
    }
}

impl MergeMethod for RamPlusTl {
    fn name(&self) -> &'static str {
        "ramplus_tl"
    }

    fn params(&self) -> &'static [Param] {
        const P: &[Param] = &[
            Param::number("r", Scope::Tensor, Need::Default(Value::Number(0.1))),
            Param::number("alpha", Scope::Tensor, Need::Default(Value::Number(0.2))),
            EPSILON,
        ];
        P
    }

    fn needs_base(&self) -> bool {
        true
    }

    /// A float32 factor (λ) promotes a float16/bfloat16 result to float32, and
    /// mergekit writes it so.
    fn result_dtype(&self, compute: DType) -> DType {
        match compute {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        }
    }

    fn prepare(&self, p: &Resolved) -> std::result::Result<Arc<dyn TensorMerge>, PrepareError> {
        let plus = Plus {
            r: p.need_number("r")?,
            alpha: p.need_number("alpha")?,
        };
        Ok(Arc::new(RamMerge::new(p, Some(plus))?))
    }
}

#[derive(Clone, Copy, Debug)]
struct Plus {
    r: f64,
    alpha: f64,
}

#[derive(Debug)]
struct RamMerge {
    epsilon: f64,
    /// `ramplus_tl`'s parameters.
    plus: Option<Plus>,
    base: usize,
    others: Vec<usize>,
}

impl RamMerge {
    fn new(p: &Resolved, plus: Option<Plus>) -> std::result::Result<RamMerge, PrepareError> {
        let base = p.base.unwrap_or(0);
        Ok(RamMerge {
            epsilon: p.need_number("epsilon")?,
            plus,
            base,
            others: (0..p.inputs).filter(|&i| i != base).collect(),
        })
    }

    /// The task vectors of a range of elements, and per element how many models change it.
    fn vectors(&self, xs: &[Vec<f32>], t: Range<usize>, d: D) -> (Vec<Vec<f32>>, Vec<u32>) {
        // `abs() > epsilon` compares in the tensor's dtype.
        let eps = d.qs(self.epsilon as f32);
        let b = &xs[self.base][t.clone()];
        let tvs: Vec<Vec<f32>> = self
            .others
            .iter()
            .map(|&i| d.zip(&xs[i][t.clone()], b, |x, y| x - y))
            .collect();
        let mut counts = vec![0u32; t.len()];
        for tv in &tvs {
            for (c, &x) in counts.iter_mut().zip(tv) {
                *c += u32::from(x.abs() > eps);
            }
        }
        (tvs, counts)
    }

    /// Per model, its (shared, unique) counts over some elements.
    fn count_kinds(&self, tvs: &[Vec<f32>], counts: &[u32], d: D, acc: &mut [(u64, u64)]) {
        let eps = d.qs(self.epsilon as f32);
        for (tv, a) in tvs.iter().zip(acc.iter_mut()) {
            for (&x, &c) in tv.iter().zip(counts) {
                if x.abs() > eps {
                    if c > 1 {
                        a.0 += 1;
                    } else if c == 1 {
                        a.1 += 1;
                    }
                }
            }
        }
    }

    /// `ramplus_tl`'s λᵢ from a model's counts: the counts are int64 tensors, and clamping
    /// them with a float bound promotes to float32, so λ is float32 whatever the dtype.
    fn lambda(&self, plus: Plus, (shared, unique): (u64, u64)) -> f32 {
        let den = (unique as f32).max(self.epsilon as f32);
        let rho = shared as f32 / den;
        let alpha = plus.alpha as f32;
        let rho = if rho < 0.0 {
            0.0
        } else if rho > alpha {
            alpha
        } else {
            rho
        };
        1.0 + plus.r as f32 * rho
    }

    /// The merged elements of `t`, with `ramplus_tl`'s λs when given.
    fn apply(&self, xs: &[Vec<f32>], t: Range<usize>, lambdas: Option<&[f32]>, d: D) -> Vec<f32> {
        let b = &xs[self.base][t.clone()];
        let (tvs, counts) = self.vectors(xs, t, d);
        let eps = d.qs(self.epsilon as f32);
        // With λ the unique part is float32 (a half tensor times a float32 one), and so is
        // everything after it.
        let q = |v: &mut Vec<f32>| {
            if lambdas.is_none() {
                d.q(v)
            }
        };
        let terms: Vec<Vec<f32>> = tvs
            .iter()
            .enumerate()
            .map(|(k, tv)| {
                let mut v: Vec<f32> = tv
                    .iter()
                    .zip(&counts)
                    .map(|(&x, &c)| {
                        // x·mask with a bool mask: x or ±0.
                        let z = if x.abs() > eps { x } else { 0.0 * x };
                        let mut unique = if c == 1 { z } else { 0.0 * z };
                        if let Some(l) = lambdas {
                            unique *= l[k];
                        }
                        let overlap = if c > 1 { z } else { 0.0 * z };
                        let shared = d.qs(overlap / c.max(1) as f32);
                        unique + shared
                    })
                    .collect();
                q(&mut v);
                v
            })
            .collect();
        let refs: Vec<&[f32]> = terms.iter().map(|v| v.as_slice()).collect();
        let merged = if lambdas.is_none() {
            d.outer_sum(&refs)
        } else {
            let mut m = vec![0f32; b.len()];
            tc::outer_sum_f32(&refs, &mut m);
            m
        };
        let mut out: Vec<f32> = b.iter().zip(&merged).map(|(&x, &y)| x + y).collect();
        q(&mut out);
        out
    }
}

impl TensorMerge for RamMerge {
    /// ramplus_tl's task vectors, masks and the result: 3.33 copies (measured by `tests/method_memory`).
    fn copies_per_operand(&self) -> u64 {
        4
    }

    fn capability(&self) -> Capability {
        if self.plus.is_some() {
            Capability::Streamed
        } else {
            Capability::Elementwise
        }
    }

    fn merge(&self, xs: &[Vec<f32>], _rows: usize, _cols: usize, d: D) -> Vec<f32> {
        let b = &xs[self.base];
        if self.others.is_empty() {
            return b.clone();
        }
        let lambdas = self.plus.map(|plus| {
            let (tvs, counts) = self.vectors(xs, 0..b.len(), d);
            let mut acc = vec![(0, 0); self.others.len()];
            self.count_kinds(&tvs, &counts, d, &mut acc);
            acc.iter().map(|&c| self.lambda(plus, c)).collect::<Vec<_>>()
        });
        self.apply(xs, 0..b.len(), lambdas.as_deref(), d)
    }

    /// `ramplus_tl`: one pass for the counts (exact integers), one for the output.
    fn stream(&self, ctx: &StreamCtx<'_>, d: D) -> Result<()> {
        let b = self.base;
        let Some(plus) = self.plus.filter(|_| !self.others.is_empty()) else {
            return ctx.pass(|rows, xs| {
                let n = xs[b].len();
                ctx.emit(rows, &self.merge(&xs, 0, n, d))
            });
        };
        let mut acc = vec![(0, 0); self.others.len()];
        ctx.pass(|_, xs| {
            let (tvs, counts) = self.vectors(&xs, 0..xs[b].len(), d);
            self.count_kinds(&tvs, &counts, d, &mut acc);
            Ok(())
        })?;
        let lambdas: Vec<f32> = acc.iter().map(|&c| self.lambda(plus, c)).collect();
        ctx.pass(|rows, xs| ctx.emit(rows, &self.apply(&xs, 0..xs[b].len(), Some(&lambdas), d)))
    }
}
