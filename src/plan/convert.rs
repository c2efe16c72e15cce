//! `mergestream convert`: any checkpoint (PyTorch .bin, zip or legacy; safetensors) to
//! sharded safetensors, optionally changing the float dtype, streamed tensor by tensor.

use std::path::PathBuf;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::Model;
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
    let outputs = match opts.dtype {
        Some(d) => OutputFiles::from_model(&model, config, d),
        None => {
            let mut o = OutputFiles::from_model(&model, None, DType::F32);
            o.config = config;
            o
        }
    };
    Ok(Plan {
        title: format!("convert {}", opts.input.display()),
        sources: vec![model],
        steps,
        shards,
        outputs,
    })
}
