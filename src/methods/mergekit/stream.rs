//! Streaming a tensor in passes over its row chunks, for methods whose statistics span the
//! whole tensor (norms, dot products, top-k thresholds) when it is too large to hold.
//!
//! Sums in the streamed passes accumulate in f64 and elements tied at a magnitude threshold
//! are kept in index order, where the whole-tensor path follows PyTorch's reduction order
//! and sort exactly; PyTorch's own results for tensors this large depend on its thread count.

use std::cell::{Cell, RefCell};
use std::ops::{Deref, Range};
use std::rc::Rc;

use crate::aligned::AlignedOut;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::bytes::{decode, decode_append, encode_append, round_to};

/// Loads the operands of a row range.
pub type LoadFn<'a> = &'a dyn Fn(Range<u64>) -> Result<Chunk>;
/// Writes the output bytes (in the output dtype) of a row range.
pub type WriteFn<'a> = &'a dyn Fn(Range<u64>, AlignedOut) -> Result<()>;

/// Elements per tile of the per-element work inside a chunk (stays in L2).
pub(crate) const TILE_ELEMS: usize = 32 * 1024;

/// Elements per block of a streamed pass's per-element work: a block of each operand, read
/// with [`Chunk::read`], stays in L1.
pub(crate) const BLOCK_ELEMS: usize = 2048;

/// The ranges of `run`, in blocks of `size` elements (the last one shorter).
pub(crate) fn blocks(run: Range<usize>, size: usize) -> impl Iterator<Item = Range<usize>> {
    let end = run.end;
    run.step_by(size.max(1))
        .map(move |a| a..(a + size).min(end))
}

/// Access to one step's data: operands by row range, and the output.
pub struct StreamCtx<'a> {
    pub rows: u64,
    pub cols: usize,
    pub chunk_rows: u64,
    /// The operands of a row range.
    pub load: LoadFn<'a>,
    /// The dtype the output is stored in.
    pub out_dtype: DType,
    /// Where row 0's output goes in the output file (outputs are placed for it).
    pub out_offset: u64,
    /// Write a row range's output bytes.
    pub write: WriteFn<'a>,
}

/// A row range's output, encoded a block at a time as a pass produces it: the values are
/// never kept whole in f32.
pub struct Output {
    dtype: DType,
    bytes: AlignedOut,
}

impl Output {
    /// Append output values (in the compute dtype's precision).
    pub fn push(&mut self, values: &[f32]) {
        encode_append(self.dtype, values, self.bytes.append());
    }
}

impl StreamCtx<'_> {
    /// Write output values (in the compute dtype's precision) for a row range.
    pub fn emit(&self, rows: Range<u64>, values: &[f32]) -> Result<()> {
        let mut out = self.output(rows.start, values.len());
        out.push(values);
        self.emit_output(rows, out)
    }

    /// An empty output for `len` elements from row `first` on, to fill with
    /// [`Output::push`].
    pub fn output(&self, first: u64, len: usize) -> Output {
        let size = self.out_dtype.size();
        let at = first * self.cols as u64 * self.out_dtype.bits() / 8;
        Output {
            dtype: self.out_dtype,
            bytes: AlignedOut::new(len * size, self.out_offset + at),
        }
    }

    /// Write a filled [`Output`] for a row range.
    pub fn emit_output(&self, rows: Range<u64>, out: Output) -> Result<()> {
        (self.write)(rows, out.bytes)
    }

    /// One pass over the tensor, chunk by chunk in row order, each operand decoded whole.
    pub fn pass(&self, mut f: impl FnMut(Range<u64>, Vec<Vec<f32>>) -> Result<()>) -> Result<()> {
        self.pass_chunks(|rows, chunk| f(rows, chunk.into_values()))
    }

    /// One pass over the tensor, chunk by chunk in row order; the operands are read a block
    /// at a time with [`Chunk::read`], so they never need to be decoded whole.
    /// A read that fails inside the chunk fails the pass (its error wins over `f`'s result).
    pub fn pass_chunks(&self, mut f: impl FnMut(Range<u64>, Chunk) -> Result<()>) -> Result<()> {
        let mut r0 = 0;
        while r0 < self.rows {
            let r1 = (r0 + self.chunk_rows.max(1)).min(self.rows);
            let chunk = (self.load)(r0..r1)?;
            let failed = Rc::clone(&chunk.failed);
            let done = f(r0..r1, chunk);
            if let Some(e) = failed.take() {
                return Err(e);
            }
            done?;
            r0 = r1;
        }
        Ok(())
    }
}

