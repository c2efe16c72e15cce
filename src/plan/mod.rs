//! The plan: everything about the output, decided from headers before any data is read.
//!
//! A [`Plan`] lists one [`Step`] per output tensor — name, dtype, shape, shard and byte
//! offset — and the [`Recipe`] that computes it from input tensors. Because every offset is
//! known up front, the writer can put each shard's header first and write tensors in place,
//! in any order. `--dry-run` prints the plan.

pub mod blockmerge;
pub mod blockmerge_args;
pub mod convert;
pub mod gradient;
pub mod layout;
pub mod lora;
pub mod lora_merge;
pub mod mergekit;
pub mod order;
pub mod outputs;

use std::fmt::Write as _;

use crate::dtype::DType;
use crate::model::{Model, TensorInfo};
use crate::units::human;

pub use layout::Shard;
pub use outputs::OutputFiles;

/// A tensor of one of the plan's sources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorRef {
    /// Index into [`Plan::sources`].
    pub source: usize,
    /// Index into that source's tensor list.
    pub tensor: usize,
}

/// How a LoRA delta's rows map onto the weight's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaLayout {
    /// Δ = B @ A: weight rows are B's rows (Linear layers).
    Rows,
    /// Δ = (B @ A)ᵀ: weight rows are A's columns (embeddings, `fan_in_fan_out` layers).
    Transposed,
}

/// A LoRA delta applied to one operand: `W += scale · Δ`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPatch {
    pub a: TensorRef,
    pub b: TensorRef,
    /// alpha/r (or alpha/√r) times the user's weight, computed in f64, then f32.
    pub scale: f32,
    pub layout: DeltaLayout,
    /// Round Δ·scale to this dtype before the add (PEFT does so for embeddings).
    pub round_delta: Option<DType>,
    /// DoRA: the magnitude vector; `W' = m / ‖W + Δ‖_row · (W + Δ)`.
    pub magnitude: Option<TensorRef>,
    /// The rank, for cost estimates and messages.
    pub rank: u64,
}

/// One input of a computed tensor, as f32 values: read, patched, rounded.
#[derive(Clone, Debug, PartialEq)]
pub struct Operand {
    pub tensor: TensorRef,
    /// Rows this operand provides; output rows past it take the method's fallback
    /// (BlockMerge's vocab rule keeps model1's extra rows).
    pub rows: u64,
    /// Round the loaded values to this dtype before anything else (a replacement tensor
    /// loaded into a model of another dtype).
    pub load_as: Option<DType>,
    pub patches: Vec<LoraPatch>,
    /// Roundings applied in order after the patches (e.g. to the LoRA'd model's dtype,
    /// then to fp16 as BlockMerge's `model.half()` does).
    pub roundings: Vec<DType>,
}

impl Operand {
    pub fn plain(tensor: TensorRef, rows: u64) -> Operand {
        Operand {
            tensor,
            rows,
            load_as: None,
            patches: Vec::new(),
            roundings: Vec::new(),
        }
    }
}

/// The arithmetic that turns operands into the output tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Method {
    /// The first operand, converted to the output dtype.
    Convert,
    /// BlockMerge_Gradient in fp16: `f16(f16(a·(1−r)) + f16(b·r))`, operands already fp16.
    GradientFp16 { ratio: f64 },
    /// The same blend in f32, rounded once.
    GradientPrecise { ratio: f64 },
    /// BlockMerge's YAML edition: successive f32 blends of the running result with the
    /// second operand, `f32(f32(1−r)·x) + f32(f32(r)·b)` for each ratio.
    BlendChain { ratios: Vec<f64> },
    /// A mergekit method (DESIGN §5.3).
    Mergekit(Box<mergekit::MergekitRecipe>),
}

/// How an output tensor is made.
#[derive(Clone, Debug, PartialEq)]
pub enum Recipe {
    /// The input's bytes, unchanged.
    Copy(TensorRef),
    Compute {
        operands: Vec<Operand>,
        method: Method,
    },
}

/// One output tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Index into [`Plan::shards`].
    pub shard: usize,
    /// Absolute byte offset of the tensor's data in its shard file.
    pub offset: u64,
    pub len: u64,
    pub recipe: Recipe,
}

