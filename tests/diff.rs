//! `mergestream diff`, `--json` of `inspect` and of dry runs, completions and the man page.
//!
//! diff's exit status is the contract scripts rely on: 0 when the models match (bitwise, or
//! within `--ulps`), 1 when they differ (a report on stdout, nothing on stderr) or on an error
//! (one `error:` line on stderr, no report).

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

use common::*;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn base() -> String {
    golden().join("models/base").display().to_string()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

/// A difference, not an error: exit 1, a report, an empty stderr.
fn assert_differs(o: &Output) {
    assert_eq!(o.status.code(), Some(1), "stderr: {}", stderr(o));
    assert!(stderr(o).is_empty(), "{}", stderr(o));
    assert!(stdout(o).contains("summary: different"), "{}", stdout(o));
}

/// The golden base with one element of `tensor` moved one ulp up, as a new model in `dir`.
fn one_ulp_off(dir: &Path, tensor: &str) {
    let mut t = load_dir(Path::new(&base()));
    let bytes = &mut t.get_mut(tensor).expect("tensor").bytes;
    let bits = u16::from_le_bytes([bytes[10], bytes[11]]) + 1;
    bytes[10..12].copy_from_slice(&bits.to_le_bytes());
    write_model(dir, &t);
}

const CHANGED: &str = "model.layers.3.mlp.down_proj.weight";

#[test]
fn a_model_matches_its_conversion_and_its_pickle() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("converted");
    ok(
        tmp.path(),
        &["convert", &base(), out.to_str().unwrap(), "-q"],
    );
    let o = mergestream(tmp.path(), &["diff", out.to_str().unwrap(), &base()]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("summary: identical: 75 tensors compared, 75 identical"),
        "{text}"
    );
    assert!(
        text.contains("model.layers.7.mlp.down_proj.weight"),
        "{text}"
    );
    // A PyTorch .bin of the same weights.
    let bin = golden().join("models/base_bin");
    let o = mergestream(tmp.path(), &["diff", bin.to_str().unwrap(), &base(), "-q"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 1, "{}", stdout(&o));
}

#[test]
fn one_ulp_is_found_and_named_and_tolerated_with_ulps_1() {
    let tmp = tempfile::tempdir().unwrap();
    let changed = tmp.path().join("changed");
    one_ulp_off(&changed, CHANGED);
    let c = changed.to_str().unwrap();
    let o = mergestream(tmp.path(), &["diff", c, &base()]);
    assert_differs(&o);
    let text = stdout(&o);
    let line = text
        .lines()
        .find(|l| l.contains("DIFFERS"))
        .expect("a differing tensor");
    assert!(line.starts_with(CHANGED), "{line}");
    assert!(line.contains("DIFFERS (1 elements)"), "{line}");
    assert_eq!(text.matches("DIFFERS").count(), 1, "{text}");
    assert!(
        text.contains("1 differ (1 of 121376 elements, max 1 ulp)"),
        "{text}"
    );

    let o = mergestream(tmp.path(), &["diff", c, &base(), "--ulps", "1"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).contains("summary: within"), "{}", stdout(&o));
    assert!(stdout(&o).contains("within 1 ulp"), "{}", stdout(&o));
    let o = mergestream(tmp.path(), &["diff", c, &base(), "--ulps", "0", "-q"]);
    assert_differs(&o);
}

#[test]
fn tensors_on_one_side_and_mismatched_shapes_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = load_dir(Path::new(&base()));
    let moved = t.remove("model.norm.weight").unwrap();
    t.insert("model.extra.weight".to_string(), moved);
    let side = tmp.path().join("side");
    write_model(&side, &t);
    let o = mergestream(tmp.path(), &["diff", side.to_str().unwrap(), &base()]);
    assert_differs(&o);
    let text = stdout(&o);
    assert!(text.contains("only in A: model.extra.weight"), "{text}");
    assert!(text.contains("only in B: model.norm.weight"), "{text}");
    assert!(text.contains("1 only in A, 1 only in B"), "{text}");

    // other_vocab has 3 extra vocabulary rows: its embeddings and lm_head differ in shape.
    let vocab = golden().join("models/other_vocab");
    let o = mergestream(tmp.path(), &["diff", &base(), vocab.to_str().unwrap()]);
    assert_differs(&o);
    let text = stdout(&o);
    assert!(
        text.contains("shape differs: lm_head.weight: A F16 [320, 32], B F16 [323, 32]"),
        "{text}"
    );
}

