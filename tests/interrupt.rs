//! Interrupting a run: it stops with one error line (exit 1), nothing under the output name,
//! no temporary folder left behind. Each test interrupts at a point it controls, so none can
//! miss: the library tests cancel from the progress observer (mid-run, and after the last
//! chunk); the CLI tests signal the process while it is blocked reading its config from a
//! FIFO, and feed the config only once the process said it noticed.

use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mergestream::error::ErrorKind;
use mergestream::output;
use mergestream::pipeline::RunOptions;
use mergestream::plan::convert::{ConvertOptions, plan_convert};
use mergestream::progress::Observer;

use crate::common::*;

fn no_staging_left(parent: &Path) {
    for e in std::fs::read_dir(parent).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            !name.contains(".mergestream-"),
            "temporary folder left: {name}"
        );
    }
}

/// Convert the golden base (many tensors, one chunk each) and cancel once `stop_after`
/// chunks are written.
fn cancelled_convert(stop_after: impl Fn(usize, u64, u64) -> bool + Send + Sync + 'static) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let plan = plan_convert(&ConvertOptions {
        input: golden().join("models/base"),
        dtype: None,
        max_shard_size: 1 << 30,
        model_card: None,
    })
    .unwrap();
    let total: u64 = plan.steps.iter().map(|s| s.len).sum();
    let cancel = Arc::new(AtomicBool::new(false));
    let chunks = Arc::new(AtomicUsize::new(0));
    let (flag, seen) = (Arc::clone(&cancel), Arc::clone(&chunks));
    let opts = RunOptions {
        threads: 1,
        cancel,
        observer: Some(Observer(Arc::new(move |written| {
            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
            if stop_after(n, written, total) {
                flag.store(true, Ordering::SeqCst);
            }
        }))),
        ..RunOptions::default()
    };
    let err = output::run(&plan, &out, false, &opts).unwrap_err();
    assert!(matches!(err.kind, ErrorKind::Interrupted), "{err}");
    assert!(chunks.load(Ordering::SeqCst) >= 1, "the run started");
    assert!(!out.exists());
    no_staging_left(tmp.path());
}

#[test]
fn cancel_mid_run_leaves_nothing_behind() {
    cancelled_convert(|chunks, _, _| chunks == 1);
}

#[test]
fn cancel_after_the_last_chunk_still_commits_nothing() {
    cancelled_convert(|_, written, total| written == total);
}

/// Signal the CLI while it waits for its config, then let it run into the interrupt.
fn interrupted_by(signal: i32) {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("config.yml");
    let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let out = tmp.path().join("out");
    let mut child = command()
        .args(["merge", fifo.to_str().unwrap(), out.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A writer can open the FIFO only once the process has opened it for reading, which it
    // does after installing its signal handler.
    let start = Instant::now();
    let mut writer = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
        {
            Ok(f) => break f,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                assert!(start.elapsed() < Duration::from_secs(30), "never read");
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("{e}"),
        }
    };
    // SAFETY: sending a signal to our own child.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut note = String::new();
    stderr.read_line(&mut note).unwrap();
    assert!(note.starts_with("interrupted: stopping"), "{note}");
    let base = golden().join("models/base");
    let other = golden().join("models/other");
    let config = format!(
        "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.5}}\ndtype: float16\n",
        base.display(),
        other.display()
    );
    writer.write_all(config.as_bytes()).unwrap();
    drop(writer);
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{rest}");
    let lines: Vec<&str> = rest.lines().collect();
    assert_eq!(lines.len(), 1, "one error line expected, got: {rest}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains("interrupted"),
        "{rest}"
    );
    assert!(!out.exists());
    no_staging_left(tmp.path());
}

#[test]
fn sigint_leaves_nothing_behind() {
    interrupted_by(libc::SIGINT);
}

#[test]
fn sigterm_leaves_nothing_behind() {
    interrupted_by(libc::SIGTERM);
}

/// The body of [`a_second_interrupt_during_the_commit_waits_for_it`], run in a child test
/// process of its own: `abandon` acts on the process's one run in progress, which other
/// tests in this process would share.
#[test]
fn commit_child() {
    if std::env::var_os("MERGESTREAM_COMMIT_CHILD").is_none() {
        return;
    }
    use mergestream::output::Staging;
    for force in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("out");
        if force {
            std::fs::create_dir(&target).unwrap();
            std::fs::write(target.join("old"), b"old output").unwrap();
        }
        let staging = Staging::new(&target, force).unwrap();
        std::fs::write(staging.path().join("new"), b"new output").unwrap();
        let mut second_interrupt = None;
        staging
            .commit_observed(|| {
                // The user's second Ctrl-C arrives now, inside the commit.
                second_interrupt = Some(std::thread::spawn(output::abandon));
                std::thread::sleep(Duration::from_millis(100));
            })
            .unwrap();
        let removed = second_interrupt.unwrap().join().unwrap();
        assert!(!removed, "the interrupt removed a committed output");
        assert_eq!(std::fs::read(target.join("new")).unwrap(), b"new output");
        assert!(!target.join("old").exists());
        no_staging_left(tmp.path());
    }
}