impl Step {
    /// A step not yet placed in a shard ([`blockmerge::place`] assigns shard and offset).
    pub fn new(name: String, dtype: DType, shape: Vec<u64>, recipe: Recipe) -> Step {
        // Shapes come from validated headers, whose byte sizes do not overflow.
        let len = shape.iter().product::<u64>() * dtype.bits() / 8;
        Step {
            name,
            dtype,
            shape,
            shard: 0,
            offset: 0,
            len,
            recipe,
        }
    }

    pub fn rows(&self) -> u64 {
        self.shape.first().copied().unwrap_or(1)
    }

    pub fn row_elems(&self) -> u64 {
        // Saturating: an empty tensor may have huge other dimensions.
        self.shape
            .iter()
            .skip(1)
            .fold(1u64, |a, &d| a.saturating_mul(d))
    }
}

/// Everything needed to produce the output.
#[derive(Debug)]
pub struct Plan {
    /// What the plan does, for the dry run and the progress bar.
    pub title: String,
    /// Input checkpoints and adapter files; [`TensorRef::source`] indexes this.
    pub sources: Vec<Model>,
    pub steps: Vec<Step>,
    pub shards: Vec<Shard>,
    pub outputs: OutputFiles,
}

impl Plan {
    pub fn tensor(&self, r: TensorRef) -> &TensorInfo {
        self.sources[r.source].tensor(r.tensor)
    }

