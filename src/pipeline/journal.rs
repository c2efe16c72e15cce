//! The resume journal: which output tensors of a run are complete and durable, so a run
//! killed after hours (the OOM killer, a preempted VM, a power cut) can continue where it
//! stopped instead of starting over.
//!
//! The journal is a small text file in the staging folder. Its header ties it to one plan:
//! a fingerprint of everything that decides the output's bytes (the shards' headers, every
//! step's recipe, the identity of every input file) — a run reuses a journal only when its
//! own fingerprint is the same. After the header, one line per finished tensor, appended in
//! batches: the shard data is flushed to disk (fdatasync) *before* the lines that name it are
//! written and fsynced, so a listed tensor's bytes are on disk whatever happens next. A torn
//! last line (the process died while appending) ends the list; nothing after a malformed
//! line is trusted.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The journal's file name inside the staging folder (removed before the output is
/// committed).
pub const JOURNAL_NAME: &str = ".mergestream-journal";

const MAGIC: &str = "mergestream resume journal 1";

/// An open journal, appended to as batches of steps become durable.
pub struct Journal {
    path: PathBuf,
    file: Mutex<File>,
}

impl Journal {
    /// Start a new journal for the plan with this fingerprint and step count.
    pub fn create(dir: &Path, fingerprint: &str, steps: usize) -> io::Result<Journal> {
        let path = dir.join(JOURNAL_NAME);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.write_all(header(fingerprint, steps).as_bytes())?;
        file.sync_all()?;
        Ok(Journal {
            path,
            file: Mutex::new(file),
        })
    }

    /// Reopen the journal a killed run left in `dir`, if it belongs to this plan: the steps
    /// it lists as done, in the order they were recorded. `None` when there is no journal,
    /// it is unreadable, or it belongs to another plan or other inputs.
    pub fn reopen(dir: &Path, fingerprint: &str, steps: usize) -> Option<(Journal, Vec<usize>)> {
        let path = dir.join(JOURNAL_NAME);
        let bytes = std::fs::read(&path).ok()?;
        let (done, valid_len) = parse(&bytes, fingerprint, steps)?;
        let file = OpenOptions::new().write(true).open(&path).ok()?;
        // Drop a torn tail so the next append starts on a line of its own.
        file.set_len(valid_len as u64).ok()?;
        let mut file = file;
        use std::io::Seek;
        file.seek(io::SeekFrom::End(0)).ok()?;
        Some((
            Journal {
                path,
                file: Mutex::new(file),
            },
            done,
        ))
    }

    /// Record `steps` as done. Their bytes must already be on disk.
    pub fn append(&self, steps: &[usize]) -> io::Result<()> {
        if steps.is_empty() {
            return Ok(());
        }
        let mut text = String::with_capacity(steps.len() * 12);
        for s in steps {
            text.push_str("done ");
            text.push_str(&s.to_string());
            text.push('\n');
        }
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(text.as_bytes())?;
        f.sync_data()
    }

    /// Delete the journal (the output is complete; it must not be part of it).
    pub fn remove(dir: &Path) -> io::Result<()> {
        match std::fs::remove_file(dir.join(JOURNAL_NAME)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn header(fingerprint: &str, steps: usize) -> String {
    format!("{MAGIC}\nplan {fingerprint}\nsteps {steps}\n")
}

/// The steps a journal lists as done, and the length of its well-formed prefix; `None` when
/// its header is not this plan's. A pure function of the bytes (fuzzed: `fuzz/journal`).
pub fn parse(bytes: &[u8], fingerprint: &str, steps: usize) -> Option<(Vec<usize>, usize)> {
    let head = header(fingerprint, steps);
    let rest = bytes.strip_prefix(head.as_bytes())?;
    let mut done = Vec::new();
    let mut seen = vec![false; steps];
    let mut valid = head.len();
    for line in rest.split_inclusive(|&b| b == b'\n') {
        // A line without its newline is a torn append: the process died writing it.
        let Some(line) = line.strip_suffix(b"\n") else {
            break;
        };
        let Some(step) = std::str::from_utf8(line)
            .ok()
            .and_then(|l| l.strip_prefix("done "))
            .filter(|n| !n.starts_with('+') && !n.starts_with('0') || *n == "0")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&s| s < steps)
        else {
            break;
        };
        if !std::mem::replace(&mut seen[step], true) {
            done.push(step);
        }
        valid += line.len() + 1;
    }
    Some((done, valid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_steps_read_back_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::create(dir.path(), "abc", 10).unwrap();
        j.append(&[3, 1]).unwrap();
        j.append(&[9]).unwrap();
        drop(j);
        // A torn append.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(JOURNAL_NAME))
            .unwrap();
        f.write_all(b"done 4").unwrap();
        drop(f);
        let (j, done) = Journal::reopen(dir.path(), "abc", 10).unwrap();
        assert_eq!(done, vec![3, 1, 9]);
        j.append(&[4]).unwrap();
        let (_, done) = Journal::reopen(dir.path(), "abc", 10).unwrap();
        assert_eq!(done, vec![3, 1, 9, 4]);
    }

    #[test]
    fn another_plan_or_step_count_is_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        Journal::create(dir.path(), "abc", 10)
            .unwrap()
            .append(&[1])
            .unwrap();
        assert!(Journal::reopen(dir.path(), "abd", 10).is_none());
        assert!(Journal::reopen(dir.path(), "abc", 11).is_none());
        assert!(Journal::reopen(tempfile::tempdir().unwrap().path(), "abc", 10).is_none());
    }

    #[test]
    fn malformed_lines_end_the_list() {
        let h = header("f", 5);
        let cases: &[(&str, &[usize])] = &[
            ("done 1\ndone 2\n", &[1, 2]),
            ("done 1\ndone 5\ndone 2\n", &[1]),
            ("done 1\nDONE 2\ndone 3\n", &[1]),
            ("done 01\n", &[]),
            ("done +1\n", &[]),
            ("done 0\ndone 0\n", &[0]),
            ("done 1\ndone -1\n", &[1]),
            ("done 18446744073709551617\n", &[]),
        ];
        for (body, want) in cases {
            let bytes = format!("{h}{body}");
            let (done, _) = parse(bytes.as_bytes(), "f", 5).unwrap();
            assert_eq!(&done, want, "{body:?}");
        }
        assert!(parse(b"garbage", "f", 5).is_none());
    }
}
