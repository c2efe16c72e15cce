//! `extract-lora` against mergekit-extract-lora 0.1.5 (golden set 2).
//!
//! SVD output is not bit-reproducible (singular vectors' signs and the last bits depend on
//! the LAPACK routine), so the factors are compared through what they mean:
//! - whole tensors (modules_to_save) are the fine-tune's bytes: compared bit for bit;
//! - LoRA pairs: same names, dtypes and shapes; the products B·A agree element by element
//!   within `TOL_BA · ((|B₁|·|A₁|) + (|B₂|·|A₂|))`. Why: both tools truncate the same f32
//!   SVD (unique here: the kept and dropped singular values are well separated) and round
//!   each factor to fp16, a relative error ≤ 2⁻¹¹ per element; a product term b·a then errs
//!   by ≤ 2⁻¹⁰·|b|·|a|, so each tool's B·A is within 2⁻¹⁰·(|B|·|A|) of the exact truncation
//!   and the two within the sum. TOL_BA = 2⁻⁹ doubles that for the f32 SVD's own error.
//!   Measured: max |ΔB·A| = 8.4e-6 (r8, r8_embed), 1.6e-5 (r4_opts), 4.5e-4 and 5.7e-4 of
//!   max |B·A|, at most 22% of the tolerance;
//! - applied with `mergestream lora` onto the base, both adapters give fp16 weights within
//!   that product tolerance plus one fp16 ulp of the weight (the product difference may move
//!   a sum across a rounding boundary). Measured: 860 (r8), 1045 (r8_embed), 228 (r4_opts)
//!   of 121376 elements differ, by one ulp where the weight is large, by more ulps only near
//!   zero, where an ulp is far below the products' fp16 noise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::common;

use common::*;

const TOL_BA: f32 = 1.0 / 512.0;

fn manifest(name: &str) -> Value {
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(golden2().join("manifest.json")).unwrap())
            .unwrap();
    m["expected"][name].clone()
}

/// The manifest's mergekit command as `mergestream extract-lora` arguments, writing to
/// `out` (named like the expected folder, so the README titles agree).
fn args_of(case: &Value, out: &Path) -> Vec<String> {
    let cmd = case["command"].as_str().unwrap();
    let mut words = cmd.split_whitespace();
    assert_eq!(words.next(), Some("mergekit-extract-lora"));
    let mut args = vec!["extract-lora".to_string()];
    let mut after_out = false;
    for w in words {
        if after_out {
            args.push(out.to_str().unwrap().to_string());
            after_out = false;
            continue;
        }
        after_out = w == "--out-path";
        args.push(w.to_string());
    }
    args
}

struct Run {
    _tmp: tempfile::TempDir,
    out: PathBuf,
    args: Vec<String>,
}

fn extract(case_name: &str, extra: &[&str]) -> Run {
    let case = manifest(case_name);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join(case_name);
    let mut args = args_of(&case, &out);
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--quiet".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&golden2(), &refs);
    Run {
        _tmp: tmp,
        out,
        args,
    }
}

fn f16s(t: &Tensor) -> Vec<f32> {
    assert_eq!(t.dtype, "F16");
    t.bytes
        .chunks_exact(2)
        .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
        .collect()
}

/// B·A and |B|·|A| of a pair: ([rows, cols] row-major, rows, cols).
fn product(b: &Tensor, a: &Tensor) -> (Vec<f32>, Vec<f32>, usize, usize) {
    let (bv, av) = (f16s(b), f16s(a));
    let (m, r, n) = (b.shape[0], b.shape[1], a.shape[1]);
    assert_eq!(a.shape[0], r, "ranks of A and B");
    let mut p = vec![0f32; m * n];
    let mut q = vec![0f32; m * n];
    for i in 0..m {
        for k in 0..r {
            let bik = bv[i * r + k];
            for j in 0..n {
                p[i * n + j] += bik * av[k * n + j];
                q[i * n + j] += bik.abs() * av[k * n + j].abs();
            }
        }
    }
    (p, q, m, n)
}

/// Per LoRA module (by its `lora_A` key): the two products and the allowed difference.
struct PairCheck {
    tol: Vec<f32>,
    cols: usize,
    /// `lora_embedding_*`: PEFT adds (B·A)ᵀ.
    embedding: bool,
    max_diff: f32,
    max_product: f32,
    /// The largest share of its tolerance an element used.
    max_ratio: f32,
}

