//! Eight users' K-sized state side by side: user `l` in lane `l` of every vector.
//!
//! A user's inner loop is a chain of dependent steps, and the short operations between its
//! passes over the rows (softmax, the softmax Jacobian, the optimiser's update and their
//! adjoints) sit on that chain. [`crate::group`] runs eight users together: their rows stay
//! where they are and go through the row kernels user by user (eight independent chains the CPU
//! overlaps), while their weights, gradients and adjoints live here, K vectors of eight lanes,
//! so those short operations run once for all eight, lane by lane, with no horizontal sums.
//! [`Lanes::to_rows`] and [`Lanes::from_rows`] move K values per user between the two layouts.
//!
//! Two vector types: [`Portable`] (eight plain values, any float type) and, on x86-64 CPUs with
//! AVX2 and FMA, eight f32 lanes of one 256-bit register ([`avx2::F32x8`]).

use crate::real::Real;
use crate::simd::binary_methods;

/// Users per group: lanes per vector.
pub const LANES: usize = 8;

/// Eight values of `T`, one per user, and lane-by-lane arithmetic on them.
pub trait Lanes<T: Real>: Copy + Send + Sync + 'static {
    fn splat(x: T) -> Self;
    /// The first eight values of `x`.
    fn load(x: &[T]) -> Self;
    /// Into the first eight values of `x`.
    fn store(self, x: &mut [T]);
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    fn max(self, o: Self) -> Self;
    /// `self · b + c`, with one rounding where the implementation fuses it.
    fn mul_add(self, b: Self, c: Self) -> Self;
    fn sqrt(self) -> Self;
    fn exp(self) -> Self;
    /// `v` in the lanes where `self` is not 0, 0 in the others.
    fn where_nonzero(self, v: Self) -> Self;
    /// `v` in the lanes where `self > 0`, 0 in the others.
    fn where_positive(self, v: Self) -> Self;

    /// `rows[l k + j]` = lane `l` of `src[j]`: eight users' K values, one row per user.
    #[inline(always)]
    fn to_rows(src: &[Self], k: usize, rows: &mut [T]) {
        let mut lane = [T::ZERO; LANES];
        for (j, v) in src[..k].iter().enumerate() {
            v.store(&mut lane);
            for (l, &x) in lane.iter().enumerate() {
                rows[l * k + j] = x;
            }
        }
    }

    /// The inverse of [`Lanes::to_rows`].
    #[inline(always)]
    fn from_rows(rows: &[T], k: usize, out: &mut [Self]) {
        let mut lane = [T::ZERO; LANES];
        for (j, o) in out[..k].iter_mut().enumerate() {
            for (l, x) in lane.iter_mut().enumerate() {
                *x = rows[l * k + j];
            }
            *o = Self::load(&lane);
        }
    }
}

/// Eight plain values: the lane kernels for any float type, without SIMD code of their own.
#[derive(Clone, Copy, Debug)]
pub struct Portable<T>([T; LANES]);

impl<T: Real> Portable<T> {
    #[inline(always)]
    fn map(self, f: impl Fn(T) -> T) -> Self {
        Portable(self.0.map(f))
    }

    #[inline(always)]
    fn zip(self, o: Self, f: impl Fn(T, T) -> T) -> Self {
        let mut out = self.0;
        for (x, &y) in out.iter_mut().zip(&o.0) {
            *x = f(*x, y);
        }
        Portable(out)
    }
}

