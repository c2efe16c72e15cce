//! Slices as the planner uses them: `models:` becomes one slice over all layers (the base
//! appended if not listed); `slices:` are checked for layer ranges and equal lengths; each
//! slice's inputs are checked against the method.

use std::path::Path;

use crate::error::Result;
use crate::methods::mergekit::{InputCount, MergeMethod};

use super::cfg_err;
use super::config::{MergeConfig, Parameters};
use super::inputs::{Input, Models};

/// A normalized slice: sources (model index, first layer, parameters), shared parameters.
pub(super) struct Slice<'a> {
    pub sources: Vec<(usize, u64, Option<&'a Parameters>)>,
    pub len: u64,
    pub params: Option<&'a Parameters>,
    pub base: Option<usize>,
}

/// The config's slices, normalized and validated.
pub(super) fn build_slices<'a>(
    path: &Path,
    cfg: &'a MergeConfig,
    models: &Models,
    base: Option<usize>,
) -> Result<Vec<Slice<'a>>> {
    let inputs = &models.inputs;
    let index_of = |r| models.index_of(r);
    let mut slices: Vec<Slice<'_>> = Vec::new();
    if let Some(models) = &cfg.models {
        let mut srcs: Vec<(usize, u64, Option<&Parameters>)> = models
            .iter()
            .map(|m| (index_of(&m.model), 0, m.parameters.as_ref()))
            .collect();
        if let Some(b) = base
            && !srcs.iter().any(|s| s.0 == b)
        {
            srcs.push((b, 0, None));
        }
        let len = inputs[srcs[0].0].layers;
        for s in &srcs {
            if inputs[s.0].layers != len {
                return Err(cfg_err(
                    path,
                    format!(
                        "{} has {} layers but {} has {len}; use `slices` to merge models of different depths",
                        inputs[s.0].reference, inputs[s.0].layers, inputs[srcs[0].0].reference
                    ),
                ));
            }
        }
        slices.push(Slice {
            sources: srcs,
            len,
            params: None,
            base,
        });
    } else {
        for (si, s) in cfg.slices.iter().flatten().enumerate() {
            if s.sources.is_empty() {
                return Err(cfg_err(path, format!("slice {si} has no sources")));
            }
            let mut srcs = Vec::new();
            let mut len = None;
            for src in &s.sources {
                let m = index_of(&src.model);
                let [a, b] = src.layer_range;
                let layers = inputs[m].layers;
                if a < 0 || b <= a || b as u64 > layers {
                    return Err(cfg_err(
                        path,
                        format!(
                            "slice {si}: layer_range [{a}, {b}] of {} is outside its {layers} layers",
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
                                "slice {si}: sources cover different numbers of layers ({l} and {n})"
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
            });
        }
    }
    Ok(slices)
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