/// Compare our adapter tensors with mergekit's; returns the per-module product checks.
fn compare_adapters(ours: &Path, theirs: &Path) -> BTreeMap<String, PairCheck> {
    let got = load_dir(ours);
    let want = load_dir(theirs);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "tensor names"
    );
    let mut checks = BTreeMap::new();
    for (name, w) in &want {
        let g = &got[name];
        assert_eq!(g.dtype, w.dtype, "{name}: dtype");
        assert_eq!(g.shape, w.shape, "{name}: shape");
        let (a_tag, b_tag, embedding) = if name.contains(".lora_A.") {
            (".lora_A.", ".lora_B.", false)
        } else if name.ends_with(".lora_embedding_A") {
            (".lora_embedding_A", ".lora_embedding_B", true)
        } else if name.contains(".lora_B.") || name.ends_with(".lora_embedding_B") {
            continue; // checked with its A
        } else {
            assert!(
                g.bytes == w.bytes,
                "{name}: a whole module must be copied bit for bit"
            );
            continue;
        };
        let bname = name.replace(a_tag, b_tag);
        let (pg, qg, _, cols) = product(&got[&bname], g);
        let (pw, qw, _, _) = product(&want[&bname], w);
        let tol: Vec<f32> = qg.iter().zip(&qw).map(|(x, y)| TOL_BA * (x + y)).collect();
        let mut max_diff = 0f32;
        let mut max_ratio = 0f32;
        for (i, ((x, y), t)) in pg.iter().zip(&pw).zip(&tol).enumerate() {
            let d = (x - y).abs();
            if *t > 0.0 {
                max_ratio = max_ratio.max(d / t);
            }
            assert!(
                d <= *t,
                "{name}: B·A element {i}: {x} vs mergekit's {y} (tolerance {t})"
            );
            max_diff = max_diff.max(d);
        }
        let module = name.split(a_tag).next().unwrap().to_string();
        checks.insert(
            module,
            PairCheck {
                tol,
                cols,
                embedding,
                max_diff,
                max_product: pw.iter().fold(0f32, |m, x| m.max(x.abs())),
                max_ratio,
            },
        );
    }
    checks
}

