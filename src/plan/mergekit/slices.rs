//! Slices as the planner uses them, per architecture module: `models:` becomes one slice
//! over all layers (the base appended if not listed); `slices:` are checked for layer ranges
//! and equal lengths; `modules:` gives each named module its own; each slice's inputs are
//! checked against the method.

use std::path::Path;

use crate::error::Result;
use crate::methods::mergekit::{InputCount, MergeMethod};

use super::arch::Architecture;
use super::cfg_err;
use super::config::{MergeConfig, ModelEntry, Parameters, SliceEntry};
use super::inputs::{Input, Models};

/// A normalized slice: sources (model index, first layer, parameters), shared parameters.
pub(super) struct Slice<'a> {
    pub sources: Vec<(usize, u64, Option<&'a Parameters>)>,
    pub len: u64,
    pub params: Option<&'a Parameters>,
    pub base: Option<usize>,
    /// The architecture module the slice's layers belong to.
    pub module: usize,
    /// Parameters the module gives (`modules: {name: {parameters: …}}`), between the slice's
    /// and the top level's in precedence.
    pub module_params: Option<&'a Parameters>,
}

/// The config's slices, normalized and validated, module by module: `models:` gives every
/// module of the architecture one slice over all its layers; `slices:` needs a one-module
/// architecture; `modules:` names modules, each with models or slices.
pub(super) fn build_slices<'a>(
    path: &Path,
    cfg: &'a MergeConfig,
    arch: &Architecture,
    models: &Models,
    base: Option<usize>,
) -> Result<Vec<Slice<'a>>> {
    let mut slices: Vec<Slice<'_>> = Vec::new();
    if let Some(entries) = &cfg.models {
        for module in 0..arch.modules.len() {
            slices.push(models_slice(
                path, entries, arch, module, models, base, None,
            )?);
        }
    } else if let Some(list) = &cfg.slices {
        if arch.modules.len() != 1 {
            return Err(cfg_err(
                path,
                format!(
                    "{} has several modules ({}): use `modules:` to give slices per module",
                    arch.name,
                    arch.module_names()
                ),
            ));
        }
        layer_slices(path, list, arch, 0, models, base, None, &mut slices)?;
    } else {
        for (name, entry) in cfg.modules.iter().flatten() {
            let module = arch.module(name).ok_or_else(|| {
                cfg_err(
                    path,
                    format!(
                        "module `{name}` is not a module of {} (its modules: {})",
                        arch.name,
                        arch.module_names()
                    ),
                )
            })?;
            let params = entry.parameters.as_ref();
            match (&entry.models, &entry.slices) {
                (Some(m), None) => {
                    slices.push(models_slice(path, m, arch, module, models, base, params)?)
                }
                (None, Some(l)) => {
                    layer_slices(path, l, arch, module, models, base, params, &mut slices)?
                }
                _ => {
                    return Err(cfg_err(
                        path,
                        format!("module `{name}` needs either `models` or `slices`"),
                    ));
                }
            }
        }
    }
    Ok(slices)
}

/// `models:` of one module: one slice over all its layers, the base appended if not listed.
fn models_slice<'a>(
    path: &Path,
    entries: &'a [ModelEntry],
    arch: &Architecture,
    module: usize,
    models: &Models,
    base: Option<usize>,
    module_params: Option<&'a Parameters>,
) -> Result<Slice<'a>> {
    let inputs = &models.inputs;
    let mut srcs: Vec<(usize, u64, Option<&Parameters>)> = entries
        .iter()
        .map(|m| (models.index_of(&m.model), 0, m.parameters.as_ref()))
        .collect();
    if srcs.is_empty() {
        return Err(cfg_err(path, "`models` lists no models"));
    }
    if let Some(b) = base
        && !srcs.iter().any(|s| s.0 == b)
    {
        srcs.push((b, 0, None));
    }
    let layers = |m: usize| inputs[m].layers[module];
    let len = layers(srcs[0].0);
    for s in &srcs {
        if layers(s.0) != len {
            let what = if arch.modules.len() > 1 {
                format!(" in module `{}`", arch.modules[module].name)
            } else {
                String::new()
            };
            return Err(cfg_err(
                path,
                format!(
                    "{} has {} layers{what} but {} has {len}; use `slices` to merge models of different depths",
                    inputs[s.0].reference,
                    layers(s.0),
                    inputs[srcs[0].0].reference
                ),
            ));
        }
    }
    Ok(Slice {
        sources: srcs,
        len,
        params: None,
        base,
        module,
        module_params,
    })
}

/// `slices:` of one module, each checked for its layer ranges and equal lengths.
#[allow(clippy::too_many_arguments)]
fn layer_slices<'a>(
    path: &Path,
    list: &'a [SliceEntry],
    arch: &Architecture,
    module: usize,
    models: &Models,
    base: Option<usize>,
    module_params: Option<&'a Parameters>,
    slices: &mut Vec<Slice<'a>>,
) -> Result<()> {
    let inputs = &models.inputs;
    let index_of = |r| models.index_of(r);
    let label = |si: usize| {
        if arch.modules.len() > 1 || module_params.is_some() {
            format!("module `{}` slice {si}", arch.modules[module].name)
        } else {
            format!("slice {si}")
        }
    };
    for (si, s) in list.iter().enumerate() {
        if s.sources.is_empty() {
            return Err(cfg_err(path, format!("{} has no sources", label(si))));
        }
        let mut srcs = Vec::new();
        let mut len = None;
        for src in &s.sources {
            let m = index_of(&src.model);
            let [a, b] = src.layer_range;
            let layers = inputs[m].layers[module];
            if a < 0 || b <= a || b as u64 > layers {
                return Err(cfg_err(
                    path,
                    format!(
                        "{}: layer_range [{a}, {b}] of {} is outside its {layers} layers",
                        label(si),
                        src.model
                    ),
                ));
            }
            let n = (b - a) as u64;
            match len {
                None => len = Some(n),
                Some(l) if l != n => {
                    return Err(cfg_err(
                        path,
                        format!(
                            "{}: sources cover different numbers of layers ({l} and {n})",
                            label(si)
                        ),
                    ));
                }
                _ => {}
            }
            srcs.push((m, a as u64, src.parameters.as_ref()));
        }
        let slice_base = s.base_model.as_ref().map(index_of).or(base);
        slices.push(Slice {
            sources: srcs,
            len: len.unwrap_or(0),
            params: s.parameters.as_ref(),
            base: slice_base,
            module,
            module_params,
        });
    }
    Ok(())
}

pub(super) fn check_method_inputs(
    path: &Path,
    method: &dyn MergeMethod,
    si: usize,
    s: &Slice<'_>,
    inputs: &[Input],
) -> Result<()> {
    let name = method.name();
    let has_base = s.base.is_some_and(|b| s.sources.iter().any(|x| x.0 == b));
    if method.needs_base() && s.base.is_none() {
        return Err(cfg_err(
            path,
            format!("merge_method {name} needs a base_model"),
        ));
    }
    if method.needs_base() && !has_base {
        let b = s
            .base
            .map(|b| inputs[b].reference.to_string())
            .unwrap_or_default();
        return Err(cfg_err(
            path,
            format!("slice {si}: base_model {b} is not one of its sources"),
        ));
    }
    let count = InputCount {
        total: s.sources.len(),
        others: s.sources.iter().filter(|x| Some(x.0) != s.base).count(),
    };
    method
        .check_inputs(count)
        .map_err(|msg| cfg_err(path, format!("slice {si}: {msg}")))
}
