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
use crate::methods::torch_compat as tc;
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
    /// and add to the base, over a whole run of elements (block by block).
    pub(crate) fn combine(&self, d: D, base: &[f32], deltas: Vec<Vec<f32>>, w: &[f32]) -> Vec<f32> {
        let mut s = Blocks::new(deltas.len());
        let mut out = vec![0f32; base.len()];
        for start in (0..base.len()).step_by(BLOCK) {
            let end = (start + BLOCK).min(base.len());
            for (k, dl) in deltas.iter().enumerate() {
                s.delta(k, end - start).copy_from_slice(&dl[start..end]);
            }
            self.combine_block(d, &base[start..end], &mut s, w, &mut out[start..end]);
        }
        out
    }

    /// [`combine`](Self::combine) on one block of at most [`BLOCK`] elements whose deltas
    /// are in `s` (overwritten): every buffer stays in L1, and each step is a loop that
    /// vectorizes, every result rounded to D as torch does.
    #[inline(always)]
    pub(crate) fn combine_block(
        &self,
        d: D,
        base: &[f32],
        s: &mut Blocks,
        w: &[f32],
        out: &mut [f32],
    ) {
        let n = base.len();
        let models = s.models;
        for (k, &wi) in w.iter().enumerate().take(models) {
            // The deltas are D values whose NaNs came from arithmetic (quiet): `x·1` is `x`.
            if wi == 1.0 {
                continue;
            }
            let dl = s.delta(k, n);
            for x in dl.iter_mut() {
                *x *= wi;
            }
            d.q(dl);
        }
        // The sum of one input is `0 + x` of a D value (the kept deltas, the weights): a D
        // value already, so rounding it again changes nothing.
        let q_sum = |v: &mut [f32]| {
            if models > 1 {
                d.q(v)
            }
        };
        let Blocks { dl, wm, total, div, .. } = s;
        if self.consensus {
            // Sign election: the sign of the weighted sum; zeros never agree.
            let total = &mut total[..n];
            outer_sum_rows(dl, n, total);
            q_sum(total);
            // Each model's weight where it agrees, and its delta kept there (`0·x` elsewhere).
            for ((dk, wk), &wi) in dl.chunks_mut(BLOCK).zip(wm.chunks_mut(BLOCK)).zip(w) {
                for ((x, &t), m) in dk[..n].iter_mut().zip(total.iter()).zip(&mut wk[..n]) {
                    // Without short-circuits: signs are random, branches would mispredict.
                    let up = t >= 0.0; // the elected sign: + unless the sum is < 0 or NaN
                    let agree = ((*x > 0.0) & up) | ((*x < 0.0) & !up);
                    *m = if agree { wi } else { 0.0 };
                    *x = masked(*x, agree);
                }
            }
            outer_sum_rows(dl, n, out);
            q_sum(out);
            if self.normalize {
                let div = &mut div[..n];
                outer_sum_rows(wm, n, div);
                q_sum(div);
                for (x, &y) in out.iter_mut().zip(div.iter()) {
                    // A select, not a branch: which elements have no agreeing weight is random.
                    *x /= if y == 0.0 { 1.0 } else { y };
                }
                d.q(out);
            }
        } else {
            outer_sum_rows(dl, n, out);
            q_sum(out);
            if self.normalize {
                let mut s = d.sum(w);
                if (s as f64).abs() < 1e-8 {
                    s = 1.0;
                }
                for x in out.iter_mut() {
                    *x /= s;
                }
                d.q(out);
            }
        }
        if self.lambda != 1.0 {
            let l = self.lambda as f32;
            for x in out.iter_mut() {
                *x *= l;
            }
            d.q(out);
        }
        // `base + mixed` (addition commutes exactly).
        for (x, &b) in out.iter_mut().zip(base) {
            *x += b;
        }
        d.q(out);
    }
}

/// [`tc::outer_sum_f32`] of the first `n` elements of each model's run in a
/// `BLOCK`-strided buffer. It runs a few times a block, so the runs are listed on the stack
/// (up to 8 models) rather than in a new Vec each time.
#[inline(always)]
fn outer_sum_rows(v: &[f32], n: usize, out: &mut [f32]) {
    let mut runs = v.chunks(BLOCK).map(|c| &c[..n.min(c.len())]);
    if v.len() <= 8 * BLOCK {
        let mut listed: [&[f32]; 8] = [&[]; 8];
        let mut k = 0;
        for (slot, run) in listed.iter_mut().zip(&mut runs) {
            *slot = run;
            k += 1;
        }
        tc::outer_sum_f32(&listed[..k], out)
    } else {
        tc::outer_sum_f32(&runs.collect::<Vec<_>>(), out)
    }
}

/// Elements per block of [`TaskMerge::combine_block`]: a block's buffers stay in L1.
pub(crate) const BLOCK: usize = 1024;

