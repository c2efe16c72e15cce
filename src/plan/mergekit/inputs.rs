//! The models a config names: opened once each (with their LoRAs), and the architecture
//! they share.

use crate::error::Result;
use crate::model::Model;
use crate::plan::lora::{AdapterEffect, open_adapter, resolve as resolve_lora};

use super::arch::{self, Architecture, known};
use super::config::{MergeConfig, ModelRef};
use super::{MergeOptions, cfg_err};
use std::path::Path;

/// One model as the plan uses it.
pub(super) struct Input {
    pub reference: ModelRef,
    /// Index into [`Models::sources`].
    pub source: usize,
    pub effect: Option<AdapterEffect>,
    pub config: Option<serde_json::Value>,
    /// Layers of each module of the architecture.
    pub layers: Vec<u64>,
}

/// Every model of the config, in order (base first is not implied: config order).
pub(super) struct Models {
    pub refs: Vec<ModelRef>,
    /// The plan's sources: the models, then their adapters.
    pub sources: Vec<Model>,
    pub inputs: Vec<Input>,
}

impl Models {
    pub fn index_of(&self, r: &ModelRef) -> usize {
        self.refs.iter().position(|x| x == r).unwrap_or(0)
    }
}

/// Open every model the config names, once, and the LoRAs applied to them.
pub(super) fn open_models(path: &Path, cfg: &MergeConfig) -> Result<Models> {
    // Every model the config names, opened once.
    let mut refs: Vec<ModelRef> = Vec::new();
    let mut note = |r: &ModelRef| {
        if !refs.contains(r) {
            refs.push(r.clone());
        }
    };
    for m in cfg.models.iter().flatten() {
        note(&m.model);
    }
    let module_slices = cfg
        .modules
        .iter()
        .flatten()
        .flat_map(|(_, m)| m.slices.iter().flatten());
    for s in cfg.slices.iter().flatten().chain(module_slices) {
        for src in &s.sources {
            note(&src.model);
        }
        if let Some(b) = &s.base_model {
            note(b);
        }
    }
    for (_, m) in cfg.modules.iter().flatten() {
        for e in m.models.iter().flatten() {
            note(&e.model);
        }
    }
    if let Some(b) = &cfg.base_model {
        note(b);
    }
    if refs.is_empty() {
        return Err(cfg_err(path, "the config names no models"));
    }
    let mut sources: Vec<Model> = Vec::new();
    let mut inputs: Vec<Input> = Vec::new();
    for r in &refs {
        let model = Model::open_reference(&r.path)?;
        let config = model.config()?;
        sources.push(model);
        inputs.push(Input {
            reference: r.clone(),
            source: sources.len() - 1,
            effect: None,
            config,
            layers: Vec::new(),
        });
    }
    for i in 0..inputs.len() {
        if let Some(lora) = inputs[i].reference.lora.clone() {
            let adapter = open_adapter(&lora)?;
            let idx = sources.len();
            let effect = resolve_lora(
                &adapter,
                idx,
                inputs[i].reference.lora_weight,
                &sources[inputs[i].source],
            )?;
            sources.push(adapter.model);
            inputs[i].effect = Some(effect);
        }
    }
    Ok(Models {
        refs,
        sources,
        inputs,
    })
}

/// The architecture: the donor's (the base's, or the first model's); all must agree unless
/// `--allow-crimes`. Sets every input's layer count.
pub(super) fn architecture(
    path: &Path,
    opts: &MergeOptions,
    models: &mut Models,
    donor: usize,
) -> Result<Architecture> {
    let Models {
        sources, inputs, ..
    } = models;
    let arch_of = |i: usize| inputs[i].config.as_ref().and_then(known);
    let arch: Architecture = match arch_of(donor) {
        Some(a) => {
            for (i, inp) in inputs.iter().enumerate() {
                let other = arch_of(i)
                    .map(|x| x.name)
                    .unwrap_or_else(|| "unknown".into());
                if other != a.name && !opts.allow_crimes {
                    return Err(cfg_err(
                        path,
                        format!(
                            "{} is {other} but {} is {}; pass --allow-crimes to merge different architectures",
                            inp.reference, inputs[donor].reference, a.name
                        ),
                    ));
                }
            }
            a
        }
        None => {
            let models: Vec<&Model> = inputs.iter().map(|i| &sources[i.source]).collect();
            arch::infer(&models)
        }
    };
    for inp in inputs.iter_mut() {
        inp.layers = (0..arch.modules.len())
            .map(|m| arch::layer_count(&sources[inp.source], inp.config.as_ref(), &arch, m))
            .collect();
    }

    Ok(arch)
}