impl<T: Real> Lanes<T> for Portable<T> {
    #[inline(always)]
    fn splat(x: T) -> Self {
        Portable([x; LANES])
    }
    #[inline(always)]
    fn load(x: &[T]) -> Self {
        let mut v = [T::ZERO; LANES];
        v.copy_from_slice(&x[..LANES]);
        Portable(v)
    }
    #[inline(always)]
    fn store(self, x: &mut [T]) {
        x[..LANES].copy_from_slice(&self.0);
    }
    binary_methods!(Self;
        add => |a, b| a.zip(b, |x, y| x + y),
        sub => |a, b| a.zip(b, |x, y| x - y),
        mul => |a, b| a.zip(b, |x, y| x * y),
        div => |a, b| a.zip(b, |x, y| x / y),
        max => |a, b| a.zip(b, |x, y| if y > x { y } else { x }),
    );
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        self.mul(b).add(c)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        self.map(T::sqrt)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        self.map(T::exp_fast)
    }
    #[inline(always)]
    fn where_nonzero(self, v: Self) -> Self {
        let mut out = v.0;
        for (o, &m) in out.iter_mut().zip(&self.0) {
            if m == T::ZERO {
                *o = T::ZERO;
            }
        }
        Portable(out)
    }
    #[inline(always)]
    fn where_positive(self, v: Self) -> Self {
        let mut out = v.0;
        for (o, &a) in out.iter_mut().zip(&self.0) {
            // NaN counts as not positive.
            if a.partial_cmp(&T::ZERO) != Some(std::cmp::Ordering::Greater) {
                *o = T::ZERO;
            }
        }
        Portable(out)
    }
}

/// `Σ_j a_j b_j` over K vectors, lane by lane, in two interleaved partial sums.
#[inline(always)]
pub fn dot<T: Real, V: Lanes<T>>(a: &[V], b: &[V]) -> V {
    let (mut even, mut odd) = (V::splat(T::ZERO), V::splat(T::ZERO));
    let mut pairs = a.chunks_exact(2).zip(b.chunks_exact(2));
    for (x, y) in &mut pairs {
        even = x[0].mul_add(y[0], even);
        odd = x[1].mul_add(y[1], odd);
    }
    if a.len() % 2 == 1 {
        let last = a.len() - 1;
        even = a[last].mul_add(b[last], even);
    }
    even.add(odd)
}

/// `p = softmax(w)` lane by lane (the maximum subtracted first).
#[inline(always)]
pub fn softmax<T: Real, V: Lanes<T>>(w: &[V], p: &mut [V]) {
    let mut max = w[0];
    for &x in &w[1..] {
        max = max.max(x);
    }
    let mut total = V::splat(T::ZERO);
    for (pj, &x) in p.iter_mut().zip(w) {
        *pj = x.sub(max).exp();
        total = total.add(*pj);
    }
    let inv = V::splat(T::ONE).div(total);
    for pj in p.iter_mut() {
        *pj = pj.mul(inv);
    }
}

/// `out = J v`, `J = diag(p) − p pᵀ`, lane by lane.
#[inline(always)]
pub fn softmax_jvp<T: Real, V: Lanes<T>>(p: &[V], v: &[V], out: &mut [V]) {
    let pv = dot(p, v);
    for ((o, &pj), &vj) in out.iter_mut().zip(p).zip(v) {
        *o = pj.mul(vj.sub(pv));
    }
}

