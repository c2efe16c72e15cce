//! `multislerp`: barycentric interpolation of any number of models on the hypersphere
//! (mergekit's Multi-SLERP). Each model (or task vector, with a base) is scaled to unit
//! norm; the weighted mean of the units is the tangent point, the weighted tangent vectors
//! are mapped back with the exponential map, and the result gets the weighted mean norm.

use std::sync::Arc;

use super::arith::D;
use super::method::{
    Capability, InputCount, MergeMethod, Need, Param, PrepareError, Resolved, Scope, TensorMerge,
    Value,
};
use super::stream::StreamCtx;
use crate::dtype::DType;
use crate::error::{Error, Result};

pub struct MultiSlerp;

impl MergeMethod for MultiSlerp {
    fn name(&self) -> &'static str {
        "multislerp"
    }

    fn params(&self) -> &'static [Param] {
        const P: &[Param] = &[
            Param::number("weight", Scope::Input, Need::RequiredUnlessBase),
            Param::flag("normalize_weights", true),
            Param::number("eps", Scope::Tensor, Need::Default(Value::Number(1e-8))),
        ];
        P
    }

    fn needs_base(&self) -> bool {
        false
    }

    fn check_inputs(&self, n: InputCount) -> std::result::Result<(), String> {
        if n.others < 1 {
            return Err("multislerp needs at least one model besides the base".into());
        }
        Ok(())
    }

    fn prepare(&self, p: &Resolved) -> std::result::Result<Arc<dyn TensorMerge>, PrepareError> {
        let others = p.others();
        let weights = others
            .iter()
            .map(|&i| p.need_input_number(i, "weight"))
            .collect::<std::result::Result<Vec<f64>, _>>()?;
        Ok(Arc::new(MultiSlerpMerge {
            others,
            weights,
            base: p.base,
            normalize: p.need_flag("normalize_weights")?,
            eps: p.need_number("eps")?,
        }))
    }
}

#[derive(Debug)]
struct MultiSlerpMerge {
    /// Operand indices of the interpolated models, and their weights.
    others: Vec<usize>,
    weights: Vec<f64>,
    base: Option<usize>,
    normalize: bool,
    eps: f64,
}

const ZERO_MEAN: &str = "multislerp: the weighted mean of the unit tensors is zero (antipodal \
     inputs whose weights cancel), which mergekit refuses too; use other weights";

impl MultiSlerpMerge {
    /// The weights as the f32 (D) tensor mergekit makes of them, normalized when asked.
    fn weights(&self, d: D) -> Vec<f32> {
        // torch.tensor(floats, dtype=D) rounds each Python float to D once.
        let w: Vec<f32> = self
            .weights
            .iter()
            .map(|&w| match d.0 {
                DType::F16 => half::f16::from_f64(w).to_f32(),
                DType::BF16 => half::bf16::from_f64(w).to_f32(),
                _ => w as f32,
            })
            .collect();
        if !self.normalize {
            return w;
        }
        let total = d.sum(&w);
        w.iter().map(|&x| d.qs(x / total)).collect()
    }

    /// The operands to interpolate: task vectors when there is a base.
    fn vectors(&self, xs: &[Vec<f32>], d: D) -> Vec<Vec<f32>> {
        self.others
            .iter()
            .map(|&i| match self.base {
                Some(b) => d.zip(&xs[i], &xs[b], |x, y| x - y),
                None => xs[i].clone(),
            })
            .collect()
    }

    fn add_base(&self, xs: &[Vec<f32>], out: Vec<f32>, d: D) -> Vec<f32> {
        match self.base {
            Some(b) => d.zip(&out, &xs[b], |x, y| x + y),
            None => out,
        }
    }
}

fn weighted(vs: &[Vec<f32>], w: &[f32], d: D) -> Vec<Vec<f32>> {
    vs.iter()
        .zip(w)
        .map(|(v, &wi)| d.map(v, |x| x * wi))
        .collect()
}

fn refs(vs: &[Vec<f32>]) -> Vec<&[f32]> {
    vs.iter().map(|v| v.as_slice()).collect()
}

impl TensorMerge for MultiSlerpMerge {
    fn capability(&self) -> Capability {
        Capability::Streamed
    }

    /// The operands, their unit vectors and the weighted copies summed over models.
    fn copies_per_operand(&self) -> u64 {
        // 4.33 measured by `tests/method_memory`.
        5
    }

    fn merge(&self, xs: &[Vec<f32>], rows: usize, cols: usize, d: D) -> Vec<f32> {
        // Only the API path without errors lands here; the pipeline calls try_merge.
        self.try_merge(xs, rows, cols, d)
            .unwrap_or_else(|_| vec![f32::NAN; xs.first().map_or(0, |x| x.len())])
    }

