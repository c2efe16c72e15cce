//! `mergestream diff`: how far two checkpoints are apart, tensor by tensor.
//!
//! Both models are opened from their headers (any format or source [`Model::open_reference`]
//! reads); the tensors they share are streamed in row chunks within a byte budget, in the
//! order of A's files (so A is read front to back, each byte once, and so is B when it stores
//! its tensors in the same order, as a `convert` or a merge output does). Compute workers
//! reduce each pair of chunks to a few numbers ([`Partial`]): max |a−b|, max ulp distance (for
//! same-dtype floats, on the stored bits), and the sums behind relative L2 and cosine. Nothing
//! larger than a chunk is ever held.
//!
//! A report says "identical" only when every tensor is bitwise equal and both sides hold the
//! same names, dtypes and shapes; [`DiffOptions::ulps`] relaxes that to "within N ulps".

pub mod plot;

use std::fmt::Write as _;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::bounded;
use serde::Serialize;

use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use crate::kernels::bytes::{decode, halves};
use crate::model::{Layout, Model, TensorInfo};
use crate::pipeline::budget::{Budget, Permit};
use crate::pipeline::chunking::chunk_target;
use crate::pipeline::reader::{Buf, InputFile, IoMode, read_rows};
use crate::plan::order::compare_names;
use crate::shape::RowMajor;

/// How to run a diff.
#[derive(Clone, Debug)]
pub struct DiffOptions {
    /// Bytes of chunks (both sides) in flight at once.
    pub memory_limit: u64,
    pub io: IoMode,
    /// Compute workers.
    pub threads: usize,
    /// Accept float tensors of the same dtype that differ by at most this many ulps.
    pub ulps: Option<u64>,
    /// Set to stop the run (it then ends with [`ErrorKind::Interrupted`]).
    pub cancel: Arc<AtomicBool>,
    /// Show a progress bar (bytes compared) on stderr when it is a terminal.
    pub progress: bool,
}

impl Default for DiffOptions {
    fn default() -> Self {
        DiffOptions {
            memory_limit: crate::pipeline::default_memory_limit(),
            io: IoMode::Auto,
            threads: crate::pipeline::default_threads(),
            ulps: None,
            cancel: Arc::new(AtomicBool::new(false)),
            progress: false,
        }
    }
}

/// How one shared tensor compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Bitwise equal.
    Identical,
    /// Differs, by at most `--ulps` on every element.
    Within,
    Differs,
    /// Stored in different float dtypes (compared by value; never "identical").
    DtypeDiffers,
}

/// The comparison of one tensor both models hold with the same shape.
#[derive(Clone, Debug, Serialize)]
pub struct TensorDiff {
    pub name: String,
    /// A's dtype (and B's, when it differs, in `dtype_b`).
    pub dtype: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype_b: Option<String>,
    pub shape: Vec<u64>,
    pub status: Status,
    pub elements: u64,
    /// Elements whose stored bits (or, across dtypes, values) differ.
    pub differing: u64,
    /// max |a−b| (`None` for non-float tensors, compared bytewise).
    pub max_abs: Option<f64>,
    /// Max distance in units in the last place, for floats of the same dtype (a NaN against
    /// anything else counts as `u64::MAX`).
    pub max_ulp: Option<u64>,
    /// ‖a−b‖ / ‖b‖ (`None` when ‖b‖ = 0 and a ≠ b, or for non-float tensors).
    pub rel_l2: Option<f64>,
    /// a·b / (‖a‖‖b‖) (`None` when a norm is zero and the tensors differ).
    pub cosine: Option<f64>,
    /// Σ(a−b)² and Σb², so tensors can be pooled (the plot's cells hold weight and bias).
    #[serde(skip)]
    pub sq_diff: f64,
    #[serde(skip)]
    pub sq_b: f64,
}

/// One side of a tensor that cannot be compared.
#[derive(Clone, Debug, Serialize)]
pub struct Side {
    pub dtype: String,
    pub shape: Vec<u64>,
}

/// A tensor both hold but that cannot be compared element by element.
#[derive(Clone, Debug, Serialize)]
pub struct Mismatch {
    pub name: String,
    /// `"shape"` or `"dtype"`.
    pub reason: String,
    pub a: Side,
    pub b: Side,
}

