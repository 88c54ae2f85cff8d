//! The row kernels of a user's inner loop, over that user's K-wide rows: margins
//! `z_i = d_i · p`, weighted row sums `Σ_i x_i d_i`, the row writers of the adjoint and the
//! element-wise sigmoid and softplus of the margins.
//!
//! Two implementations:
//! - [`Portable`]: plain loops for any float type and any K (with a compile-time K for the
//!   common widths);
//! - [`avx2::F32Rows`] (x86-64 CPUs with AVX2 and FMA): f32 rows of K = 8, 16, 32 or 64 values
//!   held in 1 to 8 256-bit registers: eight margins come out of the lane products and one
//!   transposing horizontal add, and the row sums are fused multiply-adds into four
//!   accumulator sets.
//!
//! Which one runs for a block of users is chosen in [`crate::dispatch`]. The hand-vectorised
//! kernels sum in another order than the portable ones, so f32 results with K = 8, 16, 32 or
//! 64 on CPUs with and without AVX2 agree to rounding, not to the bit.

use crate::real::{all_finite, dot, Real};

/// The recorded steps that [`RowOps::rank2_sums`] sums: at step `t`, row `i`'s scalars
/// `s_{t,i} = s[t · stride + i]` (`c` alike), and the K values `μ_t`, `p_t` at `t · row_stride`
/// of `mu`, `p`.
#[derive(Clone, Copy, Debug)]
pub struct Rank2Terms<'a, T> {
    pub s: &'a [T],
    pub c: &'a [T],
    pub stride: usize,
    pub mu: &'a [T],
    pub p: &'a [T],
    pub row_stride: usize,
}

impl<T> Rank2Terms<'_, T> {
    /// The terms of the rows after the first `rows`.
    #[inline(always)]
    pub fn skip_rows(self, rows: usize) -> Self {
        Rank2Terms {
            s: &self.s[rows..],
            c: &self.c[rows..],
            ..self
        }
    }
}

/// The row kernels. `k` is the row width; an implementation may know it at compile time.
pub trait RowOps<T: Real>: Copy {
    /// The lane vectors that go with these kernels (see `crate::lanes`).
    type Lanes: crate::lanes::Lanes<T>;
    /// The row width: `k`, or the compile-time width when there is one.
    fn width(self, k: usize) -> usize;
    /// `z_i = d_i · p` for every row into `z`, which holds one value per row.
    fn margins_into(self, rows: &[T], k: usize, p: &[T], z: &mut [T]);
    /// [`RowOps::margins_into`] into `z` resized to the row count.
    #[inline(always)]
    fn margins(self, rows: &[T], k: usize, p: &[T], z: &mut Vec<T>) {
        let n = rows.len() / self.width(k);
        if z.len() != n {
            z.resize(n, T::ZERO);
        }
        self.margins_into(rows, k, p, z);
    }
    /// `out = Σ_i x_i d_i` over the rows (`x` has one value per row).
    fn weighted_row_sums(self, rows: &[T], k: usize, x: &[T], out: &mut [T]);
    /// Whether [`RowOps::outer`], [`RowOps::rank2_sums`] and [`RowOps::zero_rows`] write
    /// with non-temporal stores when asked (`stream`: stores that do not read the memory
    /// first and do not keep it in cache; see `crate::simd::stream`), so that they may write a
    /// large gradient straight into its output; when not, the caller builds rows in scratch
    /// and streams them out.
    const STREAMS: bool = false;

    /// `out_i = (a s_i) p` for every row `out_i` of `out` (one `s_i` per row). Returns whether
    /// every value written is finite.
    #[inline(always)]
    fn outer(self, out: &mut [T], k: usize, a: T, s: &[T], p: &[T], stream: bool) -> bool {
        let _ = stream;
        let k = self.width(k);
        let p = &p[..k];
        for (row, &si) in out.chunks_exact_mut(k).zip(s) {
            let scaled = a * si;
            for (o, &pj) in row.iter_mut().zip(p) {
                *o = scaled * pj;
            }
        }
        all_finite(out)
    }

    /// Zeroes `out`.
    #[inline(always)]
    fn zero_rows(self, out: &mut [T], stream: bool) {
        let _ = stream;
        out.fill(T::ZERO);
    }

