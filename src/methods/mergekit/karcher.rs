//! `karcher`: the equally weighted Karcher (Riemannian) mean of all the models on the unit
//! hypersphere, found by at most `max_iter` gradient steps, scaled back by the mean norm.

use std::sync::Arc;

use super::arith::D;
use super::method::{
    Capability, MergeMethod, Need, Param, PrepareError, Resolved, Scope, TensorMerge, Value,
};
use super::stream::StreamCtx;
use crate::dtype::DType;
use crate::error::Result;
use crate::methods::torch_compat as tc;

pub struct Karcher;

impl MergeMethod for Karcher {
    fn name(&self) -> &'static str {
        "karcher"
    }

    fn params(&self) -> &'static [Param] {
        const P: &[Param] = &[
            Param::number("max_iter", Scope::Tensor, Need::Default(Value::Number(10.0))),
            Param::number("tol", Scope::Tensor, Need::Default(Value::Number(1e-5))),
        ];
        P
    }

    fn needs_base(&self) -> bool {
        false
    }

    fn prepare(&self, p: &Resolved) -> std::result::Result<Arc<dyn TensorMerge>, PrepareError> {
        Ok(Arc::new(KarcherMerge {
            inputs: p.inputs,
            max_iter: integer("max_iter", p.need_number("max_iter")?)?,
            tol: p.need_number("tol")?,
        }))
    }
}

/// mergekit validates `int` parameters with pydantic: a finite number without a fractional
/// part (3.0 is 3), within 64 bits.
fn integer(name: &str, v: f64) -> std::result::Result<i64, PrepareError> {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 9.2e18 {
        Ok(v as i64)
    } else {
        Err(PrepareError::Invalid(format!(
            "parameter `{name}` must be an integer, not {v}"
        )))
    }
}

#[derive(Debug)]
struct KarcherMerge {
    /// Every operand takes part (the base too, as in mergekit), each weighted 1/n.
    inputs: usize,
    max_iter: i64,
    tol: f64,
}

/// mergekit takes the norms of f32 copies (`vector_norm(t.to(float32))`) and keeps them in
/// f32; scalar results of f32 tensors (cos, sin of the tangent norm) are f32 too.
fn norm32(x: &[f32]) -> f32 {
    tc::norm_f32(x)
}

const F32: D = D(DType::F32);

/// `torch.dot`: products and sum in f32 (for f16/bf16 too: the products of 16-bit floats
/// are exact), the result rounded to D. MKL's `sdot` sums in an order of its own; torch's
/// sum order stands in for it.
fn dot(a: &[f32], b: &[f32], d: D) -> f32 {
    let prod: Vec<f32> = a.iter().zip(b).map(|(&x, &y)| x * y).collect();
    d.qs(tc::sum_f32(&prod))
}

impl KarcherMerge {
    fn alpha(&self) -> f64 {
        1.0 / self.inputs as f64
    }

    /// `sum(t * 0 for t in tensors)`: zeros (NaN where an input is not finite).
    fn zeros(xs: &[Vec<f32>], d: D) -> Vec<f32> {
        let mut out = vec![0f32; xs.first().map_or(0, |x| x.len())];
        for x in xs {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = d.qs(*o + d.qs(v * 0.0));
            }
        }
        out
    }
}

impl TensorMerge for KarcherMerge {
    fn capability(&self) -> Capability {
        Capability::Streamed
    }

    /// The operands, their unit vectors, and the mean, tangent and their temporaries.
    fn copies_per_operand(&self) -> u64 {
        // 3.0 and a little more (measured by `tests/method_memory`).
        4
    }

    /// mergekit's operations in order, each rounded to D.
    fn merge(&self, xs: &[Vec<f32>], _rows: usize, _cols: usize, d: D) -> Vec<f32> {
        if let [only] = xs {
            return only.clone();
        }
        let len = xs.first().map_or(0, |x| x.len());
        let norms: Vec<f32> = xs.iter().map(|x| norm32(x)).collect();
        let units: Vec<Vec<f32>> = xs
            .iter()
            .zip(&norms)
            .map(|(x, &n)| {
                if n == 0.0 {
                    vec![0.0; len]
                } else {
                    d.map(x, |v| v / n)
                }
            })
            .collect();
        let valid: Vec<usize> = (0..xs.len())
            .filter(|&i| norms[i] as f64 > self.tol)
            .collect();
        if valid.is_empty() {
            return Self::zeros(xs, d);
        }
        let alpha_sum: f64 = valid.iter().map(|_| self.alpha()).sum();
        let alphas: Vec<f32> = valid
            .iter()
            .map(|_| (self.alpha() / alpha_sum) as f32)
            .collect();
        let units: Vec<&[f32]> = valid.iter().map(|&i| units[i].as_slice()).collect();

        // Elementwise steps are fused per element (each still rounded to D as torch
        // rounds every operation) so that only the mean and the tangent are held besides
        // the units.
        let mut mean = vec![0f32; len];
        for (&a, u) in alphas.iter().zip(&units) {
            for (m, &x) in mean.iter_mut().zip(u.iter()) {
                *m = d.qs(*m + d.qs(a * x));
            }
        }
        let mean_norm = norm32(&mean);
        if (mean_norm as f64) < self.tol {
            mean.copy_from_slice(units[0]);
        } else {
            mean.iter_mut().for_each(|m| *m = d.qs(*m / mean_norm));
        }
        let mut tangent = vec![0f32; len];
        for _ in 0..self.max_iter.max(0) {
            tangent.fill(0.0);
            for (&a, u) in alphas.iter().zip(&units) {
                let dot = dot(&mean, u, d).clamp(-1.0, 1.0);
                let theta = d.acos(dot);
                if (theta as f64) < self.tol {
                    continue;
                }
                let coef = d.qs(a * d.qs(theta / d.sin(theta)));
                for ((t, &m), &x) in tangent.iter_mut().zip(&mean).zip(u.iter()) {
                    let step = d.qs(coef * d.qs(x - d.qs(dot * m)));
                    *t = d.qs(*t + step);
                }
            }
            let tn = norm32(&tangent);
            if (tn as f64) < self.tol {
                break;
            }
            // An f32 0-d tensor times a D tensor: torch casts the left operand to D (only
            // a right-hand scalar keeps its f32 value, as in `tangent / tn`).
            let (c, s) = (d.qs(F32.cos(tn)), d.qs(F32.sin(tn)));
            for (m, &t) in mean.iter_mut().zip(&tangent) {
                *m = d.qs(d.qs(c * *m) + d.qs(s * d.qs(t / tn)));
            }
            let unit_norm = norm32(&mean);
            if unit_norm as f64 > self.tol {
                mean.iter_mut().for_each(|m| *m = d.qs(*m / unit_norm));
            }
        }
        // Python's sum over every input (valid or not) of f32 products.
        let mut scale = 0f32;
        for &n in &norms {
            scale += (self.alpha() as f32) * n;
        }
        let scale = d.qs(scale);
        d.map(&mean, |m| scale * m)
    }

