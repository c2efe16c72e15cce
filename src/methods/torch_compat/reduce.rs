//! ATen's CPU reduction order (SumKernel.cpp, the norm kernels, `stack(xs).sum(0)`),
//! replayed exactly; see the module above for what was verified.

use std::array;

/// `Vectorized<float>::size()` in the AVX2 kernels that ATen dispatches reductions to.
const LANES: usize = 8;
/// `Vectorized<Half>::size()` / `Vectorized<BFloat16>::size()` in the same build.
const LOWP_VEC: usize = 16;
/// `ilp_factor` of ATen's `row_sum`.
const ILP: usize = 4;
/// `num_levels` of ATen's `multi_row_sum` cascade.
const LEVELS: usize = 4;
/// Columns per block in `vectorized_outer_sum` (`nrows * Vectorized<float>::size()`).
const OUTER_BLOCK: usize = ILP * LANES;
/// Columns per group in `scalar_outer_sum` (`nrows`).
const OUTER_SCALAR_GROUP: usize = 4;
/// `at::internal::GRAIN_SIZE`: reductions over fewer elements never run in parallel.
const GRAIN_SIZE: usize = 32768;
/// Torch's partial-sum buffer has one slot per thread. Larger thread counts are clamped so
/// that absurd inputs cannot make us allocate without bound.
const MAX_THREADS: usize = 1 << 16;

// ------------------------------------------------------------------------------------------------
// Public API: f32
// ------------------------------------------------------------------------------------------------

/// `torch.sum(x)` / `x.sum(dim=-1)` of a contiguous f32 tensor with one intra-op thread.
///
/// Emulates `SumKernel.cpp cascade_sum` → `vectorized_inner_sum` (`n >= 8`) or `scalar_inner_sum`
/// (`n < 8`):
/// * `n / 8` vectors go through `row_sum` (4 interleaved vector accumulators over a
///   `multi_row_sum` cascade).
/// * Then `final = 0`, plus the `n % 8` tail scalars in order, plus the 8 lanes left to right.
/// * The result is added to the zero-filled output.
///
/// This is also what torch computes for any `n` when it runs with one thread.
pub fn sum_f32(x: &[f32]) -> f32 {
    0.0 + inner_sum_f32(x)
}

/// `torch.sum(x)` of a contiguous f32 tensor when torch runs with `threads` intra-op threads.
///
/// Emulates `parallel_reduce` → `two_pass_reduction` (used when `n >= 32768` and `threads > 1`):
/// * `tasks = min(threads, ceil(n / 32768))` threads each sum a chunk of `ceil(n / tasks)`
///   elements with [`sum_f32`]'s order into their slot of a `threads`-long buffer. Slots of idle
///   threads stay 0.
/// * The buffer is then summed with the same inner-sum kernel. For `threads <= 4` or
///   `threads == 8` this is the same as adding the partials in order. For 5..=7 and more than
///   8 threads it is not (e.g. the 16-thread buffer is summed as 8 lanes).
///
/// `threads <= 1` or `n < 32768` gives exactly [`sum_f32`]. `threads` is clamped to 65536.
pub fn sum_f32_threads(x: &[f32], threads: usize) -> f32 {
    threaded_sum(x, threads, inner_sum_f32, |v| v)
}

/// `torch.linalg.vector_norm(x)` / `torch.norm(x)` / `torch.norm(x, dim=-1)` (per row) of a
/// contiguous f32 tensor.
///
/// Emulates the `ReduceOpsKernel.cpp norm_kernel_tensor_iterator_impl` fast path (p = 2,
/// reduction over the last dim, via `binary_kernel_reduce_lastdim`); it never splits across
/// threads. The order:
/// * 8 lane accumulators get `acc[j] += x[8i+j] * x[8i+j]`, a separate multiply and add (no FMA).
/// * The lanes are folded left to right.
/// * The `n % 8` tail is added to the folded sum by the GCC-compiled scalar loop. When 4 or more
///   tail elements remain, the first 4 get `b += x*x` (product rounded, then added); the rest use
///   a fused `b = fma(x, x, b)`. This was found empirically and matches torch for all tail
///   lengths.
/// * Finally `sqrt`.
pub fn norm_f32(x: &[f32]) -> f32 {
    let main = x.len() / LANES * LANES;
    let mut acc = [0.0f32; LANES];
    for chunk in x[..main].chunks_exact(LANES) {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += v * v;
        }
    }
    let mut b = fold_lanes(acc);
    let tail = &x[main..];
    let (group, rest) = if tail.len() >= 4 {
        tail.split_at(4)
    } else {
        tail.split_at(0)
    };
    for &v in group {
        b += v * v;
    }
    for &v in rest {
        b = v.mul_add(v, b);
    }
    b.sqrt()
}

