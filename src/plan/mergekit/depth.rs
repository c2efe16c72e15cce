//! The output config when a merge changes a model's depth: every field that counts or lists
//! layers follows the tensors written, for the architecture's modules (`n_layer` for GPT-2,
//! `text_config.num_hidden_layers` for a multimodal decoder, per-layer lists such as Qwen2's
//! `layer_types`), and a final check that config and tensors agree — an unloadable model is
//! an error before anything is written, never a silent output.

use std::path::Path;

use serde_json::Value;

use crate::error::Result;

use super::arch::{Architecture, split_layer};
use super::cfg_err;
use super::inputs::Input;
use super::tensors::OutLayers;

/// Layer-count keys tried for architectures mergekit has no definition for.
const INFERRED_KEYS: [&str; 4] = ["num_hidden_layers", "n_layer", "num_layers", "n_layers"];

/// Keys never rewritten even when their length happens to equal the layer count.
const NOT_PER_LAYER: [&str; 1] = ["architectures"];

/// The config.json path of each module's layer count (dotted), where the config has one.
fn count_keys(arch: &Architecture, config: &Value, module: usize) -> Vec<String> {
    let m = &arch.modules[module];
    if arch.known {
        return m.layers_key.iter().cloned().collect();
    }
    INFERRED_KEYS
        .iter()
        .filter(|k| config.get(**k).is_some_and(Value::is_u64))
        .map(|k| k.to_string())
        .collect()
}

/// The object holding dotted `key`'s last component, and that component.
fn parent_mut<'a>(
    config: &'a mut Value,
    key: &'a str,
) -> Option<(&'a mut serde_json::Map<String, Value>, &'a str)> {
    let (path, leaf) = match key.rsplit_once('.') {
        Some((p, l)) => (Some(p), l),
        None => (None, key),
    };
    let mut v = config;
    for k in path.into_iter().flat_map(|p| p.split('.')) {
        v = v.get_mut(k)?;
    }
    Some((v.as_object_mut()?, leaf))
}

fn parent<'a>(config: &'a Value, key: &str) -> Option<&'a serde_json::Map<String, Value>> {
    let mut v = config;
    if let Some((path, _)) = key.rsplit_once('.') {
        for k in path.split('.') {
            v = v.get(k)?;
        }
    }
    v.as_object()
}

/// Rewrite the layer counts and per-layer lists of `config` (the donor's) for the layers
/// written: each module's count key, and beside it every list with one entry per layer,
/// rebuilt from the entries of the layers each output layer comes from.
pub(super) fn rewrite(
    config: &mut Value,
    arch: &Architecture,
    out_layers: &OutLayers,
    inputs: &[Input],
    donor: usize,
) {
    for (module, layers) in out_layers {
        let old = inputs[donor].layers[*module];
        let new = layers.len() as u64;
        for key in count_keys(arch, config, *module) {
            // Per-layer lists of each model, where its config has them at the same place.
            let lists_of = |i: usize| -> Vec<(String, Vec<Value>)> {
                let n = inputs[i].layers[*module];
                inputs[i]
                    .config
                    .as_ref()
                    .and_then(|c| parent(c, &key))
                    .map(|obj| {
                        obj.iter()
                            .filter(|(k, _)| !NOT_PER_LAYER.contains(&k.as_str()))
                            .filter_map(|(k, v)| Some((k.clone(), v.as_array()?.clone())))
                            .filter(|(_, a)| n >= 2 && a.len() as u64 == n)
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let donor_lists = lists_of(donor);
            let Some((obj, leaf)) = parent_mut(config, &key) else {
                continue;
            };
            if !obj.contains_key(leaf) {
                continue;
            }
            obj.insert(leaf.to_string(), new.into());
            if new == old {
                continue;
            }
            for (name, donor_list) in donor_lists {
                let rebuilt: Option<Vec<Value>> = layers
                    .iter()
                    .map(|&(model, layer)| {
                        let own = lists_of(model);
                        let list = own
                            .iter()
                            .find(|(k, _)| *k == name)
                            .map_or(&donor_list, |(_, l)| l);
                        list.get(layer as usize).cloned()
                    })
                    .collect();
                if let Some(list) = rebuilt {
                    obj.insert(name, Value::Array(list));
                }
            }
        }
    }
}

/// Check the output config against the tensors planned: each module's layer count (and every
/// per-layer list beside it) must match the layers the output holds.
pub(super) fn check(
    path: &Path,
    config: &Value,
    arch: &Architecture,
    out_layers: &OutLayers,
    names: &[&str],
) -> Result<()> {
    for (module, _) in out_layers {
        let m = &arch.modules[*module];
        // Layers the tensor names show, for this module's layer templates.
        let templates: Vec<&str> = m.layer_templates.iter().map(|w| w.name.as_str()).collect();
        let written = names
            .iter()
            .filter_map(|n| n.strip_prefix(m.prefix.as_str()))
            .filter_map(split_layer)
            .filter(|(t, _)| templates.contains(&t.as_str()))
            .map(|(_, i)| i + 1)
            .max()
            .unwrap_or(0);
        for key in count_keys(arch, config, *module) {
            let leaf = key.rsplit('.').next().unwrap_or(&key);
            let Some(count) = parent(config, &key)
                .and_then(|o| o.get(leaf))
                .and_then(Value::as_u64)
            else {
                continue;
            };
            if count != written {
                return Err(cfg_err(
                    path,
                    format!(
                        "the output's config.json would say {key}: {count} but its tensors hold {written} layers{}; nothing was written",
                        if arch.modules.len() > 1 {
                            format!(" in module `{}`", m.name)
                        } else {
                            String::new()
                        }
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::mergekit::arch::known;

    #[test]
    fn a_count_that_disagrees_with_the_tensors_is_an_error() {
        let cfg = serde_json::json!({"architectures": ["GPT2LMHeadModel"], "n_layer": 4});
        let arch = known(&cfg).unwrap();
        let names = ["transformer.h.0.ln_1.weight", "transformer.h.5.ln_1.weight"];
        let layers: OutLayers = vec![(0, Vec::new())];
        let e = check(Path::new("c.yml"), &cfg, &arch, &layers, &names).unwrap_err();
        assert!(
            e.to_string()
                .contains("config.json would say n_layer: 4 but its tensors hold 6 layers"),
            "{e}"
        );
        let ok = serde_json::json!({"architectures": ["GPT2LMHeadModel"], "n_layer": 6});
        check(Path::new("c.yml"), &ok, &arch, &layers, &names).unwrap();
    }

    #[test]
    fn nested_count_keys_are_found() {
        let mut cfg = serde_json::json!({"text_config": {"num_hidden_layers": 4, "layer_types": [1, 2, 3, 4]}});
        let (obj, leaf) = parent_mut(&mut cfg, "text_config.num_hidden_layers").unwrap();
        assert_eq!(leaf, "num_hidden_layers");
        assert!(obj.contains_key("layer_types"));
        assert!(parent(&cfg, "vision_config.depth").is_none());
    }
}