    /// The mean stays in the span of the unit vectors, so the iteration runs on coefficients
    /// over them with the Gram matrix from one pass (in f64); a second pass writes the result.
    fn stream(&self, ctx: &StreamCtx<'_>, d: D) -> Result<()> {
        let n = self.inputs;
        if n == 1 {
            return ctx.pass(|rows, xs| ctx.emit(rows, &xs[0]));
        }
        let mut gram = vec![vec![0f64; n]; n];
        ctx.pass(|_, xs| {
            for i in 0..n {
                for j in i..n {
                    gram[i][j] += xs[i]
                        .iter()
                        .zip(&xs[j])
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>();
                }
            }
            Ok(())
        })?;
        let norms: Vec<f64> = (0..n).map(|i| gram[i][i].sqrt()).collect();
        let valid: Vec<usize> = (0..n)
            .filter(|&i| norms[i] as f32 as f64 > self.tol)
            .collect();
        if valid.is_empty() {
            return ctx.pass(|rows, xs| ctx.emit(rows, &Self::zeros(&xs, d)));
        }
        let m = valid.len();
        // Gram matrix of the valid unit vectors.
        let u: Vec<Vec<f64>> = valid
            .iter()
            .map(|&i| {
                valid
                    .iter()
                    .map(|&j| gram[i.min(j)][i.max(j)] / (norms[i] * norms[j]))
                    .collect()
            })
            .collect();
        let apply = |c: &[f64], k: usize| -> f64 { (0..m).map(|j| u[k][j] * c[j]).sum() };
        let norm = |c: &[f64]| -> f64 {
            (0..m)
                .map(|k| c[k] * apply(c, k))
                .sum::<f64>()
                .max(0.0)
                .sqrt()
        };
        let alphas = vec![1.0 / m as f64; m];
        let mut mean = alphas.clone();
        let mean_norm = norm(&mean);
        if mean_norm < self.tol {
            mean = (0..m).map(|k| if k == 0 { 1.0 } else { 0.0 }).collect();
        } else {
            mean.iter_mut().for_each(|c| *c /= mean_norm);
        }
        for _ in 0..self.max_iter.max(0) {
            let mut tangent = vec![0f64; m];
            for k in 0..m {
                let dot = apply(&mean, k).clamp(-1.0, 1.0);
                let theta = dot.acos();
                if theta < self.tol {
                    continue;
                }
                let coef = alphas[k] * theta / theta.sin();
                for j in 0..m {
                    tangent[j] -= coef * dot * mean[j];
                }
                tangent[k] += coef;
            }
            let tn = norm(&tangent);
            if tn < self.tol {
                break;
            }
            for j in 0..m {
                mean[j] = tn.cos() * mean[j] + tn.sin() * tangent[j] / tn;
            }
            let un = norm(&mean);
            if un > self.tol {
                mean.iter_mut().for_each(|c| *c /= un);
            }
        }
        let scale: f64 = norms.iter().map(|&x| self.alpha() * x).sum();
        // Coefficient of each input tensor itself.
        let per_x: Vec<(usize, f64)> = valid
            .iter()
            .zip(&mean)
            .map(|(&i, &c)| (i, scale * c / norms[i]))
            .collect();
        ctx.pass(|rows, xs| {
            let len = xs.first().map_or(0, |x| x.len());
            let mut out: Vec<f32> = (0..len)
                .map(|k| {
                    per_x
                        .iter()
                        .map(|&(i, c)| c * xs[i][k] as f64)
                        .sum::<f64>() as f32
                })
                .collect();
            d.q(&mut out);
            ctx.emit(rows, &out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_iter_is_validated_as_pydantic_does() {
        assert_eq!(integer("max_iter", 3.0), Ok(3));
        assert_eq!(integer("max_iter", -2.0), Ok(-2));
        for bad in [2.5, f64::NAN, f64::INFINITY, 1e20] {
            assert!(integer("max_iter", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn two_orthogonal_unit_vectors_meet_halfway() {
        let m = KarcherMerge {
            inputs: 2,
            max_iter: 10,
            tol: 1e-5,
        };
        let out = m.merge(&[vec![1.0, 0.0], vec![0.0, 1.0]], 1, 2, D(DType::F32));
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!((out[0] - h).abs() < 1e-6 && (out[1] - h).abs() < 1e-6, "{out:?}");
    }
}
