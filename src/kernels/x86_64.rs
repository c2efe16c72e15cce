//! x86-64 kernels: AVX2 + F16C + FMA (8 lanes) and AVX-512 F/BW/VL/DQ (16 lanes).
//!
//! Each kernel is written once, in [`body`], over the [`Vector`] trait (one register of f32
//! lanes and the few operations the kernels need), then instantiated per instruction set
//! inside `#[target_feature]` functions so the intrinsics inline — the way the `memchr` crate
//! writes its algorithms. Bodies process whole vectors and leave the tail (fewer than one
//! vector) to the scalar reference, so both paths agree by construction on every element.
//!
//! [`avx2`] and [`avx512`] detect their CPU features themselves and are the only way out of
//! this file to the SIMD code, so no safe function here relies on a check made elsewhere.

use std::arch::x86_64::*;

use super::{Kernels, scalar};

/// One register of `LANES` f32 lanes and the operations the kernels are written with.
///
/// Every method is `unsafe` for one reason shared by all of them: the caller must ensure the
/// CPU supports the instruction set of the implementing type (AVX2+F16C+FMA for `__m256`,
/// AVX-512 F/BW/VL/DQ for `__m512`). Methods taking a pointer also need `LANES` readable (or
/// writable) elements there; no alignment is required.
trait Vector: Copy {
    const LANES: usize;
    /// `LANES` 16-bit values (fp16 or bf16 bits).
    type Halves: Copy;
    /// `LANES` 32-bit integer lanes.
    type Ints: Copy;

    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    unsafe fn load_halves(p: *const u16) -> Self::Halves;
    unsafe fn store_halves(h: Self::Halves, p: *mut u16);

    /// Lane-wise product, rounded.
    unsafe fn mul(self, other: Self) -> Self;
    /// Lane-wise sum, rounded.
    unsafe fn add(self, other: Self) -> Self;
    /// `self·m + a` rounded once (fused).
    unsafe fn mul_add(self, m: Self, a: Self) -> Self;

    /// fp16 bits to f32 (exact).
    unsafe fn from_f16(h: Self::Halves) -> Self;
    /// f32 to fp16 bits, round to nearest even.
    unsafe fn to_f16(self) -> Self::Halves;

    unsafe fn to_bits(self) -> Self::Ints;
    /// Zero-extend 16-bit values to 32-bit lanes.
    unsafe fn widen(h: Self::Halves) -> Self::Ints;
    /// Truncate 32-bit lanes holding values <= 0xFFFF to 16 bits.
    unsafe fn narrow(i: Self::Ints) -> Self::Halves;
    /// `i << 16` reinterpreted as f32: bf16 bits in the low half become the f32 they denote.
    unsafe fn shl16_to_f32(i: Self::Ints) -> Self;
    unsafe fn splat_int(x: i32) -> Self::Ints;
    unsafe fn shr16_int(i: Self::Ints) -> Self::Ints;
    unsafe fn and_int(a: Self::Ints, b: Self::Ints) -> Self::Ints;
    unsafe fn add_int(a: Self::Ints, b: Self::Ints) -> Self::Ints;
    /// `if_nan` in the lanes where `self` is NaN, `other` elsewhere.
    unsafe fn select_nan(self, if_nan: Self::Ints, other: Self::Ints) -> Self::Ints;
}

// ---------------------------------------------------------------- AVX2 + F16C + FMA

impl Vector for __m256 {
    const LANES: usize = 8;
    type Halves = __m128i;
    type Ints = __m256i;

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        // SAFETY: the caller guarantees AVX2 (trait contract); same for every block below.
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: AVX2, and 8 readable f32 at `p` (trait contract); unaligned load.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: AVX2, and 8 writable f32 at `p` (trait contract); unaligned store.
        unsafe { _mm256_storeu_ps(p, self) }
    }
    #[inline(always)]
    unsafe fn load_halves(p: *const u16) -> Self::Halves {
        // SAFETY: 8 readable u16 at `p` (trait contract); unaligned load.
        unsafe { _mm_loadu_si128(p as *const __m128i) }
    }
    #[inline(always)]
    unsafe fn store_halves(h: Self::Halves, p: *mut u16) {
        // SAFETY: 8 writable u16 at `p` (trait contract); unaligned store.
        unsafe { _mm_storeu_si128(p as *mut __m128i, h) }
    }
    #[inline(always)]
    unsafe fn mul(self, other: Self) -> Self {
        // SAFETY: AVX2 (trait contract).
        unsafe { _mm256_mul_ps(self, other) }
    }
    #[inline(always)]
    unsafe fn add(self, other: Self) -> Self {
        // SAFETY: AVX2 (trait contract).
        unsafe { _mm256_add_ps(self, other) }
    }
    #[inline(always)]
    unsafe fn mul_add(self, m: Self, a: Self) -> Self {
        // SAFETY: FMA (trait contract).
        unsafe { _mm256_fmadd_ps(self, m, a) }
    }
    #[inline(always)]
    unsafe fn from_f16(h: Self::Halves) -> Self {
        // SAFETY: F16C (trait contract).
        unsafe { _mm256_cvtph_ps(h) }
    }
    #[inline(always)]
    unsafe fn to_f16(self) -> Self::Halves {
        // SAFETY: F16C (trait contract).
        unsafe { _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(self) }
    }
    #[inline(always)]
    unsafe fn to_bits(self) -> Self::Ints {
        // SAFETY: AVX (trait contract).
        unsafe { _mm256_castps_si256(self) }
    }
    #[inline(always)]
    unsafe fn widen(h: Self::Halves) -> Self::Ints {
        // SAFETY: AVX2 (trait contract).
        unsafe { _mm256_cvtepu16_epi32(h) }
    }
    #[inline(always)]
    unsafe fn narrow(i: Self::Ints) -> Self::Halves {
        // SAFETY: AVX2 (trait contract). Lanes hold values <= 0xFFFF, so unsigned
        // saturation packs them exactly; the permute puts the two halves back in order.
        unsafe {
            let p = _mm256_packus_epi32(i, _mm256_setzero_si256());
            _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b11_01_10_00>(p))
        }
    }
    #[inline(always)]
    unsafe fn shl16_to_f32(i: Self::Ints) -> Self {
        // SAFETY: AVX2 (trait contract).
        unsafe { _mm256_castsi256_ps(_mm256_slli_epi32::<16>(i)) }
    }
    #[inline(always)]
    unsafe fn splat_int(x: i32) -> Self::Ints {
        // SAFETY: AVX (trait contract).
        unsafe { _mm256_set1_epi32(x) }
    }
    #[inline(always)]
    unsafe fn shr16_int(i: Self::Ints) -> Self::Ints {
        // SAFETY: AVX2 (trait contract).
        unsafe { _mm256_srli_epi32::<16>(i) }
    }
    #[inline(always)]
    unsafe fn and_int(a: Self::Ints, b: Self::Ints) -> Self::Ints {
        // SAFETY: AVX2 (trait contract).
        unsafe { _mm256_and_si256(a, b) }
    }
    #[inline(always)]
    unsafe fn add_int(a: Self::Ints, b: Self::Ints) -> Self::Ints {
        // SAFETY: AVX2 (trait contract).
        unsafe { _mm256_add_epi32(a, b) }
    }
    #[inline(always)]
    unsafe fn select_nan(self, if_nan: Self::Ints, other: Self::Ints) -> Self::Ints {
        // SAFETY: AVX2 (trait contract).
        unsafe {
            let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(self, self));
            _mm256_blendv_epi8(other, if_nan, nan)
        }
    }
}

