//! Conversion and blend kernels, with runtime CPU-feature dispatch chosen once.
//!
//! `scalar` is the reference definition. `x86_64` has AVX2+F16C+FMA and AVX-512 versions
//! (each kernel written once over a vector trait), `aarch64` NEON ones; [`active`] picks the
//! best set this CPU supports the first time it is called. Every kernel set is tested against
//! the scalar reference (`tests.rs`; `benches/kernels.rs` for speed).

#[cfg(target_arch = "aarch64")]
mod aarch64;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86_64;

use std::sync::OnceLock;

pub use scalar::{BucketDraws, KeepScratch, bucket_bounds};

#[cfg(target_endian = "big")]
compile_error!(
    "mergestream reads little-endian tensor data in place and needs a little-endian CPU"
);

/// One implementation of every kernel.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub name: &'static str,
    pub f16_to_f32: fn(&[u16], &mut [f32]),
    pub bf16_to_f32: fn(&[u16], &mut [f32]),
    pub f32_to_f16: fn(&[f32], &mut [u16]),
    pub f32_to_bf16: fn(&[f32], &mut [u16]),
    /// `dst = f16(f16(a·wa) + f16(b·wb))` on fp16 bits.
    pub blend_f16: fn(&[u16], &[u16], f32, f32, &mut [u16]),
    /// `dst = a·wa + b·wb` in f32, no FMA.
    pub blend_f32: fn(&[f32], &[f32], f32, f32, &mut [f32]),
    /// `dst += delta·s`, product rounded first.
    pub add_scaled: fn(&mut [f32], &[f32], f32),
    /// `acc = fma(x, w, acc)`.
    pub fma_acc: fn(&mut [f32], &[f32], f32),
    pub round_f16: fn(&mut [f32]),
    pub round_bf16: fn(&mut [f32]),
    /// DELLA's decisions by bucket bounds (see [`scalar::bounded_keep`]).
    pub bounded_keep: fn(&BucketDraws<'_>, &mut [bool], &mut [u64], &mut KeepScratch),
    /// The masks' random draws (see [`scalar::top_draws`], [`scalar::draws_below`]).
    pub top_draws: fn(u64, u64, &mut [u32]),
    pub draws_below: fn(u64, u64, u64, &mut [bool]),
    /// Where a u16 slice holds a value, as bits (see [`scalar::equal_bits`]).
    pub equal_bits: fn(&[u16], u16, &mut [u64]),
    /// Bits as bools (see [`scalar::spread_bits`]).
    pub spread_bits: fn(&[u64], usize, &mut [bool]),
}

pub const SCALAR: Kernels = Kernels {
    name: "scalar",
    f16_to_f32: scalar::f16_to_f32,
    bf16_to_f32: scalar::bf16_to_f32,
    f32_to_f16: scalar::f32_to_f16,
    f32_to_bf16: scalar::f32_to_bf16,
    blend_f16: scalar::blend_f16,
    blend_f32: scalar::blend_f32,
    add_scaled: scalar::add_scaled,
    fma_acc: scalar::fma_acc,
    round_f16: scalar::round_f16,
    round_bf16: scalar::round_bf16,
    bounded_keep: scalar::bounded_keep,
    top_draws: scalar::top_draws,
    draws_below: scalar::draws_below,
    equal_bits: scalar::equal_bits,
    spread_bits: scalar::spread_bits,
};

/// Every kernel set this CPU can run, best last. Tests and benches compare them all.
pub fn available() -> Vec<Kernels> {
    #[allow(unused_mut)]
    let mut v = vec![SCALAR];
    // Each set checks its own CPU features and is `None` without them.
    #[cfg(target_arch = "x86_64")]
    v.extend(
        [x86_64::avx2::kernels(), x86_64::avx512::kernels()]
            .into_iter()
            .flatten(),
    );
    #[cfg(target_arch = "aarch64")]
    {
        v.push(Kernels {
            name: "neon",
            f16_to_f32: aarch64::f16_to_f32_neon,
            bf16_to_f32: aarch64::bf16_to_f32_neon,
            f32_to_f16: aarch64::f32_to_f16_neon,
            f32_to_bf16: aarch64::f32_to_bf16_neon,
            blend_f16: aarch64::blend_f16_neon,
            blend_f32: aarch64::blend_f32_neon,
            add_scaled: aarch64::add_scaled_neon,
            fma_acc: aarch64::fma_acc_neon,
            round_f16: aarch64::round_f16_neon,
            round_bf16: aarch64::round_bf16_neon,
            bounded_keep: scalar::bounded_keep,
            top_draws: scalar::top_draws,
            draws_below: scalar::draws_below,
            equal_bits: scalar::equal_bits,
            spread_bits: scalar::spread_bits,
        });
    }
    v
}

/// Run `f` compiled for the active kernel set's instruction set: the plain loops inlined
/// into it (masks, draws, sums of the methods) vectorize for AVX2 or AVX-512 instead of the
/// baseline SSE2. Float semantics do not change (Rust never fuses or reorders float
/// operations on its own), so results are the same bits under every set.
#[inline]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    match active().name {
        "avx512" => return x86_64::avx512::run(f),
        "avx2+f16c" => return x86_64::avx2::run(f),
        _ => {}
    }
    f()
}

/// `acc = fma(x, w, acc)` with the active kernels.
pub fn fma_acc(acc: &mut [f32], x: &[f32], w: f32) {
    (active().fma_acc)(acc, x, w)
}

