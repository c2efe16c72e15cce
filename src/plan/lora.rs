//! PEFT LoRA adapters: loading, validation, and the patches they make to base tensors.
//!
//! PEFT's `merge_and_unload` semantics (DESIGN §5.2): scaling alpha/r (alpha/√r with
//! rsLoRA), per-module rank and alpha from rank_pattern/alpha_pattern, `W' = W + s·(B@A)`
//! (transposed with fan_in_fan_out), embeddings `Δ = (B@A)ᵀ·s` rounded to the base dtype
//! before the add, DoRA's row-norm rescaling, and full replacement tensors. Every
//! inconsistency is an error, never a silent no-op.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use regex::Regex;

use crate::error::{Context, Error, Result};
use crate::format::peft::{AdapterConfig, AdapterKey, classify_key, parse_adapter_config};
use crate::model::Model;
use crate::plan::{DeltaLayout, LoraPatch, Operand, TensorRef};
use crate::shape::RowMajor;
use crate::source::{Located, locate};

/// A LoRA adapter to apply, as the user names it.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub weight: f64,
}

/// An opened adapter: its tensors and config.
#[derive(Debug)]
pub struct Adapter {
    pub model: Model,
    pub config: AdapterConfig,
    /// How messages name `adapter_config.json`.
    pub config_path: PathBuf,
}

/// Open an adapter (`adapter_config.json` + `adapter_model.safetensors` or `.bin`): a folder,
/// or its weights file, local or any reference [`locate`] resolves.
pub fn open_adapter(path: &Path) -> Result<Adapter> {
    let Located { source, file } =
        locate(path).map_err(|e| Error::io("cannot open", e).in_file(path))?;
    let config_path = source.path_of("adapter_config.json");
    let text = source
        .read_small("adapter_config.json")
        .map_err(|e| Error::io("cannot read the adapter config", e).in_file(&config_path))?
        .ok_or_else(|| {
            Error::invalid("missing: a PEFT adapter folder holds adapter_config.json")
                .in_file(&config_path)
        })?;
    let text = String::from_utf8(text)
        .map_err(|_| Error::invalid("not UTF-8 text").in_file(&config_path))?;
    let config = parse_adapter_config(&text).in_file(&config_path)?;
    let weights = match file {
        Some(name) => name,
        None => {
            let candidates = ["adapter_model.safetensors", "adapter_model.bin"];
            let mut found = None;
            for c in candidates {
                let len = source
                    .file_len(c)
                    .map_err(|e| Error::io("cannot read", e).in_file(source.path_of(c)))?;
                if len.is_some() {
                    found = Some(c.to_string());
                    break;
                }
            }
            found.ok_or_else(|| {
                Error::invalid(
                    "no adapter weights: expected adapter_model.safetensors or adapter_model.bin",
                )
                .in_file(source.location())
            })?
        }
    };
    let model = Model::from_source_file(source, &weights)?;
    Ok(Adapter {
        model,
        config,
        config_path,
    })
}

/// What an adapter does to a base model: patches and replacements per base tensor name.
#[derive(Debug, Default)]
pub struct AdapterEffect {
    pub patches: HashMap<String, LoraPatch>,
    /// Base tensor name → adapter tensor that replaces it.
    pub replacements: HashMap<String, TensorRef>,
}

impl AdapterEffect {
    /// Build the operand for base tensor `name` of `base` (source `base_source`).
    pub fn operand(&self, base: &Model, base_source: usize, name: &str) -> Option<Operand> {
        let idx = base.index_of(name)?;
        let base_t = base.tensor(idx);
        let mut op = Operand::plain(
            TensorRef {
                source: base_source,
                tensor: idx,
            },
            base_t.rows(),
        );
        if let Some(&r) = self.replacements.get(name) {
            op.tensor = r;
            op.load_as = Some(base_t.dtype);
        }
        if let Some(p) = self.patches.get(name) {
            op.patches.push(p.clone());
        }
        Some(op)
    }

    pub fn touches(&self, name: &str) -> bool {
        self.patches.contains_key(name) || self.replacements.contains_key(name)
    }
}

#[derive(Default)]
struct ModuleKeys {
    a: Option<usize>,
    b: Option<usize>,
    magnitude: Option<usize>,
    embedding: bool,
}