/// `torch.stack(xs).sum(dim=0)` for f32 tensors (the sum across models), written into `out`.
///
/// Emulates `cascade_sum`. The reduced dim is the model index, the kept dim has `m = out.len()`
/// columns. For each column, the order over the `k = xs.len()` inputs depends on where the column
/// sits:
/// * **`m >= 8`** (`vectorized_outer_sum`): columns inside the full 32-column blocks
///   (`j < m / 32 * 32`) use the `multi_row_sum` cascade over the inputs. That is plain
///   sequential order for fewer than 16 inputs. The other `m % 32` columns use `row_sum`
///   (4 interleaved partial sums, then folded). That differs from sequential order for 5 or more
///   inputs.
/// * **`2 <= m < 8`** (`scalar_outer_sum`): the same, but with groups of 4 columns in place of
///   the 32-column blocks.
/// * **`m == 1`**: torch coalesces the size-1 dim, so the column is an ordinary inner sum:
///   `out[0] = sum_f32(column)`.
///
/// `xs` empty gives zeros. Inputs shorter than `out` are a caller bug. They are read as if
/// zero-padded, so this does not panic.
pub fn outer_sum_f32(xs: &[&[f32]], out: &mut [f32]) {
    // One input: every order adds it to zero (a −0 becomes +0); a plain loop, vectorized.
    if let [x] = xs
        && x.len() >= out.len()
    {
        for (o, &v) in out.iter_mut().zip(x.iter()) {
            *o = 0.0 + v;
        }
        return;
    }
    outer_sum_impl(xs, out, LANES, inner_sum_f32);
}

// ------------------------------------------------------------------------------------------------
// Public API: f16 / bf16 (f32 accumulator, caller rounds)
// ------------------------------------------------------------------------------------------------

/// `torch.sum(x)` of a contiguous **float16** tensor with one thread. `x` holds the f16 values as
/// f32. Returns the f32 accumulator; torch then rounds it to f16 (the caller does this, e.g. with
/// [`round_to_f16`]).
///
/// Emulates `cascade_sum` with `InnerSumCastLoadPolicy<Vectorized<Half>>`:
/// * For `n >= 16`, each 16-element load is converted to two f32 vectors, the low 8 and the
///   high 8 elements, and these are added: lane `i = x[i] + x[i+8]`.
/// * These lane vectors go through `row_sum` as in [`sum_f32`]; then the `n % 16` tail scalars
///   and the 8 lanes are added to 0.
/// * For `n < 16`, `scalar_inner_sum` applies `row_sum` to the scalars.
///
/// (It is not `x[2i] + x[2i+1]`, as /tmp/ana/mergekit_notes.md assumed. Data whose exact sum is
/// zero rules that pairing out despite the final f16 rounding.)
pub fn sum_f16(x: &[f32]) -> f32 {
    0.0 + inner_sum_lowp(x)
}

/// `torch.sum(x)` of a contiguous **bfloat16** tensor with one thread. `x` holds the bf16 values
/// as f32. Returns the f32 accumulator; the caller rounds it to bf16 ([`round_to_bf16`]).
///
/// Same kernel and order as [`sum_f16`]: `convert_bfloat16_float` also splits a 16-element load
/// into its low and high halves, so lane `i = x[i] + x[i+8]`.
pub fn sum_bf16(x: &[f32]) -> f32 {
    0.0 + inner_sum_lowp(x)
}

/// [`sum_f16`] when torch runs with `threads` intra-op threads (see [`sum_f32_threads`]).
///
/// Unlike the f32 case, the per-thread buffer has the tensor's dtype. Each partial is therefore
/// **rounded to f16** before the buffer is summed. Returns the final f32 accumulator; the caller
/// rounds it to f16.
pub fn sum_f16_threads(x: &[f32], threads: usize) -> f32 {
    threaded_sum(x, threads, inner_sum_lowp, round_to_f16)
}

