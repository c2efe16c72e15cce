//! The task-arithmetic family: `base + λ·Σ wᵢ·δᵢ` over the models' deltas δᵢ = xᵢ − base,
//! with the deltas optionally sparsified (TIES' top-k, breadcrumbs' window, DARE's and
//! DELLA's random masks, see [`super::sparsify`]) and their signs elected (`*_ties`).
//!
//! One implementation, registered under each of mergekit's names with its own defaults.

use std::sync::Arc;

use super::arith::D;
use super::method::{
    Capability, EXACT_ORDER_MAX, MergeMethod, Need, Param, PrepareError, Resolved, Scope,
    TensorMerge, Value,
};
use super::sparsify::{Sparsify, masked, sparsify};
use super::stream::StreamCtx;
use crate::error::Result;

/// One registered member of the family.
pub struct TaskArithmetic {
    pub name: &'static str,
    /// Elect a sign per element and keep only agreeing deltas (TIES).
    pub consensus: bool,
    pub sparsify: Sparsify,
    pub params: &'static [Param],
}

const WEIGHT: Param = Param::number("weight", Scope::Input, Need::RequiredUnlessBase);
const DENSITY: Param = Param::number("density", Scope::Input, Need::Default(Value::Number(1.0)));
const GAMMA: Param = Param::number("gamma", Scope::Input, Need::Default(Value::Number(0.01)));
const EPSILON: Param = Param::number("epsilon", Scope::Input, Need::Default(Value::Number(0.15)));
const LAMBDA: Param = Param::number("lambda", Scope::Tensor, Need::Default(Value::Number(1.0)));

pub static TASK_ARITHMETIC: TaskArithmetic = TaskArithmetic {
    name: "task_arithmetic",
    consensus: false,
    sparsify: Sparsify::None,
    params: &[WEIGHT, Param::flag("normalize", false), LAMBDA],
};
pub static TIES: TaskArithmetic = TaskArithmetic {
    name: "ties",
    consensus: true,
    sparsify: Sparsify::Magnitude,
    params: &[
        WEIGHT,
        DENSITY,
        Param::flag("normalize", true),
        Param::flag("rescale", false),
        LAMBDA,
    ],
};
const DARE: &[Param] = &[
    WEIGHT,
    DENSITY,
    Param::flag("normalize", false),
    Param::flag("rescale", true),
    LAMBDA,
];
pub static DARE_TIES: TaskArithmetic = TaskArithmetic {
    name: "dare_ties",
    consensus: true,
    sparsify: Sparsify::Random,
    params: DARE,
};
pub static DARE_LINEAR: TaskArithmetic = TaskArithmetic {
    name: "dare_linear",
    consensus: false,
    sparsify: Sparsify::Random,
    params: DARE,
};
const BREADCRUMBS: &[Param] = &[
    WEIGHT,
    DENSITY,
    GAMMA,
    Param::flag("normalize", false),
    Param::flag("rescale", false),
    LAMBDA,
];
pub static BREADCRUMBS_LINEAR: TaskArithmetic = TaskArithmetic {
    name: "breadcrumbs",
    consensus: false,
    sparsify: Sparsify::MagnitudeOutliers,
    params: BREADCRUMBS,
};
pub static BREADCRUMBS_TIES: TaskArithmetic = TaskArithmetic {
    name: "breadcrumbs_ties",
    consensus: true,
    sparsify: Sparsify::MagnitudeOutliers,
    params: BREADCRUMBS,
};
/// DELLA's parameters; the `_linear` variant differs only in `normalize`.
const fn della_params(normalize: bool) -> [Param; 6] {
    [
        WEIGHT,
        DENSITY,
        EPSILON,
        Param::flag("normalize", normalize),
        Param::flag("rescale", true),
        LAMBDA,
    ]
}
const DELLA_PARAMS: [Param; 6] = della_params(true);
const DELLA_LINEAR_PARAMS: [Param; 6] = della_params(false);
pub static DELLA: TaskArithmetic = TaskArithmetic {
    name: "della",
    consensus: true,
    sparsify: Sparsify::Della,
    params: &DELLA_PARAMS,
};
pub static DELLA_LINEAR: TaskArithmetic = TaskArithmetic {
    name: "della_linear",
    consensus: false,
    sparsify: Sparsify::Della,
    params: &DELLA_LINEAR_PARAMS,
};

