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

use super::pickle::{
    DType, Limits, PickleError, PidFlavor, SpanError, StateDict, parse_state_dict,
};
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
        self.numel()?.checked_mul(self.dtype.size())
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
/// row-major order. Works for contiguous tensors too (a plain copy). Byte order is left
/// as stored. The output is `nbytes()` long, which for an expanded tensor (stride 0) can
/// be much larger than the span: callers with a memory budget should check `nbytes()`.
pub fn gather_strided(span: &[u8], t: &TensorLocation) -> Result<Vec<u8>, TorchBinError> {
    let fail = |reason| TorchBinError::Gather {
        name: t.name.clone(),
        reason,
    };
    if u64::try_from(span.len()).ok() != Some(t.byte_len) {
        return Err(fail("span length differs from byte_len"));
    }
    let es = usize::try_from(t.dtype.size()).map_err(|_| fail("element size overflows"))?;
    let total = t.nbytes().ok_or_else(|| fail("tensor size overflows"))?;
    let total = usize::try_from(total).map_err(|_| fail("tensor does not fit in memory"))?;
    if total == 0 {
        return Ok(Vec::new());
    }
    if t.contiguous {
        return Ok(span.to_vec());
    }
    let strides: Vec<usize> = t
        .strides
        .iter()
        .map(|&s| usize::try_from(s))
        .collect::<Result<_, _>>()
        .map_err(|_| fail("stride overflows"))?;
    let shape: Vec<usize> = t
        .shape
        .iter()
        .map(|&s| usize::try_from(s))
        .collect::<Result<_, _>>()
        .map_err(|_| fail("shape overflows"))?;
    let mut out = Vec::with_capacity(total);
    // An odometer over the index space, keeping the element offset incrementally so each
    // element costs O(1) amortized and the walk needs no recursion.
    let mut idx = vec![0usize; shape.len()];
    let mut elem = 0usize;
    loop {
        let byte = elem
            .checked_mul(es)
            .ok_or_else(|| fail("offset overflows"))?;
        let end = byte
            .checked_add(es)
            .ok_or_else(|| fail("offset overflows"))?;
        out.extend_from_slice(
            span.get(byte..end)
                .ok_or_else(|| fail("element outside the span"))?,
        );
        // Advance the last dimension, carrying into earlier ones.
        let mut d = shape.len();
        loop {
            let Some(nd) = d.checked_sub(1) else {
                return Ok(out);
            };
            d = nd;
            let (Some(i), Some(&n), Some(&s)) = (idx.get_mut(d), shape.get(d), strides.get(d))
            else {
                return Err(fail("internal index error"));
            };
            *i = i.saturating_add(1);
            elem = elem
                .checked_add(s)
                .ok_or_else(|| fail("offset overflows"))?;
            if *i < n {
                break;
            }
            // Wrap this dimension back to 0.
            let back = n.checked_mul(s).ok_or_else(|| fail("offset overflows"))?;
            elem = elem
                .checked_sub(back)
                .ok_or_else(|| fail("offset underflows"))?;
            *i = 0;
        }
    }
}
