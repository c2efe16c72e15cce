//! Every kernel of every set this CPU runs, against the scalar reference: odd lengths,
//! unaligned starts, special values (NaN, infinities, subnormals, -0.0, rounding ties) in
//! the vector body and in the tail, and slices of unequal lengths.

use super::*;

/// Lengths around every vector width (8 and 16 lanes) and long ones with odd tails.
const LENGTHS: &[usize] = &[
    0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 1001, 1037,
];

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

/// f32 values where conversions and arithmetic are most likely to go wrong.
const SPECIAL_F32: &[u32] = &[
    0x0000_0000, // +0
    0x8000_0000, // -0
    0x7F80_0000, // +inf
    0xFF80_0000, // -inf
    0x7FC0_0000, // quiet NaN
    0xFFC0_0001, // negative quiet NaN with payload
    0x7F80_0001, // signalling NaN
    0x7FBF_FFFF, // signalling NaN, full payload
    0x0000_0001, // smallest f32 subnormal
    0x807F_FFFF, // largest negative f32 subnormal
    0x0080_0000, // smallest normal
    0x7F7F_FFFF, // f32::MAX: bf16 rounds it to inf
    0x477F_E000, // 65504, fp16 max
    0x477F_F000, // 65520: fp16 tie between max and inf, goes to inf
    0x477F_EFFF, // just below that tie: stays 65504
    0x3F80_1000, // 1 + 2^-11: fp16 tie, down to even 1.0
    0x3F80_3000, // 1 + 3·2^-11: fp16 tie, up to even
    0x3380_0000, // 2^-24: smallest fp16 subnormal
    0x3300_0000, // 2^-25: fp16 tie between 0 and 2^-24, to even 0
    0x33C0_0000, // 1.5·2^-24: fp16 tie, up to even 2^-23
    0x3340_0000, // 0.75·2^-24: not a tie, up to 2^-24
    0x3880_0000, // 2^-14: smallest fp16 normal
    0x387F_E000, // largest fp16 subnormal
    0x3F80_8000, // bf16 tie, down to even
    0x3F81_8000, // bf16 tie, up to even
    0xBF80_8001, // just above a bf16 tie
    0x7F7F_8000, // bf16 tie at the top: to inf
];

/// fp16 and bf16 bit patterns at the edges of both formats.
const SPECIAL_HALF: &[u16] = &[
    0x0000, 0x8000, // ±0
    0x7C00, 0xFC00, // fp16 ±inf
    0x7E00, 0xFE01, // fp16 quiet NaNs
    0x7C01, 0x7DFF, // fp16 signalling NaNs
    0x0001, 0x83FF, // fp16 subnormals
    0x0400, 0x7BFF, 0xFBFF, // fp16 min normal, ±max
    0x3C00, 0x3C01, // 1 and its successor
    0x7F80, 0xFF80, // bf16 ±inf
    0x7FC0, 0x7F81, // bf16 quiet and signalling NaN
    0x0001, 0x807F, // bf16 subnormals
    0x7F7F, // bf16 max
];

/// `n` values, `specials` repeated from position `shift` and interleaved with `random`
/// ones, so each special value lands in vector bodies and in scalar tails.
fn with_specials<T: Copy>(specials: &[T], random: Vec<T>, shift: usize) -> Vec<T> {
    random
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            if i % 3 == 2 {
                r
            } else {
                specials[(i + shift) % specials.len()]
            }
        })
        .collect()
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

/// Weights of the blends: ordinary, exact, negative, and ones that overflow or underflow
/// fp16 in the products.
const WEIGHTS: &[(f32, f32)] = &[
    (0.1, 0.9),
    (1.0, 0.0),
    (0.75, 0.25),
    (-0.5, 2.0),
    (3.0e4, 1.0e-7),
    (-0.0, 0.0),
];