#[test]
fn a_second_interrupt_during_the_commit_waits_for_it() {
    run_in_child("interrupt::commit_child", "MERGESTREAM_COMMIT_CHILD");
}

#[test]
fn an_input_rewritten_during_the_run_is_an_error_and_nothing_is_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_of_base(tmp.path());
    let plan = plan_convert(&ConvertOptions {
        input: model.clone(),
        dtype: None,
        max_shard_size: 1 << 30,
        model_card: None,
    })
    .unwrap();
    let shard = model.join("model-00002-of-00003.safetensors");
    let victim = shard.clone();
    let done = Arc::new(AtomicBool::new(false));
    let opts = RunOptions {
        threads: 1,
        observer: Some(Observer(Arc::new(move |_| {
            // A sync client rewrites one shard in place, same bytes, once.
            if !done.swap(true, Ordering::SeqCst) {
                let bytes = std::fs::read(&victim).unwrap();
                std::fs::write(&victim, bytes).unwrap();
            }
        }))),
        ..RunOptions::default()
    };
    let out = tmp.path().join("out");
    let err = output::run(&plan, &out, false, &opts).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: changed while the run read it (replaced, rewritten or truncated); nothing was written",
            shard.display()
        )
    );
    assert!(!out.exists());
    no_staging_left(tmp.path());
}

/// This process's start time, as the staging folder names record it.
fn own_start_time() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

#[test]
fn staging_folders_of_killed_runs_are_swept_and_live_ones_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let dead = tmp.path().join(".out.mergestream-4000000000-1-abcdef");
    let live = tmp.path().join(format!(
        ".out.mergestream-{}-{}-ghijkl",
        std::process::id(),
        own_start_time()
    ));
    let foreign = tmp.path().join(".out.mergestream-notours");
    for d in [&dead, &live, &foreign] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(d.join("model.safetensors"), b"half a shard").unwrap();
    }
    let o = command()
        .current_dir(golden())
        .args(["convert", "models/base", out.to_str().unwrap()])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "note: removed {}, left by an earlier run that was killed",
            dead.display()
        )),
        "{err}"
    );
    assert!(!dead.exists());
    assert!(live.exists() && foreign.exists());
    assert!(out.join("config.json").exists());
}

/// The body of [`an_input_truncated_under_its_mapping_is_an_error_not_a_crash`], in a child
/// test process: without the guard, SIGBUS would kill the whole test binary.
#[test]
fn sigbus_child() {
    if std::env::var_os("MERGESTREAM_SIGBUS_CHILD").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_of_base(tmp.path());
    let plan = plan_convert(&ConvertOptions {
        input: model.clone(),
        // Computed (f16 → f32), so the worker itself reads the mapped bytes: the fault is a
        // SIGBUS in this process, not an EFAULT inside a write.
        dtype: Some(mergestream::dtype::DType::F32),
        max_shard_size: 1 << 30,
        model_card: None,
    })
    .unwrap();
    let shard = model.join("model-00002-of-00003.safetensors");
    let victim = shard.clone();
    let done = Arc::new(AtomicBool::new(false));
    let opts = RunOptions {
        threads: 1,
        io: mergestream::pipeline::reader::IoMode::Mmap,
        observer: Some(Observer(Arc::new(move |_| {
            // Another program truncates a shard the run has not read yet.
            if !done.swap(true, Ordering::SeqCst) {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&victim)
                    .unwrap();
                f.set_len(64).unwrap();
            }
        }))),
        ..RunOptions::default()
    };
    let out = tmp.path().join("out");
    let err = output::run(&plan, &out, false, &opts).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("{}: ", shard.display())),
        "{err}"
    );
    assert!(!out.exists());
    no_staging_left(tmp.path());
}

#[test]
fn an_input_truncated_under_its_mapping_is_an_error_not_a_crash() {
    run_in_child("interrupt::sigbus_child", "MERGESTREAM_SIGBUS_CHILD");
}

/// Run test `name` of this binary alone in a child process with `env` set (for tests that
/// touch process-wide state), and insist it passed.
fn run_in_child(name: &str, env: &str) {
    let o = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--test-threads=1"])
        .env(env, "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "status {:?}: {text}{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(text.contains("1 passed"), "{text}");
}

/// A copy of the golden base model in `dir/model`, free to be damaged.
fn copy_of_base(dir: &Path) -> std::path::PathBuf {
    let model = dir.join("model");
    std::fs::create_dir(&model).unwrap();
    for e in std::fs::read_dir(golden().join("models/base")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, model.join(p.file_name().unwrap())).unwrap();
    }
    model
}
