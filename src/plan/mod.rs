//! The plan: everything about the output, decided from headers before any data is read.
//!
//! A [`Plan`] lists one [`Step`] per output tensor — name, dtype, shape, shard and byte
//! offset — and the [`Recipe`] that computes it from input tensors. Because every offset is
//! known up front, the writer can put each shard's header first and write tensors in place,
//! in any order. `--dry-run` prints the plan.

pub mod blockmerge;
pub mod blockmerge_args;
pub mod card;
pub mod convert;
pub mod extract_lora;
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
use crate::shape::RowMajor;
use crate::units::human;

pub use crate::methods::lora::DeltaLayout;
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
    /// Rows aligned to a merged vocabulary: the shared plan, and this operand's slot in it.
    pub vocab: Option<(std::sync::Arc<VocabRows>, usize)>,
}

impl Operand {
    pub fn plain(tensor: TensorRef, rows: u64) -> Operand {
        Operand {
            tensor,
            rows,
            load_as: None,
            patches: Vec::new(),
            roundings: Vec::new(),
            vocab: None,
        }
    }

    /// The dtype and row length of the bytes the pipeline hands over for this operand: the
    /// tensor's own, or f32 rows for a vocabulary-aligned one.
    pub fn stored(&self, plan: &Plan) -> (DType, u64) {
        let t = plan.tensor(self.tensor);
        match &self.vocab {
            Some(_) => (DType::F32, t.row_elems() * 4),
            None => (t.dtype, t.row_bytes()),
        }
    }
}

/// A vocabulary tensor aligned to the merged tokenizer (mergekit's `PermutedVocabulary`):
/// where every row of every model's aligned tensor comes from, and each model's tensor.
#[derive(Debug, PartialEq)]
pub struct VocabRows {
    pub plan: crate::tokenizer::EmbeddingPlan,
    /// The unaligned tensor of each slot of [`VocabRows::plan`].
    pub slots: Vec<TensorRef>,
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
    Mergekit(Box<crate::methods::mergekit::MergekitRecipe>),
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
    /// A step not yet placed in a shard ([`layout::place`] assigns shard and offset).
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
}

impl RowMajor for Step {
    fn dims(&self) -> &[u64] {
        &self.shape
    }
    fn elem_type(&self) -> DType {
        self.dtype
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

    /// A fingerprint of everything that decides the output's tensor bytes: the tool version,
    /// every shard's name, size and header, every step's recipe (method, parameters,
    /// operands, LoRA factors), and the identity of every input file. A killed run's work is
    /// resumed only under the same fingerprint (see `pipeline::journal`).
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        // Each field length-prefixed, so no two different plans feed the same byte stream.
        let mut put = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        put(concat!("mergestream ", env!("CARGO_PKG_VERSION")).as_bytes());
        for shard in &self.shards {
            put(shard.file_name.as_bytes());
            put(&shard.size.to_le_bytes());
            put(&shard.header);
        }
        for step in &self.steps {
            put(format!("{step:?}").as_bytes());
            if let Recipe::Compute {
                method: Method::Mergekit(r),
                ..
            } = &step.recipe
            {
                // The per-tensor arithmetic with its resolved parameters.
                put(format!("{:?}", r.merge).as_bytes());
            }
        }
        for model in &self.sources {
            put(model.identity().as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Bytes of tensor data in the output.
    pub fn output_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.size).sum()
    }

    /// A human-readable plan: one line per tensor, then totals with the pipeline's
    /// peak-memory estimate for `memory_limit`.
    pub fn describe(&self, peak_estimate: u64, memory_limit: u64) -> String {
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
            human(peak_estimate),
            human(memory_limit)
        );
        s
    }

    /// The plan as data (`--dry-run --json`): inputs, one entry per output tensor (dtype,
    /// shape, shard, offset, bytes, recipe), shards, totals and the peak-memory estimate.
    pub fn to_json(&self, peak_estimate: u64, memory_limit: u64) -> serde_json::Value {
        use serde_json::json;
        let inputs: Vec<_> = self
            .sources
            .iter()
            .enumerate()
            .map(|(i, m)| json!({"index": i, "path": m.path.display().to_string()}))
            .collect();
        let tensors: Vec<_> = self
            .steps
            .iter()
            .map(|step| {
                json!({
                    "name": step.name,
                    "dtype": step.dtype.to_string(),
                    "shape": step.shape,
                    "shard": self.shards[step.shard].file_name,
                    "offset": step.offset,
                    "bytes": step.len,
                    "recipe": self.describe_recipe(&step.recipe),
                })
            })
            .collect();
        let shards: Vec<_> = self
            .shards
            .iter()
            .map(|s| json!({"file": s.file_name, "bytes": s.size}))
            .collect();
        json!({
            "title": self.title,
            "inputs": inputs,
            "tensors": tensors,
            "shards": shards,
            "totals": {
                "tensors": self.steps.len(),
                "bytes": self.output_bytes(),
                "shards": self.shards.len(),
            },
            "peak_memory_estimate": peak_estimate,
            "memory_limit": memory_limit,
        })
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
                    Method::Mergekit(r) => format!("{r:?} {}", ops.join(", ")),
                    Method::BlendChain { ratios } => {
                        let rs: Vec<String> = ratios.iter().map(|r| format!("{r:.6}")).collect();
                        format!("blend chain r=[{}] {}", rs.join(", "), ops.join(", "))
                    }
                }
            }
        }
    }
}
