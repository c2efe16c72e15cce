//! `nuslerp`: spherical interpolation of two models (or of their task vectors, when a base is
//! given) with `t` from their weights; over the flattened tensor (`nuslerp_flatten`, the
//! default, which wins over `nuslerp_row_wise`), per vector along the last dim, or per vector
//! along dim 0 (`nuslerp_row_wise`).

use std::borrow::Cow;
use std::sync::Arc;

use super::arith::D;
use super::method::{
    EXACT_ORDER_MAX,
    Capability, InputCount, MergeMethod, Need, Param, PrepareError, Resolved, Scope, TensorMerge,
};
use super::stream::{BLOCK_ELEMS, Chunk, LaneSum, StreamCtx, blocks};
use crate::error::Result;
use crate::kernels;

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
            axis: Axis::of(
                p.need_flag("nuslerp_flatten")?,
                p.need_flag("nuslerp_row_wise")?,
                &p.shape,
            ),
        }))
    }
}

/// The vectors nuslerp interpolates between, as mergekit 0.1.5 picks them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Axis {
    /// The whole tensor as one vector.
    Flat,
    /// Vectors along the last dim, of this length.
    Last(usize),
    /// Vectors along dim 0: the columns of the rows × (other dims) layout.
    First,
}

impl Axis {
    fn of(flatten: bool, row_wise: bool, shape: &[u64]) -> Axis {
        // mergekit checks `flatten` first, so it wins over `row_wise`; for a tensor of rank
        // ≤ 1 both the last dim and `transpose(0, -1)` are the whole vector.
        if flatten || shape.len() <= 1 {
            Axis::Flat
        } else if row_wise {
            Axis::First
        } else {
            Axis::Last(shape.last().map_or(1, |&n| n as usize))
        }
    }
}

#[derive(Debug)]
struct NuSlerpMerge {
    t: f64,
    /// The two interpolated operands and the base whose task vectors they become.
    i0: usize,
    i1: usize,
    base: Option<usize>,
    axis: Axis,
}

impl NuSlerpMerge {
    /// The vectors to interpolate: task vectors relative to the base, when there is one.
    fn vectors<'a>(&self, xs: &'a [Vec<f32>], d: D) -> (Cow<'a, [f32]>, Cow<'a, [f32]>) {
        match self.base {
            Some(b) => (
                Cow::Owned(d.zip(&xs[self.i0], &xs[b], |x, y| x - y)),
                Cow::Owned(d.zip(&xs[self.i1], &xs[b], |x, y| x - y)),
            ),
            None => (Cow::Borrowed(&xs[self.i0]), Cow::Borrowed(&xs[self.i1])),
        }
    }

    fn finish(&self, xs: &[Vec<f32>], out: Vec<f32>, d: D) -> Vec<f32> {
        match self.base {
            Some(b) => d.zip(&xs[b], &out, |x, y| x + y),
            None => out,
        }
    }

    /// Vectors along the last dim, each on its own (chunks hold whole rows, so whole vectors).
    fn last_dim(&self, v0: &[f32], v1: &[f32], len: usize, d: D) -> Vec<f32> {
        let len = len.max(1);
        let mut out = Vec::with_capacity(v0.len());
        for (a, b) in v0.chunks(len).zip(v1.chunks(len)) {
            out.extend(nuslerp_vec(self.t, a, b, d));
        }
        out
    }
}

impl TensorMerge for NuSlerpMerge {
    /// Operands, normalized copies, products and the result: 3.5 copies (measured by `tests/method_memory`).
    fn copies_per_operand(&self) -> u64 {
        4
    }

    fn capability(&self) -> Capability {
        Capability::Streamed
    }

    fn prefers_streaming(&self, numel: u64) -> bool {
        numel > EXACT_ORDER_MAX
    }

