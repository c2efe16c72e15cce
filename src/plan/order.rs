//! Module order: the order in which transformers registers a model's parameters.
//!
//! BlockMerge_Gradient assigns blend ratios in `state_dict()` order, so the order decides the
//! result. It is derived from the names alone: names are compared component by component,
//! numbers numerically (layer and expert indices) and words by the rank they have in the
//! module definitions of the common architectures (Llama, Mistral, Mixtral, Qwen2/3, Gemma
//! 1-3, Phi-3, GPT-2/NeoX style names); unknown words come after known ones, alphabetically.
//! Never a HashMap's order, never alphabetical for known names.

use std::cmp::Ordering;

/// Component names in registration order. Names of different architectures that never occur
/// together may interleave freely; names that do occur together are in their true order
/// (e.g. Llama's q,k,v,o and Phi-3's o_proj before qkv_proj).
const RANK: &[&str] = &[
    "model",
    "transformer",
    "gpt_neox",
    "language_model",
    "embed_tokens",
    "wte",
    "wpe",
    "embed_in",
    "word_embeddings",
    "layers",
    "h",
    "blocks",
    "layer",
    "ln_1",
    "self_attn",
    "attn",
    "attention",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "query_key_value",
    "c_attn",
    "q_norm",
    "k_norm",
    "ln_2",
    "mlp",
    "block_sparse_moe",
    "gate",
    "experts",
    "w1",
    "w2",
    "w3",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "down_proj",
    "c_fc",
    "c_proj",
    "dense",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "fc1",
    "fc2",
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "norm",
    "ln_f",
    "final_layernorm",
    "final_layer_norm",
    "embed_out",
    "lm_head",
    "output",
    "weight",
    "bias",
];

fn rank(word: &str) -> usize {
    RANK.iter().position(|w| *w == word).unwrap_or(RANK.len())
}

fn compare_component(a: &str, b: &str) -> Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        (Ok(_), Err(_)) => Ordering::Less,
        (Err(_), Ok(_)) => Ordering::Greater,
        (Err(_), Err(_)) => rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)),
    }
}

/// Compare two tensor names in module order.
pub fn compare_names(a: &str, b: &str) -> Ordering {
    let mut ia = a.split('.');
    let mut ib = b.split('.');
    loop {
        match (ia.next(), ib.next()) {
            (Some(x), Some(y)) => match compare_component(x, y) {
                Ordering::Equal => continue,
                o => return o,
            },
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (None, None) => return Ordering::Equal,
        }
    }
}

/// Sort names into module order.
pub fn sort_module_order(names: &mut [String]) {
    names.sort_by(|a, b| compare_names(a, b));
}

/// The layer index of a tensor: the first all-digit component of its name (mergekit's rule
/// for architectures it does not know), if any.
pub fn layer_index(name: &str) -> Option<u64> {
    name.split('.').find_map(|c| c.parse::<u64>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_order() {
        let mut names: Vec<String> = [
            "lm_head.weight",
            "model.norm.weight",
            "model.layers.10.self_attn.q_proj.weight",
            "model.layers.2.post_attention_layernorm.weight",
            "model.layers.2.input_layernorm.weight",
            "model.layers.2.mlp.down_proj.weight",
            "model.layers.2.mlp.up_proj.weight",
            "model.layers.2.mlp.gate_proj.weight",
            "model.layers.2.self_attn.o_proj.weight",
            "model.layers.2.self_attn.v_proj.weight",
            "model.layers.2.self_attn.k_proj.weight",
            "model.layers.2.self_attn.q_proj.weight",
            "model.embed_tokens.weight",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        sort_module_order(&mut names);
        assert_eq!(
            names,
            [
                "model.embed_tokens.weight",
                "model.layers.2.self_attn.q_proj.weight",
                "model.layers.2.self_attn.k_proj.weight",
                "model.layers.2.self_attn.v_proj.weight",
                "model.layers.2.self_attn.o_proj.weight",
                "model.layers.2.mlp.gate_proj.weight",
                "model.layers.2.mlp.up_proj.weight",
                "model.layers.2.mlp.down_proj.weight",
                "model.layers.2.input_layernorm.weight",
                "model.layers.2.post_attention_layernorm.weight",
                "model.layers.10.self_attn.q_proj.weight",
                "model.norm.weight",
                "lm_head.weight",
            ]
        );
    }

    #[test]
    fn qwen_biases_and_mixtral_experts() {
        let mut names: Vec<String> = [
            "model.layers.0.self_attn.k_proj.bias",
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.block_sparse_moe.experts.1.w1.weight",
            "model.layers.0.block_sparse_moe.experts.0.w3.weight",
            "model.layers.0.block_sparse_moe.experts.0.w1.weight",
            "model.layers.0.block_sparse_moe.gate.weight",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        sort_module_order(&mut names);
        assert_eq!(
            names,
            [
                "model.layers.0.self_attn.q_proj.weight",
                "model.layers.0.self_attn.q_proj.bias",
                "model.layers.0.self_attn.k_proj.bias",
                "model.layers.0.block_sparse_moe.gate.weight",
                "model.layers.0.block_sparse_moe.experts.0.w1.weight",
                "model.layers.0.block_sparse_moe.experts.0.w3.weight",
                "model.layers.0.block_sparse_moe.experts.1.w1.weight",
            ]
        );
    }

    #[test]
    fn phi3_o_proj_first() {
        assert_eq!(
            compare_names(
                "model.layers.0.self_attn.o_proj.weight",
                "model.layers.0.self_attn.qkv_proj.weight"
            ),
            Ordering::Less
        );
    }

    #[test]
    fn layer_indices() {
        assert_eq!(layer_index("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_index("model.norm.weight"), None);
    }
}