/// The operands of one chunk of rows: each either decoded values, or its stored bytes,
/// decoded (and rounded) a block at a time where a method reads it. Reading from the
/// stored bytes saves writing the f32 chunk to memory and reading it back.
#[derive(Default)]
pub struct Chunk {
    operands: Vec<ChunkOperand>,
    /// The first error of a windowed operand's reads (the values read as zeros);
    /// [`StreamCtx::pass_chunks`] returns it.
    failed: Rc<Cell<Option<Error>>>,
}

/// Reads an operand's stored bytes from a byte offset on (errors name the file and tensor).
pub type ReadAt = Box<dyn Fn(u64, &mut [u8]) -> Result<()>>;

/// Bytes per window of a windowed operand (streamed passes here, elementwise chunks in the
/// pipeline): small enough that a chunk's windows (one per operand, per worker) stay in the
/// CPU cache between the read and the decode.
pub(crate) const WINDOW_BYTES: usize = 1 << 20;

/// The window of a windowed operand currently read: elements `first..first + n`.
struct Window {
    first: usize,
    n: usize,
    /// Bytes read at once (more when a read asks for more).
    size: usize,
    bytes: Vec<u8>,
}

impl Drop for Window {
    fn drop(&mut self) {
        let bytes = std::mem::take(&mut self.bytes);
        SPARE_WINDOWS.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < 8 {
                s.push(bytes);
            }
        });
    }
}