    /// `out_i = Σ_t (c_{t,i} p_t − s_{t,i} μ_t)` for every row `out_i` of `out`, summed from
    /// the last step `t = steps − 1` down to 0 (the [`Rank2Terms`]). Returns whether every
    /// value written is finite.
    #[inline(always)]
    fn rank2_sums(self, out: &mut [T], k: usize, steps: usize, terms: Rank2Terms<'_, T>, stream: bool) -> bool {
        let _ = stream;
        let k = self.width(k);
        let n = out.len() / k;
        out.fill(T::ZERO);
        let Rank2Terms {
            s,
            c,
            stride,
            mu,
            p,
            row_stride,
        } = terms;
        for t in (0..steps).rev() {
            let (s, c) = (&s[t * stride..t * stride + n], &c[t * stride..t * stride + n]);
            let (mu, p) = (
                &mu[t * row_stride..t * row_stride + k],
                &p[t * row_stride..t * row_stride + k],
            );
            for ((row, &si), &ci) in out.chunks_exact_mut(k).zip(s).zip(c) {
                for ((o, &mj), &pj) in row.iter_mut().zip(mu).zip(p) {
                    *o -= si * mj - ci * pj;
                }
            }
        }
        all_finite(out)
    }

    /// `out_i −= (a s_i) μ − (a c_i) p` for every row `out_i` of `out` (one `s_i`, `c_i` per
    /// row): one step of [`RowOps::rank2_sums`], for the one-user reference.
    #[cfg(test)]
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn sub_rank2(self, out: &mut [T], k: usize, a: T, s: &[T], mu: &[T], c: &[T], p: &[T]) {
        let k = self.width(k);
        let (mu, p) = (&mu[..k], &p[..k]);
        for ((row, &si), &ci) in out.chunks_exact_mut(k).zip(s).zip(c) {
            let (s_scaled, c_scaled) = (a * si, a * ci);
            for ((o, &mj), &pj) in row.iter_mut().zip(mu).zip(p) {
                *o -= s_scaled * mj - c_scaled * pj;
            }
        }
    }
    /// `z_i ← softplus(−z_i) = max(−z_i, 0) + ln(1 + e^{−|z_i|})` for every value.
    #[inline(always)]
    fn neg_softplus(self, z: &mut [T]) {
        for x in z.iter_mut() {
            let pos = if *x < T::ZERO { -*x } else { T::ZERO };
            *x = pos + (-x.abs()).exp_fast().ln_1p_fast();
        }
    }

    /// `z_i ← σ(−z_i) = 1 / (1 + e^{z_i})` for every value.
    #[inline(always)]
    fn neg_sigmoids(self, z: &mut [T]) {
        for x in z.iter_mut() {
            *x = T::ONE / (T::ONE + x.exp_fast());
        }
    }
}

/// Plain loops for any float type. `W` is the row width when known at compile time (the loops
/// then keep their K-wide accumulators in registers and unroll), else 0 (K read at run time).
#[derive(Clone, Copy, Debug, Default)]
pub struct Portable<const W: usize>;

impl<T: Real, const W: usize> RowOps<T> for Portable<W> {
    type Lanes = crate::lanes::Portable<T>;

    #[inline(always)]
    fn width(self, k: usize) -> usize {
        if W == 0 {
            k
        } else {
            W
        }
    }

    #[inline(always)]
    fn margins_into(self, rows: &[T], k: usize, p: &[T], z: &mut [T]) {
        let k = RowOps::<T>::width(self, k);
        let p = &p[..k];
        assert_eq!(z.len(), rows.len() / k);
        for (zi, d) in z.iter_mut().zip(rows.chunks_exact(k)) {
            *zi = dot(d, p);
        }
    }

    #[inline(always)]
    fn weighted_row_sums(self, rows: &[T], k: usize, x: &[T], out: &mut [T]) {
        let k = RowOps::<T>::width(self, k);
        // With a compile-time width the sums live in a local array (registers), else in `out`.
        let mut local = [T::ZERO; 16];
        let out = &mut out[..k];
        let acc: &mut [T] = if W != 0 { &mut local[..k] } else { &mut *out };
        acc.fill(T::ZERO);
        for (d, &xi) in rows.chunks_exact(k).zip(x) {
            for (a, &v) in acc.iter_mut().zip(d) {
                *a += xi * v;
            }
        }
        if W != 0 {
            out.copy_from_slice(&local[..k]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
