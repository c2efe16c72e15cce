//! mergekit configs beyond the golden set: random methods tested statistically, bad configs,
//! and the streamed (multi-pass) path against the whole-tensor one.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;

/// Write `yaml` (with `{G}` standing for the golden models folder) and run it.
fn run_config(tmp: &Path, yaml: &str, extra: &[&str]) -> (std::process::Output, PathBuf) {
    run_yaml(tmp, yaml, &golden().join("models"), extra)
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn halves(t: &Tensor) -> Vec<f32> {
    t.bytes
        .chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

fn merged_f32(yaml: &str, extra: &[&str]) -> BTreeMap<String, Tensor> {
    let tmp = tempfile::tempdir().unwrap();
    let (o, out) = run_config(tmp.path(), yaml, extra);
    assert!(o.status.success(), "{}", stderr(&o));
    load_dir(&out)
}

const DARE: &str = "merge_method: dare_linear\nbase_model: {G}/base\nmodels:\n  - model: {G}/other\n    parameters: {weight: 1.0, density: 0.3}\ndtype: float32\nout_dtype: float32\n";

#[test]
fn dare_keeps_density_and_rescales_by_the_l1_ratio() {
    let got = merged_f32(DARE, &["--random-seed", "7"]);
    let base = load_dir(&golden().join("models/base"));
    let other = load_dir(&golden().join("models/other"));
    let (mut kept, mut total) = (0usize, 0usize);
    for (name, t) in &got {
        let (o, b, x) = (f32s(t), halves(&base[name]), halves(&other[name]));
        let delta: Vec<f32> = x.iter().zip(&b).map(|(x, b)| x - b).collect();
        let mut ratio = None;
        let (mut l1, mut l1_kept) = (0f64, 0f64);
        for ((&o, &b), &d) in o.iter().zip(&b).zip(&delta) {
            l1 += d.abs() as f64;
            if o != b {
                kept += 1;
                l1_kept += d.abs() as f64;
                // Every kept delta is scaled by the same factor.
                let r = (o - b) / d;
                let r0 = *ratio.get_or_insert(r);
                assert!(
                    (r - r0).abs() <= 1e-3 * r0.abs(),
                    "{name}: ratio {r} vs {r0}"
                );
            }
            total += 1;
        }
        if let Some(r) = ratio {
            let expect = (l1 / l1_kept) as f32;
            assert!(
                (r - expect).abs() <= 1e-3 * expect,
                "{name}: rescale {r}, L1 ratio {expect}"
            );
        }
    }
    let frac = kept as f64 / total as f64;
    assert!((frac - 0.3).abs() < 0.01, "kept fraction {frac}");
}

#[test]
fn dare_is_reproducible_by_seed() {
    let a = merged_f32(DARE, &["--random-seed", "7"]);
    let b = merged_f32(DARE, &["--random-seed", "7"]);
    let c = merged_f32(DARE, &["--random-seed", "8"]);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn della_keeps_more_of_the_larger_deltas() {
    let yaml = "merge_method: della_linear\nbase_model: {G}/base\nmodels:\n  - model: {G}/other\n    parameters: {weight: 1.0, density: 0.5, epsilon: 0.3}\nparameters: {rescale: false}\ndtype: float32\nout_dtype: float32\n";
    let got = merged_f32(yaml, &[]);
    let base = load_dir(&golden().join("models/base"));
    let other = load_dir(&golden().join("models/other"));
    // Keep rate by magnitude quartile within rows: 0.5 ± 0.3 rising linearly with rank.
    let mut kept = [0usize; 4];
    let mut seen = [0usize; 4];
    for (name, t) in &got {
        let cols = *t.shape.last().unwrap();
        if t.shape.len() != 2 || cols < 8 {
            continue;
        }
        let (o, b, x) = (f32s(t), halves(&base[name]), halves(&other[name]));
        for r in 0..t.shape[0] {
            let row: Vec<usize> = (r * cols..(r + 1) * cols).collect();
            let mut order = row.clone();
            order.sort_by(|&i, &j| (x[i] - b[i]).abs().total_cmp(&(x[j] - b[j]).abs()));
            for (rank, &i) in order.iter().enumerate() {
                let q = rank * 4 / cols;
                seen[q] += 1;
                if o[i] != b[i] {
                    kept[q] += 1;
                }
            }
        }
    }
    let rate: Vec<f64> = kept
        .iter()
        .zip(&seen)
        .map(|(&k, &s)| k as f64 / s as f64)
        .collect();
    // Expected means of the linear ramp over each quartile: 0.2 + 0.6·(q + 0.5)/4.
    for (q, r) in rate.iter().enumerate() {
        let expect = 0.2 + 0.6 * (q as f64 + 0.5) / 4.0;
        assert!(
            (r - expect).abs() < 0.02,
            "quartile {q}: rate {r}, expected {expect} ({rate:?})"
        );
    }
}

fn bad(yaml: &str, needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let (o, out) = run_config(tmp.path(), yaml, &[]);
    let mut all = vec!["config.yml"];
    all.extend_from_slice(needles);
    assert_clean_failure(&o, &out, &all);
}

#[test]
fn bad_configs_fail_with_one_clear_line() {
    bad(
        "merge_method: frobnicate\nmodels:\n  - model: {G}/base\n",
        &["unknown merge_method `frobnicate`"],
    );
    bad(
        "merge_method: linear\nmodels:\n  - model: {G}/base\n    parameters: {weight: 1}\nslices:\n  - sources:\n      - model: {G}/base\n        layer_range: [0, 8]\n",
        &["give exactly one of `models`, `slices` and `modules`"],
    );
    bad(
        "merge_method: ties\nmodels:\n  - model: {G}/other\n    parameters: {weight: 1, density: 0.5}\n",
        &["merge_method ties needs a base_model"],
    );
    bad(
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: {G}/base\n        layer_range: [4, 9]\n",
        &["layer_range [4, 9]", "outside its 8 layers"],
    );
    bad(
        "merge_method: slerp\nbase_model: {G}/base\nparameters: {t: 0.5}\nslices:\n  - sources:\n      - model: {G}/base\n        layer_range: [0, 4]\n      - model: {G}/other\n        layer_range: [0, 5]\n",
        &["sources cover different numbers of layers (4 and 5)"],
    );
    bad(
        "merge_method: linear\nmodels:\n  - model: {G}/base\n    parameters:\n      weight:\n        - filter: self_atn\n          value: 1\n        - value: 0.5\n  - model: {G}/other\n    parameters: {weight: 0.5}\n",
        &["filter `self_atn` matches no tensor"],
    );
    bad(
        "merge_method: linear\nmodles: []\n",
        &["unknown field `modles`", "line 2"],
    );
    bad(
        "merge_method: linear\nmodels:\n  - model: {G}/base\n    parameters: {weight: [0.1, {x: 1}]}\n",
        &["line 4"],
    );
    bad(
        "merge_method: linear\nmodels:\n  - model: {G}/base\n  - model: {G}/other\n    parameters: {weight: 1}\n",
        &["missing required parameter `weight`", "/base"],
    );
    bad(
        "merge_method: linear\nmodels:\n  - model: {G}/base\n    parameters: {weight: 1}\n  - model: {G}/other_vocab\n    parameters: {weight: 1}\n",
        &["tensor size mismatch", "--unsafe-truncate-embeddings"],
    );
    bad(
        "merge_method: linear\ntokenizer_source: union\nmodels:\n  - model: {G}/base\n    parameters: {weight: 1}\n",
        &["has no tokenizer.json; a tokenizer merge needs one"],
    );
    bad(
        "merge_method: slerp\nbase_model: {G}/base\nmodels:\n  - model: {G}/base\n  - model: {G}/other\n",
        &["missing required parameter `t`"],
    );
    bad(
        "merge_method: linear\nmodels: []\n",
        &["the config names no models"],
    );
}

#[test]
fn della_treats_1d_tensors_as_one_row() {
    // Norm weights are 1-D: mergekit ranks them as a single row, so about half change.
    let yaml = "merge_method: della_linear\nbase_model: {G}/base\nmodels:\n  - model: {G}/other\n    parameters: {weight: 1.0, density: 0.5, epsilon: 0.3}\nparameters: {rescale: false}\ndtype: float32\nout_dtype: float32\n";
    let got = merged_f32(yaml, &[]);
    let base = load_dir(&golden().join("models/base"));
    let norm = "model.layers.0.input_layernorm.weight";
    let (o, b) = (f32s(&got[norm]), halves(&base[norm]));
    let changed = o.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert!(changed > 4 && changed < 28, "{changed} of 32 changed");
}

#[test]
fn a_slice_of_only_the_base_passes_it_through_when_streamed() {
    let yaml = "merge_method: ties\nbase_model: {G}/base\nslices:\n  - sources:\n      - model: {G}/base\n        layer_range: [0, 8]\nparameters: {weight: 1.0, density: 0.5}\ndtype: float16\n";
    let tmp = tempfile::tempdir().unwrap();
    let (o, out) = run_config(tmp.path(), yaml, &["--memory-limit", "16KiB"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_bit_exact(&out, &golden().join("models/base"));
}

#[test]
fn config_claiming_more_layers_than_stored_fails_fast() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    std::fs::create_dir(&m).unwrap();
    for e in std::fs::read_dir(golden().join("models/base")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, m.join(p.file_name().unwrap())).unwrap();
    }
    let cfg = std::fs::read_to_string(m.join("config.json")).unwrap();
    std::fs::write(
        m.join("config.json"),
        cfg.replace(
            "\"num_hidden_layers\": 8",
            "\"num_hidden_layers\": 4000000000",
        ),
    )
    .unwrap();
    let yaml = format!(
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: {}\n        layer_range: [0, 9]\n",
        m.display()
    );
    let (o, out) = run_config(tmp.path(), &yaml, &[]);
    assert_clean_failure(&o, &out, &["layer_range [0, 9]"]);
}

#[test]
fn float_and_integer_inputs_cannot_be_merged() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = load_dir(&golden().join("models/other"));
    let norm = t.get_mut("model.norm.weight").unwrap();
    norm.dtype = "I16".into();
    let dir = tmp.path().join("ints");
    write_model(&dir, &t);
    let yaml = format!(
        "merge_method: linear\nmodels:\n  - model: {{G}}/base\n    parameters: {{weight: 1}}\n  - model: {}\n    parameters: {{weight: 1}}\n",
        dir.display()
    );
    let (o, out) = run_config(tmp.path(), &yaml, &[]);
    assert_clean_failure(
        &o,
        &out,
        &[
            "model.norm.weight: ",
            "float and non-float tensors cannot be merged",
        ],
    );
}

#[test]
fn truncated_embeddings_keep_the_common_rows() {
    let yaml = "merge_method: linear\nmodels:\n  - model: {G}/base\n    parameters: {weight: 1}\n  - model: {G}/other_vocab\n    parameters: {weight: 1}\ndtype: float32\nout_dtype: float16\n";
    let got = merged_f32(yaml, &["--unsafe-truncate-embeddings"]);
    assert_eq!(got["model.embed_tokens.weight"].shape, vec![320, 32]);
    assert_eq!(got["lm_head.weight"].shape, vec![320, 32]);
}

#[test]
fn streamed_passes_agree_with_whole_tensors() {
    // A 16 KiB budget forces every statistics method to stream its tensors in passes with
    // f64 sums; the whole-tensor path follows PyTorch's order. They agree to the last bit on
    // nearly every element (and within 1 ulp where they do not), except the top-k methods,
    // whose elements tied exactly at the threshold may be picked differently.
    for (case, max_ulp, max_fraction) in [
        ("mk_slerp_gradient", 1, 0.001),
        ("mk_nuslerp", 1, 0.001),
        ("mk_model_stock", 1, 0.002),
        ("mk_ties", u64::MAX, 0.0005),
        ("mk_breadcrumbs", u64::MAX, 0.0005),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let whole = tmp.path().join("whole");
        let streamed = tmp.path().join("streamed");
        let cfg = format!("mergekit/{case}.yml");
        ok(
            &golden(),
            &["merge", &cfg, whole.to_str().unwrap(), "--quiet"],
        );
        ok(
            &golden(),
            &[
                "merge",
                &cfg,
                streamed.to_str().unwrap(),
                "--quiet",
                "--memory-limit",
                "16KiB",
            ],
        );
        let d = diff(&load_dir(&streamed), &load_dir(&whole));
        assert!(
            d.max_ulp <= max_ulp && d.fraction() <= max_fraction,
            "{case}: {d:?}"
        );
    }
}

/// `merge CFG OUT --quiet EXTRA…` in `root`, which must succeed.
fn merge_ok(root: &Path, cfg: &str, out: &Path, extra: &[&str]) {
    let mut args = vec!["merge", cfg, out.to_str().unwrap(), "--quiet"];
    args.extend_from_slice(extra);
    ok(root, &args);
}

/// Streamed passes read their operands a window at a time under `--io read` and `auto`
/// (positional reads of local files), and from mapped chunks under `--io mmap`: the same
/// bytes either way.
#[test]
fn streamed_passes_give_the_same_bytes_however_they_read() {
    for (root, case) in [
        (golden(), "mk_nuslerp"),
        (golden(), "mk_ties"),
        (golden(), "mk_model_stock"),
        (golden2(), "mk_della"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = format!("mergekit/{case}.yml");
        let mut outs = Vec::new();
        for io in ["mmap", "read", "auto"] {
            let out = tmp.path().join(io);
            merge_ok(&root, &cfg, &out, &["--memory-limit", "16KiB", "--io", io]);
            outs.push(out);
        }
        assert_bit_exact(&outs[1], &outs[0]);
        assert_bit_exact(&outs[2], &outs[0]);
    }
}

/// A streamed step keeps its operands' chunks from one pass to the next when they fit its
/// share of the budget (half of it over the workers): at 160 KiB with one worker the
/// embeddings and lm_head (320 × 32, three operands) stream and are kept whole, at 16 KiB
/// they stream and are read anew each pass. Their bytes are the same, in every I/O mode.
#[test]
fn streamed_steps_give_the_same_bytes_whether_their_chunks_are_kept_or_read_again() {
    for (root, case) in [
        (golden(), "mk_nuslerp"),
        (golden(), "mk_ties"),
        (golden(), "mk_slerp_gradient"),
        (golden2(), "mk_della"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = format!("mergekit/{case}.yml");
        for io in ["mmap", "read", "auto"] {
            let mut outs = Vec::new();
            for limit in ["16KiB", "160KiB"] {
                let out = tmp.path().join(format!("{io}-{limit}"));
                let args = ["--threads", "1", "--memory-limit", limit, "--io", io];
                merge_ok(&root, &cfg, &out, &args);
                outs.push(load_dir(&out));
            }
            for name in ["model.embed_tokens.weight", "lm_head.weight"] {
                let (read, kept) = (&outs[0][name], &outs[1][name]);
                assert!(
                    read.bytes == kept.bytes && read.shape == kept.shape,
                    "{case} --io {io}: {name} differs"
                );
            }
        }
    }
}

#[test]
fn lora_dict_form_with_weight() {
    // {model, lora, lora_weight}: the LoRA applied in-stream at 0.25, then merged. With one
    // model at weight 1 the output is exactly the PEFT merge at 0.25.
    let yaml = "merge_method: linear\nmodels:\n  - model: {model: {G}/other, lora: {G}/lora, lora_weight: 0.25}\n    parameters: {weight: 1.0}\ndtype: float16\n";
    let tmp = tempfile::tempdir().unwrap();
    let (o, out) = run_config(tmp.path(), yaml, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_bit_exact(&out, &golden().join("expected/peft_lora_w025_on_other"));
}
