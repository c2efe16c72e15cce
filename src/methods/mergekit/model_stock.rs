//! `model_stock`: `t·mean(xᵢ) + (1−t)·base` with `t = N·cos / (1 + (N−1)·cos)` from the mean
//! pairwise cosine of the models' offsets from the base; per row with `filter_wise`.

use std::sync::Arc;

use super::arith::D;
use super::method::{
    Capability, InputCount, MergeMethod, Param, PrepareError, Resolved, TensorMerge,
};
use super::stream::{StreamCtx, sum_sq};
use crate::error::Result;

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
        Ok(Arc::new(ModelStockMerge {
            base,
            others: (0..p.inputs).filter(|&i| i != base).collect(),
            filter_wise: p.need_flag("filter_wise")?,
        }))
    }
}

#[derive(Debug)]
struct ModelStockMerge {
    base: usize,
    others: Vec<usize>,
    filter_wise: bool,
}

impl TensorMerge for ModelStockMerge {
    fn capability(&self) -> Capability {
        Capability::Streamed
    }

    fn merge(&self, xs: &[Vec<f32>], rows: usize, cols: usize, d: D) -> Vec<f32> {
        if !self.filter_wise {
            return self.merge_vectors(xs, d);
        }
        let mut out = Vec::with_capacity(rows * cols);
        for row in 0..rows {
            let span = row * cols..(row + 1) * cols;
            let sub: Vec<Vec<f32>> = xs.iter().map(|x| x[span.clone()].to_vec()).collect();
            out.extend(self.merge_vectors(&sub, d));
        }
        out
    }

    /// Per row (`filter_wise`): one pass. Whole tensor: norms and dot products of the
    /// offsets, then the output.
    fn stream(&self, ctx: &StreamCtx<'_>, d: D) -> Result<()> {
        if self.filter_wise {
            // Every chunk holds whole rows.
            return ctx.pass(|rows, xs| {
                let n = (rows.end - rows.start) as usize;
                (ctx.emit)(rows, &self.merge(&xs, n, ctx.cols, d))
            });
        }
        let (b, others) = (self.base, &self.others);
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
                cos.push(cosine(norms[i], norms[j], d.qs(dots[i][j] as f32), d));
            }
        }
        let t = interpolation(&cos, m, d);
        ctx.pass(|rows, xs| {
            let ws: Vec<&[f32]> = others.iter().map(|&i| xs[i].as_slice()).collect();
            (ctx.emit)(rows, &apply(t, &xs[b], &ws, d))
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
}

/// The cosine of two offsets from their norms and dot product.
fn cosine(norm_a: f32, norm_b: f32, dot: f32, d: D) -> f32 {
    let npd = d.qs(norm_a * norm_b);
    d.qs(dot / npd.max(d.qs(1e-6))).clamp(-1.0, 1.0)
}

/// t = N·cos / (1 + (N−1)·cos) from the mean pairwise cosine.
fn interpolation(cos: &[f32], n: usize, d: D) -> f32 {
    let ct = if cos.len() == 1 {
        cos[0]
    } else {
        d.qs(d.sum(cos) / cos.len() as f32)
    };
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
    let n = ws.len() as f32;
    let mut avg = ws[0].to_vec();
    for w in &ws[1..] {
        avg = d.zip(&avg, w, |x, y| x + y);
    }
    let avg = d.map(&avg, |x| x / n);
    let one_t = d.qs(1.0 - t);
    let a = d.map(&avg, |x| t * x);
    let c = d.map(w0, |x| one_t * x);
    d.zip(&a, &c, |x, y| x + y)
}
