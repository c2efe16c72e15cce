//! The output folder: built under a temporary name beside the target and renamed into place
//! only when complete, so an interrupted or failed run never leaves a half-written model
//! under the requested name.
//!
//! The final step is one atomic rename: `renameat2(RENAME_NOREPLACE)` for a new output, or
//! `RENAME_EXCHANGE` to swap a `--force`d replacement with the old output (which is then
//! deleted), so there is no moment without a complete model under the name. Filesystems
//! without renameat2 fall back to plain renames through a uniquely named backup.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, ErrorKind, Result};
use crate::model::Model;
use crate::pipeline::extract_lora::{ExtractStats, execute_extraction};
use crate::pipeline::journal::{JOURNAL_NAME, Journal};
use crate::pipeline::reader::IoMode;
use crate::pipeline::writer::shards_match;
use crate::pipeline::{Resumable, RunOptions, RunStats, execute_resumable};
use crate::plan::Plan;
use crate::plan::extract_lora::ExtractPlan;
use crate::plan::outputs::config_bytes;

/// The temporary folder of the run in progress, for [`abandon`] to remove.
static IN_PROGRESS: Mutex<Option<PathBuf>> = Mutex::new(None);

fn set_in_progress(p: Option<PathBuf>) {
    *IN_PROGRESS.lock().unwrap_or_else(|e| e.into_inner()) = p;
}

/// Remove the temporary folder of the run in progress (the CLI calls this when the user
/// interrupts twice and the run cannot finish its own cleanup). Returns whether there was
/// one. While the output is being moved into place it waits: a commit that has begun
/// finishes, so the result is the complete new output or the untouched old one.
pub fn abandon() -> bool {
    match IN_PROGRESS.lock().unwrap_or_else(|e| e.into_inner()).take() {
        Some(p) => {
            let _ = fs::remove_dir_all(p);
            true
        }
        None => false,
    }
}

/// A temporary folder that becomes the output on [`Staging::commit`] and is removed if
/// dropped before.
pub struct Staging {
    dir: Option<PathBuf>,
    target: PathBuf,
    force: bool,
    /// Staging folders of killed earlier runs to the same output, removed.
    pub swept: Vec<PathBuf>,
    /// The resume journal, and the steps a killed run had finished (when this staging
    /// folder is that run's, adopted).
    pub journal: Option<(Journal, Vec<usize>)>,
    /// Whether the folder is a killed run's, adopted with its shards.
    pub adopted: bool,
}

/// What a staging folder is for, so a later run can tell whether it may continue it.
pub struct ResumeKey<'a> {
    pub plan: &'a Plan,
    pub fingerprint: String,
    /// Reuse a killed run's folder of the same plan (otherwise it is swept like any other).
    pub reuse: bool,
}

impl Staging {
    /// Check the target and create the temporary folder beside it.
    pub fn new(target: &Path, force: bool) -> Result<Staging> {
        Staging::resumable(target, force, None)
    }

