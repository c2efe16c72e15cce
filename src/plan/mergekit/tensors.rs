//! The output tensors in mergekit's plan order: pre-layer weights from the first slice
//! (t = 0), each slice's layers renumbered in output order (t = offset/(len−1)), post-layer
//! weights from the last slice (t = 0).

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

/// The output tensors, and the number of output layers.
pub(super) fn output_tensors<'a>(
    arch: &Architecture,
    slices: &'a [Slice<'a>],
    models: &Models,
) -> (Vec<Planned<'a>>, u64) {
    let (sources, inputs) = (&models.sources, &models.inputs);
    let mut planned: Vec<Planned<'_>> = Vec::new();
    let weight_inputs = |slice: &Slice<'_>, w: &arch::Weight| -> Option<Vec<(usize, String)>> {
        let has = |m: usize, n: &str| sources[inputs[m].source].get(n).is_some();
        if w.optional && !slice.sources.iter().any(|s| has(s.0, &w.name)) {
            return None;
        }
        Some(
            slice
                .sources
                .iter()
                .map(|s| {
                    let name = match &w.tied_to {
                        Some(t) if !has(s.0, &w.name) && has(s.0, t) => t.clone(),
                        _ => w.name.clone(),
                    };
                    (s.0, name)
                })
                .collect(),
        )
    };
    if let Some(first) = slices.first() {
        for w in &arch.pre {
            if let Some(ins) = weight_inputs(first, w) {
                planned.push(Planned {
                    out: w.name.clone(),
                    inputs: ins,
                    t: 0.0,
                    slice: first,
                });
            }
        }
    }
    let mut out_layer = 0u64;
    for s in slices {
        for idx in 0..s.len {
            let t = if s.len > 1 {
                idx as f64 / (s.len - 1) as f64
            } else {
                1.0
            };
            for (ti, tpl) in arch.layer_templates.iter().enumerate() {
                // A tower with fewer layers than the model (a VLM's vision encoder) has no
                // tensors at this index in any input.
                if !s.sources.iter().any(|src| arch.has_layer(ti, src.1 + idx)) {
                    continue;
                }
                let ins = s
                    .sources
                    .iter()
                    .map(|src| (src.0, tpl.replacen("{}", &(src.1 + idx).to_string(), 1)))
                    .collect();
                planned.push(Planned {
                    out: tpl.replacen("{}", &out_layer.to_string(), 1),
                    inputs: ins,
                    t,
                    slice: s,
                });
            }
            out_layer += 1;
        }
    }
    if let Some(last) = slices.last() {
        for w in &arch.post {
            if let Some(ins) = weight_inputs(last, w) {
                planned.push(Planned {
                    out: w.name.clone(),
                    inputs: ins,
                    t: 0.0,
                    slice: last,
                });
            }
        }
    }

    (planned, out_layer)
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