/// Runs every kernel of `k` and of the scalar reference on the same inputs (all of length
/// `len`) and compares: conversions and rounding bit for bit, arithmetic bit for bit up to
/// NaN payloads.
fn check_set(k: &Kernels, h1: &[u16], h2: &[u16], f1: &[f32], f2: &[f32], what: &str) {
    let len = h1.len();
    let name = k.name;
    let mut want = vec![0f32; len];
    let mut got = vec![0f32; len];
    scalar::f16_to_f32(h1, &mut want);
    (k.f16_to_f32)(h1, &mut got);
    assert_eq!(bits32(&want), bits32(&got), "{name} f16_to_f32 {what}");
    scalar::bf16_to_f32(h1, &mut want);
    (k.bf16_to_f32)(h1, &mut got);
    assert_eq!(bits32(&want), bits32(&got), "{name} bf16_to_f32 {what}");

    let mut want16 = vec![0u16; len];
    let mut got16 = vec![0u16; len];
    scalar::f32_to_f16(f1, &mut want16);
    (k.f32_to_f16)(f1, &mut got16);
    assert_eq!(want16, got16, "{name} f32_to_f16 {what}");
    scalar::f32_to_bf16(f1, &mut want16);
    (k.f32_to_bf16)(f1, &mut got16);
    assert_eq!(want16, got16, "{name} f32_to_bf16 {what}");

    for &(wa, wb) in WEIGHTS {
        scalar::blend_f16(h1, h2, wa, wb, &mut want16);
        (k.blend_f16)(h1, h2, wa, wb, &mut got16);
        assert_eq!(
            canon16(&want16),
            canon16(&got16),
            "{name} blend_f16 ({wa}, {wb}) {what}"
        );
        scalar::blend_f32(f1, f2, wa, wb, &mut want);
        (k.blend_f32)(f1, f2, wa, wb, &mut got);
        assert_eq!(
            canon32(&want),
            canon32(&got),
            "{name} blend_f32 ({wa}, {wb}) {what}"
        );
    }

    for s in [0.37f32, -1.0e-30, 3.0e38] {
        let (mut want, mut got) = (f1.to_vec(), f1.to_vec());
        scalar::add_scaled(&mut want, f2, s);
        (k.add_scaled)(&mut got, f2, s);
        assert_eq!(
            canon32(&want),
            canon32(&got),
            "{name} add_scaled {s} {what}"
        );

        let (mut want, mut got) = (f1.to_vec(), f1.to_vec());
        scalar::fma_acc(&mut want, f2, s);
        (k.fma_acc)(&mut got, f2, s);
        assert_eq!(canon32(&want), canon32(&got), "{name} fma_acc {s} {what}");
    }

    let (mut want, mut got) = (f1.to_vec(), f1.to_vec());
    scalar::round_f16(&mut want);
    (k.round_f16)(&mut got);
    assert_eq!(bits32(&want), bits32(&got), "{name} round_f16 {what}");
    let (mut want, mut got) = (f1.to_vec(), f1.to_vec());
    scalar::round_bf16(&mut want);
    (k.round_bf16)(&mut got);
    assert_eq!(bits32(&want), bits32(&got), "{name} round_bf16 {what}");
}

/// Random inputs, every length 0..=67 and a few long odd ones, at unaligned starts.
#[test]
fn every_kernel_matches_scalar_on_odd_lengths_and_offsets() {
    let lengths = (0..=67usize).chain([1001, 1037]);
    for k in available() {
        for len in lengths.clone() {
            for off in [0usize, 1, 3] {
                let seed = (len * 7 + off) as u64 + 1;
                let h1 = half_inputs(seed, len + off);
                let h2 = half_inputs(seed + 1000, len + off);
                let f1 = f32_inputs(seed, len + off);
                let f2 = f32_inputs(seed + 2000, len + off);
                let what = format!("len {len} offset {off}");
                check_set(&k, &h1[off..], &h2[off..], &f1[off..], &f2[off..], &what);
            }
        }
    }
}

/// Special values in every lane position (three shifts of the pattern), at lengths around
/// the vector widths.
#[test]
fn every_kernel_matches_scalar_on_special_values() {
    let f_special: Vec<f32> = SPECIAL_F32.iter().map(|&b| f32::from_bits(b)).collect();
    for k in available() {
        for &len in LENGTHS {
            for shift in 0..3 {
                let seed = (len * 13 + shift) as u64 + 5;
                let h1 = with_specials(SPECIAL_HALF, half_inputs(seed, len), shift);
                let h2 = with_specials(SPECIAL_HALF, half_inputs(seed + 1, len), shift + 5);
                let f1 = with_specials(&f_special, f32_inputs(seed, len), shift);
                let f2 = with_specials(&f_special, f32_inputs(seed + 1, len), shift + 7);
                let what = format!("specials, len {len} shift {shift}");
                check_set(&k, &h1, &h2, &f1, &f2, &what);
            }
        }
    }
}