// ---------------------------------------------------------------- AVX-512 F/BW/VL/DQ

/// Round to nearest even, and no floating-point exception flags raised.
const RNE_NO_EXC: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

impl Vector for __m512 {
    const LANES: usize = 16;
    type Halves = __m256i;
    type Ints = __m512i;

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        // SAFETY: the caller guarantees AVX-512F (trait contract); same for every block below.
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: AVX-512F, and 16 readable f32 at `p` (trait contract); unaligned load.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: AVX-512F, and 16 writable f32 at `p` (trait contract); unaligned store.
        unsafe { _mm512_storeu_ps(p, self) }
    }
    #[inline(always)]
    unsafe fn load_halves(p: *const u16) -> Self::Halves {
        // SAFETY: AVX, and 16 readable u16 at `p` (trait contract); unaligned load.
        unsafe { _mm256_loadu_si256(p as *const __m256i) }
    }
    #[inline(always)]
    unsafe fn store_halves(h: Self::Halves, p: *mut u16) {
        // SAFETY: AVX, and 16 writable u16 at `p` (trait contract); unaligned store.
        unsafe { _mm256_storeu_si256(p as *mut __m256i, h) }
    }
    #[inline(always)]
    unsafe fn mul(self, other: Self) -> Self {
        // SAFETY: AVX-512F (trait contract).
        unsafe { _mm512_mul_ps(self, other) }
    }
    #[inline(always)]
    unsafe fn add(self, other: Self) -> Self {
        // SAFETY: AVX-512F (trait contract).
        unsafe { _mm512_add_ps(self, other) }
    }
    #[inline(always)]
    unsafe fn mul_add(self, m: Self, a: Self) -> Self {
        // SAFETY: AVX-512F (trait contract).
        unsafe { _mm512_fmadd_ps(self, m, a) }
    }
    #[inline(always)]
    unsafe fn from_f16(h: Self::Halves) -> Self {
        // SAFETY: AVX-512F (trait contract).
        unsafe { _mm512_cvtph_ps(h) }
    }
    #[inline(always)]
    unsafe fn to_f16(self) -> Self::Halves {
        // SAFETY: AVX-512F (trait contract).
        unsafe { _mm512_cvtps_ph::<RNE_NO_EXC>(self) }
    }
    #[inline(always)]
    unsafe fn to_bits(self) -> Self::Ints {
        // SAFETY: AVX-512F (trait contract).
        unsafe { _mm512_castps_si512(self) }
    }
    #[inline(always)]
    unsafe fn widen(h: Self::Halves) -> Self::Ints {
        // SAFETY: AVX-512F (trait contract).
        unsafe { _mm512_cvtepu16_epi32(h) }
    }
    #[inline(always)]
    unsafe fn narrow(i: Self::Ints) -> Self::Halves {
        // SAFETY: AVX-512F (trait contract). Truncation is exact: lanes are <= 0xFFFF.
        unsafe { _mm512_cvtepi32_epi16(i) }
    }
    #[inline(always)]
    unsafe fn shl16_to_f32(i: Self::Ints) -> Self {
        // SAFETY: AVX-512F (trait contract).
        unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(i)) }
    }
    #[inline(always)]
    unsafe fn splat_int(x: i32) -> Self::Ints {
        // SAFETY: AVX-512F (trait contract).
        unsafe { _mm512_set1_epi32(x) }
    }
    #[inline(always)]
    unsafe fn shr16_int(i: Self::Ints) -> Self::Ints {
        // SAFETY: AVX-512F (trait contract).
        unsafe { _mm512_srli_epi32::<16>(i) }
    }
    #[inline(always)]
    unsafe fn and_int(a: Self::Ints, b: Self::Ints) -> Self::Ints {
        // SAFETY: AVX-512F (trait contract).
        unsafe { _mm512_and_si512(a, b) }
    }
    #[inline(always)]
    unsafe fn add_int(a: Self::Ints, b: Self::Ints) -> Self::Ints {
        // SAFETY: AVX-512F (trait contract).
        unsafe { _mm512_add_epi32(a, b) }
    }
    #[inline(always)]
    unsafe fn select_nan(self, if_nan: Self::Ints, other: Self::Ints) -> Self::Ints {
        // SAFETY: AVX-512F (trait contract).
        unsafe {
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(self, self);
            _mm512_mask_blend_epi32(nan, other, if_nan)
        }
    }
}

// ---------------------------------------------------------------- kernels, written once

/// The kernels over any [`Vector`]. Each one is `unsafe` only because of the trait's CPU
/// requirement: the caller must ensure the CPU supports `V`'s instruction set. Lengths are
/// checked here, next to the pointer arithmetic they justify: every kernel works on the
/// common length of its slices, as the scalar reference (which zips them) does.
mod body {
    use super::{Vector, scalar};

    /// How far ahead decoding asks for input: hardware prefetchers stop at 4 KiB page
    /// boundaries, which a decode reading page-cache pages (a mapped input) crosses every
    /// 2048 values.
    const PREFETCH_HALVES: usize = 2048;