    /// [`Staging::new`] with a resume journal: the folder a killed run of the same plan left
    /// is taken over (when `key.reuse`), otherwise a new folder starts a new journal.
    pub fn resumable(target: &Path, force: bool, key: Option<ResumeKey<'_>>) -> Result<Staging> {
        if target.as_os_str().is_empty() {
            return Err(Error::usage("the output path is empty"));
        }
        if fs::symlink_metadata(target).is_ok() && !force {
            return Err(
                Error::invalid("output already exists; pass --force to replace it").in_file(target),
            );
        }
        let name = target
            .file_name()
            .ok_or_else(|| Error::usage(format!("`{}` is not a folder name", target.display())))?;
        let parent = parent_of(target);
        if !parent.is_dir() {
            return Err(
                Error::invalid("the output's parent folder does not exist").in_file(&parent)
            );
        }
        let stem = format!(".{}.mergestream-", name.to_string_lossy());
        // The owner (pid and start time) is in the name, so a later run can tell a folder
        // left by a killed run from one a live run is writing.
        let me = std::process::id();
        let mine = format!("{stem}{me}-{}-", start_time(me).unwrap_or(0));
        let mut stale = stale_folders(&parent, &stem);
        let adopted = match &key {
            Some(k) if k.reuse => adopt(&mut stale, &parent, &mine, k),
            _ => None,
        };
        let swept = stale
            .into_iter()
            .filter(|p| fs::remove_dir_all(p).is_ok())
            .collect();
        let is_adopted = adopted.is_some();
        let (dir, journal) = match adopted {
            Some((dir, journal, done)) => (dir, Some((journal, done))),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix(&mine)
                    .tempdir_in(&parent)
                    .map_err(|e| Error::io("cannot create a temporary folder", e).in_file(&parent))?
                    .keep();
                let journal = match &key {
                    Some(k) => match Journal::create(&dir, &k.fingerprint, k.plan.steps.len()) {
                        Ok(j) => Some((j, Vec::new())),
                        Err(e) => {
                            let _ = fs::remove_dir_all(&dir);
                            return Err(Error::io("cannot create the resume journal", e)
                                .in_file(dir.join(JOURNAL_NAME)));
                        }
                    },
                    None => None,
                };
                (dir, journal)
            }
        };
        set_in_progress(Some(dir.clone()));
        Ok(Staging {
            dir: Some(dir),
            target: target.to_path_buf(),
            force,
            swept,
            journal,
            adopted: is_adopted,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.as_deref().unwrap_or(Path::new(""))
    }

    /// Put the finished folder in place atomically (replacing the old output with `--force`).
    pub fn commit(self) -> Result<()> {
        self.commit_observed(|| {})
    }

    /// [`Staging::commit`], calling `during` inside its critical section (tests use it to
    /// interrupt a commit at a point they choose).
    pub fn commit_observed(mut self, during: impl FnOnce()) -> Result<()> {
        let Some(dir) = self.dir.take() else {
            return Ok(());
        };
        // The critical section: `abandon` waits on this lock until the output is in place.
        let mut in_progress = IN_PROGRESS.lock().unwrap_or_else(|e| e.into_inner());
        during();
        let staged = dir.clone();
        let target = self.target.clone();
        sync_dir(&staged);
        let exists = fs::symlink_metadata(&target).is_ok();
        if exists && !self.force {
            let _ = fs::remove_dir_all(&staged);
            return Err(Error::invalid(
                "output appeared while the run was writing it; nothing was replaced",
            )
            .in_file(&target));
        }
        let flags = if exists {
            libc::RENAME_EXCHANGE
        } else {
            libc::RENAME_NOREPLACE
        };
        match rename2(&staged, &target, flags) {
            Ok(()) => {
                // `staged` now holds the old output (after an exchange) or nothing.
                if exists {
                    remove_any(&staged);
                }
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOSYS | libc::EINVAL | libc::ENOTSUP)
                ) =>
            {
                if let Err(e) = replace_by_renames(&staged, &target, exists) {
                    let _ = fs::remove_dir_all(&staged);
                    return Err(e);
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                let _ = fs::remove_dir_all(&staged);
                return Err(Error::invalid(
                    "output appeared while the run was writing it; nothing was replaced",
                )
                .in_file(&target));
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&staged);
                return Err(Error::io("cannot move the output into place", e).in_file(&target));
            }
        }
        sync_dir(&parent_of(&target));
        *in_progress = None;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        set_in_progress(None);
        if let Some(dir) = self.dir.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// A process's start time (clock ticks since boot, `/proc/<pid>/stat` field 22): with the
/// pid, it names one process for good (pids are reused, start times are not).
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Take over the staging folder of a killed run of the same plan, if one of `stale` is: its
/// journal is this plan's and its shards are complete files with this plan's headers. It is
/// renamed to this run's owner name (so two runs cannot both take it), and files that are not
/// shards are removed (they are written again at the end).
fn adopt(
    stale: &mut Vec<PathBuf>,
    parent: &Path,
    mine: &str,
    key: &ResumeKey<'_>,
) -> Option<(PathBuf, Journal, Vec<usize>)> {
    let steps = key.plan.steps.len();
    let i = stale.iter().position(|dir| {
        Journal::reopen(dir, &key.fingerprint, steps).is_some()
            && shards_match(dir, &key.plan.shards)
    })?;
    let old = stale.remove(i);
    let suffix = old.file_name()?.to_str()?.rsplit('-').next()?.to_string();
    let dir = parent.join(format!("{mine}{suffix}"));
    // Another run may take it first: then this one starts afresh.
    rename2(&old, &dir, libc::RENAME_NOREPLACE).ok()?;
    let keep: Vec<&str> = key
        .plan
        .shards
        .iter()
        .map(|s| s.file_name.as_str())
        .collect();
    for e in fs::read_dir(&dir).ok()?.flatten() {
        let name = e.file_name();
        if name != JOURNAL_NAME && !keep.iter().any(|k| name == **k) {
            remove_any(&e.path());
        }
    }
    match Journal::reopen(&dir, &key.fingerprint, steps) {
        Some((journal, done)) => Some((dir, journal, done)),
        None => {
            stale.push(dir);
            None
        }
    }
}

/// Staging folders `<stem><pid>-<start>-…` in `parent` whose owner is gone (killed by
/// SIGKILL, the OOM killer, a power cut); folders of live runs are left alone.
fn stale_folders(parent: &Path, stem: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut stale = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(owner) = name.to_str().and_then(|n| n.strip_prefix(stem)) else {
            continue;
        };
        let mut parts = owner.splitn(3, '-');
        let (Some(pid), Some(start)) = (
            parts.next().and_then(|p| p.parse::<u32>().ok()),
            parts.next().and_then(|s| s.parse::<u64>().ok()),
        ) else {
            continue; // not ours to judge
        };
        let alive = start_time(pid).is_some_and(|t| t == start || start == 0);
        if !alive {
            stale.push(e.path());
        }
    }
    stale
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(x) if !x.as_os_str().is_empty() => x.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn rename2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let f = CString::new(from.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let t = CString::new(to.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: two valid NUL-terminated paths relative to the working directory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Without renameat2: move the old output to a unique backup, the new one into place, and
/// delete the backup.
fn replace_by_renames(staged: &Path, target: &Path, exists: bool) -> Result<()> {
    let mut backup = None;
    if exists {
        let b = tempfile::Builder::new()
            .prefix(".mergestream-old-")
            .tempdir_in(parent_of(target))
            .map_err(|e| Error::io("cannot create a backup name", e).in_file(target))?
            .keep();
        let _ = fs::remove_dir(&b);
        fs::rename(target, &b)
            .map_err(|e| Error::io("cannot move the old output aside", e).in_file(target))?;
        backup = Some(b);
    }
    if let Err(e) = fs::rename(staged, target) {
        if let Some(b) = &backup {
            let _ = fs::rename(b, target);
        }
        return Err(Error::io("cannot move the output into place", e).in_file(target));
    }
    if let Some(b) = backup {
        remove_any(&b);
    }
    Ok(())
}

fn remove_any(p: &Path) {
    let _ = if p.is_dir() {
        fs::remove_dir_all(p)
    } else {
        fs::remove_file(p)
    };
}

/// fsync a folder so the names in it (new files, a rename) are durable.
fn sync_dir(p: &Path) {
    if let Ok(f) = fs::File::open(p) {
        let _ = f.sync_all();
    }
}

/// Refuse to write over an input (with `--force` that would delete it).
pub fn check_not_an_input(plan: &Plan, target: &Path) -> Result<()> {
    check_not_among(plan.sources.iter(), target)
}

fn check_not_among<'a>(models: impl Iterator<Item = &'a Model>, target: &Path) -> Result<()> {
    let Ok(t) = fs::canonicalize(target) else {
        return Ok(()); // does not exist yet
    };
    for m in models {
        for f in m.files.iter().filter_map(|f| m.source.local_path(f)) {
            if let Ok(c) = fs::canonicalize(f)
                && (c == t || c.starts_with(&t))
            {
                return Err(
                    Error::usage("the output would replace one of the inputs").in_file(target)
                );
            }
        }
    }
    Ok(())
}

/// Run a plan into `target`: stage, stream the tensors, write the index, config and copied
/// files, fsync, rename into place. Errors name the output, not the temporary folder.
pub fn run(plan: &Plan, target: &Path, force: bool, opts: &RunOptions) -> Result<RunStats> {
    check_not_an_input(plan, target)?;
    let key = ResumeKey {
        plan,
        fingerprint: plan.fingerprint(),
        reuse: opts.resume,
    };
    let staging = Staging::resumable(target, force, Some(key))?;
    let staged = staging.path().to_path_buf();
    let rename = |mut e: Error| {
        if let Some(f) = &e.file
            && let Ok(rel) = f.strip_prefix(&staged)
        {
            e.file = Some(target.join(rel));
        }
        e
    };
    // An input that changed under the run explains whatever failed after it (a truncated
    // mapping makes a write from it fail with EFAULT): name the input.
    let changed_input = || plan.sources.iter().find_map(|m| m.check_unchanged().err());
    let resume = staging.journal.as_ref().map(|(journal, done)| Resumable {
        journal,
        done,
        existing_shards: staging.adopted,
    });
    let mut stats = execute_resumable(plan, &staged, opts, resume)
        .map_err(|e| changed_input().unwrap_or_else(|| rename(e)))?;
    stats.swept_staging = staging.swept.clone();
    // The journal is not part of the output.
    Journal::remove(&staged)
        .map_err(|e| Error::io("cannot remove the resume journal", e).in_file(&staged))
        .map_err(rename)?;
    write_extras(plan, &staged).map_err(rename)?;
    // An interrupt that came after the last tensor still wins: nothing is committed.
    if opts.cancelled() {
        return Err(Error::new(ErrorKind::Interrupted));
    }
    // Inputs pinned for the run: a file that changed under it makes the output a mix.
    for model in &plan.sources {
        model.check_unchanged()?;
    }
    staging.commit()?;
    Ok(stats)
}

/// Run an extraction into `target` through a staging folder, as [`run`] does for merges:
/// adapter_model.safetensors, adapter_config.json and README.md appear together or not at
/// all.
pub fn run_extraction(
    plan: &ExtractPlan,
    target: &Path,
    force: bool,
    io: IoMode,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<ExtractStats> {
    check_not_among(plan.inputs().into_iter(), target)?;
    let staging = Staging::new(target, force)?;
    let staged = staging.path().to_path_buf();
    let rename = |mut e: Error| {
        if let Some(f) = &e.file
            && let Ok(rel) = f.strip_prefix(&staged)
        {
            e.file = Some(target.join(rel));
        }
        e
    };
    let changed_input = || plan.inputs().iter().find_map(|m| m.check_unchanged().err());
    let stats = execute_extraction(plan, &staged, io, cancel)
        .map_err(|e| changed_input().unwrap_or_else(|| rename(e)))?;
    write_file(
        &staged.join("adapter_config.json"),
        &plan.adapter_config_bytes(&stats.ranks),
    )
    .map_err(rename)?;
    write_file(&staged.join("README.md"), plan.model_card().as_bytes()).map_err(rename)?;
    if cancel.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(Error::new(ErrorKind::Interrupted));
    }
    for m in plan.inputs() {
        m.check_unchanged()?;
    }
    staging.commit()?;
    Ok(stats)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let f = fs::File::create(path).map_err(|e| Error::io("cannot create", e).in_file(path))?;
    use std::io::Write;
    (&f).write_all(bytes)
        .map_err(|e| Error::io("write failed", e).in_file(path))?;
    f.sync_all()
        .map_err(|e| Error::io("fsync failed", e).in_file(path))
}

/// The index (when sharded), config.json, copied and generated files, each fsynced.
pub fn write_extras(plan: &Plan, dir: &Path) -> Result<()> {
    if plan.shards.len() > 1 {
        let mut weight_map: Vec<(&str, &str)> = plan
            .steps
            .iter()
            .map(|s| (s.name.as_str(), plan.shards[s.shard].file_name.as_str()))
            .collect();
        weight_map.sort();
        let mut map = serde_json::Map::new();
        for (k, v) in weight_map {
            map.insert(k.to_string(), serde_json::Value::String(v.to_string()));
        }
        let total: u64 = plan.steps.iter().map(|s| s.len).sum();
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": serde_json::Value::Object(map),
        });
        write_file(
            &dir.join("model.safetensors.index.json"),
            &config_bytes(&index),
        )?;
    }
    if let Some(cfg) = &plan.outputs.config {
        write_file(&dir.join("config.json"), &config_bytes(cfg))?;
    }
    for (src, name) in &plan.outputs.copies {
        let bytes = crate::plan::outputs::read_copied(&**src, name)?;
        write_file(&dir.join(name), &bytes)?;
    }
    for (name, bytes) in &plan.outputs.generated {
        write_file(&dir.join(name), bytes)?;
    }
    Ok(())
}
