//! A checkpoint of any supported format: name → (file, dtype, shape, byte range).
//!
//! [`Model::open`] accepts a directory — safetensors (single, or sharded with
//! `model.safetensors.index.json`) or PyTorch `.bin` (single, or sharded with
//! `pytorch_model.bin.index.json`) — or a single checkpoint file. [`Model::from_source`]
//! and [`Model::from_source_file`] do the same for any [`Source`] (a local folder, or a
//! remote one): every byte, headers and config.json included, is read through it. Only
//! headers (or the pickle) are read, and everything that can be checked without tensor
//! data is validated. The rest of mergestream sees only [`TensorInfo`]s, whose [`Layout`]
//! is format-neutral, so a file format plugs in here and nowhere else.

use std::collections::HashMap;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::format::index::parse_index;
use crate::format::safetensors::{header_len, parse_header};
use crate::format::strided::Strided;
use crate::format::torch_bin::index_torch_bin;
use crate::shape::RowMajor;
use crate::source::{LocalSource, Source, SourceFile, SourceReader, locate};

/// How a tensor's bytes sit in its file.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum Layout {
    /// Row-major, dense, little-endian: `len` bytes at `offset`, readable by rows.
    #[default]
    Contiguous,
    /// A strided view (transposed, sliced, expanded) and/or big-endian storage: the span at
    /// `offset` is read whole and gathered into row-major little-endian order.
    Gathered(Box<Strided>),
}

/// One tensor of a checkpoint, located in one of its files.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Index into [`Model::files`].
    pub file: usize,
    /// Absolute byte offset of the first element in the file.
    pub offset: u64,
    /// Bytes of data in row-major form.
    pub len: u64,
    pub layout: Layout,
}

impl TensorInfo {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

impl RowMajor for TensorInfo {
    fn dims(&self) -> &[u64] {
        &self.shape
    }
    fn elem_type(&self) -> DType {
        self.dtype
    }
}

/// A checkpoint, opened and validated from its headers.
#[derive(Debug)]
pub struct Model {
    /// The path the user gave (or the source's location).
    pub path: PathBuf,
    /// Where the files are; config.json and tokenizer files are read from here too.
    pub source: Arc<dyn Source>,
    /// The checkpoint files, as names within `source`.
    pub files: Vec<String>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    /// What each local file was when the model was opened (remote files are pinned by
    /// their source: a commit, an ETag).
    pins: Vec<Option<FilePin>>,
}

/// A local file's identity and state: a file replaced, rewritten or truncated differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FilePin {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FilePin {
    fn of(path: &Path) -> Option<FilePin> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FilePin {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
const BIN_INDEX: &str = "pytorch_model.bin.index.json";

/// Whether `name` ends in `.ext`.
fn has_ext(name: &str, ext: &str) -> bool {
    Path::new(name).extension().is_some_and(|x| x == ext)
}

impl Model {
    /// Open the checkpoint a user named: a local folder or file as [`Model::open`] does, or
    /// any other reference [`locate`] resolves (its bytes then come through its source).
    pub fn open_reference(reference: &Path) -> Result<Model> {
        if std::fs::metadata(reference).is_ok() {
            return Model::open(reference);
        }
        let located =
            locate(reference).map_err(|e| Error::io("cannot open", e).in_file(reference))?;
        let mut m = match &located.file {
            Some(name) => Model::from_source_file(located.source, name)?,
            None => Model::from_source(located.source)?,
        };
        m.path = reference.to_path_buf();
        Ok(m)
    }

    /// Open a local checkpoint directory or file.
    pub fn open(path: &Path) -> Result<Model> {
        let meta =
            std::fs::metadata(path).map_err(|e| Error::io("cannot open", e).in_file(path))?;
        let parent = || {
            path.parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."))
        };
        if meta.is_file() && path.extension().is_some_and(|x| x == "json") {
            // An index or config file names the folder the user meant.
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with(".index.json"))
            {
                return Model::open(&parent());
            }
            return Err(
                Error::invalid("a JSON file is not a checkpoint; give the model's folder")
                    .in_file(path),
            );
        }
        if meta.is_file() {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                return Err(Error::invalid("the file name is not UTF-8").in_file(path));
            };
            let mut m = Model::from_source_file(Arc::new(LocalSource::new(parent())), name)?;
            m.path = path.to_path_buf();
            return Ok(m);
        }
        let mut m = Model::from_source(Arc::new(LocalSource::new(path)))?;
        m.path = path.to_path_buf();
        Ok(m)
    }

