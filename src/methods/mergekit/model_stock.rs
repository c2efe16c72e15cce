//! `model_stock`: `t·mean(xᵢ) + (1−t)·base` with `t = N·cos / (1 + (N−1)·cos)` from the mean
//! pairwise cosine of the models' offsets from the base; with `filter_wise`, per vector along
//! the last dim (a 1-D tensor is one vector).

use std::sync::Arc;

use super::arith::D;
use super::method::{
    EXACT_ORDER_MAX,
    Capability, InputCount, MergeMethod, Param, PrepareError, Resolved, TensorMerge,
};
use super::stream::{BLOCK_ELEMS, LaneSum, StreamCtx, blocks};
use crate::error::Result;
use crate::kernels;

pub struct ModelStock;

impl MergeMethod for ModelStock {
    fn name(&self) -> &'static str {
        "model_stock"
    }

    fn params(&self) -> &'static [Param] {
        const P: &[Param] = &[Param::flag("filter_wise", false)];
        P
    }

    fn needs_base(&self) -> bool {
        true
    }

    fn check_inputs(&self, n: InputCount) -> std::result::Result<(), String> {
        if n.others < 2 {
            return Err("model_stock needs at least two models besides the base".into());
        }
        Ok(())
    }

    fn prepare(&self, p: &Resolved) -> std::result::Result<Arc<dyn TensorMerge>, PrepareError> {
        let base = p.base.unwrap_or(0);
        // mergekit reduces over the last dim (unsqueezing a 1-D tensor to one row), so a
        // conv weight's filters are its [o, c, h] rows of width w, not its output channels.
        let filter_len = match &p.shape[..] {
            [.., _, last] if p.need_flag("filter_wise")? => Some(*last as usize),
            _ => None,
        };
        Ok(Arc::new(ModelStockMerge {
            base,
            others: (0..p.inputs).filter(|&i| i != base).collect(),
            filter_len,
        }))
    }
}

#[derive(Debug)]
struct ModelStockMerge {
    base: usize,
    others: Vec<usize>,
    /// `filter_wise` on a tensor of rank ≥ 2: the length of the vectors along the last dim.
    /// None: the whole tensor is one vector.
    filter_len: Option<usize>,
}

impl TensorMerge for ModelStockMerge {
    /// Offsets from the base, their norms and the result: 3.33 copies (measured by `tests/method_memory`).
    fn copies_per_operand(&self) -> u64 {
        4
    }

    fn capability(&self) -> Capability {
        Capability::Streamed
    }

    fn prefers_streaming(&self, numel: u64) -> bool {
        numel > EXACT_ORDER_MAX
    }

    fn merge(&self, xs: &[Vec<f32>], _rows: usize, _cols: usize, d: D) -> Vec<f32> {
        match self.filter_len {
            None => self.merge_vectors(xs, d),
            Some(len) => self.merge_filters(xs, len.max(1), d),
        }
    }

    /// Per row (`filter_wise`): one pass. Whole tensor: norms and dot products of the
    /// offsets, then the output.
    fn stream(&self, ctx: &StreamCtx<'_>, d: D) -> Result<()> {
        if self.filter_len.is_some() {
            // Every chunk holds whole rows, so whole vectors along the last dim.
            return ctx.pass(|rows, xs| {
                let n = (rows.end - rows.start) as usize;
                ctx.emit(rows, &self.merge(&xs, n, ctx.cols, d))
            });
        }
        let (b, others) = (self.base, &self.others);
        let m = others.len();
        let mut ss = vec![LaneSum::default(); m];
        let mut dots = vec![vec![LaneSum::default(); m]; m];
        // Block buffers: the base, each model (its offset in the first pass), a product.
        let mut base = vec![0f32; BLOCK_ELEMS];
        let mut offs = vec![vec![0f32; BLOCK_ELEMS]; m];
        let (mut prod, mut out) = (vec![0f32; BLOCK_ELEMS], vec![0f32; BLOCK_ELEMS]);
        ctx.pass_chunks(|rows, c| {
            let at = rows.start as usize * ctx.cols;
            for blk in blocks(0..c.len(b), BLOCK_ELEMS) {
                let (start, n) = (blk.start, blk.len());
                let base = &mut base[..n];
                c.read(b, start, base);
                for (o, &i) in offs.iter_mut().zip(others) {
                    let o = &mut o[..n];
                    c.read(i, start, o);
                    for (x, &y) in o.iter_mut().zip(base.iter()) {
                        *x -= y;
                    }
                    d.q(o);
                }
                // The f64 lane sums vectorize far wider with the kernel set's instructions.
                kernels::vectorized(
                    #[inline(always)]
                    || {
                        for i in 0..m {
                            ss[i].add_sq(at + start, &offs[i][..n]);
                            for j in i + 1..m {
                                let p = &mut prod[..n];
                                for ((p, &x), &y) in
                                    p.iter_mut().zip(&offs[i][..n]).zip(&offs[j][..n])
                                {
                                    *p = x * y;
                                }
                                d.q(p);
                                dots[i][j].add(at + start, p);
                            }
                        }
                    },
                );
            }
            Ok(())
        })?;
        let norms: Vec<f32> = ss.iter().map(|s| d.qs(s.total().sqrt() as f32)).collect();
        let mut cos = Vec::new();
        for i in 0..m {
            for j in i + 1..m {
                cos.push(cosine(norms[i], norms[j], d.qs(dots[i][j].total() as f32), d));
            }
        }
        let t = interpolation(&cos, m, d);
        ctx.pass_chunks(|rows, c| {
            let mut output = Vec::with_capacity(c.len(b));
            for blk in blocks(0..c.len(b), BLOCK_ELEMS) {
                let (start, n) = (blk.start, blk.len());
                let base = &mut base[..n];
                c.read(b, start, base);
                for (w, &i) in offs.iter_mut().zip(others) {
                    c.read(i, start, &mut w[..n]);
                }
                let ws: Vec<&[f32]> = offs.iter().map(|w| &w[..n]).collect();
                apply_into(t, base, &ws, d, &mut out[..n], &mut prod[..n]);
                output.extend_from_slice(&out[..n]);
            }
            ctx.emit(rows, &output)
        })
    }
}


