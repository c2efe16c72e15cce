//! Architectures: which tensors a model has, in which modules, which belong to layers, and
//! in what order mergekit plans them.
//!
//! Every architecture mergekit 0.1.5 defines is in `architectures.json` (generated from
//! mergekit's definitions by `tools/gen_architectures.py`, in our own form): modules (a
//! vision tower, a projector and a text decoder for multimodal models; one `default` module
//! otherwise) with their tensor-name prefix, the config.json key holding their layer count,
//! and their pre-layer, per-layer and post-layer weights (with the other names inputs may
//! store them under). Anything else is inferred as mergekit does: the first `.N.` in a name
//! is the layer index, everything else is a pre-layer weight at t = 0.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use serde::Deserialize;

use crate::model::Model;

/// A non-layer tensor of an architecture, or a per-layer one (`{}` for the layer index).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Weight {
    pub name: String,
    /// Planned only if some input has it (e.g. an untied lm_head).
    #[serde(default)]
    pub optional: bool,
    /// Other names an input may store it under, tried in order.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Read instead when an input lacks it and its aliases (tied embeddings).
    #[serde(default)]
    pub tied: Vec<String>,
    /// Its vocabulary axis, for tensors with one row per token.
    #[serde(default)]
    pub vocab: Option<u8>,
}

/// One module of an architecture: its tensors all start with `prefix`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Module {
    pub name: String,
    #[serde(default)]
    pub prefix: String,
    /// Where config.json keeps the module's layer count (dotted: `text_config.num_hidden_layers`).
    #[serde(default)]
    pub layers_key: Option<String>,
    /// A layer count the definition fixes instead.
    #[serde(default)]
    pub fixed_layers: Option<u64>,
    pub pre: Vec<Weight>,
    #[serde(rename = "layer")]
    pub layer_templates: Vec<Weight>,
    pub post: Vec<Weight>,
    /// Why mergestream cannot plan this module from its definition (it is then inferred).
    #[serde(default)]
    pub unsupported: Option<String>,
    /// Inferred architectures: layers each layer template has in some input (a VLM's vision
    /// encoder has fewer than its text model); empty for defined ones.
    #[serde(skip)]
    pub template_layers: Vec<u64>,
}

impl Module {
    /// Whether layer template `i` has a layer `n`.
    pub fn has_layer(&self, i: usize, n: u64) -> bool {
        self.template_layers.get(i).is_none_or(|&count| n < count)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Architecture {
    pub name: String,
    pub modules: Vec<Module>,
    /// Whether it comes from a definition (its layer counts are in config.json).
    pub known: bool,
    /// Where config.json keeps the vocabulary size (default `vocab_size`).
    pub vocab_key: Option<String>,
}

impl Architecture {
    /// The module named `name`.
    pub fn module(&self, name: &str) -> Option<usize> {
        self.modules.iter().position(|m| m.name == name)
    }

    pub fn module_names(&self) -> String {
        let names: Vec<&str> = self.modules.iter().map(|m| m.name.as_str()).collect();
        names.join(", ")
    }
}

#[derive(Deserialize)]
struct Table {
    architectures: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    architectures: Vec<String>,
    model_type: String,
    modules: Vec<Module>,
    #[serde(default)]
    vocab_key: Option<String>,
}

/// The definitions, parsed once (`None` only if the embedded table were malformed, which a
/// unit test rules out).
fn table() -> Option<&'static Table> {
    static TABLE: OnceLock<Option<Table>> = OnceLock::new();
    TABLE
        .get_or_init(|| serde_json::from_str(include_str!("architectures.json")).ok())
        .as_ref()
}

/// The architecture mergekit defines for this config's `architectures[0]` (several entries
/// for one name are told apart by `model_type`), if any and if every module is expressible.
pub fn known(config: &serde_json::Value) -> Option<Architecture> {
    let arch = config.get("architectures")?.get(0)?.as_str()?;
    let model_type = config.get("model_type").and_then(|m| m.as_str());
    let candidates: Vec<&Entry> = table()?
        .architectures
        .iter()
        .filter(|e| e.architectures.iter().any(|a| a == arch))
        .collect();
    let entry = match candidates.as_slice() {
        [one] => *one,
        many => *many
            .iter()
            .find(|e| Some(e.model_type.as_str()) == model_type)?,
    };
    if entry.modules.iter().any(|m| m.unsupported.is_some()) {
        return None;
    }
    Some(Architecture {
        name: arch.into(),
        modules: entry.modules.clone(),
        known: true,
        vocab_key: entry.vocab_key.clone(),
    })
}

/// A config value at a dotted path (`text_config.num_hidden_layers`).
pub fn config_value<'a>(config: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    key.split('.').try_fold(config, |v, k| v.get(k))
}

