//! aarch64 kernels: NEON (baseline on every aarch64 CPU) for the f32 blends and bf16
//! conversions; fp16 conversions go through the `half` crate's slice conversions, which use
//! the FP16 instructions when the CPU has them.
//!
//! Bodies process 4 lanes; tails go to the scalar reference, so results match it exactly.

use std::arch::aarch64::*;

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use super::scalar;

pub(super) fn f16_to_f32_neon(src: &[u16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let h: &[f16] = src[..n].reinterpret_cast();
    h.convert_to_f32_slice(&mut dst[..n]);
}

pub(super) fn f32_to_f16_neon(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    let h: &mut [f16] = dst[..n].reinterpret_cast_mut();
    h.convert_from_f32_slice(&src[..n]);
}

pub(super) fn bf16_to_f32_neon(src: &[u16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let body = n - n % 4;
    let mut i = 0;
    while i < body {
        // SAFETY: i + 4 <= n, the common length of the slices, so the 4-lane loads and
        // stores stay in bounds; NEON is part of the aarch64 baseline.
        unsafe {
            let h = vld1_u16(src.as_ptr().add(i));
            let w = vshlq_n_u32::<16>(vmovl_u16(h));
            vst1q_f32(dst.as_mut_ptr().add(i), vreinterpretq_f32_u32(w));
        }
        i += 4;
    }
    scalar::bf16_to_f32(&src[body..n], &mut dst[body..n]);
}

/// RNE to bf16 bits in 32-bit lanes; NaN → 0x7FC0.
#[inline]
fn bf16_round_neon(v: float32x4_t) -> uint32x4_t {
    let bits = vreinterpretq_u32_f32(v);
    let lsb = vandq_u32(vshrq_n_u32::<16>(bits), vdupq_n_u32(1));
    let biased = vaddq_u32(bits, vaddq_u32(lsb, vdupq_n_u32(0x7FFF)));
    let rounded = vshrq_n_u32::<16>(biased);
    let not_nan = vceqq_f32(v, v);
    vbslq_u32(not_nan, rounded, vdupq_n_u32(0x7FC0))
}

pub(super) fn f32_to_bf16_neon(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    let body = n - n % 4;
    let mut i = 0;
    while i < body {
        // SAFETY: i + 4 <= n, the common length of the slices, so the 4-lane loads and
        // stores stay in bounds; NEON is part of the aarch64 baseline.
        unsafe {
            let r = bf16_round_neon(vld1q_f32(src.as_ptr().add(i)));
            vst1_u16(dst.as_mut_ptr().add(i), vmovn_u32(r));
        }
        i += 4;
    }
    scalar::f32_to_bf16(&src[body..n], &mut dst[body..n]);
}

pub(super) fn blend_f16_neon(a: &[u16], b: &[u16], wa: f32, wb: f32, dst: &mut [u16]) {
    // fp16 arithmetic is conversion-bound: convert in blocks through the half crate.
    const BLOCK: usize = 256;
    let n = a.len().min(b.len()).min(dst.len());
    let mut x = [0f32; BLOCK];
    let mut y = [0f32; BLOCK];
    let mut start = 0;
    while start < n {
        let len = BLOCK.min(n - start);
        let (x, y) = (&mut x[..len], &mut y[..len]);
        f16_to_f32_neon(&a[start..start + len], x);
        f16_to_f32_neon(&b[start..start + len], y);
        for v in x.iter_mut() {
            *v *= wa;
        }
        for v in y.iter_mut() {
            *v *= wb;
        }
        round_f16_neon(x);
        round_f16_neon(y);
        for (u, &w) in x.iter_mut().zip(y.iter()) {
            *u += w;
        }
        f32_to_f16_neon(x, &mut dst[start..start + len]);
        start += len;
    }
}

pub(super) fn blend_f32_neon(a: &[f32], b: &[f32], wa: f32, wb: f32, dst: &mut [f32]) {
    let n = a.len().min(b.len()).min(dst.len());
    let body = n - n % 4;
    let va = vdupq_n_f32(wa);
    let vb = vdupq_n_f32(wb);
    let mut i = 0;
    while i < body {
        // SAFETY: i + 4 <= n, the common length of the slices, so the 4-lane loads and
        // stores stay in bounds; NEON is part of the aarch64 baseline.
        unsafe {
            let x = vmulq_f32(vld1q_f32(a.as_ptr().add(i)), va);
            let y = vmulq_f32(vld1q_f32(b.as_ptr().add(i)), vb);
            vst1q_f32(dst.as_mut_ptr().add(i), vaddq_f32(x, y));
        }
        i += 4;
    }
    scalar::blend_f32(&a[body..n], &b[body..n], wa, wb, &mut dst[body..n]);
}

pub(super) fn add_scaled_neon(dst: &mut [f32], delta: &[f32], s: f32) {
    let n = dst.len().min(delta.len());
    let body = n - n % 4;
    let vs = vdupq_n_f32(s);
    let mut i = 0;
    while i < body {
        // SAFETY: i + 4 <= n, the common length of the slices, so the 4-lane loads and
        // stores stay in bounds; NEON is part of the aarch64 baseline.
        unsafe {
            let p = vmulq_f32(vld1q_f32(delta.as_ptr().add(i)), vs);
            let d = vld1q_f32(dst.as_ptr().add(i));
            vst1q_f32(dst.as_mut_ptr().add(i), vaddq_f32(d, p));
        }
        i += 4;
    }
    scalar::add_scaled(&mut dst[body..n], &delta[body..n], s);
}

pub(super) fn fma_acc_neon(acc: &mut [f32], x: &[f32], w: f32) {
    let n = acc.len().min(x.len());
    let body = n - n % 4;
    let vw = vdupq_n_f32(w);
    let mut i = 0;
    while i < body {
        // SAFETY: i + 4 <= n, the common length of the slices, so the 4-lane loads and
        // stores stay in bounds; NEON is part of the aarch64 baseline.
        unsafe {
            let a = vld1q_f32(acc.as_ptr().add(i));
            let v = vld1q_f32(x.as_ptr().add(i));
            // vfmaq_f32(a, b, c) = a + b·c, fused.
            vst1q_f32(acc.as_mut_ptr().add(i), vfmaq_f32(a, v, vw));
        }
        i += 4;
    }
    scalar::fma_acc(&mut acc[body..n], &x[body..n], w);
}

pub(super) fn round_f16_neon(v: &mut [f32]) {
    const BLOCK: usize = 256;
    let mut h = [0u16; BLOCK];
    for chunk in v.chunks_mut(BLOCK) {
        let h = &mut h[..chunk.len()];
        f32_to_f16_neon(chunk, h);
        f16_to_f32_neon(h, chunk);
    }
}

pub(super) fn round_bf16_neon(v: &mut [f32]) {
    let n = v.len();
    let body = n - n % 4;
    let mut i = 0;
    while i < body {
        // SAFETY: i + 4 <= n, the common length of the slices, so the 4-lane loads and
        // stores stay in bounds; NEON is part of the aarch64 baseline.
        unsafe {
            let r = bf16_round_neon(vld1q_f32(v.as_ptr().add(i)));
            vst1q_f32(
                v.as_mut_ptr().add(i),
                vreinterpretq_f32_u32(vshlq_n_u32::<16>(r)),
            );
        }
        i += 4;
    }
    scalar::round_bf16(&mut v[body..n]);
}