/// [`sum_bf16`] when torch runs with `threads` intra-op threads. Each partial is rounded to bf16
/// (see [`sum_f16_threads`]). Returns the final f32 accumulator; the caller rounds it to bf16.
pub fn sum_bf16_threads(x: &[f32], threads: usize) -> f32 {
    threaded_sum(x, threads, inner_sum_lowp, round_to_bf16)
}

/// `torch.linalg.vector_norm(x)` / `torch.norm(x)` of a contiguous **float16** tensor with one
/// thread. Returns `sqrt(acc)` in f32; torch then rounds it to f16 (the caller does this).
///
/// Half is not on the norm fast path, so this is the generic `binary_kernel_reduce` with
/// `NormTwoOps<Half, float>`: a sequential `acc = acc + x*x` in f32. Products of f16 values are
/// exact in f32, so FMA or not makes no difference.
pub fn norm_f16(x: &[f32]) -> f32 {
    seq_sum_squares(x).sqrt()
}

/// [`norm_f16`] when torch runs with `threads` intra-op threads.
///
/// For `n >= 32768`, `binary_kernel_reduce` gives each of `min(threads, ceil(n / 32768))` threads
/// a chunk of `ceil(n / tasks)` elements, summed sequentially. The partials (f32, not rounded)
/// are combined in thread order starting from 0. Returns `sqrt` of that in f32; the caller
/// rounds it to f16.
pub fn norm_f16_threads(x: &[f32], threads: usize) -> f32 {
    let threads = threads.clamp(1, MAX_THREADS);
    if threads == 1 || x.len() < GRAIN_SIZE {
        return norm_f16(x);
    }
    let chunk = x.len().div_ceil(threads.min(x.len().div_ceil(GRAIN_SIZE)));
    let mut total = 0.0f32;
    for part in x.chunks(chunk) {
        total += seq_sum_squares(part);
    }
    total.sqrt()
}

/// `torch.linalg.vector_norm(x)` / `torch.norm(x)` of a contiguous **bfloat16** tensor. Returns
/// `sqrt(acc)` in f32; torch then rounds it to bf16 (the caller does this).
///
/// BFloat16 is on the fast path of [`norm_f32`] with 16-element loads, and is never split across
/// threads. Per 16-block, `acc[j] += lo[j]^2`, then `acc[j] += hi[j]^2`. The lanes are folded
/// left to right; the `n % 16` tail is added as `b += x*x`. Products of bf16 values are exact in
/// f32 unless they are subnormal. Whether torch's tail loop fuses there cannot be seen after the
/// bf16 rounding.
pub fn norm_bf16(x: &[f32]) -> f32 {
    let main = x.len() / LOWP_VEC * LOWP_VEC;
    let mut acc = [0.0f32; LANES];
    for block in x[..main].chunks_exact(LOWP_VEC) {
        let (lo, hi) = block.split_at(LANES);
        for (a, &v) in acc.iter_mut().zip(lo) {
            *a += v * v;
        }
        for (a, &v) in acc.iter_mut().zip(hi) {
            *a += v * v;
        }
    }
    let mut b = fold_lanes(acc);
    for &v in &x[main..] {
        b += v * v;
    }
    b.sqrt()
}

/// `torch.stack(xs).sum(dim=0)` for **float16** tensors. Returns the f32 accumulators; torch
/// rounds each one to f16 (the caller does this).
///
/// Each column gets the same cascade/`row_sum` order as [`outer_sum_f32`]. Only the thresholds
/// differ, because `cascade_sum` compares with `Vectorized<Half>::size() == 16`:
/// * 32-column blocks are used only when `m >= 16`; for `2 <= m < 16` it is groups of 4.
/// * `m == 1` is [`sum_f16`] of the column.
pub fn outer_sum_f16(xs: &[&[f32]], out: &mut [f32]) {
    outer_sum_impl(xs, out, LOWP_VEC, inner_sum_lowp);
}

