//! The tokenizer module against mergekit 0.1.5 on golden2's `tk_*` cases: the output
//! vocabulary, added tokens and padded vocab size against the expected output folders, and
//! the permutations and every aligned embedding row against what mergekit's own
//! `build_tokenizer` and `PermutedVocabulary` compute
//! (fixtures/golden2-tokenizers/make_fixture.py writes mergekit_tokenizers.json).

use crate::common;

use std::path::{Path, PathBuf};

use serde_json::Value;

use mergestream::source::LocalSource;
use mergestream::tokenizer::{
    DefaultRow, ModelTokenizer, RowSource, Slot, Tokenizer, TokenizerSpec, build_tokenizer,
    embedding_plan,
};

fn fixture() -> Value {
    let p = common::fixtures().join("golden2-tokenizers/mergekit_tokenizers.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

struct Case {
    models: Vec<ModelTokenizer>,
    base: usize,
    config_base: Option<usize>,
    spec: TokenizerSpec,
}

/// A golden2 case: its config and models, referenced base_model first, then config order.
fn case(name: &str) -> Case {
    // golden2's cases, or the synthetic ones beside the fixture (paths relative to each).
    let (g2, yml) = if name.starts_with("tk_") {
        (common::golden2(), format!("mergekit/{name}.yml"))
    } else {
        (
            common::fixtures().join("golden2-tokenizers"),
            format!("configs/{name}.yml"),
        )
    };
    let text = std::fs::read_to_string(g2.join(yml)).unwrap();
    let cfg: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let base_model = cfg
        .get("base_model")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let mut names: Vec<String> = base_model.iter().cloned().collect();
    for m in cfg["models"].as_sequence().unwrap() {
        let n = m["model"].as_str().unwrap().to_string();
        if !names.contains(&n) {
            names.push(n);
        }
    }
    let models = names
        .iter()
        .map(|n| {
            let dir: PathBuf = g2.join(n);
            let config = json(&dir.join("config.json"));
            ModelTokenizer {
                name: n.clone(),
                tokenizer: Tokenizer::load(&LocalSource::new(&dir)).unwrap(),
                config_vocab_size: config["vocab_size"].as_u64().map(|v| v as usize),
            }
        })
        .collect();
    let spec = TokenizerSpec::from_config(
        cfg.get("tokenizer_source").and_then(|v| v.as_str()),
        cfg.get("tokenizer"),
    )
    .unwrap()
    .unwrap();
    Case {
        models,
        base: 0,
        config_base: base_model.map(|_| 0),
        spec,
    }
}

const CASES: &[&str] = &[
    "tk_union_linear",
    "tk_union_slerp",
    "tk_union_ties",
    "tk_union_pad64_input",
    "tk_source_base",
    "tk_source_model",
    "tk_block_tokens",
    "tk_block_base_pad32",
];

/// Synthetic cases (fixtures/golden2-tokenizers/configs): regular tokens the base lacks, a
/// base stripped to its config vocab_size, a model without tokenizer files, an added token
/// that is a regular token in another model, `tokens:` with force/model_token on existing
/// tokens. No expected output folder: compared with mergekit's own functions only.
const SYNTHETIC: &[&str] = &["syn_union_strip", "syn_base_strip", "syn_union_nobase"];

fn all_cases() -> impl Iterator<Item = &'static str> {
    CASES.iter().chain(SYNTHETIC).copied()
}

#[test]
fn vocabulary_and_files_match_mergekit() {
    let fx = fixture();
    for name in all_cases() {
        let c = case(name);
        let want = &fx[name];
        let names: Vec<&str> = c.models.iter().map(|m| m.name.as_str()).collect();
        let want_names: Vec<&str> = strs(&want["models"]);
        assert_eq!(names, want_names, "{name}: referenced order");
        let info = build_tokenizer(&c.models, c.base, &c.spec).unwrap();

        assert_eq!(info.tokens, strs(&want["tokens"]), "{name}: tokens by id");
        assert_eq!(
            info.vocab_size as u64,
            want["vocab_size"].as_u64().unwrap(),
            "{name}"
        );
        for (m, p) in info.permutations.iter().enumerate() {
            let want_p: Vec<Option<u32>> = want["permutations"][m]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| u32::try_from(v.as_i64().unwrap()).ok())
                .collect();
            assert_eq!(p, &want_p, "{name}: permutation of model {m}");
        }
        let files = info.tokenizer.output_files();
        let ours: Value = serde_json::from_slice(&files[0].1).unwrap();
        assert_eq!(
            ours["added_tokens"], want["added_tokens"],
            "{name}: added tokens"
        );
        // For make_fixture.py --check: encode with transformers from the files we write.
        if let Some(dir) = std::env::var_os("MERGESTREAM_WRITE_TOKENIZERS") {
            let dir = Path::new(&dir).join(name);
            std::fs::create_dir_all(&dir).unwrap();
            for (file, bytes) in &files {
                std::fs::write(dir.join(file), bytes).unwrap();
            }
        }
        if !name.starts_with("tk_") {
            continue;
        }

        // The output folder mergekit wrote: config vocab_size, and our tokenizer.json equals
        // its in every field that affects encoding.
        let expected = common::golden2().join("expected").join(name);
        let cfg = json(&expected.join("config.json"));
        assert_eq!(
            Some(info.vocab_size as u64),
            cfg["vocab_size"].as_u64(),
            "{name}: vocab_size"
        );
        let theirs = json(&expected.join("tokenizer.json"));
        for field in [
            "added_tokens",
            "normalizer",
            "pre_tokenizer",
            "post_processor",
            "decoder",
            "model",
            "truncation",
            "padding",
        ] {
            assert_eq!(
                ours[field], theirs[field],
                "{name}: tokenizer.json field {field}"
            );
        }
        // The sample text manifest.json recorded encodes as mergekit's tokenizer does.
        let sample = &json(&common::golden2().join("manifest.json"))["expected"][name]["sanity"]["tokenizer_sample"];
        let text = sample["text"].as_str().unwrap();
        assert_eq!(
            want["encodings"][text], sample["ids"],
            "{name}: fixture vs manifest"
        );
        // tokenizer_config.json: the source's, which is what transformers writes back (less
        // its loader's own is_local/local_files_only).
        let (n, bytes) = &files[1];
        assert_eq!(n, "tokenizer_config.json");
        let mut theirs = json(&expected.join("tokenizer_config.json"));
        let obj = theirs.as_object_mut().unwrap();
        obj.remove("is_local");
        obj.remove("local_files_only");
        let ours: Value = serde_json::from_slice(bytes).unwrap();
        assert_eq!(ours, theirs, "{name}: tokenizer_config.json");
    }
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

/// Decode a plan's row into mergekit's sparse form: [(model, row, coefficient)].
fn decode(
    plan: &mergestream::tokenizer::EmbeddingPlan,
    slot: usize,
    row: usize,
) -> Vec<(usize, u32, f64)> {
    let mut v = match plan.source(slot, row) {
        RowSource::Row(r) => vec![(slot, r, 1.0)],
        RowSource::Default(k) => match &plan.defaults[k] {
            DefaultRow::Copy { slot, row } => vec![(*slot, *row, 1.0)],
            DefaultRow::Average(list) => list
                .iter()
                .map(|&(s, r)| (s, r, 1.0 / list.len() as f64))
                .collect(),
            DefaultRow::Zero => vec![],
        },
        RowSource::Missing => vec![],
        RowSource::Pad => panic!("pad row below the token count"),
    };
    v.sort_by_key(|a| (a.0, a.1));
    v
}

#[test]
fn embedding_rows_match_mergekit() {
    let fx = fixture();
    for name in all_cases() {
        let c = case(name);
        let want = &fx[name];
        let info = build_tokenizer(&c.models, c.base, &c.spec).unwrap();
        let slots: Vec<Slot> = c
            .models
            .iter()
            .enumerate()
            .map(|(m, model)| Slot {
                model: m,
                rows: model.config_vocab_size.unwrap(),
            })
            .collect();
        let plan = embedding_plan(&info, &c.spec, &slots, c.config_base).unwrap();
        assert_eq!(plan.vocab_size as u64, want["vocab_size"].as_u64().unwrap());
        for s in 0..slots.len() {
            for row in 0..info.tokens.len() {
                let want_row: Vec<(usize, u32, f64)> = want["aligned_rows"][s][row]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| {
                        (
                            e[0].as_u64().unwrap() as usize,
                            e[1].as_u64().unwrap() as u32,
                            e[2].as_f64().unwrap(),
                        )
                    })
                    .collect();
                assert_eq!(
                    decode(&plan, s, row),
                    want_row,
                    "{name}: model {s} row {row} ({:?})",
                    info.tokens[row]
                );
            }
            for row in info.tokens.len()..plan.vocab_size {
                assert_eq!(plan.source(s, row), RowSource::Pad);
            }
            assert!(want["pad_rows_are_mean"][s].as_bool().unwrap());
        }
    }
}

