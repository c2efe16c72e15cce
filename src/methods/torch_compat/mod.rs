//! Bit-exact emulation of the PyTorch CPU kernels that mergekit 0.1.5 results depend on:
//! ATen's reduction order ([`reduce`]: sums, norms, stacked sums) and libstdc++'s introsort
//! behind `torch.argsort` ([`sort`]).
//!
//! # Why this module exists
//!
//! mergestream must reproduce mergekit merges bit for bit. mergekit does its arithmetic with
//! PyTorch on the CPU, and floating-point addition is not associative. So a sum, a norm or a
//! sort gives torch's bits only if it is done in *exactly* torch's order. A plain `iter().sum()`,
//! a pairwise sum, or a sum in f64 rounded once all differ from torch by an ulp now and then.
//! Those ulps then spread through slerp, nuslerp, model_stock and TIES into the written tensors.
//! Likewise, `torch.argsort(stable=False)` is libstdc++'s unstable `std::sort`. Which of several
//! tied `|delta|` values TIES/breadcrumbs keep depends on that algorithm's exact swap sequence.
//!
//! The functions here replay the operation order of the ATen kernels in torch 2.15 (the CPU wheel
//! mergekit 0.1.5 runs on). They are pure, allocate at most O(n) up front and never panic.
//!
//! # Verification
//!
//! `tests/torch_compat.rs` compares every public function bit for bit with real torch 2.15
//! output recorded in `tests/fixtures/torch_compat/` (generator `gen.py` there); the module was
//! developed against a larger fixture set:
//! * lengths 0..=70, 100, 255, 256, 1000, 4096, 10240, 32767, 32768, 32769, 100000;
//!   thread counts 1..=9 and 16 up to 10^6 elements;
//! * data: wide-range, uniform, heavy ties, ±0, NaN/±inf, and values representable in f16/bf16;
//! * exactly cancelling data (`x[n-1-j] = -x[j]`), whose result is pure rounding error, so order
//!   differences show even after f16/bf16 rounding;
//! * argsort: full permutations up to n = 100000 and permutation hashes up to 1.6e7.
//!
//! Statements below marked *(source)* come from reading ATen and could not be observed in the
//! output.
//!
//! # Which ATen code runs
//!
//! * On an AVX2 or AVX512 x86-64 CPU, the reductions run in the order of ATen's **AVX2** kernels:
//!   `Vectorized<float>` has 8 lanes, `Vectorized<Half>` / `Vectorized<BFloat16>` 16. The 16-lane
//!   AVX512 order does not match, even on an AVX512 machine. *(source: the sum/norm stubs are
//!   not registered for AVX512.)* Machines without AVX2 (e.g. aarch64) run other kernels and are
//!   out of scope.
//! * Sums (`SumKernel.cpp cascade_sum`) accumulate in f32, also for f16/bf16 tensors. The order is
//!   `row_sum` (4 interleaved accumulators) over `multi_row_sum` (a 4-level cascade).
//! * The f32/bf16 2-norm is the `norm_kernel_tensor_iterator_impl` fast path (8 f32 lanes). The
//!   f16 2-norm is the generic sequential `binary_kernel_reduce` with `NormTwoOps`.
//! * Results of f16/bf16 reductions are returned as the f32 value **before** torch's final
//!   rounding to f16/bf16. The caller rounds, e.g. with [`round_to_f16`] / [`round_to_bf16`].
//!
//! # Threads
//!
//! A full reduction (output of one element) over `n >= 32768` elements is split over the intra-op
//! threads. So the result depends on the thread count of the machine mergekit ran on; see
//! [`sum_f32_threads`]. Other cases do not depend on the thread count:
//! * Per-row reductions over the last dim of a `[rows, cols]` tensor with `rows >= 2`
//!   (`(x*y).sum(dim=-1)`, `torch.norm(x, dim=-1)`) give each row to one thread.
//!   Every row then equals the flat function on that row with one thread ([`sum_f32`],
//!   [`norm_f32`], ...). With `rows == 1` it is the flat, possibly threaded, reduction.
//! * The f32/bf16 norm fast path never splits a row.
//! * `stack(xs).sum(dim=0)` splits columns at multiples of 32, which keeps the column blocks the
//!   kernel uses. So [`outer_sum_f32`] is thread-independent (verified with 2 and 3 threads).
//!   *(source)* Exceptions need at least 512 stacked tensors, e.g. 32768 or more one-element
//!   tensors.
//!
//! # NaN
//!
//! NaNs propagate as in torch. The NaN *payload/sign* bits are not guaranteed to match x86's
//! (compare NaN results with `is_nan`).
pub mod reduce;
pub mod sort;

pub use reduce::*;
pub use sort::{argsort_asc, argsort_desc, topk_desc};