/// Resolve an adapter against a base model. `adapter_source` is the adapter's index in the
/// plan's sources; `weight` multiplies the scaling.
pub fn resolve(
    adapter: &Adapter,
    adapter_source: usize,
    weight: f64,
    base: &Model,
) -> Result<AdapterEffect> {
    let file = &adapter.model.path;
    let cfg = &adapter.config;
    if !weight.is_finite() {
        return Err(Error::usage(format!(
            "LoRA weight {weight} is not a finite number"
        )));
    }
    let rank_patterns = compile_patterns(
        cfg.rank_pattern.iter().map(|(k, v)| (k.clone(), *v as f64)),
        &adapter.config_path,
    )?;
    let alpha_patterns = compile_patterns(cfg.alpha_pattern.iter().cloned(), &adapter.config_path)?;

    let mut modules: BTreeMap<String, ModuleKeys> = BTreeMap::new();
    let mut effect = AdapterEffect::default();
    for (i, t) in adapter.model.tensors().iter().enumerate() {
        match classify_key(&t.name) {
            AdapterKey::LinearA(m) => modules.entry(m).or_default().a = Some(i),
            AdapterKey::LinearB(m) => modules.entry(m).or_default().b = Some(i),
            AdapterKey::EmbeddingA(m) => {
                let e = modules.entry(m).or_default();
                e.a = Some(i);
                e.embedding = true;
            }
            AdapterKey::EmbeddingB(m) => {
                let e = modules.entry(m).or_default();
                e.b = Some(i);
                e.embedding = true;
            }
            AdapterKey::Magnitude(m) => modules.entry(m).or_default().magnitude = Some(i),
            AdapterKey::Replacement(name) => {
                let Some(bt) = base.get(&name) else {
                    return Err(Error::invalid(format!(
                        "replaces base tensor `{name}`, which the base model does not have"
                    ))
                    .at_tensor(&t.name)
                    .in_file(file));
                };
                if bt.shape != t.shape {
                    return Err(Error::invalid(format!(
                        "replacement has shape {:?} but base tensor `{name}` has {:?}",
                        t.shape, bt.shape
                    ))
                    .at_tensor(&t.name)
                    .in_file(file));
                }
                if !t.dtype.is_computable() || !bt.dtype.is_computable() {
                    return Err(Error::invalid(format!(
                        "replacement of `{name}` is {} over {}; only float tensors can be replaced",
                        t.dtype, bt.dtype
                    ))
                    .at_tensor(&t.name)
                    .in_file(file));
                }
                effect.replacements.insert(
                    name,
                    TensorRef {
                        source: adapter_source,
                        tensor: i,
                    },
                );
            }
        }
    }
    if modules.is_empty() {
        return Err(Error::invalid(
            "the adapter has no LoRA tensors (lora_A/lora_B); nothing to merge",
        )
        .in_file(file));
    }

    for (module, keys) in &modules {
        let tensor_name = |i: usize| adapter.model.tensor(i).name.clone();
        let (a, b) = match (keys.a, keys.b) {
            (Some(a), Some(b)) => (a, b),
            (None, Some(b)) => {
                return Err(Error::invalid("lora_B without its lora_A")
                    .at_tensor(tensor_name(b))
                    .in_file(file));
            }
            (Some(a), None) => {
                return Err(Error::invalid("lora_A without its lora_B")
                    .at_tensor(tensor_name(a))
                    .in_file(file));
            }
            (None, None) => {
                let m = keys
                    .magnitude
                    .map(tensor_name)
                    .unwrap_or_else(|| module.clone());
                return Err(Error::invalid("DoRA magnitude without lora_A/lora_B")
                    .at_tensor(m)
                    .in_file(file));
            }
        };
        let at = adapter.model.tensor(a);
        let bt = adapter.model.tensor(b);
        let base_name = format!("{module}.weight");
        let Some(base_idx) = base.index_of(&base_name) else {
            return Err(Error::invalid(format!(
                "LoRA for `{base_name}`, which the base model does not have"
            ))
            .at_tensor(&at.name)
            .in_file(file));
        };
        let w = base.tensor(base_idx);
        for t in [at, bt] {
            if !t.dtype.is_computable() || t.shape.len() != 2 {
                return Err(Error::invalid(format!(
                    "LoRA factor must be a 2-D float tensor, found {} {:?}",
                    t.dtype, t.shape
                ))
                .at_tensor(&t.name)
                .in_file(file));
            }
        }
        if !w.dtype.is_computable() || w.shape.len() != 2 {
            return Err(Error::invalid(format!(
                "base tensor `{base_name}` is {} {:?}; LoRA needs a 2-D float weight",
                w.dtype, w.shape
            ))
            .at_tensor(&at.name)
            .in_file(file));
        }
        let r = pattern_lookup(&rank_patterns, module).unwrap_or(cfg.r as f64) as u64;
        let alpha = pattern_lookup(&alpha_patterns, module).unwrap_or(cfg.lora_alpha);
        // A: [r, in] (embedding: [r, vocab]); B: [out, r] (embedding: [dim, r]).
        if at.shape[0] != r || bt.shape[1] != r {
            return Err(Error::invalid(format!(
                "rank {} (lora_A {:?}, lora_B {:?}) does not match r = {r} from the adapter config",
                at.shape[0], at.shape, bt.shape
            ))
            .at_tensor(&at.name)
            .in_file(file));
        }
        let transposed = keys.embedding || cfg.fan_in_fan_out;
        let delta_shape = if transposed {
            [at.shape[1], bt.shape[0]]
        } else {
            [bt.shape[0], at.shape[1]]
        };
        if delta_shape[..] != w.shape[..] {
            return Err(Error::invalid(format!(
                "LoRA delta has shape {delta_shape:?} but `{base_name}` has {:?}",
                w.shape
            ))
            .at_tensor(&at.name)
            .in_file(file));
        }
        let magnitude = match keys.magnitude {
            None => None,
            Some(m) => {
                let mt = adapter.model.tensor(m);
                if keys.embedding || transposed {
                    return Err(Error::invalid(
                        "DoRA on embeddings or fan_in_fan_out layers is not supported yet",
                    )
                    .at_tensor(&mt.name)
                    .in_file(file));
                }
                if mt.numel() != w.shape[0] || !mt.dtype.is_computable() {
                    return Err(Error::invalid(format!(
                        "DoRA magnitude has shape {:?}, expected [{}]",
                        mt.shape, w.shape[0]
                    ))
                    .at_tensor(&mt.name)
                    .in_file(file));
                }
                Some(TensorRef {
                    source: adapter_source,
                    tensor: m,
                })
            }
        };
        if cfg.use_dora && magnitude.is_none() {
            return Err(Error::invalid(
                "use_dora is set but the adapter has no lora_magnitude_vector for this module",
            )
            .at_tensor(&at.name)
            .in_file(file));
        }
        let scaling = if cfg.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        let patch = LoraPatch {
            a: TensorRef {
                source: adapter_source,
                tensor: a,
            },
            b: TensorRef {
                source: adapter_source,
                tensor: b,
            },
            scale: (scaling * weight) as f32,
            layout: if transposed {
                DeltaLayout::Transposed
            } else {
                DeltaLayout::Rows
            },
            round_delta: if keys.embedding { Some(w.dtype) } else { None },
            magnitude,
            rank: r,
        };
        effect.patches.insert(base_name, patch);
    }
    Ok(effect)
}

