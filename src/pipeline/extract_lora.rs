//! Running an extraction: one module at a time — read the weight of both models, diff,
//! decompose, write the factors — so memory holds one weight pair and its SVD, never a model.
//!
//! With `--sv-epsilon` the ranks are known only after each SVD, so the header cannot be
//! written first as the merge pipeline does. Instead the header's space is reserved at its
//! largest possible size (every rank at its maximum: shapes and offsets can only shrink, and
//! so their digits), tensors are written one after the other behind it, and the real header,
//! padded with spaces (as safetensors writers pad anyway), goes in front at the end.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, ErrorKind, Result};
use crate::format::safetensors::{OutEntry, write_header};
use crate::kernels::bytes::{decode, encode, round_to};
use crate::methods::extract_lora::{decompose, subtract};
use crate::model::Model;
use crate::plan::extract_lora::{ExtractPlan, Job, OutTensor};
use crate::shape::RowMajor;

use super::reader::{InputFile, IoMode, read_rows};

/// The adapter's weights file.
pub const ADAPTER_FILE: &str = "adapter_model.safetensors";

/// Whole tensors copied in pieces of at most this many bytes.
const COPY_CHUNK: u64 = 64 << 20;

/// What an extraction produced.
#[derive(Debug, Default)]
pub struct ExtractStats {
    /// Each decomposed module and its rank, in plan order.
    pub ranks: Vec<(String, usize)>,
    pub tensors: usize,
    pub bytes_written: u64,
}

/// Input files opened on first use, kept for the run.
struct Inputs<'a> {
    model: &'a Model,
    io: IoMode,
    open: HashMap<usize, InputFile>,
}

impl Inputs<'_> {
    fn file(&mut self, i: usize) -> Result<&InputFile> {
        if !self.open.contains_key(&i) {
            let f = InputFile::new(self.model.open_file(i)?, self.io);
            self.open.insert(i, f);
        }
        self.open
            .get(&i)
            .ok_or_else(|| Error::internal("an input file was not kept open"))
    }

    /// Tensor `idx` as f32 values.
    fn f32(&mut self, idx: usize) -> Result<Vec<f32>> {
        let t = self.model.tensor(idx);
        let bytes = read_rows(self.file(t.file)?, t, None)?;
        let n = usize::try_from(t.numel())
            .map_err(|_| Error::invalid("too large for this machine").at_tensor(&t.name))?;
        let mut v = vec![0f32; n];
        decode(t.dtype, &bytes, &mut v);
        Ok(v)
    }

    /// `acc -= tensor idx`, decoding a bounded piece at a time (so a diff holds one f32
    /// matrix, not three).
    fn subtract_from(&mut self, idx: usize, acc: &mut [f32]) -> Result<()> {
        const PIECE: usize = 1 << 20;
        let t = self.model.tensor(idx);
        let bytes = read_rows(self.file(t.file)?, t, None)?;
        let size = t.dtype.size();
        if bytes.len() != acc.len() * size {
            return Err(Error::internal("operand sizes differ").at_tensor(&t.name));
        }
        let mut tmp = vec![0f32; PIECE.min(acc.len())];
        for (a, b) in acc.chunks_mut(PIECE).zip(bytes.chunks(PIECE * size)) {
            let tmp = &mut tmp[..a.len()];
            decode(t.dtype, b, tmp);
            subtract(a, tmp);
        }
        Ok(())
    }
}

/// The output file: tensors appended behind a reserved header.
struct Writer {
    path: PathBuf,
    file: File,
    header_len: usize,
    cursor: u64,
    entries: Vec<(OutTensor, u64, u64)>,
}

impl Writer {
    fn put(&mut self, t: OutTensor, bytes: &[u8]) -> Result<()> {
        let begin = self.cursor;
        self.append(bytes)?;
        self.entries.push((t, begin, self.cursor));
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        let at = 8 + self.header_len as u64 + self.cursor;
        self.file
            .write_all_at(bytes, at)
            .map_err(|e| Error::io("write failed", e).in_file(&self.path))?;
        self.cursor += bytes.len() as u64;
        Ok(())
    }

    /// Write the real header into the reserved space; entries sorted by name, as
    /// safetensors' own writer orders them.
    fn finish(mut self) -> Result<u64> {
        self.entries.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        let out: Vec<OutEntry<'_>> = self
            .entries
            .iter()
            .map(|(t, b, e)| OutEntry {
                name: &t.name,
                dtype: t.dtype,
                shape: &t.shape,
                begin: *b,
                end: *e,
            })
            .collect();
        let header = write_header(&out);
        let json = header.get(8..).unwrap_or_default();
        let json = json.trim_ascii_end();
        if json.len() > self.header_len {
            return Err(Error::internal(format!(
                "the header needs {} bytes but {} were reserved",
                json.len(),
                self.header_len
            ))
            .in_file(&self.path));
        }
        let mut h = Vec::with_capacity(8 + self.header_len);
        h.extend_from_slice(&(self.header_len as u64).to_le_bytes());
        h.extend_from_slice(json);
        h.resize(8 + self.header_len, b' ');
        self.file
            .write_all_at(&h, 0)
            .map_err(|e| Error::io("write failed", e).in_file(&self.path))?;
        self.file
            .sync_all()
            .map_err(|e| Error::io("fsync failed", e).in_file(&self.path))?;
        Ok(8 + self.header_len as u64 + self.cursor)
    }
}