/// Slices of unequal lengths: every kernel works on the common length, as the scalar
/// reference (which zips them) does, and leaves the rest of the output untouched.
#[test]
fn unequal_lengths_use_the_common_length() {
    const FILL: u16 = 0xABCD;
    for k in available() {
        for (ls, ld) in [
            (37usize, 20usize),
            (20, 37),
            (16, 33),
            (33, 16),
            (0, 9),
            (9, 0),
        ] {
            let h = half_inputs(3, ls);
            let f = f32_inputs(4, ls);
            let (mut want, mut got) = (vec![-7f32; ld], vec![-7f32; ld]);
            scalar::f16_to_f32(&h, &mut want);
            (k.f16_to_f32)(&h, &mut got);
            assert_eq!(
                bits32(&want),
                bits32(&got),
                "{} f16_to_f32 {ls}/{ld}",
                k.name
            );
            scalar::bf16_to_f32(&h, &mut want);
            (k.bf16_to_f32)(&h, &mut got);
            assert_eq!(
                bits32(&want),
                bits32(&got),
                "{} bf16_to_f32 {ls}/{ld}",
                k.name
            );

            let (mut want16, mut got16) = (vec![FILL; ld], vec![FILL; ld]);
            scalar::f32_to_f16(&f, &mut want16);
            (k.f32_to_f16)(&f, &mut got16);
            assert_eq!(want16, got16, "{} f32_to_f16 {ls}/{ld}", k.name);
            scalar::f32_to_bf16(&f, &mut want16);
            (k.f32_to_bf16)(&f, &mut got16);
            assert_eq!(want16, got16, "{} f32_to_bf16 {ls}/{ld}", k.name);

            // The second input shorter than both others.
            let h2 = half_inputs(5, ls / 2);
            let f2 = f32_inputs(6, ls / 2);
            let (mut want16, mut got16) = (vec![FILL; ld], vec![FILL; ld]);
            scalar::blend_f16(&h, &h2, 0.3, 0.7, &mut want16);
            (k.blend_f16)(&h, &h2, 0.3, 0.7, &mut got16);
            assert_eq!(
                canon16(&want16),
                canon16(&got16),
                "{} blend_f16 {ls}/{ld}",
                k.name
            );
            let (mut want, mut got) = (vec![-7f32; ld], vec![-7f32; ld]);
            scalar::blend_f32(&f, &f2, 0.3, 0.7, &mut want);
            (k.blend_f32)(&f, &f2, 0.3, 0.7, &mut got);
            assert_eq!(
                canon32(&want),
                canon32(&got),
                "{} blend_f32 {ls}/{ld}",
                k.name
            );

            let (mut want, mut got) = (vec![1.5f32; ld], vec![1.5f32; ld]);
            scalar::add_scaled(&mut want, &f, 0.37);
            (k.add_scaled)(&mut got, &f, 0.37);
            assert_eq!(
                canon32(&want),
                canon32(&got),
                "{} add_scaled {ls}/{ld}",
                k.name
            );
            let (mut want, mut got) = (vec![1.5f32; ld], vec![1.5f32; ld]);
            scalar::fma_acc(&mut want, &f, 0.37);
            (k.fma_acc)(&mut got, &f, 0.37);
            assert_eq!(
                canon32(&want),
                canon32(&got),
                "{} fma_acc {ls}/{ld}",
                k.name
            );
        }
    }
}

