//! x86-64 kernels: AVX2 + F16C (8 lanes) and AVX-512 F/BW/VL (16 lanes).
//!
//! Each kernel does the vector body and leaves the tail (fewer than one vector) to the scalar
//! reference, so both paths agree by construction on every element. The exported wrappers
//! are safe: [`super`] installs them only after runtime feature detection.

use std::arch::x86_64::*;

use super::scalar;

// ---------------------------------------------------------------- AVX2 + F16C

#[target_feature(enable = "avx2,f16c")]
fn f16_to_f32_avx2_imp(src: &[u16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let body = n - n % 8;
    let mut i = 0;
    while i < body {
        // SAFETY: i + 8 <= n, in bounds of both slices; unaligned loads/stores.
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    scalar::f16_to_f32(&src[body..n], &mut dst[body..n]);
}

#[target_feature(enable = "avx2,f16c")]
fn f32_to_f16_avx2_imp(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    let body = n - n % 8;
    let mut i = 0;
    while i < body {
        // SAFETY: i + 8 <= n.
        unsafe {
            let v = _mm256_loadu_ps(src.as_ptr().add(i));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
        }
        i += 8;
    }
    scalar::f32_to_f16(&src[body..n], &mut dst[body..n]);
}

#[target_feature(enable = "avx2")]
fn bf16_to_f32_avx2_imp(src: &[u16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let body = n - n % 8;
    let mut i = 0;
    while i < body {
        // SAFETY: i + 8 <= n.
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            let w = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_castsi256_ps(w));
        }
        i += 8;
    }
    scalar::bf16_to_f32(&src[body..n], &mut dst[body..n]);
}

/// Round eight f32 to bf16 bits (RNE, NaN → 0x7FC0), as 32-bit lanes.
#[target_feature(enable = "avx2")]
fn bf16_round_avx2(v: __m256) -> __m256i {
    let bits = _mm256_castps_si256(v);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
    let biased = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    let rounded = _mm256_srli_epi32::<16>(biased);
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan)
}

#[target_feature(enable = "avx2")]
fn f32_to_bf16_avx2_imp(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    let body = n - n % 8;
    let mut i = 0;
    while i < body {
        // SAFETY: i + 8 <= n.
        unsafe {
            let r = bf16_round_avx2(_mm256_loadu_ps(src.as_ptr().add(i)));
            // Lanes hold values <= 0xFFFF, so unsigned saturation packs them exactly.
            let p = _mm256_packus_epi32(r, _mm256_setzero_si256());
            let p = _mm256_permute4x64_epi64::<0b11_01_10_00>(p);
            _mm_storeu_si128(
                dst.as_mut_ptr().add(i) as *mut __m128i,
                _mm256_castsi256_si128(p),
            );
        }
        i += 8;
    }
    scalar::f32_to_bf16(&src[body..n], &mut dst[body..n]);
}

#[target_feature(enable = "avx2,f16c")]
fn blend_f16_avx2_imp(a: &[u16], b: &[u16], wa: f32, wb: f32, dst: &mut [u16]) {
    let n = a.len().min(b.len()).min(dst.len());
    let body = n - n % 8;
    let va = _mm256_set1_ps(wa);
    let vb = _mm256_set1_ps(wb);
    let mut i = 0;
    while i < body {
        // SAFETY: i + 8 <= n.
        unsafe {
            let x = _mm256_cvtph_ps(_mm_loadu_si128(a.as_ptr().add(i) as *const __m128i));
            let y = _mm256_cvtph_ps(_mm_loadu_si128(b.as_ptr().add(i) as *const __m128i));
            let px = _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_mul_ps(
                x, va,
            )));
            let py = _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_mul_ps(
                y, vb,
            )));
            let s = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_add_ps(px, py));
            _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, s);
        }
        i += 8;
    }
    scalar::blend_f16(&a[body..n], &b[body..n], wa, wb, &mut dst[body..n]);
}