impl ModelStockMerge {
    fn merge_vectors(&self, xs: &[Vec<f32>], d: D) -> Vec<f32> {
        let w0 = &xs[self.base];
        let ws: Vec<&[f32]> = self.others.iter().map(|&i| xs[i].as_slice()).collect();
        let offs: Vec<Vec<f32>> = ws.iter().map(|w| d.zip(w, w0, |x, y| x - y)).collect();
        let mut cos = Vec::new();
        for i in 0..offs.len() {
            for j in i + 1..offs.len() {
                let dot = d.sum(&d.zip(&offs[i], &offs[j], |x, y| x * y));
                cos.push(cosine(d.norm(&offs[i]), d.norm(&offs[j]), dot, d));
            }
        }
        let t = interpolation(&cos, ws.len(), d);
        apply(t, w0, &ws, d)
    }

    /// Per vector of `len` along the last dim: each pair's cosine per vector, their mean
    /// over pairs (`stack(cos).mean(0)`: an outer sum, then the division), one t per vector.
    fn merge_filters(&self, xs: &[Vec<f32>], len: usize, d: D) -> Vec<f32> {
        let w0 = &xs[self.base];
        let offs: Vec<Vec<f32>> = self
            .others
            .iter()
            .map(|&i| d.zip(&xs[i], w0, |x, y| x - y))
            .collect();
        let norms: Vec<Vec<f32>> = offs
            .iter()
            .map(|o| o.chunks(len).map(|v| d.norm(v)).collect())
            .collect();
        let mut cos: Vec<Vec<f32>> = Vec::new();
        for i in 0..offs.len() {
            for j in i + 1..offs.len() {
                let prod = d.zip(&offs[i], &offs[j], |x, y| x * y);
                cos.push(
                    prod.chunks(len)
                        .enumerate()
                        .map(|(v, p)| cosine(norms[i][v], norms[j][v], d.sum(p), d))
                        .collect(),
                );
            }
        }
        let mean = match &cos[..] {
            [one] => one.clone(),
            _ => {
                let refs: Vec<&[f32]> = cos.iter().map(|c| c.as_slice()).collect();
                let n = cos.len() as f32;
                d.outer_sum(&refs).into_iter().map(|s| d.qs(s / n)).collect()
            }
        };
        let n = self.others.len();
        let mut out = Vec::with_capacity(w0.len());
        for (v, &ct) in mean.iter().enumerate() {
            let span = v * len..((v + 1) * len).min(w0.len());
            let ws: Vec<&[f32]> = self.others.iter().map(|&i| &xs[i][span.clone()]).collect();
            out.extend(apply(t_of(ct, n, d), &w0[span], &ws, d));
        }
        out
    }
}

/// The cosine of two offsets from their norms and dot product.
fn cosine(norm_a: f32, norm_b: f32, dot: f32, d: D) -> f32 {
    let npd = d.qs(norm_a * norm_b);
    d.qs(dot / npd.max(d.qs(1e-6))).clamp(-1.0, 1.0)
}

/// t from the pairwise cosines: their mean, then [`t_of`].
fn interpolation(cos: &[f32], n: usize, d: D) -> f32 {
    let ct = if cos.len() == 1 {
        cos[0]
    } else {
        d.qs(d.sum(cos) / cos.len() as f32)
    };
    t_of(ct, n, d)
}

/// t = N·cos / (1 + (N−1)·cos) from the mean pairwise cosine (0 where that is singular).
fn t_of(ct: f32, n: usize, d: D) -> f32 {
    let n = n as f32;
    let den = d.qs(1.0 + d.qs((n - 1.0) * ct));
    if (den as f64).abs() < 1e-6 {
        0.0
    } else {
        d.qs(d.qs(n * ct) / den)
    }
}

/// `t·mean(w_i) + (1−t)·w0`.
fn apply(t: f32, w0: &[f32], ws: &[&[f32]], d: D) -> Vec<f32> {
    let mut out = vec![0f32; w0.len()];
    let mut scratch = vec![0f32; w0.len()];
    apply_into(t, w0, ws, d, &mut out, &mut scratch);
    out
}

/// [`apply`] into `out` (as long as `w0`), with a scratch buffer as long.
fn apply_into(t: f32, w0: &[f32], ws: &[&[f32]], d: D, out: &mut [f32], scratch: &mut [f32]) {
    let n = ws.len() as f32;
    out.copy_from_slice(&ws[0][..out.len()]);
    for w in &ws[1..] {
        for (x, &y) in out.iter_mut().zip(w.iter()) {
            *x += y;
        }
        d.q(out);
    }
    for x in out.iter_mut() {
        *x /= n;
    }
    d.q(out);
    let one_t = d.qs(1.0 - t);
    for x in out.iter_mut() {
        *x *= t;
    }
    d.q(out);
    for (c, &y) in scratch.iter_mut().zip(w0) {
        *c = one_t * y;
    }
    d.q(scratch);
    for (x, &c) in out.iter_mut().zip(scratch.iter()) {
        *x += c;
    }
    d.q(out);
}