thread_local! {
    /// Window buffers of finished chunks, for the next chunk's operands (a fresh megabyte
    /// per operand per chunk would be page faults and zeroing every time).
    static SPARE_WINDOWS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

enum ChunkOperand {
    Values(Vec<f32>),
    Stored {
        bytes: Box<dyn Deref<Target = [u8]>>,
        dtype: DType,
        len: usize,
        /// Applied in order after decoding.
        roundings: Vec<DType>,
    },
    /// Read from its file a window at a time as the method goes through it.
    Windowed {
        read: ReadAt,
        dtype: DType,
        len: usize,
        roundings: Vec<DType>,
        window: RefCell<Window>,
    },
}

impl Chunk {
    /// Operands already decoded.
    pub fn from_values(values: Vec<Vec<f32>>) -> Chunk {
        Chunk {
            operands: values.into_iter().map(ChunkOperand::Values).collect(),
            failed: Rc::default(),
        }
    }

    /// Add an operand as decoded values.
    pub fn push_values(&mut self, v: Vec<f32>) {
        self.operands.push(ChunkOperand::Values(v));
    }

    /// Add an operand as `len` elements stored as `dtype` (a float type of whole bytes; the
    /// bytes hold at least `len` of them), rounded to each of `roundings` in turn once decoded.
    pub fn push_stored(
        &mut self,
        bytes: Box<dyn Deref<Target = [u8]>>,
        dtype: DType,
        len: usize,
        roundings: Vec<DType>,
    ) {
        debug_assert!(dtype.bits() >= 8 && bytes.len() >= len * dtype.size());
        self.operands.push(ChunkOperand::Stored {
            bytes,
            dtype,
            len,
            roundings,
        });
    }

    /// Add an operand of `len` elements stored as `dtype` (a float type of whole bytes),
    /// read with `read` a window at a time where the method reads it, and rounded to each
    /// of `roundings` in turn once decoded.
    pub fn push_windowed(&mut self, read: ReadAt, dtype: DType, len: usize, roundings: Vec<DType>) {
        self.push_windowed_by(read, dtype, len, roundings, WINDOW_BYTES);
    }

    /// [`push_windowed`](Self::push_windowed) with windows of `window` bytes.
    fn push_windowed_by(
        &mut self,
        read: ReadAt,
        dtype: DType,
        len: usize,
        roundings: Vec<DType>,
        window: usize,
    ) {
        debug_assert!(dtype.bits() >= 8);
        let bytes = SPARE_WINDOWS
            .with(|s| s.borrow_mut().pop())
            .unwrap_or_default();
        self.operands.push(ChunkOperand::Windowed {
            read,
            dtype,
            len,
            roundings,
            window: RefCell::new(Window {
                first: 0,
                n: 0,
                size: window.max(dtype.size()),
                bytes,
            }),
        });
    }

    /// Elements of operand `k` in this chunk.
    pub fn len(&self, k: usize) -> usize {
        match self.operands.get(k) {
            Some(ChunkOperand::Values(v)) => v.len(),
            Some(ChunkOperand::Stored { len, .. } | ChunkOperand::Windowed { len, .. }) => *len,
            None => 0,
        }
    }

    /// Elements `at..at + out.len()` of operand `k` into `out` (zeros past its end).
    pub fn read(&self, k: usize, at: usize, out: &mut [f32]) {
        if at >= self.len(k) {
            out.fill(0.0);
            return;
        }
        let end = (at + out.len()).min(self.len(k));
        let (have, past) = out.split_at_mut(end - at);
        match self.operands.get(k) {
            Some(ChunkOperand::Values(v)) => have.copy_from_slice(&v[at..end]),
            Some(ChunkOperand::Stored {
                bytes,
                dtype,
                roundings,
                ..
            }) => {
                let size = dtype.size();
                decode(*dtype, &bytes[at * size..end * size], have);
                for &r in roundings {
                    round_to(r, have);
                }
            }
            Some(ChunkOperand::Windowed {
                read,
                dtype,
                len,
                roundings,
                window,
            }) => {
                let w = &mut *window.borrow_mut();
                let size = dtype.size();
                if at < w.first || end > w.first + w.n {
                    // Refill from `at` on: a window or the elements asked for, if more.
                    let n = (end - at).max(w.size / size).min(*len - at);
                    w.bytes.resize(n * size, 0);
                    w.first = at;
                    w.n = n;
                    if let Err(e) = read((at * size) as u64, &mut w.bytes) {
                        w.n = 0;
                        let first = self.failed.take();
                        self.failed.set(first.or(Some(e)));
                        have.fill(0.0);
                    }
                }
                if w.n > 0 {
                    let a = (at - w.first) * size;
                    decode(*dtype, &w.bytes[a..a + (end - at) * size], have);
                    for &r in roundings {
                        round_to(r, have);
                    }
                }
            }
            None => {}
        }
        past.fill(0.0);
    }

    /// Every operand decoded whole.
    pub fn into_values(self) -> Vec<Vec<f32>> {
        let windowed: Vec<Option<Vec<f32>>> = (0..self.operands.len())
            .map(|k| match &self.operands[k] {
                ChunkOperand::Windowed {
                    len, window, dtype, ..
                } => {
                    let mut v = vec![0f32; *len];
                    let step = window.borrow().size / dtype.size();
                    for b in blocks(0..*len, step) {
                        self.read(k, b.start, &mut v[b]);
                    }
                    Some(v)
                }
                _ => None,
            })
            .collect();
        self.operands
            .into_iter()
            .zip(windowed)
            .map(|(op, w)| match op {
                ChunkOperand::Windowed { .. } => w.unwrap_or_default(),
                ChunkOperand::Values(v) => v,
                ChunkOperand::Stored {
                    bytes,
                    dtype,
                    len,
                    roundings,
                } => {
                    let mut v = Vec::new();
                    decode_append(dtype, &bytes, len, &mut v);
                    for r in roundings {
                        round_to(r, &mut v);
                    }
                    v
                }
            })
            .collect()
    }
}

/// An f64 sum over a tensor streamed in chunks, kept in 8 lanes by element index (so the
/// loop vectorizes) and added up in lane order at the end: the same result however the
/// tensor is cut into chunks.
#[derive(Clone, Copy, Debug, Default)]
pub struct LaneSum {
    lanes: [f64; 8],
}

impl LaneSum {
    /// Add `f(x)` for the values `v`, whose first is element `start` of the tensor.
    #[inline(always)]
    pub fn add_with(&mut self, start: usize, v: &[f32], f: impl Fn(f32) -> f64) {
        Self::add_zip([self], start, v, v, |x, _| [f(x)]);
    }

    /// Add the values themselves. (Inlined, like every sum here, so it vectorizes in the
    /// caller's `kernels::vectorized` loop rather than compiling for the baseline CPU.)
    #[inline(always)]
    pub fn add(&mut self, start: usize, v: &[f32]) {
        self.add_with(start, v, |x| x as f64);
    }

    /// Add the squares of the values.
    #[inline(always)]
    pub fn add_sq(&mut self, start: usize, v: &[f32]) {
        self.add_with(start, v, |x| (x as f64) * (x as f64));
    }

    pub fn total(&self) -> f64 {
        self.lanes.iter().sum()
    }

    /// Feed `K` sums in one loop over paired values: `f(x, y)` gives each sum's term for
    /// `xs[j]`, `ys[j]`, element `start + j` of the tensor. Each sum adds its terms in the
    /// lanes and order of [`add_with`](Self::add_with), so the results are the same bits;
    /// sharing the loop lets the sums' dependency chains (one add per 8 elements each)
    /// overlap instead of running one after the other.
    #[inline(always)]
    pub fn add_zip<T: Copy, const K: usize>(
        sums: [&mut LaneSum; K],
        start: usize,
        xs: &[f32],
        ys: &[T],
        f: impl Fn(f32, T) -> [f64; K],
    ) {
        let len = xs.len().min(ys.len());
        let (xs, ys) = (&xs[..len], &ys[..len]);
        let mut acc = [[0f64; 8]; K];
        for (a, s) in acc.iter_mut().zip(&sums) {
            *a = s.lanes;
        }
        let one = |acc: &mut [[f64; 8]; K], j: usize| {
            for (a, t) in acc.iter_mut().zip(f(xs[j], ys[j])) {
                a[(start + j) % 8] += t;
            }
        };
        let head = ((8 - start % 8) % 8).min(len);
        (0..head).for_each(|j| one(&mut acc, j));
        let (bx, by) = (xs[head..].chunks_exact(8), ys[head..].chunks_exact(8));
        let tail = bx.remainder().len();
        // Terms of 8 elements first, then each sum's 8 lanes: this order vectorizes by lane.
        for (cx, cy) in bx.zip(by) {
            let mut t = [[0f64; K]; 8];
            for ((t, &x), &y) in t.iter_mut().zip(cx).zip(cy) {
                *t = f(x, y);
            }
            for (k, a) in acc.iter_mut().enumerate() {
                for (l, a) in a.iter_mut().enumerate() {
                    *a += t[l][k];
                }
            }
        }
        (len - tail..len).for_each(|j| one(&mut acc, j));
        for (s, a) in sums.into_iter().zip(acc) {
            s.lanes = a;
        }
    }
}

/// Ascending order of a row's magnitudes (NaN last), ties in index order: a stable LSD radix
/// sort of `|x|`'s bit patterns, 11 bits a pass, skipping a pass whose digit every key shares
/// (the low one whenever the values came from f16 or bf16). Each entry carries its key above
/// its index, so a pass reads its input in order. Reuses its buffers across rows.
pub struct MagnitudeOrder {
    entries: Vec<u64>,
    spare: Vec<u64>,
    order: Vec<u32>,
    counts: Box<[[u32; 1 << 11]; 3]>,
    /// For [`ranks`](Self::ranks): each element's rank, and a spare buffer of entries.
    ranks: Vec<u32>,
    bins: Vec<u32>,
}

impl Default for MagnitudeOrder {
    fn default() -> Self {
        MagnitudeOrder {
            entries: Vec::new(),
            spare: Vec::new(),
            order: Vec::new(),
            counts: Box::new([[0; 1 << 11]; 3]),
            ranks: Vec::new(),
            bins: Vec::new(),
        }
    }
}

impl MagnitudeOrder {
    const SHIFTS: [u32; 3] = [32, 43, 54];
    /// [`ranks`](Self::ranks) counts keys directly while their span is at most this many
    /// times the row's length (clearing and summing the counts then costs about as much as
    /// one more pass over the row); wider spans take the two radix passes.
    const COUNTING_SPAN_PER_ELEM: usize = 4;
    const MASK: u64 = (1 << 11) - 1;

    /// The row's indices in ascending magnitude order (rows index with u32: a row is one
    /// dim of a tensor).
    pub fn sort(&mut self, row: &[f32]) -> &[u32] {
        let n = row.len();
        self.entries.clear();
        self.entries.extend(
            row.iter()
                .enumerate()
                .map(|(i, &x)| u64::from(magnitude_key(x)) << 32 | i as u64),
        );
        self.spare.resize(n, 0);
        for c in self.counts.iter_mut() {
            c.fill(0);
        }
        for &e in &self.entries {
            for (c, &shift) in self.counts.iter_mut().zip(&Self::SHIFTS) {
                c[((e >> shift) & Self::MASK) as usize] += 1;
            }
        }
        for (counts, &shift) in self.counts.iter_mut().zip(&Self::SHIFTS) {
            if !digit_starts(counts, n) {
                continue;
            }
            for &e in &self.entries {
                let digit = ((e >> shift) & Self::MASK) as usize;
                self.spare[counts[digit] as usize] = e;
                counts[digit] += 1;
            }
            std::mem::swap(&mut self.entries, &mut self.spare);
        }
        self.order.clear();
        self.order.extend(self.entries.iter().map(|&e| e as u32));
        &self.order
    }

    /// Each element's ascending rank in [`sort`](Self::sort)'s order, in index order.
    ///
    /// Values rounded from f16 or bf16 have few distinct magnitudes: with the trailing bits
    /// every key shares dropped and the nonzero ones counted from the smallest (zero stays
    /// below them all), a row's keys span less than 2¹⁶. A span within a few times the
    /// row's length is ranked by a counting sort; a wider one packs key and index into a
    /// u32 and sorts them in two 8-bit passes (small count tables, half the bytes moved).
    /// Other rows (f32 values, NaN, infinities) take the 64-bit radix sort.
    pub fn ranks(&mut self, row: &[f32]) -> &[u32] {
        let n = row.len();
        let key = magnitude_key;
        let KeyRange { any, min_nz, max } = KeyRange::of(row);
        let shift = any.trailing_zeros().min(31);
        // Nonzero keys map to 1.., zero to 0 (an all-zero row: everything to 0).
        let base = (min_nz.wrapping_add(1) >> shift).saturating_sub(1);
        // Every nonzero key is above `base` after the shift; zero saturates to 0 (branchless).
        let compact = move |k: u32| (k >> shift).saturating_sub(base);
        let mut ranks = std::mem::take(&mut self.ranks);
        let span = compact(max) as usize + 1;
        if span <= Self::COUNTING_SPAN_PER_ELEM.saturating_mul(n) {
            // Few enough distinct keys for a counting sort: each key's first rank, then the
            // ranks in index order (an element's rank is its key's next free one).
            let starts = &mut self.bins;
            starts.clear();
            starts.resize(span, 0);
            for &x in row {
                starts[compact(key(x)) as usize] += 1;
            }
            exclusive_prefix_sums(starts);
            ranks.clear();
            ranks.extend(row.iter().map(|&x| {
                let s = &mut starts[compact(key(x)) as usize];
                *s += 1;
                *s - 1
            }));
            self.ranks = ranks;
            return &self.ranks;
        }
        ranks.clear();
        ranks.resize(n, 0);
        if n > 1 << 16 || span > 1 << 16 {
            for (r, &j) in self.sort(row).iter().enumerate() {
                ranks[j as usize] = r as u32;
            }
            self.ranks = ranks;
            return &self.ranks;
        }
        // Entries compact key << 16 | index, and both digits' counts in one pass.
        let mut counts = [[0u32; 256]; 2];
        let mut entries = std::mem::take(&mut self.order);
        entries.clear();
        entries.extend(row.iter().enumerate().map(|(j, &x)| {
            let e = compact(key(x)) << 16 | j as u32;
            counts[0][(e >> 16 & 0xFF) as usize] += 1;
            counts[1][(e >> 24) as usize] += 1;
            e
        }));
        let mut spare = std::mem::take(&mut self.bins);
        spare.clear();
        spare.resize(n, 0);
        for (counts, shift) in counts.iter_mut().zip([16u32, 24]) {
            if !digit_starts(counts, n) {
                continue;
            }
            for &e in &entries {
                let digit = (e >> shift & 0xFF) as usize;
                spare[counts[digit] as usize] = e;
                counts[digit] += 1;
            }
            std::mem::swap(&mut entries, &mut spare);
        }
        for (r, &e) in entries.iter().enumerate() {
            ranks[(e & 0xFFFF) as usize] = r as u32;
        }
        self.order = entries;
        self.bins = spare;
        self.ranks = ranks;
        &self.ranks
    }
}

/// A magnitude's sort key: `|x|`'s bits, monotonic in |x| (NaN above infinity); every
/// magnitude ranking and threshold (TIES, breadcrumbs, DELLA) orders by it.
#[inline(always)]
pub(crate) fn magnitude_key(x: f32) -> u32 {
    x.to_bits() & 0x7FFF_FFFF
}

/// The span of a row's [`magnitude_key`]s, in one vectorized pass.
pub(crate) struct KeyRange {
    /// Every key OR-ed together (its trailing zeros are the ones all keys share).
    pub any: u32,
    /// The smallest nonzero key minus one (`u32::MAX` when every key is zero).
    pub min_nz: u32,
    pub max: u32,
}

impl KeyRange {
    pub fn of(row: &[f32]) -> KeyRange {
        // The smallest nonzero key is found as the smallest `key − 1` (zero wraps to the top).
        crate::kernels::vectorized(
            #[inline(always)]
            || {
                let (mut any, mut min_nz, mut max) = (0u32, u32::MAX, 0u32);
                for &x in row {
                    let k = magnitude_key(x);
                    any |= k;
                    min_nz = min_nz.min(k.wrapping_sub(1));
                    max = max.max(k);
                }
                KeyRange { any, min_nz, max }
            },
        )
    }
}

/// Counts into where each one's run starts (exclusive prefix sums).
fn exclusive_prefix_sums(counts: &mut [u32]) {
    let mut at = 0u32;
    for c in counts.iter_mut() {
        let here = *c;
        *c = at;
        at = at.wrapping_add(here);
    }
}

/// Turn one digit's counts over `n` keys into where each digit's run starts in a stable
/// radix pass; false when every key has the same digit (the pass would move nothing).
fn digit_starts(counts: &mut [u32], n: usize) -> bool {
    if counts.iter().any(|&c| c as usize == n) {
        return false;
    }
    exclusive_prefix_sums(counts);
    true
}

/// An order-preserving key of an f32 for radix selection: negative values below positive
/// ones, −0 just below +0, NaN at the ends.
pub(crate) fn order_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The f32 an [`order_key`] came from.
pub(crate) fn from_order_key(k: u32) -> f32 {
    f32::from_bits(if k & 0x8000_0000 != 0 {
        k & 0x7FFF_FFFF
    } else {
        !k
    })
}

/// An order statistic found by [`RadixSelect`]: the key at the rank, and how many keys are
/// below it and equal to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rank {
    pub key: u32,
    pub below: u64,
    pub equal: u64,
}

