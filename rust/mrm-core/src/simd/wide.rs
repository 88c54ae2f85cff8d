//! f64 lanes with per-lane masks, for solvers in which each lane is one user on a path of its
//! own (how many Newton steps, which line-search step, which lanes have stopped).
//!
//! [`Wide`] is implemented by `f64` itself (one lane: any CPU) and, on x86-64 CPUs with AVX2 and
//! FMA, by [`avx2::F64x4`] (four users per 256-bit register). Both do the same IEEE operations
//! lane by lane (fused multiply-adds are `f64::mul_add` in the scalar case), so a user gets the
//! same bits whichever runs it and whichever users share its register. The exponential and
//! `ln(1 + y)` below are written once, over the trait.
//!
//! Unlike [`crate::lanes::Lanes`] (eight f32 or f64 users for the SGD/Adam loops, which all take
//! the same path), these lanes carry masks: comparisons, selection and "is any lane still going".

use crate::real::{ATANH_SERIES_F64, EXP_TAYLOR_F64, LN_2_SPLIT_F64, SHIFTER_F64};

/// A computation written once over [`Wide`] lanes, run by [`with_wide`].
pub(crate) trait WithWide {
    type Output;
    fn run<V: Wide>(self) -> Self::Output;
}

/// Runs `job` with the widest lanes this CPU has: [`avx2::F64x4`] (with all of the job's inlined
/// code compiled for AVX2 + FMA), else `f64`. The results are the same bits either way.
#[inline]
pub(crate) fn with_wide<J: WithWide>(job: J) -> J::Output {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2::Cpu::detect().is_some() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run_avx2<J: WithWide>(job: J) -> J::Output {
            job.run::<avx2::F64x4>()
        }
        // SAFETY: the CPU has AVX2 and FMA (just detected).
        return unsafe { run_avx2(job) };
    }
    job.run::<f64>()
}

/// Per-lane booleans.
pub(crate) trait Mask: Copy {
    fn and(self, o: Self) -> Self;
    fn or(self, o: Self) -> Self;
    /// `self` and not `o`.
    fn and_not(self, o: Self) -> Self;
    fn any(self) -> bool;
    /// Lane `l`.
    fn lane(self, l: usize) -> bool;
}

/// `N` f64 lanes and lane-by-lane arithmetic on them.
pub(crate) trait Wide: Copy + Send + Sync + 'static {
    type Mask: Mask;
    /// Lanes per value.
    const N: usize;
    fn splat(x: f64) -> Self;
    /// The first `N` values of `x`.
    fn load(x: &[f64]) -> Self;
    /// Into the first `N` values of `x`.
    fn store(self, x: &mut [f64]);
    /// The lanes of `v` as one slice: value `i`'s lane `l` at `i N + l` (for writing one lane of
    /// many values in place).
    fn flat_mut(v: &mut [Self]) -> &mut [f64];
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    /// `self · b + c`, rounded once.
    fn mul_add(self, b: Self, c: Self) -> Self;
    /// `c − self · b`, rounded once.
    fn neg_mul_add(self, b: Self, c: Self) -> Self;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    fn neg(self) -> Self;
    /// `self` where `self > o`, else `o` (so NaN in `o` goes on).
    fn max(self, o: Self) -> Self;
    fn gt(self, o: Self) -> Self::Mask;
    fn ge(self, o: Self) -> Self::Mask;
    fn le(self, o: Self) -> Self::Mask;
    fn lt(self, o: Self) -> Self::Mask;
    /// Lanes that are neither infinite nor NaN.
    fn finite(self) -> Self::Mask;
    /// `a` where `m`, else `b`.
    fn select(m: Self::Mask, a: Self, b: Self) -> Self;
    /// `2^n` for `t = n + 1.5 · 2^52` (`n` an integer in [-1022, 1023]), from the bits of `t`.
    fn pow2_of_shifted(t: Self) -> Self;
    /// All lanes true.
    fn all_true() -> Self::Mask;
    /// No lane true.
    fn none_true() -> Self::Mask {
        Self::all_true().and_not(Self::all_true())
    }
}