    #[inline(always)]
    fn prefetch(p: *const u16) {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast()) }
    }

    #[inline(always)]
    pub unsafe fn f16_to_f32<V: Vector>(src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let body = n - n % V::LANES;
        let mut i = 0;
        while i < body {
            if i % 32 == 0 {
                prefetch(src.as_ptr().wrapping_add(i + PREFETCH_HALVES));
            }
            // SAFETY: i + LANES <= n, so both accesses are in bounds; the caller guarantees
            // V's CPU features (same for every loop in this module).
            unsafe {
                V::from_f16(V::load_halves(src.as_ptr().add(i))).store(dst.as_mut_ptr().add(i))
            }
            i += V::LANES;
        }
        scalar::f16_to_f32(&src[body..n], &mut dst[body..n]);
    }

    #[inline(always)]
    pub unsafe fn f32_to_f16<V: Vector>(src: &[f32], dst: &mut [u16]) {
        let n = src.len().min(dst.len());
        let body = n - n % V::LANES;
        let mut i = 0;
        while i < body {
            // SAFETY: i + LANES <= n; V's features (caller).
            unsafe {
                V::store_halves(
                    V::load(src.as_ptr().add(i)).to_f16(),
                    dst.as_mut_ptr().add(i),
                )
            }
            i += V::LANES;
        }
        scalar::f32_to_f16(&src[body..n], &mut dst[body..n]);
    }

    #[inline(always)]
    pub unsafe fn bf16_to_f32<V: Vector>(src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let body = n - n % V::LANES;
        let mut i = 0;
        while i < body {
            // SAFETY: i + LANES <= n; V's features (caller).
            unsafe {
                let h = V::load_halves(src.as_ptr().add(i));
                V::shl16_to_f32(V::widen(h)).store(dst.as_mut_ptr().add(i))
            }
            i += V::LANES;
        }
        scalar::bf16_to_f32(&src[body..n], &mut dst[body..n]);
    }

    /// bf16 bits of every lane in 32-bit lanes: round to nearest even, every NaN to 0x7FC0
    /// (`scalar::f32_to_bf16_bits`, lane-wise).
    #[inline(always)]
    unsafe fn bf16_round<V: Vector>(v: V) -> V::Ints {
        // SAFETY: V's features (caller); no memory access.
        unsafe {
            let bits = v.to_bits();
            let lsb = V::and_int(V::shr16_int(bits), V::splat_int(1));
            let biased = V::add_int(bits, V::add_int(lsb, V::splat_int(0x7FFF)));
            v.select_nan(V::splat_int(0x7FC0), V::shr16_int(biased))
        }
    }

    #[inline(always)]
    pub unsafe fn f32_to_bf16<V: Vector>(src: &[f32], dst: &mut [u16]) {
        let n = src.len().min(dst.len());
        let body = n - n % V::LANES;
        let mut i = 0;
        while i < body {
            // SAFETY: i + LANES <= n; V's features (caller).
            unsafe {
                let r = bf16_round(V::load(src.as_ptr().add(i)));
                V::store_halves(V::narrow(r), dst.as_mut_ptr().add(i))
            }
            i += V::LANES;
        }
        scalar::f32_to_bf16(&src[body..n], &mut dst[body..n]);
    }

    /// `f16(f16(a·wa) + f16(b·wb))`: each product rounded to fp16 before the sum, so no
    /// fused multiply-add here (the reference rounds between the operations).
    #[inline(always)]
    pub unsafe fn blend_f16<V: Vector>(a: &[u16], b: &[u16], wa: f32, wb: f32, dst: &mut [u16]) {
        let n = a.len().min(b.len()).min(dst.len());
        let body = n - n % V::LANES;
        // SAFETY: V's features (caller).
        let (va, vb) = unsafe { (V::splat(wa), V::splat(wb)) };
        let mut i = 0;
        while i < body {
            if i % 32 == 0 {
                prefetch(a.as_ptr().wrapping_add(i + PREFETCH_HALVES));
                prefetch(b.as_ptr().wrapping_add(i + PREFETCH_HALVES));
            }
            // SAFETY: i + LANES <= n; V's features (caller).
            unsafe {
                let x = V::from_f16(V::load_halves(a.as_ptr().add(i)));
                let y = V::from_f16(V::load_halves(b.as_ptr().add(i)));
                let px = V::from_f16(x.mul(va).to_f16());
                let py = V::from_f16(y.mul(vb).to_f16());
                V::store_halves(px.add(py).to_f16(), dst.as_mut_ptr().add(i))
            }
            i += V::LANES;
        }
        scalar::blend_f16(&a[body..n], &b[body..n], wa, wb, &mut dst[body..n]);
    }

    /// `a·wa + b·wb`, each product rounded (no FMA).
    #[inline(always)]
    pub unsafe fn blend_f32<V: Vector>(a: &[f32], b: &[f32], wa: f32, wb: f32, dst: &mut [f32]) {
        let n = a.len().min(b.len()).min(dst.len());
        let body = n - n % V::LANES;
        // SAFETY: V's features (caller).
        let (va, vb) = unsafe { (V::splat(wa), V::splat(wb)) };
        let mut i = 0;
        while i < body {
            // SAFETY: i + LANES <= n; V's features (caller).
            unsafe {
                let x = V::load(a.as_ptr().add(i)).mul(va);
                let y = V::load(b.as_ptr().add(i)).mul(vb);
                x.add(y).store(dst.as_mut_ptr().add(i))
            }
            i += V::LANES;
        }
        scalar::blend_f32(&a[body..n], &b[body..n], wa, wb, &mut dst[body..n]);
    }

    /// `dst += delta·s`, the product rounded before the add (no FMA).
    #[inline(always)]
    pub unsafe fn add_scaled<V: Vector>(dst: &mut [f32], delta: &[f32], s: f32) {
        let n = dst.len().min(delta.len());
        let body = n - n % V::LANES;
        // SAFETY: V's features (caller).
        let vs = unsafe { V::splat(s) };
        let mut i = 0;
        while i < body {
            // SAFETY: i + LANES <= n; V's features (caller).
            unsafe {
                let p = V::load(delta.as_ptr().add(i)).mul(vs);
                let d = V::load(dst.as_ptr().add(i));
                d.add(p).store(dst.as_mut_ptr().add(i))
            }
            i += V::LANES;
        }
        scalar::add_scaled(&mut dst[body..n], &delta[body..n], s);
    }

    /// `acc = fma(x, w, acc)`: fused, as the reference's `mul_add`.
    #[inline(always)]
    pub unsafe fn fma_acc<V: Vector>(acc: &mut [f32], x: &[f32], w: f32) {
        let n = acc.len().min(x.len());
        let body = n - n % V::LANES;
        // SAFETY: V's features (caller).
        let vw = unsafe { V::splat(w) };
        let mut i = 0;
        while i < body {
            // SAFETY: i + LANES <= n; V's features (caller).
            unsafe {
                let a = V::load(acc.as_ptr().add(i));
                let v = V::load(x.as_ptr().add(i));
                v.mul_add(vw, a).store(acc.as_mut_ptr().add(i))
            }
            i += V::LANES;
        }
        scalar::fma_acc(&mut acc[body..n], &x[body..n], w);
    }

    #[inline(always)]
    pub unsafe fn round_f16<V: Vector>(v: &mut [f32]) {
        let n = v.len();
        let body = n - n % V::LANES;
        let mut i = 0;
        while i < body {
            // SAFETY: i + LANES <= n; V's features (caller).
            unsafe {
                let x = V::load(v.as_ptr().add(i));
                V::from_f16(x.to_f16()).store(v.as_mut_ptr().add(i))
            }
            i += V::LANES;
        }
        scalar::round_f16(&mut v[body..n]);
    }

    #[inline(always)]
    pub unsafe fn round_bf16<V: Vector>(v: &mut [f32]) {
        let n = v.len();
        let body = n - n % V::LANES;
        let mut i = 0;
        while i < body {
            // SAFETY: i + LANES <= n; V's features (caller).
            unsafe {
                let r = bf16_round(V::load(v.as_ptr().add(i)));
                V::shl16_to_f32(r).store(v.as_mut_ptr().add(i))
            }
            i += V::LANES;
        }
        scalar::round_bf16(&mut v[body..n]);
    }
}