/// The keys at given ascending ranks of a tensor too large to hold, in two passes of 16 bits
/// each: [`count`](Self::count) every key, [`target`](Self::target) the ranks,
/// [`refine`](Self::refine) every key again, then [`result`](Self::result). Exact, whatever
/// the chunking, and used on one whole tensor as well so both paths select alike.
pub(crate) struct RadixSelect {
    hi: Vec<u64>,
    /// Per query: its rank, its high-16-bit bucket and the count below that bucket, and the
    /// histogram of the low 16 bits inside the bucket.
    queries: Vec<(u64, u32, u64, Vec<u64>)>,
}

impl RadixSelect {
    pub fn new() -> RadixSelect {
        RadixSelect {
            hi: vec![0; 1 << 16],
            queries: Vec::new(),
        }
    }

    /// First pass.
    pub fn count(&mut self, keys: &[u32]) {
        for &k in keys {
            self.hi[(k >> 16) as usize] += 1;
        }
    }

    /// Between the passes: the ascending ranks wanted (each below the number of keys).
    pub fn target(&mut self, ranks: &[u64]) {
        self.queries = ranks
            .iter()
            .map(|&r| {
                let (bucket, below) = locate(&self.hi, r);
                (r, bucket, below, vec![0; 1 << 16])
            })
            .collect();
    }