/// Totals over the whole comparison.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub compared: usize,
    pub identical: usize,
    pub within: usize,
    pub differing: usize,
    pub only_in_a: usize,
    pub only_in_b: usize,
    pub mismatched: usize,
    pub elements: u64,
    pub differing_elements: u64,
    pub max_abs: Option<f64>,
    pub max_ulp: Option<u64>,
    /// `"identical"`, `"within"` (every difference within `--ulps`) or `"different"`.
    pub verdict: String,
    /// Bytes of tensor data read from both models (each once).
    pub bytes_read: u64,
    /// The most chunk bytes held at once: the budget's peak (the process adds a small
    /// constant), within `--memory-limit` unless a single unsplittable tensor pair is larger.
    pub peak_memory: u64,
}

/// The whole comparison of A against B.
#[derive(Clone, Debug, Serialize)]
pub struct DiffReport {
    pub a: String,
    pub b: String,
    pub ulps: Option<u64>,
    /// Shared, comparable tensors in module order.
    pub tensors: Vec<TensorDiff>,
    pub only_in_a: Vec<String>,
    pub only_in_b: Vec<String>,
    pub mismatched: Vec<Mismatch>,
    pub summary: Summary,
}

impl DiffReport {
    /// Whether A matches B: bitwise, or within `--ulps` when given.
    pub fn passed(&self) -> bool {
        self.summary.verdict != "different"
    }

    /// The report as one JSON document.
    pub fn to_json(&self) -> String {
        // Non-finite numbers become null (serde_json's rule), so the output always parses.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
            + "\n"
    }

    /// The last line of the text report: the verdict and the counts.
    pub fn summary_line(&self) -> String {
        let sm = &self.summary;
        let ulp = match sm.max_ulp {
            Some(u64::MAX) => ", NaN against a number".to_string(),
            Some(u) => format!(", max {u} ulp"),
            None => String::new(),
        };
        format!(
            "summary: {}: {} tensors compared, {} identical, {} within tolerance, {} differ ({} of {} elements{ulp}); {} only in A, {} only in B, {} mismatched",
            sm.verdict,
            sm.compared,
            sm.identical,
            sm.within,
            sm.differing,
            sm.differing_elements,
            sm.elements,
            sm.only_in_a,
            sm.only_in_b,
            sm.mismatched
        )
    }

    /// The report for people: a line per tensor, the one-sided and mismatched tensors, then
    /// a summary line.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "A: {}\nB: {}", self.a, self.b);
        let width = self
            .tensors
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let _ = writeln!(
            s,
            "{:<width$}  {:<8} {:>10} {:>8} {:>10} {:>11}  status",
            "tensor", "dtype", "max|a-b|", "max ulp", "rel L2", "cosine"
        );
        let num = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3e}"));
        for t in &self.tensors {
            let dtype = match &t.dtype_b {
                Some(b) => format!("{}/{b}", t.dtype),
                None => t.dtype.clone(),
            };
            let ulp = match t.max_ulp {
                Some(u64::MAX) => "NaN".to_string(),
                Some(u) => u.to_string(),
                None => "-".to_string(),
            };
            let cos = t
                .cosine
                .map_or_else(|| "-".to_string(), |c| format!("{c:.8}"));
            let status = match t.status {
                Status::Identical => "identical".to_string(),
                Status::Within => format!("within {} ulp", self.ulps.unwrap_or(0)),
                Status::Differs => format!("DIFFERS ({} elements)", t.differing),
                Status::DtypeDiffers => format!("DTYPE DIFFERS ({} elements)", t.differing),
            };
            let _ = writeln!(
                s,
                "{:<width$}  {:<8} {:>10} {:>8} {:>10} {:>11}  {status}",
                t.name,
                dtype,
                num(t.max_abs),
                ulp,
                num(t.rel_l2),
                cos
            );
        }
        for n in &self.only_in_a {
            let _ = writeln!(s, "only in A: {n}");
        }
        for n in &self.only_in_b {
            let _ = writeln!(s, "only in B: {n}");
        }
        for m in &self.mismatched {
            let _ = writeln!(
                s,
                "{} differs: {}: A {} {:?}, B {} {:?}",
                m.reason, m.name, m.a.dtype, m.a.shape, m.b.dtype, m.b.shape
            );
        }
        s.push_str(&self.summary_line());
        s.push('\n');
        s
    }
}