#[test]
fn json_report_has_every_field() {
    let tmp = tempfile::tempdir().unwrap();
    let changed = tmp.path().join("changed");
    one_ulp_off(&changed, CHANGED);
    let o = mergestream(
        tmp.path(),
        &["diff", changed.to_str().unwrap(), &base(), "--json"],
    );
    assert_eq!(o.status.code(), Some(1));
    let v = json(&o);
    assert_eq!(v["summary"]["verdict"], "different");
    assert_eq!(v["summary"]["differing"], 1);
    assert_eq!(v["summary"]["compared"], 75);
    assert_eq!(v["summary"]["max_ulp"], 1);
    assert!(v["only_in_a"].as_array().unwrap().is_empty());
    assert!(v["only_in_b"].as_array().unwrap().is_empty());
    assert!(v["mismatched"].as_array().unwrap().is_empty());
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 75);
    let t = tensors.iter().find(|t| t["name"] == CHANGED).unwrap();
    assert_eq!(t["status"], "differs");
    assert_eq!(t["dtype"], "F16");
    assert_eq!(t["shape"], serde_json::json!([32, 88]));
    assert_eq!(t["differing"], 1);
    assert_eq!(t["max_ulp"], 1);
    let max_abs = t["max_abs"].as_f64().unwrap();
    assert!(max_abs > 0.0 && max_abs < 1e-3, "{max_abs}");
    let rel = t["rel_l2"].as_f64().unwrap();
    assert!(rel > 0.0 && rel < 1e-3, "{rel}");
    assert!(t["cosine"].as_f64().unwrap() > 0.999_999);
    let same = tensors
        .iter()
        .find(|t| t["name"] == "lm_head.weight")
        .unwrap();
    assert_eq!(same["status"], "identical");
    assert_eq!(same["rel_l2"], 0.0);
    assert_eq!(same["cosine"], 1.0);
}