    /// Open the checkpoint in a folder-like source: sharded with an index, or the files its
    /// names say are a checkpoint.
    pub fn from_source(source: Arc<dyn Source>) -> Result<Model> {
        let path = source.location().to_path_buf();
        if let Some(index) = read_small(&*source, SAFETENSORS_INDEX)? {
            return Model::open_indexed(source, SAFETENSORS_INDEX, index);
        }
        let mut listing = source
            .list()
            .map_err(|e| Error::io("cannot list", e).in_file(&path))?;
        listing.sort();
        let with_ext = |ext: &str| -> Vec<String> {
            listing
                .iter()
                .filter(|n| has_ext(n, ext))
                .cloned()
                .collect()
        };
        let mut shards = with_ext("safetensors");
        // Folders often hold other safetensors beside the model (Mistral's consolidated
        // weights, an adapter): without an index, prefer model.safetensors, then model-*.
        if shards.iter().any(|n| n == "model.safetensors") {
            shards.retain(|n| n == "model.safetensors");
        } else if shards.iter().any(|n| n.starts_with("model")) {
            shards.retain(|n| n.starts_with("model"));
        }
        if shards.is_empty() {
            if let Some(index) = read_small(&*source, BIN_INDEX)? {
                return Model::open_indexed(source, BIN_INDEX, index);
            }
            shards = with_ext("bin");
            shards.retain(|n| n.starts_with("pytorch_model"));
        }
        if shards.is_empty() {
            return Err(Error::invalid(
                "no checkpoint here: expected *.safetensors (with model.safetensors.index.json when sharded) or pytorch_model*.bin files",
            )
            .in_file(&path));
        }
        let mut tensors = Vec::new();
        for (i, shard) in shards.iter().enumerate() {
            tensors.extend(read_file_tensors(&*source, shard, i)?);
        }
        Model::assemble(&path, source, shards, tensors)
    }

    /// Open one checkpoint file, `name`, of a source.
    pub fn from_source_file(source: Arc<dyn Source>, name: &str) -> Result<Model> {
        let tensors = read_file_tensors(&*source, name, 0)?;
        let path = source.path_of(name);
        Model::assemble(&path, source, vec![name.to_string()], tensors)
    }