/// What one pair of chunks reduces to; partials of one tensor add up.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Partial {
    pub elements: u64,
    pub differing: u64,
    pub max_abs: f64,
    pub max_ulp: u64,
    pub sq_diff: f64,
    pub sq_a: f64,
    pub sq_b: f64,
    pub dot: f64,
}

impl Partial {
    pub fn merge(&mut self, o: &Partial) {
        self.elements += o.elements;
        self.differing += o.differing;
        self.max_abs = self.max_abs.max(o.max_abs);
        self.max_ulp = self.max_ulp.max(o.max_ulp);
        self.sq_diff += o.sq_diff;
        self.sq_a += o.sq_a;
        self.sq_b += o.sq_b;
        self.dot += o.dot;
    }
}

/// Elements decoded at a time: small enough to stay in L1 cache.
const TILE: usize = 1024;

/// Bit-level comparison of two same-dtype float chunks: differing elements and max ulps.
/// The 16- and 32-bit loops are branch-free (they run over every differing byte of a model).
fn compare_bits(dtype: DType, a: &[u8], b: &[u8], p: &mut Partial) {
    // Largest magnitude bits that are not a NaN.
    let (nan_above, sign) = match dtype {
        DType::F16 => (0x7C00u64, 0x8000u64),
        DType::BF16 => (0x7F80, 0x8000),
        DType::F32 => (0x7F80_0000, 0x8000_0000),
        _ => (0x7FF0_0000_0000_0000, 1 << 63),
    };
    let mag = sign - 1;
    let (mut differing, mut max, mut nan) = (0u64, 0u64, false);
    let mut tally = |x: u64, y: u64| {
        // Sign-magnitude to a line of integers: -0 and +0 meet, one step is one ulp.
        let ox = if x & sign != 0 {
            -((x & mag) as i64)
        } else {
            x as i64
        };
        let oy = if y & sign != 0 {
            -((y & mag) as i64)
        } else {
            y as i64
        };
        let differs = x != y;
        differing += differs as u64;
        max = max.max(ox.abs_diff(oy));
        nan |= differs & ((x & mag) > nan_above || (y & mag) > nan_above);
    };
    match dtype.bits() {
        16 => {
            for (&x, &y) in halves(a).iter().zip(halves(b).iter()) {
                tally(x as u64, y as u64);
            }
        }
        32 => {
            for (x, y) in a.chunks_exact(4).zip(b.chunks_exact(4)) {
                let x = u32::from_le_bytes([x[0], x[1], x[2], x[3]]);
                let y = u32::from_le_bytes([y[0], y[1], y[2], y[3]]);
                tally(x as u64, y as u64);
            }
        }
        _ => {
            for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
                let mut bx = [0u8; 8];
                let mut by = [0u8; 8];
                bx.copy_from_slice(x);
                by.copy_from_slice(y);
                tally(u64::from_le_bytes(bx), u64::from_le_bytes(by));
            }
        }
    }
    p.differing += differing;
    // A NaN against anything else is as far as it gets.
    p.max_ulp = p.max_ulp.max(if nan { u64::MAX } else { max });
}

/// Decode `n` elements into `dst` as f64 (16- and 32-bit floats are exact in f32).
fn decode_f64(dtype: DType, bytes: &[u8], f32s: &mut [f32], dst: &mut [f64]) {
    if dtype == DType::F64 {
        for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            *d = f64::from_le_bytes(b);
        }
    } else {
        decode(dtype, bytes, f32s);
        for (d, &v) in dst.iter_mut().zip(f32s.iter()) {
            *d = v as f64;
        }
    }
}