/// [`scalar::bounded_keep`] with the active kernels.
pub fn bounded_keep(
    x: &BucketDraws<'_>,
    keep: &mut [bool],
    open: &mut [u64],
    scratch: &mut KeepScratch,
) {
    (active().bounded_keep)(x, keep, open, scratch)
}

/// [`scalar::top_draws`] with the active kernels.
pub fn top_draws(stream: u64, first: u64, out: &mut [u32]) {
    (active().top_draws)(stream, first, out)
}

/// [`scalar::equal_bits`] with the active kernels.
pub fn equal_bits(v: &[u16], x: u16, bits: &mut [u64]) {
    (active().equal_bits)(v, x, bits)
}

/// [`scalar::spread_bits`] with the active kernels.
pub fn spread_bits(bits: &[u64], first: usize, out: &mut [bool]) {
    (active().spread_bits)(bits, first, out)
}

/// [`scalar::draws_below`] with the active kernels.
pub fn draws_below(stream: u64, first: u64, limit: u64, keep: &mut [bool]) {
    (active().draws_below)(stream, first, limit, keep)
}

/// The kernel set used for real work: the best one available, chosen once.
/// `MERGESTREAM_KERNELS=scalar|avx2+f16c|avx512|neon` forces one (for benchmarks).
pub fn active() -> &'static Kernels {
    static ACTIVE: OnceLock<Kernels> = OnceLock::new();
    ACTIVE.get_or_init(|| {
        let all = available();
        if let Ok(want) = std::env::var("MERGESTREAM_KERNELS")
            && let Some(k) = all.iter().find(|k| k.name == want)
        {
            return *k;
        }
        *all.last().unwrap_or(&SCALAR)
    })
}

#[cfg(test)]
mod tests;

pub mod bytes {
    //! Byte-level conversion between stored tensor data and f32 working values.

    use zerocopy::{FromBytes, IntoBytes};

    use super::active;
    use crate::dtype::DType;

    /// Little-endian u16 elements of `bytes`, borrowed when aligned, copied otherwise.
    pub fn halves(bytes: &[u8]) -> std::borrow::Cow<'_, [u16]> {
        match <[u16]>::ref_from_bytes(bytes) {
            Ok(v) => std::borrow::Cow::Borrowed(v),
            Err(_) => std::borrow::Cow::Owned(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
        }
    }

    /// Decode `dst.len()` elements of `dtype` from `bytes` into f32.
    /// The caller guarantees `bytes.len() == dst.len() * dtype.size()` and a float dtype.
    pub fn decode(dtype: DType, bytes: &[u8], dst: &mut [f32]) {
        let k = active();
        match dtype {
            DType::F16 => (k.f16_to_f32)(&halves(bytes), dst),
            DType::BF16 => (k.bf16_to_f32)(&halves(bytes), dst),
            DType::F32 => match <[f32]>::ref_from_bytes(bytes) {
                Ok(v) => dst.copy_from_slice(&v[..dst.len()]),
                Err(_) => {
                    for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                        *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                }
            },
            DType::F64 => {
                for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(8)) {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    *d = f64::from_le_bytes(b) as f32;
                }
            }
            // Not reached: plans only compute on float dtypes.
            _ => dst.fill(f32::NAN),
        }
    }

    /// Encode f32 values as `dtype` bytes (round to nearest even).
    pub fn encode(dtype: DType, src: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(src.len() * dtype.size());
        encode_append(dtype, src, &mut out);
        out
    }

    /// [`encode`] onto the end of `out`.
    pub fn encode_append(dtype: DType, src: &[f32], out: &mut Vec<u8>) {
        let k = active();
        match dtype {
            DType::F16 | DType::BF16 => {
                let convert = if dtype == DType::F16 {
                    k.f32_to_f16
                } else {
                    k.f32_to_bf16
                };
                // Through an L1 block, so the output is written once (not zeroed, filled,
                // then copied into bytes).
                const BLOCK: usize = 4096;
                out.reserve(src.len() * 2);
                let mut buf = [0u16; BLOCK];
                for c in src.chunks(BLOCK) {
                    convert(c, &mut buf[..c.len()]);
                    out.extend_from_slice(buf[..c.len()].as_bytes());
                }
            }
            DType::F32 => out.extend_from_slice(src.as_bytes()),
            DType::F64 => out.extend(src.iter().flat_map(|&x| (x as f64).to_le_bytes())),
            _ => {}
        }
    }

    /// Decode the first `n` elements of `bytes` and append them to `out`, through a small
    /// buffer that stays in L1: the destination is written once, where zeroing it first and
    /// decoding over it would write it twice. The caller guarantees what [`decode`] needs.
    pub fn decode_append(dtype: DType, bytes: &[u8], n: usize, out: &mut Vec<f32>) {
        const BLOCK: usize = 4096;
        let size = dtype.size();
        if dtype.bits() < 8 || size == 0 || bytes.len() < n * size {
            let start = out.len();
            out.resize(start + n, 0.0);
            decode(dtype, bytes, &mut out[start..]);
            return;
        }
        out.reserve(n);
        let mut buf = [0f32; BLOCK];
        for c in bytes[..n * size].chunks(BLOCK * size) {
            let k = c.len() / size;
            decode(dtype, c, &mut buf[..k]);
            out.extend_from_slice(&buf[..k]);
        }
    }

    /// Round f32 values to `dtype`'s precision in place (f32 and wider: unchanged).
    pub fn round_to(dtype: DType, v: &mut [f32]) {
        let k = active();
        match dtype {
            DType::F16 => (k.round_f16)(v),
            DType::BF16 => (k.round_bf16)(v),
            _ => {}
        }
    }
}