/// The SIMD sets the CPU advertises are really among those tested above, so a broken
/// detection cannot make the tests pass by testing only the scalar reference.
#[test]
fn every_instruction_set_of_this_cpu_is_tested() {
    let names: Vec<&str> = available().iter().map(|k| k.name).collect();
    assert_eq!(names[0], "scalar");
    #[cfg(target_arch = "x86_64")]
    {
        let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
            return; // not Linux: nothing to cross-check against
        };
        let flags: Vec<&str> = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .map(|l| l.split_whitespace().collect())
            .unwrap_or_default();
        let has = |f: &[&str]| f.iter().all(|f| flags.contains(f));
        if has(&["avx2", "f16c", "fma"]) {
            assert!(names.contains(&"avx2+f16c"), "{names:?}");
        }
        if has(&["avx512f", "avx512bw", "avx512vl", "avx512dq"]) {
            assert!(names.contains(&"avx512"), "{names:?}");
        }
    }
    #[cfg(target_arch = "aarch64")]
    assert!(names.contains(&"neon"), "{names:?}");
    eprintln!("kernel sets tested: {names:?}");
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
        let mut back = vec![0u16; all.len()];
        (k.f32_to_bf16)(&got, &mut back);
        for (i, (&a, &b)) in all.iter().zip(&back).enumerate() {
            let is_nan = (a & 0x7F80) == 0x7F80 && (a & 0x007F) != 0;
            let want = if is_nan { 0x7FC0 } else { a };
            assert_eq!(want, b, "{} bf16 {i:#06x} round trip", k.name);
        }
    }
}

/// The scalar reference itself, against values worked out by hand.
#[test]
fn rounding_reference_values() {
    use scalar::f32_to_bf16_bits as r;
    assert_eq!(r(1.0), 0x3F80);
    assert_eq!(r(f32::from_bits(0x3F80_8000)), 0x3F80); // tie to even (down)
    assert_eq!(r(f32::from_bits(0x3F81_8000)), 0x3F82); // tie to even (up)
    assert_eq!(r(f32::NAN), 0x7FC0);
    assert_eq!(r(-f32::NAN), 0x7FC0);
    assert_eq!(r(f32::INFINITY), 0x7F80);
    assert_eq!(r(f32::MAX), 0x7F80); // rounds up to infinity
    assert_eq!(r(-0.0), 0x8000);
    use scalar::f32_to_f16_bits as h;
    assert_eq!(h(65504.0), 0x7BFF);
    assert_eq!(h(65520.0), 0x7C00); // tie at the top: to infinity
    assert_eq!(h(f32::from_bits(0x3F80_1000)), 0x3C00); // tie to even (down)
    assert_eq!(h(f32::from_bits(0x3F80_3000)), 0x3C02); // tie to even (up)
    assert_eq!(h(f32::from_bits(0x3300_0000)), 0x0000); // 2^-25: tie to even zero
    assert_eq!(h(f32::from_bits(0x33C0_0000)), 0x0002); // 1.5·2^-24: tie, up to even 2^-23
    assert_eq!(h(f32::from_bits(0x3340_0000)), 0x0001); // 0.75·2^-24: up to 2^-24
    assert_eq!(h(-0.0), 0x8000);
}

#[test]
fn decode_append_matches_decode_on_odd_lengths() {
    use super::bytes::{decode, decode_append};
    use crate::dtype::DType;
    for dtype in [DType::F16, DType::BF16, DType::F32, DType::F64] {
        for n in [0usize, 1, 7, 4095, 4096, 4097, 10_001] {
            let bytes: Vec<u8> = (0..n * dtype.size())
                .map(|i| (i * 131 % 251) as u8)
                .collect();
            let mut want = vec![0f32; n];
            decode(dtype, &bytes, &mut want);
            let mut got = vec![1.5f32];
            decode_append(dtype, &bytes, n, &mut got);
            assert_eq!(got.len(), n + 1, "{dtype:?} {n}");
            for (a, b) in got[1..].iter().zip(&want) {
                assert!(
                    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                    "{dtype:?} {n}"
                );
            }
        }
    }
}