/// Reduce one pair of chunks (`da`/`db` their dtypes, the same element count) to a partial.
/// Non-float dtypes (equal on both sides) are compared element by element on their bytes.
pub fn compare_chunk(da: DType, a: &[u8], db: DType, b: &[u8]) -> Partial {
    let mut p = Partial::default();
    if !(da.is_computable() && db.is_computable()) {
        // Sub-byte types are whole tensors here: compare them as one element.
        let size = da.size().max(1);
        let n = if da.bits().is_multiple_of(8) {
            a.len() / size
        } else {
            1
        };
        p.elements = n as u64;
        p.differing = if da.bits().is_multiple_of(8) {
            a.chunks(size)
                .zip(b.chunks(size))
                .filter(|(x, y)| x != y)
                .count() as u64
        } else {
            u64::from(a != b)
        };
        return p;
    }
    let n = a.len() / da.size();
    p.elements = n as u64;
    let same = da == db;
    let (sa, sb) = (da.size(), db.size());
    let wide = da == DType::F64 || db == DType::F64;
    let (mut fa, mut fb) = ([0f32; TILE], [0f32; TILE]);
    let mut start = 0;
    while start < n {
        let k = TILE.min(n - start);
        let (ta, tb) = (
            &a[start * sa..(start + k) * sa],
            &b[start * sb..(start + k) * sb],
        );
        start += k;
        let equal = same && ta == tb;
        if same && !equal {
            compare_bits(da, ta, tb, &mut p);
        }
        if !wide {
            decode(db, tb, &mut fb[..k]);
            if equal {
                // Equal tiles need only ‖b‖²: ‖a‖² and a·b are the same number.
                if let Some(q) = sum_squares(&fb[..k]) {
                    p.sq_a += q;
                    p.sq_b += q;
                    p.dot += q;
                    continue;
                }
            } else {
                decode(da, ta, &mut fa[..k]);
                if let Some(t) = tile_sums(&fa[..k], &fb[..k]) {
                    if !same {
                        p.differing +=
                            fa[..k].iter().zip(&fb[..k]).filter(|(x, y)| x != y).count() as u64;
                    }
                    p.max_abs = p.max_abs.max(t.max_abs);
                    p.sq_diff += t.sq_diff;
                    p.sq_a += t.sq_a;
                    p.sq_b += t.sq_b;
                    p.dot += t.dot;
                    continue;
                }
            }
        }
        slow_tile(da, ta, db, tb, same, &mut p);
    }
    p
}

/// Sums of one tile, from the fast path.
struct TileSums {
    max_abs: f64,
    sq_diff: f64,
    sq_a: f64,
    sq_b: f64,
    dot: f64,
}

/// Lanes of independent accumulators, so the compiler can vectorize the sums.
const LANES: usize = 8;

/// Σb² of a tile, or `None` when it holds an infinity or NaN (then the careful path runs).
/// Products of 16-bit floats are exact in f32; sums are kept in f64.
fn sum_squares(b: &[f32]) -> Option<f64> {
    let mut acc = [0f64; LANES];
    let mut chunks = b.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] += (c[l] * c[l]) as f64;
        }
    }
    let mut q: f64 = acc.iter().sum();
    for &y in chunks.remainder() {
        q += (y * y) as f64;
    }
    q.is_finite().then_some(q)
}

/// The sums of a tile of finite values, branch-free; `None` when a value (or a square) is
/// not finite, for the careful path to handle.
fn tile_sums(a: &[f32], b: &[f32]) -> Option<TileSums> {
    let mut mx = [0f32; LANES];
    let (mut sd, mut sa, mut sb, mut dt) =
        ([0f64; LANES], [0f64; LANES], [0f64; LANES], [0f64; LANES]);
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            let d = x[l] - y[l];
            mx[l] = mx[l].max(d.abs());
            sd[l] += (d * d) as f64;
            sa[l] += (x[l] * x[l]) as f64;
            sb[l] += (y[l] * y[l]) as f64;
            dt[l] += (x[l] * y[l]) as f64;
        }
    }
    let mut t = TileSums {
        max_abs: mx.iter().fold(0f32, |m, &v| m.max(v)) as f64,
        sq_diff: sd.iter().sum(),
        sq_a: sa.iter().sum(),
        sq_b: sb.iter().sum(),
        dot: dt.iter().sum(),
    };
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        let d = x - y;
        t.max_abs = t.max_abs.max(d.abs() as f64);
        t.sq_diff += (d * d) as f64;
        t.sq_a += (x * x) as f64;
        t.sq_b += (y * y) as f64;
        t.dot += (x * y) as f64;
    }
    // `max` drops NaNs, so a NaN shows only in the sums: any non-finite one sends the tile
    // to the careful path.
    let finite = [t.max_abs, t.sq_diff, t.sq_a, t.sq_b, t.dot]
        .iter()
        .all(|v| v.is_finite());
    finite.then_some(t)
}

