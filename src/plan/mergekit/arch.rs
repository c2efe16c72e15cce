//! Architectures: which tensors a model has, which belong to layers, and in what order
//! mergekit plans them.
//!
//! Llama, Mistral, Qwen2, Gemma, Gemma2 and Phi-3 follow mergekit's own definitions (only
//! the tensors they list are written). Anything else is inferred as mergekit does: the
//! first `.N.` in a name is the layer index, everything else is a pre-layer weight at t = 0.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::Model;

/// A non-layer tensor of an architecture.
#[derive(Clone, Debug, PartialEq)]
pub struct Weight {
    pub name: String,
    /// Planned only if some input has it (e.g. an untied lm_head).
    pub optional: bool,
    /// Read instead when an input lacks `name` (tied embeddings).
    pub tied_to: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Architecture {
    pub name: String,
    pub pre: Vec<Weight>,
    /// Per-layer names with `{}` standing for the layer index.
    pub layer_templates: Vec<String>,
    /// For inferred architectures, the number of layers each template has in the inputs
    /// (parallel to `layer_templates`): a vision-language model's towers have their own
    /// layer counts. Empty for known architectures (every template spans all layers).
    pub template_layers: Vec<u64>,
    pub post: Vec<Weight>,
    /// Whether config.json's `num_hidden_layers` describes the layers (known architectures).
    pub known: bool,
}

fn w(name: &str) -> Weight {
    Weight {
        name: name.into(),
        optional: false,
        tied_to: None,
    }
}

fn lm_head(optional: bool) -> Weight {
    Weight {
        name: "lm_head.weight".into(),
        optional,
        tied_to: Some("model.embed_tokens.weight".into()),
    }
}

fn layers(suffixes: &[&str]) -> Vec<String> {
    suffixes
        .iter()
        .map(|s| format!("model.layers.{{}}.{s}"))
        .collect()
}

const LLAMA_LAYER: &[&str] = &[
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.up_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.down_proj.weight",
];

/// The architecture mergekit knows by this config's `architectures[0]`, if any.
pub fn known(config: &serde_json::Value) -> Option<Architecture> {
    let arch = config.get("architectures")?.get(0)?.as_str()?;
    let embed = || vec![w("model.embed_tokens.weight")];
    let a = match arch {
        "LlamaForCausalLM" | "LLaMaForCausalLM" | "MistralForCausalLM" => Architecture {
            name: arch.into(),
            pre: embed(),
            layer_templates: layers(LLAMA_LAYER),
            post: vec![w("model.norm.weight"), lm_head(true)],
            template_layers: Vec::new(),
            known: true,
        },
        "Qwen2ForCausalLM" => Architecture {
            name: arch.into(),
            pre: embed(),
            layer_templates: layers(&[
                "input_layernorm.weight",
                "mlp.down_proj.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "post_attention_layernorm.weight",
                "self_attn.k_proj.bias",
                "self_attn.k_proj.weight",
                "self_attn.o_proj.weight",
                "self_attn.q_proj.bias",
                "self_attn.q_proj.weight",
                "self_attn.v_proj.bias",
                "self_attn.v_proj.weight",
            ]),
            post: vec![w("model.norm.weight"), lm_head(true)],
            template_layers: Vec::new(),
            known: true,
        },
        "GemmaForCausalLM" => Architecture {
            name: arch.into(),
            pre: embed(),
            layer_templates: layers(LLAMA_LAYER),
            post: vec![w("model.norm.weight")],
            template_layers: Vec::new(),
            known: true,
        },
        "Gemma2ForCausalLM" => {
            let mut l: Vec<&str> = LLAMA_LAYER.to_vec();
            l.extend([
                "pre_feedforward_layernorm.weight",
                "post_feedforward_layernorm.weight",
            ]);
            Architecture {
                name: arch.into(),
                pre: embed(),
                layer_templates: layers(&l),
                post: vec![w("model.norm.weight"), lm_head(true)],
                template_layers: Vec::new(),
                known: true,
            }
        }
        "Phi3ForCausalLM" => Architecture {
            name: arch.into(),
            pre: embed(),
            layer_templates: layers(&[
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
                "self_attn.o_proj.weight",
                "self_attn.qkv_proj.weight",
                "mlp.gate_up_proj.weight",
                "mlp.down_proj.weight",
            ]),
            post: vec![lm_head(false), w("model.norm.weight")],
            template_layers: Vec::new(),
            known: true,
        },
        _ => return None,
    };
    Some(a)
}

impl Architecture {
    /// Whether template `i` has a layer `n` (inferred architectures: some input has it).
    pub fn has_layer(&self, i: usize, n: u64) -> bool {
        self.template_layers.get(i).is_none_or(|&count| n < count)
    }
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
    let pre = loose
        .into_iter()
        .map(|n| Weight {
            optional: !models.iter().all(|m| m.get(&n).is_some()),
            tied_to: None,
            name: n,
        })
        .collect();
    Architecture {
        name: "inferred".into(),
        pre,
        layer_templates: templates,
        template_layers,
        post: Vec::new(),
        known: false,
    }
}

/// Number of layers of a model: config.json's `num_hidden_layers` for known architectures,
/// else one more than the largest layer index in its tensor names.
pub fn layer_count(model: &Model, config: Option<&serde_json::Value>, arch: &Architecture) -> u64 {
    // Layers the tensor names show (never more than the tensors themselves).
    let present = model
        .tensors()
        .iter()
        .filter_map(|t| split_layer(&t.name).map(|(_, n)| n.saturating_add(1)))
        .max()
        .unwrap_or(0)
        .min(model.tensors().len() as u64);
    if arch.known
        && let Some(n) = config
            .and_then(|c| c.get("num_hidden_layers"))
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
    fn llama_definition() {
        let a = known(&serde_json::json!({"architectures": ["LlamaForCausalLM"]})).unwrap();
        assert_eq!(a.layer_templates.len(), 9);
        assert!(a.post[1].optional);
        assert!(known(&serde_json::json!({"architectures": ["Foo"]})).is_none());
    }
}
