//! Merging models with different vocabularies, end to end: golden2's `tokenizer_source` and
//! `tokenizer:` cases run unchanged and give mergekit 0.1.5's tensors (DESIGN §6 tolerance;
//! most exactly) and its tokenizer (every field that affects encoding), config vocab_size and
//! chat template.

use std::path::{Path, PathBuf};

use crate::common::*;

fn merge(case: &str) -> (tempfile::TempDir, PathBuf) {
    let config = Path::new("mergekit").join(format!("{case}.yml"));
    let extra = ["--out-shard-size", "100K", "--random-seed", "7"];
    let (tmp, out) = merge_config(&golden2(), &config, &extra);
    check_output_folder(&out);
    (tmp, out)
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// Tensors within tolerance (`exact`: bit for bit), and the tokenizer and vocab size as
/// mergekit wrote them.
fn check(case: &str, exact: bool) {
    let (_t, out) = merge(case);
    let want = golden2().join("expected").join(case);
    let d = assert_within(&out, &want, 1, 0.02);
    if exact {
        assert_eq!(d.differing, 0, "{case}: {d:?}");
    }
    assert_eq!(
        json(&out.join("config.json"))["vocab_size"],
        json(&want.join("config.json"))["vocab_size"],
        "{case}"
    );
    let (got, exp) = (
        json(&out.join("tokenizer.json")),
        json(&want.join("tokenizer.json")),
    );
    for field in [
        "model",
        "added_tokens",
        "normalizer",
        "pre_tokenizer",
        "post_processor",
        "decoder",
    ] {
        assert_eq!(got[field], exp[field], "{case}: tokenizer.json `{field}`");
    }
}

#[test]
fn union_linear_with_a_chat_template() {
    check("tk_union_linear", true);
    let (_t, out) = merge("tk_union_linear");
    assert!(out.join("chat_template.jinja").exists());
}

#[test]
fn union_slerp() {
    check("tk_union_slerp", false);
}

#[test]
fn union_ties() {
    check("tk_union_ties", true);
}

#[test]
fn union_of_a_padded_input() {
    check("tk_union_pad64_input", true);
}

#[test]
fn source_base_and_source_model() {
    check("tk_source_base", true);
    check("tk_source_model", true);
}

#[test]
fn token_surgery_zero_model_token_and_force() {
    check("tk_block_tokens", true);
}

#[test]
fn base_padded_to_a_multiple() {
    check("tk_block_base_pad32", false);
}

#[test]
fn a_token_source_naming_a_model_not_merged_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let m = golden2().join("models");
    let cfg = tmp.path().join("c.yml");
    std::fs::write(
        &cfg,
        format!(
            "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\ntokenizer:\n  source: union\n  tokens:\n    <|im_start|>:\n      source:\n        kind: model_token\n        model: {c}\n        token: </s>\ndtype: float32\n",
            a = m.join("tk_base").display(),
            b = m.join("tk_chatml").display(),
            c = m.join("tk_tool").display(),
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let o = mergestream(
        tmp.path(),
        &["merge", cfg.to_str().unwrap(), out.to_str().unwrap()],
    );
    assert_clean_failure(&o, &out, &["tk_tool"]);
}