/// One tile in f64, element by element: infinities and NaNs, f64 tensors, and overflowing
/// f32 squares.
fn slow_tile(da: DType, a: &[u8], db: DType, b: &[u8], same: bool, p: &mut Partial) {
    let k = a.len() / da.size();
    let (mut fa, mut fb) = ([0f32; TILE], [0f32; TILE]);
    let (mut xa, mut xb) = ([0f64; TILE], [0f64; TILE]);
    decode_f64(da, a, &mut fa[..k], &mut xa[..k]);
    decode_f64(db, b, &mut fb[..k], &mut xb[..k]);
    for (&x, &y) in xa[..k].iter().zip(&xb[..k]) {
        if !(x.is_finite() && y.is_finite()) {
            // Infinities and NaNs stay out of the sums; across dtypes they count as
            // differing unless they are the same value (ulps are counted on the bits).
            let equal = x == y || (x.is_nan() && y.is_nan());
            if !same && !equal {
                p.differing += 1;
            }
            if !equal {
                p.max_abs = f64::INFINITY;
            }
            continue;
        }
        let d = x - y;
        if !same && d != 0.0 {
            p.differing += 1;
        }
        p.max_abs = p.max_abs.max(d.abs());
        p.sq_diff += d * d;
        p.sq_a += x * x;
        p.sq_b += y * y;
        p.dot += x * y;
    }
}

/// A tensor's totals turned into the reported numbers.
fn finish(
    name: &str,
    ta: &TensorInfo,
    tb: &TensorInfo,
    p: &Partial,
    ulps: Option<u64>,
) -> TensorDiff {
    let float = ta.dtype.is_computable() && tb.dtype.is_computable();
    let same_dtype = ta.dtype == tb.dtype;
    let status = if !same_dtype {
        Status::DtypeDiffers
    } else if p.differing == 0 {
        Status::Identical
    } else if float && ulps.is_some_and(|u| p.max_ulp <= u) {
        Status::Within
    } else {
        Status::Differs
    };
    let rel_l2 = if !float {
        None
    } else if p.sq_b > 0.0 {
        Some((p.sq_diff / p.sq_b).sqrt())
    } else if p.sq_diff == 0.0 {
        Some(0.0)
    } else {
        None
    };
    let norms = p.sq_a * p.sq_b;
    let cosine = if !float {
        None
    } else if norms > 0.0 {
        // Rounding can push a cosine of equal tensors a hair past 1.
        Some((p.dot / norms.sqrt()).clamp(-1.0, 1.0))
    } else if p.sq_diff == 0.0 {
        Some(1.0)
    } else {
        None
    };
    TensorDiff {
        name: name.to_string(),
        dtype: ta.dtype.to_string(),
        dtype_b: (!same_dtype).then(|| tb.dtype.to_string()),
        shape: ta.shape.clone(),
        status,
        elements: p.elements,
        differing: p.differing,
        max_abs: float.then_some(p.max_abs),
        max_ulp: (float && same_dtype).then_some(p.max_ulp),
        rel_l2,
        cosine,
        sq_diff: p.sq_diff,
        sq_b: p.sq_b,
    }
}

/// One pair of chunks ready to compare.
struct Work {
    /// Index into the compared list.
    pair: usize,
    chunk: usize,
    a: Buf,
    b: Buf,
    _permit: Permit,
}

/// Whether a tensor must be read whole: gathered views are read as one span anyway, and rows
/// of sub-byte types need not start on a byte.
fn whole(t: &TensorInfo) -> bool {
    !matches!(t.layout, Layout::Contiguous) || t.dtype.bits() < 8 || t.rows() <= 1
}

/// Row ranges to read `a` and `b` in, each pair costing about `target` bytes.
fn chunks(a: &TensorInfo, b: &TensorInfo, target: u64) -> Vec<Option<Range<u64>>> {
    if whole(a) || whole(b) {
        return vec![None];
    }
    let per_row = (a.row_bytes() + b.row_bytes()).max(1);
    let rows = (target / per_row).clamp(1, a.rows());
    (0..a.rows())
        .step_by(rows as usize)
        .map(|r| Some(r..(r + rows).min(a.rows())))
        .collect()
}