impl Mask for bool {
    binary_methods!(Self;
        and => |a, b| a & b,
        or => |a, b| a | b,
        and_not => |a, b| a & !b,
    );
    #[inline(always)]
    fn any(self) -> bool {
        self
    }
    #[inline(always)]
    fn lane(self, _l: usize) -> bool {
        self
    }
}

impl Wide for f64 {
    type Mask = bool;
    const N: usize = 1;
    #[inline(always)]
    fn splat(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn load(x: &[f64]) -> Self {
        x[0]
    }
    #[inline(always)]
    fn store(self, x: &mut [f64]) {
        x[0] = self;
    }
    #[inline(always)]
    fn flat_mut(v: &mut [Self]) -> &mut [f64] {
        v
    }
    binary_methods!(Self;
        add => |a, b| a + b,
        sub => |a, b| a - b,
        mul => |a, b| a * b,
        div => |a, b| a / b,
        max => |a, b| if a > b { a } else { b },
    );
    binary_methods!(bool;
        gt => |a, b| a > b,
        ge => |a, b| a >= b,
        le => |a, b| a <= b,
        lt => |a, b| a < b,
    );
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        f64::mul_add(self, b, c)
    }
    #[inline(always)]
    fn neg_mul_add(self, b: Self, c: Self) -> Self {
        f64::mul_add(-self, b, c)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f64::abs(self)
    }
    #[inline(always)]
    fn neg(self) -> Self {
        -self
    }
    #[inline(always)]
    fn finite(self) -> bool {
        self.is_finite()
    }
    #[inline(always)]
    fn select(m: bool, a: Self, b: Self) -> Self {
        if m {
            a
        } else {
            b
        }
    }
    #[inline(always)]
    fn pow2_of_shifted(t: Self) -> Self {
        let n = (t.to_bits() as i64).wrapping_sub(0x4338_0000_0000_0000);
        f64::from_bits((n.wrapping_add(1023) as u64) << 52)
    }
    #[inline(always)]
    fn all_true() -> bool {
        true
    }
}

/// `e^x = 2^n e^r`, `n = round(x / ln 2)`, `r = x − n ln 2` (ln 2 in two parts, fused), `e^r` by
/// Horner on its Taylor series to degree 13 ([`EXP_TAYLOR_F64`]). Within 4e-16 of the standard
/// `exp`; NaN stays NaN; saturates below -708 and above 709.
#[inline(always)]
pub(crate) fn exp<V: Wide>(x: V) -> V {
    let (lo, hi) = (V::splat(-708.0), V::splat(709.0));
    // comparisons are false for NaN: it passes through both
    let x = V::select(x.lt(lo), lo, V::select(x.gt(hi), hi, x));
    let shifter = V::splat(SHIFTER_F64);
    let t = x.mul_add(V::splat(std::f64::consts::LOG2_E), shifter);
    let n = t.sub(shifter);
    let r = n.neg_mul_add(V::splat(LN_2_SPLIT_F64.0), x);
    let r = n.neg_mul_add(V::splat(LN_2_SPLIT_F64.1), r);
    let mut poly = V::splat(EXP_TAYLOR_F64[0]);
    for &c in &EXP_TAYLOR_F64[1..] {
        poly = poly.mul_add(r, V::splat(c));
    }
    poly.mul(V::pow2_of_shifted(t))
}

/// `ln(u)` for `u = 1 + y` (`0 ≤ y ≤ 1`) given `u` and `1 / u`: `ln u` of the rounded `u` plus
/// the correction `(y − (u − 1)) / u`; `ln u = e ln 2 + ln m`, `m ∈ [1/√2, √2]`,
/// `ln m = 2 atanh(t)`, `t = (m − 1)/(m + 1)`, `|t| ≤ 0.172`, by its odd series to `t^21`
/// ([`ATANH_SERIES_F64`]).
#[inline(always)]
pub(crate) fn ln_1p<V: Wide>(y: V, u: V, inv_u: V) -> V {
    let one = V::splat(1.0);
    let correction = y.sub(u.sub(one)).mul(inv_u);
    let big = u.gt(V::splat(std::f64::consts::SQRT_2));
    let m = V::select(big, V::splat(0.5).mul(u), u);
    let e = V::select(big, V::splat(std::f64::consts::LN_2), V::splat(0.0));
    let t = m.sub(one).div(m.add(one));
    let t2 = t.mul(t);
    let mut poly = V::splat(ATANH_SERIES_F64[0]);
    for &c in &ATANH_SERIES_F64[1..] {
        poly = poly.mul_add(t2, V::splat(c));
    }
    t.add(t).mul_add(poly, correction).add(e)
}