// ---------------------------------------------------------------- instantiation

/// One kernel set: `$set::kernels()` checks the CPU features and only then hands out the
/// safe wrappers, which are private to the generated module. Each wrapper calls an inner
/// `#[target_feature]` function, so the generic body and the trait's `#[inline(always)]`
/// methods are compiled (and their intrinsics inlined) with the set's features. Plain
/// kernels are `body`'s over the set's [`Vector`], `[words]` ones `draws`' over its
/// [`Words`], `[own]` ones a function of their own.
macro_rules! kernel_set {
    (
        $set:ident, $vector:ty, $words:ty, $features:literal, $label:literal,
        detect: $detect:expr;
        $($kernel:ident($($arg:ident: $ty:ty),*);)*
        $([words] $wkernel:ident($($warg:ident: $wty:ty),*);)*
        $([own] $own:ident = $own_imp:ident($($own_arg:ident: $own_ty:ty),*);)*
    ) => {
        pub(super) mod $set {
            use super::{Kernels, body};
            use std::arch::x86_64::*;

            $(
                fn $kernel($($arg: $ty),*) {
                    #[target_feature(enable = $features)]
                    fn imp($($arg: $ty),*) {
                        // SAFETY: `imp` is a target-feature function, so it runs only where
                        // the set's features exist; they cover the vector type's methods.
                        unsafe { body::$kernel::<$vector>($($arg),*) }
                    }
                    // SAFETY: this function is private to this module, whose only use of it
                    // is in `kernels` below, after the detection found the features `imp`
                    // enables.
                    unsafe { imp($($arg),*) }
                }
            )*

            // The same over 64-bit integer lanes ([`super::Words`]).
            $(
                fn $wkernel($($warg: $wty),*) {
                    #[target_feature(enable = $features)]
                    fn imp($($warg: $wty),*) {
                        // SAFETY: as above, for the words type.
                        unsafe { super::draws::$wkernel::<$words>($($warg),*) }
                    }
                    // SAFETY: as above: reachable only through `kernels`, after detection.
                    unsafe { imp($($warg),*) }
                }
            )*

            // Kernels written for this set alone (not over `Vector`).
            $(
                fn $own($($own_arg: $own_ty),*) {
                    // SAFETY: as above: `$own_imp` needs the set's features, and this
                    // private function is reachable only through `kernels` below, after the
                    // detection found them.
                    unsafe { super::$own_imp($($own_arg),*) }
                }
            )*

            /// Run `f` compiled with the set's features (its loops, once inlined here,
            /// vectorize for them).
            #[inline]
            pub(in super::super) fn run<R>(f: impl FnOnce() -> R) -> R {
                #[target_feature(enable = $features)]
                #[inline]
                fn imp<R>(f: impl FnOnce() -> R) -> R {
                    f()
                }
                // SAFETY: `vectorized` calls this only when `active` chose this set, which
                // `kernels` hands out only after the detection found the features.
                unsafe { imp(f) }
            }

            /// This set, if the CPU has its features.
            pub(in super::super) fn kernels() -> Option<Kernels> {
                if !$detect {
                    return None;
                }
                Some(Kernels {
                    name: $label,
                    $($kernel,)*
                    $($wkernel,)*
                    $($own,)*
                })
            }
        }
    };
}

