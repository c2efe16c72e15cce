//! `mergestream merge CONFIG.yml OUT`: mergekit YAML configs, planned for streaming
//! (DESIGN §5.3, with the numerics in `methods::mergekit`).
//!
//! The planner follows mergekit's MergePlanner: `models:` becomes one slice over all layers
//! (the base appended if not listed); pre-layer weights use slice 0 and t = 0, post-layer
//! weights the last slice and t = 0; layer tensors get t = offset/(len−1) within their slice
//! and are renumbered in output order. Parameters are looked up source → slice → top level.

pub mod arch;
mod card;
pub mod chat_templates;
pub mod config;
mod depth;
mod inputs;
pub mod params;
mod slices;
mod steps;
mod tensors;
mod vocab;

use std::path::{Path, PathBuf};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::methods::mergekit as methods;
use crate::plan::Plan;
use crate::plan::layout::place;
use card::output_files;
use config::MergeConfig;
use inputs::{architecture, open_models};
use slices::{build_slices, check_method_inputs};
use steps::build_steps;
use tensors::{check_filters, output_tensors};

/// Options of `mergestream merge` beyond the config itself.
#[derive(Clone, Debug)]
pub struct MergeOptions {
    pub config_path: PathBuf,
    pub max_shard_size: u64,
    pub allow_crimes: bool,
    pub copy_tokenizer: bool,
    /// Write README.md and mergekit_config.yml; `None` for `--no-write-model-card`.
    pub model_card: Option<crate::plan::card::CardRequest>,
    pub random_seed: u64,
    /// Cut vocabulary tensors to the smallest input's rows (mergekit's
    /// `--unsafe-truncate-embeddings`).
    pub truncate_embeddings: bool,
    /// Overrides the config's `out_dtype` (`--out-dtype`).
    pub out_dtype: Option<DType>,
    /// The dtype a `model+lora` input is loaded in, patched and saved in before the merge
    /// (mergekit's `--lora-merge-dtype`); default: the checkpoint's own dtype.
    pub lora_merge_dtype: Option<DType>,
}

pub(super) fn cfg_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::invalid(msg).in_file(path)
}

pub fn plan_merge(opts: &MergeOptions) -> Result<Plan> {
    let path = &opts.config_path;
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", e).in_file(path))?;
    let cfg =
        MergeConfig::parse(&text).map_err(|e| cfg_err(path, format!("invalid config: {e}")))?;
    let method = methods::find(&cfg.merge_method).ok_or_else(|| {
        cfg_err(
            path,
            format!(
                "unknown merge_method `{}` (known: {})",
                cfg.merge_method,
                methods::names()
            ),
        )
    })?;
    let given = [
        cfg.models.is_some(),
        cfg.slices.is_some(),
        cfg.modules.is_some(),
    ];
    match given.iter().filter(|g| **g).count() {
        0 => {
            return Err(cfg_err(
                path,
                "the config needs `models`, `slices` or `modules`",
            ));
        }
        1 => {}
        _ => {
            return Err(cfg_err(
                path,
                "give exactly one of `models`, `slices` and `modules`",
            ));
        }
    }
    let dtype = parse_dtype(path, "dtype", cfg.dtype.as_deref())?;
    let out_dtype = match opts.out_dtype {
        Some(d) => Some(d),
        None => parse_dtype(path, "out_dtype", cfg.out_dtype.as_deref())?,
    };

    let mut models = open_models(path, &cfg)?;
    let base = cfg.base_model.as_ref().map(|r| models.index_of(r));
    let donor = base.unwrap_or(0);
    let arch = architecture(path, opts, &mut models, donor)?;
    let slices = build_slices(path, &cfg, &arch, &models, base)?;
    for (si, s) in slices.iter().enumerate() {
        check_method_inputs(path, method, si, s, &models.inputs)?;
    }
    let vocab = vocab::build(path, &cfg, &models, base)?;
    let (planned, out_layers) = output_tensors(&arch, &slices, &models);
    check_filters(path, &cfg, &slices, &planned)?;
    let mut steps = build_steps(
        path,
        opts,
        method,
        &planned,
        &models,
        cfg.parameters.as_ref(),
        dtype,
        out_dtype,
        &arch,
        vocab.as_ref(),
    )?;
    let shards = place(&mut steps, opts.max_shard_size);
    let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
    let outputs = output_files(
        opts,
        &cfg,
        &text,
        &models.inputs,
        &models.sources,
        donor,
        &arch,
        &out_layers,
        &names,
        out_dtype.or(dtype),
        vocab.as_ref(),
    )?;
    Ok(Plan {
        title: format!("merge {} ({})", path.display(), cfg.merge_method),
        sources: models.sources,
        steps,
        shards,
        outputs,
    })
}

fn parse_dtype(path: &Path, key: &str, v: Option<&str>) -> Result<Option<DType>> {
    v.map(|s| {
        DType::parse_float(s).ok_or_else(|| {
            cfg_err(
                path,
                format!("`{key}: {s}` is not a float dtype (float16, bfloat16, float32)"),
            )
        })
    })
    .transpose()
}