/// `torch.stack(xs).sum(dim=0)` for **bfloat16** tensors. Returns the f32 accumulators; the
/// caller rounds each to bf16. Same structure as [`outer_sum_f16`]; `m == 1` is [`sum_bf16`] of
/// the column.
pub fn outer_sum_bf16(xs: &[&[f32]], out: &mut [f32]) {
    outer_sum_impl(xs, out, LOWP_VEC, inner_sum_lowp);
}

/// f32 → f16 → f32, rounding to nearest-even like torch's `.to(torch.float16)` (`c10::Half`).
/// Overflow goes to ±inf, f16 subnormals are kept, and the sign of zero is kept. NaN is returned
/// unchanged.
pub fn round_to_f16(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    let a = x.abs();
    let r = if a >= 65520.0 {
        // Halfway between f16::MAX (65504) and 65536 rounds to even, i.e. overflows.
        f32::INFINITY
    } else if a < F16_MIN_NORMAL {
        // f16 subnormals: a fixed quantum of 2^-24. Scaling by a power of two is exact.
        (a * TWO_POW_24).round_ties_even() / TWO_POW_24
    } else {
        // Normal f16: 11 significant bits, so the quantum is 2^(e-10). `a` is a normal f32 here.
        let e = (a.to_bits() >> 23) as i32 - 127;
        let quantum = f32::from_bits(((e - 10 + 127) as u32) << 23);
        (a / quantum).round_ties_even() * quantum
    };
    r.copysign(x)
}

/// f32 → bf16 → f32, rounding to nearest-even like torch's `.to(torch.bfloat16)`
/// (`c10::BFloat16` `round_to_nearest_even`). NaN becomes torch's quiet NaN `0x7FC0`.
pub fn round_to_bf16(x: f32) -> f32 {
    if x.is_nan() {
        return f32::from_bits(0x7FC0_0000);
    }
    let u = x.to_bits();
    let rounded = u.wrapping_add(0x7FFF + ((u >> 16) & 1)) & 0xFFFF_0000;
    f32::from_bits(rounded)
}

// ------------------------------------------------------------------------------------------------
// Reduction internals (SumKernel.cpp)
// ------------------------------------------------------------------------------------------------

const F16_MIN_NORMAL: f32 = 6.103_515_6e-5; // 2^-14
const TWO_POW_24: f32 = 16_777_216.0;

/// `utils::CeilLog2` as used by `multi_row_sum` (1 for x <= 2).
fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

/// ATen `multi_row_sum`: sums `size` rows of `W` columns each. `add_row(i, acc)` must add row `i`
/// into `acc` column by column.
///
/// This is a 4-level cascade. Level 0 collects `level_step` rows, then spills into level 1, and
/// so on; the mask test decides how far each spill goes. The rows that do not fill a step go
/// into level 0, and the levels are finally folded into level 0. For fewer than 16 rows this is
/// plain sequential order.
#[inline(always)]
fn multi_row_sum<const W: usize>(
    size: usize,
    mut add_row: impl FnMut(usize, &mut [f32; W]),
) -> [f32; W] {
    let level_power = (ceil_log2(size) / LEVELS).max(4) as u32;
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[0.0f32; W]; LEVELS];
    let mut i = 0usize;
    while size - i >= level_step {
        for _ in 0..level_step {
            add_row(i, &mut acc[0]);
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            let (src, dst) = (&mut lower[j - 1], &mut upper[0]);
            for (d, s) in dst.iter_mut().zip(src.iter()) {
                *d += *s;
            }
            *src = [0.0; W];
            let mask = level_mask.checked_shl(j as u32 * level_power).unwrap_or(0);
            if i & mask != 0 {
                break;
            }
        }
    }
    while i < size {
        add_row(i, &mut acc[0]);
        i += 1;
    }
    let (first, rest) = acc.split_at_mut(1);
    for level in rest.iter() {
        for (d, s) in first[0].iter_mut().zip(level) {
            *d += *s;
        }
    }
    first[0]
}

/// ATen `row_sum<float>` over `size` scalars `val(0..size)`. The scalars are viewed as rows of 4
/// (4 interleaved partial sums, via `multi_row_sum`). The leftover `size % 4` scalars go into
/// partial 0, then the partials are folded in order.
#[inline(always)]
fn row_sum_scalar(size: usize, val: impl Fn(usize) -> f32) -> f32 {
    let size_ilp = size / ILP;
    let ps = multi_row_sum::<ILP>(size_ilp, |r, acc| {
        for (k, a) in acc.iter_mut().enumerate() {
            *a += val(r * ILP + k);
        }
    });
    let mut p0 = ps[0];
    for i in size_ilp * ILP..size {
        p0 += val(i);
    }
    for &p in &ps[1..] {
        p0 += p;
    }
    p0
}