    /// Bytes of tensor data in the output.
    pub fn output_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.size).sum()
    }

    /// Bytes of working memory one chunk of `rows` rows of `step` needs: input bytes, LoRA
    /// factors (stored and as f32) and products, f32 operands when the method works on the
    /// whole chunk at once (elementwise methods work in small cache tiles), and the output.
    pub fn chunk_cost(&self, step: &Step, rows: u64) -> u64 {
        let cols = step.row_elems().max(1);
        let out = rows * cols * step.dtype.bits() / 8;
        match &step.recipe {
            Recipe::Copy(_) => out,
            Recipe::Compute { operands, method } => {
                let whole = matches!(method, Method::Mergekit(r) if !r.elementwise());
                let mut total = out;
                for op in operands {
                    let t = self.tensor(op.tensor);
                    let r = rows.min(op.rows);
                    total += r * t.row_bytes();
                    if whole {
                        total += r * cols * 4;
                    }
                    for p in &op.patches {
                        let (a, b) = (self.tensor(p.a), self.tensor(p.b));
                        total += a.len + b.len + (a.numel() + b.numel()) * 4 + r * cols * 4;
                        if let Some(m) = p.magnitude {
                            total += self.tensor(m).len;
                        }
                    }
                }
                total
            }
        }
    }

    /// Whether a step can be split into row chunks (DoRA on transposed layouts needs
    /// whole columns).
    pub fn chunkable(&self, step: &Step) -> bool {
        let gathered =
            |r: TensorRef| matches!(self.tensor(r).layout, crate::model::Layout::Gathered(_));
        match &step.recipe {
            Recipe::Copy(t) => !gathered(*t),
            Recipe::Compute { operands, .. } if operands.iter().any(|op| gathered(op.tensor)) => {
                false
            }
            Recipe::Compute { operands, method } => {
                let method_ok = match method {
                    Method::Mergekit(r) => r.elementwise(),
                    _ => true,
                };
                method_ok
                    && operands.iter().all(|op| {
                        op.patches
                            .iter()
                            .all(|p| p.magnitude.is_none() || p.layout == DeltaLayout::Rows)
                    })
            }
        }
    }

    /// Whether a step that cannot be chunked can instead be streamed in passes over its
    /// row chunks (methods with whole-tensor statistics).
    pub fn streamable(&self, step: &Step) -> bool {
        match &step.recipe {
            // 1-D tensors are one row for the row-wise methods; views are gathered whole.
            Recipe::Compute { .. } if step.shape.len() <= 1 => false,
            Recipe::Compute { operands, .. }
                if operands.iter().any(|op| {
                    matches!(
                        self.tensor(op.tensor).layout,
                        crate::model::Layout::Gathered(_)
                    )
                }) =>
            {
                false
            }
            Recipe::Compute {
                operands,
                method: Method::Mergekit(r),
            } => {
                crate::methods::mergekit::streamed::supports(r)
                    && operands.iter().all(|op| {
                        op.patches
                            .iter()
                            .all(|p| p.magnitude.is_none() || p.layout == DeltaLayout::Rows)
                    })
            }
            _ => false,
        }
    }

    /// Whether a streamable step should stream even though it fits in memory: a full sort of
    /// a large tensor (TIES, breadcrumbs) costs O(n log n) where the streamed radix select is
    /// O(n). Exact PyTorch tie-breaking matters only where mergekit itself is reproducible:
    /// PyTorch splits reductions over 32768 elements across its threads.
    pub fn prefers_streaming(&self, step: &Step) -> bool {
        const EXACT_SORT_MAX: u64 = 1 << 22;
        match &step.recipe {
            Recipe::Compute {
                method: Method::Mergekit(r),
                ..
            } => {
                matches!(
                    r.kind,
                    mergekit::MethodKind::TaskArithmetic {
                        sparsify: mergekit::Sparsify::Magnitude
                            | mergekit::Sparsify::MagnitudeOutliers,
                        ..
                    }
                ) && step.shape.iter().product::<u64>() > EXACT_SORT_MAX
            }
            _ => false,
        }
    }

    /// A human-readable plan: one line per tensor, then totals.
    pub fn describe(&self, memory_limit: u64) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "plan: {}", self.title);
        for (i, src) in self.sources.iter().enumerate() {
            let _ = writeln!(s, "  input {i}: {}", src.path.display());
        }
        for step in &self.steps {
            let shard = &self.shards[step.shard].file_name;
            let _ = writeln!(
                s,
                "  {:<60} {:>5} {:<16} {} @{:<10} {}",
                step.name,
                step.dtype.to_string(),
                format!("{:?}", step.shape),
                shard,
                step.offset,
                self.describe_recipe(&step.recipe)
            );
        }
        let _ = writeln!(
            s,
            "output: {} tensors, {} in {} shard(s)",
            self.steps.len(),
            human(self.output_bytes()),
            self.shards.len()
        );
        let _ = writeln!(
            s,
            "peak memory estimate: {} (memory limit {})",
            human(self.peak_memory_estimate(memory_limit)),
            human(memory_limit)
        );
        s
    }

    fn describe_operand(&self, op: &Operand) -> String {
        let t = self.tensor(op.tensor);
        let mut s = format!("in{}", op.tensor.source);
        if op.rows < t.rows() {
            let _ = write!(s, "[:{}]", op.rows);
        }
        for p in &op.patches {
            let _ = write!(s, "+lora(in{}, s={})", p.a.source, p.scale);
        }
        s
    }

    fn describe_recipe(&self, r: &Recipe) -> String {
        match r {
            Recipe::Copy(t) => format!("copy in{}", t.source),
            Recipe::Compute { operands, method } => {
                let ops: Vec<String> = operands.iter().map(|o| self.describe_operand(o)).collect();
                match method {
                    Method::Convert => format!("convert {}", ops.join(", ")),
                    Method::GradientFp16 { ratio } => {
                        format!("blend fp16 r={ratio:.6} {}", ops.join(", "))
                    }
                    Method::GradientPrecise { ratio } => {
                        format!("blend f32 r={ratio:.6} {}", ops.join(", "))
                    }
                    Method::Mergekit(r) => format!("{:?} {}", r.kind, ops.join(", ")),
                    Method::BlendChain { ratios } => {
                        let rs: Vec<String> = ratios.iter().map(|r| format!("{r:.6}")).collect();
                        format!("blend chain r=[{}] {}", rs.join(", "), ops.join(", "))
                    }
                }
            }
        }
    }

    /// Peak memory: the budget (or everything, if the whole run needs less), or the largest
    /// single chunk if that exceeds it, plus a fixed allowance for the program itself.
    pub fn peak_memory_estimate(&self, memory_limit: u64) -> u64 {
        const BASE: u64 = 32 << 20;
        let chunk_target = crate::pipeline::chunk_target(memory_limit);
        let mut largest = 0u64;
        let mut total = 0u64;
        for step in &self.steps {
            let rows = crate::pipeline::rows_per_chunk(self, step, chunk_target);
            let c = self.chunk_cost(step, rows.min(step.rows()).max(1));
            largest = largest.max(c);
            total = total.saturating_add(self.chunk_cost(step, step.rows().max(1)));
        }
        BASE + total.min(memory_limit).max(largest)
    }
}