#[target_feature(enable = "avx2")]
fn blend_f32_avx2_imp(a: &[f32], b: &[f32], wa: f32, wb: f32, dst: &mut [f32]) {
    let n = a.len().min(b.len()).min(dst.len());
    let body = n - n % 8;
    let va = _mm256_set1_ps(wa);
    let vb = _mm256_set1_ps(wb);
    let mut i = 0;
    while i < body {
        // SAFETY: i + 8 <= n.
        unsafe {
            let x = _mm256_mul_ps(_mm256_loadu_ps(a.as_ptr().add(i)), va);
            let y = _mm256_mul_ps(_mm256_loadu_ps(b.as_ptr().add(i)), vb);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_add_ps(x, y));
        }
        i += 8;
    }
    scalar::blend_f32(&a[body..n], &b[body..n], wa, wb, &mut dst[body..n]);
}

#[target_feature(enable = "avx2")]
fn add_scaled_avx2_imp(dst: &mut [f32], delta: &[f32], s: f32) {
    let n = dst.len().min(delta.len());
    let body = n - n % 8;
    let vs = _mm256_set1_ps(s);
    let mut i = 0;
    while i < body {
        // SAFETY: i + 8 <= n.
        unsafe {
            let p = _mm256_mul_ps(_mm256_loadu_ps(delta.as_ptr().add(i)), vs);
            let d = _mm256_loadu_ps(dst.as_ptr().add(i));
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_add_ps(d, p));
        }
        i += 8;
    }
    scalar::add_scaled(&mut dst[body..n], &delta[body..n], s);
}

#[target_feature(enable = "avx2,fma")]
fn fma_acc_avx2_imp(acc: &mut [f32], x: &[f32], w: f32) {
    let n = acc.len().min(x.len());
    let body = n - n % 8;
    let vw = _mm256_set1_ps(w);
    let mut i = 0;
    while i < body {
        // SAFETY: i + 8 <= n.
        unsafe {
            let a = _mm256_loadu_ps(acc.as_ptr().add(i));
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            _mm256_storeu_ps(acc.as_mut_ptr().add(i), _mm256_fmadd_ps(v, vw, a));
        }
        i += 8;
    }
    scalar::fma_acc(&mut acc[body..n], &x[body..n], w);
}

#[target_feature(enable = "avx2,f16c")]
fn round_f16_avx2_imp(v: &mut [f32]) {
    let n = v.len();
    let body = n - n % 8;
    let mut i = 0;
    while i < body {
        // SAFETY: i + 8 <= n.
        unsafe {
            let x = _mm256_loadu_ps(v.as_ptr().add(i));
            let r = _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x));
            _mm256_storeu_ps(v.as_mut_ptr().add(i), r);
        }
        i += 8;
    }
    scalar::round_f16(&mut v[body..n]);
}

#[target_feature(enable = "avx2")]
fn round_bf16_avx2_imp(v: &mut [f32]) {
    let n = v.len();
    let body = n - n % 8;
    let mut i = 0;
    while i < body {
        // SAFETY: i + 8 <= n.
        unsafe {
            let r = bf16_round_avx2(_mm256_loadu_ps(v.as_ptr().add(i)));
            let f = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(r));
            _mm256_storeu_ps(v.as_mut_ptr().add(i), f);
        }
        i += 8;
    }
    scalar::round_bf16(&mut v[body..n]);
}

