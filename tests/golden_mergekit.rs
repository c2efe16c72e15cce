//! mergekit's golden outputs: `mergestream merge CONFIG OUT` with the configs unchanged.
//! Tolerance (DESIGN §6): at most 1 ulp on at most 2% of elements; each test states which
//! cases are exact.

mod common;

use common::*;

fn merge_case(name: &str) -> (tempfile::TempDir, Diff) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let config = format!("mergekit/{name}.yml");
    ok(
        &golden(),
        &[
            "merge",
            &config,
            out.to_str().unwrap(),
            "--out-shard-size",
            "100K",
            "--quiet",
        ],
    );
    check_output_folder(&out);
    let d = assert_within(&out, &golden().join("expected").join(name), 1, 0.02);
    (tmp, d)
}

fn exact(name: &str) {
    let (_t, d) = merge_case(name);
    assert_eq!(d.differing, 0, "{name}: {d:?}");
}

#[test]
fn mk_linear_is_exact() {
    exact("mk_linear");
}

#[test]
fn mk_linear_fp16_is_exact() {
    exact("mk_linear_fp16");
}

#[test]
fn mk_linear_weight_gradient_is_exact() {
    exact("mk_linear_weight_gradient");
}

#[test]
fn mk_linear_lora_is_exact() {
    exact("mk_linear_lora");
}

#[test]
fn mk_task_arithmetic_is_exact() {
    exact("mk_task_arithmetic");
}

#[test]
fn mk_passthrough_frankenmerge_is_exact() {
    let (tmp, d) = merge_case("mk_passthrough_frankenmerge");
    assert_eq!(d.differing, 0);
    // Output layers renumbered, config's layer count updated.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("out/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["num_hidden_layers"], 12);
}

#[test]
fn mk_ties_within_tolerance() {
    merge_case("mk_ties");
}

#[test]
fn mk_breadcrumbs_within_tolerance() {
    merge_case("mk_breadcrumbs");
}

#[test]
fn mk_slerp_gradient_within_tolerance() {
    merge_case("mk_slerp_gradient");
}

#[test]
fn mk_slerp_bf16_within_tolerance() {
    merge_case("mk_slerp_bf16");
}

#[test]
fn mk_model_stock_within_tolerance() {
    merge_case("mk_model_stock");
}

#[test]
fn mk_nuslerp_within_tolerance() {
    merge_case("mk_nuslerp");
}

#[test]
fn output_has_mergekit_files() {
    let (tmp, _) = merge_case("mk_linear");
    let out = tmp.path().join("out");
    assert_eq!(
        std::fs::read_to_string(out.join("mergekit_config.yml")).unwrap(),
        std::fs::read_to_string(golden().join("mergekit/mk_linear.yml")).unwrap()
    );
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("models/base") && card.contains("linear"),
        "{card}"
    );
    assert!(out.join("tokenizer_config.json").exists());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "float16");
}
