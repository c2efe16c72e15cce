//! The output tensors in mergekit's plan order, module by module: pre-layer weights from the
//! module's first slice (t = 0), each slice's layers renumbered in output order
//! (t = offset/(len−1)), post-layer weights from its last slice (t = 0); every name with the
//! module's prefix.

use std::path::Path;

use crate::error::Result;

use super::arch::{self, Architecture};
use super::cfg_err;
use super::config::MergeConfig;
use super::inputs::Models;
use super::params::filters;
use super::slices::Slice;

/// One output tensor: its inputs (model index, input tensor name), t, and slice.
pub(super) struct Planned<'a> {
    pub out: String,
    pub inputs: Vec<(usize, String)>,
    pub t: f64,
    pub slice: &'a Slice<'a>,
}

/// The output layers of each module the slices cover: for each output layer, the model and
/// layer it comes from (the slice's first source, as mergekit counts them).
pub(super) type OutLayers = Vec<(usize, Vec<(usize, u64)>)>;

/// The output tensors, module by module, and each module's output layers.
pub(super) fn output_tensors<'a>(
    arch: &Architecture,
    slices: &'a [Slice<'a>],
    models: &Models,
) -> (Vec<Planned<'a>>, OutLayers) {
    let (sources, inputs) = (&models.sources, &models.inputs);
    let has = |m: usize, n: &str| sources[inputs[m].source].get(n).is_some();
    // The name model `m` stores weight `w` under: its own name, an alias, or (when it has
    // neither) a tied name it has; its own name when it has none of them.
    let input_name = |m: usize, prefix: &str, w: &arch::Weight, layer: Option<u64>| {
        let full = |n: &str| {
            let n = match layer {
                Some(l) => n.replacen("{}", &l.to_string(), 1),
                None => n.to_string(),
            };
            format!("{prefix}{n}")
        };
        std::iter::once(&w.name)
            .chain(&w.aliases)
            .chain(&w.tied)
            .map(|n| full(n))
            .find(|n| has(m, n))
            .unwrap_or_else(|| full(&w.name))
    };
    let present = |slice: &Slice<'_>, prefix: &str, w: &arch::Weight| {
        slice.sources.iter().any(|s| {
            std::iter::once(&w.name)
                .chain(&w.aliases)
                .any(|n| has(s.0, &format!("{prefix}{n}")))
        })
    };
    let mut planned: Vec<Planned<'_>> = Vec::new();
    let mut out_layers: OutLayers = Vec::new();
    let mut order: Vec<usize> = Vec::new();
    for s in slices {
        if !order.contains(&s.module) {
            order.push(s.module);
        }
    }
    for module in order {
        let m = &arch.modules[module];
        let prefix = m.prefix.as_str();
        let mine: Vec<&'a Slice<'a>> = slices.iter().filter(|s| s.module == module).collect();
        let (Some(first), Some(last)) = (mine.first(), mine.last()) else {
            continue;
        };
        let non_layer = |slice: &'a Slice<'a>, weights: &[arch::Weight]| {
            let mut v = Vec::new();
            for w in weights {
                if w.optional && !present(slice, prefix, w) {
                    continue;
                }
                v.push(Planned {
                    out: format!("{prefix}{}", w.name),
                    inputs: slice
                        .sources
                        .iter()
                        .map(|s| (s.0, input_name(s.0, prefix, w, None)))
                        .collect(),
                    t: 0.0,
                    slice,
                });
            }
            v
        };
        planned.extend(non_layer(first, &m.pre));
        let mut layers = Vec::new();
        for s in &mine {
            for idx in 0..s.len {
                let t = if s.len > 1 {
                    idx as f64 / (s.len - 1) as f64
                } else {
                    1.0
                };
                let out_layer = layers.len() as u64;
                for (ti, w) in m.layer_templates.iter().enumerate() {
                    // A tower with fewer layers than the model (a VLM's vision encoder, when
                    // inferred) has no tensors at this index in any input.
                    if !s.sources.iter().any(|src| m.has_layer(ti, src.1 + idx)) {
                        continue;
                    }
                    let ins = s
                        .sources
                        .iter()
                        .map(|src| (src.0, input_name(src.0, prefix, w, Some(src.1 + idx))))
                        .collect();
                    planned.push(Planned {
                        out: format!(
                            "{prefix}{}",
                            w.name.replacen("{}", &out_layer.to_string(), 1)
                        ),
                        inputs: ins,
                        t,
                        slice: s,
                    });
                }
                if let Some(src) = s.sources.first() {
                    layers.push((src.0, src.1 + idx));
                }
            }
        }
        planned.extend(non_layer(last, &m.post));
        out_layers.push((module, layers));
    }
    (planned, out_layers)
}

/// Every `{filter, value}` must match some tensor: a filter that matches nothing is a typo.
pub(super) fn check_filters(
    path: &Path,
    cfg: &MergeConfig,
    slices: &[Slice<'_>],
    planned: &[Planned<'_>],
) -> Result<()> {
    let mut all_filters = Vec::new();
    for p in [cfg.parameters.as_ref()]
        .into_iter()
        .chain(slices.iter().map(|s| s.params))
        .chain(slices.iter().map(|s| s.module_params))
        .chain(slices.iter().flat_map(|s| s.sources.iter().map(|x| x.2)))
        .flatten()
    {
        filters(p, &mut all_filters);
    }
    for f in &all_filters {
        let hit = planned.iter().any(|p| {
            p.out.contains(f.as_str()) || p.inputs.iter().any(|(_, n)| n.contains(f.as_str()))
        });
        if !hit {
            return Err(cfg_err(
                path,
                format!("filter `{f}` matches no tensor of the models"),
            ));
        }
    }

    Ok(())
}
