//! `mergestream lora`: apply a PEFT LoRA adapter to a model, as `merge_and_unload` followed
//! by `save_pretrained` would (DESIGN §5.2).

use std::path::PathBuf;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::Model;
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
}

pub fn plan_lora(opts: &LoraOptions) -> Result<Plan> {
    if let Some(d) = opts.out_dtype.filter(|d| !d.is_computable()) {
        return Err(Error::usage(format!("cannot write {d} tensors")));
    }
    let base = Model::open_reference(&opts.base)?;
    let adapter = open_adapter(&opts.lora.path)?;
    let effect = resolve(&adapter, 1, opts.lora.weight, &base)?;
    let adapter_files = adapter.model.source.clone();
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
