//! The streamed methods' own kernels against their scalar references and a memcpy of the
//! same bytes: the chunking-independent f64 lane sum (slerp, nuslerp, model_stock norms and
//! dots; DARE/DELLA rescale sums), alone and several side by side, and DELLA's per-row
//! magnitude order.
//!
//! `cargo bench --bench streamed`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

use mergestream::kernels::{BucketDraws, KeepScratch, available, bucket_bounds, vectorized};
use mergestream::methods::mergekit::sparsify::DellaRows;
use mergestream::methods::mergekit::stream::{LaneSum, MagnitudeOrder};
use mergestream::methods::torch_compat::argsort_asc;

/// 16 Mi f32 (64 MiB): past the L3, as a chunk of a real tensor is.
const N: usize = 16 << 20;

fn lane_sum(c: &mut Criterion) {
    let v: Vec<f32> = (0..N).map(|i| (i % 1000) as f32 * 1e-3 - 0.5).collect();
    let mut out = vec![0f32; N];
    let mut g = c.benchmark_group("sum_of_squares_f64");
    g.throughput(Throughput::Bytes((N * 4) as u64));
    g.bench_function("memcpy", |b| b.iter(|| out.copy_from_slice(black_box(&v))));
    g.bench_function("scalar", |b| {
        b.iter(|| {
            black_box(&v)
                .iter()
                .map(|&x| (x as f64) * (x as f64))
                .sum::<f64>()
        })
    });
    g.bench_function("lanes", |b| {
        b.iter(|| {
            let mut s = LaneSum::default();
            s.add_sq(0, black_box(&v));
            s.total()
        })
    });
    g.finish();

    // Two sums over two operands (nuslerp's norms, slerp's without the dot): one after the
    // other, against side by side in one loop. Block-sized calls, as the streamed passes
    // make them; bytes counted for both operands.
    let w: Vec<f32> = v.iter().map(|x| x * 0.5 + 0.1).collect();
    let mut g = c.benchmark_group("two_sums_of_squares_f64");
    g.throughput(Throughput::Bytes((N * 8) as u64));
    g.bench_function("memcpy", |b| {
        b.iter(|| {
            out.copy_from_slice(black_box(&v));
            out.copy_from_slice(black_box(&w));
        })
    });
    g.bench_function("one_after_the_other", |b| {
        b.iter(|| {
            two_sums(
                &v,
                &w,
                #[inline(always)]
                |[s0, s1], at, x, y| {
                    s0.add_sq(at, x);
                    s1.add_sq(at, y);
                },
            )
        })
    });
    g.bench_function("zipped", |b| {
        b.iter(|| {
            two_sums(
                &v,
                &w,
                #[inline(always)]
                |sums, at, x, y| {
                    LaneSum::add_zip(
                        sums,
                        at,
                        x,
                        y,
                        #[inline(always)]
                        |a, b| [(a as f64) * (a as f64), (b as f64) * (b as f64)],
                    )
                },
            )
        })
    });
    g.finish();
}

/// Two sums over `v` and `w` in 2048-element blocks, as the streamed passes take them,
/// compiled for the kernel set's instructions as they are.
fn two_sums(
    v: &[f32],
    w: &[f32],
    add: impl Fn([&mut LaneSum; 2], usize, &[f32], &[f32]),
) -> (f64, f64) {
    const BLOCK: usize = 2048;
    vectorized(
        #[inline(always)]
        || {
            let [mut s0, mut s1] = [LaneSum::default(); 2];
            for (i, (x, y)) in v.chunks(BLOCK).zip(w.chunks(BLOCK)).enumerate() {
                add([&mut s0, &mut s1], i * BLOCK, black_box(x), black_box(y));
            }
            (s0.total(), s1.total())
        },
    )
}