kernel_set! {
    avx2, __m256, __m256i, "avx2,f16c,fma", "avx2+f16c",
    detect: is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("f16c")
        && is_x86_feature_detected!("fma");
    f16_to_f32(src: &[u16], dst: &mut [f32]);
    bf16_to_f32(src: &[u16], dst: &mut [f32]);
    f32_to_f16(src: &[f32], dst: &mut [u16]);
    f32_to_bf16(src: &[f32], dst: &mut [u16]);
    blend_f16(a: &[u16], b: &[u16], wa: f32, wb: f32, dst: &mut [u16]);
    blend_f32(a: &[f32], b: &[f32], wa: f32, wb: f32, dst: &mut [f32]);
    add_scaled(dst: &mut [f32], delta: &[f32], s: f32);
    fma_acc(acc: &mut [f32], x: &[f32], w: f32);
    round_f16(v: &mut [f32]);
    round_bf16(v: &mut [f32]);
    [words] top_draws(stream: u64, first: u64, out: &mut [u32]);
    [words] draws_below(stream: u64, first: u64, limit: u64, keep: &mut [bool]);
    [own] equal_bits = equal_bits_avx2(v: &[u16], x: u16, bits: &mut [u64]);
    [own] spread_bits = spread_bits_avx2(bits: &[u64], first: usize, out: &mut [bool]);
    [own] bounded_keep = bounded_keep_avx2(x: &crate::kernels::BucketDraws<'_>, keep: &mut [bool], open: &mut [u64], scratch: &mut crate::kernels::KeepScratch);
}

kernel_set! {
    avx512, __m512, __m512i, "avx512f,avx512bw,avx512vl,avx512dq", "avx512",
    detect: is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512dq")
        // For its DELLA kernel's `pdep` (every AVX-512 CPU has it).
        && is_x86_feature_detected!("bmi2");
    f16_to_f32(src: &[u16], dst: &mut [f32]);
    bf16_to_f32(src: &[u16], dst: &mut [f32]);
    f32_to_f16(src: &[f32], dst: &mut [u16]);
    f32_to_bf16(src: &[f32], dst: &mut [u16]);
    blend_f16(a: &[u16], b: &[u16], wa: f32, wb: f32, dst: &mut [u16]);
    blend_f32(a: &[f32], b: &[f32], wa: f32, wb: f32, dst: &mut [f32]);
    add_scaled(dst: &mut [f32], delta: &[f32], s: f32);
    fma_acc(acc: &mut [f32], x: &[f32], w: f32);
    round_f16(v: &mut [f32]);
    round_bf16(v: &mut [f32]);
    [words] top_draws(stream: u64, first: u64, out: &mut [u32]);
    [words] draws_below(stream: u64, first: u64, limit: u64, keep: &mut [bool]);
    [own] equal_bits = equal_bits_avx512(v: &[u16], x: u16, bits: &mut [u64]);
    [own] spread_bits = spread_bits_avx512(bits: &[u64], first: usize, out: &mut [bool]);
    [own] bounded_keep = bounded_keep_avx512(x: &crate::kernels::BucketDraws<'_>, keep: &mut [bool], open: &mut [u64], scratch: &mut crate::kernels::KeepScratch);
}

// ---------------------------------------------------------------- DELLA's bounded draws

/// What the SIMD [`scalar::bounded_keep`]s clamp their gather indices to: the last
/// bucket, and the last entry of each limit table.
#[derive(Clone, Copy)]
struct LastEntries {
    bin: i32,
    lowest: u32,
    highest: u32,
}

impl LastEntries {
    /// None when a table is empty or too large for the gathers' indices (the reference
    /// decides those rows).
    fn of(x: &scalar::BucketDraws<'_>) -> Option<LastEntries> {
        let last = |len: usize| len.checked_sub(1).and_then(|l| u32::try_from(l).ok());
        Some(LastEntries {
            bin: i32::try_from(x.starts.len().checked_sub(2)?).ok()?,
            lowest: last(x.lowest.len())?,
            highest: last(x.highest.len())?,
        })
    }
}

/// [`scalar::bounded_keep`] 64 elements a step: the row's bounds decide most of them in
/// 8-lane compares, and the rest (about 2ε) look up their bucket's bounds one at a time.
/// Gathering every element's bounds (three AVX2 gathers per 4) was slower than the
/// reference.
///
/// # Safety
/// The CPU must have AVX2.
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn bounded_keep_avx2(
    x: &crate::kernels::BucketDraws<'_>,
    keep: &mut [bool],
    open: &mut [u64],
    scratch: &mut crate::kernels::KeepScratch,
) {
    let n = x.len(keep, open);
    let whole = n / 64 * 64;
    // Unsigned compares as signed ones, both sides offset by 2³¹.
    let flip = _mm256_set1_epi32(i32::MIN);
    let offset = |v: u32| _mm256_set1_epi32((v ^ 0x8000_0000) as i32);
    let (row_lo, row_hi) = (offset(x.row as u32), offset((x.row >> 32) as u32));
    for (w, bits) in open[..whole / 64].iter_mut().enumerate() {
        let (mut kept, mut between) = (0u64, 0u64);
        for g in 0..8 {
            let j = w * 64 + g * 8;
            // SAFETY: j + 8 ≤ whole ≤ n elements of draws.
            let d = unsafe { _mm256_loadu_si256(x.draws.as_ptr().add(j).cast()) };
            let d = _mm256_xor_si256(d, flip);
            let mask = |v: __m256i| _mm256_movemask_ps(_mm256_castsi256_ps(v)) as u8;
            let (below, under) = (
                mask(_mm256_cmpgt_epi32(row_lo, d)),
                mask(_mm256_cmpgt_epi32(row_hi, d)),
            );
            kept |= u64::from(below) << (g * 8);
            between |= u64::from(under & !below) << (g * 8);
        }
        let mut undecided = 0u64;
        while between != 0 {
            let i = between.trailing_zeros() as usize;
            between &= between - 1;
            let (d, (lo, hi)) = (x.draws[w * 64 + i], x.bounds(x.bins[w * 64 + i]));
            kept |= u64::from(d < lo) << i;
            undecided |= u64::from(d >= lo && d < hi) << i;
        }
        *bits = undecided;
        // SAFETY: this function's features are spread_bits_avx2's.
        unsafe { spread_bits_avx2(&[kept], 0, &mut keep[w * 64..w * 64 + 64]) };
    }
    let tail = &mut open[whole / 64..];
    scalar::bounded_keep(&x.from(whole), &mut keep[whole..n], tail, scratch);
}

/// [`scalar::bounded_keep`] in three passes over the row's whole words. The row's bounds
/// decide most elements in two compares; the rest (about 2ε, those between the row's
/// bounds) are packed together (`vpcompressd`), then only they gather their bucket's
/// starts and the limits there, 8 at a time, and last their decisions go back to their
/// places (`pdep`). Whole passes, not one word at a time: a gather's indices loaded right
/// after the packing stores that wrote them would wait for those stores.
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL and DQ, and BMI2.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,bmi2,popcnt")]
unsafe fn bounded_keep_avx512(
    x: &crate::kernels::BucketDraws<'_>,
    keep: &mut [bool],
    open: &mut [u64],
    scratch: &mut crate::kernels::KeepScratch,
) {
    let n = x.len(keep, open);
    let Some(last) = LastEntries::of(x) else {
        return scalar::bounded_keep(x, keep, open, scratch);
    };
    let (words, whole) = (n / 64, n / 64 * 64);
    let s = scratch;
    // Room for a last 16-lane store at any packed count, and 16 bytes read at any bit.
    s.draws.resize(whole + 16, 0);
    s.bins.resize(whole + 16, 0);
    s.kept.resize(whole / 8 + 16, 0);
    s.open.resize(whole / 8 + 16, 0);
    s.words.resize(words, 0);

    // The row's decisions; the packed draws and buckets; each word's packed ones in `open`.
    let row_lo = _mm512_set1_epi32(x.row as u32 as i32);
    let row_hi = _mm512_set1_epi32((x.row >> 32) as u32 as i32);
    let last_bin = _mm512_set1_epi32(last.bin);
    let mut packed = 0usize;
    for (w, (row_kept, open)) in s.words.iter_mut().zip(&mut open[..words]).enumerate() {
        let (mut kept, mut between) = (0u64, 0u64);
        for q in 0..4 {
            let j = w * 64 + q * 16;
            // SAFETY: j + 16 ≤ whole ≤ n elements of draws and bins; packed ≤ j, so the
            // 16-lane stores end within whole + 16.
            unsafe {
                let d = _mm512_loadu_si512(x.draws.as_ptr().add(j).cast());
                let below = _mm512_cmplt_epu32_mask(d, row_lo);
                let m = _mm512_mask_cmplt_epu32_mask(!below, d, row_hi);
                let b = _mm512_cvtepu16_epi32(_mm256_loadu_si256(x.bins.as_ptr().add(j).cast()));
                let b = _mm512_min_epu32(b, last_bin);
                let (pd, pb) = (
                    s.draws.as_mut_ptr().add(packed),
                    s.bins.as_mut_ptr().add(packed),
                );
                _mm512_storeu_si512(pd.cast(), _mm512_maskz_compress_epi32(m, d));
                _mm512_storeu_si512(pb.cast(), _mm512_maskz_compress_epi32(m, b));
                packed += m.count_ones() as usize;
                kept |= u64::from(below) << (q * 16);
                between |= u64::from(m) << (q * 16);
            }
        }
        *row_kept = kept;
        *open = between;
    }

    // The packed ones by their bucket's bounds.
    let low = _mm512_set1_epi64(u32::MAX as i64);
    let last_lowest = _mm512_set1_epi64(i64::from(last.lowest));
    let last_highest = _mm512_set1_epi64(i64::from(last.highest));
    for i in (0..packed).step_by(8) {
        let valid = (0xFFu32 >> (8 - (packed - i).min(8))) as __mmask8;
        // SAFETY: i + 8 ≤ whole + 16 entries; only valid lanes gather: at buckets clamped
        // to the last (whose start and end are in `starts`), then at starts clamped to the
        // limit tables' last entries.
        unsafe {
            let b = _mm256_loadu_si256(s.bins.as_ptr().add(i).cast());
            let zero = _mm512_setzero_si512();
            let starts = x.starts.as_ptr().cast();
            let pair = _mm512_mask_i32gather_epi64::<4>(zero, valid, b, starts);
            let at = _mm512_min_epu64(_mm512_and_si512(pair, low), last_lowest);
            let end = _mm512_min_epu64(_mm512_srli_epi64::<32>(pair), last_highest);
            let none = _mm256_setzero_si256();
            let lowest = x.lowest.as_ptr().cast();
            let lo = _mm512_mask_i64gather_epi32::<4>(none, valid, at, lowest);
            let highest = x.highest.as_ptr().cast();
            let hi = _mm512_mask_i64gather_epi32::<4>(none, valid, end, highest);
            let d = _mm256_loadu_si256(s.draws.as_ptr().add(i).cast());
            let k = _mm256_mask_cmplt_epu32_mask(valid, d, lo);
            s.kept[i / 8] = k;
            s.open[i / 8] = _mm256_mask_cmplt_epu32_mask(valid & !k, d, hi);
        }
    }

    // Each word's packed decisions back in place.
    let one = _mm512_set1_epi8(1);
    let mut at = 0usize;
    for (w, (&row_kept, open)) in s.words.iter().zip(&mut open[..words]).enumerate() {
        let between = *open;
        // The packed bits from `at` on (`pdep` takes as many as `between` has).
        let from = |bytes: &[u8]| {
            let mut b = [0u8; 16];
            b.copy_from_slice(&bytes[at / 8..at / 8 + 16]);
            (u128::from_le_bytes(b) >> (at % 8)) as u64
        };
        let kept = row_kept | _pdep_u64(from(&s.kept), between);
        *open = _pdep_u64(from(&s.open), between);
        at += between.count_ones() as usize;
        // SAFETY: 64 elements of keep from w·64 < whole; 0 or 1 bytes are valid bools.
        unsafe {
            let dst = keep.as_mut_ptr().add(w * 64);
            _mm512_storeu_si512(dst.cast(), _mm512_maskz_mov_epi8(kept, one));
        }
    }
    let tail = &mut open[words..];
    scalar::bounded_keep(&x.from(whole), &mut keep[whole..n], tail, s);
}

/// [`scalar::equal_bits`], 32 elements a step: two 16-lane compares packed to bytes
/// (which interleaves their 128-bit halves, put back in order), one bit each.
///
/// # Safety
/// The CPU must have AVX2.
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn equal_bits_avx2(v: &[u16], x: u16, bits: &mut [u64]) {
    let n = v.len().min(bits.len().saturating_mul(64));
    let whole = n / 64 * 64;
    let want = _mm256_set1_epi16(x as i16);
    for (w, word) in bits[..whole / 64].iter_mut().enumerate() {
        let mut m = 0u64;
        for half in 0..2 {
            let j = w * 64 + half * 32;
            // SAFETY: j + 32 ≤ whole ≤ n elements of v.
            let (a, b) = unsafe {
                let p = v.as_ptr().add(j);
                (
                    _mm256_loadu_si256(p.cast()),
                    _mm256_loadu_si256(p.add(16).cast()),
                )
            };
            let (a, b) = (_mm256_cmpeq_epi16(a, want), _mm256_cmpeq_epi16(b, want));
            let bytes = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi16(a, b));
            m |= u64::from(_mm256_movemask_epi8(bytes) as u32) << (half * 32);
        }
        *word = m;
    }
    scalar::equal_bits(&v[whole..n], x, &mut bits[whole / 64..]);
}

/// [`scalar::equal_bits`], 64 elements a step (two 32-lane compares to mask registers).
///
/// # Safety
/// The CPU must have AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn equal_bits_avx512(v: &[u16], x: u16, bits: &mut [u64]) {
    let n = v.len().min(bits.len().saturating_mul(64));
    let whole = n / 64 * 64;
    let want = _mm512_set1_epi16(x as i16);
    for (w, word) in bits[..whole / 64].iter_mut().enumerate() {
        // SAFETY: w·64 + 64 ≤ whole ≤ n elements of v.
        let (a, b) = unsafe {
            let p = v.as_ptr().add(w * 64);
            (
                _mm512_loadu_si512(p.cast()),
                _mm512_loadu_si512(p.add(32).cast()),
            )
        };
        let (a, b) = (
            _mm512_cmpeq_epi16_mask(a, want),
            _mm512_cmpeq_epi16_mask(b, want),
        );
        *word = u64::from(a) | u64::from(b) << 32;
    }
    scalar::equal_bits(&v[whole..n], x, &mut bits[whole / 64..]);
}