    fn open_indexed(source: Arc<dyn Source>, index_name: &str, bytes: Vec<u8>) -> Result<Model> {
        let index_path = source.path_of(index_name);
        let text = String::from_utf8(bytes).map_err(|_| {
            Error::io(
                "cannot read",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "stream did not contain valid UTF-8",
                ),
            )
            .in_file(&index_path)
        })?;
        let index = parse_index(&text).map_err(|e| Error::from(e).in_file(&index_path))?;
        let shard_names = index.shards();
        let mut files: Vec<String> = Vec::with_capacity(shard_names.len());
        let mut by_shard: HashMap<&str, usize> = HashMap::new();
        let mut found: Vec<TensorInfo> = Vec::new();
        for (i, name) in shard_names.iter().enumerate() {
            let exists = source
                .file_len(name)
                .map_err(|e| Error::io("cannot stat", e).in_file(source.path_of(name)))?
                .is_some();
            if !exists {
                return Err(Error::invalid(format!(
                    "the index names shard `{name}`, which does not exist"
                ))
                .in_file(&index_path));
            }
            found.extend(read_file_tensors(&*source, name, i)?);
            files.push(name.to_string());
            by_shard.insert(name, i);
        }
        let shown = |i: usize| source.path_of(&files[i]).display().to_string();
        // A tensor must live in exactly one listed shard, the one the index names.
        let mut location: HashMap<&str, usize> = HashMap::with_capacity(found.len());
        for (i, t) in found.iter().enumerate() {
            if let Some(prev) = location.insert(t.name.as_str(), i) {
                return Err(Error::invalid(format!(
                    "tensor is stored in two shards: {} and {}",
                    shown(found[prev].file),
                    shown(t.file)
                ))
                .at_tensor(&t.name)
                .in_file(&index_path));
            }
        }
        let mut tensors = Vec::with_capacity(index.weight_map.len());
        for (tensor, shard) in &index.weight_map {
            let shard_idx = by_shard[shard.as_str()];
            match location.get(tensor.as_str()) {
                Some(&i) if found[i].file == shard_idx => tensors.push(found[i].clone()),
                Some(&i) => {
                    return Err(Error::invalid(format!(
                        "the index maps it to `{shard}` but it is in `{}`",
                        shown(found[i].file)
                    ))
                    .at_tensor(tensor)
                    .in_file(&index_path));
                }
                None => {
                    return Err(Error::invalid(format!(
                        "the index maps it to `{shard}`, which does not contain it"
                    ))
                    .at_tensor(tensor)
                    .in_file(&index_path));
                }
            }
        }
        let path = source.location().to_path_buf();
        Model::assemble(&path, source, files, tensors)
    }

    fn assemble(
        path: &Path,
        source: Arc<dyn Source>,
        files: Vec<String>,
        tensors: Vec<TensorInfo>,
    ) -> Result<Model> {
        let mut by_name = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if let Some(prev) = by_name.insert(t.name.clone(), i) {
                return Err(Error::invalid(format!(
                    "tensor is stored in two files: {} and {}",
                    source.path_of(&files[tensors[prev].file]).display(),
                    source.path_of(&files[t.file]).display()
                ))
                .at_tensor(&t.name)
                .in_file(path));
            }
        }
        if tensors.is_empty() {
            return Err(Error::invalid("checkpoint holds no tensors").in_file(path));
        }
        let pins = files
            .iter()
            .map(|f| source.local_path(f).and_then(|p| FilePin::of(&p)))
            .collect();
        Ok(Model {
            path: path.to_path_buf(),
            source,
            files,
            tensors,
            by_name,
            pins,
        })
    }

    /// Check that no local checkpoint file changed since the model was opened (a copy over
    /// it, a sync client updating the folder): the run's output would mix old and new bytes.
    pub fn check_unchanged(&self) -> Result<()> {
        for (i, pin) in self.pins.iter().enumerate() {
            let Some(pin) = pin else { continue };
            let Some(path) = self.source.local_path(&self.files[i]) else {
                continue;
            };
            if FilePin::of(&path).as_ref() != Some(pin) {
                return Err(Error::invalid(
                    "changed while the run read it (replaced, rewritten or truncated); nothing was written",
                )
                .in_file(path));
            }
        }
        Ok(())
    }

    /// The identity of every checkpoint file (device, inode, size and times of a local file;
    /// see [`Source::identity`] for remote ones), for the resume fingerprint.
    pub fn identity(&self) -> String {
        let mut s = String::new();
        for (i, name) in self.files.iter().enumerate() {
            match &self.pins[i] {
                Some(pin) => s.push_str(&format!("{} {pin:?}\n", self.file_path(i).display())),
                None => s.push_str(&format!("{}\n", self.source.identity(name))),
            }
        }
        s
    }

    /// How messages name checkpoint file `i` (its path, for a local model).
    pub fn file_path(&self, i: usize) -> PathBuf {
        self.source.path_of(&self.files[i])
    }

    /// Open checkpoint file `i` for reading tensor data.
    pub fn open_file(&self, i: usize) -> Result<Box<dyn SourceFile>> {
        self.source
            .open(&self.files[i])
            .map_err(|e| Error::io("cannot open", e).in_file(self.file_path(i)))
    }

    /// The bytes of a small file beside the checkpoint (config.json, tokenizer files), or
    /// `None` when there is none.
    pub fn read_file(&self, name: &str) -> Result<Option<Vec<u8>>> {
        read_small(&*self.source, name)
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    pub fn tensor(&self, idx: usize) -> &TensorInfo {
        &self.tensors[idx]
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.len).sum()
    }

    /// The model's config.json, if it has one.
    pub fn config(&self) -> Result<Option<serde_json::Value>> {
        let Some(bytes) = self.read_file("config.json")? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Error::invalid(format!("config.json is not valid JSON: {e}"))
                .in_file(self.source.path_of("config.json"))
        })
    }

    /// The dtype most of the model's float tensors have (the model's "torch_dtype").
    pub fn main_dtype(&self) -> Option<DType> {
        let mut bytes: HashMap<DType, u64> = HashMap::new();
        for t in &self.tensors {
            if t.dtype.is_computable() {
                *bytes.entry(t.dtype).or_default() += t.len;
            }
        }
        bytes
            .into_iter()
            .max_by_key(|&(d, b)| (b, d))
            .map(|(d, _)| d)
    }
}

