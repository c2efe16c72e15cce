//! Model cards: every command that writes a model writes a README.md whose front matter the
//! Hub parses (base_model, base_model_relation, tags, library_name), with the command or
//! config that reproduces it; `--no-write-model-card` writes none; and the card changes no
//! other file, so whatever loads the folder (transformers) loads it as before.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::common;

use common::*;

/// The card's front matter, parsed as YAML, and its body.
fn card(out: &Path) -> (Value, String) {
    let text = std::fs::read_to_string(out.join("README.md")).unwrap();
    let rest = text.strip_prefix("---\n").expect("front matter first");
    let (yaml, body) = rest.split_once("\n---\n").expect("front matter closed");
    let meta: Value = serde_yaml_ng::from_str(yaml).expect("front matter is YAML");
    assert!(meta.is_object(), "{yaml}");
    (meta, body.to_string())
}

/// Copy a golden model into `root` in the HF cache layout, as `org/name` would be cached,
/// and return its snapshot folder: a local path the card names by its repo id.
fn cached(root: &Path, model: &str) -> PathBuf {
    let snap = root
        .join(format!("models--org--{model}"))
        .join("snapshots/0123456789abcdef0123456789abcdef01234567");
    std::fs::create_dir_all(&snap).unwrap();
    for e in std::fs::read_dir(golden().join("models").join(model)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, snap.join(p.file_name().unwrap())).unwrap();
    }
    snap
}

const GRADIENT: &str = "[0.9,0.72,0.54,0.36,0.18,0.0,0.0,0.0,0.0]";

/// The README's founding merge, with `extra` flags, written to `dir/out`.
fn readme_merge(dir: &Path, extra: &[&str]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let out = dir.join("out");
    let (base, other, lora) = (
        "models/base".to_string(),
        "models/other".to_string(),
        "models/lora".to_string(),
    );
    let mut args = vec![
        "blockmerge",
        "--model_path1",
        &base,
        "--model_path2",
        &other,
        "--lora2",
        &lora,
        "--lora2-weight",
        "0.25",
        "--gradient_values",
        GRADIENT,
        "--layer_only",
        "--output_model_path",
        out.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    ok(&golden(), &args);
    out
}

fn without(mut files: BTreeMap<String, Vec<u8>>, names: &[&str]) -> BTreeMap<String, Vec<u8>> {
    for n in names {
        files.remove(*n);
    }
    files
}

#[test]
fn blockmerge_card_has_the_schedule_and_the_command() {
    let tmp = tempfile::tempdir().unwrap();
    let out = readme_merge(tmp.path(), &[]);
    let (meta, body) = card(&out);
    // Local inputs are not Hub ids: the Hub refuses a base_model it cannot resolve.
    assert_eq!(
        meta,
        json!({"library_name": "transformers", "tags": ["merge", "mergestream"]})
    );
    assert!(body.starts_with("# out\n"), "{body}");
    for want in [
        "`models/base`",
        "`models/other`",
        "LoRA `models/lora` at weight 0.25",
        "`[0.9, 0.72, 0.54, 0.36, 0.18, 0, 0, 0, 0]`",
        "contain `layer`",
        "| layer 0 | 0.72 – 0.9 |",
        "| layer 5 | 0 |",
        &format!(
            "```sh\nmergestream blockmerge --model_path1 models/base --model_path2 models/other --lora2 models/lora --lora2-weight 0.25 --gradient_values '{GRADIENT}' --layer_only --output_model_path {} --quiet\n```",
            out.display()
        ),
        &format!("mergestream {}", env!("CARGO_PKG_VERSION")),
    ] {
        assert!(body.contains(want), "`{want}` missing from:\n{body}");
    }
}

#[test]
fn no_write_model_card_writes_none_and_the_card_changes_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let with = readme_merge(&tmp.path().join("a"), &[]);
    let without_card = readme_merge(&tmp.path().join("b"), &["--no-write-model-card"]);
    assert!(with.join("README.md").exists());
    assert!(!without_card.join("README.md").exists());
    // config.json and the weights transformers loads are byte for byte the same.
    assert_eq!(
        without(folder(&with), &["README.md"]),
        folder(&without_card)
    );
    // The last of the two spellings wins, as mergekit-yaml's click options do.
    let again = readme_merge(
        &tmp.path().join("c"),
        &["--no-write-model-card", "--write-model-card"],
    );
    assert!(again.join("README.md").exists());
}

