//! The output folder: built under a temporary name beside the target and renamed into place
//! only when complete, so an interrupted or failed run never leaves a half-written model
//! under the requested name.

use std::fs;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::error::{Error, Result};
use crate::pipeline::{RunOptions, RunStats, execute};
use crate::plan::Plan;
use crate::plan::outputs::config_bytes;

/// A temporary folder that becomes the output on [`Staging::commit`] and is removed if
/// dropped before.
pub struct Staging {
    dir: TempDir,
    target: PathBuf,
    force: bool,
}

impl Staging {
    /// Check the target and create the temporary folder beside it.
    pub fn new(target: &Path, force: bool) -> Result<Staging> {
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
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(
                Error::invalid("the output's parent folder does not exist").in_file(&parent)
            );
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!(".{}.mergestream-", name.to_string_lossy()))
            .tempdir_in(&parent)
            .map_err(|e| Error::io("cannot create a temporary folder", e).in_file(&parent))?;
        Ok(Staging {
            dir,
            target: target.to_path_buf(),
            force,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Rename the finished folder into place (replacing the old output with `--force`).
    pub fn commit(self) -> Result<()> {
        let staged = self.dir.keep();
        let target = &self.target;
        let mut backup = None;
        if self.force && fs::symlink_metadata(target).is_ok() {
            let mut b = staged.clone();
            b.set_extension("old");
            fs::rename(target, &b).map_err(|e| {
                let _ = fs::remove_dir_all(&staged);
                Error::io("cannot move the old output aside", e).in_file(target)
            })?;
            backup = Some(b);
        }
        if let Err(e) = fs::rename(&staged, target) {
            if let Some(b) = &backup {
                let _ = fs::rename(b, target);
            }
            let _ = fs::remove_dir_all(&staged);
            return Err(Error::io("cannot move the output into place", e).in_file(target));
        }
        if let Some(b) = backup {
            let _ = if b.is_dir() {
                fs::remove_dir_all(&b)
            } else {
                fs::remove_file(&b)
            };
        }
        Ok(())
    }
}

/// Refuse to write over an input (with `--force` that would delete it).
pub fn check_not_an_input(plan: &Plan, target: &Path) -> Result<()> {
    let Ok(t) = fs::canonicalize(target) else {
        return Ok(()); // does not exist yet
    };
    for m in &plan.sources {
        for f in &m.files {
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
/// files, fsync, rename into place.
pub fn run(plan: &Plan, target: &Path, force: bool, opts: &RunOptions) -> Result<RunStats> {
    check_not_an_input(plan, target)?;
    let staging = Staging::new(target, force)?;
    let stats = execute(plan, staging.path(), opts)?;
    write_extras(plan, staging.path())?;
    staging.commit()?;
    Ok(stats)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).map_err(|e| Error::io("write failed", e).in_file(path))
}

/// The index (when sharded), config.json, copied and generated files.
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
        let dst = dir.join(name);
        fs::copy(src, &dst).map_err(|e| Error::io("cannot copy", e).in_file(src))?;
    }
    for (name, bytes) in &plan.outputs.generated {
        write_file(&dir.join(name), bytes)?;
    }
    Ok(())
}