/// Eight f32 lanes of one 256-bit register, on x86-64 CPUs with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    use super::{Lanes, LANES};
    use crate::simd::avx2::exp;
    use crate::simd::binary_methods;

    /// Eight f32 lanes. Every method uses AVX2 and FMA instructions. This module is private
    /// to the crate and only the hand-vectorised row kernels ([`crate::rows::avx2::F32Rows`],
    /// made from a CPU check) name this type, so its methods run only on CPUs with both.
    #[derive(Clone, Copy, Debug)]
    pub struct F32x8(__m256);

    // SAFETY: a plain value of eight f32, like [f32; 8].
    unsafe impl Send for F32x8 {}
    unsafe impl Sync for F32x8 {}

    // SAFETY (every `unsafe` block below): the intrinsics need AVX2 and FMA, which the CPU has
    // whenever an `F32x8` exists (see the type); loads and stores stay inside checked slices.
    impl Lanes<f32> for F32x8 {
        #[inline(always)]
        fn splat(x: f32) -> Self {
            unsafe { F32x8(_mm256_set1_ps(x)) }
        }
        #[inline(always)]
        fn load(x: &[f32]) -> Self {
            let x = &x[..LANES];
            unsafe { F32x8(_mm256_loadu_ps(x.as_ptr())) }
        }
        #[inline(always)]
        fn store(self, x: &mut [f32]) {
            let x = &mut x[..LANES];
            unsafe { _mm256_storeu_ps(x.as_mut_ptr(), self.0) }
        }
        // `max_ps` returns its second operand when either is NaN: NaN in `self` goes on.
        binary_methods!(Self;
            add => |a, b| unsafe { F32x8(_mm256_add_ps(a.0, b.0)) },
            sub => |a, b| unsafe { F32x8(_mm256_sub_ps(a.0, b.0)) },
            mul => |a, b| unsafe { F32x8(_mm256_mul_ps(a.0, b.0)) },
            div => |a, b| unsafe { F32x8(_mm256_div_ps(a.0, b.0)) },
            max => |a, b| unsafe { F32x8(_mm256_max_ps(b.0, a.0)) },
        );
        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            unsafe { F32x8(_mm256_fmadd_ps(self.0, b.0, c.0)) }
        }
        #[inline(always)]
        fn sqrt(self) -> Self {
            unsafe { F32x8(_mm256_sqrt_ps(self.0)) }
        }
        #[inline(always)]
        fn exp(self) -> Self {
            unsafe { F32x8(exp(self.0)) }
        }
        // `v` where `self` compared with 0 holds, 0 elsewhere
        binary_methods!(Self;
            where_nonzero => |a, v| unsafe {
                F32x8(_mm256_and_ps(_mm256_cmp_ps::<_CMP_NEQ_UQ>(a.0, _mm256_setzero_ps()), v.0))
            },
            where_positive => |a, v| unsafe {
                F32x8(_mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(a.0, _mm256_setzero_ps()), v.0))
            },
        );

        /// Eight values at a time through an 8 × 8 transpose when K is a multiple of 8.
        #[inline(always)]
        fn to_rows(src: &[Self], k: usize, rows: &mut [f32]) {
            if !k.is_multiple_of(8) {
                let mut lane = [0.0f32; LANES];
                for (j, v) in src[..k].iter().enumerate() {
                    v.store(&mut lane);
                    for (l, &x) in lane.iter().enumerate() {
                        rows[l * k + j] = x;
                    }
                }
                return;
            }
            let rows = &mut rows[..LANES * k];
            for c in (0..k).step_by(8) {
                let mut block = [unsafe { _mm256_setzero_ps() }; 8];
                for (b, v) in block.iter_mut().zip(&src[c..c + 8]) {
                    *b = v.0;
                }
                let t = unsafe { transpose(block) };
                for (l, v) in t.into_iter().enumerate() {
                    let at = &mut rows[l * k + c..l * k + c + 8];
                    unsafe { _mm256_storeu_ps(at.as_mut_ptr(), v) }
                }
            }
        }

        /// Eight values at a time through an 8 × 8 transpose when K is a multiple of 8.
        #[inline(always)]
        fn from_rows(rows: &[f32], k: usize, out: &mut [Self]) {
            if !k.is_multiple_of(8) {
                let mut lane = [0.0f32; LANES];
                for (j, o) in out[..k].iter_mut().enumerate() {
                    for (l, x) in lane.iter_mut().enumerate() {
                        *x = rows[l * k + j];
                    }
                    *o = Self::load(&lane);
                }
                return;
            }
            let rows = &rows[..LANES * k];
            for c in (0..k).step_by(8) {
                let mut block = [unsafe { _mm256_setzero_ps() }; 8];
                for (l, b) in block.iter_mut().enumerate() {
                    let at = &rows[l * k + c..l * k + c + 8];
                    *b = unsafe { _mm256_loadu_ps(at.as_ptr()) };
                }
                let t = unsafe { transpose(block) };
                for (o, v) in out[c..c + 8].iter_mut().zip(t) {
                    *o = F32x8(v);
                }
            }
        }
    }

    /// The 8 × 8 transpose of eight registers (its own inverse).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn transpose(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }
}