// ---------------------------------------------------------------- AVX-512

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn f16_to_f32_avx512_imp(src: &[u16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let body = n - n % 16;
    let mut i = 0;
    while i < body {
        // SAFETY: i + 16 <= n.
        unsafe {
            let h = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
            _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
        }
        i += 16;
    }
    scalar::f16_to_f32(&src[body..n], &mut dst[body..n]);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn f32_to_f16_avx512_imp(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    let body = n - n % 16;
    let mut i = 0;
    while i < body {
        // SAFETY: i + 16 <= n.
        unsafe {
            let v = _mm512_loadu_ps(src.as_ptr().add(i));
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, h);
        }
        i += 16;
    }
    scalar::f32_to_f16(&src[body..n], &mut dst[body..n]);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn bf16_to_f32_avx512_imp(src: &[u16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let body = n - n % 16;
    let mut i = 0;
    while i < body {
        // SAFETY: i + 16 <= n.
        unsafe {
            let h = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
            let w = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
            _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_castsi512_ps(w));
        }
        i += 16;
    }
    scalar::bf16_to_f32(&src[body..n], &mut dst[body..n]);
}

/// Round sixteen f32 to bf16 bits (RNE, NaN → 0x7FC0), as 32-bit lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn bf16_round_avx512(v: __m512) -> __m512i {
    let bits = _mm512_castps_si512(v);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let biased = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    let rounded = _mm512_srli_epi32::<16>(biased);
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7FC0))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn f32_to_bf16_avx512_imp(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    let body = n - n % 16;
    let mut i = 0;
    while i < body {
        // SAFETY: i + 16 <= n.
        unsafe {
            let r = bf16_round_avx512(_mm512_loadu_ps(src.as_ptr().add(i)));
            _mm256_storeu_si256(
                dst.as_mut_ptr().add(i) as *mut __m256i,
                _mm512_cvtepi32_epi16(r),
            );
        }
        i += 16;
    }
    scalar::f32_to_bf16(&src[body..n], &mut dst[body..n]);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn blend_f16_avx512_imp(a: &[u16], b: &[u16], wa: f32, wb: f32, dst: &mut [u16]) {
    const R: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let n = a.len().min(b.len()).min(dst.len());
    let body = n - n % 16;
    let va = _mm512_set1_ps(wa);
    let vb = _mm512_set1_ps(wb);
    let mut i = 0;
    while i < body {
        // SAFETY: i + 16 <= n.
        unsafe {
            let x = _mm512_cvtph_ps(_mm256_loadu_si256(a.as_ptr().add(i) as *const __m256i));
            let y = _mm512_cvtph_ps(_mm256_loadu_si256(b.as_ptr().add(i) as *const __m256i));
            let px = _mm512_cvtph_ps(_mm512_cvtps_ph::<R>(_mm512_mul_ps(x, va)));
            let py = _mm512_cvtph_ps(_mm512_cvtps_ph::<R>(_mm512_mul_ps(y, vb)));
            let s = _mm512_cvtps_ph::<R>(_mm512_add_ps(px, py));
            _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, s);
        }
        i += 16;
    }
    scalar::blend_f16(&a[body..n], &b[body..n], wa, wb, &mut dst[body..n]);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn blend_f32_avx512_imp(a: &[f32], b: &[f32], wa: f32, wb: f32, dst: &mut [f32]) {
    let n = a.len().min(b.len()).min(dst.len());
    let body = n - n % 16;
    let va = _mm512_set1_ps(wa);
    let vb = _mm512_set1_ps(wb);
    let mut i = 0;
    while i < body {
        // SAFETY: i + 16 <= n.
        unsafe {
            let x = _mm512_mul_ps(_mm512_loadu_ps(a.as_ptr().add(i)), va);
            let y = _mm512_mul_ps(_mm512_loadu_ps(b.as_ptr().add(i)), vb);
            _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_add_ps(x, y));
        }
        i += 16;
    }
    scalar::blend_f32(&a[body..n], &b[body..n], wa, wb, &mut dst[body..n]);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn add_scaled_avx512_imp(dst: &mut [f32], delta: &[f32], s: f32) {
    let n = dst.len().min(delta.len());
    let body = n - n % 16;
    let vs = _mm512_set1_ps(s);
    let mut i = 0;
    while i < body {
        // SAFETY: i + 16 <= n.
        unsafe {
            let p = _mm512_mul_ps(_mm512_loadu_ps(delta.as_ptr().add(i)), vs);
            let d = _mm512_loadu_ps(dst.as_ptr().add(i));
            _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_add_ps(d, p));
        }
        i += 16;
    }
    scalar::add_scaled(&mut dst[body..n], &delta[body..n], s);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn fma_acc_avx512_imp(acc: &mut [f32], x: &[f32], w: f32) {
    let n = acc.len().min(x.len());
    let body = n - n % 16;
    let vw = _mm512_set1_ps(w);
    let mut i = 0;
    while i < body {
        // SAFETY: i + 16 <= n.
        unsafe {
            let a = _mm512_loadu_ps(acc.as_ptr().add(i));
            let v = _mm512_loadu_ps(x.as_ptr().add(i));
            _mm512_storeu_ps(acc.as_mut_ptr().add(i), _mm512_fmadd_ps(v, vw, a));
        }
        i += 16;
    }
    scalar::fma_acc(&mut acc[body..n], &x[body..n], w);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn round_f16_avx512_imp(v: &mut [f32]) {
    const R: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let n = v.len();
    let body = n - n % 16;
    let mut i = 0;
    while i < body {
        // SAFETY: i + 16 <= n.
        unsafe {
            let x = _mm512_loadu_ps(v.as_ptr().add(i));
            _mm512_storeu_ps(
                v.as_mut_ptr().add(i),
                _mm512_cvtph_ps(_mm512_cvtps_ph::<R>(x)),
            );
        }
        i += 16;
    }
    scalar::round_f16(&mut v[body..n]);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn round_bf16_avx512_imp(v: &mut [f32]) {
    let n = v.len();
    let body = n - n % 16;
    let mut i = 0;
    while i < body {
        // SAFETY: i + 16 <= n.
        unsafe {
            let r = bf16_round_avx512(_mm512_loadu_ps(v.as_ptr().add(i)));
            let f = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(r));
            _mm512_storeu_ps(v.as_mut_ptr().add(i), f);
        }
        i += 16;
    }
    scalar::round_bf16(&mut v[body..n]);
}

// ---------------------------------------------------------------- safe entry points

/// Generate safe wrappers; sound because `super::select` installs them only when the CPU
/// has the features the implementation enables.
macro_rules! wrap {
    ($($name:ident => $imp:ident ($($arg:ident : $ty:ty),*);)*) => {$(
        pub(super) fn $name($($arg: $ty),*) {
            // SAFETY: installed only after feature detection (see `super::select`).
            unsafe { $imp($($arg),*) }
        }
    )*};
}

wrap! {
    f16_to_f32_avx2 => f16_to_f32_avx2_imp(src: &[u16], dst: &mut [f32]);
    f32_to_f16_avx2 => f32_to_f16_avx2_imp(src: &[f32], dst: &mut [u16]);
    bf16_to_f32_avx2 => bf16_to_f32_avx2_imp(src: &[u16], dst: &mut [f32]);
    f32_to_bf16_avx2 => f32_to_bf16_avx2_imp(src: &[f32], dst: &mut [u16]);
    blend_f16_avx2 => blend_f16_avx2_imp(a: &[u16], b: &[u16], wa: f32, wb: f32, dst: &mut [u16]);
    blend_f32_avx2 => blend_f32_avx2_imp(a: &[f32], b: &[f32], wa: f32, wb: f32, dst: &mut [f32]);
    add_scaled_avx2 => add_scaled_avx2_imp(dst: &mut [f32], delta: &[f32], s: f32);
    fma_acc_avx2 => fma_acc_avx2_imp(acc: &mut [f32], x: &[f32], w: f32);
    round_f16_avx2 => round_f16_avx2_imp(v: &mut [f32]);
    round_bf16_avx2 => round_bf16_avx2_imp(v: &mut [f32]);
    f16_to_f32_avx512 => f16_to_f32_avx512_imp(src: &[u16], dst: &mut [f32]);
    f32_to_f16_avx512 => f32_to_f16_avx512_imp(src: &[f32], dst: &mut [u16]);
    bf16_to_f32_avx512 => bf16_to_f32_avx512_imp(src: &[u16], dst: &mut [f32]);
    f32_to_bf16_avx512 => f32_to_bf16_avx512_imp(src: &[f32], dst: &mut [u16]);
    blend_f16_avx512 => blend_f16_avx512_imp(a: &[u16], b: &[u16], wa: f32, wb: f32, dst: &mut [u16]);
    blend_f32_avx512 => blend_f32_avx512_imp(a: &[f32], b: &[f32], wa: f32, wb: f32, dst: &mut [f32]);
    add_scaled_avx512 => add_scaled_avx512_imp(dst: &mut [f32], delta: &[f32], s: f32);
    fma_acc_avx512 => fma_acc_avx512_imp(acc: &mut [f32], x: &[f32], w: f32);
    round_f16_avx512 => round_f16_avx512_imp(v: &mut [f32]);
    round_bf16_avx512 => round_bf16_avx512_imp(v: &mut [f32]);
}