#[test]
fn plots_are_valid_png_and_svg() {
    let tmp = tempfile::tempdir().unwrap();
    let other = golden().join("models/other");
    let png = tmp.path().join("d.png");
    let svg = tmp.path().join("d.svg");
    for p in [&png, &svg] {
        let o = mergestream(
            tmp.path(),
            &[
                "diff",
                &base(),
                other.to_str().unwrap(),
                "-q",
                "--plot",
                p.to_str().unwrap(),
            ],
        );
        assert_differs(&o);
    }
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&bytes[12..16], b"IHDR");
    let (w, h) = (
        u32::from_be_bytes(bytes[16..20].try_into().unwrap()),
        u32::from_be_bytes(bytes[20..24].try_into().unwrap()),
    );
    assert!(w >= 600 && h >= 300, "{w}x{h}");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.trim_start().starts_with("<svg"), "{}", &text[..100]);
    let texts: Vec<&str> = text
        .split("<text")
        .skip(1)
        .filter_map(|t| {
            t.split_once('>')
                .and_then(|(_, rest)| rest.split_once("</text>"))
        })
        .map(|(inner, _)| inner.trim())
        .collect();
    for label in ["q", "down", "post_norm", "lm_head", "identical", "layer"] {
        assert!(
            texts.contains(&label),
            "{label} missing from the SVG: {texts:?}"
        );
    }
    // Identical models still draw (every cell grey), and plots of other names are refused
    // before anything is read.
    let o = mergestream(
        tmp.path(),
        &["diff", &base(), &base(), "--plot", png.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = mergestream(tmp.path(), &["diff", &base(), &base(), "--plot", "d.jpg"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).starts_with("error: --plot d.jpg"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_inputs_give_one_error_line() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let o = mergestream(tmp.path(), &["diff", &base(), missing.to_str().unwrap()]);
    assert_clean_failure(&o, &tmp.path().join("none"), &["missing", "cannot open"]);
    assert!(stdout(&o).is_empty());
    // A shard cut short after its header was read: the error names the file and a tensor.
    let cut = tmp.path().join("cut");
    std::fs::create_dir(&cut).unwrap();
    for f in std::fs::read_dir(golden().join("models/base")).unwrap() {
        let p = f.unwrap().path();
        std::fs::copy(&p, cut.join(p.file_name().unwrap())).unwrap();
    }
    let shard = cut.join("model-00002-of-00003.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap();
    f.set_len(len - 100).unwrap();
    let o = mergestream(tmp.path(), &["diff", cut.to_str().unwrap(), &base()]);
    assert_clean_failure(&o, &tmp.path().join("none"), &["model-00002-of-00003"]);
    assert!(stdout(&o).is_empty());
    // Not a checkpoint at all.
    let junk = model_dir(
        tmp.path(),
        "junk",
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}",
    );
    let o = mergestream(tmp.path(), &["diff", junk.to_str().unwrap(), &base()]);
    assert_clean_failure(&o, &tmp.path().join("none"), &["model.safetensors"]);
}

#[test]
fn memory_stays_within_the_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let other = golden().join("models/other");
    let o = mergestream(
        tmp.path(),
        &[
            "diff",
            &base(),
            other.to_str().unwrap(),
            "--json",
            "--memory-limit",
            "48KiB",
            "--threads",
            "3",
            "--io",
            "read",
        ],
    );
    let v = json(&o);
    let peak = v["summary"]["peak_memory"].as_u64().unwrap();
    // The largest chunk pair (embeddings of both: 2 × 20 KiB) fits, and never more.
    assert!(peak > 0 && peak <= 48 << 10, "{peak}");
    assert_eq!(v["summary"]["bytes_read"], 2 * 121376 * 2);
}

#[test]
fn inspect_json_lists_every_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let o = ok(tmp.path(), &["inspect", &base(), "--json"]);
    let v = json(&o);
    assert_eq!(v["totals"]["tensors"], 75);
    assert_eq!(v["totals"]["files"], 3);
    assert_eq!(v["valid"], true);
    let tensors = v["tensors"].as_array().unwrap();
    let t = tensors
        .iter()
        .find(|t| t["name"] == "lm_head.weight")
        .unwrap();
    assert_eq!(t["dtype"], "F16");
    assert_eq!(t["shape"], serde_json::json!([320, 32]));
    assert_eq!(t["bytes"], 320 * 32 * 2);
    assert!(t["file"].as_str().unwrap().ends_with(".safetensors"));
    assert!(t["offset"].as_u64().is_some());
}

#[test]
fn dry_run_json_is_the_plan_as_data() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let other = golden().join("models/other");
    let base = base();
    let runs: [Vec<&str>; 2] = [
        vec![
            "convert",
            &base,
            out.to_str().unwrap(),
            "--dry-run",
            "--json",
        ],
        vec![
            "blockmerge",
            "--model_path1",
            &base,
            "--model_path2",
            other.to_str().unwrap(),
            "--output_model_path",
            out.to_str().unwrap(),
            "--gradient_values",
            "[0.9,0.0]",
            "--dry-run",
            "--json",
        ],
    ];
    let mut recipes = BTreeMap::new();
    for args in runs {
        let o = ok(tmp.path(), &args);
        let v = json(&o);
        assert!(!out.exists());
        assert_eq!(v["totals"]["tensors"], 75);
        assert_eq!(v["tensors"].as_array().unwrap().len(), 75);
        assert!(v["peak_memory_estimate"].as_u64().unwrap() > 0);
        assert!(v["memory_limit"].as_u64().unwrap() > 0);
        assert!(!v["inputs"].as_array().unwrap().is_empty());
        let shards = v["shards"].as_array().unwrap();
        let total: u64 = shards.iter().map(|s| s["bytes"].as_u64().unwrap()).sum();
        assert_eq!(v["totals"]["bytes"], total);
        let t = &v["tensors"][0];
        for field in [
            "name", "dtype", "shape", "shard", "offset", "bytes", "recipe",
        ] {
            assert!(!t[field].is_null(), "{field} missing: {t}");
        }
        recipes.insert(args[0], t["recipe"].as_str().unwrap().to_string());
    }
    assert!(
        recipes["blockmerge"].starts_with("blend fp16"),
        "{recipes:?}"
    );
    // --json belongs to the dry run.
    let o = mergestream(
        tmp.path(),
        &["convert", &base, out.to_str().unwrap(), "--json"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn completions_and_man_page_generate() {
    let tmp = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let o = ok(tmp.path(), &["completions", shell]);
        let text = stdout(&o);
        for sub in ["blockmerge", "merge", "diff", "inspect"] {
            assert!(text.contains(sub), "{shell}: {sub} missing");
        }
    }
    let o = ok(tmp.path(), &["man"]);
    let text = stdout(&o);
    assert!(
        text.starts_with(".ie") || text.contains(".TH mergestream"),
        "{text}"
    );
    for sub in ["blockmerge", "convert", "diff", "completions"] {
        assert!(text.contains(sub), "{sub} missing from the man page");
    }
    let o = mergestream(tmp.path(), &["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn hub_references_diff_like_local_folders() {
    let server = crate::hub_server::HubServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        common::command()
            .env_remove("HF_HUB_OFFLINE")
            .env("HF_ENDPOINT", server.endpoint())
            .env("HF_TOKEN", crate::hub_server::TOKEN)
            .current_dir(tmp.path())
            .args(args)
            .output()
            .unwrap()
    };
    // golden/gated is a copy of base behind the token; golden/base_bin its pickle.
    let o = run(&["diff", "golden/gated", &base(), "-q"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let o = run(&["diff", "golden/base_bin", "golden/other", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["summary"]["differing"], 75);
    assert_eq!(v["a"], "golden/base_bin");
    // A repo that does not exist: one error line naming it.
    let o = run(&["diff", "golden/nope", &base()]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(stderr(&o).starts_with("error: ") && stderr(&o).contains("golden/nope"));
    assert!(stdout(&o).is_empty());
}
