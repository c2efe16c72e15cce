//! `mergestream lora`: apply a PEFT LoRA adapter to a model, as `merge_and_unload` followed
//! by `save_pretrained` would (DESIGN §5.2).

use std::path::PathBuf;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::format::peft::AdapterConfig;
use crate::model::Model;
use crate::plan::card::{Card, CardRequest, Relation};
use crate::plan::layout::place;
use crate::plan::lora::{LoraSpec, open_adapter, resolve};
use crate::plan::order::sort_module_order;
use crate::plan::outputs::TOKENIZER_FILES;
use crate::plan::{Method, OutputFiles, Plan, Recipe, Step, TensorRef};

#[derive(Clone, Debug)]
pub struct LoraOptions {
    pub base: PathBuf,
    pub lora: LoraSpec,
    pub max_shard_size: u64,
    /// Write float tensors in this dtype instead of the base model's.
    pub out_dtype: Option<DType>,
    /// Write a model card (README.md); `None` writes none.
    pub model_card: Option<CardRequest>,
}

pub fn plan_lora(opts: &LoraOptions) -> Result<Plan> {
    if let Some(d) = opts.out_dtype.filter(|d| !d.is_computable()) {
        return Err(Error::usage(format!("cannot write {d} tensors")));
    }
    let base = Model::open_reference(&opts.base)?;
    let adapter = open_adapter(&opts.lora.path)?;
    let effect = resolve(&adapter, 1, opts.lora.weight, &base)?;
    let adapter_files = adapter.model.source.clone();
    let card = opts
        .model_card
        .as_ref()
        .map(|request| model_card(opts, request, &adapter.config));
    let sources = vec![base, adapter.model];
    let base = &sources[0];

    let mut names: Vec<String> = base.tensors().iter().map(|t| t.name.clone()).collect();
    sort_module_order(&mut names);
    let mut steps = Vec::with_capacity(names.len());
    for name in &names {
        let Some(idx) = base.index_of(name) else {
            continue;
        };
        let t = base.tensor(idx);
        let dtype = match opts.out_dtype {
            Some(d) if t.dtype.is_computable() => d,
            _ => t.dtype,
        };
        let recipe = match effect.operand(base, 0, name) {
            Some(op) if effect.touches(name) => Recipe::Compute {
                operands: vec![op],
                method: Method::Convert,
            },
            _ if dtype == t.dtype => Recipe::Copy(TensorRef {
                source: 0,
                tensor: idx,
            }),
            Some(op) => Recipe::Compute {
                operands: vec![op],
                method: Method::Convert,
            },
            None => Recipe::Copy(TensorRef {
                source: 0,
                tensor: idx,
            }),
        };
        steps.push(Step::new(name.clone(), dtype, t.shape.clone(), recipe));
    }
    let shards = place(&mut steps, opts.max_shard_size);
    let config_dtype = opts
        .out_dtype
        .or_else(|| base.main_dtype())
        .unwrap_or(DType::F16);
    let mut outputs = OutputFiles::from_model(base, base.config()?, config_dtype);
    if opts.out_dtype.is_none() {
        // Keep the base config's dtype as it was.
        outputs.config = base.config()?;
    }
    // An adapter trained with added tokens ships its tokenizer; it wins over the base's.
    outputs.copy_present(&adapter_files, TOKENIZER_FILES);
    if let Some(card) = card {
        outputs.generated.push(card.file());
    }
    let title = format!(
        "lora {} + {} × {}",
        base.path.display(),
        opts.lora.path.display(),
        opts.lora.weight
    );
    Ok(Plan {
        title,
        sources,
        steps,
        shards,
        outputs,
    })
}

/// The card: the base, the adapter, its rank and scaling, and the weight.
fn model_card(opts: &LoraOptions, request: &CardRequest, config: &AdapterConfig) -> Card {
    let (base, lora) = (opts.base.display(), opts.lora.path.display());
    let sqrt = if config.use_rslora { "√" } else { "" };
    let mut adapter = format!(
        "## Adapter\n\n- rank {}, lora_alpha {}, scaling lora_alpha / {sqrt}r{}\n- weight {} (multiplies the scaling)\n",
        config.r,
        config.lora_alpha,
        if config.use_rslora { " (rsLoRA)" } else { "" },
        opts.lora.weight
    );
    if !config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty() {
        adapter.push_str("- per-module ranks or alphas from `rank_pattern` / `alpha_pattern`\n");
    }
    if config.use_dora {
        adapter.push_str("- DoRA: each row rescaled by the magnitude vector\n");
    }
    if !config.modules_to_save.is_empty() {
        adapter.push_str(&format!(
            "- full replacement tensors for `{}`\n",
            config.modules_to_save.join("`, `")
        ));
    }
    Card {
        request: request.clone(),
        inputs: vec![base.to_string(), lora.to_string()],
        relation: Relation::Finetune,
        tags: vec!["merge", "mergestream", "lora"],
        summary: format!(
            "`{base}` with the PEFT LoRA adapter `{lora}` merged in at weight {}, as PEFT's `merge_and_unload` and `save_pretrained` would write it; made by mergestream.",
            opts.lora.weight
        ),
        sections: vec![adapter],
        config: None,
    }
}
