//! The arithmetic of a step, applied to one chunk of rows.
//!
//! Operands are decoded to f32, patched with their LoRA deltas and rounded as the plan says;
//! the method combines them; the result is encoded in the output dtype. The LoRA products
//! of a chunk come from one GEMM per patch; everything elementwise then runs over row tiles
//! small enough to stay in the CPU cache, so each input byte crosses the memory bus once.
//! The fp16 reproduction blend works on fp16 bits straight from the input when it can.

use std::borrow::Cow;
use std::ops::Range;

use zerocopy::{FromBytes, IntoBytes};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::active;
use crate::kernels::bytes::{decode_append, encode_append, halves, round_to};
use crate::methods::lora::{self, PatchData};
use crate::methods::mergekit::Capability;
use crate::methods::mergekit::stream::WINDOW_BYTES;
use crate::plan::{Method, Operand, Plan, Recipe, Step};
use crate::shape::RowMajor;

use super::reader::FileRange;

/// Elements per tile of the elementwise passes: a few such f32 arrays fit in L2.
const TILE_ELEMS: usize = 32 * 1024;

/// One operand's bytes for the chunk: its rows (clamped to the rows it provides) and the
/// data of its patches.
pub struct OperandData<'a> {
    /// The rows' stored bytes (empty when `window` is set).
    pub bytes: &'a [u8],
    /// The rows, to be read a window at a time as the chunk is computed, in place of `bytes`.
    pub window: Option<&'a FileRange>,
    pub patches: Vec<PatchData<'a>>,
}

/// The current window of each operand read a window at a time (an empty buffer for the
/// others), a span of whole tiles of the chunk's rows.
struct Windows {
    bufs: Vec<Vec<u8>>,
    /// The chunk's first row in the span read.
    first: usize,
}

