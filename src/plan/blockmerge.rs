//! `mergestream blockmerge`: BlockMerge_Gradient's gradient merge of two models (DESIGN §5.1).
//!
//! Keys are taken in module order, filtered (`--layer_only`, `--no_layers`,
//! `--custom_filter`), and given blend ratios by the gradient schedule. The default
//! reproduces the original's fp16 arithmetic bit for bit; `--precise` blends in f32 and
//! rounds once. The YAML edition runs a list of operations, each blending the running f32
//! result with model2, and rounds to fp16 at the end. Either model can first be patched with
//! a LoRA, rounded to its dtype as a saved PEFT merge would be, inside the same pass.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::plan::card::{Card, CardRequest, Relation, layer_table, ratio};
use crate::plan::gradient::blockmerge_ratios;
use crate::plan::layout::place;
use crate::plan::lora::{AdapterEffect, LoraSpec, open_adapter, resolve};
use crate::plan::order::sort_module_order;
use crate::plan::{Method, Operand, OutputFiles, Plan, Recipe, Step, TensorRef};
use crate::shape::RowMajor;
use crate::units::parse_size;

/// Rows of these tensors may differ between the models (the vocab rule).
const VOCAB_KEYS: [&str; 2] = ["lm_head.weight", "model.embed_tokens.weight"];
const EMBED: &str = "model.embed_tokens.weight";
const LM_HEAD: &str = "lm_head.weight";

/// One operation of the YAML edition (also the shape of the plain gradient mode).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub operation: String,
    #[serde(default)]
    pub filter: Option<String>,
    pub gradient_values: Vec<f64>,
    #[serde(default)]
    pub layer_only: bool,
    #[serde(default)]
    pub no_layers: bool,
}

/// The YAML edition's config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct YamlConfig {
    pub model_path1: PathBuf,
    pub model_path2: PathBuf,
    #[serde(default)]
    pub output_model_path: Option<PathBuf>,
    #[serde(default)]
    pub max_shard_size: Option<String>,
    pub operations: Vec<Operation>,
    /// The file as read, for the model card (empty when not loaded from a file).
    #[serde(skip)]
    pub text: String,
}

impl YamlConfig {
    pub fn load(path: &Path) -> Result<YamlConfig> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", e).in_file(path))?;
        let mut cfg: YamlConfig = serde_yaml_ng::from_str(&text)
            .map_err(|e| Error::invalid(format!("invalid config: {e}")).in_file(path))?;
        cfg.text = text;
        if cfg.operations.is_empty() {
            return Err(Error::invalid("`operations` is empty").in_file(path));
        }
        Ok(cfg)
    }

    /// `max_shard_size` in bytes; `path` is the config file, for the error.
    pub fn max_shard_size_bytes(&self, path: &Path) -> Result<Option<u64>> {
        self.max_shard_size
            .as_deref()
            .map(|s| {
                parse_size(s)
                    .map_err(|e| Error::invalid(format!("max_shard_size: {e}")).in_file(path))
            })
            .transpose()
    }
}

/// How ratios are assigned.
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// The Tensors edition: one gradient over the filtered keys, fp16 arithmetic.
    Gradient(Operation),
    /// The YAML edition: operations applied in turn, f32 arithmetic.
    Operations(Vec<Operation>),
}

#[derive(Clone, Debug)]
pub struct BlockMergeOptions {
    pub model1: PathBuf,
    pub model2: PathBuf,
    pub schedule: Schedule,
    pub max_shard_size: u64,
    /// Blend in f32 and round once instead of reproducing the fp16 arithmetic.
    pub precise: bool,
    pub out_dtype: Option<DType>,
    pub lora1: Option<LoraSpec>,
    pub lora2: Option<LoraSpec>,
    /// Write a model card (README.md); `None` writes none.
    pub model_card: Option<CardRequest>,
    /// The YAML edition's config file (name, text), shown in the card: the command line
    /// alone does not reproduce the run without it.
    pub config_file: Option<(String, String)>,
}

