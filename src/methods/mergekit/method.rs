//! What a merge method is: a name, the parameters it reads (with defaults), the inputs it
//! needs, and — once its parameters are resolved for one tensor — the arithmetic.
//!
//! A [`MergeMethod`] is registered once in [`super::METHODS`]; the planner derives the list of
//! known methods, input checks and parameter lookup and validation from it. For each output
//! tensor it resolves the declared parameters into a [`Resolved`] and calls
//! [`MergeMethod::prepare`], which returns the tensor's [`TensorMerge`]: the method's own typed
//! parameters and its arithmetic, whole-tensor and (when it needs whole-tensor statistics)
//! streamed in passes over row chunks. The pipeline asks it only for its [`Capability`].

use std::fmt;
use std::sync::Arc;

use super::arith::D;
use super::stream::StreamCtx;
use crate::dtype::DType;
use crate::error::Result;

/// A parameter's resolved value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Number(f64),
    Flag(bool),
}

/// What a parameter holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Number,
    /// `true`/`false` (0 and 1 accepted, as mergekit's YAML does).
    Flag,
}

/// Where a parameter is looked up: once per tensor, or once per input model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Shared: looked up in the slice's and the top-level parameters.
    Tensor,
    /// Per model: its own parameters first, then the slice's, then the top level.
    Input,
}

/// Whether a parameter must be given, and its default otherwise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Need {
    Required,
    /// Required for every input but the base model (which the method does not weigh).
    RequiredUnlessBase,
    Default(Value),
    /// Absent means "not given" (the method has a meaning for that).
    Optional,
}

/// One parameter a method reads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Param {
    pub name: &'static str,
    pub scope: Scope,
    pub kind: Kind,
    pub need: Need,
}

impl Param {
    pub const fn number(name: &'static str, scope: Scope, need: Need) -> Param {
        Param {
            name,
            scope,
            kind: Kind::Number,
            need,
        }
    }

    pub const fn flag(name: &'static str, default: bool) -> Param {
        Param {
            name,
            scope: Scope::Tensor,
            kind: Kind::Flag,
            need: Need::Default(Value::Flag(default)),
        }
    }
}

/// How many models a slice gives a method.
#[derive(Clone, Copy, Debug)]
pub struct InputCount {
    /// Sources of the slice, the base included.
    pub total: usize,
    /// Sources other than the base.
    pub others: usize,
}

/// What the pipeline may do with a tensor's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    /// Row chunks are independent: any chunk can be computed alone.
    Elementwise,
    /// Needs whole-tensor statistics: computed whole when it fits, else streamed in passes
    /// over row chunks ([`TensorMerge::stream`]).
    Streamed,
}

/// A merge method as a config names it.
pub trait MergeMethod: Sync {
    /// The `merge_method:` name.
    fn name(&self) -> &'static str;
    /// The parameters it reads.
    fn params(&self) -> &'static [Param];
    /// Whether `base_model` must be given (and be one of each slice's sources).
    fn needs_base(&self) -> bool;
    /// Check the number of models of a slice; the message says what is expected.
    fn check_inputs(&self, _n: InputCount) -> std::result::Result<(), String> {
        Ok(())
    }
    /// The dtype of the method's result when it computes in `compute`: what mergekit writes
    /// when the config gives no `out_dtype`.
    fn result_dtype(&self, compute: DType) -> DType {
        compute
    }
    /// The arithmetic of one tensor with its resolved parameters; an error message for
    /// values the method cannot use.
    fn prepare(&self, p: &Resolved) -> std::result::Result<Arc<dyn TensorMerge>, PrepareError>;
}

/// Why a method cannot merge a tensor with its resolved parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum PrepareError {
    /// The config's values cannot be used (the message says why).
    Invalid(String),
    /// The method reads a parameter it does not declare: a bug in the method.
    Undeclared { method: &'static str, name: String },
}

impl From<String> for PrepareError {
    fn from(msg: String) -> Self {
        PrepareError::Invalid(msg)
    }
}

/// One tensor's merge: typed parameters and the arithmetic.
pub trait TensorMerge: fmt::Debug + Send + Sync {
    fn capability(&self) -> Capability;

    /// Merge the operands (each `rows × cols` values, row-major) into the output values, in
    /// D precision (the caller encodes them to the output dtype).
    fn merge(&self, xs: &[Vec<f32>], rows: usize, cols: usize, d: D) -> Vec<f32>;

    /// [`TensorMerge::merge`], or why mergekit refuses these values (an error there too).
    fn try_merge(
        &self,
        xs: &[Vec<f32>],
        rows: usize,
        cols: usize,
        d: D,
    ) -> std::result::Result<Vec<f32>, String> {
        Ok(self.merge(xs, rows, cols, d))
    }

    /// Stream the tensor in passes over its row chunks. The default computes each chunk on
    /// its own, which is right for elementwise and row-local arithmetic.
    fn stream(&self, ctx: &StreamCtx<'_>, d: D) -> Result<()> {
        ctx.pass(|rows, xs| {
            let n = (rows.end - rows.start) as usize;
            ctx.emit(rows, &self.merge(&xs, n, ctx.cols, d))
        })
    }

