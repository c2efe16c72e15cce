//! PyTorch `.bin` checkpoints of either format: where every tensor's bytes are.
//!
//! [`index_torch_bin`] tells the zip format (starts with a local file header, `PK\3\4`, as
//! torch's own loader checks) from the legacy format (starts with the pickled magic
//! number), indexes the file with [`super::torch_zip`] or [`super::torch_legacy`], and
//! turns each tensor of the state dict into a [`TensorLocation`]: absolute byte offset and
//! span in the file, dtype, shape and strides. Nothing here reads tensor data.
//!
//! Checks, all with checked arithmetic: every storage a tensor names exists; a zip
//! storage record is exactly `numel × element size` bytes, as the pickle declared (torch
//! checks the same); the tensor's elements (offset, shape, strides) lie inside its
//! storage.
//!
//! Non-contiguous tensors (transposed, sliced with a step, expanded) are reported, not
//! refused: `contiguous` is false, `strides` say how to walk the span, and
//! [`gather_strided`] copies such a span into row-major order. For contiguous tensors the
//! span is exactly the tensor's bytes. Tensors may share storage (tied weights, views);
//! their spans then overlap, and `storage_key` says so.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use thiserror::Error;

use crate::dtype::DType;

use super::pickle::{
    Limits, PickleError, PidFlavor, SpanError, StateDict, elem_bytes, parse_state_dict,
};
use super::strided::Strided;
use super::torch_legacy::{LegacyError, index_legacy};
use super::torch_zip::{StorageLocation, ZipError, index_zip};

/// Which on-disk format a `.bin` file uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TorchFormat {
    Zip,
    Legacy,
}

/// One tensor's place in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorLocation {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Strides in elements.
    pub strides: Vec<u64>,
    /// Absolute file offset of the tensor's first element.
    pub byte_offset: u64,
    /// Bytes from the first to one past the last addressed element. Equals
    /// `numel × dtype size` when `contiguous`; 0 for empty tensors.
    pub byte_len: u64,
    /// Row-major and dense: the span is the tensor, ready to copy.
    pub contiguous: bool,
    /// Elements are stored big-endian (zip `byteorder` = `big`) and need byte-swapping.
    pub big_endian: bool,
    /// The storage the tensor lives in; equal keys mean shared (possibly overlapping) bytes.
    pub storage_key: Arc<str>,
}

impl TensorLocation {
    /// Number of elements (checked).
    pub fn numel(&self) -> Option<u64> {
        super::pickle::numel(&self.shape)
    }

    /// Size of the tensor in row-major form (checked).
    pub fn nbytes(&self) -> Option<u64> {
        self.numel()?.checked_mul(elem_bytes(self.dtype))
    }

    /// The format-neutral description of where the elements are in the span.
    pub fn view(&self) -> Strided {
        Strided {
            elem_size: elem_bytes(self.dtype),
            span: self.byte_len,
            shape: self.shape.clone(),
            strides: self.strides.clone(),
            contiguous: self.contiguous,
            big_endian: self.big_endian,
        }
    }
}

/// A `.bin` file's tensors, in the order the pickle lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TorchBin {
    pub format: TorchFormat,
    pub tensors: Vec<TensorLocation>,
}