#[test]
fn hub_inputs_are_the_base_models() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    let (base, other, lora) = (
        cached(&hub, "base"),
        cached(&hub, "other"),
        cached(&hub, "lora"),
    );
    let s = |p: &Path| p.to_str().unwrap().to_string();

    let bm = tmp.path().join("bm");
    ok(
        tmp.path(),
        &[
            "blockmerge",
            "--model_path1",
            &s(&base),
            "--model_path2",
            &s(&other),
            "--lora2",
            &s(&lora),
            "--gradient_values",
            "[0.5]",
            "-o",
            &s(&bm),
            "--quiet",
        ],
    );
    let (meta, _) = card(&bm);
    assert_eq!(
        meta,
        json!({
            "base_model": ["org/base", "org/other", "org/lora"],
            "base_model_relation": "merge",
            "library_name": "transformers",
            "tags": ["merge", "mergestream"],
        })
    );

    let lo = tmp.path().join("lo");
    ok(
        tmp.path(),
        &[
            "lora",
            "--base",
            &s(&base),
            "--lora",
            &s(&lora),
            "--weight",
            "0.5",
            "-o",
            &s(&lo),
            "--quiet",
        ],
    );
    let (meta, body) = card(&lo);
    assert_eq!(
        meta,
        json!({
            "base_model": ["org/base", "org/lora"],
            // The output is the fine-tuned model saved whole, not a PEFT adapter.
            "base_model_relation": "finetune",
            "library_name": "transformers",
            "tags": ["merge", "mergestream", "lora"],
        })
    );
    assert!(body.contains("rank 8, lora_alpha 16"), "{body}");
    assert!(body.contains("weight 0.5"), "{body}");
    assert!(body.contains("```sh\nmergestream lora --base "), "{body}");

    let cv = tmp.path().join("cv");
    ok(
        tmp.path(),
        &["convert", &s(&base), &s(&cv), "--dtype", "bfloat16", "-q"],
    );
    let (meta, body) = card(&cv);
    // The same model re-saved: no relation claimed.
    assert_eq!(
        meta,
        json!({
            "base_model": ["org/base"],
            "library_name": "transformers",
            "tags": ["mergestream"],
        })
    );
    assert!(body.contains("rounded to bfloat16"), "{body}");

    let config = tmp.path().join("linear.yml");
    std::fs::write(
        &config,
        format!(
            "models:\n  - model: {}\n    parameters: {{weight: 0.3}}\n  - model: {}+{}\n    parameters: {{weight: 0.7}}\nmerge_method: linear\ndtype: float16\n",
            s(&base),
            s(&other),
            s(&lora)
        ),
    )
    .unwrap();
    let mk = tmp.path().join("mk");
    ok(tmp.path(), &["merge", &s(&config), &s(&mk), "--quiet"]);
    let (meta, body) = card(&mk);
    assert_eq!(
        meta,
        json!({
            "base_model": ["org/base", "org/other", "org/lora"],
            "base_model_relation": "merge",
            "library_name": "transformers",
            "tags": ["mergekit", "merge", "mergestream"],
        })
    );
    let text = std::fs::read_to_string(&config).unwrap();
    assert_eq!(
        std::fs::read_to_string(mk.join("mergekit_config.yml")).unwrap(),
        text
    );
    assert!(body.contains(&format!("```yaml\n{text}```")), "{body}");
    assert!(body.contains("`linear`"), "{body}");
}

#[test]
fn every_command_honours_no_write_model_card() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |dir: &str, args: &[&str]| -> (PathBuf, PathBuf) {
        let parent = tmp.path().join(dir);
        std::fs::create_dir_all(&parent).unwrap();
        let (a, b) = (parent.join("a"), parent.join("b"));
        for (out, extra) in [(&a, None), (&b, Some("--no-write-model-card"))] {
            let mut v: Vec<&str> = args.to_vec();
            v.push(out.to_str().unwrap());
            v.push("--quiet");
            v.extend(extra);
            ok(&golden(), &v);
        }
        (a, b)
    };
    let cases = [
        (
            "lora",
            run(
                "lora",
                &[
                    "lora",
                    "--base",
                    "models/base",
                    "--lora",
                    "models/lora",
                    "-o",
                ],
            ),
            vec!["README.md"],
        ),
        (
            "convert",
            run("convert", &["convert", "models/base_bin"]),
            vec!["README.md"],
        ),
        (
            "merge",
            run("merge", &["merge", "mergekit/mk_linear.yml"]),
            vec!["README.md", "mergekit_config.yml"],
        ),
    ];
    for (what, (with, without_card), extras) in cases {
        let (meta, _) = card(&with);
        assert_eq!(meta["library_name"], "transformers", "{what}");
        for e in &extras {
            assert!(with.join(e).exists(), "{what}: {e}");
            assert!(!without_card.join(e).exists(), "{what}: {e}");
        }
        assert_eq!(
            without(folder(&with), &extras),
            folder(&without_card),
            "{what}: the card changed another file"
        );
    }
}

#[test]
fn yaml_edition_card_lists_the_operations() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ops");
    let config = fixtures().join("bm_yaml_ops.yml");
    ok(
        &golden(),
        &[
            "blockmerge",
            "--config",
            config.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--quiet",
        ],
    );
    let (meta, body) = card(&out);
    assert_eq!(meta["tags"], json!(["merge", "mergestream"]));
    for want in [
        "1. `attn`: gradient `[0.75, 0.25]` over tensors whose names contain `self_attn`",
        "3. `rest`: gradient `[0.5]` over tensors whose names contain `layer` and `norm`",
        "Arithmetic: f32, rounded once to float16.",
        "The configuration (`bm_yaml_ops.yml`):\n\n```yaml\n# The golden bm_yaml_ops case",
        &format!("--config {} -o", config.display()),
    ] {
        assert!(body.contains(want), "`{want}` missing from:\n{body}");
    }
}
