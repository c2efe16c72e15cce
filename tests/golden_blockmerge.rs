//! BlockMerge_Gradient's golden outputs, reproduced bit for bit through the CLI with
//! Gryphe's own flag spellings.

use crate::common;

use common::*;

fn run_case(name: &str, extra: &[&str]) -> tempfile::TempDir {
    let case = manifest_case(name);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let gradient = case["gradient_values"].to_string();
    let mut args: Vec<String> = vec![
        "blockmerge".into(),
        "--model_path1".into(),
        case["model_path1"].as_str().unwrap().into(),
        "--model_path2".into(),
        case["model_path2"].as_str().unwrap().into(),
        "--output_model_path".into(),
        out.to_string_lossy().into_owned(),
        "--gradient_values".into(),
        gradient,
        "--max_shard_size".into(),
        "100KB".into(),
        "--quiet".into(),
    ];
    for f in case["flags"].as_array().unwrap() {
        args.push(f.as_str().unwrap().into());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&golden(), &argv);
    assert_bit_exact(&out, &golden().join("expected").join(name));
    check_output_folder(&out);
    tmp
}

#[test]
fn bm_layer_only() {
    run_case("bm_layer_only", &[]);
}

#[test]
fn bm_all() {
    run_case("bm_all", &[]);
}

#[test]
fn bm_no_layers() {
    run_case("bm_no_layers", &[]);
}

#[test]
fn bm_custom_filter() {
    run_case("bm_custom_filter", &[]);
}

#[test]
fn bm_three_sections_remainder() {
    run_case("bm_three_sections_remainder", &[]);
}

#[test]
fn bm_vocab_model2_larger() {
    run_case("bm_vocab_model2_larger", &[]);
}

#[test]
fn bm_vocab_model1_larger() {
    run_case("bm_vocab_model1_larger", &[]);
}

#[test]
fn single_thread_and_tiny_budget_give_the_same_bytes() {
    // Row chunking and scheduling must not change a single bit.
    run_case("bm_all", &["--threads", "1", "--memory-limit", "4KiB"]);
}

#[test]
fn direct_and_buffered_writes_give_the_same_bytes() {
    // 100KB shards: many tensor edges inside 4 KiB blocks, and shards ending mid-block.
    // Direct writes need a disk filesystem: the default temp folder is one here and in CI;
    // `--write direct` fails rather than falling back, so this cannot pass unexercised.
    for (write, threads) in [("direct", "3"), ("direct", "1"), ("buffered", "3")] {
        run_case(
            "bm_all",
            &[
                "--write",
                write,
                "--threads",
                threads,
                "--memory-limit",
                "16KiB",
            ],
        );
    }
}

#[test]
fn dash_spellings_and_read_io_are_equivalent() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    ok(
        &golden(),
        &[
            "blockmerge",
            "--model-path1",
            "models/base",
            "--model-path2",
            "models/other",
            "-o",
            out.to_str().unwrap(),
            "--gradient-values",
            "[0.9, 0.0]",
            "--layer-only",
            "--io",
            "read",
            "--quiet",
        ],
    );
    assert_bit_exact(&out, &golden().join("expected/bm_layer_only"));
    // Default shard size (2000MiB): one file, no index.
    assert!(out.join("model.safetensors").is_file());
    assert!(!out.join("model.safetensors.index.json").exists());
    check_output_folder(&out);
}

#[test]
fn output_folder_has_config_and_tokenizer_files() {
    let tmp = run_case("bm_layer_only", &[]);
    let out = tmp.path().join("out");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "float16");
    assert_eq!(cfg["num_hidden_layers"], 8);
    for f in [
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(golden().join("models/base").join(f)).unwrap(),
            "{f}"
        );
    }
    // No temporary folder is left beside the output.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("out")]);
}

#[test]
fn bm_yaml_ops() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let config = fixtures().join("bm_yaml_ops.yml");
    ok(
        &golden(),
        &[
            "blockmerge",
            "--config",
            config.to_str().unwrap(),
            "--output_model_path",
            out.to_str().unwrap(),
            "--quiet",
        ],
    );
    assert_bit_exact(&out, &golden().join("expected/bm_yaml_ops"));
    check_output_folder(&out);
}