fn magnitude_order(c: &mut Criterion) {
    // A 13B MLP row: 5120 f16-valued deltas, many tied.
    const COLS: usize = 5120;
    let rows: Vec<Vec<f32>> = (0..64)
        .map(|r| {
            (0..COLS)
                .map(|i| {
                    let x = (((i * 7919 + r * 104_729) % 20011) as f32 - 10005.0) * 1e-6;
                    half::f16::from_f32(x).to_f32()
                })
                .collect()
        })
        .collect();
    let mut g = c.benchmark_group("della_row_order");
    g.throughput(Throughput::Bytes((rows.len() * COLS * 4) as u64));
    let mut out = vec![0f32; COLS];
    g.bench_function("memcpy", |b| {
        b.iter(|| {
            for r in &rows {
                out.copy_from_slice(black_box(r));
            }
        })
    });
    g.bench_function(BenchmarkId::new("scalar", "torch_argsort"), |b| {
        b.iter(|| {
            for r in &rows {
                let mag: Vec<f32> = r.iter().map(|x| x.abs()).collect();
                black_box(argsort_asc(&mag));
            }
        })
    });
    g.bench_function(BenchmarkId::new("scalar", "std_stable_sort"), |b| {
        b.iter(|| {
            for r in &rows {
                let mut idx: Vec<u32> = (0..COLS as u32).collect();
                idx.sort_by_key(|&i| r[i as usize].to_bits() & 0x7FFF_FFFF);
                black_box(idx);
            }
        })
    });
    let mut order = MagnitudeOrder::default();
    g.bench_function("radix", |b| {
        b.iter(|| {
            for r in &rows {
                black_box(order.sort(black_box(r)));
            }
        })
    });
    // DELLA's use: each element's rank (u32 entries, 8-bit digits, for f16 rows).
    g.bench_function("ranks", |b| {
        b.iter(|| {
            for r in &rows {
                black_box(order.ranks(black_box(r)));
            }
        })
    });
    g.finish();
}