/// The 64 bits of `bits` from bit `at` on (bits past the end read as 0).
#[inline(always)]
fn bits_from(bits: &[u64], at: usize) -> u64 {
    let (w, s) = (at / 64, at % 64);
    let lo = bits.get(w).copied().unwrap_or(0) >> s;
    // `<< 64` would overflow: an aligned run takes nothing from the next word.
    let hi = bits
        .get(w + 1)
        .map_or(0, |&h| if s == 0 { 0 } else { h << (64 - s) });
    lo | hi
}

/// [`scalar::spread_bits`], 32 a step: each byte of a 32-bit run goes to its 8 lanes
/// (`vpshufb`), each lane keeps its own bit, and a compare makes it 0 or 1.
///
/// # Safety
/// The CPU must have AVX2.
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn spread_bits_avx2(bits: &[u64], first: usize, out: &mut [bool]) {
    let whole = out.len() / 32 * 32;
    let bytes_of = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, //
        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let one = _mm256_set1_epi8(1);
    for e in (0..whole).step_by(32) {
        let run = bits_from(bits, first + e) as u32;
        let v = _mm256_shuffle_epi8(_mm256_set1_epi32(run as i32), bytes_of);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
        // SAFETY: e + 32 ≤ whole ≤ out.len(); 0 or 1 bytes are valid bools.
        unsafe {
            let dst = out.as_mut_ptr().add(e).cast();
            _mm256_storeu_si256(dst, _mm256_and_si256(set, one));
        }
    }
    scalar::spread_bits(bits, first + whole, &mut out[whole..]);
}

