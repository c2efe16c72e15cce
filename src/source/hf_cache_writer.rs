//! `--cache`: the files of a Hub repo, stored in the Hugging Face cache layout as the run
//! reads them, so the next run of the same models is local.
//!
//! Nothing is fetched for the cache's sake: each byte the merge reads is also written at its
//! offset into `blobs/<name>.incomplete`; a file whose every byte has been read is renamed to
//! its blob, linked from `snapshots/<commit>/…` and, for a branch or tag, named by
//! `refs/<revision>` — complete files only, each step atomic. Files the run never reads
//! whole stay uncached. Caching is best effort: a full disk or a read-only cache never fails
//! the merge, it only leaves that file uncached.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Source, SourceFile};

/// A Hub source whose reads are also stored in the HF cache.
#[derive(Debug)]
pub struct CachingSource {
    inner: Arc<dyn Source>,
    target: Arc<Target>,
    /// One record per file, shared by every open of it.
    partial: Mutex<HashMap<String, Arc<Mutex<Partial>>>>,
}

/// Where a repo's files go.
#[derive(Debug)]
struct Target {
    /// `<cache>/models--org--name`.
    repo_dir: PathBuf,
    commit: String,
    /// The branch or tag the user named, recorded in `refs/` (not when it was a commit).
    revision: Option<String>,
    /// The subfolder of the repo the source reads.
    subfolder: Option<String>,
}

/// What has been stored of one file.
#[derive(Debug)]
struct Partial {
    file: Option<File>,
    temp: PathBuf,
    /// Stored byte ranges, sorted and merged.
    covered: Vec<(u64, u64)>,
    len: u64,
    /// Finished (cached) or given up.
    settled: bool,
}

impl CachingSource {
    /// Cache what `inner` (a Hub repo at `commit`) reads into `repo_dir`.
    pub fn new(
        inner: Arc<dyn Source>,
        repo_dir: PathBuf,
        commit: &str,
        revision: Option<&str>,
        subfolder: Option<&str>,
    ) -> CachingSource {
        let revision = match revision {
            None => Some("main".to_string()),
            Some(r) if r == commit => None,
            Some(r) => Some(r.to_string()),
        };
        CachingSource {
            inner,
            target: Arc::new(Target {
                repo_dir,
                commit: commit.to_string(),
                revision,
                subfolder: subfolder.map(str::to_string),
            }),
            partial: Mutex::new(HashMap::new()),
        }
    }

    fn partial(&self, name: &str, len: u64) -> Arc<Mutex<Partial>> {
        let mut map = self.partial.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry(name.to_string()).or_insert_with(|| {
            let blob = self.target.blob_name(name);
            let temp = self
                .target
                .repo_dir
                .join("blobs")
                .join(format!("{blob}.incomplete"));
            Arc::new(Mutex::new(Partial {
                file: None,
                temp,
                covered: Vec::new(),
                len,
                settled: false,
            }))
        }))
    }
}

impl Target {
    /// The path of `name` inside the repo.
    fn repo_path(&self, name: &str) -> String {
        match &self.subfolder {
            Some(sub) => format!("{}/{name}", sub.trim_end_matches('/')),
            None => name.to_string(),
        }
    }

    /// Blobs are named by content in huggingface_hub; nothing reads the name back, so one
    /// unique per commit and path does.
    fn blob_name(&self, name: &str) -> String {
        format!(
            "{}-{}",
            self.commit,
            self.repo_path(name).replace('/', "%2F")
        )
    }

