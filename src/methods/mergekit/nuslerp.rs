//! `nuslerp`: spherical interpolation of two models (or of their task vectors, when a base is
//! given) with `t` from their weights; over the flattened tensor, per row, or per column
//! (`nuslerp_row_wise`).

use std::sync::Arc;

use super::arith::D;
use super::method::{
    Capability, InputCount, MergeMethod, Need, Param, PrepareError, Resolved, Scope, TensorMerge,
};
use super::stream::StreamCtx;
use crate::error::Result;

pub struct NuSlerp;

impl MergeMethod for NuSlerp {
    fn name(&self) -> &'static str {
        "nuslerp"
    }

    fn params(&self) -> &'static [Param] {
        const P: &[Param] = &[
            Param::number("weight", Scope::Input, Need::RequiredUnlessBase),
            Param::flag("nuslerp_flatten", true),
            Param::flag("nuslerp_row_wise", false),
        ];
        P
    }

    fn needs_base(&self) -> bool {
        false
    }

    fn check_inputs(&self, n: InputCount) -> std::result::Result<(), String> {
        if n.others != 2 {
            return Err("nuslerp merges exactly two models besides the base".into());
        }
        Ok(())
    }

    fn prepare(&self, p: &Resolved) -> std::result::Result<Arc<dyn TensorMerge>, PrepareError> {
        let others = p.others();
        let [i0, i1] = others[..] else {
            return Err(PrepareError::Invalid(
                "nuslerp merges exactly two models besides the base".into(),
            ));
        };
        let (w0, w1) = (
            p.need_input_number(i0, "weight")?,
            p.need_input_number(i1, "weight")?,
        );
        let total = w0 + w1;
        Ok(Arc::new(NuSlerpMerge {
            t: if total.abs() < 1e-6 { 0.5 } else { w1 / total },
            i0,
            i1,
            base: p.base,
            flatten: p.need_flag("nuslerp_flatten")?,
            row_wise: p.need_flag("nuslerp_row_wise")?,
        }))
    }
}

#[derive(Debug)]
struct NuSlerpMerge {
    t: f64,
    /// The two interpolated operands and the base whose task vectors they become.
    i0: usize,
    i1: usize,
    base: Option<usize>,
    flatten: bool,
    row_wise: bool,
}

impl NuSlerpMerge {
    /// The vectors to interpolate: task vectors relative to the base, when there is one.
    fn vectors(&self, xs: &[Vec<f32>], d: D) -> (Vec<f32>, Vec<f32>) {
        match self.base {
            Some(b) => (
                d.zip(&xs[self.i0], &xs[b], |x, y| x - y),
                d.zip(&xs[self.i1], &xs[b], |x, y| x - y),
            ),
            None => (xs[self.i0].clone(), xs[self.i1].clone()),
        }
    }

    fn finish(&self, xs: &[Vec<f32>], out: Vec<f32>, d: D) -> Vec<f32> {
        match self.base {
            Some(b) => d.zip(&xs[b], &out, |x, y| x + y),
            None => out,
        }
    }
}

impl TensorMerge for NuSlerpMerge {
    fn capability(&self) -> Capability {
        Capability::Streamed
    }

    fn merge(&self, xs: &[Vec<f32>], rows: usize, cols: usize, d: D) -> Vec<f32> {
        let t = self.t;
        let (v0, v1) = self.vectors(xs, d);
        let out = if self.row_wise {
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
        } else if !self.flatten {
            let mut out = Vec::with_capacity(rows * cols);
            for (a, b) in v0.chunks(cols.max(1)).zip(v1.chunks(cols.max(1))) {
                out.extend(nuslerp_vec(t, a, b, d));
            }
            out
        } else {
            nuslerp_vec(t, &v0, &v1, d)
        };
        self.finish(xs, out, d)
    }

    /// Per row: one pass. Flattened or per column: norms, then cosines, then the output.
    fn stream(&self, ctx: &StreamCtx<'_>, d: D) -> Result<()> {
        let cols = ctx.cols.max(1);
        let t = self.t;
        let eps = nuslerp_eps(d);
        if !self.flatten && !self.row_wise {
            // Every chunk holds whole rows.
            return ctx.pass(|rows, xs| {
                let (v0, v1) = self.vectors(&xs, d);
                let mut out = Vec::with_capacity(v0.len());
                for (a, b) in v0.chunks(cols).zip(v1.chunks(cols)) {
                    let n0 = d.norm(a).max(eps);
                    let n1 = d.norm(b).max(eps);
                    let u: Vec<f32> =
                        d.zip(&d.map(a, |x| x / n0), &d.map(b, |x| x / n1), |x, y| x * y);
                    let c = d.sum(&u).clamp(-1.0, 1.0);
                    out.extend(nuslerp_apply(nuslerp_coefficients(t, c, d), a, b, d));
                }
                (ctx.emit)(rows, &self.finish(&xs, out, d))
            });
        }
        let groups = if self.row_wise { cols } else { 1 };
        let group = |j: usize| if self.row_wise { j % cols } else { 0 };
        let (mut ss0, mut ss1) = (vec![0f64; groups], vec![0f64; groups]);
        ctx.pass(|_, xs| {
            let (v0, v1) = self.vectors(&xs, d);
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
            let (v0, v1) = self.vectors(&xs, d);
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
            let (v0, v1) = self.vectors(&xs, d);
            let out = if groups == 1 {
                nuslerp_apply(coeffs[0], &v0, &v1, d)
            } else {
                v0.iter()
                    .zip(&v1)
                    .enumerate()
                    .map(|(j, (&a, &b))| nuslerp_apply(coeffs[group(j)], &[a], &[b], d)[0])
                    .collect()
            };
            (ctx.emit)(rows, &self.finish(&xs, out, d))
        })
    }
}

/// How nuslerp combines v0 and v1 once the cosine is known.
#[derive(Clone, Copy, Debug)]
enum NuCoeffs {
    /// Colinear: `(1−t)·v0 + t·v1`.
    Lerp(f32, f32),
    /// `(s0·v0 + s1·v1) / sin θ`.
    Slerp(f32, f32, f32),
}

fn nuslerp_coefficients(t: f64, c: f32, d: D) -> NuCoeffs {
    let one_t = (1.0 - t) as f32;
    let tt = t as f32;
    if d.qs(1.0 - d.qs(c * c)) <= d.qs(1e-16) {
        return NuCoeffs::Lerp(one_t, tt);
    }
    let theta = d.acos(c);
    let st = d.sin(theta);
    NuCoeffs::Slerp(d.sin(d.qs(one_t * theta)), d.sin(d.qs(tt * theta)), st)
}

fn nuslerp_apply(c: NuCoeffs, v0: &[f32], v1: &[f32], d: D) -> Vec<f32> {
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
fn nuslerp_eps(d: D) -> f32 {
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
