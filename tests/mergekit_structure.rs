//! Structure: `modules:` configs (one module, and the three of a multimodal model), and depth
//! changes whose config.json must follow the tensors on every architecture (mergekit 0.1.5
//! goldens in tests/fixtures/golden2; where mergekit itself fails, its `expected_behaviour`).

use std::path::Path;

use crate::common::*;

fn merge(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let config = Path::new("mergekit").join(format!("{name}.yml"));
    let (tmp, out) = merge_config(&golden2(), &config, &["--out-shard-size", "100K"]);
    check_output_folder(&out);
    (tmp, out)
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

/// Tensors equal to mergekit's: bit for bit, or within DESIGN §6's tolerance.
fn matches(name: &str, exact: bool) -> std::path::PathBuf {
    let (tmp, out) = merge(name);
    let expected = golden2().join("expected").join(name);
    let d = assert_within(&out, &expected, 1, 0.02);
    if exact {
        assert_eq!(d.differing, 0, "{name}: {d:?}");
    }
    let kept = tmp.keep();
    kept.join("out")
}

#[test]
fn modules_with_slices_on_one_module() {
    let out = matches("mk_modules_slices", true);
    assert_eq!(config(&out)["num_hidden_layers"], 10);
}

#[test]
fn modules_with_models_and_module_parameters() {
    matches("mk_modules_models", false);
}

#[test]
fn modules_of_a_multimodal_model_each_with_their_own_weights() {
    matches("mk_m3_modules", false);
}

#[test]
fn a_gpt2_stack_gets_n_layer() {
    let out = matches("mk_passthrough_gpt2_stack", true);
    let c = config(&out);
    assert_eq!(c["n_layer"], 6);
    assert_eq!(
        c,
        {
            let mut want = config(&golden2().join("expected/mk_passthrough_gpt2_stack"));
            // mergekit writes transformers' own serialization; compare the fields we keep.
            want.as_object_mut()
                .unwrap()
                .retain(|k, _| c.get(k).is_some());
            want
        },
        "config differs from mergekit's"
    );
}

#[test]
fn a_qwen2_stack_rewrites_its_per_layer_list() {
    // mergekit 0.1.5 fails here (transformers refuses num_hidden_layers 6 with 4 layer_types);
    // the expected behaviour: the source layers' entries in output order.
    let (_t, out) = merge("mk_passthrough_qwen2_stack");
    let c = config(&out);
    let src = config(&golden2().join("models/qwen2_a"));
    let lt = src["layer_types"].as_array().unwrap();
    assert_eq!(c["num_hidden_layers"], 6);
    let want: Vec<&serde_json::Value> = [0, 1, 2, 1, 2, 3].iter().map(|&i| &lt[i]).collect();
    let got: Vec<&serde_json::Value> = c["layer_types"].as_array().unwrap().iter().collect();
    assert_eq!(got, want);
    let names = load_dir(&out);
    assert!(names.contains_key("model.layers.5.mlp.down_proj.weight"));
    assert!(!names.contains_key("model.layers.6.mlp.down_proj.weight"));
}

#[test]
fn an_unknown_architecture_gets_its_layer_count_rewritten() {
    // mergekit has no definition for it (and leaves the count alone); the inferred
    // architecture's `num_hidden_layers` follows the 10 layers written.
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    std::fs::create_dir(&model).unwrap();
    for e in std::fs::read_dir(golden().join("models/base")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, model.join(p.file_name().unwrap())).unwrap();
    }
    let mut c = config(&model);
    c["architectures"] = serde_json::json!(["SomethingNewForCausalLM"]);
    std::fs::write(model.join("config.json"), c.to_string()).unwrap();
    std::fs::write(
        tmp.path().join("c.yml"),
        format!(
            "merge_method: passthrough\nslices:\n  - sources:\n      - model: {m}\n        layer_range: [0, 6]\n  - sources:\n      - model: {m}\n        layer_range: [4, 8]\ndtype: float16\n",
            m = model.display()
        ),
    )
    .unwrap();
    ok(tmp.path(), &["merge", "c.yml", "out", "--quiet"]);
    assert_eq!(config(&tmp.path().join("out"))["num_hidden_layers"], 10);
    assert!(load_dir(&tmp.path().join("out")).contains_key("model.layers.9.mlp.up_proj.weight"));
}

#[test]
fn bad_module_configs_fail_with_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let g2 = golden2().join("models");
    let cases = [
        (
            format!(
                "merge_method: linear\nmodules:\n  decoder:\n    models:\n      - model: {}\n        parameters: {{weight: 1}}\n",
                g2.join("base").display()
            ),
            "module `decoder` is not a module of LlamaForCausalLM (its modules: default)",
        ),
        (
            format!(
                "merge_method: linear\nmodules:\n  default:\n    parameters: {{weight: 1}}\n    models:\n      - model: {b}\n    slices:\n      - sources:\n          - model: {b}\n            layer_range: [0, 8]\n",
                b = g2.join("base").display()
            ),
            "module `default` needs either `models` or `slices`",
        ),
        (
            format!(
                "merge_method: passthrough\nslices:\n  - sources:\n      - model: {}\n        layer_range: [0, 2]\n",
                g2.join("m3_a").display()
            ),
            "use `modules:` to give slices per module",
        ),
        (
            format!(
                "merge_method: linear\nmodels:\n  - model: {b}\n    parameters: {{weight: 1}}\nmodules:\n  default:\n    models:\n      - model: {b}\n",
                b = g2.join("base").display()
            ),
            "give exactly one of `models`, `slices` and `modules`",
        ),
    ];
    for (i, (yaml, needle)) in cases.iter().enumerate() {
        let cfg = tmp.path().join(format!("c{i}.yml"));
        std::fs::write(&cfg, yaml).unwrap();
        let out = tmp.path().join(format!("out{i}"));
        let o = mergestream(
            tmp.path(),
            &["merge", cfg.to_str().unwrap(), out.to_str().unwrap()],
        );
        assert_clean_failure(&o, &out, &[needle]);
    }
}