/// ATen `row_sum<Vectorized<float>>` over the `x.len() / IN` loads of `IN` consecutive inputs.
/// `load` turns one such load into 8 f32 lanes; this is the kernel's `VecLoadPolicy`. Leftover
/// inputs (`x.len() % IN`) are ignored here; the caller adds them as the scalar tail.
#[inline(always)]
fn row_sum_vec<const IN: usize>(x: &[f32], load: impl Fn(&[f32]) -> [f32; LANES]) -> [f32; LANES] {
    let nv = x.len() / IN;
    let size_ilp = nv / ILP;
    let ps = multi_row_sum::<{ ILP * LANES }>(size_ilp, |r, acc| {
        let row = &x[r * ILP * IN..(r + 1) * ILP * IN];
        for (k, chunk) in row.chunks_exact(IN).enumerate() {
            let v = load(chunk);
            for (a, b) in acc[k * LANES..(k + 1) * LANES].iter_mut().zip(v) {
                *a += b;
            }
        }
    });
    let mut p0: [f32; LANES] = array::from_fn(|l| ps[l]);
    for chunk in x[size_ilp * ILP * IN..nv * IN].chunks_exact(IN) {
        for (a, b) in p0.iter_mut().zip(load(chunk)) {
            *a += b;
        }
    }
    for k in 1..ILP {
        for (a, &b) in p0.iter_mut().zip(&ps[k * LANES..(k + 1) * LANES]) {
            *a += b;
        }
    }
    p0
}

/// The reduction part of `vectorized_inner_sum`: start from 0, add the scalar tail in order,
/// then add the vector lanes left to right.
#[inline(always)]
fn finish_inner(tail: &[f32], lanes: [f32; LANES]) -> f32 {
    let mut fin = 0.0f32;
    for &v in tail {
        fin += v;
    }
    for v in lanes {
        fin += v;
    }
    fin
}

/// Left-to-right fold of the lane buffer, as in the norm kernel.
#[inline(always)]
fn fold_lanes(acc: [f32; LANES]) -> f32 {
    let mut b = acc[0];
    for &a in &acc[1..] {
        b += a;
    }
    b
}

/// f32 inner sum before the store into the zero-filled output (see [`sum_f32`]).
fn inner_sum_f32(x: &[f32]) -> f32 {
    let n = x.len();
    if n < LANES {
        return row_sum_scalar(n, |i| x[i]);
    }
    let lanes = row_sum_vec::<LANES>(x, |c| array::from_fn(|l| c[l]));
    finish_inner(&x[n / LANES * LANES..], lanes)
}

/// f16/bf16 inner sum before the store (see [`sum_f16`]).
fn inner_sum_lowp(x: &[f32]) -> f32 {
    let n = x.len();
    if n < LOWP_VEC {
        return row_sum_scalar(n, |i| x[i]);
    }
    let lanes = row_sum_vec::<LOWP_VEC>(x, |c| array::from_fn(|l| c[l] + c[l + LANES]));
    finish_inner(&x[n / LOWP_VEC * LOWP_VEC..], lanes)
}

/// `parallel_reduce` for a full reduction (see [`sum_f32_threads`]). `round_partial` models the
/// buffer dtype: identity for f32, rounding to f16/bf16 for low-precision tensors.
fn threaded_sum(
    x: &[f32],
    threads: usize,
    inner: impl Fn(&[f32]) -> f32,
    round_partial: impl Fn(f32) -> f32,
) -> f32 {
    let threads = threads.clamp(1, MAX_THREADS);
    if threads == 1 || x.len() < GRAIN_SIZE {
        return 0.0 + inner(x);
    }
    // at::parallel_for (OpenMP): min(threads, ceil(n / grain)) workers, each with a contiguous
    // chunk of ceil(n / workers) elements. Worker t writes slot t of a zero-initialised buffer.
    let tasks = threads.min(x.len().div_ceil(GRAIN_SIZE));
    let chunk = x.len().div_ceil(tasks);
    let mut buffer = vec![0.0f32; threads];
    for (slot, part) in buffer.iter_mut().zip(x.chunks(chunk)) {
        *slot = round_partial(0.0 + inner(part));
    }
    // final_reduce: the same kernel sums the whole buffer, idle slots included, into the output.
    0.0 + inner(&buffer)
}

