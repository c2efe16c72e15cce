//! The task-arithmetic family streamed in passes over row chunks, for tensors too large to
//! hold: TIES and breadcrumbs find their magnitude thresholds by a radix select (one pass
//! over 15-bit keys for f16/bf16, two of 16 bits for f32), then (if rescaling) the kept L1
//! sums are taken, DARE/DELLA masks drawn once and kept as bits, then the output is
//! written. Each pass reads the operands a block at a time from their stored bytes and
//! does all its per-element work on L1-sized blocks (DELLA's masks on tiles of whole rows).

use super::arith::D;
use super::sparsify::{DellaRows, Sparsify, dare_mask, masked, outlier_window, rescale_factor};
use super::stream::{Chunk, LaneSum, StreamCtx, TILE_ELEMS, blocks, magnitude_key};
use super::task_arithmetic::{BLOCK, Blocks, TaskInput, TaskMerge};
use crate::dtype::DType;
use crate::error::Result;
use crate::kernels;

/// Magnitude keys of 16-bit compute dtypes. Deltas are rounded to D, so for f16 and bf16
/// the magnitude has 15 significant bits and one histogram pass finds every threshold
/// exactly (f32 needs two passes of 16 bits).
#[derive(Clone, Copy)]
enum NarrowKeys {
    F16,
    BF16,
}

impl NarrowKeys {
    fn of(d: D) -> Option<NarrowKeys> {
        match d.0 {
            DType::F16 => Some(NarrowKeys::F16),
            DType::BF16 => Some(NarrowKeys::BF16),
            _ => None,
        }
    }

    /// Count the 15-bit magnitude keys of D-rounded values.
    fn count(self, v: &[f32], hist: &mut [u64], scratch: &mut Vec<u16>) {
        match self {
            NarrowKeys::F16 => {
                scratch.resize(v.len(), 0);
                (kernels::active().f32_to_f16)(v, scratch);
                for &h in scratch.iter() {
                    hist[(h & 0x7FFF) as usize] += 1;
                }
            }
            NarrowKeys::BF16 => {
                for &x in v {
                    hist[((x.to_bits() >> 16) & 0x7FFF) as usize] += 1;
                }
            }
        }
    }

    /// The magnitude key ([`magnitude_key`](super::stream::magnitude_key)) of the value a key
    /// stands for.
    fn mag_bits(self, key: u32) -> u32 {
        match self {
            NarrowKeys::F16 => magnitude_key(half::f16::from_bits(key as u16).to_f32()),
            NarrowKeys::BF16 => key << 16,
        }
    }
}

/// One ascending rank to locate in a tensor of magnitudes, found 16 bits per pass.
#[derive(Clone, Debug)]
struct RankQuery {
    rank: u64,
    /// High 16 bits of the value at `rank`, and how many elements lie in lower buckets.
    bucket: Option<(u32, u64)>,
    /// The value at `rank`, how many elements are smaller, and how many equal it.
    value: Option<(u32, u64, u64)>,
}

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

/// How a model's deltas are masked once its thresholds are known.
#[derive(Clone, Debug)]
enum Rule {
    /// Keep everything (density ≥ 1).
    All,
    /// Keep nothing (density ≤ 0 for TIES, DARE, DELLA).
    Zero,
    /// Keep ascending ranks [lo, hi): values strictly between the boundary values, and the
    /// boundary values' ties in index order.
    Window {
        lo: u64,
        hi: u64,
        low: (u32, u64, u64),
        high: (u32, u64, u64),
    },
    /// Bernoulli masks (DARE / DELLA).
    Random,
}

/// Per-model mask state for one pass (the counters of tied boundary values seen so far).
struct Masker<'a> {
    rule: &'a Rule,
    seen_low: u64,
    seen_high: u64,
}

