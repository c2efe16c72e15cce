//! PyTorch `.bin` checkpoints end to end: `convert`, `.bin` inputs and adapters in every
//! command, and the pickle/zip bad inputs of DESIGN §7 at the command line.

use crate::common;

use std::io::Write;
use std::path::Path;

use common::*;

fn convert(input: &str, out: &Path, extra: &[&str]) {
    let mut args = vec!["convert", input, out.to_str().unwrap(), "--quiet"];
    args.extend_from_slice(extra);
    ok(&golden(), &args);
}

#[test]
fn convert_zip_pickle_equals_its_safetensors_twin() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    convert("models/base_bin", &out, &["--max-shard-size", "100KB"]);
    assert_bit_exact(&out, &golden().join("models/base"));
    check_output_folder(&out);
    for f in [
        "config.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
}

#[test]
fn convert_legacy_pickle_equals_its_safetensors_twin() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    convert("models/other_legacy_bin", &out, &[]);
    assert_bit_exact(&out, &golden().join("models/other"));
    assert!(out.join("model.safetensors").exists());
}

#[test]
fn convert_changes_the_dtype() {
    // bf16 of the fp16 weights, rounded to nearest even, and the config says so.
    use half::{bf16, f16};
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    convert("models/base_bin", &out, &["--dtype", "bfloat16"]);
    let got = load_dir(&out);
    let want = load_dir(&golden().join("models/base"));
    for (name, w) in &want {
        let expect: Vec<u8> = w
            .bytes
            .chunks_exact(2)
            .flat_map(|c| bf16::from_f32(f16::from_le_bytes([c[0], c[1]]).to_f32()).to_le_bytes())
            .collect();
        assert_eq!(got[name].dtype, "BF16");
        assert_eq!(got[name].bytes, expect, "{name}");
    }
    let cfg = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(cfg.contains("\"dtype\": \"bfloat16\""), "{cfg}");
}

#[test]
fn torch_written_views_and_byte_orders_convert_exactly() {
    // Transposed, sliced, expanded, big-endian, protocol 3, _rebuild_tensor_v3 … as torch
    // wrote them, against the values torch saw.
    let torch = fixtures().join("torch");
    for name in [
        "mixed_zip",
        "mixed_legacy",
        "v3_zip",
        "v3_legacy",
        "proto3",
        "parameters",
        "module_state_dict",
        "from_type_v2",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let input = torch.join(format!("{name}.bin"));
        ok(
            tmp.path(),
            &[
                "convert",
                input.to_str().unwrap(),
                out.to_str().unwrap(),
                "--quiet",
            ],
        );
        let got = load_dir(&out);
        let bytes = std::fs::read(torch.join(format!("{name}.safetensors"))).unwrap();
        let twin = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (n, view) in twin.tensors() {
            assert_eq!(got[&n].bytes, view.data(), "{name}: {n}");
            assert_eq!(got[&n].shape, view.shape(), "{name}: {n}");
        }
    }
}

#[test]
fn peft_lora_bin_on_other_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    ok(
        &golden(),
        &[
            "lora",
            "--base",
            "models/other",
            "--lora",
            "models/lora_bin",
            "-o",
            out.to_str().unwrap(),
            "--quiet",
        ],
    );
    let d = assert_within(
        &out,
        &golden().join("expected/peft_lora_bin_on_other"),
        1,
        0.001,
    );
    assert_eq!(d.differing, 0, "{d:?}");
}

#[test]
fn blockmerge_of_bin_and_safetensors_equals_all_safetensors() {
    for (m1, m2) in [
        ("models/base_bin", "models/other"),
        ("models/base", "models/other_legacy_bin"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        blockmerge_ok(
            &golden(),
            m1,
            m2,
            &out,
            "[0.9,0.0]",
            &["--layer_only", "--quiet"],
        );
        assert_bit_exact(&out, &golden().join("expected/bm_layer_only"));
    }
}

#[test]
fn mk_linear_bin_inputs_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    ok(
        &golden(),
        &[
            "merge",
            "mergekit/mk_linear_bin_inputs.yml",
            out.to_str().unwrap(),
            "--quiet",
        ],
    );
    let d = assert_within(
        &out,
        &golden().join("expected/mk_linear_bin_inputs"),
        1,
        0.02,
    );
    assert_eq!(d.differing, 0, "{d:?}");
}

