//! mergekit-yaml's command line as users type it: `--no-` forms, repeated options (the last
//! wins, as click does), `-v`, `--lora-merge-dtype` against mergekit's own outputs, and one
//! note per ignored option with its own reason.

use std::path::PathBuf;

use crate::common::*;

fn extra() -> PathBuf {
    fixtures().join("mergekit_extra")
}

fn run(args: &[&str]) -> (tempfile::TempDir, PathBuf, String) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut all = vec!["merge", args[0], out.to_str().unwrap()];
    all.extend_from_slice(&args[1..]);
    let o = ok(&golden(), &all);
    (tmp, out, stderr(&o))
}

#[test]
fn lora_merge_dtype_matches_mergekit_exactly() {
    for d in ["bfloat16", "float32"] {
        let (_t, out, _) = run(&[
            "mergekit/mk_linear_lora.yml",
            "--out-shard-size",
            "100K",
            "--lora-merge-dtype",
            d,
            "--quiet",
        ]);
        assert_bit_exact(
            &out,
            &extra().join(format!("expected/mk_linear_lora_merge_dtype_{d}")),
        );
    }
    // bfloat16 changes the result (the case is not vacuous): it differs from the default.
    let want = load_dir(&golden().join("expected/mk_linear_lora"));
    let bf16 = load_dir(&extra().join("expected/mk_linear_lora_merge_dtype_bfloat16"));
    assert!(diff(&bf16, &want).differing > 0);
}

#[test]
fn every_no_form_is_accepted_and_selects_the_default() {
    let (_t, out, err) = run(&[
        "mergekit/mk_linear.yml",
        "--out-shard-size",
        "100K",
        "--no-cuda",
        "--no-lazy-unpickle",
        "--no-allow-crimes",
        "--no-trust-remote-code",
        "--no-clone-tensors",
        "--no-async-write",
        "--no-low-cpu-memory",
        "--no-read-to-gpu",
        "--no-multi-gpu",
        "--no-unsafe-truncate-embeddings",
        "--copy-tokenizer",
        "--safe-serialization",
        "--write-model-card",
        "--quiet",
        "--no-quiet",
    ]);
    assert_bit_exact(&out, &golden().join("expected/mk_linear"));
    // --no-quiet after --quiet: the summary is back; defaults say nothing.
    assert!(err.contains("wrote "), "{err}");
    assert!(!err.contains("ignored"), "{err}");
}

#[test]
fn a_repeated_option_takes_its_last_value() {
    let (_t, out, _) = run(&[
        "mergekit/mk_linear.yml",
        "--out-shard-size",
        "1K",
        "--out-shard-size",
        "100K",
        "--random-seed",
        "1",
        "--random-seed",
        "2",
        "-j",
        "1",
        "-j",
        "2",
        "--cuda",
        "--no-cuda",
        "--quiet",
    ]);
    assert_bit_exact(&out, &golden().join("expected/mk_linear"));
    // A later --quiet wins over --no-quiet too.
    let (_t, _, err) = run(&["mergekit/mk_linear.yml", "--no-quiet", "-q", "--cuda"]);
    assert_eq!(err, "");
}

#[test]
fn each_ignored_option_says_why() {
    let (_t, _, err) = run(&[
        "mergekit/mk_linear.yml",
        "--cuda",
        "--device",
        "cuda:0",
        "--gpu-rich",
        "--lazy-unpickle",
        "--lora-merge-cache",
        "/tmp/x",
        "--clone-tensors",
        "--trust-remote-code",
        "--write-threads",
        "4",
        "--no-safe-serialization",
    ]);
    for line in [
        "note: --cuda, --device, --gpu-rich ignored: mergestream computes on the CPU",
        "note: --lazy-unpickle ignored: PyTorch .bin files are always read lazily",
        "note: --lora-merge-cache ignored: LoRAs are applied inside the stream",
        "note: --clone-tensors ignored: every output tensor is written as its own copy",
        "note: --trust-remote-code ignored: no model code is ever run",
        "note: --write-threads ignored: every compute worker writes its own chunks",
        "note: --no-safe-serialization ignored: the output is always safetensors",
    ] {
        assert!(err.lines().any(|l| l.starts_with(line)), "{line}\n{err}");
    }
    // `--device cpu` is what mergestream does: nothing to say.
    let (_t, _, err) = run(&["mergekit/mk_linear.yml", "--device", "cpu"]);
    assert!(!err.contains("ignored"), "{err}");
}

#[test]
fn verbose_prints_the_plan_before_running() {
    let (_t, out, err) = run(&["mergekit/mk_linear.yml", "-vv"]);
    assert!(out.join("config.json").exists());
    assert!(
        err.starts_with("plan: merge mergekit/mk_linear.yml (linear)"),
        "{err}"
    );
    assert!(err.contains("model.layers.7.mlp.down_proj.weight"), "{err}");
    let (_t, _, err) = run(&["mergekit/mk_linear.yml", "-v", "-q"]);
    assert_eq!(err, "");
}