/// `model2`'s tensor for a key: its own, or (tied embeddings) the embedding for lm_head.
fn lookup(model: &Model, tied: bool, name: &str) -> Option<usize> {
    model.index_of(name).or_else(|| {
        if tied && name == LM_HEAD {
            model.index_of(EMBED)
        } else {
            None
        }
    })
}

/// Whether a model ties lm_head to the embedding (so state_dict() lists lm_head.weight
/// although the file does not hold it).
fn is_tied(model: &Model) -> Result<bool> {
    if model.get(LM_HEAD).is_some() || model.get(EMBED).is_none() {
        return Ok(false);
    }
    let cfg = model.config()?;
    Ok(cfg
        .and_then(|c| c.get("tie_word_embeddings").and_then(|v| v.as_bool()))
        .unwrap_or(false))
}

fn select(keys: &[String], op: &Operation) -> Vec<usize> {
    keys.iter()
        .enumerate()
        .filter(|(_, k)| {
            if op.layer_only {
                k.contains("layer")
            } else if op.no_layers {
                !k.contains("layer")
            } else {
                true
            }
        })
        .filter(|(_, k)| op.filter.as_deref().is_none_or(|f| k.contains(f)))
        .map(|(i, _)| i)
        .collect()
}

/// Dtypes an operand must be rounded through, skipping roundings that cannot change a value.
fn roundings(tensor_dtype: DType, patched: bool, targets: &[DType]) -> Vec<DType> {
    let mut current = if patched || tensor_dtype == DType::F64 {
        DType::F32
    } else {
        tensor_dtype
    };
    let mut out = Vec::new();
    for &t in targets {
        if t == current || t == DType::F32 || t == DType::F64 {
            continue;
        }
        out.push(t);
        current = t;
    }
    out
}