/// Extract into folder `dir` (the staging folder): writes [`ADAPTER_FILE`] only; the caller
/// writes adapter_config.json (it needs the ranks) and the README. `cancel` is checked
/// between modules.
pub fn execute_extraction(
    plan: &ExtractPlan,
    dir: &Path,
    io: IoMode,
    cancel: &AtomicBool,
) -> Result<ExtractStats> {
    super::allocator::keep_freed_buffers();
    // Reserve the header at its largest: every rank at its maximum, every offset as large
    // as the whole data.
    let upper: Vec<OutTensor> = plan
        .jobs
        .iter()
        .flat_map(|j| j.outputs(plan, j.max_rank(&plan.svd)))
        .collect();
    let total: u64 = upper
        .iter()
        .map(|t| t.shape.iter().product::<u64>() * t.dtype.size() as u64)
        .sum();
    let widest: Vec<OutEntry<'_>> = upper
        .iter()
        .map(|t| OutEntry {
            name: &t.name,
            dtype: t.dtype,
            shape: &t.shape,
            begin: total,
            end: total,
        })
        .collect();
    let header_len = write_header(&widest).len() - 8;

    let path = dir.join(ADAPTER_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| Error::io("cannot create", e).in_file(&path))?;
    let mut w = Writer {
        path,
        file,
        header_len,
        cursor: 0,
        entries: Vec::new(),
    };
    let mut base = Inputs {
        model: &plan.base,
        io,
        open: HashMap::new(),
    };
    let mut ft = Inputs {
        model: &plan.ft,
        io,
        open: HashMap::new(),
    };
    let mut stats = ExtractStats::default();
    for job in &plan.jobs {
        if cancel.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Interrupted));
        }
        match job {
            Job::Save { tensors, .. } => {
                for ((_, i), t) in tensors.iter().zip(job.outputs(plan, 0)) {
                    copy_whole(&mut ft, *i, t, &mut w)?;
                }
            }
            Job::Lora {
                module,
                base: bi,
                ft: fi,
                bias,
                embedding,
                dtype,
                rows,
                cols,
            } => {
                let name = &plan.ft.tensor(*fi).name;
                let mut delta = ft.f32(*fi)?;
                base.subtract_from(*bi, &mut delta)?;
                round_to(*dtype, &mut delta);
                let f = decompose(&delta, *rows, *cols, *embedding, &plan.svd).map_err(|e| {
                    Error::invalid(format!("cannot decompose the weight difference: {e}"))
                        .at_tensor(name)
                        .in_file(plan.ft.file_path(plan.ft.tensor(*fi).file))
                })?;
                drop(delta);
                let mut outs = job.outputs(plan, f.rank).into_iter();
                let (Some(a), Some(b)) = (outs.next(), outs.next()) else {
                    return Err(Error::internal("a LoRA job without its two factors"));
                };
                w.put(a, &encode(*dtype, &f.a))?;
                w.put(b, &encode(*dtype, &f.b))?;
                if let (Some((bb, fb)), Some(t)) = (bias, outs.next()) {
                    let mut d = ft.f32(*fb)?;
                    base.subtract_from(*bb, &mut d)?;
                    round_to(t.dtype, &mut d);
                    w.put(t.clone(), &encode(t.dtype, &d))?;
                }
                stats.ranks.push((module.clone(), f.rank));
            }
        }
    }
    stats.tensors = w.entries.len();
    stats.bytes_written = w.finish()?;
    Ok(stats)
}

/// Copy tensor `i` of the fine-tune unchanged, a bounded piece at a time.
fn copy_whole(ft: &mut Inputs<'_>, i: usize, out: OutTensor, w: &mut Writer) -> Result<()> {
    let t = ft.model.tensor(i);
    let begin = w.cursor;
    if t.shape.len() <= 1 || t.row_bytes() == 0 || !t.dtype.bits().is_multiple_of(8) {
        let bytes = read_rows(ft.file(t.file)?, t, None)?;
        w.append(&bytes)?;
    } else {
        let per = (COPY_CHUNK / t.row_bytes()).max(1);
        let mut r = 0;
        while r < t.rows() {
            let end = (r + per).min(t.rows());
            let bytes = read_rows(ft.file(t.file)?, t, Some(r..end))?;
            w.append(&bytes)?;
            r = end;
        }
    }
    if w.cursor - begin != t.len {
        return Err(Error::internal(format!(
            "{} bytes copied where the tensor has {}",
            w.cursor - begin,
            t.len
        ))
        .at_tensor(&t.name));
    }
    w.entries.push((out, begin, w.cursor));
    Ok(())
}
