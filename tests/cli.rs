//! The command-line contract (DESIGN §2): every flag's value is checked before any file is
//! opened (usage error, exit 2, naming the flag as typed), every spelling that works keeps
//! working, and an error from the OS is reported with its reason once.

use crate::common;

use std::path::Path;
use std::process::Output;

use common::*;

/// Paths that do not exist: a flag error must be reported before any of them is looked at.
const NO_MODEL1: &str = "/nonexistent/mergestream/m1";
const NO_MODEL2: &str = "/nonexistent/mergestream/m2";
const NO_CONFIG: &str = "/nonexistent/mergestream/config.yml";

/// A usage error from the flag parser: exit 2, `flag` named exactly (as clap shows a flag
/// with its value, `'--flag <VALUE>'`), the reason given, nothing written.
fn assert_flag_error(o: &Output, out: &Path, flag: &str, reason: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "exit status; stderr: {err}");
    assert!(err.starts_with("error: invalid value "), "{err}");
    assert!(
        err.contains(&format!("for '{flag} <")),
        "`{flag}` not named: {err}"
    );
    assert!(err.contains(reason), "`{reason}` missing from: {err}");
    assert!(!err.contains("os error"), "a file was opened: {err}");
    assert!(!out.exists());
}

/// blockmerge of two models that do not exist, with `extra` flags.
fn blockmerge_missing(out: &Path, extra: &[&str]) -> Output {
    blockmerge(
        Path::new("/"),
        NO_MODEL1,
        NO_MODEL2,
        out,
        "[0.9, 0.0]",
        extra,
    )
}

#[test]
fn merge_out_shard_size_is_named_as_typed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_str().unwrap();
    let o = mergestream(
        tmp.path(),
        &["merge", NO_CONFIG, out_s, "--out-shard-size", "5Q"],
    );
    assert_flag_error(&o, &out, "--out-shard-size", "unknown unit `Q`");
    assert!(!stderr(&o).contains("--max-shard-size"), "{}", stderr(&o));
    // The aliases are named as written too, in both `--flag value` and `--flag=value` forms.
    let o = mergestream(
        tmp.path(),
        &["merge", NO_CONFIG, out_s, "--max-shard-size=5Q"],
    );
    assert_flag_error(&o, &out, "--max-shard-size", "unknown unit `Q`");
    let o = mergestream(
        tmp.path(),
        &["merge", NO_CONFIG, out_s, "--out_shard_size", "5Q"],
    );
    assert_flag_error(&o, &out, "--out_shard_size", "unknown unit `Q`");
}

#[test]
fn shard_size_spellings_of_the_other_commands_are_named_as_typed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_str().unwrap();
    for flag in ["--max_shard_size", "--max-shard-size"] {
        let o = blockmerge_missing(&out, &[flag, "5Q"]);
        assert_flag_error(&o, &out, flag, "unknown unit `Q`");
        let o = mergestream(tmp.path(), &["convert", NO_MODEL1, out_s, flag, "5Q"]);
        assert_flag_error(&o, &out, flag, "unknown unit `Q`");
        let o = mergestream(
            tmp.path(),
            &[
                "lora", "--base", NO_MODEL1, "--lora", NO_MODEL2, "-o", out_s, flag, "5Q",
            ],
        );
        assert_flag_error(&o, &out, flag, "unknown unit `Q`");
    }
}

#[test]
fn bad_gradient_values_are_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    for flag in ["--gradient_values", "--gradient-values"] {
        let o = mergestream(
            tmp.path(),
            &[
                "blockmerge",
                "--model_path1",
                NO_MODEL1,
                "--model_path2",
                NO_MODEL2,
                "-o",
                out.to_str().unwrap(),
                flag,
                "[0.9, x]",
            ],
        );
        assert_flag_error(&o, &out, flag, "gradient value `x` is not a number");
    }
}

#[test]
fn common_flags_are_checked_before_any_file_is_opened() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_str().unwrap();
    let cases: [(&[&str], &str, &str); 4] = [
        (
            &["--io", "bogus"],
            "--io",
            "[possible values: auto, mmap, read]",
        ),
        (
            &["--out-dtype", "int8"],
            "--out-dtype",
            "expected float16, bfloat16 or float32",
        ),
        (
            &["--memory-limit", "12 parsecs"],
            "--memory-limit",
            "unknown unit `parsecs`",
        ),
        (&["--threads", "many"], "--threads", "invalid digit"),
    ];
    for (flags, flag, reason) in cases {
        let commands: [Vec<&str>; 4] = [
            vec![
                "blockmerge",
                "--model_path1",
                NO_MODEL1,
                "--model_path2",
                NO_MODEL2,
                "-o",
                out_s,
                "--gradient_values",
                "[0.5]",
            ],
            vec![
                "lora", "--base", NO_MODEL1, "--lora", NO_MODEL2, "-o", out_s,
            ],
            vec!["convert", NO_MODEL1, out_s],
            vec!["merge", NO_CONFIG, out_s],
        ];
        for mut args in commands {
            args.extend_from_slice(flags);
            let o = mergestream(tmp.path(), &args);
            assert_flag_error(&o, &out, flag, reason);
        }
    }
    let o = mergestream(tmp.path(), &["convert", NO_MODEL1, out_s, "--dtype", "q4"]);
    assert_flag_error(&o, &out, "--dtype", "expected float16, bfloat16 or float32");
    // mergekit's short spelling is named as typed.
    let o = mergestream(tmp.path(), &["merge", NO_CONFIG, out_s, "-j", "x"]);
    assert_flag_error(&o, &out, "-j", "invalid digit");
    let o = mergestream(
        tmp.path(),
        &[
            "blockmerge",
            "--lora1",
            NO_MODEL1,
            "--lora1_weight",
            "heavy",
        ],
    );
    assert_flag_error(&o, &out, "--lora1_weight", "invalid float literal");
}

