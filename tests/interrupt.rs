//! SIGINT and SIGTERM during a run: exit 1 with one error line, nothing under the output
//! name, no temporary folder left behind.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A 256 MiB fp16 model whose data is a sparse hole: big enough to take seconds, cheap to make.
fn big_sparse_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let (rows, cols) = (8192u64, 16384u64);
    let len = rows * cols * 2;
    let json = format!(
        "{{\"model.layers.0.mlp.up_proj.weight\":{{\"dtype\":\"F16\",\"shape\":[{rows},{cols}],\"data_offsets\":[0,{len}]}}}}"
    );
    let mut header = (json.len() as u64).to_le_bytes().to_vec();
    header.extend_from_slice(json.as_bytes());
    let f = std::fs::File::create(dir.join("model.safetensors")).unwrap();
    use std::io::Write;
    (&f).write_all(&header).unwrap();
    f.set_len(header.len() as u64 + len).unwrap();
}

fn interrupted_by(signal: i32) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("big");
    big_sparse_model(&model);
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let out = work.join("out");
    let child = Command::new(env!("CARGO_BIN_EXE_mergestream"))
        .args([
            "blockmerge",
            "--model_path1",
            model.to_str().unwrap(),
            "--model_path2",
            model.to_str().unwrap(),
            "--output_model_path",
            out.to_str().unwrap(),
            "--gradient_values",
            "[0.5]",
            "--threads",
            "1",
            "--io",
            "read",
            "--memory-limit",
            "32MiB",
            "--quiet",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the run is under way: its temporary folder holds the shard.
    let start = Instant::now();
    loop {
        let staged = std::fs::read_dir(&work)
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| {
                e.file_name().to_string_lossy().contains(".mergestream-")
                    && e.path().join("model.safetensors").exists()
            });
        if staged {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "run never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: sending a signal to our own child.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    let o = child.wait_with_output().unwrap();
    assert_clean_failure(&o, &out, &["interrupted"]);
}

#[test]
fn sigint_leaves_nothing_behind() {
    interrupted_by(libc::SIGINT);
}

#[test]
fn sigterm_leaves_nothing_behind() {
    interrupted_by(libc::SIGTERM);
}
