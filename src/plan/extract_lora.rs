//! `extract-lora`: which tensors of a fine-tune become LoRA pairs and which are saved whole,
//! decided from headers and config.json alone (mergekit-extract-lora 0.1.5's rules).
//!
//! mergekit walks transformers' `named_modules()`; we walk the fine-tune's `*.weight`
//! tensors in module order ([`sort_module_order`]) and classify each module by its name and
//! rank, which is what the module type amounts to for the architectures mergekit knows:
//! - a 2-D weight is an `nn.Linear` → a LoRA pair (`lora_A.weight` / `lora_B.weight`);
//! - an input embedding (`embed_tokens`, `wte`, ...) is an `nn.Embedding` → with
//!   `--embed-lora`, `lora_embedding_A` / `lora_embedding_B` of the transposed delta;
//! - without `--embed-lora`, input and output embeddings go whole to `modules_to_save`;
//! - anything else with a weight (norms: 1-D; conv kernels: more than 2-D; GPT-2's `Conv1D`)
//!   is a module LoRA cannot decompose → saved whole, its last name component added to
//!   `modules_to_save` (or skipped with `--skip-undecomposable`);
//! - a module named (in full, or by its last component) by `--save-module` is saved whole.
//!
//! Whole modules are the fine-tune's tensors, unchanged, under `base_model.model.<name>`.

use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::{Map, Value, json};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::methods::extract_lora::{SvdOptions, promote};
use crate::model::Model;
use crate::plan::order::sort_module_order;

/// What the user asked for (mergekit-extract-lora's options).
#[derive(Clone, Debug)]
pub struct ExtractOptions {
    /// The fine-tuned model, as typed (the README and messages show it so).
    pub model: String,
    pub base_model: String,
    /// The output folder as typed; the README's title is its last component.
    pub out_path: String,
    pub max_rank: i64,
    pub distribute_scale: bool,
    pub embed_lora: bool,
    /// `--save-module`: modules saved whole (full name or last component).
    pub save_modules: Vec<String>,
    pub exclude_regexes: Vec<String>,
    pub include_regexes: Vec<String>,
    pub sv_epsilon: f64,
    pub skip_undecomposable: bool,
    /// The command line, for the README.
    pub invocation: String,
}

/// One unit of work: one weight pair decomposed, or one module copied.
#[derive(Clone, Debug, PartialEq)]
pub enum Job {
    Lora {
        /// Module path (the weight's name without `.weight`).
        module: String,
        /// Tensor indices of the weight in the base and the fine-tune.
        base: usize,
        ft: usize,
        /// `(base, ft)` indices of the bias, whose delta is saved as `lora_B.bias`.
        bias: Option<(usize, usize)>,
        /// An `nn.Embedding`: decompose the transpose, PEFT's `lora_embedding_*` names.
        embedding: bool,
        /// Dtype of the delta and so of the factors (torch's promotion of the two).
        dtype: DType,
        rows: usize,
        cols: usize,
    },
    /// Tensors of the fine-tune saved whole (weight, and bias when there is one).
    /// `(name in the model, tensor index)`: the name differs from the tensor's for a tied
    /// `lm_head`, saved under its own name.
    Save {
        module: String,
        tensors: Vec<(String, usize)>,
    },
}

/// One output tensor of a job.
#[derive(Clone, Debug, PartialEq)]
pub struct OutTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
}

/// The extraction, decided.
#[derive(Debug)]
pub struct ExtractPlan {
    pub base: Model,
    pub ft: Model,
    pub jobs: Vec<Job>,
    /// adapter_config.json's `modules_to_save`: the user's, then those added, in order.
    pub modules_to_save: Vec<String>,
    /// adapter_config.json's `target_modules`, first seen first.
    pub target_modules: Vec<String>,
    pub svd: SvdOptions,
    pub options: ExtractOptions,
    pub base_vocab: Option<u64>,
    pub ft_vocab: Option<u64>,
    /// Things the user should know (what mergekit logs as warnings), one line each.
    pub notes: Vec<String>,
}