    /// f32 copies of each operand the whole-tensor arithmetic holds at once (the decoded
    /// operands included), for the memory estimate that decides when to stream.
    fn copies_per_operand(&self) -> u64 {
        1
    }

    /// Stream even when the tensor fits: a full sort of a large tensor costs O(n log n)
    /// where the streamed selection is O(n), and above [`EXACT_ORDER_MAX`] elements the
    /// whole-tensor path's exact reduction order buys nothing.
    fn prefers_streaming(&self, _numel: u64) -> bool {
        false
    }
}

/// The largest tensor worth holding whole for PyTorch's exact reduction and sort order when
/// streaming would do. PyTorch splits reductions over more than 32768 elements across its
/// threads, so on a tensor this large mergekit's own result depends on its thread count;
/// streaming is faster here (chunk-sized buffers, no multi-hundred-MiB allocations) and makes
/// the output the same at every memory budget.
pub const EXACT_ORDER_MAX: u64 = 1 << 22;

/// The parameters of one tensor, resolved from a config by the planner: every declared
/// parameter has its value or default (or is absent when optional).
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The method's name, for messages.
    pub method: &'static str,
    /// Operand index of the base model, if it is one of the operands.
    pub base: Option<usize>,
    /// Number of operands.
    pub inputs: usize,
    /// Seed of random masks for this tensor.
    pub seed: u64,
    /// The output tensor's shape (empty when unknown), for methods that work along its last
    /// dimension as PyTorch's `dim=-1` does.
    pub shape: Vec<u64>,
    shared: Vec<(&'static str, Value)>,
    per_input: Vec<Vec<(&'static str, Value)>>,
}

impl Resolved {
    pub fn new(method: &'static str, base: Option<usize>, inputs: usize, seed: u64) -> Resolved {
        Resolved {
            method,
            base,
            inputs,
            seed,
            shape: Vec::new(),
            shared: Vec::new(),
            per_input: vec![Vec::new(); inputs],
        }
    }

    pub fn set(&mut self, name: &'static str, v: Value) {
        self.shared.push((name, v));
    }

    pub fn set_input(&mut self, input: usize, name: &'static str, v: Value) {
        if let Some(slot) = self.per_input.get_mut(input) {
            slot.push((name, v));
        }
    }

    fn find(list: &[(&'static str, Value)], name: &str) -> Option<Value> {
        list.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    /// A shared number parameter, if given (or defaulted).
    pub fn number(&self, name: &str) -> Option<f64> {
        match Self::find(&self.shared, name) {
            Some(Value::Number(n)) => Some(n),
            _ => None,
        }
    }

    /// A shared flag parameter.
    pub fn flag(&self, name: &str) -> Option<bool> {
        match Self::find(&self.shared, name) {
            Some(Value::Flag(b)) => Some(b),
            _ => None,
        }
    }

    /// A per-input number parameter, if given (or defaulted).
    pub fn input_number(&self, input: usize, name: &str) -> Option<f64> {
        match self.per_input.get(input).and_then(|l| Self::find(l, name)) {
            Some(Value::Number(n)) => Some(n),
            _ => None,
        }
    }

    /// A parameter the method declared with a default or as required: the planner always
    /// resolves those, so its absence is a bug in the method's declaration.
    pub fn need_number(&self, name: &str) -> std::result::Result<f64, PrepareError> {
        self.number(name)
            .ok_or_else(|| undeclared(self.method, name))
    }

    pub fn need_flag(&self, name: &str) -> std::result::Result<bool, PrepareError> {
        self.flag(name).ok_or_else(|| undeclared(self.method, name))
    }

    pub fn need_input_number(
        &self,
        input: usize,
        name: &str,
    ) -> std::result::Result<f64, PrepareError> {
        self.input_number(input, name)
            .ok_or_else(|| undeclared(self.method, name))
    }

    /// The values, compactly: `t=0.5 weight=[1, 0.6, -]` (`-` where an input has none).
    pub fn describe(&self) -> String {
        let show = |v: Value| match v {
            Value::Number(n) => format!("{n}"),
            Value::Flag(b) => format!("{b}"),
        };
        let mut parts: Vec<String> = self
            .shared
            .iter()
            .map(|(n, v)| format!("{n}={}", show(*v)))
            .collect();
        let mut names: Vec<&'static str> = Vec::new();
        for (n, _) in self.per_input.iter().flatten() {
            if !names.contains(n) {
                names.push(n);
            }
        }
        for name in names {
            let vals: Vec<String> = self
                .per_input
                .iter()
                .map(|l| Self::find(l, name).map_or_else(|| "-".to_string(), show))
                .collect();
            parts.push(format!("{name}=[{}]", vals.join(", ")));
        }
        parts.join(" ")
    }

    /// Operand indices other than the base.
    pub fn others(&self) -> Vec<usize> {
        (0..self.inputs).filter(|&i| Some(i) != self.base).collect()
    }
}

fn undeclared(method: &'static str, name: &str) -> PrepareError {
    PrepareError::Undeclared {
        method,
        name: name.to_string(),
    }
}