/// DELLA's whole row mask on realistic rows: f16 deltas of two f16 models' normal weights.
fn della_mask(c: &mut Criterion) {
    const COLS: usize = 5120;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    // A normal-ish draw (sum of four uniforms), σ ≈ 0.02.
    let mut normal = move || {
        let mut t = 0.0f32;
        for _ in 0..4 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            t += (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        }
        half::f16::from_f32(t * 0.035).to_f32()
    };
    let rows: Vec<Vec<f32>> = (0..64)
        .map(|_| {
            (0..COLS)
                .map(|_| half::f16::from_f32(normal() - normal()).to_f32())
                .collect()
        })
        .collect();
    let mut g = c.benchmark_group("della_row_mask");
    g.throughput(Throughput::Bytes((rows.len() * COLS * 4) as u64));
    let mut mask = vec![false; COLS];
    // ε < 0: the keep limit falls with the rank, so every row is ranked whole.
    for (name, epsilon) in [("ranked", -0.1), ("bucketed", 0.1)] {
        let mut della = DellaRows::new(0.5, epsilon, 7, 1);
        g.bench_function(name, |b| {
            b.iter(|| {
                for (r, row) in rows.iter().enumerate() {
                    della.mask(r * COLS, black_box(row), &mut mask);
                }
                black_box(&mask);
            })
        });
    }
    g.finish();

    // Its decision kernel alone, on one row's draws and buckets (what a row hands it):
    // every kernel set against a copy of the draws.
    let n = COLS;
    let draws: Vec<u32> = (0..n as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33) as u32)
        .collect();
    let bins: Vec<u16> = (0..n).map(|i| ((i * 7919) % 1500) as u16).collect();
    // As DELLA at density 0.5, ε 0.1 makes them: keep limits rising from 0.4 to 0.6 over
    // the ranks (of 31-bit draws), in 1500 buckets.
    let (floor, span) = (0.4 * (1u64 << 31) as f64, 0.2 * (1u64 << 31) as f64);
    let limit = |r: usize| (floor + span * r as f64 / n as f64) as u32;
    let lowest: Vec<u32> = (0..=n).map(limit).collect();
    let highest: Vec<u32> = (0..=n).map(|e| limit(e + 1)).collect();
    let starts: Vec<u32> = (0..=1500).map(|b| (b * n / 1500) as u32).collect();
    let row = bucket_bounds(lowest[0], highest[n]);
    let mut keep = vec![false; n];
    let mut open = vec![0u64; n.div_ceil(64)];
    let mut copy = vec![0u32; n];
    let mut scratch = KeepScratch::default();
    let mut g = c.benchmark_group("della_bounded_keep");
    g.throughput(Throughput::Bytes((n * 4) as u64));
    g.bench_function("memcpy_draws", |b| {
        b.iter(|| copy.copy_from_slice(black_box(&draws)))
    });
    for k in available() {
        g.bench_function(BenchmarkId::new("bounded_keep", k.name), |b| {
            b.iter(|| {
                let x = BucketDraws {
                    draws: black_box(&draws),
                    bins: &bins,
                    starts: &starts,
                    lowest: &lowest,
                    highest: &highest,
                    row,
                };
                (k.bounded_keep)(&x, &mut keep, &mut open, &mut scratch)
            })
        });
    }
    g.finish();

    // Finding an undecided element's bucket in the row's bins: every set against a copy.
    let mut g = c.benchmark_group("della_equal_bits");
    g.throughput(Throughput::Bytes((n * 2) as u64));
    let mut copy = vec![0u16; n];
    g.bench_function("memcpy_bins", |b| {
        b.iter(|| copy.copy_from_slice(black_box(&bins)))
    });
    let mut hits = vec![0u64; n.div_ceil(64)];
    for k in available() {
        g.bench_function(BenchmarkId::new("equal_bits", k.name), |b| {
            b.iter(|| (k.equal_bits)(black_box(&bins), 700, &mut hits))
        });
    }
    g.finish();

    // A mask kept as bits between passes, read back as bools a 1024-element block at a
    // time (at an odd bit, as blocks of odd-length rows start): every set against a copy.
    let words: Vec<u64> = draws.iter().map(|&d| u64::from(d) * 0x9E37_79B9).collect();
    let mut g = c.benchmark_group("mask_spread_bits");
    g.throughput(Throughput::Bytes(1024));
    let mut bools = vec![false; 1024];
    let src = vec![true; 1024];
    g.bench_function("memcpy_bools", |b| {
        b.iter(|| bools.copy_from_slice(black_box(&src)))
    });
    for k in available() {
        g.bench_function(BenchmarkId::new("spread_bits", k.name), |b| {
            b.iter(|| (k.spread_bits)(black_box(&words), 4099, &mut bools))
        });
    }
    g.finish();
}

/// The masks' random draws (DELLA's coarse ones, DARE's keep decisions) per 5120-element
/// row: every kernel set against a copy of as many u32.
fn mask_draws(c: &mut Criterion) {
    const N: usize = 5120;
    let mut g = c.benchmark_group("mask_draws");
    g.throughput(Throughput::Bytes((N * 4) as u64));
    let src = vec![7u32; N];
    let mut out = vec![0u32; N];
    let mut keep = vec![false; N];
    g.bench_function("memcpy", |b| {
        b.iter(|| out.copy_from_slice(black_box(&src)))
    });
    for k in available() {
        g.bench_function(BenchmarkId::new("top_draws", k.name), |b| {
            b.iter(|| (k.top_draws)(black_box(7), black_box(1 << 20), &mut out))
        });
        g.bench_function(BenchmarkId::new("draws_below", k.name), |b| {
            b.iter(|| (k.draws_below)(black_box(7), black_box(1 << 20), 1 << 52, &mut keep))
        });
    }
    g.finish();
}

// No plots: this crate's plotters build (ab_glyph, for `diff`) has no font registered for
// criterion's charts, which would panic.
criterion_group! {
    name = benches;
    config = Criterion::default().without_plots();
    targets = lane_sum, magnitude_order, della_mask, mask_draws
}
criterion_main!(benches);
