//! The floating-point types the kernels run on (f32 and f64): scalar maths (fast `exp` and
//! `ln_1p`, dot, softmax and its Jacobian) and finiteness.

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// A float the kernels are generic over. Implemented for `f32` and `f64`.
pub trait Real:
    Copy
    + Send
    + Sync
    + Debug
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    /// Conversion from f64 (rounds to nearest for f32).
    fn of(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    /// `e^x` by range reduction and a Taylor polynomial: no call and no branch, so loops over
    /// it vectorise. Within a few ulp of `exp` for arguments whose result is a normal number;
    /// the argument is clamped to that range (results below the smallest normal come out as
    /// about that number instead of smaller; inputs are finite here).
    fn exp_fast(self) -> Self;
    /// `ln(1 + x)` for `0 ≤ x ≤ 1` by range reduction and the series of `atanh`: no call and no
    /// branch, so loops over it vectorise. Within a few ulp of the standard `ln_1p` on that range.
    fn ln_1p_fast(self) -> Self;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    fn is_finite(self) -> bool;
}

macro_rules! impl_real {
    ($t:ty, $exp_fast:ident, $ln_1p_fast:ident) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn of(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn exp_fast(self) -> Self {
                $exp_fast(self)
            }
            #[inline(always)]
            fn ln_1p_fast(self) -> Self {
                $ln_1p_fast(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
        }
    };
}

impl_real!(f32, exp_poly_f32, ln_1p_poly_f32);
impl_real!(f64, exp_poly_f64, ln_1p_poly_f64);

/// `x` limited to `[lo, hi]`; NaN stays NaN (unlike `max`/`min`, which would turn it into a
/// bound), so a NaN input gives a NaN result and is caught by the output checks.
#[inline(always)]
fn clamp_keeping_nan<F: PartialOrd>(x: F, lo: F, hi: F) -> F {
    if x < lo {
        lo
    } else if x > hi {
        hi
    } else {
        x
    }
}

/// `e^x = 2^n e^r`, `n = round(x / ln 2)`, `|r| ≤ ln 2 / 2`; `e^r` by Horner on its Taylor
/// series (degree 7: truncation error below 6e-9 relative, under half an f32 ulp).
#[inline(always)]
#[allow(clippy::excessive_precision)] // the split of ln 2 is exact in f32 as written
fn exp_poly_f32(x: f32) -> f32 {
    const SHIFTER: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer in the low bits
    let x = clamp_keeping_nan(x, -87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = t - SHIFTER;
    let r = (x - n * 0.693_359_375) - n * -2.121_944_4e-4;
    let mut poly = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        poly = poly * r + c;
    }
    let exponent = (t.to_bits() as i32).wrapping_sub(0x4B40_0000); // n, from the low mantissa bits
    poly * f32::from_bits(((exponent + 127) as u32) << 23)
}

/// `1/k!` for k = 13 down to 0: the Taylor series of `e^r` to degree 13, highest first, for
/// Horner's scheme (truncation error below 5e-18 relative for `|r| ≤ ln 2 / 2`).
pub(crate) const EXP_TAYLOR_F64: [f64; 14] = [
    1.0 / 6_227_020_800.0,
    1.0 / 479_001_600.0,
    1.0 / 39_916_800.0,
    1.0 / 3_628_800.0,
    1.0 / 362_880.0,
    1.0 / 40_320.0,
    1.0 / 5_040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// `ln 2` in two parts, the first with its low bits clear (so `n · LN_2_HI` is exact for the `n`
/// of an f64 range reduction), the second the rest.
#[allow(clippy::excessive_precision)] // written to full precision
pub(crate) const LN_2_SPLIT_F64: (f64, f64) = (6.931_471_803_691_238_2e-1, 1.908_214_929_270_587_7e-10);

/// `1.5 · 2^52`: adding it to an f64 of magnitude below 2^51 rounds it to an integer held in
/// the low mantissa bits.
pub(crate) const SHIFTER_F64: f64 = 6_755_399_441_055_744.0;

/// `1/(2j + 1)` for j = 10 down to 0: the odd series of `atanh(t)/t` in `t²`, highest first
/// (to `t^21`: below 7e-19 relative for `|t| ≤ 0.172`).
pub(crate) const ATANH_SERIES_F64: [f64; 11] = [
    1.0 / 21.0,
    1.0 / 19.0,
    1.0 / 17.0,
    1.0 / 15.0,
    1.0 / 13.0,
    1.0 / 11.0,
    1.0 / 9.0,
    1.0 / 7.0,
    1.0 / 5.0,
    1.0 / 3.0,
    1.0,
];

/// As [`exp_poly_f32`] with degree 13 ([`EXP_TAYLOR_F64`]).
#[inline(always)]
fn exp_poly_f64(x: f64) -> f64 {
    let x = clamp_keeping_nan(x, -708.0, 709.0);
    let t = x * std::f64::consts::LOG2_E + SHIFTER_F64;
    let n = t - SHIFTER_F64;
    let r = (x - n * LN_2_SPLIT_F64.0) - n * LN_2_SPLIT_F64.1;
    let mut poly = EXP_TAYLOR_F64[0];
    for c in &EXP_TAYLOR_F64[1..] {
        poly = poly * r + c;
    }
    let exponent = (t.to_bits() as i64).wrapping_sub(0x4338_0000_0000_0000);
    poly * f64::from_bits(((exponent + 1023) as u64) << 52)
}

/// `ln(1 + y)` for `0 ≤ y ≤ 1`: `u = 1 + y` rounded, plus the correction `(y − (u − 1)) / u`
/// for that rounding; `ln u = e ln 2 + ln m` with `m = u` or `u / 2` in `[1/√2, √2]`, and
/// `ln m = 2 atanh(t)`, `t = (m − 1)/(m + 1)`, `|t| ≤ 0.172`, by its odd series.
macro_rules! ln_1p_poly {
    ($name:ident, $t:ty, $sqrt2:expr, $ln2:expr, $series:expr) => {
        #[inline(always)]
        fn $name(y: $t) -> $t {
            let u = 1.0 + y;
            let correction = (y - (u - 1.0)) / u;
            let big = u > $sqrt2;
            let m = if big { 0.5 * u } else { u };
            let e = if big { $ln2 } else { 0.0 };
            let t = (m - 1.0) / (m + 1.0);
            let t2 = t * t;
            let mut poly: $t = 0.0;
            for c in $series {
                poly = poly * t2 + c;
            }
            e + (2.0 * t * poly + correction)
        }
    };
}

// Series to t^9 for f32 (first term left out < 2e-9 relative), to t^21 for f64 (< 7e-19).
ln_1p_poly!(
    ln_1p_poly_f32,
    f32,
    std::f32::consts::SQRT_2,
    std::f32::consts::LN_2,
    [1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0]
);
ln_1p_poly!(
    ln_1p_poly_f64,
    f64,
    std::f64::consts::SQRT_2,
    std::f64::consts::LN_2,
    ATANH_SERIES_F64
);

/// Whether every value is finite, in a loop without an early exit (so that it vectorises).
#[inline(always)]
pub fn all_finite<T: Real>(values: &[T]) -> bool {
    values.iter().fold(true, |ok, x| ok & x.is_finite())
}

#[inline(always)]
pub fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = T::ZERO;
    for (x, y) in a.iter().zip(b) {
        acc += *x * *y;
    }
    acc
}

/// Numerically stable softmax of `w` into `p`.
#[inline]
pub fn softmax_into<T: Real>(w: &[T], p: &mut [T]) {
    let mut max = w[0];
    for &x in &w[1..] {
        if x > max {
            max = x;
        }
    }
    // Exponentials first and the sum after, so that the exponential loop vectorises.
    for (pi, &x) in p.iter_mut().zip(w) {
        *pi = (x - max).exp_fast();
    }
    let mut total = T::ZERO;
    for &pi in p.iter() {
        total += pi;
    }
    let inv = T::ONE / total;
    for pi in p.iter_mut() {
        *pi *= inv;
    }
}

/// `out = J v` with `J = diag(p) − p pᵀ` (the softmax Jacobian, symmetric).
#[inline]
pub fn softmax_jvp<T: Real>(p: &[T], v: &[T], out: &mut [T]) {
    let pv = dot(p, v);
    for ((o, &pi), &vi) in out.iter_mut().zip(p).zip(v) {
        *o = pi * (vi - pv);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `exp` (an f64 implementation) within 4e-16 of the standard one on [-700, 700].
    pub(crate) fn assert_exp_f64(exp: impl Fn(f64) -> f64) {
        let mut x = -700.0f64;
        while x < 700.0 {
            let (want, got) = (x.exp(), exp(x));
            assert!(((got - want) / want).abs() < 4e-16, "f64 x = {x}: {got} vs {want}");
            x += 0.0137;
        }
        assert!(exp(1000.0).is_finite() && exp(-1000.0) < 1e-300 && exp(f64::NAN).is_nan());
    }

    /// `ln_1p` (an f64 implementation) within 1e-15 relative of the standard one on [0, 1].
    pub(crate) fn assert_ln_1p_f64(ln_1p: impl Fn(f64) -> f64) {
        for y in ln_1p_points() {
            let (want, got) = (y.ln_1p(), ln_1p(y));
            assert!((got - want).abs() <= 1e-15 * want, "f64 y = {y}: {got} vs {want}");
        }
    }

    fn ln_1p_points() -> Vec<f64> {
        let mut ys: Vec<f64> = (0..=20_000).map(|i| i as f64 / 20_000.0).collect();
        ys.extend((1..300).map(|e| 10f64.powi(-e)));
        ys
    }

    #[test]
    fn exp_fast_matches_exp() {
        assert_exp_f64(f64::exp_fast);
        let mut x = -86.0f32;
        while x < 88.0 {
            let (want, got) = ((x as f64).exp(), x.exp_fast() as f64);
            assert!(((got - want) / want).abs() < 3e-7, "f32 x = {x}: {got} vs {want}");
            x += 0.0071;
        }
        assert!(1000.0f32.exp_fast().is_finite() && (-1000.0f32).exp_fast() < 1e-37);
        assert!(f64::NAN.exp_fast().is_nan() && f32::NAN.exp_fast().is_nan());
        let mut p = [0.0f64; 3];
        softmax_into(&[0.0, f64::NAN, 1.0], &mut p);
        assert!(
            p.iter().any(|x| x.is_nan()),
            "a NaN logit must not give a finite softmax: {p:?}"
        );
    }

    #[test]
    fn ln_1p_fast_matches_ln_1p() {
        assert_ln_1p_f64(f64::ln_1p_fast);
        for y in ln_1p_points() {
            let y32 = y as f32;
            if y32 > 0.0 || y == 0.0 {
                let (want, got) = ((y32 as f64).ln_1p(), y32.ln_1p_fast() as f64);
                assert!((got - want).abs() <= 5e-7 * want, "f32 y = {y32}: {got} vs {want}");
            }
        }
    }
}
