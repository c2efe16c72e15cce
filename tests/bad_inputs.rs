//! Every bad input of DESIGN §7 this release covers: exit status 1, one line
//! `error: <file>: <tensor>: <what is wrong>`, no panic, nothing under the output name.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

/// blockmerge of the golden base with `model2`, into `<tmp>/out`.
fn merge_with(tmp: &Path, model2: &Path) -> (Output, PathBuf) {
    let out = tmp.join("out");
    let o = blockmerge(
        &golden(),
        "models/base",
        model2.to_str().unwrap(),
        &out,
        "[0.5]",
        &["--quiet"],
    );
    (o, out)
}

/// A bad model2 file: the error names it and says what is wrong.
fn bad_file(bytes: &[u8], needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let dir = model_dir(tmp.path(), "bad", bytes);
    let (o, out) = merge_with(&work, &dir);
    let file = dir.join("model.safetensors");
    let mut all = vec![file.to_str().unwrap()];
    all.extend_from_slice(needles);
    assert_clean_failure(&o, &out, &all);
    // inspect reports the same problem.
    let o = mergestream(tmp.path(), &["inspect", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(needles[0]), "{}", stderr(&o));
}

const GOOD: &str = r#"{"a":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]}}"#;

#[test]
fn truncated_before_the_header_length() {
    for len in 0..8 {
        bad_file(&vec![1u8; len], &["too short for the 8-byte header length"]);
    }
}

#[test]
fn truncated_mid_header_and_mid_data() {
    let good = raw_safetensors(GOOD, 12);
    bad_file(
        &good[..8 + GOOD.len() / 2],
        &["runs past the end of the file"],
    );
    bad_file(
        &good[..good.len() - 3],
        &["b: ", "past the end of the data buffer"],
    );
}

#[test]
fn header_length_huge_past_the_file_max_and_overflowing() {
    let with_len = |n: u64| {
        let mut v = n.to_le_bytes().to_vec();
        v.extend_from_slice(b"{}");
        v
    };
    bad_file(&with_len(200_000_000), &["exceeds the limit"]);
    bad_file(&with_len(1000), &["runs past the end of the file"]);
    bad_file(&with_len(u64::MAX), &["exceeds the limit"]);
    bad_file(&with_len(u64::MAX - 3), &["exceeds the limit"]); // 8 + n overflows
}

#[test]
fn header_not_utf8_or_not_an_object() {
    let mut v = 4u64.to_le_bytes().to_vec();
    v.extend_from_slice(&[b'{', 0xff, 0xfe, b'}']);
    bad_file(&v, &["not valid UTF-8"]);
    bad_file(&raw_safetensors("[1, 2]", 0), &["not a JSON object"]);
    bad_file(&raw_safetensors("{\"a\": ", 0), &["not valid JSON"]);
}

#[test]
fn duplicate_names() {
    let json = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
    bad_file(&raw_safetensors(json, 1), &["a: ", "appears twice"]);
}

#[test]
fn metadata_values_not_strings() {
    let json =
        r#"{"__metadata__":{"format":1},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
    bad_file(
        &raw_safetensors(json, 1),
        &["__metadata__ must be an object whose values are strings"],
    );
}

#[test]
fn unknown_dtype() {
    let json = r#"{"w":{"dtype":"Q4_K","shape":[1],"data_offsets":[0,1]}}"#;
    bad_file(&raw_safetensors(json, 1), &["w: ", "unknown dtype `Q4_K`"]);
}

#[test]
fn negative_fractional_and_overflowing_shapes() {
    let json = r#"{"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#;
    bad_file(&raw_safetensors(json, 1), &["w: ", "-1 is negative"]);
    let json = r#"{"w":{"dtype":"U8","shape":[0.5],"data_offsets":[0,1]}}"#;
    bad_file(&raw_safetensors(json, 1), &["w: ", "0.5 is not an integer"]);
    let json = r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,1]}}"#;
    bad_file(&raw_safetensors(json, 1), &["w: ", "too large"]);
}

#[test]
fn offsets_reversed_gapped_overlapping_not_at_zero_beyond_trailing() {
    let one = |n: &str, b: u64, e: u64| {
        format!(
            "\"{n}\":{{\"dtype\":\"U8\",\"shape\":[{}],\"data_offsets\":[{b},{e}]}}",
            e.saturating_sub(b)
        )
    };
    let reversed = r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}}"#;
    bad_file(&raw_safetensors(reversed, 1), &["w: ", "reversed"]);
    let gap = format!("{{{},{}}}", one("a", 0, 1), one("b", 2, 3));
    bad_file(
        &raw_safetensors(&gap, 3),
        &["b: ", "gap in the data buffer"],
    );
    let overlap = format!("{{{},{}}}", one("a", 0, 2), one("b", 1, 3));
    bad_file(
        &raw_safetensors(&overlap, 3),
        &["b: ", "overlaps the previous tensor `a`"],
    );
    let late = format!("{{{}}}", one("a", 2, 3));
    bad_file(
        &raw_safetensors(&late, 3),
        &["a: ", "does not start at offset 0"],
    );
    let beyond = format!("{{{}}}", one("a", 0, 9));
    bad_file(
        &raw_safetensors(&beyond, 3),
        &["a: ", "past the end of the data buffer"],
    );
    let trailing = format!("{{{}}}", one("a", 0, 3));
    bad_file(&raw_safetensors(&trailing, 5), &["2 trailing bytes"]);
}

