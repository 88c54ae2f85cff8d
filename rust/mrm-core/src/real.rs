//! The floating-point types the kernels run on (f32 and f64).

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
    fn ln_1p(self) -> Self;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    fn is_finite(self) -> bool;
}

macro_rules! impl_real {
    ($t:ty) => {
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
            fn ln_1p(self) -> Self {
                <$t>::ln_1p(self)
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

impl_real!(f32);
impl_real!(f64);

/// `σ(x) = 1 / (1 + e^{-x})`, finite for every finite or infinite `x`.
#[inline(always)]
pub fn sigmoid<T: Real>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

/// `softplus(x) = log(1 + e^x)`, computed without overflow.
#[inline(always)]
pub fn softplus<T: Real>(x: T) -> T {
    let pos = if x > T::ZERO { x } else { T::ZERO };
    pos + (-x.abs()).exp().ln_1p()
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
    let mut total = T::ZERO;
    for (pi, &x) in p.iter_mut().zip(w) {
        *pi = (x - max).exp();
        total += *pi;
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