/// Sequential `acc + x*x` in f32 from 0 (generic `binary_kernel_reduce` with `NormTwoOps`).
fn seq_sum_squares(x: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for &v in x {
        acc += v * v;
    }
    acc
}

/// Shared body of the outer sums. `vec_min_cols` is the `Vectorized<scalar_t>::size()` threshold
/// that selects `vectorized_outer_sum` (32-column blocks) over `scalar_outer_sum` (groups of 4).
/// `column_inner` is the dtype's inner sum, used when the single column is coalesced into an
/// inner reduction.
fn outer_sum_impl(
    xs: &[&[f32]],
    out: &mut [f32],
    vec_min_cols: usize,
    column_inner: fn(&[f32]) -> f32,
) {
    let m = out.len();
    if m == 0 {
        return;
    }
    if xs.is_empty() {
        out.fill(0.0);
        return;
    }
    // Zero-pad too-short inputs (a caller bug) instead of panicking; the normal case borrows.
    let padded: Vec<Vec<f32>> = xs
        .iter()
        .filter(|x| x.len() < m)
        .map(|x| {
            let mut v = x.to_vec();
            v.resize(m, 0.0);
            v
        })
        .collect();
    let mut padded_iter = padded.iter();
    let rows: Vec<&[f32]> = xs
        .iter()
        .map(|x| {
            if x.len() >= m {
                &x[..m]
            } else {
                padded_iter.next().map_or(&[][..], |v| &v[..])
            }
        })
        .collect();
    let k = rows.len();

    if m == 1 {
        let column: Vec<f32> = rows
            .iter()
            .map(|r| r.first().copied().unwrap_or(0.0))
            .collect();
        out[0] = 0.0 + column_inner(&column);
        return;
    }

    let full = if m >= vec_min_cols {
        let full = m / OUTER_BLOCK * OUTER_BLOCK;
        cascade_columns::<OUTER_BLOCK>(&rows, &mut out[..full]);
        full
    } else {
        let full = m / OUTER_SCALAR_GROUP * OUTER_SCALAR_GROUP;
        cascade_columns::<OUTER_SCALAR_GROUP>(&rows, &mut out[..full]);
        full
    };
    for (j, o) in out.iter_mut().enumerate().skip(full) {
        *o = 0.0 + row_sum_scalar(k, |i| rows[i].get(j).copied().unwrap_or(0.0));
    }
}

/// Columns `0..out.len()` (a multiple of `W`) in blocks of `W`, each summed over the inputs with
/// `multi_row_sum`.
fn cascade_columns<const W: usize>(rows: &[&[f32]], out: &mut [f32]) {
    for (b, block) in out.chunks_exact_mut(W).enumerate() {
        let start = b * W;
        let sums = multi_row_sum::<W>(rows.len(), |i, acc| {
            for (a, &v) in acc.iter_mut().zip(&rows[i][start..start + W]) {
                *a += v;
            }
        });
        for (o, s) in block.iter_mut().zip(sums) {
            *o = 0.0 + s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outer_sum_of_one_input_is_the_general_order() {
        let specials = [
            -0.0f32,
            0.0,
            f32::NAN,
            -f32::INFINITY,
            1e-45,
            -3.5,
            65504.0,
            -1e-38,
        ];
        for m in [1usize, 2, 3, 7, 8, 31, 32, 33, 100, 1000] {
            let x: Vec<f32> = (0..m)
                .map(|i| specials[i % specials.len()] * (1.0 + i as f32))
                .collect();
            let (mut fast, mut general) = (vec![1f32; m], vec![1f32; m]);
            outer_sum_f32(&[&x], &mut fast);
            outer_sum_impl(&[&x], &mut general, LANES, inner_sum_f32);
            for (a, b) in fast.iter().zip(&general) {
                assert!(
                    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                    "m {m}"
                );
            }
        }
    }
}