    /// Second pass.
    pub fn refine(&mut self, keys: &[u32]) {
        for &k in keys {
            for (_, bucket, _, lo) in self.queries.iter_mut() {
                if k >> 16 == *bucket {
                    lo[(k & 0xFFFF) as usize] += 1;
                }
            }
        }
    }

    /// The order statistics, in the order the ranks were given.
    pub fn result(&self) -> Vec<Rank> {
        self.queries
            .iter()
            .map(|(r, bucket, below, lo)| {
                let (low, below_lo) = locate(lo, r - below);
                Rank {
                    key: bucket << 16 | low,
                    below: below + below_lo,
                    equal: lo[low as usize],
                }
            })
            .collect()
    }
}

/// The bucket holding ascending rank `rank` of a histogram, and the count below it.
fn locate(hist: &[u64], rank: u64) -> (u32, u64) {
    let mut below = 0u64;
    for (b, &c) in hist.iter().enumerate() {
        if below + c > rank {
            return (b as u32, below);
        }
        below += c;
    }
    (hist.len().saturating_sub(1) as u32, below)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A windowed operand reads the same values as the bytes held whole, for reads of any
    /// length at any offset (in order, straddling windows, going back, past the end), with
    /// its roundings, and as whole values.
    #[test]
    fn windowed_operands_read_what_stored_ones_do() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let len = 1000;
        let values: Vec<f32> = (0..len).map(|i| (i as f32 - 300.3) * 0.0137).collect();
        let mut bytes = Vec::new();
        encode_append(DType::F32, &values, &mut bytes);
        let reads = std::sync::Arc::new(AtomicUsize::new(0));
        let chunk = |window| {
            let mut c = Chunk::default();
            c.push_stored(Box::new(bytes.clone()), DType::F32, len, vec![DType::F16]);
            let (src, n) = (bytes.clone(), std::sync::Arc::clone(&reads));
            let read: ReadAt = Box::new(move |at, buf| {
                n.fetch_add(1, Ordering::Relaxed);
                buf.copy_from_slice(&src[at as usize..at as usize + buf.len()]);
                Ok(())
            });
            c.push_windowed_by(read, DType::F32, len, vec![DType::F16], window);
            c
        };
        for window in [4, 36, 400, 4000, 1 << 20] {
            let c = chunk(window);
            let mut at = 0;
            for n in [7, 1, 64, 100, 3, 250, 0, 9, 1000] {
                let (mut want, mut got) = (vec![1f32; n], vec![2f32; n]);
                c.read(0, at, &mut want);
                c.read(1, at, &mut got);
                assert_eq!(got, want, "window {window}, {n} at {at}");
                at = (at + n) % (len + 20);
            }
            // Backwards, a block straddling the last window's end, and blocks past it.
            for at in [990, 10, 995, 1000, 1005, 3] {
                let (mut want, mut got) = (vec![0f32; 8], vec![0f32; 8]);
                c.read(0, at, &mut want);
                c.read(1, at, &mut got);
                assert_eq!(got, want, "window {window}, back to {at}");
            }
            assert!(c.failed.take().is_none());
            let v = c.into_values();
            assert_eq!(v[0], v[1], "window {window}");
        }
        // Sequential blocks cost one read per window, not one per block.
        reads.store(0, Ordering::Relaxed);
        let c = chunk(400);
        let mut out = [0f32; 10];
        for at in (0..len).step_by(10) {
            c.read(1, at, &mut out);
        }
        assert_eq!(reads.load(Ordering::Relaxed), 10);
    }

    /// A failed window read fails the pass with its error, even when the method itself
    /// finished without one (it saw zeros), and the rest of the tensor is not read.
    #[test]
    fn a_failed_window_read_fails_the_pass() {
        let load = |rows: Range<u64>| -> Result<Chunk> {
            let mut c = Chunk::default();
            let first = rows.start;
            let read: ReadAt = Box::new(move |at, buf| {
                if first == 2 && at > 0 {
                    return Err(Error::invalid("disk on fire"));
                }
                buf.fill(0x3c);
                Ok(())
            });
            c.push_windowed_by(read, DType::F16, 8, Vec::new(), 4);
            Ok(c)
        };
        let write = |_: Range<u64>, _: AlignedOut| -> Result<()> { Ok(()) };
        let ctx = StreamCtx {
            rows: 6,
            cols: 4,
            chunk_rows: 2,
            load: &load,
            out_dtype: DType::F16,
            out_offset: 0,
            write: &write,
        };
        let mut seen = Vec::new();
        let e = ctx
            .pass_chunks(|rows, c| {
                let mut v = [9f32; 8];
                for at in [0, 4] {
                    c.read(0, at, &mut v[at..at + 4]);
                }
                seen.push((rows, v));
                Ok(())
            })
            .unwrap_err();
        assert!(e.to_string().contains("disk on fire"), "{e}");
        assert_eq!(seen.len(), 2, "stopped at the failing chunk");
        assert_eq!(seen[0].1, [half::f16::from_bits(0x3c3c).to_f32(); 8]);
        assert_eq!(
            &seen[1].1[4..],
            &[0.0; 4],
            "the failed window reads as zeros"
        );
    }

    #[test]
    fn lane_sum_does_not_depend_on_the_chunking() {
        let v: Vec<f32> = (0..1003)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
            .collect();
        let whole = {
            let mut s = LaneSum::default();
            s.add_sq(0, &v);
            s.total()
        };
        for cut in [1, 3, 7, 8, 13, 64, 1002] {
            let mut s = LaneSum::default();
            let mut at = 0;
            for c in v.chunks(cut) {
                s.add_sq(at, c);
                at += c.len();
            }
            assert_eq!(s.total().to_bits(), whole.to_bits(), "chunks of {cut}");
        }
        let exact: f64 = v.iter().map(|&x| (x as f64) * (x as f64)).sum();
        assert!((whole - exact).abs() <= 1e-12 * exact);
    }

    /// Sums fed side by side in one loop (and `add_with`, one sum) are the same bits as the
    /// naive per-lane sums in index order, at every alignment of the start and every length
    /// (head, body and tail of the lanes).
    #[test]
    fn zipped_lane_sums_match_naive_lane_sums() {
        let xs: Vec<f32> = (0..203)
            .map(|i| ((i * 7919 % 211) as f32 - 105.0) * 1.3e-3)
            .collect();
        let keep: Vec<bool> = (0..203).map(|i| i * 31 % 7 < 3).collect();
        for start in 0..9 {
            for len in [0usize, 1, 5, 8, 9, 17, 64, 203] {
                let (x, m) = (&xs[..len], &keep[..len]);
                let (mut a, mut b) = (LaneSum::default(), LaneSum::default());
                LaneSum::add_zip([&mut a, &mut b], start, x, m, |x, k| {
                    [x.abs() as f64, if k { x as f64 } else { 0.0 }]
                });
                let mut single = LaneSum::default();
                single.add_with(start, x, |x| x.abs() as f64);
                let (mut want_a, mut want_b) = ([0f64; 8], [0f64; 8]);
                for (j, (&x, &k)) in x.iter().zip(m).enumerate() {
                    want_a[(start + j) % 8] += x.abs() as f64;
                    want_b[(start + j) % 8] += if k { x as f64 } else { 0.0 };
                }
                assert_eq!(a.lanes, want_a, "start {start}, len {len}");
                assert_eq!(b.lanes, want_b, "start {start}, len {len}");
                assert_eq!(single.lanes, want_a, "start {start}, len {len}");
            }
        }
    }

    #[test]
    fn radix_select_finds_order_statistics_of_signed_values() {
        let v: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919) % 5003) as f32 * if i % 3 == 0 { -0.37 } else { 1.1 })
            .collect();
        let keys: Vec<u32> = v.iter().map(|&x| order_key(x)).collect();
        let mut s = RadixSelect::new();
        for c in keys.chunks(333) {
            s.count(c);
        }
        let ranks = [0, 1250, 2499, 4999];
        s.target(&ranks);
        for c in keys.chunks(333) {
            s.refine(c);
        }
        let mut sorted = v.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        for &x in &v {
            assert_eq!(from_order_key(order_key(x)).to_bits(), x.to_bits());
        }
        for (r, got) in ranks.iter().zip(s.result()) {
            assert_eq!(got.key, order_key(sorted[*r as usize]));
            let x = sorted[*r as usize];
            assert_eq!(got.below, v.iter().filter(|&&y| y < x).count() as u64);
            assert_eq!(got.equal, v.iter().filter(|&&y| y == x).count() as u64);
        }
    }
}