#[test]
fn gradient_values_with_config_is_a_usage_error_before_reading_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = mergestream(
        tmp.path(),
        &[
            "blockmerge",
            "--config",
            NO_CONFIG,
            "--gradient_values",
            "[0.5]",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(
        stderr(&o),
        "error: --gradient_values and --config are exclusive\n"
    );
}

#[test]
fn missing_blockmerge_flags_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    for (args, msg) in [
        (
            vec!["blockmerge", "--model_path1", NO_MODEL1],
            "--gradient_values is required (or --config)",
        ),
        (
            vec![
                "blockmerge",
                "--gradient_values",
                "0.5",
                "--model_path2",
                "m",
            ],
            "--model_path1 is required (or --config)",
        ),
        (
            vec![
                "blockmerge",
                "--gradient_values",
                "0.5",
                "--model_path1",
                NO_MODEL1,
                "--model_path2",
                NO_MODEL2,
            ],
            "--output_model_path is required",
        ),
    ] {
        let o = mergestream(tmp.path(), &args);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert_eq!(stderr(&o), format!("error: {msg}\n"));
    }
}

#[test]
fn an_os_error_is_reported_with_its_reason_once() {
    let tmp = tempfile::tempdir().unwrap();
    let reason = std::io::Error::from_raw_os_error(libc::ENOENT).to_string();
    let out = tmp.path().join("out");
    let runs: [Vec<&str>; 3] = [
        vec!["inspect", NO_MODEL1],
        vec!["convert", NO_MODEL1, out.to_str().unwrap()],
        vec!["merge", NO_CONFIG, out.to_str().unwrap()],
    ];
    for args in runs {
        let o = mergestream(tmp.path(), &args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("error: /nonexistent/mergestream/"), "{err}");
        assert_eq!(err.matches(&reason).count(), 1, "{args:?}: {err}");
        assert!(err.trim_end().ends_with(&reason), "{err}");
    }
    let o = blockmerge_missing(&out, &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(
        err,
        format!("error: {NO_MODEL1}: cannot open: {reason}\n"),
        "{err}"
    );
}

#[test]
fn every_spelling_still_works() {
    // Dash spellings, underscore aliases and `=` forms: a dry run plans without writing.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_str().unwrap();
    let runs: [Vec<&str>; 4] = [
        vec![
            "blockmerge",
            "--model-path1",
            "models/base",
            "--model-path2=models/other",
            "--output-model-path",
            out_s,
            "--gradient-values",
            "[0.9, 0.0]",
            "--layer-only",
            "--custom-filter",
            "mlp",
            "--max-shard-size",
            "100KB",
            "--lora2",
            "models/lora",
            "--lora2_weight",
            "-0.5",
            "--io=read",
            "--memory-limit",
            "64KiB",
            "--threads",
            "1",
            "--dry-run",
        ],
        vec![
            "lora",
            "--base",
            "models/base",
            "--lora",
            "models/lora",
            "--weight",
            "-1",
            "-o",
            out_s,
            "--max_shard_size",
            "2000MiB",
            "--out-dtype",
            "bf16",
            "--dry-run",
        ],
        vec![
            "convert",
            "models/base",
            out_s,
            "--dtype",
            "float32",
            "--max_shard_size=5GB",
            "--io",
            "mmap",
            "--dry-run",
        ],
        vec![
            "merge",
            "mergekit/mk_linear.yml",
            out_s,
            "--out_shard_size",
            "1.5K",
            "-j",
            "1",
            "--no-copy-tokenizer",
            "--copy-tokenizer",
            "--random-seed",
            "7",
            "--lazy-unpickle",
            "--cuda",
            "--quiet",
            "--dry-run",
        ],
    ];
    for args in runs {
        let o = mergestream(&golden(), &args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        assert!(!out.exists());
    }
    // The shard size given reaches the plan (100KB, not the default 2000MiB).
    let o = mergestream(&golden(), &{
        let mut a = vec![
            "blockmerge",
            "--model_path1",
            "models/base",
            "--model_path2",
            "models/other",
            "-o",
            out_s,
            "--gradient_values",
            "[0.5]",
            "--dry-run",
        ];
        a.extend_from_slice(&["--max-shard-size", "100KB"]);
        a
    });
    let small = String::from_utf8_lossy(&o.stdout).into_owned();
    let o = blockmerge(
        &golden(),
        "models/base",
        "models/other",
        &out,
        "[0.5]",
        &["--dry-run"],
    );
    let default = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_ne!(small, default, "--max-shard-size had no effect");
}