thread_local! {
    /// Window buffers of this worker, kept between chunks: a new buffer is zeroed first.
    static WINDOW_BUFS: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Windows {
    /// Buffers for `count` operands, reused from this worker's last chunk when `windowed`.
    fn new(count: usize, windowed: bool) -> Windows {
        let mut bufs = match windowed {
            true => WINDOW_BUFS.with(|w| std::mem::take(&mut *w.borrow_mut())),
            false => Vec::new(),
        };
        bufs.resize_with(count, Vec::new);
        Windows { bufs, first: 0 }
    }

    /// Read rows `span` (clamped to the rows each operand provides) of each windowed operand.
    fn fill(
        &mut self,
        plan: &Plan,
        operands: &[Operand],
        data: &[OperandData<'_>],
        op_rows: &[usize],
        span: Range<usize>,
    ) -> Result<()> {
        self.first = span.start;
        for (((buf, op), d), &n) in self.bufs.iter_mut().zip(operands).zip(data).zip(op_rows) {
            let Some(window) = d.window else { continue };
            let rb = op.stored(plan).1 as usize;
            let (a, b) = (span.start.min(n), span.end.min(n));
            // Longer than needed is fine (tiles index from the start): a shorter last
            // window need not cost zeroing the next chunk's.
            let need = (b - a) * rb;
            if buf.len() < need {
                buf.resize(need, 0);
            }
            window.read_at((a * rb) as u64, &mut buf[..need])?;
        }
        Ok(())
    }
}

impl Drop for Windows {
    fn drop(&mut self) {
        // At most one window per operand per worker, outside the budget (1 MiB each; the
        // one row wider than that a span can hold is let go).
        for b in &mut self.bufs {
            if b.capacity() > WINDOW_BYTES {
                *b = Vec::new();
            }
        }
        if self.bufs.iter().any(|b| b.capacity() > 0) {
            let bufs = std::mem::take(&mut self.bufs);
            let _ = WINDOW_BUFS.try_with(|w| w.replace(bufs));
        }
    }
}

/// An operand's rows of one tile: stored bytes and the LoRA products (unscaled) of each patch.
struct OperandTile<'a> {
    bytes: &'a [u8],
    deltas: Vec<&'a [f32]>,
}

/// Compute rows `rows` of `step` and append the chunk's output bytes to `out` (the caller
/// places `out` where the bytes can go to disk without another copy). `data` holds one entry
/// per operand.
pub fn compute_chunk(
    plan: &Plan,
    step: &Step,
    rows: Range<u64>,
    data: &[OperandData<'_>],
    out: &mut Vec<u8>,
) -> Result<()> {
    let Recipe::Compute { operands, method } = &step.recipe else {
        // Copies never reach here: the pipeline moves their bytes directly.
        out.extend_from_slice(data.first().map_or(&[][..], |d| d.bytes));
        return Ok(());
    };
    let cols = step.row_elems() as usize;
    let nrows = (rows.end - rows.start) as usize;
    // Each operand's rows in this chunk (fewer than the chunk's past its own row count).
    let op_rows: Vec<usize> = operands
        .iter()
        .map(|op| (op.rows.clamp(rows.start, rows.end) - rows.start) as usize)
        .collect();
    // One GEMM per LoRA patch for the whole chunk, into recycled buffers (the GEMM writes
    // every element, so they need no clearing).
    let mut deltas: Vec<Vec<Vec<f32>>> = Vec::with_capacity(operands.len());
    let mut failed = None;
    for ((op, d), &n) in operands.iter().zip(data).zip(&op_rows) {
        let mut per_op = Vec::with_capacity(op.patches.len());
        for (p, pd) in op.patches.iter().zip(&d.patches) {
            let mut delta = scratch_take(n * cols);
            if let Err(e) = lora::delta_rows(p.layout, pd, rows.start as usize, n, cols, &mut delta)
            {
                failed = Some(e);
            }
            per_op.push(delta);
        }
        deltas.push(per_op);
    }
    let done = match failed {
        Some(e) => Err(e),
        None => compute_with_deltas(
            plan, step, operands, method, rows, data, &op_rows, &deltas, cols, nrows, out,
        ),
    };
    for d in deltas.into_iter().flatten() {
        scratch_give(d);
    }
    done
}

thread_local! {
    /// LoRA product buffers of this worker, kept between chunks: allocating tens of MiB per
    /// chunk costs page faults and zeroing.
    static SCRATCH: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn scratch_take(len: usize) -> Vec<f32> {
    let mut v = SCRATCH.with(|s| s.borrow_mut().pop()).unwrap_or_default();
    // Old contents are overwritten by the GEMM; only growth is zeroed.
    v.truncate(len);
    v.resize(len, 0.0);
    v
}

fn scratch_give(v: Vec<f32>) {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        // One idle buffer per worker: it is outside the byte budget.
        if s.is_empty() {
            s.push(v);
        }
    });
}

/// What a chunk's tiles are cut from.
struct ChunkParts<'c, 'a> {
    plan: &'c Plan,
    operands: &'c [Operand],
    data: &'c [OperandData<'a>],
    deltas: &'c [Vec<Vec<f32>>],
    op_rows: &'c [usize],
    cols: usize,
}

impl ChunkParts<'_, '_> {
    /// Rows `t` of each operand, from its bytes or its current window.
    fn tile<'w>(&'w self, t: Range<usize>, windows: &'w Windows) -> Vec<OperandTile<'w>> {
        let cols = self.cols;
        self.data
            .iter()
            .zip(self.deltas)
            .zip(self.operands)
            .zip(self.op_rows)
            .zip(&windows.bufs)
            .map(|((((d, ds), op), &n), window)| {
                let (a, b) = (t.start.min(n), t.end.min(n));
                let row_bytes = op.stored(self.plan).1 as usize;
                let bytes = match d.window {
                    None => &d.bytes[a * row_bytes..b * row_bytes],
                    Some(_) => {
                        let first = windows.first.min(n);
                        &window[(a - first) * row_bytes..(b - first) * row_bytes]
                    }
                };
                OperandTile {
                    bytes,
                    deltas: ds.iter().map(|v| &v[a * cols..b * cols]).collect(),
                }
            })
            .collect()
    }
}