#[test]
fn precise_mode_rounds_once() {
    // Independent reference: f16(f32(a)·f32(1−r) + f32(b)·f32(r)) with the schedule of
    // DESIGN §5.1 over the layer tensors in module order.
    use half::f16;
    use mergestream::plan::gradient::blockmerge_ratios;
    use mergestream::plan::order::sort_module_order;
    let tmp = run_case_precise();
    let got = load_dir(&tmp.path().join("out"));
    let a = load_dir(&golden().join("models/base"));
    let b = load_dir(&golden().join("models/other"));
    let mut keys: Vec<String> = a.keys().cloned().collect();
    sort_module_order(&mut keys);
    let layer_keys: Vec<&String> = keys.iter().filter(|k| k.contains("layer")).collect();
    let ratios = blockmerge_ratios(&[0.9, 0.0], layer_keys.len()).unwrap();
    let halves = |t: &Tensor| -> Vec<f32> {
        t.bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()
    };
    for (k, r) in layer_keys.iter().zip(ratios) {
        let (x, y) = (halves(&a[*k]), halves(&b[*k]));
        let want: Vec<u8> = x
            .iter()
            .zip(&y)
            .flat_map(|(&x, &y)| {
                let v = x * (1.0 - r) as f32 + y * r as f32;
                f16::from_f32(v).to_le_bytes()
            })
            .collect();
        assert_eq!(got[*k].bytes, want, "{k}");
    }
    assert_eq!(got["model.norm.weight"].bytes, a["model.norm.weight"].bytes);
    // And it is not the fp16 reproduction.
    let d = diff(&got, &load_dir(&golden().join("expected/bm_layer_only")));
    assert!(d.differing > 0);
}

fn run_case_precise() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    blockmerge_ok(
        &golden(),
        "models/base",
        "models/other",
        &out,
        "[0.9,0.0]",
        &["--layer_only", "--precise", "--quiet"],
    );
    tmp
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = blockmerge_ok(
        &golden(),
        "models/base",
        "models/other",
        &out,
        "[0.9,0.0]",
        &["--layer_only", "--dry-run"],
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("model.layers.0.self_attn.q_proj.weight"));
    assert!(text.contains("blend fp16 r=0.900000"));
    assert!(text.contains("copy in0"), "{text}");
    assert!(text.contains("peak memory estimate"));
    assert!(text.contains("output: 75 tensors"));
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn non_float_tensors_pass_through_and_cannot_be_blended() {
    // Integer buffers and fp8 weights are copied byte for byte when not selected, and
    // blending them is a clear error.
    let tmp = tempfile::tempdir().unwrap();
    let with_extras = |src: &str, dst: &str| {
        let mut t = load_dir(&golden().join(src));
        t.insert(
            "model.extra_ids".into(),
            Tensor {
                dtype: "I64".into(),
                shape: vec![3],
                bytes: (1u8..=24).collect(),
            },
        );
        t.insert(
            "model.layers.0.extra.fp8".into(),
            Tensor {
                dtype: "F8_E4M3".into(),
                shape: vec![5],
                bytes: vec![1, 2, 3, 4, 5],
            },
        );
        let dir = tmp.path().join(dst);
        write_model(&dir, &t);
        dir
    };
    let m1 = with_extras("models/base", "m1");
    let m2 = with_extras("models/other", "m2");
    let out = tmp.path().join("out");
    let merge = |filter: &[&str]| {
        let mut extra = vec!["--quiet"];
        extra.extend_from_slice(filter);
        let (m1, m2) = (m1.to_str().unwrap(), m2.to_str().unwrap());
        blockmerge(tmp.path(), m1, m2, &out, "[0.9, 0.0]", &extra)
    };
    let o = merge(&["--custom_filter", "self_attn"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = load_dir(&out);
    assert_eq!(
        got["model.extra_ids"].bytes,
        (1u8..=24).collect::<Vec<u8>>()
    );
    assert_eq!(got["model.extra_ids"].dtype, "I64");
    assert_eq!(got["model.layers.0.extra.fp8"].bytes, vec![1, 2, 3, 4, 5]);
    std::fs::remove_dir_all(&out).unwrap();
    let o = merge(&["--layer_only"]);
    assert_clean_failure(
        &o,
        &out,
        &[
            "model.layers.0.extra.fp8: ",
            "only float tensors can be blended",
        ],
    );
}

/// Pseudo-random finite f16 bits (|x| < 2), `n` of them, from `seed`.
fn f16_noise(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    (0..n)
        .flat_map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let bits = ((s >> 33) as u16) & 0xbfff; // exponent below 0x10 (|x| < 2)
            bits.to_le_bytes()
        })
        .collect()
}