#[test]
fn encode_matches_the_reference_conversion_on_odd_lengths() {
    use super::bytes::encode;
    use crate::dtype::DType;
    let halves = |b: Vec<u8>| -> Vec<u16> {
        b.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    };
    for n in [0usize, 1, 7, 4095, 4096, 4097, 10_001] {
        let v = f32_inputs(n as u64 + 3, n);
        let f16: Vec<u16> = v.iter().map(|&x| scalar::f32_to_f16_bits(x)).collect();
        assert_eq!(
            canon16(&halves(encode(DType::F16, &v))),
            canon16(&f16),
            "f16 {n}"
        );
        let bf16: Vec<u16> = v.iter().map(|&x| scalar::f32_to_bf16_bits(x)).collect();
        assert_eq!(
            canon16(&halves(encode(DType::BF16, &v))),
            canon16(&bf16),
            "bf16 {n}"
        );
        // Appended in uneven pieces after existing bytes: the same bytes, in order.
        for dtype in [DType::F16, DType::BF16, DType::F32, DType::F64] {
            let mut out = vec![0xAB, 0xCD];
            let cut = n / 3;
            super::bytes::encode_append(dtype, &v[..cut], &mut out);
            super::bytes::encode_append(dtype, &v[cut..], &mut out);
            let mut want = vec![0xAB, 0xCD];
            want.extend(encode(dtype, &v));
            assert_eq!(out, want, "{dtype:?} {n}");
            assert_eq!(want.len(), 2 + n * dtype.size(), "{dtype:?} {n}");
        }
    }
}

/// Loops compiled for each instruction set by `vectorized` give the same bits as baseline
/// code: float division, f32→f64 conversion and compares, sums, 64-bit multiplies.
#[test]
fn vectorized_loops_give_the_same_bits_under_every_set() {
    let x = f32_inputs(11, 4099);
    let work = || -> (Vec<u32>, Vec<bool>, f32) {
        let q: Vec<u32> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| ((i as f32 / 4098.0).clamp(0.0, 1.0) * 0.2 + v * 1e-3).to_bits())
            .collect();
        let m: Vec<bool> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let z = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
                (z as f64 / (1u64 << 53) as f64) < (v.abs() as f64)
            })
            .collect();
        let s = x.iter().fold(0f32, |a, &v| a + v * 0.5);
        (q, m, s)
    };
    let want = work();
    let same = |got: (Vec<u32>, Vec<bool>, f32), set: &str| {
        assert_eq!(got.0, want.0, "{set}");
        assert_eq!(got.1, want.1, "{set}");
        assert!(got.2.to_bits() == want.2.to_bits() || got.2.is_nan() && want.2.is_nan());
    };
    same(vectorized(work), active().name);
    #[cfg(target_arch = "x86_64")]
    for k in available() {
        match k.name {
            "avx2+f16c" => same(x86_64::avx2::run(work), k.name),
            "avx512" => same(x86_64::avx512::run(work), k.name),
            _ => {}
        }
    }
}

/// DELLA's bounded decisions: every set against the reference on odd lengths and unaligned
/// starts, with bins past the buckets and starts past the limit tables (both clamped),
/// draws and limits up to 2³² − 1, equal draws and limits, tables of one entry or none, and
/// row bounds that decide nothing, some draws, most of them (the few left packed for the
/// gathers) or all.
#[test]
fn bounded_keep_matches_scalar() {
    // One for every call, as a row after row would use it.
    let mut scratch = KeepScratch::default();
    for k in available() {
        for (buckets, ranks) in [(0usize, 5usize), (1, 0), (1, 1), (3, 10), (257, 1100)] {
            let r = bits(
                (buckets * 31 + ranks) as u64,
                4 * 1100 + 2 * ranks + buckets + 3,
            );
            // Rising starts, a few past the tables.
            let mut starts: Vec<u32> = (0..(buckets + 1) * usize::from(buckets > 0))
                .map(|i| (r[i] % (ranks as u64 + 5)) as u32)
                .collect();
            starts.sort_unstable();
            let r = &r[buckets + 1..];
            // Limits near the draws, so every outcome occurs; some at the top of u32.
            let lowest: Vec<u32> = (0..ranks).map(|i| (r[i] >> 32) as u32 >> (i % 3)).collect();
            // Two entries more, so a clamp to the wrong table's end would show.
            let highest: Vec<u32> = (0..ranks + 2)
                .map(|i| {
                    let above = (r[ranks + i] >> 34) as u32;
                    lowest.get(i).map_or(above, |&l| l.saturating_add(above))
                })
                .collect();
            let r = &r[2 * ranks + 2..];
            let draws: Vec<u32> = (0..1100)
                .map(|j| match j % 5 {
                    0 => lowest.get(j % ranks.max(1)).copied().unwrap_or(7),
                    1 => highest.get(j % ranks.max(1)).copied().unwrap_or(u32::MAX),
                    _ => (r[j] >> 32) as u32 >> (j % 3),
                })
                .collect();
            let bins: Vec<u16> = (0..1100)
                .map(|j| (r[1100 + j] % (buckets as u64 + 4)) as u16)
                .collect();
            // A draw's middle eighth, half of them, its top half, the draws themselves.
            let rows = [
                bucket_bounds(0, u32::MAX),
                bucket_bounds(0x7000_0000, 0x9000_0000),
                bucket_bounds(0x4000_0000, 0xC000_0000),
                bucket_bounds(0x8000_0000, u32::MAX),
                bucket_bounds(draws[3], draws[3]),
                bucket_bounds(u32::MAX, 0),
            ];
            for (start, len) in (0..=67).map(|l| (l % 3, l)).chain([(1, 1001), (0, 1037)]) {
                for row in rows {
                    let (d, b) = (&draws[start..start + len], &bins[start..start + len]);
                    let words = len.div_ceil(64);
                    let (mut want_keep, mut got_keep) = (vec![true; len], vec![true; len]);
                    let (mut want_open, mut got_open) = (vec![!0u64; words], vec![!0u64; words]);
                    let x = BucketDraws {
                        draws: d,
                        bins: b,
                        starts: &starts,
                        lowest: &lowest,
                        highest: &highest,
                        row,
                    };
                    scalar::bounded_keep(&x, &mut want_keep, &mut want_open, &mut scratch);
                    (k.bounded_keep)(&x, &mut got_keep, &mut got_open, &mut scratch);
                    let what = format!(
                        "{} buckets {buckets} ranks {ranks} start {start} len {len} row {row:x}",
                        k.name
                    );
                    assert_eq!(want_keep, got_keep, "{what}");
                    assert_eq!(want_open, got_open, "{what}");
                }
            }
        }
    }
}

