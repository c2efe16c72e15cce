//! A model served by a byte source that is not a local folder (an in-memory one, written
//! here as the next remote source will be) reads through the same trait and gives the same
//! headers, tensors and output bytes as the local files; a source whose reads fail gives a
//! clean error naming the file.

use crate::common;
use crate::common::folder;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use mergestream::Model;
use mergestream::model::Layout;
use mergestream::output;
use mergestream::pipeline::RunOptions;
use mergestream::pipeline::reader::IoMode;
use mergestream::plan::convert::{ConvertOptions, plan_convert};
use mergestream::source::{Source, SourceFile};

/// Files in memory, with a count of bytes read and an optional point past which reads of
/// one file fail.
#[derive(Debug)]
struct MemSource {
    location: PathBuf,
    files: BTreeMap<String, Arc<Vec<u8>>>,
    bytes_read: Arc<AtomicU64>,
    /// (file, offset): reads of `file` reaching past `offset` fail.
    fail: Option<(String, u64)>,
}

impl MemSource {
    /// Every file of a local folder, served from memory under a URL-like location.
    fn copy_of(dir: &Path, location: &str) -> MemSource {
        let mut files = BTreeMap::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                let name = p.file_name().unwrap().to_str().unwrap().to_string();
                files.insert(name, Arc::new(std::fs::read(&p).unwrap()));
            }
        }
        MemSource {
            location: PathBuf::from(location),
            files,
            bytes_read: Arc::default(),
            fail: None,
        }
    }
}

impl Source for MemSource {
    fn location(&self) -> &Path {
        &self.location
    }

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.files.keys().cloned().collect())
    }

    fn file_len(&self, name: &str) -> io::Result<Option<u64>> {
        Ok(self.files.get(name).map(|f| f.len() as u64))
    }

    fn open(&self, name: &str) -> io::Result<Box<dyn SourceFile>> {
        let data =
            self.files.get(name).cloned().ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("no file {name}"))
            })?;
        let fail_at = match &self.fail {
            Some((f, at)) if f == name => Some(*at),
            _ => None,
        };
        Ok(Box::new(MemFile {
            path: self.path_of(name),
            data,
            bytes_read: self.bytes_read.clone(),
            fail_at,
        }))
    }
}

struct MemFile {
    path: PathBuf,
    data: Arc<Vec<u8>>,
    bytes_read: Arc<AtomicU64>,
    fail_at: Option<u64>,
}

impl SourceFile for MemFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        if self.fail_at.is_some_and(|at| end > at) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection reset by peer",
            ));
        }
        let src = self
            .data
            .get(offset as usize..end as usize)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        self.bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

fn quiet(io: IoMode) -> RunOptions {
    RunOptions {
        io,
        progress: false,
        ..RunOptions::default()
    }
}