/// Compare model `a` against model `b` (B is the reference: relative L2 divides by ‖b‖).
pub fn diff(a: &Model, b: &Model, opts: &DiffOptions) -> Result<DiffReport> {
    let mut only_in_a = Vec::new();
    let mut mismatched = Vec::new();
    // Pairs (index in A, index in B) that can be compared, in A's file order.
    let mut pairs: Vec<(usize, usize)> = Vec::new();
    for (ia, ta) in a.tensors().iter().enumerate() {
        let Some(ib) = b.index_of(&ta.name) else {
            only_in_a.push(ta.name.clone());
            continue;
        };
        let tb = b.tensor(ib);
        let side = |t: &TensorInfo| Side {
            dtype: t.dtype.to_string(),
            shape: t.shape.clone(),
        };
        let reason = if ta.shape != tb.shape {
            Some("shape")
        } else if ta.dtype != tb.dtype && !(ta.dtype.is_computable() && tb.dtype.is_computable()) {
            Some("dtype")
        } else {
            None
        };
        match reason {
            Some(r) => mismatched.push(Mismatch {
                name: ta.name.clone(),
                reason: r.to_string(),
                a: side(ta),
                b: side(tb),
            }),
            None => pairs.push((ia, ib)),
        }
    }
    let mut only_in_b: Vec<String> = b
        .tensors()
        .iter()
        .filter(|t| a.index_of(&t.name).is_none())
        .map(|t| t.name.clone())
        .collect();
    pairs.sort_by_key(|&(ia, _)| {
        let t = a.tensor(ia);
        (t.file, t.offset)
    });

    let open = |m: &Model| -> Result<Vec<InputFile>> {
        (0..m.files.len())
            .map(|i| Ok(InputFile::new(m.open_file(i)?, opts.io)))
            .collect()
    };
    let (files_a, files_b) = (open(a)?, open(b)?);
    let budget = Budget::new(opts.memory_limit);
    let target = chunk_target(opts.memory_limit);
    let plans: Vec<Vec<Option<Range<u64>>>> = pairs
        .iter()
        .map(|&(ia, ib)| chunks(a.tensor(ia), b.tensor(ib), target))
        .collect();
    let results: Mutex<Vec<Vec<Option<Partial>>>> =
        Mutex::new(plans.iter().map(|c| vec![None; c.len()]).collect());
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let failed = AtomicBool::new(false);
    let fail = |e: Error| {
        let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        failed.store(true, Ordering::Relaxed);
    };
    let stopped = || failed.load(Ordering::Relaxed) || opts.cancel.load(Ordering::Relaxed);
    let mut bytes_read = 0u64;
    let total: u64 = pairs
        .iter()
        .map(|&(ia, ib)| a.tensor(ia).len + b.tensor(ib).len)
        .sum();
    let progress = crate::progress::Progress::new(total, opts.progress, None, None);

    std::thread::scope(|s| {
        let workers = opts.threads.clamp(1, 256);
        let (tx, rx) = bounded::<Work>(workers * 2);
        for _ in 0..workers {
            let rx = rx.clone();
            let (results, pairs, progress) = (&results, &pairs, &progress);
            let worker = move || {
                for w in rx {
                    let (ta, tb) = (a.tensor(pairs[w.pair].0), b.tensor(pairs[w.pair].1));
                    let p = compare_chunk(ta.dtype, &w.a, tb.dtype, &w.b);
                    progress.add((w.a.len() + w.b.len()) as u64);
                    let mut r = results.lock().unwrap_or_else(|e| e.into_inner());
                    r[w.pair][w.chunk] = Some(p);
                }
            };
            if let Err(e) = std::thread::Builder::new().spawn_scoped(s, worker) {
                fail(Error::io("cannot start a compute thread", e));
                break;
            }
        }
        drop(rx);
        // The reader (this thread): A's order, each chunk of both sides under one permit.
        'pairs: for (pi, &(ia, ib)) in pairs.iter().enumerate() {
            let (ta, tb) = (a.tensor(ia), b.tensor(ib));
            for (ci, rows) in plans[pi].iter().enumerate() {
                let cost = match rows {
                    Some(r) => (r.end - r.start) * (ta.row_bytes() + tb.row_bytes()),
                    None => ta.len + tb.len,
                };
                let Some(permit) = budget.acquire(cost, &stopped) else {
                    break 'pairs;
                };
                let read = read_rows(&files_a[ta.file], ta, rows.clone())
                    .and_then(|x| read_rows(&files_b[tb.file], tb, rows.clone()).map(|y| (x, y)));
                let (xa, xb) = match read {
                    Ok(v) => v,
                    Err(e) => {
                        fail(e);
                        break 'pairs;
                    }
                };
                if xa.len() * tb.dtype.bits() as usize != xb.len() * ta.dtype.bits() as usize {
                    fail(
                        Error::internal(format!("read {} and {} bytes", xa.len(), xb.len()))
                            .at_tensor(&ta.name),
                    );
                    break 'pairs;
                }
                bytes_read += (xa.len() + xb.len()) as u64;
                let w = Work {
                    pair: pi,
                    chunk: ci,
                    a: xa,
                    b: xb,
                    _permit: permit,
                };
                if tx.send(w).is_err() {
                    break 'pairs;
                }
            }
        }
        drop(tx);
    });
    progress.finish();
    if opts.cancel.load(Ordering::Relaxed) {
        return Err(Error::new(ErrorKind::Interrupted));
    }
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut tensors = Vec::with_capacity(pairs.len());
    for (&(ia, ib), parts) in pairs.iter().zip(&results) {
        let (ta, tb) = (a.tensor(ia), b.tensor(ib));
        let mut total = Partial::default();
        for p in parts {
            // Chunks are combined in row order, so the sums do not depend on scheduling.
            let p = p
                .as_ref()
                .ok_or_else(|| Error::internal("a chunk was never compared").at_tensor(&ta.name))?;
            total.merge(p);
        }
        tensors.push(finish(&ta.name, ta, tb, &total, opts.ulps));
    }
    tensors.sort_by(|x, y| compare_names(&x.name, &y.name));
    only_in_a.sort_by(|x, y| compare_names(x, y));
    only_in_b.sort_by(|x, y| compare_names(x, y));
    mismatched.sort_by(|x, y| compare_names(&x.name, &y.name));
    let summary = summarize(
        &tensors,
        only_in_a.len(),
        only_in_b.len(),
        mismatched.len(),
        bytes_read,
        budget.peak(),
    );
    Ok(DiffReport {
        a: a.path.display().to_string(),
        b: b.path.display().to_string(),
        ulps: opts.ulps,
        tensors,
        only_in_a,
        only_in_b,
        mismatched,
        summary,
    })
}

