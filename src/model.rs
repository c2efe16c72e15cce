//! A checkpoint of any supported format: name → (file, dtype, shape, byte range).
//!
//! [`Model::open`] accepts a directory — safetensors (single, or sharded with
//! `model.safetensors.index.json`) or PyTorch `.bin` (single, or sharded with
//! `pytorch_model.bin.index.json`) — or a single checkpoint file. It reads headers (or the
//! pickle) only and validates everything that can be checked without tensor data. The rest
//! of mergestream sees only [`TensorInfo`]s, so a file format plugs in here and nowhere
//! else.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::dtype::DType;
use crate::error::{Context, Error, Result};
use crate::format::index::parse_index;
use crate::format::safetensors::{header_len, parse_header};
use crate::format::torch_bin::{TensorLocation, index_torch_bin};

/// How a tensor's bytes sit in its file.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum Layout {
    /// Row-major, dense, little-endian: `len` bytes at `offset`, readable by rows.
    #[default]
    Contiguous,
    /// A PyTorch view (transposed, sliced, expanded) and/or big-endian storage: the span at
    /// `offset` is read whole and gathered into row-major little-endian order.
    Gathered(Box<TensorLocation>),
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

    /// Rows for chunked processing: the first dimension (1 for a scalar).
    pub fn rows(&self) -> u64 {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Elements in one row: the product of all dimensions but the first.
    pub fn row_elems(&self) -> u64 {
        // Saturating: an empty tensor may have huge other dimensions.
        self.shape
            .iter()
            .skip(1)
            .fold(1u64, |a, &d| a.saturating_mul(d))
    }

    pub fn row_bytes(&self) -> u64 {
        self.row_elems() * self.dtype.bits() / 8
    }
}

/// A checkpoint, opened and validated from its headers.
#[derive(Debug)]
pub struct Model {
    /// The path the user gave.
    pub path: PathBuf,
    /// The folder holding config.json and tokenizer files.
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
const BIN_INDEX: &str = "pytorch_model.bin.index.json";

impl Model {
    /// Open a checkpoint directory or file.
    pub fn open(path: &Path) -> Result<Model> {
        let meta =
            std::fs::metadata(path).map_err(|e| Error::io("cannot open", e).in_file(path))?;
        if meta.is_file() && path.extension().is_some_and(|x| x == "json") {
            // An index or config file names the folder the user meant.
            let dir = path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with(".index.json"))
            {
                return Model::open(&dir);
            }
            return Err(
                Error::invalid("a JSON file is not a checkpoint; give the model's folder")
                    .in_file(path),
            );
        }
        if meta.is_file() {
            let dir = path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            let tensors = read_file_tensors(path, 0)?;
            return Model::assemble(path, dir, vec![path.to_path_buf()], tensors);
        }
        let index_path = path.join(SAFETENSORS_INDEX);
        if index_path.is_file() {
            return Model::open_indexed(path, &index_path);
        }
        let listing: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io("cannot list", e).in_file(path))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        let with_ext = |ext: &str| -> Vec<PathBuf> {
            let mut v: Vec<PathBuf> = listing
                .iter()
                .filter(|p| p.extension().is_some_and(|x| x == ext))
                .cloned()
                .collect();
            v.sort();
            v
        };
        let mut shards = with_ext("safetensors");
        // Folders often hold other safetensors beside the model (Mistral's consolidated
        // weights, an adapter): without an index, prefer model.safetensors, then model-*.
        let named = |p: &PathBuf, f: &dyn Fn(&str) -> bool| {
            p.file_name().is_some_and(|n| f(&n.to_string_lossy()))
        };
        if shards
            .iter()
            .any(|p| named(p, &|n| n == "model.safetensors"))
        {
            shards.retain(|p| named(p, &|n| n == "model.safetensors"));
        } else if shards.iter().any(|p| named(p, &|n| n.starts_with("model"))) {
            shards.retain(|p| named(p, &|n| n.starts_with("model")));
        }
        if shards.is_empty() {
            let bin_index = path.join(BIN_INDEX);
            if bin_index.is_file() {
                return Model::open_indexed(path, &bin_index);
            }
            shards = with_ext("bin");
            shards.retain(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("pytorch_model"))
            });
        }
        if shards.is_empty() {
            return Err(Error::invalid(
                "no checkpoint here: expected *.safetensors (with model.safetensors.index.json when sharded) or pytorch_model*.bin files",
            )
            .in_file(path));
        }
        let mut tensors = Vec::new();
        for (i, shard) in shards.iter().enumerate() {
            tensors.extend(read_file_tensors(shard, i)?);
        }
        Model::assemble(path, path.to_path_buf(), shards, tensors)
    }

    fn open_indexed(dir: &Path, index_path: &Path) -> Result<Model> {
        let text = std::fs::read_to_string(index_path)
            .map_err(|e| Error::io("cannot read", e).in_file(index_path))?;
        let index = parse_index(&text).in_file(index_path)?;
        let shard_names = index.shards();
        let mut files = Vec::with_capacity(shard_names.len());
        let mut by_shard: HashMap<&str, usize> = HashMap::new();
        let mut found: Vec<TensorInfo> = Vec::new();
        for (i, name) in shard_names.iter().enumerate() {
            let shard = dir.join(name);
            if !shard.is_file() {
                return Err(Error::invalid(format!(
                    "the index names shard `{name}`, which does not exist"
                ))
                .in_file(index_path));
            }
            found.extend(read_file_tensors(&shard, i)?);
            files.push(shard);
            by_shard.insert(name, i);
        }
        // A tensor must live in exactly one listed shard, the one the index names.
        let mut location: HashMap<&str, usize> = HashMap::with_capacity(found.len());
        for (i, t) in found.iter().enumerate() {
            if let Some(prev) = location.insert(t.name.as_str(), i) {
                return Err(Error::invalid(format!(
                    "tensor is stored in two shards: {} and {}",
                    files[found[prev].file].display(),
                    files[t.file].display()
                ))
                .at_tensor(&t.name)
                .in_file(index_path));
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
                        files[found[i].file].display()
                    ))
                    .at_tensor(tensor)
                    .in_file(index_path));
                }
                None => {
                    return Err(Error::invalid(format!(
                        "the index maps it to `{shard}`, which does not contain it"
                    ))
                    .at_tensor(tensor)
                    .in_file(index_path));
                }
            }
        }
        Model::assemble(dir, dir.to_path_buf(), files, tensors)
    }

    fn assemble(
        path: &Path,
        dir: PathBuf,
        files: Vec<PathBuf>,
        tensors: Vec<TensorInfo>,
    ) -> Result<Model> {
        let mut by_name = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if let Some(prev) = by_name.insert(t.name.clone(), i) {
                return Err(Error::invalid(format!(
                    "tensor is stored in two files: {} and {}",
                    files[tensors[prev].file].display(),
                    files[t.file].display()
                ))
                .at_tensor(&t.name)
                .in_file(path));
            }
        }
        if tensors.is_empty() {
            return Err(Error::invalid("checkpoint holds no tensors").in_file(path));
        }
        Ok(Model {
            path: path.to_path_buf(),
            dir,
            files,
            tensors,
            by_name,
        })
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
        let p = self.dir.join("config.json");
        if !p.is_file() {
            return Ok(None);
        }
        let text =
            std::fs::read_to_string(&p).map_err(|e| Error::io("cannot read", e).in_file(&p))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::invalid(format!("config.json is not valid JSON: {e}")).in_file(&p))
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

