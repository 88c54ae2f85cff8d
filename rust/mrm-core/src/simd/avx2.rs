//! AVX2 + FMA building blocks on x86-64: the proof that the CPU has both features, and the
//! 256-bit exponential, sigmoid, softplus and lane shuffles that the hand-vectorised row
//! kernels ([`crate::rows::avx2`]) and lane vectors ([`crate::lanes::avx2`]) share.

use std::arch::x86_64::*;

/// Proof that the CPU has AVX2 and FMA: only [`Cpu::detect`] makes one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cpu(());

impl Cpu {
    /// `Some` when this CPU has AVX2 and FMA (checked once, then cached by std).
    #[inline]
    pub(crate) fn detect() -> Option<Cpu> {
        (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")).then_some(Cpu(()))
    }
}

/// `f` of all eight lanes of `v` in every lane, for an associative and commutative `f`.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn across_lanes(v: __m256, f: unsafe fn(__m256, __m256) -> __m256) -> __m256 {
    // SAFETY: `f` is an AVX intrinsic (max or add) and the CPU has the features.
    unsafe {
        let v = f(v, _mm256_permute2f128_ps::<1>(v, v));
        let v = f(v, _mm256_permute_ps::<0b01_00_11_10>(v));
        f(v, _mm256_permute_ps::<0b10_11_00_01>(v))
    }
}

/// `e^x` in each lane: `exp_fast`'s range reduction and polynomial for f32, with fused
/// multiply-adds and the polynomial evaluated by Estrin's scheme (so it rounds a little
/// differently); NaN stays NaN.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn exp(x: __m256) -> __m256 {
    // max/min return their second operand when either is NaN: a NaN `x` passes through.
    let x = _mm256_min_ps(_mm256_set1_ps(88.0), _mm256_max_ps(_mm256_set1_ps(-87.0), x));
    let shifter = _mm256_set1_ps(12_582_912.0);
    let t = _mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), shifter);
    let n = _mm256_sub_ps(t, shifter);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.121_944_4e-4), r);
    // The degree-7 Taylor polynomial by Estrin's scheme: pairs, then pairs of pairs, so the
    // longest chain is three multiply-adds after r² (Horner's is seven).
    let c = |x: f32| _mm256_set1_ps(x);
    let r2 = _mm256_mul_ps(r, r);
    let q01 = _mm256_fmadd_ps(r, c(1.0), c(1.0));
    let q23 = _mm256_fmadd_ps(r, c(1.0 / 6.0), c(0.5));
    let q45 = _mm256_fmadd_ps(r, c(1.0 / 120.0), c(1.0 / 24.0));
    let q67 = _mm256_fmadd_ps(r, c(1.0 / 5040.0), c(1.0 / 720.0));
    let r4 = _mm256_mul_ps(r2, r2);
    let low = _mm256_fmadd_ps(q23, r2, q01);
    let high = _mm256_fmadd_ps(q67, r2, q45);
    let poly = _mm256_fmadd_ps(high, r4, low);
    // 2^n from the low mantissa bits of `t`, as in `exp_fast`.
    let bits = _mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127 - 0x4B40_0000));
    _mm256_mul_ps(poly, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(bits)))
}

/// `1 / (1 + e^z)` in each lane.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn neg_sigmoid(z: __m256) -> __m256 {
    let one = _mm256_set1_ps(1.0);
    _mm256_div_ps(one, _mm256_add_ps(one, exp(z)))
}

/// `max(−z, 0) + ln(1 + e^{−|z|})` in each lane; `ln(1 + y)` for `0 < y ≤ 1` as
/// `ln_1p_fast` for f32 (same reduction and series) with fused multiply-adds.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn neg_softplus(z: __m256) -> __m256 {
    let (zero, one, half) = (_mm256_setzero_ps(), _mm256_set1_ps(1.0), _mm256_set1_ps(0.5));
    let minus_abs = _mm256_min_ps(z, _mm256_sub_ps(zero, z));
    let y = exp(minus_abs);
    let u = _mm256_add_ps(one, y);
    let correction = _mm256_div_ps(_mm256_sub_ps(y, _mm256_sub_ps(u, one)), u);
    let big = _mm256_cmp_ps::<_CMP_GT_OQ>(u, _mm256_set1_ps(std::f32::consts::SQRT_2));
    let m = _mm256_blendv_ps(u, _mm256_mul_ps(half, u), big);
    let e = _mm256_and_ps(big, _mm256_set1_ps(std::f32::consts::LN_2));
    let t = _mm256_div_ps(_mm256_sub_ps(m, one), _mm256_add_ps(m, one));
    let t2 = _mm256_mul_ps(t, t);
    let mut poly = _mm256_set1_ps(1.0 / 9.0);
    for c in [1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0] {
        poly = _mm256_fmadd_ps(poly, t2, _mm256_set1_ps(c));
    }
    let ln = _mm256_add_ps(e, _mm256_fmadd_ps(_mm256_add_ps(t, t), poly, correction));
    _mm256_add_ps(_mm256_max_ps(_mm256_sub_ps(zero, z), zero), ln)
}

/// `z_i ← f(z_i)`, eight at a time; the last few through a padded register.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn map_lanes(z: &mut [f32], f: unsafe fn(__m256) -> __m256) {
    let mut chunks = z.chunks_exact_mut(8);
    for c in &mut chunks {
        _mm256_storeu_ps(c.as_mut_ptr(), f(_mm256_loadu_ps(c.as_ptr())));
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let mut pad = [0.0f32; 8];
        pad[..rest.len()].copy_from_slice(rest);
        _mm256_storeu_ps(pad.as_mut_ptr(), f(_mm256_loadu_ps(pad.as_ptr())));
        rest.copy_from_slice(&pad[..rest.len()]);
    }
}