    /// mergekit's operations in order, each rounded to D, with torch's reductions.
    fn try_merge(
        &self,
        xs: &[Vec<f32>],
        _rows: usize,
        _cols: usize,
        d: D,
    ) -> std::result::Result<Vec<f32>, String> {
        if let [only] = self.others[..] {
            // mergekit returns the one model as it is, base or not.
            return Ok(xs[only].clone());
        }
        let mut vs = self.vectors(xs, d);
        let w = self.weights(d);
        let eps = self.eps as f32;
        // torch.norm(stacked, dim=-1): one row per model.
        let norms: Vec<f32> = vs.iter().map(|t| d.norm(t)).collect();
        // The vectors become their units in place, later the tangent vectors: besides the
        // operands at most two copies of each (those, and weighted copies to sum).
        for (v, &n) in vs.iter_mut().zip(&norms) {
            let den = d.qs(n + eps);
            v.iter_mut().for_each(|x| *x = d.qs(*x / den));
        }
        let mean = d.outer_sum(&refs(&weighted(&vs, &w, d)));
        let mean_norm = d.norm(&mean);
        if mean_norm < d.qs(eps) {
            if let [w0, w1] = w[..] {
                // Two models: mergekit falls back to the linear combination.
                drop(vs);
                let ts = self.vectors(xs, d);
                let a = d.map(&ts[0], |x| x * w0);
                let b = d.map(&ts[1], |x| x * w1);
                return Ok(self.add_base(xs, d.zip(&a, &b, |x, y| x + y), d));
            }
            return Err(ZERO_MEAN.into());
        }
        let mean = d.map(&mean, |x| x / mean_norm);
        // The units become the tangent vectors.
        for u in vs.iter_mut() {
            let dot = d.sum(&d.zip(u, &mean, |x, y| x * y));
            for (x, &m) in u.iter_mut().zip(&mean) {
                *x = d.qs(*x - d.qs(dot * m));
            }
        }
        let tangents = vs;
        let tangent = d.outer_sum(&refs(&weighted(&tangents, &w, d)));
        let tn = d.qs(d.norm(&tangent) + eps);
        let (c, s) = (d.cos(tn), d.qs(d.sin(tn) / tn));
        let a = d.map(&mean, |m| m * c);
        let b = d.map(&tangent, |x| x * s);
        let scaled: Vec<f32> = norms.iter().zip(&w).map(|(&n, &wi)| d.qs(n * wi)).collect();
        let avg_norm = d.sum(&scaled);
        let result = d.map(&d.zip(&a, &b, |x, y| x + y), |x| x * avg_norm);
        Ok(self.add_base(xs, result, d))
    }

    /// Everything multislerp computes stays in the span of the unit vectors, so one pass for
    /// their Gram matrix (in f64) gives every norm and dot product; a second pass writes
    /// the result as a combination of the inputs.
    fn stream(&self, ctx: &StreamCtx<'_>, d: D) -> Result<()> {
        if let [only] = self.others[..] {
            return ctx.pass(|rows, xs| ctx.emit(rows, &xs[only]));
        }
        let n = self.others.len();
        let mut gram = vec![vec![0f64; n]; n];
        ctx.pass(|_, xs| {
            let ts = self.vectors(&xs, d);
            for i in 0..n {
                for j in i..n {
                    let s: f64 = ts[i]
                        .iter()
                        .zip(&ts[j])
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum();
                    gram[i][j] += s;
                }
            }
            Ok(())
        })?;
        // Only the upper triangle was summed.
        let gram = |i: usize, j: usize| gram[i.min(j)][i.max(j)];
        let w: Vec<f64> = self.weights(d).iter().map(|&x| x as f64).collect();
        let eps = self.eps as f32 as f64;
        let norms: Vec<f64> = (0..n).map(|i| gram(i, i).sqrt()).collect();
        let den: Vec<f64> = norms.iter().map(|&x| x + eps).collect();
        // The Gram matrix of the unit vectors, and quadratic forms in it.
        let unit = |i: usize, j: usize| gram(i, j) / (den[i] * den[j]);
        let quad = |c: &[f64]| -> f64 {
            let mut s = 0.0;
            for i in 0..n {
                for j in 0..n {
                    s += c[i] * c[j] * unit(i, j);
                }
            }
            s
        };
        // Coefficients over the units: mean, tangent, result.
        let mean_norm = quad(&w).max(0.0).sqrt();
        let coef: Vec<f64> = if mean_norm < eps {
            if n != 2 {
                return Err(Error::invalid(ZERO_MEAN));
            }
            // Linear fallback, written below in terms of units: w_i·t_i = w_i·den_i·u_i.
            (0..n).map(|i| w[i] * den[i]).collect()
        } else {
            let a: Vec<f64> = w.iter().map(|&x| x / mean_norm).collect();
            let dots: Vec<f64> = (0..n)
                .map(|i| (0..n).map(|j| unit(i, j) * a[j]).sum())
                .collect();
            let along: f64 = (0..n).map(|i| w[i] * dots[i]).sum();
            let b: Vec<f64> = (0..n).map(|j| w[j] - along * a[j]).collect();
            let tn = quad(&b).max(0.0).sqrt() + eps;
            let (c, s) = (tn.cos(), tn.sin() / tn);
            let avg_norm: f64 = (0..n).map(|i| norms[i] * w[i]).sum();
            (0..n).map(|j| (a[j] * c + b[j] * s) * avg_norm).collect()
        };
        // Per input: coefficient of the (task) vector itself.
        let per_t: Vec<f64> = (0..n).map(|j| coef[j] / den[j]).collect();
        ctx.pass(|rows, xs| {
            let ts = self.vectors(&xs, d);
            let len = ts.first().map_or(0, |t| t.len());
            let mut out: Vec<f32> = (0..len)
                .map(|k| (0..n).map(|j| per_t[j] * ts[j][k] as f64).sum::<f64>() as f32)
                .collect();
            d.q(&mut out);
            ctx.emit(rows, &self.add_base(&xs, out, d))
        })
    }
}