impl MergeMethod for TaskArithmetic {
    fn name(&self) -> &'static str {
        self.name
    }

    fn params(&self) -> &'static [Param] {
        self.params
    }

    fn needs_base(&self) -> bool {
        true
    }

    fn prepare(&self, p: &Resolved) -> std::result::Result<Arc<dyn TensorMerge>, PrepareError> {
        let base = p.base.unwrap_or(0);
        let number =
            |i: usize, name: &str, default: f64| p.input_number(i, name).unwrap_or(default);
        let mut inputs = Vec::with_capacity(p.inputs);
        for i in 0..p.inputs {
            let input = TaskInput {
                // The base's weight is never used.
                weight: if i == base {
                    1.0
                } else {
                    p.need_input_number(i, "weight")?
                },
                density: number(i, "density", 1.0),
                gamma: number(i, "gamma", 0.01),
                epsilon: number(i, "epsilon", 0.15),
            };
            if self.sparsify == Sparsify::Della
                && i != base
                && input.density < 1.0
                && input.density > 0.0
                && (input.density + input.epsilon >= 1.0 || input.density - input.epsilon <= 0.0)
            {
                return Err(PrepareError::Invalid(format!(
                    "della needs density ± epsilon inside (0, 1); got density {} and epsilon {}",
                    input.density, input.epsilon
                )));
            }
            inputs.push(input);
        }
        let flag = |name: &str| p.flag(name).unwrap_or(false);
        Ok(Arc::new(TaskMerge {
            consensus: self.consensus,
            sparsify: self.sparsify,
            normalize: p.need_flag("normalize")?,
            rescale: flag("rescale"),
            lambda: p.need_number("lambda")?,
            base,
            others: (0..p.inputs).filter(|&i| i != base).collect(),
            inputs,
            seed: p.seed,
        }))
    }
}

/// One model's parameters (the base's are unused).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TaskInput {
    pub weight: f64,
    pub density: f64,
    pub gamma: f64,
    pub epsilon: f64,
}

/// One tensor's task-arithmetic merge.
#[derive(Debug)]
pub(crate) struct TaskMerge {
    pub consensus: bool,
    pub sparsify: Sparsify,
    pub normalize: bool,
    pub rescale: bool,
    pub lambda: f64,
    /// Operand index of the base, and of the other models.
    pub base: usize,
    pub others: Vec<usize>,
    /// Per operand.
    pub inputs: Vec<TaskInput>,
    pub seed: u64,
}

impl TensorMerge for TaskMerge {
    /// Deltas, masks, kept deltas and weights, and with a sign election its weighted masks: 4.17 copies with TIES, 2.33 without (measured by `tests/method_memory`).
    fn copies_per_operand(&self) -> u64 {
        if self.consensus { 5 } else { 3 }
    }

    fn capability(&self) -> Capability {
        if self.sparsify == Sparsify::None {
            Capability::Elementwise
        } else {
            Capability::Streamed
        }
    }

    fn merge(&self, xs: &[Vec<f32>], rows: usize, cols: usize, d: D) -> Vec<f32> {
        let base = &xs[self.base];
        if self.others.is_empty() {
            return base.clone();
        }
        let deltas: Vec<Vec<f32>> = self
            .others
            .iter()
            .map(|&i| {
                let delta = d.zip(&xs[i], base, |x, y| x - y);
                sparsify(
                    self.sparsify,
                    delta,
                    &self.inputs[i],
                    self.rescale,
                    rows,
                    cols,
                    self.seed,
                    i,
                    d,
                )
            })
            .collect();
        self.combine(d, base, deltas, &self.weights(d))
    }

