//! `linear`: the weighted mean `Σ wᵢ·xᵢ / Σ wᵢ` (or the weighted sum without `normalize`).

use std::sync::Arc;

use super::arith::D;
use super::method::{
    Capability, MergeMethod, Need, Param, PrepareError, Resolved, Scope, TensorMerge,
};
use crate::methods::torch_compat as tc;

pub struct Linear;

impl MergeMethod for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn params(&self) -> &'static [Param] {
        const P: &[Param] = &[
            Param::number("weight", Scope::Input, Need::Required),
            Param::flag("normalize", true),
        ];
        P
    }

    fn needs_base(&self) -> bool {
        false
    }

    fn prepare(&self, p: &Resolved) -> Result<Arc<dyn TensorMerge>, PrepareError> {
        let weights = (0..p.inputs)
            .map(|i| p.need_input_number(i, "weight").map(|w| w as f32))
            .collect::<Result<_, _>>()?;
        Ok(Arc::new(LinearMerge {
            weights,
            normalize: p.need_flag("normalize")?,
        }))
    }
}

#[derive(Debug)]
struct LinearMerge {
    weights: Vec<f32>,
    normalize: bool,
}

impl TensorMerge for LinearMerge {
    fn capability(&self) -> Capability {
        Capability::Elementwise
    }

    /// `Σ fma(x_i, w_i)` in config order (`addcmul_` is fused on the CPU), divided by the f32
    /// sum of the weights.
    fn merge(&self, xs: &[Vec<f32>], _rows: usize, _cols: usize, d: D) -> Vec<f32> {
        let mut acc = vec![0f32; xs.first().map_or(0, Vec::len)];
        for (x, &wi) in xs.iter().zip(&self.weights) {
            crate::kernels::fma_acc(&mut acc, x, wi);
        }
        if self.normalize {
            let den = tc::sum_f32(&self.weights);
            for a in acc.iter_mut() {
                *a /= den;
            }
        }
        d.q(&mut acc);
        acc
    }
}