#[allow(clippy::too_many_arguments)]
fn compute_with_deltas(
    plan: &Plan,
    step: &Step,
    operands: &[Operand],
    method: &Method,
    rows: Range<u64>,
    data: &[OperandData<'_>],
    op_rows: &[usize],
    deltas: &[Vec<Vec<f32>>],
    cols: usize,
    nrows: usize,
    out: &mut Vec<u8>,
) -> Result<()> {
    let parts = ChunkParts {
        plan,
        operands,
        data,
        deltas,
        op_rows,
        cols,
    };
    let windowed = data.iter().any(|d| d.window.is_some());
    let mut windows = Windows::new(data.len(), windowed);
    if let Method::Mergekit(r) = method
        && r.capability() != Capability::Elementwise
    {
        // Whole-tensor statistics: the chunk is the whole tensor.
        if windowed {
            // The loader reads such steps' chunks whole (a window here would be the tensor).
            return Err(Error::internal(
                "a whole-tensor method was given windowed operands",
            ));
        }
        let tiles = parts.tile(0..nrows, &windows);
        let xs: Vec<Vec<f32>> = operands
            .iter()
            .zip(data)
            .zip(&tiles)
            .map(|((op, d), t)| operand_values(plan, op, d, t, rows.start as usize, nrows, cols))
            .collect();
        // mergekit treats a 1-D tensor as one row (row-wise methods: DELLA, filter-wise
        // model_stock, unflattened nuslerp).
        let (mrows, mcols) = if step.shape.len() <= 1 {
            (1, nrows * cols)
        } else {
            (nrows, cols)
        };
        // Values mergekit itself refuses (e.g. multislerp's antipodal inputs) are an error;
        // the worker names the tensor.
        let merged = r.try_merge(&xs, mrows, mcols).map_err(Error::invalid)?;
        encode_append(step.dtype, &merged, out);
        return Ok(());
    }
    let out_row_bytes = cols * step.dtype.bits() as usize / 8;
    // Filled tile by tile, in order.
    out.reserve(nrows * out_row_bytes);
    let tile_rows = (TILE_ELEMS / cols.max(1)).max(1);
    // Windowed operands are read a span of whole tiles at a time.
    let widest = operands.iter().map(|op| op.stored(plan).1 as usize).max();
    let span_rows = match windowed {
        true => tile_rows * (WINDOW_BYTES / (tile_rows * widest.unwrap_or(1)).max(1)).max(1),
        false => nrows,
    };
    let mut t0 = 0;
    while t0 < nrows {
        if windowed && t0 % span_rows == 0 {
            windows.fill(
                plan,
                operands,
                data,
                op_rows,
                t0..(t0 + span_rows).min(nrows),
            )?;
        }
        let t1 = (t0 + tile_rows).min(nrows);
        let tiles = parts.tile(t0..t1, &windows);
        let r0 = rows.start as usize + t0;
        compute_tile(
            plan,
            step,
            method,
            operands,
            data,
            &tiles,
            r0,
            t1 - t0,
            cols,
            out,
        );
        t0 = t1;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn compute_tile(
    plan: &Plan,
    step: &Step,
    method: &Method,
    operands: &[Operand],
    data: &[OperandData<'_>],
    tiles: &[OperandTile<'_>],
    r0: usize,
    nrows: usize,
    cols: usize,
    out: &mut Vec<u8>,
) {
    let n = nrows * cols;
    let k = active();
    let value = |i: usize| operand_values(plan, &operands[i], &data[i], &tiles[i], r0, nrows, cols);
    // Elements the second operand covers (the vocab rule keeps the first past its rows).
    let covered =
        |i: usize| tiles[i].bytes.len() / (operands[i].stored(plan).1 as usize).max(1) * cols;
    match method {
        Method::Convert => encode_append(step.dtype, &value(0), out),
        Method::GradientFp16 { ratio } => {
            let (wa, wb) = ((1.0 - ratio) as f32, *ratio as f32);
            let a = operand_f16(plan, &operands[0], &data[0], &tiles[0], r0, nrows, cols);
            let m = covered(1);
            let b = operand_f16(
                plan,
                &operands[1],
                &data[1],
                &tiles[1],
                r0,
                m / cols.max(1),
                cols,
            );
            // Blended straight into the output when it is 2-byte aligned (it is, at any
            // even file offset), else through a tile buffer.
            let start = out.len();
            out.resize(start + n * 2, 0);
            let mut tile_buf = Vec::new();
            let halves_out = match <[u16]>::mut_from_bytes(&mut out[start..]) {
                Ok(h) => h,
                Err(_) => {
                    tile_buf = vec![0u16; n];
                    &mut tile_buf
                }
            };
            (k.blend_f16)(&a[..m], &b[..m], wa, wb, &mut halves_out[..m]);
            halves_out[m..].copy_from_slice(&a[m..]);
            if !tile_buf.is_empty() {
                out[start..].copy_from_slice(tile_buf.as_bytes());
            }
        }
        Method::GradientPrecise { ratio } => {
            let (wa, wb) = ((1.0 - ratio) as f32, *ratio as f32);
            let a = value(0);
            let b = value(1);
            let m = b.len();
            let mut blended = a.clone();
            (k.blend_f32)(&a[..m], &b, wa, wb, &mut blended[..m]);
            encode_append(step.dtype, &blended, out)
        }
        Method::BlendChain { ratios } => {
            let mut cur = value(0);
            let b = value(1);
            let m = b.len();
            let mut next = vec![0f32; m];
            for r in ratios {
                (k.blend_f32)(&cur[..m], &b, (1.0 - r) as f32, *r as f32, &mut next);
                cur[..m].copy_from_slice(&next);
            }
            encode_append(step.dtype, &cur, out)
        }
        Method::Mergekit(r) => {
            let xs: Vec<Vec<f32>> = (0..operands.len()).map(value).collect();
            encode_append(step.dtype, &r.merge(&xs, nrows, cols), out)
        }
    }
}

/// An operand's rows of a tile as f32: decoded, rounded on load, patched, rounded. The
/// tile's rows may be fewer than `nrows` (the vocab rule); the result has as many values as
/// the tile holds.
fn operand_values(
    plan: &Plan,
    op: &Operand,
    data: &OperandData<'_>,
    tile: &OperandTile<'_>,
    r0: usize,
    nrows: usize,
    cols: usize,
) -> Vec<f32> {
    let (dtype, row_bytes) = op.stored(plan);
    let rows = (tile.bytes.len() / (row_bytes as usize).max(1)).min(nrows);
    let mut v = Vec::new();
    decode_append(dtype, tile.bytes, rows * cols, &mut v);
    if let Some(d) = op.load_as {
        round_to(d, &mut v);
    }
    for ((p, pd), delta) in op.patches.iter().zip(&data.patches).zip(&tile.deltas) {
        lora::apply_delta(p.scale, p.round_delta, pd, r0, rows, cols, delta, &mut v);
    }
    for d in later_roundings(op, dtype) {
        round_to(d, &mut v);
    }
    v
}

/// The roundings an operand stored as `dtype` takes after its patches, without those of
/// values still as stored to their own dtype (they change nothing).
pub(crate) fn later_roundings(op: &Operand, dtype: DType) -> Vec<DType> {
    let mut as_stored = op.patches.is_empty() && op.load_as.is_none_or(|l| l == dtype);
    let mut out = Vec::new();
    for &d in &op.roundings {
        if as_stored && d == dtype {
            continue;
        }
        out.push(d);
        as_stored = false;
    }
    out
}

/// An operand's rows as f32 for a whole chunk (the streamed path's loader): LoRA products
/// computed here.
pub fn operand_f32(
    plan: &Plan,
    op: &Operand,
    data: &OperandData<'_>,
    r0: u64,
    nrows: usize,
    cols: usize,
) -> Result<Vec<f32>> {
    // The streamed loader never windows an operand it hands here.
    debug_assert!(data.window.is_none());
    let mut deltas: Vec<Vec<f32>> = Vec::with_capacity(op.patches.len());
    for (p, pd) in op.patches.iter().zip(&data.patches) {
        let mut delta = vec![0f32; nrows * cols];
        lora::delta_rows(p.layout, pd, r0 as usize, nrows, cols, &mut delta)?;
        deltas.push(delta);
    }
    let tile = OperandTile {
        bytes: data.bytes,
        deltas: deltas.iter().map(|d| d.as_slice()).collect(),
    };
    Ok(operand_values(
        plan,
        op,
        data,
        &tile,
        r0 as usize,
        nrows,
        cols,
    ))
}

/// An operand's rows as fp16 bits; borrowed straight from the input when it is stored as
/// fp16 and needs no arithmetic.
fn operand_f16<'a>(
    plan: &Plan,
    op: &Operand,
    data: &OperandData<'_>,
    tile: &OperandTile<'a>,
    r0: usize,
    nrows: usize,
    cols: usize,
) -> Cow<'a, [u16]> {
    let plain = op.patches.is_empty() && op.load_as.is_none();
    if plain && op.stored(plan).0 == DType::F16 && op.roundings.iter().all(|&d| d == DType::F16) {
        return halves(tile.bytes);
    }
    let v = operand_values(plan, op, data, tile, r0, nrows, cols);
    let mut h = vec![0u16; v.len()];
    (active().f32_to_f16)(&v, &mut h);
    Cow::Owned(h)
}