/// Input embeddings (`nn.Embedding`) of the architectures mergekit knows.
const INPUT_EMBEDDINGS: &[&str] = &[
    "embed_tokens",
    "wte",
    "wpe",
    "embed_in",
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "embed_positions",
    "tok_embeddings",
    "shared",
];
/// Output embeddings (`get_output_embeddings()`, an `nn.Linear`).
const OUTPUT_EMBEDDINGS: &[&str] = &["lm_head", "embed_out", "output"];
/// GPT-2's `Conv1D` modules: not `nn.Linear`, so mergekit saves them whole.
const GPT2_CONV1D: &[&str] = &["c_attn", "c_proj", "c_fc"];

fn last(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

fn compile(patterns: &[String], flag: &str) -> Result<Vec<Regex>> {
    patterns
        .iter()
        .map(|p| {
            Regex::new(p)
                .map_err(|e| Error::usage(format!("{flag} `{p}` is not a valid regex: {e}")))
        })
        .collect()
}

fn open(path: &str, what: &str) -> Result<Model> {
    if path.is_empty() {
        return Err(Error::usage(format!("the {what} path is empty")));
    }
    Model::open_reference(Path::new(path))
}

/// The vocabulary size transformers would build: config.json's `vocab_size` (or its
/// `text_config`'s), else the rows of the first input embedding.
fn vocab_size(model: &Model) -> Result<Option<u64>> {
    let cfg = model.config()?;
    let from_cfg = cfg.as_ref().and_then(|c| {
        c.get("vocab_size")
            .or_else(|| c.get("text_config").and_then(|t| t.get("vocab_size")))
            .and_then(Value::as_u64)
    });
    if from_cfg.is_some() {
        return Ok(from_cfg);
    }
    Ok(model.tensors().iter().find_map(|t| {
        let m = t.name.strip_suffix(".weight")?;
        (t.shape.len() == 2 && INPUT_EMBEDDINGS.contains(&last(m))).then(|| t.shape[0])
    }))
}

/// Plan an extraction: open both models (headers only), classify every module, check that
/// the base has every weight to diff against with the same shape.
pub fn plan_extract_lora(opts: &ExtractOptions) -> Result<ExtractPlan> {
    if opts.max_rank < 1 {
        return Err(Error::invalid(format!(
            "--max-rank {} must be at least 1 (a LoRA of rank 0 changes nothing)",
            opts.max_rank
        )));
    }
    if !opts.sv_epsilon.is_finite() || opts.sv_epsilon < 0.0 {
        return Err(Error::invalid(format!(
            "--sv-epsilon {} must be a number ≥ 0",
            opts.sv_epsilon
        )));
    }
    let exclude = compile(&opts.exclude_regexes, "--exclude-regex")?;
    let include = compile(&opts.include_regexes, "--include-regex")?;
    let ft = open(&opts.model, "--model")?;
    let base = open(&opts.base_model, "--base-model")?;
    let ft_vocab = vocab_size(&ft)?;
    let base_vocab = vocab_size(&base)?;
    let mut notes = Vec::new();
    let mut embed_lora = opts.embed_lora;
    if embed_lora && ft_vocab != base_vocab {
        notes.push(format!(
            "vocabulary sizes differ (fine-tune {}, base {}): embeddings are saved whole, not as LoRA",
            ft_vocab.map_or("?".into(), |v| v.to_string()),
            base_vocab.map_or("?".into(), |v| v.to_string()),
        ));
        embed_lora = false;
    }
    let ft_config = ft.config()?;
    let gpt2 = ft_config
        .as_ref()
        .and_then(|c| c.get("model_type"))
        .and_then(Value::as_str)
        == Some("gpt2");

    let mut modules: Vec<String> = ft
        .tensors()
        .iter()
        .filter_map(|t| t.name.strip_suffix(".weight").map(str::to_string))
        .collect();
    // A tied output embedding is not in the checkpoint, but transformers has an `lm_head`
    // module, and mergekit loads its weight through the tied name: the input embedding.
    let tied = tied_lm_head(&ft, ft_config.as_ref(), &modules);
    if tied.is_some() {
        modules.push("lm_head".to_string());
    }
    sort_module_order(&mut modules);

    let excluded = |m: &str| exclude.iter().any(|r| r.is_match(m));
    let should_extract =
        |m: &str| (include.is_empty() || include.iter().any(|r| r.is_match(m))) && !excluded(m);

    let mut to_save: Vec<String> = opts.save_modules.clone();
    let mut target_modules: Vec<String> = Vec::new();
    let mut undecomposable: Vec<String> = Vec::new();
    let mut jobs = Vec::new();
    for module in &modules {
        let key = last(module);
        let weight_name = format!("{module}.weight");
        let bias_name = format!("{module}.bias");
        let Some(w) = ft.index_of(&weight_name).or(match &tied {
            Some(t) if module == "lm_head" => Some(*t),
            _ => None,
        }) else {
            continue;
        };
        let wt = ft.tensor(w);
        let ft_bias = ft.index_of(&bias_name);
        let input_embed = wt.shape.len() == 2 && INPUT_EMBEDDINGS.contains(&key);
        let output_embed = wt.shape.len() == 2 && OUTPUT_EMBEDDINGS.contains(&key);
        if !embed_lora && (input_embed || output_embed) && !excluded(module) {
            // mergekit: embeddings not explicitly excluded are saved whole.
            if !to_save.iter().any(|s| s == key) {
                to_save.push(key.to_string());
            }
        }
        let save = |jobs: &mut Vec<Job>| {
            jobs.push(Job::Save {
                module: module.clone(),
                tensors: std::iter::once((weight_name.clone(), w))
                    .chain(ft_bias.map(|b| (bias_name.clone(), b)))
                    .collect(),
            })
        };
        if to_save.iter().any(|s| s == module || s == key) {
            save(&mut jobs);
            continue;
        }
        if !should_extract(module) {
            continue;
        }
        let decomposable = wt.shape.len() == 2 && !(gpt2 && GPT2_CONV1D.contains(&key));
        if !decomposable {
            if !opts.skip_undecomposable {
                if !to_save.iter().any(|s| s == key) {
                    to_save.push(key.to_string());
                }
                save(&mut jobs);
            }
            // Norms (1-D) are saved whole as a matter of course; a matrix that is not a
            // linear layer (GPT-2's Conv1D, a conv kernel) is worth a note.
            if wt.shape.len() >= 2 && !undecomposable.iter().any(|s| s == key) {
                undecomposable.push(key.to_string());
            }
            continue;
        }
        let (b, bt) = matching(&base, &ft, w)?;
        let bias = match ft_bias {
            Some(fb) => Some((matching(&base, &ft, fb)?.0, fb)),
            None => None,
        };
        jobs.push(Job::Lora {
            module: module.clone(),
            base: b,
            ft: w,
            bias,
            embedding: input_embed,
            dtype: promote(bt.dtype, wt.dtype),
            rows: dim(wt.shape[0], &ft, w)?,
            cols: dim(wt.shape[1], &ft, w)?,
        });
        if !target_modules.iter().any(|s| s == key) {
            target_modules.push(key.to_string());
        }
    }
    if !undecomposable.is_empty() {
        notes.push(format!(
            "not a linear layer or embedding, so not decomposed, {}: {}",
            if opts.skip_undecomposable {
                "skipped"
            } else {
                "saved whole"
            },
            undecomposable.join(", ")
        ));
    }
    if !jobs.iter().any(|j| matches!(j, Job::Lora { .. })) {
        return Err(Error::invalid(
            "no module left to decompose into a LoRA (check --include-regex, --exclude-regex and --save-module)",
        )
        .in_file(&ft.path));
    }
    Ok(ExtractPlan {
        base,
        ft,
        jobs,
        modules_to_save: to_save,
        target_modules,
        svd: SvdOptions {
            max_rank: usize::try_from(opts.max_rank).unwrap_or(usize::MAX),
            sv_epsilon: opts.sv_epsilon,
            distribute_scale: opts.distribute_scale,
        },
        options: opts.clone(),
        base_vocab,
        ft_vocab,
        notes,
    })
}

/// The input embedding an absent `lm_head` is tied to, when config.json ties them
/// (`tie_word_embeddings`, true unless set false, as in transformers) and the checkpoint has
/// no output embedding of its own.
fn tied_lm_head(ft: &Model, config: Option<&Value>, modules: &[String]) -> Option<usize> {
    let tie = config
        .and_then(|c| c.get("tie_word_embeddings"))
        .and_then(Value::as_bool)
        .unwrap_or(true);
    if !tie || modules.iter().any(|m| OUTPUT_EMBEDDINGS.contains(&last(m))) {
        return None;
    }
    modules.iter().find_map(|m| {
        let t = ft.get(&format!("{m}.weight"))?;
        let word = matches!(
            last(m),
            "embed_tokens" | "wte" | "word_embeddings" | "embed_in" | "tok_embeddings"
        );
        (word && t.shape.len() == 2).then(|| ft.index_of(&t.name))?
    })
}

fn dim(d: u64, model: &Model, i: usize) -> Result<usize> {
    usize::try_from(d).map_err(|_| {
        Error::invalid("too large for this machine")
            .at_tensor(&model.tensor(i).name)
            .in_file(model.file_path(model.tensor(i).file))
    })
}

/// The base's tensor of the same name as fine-tune tensor `i`: present, same shape, float.
fn matching<'a>(
    base: &'a Model,
    ft: &Model,
    i: usize,
) -> Result<(usize, &'a crate::model::TensorInfo)> {
    let t = ft.tensor(i);
    let Some(b) = base.index_of(&t.name) else {
        return Err(Error::invalid(
            "the fine-tuned model has this tensor but the base model does not",
        )
        .at_tensor(&t.name)
        .in_file(&base.path));
    };
    let bt = base.tensor(b);
    if bt.shape != t.shape {
        return Err(Error::invalid(format!(
            "shape {:?} in the base model but {:?} in the fine-tuned model ({})",
            bt.shape,
            t.shape,
            ft.file_path(t.file).display()
        ))
        .at_tensor(&t.name)
        .in_file(base.file_path(bt.file)));
    }
    for (m, x) in [(base, bt), (ft, t)] {
        if !x.dtype.is_computable() {
            return Err(Error::invalid(format!(
                "{} is not a float dtype; only float weights can be decomposed",
                x.dtype
            ))
            .at_tensor(&x.name)
            .in_file(m.file_path(x.file)));
        }
    }
    Ok((b, bt))
}

