//! Conversion and blend kernels, with runtime CPU-feature dispatch chosen once.
//!
//! `scalar` is the reference definition. `x86_64` has AVX2+F16C and AVX-512 versions,
//! `aarch64` NEON ones; [`active`] picks the best set this CPU supports the first time it is
//! called. Every kernel set is tested against the scalar reference (see `tests` below and
//! `benches/kernels.rs` for speed).

#[cfg(target_arch = "aarch64")]
mod aarch64;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86_64;

use std::sync::OnceLock;

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
};

/// Every kernel set this CPU can run, best last. Tests and benches compare them all.
pub fn available() -> Vec<Kernels> {
    #[allow(unused_mut)]
    let mut v = vec![SCALAR];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("fma")
        {
            v.push(Kernels {
                name: "avx2+f16c",
                f16_to_f32: x86_64::f16_to_f32_avx2,
                bf16_to_f32: x86_64::bf16_to_f32_avx2,
                f32_to_f16: x86_64::f32_to_f16_avx2,
                f32_to_bf16: x86_64::f32_to_bf16_avx2,
                blend_f16: x86_64::blend_f16_avx2,
                blend_f32: x86_64::blend_f32_avx2,
                add_scaled: x86_64::add_scaled_avx2,
                fma_acc: x86_64::fma_acc_avx2,
                round_f16: x86_64::round_f16_avx2,
                round_bf16: x86_64::round_bf16_avx2,
            });
        }
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
        {
            v.push(Kernels {
                name: "avx512",
                f16_to_f32: x86_64::f16_to_f32_avx512,
                bf16_to_f32: x86_64::bf16_to_f32_avx512,
                f32_to_f16: x86_64::f32_to_f16_avx512,
                f32_to_bf16: x86_64::f32_to_bf16_avx512,
                blend_f16: x86_64::blend_f16_avx512,
                blend_f32: x86_64::blend_f32_avx512,
                add_scaled: x86_64::add_scaled_avx512,
                fma_acc: x86_64::fma_acc_avx512,
                round_f16: x86_64::round_f16_avx512,
                round_bf16: x86_64::round_bf16_avx512,
            });
        }
    }
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
        });
    }
    v
}