fn summarize(
    tensors: &[TensorDiff],
    only_in_a: usize,
    only_in_b: usize,
    mismatched: usize,
    bytes_read: u64,
    peak_memory: u64,
) -> Summary {
    let count = |s: Status| tensors.iter().filter(|t| t.status == s).count();
    let (identical, within) = (count(Status::Identical), count(Status::Within));
    let differing = tensors.len() - identical - within;
    let verdict = if differing + only_in_a + only_in_b + mismatched > 0 {
        "different"
    } else if within > 0 {
        "within"
    } else {
        "identical"
    };
    Summary {
        compared: tensors.len(),
        identical,
        within,
        differing,
        only_in_a,
        only_in_b,
        mismatched,
        elements: tensors.iter().map(|t| t.elements).sum(),
        differing_elements: tensors.iter().map(|t| t.differing).sum(),
        max_abs: tensors.iter().filter_map(|t| t.max_abs).reduce(f64::max),
        max_ulp: tensors.iter().filter_map(|t| t.max_ulp).max(),
        verdict: verdict.to_string(),
        bytes_read,
        peak_memory,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16s(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes())
            .collect()
    }

    #[test]
    fn one_ulp_apart_in_f16() {
        let a = f16s(&[1.0, -2.0, 0.5, 3.0]);
        let mut b = a.clone();
        // The last element one ulp up (an ulp of f16 in [2, 4) is 2^-9).
        let bits = u16::from_le_bytes([b[6], b[7]]) + 1;
        b[6..8].copy_from_slice(&bits.to_le_bytes());
        let p = compare_chunk(DType::F16, &a, DType::F16, &b);
        assert_eq!((p.elements, p.differing, p.max_ulp), (4, 1, 1));
        assert!((p.max_abs - 2f64.powi(-9)).abs() < 1e-12, "{}", p.max_abs);
        let p = compare_chunk(DType::F16, &a, DType::F16, &a);
        assert_eq!((p.differing, p.max_ulp, p.max_abs), (0, 0, 0.0));
    }

    #[test]
    fn ulps_count_across_zero_and_nan_is_far() {
        let a = 0x0001u16.to_le_bytes(); // smallest positive subnormal
        let b = 0x8001u16.to_le_bytes(); // its negative
        let p = compare_chunk(DType::F16, &a, DType::F16, &b);
        assert_eq!(p.max_ulp, 2);
        let nan = 0x7E00u16.to_le_bytes();
        let p = compare_chunk(DType::F16, &a, DType::F16, &nan);
        assert_eq!((p.differing, p.max_ulp), (1, u64::MAX));
        assert_eq!(p.max_abs, f64::INFINITY);
        let p = compare_chunk(DType::F16, &nan, DType::F16, &nan);
        assert_eq!(p.differing, 0);
    }

    #[test]
    fn f32_and_across_dtypes() {
        let a: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let b: Vec<u8> = [1.0f32, f32::from_bits(2.0f32.to_bits() + 3)]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let p = compare_chunk(DType::F32, &a, DType::F32, &b);
        assert_eq!((p.differing, p.max_ulp), (1, 3));
        // F16 against F32 holding the same values: no element differs by value.
        let h = f16s(&[1.0, 2.0]);
        let p = compare_chunk(DType::F16, &h, DType::F32, &a);
        assert_eq!((p.differing, p.max_abs), (0, 0.0));
    }

    #[test]
    fn metrics_of_a_known_pair() {
        let a = f16s(&[3.0, 4.0]);
        let b = f16s(&[4.0, 3.0]);
        let p = compare_chunk(DType::F16, &a, DType::F16, &b);
        let ta = TensorInfo {
            name: "w".into(),
            dtype: DType::F16,
            shape: vec![2],
            file: 0,
            offset: 0,
            len: 4,
            layout: Layout::Contiguous,
        };
        let d = finish("w", &ta, &ta, &p, None);
        assert_eq!(d.status, Status::Differs);
        assert_eq!(d.max_abs, Some(1.0));
        // ‖a−b‖ = √2, ‖b‖ = 5; cos = 24/25.
        assert!((d.rel_l2.unwrap() - 2f64.sqrt() / 5.0).abs() < 1e-12);
        assert!((d.cosine.unwrap() - 0.96).abs() < 1e-12);
        let d = finish("w", &ta, &ta, &p, Some(1 << 12));
        assert_eq!(d.status, Status::Within);
    }

    #[test]
    fn integers_compare_bytewise() {
        let a = [1u8, 0, 2, 0, 3, 0];
        let b = [1u8, 0, 2, 1, 3, 0];
        let p = compare_chunk(DType::I16, &a, DType::I16, &b);
        assert_eq!((p.elements, p.differing), (3, 1));
    }

    #[test]
    fn partials_add_up_like_one_chunk() {
        let a = f16s(&(0..3000).map(|i| i as f32 * 0.01).collect::<Vec<_>>());
        let b = f16s(&(0..3000).map(|i| i as f32 * 0.0101).collect::<Vec<_>>());
        let whole = compare_chunk(DType::F16, &a, DType::F16, &b);
        let mut parts = compare_chunk(DType::F16, &a[..2000], DType::F16, &b[..2000]);
        parts.merge(&compare_chunk(
            DType::F16,
            &a[2000..],
            DType::F16,
            &b[2000..],
        ));
        assert_eq!(
            (whole.elements, whole.differing, whole.max_ulp),
            (parts.elements, parts.differing, parts.max_ulp)
        );
        assert!((whole.sq_diff - parts.sq_diff).abs() <= 1e-9 * whole.sq_diff);
    }

    #[test]
    fn chunks_cover_every_row_once() {
        let t = TensorInfo {
            name: "w".into(),
            dtype: DType::F16,
            shape: vec![10, 4],
            file: 0,
            offset: 0,
            len: 80,
            layout: Layout::Contiguous,
        };
        let c = chunks(&t, &t, 48);
        let rows: Vec<Range<u64>> = c.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(rows, vec![0..3, 3..6, 6..9, 9..10]);
    }
}