impl Job {
    /// The module path.
    pub fn module(&self) -> &str {
        match self {
            Job::Lora { module, .. } | Job::Save { module, .. } => module,
        }
    }

    /// The tensors this job writes when its rank is `rank` (ignored for whole modules).
    pub fn outputs(&self, plan: &ExtractPlan, rank: usize) -> Vec<OutTensor> {
        match self {
            Job::Save { tensors, .. } => tensors
                .iter()
                .map(|(name, i)| {
                    let t = plan.ft.tensor(*i);
                    OutTensor {
                        name: format!("base_model.model.{name}"),
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                    }
                })
                .collect(),
            Job::Lora {
                module,
                bias,
                embedding,
                dtype,
                rows,
                cols,
                ..
            } => {
                let (r, m, n) = (rank as u64, *rows as u64, *cols as u64);
                let mut v = if *embedding {
                    // Δᵀ is [cols, rows]: A [r, rows], B [cols, r].
                    vec![
                        out(
                            format!("base_model.model.{module}.lora_embedding_A"),
                            *dtype,
                            vec![r, m],
                        ),
                        out(
                            format!("base_model.model.{module}.lora_embedding_B"),
                            *dtype,
                            vec![n, r],
                        ),
                    ]
                } else {
                    vec![
                        out(
                            format!("base_model.model.{module}.lora_A.weight"),
                            *dtype,
                            vec![r, n],
                        ),
                        out(
                            format!("base_model.model.{module}.lora_B.weight"),
                            *dtype,
                            vec![m, r],
                        ),
                    ]
                };
                if let Some((b, f)) = bias {
                    let (bt, ftb) = (plan.base.tensor(*b), plan.ft.tensor(*f));
                    v.push(out(
                        format!("base_model.model.{module}.lora_B.bias"),
                        promote(bt.dtype, ftb.dtype),
                        ftb.shape.clone(),
                    ));
                }
                v
            }
        }
    }