#[test]
fn shape_times_dtype_differs_from_byte_length() {
    let json = r#"{"w":{"dtype":"F16","shape":[3],"data_offsets":[0,4]}}"#;
    bad_file(
        &raw_safetensors(json, 4),
        &["w: ", "needs 6 bytes but data_offsets span 4"],
    );
}

/// A sharded copy of the golden base whose index is replaced by `index`.
fn sharded_with_index(parent: &Path, index: &str) -> PathBuf {
    let dir = parent.join("sharded");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(golden().join("models/base")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
    dir
}

fn bad_index(index: &str, needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let dir = sharded_with_index(tmp.path(), index);
    let (o, out) = merge_with(&work, &dir);
    let mut all = vec![];
    let idx = dir.join("model.safetensors.index.json");
    all.push(idx.to_str().unwrap());
    all.extend_from_slice(needles);
    assert_clean_failure(&o, &out, &all);
}

fn real_index() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(golden().join("models/base/model.safetensors.index.json"))
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn index_missing_weight_map() {
    bad_index(
        r#"{"metadata":{"total_size":1}}"#,
        &["index has no weight_map"],
    );
}

#[test]
fn index_naming_a_missing_shard() {
    let mut v = real_index();
    v["weight_map"]["lm_head.weight"] = "model-00009-of-00009.safetensors".into();
    bad_index(
        &v.to_string(),
        &["`model-00009-of-00009.safetensors`, which does not exist"],
    );
}

#[test]
fn index_escaping_the_folder() {
    for shard in ["../escape.safetensors", "/etc/passwd"] {
        let mut v = real_index();
        v["weight_map"]["lm_head.weight"] = shard.into();
        bad_index(&v.to_string(), &["leaves the model folder", shard]);
    }
}

#[test]
fn index_mapping_a_tensor_to_a_shard_that_lacks_it() {
    let mut v = real_index();
    v["weight_map"]["lm_head.weight"] = "model-00001-of-00003.safetensors".into();
    bad_index(&v.to_string(), &["lm_head.weight: ", "is in"]);
    let mut v = real_index();
    v["weight_map"]["no.such.tensor"] = "model-00001-of-00003.safetensors".into();
    bad_index(&v.to_string(), &["no.such.tensor: ", "does not contain it"]);
}

#[test]
fn a_tensor_in_two_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let dir = tmp.path().join("twice");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("a.safetensors"), f16_safetensors(&[("x", &[2])])).unwrap();
    std::fs::write(dir.join("b.safetensors"), f16_safetensors(&[("x", &[2])])).unwrap();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"weight_map":{"x":"a.safetensors","y":"b.safetensors"}}"#,
    )
    .unwrap();
    let (o, out) = merge_with(&work, &dir);
    assert_clean_failure(&o, &out, &["x: ", "stored in two shards"]);
    // Without an index, two files holding the same tensor are refused too.
    std::fs::remove_file(dir.join("model.safetensors.index.json")).unwrap();
    let (o, out) = merge_with(&work, &dir);
    assert_clean_failure(&o, &out, &["x: ", "stored in two files"]);
}

#[test]
fn models_with_different_tensor_sets_or_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let dir = model_dir(
        tmp.path(),
        "small",
        &f16_safetensors(&[("model.norm.weight", &[32])]),
    );
    let (o, out) = merge_with(&work, &dir);
    assert_clean_failure(&o, &out, &["model.embed_tokens.weight: ", "does not"]);

    // Same names, one shape differs (not a vocab tensor).
    let shapes = mergestream::Model::open(&golden().join("models/base")).unwrap();
    let tensors: Vec<(String, Vec<u64>)> = shapes
        .tensors()
        .iter()
        .map(|t| {
            let mut s = t.shape.clone();
            if t.name == "model.layers.3.mlp.up_proj.weight" {
                s[0] += 1;
            }
            (t.name.clone(), s)
        })
        .collect();
    let refs: Vec<(&str, &[u64])> = tensors
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    let dir = model_dir(tmp.path(), "shapes", &f16_safetensors(&refs));
    let (o, out) = merge_with(&work, &dir);
    assert_clean_failure(
        &o,
        &out,
        &["model.layers.3.mlp.up_proj.weight: ", "shape [88, 32] in"],
    );
}

