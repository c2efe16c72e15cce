//! Kernel throughput: every kernel set this CPU has (scalar reference beside the SIMD
//! versions, so the speed-up is visible), a memcpy baseline, and the LoRA delta GEMM.
//!
//! `cargo bench --bench kernels`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

use mergestream::kernels::available;
use mergestream::methods::lora::{DeltaLayout, PatchData, delta_rows_threads};

/// 16 Mi elements: 32 MiB of fp16, 64 MiB of f32 per array — every kernel and the memcpy
/// baseline stream from memory (past the 32 MiB L3), as with real tensors.
const N: usize = 16 << 20;

fn inputs() -> (Vec<u16>, Vec<u16>, Vec<f32>, Vec<f32>) {
    let h1: Vec<u16> = (0..N)
        .map(|i| (0x3000 + (i * 7919) % 0x0C00) as u16)
        .collect();
    let h2: Vec<u16> = (0..N)
        .map(|i| (0xB000 + (i * 104729) % 0x0C00) as u16)
        .collect();
    let f1: Vec<f32> = (0..N).map(|i| (i % 1000) as f32 * 1e-3 - 0.5).collect();
    let f2: Vec<f32> = (0..N).map(|i| (i % 777) as f32 * 1e-3 - 0.3).collect();
    (h1, h2, f1, f2)
}

fn kernels(c: &mut Criterion) {
    let (h1, h2, f1, f2) = inputs();
    let mut out16 = vec![0u16; N];
    let mut out32 = vec![0f32; N];

    // Bytes moved per element: reads plus writes.
    let mut g = c.benchmark_group("memcpy");
    g.throughput(Throughput::Bytes((N * 4 * 2) as u64));
    g.bench_function("copy_f32", |b| {
        b.iter(|| out32.copy_from_slice(black_box(&f1)));
    });
    g.finish();

    // Each kernel's sets run back to back, so they are compared under the same machine load
    // (the machine is shared; minutes apart, memory bandwidth can differ several-fold).
    let sets = available();
    let mut g = c.benchmark_group("convert");
    g.throughput(Throughput::Bytes((N * 6) as u64));
    for k in &sets {
        g.bench_function(BenchmarkId::new("f16_to_f32", k.name), |b| {
            b.iter(|| (k.f16_to_f32)(black_box(&h1), &mut out32));
        });
    }
    for k in &sets {
        g.bench_function(BenchmarkId::new("bf16_to_f32", k.name), |b| {
            b.iter(|| (k.bf16_to_f32)(black_box(&h1), &mut out32));
        });
    }
    for k in &sets {
        g.bench_function(BenchmarkId::new("f32_to_f16", k.name), |b| {
            b.iter(|| (k.f32_to_f16)(black_box(&f1), &mut out16));
        });
    }
    for k in &sets {
        g.bench_function(BenchmarkId::new("f32_to_bf16", k.name), |b| {
            b.iter(|| (k.f32_to_bf16)(black_box(&f1), &mut out16));
        });
    }
    g.finish();

    let mut g = c.benchmark_group("blend");
    // fp16 reproduction blend: two fp16 inputs, one fp16 output.
    g.throughput(Throughput::Bytes((N * 6) as u64));
    for k in &sets {
        g.bench_function(BenchmarkId::new("blend_f16_reproduce", k.name), |b| {
            b.iter(|| (k.blend_f16)(black_box(&h1), black_box(&h2), 0.3, 0.7, &mut out16));
        });
    }
    // f32 blend (precise mode / YAML edition), add_scaled, fma_acc: two f32 inputs, one
    // f32 output.
    g.throughput(Throughput::Bytes((N * 12) as u64));
    for k in &sets {
        g.bench_function(BenchmarkId::new("blend_f32_precise", k.name), |b| {
            b.iter(|| (k.blend_f32)(black_box(&f1), black_box(&f2), 0.3, 0.7, &mut out32));
        });
    }
    for k in &sets {
        g.bench_function(BenchmarkId::new("add_scaled", k.name), |b| {
            let mut w = f1.clone();
            b.iter(|| (k.add_scaled)(&mut w, black_box(&f2), 0.5));
        });
    }
    for k in &sets {
        g.bench_function(BenchmarkId::new("fma_acc", k.name), |b| {
            let mut w = f1.clone();
            b.iter(|| (k.fma_acc)(&mut w, black_box(&f2), 0.5));
        });
    }
    g.finish();

    // In-place rounding: one f32 array read and written.
    let mut g = c.benchmark_group("round");
    g.throughput(Throughput::Bytes((N * 8) as u64));
    for k in &sets {
        g.bench_function(BenchmarkId::new("round_f16", k.name), |b| {
            let mut w = f1.clone();
            b.iter(|| (k.round_f16)(black_box(&mut w)));
        });
    }
    for k in &sets {
        g.bench_function(BenchmarkId::new("round_bf16", k.name), |b| {
            let mut w = f1.clone();
            b.iter(|| (k.round_bf16)(black_box(&mut w)));
        });
    }
    g.finish();
}

/// The LoRA delta Δ = B @ A for a 13B-sized layer at rank 64 (5120 × 13824).
fn lora_gemm(c: &mut Criterion) {
    let (out_dim, in_dim, rank) = (5120usize, 13824usize, 64usize);
    let a: Vec<f32> = (0..rank * in_dim)
        .map(|i| ((i % 97) as f32 - 48.0) * 1e-3)
        .collect();
    let b: Vec<f32> = (0..out_dim * rank)
        .map(|i| ((i % 89) as f32 - 44.0) * 1e-3)
        .collect();
    let a_bytes: &[u8] = bytemuck_f32(&a);
    let b_bytes: &[u8] = bytemuck_f32(&b);
    let data = PatchData {
        a: a_bytes,
        a_dtype: mergestream::dtype::DType::F32,
        a_shape: [rank, in_dim],
        b: b_bytes,
        b_dtype: mergestream::dtype::DType::F32,
        b_shape: [out_dim, rank],
        magnitude: None,
    };
    let rows = 512;
    let mut delta = vec![0f32; rows * in_dim];
    let mut g = c.benchmark_group("lora");
    g.sample_size(10);
    // 2·m·n·k floating-point operations per chunk.
    g.throughput(Throughput::Elements((2 * rows * in_dim * rank) as u64));
    for threads in [1usize, 2] {
        g.bench_function(
            format!("delta_gemm_512x13824_r64/{threads}_thread"),
            |bch| {
                bch.iter(|| {
                    delta_rows_threads(
                        DeltaLayout::Rows,
                        &data,
                        0,
                        rows,
                        in_dim,
                        &mut delta,
                        threads,
                    )
                });
            },
        );
    }
    g.finish();
}

fn bytemuck_f32(v: &[f32]) -> &[u8] {
    use zerocopy::IntoBytes;
    v.as_bytes()
}

// No plots: this crate's plotters build (ab_glyph, for `diff`) has no font registered for
// criterion's charts, which would panic.
criterion_group! {
    name = benches;
    config = Criterion::default().without_plots();
    targets = kernels, lora_gemm
}
criterion_main!(benches);