/// The reference itself on a hand-made case: kept below the bucket's lowest bound (the
/// limit at its first rank), open between, dropped at or above its highest (the limit at
/// its last rank); bins past the buckets use the last one; the row's bounds decide the
/// draws outside them whatever their bucket says.
#[test]
fn bounded_keep_reference_decides_by_the_bucket_bounds() {
    // Bucket 0 holds ranks 0..3, bucket 1 ranks 3..5: bounds (10, 15) and (20, 20).
    let starts = [0u32, 3, 5];
    let lowest = [10u32, 11, 12, 20, 21];
    let highest = [0u32, 13, 14, 15, 19, 20];
    let draws = [9u32, 10, 14, 15, 19, 20, 21];
    let bins = [0u16, 0, 0, 0, 1, 1, 9];
    let mut keep = [false; 7];
    let mut open = [0u64; 1];
    let mut x = BucketDraws {
        draws: &draws,
        bins: &bins,
        starts: &starts,
        lowest: &lowest,
        highest: &highest,
        row: bucket_bounds(0, u32::MAX),
    };
    assert_eq!(
        (x.bounds(0), x.bounds(1), x.bounds(9)),
        ((10, 15), (20, 20), (20, 20))
    );
    scalar::bounded_keep(&x, &mut keep, &mut open, &mut KeepScratch::default());
    assert_eq!(keep, [true, false, false, false, true, false, false]);
    assert_eq!(open, [0b0110]);
    // Draws below 11 are kept, at or above 15 dropped (19 too, which its bucket keeps):
    // only 14 is left to its bucket, which leaves it open.
    x.row = bucket_bounds(11, 15);
    scalar::bounded_keep(&x, &mut keep, &mut open, &mut KeepScratch::default());
    assert_eq!(keep, [true, true, false, false, false, false, false]);
    assert_eq!(open, [0b0100]);
    // Starts past the tables read their last entries; without buckets nothing is bounded.
    let starts = [9u32, 9];
    assert_eq!(
        BucketDraws {
            starts: &starts,
            ..x
        }
        .bounds(0),
        (21, 20)
    );
    assert_eq!(BucketDraws { starts: &[], ..x }.bounds(0), (0, 0));
}