    /// The largest rank this job can have: `min(max_rank, rows, cols)`.
    pub fn max_rank(&self, svd: &SvdOptions) -> usize {
        match self {
            Job::Lora { rows, cols, .. } => svd.max_rank.min(*rows).min(*cols),
            Job::Save { .. } => 0,
        }
    }
}

fn out(name: String, dtype: DType, shape: Vec<u64>) -> OutTensor {
    OutTensor { name, dtype, shape }
}

impl ExtractPlan {
    /// adapter_config.json as mergekit writes it, given each decomposed module's rank:
    /// `r` = `lora_alpha` = the largest rank, and modules of another rank in
    /// `rank_pattern` and `alpha_pattern` (so every module's scaling is 1).
    pub fn adapter_config(&self, ranks: &[(String, usize)]) -> Value {
        let r = ranks.iter().map(|(_, r)| *r).max().unwrap_or(0);
        let mut pattern = Map::new();
        for (m, k) in ranks.iter().filter(|(_, k)| *k != r) {
            pattern.insert(m.clone(), json!(k));
        }
        json!({
            "base_model_name_or_path": self.options.base_model,
            "peft_type": "LORA",
            "use_rslora": false,
            "target_modules": self.target_modules,
            "modules_to_save": self.modules_to_save,
            "task_type": "CAUSAL_LM",
            "r": r,
            "lora_alpha": r,
            "rank_pattern": Value::Object(pattern.clone()),
            "alpha_pattern": Value::Object(pattern),
            "lora_dropout": 0.0,
            "fan_in_fan_out": false,
            "inference_mode": true,
        })
    }