/// PEFT's pattern rule: key `k` matches module path `p` when `(.*\.)?(k)$` matches `p` from
/// its start. Keys are regular expressions.
fn compile_patterns(
    patterns: impl IntoIterator<Item = (String, f64)>,
    config_path: &Path,
) -> Result<Vec<(Regex, f64)>> {
    patterns
        .into_iter()
        .map(|(k, v)| {
            let re = Regex::new(&format!(r"^(?:.*\.)?(?:{k})$")).map_err(|e| {
                Error::invalid(format!(
                    "pattern `{k}` is not a valid regular expression: {e}"
                ))
                .in_file(config_path)
            })?;
            Ok((re, v))
        })
        .collect()
}

fn pattern_lookup(patterns: &[(Regex, f64)], module: &str) -> Option<f64> {
    patterns
        .iter()
        .find(|(re, _)| re.is_match(module))
        .map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_rule_matches_suffix_modules() {
        let p = compile_patterns(
            [
                ("q_proj".to_string(), 4.0),
                ("layers\\.1\\..*v_proj".to_string(), 2.0),
            ],
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(
            pattern_lookup(&p, "model.layers.0.self_attn.q_proj"),
            Some(4.0)
        );
        assert_eq!(
            pattern_lookup(&p, "model.layers.1.self_attn.v_proj"),
            Some(2.0)
        );
        assert_eq!(pattern_lookup(&p, "model.layers.0.self_attn.v_proj"), None);
        assert_eq!(pattern_lookup(&p, "model.layers.0.self_attn.xq_proj"), None);
    }
}
