//! `mergestream convert`: any checkpoint (PyTorch .bin, zip or legacy; safetensors) to
//! sharded safetensors, optionally changing the float dtype, streamed tensor by tensor.

use std::path::PathBuf;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::plan::card::{Card, CardRequest, Relation};
use crate::plan::layout::place;
use crate::plan::order::sort_module_order;
use crate::plan::{Method, Operand, OutputFiles, Plan, Recipe, Step, TensorRef};
use crate::shape::RowMajor;

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub input: PathBuf,
    /// Float tensors are written in this dtype (default: as stored).
    pub dtype: Option<DType>,
    pub max_shard_size: u64,
    /// Write a model card (README.md); `None` writes none.
    pub model_card: Option<CardRequest>,
}

pub fn plan_convert(opts: &ConvertOptions) -> Result<Plan> {
    if let Some(d) = opts.dtype.filter(|d| !d.is_computable()) {
        return Err(Error::usage(format!("cannot convert to {d}")));
    }
    let model = Model::open_reference(&opts.input)?;
    let mut names: Vec<String> = model.tensors().iter().map(|t| t.name.clone()).collect();
    sort_module_order(&mut names);
    let mut steps = Vec::with_capacity(names.len());
    for name in &names {
        let Some(idx) = model.index_of(name) else {
            continue;
        };
        let t = model.tensor(idx);
        let tref = TensorRef {
            source: 0,
            tensor: idx,
        };
        let dtype = match opts.dtype {
            Some(d) if t.dtype.is_computable() => d,
            _ => t.dtype,
        };
        let recipe = if dtype == t.dtype {
            Recipe::Copy(tref)
        } else {
            Recipe::Compute {
                operands: vec![Operand::plain(tref, t.rows())],
                method: Method::Convert,
            }
        };
        steps.push(Step::new(name.clone(), dtype, t.shape.clone(), recipe));
    }
    let shards = place(&mut steps, opts.max_shard_size);
    let config = model.config()?;
    let mut outputs = match opts.dtype {
        Some(d) => OutputFiles::from_model(&model, config, d),
        None => {
            let mut o = OutputFiles::from_model(&model, None, DType::F32);
            o.config = config;
            o
        }
    };
    if let Some(request) = &opts.model_card {
        let input = opts.input.display();
        let values = match opts.dtype {
            Some(d) => format!("float tensors rounded to {}", d.torch_name()),
            None => "every tensor's bytes as stored".to_string(),
        };
        let card = Card {
            request: request.clone(),
            inputs: vec![input.to_string()],
            // The same model re-saved: the Hub infers the relation itself.
            relation: Relation::Unstated,
            tags: vec!["mergestream"],
            summary: format!(
                "`{input}` converted to safetensors ({values}), config and tokenizer copied; made by mergestream."
            ),
            sections: Vec::new(),
            config: None,
        };
        outputs.generated.push(card.file());
    }
    Ok(Plan {
        title: format!("convert {}", opts.input.display()),
        sources: vec![model],
        steps,
        shards,
        outputs,
    })
}