/// Four f64 lanes of one 256-bit register, on x86-64 CPUs with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::{Mask, Wide};

    /// Four f64 lanes. Every method uses AVX2 and FMA instructions: only code entered through a
    /// function compiled for those features after [`crate::simd::avx2::Cpu::detect`] names
    /// this type (the MAP solver's AVX2 entry), so its methods run only on CPUs with both.
    #[derive(Clone, Copy, Debug)]
    #[repr(transparent)]
    pub(crate) struct F64x4(__m256d);

    /// Four lane masks (all bits set or clear), as AVX comparisons make them.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Mask4(__m256d);

    // SAFETY: plain values of four f64, like [f64; 4].
    unsafe impl Send for F64x4 {}
    unsafe impl Sync for F64x4 {}

    // SAFETY (every `unsafe` block below): the intrinsics need AVX2 and FMA, which the CPU has
    // whenever an `F64x4` is in use (see the type); loads and stores stay inside checked slices.
    impl Mask for Mask4 {
        binary_methods!(Self;
            and => |a, b| unsafe { Mask4(_mm256_and_pd(a.0, b.0)) },
            or => |a, b| unsafe { Mask4(_mm256_or_pd(a.0, b.0)) },
            and_not => |a, b| unsafe { Mask4(_mm256_andnot_pd(b.0, a.0)) },
        );
        #[inline(always)]
        fn any(self) -> bool {
            unsafe { _mm256_movemask_pd(self.0) != 0 }
        }
        #[inline(always)]
        fn lane(self, l: usize) -> bool {
            unsafe { (_mm256_movemask_pd(self.0) >> l) & 1 == 1 }
        }
    }

    impl Wide for F64x4 {
        type Mask = Mask4;
        const N: usize = 4;
        #[inline(always)]
        fn splat(x: f64) -> Self {
            unsafe { F64x4(_mm256_set1_pd(x)) }
        }
        #[inline(always)]
        fn load(x: &[f64]) -> Self {
            let x = &x[..4];
            unsafe { F64x4(_mm256_loadu_pd(x.as_ptr())) }
        }
        #[inline(always)]
        fn store(self, x: &mut [f64]) {
            let x = &mut x[..4];
            unsafe { _mm256_storeu_pd(x.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn flat_mut(v: &mut [Self]) -> &mut [f64] {
            // SAFETY: an `F64x4` is one `__m256d` (`repr(transparent)`): four f64, no padding,
            // aligned to 32 (so to 8); the slice covers the same bytes, borrowed as `v` is.
            unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<f64>(), v.len() * 4) }
        }
        // `max_pd(a, b)` is `a > b ? a : b`, as the scalar `max`
        binary_methods!(Self;
            add => |a, b| unsafe { F64x4(_mm256_add_pd(a.0, b.0)) },
            sub => |a, b| unsafe { F64x4(_mm256_sub_pd(a.0, b.0)) },
            mul => |a, b| unsafe { F64x4(_mm256_mul_pd(a.0, b.0)) },
            div => |a, b| unsafe { F64x4(_mm256_div_pd(a.0, b.0)) },
            max => |a, b| unsafe { F64x4(_mm256_max_pd(a.0, b.0)) },
        );
        binary_methods!(Mask4;
            gt => |a, b| unsafe { Mask4(_mm256_cmp_pd::<_CMP_GT_OQ>(a.0, b.0)) },
            ge => |a, b| unsafe { Mask4(_mm256_cmp_pd::<_CMP_GE_OQ>(a.0, b.0)) },
            le => |a, b| unsafe { Mask4(_mm256_cmp_pd::<_CMP_LE_OQ>(a.0, b.0)) },
            lt => |a, b| unsafe { Mask4(_mm256_cmp_pd::<_CMP_LT_OQ>(a.0, b.0)) },
        );
        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            unsafe { F64x4(_mm256_fmadd_pd(self.0, b.0, c.0)) }
        }
        #[inline(always)]
        fn neg_mul_add(self, b: Self, c: Self) -> Self {
            unsafe { F64x4(_mm256_fnmadd_pd(self.0, b.0, c.0)) }
        }
        #[inline(always)]
        fn sqrt(self) -> Self {
            unsafe { F64x4(_mm256_sqrt_pd(self.0)) }
        }
        #[inline(always)]
        fn abs(self) -> Self {
            unsafe { F64x4(_mm256_andnot_pd(_mm256_set1_pd(-0.0), self.0)) }
        }
        #[inline(always)]
        fn neg(self) -> Self {
            unsafe { F64x4(_mm256_xor_pd(_mm256_set1_pd(-0.0), self.0)) }
        }
        #[inline(always)]
        fn finite(self) -> Mask4 {
            // x − x is 0 for finite x and NaN for ±∞ and NaN
            unsafe {
                Mask4(_mm256_cmp_pd::<_CMP_EQ_OQ>(
                    _mm256_sub_pd(self.0, self.0),
                    _mm256_setzero_pd(),
                ))
            }
        }
        #[inline(always)]
        fn select(m: Mask4, a: Self, b: Self) -> Self {
            unsafe { F64x4(_mm256_blendv_pd(b.0, a.0, m.0)) }
        }
        #[inline(always)]
        fn pow2_of_shifted(t: Self) -> Self {
            unsafe {
                let bits = _mm256_sub_epi64(_mm256_castpd_si256(t.0), _mm256_set1_epi64x(0x4338_0000_0000_0000));
                let bits = _mm256_add_epi64(bits, _mm256_set1_epi64x(1023));
                F64x4(_mm256_castsi256_pd(_mm256_slli_epi64::<52>(bits)))
            }
        }
        #[inline(always)]
        fn all_true() -> Mask4 {
            unsafe { Mask4(_mm256_castsi256_pd(_mm256_set1_epi64x(-1))) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_ln_1p_match_std() {
        crate::real::tests::assert_exp_f64(exp);
        crate::real::tests::assert_ln_1p_f64(|y| ln_1p(y, 1.0 + y, 1.0 / (1.0 + y)));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn four_lanes_give_the_scalar_bits() {
        use super::avx2::F64x4;
        if crate::simd::avx2::Cpu::detect().is_none() {
            return;
        }
        // SAFETY: the CPU has AVX2 and FMA (just checked).
        unsafe { lanes_match() };
        #[target_feature(enable = "avx2,fma")]
        unsafe fn lanes_match() {
            let xs = [
                -745.0,
                -3.7,
                -0.0,
                0.3,
                1e-300,
                2.5,
                40.0,
                800.0,
                f64::NAN,
                f64::INFINITY,
            ];
            for w in xs.windows(4) {
                let v = F64x4::load(w);
                let mut out = [0.0; 4];
                exp(v).store(&mut out);
                let y = exp(v.abs().neg());
                let u = y.add(F64x4::splat(1.0));
                let mut ln = [0.0; 4];
                ln_1p(y, u, F64x4::splat(1.0).div(u)).store(&mut ln);
                let gt = v.gt(F64x4::splat(0.0));
                let fin = v.finite();
                for l in 0..4 {
                    let x = w[l];
                    assert_eq!(out[l].to_bits(), exp(x).to_bits(), "exp({x})");
                    let y = exp(-x.abs());
                    assert_eq!(
                        ln[l].to_bits(),
                        ln_1p(y, 1.0 + y, 1.0 / (1.0 + y)).to_bits(),
                        "ln_1p at {x}"
                    );
                    assert_eq!(gt.lane(l), x > 0.0);
                    assert_eq!(fin.lane(l), x.is_finite());
                }
            }
        }
    }
}