    fn merge(&self, xs: &[Vec<f32>], rows: usize, cols: usize, d: D) -> Vec<f32> {
        let t = self.t;
        let (v0, v1) = self.vectors(xs, d);
        let out = match self.axis {
            Axis::Flat => nuslerp_vec(t, &v0, &v1, d),
            Axis::Last(len) => self.last_dim(&v0, &v1, len, d),
            Axis::First => {
                // mergekit transposes dim 0 to the end: the norms are then torch's generic
                // strided reduction (sequential per column) and the dot products the sum over
                // an outer dim, i.e. `stack(rows).sum(0)`.
                let cols = cols.max(1);
                let eps = nuslerp_eps(d);
                let col = |v: &[f32], c: usize| -> f32 {
                    d.norm_strided((0..rows).map(|r| v[r * cols + c])).max(eps)
                };
                let n0: Vec<f32> = (0..cols).map(|c| col(&v0, c)).collect();
                let n1: Vec<f32> = (0..cols).map(|c| col(&v1, c)).collect();
                let prod: Vec<f32> = v0
                    .iter()
                    .zip(v1.iter())
                    .enumerate()
                    .map(|(i, (&a, &b))| {
                        let c = i % cols;
                        d.qs(d.qs(a / n0[c]) * d.qs(b / n1[c]))
                    })
                    .collect();
                let row_refs: Vec<&[f32]> = prod.chunks(cols).collect();
                let coeffs: Vec<NuCoeffs> = d
                    .outer_sum(&row_refs)
                    .into_iter()
                    .map(|c| nuslerp_coefficients(t, c.clamp(-1.0, 1.0), d))
                    .collect();
                v0.iter()
                    .zip(v1.iter())
                    .enumerate()
                    .map(|(i, (&a, &b))| apply1(coeffs[i % cols], a, b, d))
                    .collect()
            }
        };
        self.finish(xs, out, d)
    }

    /// Last dim: one pass. Flattened or along dim 0: norms, then cosines, then the output.
    fn stream(&self, ctx: &StreamCtx<'_>, d: D) -> Result<()> {
        match self.axis {
            Axis::Last(len) => ctx.pass(|rows, xs| {
                let (v0, v1) = self.vectors(&xs, d);
                let out = self.last_dim(&v0, &v1, len, d);
                ctx.emit(rows, &self.finish(&xs, out, d))
            }),
            Axis::Flat => self.stream_flat(ctx, d),
            Axis::First => self.stream_columns(ctx, d),
        }
    }
}

impl NuSlerpMerge {
    /// The whole tensor as one vector: the norms and the dot product accumulate in f64.
    /// Each pass reads the operands a block at a time.
    fn stream_flat(&self, ctx: &StreamCtx<'_>, d: D) -> Result<()> {
        let eps = nuslerp_eps(d);
        let at = |rows: &std::ops::Range<u64>| rows.start as usize * ctx.cols;
        let mut bufs = [vec![0f32; BLOCK_ELEMS], vec![0f32; BLOCK_ELEMS], vec![0f32; BLOCK_ELEMS]];
        let (mut s0, mut s1) = (LaneSum::default(), LaneSum::default());
        self.blocks(ctx, d, &mut bufs, |rows, start, [v0, v1, _]| {
            let i = at(rows) + start;
            kernels::vectorized(
                #[inline(always)]
                || {
                    LaneSum::add_zip(
                        [&mut s0, &mut s1],
                        i,
                        v0,
                        v1,
                        #[inline(always)]
                        |a, b| [(a as f64) * (a as f64), (b as f64) * (b as f64)],
                    );
                },
            );
        })?;
        let norm = |s: LaneSum| d.qs(s.total().sqrt() as f32).max(eps);
        let (n0, n1) = (norm(s0), norm(s1));
        let mut dot = LaneSum::default();
        self.blocks(ctx, d, &mut bufs, |rows, start, [v0, v1, _]| {
            let i = at(rows) + start;
            // (v0/‖v0‖)·(v1/‖v1‖), each operation rounded to D as torch does.
            kernels::vectorized(
                #[inline(always)]
                || {
                    for a in v0.iter_mut() {
                        *a /= n0;
                    }
                    d.q(v0);
                    for b in v1.iter_mut() {
                        *b /= n1;
                    }
                    d.q(v1);
                    for (a, &b) in v0.iter_mut().zip(v1.iter()) {
                        *a *= b;
                    }
                    d.q(v0);
                    dot.add(i, v0);
                },
            );
        })?;
        let c = nuslerp_coefficients(self.t, d.qs(dot.total() as f32).clamp(-1.0, 1.0), d);
        ctx.pass_chunks(|rows, chunk| {
            let n = chunk.len(self.i0);
            let mut out = ctx.output(rows.start, n);
            let [v0, v1, o] = &mut bufs;
            let mut base = vec![0f32; if self.base.is_some() { BLOCK_ELEMS } else { 0 }];
            for blk in blocks(0..n, BLOCK_ELEMS) {
                let (start, len) = (blk.start, blk.len());
                let (v0, v1, o) = (&mut v0[..len], &mut v1[..len], &mut o[..len]);
                self.read_vectors(&chunk, start, d, v0, v1, &mut base);
                kernels::vectorized(
                    #[inline(always)]
                    || {
                        nuslerp_apply_into(c, v0, v1, d, o);
                        if self.base.is_some() {
                            // `base + out`, rounded to D.
                            for (x, &b) in o.iter_mut().zip(&base[..len]) {
                                *x += b;
                            }
                            d.q(o);
                        }
                    },
                );
                out.push(o);
            }
            ctx.emit_output(rows, out)
        })
    }