    /// Move a complete temp file into place: blob, snapshot link, ref.
    fn finish(&self, name: &str, temp: &Path) -> io::Result<()> {
        let blobs = self.repo_dir.join("blobs");
        let blob = blobs.join(self.blob_name(name));
        fs::rename(temp, &blob)?;
        let link = self
            .repo_dir
            .join("snapshots")
            .join(&self.commit)
            .join(self.repo_path(name));
        let parent = link
            .parent()
            .ok_or_else(|| io::Error::other("a snapshot path without a folder"))?;
        fs::create_dir_all(parent)?;
        // Relative, as huggingface_hub links them, so the cache can move.
        let depth = self.repo_path(name).matches('/').count() + 2;
        let mut rel = PathBuf::new();
        for _ in 0..depth {
            rel.push("..");
        }
        rel.push("blobs");
        rel.push(self.blob_name(name));
        let temp_link = parent.join(format!(".{}.link", self.blob_name(name)));
        let _ = fs::remove_file(&temp_link);
        std::os::unix::fs::symlink(&rel, &temp_link)?;
        fs::rename(&temp_link, &link)?;
        if let Some(rev) = &self.revision {
            let refs = self.repo_dir.join("refs").join(rev);
            if let Some(dir) = refs.parent() {
                fs::create_dir_all(dir)?;
            }
            let temp_ref = refs.with_extension("mergestream-tmp");
            fs::write(&temp_ref, &self.commit)?;
            fs::rename(&temp_ref, &refs)?;
        }
        Ok(())
    }
}

impl Partial {
    /// Store `bytes` at `offset`; true once every byte of the file is stored.
    fn store(&mut self, offset: u64, bytes: &[u8]) -> io::Result<bool> {
        if self.file.is_none() {
            if let Some(dir) = self.temp.parent() {
                fs::create_dir_all(dir)?;
            }
            let f = File::create(&self.temp)?;
            f.set_len(self.len)?;
            self.file = Some(f);
        }
        if let Some(f) = &self.file {
            f.write_all_at(bytes, offset)?;
        }
        let end = offset + bytes.len() as u64;
        self.covered.push((offset, end));
        self.covered.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.covered.len());
        for &(a, b) in &self.covered {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        self.covered = merged;
        Ok(self.covered.first() == Some(&(0, self.len)))
    }
}

impl Source for CachingSource {
    fn location(&self) -> &Path {
        self.inner.location()
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.inner.path_of(name)
    }

    fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list()
    }

    fn file_len(&self, name: &str) -> io::Result<Option<u64>> {
        self.inner.file_len(name)
    }

    fn open(&self, name: &str) -> io::Result<Box<dyn SourceFile>> {
        let inner = self.inner.open(name)?;
        let partial = self.partial(name, inner.len());
        Ok(Box::new(CachingFile {
            inner,
            partial,
            target: Arc::clone(&self.target),
            name: name.to_string(),
        }))
    }

    fn bytes_fetched(&self) -> Option<u64> {
        self.inner.bytes_fetched()
    }
}

struct CachingFile {
    inner: Box<dyn SourceFile>,
    partial: Arc<Mutex<Partial>>,
    target: Arc<Target>,
    name: String,
}

impl SourceFile for CachingFile {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)?;
        let mut p = self.partial.lock().unwrap_or_else(|e| e.into_inner());
        if !p.settled {
            let done = p.store(offset, buf).and_then(|complete| {
                if complete {
                    p.file = None;
                    self.target.finish(&self.name, &p.temp)?;
                }
                Ok(complete)
            });
            // Best effort: a file that cannot be stored is simply not cached.
            if !matches!(done, Ok(false)) {
                p.settled = true;
                if done.is_err() {
                    p.file = None;
                    let _ = fs::remove_file(&p.temp);
                }
            }
        }
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        // Incomplete at the end of the run: nothing half-written stays in the cache.
        if !self.settled {
            self.file = None;
            let _ = fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_merges_and_completes_only_when_every_byte_is_stored() {
        let tmp = tempfile::tempdir().unwrap();
        let mut p = Partial {
            file: None,
            temp: tmp.path().join("blobs/x.incomplete"),
            covered: Vec::new(),
            len: 10,
            settled: false,
        };
        assert!(!p.store(4, b"4567").unwrap());
        assert!(!p.store(0, b"01").unwrap());
        assert!(!p.store(8, b"89").unwrap());
        assert!(p.store(1, b"123").unwrap());
        assert_eq!(std::fs::read(&p.temp).unwrap(), b"0123456789");
        p.settled = true;
    }
}