/// Split a name at its first `.N.`: (template with `{}`, N).
pub fn split_layer(name: &str) -> Option<(String, u64)> {
    let parts: Vec<&str> = name.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        if i == 0 || i + 1 == parts.len() {
            continue;
        }
        if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
            let n = p.parse().ok()?;
            let mut t = parts.clone();
            t[i] = "{}";
            return Some((t.join("."), n));
        }
    }
    None
}

/// mergekit's inference for architectures it does not know: the union of the inputs' tensor
/// names; names with a layer index become layer templates (first-appearance order), the rest
/// pre-layer weights (optional unless every input has them).
pub fn infer(models: &[&Model]) -> Architecture {
    let mut templates: Vec<String> = Vec::new();
    let mut template_layers: Vec<u64> = Vec::new();
    let mut seen_t = BTreeMap::new();
    let mut loose: Vec<String> = Vec::new();
    let mut seen_l = BTreeSet::new();
    for m in models {
        let mut names: Vec<String> = m.tensors().iter().map(|t| t.name.clone()).collect();
        crate::plan::order::sort_module_order(&mut names);
        for n in names {
            match split_layer(&n) {
                Some((t, n)) => {
                    let i = *seen_t.entry(t.clone()).or_insert_with(|| {
                        templates.push(t);
                        template_layers.push(0);
                        templates.len() - 1
                    });
                    template_layers[i] = template_layers[i].max(n.saturating_add(1));
                }
                None => {
                    if seen_l.insert(n.clone()) {
                        loose.push(n);
                    }
                }
            }
        }
    }
    let plain = |name: String, optional: bool| Weight {
        name,
        optional,
        aliases: Vec::new(),
        tied: Vec::new(),
        vocab: None,
    };
    let pre = loose
        .into_iter()
        .map(|n| {
            let optional = !models.iter().all(|m| m.get(&n).is_some());
            plain(n, optional)
        })
        .collect();
    Architecture {
        name: "inferred".into(),
        modules: vec![Module {
            name: "default".into(),
            prefix: String::new(),
            layers_key: None,
            fixed_layers: None,
            pre,
            layer_templates: templates.into_iter().map(|t| plain(t, false)).collect(),
            post: Vec::new(),
            unsupported: None,
            template_layers,
        }],
        known: false,
        vocab_key: None,
    }
}

/// Number of layers of module `module` of a model: the definition's fixed count, or the
/// module's config.json key, else one more than the largest layer index its tensor names show.
pub fn layer_count(
    model: &Model,
    config: Option<&serde_json::Value>,
    arch: &Architecture,
    module: usize,
) -> u64 {
    let m = &arch.modules[module];
    if let Some(n) = m.fixed_layers {
        return n;
    }
    // Layers the tensor names show (never more than the tensors themselves).
    let present = model
        .tensors()
        .iter()
        .filter_map(|t| t.name.strip_prefix(m.prefix.as_str()))
        .filter_map(|n| split_layer(n).map(|(_, i)| i.saturating_add(1)))
        .max()
        .unwrap_or(0)
        .min(model.tensors().len() as u64);
    if arch.known
        && let Some(key) = &m.layers_key
        && let Some(n) = config
            .and_then(|c| config_value(c, key))
            .and_then(|v| v.as_u64())
    {
        // A config claiming more layers than the checkpoint holds fails on the first missing
        // tensor; capping keeps the plan from growing without bound before that.
        return n.min(present.max(1));
    }
    present
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_split() {
        assert_eq!(
            split_layer("model.layers.12.mlp.up_proj.weight"),
            Some(("model.layers.{}.mlp.up_proj.weight".into(), 12))
        );
        assert_eq!(split_layer("model.norm.weight"), None);
        assert_eq!(split_layer("h.3.attn"), Some(("h.{}.attn".into(), 3)));
    }

    #[test]
    fn definitions_parse_and_resolve() {
        assert!(table().is_some_and(|t| t.architectures.len() > 60));
        let a = known(&serde_json::json!({"architectures": ["LlamaForCausalLM"]})).unwrap();
        assert_eq!(a.modules.len(), 1);
        assert_eq!(a.modules[0].layer_templates.len(), 9);
        assert!(a.modules[0].post[1].optional);
        assert_eq!(
            a.modules[0].layers_key.as_deref(),
            Some("num_hidden_layers")
        );
        let g = known(&serde_json::json!({"architectures": ["GPT2LMHeadModel"]})).unwrap();
        assert_eq!(g.modules[0].layers_key.as_deref(), Some("n_layer"));
        let m = known(&serde_json::json!({"architectures": ["Mistral3ForConditionalGeneration"]}))
            .unwrap();
        assert_eq!(
            m.module_names(),
            "text_decoder, multi_modal_projector, vision_tower"
        );
        assert_eq!(m.modules[0].prefix, "language_model.");
        assert!(known(&serde_json::json!({"architectures": ["Foo"]})).is_none());
    }
}