/// Converts `input` (a folder, or one file of it) read locally, then read from memory; the
/// models and the output folders must be identical.
fn same_as_local(input: &Path) {
    let (dir, file) = if input.is_file() {
        let name = input.file_name().unwrap().to_str().unwrap();
        (input.parent().unwrap(), Some(name))
    } else {
        (input, None)
    };
    let mem = Arc::new(MemSource::copy_of(dir, "mem://models/x"));
    let read = mem.bytes_read.clone();
    let mem: Arc<dyn Source> = mem;
    let remote = match file {
        Some(name) => Model::from_source_file(mem.clone(), name).unwrap(),
        None => Model::from_source(mem.clone()).unwrap(),
    };
    let local = Model::open(input).unwrap();
    assert_eq!(remote.tensors(), local.tensors(), "{}", input.display());
    assert_eq!(remote.files, local.files);
    assert_eq!(remote.config().unwrap(), local.config().unwrap());
    let header_bytes = read.load(Ordering::Relaxed);
    assert!(header_bytes > 0);

    let opts = ConvertOptions {
        input: input.to_path_buf(),
        dtype: None,
        max_shard_size: 100_000,
        model_card: None,
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut outputs = BTreeMap::new();
    for io in [IoMode::Mmap, IoMode::Read] {
        let plan = plan_convert(&opts).unwrap();
        let out = tmp.path().join(format!("local-{io:?}"));
        output::run(&plan, &out, false, &quiet(io)).unwrap();
        outputs.insert(format!("local {io:?}"), folder(&out));

        // The same plan with the model (and the files copied beside it) served from memory.
        let mut plan = plan_convert(&opts).unwrap();
        let names: Vec<String> = plan.outputs.copies.iter().map(|(_, n)| n.clone()).collect();
        assert!(!names.is_empty() || file.is_some());
        plan.outputs.copies.clear();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        plan.outputs.copy_present(&mem, &names);
        assert_eq!(plan.outputs.copies.len(), names.len());
        plan.sources[0] = match file {
            Some(name) => Model::from_source_file(mem.clone(), name).unwrap(),
            None => Model::from_source(mem.clone()).unwrap(),
        };
        let out = tmp.path().join(format!("mem-{io:?}"));
        output::run(&plan, &out, false, &quiet(io)).unwrap();
        outputs.insert(format!("memory {io:?}"), folder(&out));
    }
    // Every tensor byte came through the source (the data is at least the model's size).
    assert!(read.load(Ordering::Relaxed) - header_bytes >= 2 * local.data_bytes());
    let mut all = outputs.iter();
    let (first_name, first) = all.next().unwrap();
    assert!(first.keys().any(|f| f.ends_with(".safetensors")));
    for (name, o) in all {
        assert_eq!(
            o.keys().collect::<Vec<_>>(),
            first.keys().collect::<Vec<_>>(),
            "{name} vs {first_name}: {}",
            input.display()
        );
        for (f, bytes) in o {
            assert!(bytes == &first[f], "{name} vs {first_name}: {f} differs");
        }
    }
}

#[test]
fn memory_source_gives_the_same_models_and_outputs_as_local_files() {
    let models = common::golden().join("models");
    same_as_local(&models.join("base")); // sharded safetensors with an index
    same_as_local(&models.join("base_bin")); // sharded zip pickles with an index
    same_as_local(&models.join("other_legacy_bin")); // a legacy pickle
    let torch = common::fixtures().join("torch");
    let views = torch.join("mixed_zip.bin"); // views: transposed, sliced, expanded
    let m = Model::open(&views).unwrap();
    assert!(m.tensors().iter().any(|t| t.layout != Layout::Contiguous));
    same_as_local(&views);
    same_as_local(&torch.join("bigendian_zip.bin"));
    same_as_local(&torch.join("mixed_legacy.bin"));
}

#[test]
fn failing_reads_name_the_file_and_tensor() {
    let base = common::golden().join("models/base");
    let shard = "model-00002-of-00003.safetensors";

    // Reads past the header fail: the model opens, the run fails naming file and tensor.
    let mut mem = MemSource::copy_of(&base, "mem://models/base");
    let header = 8 + u64::from_le_bytes(mem.files[shard][..8].try_into().unwrap());
    mem.fail = Some((shard.to_string(), header));
    let mem: Arc<dyn Source> = Arc::new(mem);
    let model = Model::from_source(mem.clone()).unwrap();
    let opts = ConvertOptions {
        input: base.clone(),
        dtype: None,
        max_shard_size: 100_000,
        model_card: None,
    };
    let mut plan = plan_convert(&opts).unwrap();
    plan.sources[0] = model;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let e = output::run(&plan, &out, false, &quiet(IoMode::Auto)).unwrap_err();
    let msg = e.report().to_string();
    assert!(
        msg.starts_with(&format!("mem://models/base/{shard}: model.layers.")),
        "{msg}"
    );
    assert!(
        msg.ends_with("read failed: connection reset by peer"),
        "{msg}"
    );
    assert!(!out.exists());

    // A header that cannot be read: opening fails naming the file.
    let mut mem = MemSource::copy_of(&base, "mem://models/base");
    mem.fail = Some((shard.to_string(), 4));
    let e = Model::from_source(Arc::new(mem)).unwrap_err();
    assert_eq!(
        e.report().to_string(),
        format!("mem://models/base/{shard}: cannot read: connection reset by peer")
    );
}