/// Under `--io read` an elementwise chunk's plain operands are read a window at a time as
/// its tiles reach them (1 MiB spans), and a step's LoRA factors are read once per worker:
/// tensors of several windows, a second model with fewer embedding rows (the first's rows
/// are kept past them, so the second's windows run out before the chunk does, and whole
/// chunks lie past its rows) and a LoRA on the second give the same bytes as mapped reads,
/// at the default budget and with small chunks.
#[test]
fn read_io_windows_and_shared_lora_factors_give_the_mapped_bytes() {
    use std::collections::BTreeMap;
    let tmp = tempfile::tempdir().unwrap();
    let t = |rows: usize, cols: usize, seed: u64| Tensor {
        dtype: "F16".into(),
        shape: vec![rows, cols],
        bytes: f16_noise(rows * cols, seed),
    };
    let (embed, proj) = (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.k_proj.weight",
    );
    // a's embedding is 10 MB, cut into chunks at 1 MiB (4 MiB chunks); b's 2500 rows end
    // in the first, so its later chunks have none of b's rows (and b's file ends long
    // before where those rows would be).
    let a: BTreeMap<String, Tensor> = [
        (embed.into(), t(20000, 256, 1)),
        (proj.into(), t(2600, 256, 2)),
    ]
    .into();
    let b: BTreeMap<String, Tensor> = [
        (embed.into(), t(2500, 256, 3)),
        (proj.into(), t(2600, 256, 4)),
    ]
    .into();
    write_model(&tmp.path().join("a"), &a);
    write_model(&tmp.path().join("b"), &b);
    // A rank-8 LoRA on b's k_proj (factors as f32 noise, small).
    let lora = tmp.path().join("lora");
    std::fs::create_dir_all(&lora).unwrap();
    std::fs::copy(
        golden().join("models/lora/adapter_config.json"),
        lora.join("adapter_config.json"),
    )
    .unwrap();
    let f32_noise = |n: usize, seed: u64| -> Vec<u8> {
        let h = f16_noise(n, seed);
        h.chunks(2)
            .flat_map(|c| (half::f16::from_le_bytes([c[0], c[1]]).to_f32() / 16.0).to_le_bytes())
            .collect()
    };
    let key = "base_model.model.model.layers.0.self_attn.k_proj";
    let factors: BTreeMap<String, Tensor> = [
        (
            format!("{key}.lora_A.weight"),
            Tensor {
                dtype: "F32".into(),
                shape: vec![8, 256],
                bytes: f32_noise(8 * 256, 5),
            },
        ),
        (
            format!("{key}.lora_B.weight"),
            Tensor {
                dtype: "F32".into(),
                shape: vec![2600, 8],
                bytes: f32_noise(2600 * 8, 6),
            },
        ),
    ]
    .into();
    write_model(&lora, &factors);
    std::fs::rename(
        lora.join("model.safetensors"),
        lora.join("adapter_model.safetensors"),
    )
    .unwrap();
    std::fs::remove_file(lora.join("config.json")).unwrap();
    let run = |io: &str, limit: &str| {
        let out = tmp.path().join(format!("out-{io}-{limit}"));
        let (m1, m2) = (tmp.path().join("a"), tmp.path().join("b"));
        let extra = [
            "--lora2",
            lora.to_str().unwrap(),
            "--lora2-weight",
            "0.5",
            "--io",
            io,
            "--memory-limit",
            limit,
            "--quiet",
        ];
        blockmerge_ok(
            tmp.path(),
            m1.to_str().unwrap(),
            m2.to_str().unwrap(),
            &out,
            "[0.9, 0.3]",
            &extra,
        );
        load_dir(&out)
    };
    let mapped = run("mmap", "1GiB");
    assert_eq!(mapped[embed].shape, vec![20000, 256]);
    for (io, limit) in [("read", "1GiB"), ("read", "1MiB"), ("auto", "1MiB")] {
        let got = run(io, limit);
        for name in [embed, proj] {
            assert!(
                got[name] == mapped[name],
                "--io {io} at {limit}: {name} differs"
            );
        }
    }
}
