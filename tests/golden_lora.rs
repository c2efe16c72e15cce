//! PEFT merges and the seed recipe against the golden outputs.
//!
//! Tolerance (DESIGN §6): bit for bit except where the LoRA product's f32 summation order
//! differs from torch's — at most 1 ulp of the model's dtype on at most 0.1% of elements.
//! Each test also records which cases are exact.

use crate::common;

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
    blockmerge_ok(
        &golden(),
        "models/base",
        "models/other",
        &out,
        &gradient,
        &[
            "--lora2",
            "models/lora",
            "--lora2-weight",
            "0.25",
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
    blockmerge_ok(
        &golden(),
        "models/other",
        "models/base",
        &out,
        "[0.0]",
        &["--lora1", "models/lora", "--quiet"],
    );
    assert_bit_exact(&out, &golden().join("expected/peft_lora_on_other"));
}

#[test]
fn row_chunks_and_one_thread_change_nothing() {
    // A 4 KiB budget splits every tensor into row chunks, including the LoRA'd ones (B's
    // rows for linear layers, A's columns for the embedding).
    for (base, lora, expected) in [
        ("models/other", "models/lora", "peft_lora_on_other"),
        (
            "models/other",
            "models/lora_embed",
            "peft_lora_embed_on_other",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        ok(
            &golden(),
            &[
                "lora",
                "--base",
                base,
                "--lora",
                lora,
                "-o",
                out.to_str().unwrap(),
                "--memory-limit",
                "4KiB",
                "--threads",
                "1",
                "--quiet",
            ],
        );
        assert_bit_exact(&out, &golden().join("expected").join(expected));
    }
}

#[test]
fn fan_in_fan_out_layers_transpose_the_delta() {
    // GPT-2-style Conv1D weights are stored [in, out]; PEFT then applies (B@A)ᵀ. Build the
    // golden `other` with every LoRA'd weight transposed and an adapter config saying
    // fan_in_fan_out: the result must be the golden PEFT merge, transposed.
    let tmp = tempfile::tempdir().unwrap();
    let base = load_dir(&golden().join("models/other"));
    let lora_targets = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    let is_target = |n: &str| lora_targets.iter().any(|t| n.contains(t));
    let transpose = |t: &Tensor| -> Tensor {
        let (r, c) = (t.shape[0], t.shape[1]);
        let mut bytes = vec![0u8; t.bytes.len()];
        for i in 0..r {
            for j in 0..c {
                let src = (i * c + j) * 2;
                let dst = (j * r + i) * 2;
                bytes[dst..dst + 2].copy_from_slice(&t.bytes[src..src + 2]);
            }
        }
        Tensor {
            dtype: t.dtype.clone(),
            shape: vec![c, r],
            bytes,
        }
    };
    let transposed: std::collections::BTreeMap<String, Tensor> = base
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                if is_target(n) {
                    transpose(t)
                } else {
                    t.clone()
                },
            )
        })
        .collect();
    let model = tmp.path().join("conv1d");
    write_model(&model, &transposed);
    let lora = tmp.path().join("lora");
    std::fs::create_dir(&lora).unwrap();
    std::fs::copy(
        golden().join("models/lora/adapter_model.safetensors"),
        lora.join("adapter_model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(golden().join("models/lora/adapter_config.json"))
        .unwrap()
        .replace("\"fan_in_fan_out\": false", "\"fan_in_fan_out\": true");
    assert!(cfg.contains("\"fan_in_fan_out\": true"));
    std::fs::write(lora.join("adapter_config.json"), cfg).unwrap();
    let out = tmp.path().join("out");
    ok(
        tmp.path(),
        &[
            "lora",
            "--base",
            model.to_str().unwrap(),
            "--lora",
            lora.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--memory-limit",
            "4KiB",
            "--quiet",
        ],
    );
    let got = load_dir(&out);
    let want = load_dir(&golden().join("expected/peft_lora_on_other"));
    for (n, w) in &want {
        let expect = if is_target(n) {
            transpose(w)
        } else {
            w.clone()
        };
        assert_eq!(got[n], expect, "{n}");
    }
}

#[test]
fn inspect_lists_and_validates() {
    let o = ok(&golden(), &["inspect", "models/base"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("model.layers.0.mlp.down_proj.weight"));
    assert!(text.contains("F16 [32, 88]"));
    assert!(text.contains("5632 model-00001-of-00003.safetensors"));
    assert!(
        text.trim_end()
            .ends_with("75 tensors, 121376 parameters, 237.06 KiB in 3 file(s): valid")
    );
    let o = ok(
        &golden(),
        &["inspect", "models/lora/adapter_model.safetensors"],
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("lora_A.weight"));
}