    /// Elements `start..start + v0.len()` of the interpolated vectors (task vectors when
    /// there is a base, whose values are left in `base`).
    fn read_vectors(
        &self,
        c: &Chunk,
        start: usize,
        d: D,
        v0: &mut [f32],
        v1: &mut [f32],
        base: &mut [f32],
    ) {
        c.read(self.i0, start, v0);
        c.read(self.i1, start, v1);
        if let Some(b) = self.base {
            let base = &mut base[..v0.len()];
            c.read(b, start, base);
            for v in [&mut *v0, &mut *v1] {
                for (x, &y) in v.iter_mut().zip(base.iter()) {
                    *x -= y;
                }
                d.q(v);
            }
        }
    }

    /// One pass over the interpolated vectors, a block at a time (in the first two of
    /// the three buffers; the third is scratch).
    fn blocks(
        &self,
        ctx: &StreamCtx<'_>,
        d: D,
        bufs: &mut [Vec<f32>; 3],
        mut f: impl FnMut(&std::ops::Range<u64>, usize, [&mut [f32]; 3]),
    ) -> Result<()> {
        let mut base = vec![0f32; if self.base.is_some() { BLOCK_ELEMS } else { 0 }];
        ctx.pass_chunks(|rows, c| {
            let n = c.len(self.i0);
            for blk in blocks(0..n, BLOCK_ELEMS) {
                let (start, len) = (blk.start, blk.len());
                let [v0, v1, s] = bufs;
                let (v0, v1, s) = (&mut v0[..len], &mut v1[..len], &mut s[..len]);
                self.read_vectors(&c, start, d, v0, v1, &mut base);
                f(&rows, start, [v0, v1, s]);
            }
            Ok(())
        })
    }