#[cfg(test)]
mod tests {
    use super::sort::sort_rank;
    use super::*;

    #[test]
    fn empty_and_tiny_inputs_do_not_panic() {
        assert_eq!(sum_f32(&[]).to_bits(), 0);
        assert_eq!(norm_f32(&[]).to_bits(), 0);
        assert_eq!(sum_f32_threads(&[], 0).to_bits(), 0);
        assert_eq!(sum_f16(&[]), 0.0);
        assert_eq!(sum_bf16_threads(&[1.0], usize::MAX), 1.0);
        assert_eq!(norm_f16_threads(&[3.0, 4.0], 0), 5.0);
        assert!(argsort_desc(&[]).is_empty());
        assert_eq!(argsort_asc(&[f32::NAN, 1.0, -0.0, 0.0]), vec![2, 3, 1, 0]);
        let mut out = [1.0f32; 3];
        outer_sum_f32(&[], &mut out);
        assert_eq!(out, [0.0; 3]);
        let short: &[f32] = &[1.0];
        outer_sum_f32(&[short, &[1.0, 2.0, 3.0]], &mut out);
        assert_eq!(out, [2.0, 2.0, 3.0]);
    }

    #[test]
    fn random_inputs_never_panic_and_argsort_is_a_sorted_permutation() {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for round in 0..300 {
            let n = (next() % if round % 10 == 0 { 70_000 } else { 300 }) as usize;
            let x: Vec<f32> = (0..n)
                .map(|_| match next() % 16 {
                    0 => f32::NAN,
                    1 => f32::INFINITY,
                    2 => f32::NEG_INFINITY,
                    3 => -0.0,
                    4 => 0.0,
                    _ => f32::from_bits(next() as u32),
                })
                .collect();
            let threads = (next() % 20) as usize;
            for f in [sum_f32, norm_f32, sum_f16, sum_bf16, norm_f16, norm_bf16] {
                f(&x);
            }
            sum_f32_threads(&x, threads);
            sum_f16_threads(&x, threads);
            sum_bf16_threads(&x, threads);
            norm_f16_threads(&x, threads);
            let m = (next() % 70) as usize;
            let parts: Vec<&[f32]> = x.chunks(m.max(1)).collect();
            let mut out = vec![0.0; m];
            outer_sum_f32(&parts, &mut out);
            outer_sum_f16(&parts, &mut out);
            outer_sum_bf16(&parts, &mut out);
            for (desc, p) in [(true, argsort_desc(&x)), (false, argsort_asc(&x))] {
                let mut seen = vec![false; n];
                p.iter().for_each(|&i| seen[i] = true);
                assert!(p.len() == n && seen.iter().all(|&b| b));
                for w in p.windows(2) {
                    let (a, b) = (sort_rank(x[w[0]]), sort_rank(x[w[1]]));
                    assert!(if desc { a >= b } else { a <= b });
                }
            }
        }
    }

    #[test]
    fn sum_of_negative_zeros_is_positive_zero() {
        // torch zero-fills the output and adds into it, so the sign of zero is lost.
        assert_eq!(sum_f32(&[-0.0; 3]).to_bits(), 0);
        assert_eq!(sum_f32(&[-0.0; 40]).to_bits(), 0);
    }

    #[test]
    fn sort_rank_matches_comparators() {
        let vals = [
            f32::NAN,
            f32::INFINITY,
            1.0,
            0.0,
            -0.0,
            -1.0,
            f32::NEG_INFINITY,
            -f32::NAN,
        ];
        for &a in &vals {
            for &b in &vals {
                let asc = (!a.is_nan() && b.is_nan()) || a < b;
                let desc = (a.is_nan() && !b.is_nan()) || a > b;
                assert_eq!(asc, sort_rank(a) < sort_rank(b), "{a} {b}");
                assert_eq!(desc, sort_rank(a) > sort_rank(b), "{a} {b}");
            }
        }
    }

    #[test]
    fn low_precision_rounding_edges() {
        assert_eq!(round_to_f16(65519.0), 65504.0);
        assert_eq!(round_to_f16(65520.0), f32::INFINITY);
        assert_eq!(round_to_f16(-1e-9).to_bits(), (-0.0f32).to_bits());
        assert_eq!(round_to_f16(2.0f32.powi(-25)), 0.0); // tie to even (0)
        assert_eq!(round_to_f16(3.0 * 2.0f32.powi(-25)), 2.0f32.powi(-23));
        assert_eq!(round_to_f16(1.0 + 2.0f32.powi(-11)), 1.0);
        assert_eq!(round_to_bf16(1.0 + 2.0f32.powi(-8)), 1.0);
        assert_eq!(round_to_bf16(f32::MAX), f32::INFINITY);
    }
}