/// [`scalar::spread_bits`], 64 a step: a 64-bit run as a byte mask register, stored as
/// 0 or 1 bytes.
///
/// # Safety
/// The CPU must have AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn spread_bits_avx512(bits: &[u64], first: usize, out: &mut [bool]) {
    let whole = out.len() / 64 * 64;
    let one = _mm512_set1_epi8(1);
    for e in (0..whole).step_by(64) {
        let run = bits_from(bits, first + e);
        // SAFETY: e + 64 ≤ whole ≤ out.len(); 0 or 1 bytes are valid bools.
        unsafe {
            let dst = out.as_mut_ptr().add(e).cast();
            _mm512_storeu_si512(dst, _mm512_maskz_mov_epi8(run, one));
        }
    }
    scalar::spread_bits(bits, first + whole, &mut out[whole..]);
}

// ---------------------------------------------------------------- the masks' random draws

/// `LANES` 64-bit integer lanes, what the masks' SplitMix draws are computed in: AVX2 has no
/// 64-bit multiply, so `__m256i` builds one from three 32-bit ones; AVX-512 DQ has it.
///
/// Same safety contract as [`Vector`]: the caller must ensure the CPU supports the
/// implementing type's instruction set; pointers must have `LANES` elements to write.
trait Words: Copy {
    const LANES: usize;
    unsafe fn splat(x: u64) -> Self;
    /// `first·step, (first + 1)·step, …`, wrapping.
    unsafe fn counters(first: u64, step: u64) -> Self;
    unsafe fn add(self, other: Self) -> Self;
    unsafe fn xor(self, other: Self) -> Self;
    unsafe fn shr<const N: u32>(self) -> Self;
    /// Lane-wise product with `c`, wrapping.
    unsafe fn mul(self, c: u64) -> Self;
    /// Each lane's low 32 bits, to `p`.
    unsafe fn store_low32(self, p: *mut u32);
    /// Whether each lane is below `limit`'s (both below 2⁶³), as bools to `p`.
    unsafe fn store_below(self, limit: Self, p: *mut bool);
}

impl Words for __m256i {
    const LANES: usize = 4;

    #[inline(always)]
    unsafe fn splat(x: u64) -> Self {
        // SAFETY: the caller guarantees AVX2 (trait contract); same for every block below.
        unsafe { _mm256_set1_epi64x(x as i64) }
    }
    #[inline(always)]
    unsafe fn counters(first: u64, step: u64) -> Self {
        let c = |l: u64| first.wrapping_add(l).wrapping_mul(step) as i64;
        // SAFETY: AVX2.
        unsafe { _mm256_setr_epi64x(c(0), c(1), c(2), c(3)) }
    }
    #[inline(always)]
    unsafe fn add(self, other: Self) -> Self {
        // SAFETY: AVX2.
        unsafe { _mm256_add_epi64(self, other) }
    }
    #[inline(always)]
    unsafe fn xor(self, other: Self) -> Self {
        // SAFETY: AVX2.
        unsafe { _mm256_xor_si256(self, other) }
    }
    #[inline(always)]
    unsafe fn shr<const N: u32>(self) -> Self {
        // SAFETY: AVX2; a variable shift by a constant (an immediate needs an i32 literal).
        unsafe { _mm256_srlv_epi64(self, _mm256_set1_epi64x(N as i64)) }
    }
    #[inline(always)]
    unsafe fn mul(self, c: u64) -> Self {
        // x·c mod 2⁶⁴ = lo(x)·lo(c) + (hi(x)·lo(c) + lo(x)·hi(c)) << 32.
        // SAFETY: AVX2.
        unsafe {
            let (lo, hi) = (Self::splat(c & 0xFFFF_FFFF), Self::splat(c >> 32));
            let cross = _mm256_add_epi64(
                _mm256_mul_epu32(_mm256_srli_epi64::<32>(self), lo),
                _mm256_mul_epu32(self, hi),
            );
            _mm256_add_epi64(_mm256_mul_epu32(self, lo), _mm256_slli_epi64::<32>(cross))
        }
    }
    #[inline(always)]
    unsafe fn store_low32(self, p: *mut u32) {
        // SAFETY: AVX2; 4 u32 writable at p (trait contract), unaligned store.
        unsafe {
            let packed =
                _mm256_permutevar8x32_epi32(self, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
            _mm_storeu_si128(p.cast(), _mm256_castsi256_si128(packed))
        }
    }
    #[inline(always)]
    unsafe fn store_below(self, limit: Self, p: *mut bool) {
        // SAFETY: AVX2; 4 bools writable at p (trait contract).
        unsafe {
            let below = _mm256_cmpgt_epi64(limit, self);
            let bits = _mm256_movemask_pd(_mm256_castsi256_pd(below)) as u32;
            // Bit i to byte i (0 or 1, a valid bool).
            let bytes = bits.wrapping_mul(0x0020_4081) & 0x0101_0101;
            p.cast::<u32>().write_unaligned(bytes.to_le())
        }
    }
}

impl Words for __m512i {
    const LANES: usize = 8;