/// The block of tk_block_tokens with one entry replaced.
fn block_with(entry: &str) -> TokenizerSpec {
    let y: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&format!("source: union\ntokens:\n{entry}")).unwrap();
    TokenizerSpec::from_config(None, Some(&y)).unwrap().unwrap()
}

fn plan_error(spec: &TokenizerSpec) -> String {
    let c = case("tk_block_tokens");
    let info = build_tokenizer(&c.models, c.base, spec).unwrap();
    let slots: Vec<Slot> = (0..c.models.len())
        .map(|m| Slot {
            model: m,
            rows: c.models[m].config_vocab_size.unwrap(),
        })
        .collect();
    embedding_plan(&info, spec, &slots, None)
        .unwrap_err()
        .to_string()
}

#[test]
fn token_errors_name_the_token_and_model() {
    let e = plan_error(&block_with("  <nobody>: {}\n"));
    assert!(e.contains("<nobody>") && e.contains("no `source`"), "{e}");
    let e = plan_error(&block_with("  <nobody>:\n    source: ./models/tk_tool\n"));
    assert!(
        e.contains("<nobody>") && e.contains("./models/tk_tool"),
        "{e}"
    );
    let e = plan_error(&block_with(
        "  <x>:\n    source:\n      kind: model_token\n      model: ./models/elsewhere\n      token: a\n",
    ));
    assert!(
        e.contains("<x>")
            && e.contains("./models/elsewhere")
            && e.contains("not one of the models"),
        "{e}"
    );
    let e = plan_error(&block_with(
        "  <x>:\n    source:\n      kind: model_token\n      model: ./models/tk_base\n      token: <|im_start|>\n",
    ));
    assert!(
        e.contains("<x>") && e.contains("has no token \"<|im_start|>\""),
        "{e}"
    );
    let e = plan_error(&block_with(
        "  <x>:\n    source:\n      kind: model_token\n      model: ./models/tk_base\n      token_id: 320\n",
    ));
    assert!(e.contains("<x>") && e.contains("out of range"), "{e}");
    let e = plan_error(&block_with(
        "  <x>:\n    source:\n      kind: model_token\n      model: ./models/tk_base\n      token_id: -1\n",
    ));
    assert!(e.contains("out of range"), "{e}");
    // A tokenizer source that is not in the merge.
    let c = case("tk_union_linear");
    let spec = TokenizerSpec::from_config(Some("./models/nowhere"), None)
        .unwrap()
        .unwrap();
    let e = build_tokenizer(&c.models, 0, &spec)
        .unwrap_err()
        .to_string();
    assert!(e.contains("./models/nowhere"), "{e}");
}

#[test]
fn sentencepiece_only_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("tokenizer.model"), b"\x0a\x00").unwrap();
    let e = Tokenizer::load(&LocalSource::new(tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.model") && e.contains("cannot read SentencePiece-only tokenizers"),
        "{e}"
    );
    // No tokenizer files at all: none (mergekit assumes the base's).
    std::fs::remove_file(tmp.path().join("tokenizer.model")).unwrap();
    assert!(
        Tokenizer::load(&LocalSource::new(tmp.path()))
            .unwrap()
            .is_none()
    );
    // A broken tokenizer.json names the file.
    std::fs::write(tmp.path().join("tokenizer.json"), b"{\"model\": 3}").unwrap();
    let e = Tokenizer::load(&LocalSource::new(tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("tokenizer.json") && e.contains("model"), "{e}");
}
