//! stdout and stderr that cannot be written: a reader that went away ends the program
//! quietly (exit 0), a full device is an error (exit 1), and nothing ever panics (exit 101);
//! a failing stderr never fails a run whose output is committed.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Output, Stdio};

use crate::common::*;

/// A pipe whose reading end is already closed: every write to it fails with EPIPE.
fn closed_pipe() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe() returns; the read end is closed
    // at once and the write end owned by the returned value.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        libc::close(fds[0]);
        Stdio::from(OwnedFd::from_raw_fd(fds[1]))
    }
}

fn full() -> Stdio {
    Stdio::from(File::options().write(true).open("/dev/full").unwrap())
}

fn run(args: &[&str], stdout: Stdio, stderr: Stdio) -> Output {
    command()
        .current_dir(golden())
        .args(args)
        .stdout(stdout)
        .stderr(stderr)
        .output()
        .unwrap()
}

#[test]
fn a_reader_that_went_away_ends_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    for args in [
        vec!["inspect", "models/base"],
        vec!["convert", "models/base", out.to_str().unwrap(), "--dry-run"],
    ] {
        let o = run(&args, closed_pipe(), Stdio::piped());
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o), "", "{args:?}");
    }
    assert!(!out.exists());
}

#[test]
fn a_full_stdout_is_an_error() {
    let o = run(&["inspect", "models/base"], full(), Stdio::piped());
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: cannot write to standard output: "),
        "{err}"
    );
}

#[test]
fn a_full_stderr_changes_no_outcome() {
    let tmp = tempfile::tempdir().unwrap();
    // An error run still exits 1.
    let o = run(
        &["inspect", "/nonexistent/mergestream/model"],
        Stdio::null(),
        full(),
    );
    assert_eq!(o.status.code(), Some(1));
    // A good run commits its output and exits 0, though its summary cannot be written.
    let out = tmp.path().join("out");
    let o = run(
        &["convert", "models/base", out.to_str().unwrap()],
        Stdio::null(),
        full(),
    );
    assert_eq!(o.status.code(), Some(0));
    assert!(out.join("config.json").exists());
}