impl Masker<'_> {
    /// The mask of a run of deltas, in index order: the window's comparisons over the whole
    /// run (they vectorize), then the elements tied with a boundary value one by one.
    #[inline(always)]
    fn mask_into(&mut self, dl: &[f32], m: &mut [bool]) {
        let Rule::Window { low, high, .. } = *self.rule else {
            for (k, &x) in m.iter_mut().zip(dl) {
                *k = self.keep(x);
            }
            return;
        };
        let (low, high) = (low.0, high.0);
        let mut tied = false;
        for (k, &x) in m.iter_mut().zip(dl) {
            let v = magnitude_key(x);
            *k = (v > low) & (v < high);
            tied |= (v == low) | (v == high);
        }
        if tied {
            for (k, &x) in m.iter_mut().zip(dl) {
                if magnitude_key(x) == low || magnitude_key(x) == high {
                    *k = self.keep(x);
                }
            }
        }
    }

    fn keep(&mut self, x: f32) -> bool {
        match self.rule {
            Rule::All => true,
            Rule::Zero => false,
            Rule::Random => unreachable!("random masks are drawn per element index"),
            Rule::Window { lo, hi, low, high } => {
                let v = magnitude_key(x);
                if v != low.0 && v != high.0 {
                    // Strictly between the boundary values is inside the window; written
                    // without branches, as half the elements of a tensor go each way.
                    return (v > low.0) & (v < high.0);
                }
                // rank of this element = (count below its value) + (its index among equals)
                let rank = if v == low.0 {
                    let r = low.1 + self.seen_low;
                    self.seen_low += 1;
                    if high.0 == low.0 {
                        self.seen_high += 1;
                    }
                    r
                } else if v == high.0 {
                    let r = high.1 + self.seen_high;
                    self.seen_high += 1;
                    r
                } else if v > low.0 && v < high.0 {
                    *lo // any rank inside the window
                } else {
                    u64::MAX
                };
                rank >= *lo && rank < *hi
            }
        }
    }
}

/// Set the bits of `mask` into `bits` from bit `first` on (a word at a time when aligned, as
/// tiles of whole rows usually are).
#[inline(always)]
fn write_bits(bits: &mut [u64], first: usize, mask: &[bool]) {
    if first.is_multiple_of(64) {
        let words = &mut bits[first / 64..];
        let whole = mask.chunks_exact(64);
        let rest = whole.remainder();
        // Whole words from fixed-size arrays: the compiler packs them with vector compares.
        for (w, c) in words.iter_mut().zip(whole) {
            let c: &[bool; 64] = c.try_into().unwrap_or(&[false; 64]);
            let mut word = 0u64;
            for (i, &b) in c.iter().enumerate() {
                word |= (b as u64) << i;
            }
            *w |= word;
        }
        if let Some(w) = words.get_mut(mask.len() / 64) {
            *w |= rest
                .iter()
                .enumerate()
                .fold(0u64, |word, (i, &b)| word | (b as u64) << i);
        }
    } else {
        for (e, &b) in mask.iter().enumerate() {
            bits[(first + e) / 64] |= (b as u64) << ((first + e) % 64);
        }
    }
}

/// The bits of `bits` from bit `first` on, into `mask`.
fn read_bits(bits: &[u64], first: usize, mask: &mut [bool]) {
    kernels::spread_bits(bits, first, mask)
}

/// `x − base` in place of a run of `x`, rounded to D: a model's delta.
fn delta_in_place(d: D, x: &mut [f32], base: &[f32]) {
    for (a, &b) in x.iter_mut().zip(base) {
        *a -= b;
    }
    d.q(x);
}

/// Model `i`'s delta over elements `at..at + out.len()` of a chunk whose base is `base`.
fn read_delta(c: &Chunk, d: D, i: usize, at: usize, base: &[f32], out: &mut [f32]) {
    c.read(i, at, out);
    delta_in_place(d, out, base);
}