    /// [`ExtractPlan::adapter_config`] as Python's `json.dump(indent=4)` writes it.
    pub fn adapter_config_bytes(&self, ranks: &[(String, usize)]) -> Vec<u8> {
        use serde::Serialize;
        let mut out = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        // Serializing a Value into a Vec cannot fail.
        let _ = self.adapter_config(ranks).serialize(&mut ser);
        out
    }

    /// README.md: mergekit's LoRA model card.
    pub fn model_card(&self) -> String {
        let o = &self.options;
        let hf: Vec<&str> = [o.base_model.as_str(), o.model.as_str()]
            .into_iter()
            .filter(|p| is_hf(p))
            .collect();
        let link = |p: &str| {
            if is_hf(p) {
                format!("[{p}](https://huggingface.co/{p})")
            } else {
                p.to_string()
            }
        };
        let mut details = format!(
            "This LoRA adapter was extracted from {} and uses {} as a base.",
            link(&o.model),
            link(&o.base_model)
        );
        if let (Some(b), Some(f)) = (self.base_vocab, self.ft_vocab)
            && b != f
        {
            let verb = if f > b { "extended" } else { "reduced" };
            details += &format!(
                "\n\n [!WARNING]\n> The vocabulary size has been {verb} from the base model's {b} to {f}. To load this adapter, you must first call `model.resize_token_embeddings({f})`."
            );
        }
        // os.path.basename: the text after the last '/', empty for a trailing slash.
        let name = match o.out_path.rsplit('/').next() {
            Some(n) if !n.is_empty() => n,
            _ => "Untitled LoRA Model (1)",
        };
        // Like mergekit's card (keys sorted, lists block-style), but `base_model` only when an
        // input is a Hub repo (the Hub refuses local paths there), and the relation the Hub
        // uses for an adapter.
        let bases = if hf.is_empty() {
            String::new()
        } else {
            let mut s = "base_model:\n".to_string();
            for p in &hf {
                s += &format!("- {p}\n");
            }
            s + "base_model_relation: adapter\n"
        };
        format!(
            "---\n{bases}library_name: peft\ntags:\n- mergekit\n- mergestream\n- peft\n---\n# {name}\n\nThis is a LoRA extracted from a language model. It was extracted with mergestream's `extract-lora`, which reproduces [mergekit](https://github.com/arcee-ai/mergekit)'s `mergekit-extract-lora` (0.1.5), {version}.\n\n## LoRA Details\n\n{details}\n\n### Parameters\n\nThe following command was used to extract this LoRA adapter:\n\n```sh\n{}\n```\n",
            o.invocation,
            version = concat!("mergestream ", env!("CARGO_PKG_VERSION")),
        )
    }

    /// The models read, for checks that the output does not replace one of them.
    pub fn inputs(&self) -> [&Model; 2] {
        [&self.base, &self.ft]
    }
}

/// mergekit's `is_hf` without the network: not absolute, at most one '/', and not a local
/// path (mergekit then asks the Hub; we take "not local" as the answer).
fn is_hf(p: &str) -> bool {
    !(p.is_empty()
        || p.starts_with('/')
        || p.starts_with('~')
        || p.matches('/').count() > 1
        || PathBuf::from(p).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_names_and_local_paths() {
        assert!(is_hf("meta-llama/Llama-2-7b-hf"));
        assert!(!is_hf("./models/base"));
        assert!(!is_hf("/abs/path"));
        assert!(!is_hf("~/m"));
        assert_eq!(last("model.layers.0.mlp.up_proj"), "up_proj");
    }
}
