//! `passthrough`: one model's tensor, optionally multiplied by `scale` (frankenmerges stack
//! slices of it).

use std::sync::Arc;

use super::arith::D;
use super::method::{
    Capability, InputCount, MergeMethod, Need, Param, PrepareError, Resolved, Scope, TensorMerge,
};

pub struct Passthrough;

impl MergeMethod for Passthrough {
    fn name(&self) -> &'static str {
        "passthrough"
    }

    fn params(&self) -> &'static [Param] {
        const P: &[Param] = &[Param::number("scale", Scope::Input, Need::Optional)];
        P
    }

    fn needs_base(&self) -> bool {
        false
    }

    fn check_inputs(&self, n: InputCount) -> Result<(), String> {
        if n.total != 1 {
            return Err("passthrough takes exactly one source per slice".into());
        }
        Ok(())
    }

    fn prepare(&self, p: &Resolved) -> Result<Arc<dyn TensorMerge>, PrepareError> {
        Ok(Arc::new(PassthroughMerge {
            scale: p.input_number(0, "scale").map(|s| s as f32),
        }))
    }
}

#[derive(Debug)]
struct PassthroughMerge {
    scale: Option<f32>,
}

impl TensorMerge for PassthroughMerge {
    fn capability(&self) -> Capability {
        Capability::Elementwise
    }

    fn merge(&self, xs: &[Vec<f32>], _rows: usize, _cols: usize, d: D) -> Vec<f32> {
        let x = xs.first().cloned().unwrap_or_default();
        match self.scale {
            None => x,
            Some(s) => d.map(&x, |v| v * s),
        }
    }
}