pub fn plan_blockmerge(opts: &BlockMergeOptions) -> Result<Plan> {
    let reproduce = matches!(opts.schedule, Schedule::Gradient(_)) && !opts.precise;
    let out_dtype = match (reproduce, opts.out_dtype) {
        (true, Some(d)) if d != DType::F16 => {
            return Err(Error::usage(format!(
                "the reproduction mode writes fp16; add --precise to write {d}"
            )));
        }
        (_, Some(d)) => d,
        (_, None) => DType::F16,
    };
    if !out_dtype.is_computable() {
        return Err(Error::usage(format!("cannot write {out_dtype} tensors")));
    }
    let m1 = Model::open_reference(&opts.model1)?;
    let m2 = Model::open_reference(&opts.model2)?;
    let tied1 = is_tied(&m1)?;
    let tied2 = is_tied(&m2)?;
    let mut sources = vec![m1, m2];
    let mut effects: [AdapterEffect; 2] = Default::default();
    for (side, spec) in [&opts.lora1, &opts.lora2].into_iter().enumerate() {
        if let Some(spec) = spec {
            let adapter = open_adapter(&spec.path)?;
            let idx = sources.len();
            effects[side] = resolve(&adapter, idx, spec.weight, &sources[side])?;
            sources.push(adapter.model);
        }
    }
    let (m1, m2) = (&sources[0], &sources[1]);

    // state_dict() order, including a tied lm_head.
    let mut keys: Vec<String> = m1.tensors().iter().map(|t| t.name.clone()).collect();
    if tied1 {
        keys.push(LM_HEAD.to_string());
    }
    sort_module_order(&mut keys);
    check_same_tensors(m1, tied1, m2, tied2, &keys)?;

    // Ratios per key: one per operation that selects it.
    let ops: Vec<Operation> = match &opts.schedule {
        Schedule::Gradient(op) => vec![op.clone()],
        Schedule::Operations(ops) => ops.clone(),
    };
    let mut chains: Vec<Vec<f64>> = vec![Vec::new(); keys.len()];
    for op in &ops {
        let selected = select(&keys, op);
        let ratios = blockmerge_ratios(&op.gradient_values, selected.len()).map_err(|e| {
            Error::invalid(if op.operation.is_empty() {
                e
            } else {
                format!("operation `{}`: {e}", op.operation)
            })
        })?;
        for (&i, r) in selected.iter().zip(ratios) {
            chains[i].push(r);
        }
    }
    let key_index: HashMap<&str, usize> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.as_str(), i))
        .collect();

    let mut steps = Vec::with_capacity(m1.tensors().len());
    for (ki, name) in keys.iter().enumerate() {
        let Some(i1) = m1.index_of(name) else {
            continue; // the tied lm_head: written through the embedding
        };
        let t1 = m1.tensor(i1);
        // Tied embeddings: load_state_dict writes lm_head's blend last, if it has one.
        let (chain_key, name2) = match key_index.get(LM_HEAD) {
            Some(&lm) if tied1 && name == EMBED && !chains[lm].is_empty() => (lm, LM_HEAD),
            _ => (ki, name.as_str()),
        };
        let chain = &chains[chain_key];
        let operand = |side: usize, model: &Model, idx: usize, targets: &[DType]| -> Operand {
            let t = model.tensor(idx);
            let mut op = effects[side]
                .operand(model, side, &t.name)
                .unwrap_or_else(|| {
                    Operand::plain(
                        TensorRef {
                            source: side,
                            tensor: idx,
                        },
                        t.rows(),
                    )
                });
            let patched = !op.patches.is_empty() || op.load_as.is_some();
            let mut all = Vec::new();
            if patched && !opts.precise {
                all.push(t.dtype); // what saving the PEFT merge would have stored
            }
            all.extend_from_slice(targets);
            op.roundings = roundings(t.dtype, patched, &all);
            op
        };
        let half: &[DType] = if reproduce { &[DType::F16] } else { &[] };
        let recipe = if chain.is_empty() {
            let op1 = operand(0, m1, i1, half);
            let untouched = op1.patches.is_empty()
                && op1.load_as.is_none()
                && op1.roundings.is_empty()
                && t1.dtype == out_dtype;
            // Non-float tensors (e.g. integer buffers) pass through as model.half() leaves them.
            if !t1.dtype.is_computable() || untouched {
                Recipe::Copy(op1.tensor)
            } else {
                Recipe::Compute {
                    operands: vec![op1],
                    method: Method::Convert,
                }
            }
        } else {
            let i2 = lookup(m2, tied2, name2).ok_or_else(|| {
                Error::invalid(format!("{} lacks this tensor", m2.path.display())).at_tensor(name2)
            })?;
            let t2 = m2.tensor(i2);
            if !t1.dtype.is_computable() || !t2.dtype.is_computable() {
                return Err(Error::invalid(format!(
                    "cannot blend {} with {}; only float tensors can be blended",
                    t1.dtype, t2.dtype
                ))
                .at_tensor(name));
            }
            let op1 = operand(0, m1, i1, half);
            let mut op2 = operand(1, m2, i2, half);
            op2.rows = op2.rows.min(t1.rows());
            let method = match (&opts.schedule, reproduce) {
                (Schedule::Gradient(_), true) => Method::GradientFp16 { ratio: chain[0] },
                (Schedule::Gradient(_), false) => Method::GradientPrecise { ratio: chain[0] },
                (Schedule::Operations(_), _) => Method::BlendChain {
                    ratios: chain.clone(),
                },
            };
            Recipe::Compute {
                operands: vec![op1, op2],
                method,
            }
        };
        let dtype = match &recipe {
            Recipe::Copy(_) if !t1.dtype.is_computable() => t1.dtype,
            _ => out_dtype,
        };
        steps.push(Step::new(name.clone(), dtype, t1.shape.clone(), recipe));
    }

    let shards = place(&mut steps, opts.max_shard_size);
    let mut outputs = OutputFiles::from_model(m1, m1.config()?, out_dtype);
    if let Some(request) = &opts.model_card {
        let card = model_card(opts, request, reproduce, out_dtype, &steps);
        outputs.generated.push(card.file());
    }
    let title = match &opts.schedule {
        Schedule::Gradient(op) => format!(
            "blockmerge {} ← {} gradient {:?}{}",
            m1.path.display(),
            m2.path.display(),
            op.gradient_values,
            if reproduce {
                " (fp16 reproduction)"
            } else {
                " (f32, rounded once)"
            }
        ),
        Schedule::Operations(ops) => format!(
            "blockmerge {} ← {} with {} operation(s) (f32, rounded once)",
            m1.path.display(),
            m2.path.display(),
            ops.len()
        ),
    };
    Ok(Plan {
        title,
        sources,
        steps,
        shards,
        outputs,
    })
}