/// A torch-style zip checkpoint whose data.pkl is `pickle`.
fn zip_with_pickle(path: &Path, pickle: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(pickle).unwrap();
    z.start_file("archive/byteorder", opts).unwrap();
    z.write_all(b"little").unwrap();
    z.finish().unwrap();
}

#[test]
fn a_pickle_that_would_run_os_system_is_rejected_and_nothing_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("pwned");
    // PROTO 2; GLOBAL os.system; ("touch <marker>",); REDUCE; STOP
    let mut p = vec![0x80, 0x02];
    p.extend_from_slice(b"cos\nsystem\n");
    let cmd = format!("touch {}", marker.display());
    p.push(b'X');
    p.extend_from_slice(&(cmd.len() as u32).to_le_bytes());
    p.extend_from_slice(cmd.as_bytes());
    p.extend_from_slice(&[0x85, b'R', b'.']);
    let dir = tmp.path().join("evil");
    std::fs::create_dir(&dir).unwrap();
    zip_with_pickle(&dir.join("pytorch_model.bin"), &p);
    let out = tmp.path().join("out");
    let o = mergestream(
        tmp.path(),
        &["convert", dir.to_str().unwrap(), out.to_str().unwrap()],
    );
    assert_clean_failure(&o, &out, &["pytorch_model.bin", "os.system"]);
    let o = mergestream(tmp.path(), &["inspect", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!marker.exists(), "the payload ran");
}

#[test]
fn pickle_and_zip_bad_inputs_fail_cleanly() {
    let torch = fixtures().join("torch");
    let cases: &[(&str, &[&str])] = &[
        ("bad_compressed.bin", &["is compressed"]),
        (
            "bad_missing_storage.bin",
            &["f16: ", "which the file does not contain"],
        ),
        (
            "bad_record_size.bin",
            &["record is 50 bytes but the pickle declares 48"],
        ),
        (
            "bad_two_folders.bin",
            &["not inside a single top-level folder"],
        ),
        ("proto4.bin", &["protocol 4"]),
    ];
    for (file, needles) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let input = torch.join(file);
        let o = mergestream(
            tmp.path(),
            &["convert", input.to_str().unwrap(), out.to_str().unwrap()],
        );
        let mut all = vec![*file];
        all.extend_from_slice(needles);
        assert_clean_failure(&o, &out, &all);
    }
    // Truncation at many byte positions of a real shard: always one clean error line.
    let shard =
        std::fs::read(golden().join("models/base_bin/pytorch_model-00001-of-00003.bin")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for cut in (0..shard.len())
        .step_by(shard.len() / 40)
        .chain([1, 3, 4, 29, shard.len() - 1])
    {
        let dir = tmp.path().join(format!("cut{cut}"));
        std::fs::create_dir(&dir).unwrap();
        let f = dir.join("pytorch_model.bin");
        std::fs::write(&f, &shard[..cut]).unwrap();
        let o = mergestream(tmp.path(), &["inspect", f.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1), "cut at {cut}: {}", stderr(&o));
        assert_eq!(
            stderr(&o).lines().count(),
            1,
            "cut at {cut}: {}",
            stderr(&o)
        );
        assert!(stderr(&o).starts_with("error: "));
    }
}

#[test]
fn unknown_opcode_and_forbidden_builtins_at_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, pickle, needle) in [
        (
            "opcode",
            vec![0x80u8, 0x02, 0xfe, b'.'],
            "unknown pickle opcode 0xfe",
        ),
        (
            "eval",
            b"\x80\x02cbuiltins\neval\nq\x00.".to_vec(),
            "builtins.eval",
        ),
    ] {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        zip_with_pickle(&dir.join("pytorch_model.bin"), &pickle);
        let out = tmp.path().join(format!("out-{name}"));
        let o = mergestream(
            tmp.path(),
            &["convert", dir.to_str().unwrap(), out.to_str().unwrap()],
        );
        assert_clean_failure(&o, &out, &[needle]);
    }
}
