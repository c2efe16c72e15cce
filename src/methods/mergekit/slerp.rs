//! `slerp`: spherical interpolation from the base (v0) towards the other model (v1) by `t`,
//! with the angle taken between the whole tensors.

use std::sync::Arc;

use super::arith::D;
use super::method::{
    EXACT_ORDER_MAX,
    Capability, InputCount, MergeMethod, Need, Param, PrepareError, Resolved, Scope, TensorMerge,
};
use super::stream::{BLOCK_ELEMS, LaneSum, StreamCtx, blocks};
use crate::dtype::DType;
use crate::error::Result;
use crate::kernels;
use crate::methods::torch_compat as tc;

pub struct Slerp;

impl MergeMethod for Slerp {
    fn name(&self) -> &'static str {
        "slerp"
    }

    fn params(&self) -> &'static [Param] {
        const P: &[Param] = &[Param::number("t", Scope::Tensor, Need::Required)];
        P
    }

    fn needs_base(&self) -> bool {
        true
    }

    fn check_inputs(&self, n: InputCount) -> std::result::Result<(), String> {
        if n.total != 2 {
            return Err("slerp merges exactly two models (the base and one other)".into());
        }
        Ok(())
    }

    fn prepare(&self, p: &Resolved) -> std::result::Result<Arc<dyn TensorMerge>, PrepareError> {
        let v0 = p.base.unwrap_or(0);
        Ok(Arc::new(SlerpMerge {
            t: p.need_number("t")? as f32,
            v0,
            v1: if v0 == 0 { 1 } else { 0 },
        }))
    }
}

#[derive(Debug)]
struct SlerpMerge {
    t: f32,
    /// Operand indices of the base and the other model.
    v0: usize,
    v1: usize,
}

impl TensorMerge for SlerpMerge {
    /// The operands, the normalized product and the result: 2.00 copies (measured by `tests/method_memory`).
    fn copies_per_operand(&self) -> u64 {
        2
    }

    fn capability(&self) -> Capability {
        Capability::Streamed
    }

    fn prefers_streaming(&self, numel: u64) -> bool {
        numel > EXACT_ORDER_MAX
    }

    fn merge(&self, xs: &[Vec<f32>], _rows: usize, _cols: usize, d: D) -> Vec<f32> {
        let (v0, v1) = (&xs[self.v0], &xs[self.v1]);
        let na = slerp_norm(tc::norm_f32(v0));
        let nb = slerp_norm(tc::norm_f32(v1));
        let prod: Vec<f32> = v0
            .iter()
            .zip(v1.iter())
            .map(|(&a, &b)| (a / na) * (b / nb))
            .collect();
        let dot = tc::sum_f32(&prod).clamp(-1.0, 1.0);
        let (ca, cb) = slerp_coefficients(dot, self.t);
        slerp_apply(ca, cb, v0, v1, d)
    }

    /// The norms and the dot product in one pass (in f64: the cosine is Σab / (‖a‖·‖b‖)),
    /// then the output; both read the operands a block at a time.
    fn stream(&self, ctx: &StreamCtx<'_>, d: D) -> Result<()> {
        let (i0, i1) = (self.v0, self.v1);
        let (mut s0, mut s1, mut s01) = (LaneSum::default(), LaneSum::default(), LaneSum::default());
        let (mut a, mut b, mut p) = (vec![0f32; BLOCK_ELEMS], vec![0f32; BLOCK_ELEMS], vec![0f32; BLOCK_ELEMS]);
        ctx.pass_chunks(|rows, c| {
            let at = rows.start as usize * ctx.cols;
            for blk in blocks(0..c.len(i0), BLOCK_ELEMS) {
                let (start, n) = (blk.start, blk.len());
                let (a, b) = (&mut a[..n], &mut b[..n]);
                c.read(i0, start, a);
                c.read(i1, start, b);
                kernels::vectorized(
                    #[inline(always)]
                    || {
                        LaneSum::add_zip(
                            [&mut s0, &mut s1, &mut s01],
                            at + start,
                            a,
                            b,
                            #[inline(always)]
                            |x, y| {
                                let (x64, y64) = (x as f64, y as f64);
                                [x64 * x64, y64 * y64, (x * y) as f64]
                            },
                        );
                    },
                );
            }
            Ok(())
        })?;
        let na = slerp_norm(s0.total().sqrt() as f32);
        let nb = slerp_norm(s1.total().sqrt() as f32);
        let dot = (s01.total() / (na as f64 * nb as f64)) as f32;
        let (ca, cb) = slerp_coefficients(dot.clamp(-1.0, 1.0), self.t);
        ctx.pass_chunks(|rows, c| {
            let mut out = ctx.output(rows.start, c.len(i0));
            for blk in blocks(0..c.len(i0), BLOCK_ELEMS) {
                let (start, n) = (blk.start, blk.len());
                let (a, b, p) = (&mut a[..n], &mut b[..n], &mut p[..n]);
                c.read(i0, start, a);
                c.read(i1, start, b);
                kernels::vectorized(
                    #[inline(always)]
                    || slerp_apply_into(ca, cb, a, b, d, p),
                );
                out.push(p);
            }
            ctx.emit_output(rows, out)
        })
    }
}


/// The norm slerp divides by: ‖v‖, or 1 for a (near) zero tensor.
fn slerp_norm(n: f32) -> f32 {
    if n <= 1e-8 { 1.0 } else { n }
}

/// slerp's coefficients of the unnormalized tensors, from the normalized dot product.
fn slerp_coefficients(dot: f32, t: f32) -> (f32, f32) {
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
fn slerp_apply(ca: f32, cb: f32, v0: &[f32], v1: &[f32], d: D) -> Vec<f32> {
    let mut out = vec![0f32; v0.len().min(v1.len())];
    slerp_apply_into(ca, cb, v0, v1, d, &mut out);
    out
}

/// [`slerp_apply`] into `out`.
#[inline(always)]
fn slerp_apply_into(ca: f32, cb: f32, v0: &[f32], v1: &[f32], d: D, out: &mut [f32]) {
    for ((o, &a), &b) in out.iter_mut().zip(v0).zip(v1) {
        *o = (ca * a) + (cb * b);
    }
    d.q(out);
}