/// Where a u16 slice holds a value: every set against the reference on odd lengths and
/// unaligned starts, for values that occur often, once, at 0 and u16::MAX, and never;
/// words past the slice are left alone.
#[test]
fn equal_bits_matches_scalar() {
    let r = bits(91, 1100);
    let v: Vec<u16> = r
        .iter()
        .map(|&x| [0, 7, u16::MAX, (x >> 40) as u16][(x % 4) as usize])
        .collect();
    for k in available() {
        for (start, len) in (0..=130).map(|l| (l % 3, l)).chain([(1, 1001), (0, 1037)]) {
            let v = &v[start..start + len];
            for x in [
                0u16,
                7,
                u16::MAX,
                v.get(len / 2).copied().unwrap_or(1),
                12345,
            ] {
                let words = len.div_ceil(64) + 1;
                let (mut want, mut got) = (vec![!0u64; words], vec![!0u64; words]);
                scalar::equal_bits(v, x, &mut want);
                (k.equal_bits)(v, x, &mut got);
                assert_eq!(want, got, "{} start {start} len {len} value {x}", k.name);
                assert_eq!(want[words - 1], !0, "the word past the slice");
                let ones = want
                    .iter()
                    .take(words - 1)
                    .map(|w| w.count_ones() as usize)
                    .sum::<usize>();
                assert_eq!(ones, v.iter().filter(|&&b| b == x).count());
            }
        }
    }
}

/// Bits read back as bools: every set against the reference at every bit offset in a word,
/// on odd lengths, up to and past the end of the bits (which read as false).
#[test]
fn spread_bits_matches_scalar() {
    let words = bits(5, 20);
    for k in available() {
        for first in (0..70).chain([127, 128, 1100, 1279, 1280, 1300]) {
            for len in (0..=70).chain([129, 1000, 1300 - first.min(1300)]) {
                let (mut want, mut got) = (vec![true; len], vec![true; len]);
                scalar::spread_bits(&words, first, &mut want);
                (k.spread_bits)(&words, first, &mut got);
                assert_eq!(want, got, "{} first {first} len {len}", k.name);
            }
        }
    }
    // The reference itself: bit 64 is the low bit of the second word.
    let mut out = [false; 3];
    scalar::spread_bits(&[1 << 63, 0b101], 63, &mut out);
    assert_eq!(out, [true, true, false]);
    scalar::spread_bits(&[!0], 62, &mut out);
    assert_eq!(out, [true, true, false]);
}

/// The masks' draws: every set against the reference on odd lengths, at counters that wrap
/// around 2⁶⁴, with limits at 0, inside the draws' range, at 2⁵³ and above it.
#[test]
fn draws_match_scalar() {
    let r = bits(77, 8);
    for k in available() {
        for stream in [0, r[0], u64::MAX] {
            for first in [0u64, 5, r[1], u64::MAX - 40] {
                for len in (0..=19).chain([64, 1001]) {
                    let what = format!("{} stream {stream} first {first} len {len}", k.name);
                    let (mut want, mut got) = (vec![7u32; len], vec![7u32; len]);
                    scalar::top_draws(stream, first, &mut want);
                    (k.top_draws)(stream, first, &mut got);
                    assert_eq!(want, got, "top_draws {what}");
                    // One limit equal to a draw, so a compare at or below it would show.
                    let drawn = scalar::splitmix(stream, first.wrapping_add(3)) >> 11;
                    for limit in [0, 1, drawn, r[2] >> 11, 1 << 52, 1 << 53, u64::MAX] {
                        let (mut want, mut got) = (vec![true; len], vec![false; len]);
                        scalar::draws_below(stream, first, limit, &mut want);
                        (k.draws_below)(stream, first, limit, &mut got);
                        assert_eq!(want, got, "draws_below {limit} {what}");
                    }
                }
            }
        }
    }
}

/// The reference draws are SplitMix64 (Vigna's `splitmix64.c`): from state 0, its first
/// outputs are counters 1, 2, 3 of stream 0.
#[test]
fn splitmix_is_the_published_generator() {
    let want = [
        0xE220_A839_7B1D_CDAFu64,
        0x6E78_9E6A_A1B9_65F4,
        0x06C4_5D18_8009_454F,
    ];
    for (i, w) in want.into_iter().enumerate() {
        assert_eq!(scalar::splitmix(0, i as u64 + 1), w);
    }
}