/// Read the tensor list of one checkpoint file, dispatching on its format: safetensors by
/// name, PyTorch pickles (zip or legacy) by name or by their magic bytes.
fn read_file_tensors(path: &Path, file_idx: usize) -> Result<Vec<TensorInfo>> {
    let mut f = File::open(path).map_err(|e| Error::io("cannot open", e).in_file(path))?;
    let len = f
        .metadata()
        .map_err(|e| Error::io("cannot stat", e).in_file(path))?
        .len();
    let ext = path.extension().and_then(|x| x.to_str()).unwrap_or("");
    let torch = match ext {
        "safetensors" => false,
        "bin" | "pt" | "pth" | "ckpt" => true,
        _ => {
            let mut head = [0u8; 4];
            let n = read_up_to(&mut f, &mut head)
                .map_err(|e| Error::io("cannot read", e).in_file(path))?;
            use std::io::Seek;
            f.rewind()
                .map_err(|e| Error::io("cannot read", e).in_file(path))?;
            n == 4
                && (head == *b"PK\x03\x04"
                    || (head[0] == 0x80 && head[2] == 0x8a && head[3] == 0x0a))
        }
    };
    if torch {
        return read_torch(f, file_idx).in_file(path);
    }
    read_safetensors(&mut f, len, file_idx).in_file(path)
}

/// A PyTorch `.bin` (zip or legacy pickle), read through the restricted unpickler.
fn read_torch(f: File, file_idx: usize) -> Result<Vec<TensorInfo>> {
    let bin = index_torch_bin(std::io::BufReader::new(f)).map_err(|e| {
        // Name the tensor in its place in the message when the error concerns one.
        use crate::format::torch_bin::TorchBinError as T;
        match &e {
            T::MissingStorage { name, key } => Error::invalid(format!(
                "uses storage {key:?}, which the file does not contain"
            ))
            .at_tensor(name),
            T::Span { name, source } => Error::invalid(source.to_string()).at_tensor(name),
            T::Gather { name, reason } => Error::invalid(reason.to_string()).at_tensor(name),
            _ => Error::invalid(e.to_string()),
        }
    })?;
    let mut out = Vec::with_capacity(bin.tensors.len());
    for loc in bin.tensors {
        let dtype = DType::from_safetensors(loc.dtype.safetensors_name()).ok_or_else(|| {
            Error::invalid(format!(
                "unsupported dtype {}",
                loc.dtype.safetensors_name()
            ))
            .at_tensor(&loc.name)
        })?;
        let len = loc
            .nbytes()
            .ok_or_else(|| Error::invalid("tensor size overflows").at_tensor(&loc.name))?;
        let layout = if loc.contiguous && !loc.big_endian {
            Layout::Contiguous
        } else {
            Layout::Gathered(Box::new(loc.clone()))
        };
        out.push(TensorInfo {
            name: loc.name,
            dtype,
            shape: loc.shape,
            file: file_idx,
            offset: loc.byte_offset,
            len,
            layout,
        });
    }
    Ok(out)
}

fn read_safetensors(f: &mut File, len: u64, file_idx: usize) -> Result<Vec<TensorInfo>> {
    let mut prefix = [0u8; 8];
    let got = read_up_to(f, &mut prefix).map_err(|e| Error::io("cannot read", e))?;
    let n = header_len(&prefix[..got], len)?;
    let mut bytes = vec![0u8; 8 + n as usize];
    bytes[..8].copy_from_slice(&prefix);
    f.read_exact(&mut bytes[8..])
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

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}