/// The reusable buffers of [`TaskMerge::combine_block`].
pub(crate) struct Blocks {
    models: usize,
    /// Per model, its (sparsified) delta in the block, `BLOCK` apart.
    dl: Vec<f32>,
    /// Per model, its weight where its sign agrees.
    wm: Vec<f32>,
    total: Vec<f32>,
    div: Vec<f32>,
}

impl Blocks {
    pub(crate) fn new(models: usize) -> Blocks {
        Blocks {
            models,
            dl: vec![0.0; models * BLOCK],
            wm: vec![0.0; models * BLOCK],
            total: vec![0.0; BLOCK],
            div: vec![0.0; BLOCK],
        }
    }

    /// Model `k`'s delta for a block of `n` elements, to fill in before combining.
    pub(crate) fn delta(&mut self, k: usize, n: usize) -> &mut [f32] {
        &mut self.dl[k * BLOCK..k * BLOCK + n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    /// The combination as a sequence of whole-tensor torch operations, each rounded to D.
    fn reference(m: &TaskMerge, d: D, base: &[f32], deltas: &[Vec<f32>], w: &[f32]) -> Vec<f32> {
        let weighted: Vec<Vec<f32>> = deltas
            .iter()
            .zip(w)
            .map(|(dl, &wi)| d.map(dl, |x| x * wi))
            .collect();
        let refs = |v: &[Vec<f32>]| -> Vec<Vec<f32>> { v.to_vec() };
        let sum = |v: &[Vec<f32>]| {
            let r: Vec<&[f32]> = v.iter().map(|x| x.as_slice()).collect();
            d.outer_sum(&r)
        };
        let (mixed, div) = if m.consensus {
            let total = sum(&weighted);
            let mut kept = refs(&weighted);
            let mut wm = vec![vec![0f32; base.len()]; deltas.len()];
            for ((dl, wk), &wi) in kept.iter_mut().zip(wm.iter_mut()).zip(w) {
                for ((x, &s), m) in dl.iter_mut().zip(&total).zip(wk.iter_mut()) {
                    let agree = if s >= 0.0 || s.is_nan() {
                        *x > 0.0
                    } else {
                        *x < 0.0
                    };
                    *m = if agree { wi } else { 0.0 };
                    *x = masked(*x, agree);
                }
            }
            let div: Vec<f32> = sum(&wm)
                .into_iter()
                .map(|v| if v == 0.0 { 1.0 } else { v })
                .collect();
            (sum(&kept), div)
        } else {
            let mut s = d.sum(w);
            if (s as f64).abs() < 1e-8 {
                s = 1.0;
            }
            (sum(&weighted), vec![s; base.len()])
        };
        let mut mixed = if m.normalize {
            d.zip(&mixed, &div, |x, y| x / y)
        } else {
            mixed
        };
        if m.lambda != 1.0 {
            mixed = d.map(&mixed, |x| x * m.lambda as f32);
        }
        d.zip(&mixed, base, |x, b| x + b)
    }

    /// Values of D with signed zeros, NaN and infinities among them.
    fn values(seed: usize, n: usize, d: D) -> Vec<f32> {
        let v: Vec<f32> = (0..n)
            .map(|i| match (i * 7 + seed * 13) % 101 {
                0 => -0.0,
                1 => 0.0,
                2 => f32::NAN,
                3 => f32::INFINITY,
                _ => (((i * 7919 + seed * 104_729) % 2003) as f32 - 1001.0) * 3.1e-4,
            })
            .collect();
        d.map(&v, |x| x)
    }

    #[test]
    fn blocked_combination_matches_whole_tensor_operations() {
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let d = D(dtype);
            for models in 1..=3 {
                for (consensus, normalize, lambda) in
                    [(true, true, 1.0), (true, false, 0.7), (false, true, 1.0), (false, false, 1.3)]
                {
                    for weights in [[1.0f32, 1.0, 1.0], [0.3, -1.2, 0.55]] {
                        let m = TaskMerge {
                            consensus,
                            sparsify: Sparsify::None,
                            normalize,
                            rescale: false,
                            lambda,
                            base: 0,
                            others: (1..=models).collect(),
                            inputs: Vec::new(),
                            seed: 0,
                        };
                        let n = 2 * BLOCK + 37;
                        let base = values(0, n, d);
                        let deltas: Vec<Vec<f32>> =
                            (1..=models).map(|k| values(k, n, d)).collect();
                        let w: Vec<f32> = weights[..models].iter().map(|&x| d.qs(x)).collect();
                        let want = reference(&m, d, &base, &deltas, &w);
                        let got = m.combine(d, &base, deltas, &w);
                        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                                "{dtype:?} models {models} consensus {consensus} \
                                 normalize {normalize} weights {weights:?} at {i}: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }
}