    /// Vectors along dim 0 (the columns): torch's norm down each column is a sequential f32
    /// sum, which chunks in row order reproduce exactly; the dot products accumulate in f64.
    fn stream_columns(&self, ctx: &StreamCtx<'_>, d: D) -> Result<()> {
        let cols = ctx.cols.max(1);
        let eps = nuslerp_eps(d);
        let (mut sq0, mut sq1) = (vec![0f32; cols], vec![0f32; cols]);
        ctx.pass(|_, xs| {
            let (v0, v1) = self.vectors(&xs, d);
            for (j, (&a, &b)) in v0.iter().zip(v1.iter()).enumerate() {
                sq0[j % cols] += a * a;
                sq1[j % cols] += b * b;
            }
            Ok(())
        })?;
        let norms = |sq: &[f32]| -> Vec<f32> { sq.iter().map(|q| d.qs(q.sqrt()).max(eps)).collect() };
        let (n0, n1) = (norms(&sq0), norms(&sq1));
        let mut dots = vec![0f64; cols];
        ctx.pass(|_, xs| {
            let (v0, v1) = self.vectors(&xs, d);
            for (j, (&a, &b)) in v0.iter().zip(v1.iter()).enumerate() {
                let g = j % cols;
                let u = d.qs(d.qs(a / n0[g]) * d.qs(b / n1[g]));
                dots[g] += u as f64;
            }
            Ok(())
        })?;
        let coeffs: Vec<NuCoeffs> = dots
            .iter()
            .map(|&c| nuslerp_coefficients(self.t, d.qs(c as f32).clamp(-1.0, 1.0), d))
            .collect();
        ctx.pass(|rows, xs| {
            let (v0, v1) = self.vectors(&xs, d);
            let out: Vec<f32> = v0
                .iter()
                .zip(v1.iter())
                .enumerate()
                .map(|(j, (&a, &b))| apply1(coeffs[j % cols], a, b, d))
                .collect();
            ctx.emit(rows, &self.finish(&xs, out, d))
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

/// One element of the result, each torch operation rounded to D.
fn apply1(c: NuCoeffs, a: f32, b: f32, d: D) -> f32 {
    match c {
        NuCoeffs::Lerp(a0, a1) => d.qs(d.qs(a0 * a) + d.qs(a1 * b)),
        NuCoeffs::Slerp(s0, s1, st) => d.qs(d.qs(d.qs(s0 * a) + d.qs(s1 * b)) / st),
    }
}

/// [`apply1`] over a block into `out`, each rounding a vector kernel (`v0` is overwritten).
#[inline(always)]
fn nuslerp_apply_into(c: NuCoeffs, v0: &mut [f32], v1: &[f32], d: D, out: &mut [f32]) {
    let (c0, c1, div) = match c {
        NuCoeffs::Lerp(a0, a1) => (a0, a1, None),
        NuCoeffs::Slerp(s0, s1, st) => (s0, s1, Some(st)),
    };
    for (o, &a) in out.iter_mut().zip(v0.iter()) {
        *o = c0 * a;
    }
    d.q(out);
    for (t, &b) in v0.iter_mut().zip(v1) {
        *t = c1 * b;
    }
    d.q(v0);
    for (o, &t) in out.iter_mut().zip(v0.iter()) {
        *o += t;
    }
    d.q(out);
    if let Some(st) = div {
        for o in out.iter_mut() {
            *o /= st;
        }
        d.q(out);
    }
}


/// [`apply1`] over whole vectors, block by block.
fn nuslerp_apply(c: NuCoeffs, v0: &[f32], v1: &[f32], d: D) -> Vec<f32> {
    let mut out = vec![0f32; v0.len()];
    let mut tmp = vec![0f32; BLOCK_ELEMS.min(v0.len())];
    for ((o, a), b) in out
        .chunks_mut(BLOCK_ELEMS)
        .zip(v0.chunks(BLOCK_ELEMS))
        .zip(v1.chunks(BLOCK_ELEMS))
    {
        let t = &mut tmp[..o.len()];
        t.copy_from_slice(a);
        nuslerp_apply_into(c, t, b, d, o);
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    #[test]
    fn axis_follows_mergekit() {
        let conv = [32, 3, 8, 8];
        // flatten wins over row_wise.
        assert_eq!(Axis::of(true, true, &conv), Axis::Flat);
        assert_eq!(Axis::of(false, false, &conv), Axis::Last(8));
        assert_eq!(Axis::of(false, true, &conv), Axis::First);
        // A 1-D tensor is one vector whatever the flags.
        for (f, r) in [(false, false), (false, true), (true, false)] {
            assert_eq!(Axis::of(f, r, &[32]), Axis::Flat);
        }
    }

    #[test]
    fn row_wise_interpolates_each_column_on_its_own() {
        // Two columns: the first colinear (lerp), the second orthogonal (slerp by t = 1/2).
        let m = NuSlerpMerge {
            t: 0.5,
            i0: 0,
            i1: 1,
            base: None,
            axis: Axis::First,
        };
        let v0 = vec![1.0, 1.0, 0.0, 0.0];
        let v1 = vec![2.0, 0.0, 0.0, 1.0];
        let out = m.merge(&[v0, v1], 2, 2, D(DType::F32));
        assert_eq!(out[0], 1.5);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!((out[1] - h).abs() < 1e-6 && (out[3] - h).abs() < 1e-6, "{out:?}");
    }
}