/// A small whole file of `source`, with the file named in errors.
fn read_small(source: &dyn Source, name: &str) -> Result<Option<Vec<u8>>> {
    source
        .read_small(name)
        .map_err(|e| Error::io("cannot read", e).in_file(source.path_of(name)))
}

/// Read the tensor list of checkpoint file `name`, dispatching on its format: safetensors
/// by name, PyTorch pickles (zip or legacy) by name or by their magic bytes.
fn read_file_tensors(source: &dyn Source, name: &str, file_idx: usize) -> Result<Vec<TensorInfo>> {
    let path = source.path_of(name);
    let f = source
        .open(name)
        .map_err(|e| Error::io("cannot open", e).in_file(&path))?;
    let f = &*f;
    let ext = Path::new(name)
        .extension()
        .and_then(|x| x.to_str())
        .unwrap_or("");
    let torch = match ext {
        "safetensors" => false,
        "bin" | "pt" | "pth" | "ckpt" => true,
        _ => {
            let mut head = [0u8; 4];
            f.len() >= 4
                && f.read_at(0, &mut head)
                    .map_err(|e| Error::io("cannot read", e).in_file(&path))
                    .map(|()| {
                        head == *b"PK\x03\x04"
                            || (head[0] == 0x80 && head[2] == 0x8a && head[3] == 0x0a)
                    })?
        }
    };
    let tensors = if torch {
        read_torch(f, file_idx)
    } else {
        read_safetensors(f, file_idx)
    };
    tensors.map_err(|e| e.in_file(&path))
}

/// A PyTorch `.bin` (zip or legacy pickle), read through the restricted unpickler.
fn read_torch(f: &dyn SourceFile, file_idx: usize) -> Result<Vec<TensorInfo>> {
    // The error names the tensor it concerns in its place (see `From<TorchBinError>`).
    let bin = index_torch_bin(BufReader::new(SourceReader::new(f)))?;
    let mut out = Vec::with_capacity(bin.tensors.len());
    for loc in bin.tensors {
        let len = loc
            .nbytes()
            .ok_or_else(|| Error::invalid("tensor size overflows").at_tensor(&loc.name))?;
        let layout = if loc.contiguous && !loc.big_endian {
            Layout::Contiguous
        } else {
            Layout::Gathered(Box::new(loc.view()))
        };
        out.push(TensorInfo {
            name: loc.name,
            dtype: loc.dtype,
            shape: loc.shape,
            file: file_idx,
            offset: loc.byte_offset,
            len,
            layout,
        });
    }
    Ok(out)
}

fn read_safetensors(f: &dyn SourceFile, file_idx: usize) -> Result<Vec<TensorInfo>> {
    let len = f.len();
    let mut prefix = [0u8; 8];
    let got = len.min(8) as usize;
    f.read_at(0, &mut prefix[..got])
        .map_err(|e| Error::io("cannot read", e))?;
    let n = header_len(&prefix[..got], len)?;
    let mut bytes = vec![0u8; 8 + n as usize];
    bytes[..8].copy_from_slice(&prefix);
    f.read_at(8, &mut bytes[8..])
        .map_err(|e| Error::io("cannot read header", e))?;
    let header = parse_header(&bytes, len)?;
    Ok(header
        .tensors
        .into_iter()
        .map(|t| TensorInfo {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            file: file_idx,
            offset: header.data_start + t.begin,
            len: t.end - t.begin,
            layout: Layout::Contiguous,
        })
        .collect())
}
