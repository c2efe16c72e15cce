//! One step per output tensor: operands (with LoRAs and mergekit's load-time casts), the
//! shape (vocabulary rule), the compute and output dtypes, and the method's resolved
//! parameters; then mergekit's write order.

use std::path::Path;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::methods::mergekit::{
    Kind, MergeMethod, MergekitRecipe, Need, Param, PrepareError, Resolved, Scope, Value,
};
use crate::plan::{Method, Operand, Recipe, Step, TensorRef};
use crate::shape::RowMajor;

use super::MergeOptions;
use super::config::Parameters;
use super::inputs::{Input, Models};
use super::params::{Scalar, resolve};
use super::tensors::Planned;

/// The steps of `planned`, in the order mergekit writes them.
#[allow(clippy::too_many_arguments)]
pub(super) fn build_steps(
    path: &Path,
    opts: &MergeOptions,
    method: &'static dyn MergeMethod,
    planned: &[Planned<'_>],
    models: &Models,
    top: Option<&Parameters>,
    dtype: Option<DType>,
    out_dtype: Option<DType>,
    arch: &super::arch::Architecture,
    vocab: Option<&super::vocab::Vocab>,
) -> Result<Vec<Step>> {
    let (sources, inputs) = (&models.sources, &models.inputs);
    let mut steps = Vec::with_capacity(planned.len());
    let mut write_key: Vec<(String, usize)> = Vec::with_capacity(planned.len());
    for (pi, p) in planned.iter().enumerate() {
        let mut operands = Vec::with_capacity(p.inputs.len());
        let mut shape: Option<Vec<u64>> = None;
        let mut in_dtypes = Vec::new();
        let mut first_computable: Option<bool> = None;
        // One row per token, aligned to the merged vocabulary when the config asks for one.
        let aligned = vocab.filter(|_| super::vocab::is_vocab_tensor(arch, &p.out));
        for (m, name) in &p.inputs {
            let inp = &inputs[*m];
            let model = &sources[inp.source];
            let Some(idx) = model.index_of(name) else {
                return Err(
                    Error::invalid(format!("{} has no tensor `{name}`", inp.reference))
                        .at_tensor(&p.out)
                        .in_file(path),
                );
            };
            let t = model.tensor(idx);
            let mut op = inp
                .effect
                .as_ref()
                .and_then(|e| e.operand(model, inp.source, name))
                .unwrap_or_else(|| {
                    Operand::plain(
                        TensorRef {
                            source: inp.source,
                            tensor: idx,
                        },
                        t.rows(),
                    )
                });
            let patched = !op.patches.is_empty() || op.load_as.is_some();
            // The whole `model+lora` input is loaded in the merge dtype, saved, and read back:
            // its unpatched float tensors are rounded to it too.
            if !patched
                && inp.effect.is_some()
                && let Some(d) = opts.lora_merge_dtype
                && t.dtype.is_computable()
                && d != t.dtype
            {
                op.load_as = Some(d);
                op.roundings.push(d);
            }
            if patched {
                // mergekit loads the model in `--lora-merge-dtype` (default: as stored), lets
                // PEFT merge the adapter in it, and saves the result in it.
                let merge_dtype = opts.lora_merge_dtype.unwrap_or(t.dtype);
                if merge_dtype != t.dtype {
                    op.load_as = Some(merge_dtype);
                    for p in &mut op.patches {
                        if p.round_delta.is_some() {
                            p.round_delta = Some(merge_dtype);
                        }
                    }
                }
                op.roundings.push(merge_dtype);
            }
            // mergekit casts every input to `dtype` at load.
            if let Some(d) = dtype
                && t.dtype.is_computable()
                && (d != t.dtype || patched)
            {
                op.roundings.push(d);
            }
            // All inputs float, or all not (those pass through): never decode ints as floats.
            let float = t.dtype.is_computable();
            if *first_computable.get_or_insert(float) != float {
                return Err(Error::invalid(format!(
                    "{} stores it as {}; float and non-float tensors cannot be merged",
                    inp.reference, t.dtype
                ))
                .at_tensor(&p.out)
                .in_file(path));
            }
            in_dtypes.push(t.dtype);
            match &shape {
                None => shape = Some(t.shape.clone()),
                // Rows follow the merged vocabulary; only the row length must agree.
                Some(s) if aligned.is_some() && s.get(1..) != t.shape.get(1..) => {
                    return Err(Error::invalid(format!(
                        "tensor size mismatch: {s:?} vs {:?} in {} (beyond the vocabulary axis)",
                        t.shape, inp.reference
                    ))
                    .at_tensor(&p.out)
                    .in_file(path));
                }
                Some(_) if aligned.is_some() => {}
                Some(s) if *s != t.shape => {
                    if opts.truncate_embeddings
                        && s.len() == 2
                        && t.shape.len() == 2
                        && s[1] == t.shape[1]
                    {
                        let rows = s[0].min(t.shape[0]);
                        shape = Some(vec![rows, s[1]]);
                    } else {
                        return Err(Error::invalid(format!(
                            "tensor size mismatch: {s:?} vs {:?} in {}; models with different vocabularies need `tokenizer_source` (or --unsafe-truncate-embeddings)",
                            t.shape, inp.reference
                        ))
                        .at_tensor(&p.out)
                        .in_file(path));
                    }
                }
                _ => {}
            }
            operands.push(op);
        }
        let mut shape = shape.unwrap_or_default();
        if let Some(v) = aligned {
            let models: Vec<usize> = p.inputs.iter().map(|(m, _)| *m).collect();
            let rows_of = |r: crate::plan::TensorRef| sources[r.source].tensor(r.tensor).rows();
            let rows = v.align(path, &p.out, &models, &mut operands, rows_of)?;
            if let Some(first) = shape.first_mut() {
                *first = rows;
            }
        }
        let rows = shape.first().copied().unwrap_or(1);
        for op in &mut operands {
            op.rows = op.rows.min(rows);
        }
        let promoted = promote(&in_dtypes);
        let compute = dtype.unwrap_or(promoted);
        let first = &sources[operands[0].tensor.source].tensor(operands[0].tensor.tensor);
        let out_dt = if first.dtype.is_computable() {
            out_dtype.unwrap_or_else(|| method.result_dtype(compute))
        } else {
            first.dtype
        };
        let recipe = if !first.dtype.is_computable() {
            // mergekit passes non-float buffers through.
            Recipe::Copy(operands[0].tensor)
        } else {
            let r = tensor_recipe(
                path,
                method,
                p,
                &shape,
                inputs,
                top,
                compute,
                opts.random_seed,
            )?;
            Recipe::Compute {
                operands,
                method: Method::Mergekit(Box::new(r)),
            }
        };
        steps.push(Step::new(p.out.clone(), out_dt, shape, recipe));
        // mergekit writes in order of the (largest) input tensor name, ties in plan order.
        let key = p
            .inputs
            .iter()
            .map(|(_, n)| n.clone())
            .max()
            .unwrap_or_default();
        write_key.push((key, pi));
    }
    write_key.sort();
    let mut ordered: Vec<Step> = Vec::with_capacity(steps.len());
    let mut slots: Vec<Option<Step>> = steps.into_iter().map(Some).collect();
    for (_, i) in write_key {
        if let Some(s) = slots[i].take() {
            ordered.push(s);
        }
    }
    Ok(ordered)
}

/// torch.promote_types over the inputs' dtypes.
fn promote(dtypes: &[DType]) -> DType {
    let mut out: Option<DType> = None;
    for &d in dtypes.iter().filter(|d| d.is_computable()) {
        out = Some(match out {
            None => d,
            Some(o) if o == d => o,
            Some(DType::F64) | Some(_) if d == DType::F64 => DType::F64,
            Some(DType::F64) => DType::F64,
            Some(_) => DType::F32,
        });
    }
    out.unwrap_or(DType::F32)
}

/// Resolve the method's declared parameters for one output tensor and prepare its merge.
#[allow(clippy::too_many_arguments)]
fn tensor_recipe(
    path: &Path,
    method: &'static dyn MergeMethod,
    p: &Planned<'_>,
    shape: &[u64],
    inputs: &[Input],
    top: Option<&Parameters>,
    compute: DType,
    seed: u64,
) -> Result<MergekitRecipe> {
    let slice = p.slice;
    let tensor_err = |msg: String| Error::invalid(msg).at_tensor(&p.out).in_file(path);
    let base = p.inputs.iter().position(|(m, _)| Some(*m) == slice.base);
    let mut resolved = Resolved::new(method.name(), base, p.inputs.len(), seed_for(seed, &p.out));
    resolved.shape = shape.to_vec();
    for param in method.params() {
        match param.scope {
            Scope::Tensor => {
                // Shared parameters are looked up with no model and filtered on the output
                // name.
                let found = resolve(
                    param.name,
                    &[slice.params, slice.module_params, top],
                    &p.out,
                    p.t,
                );
                let value = typed(path, &p.out, param, found)?;
                match (value, param.need) {
                    (Some(v), _) => resolved.set(param.name, v),
                    (None, Need::Default(v)) => resolved.set(param.name, v),
                    (None, Need::Required | Need::RequiredUnlessBase) => {
                        return Err(tensor_err(format!(
                            "missing required parameter `{}` for {}",
                            param.name,
                            method.name()
                        )));
                    }
                    (None, Need::Optional) => {}
                }
            }
            Scope::Input => {
                for (i, (m, in_name)) in p.inputs.iter().enumerate() {
                    // Per-input parameters: this model's sources in the slice, then the
                    // slice, then the top level, filtered on the input tensor's name.
                    let mut scopes: Vec<Option<&Parameters>> = slice
                        .sources
                        .iter()
                        .filter(|s| s.0 == *m)
                        .map(|s| s.2)
                        .collect();
                    scopes.push(slice.params);
                    scopes.push(slice.module_params);
                    scopes.push(top);
                    let found = resolve(param.name, &scopes, in_name, p.t);
                    let value = typed(path, &p.out, param, found)?;
                    let required = match param.need {
                        Need::Required => true,
                        Need::RequiredUnlessBase => Some(i) != base,
                        _ => false,
                    };
                    match (value, param.need) {
                        (Some(v), _) => resolved.set_input(i, param.name, v),
                        (None, Need::Default(v)) => resolved.set_input(i, param.name, v),
                        (None, _) if required => {
                            return Err(tensor_err(format!(
                                "missing required parameter `{}` for {}",
                                param.name, inputs[*m].reference
                            )));
                        }
                        (None, _) => {}
                    }
                }
            }
        }
    }
    let merge = method.prepare(&resolved).map_err(|e| match e {
        PrepareError::Invalid(msg) => tensor_err(msg),
        PrepareError::Undeclared { method, name } => Error::internal(format!(
            "{method} reads parameter `{name}`, which it does not declare"
        ))
        .at_tensor(&p.out),
    })?;
    Ok(MergekitRecipe {
        method: method.name(),
        params: resolved.describe(),
        compute,
        merge,
    })
}

/// A looked-up parameter checked against the kind the method declares.
fn typed(path: &Path, tensor: &str, param: &Param, v: Option<Scalar>) -> Result<Option<Value>> {
    let wrong = |what: &str, other: &Scalar| {
        Err(Error::invalid(format!(
            "parameter `{}` must be {what}, not {}",
            param.name,
            other.describe()
        ))
        .at_tensor(tensor)
        .in_file(path))
    };
    match (param.kind, v) {
        (_, None) => Ok(None),
        (Kind::Number, Some(Scalar::Number(n))) => Ok(Some(Value::Number(n))),
        (Kind::Number, Some(other)) => wrong("a number", &other),
        (Kind::Flag, Some(Scalar::Bool(b))) => Ok(Some(Value::Flag(b))),
        (Kind::Flag, Some(Scalar::Number(n))) if n == 0.0 || n == 1.0 => {
            Ok(Some(Value::Flag(n == 1.0)))
        }
        (Kind::Flag, Some(other)) => wrong("true or false", &other),
    }
}

/// A per-tensor seed: the run's seed mixed with the tensor name (FNV-1a), so masks do not
/// depend on the order tensors are processed in.
fn seed_for(seed: u64, name: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}