#[test]
fn gradient_list_empty_or_not_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    for (g, msg) in [
        ("[]", "the gradient list is empty"),
        ("[0.5, abc]", "`abc` is not a number"),
    ] {
        let o = blockmerge(&golden(), "models/base", "models/other", &out, g, &[]);
        // A bad flag value is a usage error (exit 2), reported by the flag parser.
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(
            err.contains("'--gradient_values <") && err.contains(msg),
            "{err}"
        );
        assert!(!out.exists());
    }
}

/// A copy of the golden LoRA with its tensors or config changed.
fn edited_lora(
    parent: &Path,
    edit_tensors: impl Fn(&mut Vec<(String, Vec<u64>)>),
    config: Option<&str>,
) -> PathBuf {
    let dir = parent.join("lora");
    std::fs::create_dir_all(&dir).unwrap();
    let src =
        mergestream::Model::open(&golden().join("models/lora/adapter_model.safetensors")).unwrap();
    let mut tensors: Vec<(String, Vec<u64>)> = src
        .tensors()
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect();
    edit_tensors(&mut tensors);
    let refs: Vec<(&str, &[u64])> = tensors
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        f16_safetensors(&refs),
    )
    .unwrap();
    let cfg = config.map(str::to_string).unwrap_or_else(|| {
        std::fs::read_to_string(golden().join("models/lora/adapter_config.json")).unwrap()
    });
    std::fs::write(dir.join("adapter_config.json"), cfg).unwrap();
    dir
}

fn lora_fails(lora: &Path, out: &Path, needles: &[&str]) {
    let o = mergestream(
        &golden(),
        &[
            "lora",
            "--base",
            "models/other",
            "--lora",
            lora.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert_clean_failure(&o, out, needles);
}

const Q_A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const Q_B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

#[test]
fn lora_b_without_lora_a() {
    let tmp = tempfile::tempdir().unwrap();
    let lora = edited_lora(tmp.path(), |t| t.retain(|(n, _)| n != Q_A), None);
    lora_fails(
        &lora,
        &tmp.path().join("out"),
        &[
            "adapter_model.safetensors",
            Q_B,
            "lora_B without its lora_A",
        ],
    );
}

#[test]
fn lora_rank_not_matching_r() {
    let tmp = tempfile::tempdir().unwrap();
    let lora = edited_lora(
        tmp.path(),
        |t| {
            for (n, s) in t.iter_mut() {
                if n == Q_A {
                    s[0] = 4;
                } else if n == Q_B {
                    s[1] = 4;
                }
            }
        },
        None,
    );
    lora_fails(
        &lora,
        &tmp.path().join("out"),
        &[Q_A, "rank 4", "does not match r = 8"],
    );
}

#[test]
fn lora_key_without_base_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let lora = edited_lora(
        tmp.path(),
        |t| {
            t.push((
                "base_model.model.model.layers.99.self_attn.q_proj.lora_A.weight".into(),
                vec![8, 32],
            ));
            t.push((
                "base_model.model.model.layers.99.self_attn.q_proj.lora_B.weight".into(),
                vec![32, 8],
            ));
        },
        None,
    );
    lora_fails(
        &lora,
        &tmp.path().join("out"),
        &[
            "layers.99",
            "LoRA for `model.layers.99.self_attn.q_proj.weight`, which the base model does not have",
        ],
    );
}

#[test]
fn adapter_without_lora_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let lora = edited_lora(
        tmp.path(),
        |t| *t = vec![("base_model.model.model.norm.weight".into(), vec![32])],
        None,
    );
    lora_fails(
        &lora,
        &tmp.path().join("out"),
        &["adapter_model.safetensors", "no LoRA tensors"],
    );
}

#[test]
fn unsupported_lora_variants() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"layer_replication":[[0,4],[2,6]]}"#;
    let lora = edited_lora(tmp.path(), |_| {}, Some(cfg));
    lora_fails(
        &lora,
        &tmp.path().join("out"),
        &["adapter_config.json", "`layer_replication` is set"],
    );
    std::fs::write(
        lora.join("adapter_config.json"),
        r#"{"peft_type":"IA3","r":8}"#,
    )
    .unwrap();
    lora_fails(
        &lora,
        &tmp.path().join("out"),
        &["adapter_config.json", "only LORA adapters"],
    );
}