/// Stream a task-arithmetic merge: the sparsifying thresholds (radix select), then the
/// rescale sums, then the output.
pub(crate) fn stream(r: &TaskMerge, ctx: &StreamCtx<'_>, d: D) -> Result<()> {
    let sparse = r.sparsify;
    let b = r.base;
    let others = &r.others;
    if others.is_empty() {
        // Only the base in this slice: it passes through.
        return ctx.pass(|rows, xs| ctx.emit(rows, &xs[b]));
    }
    let n = ctx.rows * ctx.cols as u64;
    let cols = ctx.cols.max(1);
    // Tiles of whole rows, for DELLA's row masks; everything else works in L1 blocks.
    let tile_len = (TILE_ELEMS / cols).max(1) * cols;
    let tiles = move |len: usize| {
        (0..len)
            .step_by(tile_len)
            .map(move |a| a..(a + tile_len).min(len))
    };

    // The rule per model.
    let mut rules: Vec<Rule> = Vec::with_capacity(others.len());
    let mut queries: Vec<Vec<RankQuery>> = Vec::new();
    for &i in others {
        let p: &TaskInput = &r.inputs[i];
        let rule_queries: Vec<u64> = if p.density >= 1.0 {
            rules.push(Rule::All);
            vec![]
        } else {
            match sparse {
                Sparsify::Magnitude if p.density > 0.0 && n > 0 => {
                    let k = ((p.density * n as f64) as u64).clamp(1, n);
                    rules.push(Rule::All); // placeholder, replaced once thresholds are known
                    vec![n - k, n - 1]
                }
                Sparsify::MagnitudeOutliers if n > 0 => {
                    let (n_bot, target) = outlier_window(p, n as usize);
                    if target == 0 {
                        rules.push(Rule::Zero);
                        vec![]
                    } else {
                        rules.push(Rule::All);
                        vec![n_bot as u64, (n_bot + target - 1) as u64]
                    }
                }
                Sparsify::Random | Sparsify::Della if p.density > 0.0 => {
                    rules.push(Rule::Random);
                    vec![]
                }
                _ => {
                    rules.push(Rule::Zero);
                    vec![]
                }
            }
        };
        queries.push(
            rule_queries
                .into_iter()
                .map(|rank| RankQuery {
                    rank,
                    bucket: None,
                    value: None,
                })
                .collect(),
        );
    }

    // Radix select: one pass over 15-bit keys for f16/bf16; for f32 the high 16 bits, then
    // the low 16 bits within the located buckets.
    let narrow = NarrowKeys::of(d);
    let selecting: Vec<usize> = (0..others.len())
        .filter(|&k| !queries[k].is_empty())
        .collect();
    // The deltas of the selecting models, block by block.
    let select_pass = |key_d: D, f: &mut dyn FnMut(usize, &[f32])| -> Result<()> {
        let (mut dl, mut base) = (vec![0f32; BLOCK], vec![0f32; BLOCK]);
        ctx.pass_chunks(|_, c| {
            for blk in blocks(0..c.len(b), BLOCK) {
                let base = &mut base[..blk.len()];
                c.read(b, blk.start, base);
                for &k in &selecting {
                    let dl = &mut dl[..blk.len()];
                    read_delta(&c, key_d, others[k], blk.start, base, dl);
                    f(k, dl);
                }
            }
            Ok(())
        })
    };
    if let Some(keys) = narrow
        && !selecting.is_empty()
    {
        let mut hist = vec![vec![0u64; 1 << 15]; others.len()];
        let mut scratch = Vec::new();
        // Converting x − base to f16 rounds it as D does: the f16 key needs no rounding first.
        let key_d = match keys {
            NarrowKeys::F16 => D(DType::F32),
            NarrowKeys::BF16 => d,
        };
        select_pass(key_d, &mut |k, dl| {
            keys.count(dl, &mut hist[k], &mut scratch)
        })?;
        for (k, qs) in queries.iter_mut().enumerate() {
            for q in qs.iter_mut() {
                let (key, below) = locate(&hist[k], q.rank);
                q.value = Some((keys.mag_bits(key), below, hist[k][key as usize]));
            }
        }
    } else if !selecting.is_empty() {
        let mut hi = vec![vec![0u64; 1 << 16]; others.len()];
        select_pass(d, &mut |k, dl| {
            for &x in dl {
                hi[k][(magnitude_key(x) >> 16) as usize] += 1;
            }
        })?;
        for (k, qs) in queries.iter_mut().enumerate() {
            for q in qs.iter_mut() {
                q.bucket = Some(locate(&hi[k], q.rank));
            }
        }
        let mut lo: Vec<Vec<Vec<u64>>> = queries
            .iter()
            .map(|q| vec![vec![0u64; 1 << 16]; q.len()])
            .collect();
        select_pass(d, &mut |k, dl| {
            for (qi, q) in queries[k].iter().enumerate() {
                let Some((bucket, _)) = q.bucket else {
                    continue;
                };
                for &x in dl {
                    let v = magnitude_key(x);
                    if v >> 16 == bucket {
                        lo[k][qi][(v & 0xFFFF) as usize] += 1;
                    }
                }
            }
        })?;
        for (k, qs) in queries.iter_mut().enumerate() {
            for (qi, q) in qs.iter_mut().enumerate() {
                if let Some((bucket, below)) = q.bucket {
                    let (low, below_lo) = locate(&lo[k][qi], q.rank - below);
                    let value = bucket << 16 | low;
                    q.value = Some((value, below + below_lo, lo[k][qi][low as usize]));
                }
            }
        }
    }
    for (k, qs) in queries.iter().enumerate() {
        if let [a, z] = qs.as_slice()
            && let (Some(low), Some(high)) = (a.value, z.value)
        {
            rules[k] = Rule::Window {
                lo: a.rank,
                hi: z.rank + 1,
                low,
                high,
            };
        }
    }

    // Bernoulli masks: element i of model k is kept with its probability. Drawn once: a
    // rescaling pass keeps them as bits for the output pass (1/32 of an f32 copy).
    let draw_mask =
        |k: usize, first: usize, dl: &[f32], mask: &mut [bool], della: &mut DellaRows| {
            let i = others[k];
            let p = &r.inputs[i];
            match sparse {
                Sparsify::Della => {
                    for (ri, (row, m)) in dl.chunks(cols).zip(mask.chunks_mut(cols)).enumerate() {
                        della.mask(first + ri * cols, row, m);
                    }
                }
                _ => dare_mask(r.seed, i, p.density, first, mask),
            }
        };
    let fresh = || -> Vec<Masker<'_>> {
        rules
            .iter()
            .map(|rule| Masker {
                rule,
                seen_low: 0,
                seen_high: 0,
            })
            .collect()
    };
    let mut dellas: Vec<DellaRows> = others
        .iter()
        .map(|&i| DellaRows::new(r.inputs[i].density, r.inputs[i].epsilon, r.seed, i))
        .collect();
    // Per model: its random mask as bits, once drawn (empty until then).
    let mut kept: Vec<Vec<u64>> = vec![Vec::new(); others.len()];
    // Per tile: the base, a model's deltas, mask and kept deltas.
    let (mut tile_base, mut tile_dl) = (Vec::new(), Vec::new());
    let mut tile_masks: Vec<Vec<bool>> = vec![Vec::new(); others.len()];

    // The rescale factors: Σ|δ| / Σ|kept δ| over the whole tensor.
    let mut factors: Vec<Option<f32>> = vec![None; others.len()];
    let rescaled: Vec<usize> = (0..others.len())
        .filter(|&k| r.rescale && !matches!(rules[k], Rule::All | Rule::Zero))
        .collect();
    if !rescaled.is_empty() {
        let mut before = vec![LaneSum::default(); others.len()];
        let mut after = vec![LaneSum::default(); others.len()];
        let mut maskers = fresh();
        let mut bits: Vec<Vec<u64>> = rules
            .iter()
            .map(|rule| match rule {
                Rule::Random => vec![0u64; (n as usize).div_ceil(64)],
                _ => Vec::new(),
            })
            .collect();
        ctx.pass_chunks(|rows, c| {
            for t in tiles(c.len(b)) {
                let first = rows.start as usize * cols + t.start;
                tile_base.resize(t.len(), 0.0);
                c.read(b, t.start, &mut tile_base);
                kernels::vectorized(
                    #[inline(always)]
                    || {
                        for &k in &rescaled {
                            tile_dl.resize(t.len(), 0.0);
                            read_delta(&c, d, others[k], t.start, &tile_base, &mut tile_dl);
                            let mask = &mut tile_masks[k];
                            mask.resize(t.len(), false);
                            match rules[k] {
                                Rule::Random => draw_mask(k, first, &tile_dl, mask, &mut dellas[k]),
                                _ => maskers[k].mask_into(&tile_dl, mask),
                            }
                            LaneSum::add_zip(
                                [&mut before[k], &mut after[k]],
                                first,
                                &tile_dl,
                                mask,
                                #[inline(always)]
                                |x, keep| [x.abs() as f64, masked(x, keep).abs() as f64],
                            );
                            if !bits[k].is_empty() {
                                write_bits(&mut bits[k], first, mask);
                            }
                        }
                    },
                );
            }
            Ok(())
        })?;
        kept = bits;
        for &k in &rescaled {
            let (b, a) = (before[k].total() as f32, after[k].total() as f32);
            factors[k] = rescale_factor(d.qs(b), d.qs(a), d);
        }
    }

    // The output, block by block: deltas, masks, rescaling, then the combination.
    let w = r.weights(d);
    let mut maskers = fresh();
    let mut s = Blocks::new(others.len());
    let mut mask = vec![false; BLOCK];
    let (mut block_out, mut base) = (vec![0f32; BLOCK], vec![0f32; BLOCK]);
    ctx.pass_chunks(|rows, c| {
        let mut out = ctx.output(rows.start, c.len(b));
        for t in tiles(c.len(b)) {
            let first = rows.start as usize * cols + t.start;
            for (k, tile_mask) in tile_masks.iter_mut().enumerate() {
                // Random masks not kept from the rescale pass are drawn a tile at a time.
                if matches!(rules[k], Rule::Random) && kept[k].is_empty() {
                    tile_base.resize(t.len(), 0.0);
                    c.read(b, t.start, &mut tile_base);
                    tile_dl.resize(t.len(), 0.0);
                    read_delta(&c, d, others[k], t.start, &tile_base, &mut tile_dl);
                    tile_mask.resize(t.len(), false);
                    draw_mask(k, first, &tile_dl, tile_mask, &mut dellas[k]);
                }
            }
            // The elementwise loops vectorize far wider with the kernel set's instructions.
            kernels::vectorized(
                #[inline(always)]
                || {
                    for blk in blocks(t.clone(), BLOCK) {
                        let len = blk.len();
                        let at = first + (blk.start - t.start);
                        let base = &mut base[..len];
                        c.read(b, blk.start, base);
                        for (k, &i) in others.iter().enumerate() {
                            let dl = s.delta(k, len);
                            read_delta(&c, d, i, blk.start, base, dl);
                            let mask = &mut mask[..len];
                            match rules[k] {
                                Rule::All => continue,
                                Rule::Random if !kept[k].is_empty() => {
                                    read_bits(&kept[k], at, mask)
                                }
                                Rule::Random => mask.copy_from_slice(
                                    &tile_masks[k][blk.start - t.start..blk.end - t.start],
                                ),
                                _ => maskers[k].mask_into(dl, mask),
                            }
                            for (x, &keep) in dl.iter_mut().zip(mask.iter()) {
                                *x = masked(*x, keep);
                            }
                            if let Some(f) = factors[k] {
                                for x in dl.iter_mut() {
                                    *x *= f;
                                }
                                d.q(dl);
                            }
                        }
                        let block_out = &mut block_out[..len];
                        r.combine_block(d, base, &mut s, &w, block_out);
                        out.push(block_out);
                    }
                },
            );
        }
        ctx.emit_output(rows, out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_bits_read_back_at_any_offset() {
        let mask: Vec<bool> = (0..1000).map(|i| (i * 7919) % 3 == 0).collect();
        for first in [0usize, 1, 63, 64, 128, 200] {
            let mut bits = vec![0u64; (first + mask.len()).div_ceil(64)];
            // Written in two runs, as two tiles would.
            write_bits(&mut bits, first, &mask[..320]);
            write_bits(&mut bits, first + 320, &mask[320..]);
            let mut back = vec![false; mask.len()];
            read_bits(&bits, first, &mut back);
            assert_eq!(back, mask, "first {first}");
            let mut part = vec![false; 680];
            read_bits(&bits, first + 320, &mut part);
            assert_eq!(part, &mask[320..], "first {first}");
        }
    }
}