/// adapter_config.json: every field as mergekit's; target_modules as a set (mergekit lists
/// a Python set, whose order varies); modules_to_save in order, as `modules_to_save`.
fn compare_config(ours: &Path, theirs: &Path, modules_to_save: Option<&[&str]>) {
    let read = |p: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    let (mut g, mut w) = (read(ours), read(theirs));
    let set = |v: &mut Value| {
        let mut s: Vec<String> = v["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect();
        s.sort();
        v["target_modules"] = serde_json::json!(s);
    };
    set(&mut g);
    set(&mut w);
    if let Some(m) = modules_to_save {
        w["modules_to_save"] = serde_json::json!(m);
    }
    assert_eq!(g, w, "adapter_config.json");
    // The same keys in the same order, 4-space indented, as json.dump(indent=4) writes.
    let text = std::fs::read_to_string(ours.join("adapter_config.json")).unwrap();
    assert!(
        text.starts_with("{\n    \"base_model_name_or_path\": "),
        "{text}"
    );
}

/// README.md: front matter the Hub parses (tagged mergestream, no local path as
/// `base_model`), and from "## LoRA Details" on, mergekit's card with our command line in
/// place of mergekit's.
fn compare_card(run: &Run, theirs: &Path, case: &Value) {
    let got = std::fs::read_to_string(run.out.join("README.md")).unwrap();
    let want = std::fs::read_to_string(theirs.join("README.md")).unwrap();
    let ours = format!("mergestream {}", run.args.join(" "));
    let want = want.replace(case["command"].as_str().unwrap(), &ours);
    let front = got
        .strip_prefix("---\n")
        .and_then(|r| r.split_once("\n---\n"))
        .map(|(f, _)| f)
        .expect("front matter");
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(front).unwrap();
    assert_eq!(yaml["library_name"].as_str(), Some("peft"));
    let tags: Vec<&str> = yaml["tags"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert!(
        tags.contains(&"mergestream") && tags.contains(&"peft"),
        "{tags:?}"
    );
    // Local inputs: the Hub refuses them as base_model.
    assert!(yaml.get("base_model").is_none(), "{front}");
    let body = |s: &str| s[s.find("## LoRA Details").unwrap()..].to_string();
    assert_eq!(body(&got), body(&want));
}

/// Apply both adapters with `mergestream lora` to the base and compare the merged weights:
/// LoRA'd tensors within the product tolerance plus one fp16 ulp, others bit for bit.
/// Returns (elements differing, max ulps).
fn compare_applied(ours: &Path, theirs: &Path, checks: &BTreeMap<String, PairCheck>) -> (u64, u64) {
    let tmp = tempfile::tempdir().unwrap();
    let apply = |lora: &Path, name: &str| {
        let out = tmp.path().join(name);
        ok(
            &golden2(),
            &[
                "lora",
                "--base",
                "models/base",
                "--lora",
                lora.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--quiet",
            ],
        );
        load_dir(&out)
    };
    let got = apply(ours, "ours");
    let want = apply(theirs, "mergekit");
    let d = diff(&got, &want);
    for (name, w) in &want {
        let g = &got[name];
        let module = format!(
            "base_model.model.{}",
            name.strip_suffix(".weight").unwrap_or(name)
        );
        let Some(c) = checks.get(&module) else {
            assert!(g.bytes == w.bytes, "{name}: not LoRA'd, must be identical");
            continue;
        };
        let (gv, wv) = (f16s(g), f16s(w));
        let cols = w.shape[1];
        for (i, (x, y)) in gv.iter().zip(&wv).enumerate() {
            // The product's element for weight element i ((B·A)ᵀ for embeddings).
            let (r, col) = (i / cols, i % cols);
            let t = if c.embedding {
                c.tol[col * c.cols + r]
            } else {
                c.tol[r * c.cols + col]
            };
            let ulp = ulp16(x.abs().max(y.abs()));
            assert!(
                (x - y).abs() <= t + ulp,
                "{name}[{i}]: {x} vs {y} (tolerance {t} + 1 ulp {ulp})"
            );
        }
    }
    (d.differing, d.max_ulp)
}

/// The spacing of fp16 values at magnitude `x`.
fn ulp16(x: f32) -> f32 {
    let h = half::f16::from_f32(x);
    let next = half::f16::from_bits(h.to_bits() + 1).to_f32();
    (next - h.to_f32()).abs()
}

fn golden_case(name: &str) {
    let case = manifest(name);
    let run = extract(name, &[]);
    let theirs = golden2().join(case["output"].as_str().unwrap());
    let checks = compare_adapters(&run.out, &theirs);
    compare_config(&run.out, &theirs, None);
    compare_card(&run, &theirs, &case);
    let (differing, max_ulp) = compare_applied(&run.out, &theirs, &checks);
    let worst = checks
        .values()
        .map(|c| c.max_diff / c.max_product)
        .fold(0f32, f32::max);
    let used = checks.values().map(|c| c.max_ratio).fold(0f32, f32::max);
    eprintln!(
        "{name}: {} LoRA pairs, worst |ΔB·A| / max|B·A| = {worst:.2e} (at most {:.0}% of the tolerance); applied: {differing} elements differ (max {max_ulp} fp16 ulps, near zero), all within tolerance",
        checks.len(),
        used * 100.0
    );
}

#[test]
fn extract_lora_r8_matches_mergekit() {
    golden_case("extract_lora_r8");
}

#[test]
fn extract_lora_r8_embed_matches_mergekit() {
    golden_case("extract_lora_r8_embed");
}

#[test]
fn extract_lora_r4_opts_matches_mergekit() {
    golden_case("extract_lora_r4_opts");
}

#[test]
fn save_module_does_what_mergekit_means() {
    // mergekit 0.1.5 crashes here; what it means: extract_lora_r8 with lm_head listed first
    // in modules_to_save (lm_head is saved whole there anyway).
    let case = manifest("extract_lora_save_module");
    assert_eq!(case["succeeded"], false);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("extract_lora_r8");
    let args = args_of(&case, &out);
    assert!(args.iter().any(|a| a == "--save-module"));
    let mut refs: Vec<&str> = args.iter().map(String::as_str).collect();
    refs.push("--quiet");
    ok(&golden2(), &refs);
    let r8 = golden2().join("expected/extract_lora_r8");
    compare_adapters(&out, &r8);
    compare_config(
        &out,
        &r8,
        Some(&[
            "lm_head",
            "embed_tokens",
            "input_layernorm",
            "post_attention_layernorm",
            "norm",
        ]),
    );
}

#[test]
fn save_module_turns_a_linear_module_whole() {
    // A --save-module naming a linear layer by its last component saves every such layer
    // whole instead of decomposing it.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a");
    let o = extract_args(
        "models/ft_lowrank",
        "models/base",
        &out,
        &[
            "--max-rank",
            "4",
            "--save-module",
            "q_proj",
            "--save-module",
            "model.layers.0.mlp.up_proj",
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = load_dir(&out);
    let ft = load_dir(&golden2().join("models/ft_lowrank"));
    let q = "model.layers.3.self_attn.q_proj.weight";
    assert_eq!(got[&format!("base_model.model.{q}")], ft[q]);
    assert!(got.contains_key("base_model.model.model.layers.0.mlp.up_proj.weight"));
    assert!(got.contains_key("base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"));
    assert!(!got.keys().any(|k| k.contains("q_proj.lora_")));
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["modules_to_save"][0], "q_proj");
    assert_eq!(cfg["modules_to_save"][1], "model.layers.0.mlp.up_proj");
    assert!(
        !cfg["target_modules"]
            .as_array()
            .unwrap()
            .contains(&Value::from("q_proj"))
    );
}

#[test]
fn per_module_ranks_go_to_rank_pattern_and_apply_exactly_as_extracted() {
    // With --sv-epsilon between the singular values of different modules, ranks differ:
    // r = lora_alpha = the largest, the others in rank_pattern and alpha_pattern, so every
    // module's scaling is 1. Applying the adapter must then add exactly B·A.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a");
    let o = extract_args(
        "models/ft_lowrank",
        "models/base",
        &out,
        &["--max-rank", "8", "--sv-epsilon", "0.0125", "--quiet"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = load_dir(&out);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    let r = cfg["r"].as_u64().unwrap();
    assert_eq!(cfg["lora_alpha"], cfg["r"]);
    assert_eq!(cfg["rank_pattern"], cfg["alpha_pattern"]);
    let pattern = cfg["rank_pattern"].as_object().unwrap();
    assert!(!pattern.is_empty(), "ε = 0.0125 splits the modules' ranks");
    let mut ranks = BTreeMap::new();
    for (name, t) in &got {
        if let Some(m) = name.strip_suffix(".lora_A.weight") {
            let m = m.strip_prefix("base_model.model.").unwrap();
            ranks.insert(m.to_string(), t.shape[0] as u64);
        }
    }
    assert_eq!(ranks.values().max(), Some(&r));
    for (m, k) in &ranks {
        match pattern.get(m) {
            Some(v) => assert_eq!(v.as_u64(), Some(*k), "{m}"),
            None => assert_eq!(*k, r, "{m} has rank {k} but is not in rank_pattern"),
        }
    }
    // Our own `lora` applies it as PEFT would: W + 1·B·A, rounded to fp16 once.
    let merged = tmp.path().join("m");
    ok(
        &golden2(),
        &[
            "lora",
            "--base",
            "models/base",
            "--lora",
            out.to_str().unwrap(),
            "-o",
            merged.to_str().unwrap(),
            "--quiet",
        ],
    );
    let merged = load_dir(&merged);
    let base = load_dir(&golden2().join("models/base"));
    let name = "model.layers.2.mlp.down_proj.weight";
    let a = &got["base_model.model.model.layers.2.mlp.down_proj.lora_A.weight"];
    let b = &got["base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"];
    let (p, _, _, _) = product(b, a);
    let (w0, w1) = (f16s(&base[name]), f16s(&merged[name]));
    for i in 0..w0.len() {
        let want = half::f16::from_f32(w0[i] + p[i]).to_f32();
        assert!((w1[i] - want).abs() <= ulp16(want), "{name}[{i}]");
    }
}

#[test]
fn output_parses_and_is_a_loadable_adapter() {
    let run = extract("extract_lora_r8_embed", &[]);
    // Our reader and the safetensors crate accept it; our LoRA loader takes its config.
    mergestream::Model::open(&run.out.join("adapter_model.safetensors")).unwrap();
    let adapter = mergestream::plan::lora::open_adapter(&run.out).unwrap();
    assert_eq!(adapter.config.r, 8);
    assert_eq!(adapter.config.modules_to_save.len(), 3);
    let names: Vec<String> = std::fs::read_dir(&run.out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(
        names,
        [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors"
        ]
    );
}

// ---- bad inputs: one `error:` line, exit 1, nothing left behind; usage errors exit 2 ----

fn extract_args(model: &str, base: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "extract-lora",
        "--model",
        model,
        "--base-model",
        base,
        "--out-path",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    mergestream(&golden2(), &args)
}

#[test]
fn missing_model_is_one_error_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = extract_args("models/no_such_model", "models/base", &out, &[]);
    assert_clean_failure(&o, &out, &["models/no_such_model"]);
    let o = extract_args("models/ft_lowrank", "models/no_such_base", &out, &[]);
    assert_clean_failure(&o, &out, &["models/no_such_base"]);
}

#[test]
fn mismatched_shapes_name_the_tensor_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut base = load_dir(&golden2().join("models/base"));
    let t = base
        .get_mut("model.layers.1.self_attn.k_proj.weight")
        .unwrap();
    t.shape = vec![16, 32];
    t.bytes.truncate(16 * 32 * 2);
    let bad = tmp.path().join("bad_base");
    write_model(&bad, &base);
    let out = tmp.path().join("out");
    let o = extract_args("models/ft_lowrank", bad.to_str().unwrap(), &out, &[]);
    assert_clean_failure(
        &o,
        &out,
        &[
            "model.layers.1.self_attn.k_proj.weight",
            "bad_base/model.safetensors",
            "[16, 32]",
        ],
    );
}

#[test]
fn base_missing_a_tensor_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut base = load_dir(&golden2().join("models/base"));
    base.remove("model.layers.5.mlp.up_proj.weight");
    let bad = tmp.path().join("bad_base");
    write_model(&bad, &base);
    let out = tmp.path().join("out");
    let o = extract_args("models/ft_lowrank", bad.to_str().unwrap(), &out, &[]);
    assert_clean_failure(&o, &out, &["model.layers.5.mlp.up_proj.weight", "bad_base"]);
}

#[test]
fn max_rank_zero_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = extract_args(
        "models/ft_lowrank",
        "models/base",
        &out,
        &["--max-rank", "0"],
    );
    assert_clean_failure(&o, &out, &["--max-rank 0"]);
    let o = extract_args(
        "models/ft_lowrank",
        "models/base",
        &out,
        &["--max-rank", "-3"],
    );
    assert_clean_failure(&o, &out, &["--max-rank -3"]);
}

#[test]
fn excluding_everything_is_an_error_not_an_empty_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = extract_args("models/ft_lowrank", "models/base", &out, &["-e", "."]);
    assert_clean_failure(&o, &out, &["no module left to decompose"]);
}

#[test]
fn usage_errors_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // A regex that does not compile.
    let o = extract_args("models/ft_lowrank", "models/base", &out, &["-e", "("]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--exclude-regex"), "{}", stderr(&o));
    assert!(!out.exists());
    // A required flag missing.
    let o = mergestream(
        &golden2(),
        &["extract-lora", "--model", "models/ft_lowrank"],
    );
    assert_eq!(o.status.code(), Some(2));
    // Not a number.
    let o = extract_args(
        "models/ft_lowrank",
        "models/base",
        &out,
        &["--max-rank", "x"],
    );
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn existing_output_needs_force_and_gpu_flags_are_noted() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let o = extract_args(
        "models/ft_lowrank",
        "models/base",
        &out,
        &["--max-rank", "2"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    let o = extract_args(
        "models/ft_lowrank",
        "models/base",
        &out,
        &[
            "--max-rank",
            "2",
            "--force",
            "--cuda",
            "-j",
            "4",
            "--lazy-unpickle",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.lines()
            .any(|l| l.starts_with("note: --cuda, --num-threads, --lazy-unpickle ignored")),
        "{err}"
    );
    assert!(out.join("adapter_model.safetensors").exists());
}

#[test]
fn tied_lm_head_is_saved_or_decomposed_under_its_own_name() {
    // A model with tied embeddings has no lm_head.weight; mergekit loads it through the tied
    // name (checked by hand against mergekit 0.1.5: same keys, B·A within 8.4e-6).
    let tmp = tempfile::tempdir().unwrap();
    let tie = |src: &str, dst: &str| {
        let mut t = load_dir(&golden2().join("models").join(src));
        t.remove("lm_head.weight");
        let dir = tmp.path().join(dst);
        write_model(&dir, &t);
        let mut cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(golden2().join("models/base/config.json")).unwrap(),
        )
        .unwrap();
        cfg["tie_word_embeddings"] = Value::Bool(true);
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        dir
    };
    let base = tie("base", "tbase");
    let ft = tie("ft_lowrank", "tft");
    let run = |out: &str, extra: &[&str]| {
        let out = tmp.path().join(out);
        let o = extract_args(
            ft.to_str().unwrap(),
            base.to_str().unwrap(),
            &out,
            &[&["--max-rank", "4", "-q"], extra].concat(),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        load_dir(&out)
    };
    let whole = run("whole", &[]);
    let ft_t = load_dir(&ft);
    assert_eq!(
        whole["base_model.model.lm_head.weight"],
        ft_t["model.embed_tokens.weight"]
    );
    assert_eq!(
        whole["base_model.model.model.embed_tokens.weight"],
        ft_t["model.embed_tokens.weight"]
    );
    let lora = run("lora", &["--embed-lora"]);
    assert_eq!(
        lora["base_model.model.lm_head.lora_A.weight"].shape,
        [4, 32]
    );
    assert_eq!(
        lora["base_model.model.lm_head.lora_B.weight"].shape,
        [320, 4]
    );
    assert_eq!(
        lora["base_model.model.model.embed_tokens.lora_embedding_A"].shape,
        [4, 320]
    );
}

/// Golden-set models with `edit` applied to the fine-tune's and base's tensors, written to
/// `tmp` as `tbase` and `tft`.
fn edited_models(
    tmp: &Path,
    edit: impl Fn(&mut BTreeMap<String, Tensor>, bool),
) -> (PathBuf, PathBuf) {
    let make = |src: &str, dst: &str, is_ft: bool| {
        let mut t = load_dir(&golden2().join("models").join(src));
        edit(&mut t, is_ft);
        let dir = tmp.join(dst);
        write_model(&dir, &t);
        dir
    };
    (
        make("base", "tbase", false),
        make("ft_lowrank", "tft", true),
    )
}

fn f16_tensor(values: &[f32]) -> Tensor {
    Tensor {
        dtype: "F16".into(),
        shape: vec![values.len()],
        bytes: values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
    }
}

#[test]
fn a_bias_delta_is_saved_as_lora_b_bias() {
    // mergekit saves `<module>.lora_B.bias` = ft bias − base bias, in the bias dtype.
    let tmp = tempfile::tempdir().unwrap();
    let (base, ft) = edited_models(tmp.path(), |t, is_ft| {
        let v: Vec<f32> = (0..32)
            .map(|i| i as f32 * 0.01 + if is_ft { 0.25 } else { 0.0 })
            .collect();
        t.insert(
            "model.layers.0.self_attn.q_proj.bias".into(),
            f16_tensor(&v),
        );
    });
    let out = tmp.path().join("out");
    let o = extract_args(
        ft.to_str().unwrap(),
        base.to_str().unwrap(),
        &out,
        &["--max-rank", "4", "-q"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = load_dir(&out);
    let b = &got["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"];
    let want: Vec<f32> = (0..32)
        .map(|i| {
            let x = half::f16::from_f32(i as f32 * 0.01).to_f32();
            let y = half::f16::from_f32(i as f32 * 0.01 + 0.25).to_f32();
            half::f16::from_f32(y - x).to_f32()
        })
        .collect();
    assert_eq!(f16s(b), want);
}

#[test]
fn a_failure_mid_run_leaves_nothing() {
    // A NaN in one fine-tuned weight: the SVD is refused after earlier modules were
    // written; the staging folder goes, nothing appears under the output name.
    let tmp = tempfile::tempdir().unwrap();
    let (base, ft) = edited_models(tmp.path(), |t, is_ft| {
        if is_ft {
            let w = t.get_mut("model.layers.6.mlp.gate_proj.weight").unwrap();
            w.bytes[10..12].copy_from_slice(&half::f16::NAN.to_bits().to_le_bytes());
        }
    });
    let out = tmp.path().join("out");
    let o = extract_args(
        ft.to_str().unwrap(),
        base.to_str().unwrap(),
        &out,
        &["--max-rank", "4"],
    );
    assert_clean_failure(
        &o,
        &out,
        &[
            "model.layers.6.mlp.gate_proj.weight",
            "tft/model.safetensors",
            "NaN",
        ],
    );
}

#[test]
fn skip_undecomposable_leaves_norms_out() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = extract_args(
        "models/ft_lowrank",
        "models/base",
        &out,
        &[
            "--max-rank",
            "2",
            "--skip-undecomposable",
            "-i",
            "layers\\.[01]\\.",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = load_dir(&out);
    assert!(!got.keys().any(|k| k.contains("norm")), "{:?}", got.keys());
    // -i keeps layers 0 and 1 only; embeddings are saved whole whatever -i says (mergekit).
    assert!(got.contains_key("base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"));
    assert!(!got.keys().any(|k| k.contains("layers.2.")));
    assert!(got.contains_key("base_model.model.lm_head.weight"));
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["embed_tokens", "lm_head"])
    );
}