#[test]
fn output_existing_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let merge = |extra: &[&str]| {
        blockmerge(
            &golden(),
            "models/base",
            "models/other",
            &out,
            "[0.9,0.0]",
            extra,
        )
    };
    let o = merge(&["--layer_only", "--quiet"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o).lines().count(), 1);
    assert!(
        stderr(&o).contains("output already exists; pass --force"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    // --force replaces it.
    let o = merge(&["--layer_only", "--quiet", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!out.join("keep.txt").exists());
    assert_bit_exact(&out, &golden().join("expected/bm_layer_only"));
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "no backup left behind"
    );
}

#[test]
fn output_replacing_an_input_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    std::fs::create_dir(&m).unwrap();
    for e in std::fs::read_dir(golden().join("models/other")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, m.join(p.file_name().unwrap())).unwrap();
    }
    let o = blockmerge(
        &golden(),
        "models/base",
        m.to_str().unwrap(),
        &m,
        "[0.5]",
        &["--force"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("would replace one of the inputs"));
    assert!(m.join("model.safetensors.index.json").exists());
}

/// The golden base and other blended into `out`, as a command to run under a fault.
fn golden_blockmerge(out: &std::path::Path) -> std::process::Command {
    let mut cmd = command();
    cmd.current_dir(golden()).args([
        "blockmerge",
        "--model_path1",
        "models/base",
        "--model_path2",
        "models/other",
        "--output_model_path",
        out.to_str().unwrap(),
        "--gradient_values",
        "[0.9,0.0]",
        "--quiet",
    ]);
    cmd
}

#[test]
fn disk_full_while_writing() {
    // A file-size limit makes every write past 64 KiB fail as a full disk would (EFBIG
    // instead of ENOSPC; the same error path).
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut cmd = golden_blockmerge(&out);
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        // The limit alone: mergestream itself ignores SIGXFSZ, so the write fails with EFBIG.
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 64 * 1024,
                rlim_max: 64 * 1024,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    assert_clean_failure(&o, &out, &["model.safetensors", "File too large"]);
}

#[test]
fn threads_refused_by_the_system() {
    // RLIMIT_NPROC of 1: the process may not start a single thread. Root is exempt from the
    // limit, so a root test process drops to `nobody` in the child first.
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = tmp.path().join("out");
    let mut cmd = golden_blockmerge(&out);
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1,
                rlim_max: 1,
            };
            if libc::setrlimit(libc::RLIMIT_NPROC, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getuid() == 0 && (libc::setgid(65534) != 0 || libc::setuid(65534) != 0) {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    assert_clean_failure(&o, &out, &["cannot start a compute thread"]);
}

#[test]
fn a_json_file_given_as_a_model() {
    let tmp = tempfile::tempdir().unwrap();
    // The index names its folder: that works.
    let idx = golden().join("models/base/model.safetensors.index.json");
    let o = mergestream(tmp.path(), &["inspect", idx.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    // config.json is not a checkpoint.
    let cfg = golden().join("models/base/config.json");
    let o = mergestream(tmp.path(), &["inspect", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("a JSON file is not a checkpoint"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn stray_safetensors_beside_the_model_are_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("model.safetensors"),
        f16_safetensors(&[("w", &[2])]),
    )
    .unwrap();
    std::fs::write(
        dir.join("consolidated.safetensors"),
        f16_safetensors(&[("other", &[2])]),
    )
    .unwrap();
    let o = ok(tmp.path(), &["inspect", dir.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("1 tensors"), "{text}");
}

#[test]
fn yaml_edition_bad_shard_size_names_the_config() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("ops.yml");
    std::fs::write(
        &cfg,
        "model_path1: models/base\nmodel_path2: models/other\nmax_shard_size: 2000XB\noperations:\n  - {operation: a, filter: mlp, gradient_values: [0.5]}\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let o = mergestream(
        &golden(),
        &[
            "blockmerge",
            "--config",
            cfg.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert_clean_failure(
        &o,
        &out,
        &["ops.yml", "max_shard_size", "unknown unit `XB`"],
    );
}

#[test]
fn sub_byte_tensors_are_copied_whole() {
    // F4 rows need not end on a byte boundary: [4, 5] is 10 bytes, [64] is 32.
    let tmp = tempfile::tempdir().unwrap();
    let json = r#"{"a":{"dtype":"F4","shape":[4,5],"data_offsets":[0,10]},"b":{"dtype":"F4","shape":[64],"data_offsets":[10,42]}}"#;
    let mut file = raw_safetensors(json, 0);
    file.extend((0u8..42).map(|i| i.wrapping_mul(37)));
    let dir = model_dir(tmp.path(), "f4", &file);
    let out = tmp.path().join("out");
    ok(
        tmp.path(),
        &[
            "convert",
            dir.to_str().unwrap(),
            out.to_str().unwrap(),
            "--quiet",
        ],
    );
    let got = load_dir(&out);
    let data: Vec<u8> = (0u8..42).map(|i| i.wrapping_mul(37)).collect();
    assert_eq!(got["a"].bytes, data[..10]);
    assert_eq!(got["b"].bytes, data[10..]);
}