    #[inline(always)]
    unsafe fn splat(x: u64) -> Self {
        // SAFETY: the caller guarantees AVX-512 F/BW/VL/DQ (trait contract); same below.
        unsafe { _mm512_set1_epi64(x as i64) }
    }
    #[inline(always)]
    unsafe fn counters(first: u64, step: u64) -> Self {
        let c = |l: u64| first.wrapping_add(l).wrapping_mul(step) as i64;
        // SAFETY: AVX-512 F.
        unsafe { _mm512_setr_epi64(c(0), c(1), c(2), c(3), c(4), c(5), c(6), c(7)) }
    }
    #[inline(always)]
    unsafe fn add(self, other: Self) -> Self {
        // SAFETY: AVX-512 F.
        unsafe { _mm512_add_epi64(self, other) }
    }
    #[inline(always)]
    unsafe fn xor(self, other: Self) -> Self {
        // SAFETY: AVX-512 F.
        unsafe { _mm512_xor_si512(self, other) }
    }
    #[inline(always)]
    unsafe fn shr<const N: u32>(self) -> Self {
        // SAFETY: AVX-512 F.
        unsafe { _mm512_srli_epi64::<N>(self) }
    }
    #[inline(always)]
    unsafe fn mul(self, c: u64) -> Self {
        // SAFETY: AVX-512 DQ.
        unsafe { _mm512_mullo_epi64(self, Self::splat(c)) }
    }
    #[inline(always)]
    unsafe fn store_low32(self, p: *mut u32) {
        // SAFETY: AVX-512 F; 8 u32 writable at p (trait contract), unaligned store.
        unsafe { _mm256_storeu_si256(p.cast(), _mm512_cvtepi64_epi32(self)) }
    }
    #[inline(always)]
    unsafe fn store_below(self, limit: Self, p: *mut bool) {
        // SAFETY: AVX-512 F/BW/VL; 8 bools writable at p (trait contract).
        unsafe {
            let below = _mm512_cmplt_epu64_mask(self, limit);
            let bytes = _mm_maskz_mov_epi8(u16::from(below), _mm_set1_epi8(1));
            _mm_storel_epi64(p.cast(), bytes)
        }
    }
}

/// The draws kernels over any [`Words`]: whole vectors here, the tail by the reference.
/// `unsafe` only for the trait's CPU requirement.
mod draws {
    use super::{Words, scalar};
    use scalar::{SPLITMIX_MUL, SPLITMIX_STEP};

    /// Calls `each(j, draws)` for the SplitMix outputs of counters `first + j ..` of
    /// `stream`, `LANES` at a time, over the whole vectors of `n`; returns how many it drew.
    #[inline(always)]
    unsafe fn each_vector<W: Words>(
        stream: u64,
        first: u64,
        n: usize,
        mut each: impl FnMut(usize, W),
    ) -> usize {
        let whole = n - n % W::LANES;
        // SAFETY: the caller guarantees W's CPU features (same for every block here).
        unsafe {
            let stream = W::splat(stream);
            // i·STEP advances by adding LANES·STEP (mod 2⁶⁴): one multiply fewer a draw.
            let mut counter = W::counters(first, SPLITMIX_STEP);
            let step = W::splat((W::LANES as u64).wrapping_mul(SPLITMIX_STEP));
            let mut j = 0;
            while j < whole {
                let mut z = stream.xor(counter);
                z = z.xor(z.shr::<30>()).mul(SPLITMIX_MUL[0]);
                z = z.xor(z.shr::<27>()).mul(SPLITMIX_MUL[1]);
                each(j, z.xor(z.shr::<31>()));
                counter = counter.add(step);
                j += W::LANES;
            }
        }
        whole
    }

    #[inline(always)]
    pub unsafe fn top_draws<W: Words>(stream: u64, first: u64, out: &mut [u32]) {
        let p = out.as_mut_ptr();
        // SAFETY: j + LANES <= out.len() for every j handed out; W's features (caller).
        let whole = unsafe {
            each_vector::<W>(stream, first, out.len(), |j, z| {
                z.shr::<33>().store_low32(p.add(j))
            })
        };
        scalar::top_draws(stream, first.wrapping_add(whole as u64), &mut out[whole..]);
    }

    #[inline(always)]
    pub unsafe fn draws_below<W: Words>(stream: u64, first: u64, limit: u64, keep: &mut [bool]) {
        let p = keep.as_mut_ptr();
        // Draws are below 2⁵³; a larger limit keeps all, as 2⁵³ does.
        let lanes_limit = limit.min(1 << 53);
        // SAFETY: j + LANES <= keep.len() for every j handed out; W's features (caller).
        let whole = unsafe {
            let l = W::splat(lanes_limit);
            each_vector::<W>(stream, first, keep.len(), |j, z| {
                z.shr::<11>().store_below(l, p.add(j))
            })
        };
        scalar::draws_below(
            stream,
            first.wrapping_add(whole as u64),
            limit,
            &mut keep[whole..],
        );
    }
}
