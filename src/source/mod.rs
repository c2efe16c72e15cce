//! Where a model's bytes come from: the one trait a new kind of model location implements.
//!
//! A [`Source`] is a model location — a local folder today; a Hub repo at a commit, an HTTP
//! folder or an S3 prefix next. It lists its files by relative name, tells a file's length,
//! reads small whole files (config.json, tokenizer files, an index) and opens a file as a
//! [`SourceFile`]. An opened file answers positional reads from any thread (`&self`, `Send +
//! Sync`), and — only when its bytes are a local file — maps a range, so local files keep
//! their memory-mapped path. [`SourceReader`] gives `Read + Seek` over an opened file for the
//! header and pickle parsers, which are generic over `Read + Seek`.
//!
//! Design choices:
//! - Names are relative, `/`-separated strings; how a file is named in messages is the
//!   source's business ([`Source::path_of`]), so errors name a local file by its path as
//!   before and a remote one by its URL.
//! - Methods return `io::Result`: the caller (the model, the pipeline) adds the file and the
//!   tensor to the error, so every source's failures read the same.
//! - Nothing here decides mmap versus reads: the pipeline's reader does, from `--io` and
//!   [`SourceFile::prefers_reads`]; a source without [`SourceFile::map`] is always read.
//!
//! [`LocalSource`] is the local implementation.

mod hf_cache;
mod hf_cache_writer;
pub mod http;
pub mod hub;
mod local;
mod locate;
mod reference;
mod s3;
mod sigbus;

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Deref;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

pub use hf_cache::{HfEnv, cached_commit, cached_snapshot, offline_missing, repo_dir};
pub use hf_cache_writer::CachingSource;
pub use http::{HttpClient, HttpConfig, HttpFile, HttpSource};
pub use hub::{HubConfig, HubSource};
pub use local::{LocalSource, is_network_fs};
pub use locate::{Environment, Located, locate, locate_in, set_environment};
pub use reference::{Reference, parse_reference, validate_repo_id, validate_revision};
pub use s3::{S3Config, S3Source};

/// A model location: a set of files with relative names.
pub trait Source: Send + Sync + fmt::Debug {
    /// The location as messages show it (a folder path; a URL for a remote source).
    fn location(&self) -> &Path;

    /// How messages name file `name` of this source.
    fn path_of(&self, name: &str) -> PathBuf {
        self.location().join(name)
    }

    /// The files at the top level of the location, as relative names (no folders).
    fn list(&self) -> io::Result<Vec<String>>;

    /// The length of file `name`, or `None` when the source has no such file.
    fn file_len(&self, name: &str) -> io::Result<Option<u64>>;

    /// Open file `name` for positional reads.
    fn open(&self, name: &str) -> io::Result<Box<dyn SourceFile>>;

    /// The whole of a small file (config.json, tokenizer files, an index), or `None` when
    /// the source has no such file.
    fn read_small(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        if self.file_len(name)?.is_none() {
            return Ok(None);
        }
        let f = self.open(name)?;
        let len = usize::try_from(f.len())
            .map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "file too large"))?;
        let mut v = vec![0u8; len];
        f.read_at(0, &mut v)?;
        Ok(Some(v))
    }

    /// Bytes fetched over the network so far (retries included), for remote sources that
    /// count them; `None` for local ones.
    fn bytes_fetched(&self) -> Option<u64> {
        None
    }

    /// What identifies the current contents of file `name` for a later run (the resume
    /// fingerprint): a run resumes another's work only when every input's identity is the
    /// same. Remote sources: the name and length (a Hub source's name carries its commit).
    fn identity(&self, name: &str) -> String {
        let len = self.file_len(name).ok().flatten();
        format!("{} {len:?}", self.path_of(name).display())
    }

    /// File `name` as a local path, when the source is a local folder (used to refuse
    /// writing the output over an input).
    fn local_path(&self, name: &str) -> Option<PathBuf> {
        let _ = name;
        None
    }
}

/// One opened file of a [`Source`]: positional reads, safe from several threads at once.
pub trait SourceFile: Send + Sync {
    /// How messages name the file.
    fn path(&self) -> &Path;

    /// The file's length in bytes (fixed when it was opened).
    fn len(&self) -> u64;

    /// Whether the file is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fill `buf` with the bytes at `offset`; fewer bytes than asked for is an error
    /// (`UnexpectedEof`).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Map `len` bytes at `offset` when the bytes are a local file; `None` otherwise. The
    /// mapping is released when the [`Mapped`] drops.
    fn map(&self, offset: u64, len: usize) -> Option<io::Result<Mapped>> {
        let _ = (offset, len);
        None
    }

    /// Whether `--io auto` should read rather than map (network and remote files).
    fn prefers_reads(&self) -> bool {
        true
    }
}

/// A range of a memory-mapped file (the mapping starts on a page boundary at or before it),
/// guarded against its file being truncated (the `sigbus` module).
pub struct Mapped {
    // Declared first, dropped first: unregistered before the mapping goes away.
    _guard: sigbus::Guard,
    map: Mmap,
    start: usize,
    len: usize,
}

impl Mapped {
    /// `len` bytes at `start` of `map`; `None` when they lie outside it.
    pub fn new(map: Mmap, start: usize, len: usize) -> Option<Mapped> {
        let end = start.checked_add(len)?;
        (end <= map.len()).then(|| Mapped {
            _guard: sigbus::guard(map.as_ptr(), map.len()),
            map,
            start,
            len,
        })
    }
}

impl Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // In bounds: checked by `new`.
        self.map
            .get(self.start..self.start + self.len)
            .unwrap_or(&[])
    }
}

/// `Read + Seek` over an opened file, for the parsers. Wrap it in a `BufReader` for parsers
/// that read a few bytes at a time.
pub struct SourceReader<'a> {
    file: &'a dyn SourceFile,
    pos: u64,
}

impl<'a> SourceReader<'a> {
    pub fn new(file: &'a dyn SourceFile) -> SourceReader<'a> {
        SourceReader { file, pos: 0 }
    }
}

impl Read for SourceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.file.len().saturating_sub(self.pos);
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        let Some(dst) = buf.get_mut(..n) else {
            return Ok(0);
        };
        if n == 0 {
            return Ok(0);
        }
        self.file.read_at(self.pos, dst)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for SourceReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let base = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.file.len().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match base {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the file",
            )),
        }
    }
}
