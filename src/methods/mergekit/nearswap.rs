//! `nearswap`: take the other model's value where it is near the base's. Per element,
//! `w = clamp(t / max(|base − other|, 1e-6), 0, 1)` and the result is `w·other + (1−w)·base`.

use std::sync::Arc;

use super::arith::D;
use super::method::{
    Capability, InputCount, MergeMethod, Need, Param, PrepareError, Resolved, Scope,
    TensorMerge,
};

pub struct NearSwap;

impl MergeMethod for NearSwap {
    fn name(&self) -> &'static str {
        "nearswap"
    }

    fn params(&self) -> &'static [Param] {
        // mergekit gives `t` no default.
        const P: &[Param] = &[Param::number("t", Scope::Tensor, Need::Required)];
        P
    }

    fn needs_base(&self) -> bool {
        true
    }

    fn check_inputs(&self, n: InputCount) -> std::result::Result<(), String> {
        exactly_two("nearswap", n)
    }

    fn prepare(&self, p: &Resolved) -> std::result::Result<Arc<dyn TensorMerge>, PrepareError> {
        let base = p.base.unwrap_or(0);
        Ok(Arc::new(NearSwapMerge {
            t: p.need_number("t")?,
            base,
            other: (0..p.inputs).find(|&i| i != base).unwrap_or(base),
        }))
    }
}

/// mergekit's contract for the two-model methods: the base and exactly one other model.
pub(crate) fn exactly_two(method: &str, n: InputCount) -> std::result::Result<(), String> {
    if n.total != 2 || n.others != 1 {
        return Err(format!(
            "{method} needs exactly 2 models, the base_model and one other (mergekit: \
             \"requires exactly 2 inputs\"); got {}",
            n.total
        ));
    }
    Ok(())
}

#[derive(Debug)]
struct NearSwapMerge {
    t: f64,
    base: usize,
    other: usize,
}

impl TensorMerge for NearSwapMerge {
    fn capability(&self) -> Capability {
        Capability::Elementwise
    }

    fn merge(&self, xs: &[Vec<f32>], _rows: usize, _cols: usize, d: D) -> Vec<f32> {
        let (a, b) = (&xs[self.base], &xs[self.other]);
        // A Python scalar joins a tensor op in the op's math type (f32); clamp bounds are
        // cast to the tensor's dtype.
        let t = self.t as f32;
        let floor = d.qs(1e-6);
        let absdiff = d.zip(a, b, |x, y| (x - y).abs());
        // `clamp` keeps NaN, so compare with `<` rather than `max`. `t / tensor` is Python's
        // `__rtruediv__`, which torch runs as `reciprocal(tensor) * t`: two roundings.
        let recip = d.map(&absdiff, |x| 1.0 / if x < floor { floor } else { x });
        let w = d.map(&recip, |r| r * t);
        // `f32::clamp` keeps NaN too.
        let w: Vec<f32> = w.iter().map(|&x| x.clamp(0.0, 1.0)).collect();
        let wb = d.zip(&w, b, |x, y| x * y);
        let one_minus = d.map(&w, |x| 1.0 - x);
        let wa = d.zip(&one_minus, a, |x, y| x * y);
        d.zip(&wb, &wa, |x, y| x + y)
    }
}