#[derive(Debug, Error)]
pub enum TorchBinError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a PyTorch checkpoint (file starts with {0})")]
    UnknownFormat(String),
    #[error(transparent)]
    Zip(#[from] ZipError),
    #[error(transparent)]
    Legacy(#[from] LegacyError),
    #[error("data.pkl: {0}")]
    Pickle(#[from] PickleError),
    #[error("tensor {name:?} uses storage {key:?}, which the file does not contain")]
    MissingStorage { name: String, key: String },
    #[error("storage {key:?} record is {found} bytes but the pickle declares {expected} bytes")]
    WrongRecordSize {
        key: String,
        found: u64,
        expected: u64,
    },
    #[error("tensor {name:?}: {source}")]
    Span { name: String, source: SpanError },
    #[error("tensor {name:?}: {reason}")]
    Gather { name: String, reason: &'static str },
}

impl TorchBinError {
    /// The tensor the error concerns, if it concerns one.
    pub fn tensor(&self) -> Option<&str> {
        match self {
            TorchBinError::MissingStorage { name, .. }
            | TorchBinError::Span { name, .. }
            | TorchBinError::Gather { name, .. } => Some(name),
            _ => None,
        }
    }

    /// The message without the tensor's name, for an error that names it in its own place.
    pub fn detail(&self) -> String {
        match self {
            TorchBinError::MissingStorage { key, .. } => {
                format!("uses storage {key:?}, which the file does not contain")
            }
            TorchBinError::Span { source, .. } => source.to_string(),
            TorchBinError::Gather { reason, .. } => (*reason).to_string(),
            e => e.to_string(),
        }
    }
}

const ZIP_MAGIC: &[u8; 4] = b"PK\x03\x04";

/// The legacy format opens with the magic-number pickle: PROTO n, LONG1 of 10 bytes.
fn is_legacy(head: &[u8]) -> bool {
    matches!(head, [0x80, _, 0x8a, 0x0a])
}

/// Detects the format and locates every tensor.
pub fn index_torch_bin<R: Read + Seek>(mut r: R) -> Result<TorchBin, TorchBinError> {
    let file_len = r.seek(SeekFrom::End(0))?;
    let mut head = [0u8; 4];
    let n = usize::try_from(file_len.min(4)).unwrap_or(4);
    r.seek(SeekFrom::Start(0))?;
    let head = head.get_mut(..n).unwrap_or(&mut []);
    r.read_exact(head)?;
    if head == ZIP_MAGIC {
        r.seek(SeekFrom::Start(0))?;
        let z = index_zip(&mut r)?;
        let (sd, _) = parse_state_dict(&z.pickle, PidFlavor::Zip, &Limits::default())?;
        let tensors = locate_all(&sd, z.big_endian, |key| z.storages.get(key).copied())?;
        Ok(TorchBin {
            format: TorchFormat::Zip,
            tensors,
        })
    } else if is_legacy(head) {
        let l = index_legacy(&mut r)?;
        let tensors = locate_all(&l.state_dict, false, |key| l.storages.get(key).copied())?;
        Ok(TorchBin {
            format: TorchFormat::Legacy,
            tensors,
        })
    } else {
        let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
        Err(TorchBinError::UnknownFormat(if hex.is_empty() {
            "nothing (empty file)".into()
        } else {
            hex.join(" ")
        }))
    }
}

fn locate_all(
    sd: &StateDict,
    big_endian: bool,
    storage: impl Fn(&str) -> Option<StorageLocation>,
) -> Result<Vec<TensorLocation>, TorchBinError> {
    sd.tensors
        .iter()
        .map(|(name, t)| {
            let loc = storage(&t.storage_key).ok_or_else(|| TorchBinError::MissingStorage {
                name: name.clone(),
                key: t.storage_key.to_string(),
            })?;
            let span_err = |source| TorchBinError::Span {
                name: name.clone(),
                source,
            };
            let expected = t
                .storage_nbytes()
                .ok_or(SpanError::Overflow)
                .map_err(span_err)?;
            if loc.len != expected {
                return Err(TorchBinError::WrongRecordSize {
                    key: t.storage_key.to_string(),
                    found: loc.len,
                    expected,
                });
            }
            let (start, end) = t.storage_byte_span().map_err(span_err)?;
            let byte_offset = loc
                .offset
                .checked_add(start)
                .ok_or(SpanError::Overflow)
                .map_err(span_err)?;
            Ok(TensorLocation {
                name: name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                strides: t.strides.clone(),
                byte_offset,
                byte_len: end.saturating_sub(start),
                contiguous: t.is_contiguous(),
                big_endian,
                storage_key: t.storage_key.clone(),
            })
        })
        .collect()
}

/// Copies a tensor's elements from its span (the `byte_len` bytes at `byte_offset`) into
/// row-major order ([`Strided::gather_raw`]). Byte order is left as stored.
pub fn gather_strided(span: &[u8], t: &TensorLocation) -> Result<Vec<u8>, TorchBinError> {
    t.view()
        .gather_raw(span)
        .map_err(|e| TorchBinError::Gather {
            name: t.name.clone(),
            reason: e.0,
        })
}