    fn stream(&self, ctx: &StreamCtx<'_>, d: D) -> Result<()> {
        super::task_arithmetic_streamed::stream(self, ctx, d)
    }

    /// A full sort of a large tensor (TIES, breadcrumbs) costs O(n log n) where the streamed
    /// radix select is O(n); DARE and DELLA draw the same masks either way.
    fn prefers_streaming(&self, numel: u64) -> bool {
        self.sparsify != Sparsify::None && numel > EXACT_ORDER_MAX
    }
}

impl TaskMerge {
    /// The non-base models' weights, rounded to D (`torch.tensor(weights, dtype=D)`).
    pub(crate) fn weights(&self, d: D) -> Vec<f32> {
        self.others
            .iter()
            .map(|&i| d.qs(self.inputs[i].weight as f32))
            .collect()
    }

    /// Weight the (sparsified) deltas, elect signs if asked, sum, normalize, scale by lambda
    /// and add to the base. Elementwise: works on any chunk.
    pub(crate) fn combine(
        &self,
        d: D,
        base: &[f32],
        mut deltas: Vec<Vec<f32>>,
        w: &[f32],
    ) -> Vec<f32> {
        // In place, loop by loop (each vectorizes), every result rounded to D as torch does.
        for (delta, &wi) in deltas.iter_mut().zip(w) {
            for x in delta.iter_mut() {
                *x *= wi;
            }
            d.q(delta);
        }
        let (mut mixed, div): (Vec<f32>, Vec<f32>) = if self.consensus {
            // Sign election: the sign of the weighted sum; zeros never agree.
            let total = {
                let refs: Vec<&[f32]> = deltas.iter().map(|v| v.as_slice()).collect();
                d.outer_sum(&refs)
            };
            // Each model's weight where it agrees, and its delta kept there (`0·x` elsewhere).
            let mut wm: Vec<Vec<f32>> = vec![vec![0f32; base.len()]; deltas.len()];
            for ((dl, wk), &wi) in deltas.iter_mut().zip(wm.iter_mut()).zip(w) {
                for ((x, &s), m) in dl.iter_mut().zip(&total).zip(wk.iter_mut()) {
                    // Without short-circuits: signs are random, branches would mispredict.
                    let up = s >= 0.0; // the elected sign: + unless the sum is < 0 or NaN
                    let agree = ((*x > 0.0) & up) | ((*x < 0.0) & !up);
                    *m = if agree { wi } else { 0.0 };
                    *x = masked(*x, agree);
                }
            }
            let kept_refs: Vec<&[f32]> = deltas.iter().map(|v| v.as_slice()).collect();
            let mixed = d.outer_sum(&kept_refs);
            let wm_refs: Vec<&[f32]> = wm.iter().map(|v| v.as_slice()).collect();
            let mut div = d.outer_sum(&wm_refs);
            for v in div.iter_mut() {
                // A select, not a branch: which elements have no agreeing weight is random.
                *v = if *v == 0.0 { 1.0 } else { *v };
            }
            (mixed, div)
        } else {
            let refs: Vec<&[f32]> = deltas.iter().map(|v| v.as_slice()).collect();
            let mixed = d.outer_sum(&refs);
            let mut s = d.sum(w);
            if (s as f64).abs() < 1e-8 {
                s = 1.0;
            }
            (mixed, vec![s])
        };
        if self.normalize {
            if let [s] = div[..] {
                for x in mixed.iter_mut() {
                    *x /= s;
                }
            } else {
                for (x, &y) in mixed.iter_mut().zip(&div) {
                    *x /= y;
                }
            }
            d.q(&mut mixed);
        }
        if self.lambda != 1.0 {
            let l = self.lambda as f32;
            for x in mixed.iter_mut() {
                *x *= l;
            }
            d.q(&mut mixed);
        }
        // `base + mixed` (addition commutes exactly).
        for (x, &b) in mixed.iter_mut().zip(base) {
            *x += b;
        }
        d.q(&mut mixed);
        mixed
    }
}