/// The card: both models and their LoRAs, the schedule, and model2's share per layer.
fn model_card(
    opts: &BlockMergeOptions,
    request: &CardRequest,
    reproduce: bool,
    out_dtype: DType,
    steps: &[Step],
) -> Card {
    let mut inputs = vec![
        opts.model1.display().to_string(),
        opts.model2.display().to_string(),
    ];
    let mut models = String::from("## Models\n\n");
    for (n, (path, lora, role)) in [
        (
            &opts.model1,
            &opts.lora1,
            "the base: its config, tokenizer and extra vocabulary rows are kept",
        ),
        (&opts.model2, &opts.lora2, "blended in along the gradient"),
    ]
    .into_iter()
    .enumerate()
    {
        let _ = write!(models, "- model {}: `{}` ({role})", n + 1, path.display());
        if let Some(l) = lora {
            inputs.push(l.path.display().to_string());
            let _ = write!(
                models,
                ", patched first with the LoRA `{}` at weight {}, rounded to its dtype as a saved PEFT merge would be",
                l.path.display(),
                l.weight
            );
        }
        models.push('\n');
    }
    let selection = |op: &Operation| {
        let f = op.filter.as_deref();
        match (op.layer_only, op.no_layers, f) {
            (true, _, None) => "tensors whose names contain `layer`".to_string(),
            (true, _, Some(f)) => format!("tensors whose names contain `layer` and `{f}`"),
            (false, true, None) => "tensors whose names do not contain `layer`".to_string(),
            (false, true, Some(f)) => {
                format!("tensors whose names contain `{f}` but not `layer`")
            }
            (false, false, None) => "all tensors".to_string(),
            (false, false, Some(f)) => format!("tensors whose names contain `{f}`"),
        }
    };
    let values = |v: &[f64]| v.iter().map(|r| ratio(*r)).collect::<Vec<_>>().join(", ");
    let mut schedule = String::from("## Gradient\n\n");
    match &opts.schedule {
        Schedule::Gradient(op) => {
            let _ = write!(
                schedule,
                "Model 2's share follows the gradient `[{}]` over {} in module order (BlockMerge_Gradient's schedule). ",
                values(&op.gradient_values),
                selection(op)
            );
        }
        Schedule::Operations(ops) => {
            schedule.push_str("The operations of BlockMerge_Gradient's YAML edition, each blending the running result with model 2:\n\n");
            for (i, op) in ops.iter().enumerate() {
                let name = if op.operation.is_empty() {
                    String::new()
                } else {
                    format!("`{}`: ", op.operation)
                };
                let _ = writeln!(
                    schedule,
                    "{}. {name}gradient `[{}]` over {}",
                    i + 1,
                    values(&op.gradient_values),
                    selection(op)
                );
            }
            schedule.push('\n');
        }
    }
    let arithmetic = if reproduce {
        "Arithmetic: BlockMerge_Gradient's own, in fp16, bit for bit.".to_string()
    } else {
        format!(
            "Arithmetic: f32, rounded once to {}.",
            out_dtype.torch_name()
        )
    };
    let _ = writeln!(schedule, "{arithmetic}");
    // Model 2's share of each blended tensor; after a chain of blends it is 1 − Π(1 − r).
    let shares: Vec<(&str, f64)> = steps
        .iter()
        .filter_map(|s| match &s.recipe {
            Recipe::Compute { method, .. } => match method {
                Method::GradientFp16 { ratio } | Method::GradientPrecise { ratio } => {
                    Some((s.name.as_str(), *ratio))
                }
                Method::BlendChain { ratios } => Some((
                    s.name.as_str(),
                    1.0 - ratios.iter().map(|r| 1.0 - r).product::<f64>(),
                )),
                _ => None,
            },
            Recipe::Copy(_) => None,
        })
        .collect();
    if !shares.is_empty() {
        let _ = write!(
            schedule,
            "\nModel 2's share per layer (tensors not listed are model 1's):\n\n{}",
            layer_table("model 2's share", &shares)
        );
    }
    Card {
        request: request.clone(),
        inputs,
        relation: Relation::Merge,
        tags: vec!["merge", "mergestream"],
        summary: "A gradient merge of two models with BlockMerge_Gradient's semantics, made in one streamed pass by mergestream.".into(),
        sections: vec![models, schedule],
        config: opts.config_file.clone(),
    }
}