/// `acc = fma(x, w, acc)` with the active kernels.
pub fn fma_acc(acc: &mut [f32], x: &[f32], w: f32) {
    (active().fma_acc)(acc, x, w)
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
mod tests {
    use super::*;

    /// Deterministic pseudo-random bits (xorshift), so failures reproduce.
    fn bits(seed: u64, n: usize) -> Vec<u64> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s
            })
            .collect()
    }

    /// f32 inputs: random bit patterns (NaNs, infinities, subnormals included) mixed with
    /// ordinary weights and exact fp16 rounding ties.
    fn f32_inputs(seed: u64, n: usize) -> Vec<f32> {
        bits(seed, n)
            .into_iter()
            .enumerate()
            .map(|(i, b)| match i % 4 {
                0 => f32::from_bits(b as u32),
                1 => (b as u32 as f32 / u32::MAX as f32 - 0.5) * 0.2,
                // a value exactly halfway between two fp16 numbers
                2 => f32::from_bits(((b as u32) & 0xC7FF_E000) | 0x1000),
                _ => f32::from_bits((b as u32) & 0x807F_FFFF), // subnormal
            })
            .collect()
    }

    fn half_inputs(seed: u64, n: usize) -> Vec<u16> {
        bits(seed, n)
            .into_iter()
            .map(|b| (b >> 17) as u16)
            .collect()
    }

    /// Every kernel of every set against the scalar reference, on lengths 0..=67 and
    /// unaligned starting offsets.
    #[test]
    fn every_kernel_matches_scalar_on_odd_lengths_and_offsets() {
        for k in available() {
            for len in 0..=67usize {
                for off in [0usize, 1, 3] {
                    let seed = (len * 7 + off) as u64 + 1;
                    let h1 = half_inputs(seed, len + off);
                    let h2 = half_inputs(seed + 1000, len + off);
                    let f1 = f32_inputs(seed, len + off);
                    let f2 = f32_inputs(seed + 2000, len + off);
                    let (h1, h2, f1, f2) = (&h1[off..], &h2[off..], &f1[off..], &f2[off..]);

                    let mut want = vec![0f32; len];
                    let mut got = vec![0f32; len];
                    scalar::f16_to_f32(h1, &mut want);
                    (k.f16_to_f32)(h1, &mut got);
                    assert_eq!(
                        bits32(&want),
                        bits32(&got),
                        "{} f16_to_f32 len {len}",
                        k.name
                    );
                    scalar::bf16_to_f32(h1, &mut want);
                    (k.bf16_to_f32)(h1, &mut got);
                    assert_eq!(
                        bits32(&want),
                        bits32(&got),
                        "{} bf16_to_f32 len {len}",
                        k.name
                    );

                    let mut want16 = vec![0u16; len];
                    let mut got16 = vec![0u16; len];
                    scalar::f32_to_f16(f1, &mut want16);
                    (k.f32_to_f16)(f1, &mut got16);
                    assert_eq!(want16, got16, "{} f32_to_f16 len {len}", k.name);
                    scalar::f32_to_bf16(f1, &mut want16);
                    (k.f32_to_bf16)(f1, &mut got16);
                    assert_eq!(want16, got16, "{} f32_to_bf16 len {len}", k.name);

                    for (wa, wb) in [(0.1f32, 0.9f32), (1.0, 0.0), (0.75, 0.25)] {
                        scalar::blend_f16(h1, h2, wa, wb, &mut want16);
                        (k.blend_f16)(h1, h2, wa, wb, &mut got16);
                        assert_eq!(
                            canon16(&want16),
                            canon16(&got16),
                            "{} blend_f16 len {len}",
                            k.name
                        );
                        scalar::blend_f32(f1, f2, wa, wb, &mut want);
                        (k.blend_f32)(f1, f2, wa, wb, &mut got);
                        assert_eq!(
                            canon32(&want),
                            canon32(&got),
                            "{} blend_f32 len {len}",
                            k.name
                        );
                    }

                    let mut want = f1.to_vec();
                    let mut got = f1.to_vec();
                    scalar::add_scaled(&mut want, f2, 0.37);
                    (k.add_scaled)(&mut got, f2, 0.37);
                    assert_eq!(
                        canon32(&want),
                        canon32(&got),
                        "{} add_scaled len {len}",
                        k.name
                    );

                    let mut want = f1.to_vec();
                    let mut got = f1.to_vec();
                    scalar::fma_acc(&mut want, f2, 0.37);
                    (k.fma_acc)(&mut got, f2, 0.37);
                    assert_eq!(
                        canon32(&want),
                        canon32(&got),
                        "{} fma_acc len {len}",
                        k.name
                    );

                    let mut want = f1.to_vec();
                    let mut got = f1.to_vec();
                    scalar::round_f16(&mut want);
                    (k.round_f16)(&mut got);
                    assert_eq!(
                        bits32(&want),
                        bits32(&got),
                        "{} round_f16 len {len}",
                        k.name
                    );
                    let mut want = f1.to_vec();
                    let mut got = f1.to_vec();
                    scalar::round_bf16(&mut want);
                    (k.round_bf16)(&mut got);
                    assert_eq!(
                        bits32(&want),
                        bits32(&got),
                        "{} round_bf16 len {len}",
                        k.name
                    );
                }
            }
        }
    }

    fn bits32(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Arithmetic results compared bit for bit, except that any NaN equals any NaN: which
    /// operand's payload a NaN sum carries depends on the compiler's operand order.
    fn canon32(v: &[f32]) -> Vec<u32> {
        v.iter()
            .map(|x| if x.is_nan() { 0x7FC0_0000 } else { x.to_bits() })
            .collect()
    }

    fn canon16(v: &[u16]) -> Vec<u16> {
        v.iter()
            .map(|&h| {
                if (h & 0x7C00) == 0x7C00 && (h & 0x03FF) != 0 {
                    0x7E00
                } else {
                    h
                }
            })
            .collect()
    }

    /// All 65536 fp16 and bf16 bit patterns convert like the reference, and round-trip.
    #[test]
    fn every_half_value_converts_exactly() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        for k in available() {
            let mut want = vec![0f32; all.len()];
            let mut got = vec![0f32; all.len()];
            scalar::f16_to_f32(&all, &mut want);
            (k.f16_to_f32)(&all, &mut got);
            assert_eq!(bits32(&want), bits32(&got), "{}", k.name);
            let mut back = vec![0u16; all.len()];
            (k.f32_to_f16)(&got, &mut back);
            for (i, (&a, &b)) in all.iter().zip(&back).enumerate() {
                let is_nan = (a & 0x7C00) == 0x7C00 && (a & 0x03FF) != 0;
                if !is_nan {
                    assert_eq!(a, b, "{} f16 {i:#06x} round trip", k.name);
                }
            }
            scalar::bf16_to_f32(&all, &mut want);
            (k.bf16_to_f32)(&all, &mut got);
            assert_eq!(bits32(&want), bits32(&got), "{}", k.name);
        }
    }

    #[test]
    fn bf16_rounding_reference_values() {
        use scalar::f32_to_bf16_bits as r;
        assert_eq!(r(1.0), 0x3F80);
        assert_eq!(r(f32::from_bits(0x3F80_8000)), 0x3F80); // tie to even (down)
        assert_eq!(r(f32::from_bits(0x3F81_8000)), 0x3F82); // tie to even (up)
        assert_eq!(r(f32::NAN), 0x7FC0);
        assert_eq!(r(f32::INFINITY), 0x7F80);
        assert_eq!(r(f32::MAX), 0x7F80); // rounds up to infinity
    }
}

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
        let k = active();
        match dtype {
            DType::F16 | DType::BF16 => {
                let mut out = vec![0u16; src.len()];
                if dtype == DType::F16 {
                    (k.f32_to_f16)(src, &mut out);
                } else {
                    (k.f32_to_bf16)(src, &mut out);
                }
                out.as_bytes().to_vec()
            }
            DType::F32 => src.as_bytes().to_vec(),
            DType::F64 => src.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect(),
            _ => Vec::new(),
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
