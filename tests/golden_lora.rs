//! PEFT merges and the seed recipe against the golden outputs.
//!
//! Tolerance (DESIGN §6): bit for bit except where the LoRA product's f32 summation order
//! differs from torch's — at most 1 ulp of the model's dtype on at most 0.1% of elements.
//! Each test also records which cases are exact.

mod common;

use common::*;

fn lora_case(name: &str) -> Diff {
    let case = manifest_case(name);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let base = format!("models/{}", case["base"].as_str().unwrap());
    let lora = format!("models/{}", case["lora"].as_str().unwrap());
    let weight = case["weight"].to_string();
    ok(
        &golden(),
        &[
            "lora",
            "--base",
            &base,
            "--lora",
            &lora,
            "--weight",
            &weight,
            "-o",
            out.to_str().unwrap(),
            "--quiet",
        ],
    );
    check_output_folder(&out);
    assert_within(&out, &golden().join("expected").join(name), 1, 0.001)
}

#[test]
fn peft_lora_on_other_is_exact() {
    assert_eq!(lora_case("peft_lora_on_other").differing, 0);
}

#[test]
fn peft_lora_w025_on_other_is_exact() {
    assert_eq!(lora_case("peft_lora_w025_on_other").differing, 0);
}

#[test]
fn peft_lora_rs_on_base_is_exact() {
    assert_eq!(lora_case("peft_lora_rs_on_base").differing, 0);
}

#[test]
fn peft_lora_rs_on_base_bf16_is_exact() {
    assert_eq!(lora_case("peft_lora_rs_on_base_bf16").differing, 0);
}

#[test]
fn peft_lora_embed_on_other_is_exact() {
    // Embedding LoRA (delta rounded before the add), lm_head replacement, saved base_layer.
    assert_eq!(lora_case("peft_lora_embed_on_other").differing, 0);
}

#[test]
fn peft_lora_dora_on_other_within_tolerance() {
    // DoRA's row norm is a reduction whose order torch does not document: a value sitting
    // on an fp16 rounding tie can land one ulp away (1 element of 121376 here).
    let d = lora_case("peft_lora_dora_on_other");
    assert!(d.differing <= 2, "{d:?}");
}

#[test]
fn seed_step1_airolima_is_exact() {
    assert_eq!(lora_case("seed_step1_airolima").differing, 0);
}

#[test]
fn seed_recipe_in_one_pass_is_bit_exact() {
    // airolima-chronos-grad: model2 = other + LoRA at 0.25, blended into base with a layer
    // gradient reaching 0 at layer 5 of 8 — one command, no intermediate model.
    let case = manifest_case("seed_airolima_chronos_grad");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let gradient = case["gradient_values"].to_string();
    ok(
        &golden(),
        &[
            "blockmerge",
            "--model_path1",
            "models/base",
            "--model_path2",
            "models/other",
            "--lora2",
            "models/lora",
            "--lora2-weight",
            "0.25",
            "--output_model_path",
            out.to_str().unwrap(),
            "--gradient_values",
            &gradient,
            "--layer_only",
            "--quiet",
        ],
    );
    assert_bit_exact(&out, &golden().join("expected/seed_airolima_chronos_grad"));
    check_output_folder(&out);
    // Only the output exists: no intermediate merged model anywhere.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn lora1_patches_model1_in_the_same_pass() {
    // With the gradient at 0 everywhere, the output is model1 + LoRA rounded to fp16:
    // exactly the PEFT merge.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    ok(
        &golden(),
        &[
            "blockmerge",
            "--model_path1",
            "models/other",
            "--model_path2",
            "models/base",
            "--lora1",
            "models/lora",
            "--output_model_path",
            out.to_str().unwrap(),
            "--gradient_values",
            "[0.0]",
            "--quiet",
        ],
    );
    assert_bit_exact(&out, &golden().join("expected/peft_lora_on_other"));
}