/// Both models must hold the same tensors with the same shapes, but for the vocab rule.
fn check_same_tensors(
    m1: &Model,
    tied1: bool,
    m2: &Model,
    tied2: bool,
    keys: &[String],
) -> Result<()> {
    for name in keys {
        let Some(i2) = lookup(m2, tied2, name) else {
            return Err(Error::invalid(format!(
                "{} has this tensor but {} does not",
                m1.path.display(),
                m2.path.display()
            ))
            .at_tensor(name));
        };
        let Some(i1) = lookup(m1, tied1, name) else {
            continue;
        };
        let (s1, s2) = (&m1.tensor(i1).shape, &m2.tensor(i2).shape);
        let vocab_ok = VOCAB_KEYS.contains(&name.as_str())
            && s1.len() == 2
            && s2.len() == 2
            && s1[1..] == s2[1..];
        if s1 != s2 && !vocab_ok {
            return Err(Error::invalid(format!(
                "shape {s1:?} in {} but {s2:?} in {}",
                m1.path.display(),
                m2.path.display()
            ))
            .at_tensor(name));
        }
    }
    for t in m2.tensors() {
        if lookup(m1, tied1, &t.name).is_none() {
            return Err(Error::invalid(format!(
                "{} has this tensor but {} does not",
                m2.path.display(),
                m1.path.display()
            ))
            .at_tensor(&t.name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundings_skip_identities() {
        assert_eq!(roundings(DType::F16, false, &[DType::F16]), vec![]);
        assert_eq!(
            roundings(DType::F16, true, &[DType::F16, DType::F16]),
            vec![DType::F16]
        );
        assert_eq!(
            roundings(DType::BF16, true, &[DType::BF16, DType::F16]),
            vec![DType::BF16, DType::F16]
        );
        assert_eq!(
            roundings(DType::F32, false, &[DType::F16]),
            vec![DType::F16]
        );
        assert_eq!(roundings(DType::F32, true, &[DType::F32]), vec![]);
    }

    #[test]
    fn filters_like_gryphe() {
        let keys: Vec<String> = [
            "model.embed_tokens.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.norm.weight",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let op = |layer_only, no_layers, filter: Option<&str>| Operation {
            operation: String::new(),
            filter: filter.map(str::to_string),
            gradient_values: vec![0.5],
            layer_only,
            no_layers,
        };
        assert_eq!(select(&keys, &op(true, false, None)), vec![1]);
        assert_eq!(select(&keys, &op(false, true, None)), vec![0, 2]);
        assert_eq!(select(&keys, &op(true, true, None)), vec![1]);
        assert_eq!(select(&keys, &op(false, false, Some("norm"))), vec![2]);
    }
}
