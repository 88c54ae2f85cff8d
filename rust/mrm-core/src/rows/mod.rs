//! The two row kernels of a user's inner loop, over that user's K-wide rows:
//! margins `z_i = d_i · p` and weighted row sums `Σ_i x_i d_i`.
//!
//! Two implementations:
//! - [`Portable`]: plain loops for any float type and any K (with a compile-time K for the
//!   common widths);
//! - on x86-64 CPUs with AVX2 and FMA, f32 rows of K = 8, 16, 32 or 64 values held in 1 to 8
//!   256-bit registers: eight margins come out of the lane products and one transposing
//!   horizontal add, and the row sums are fused multiply-adds into four accumulator sets.
//!
//! [`with_row_ops`] picks one for a block of users and runs the block's code with it. On CPUs
//! with AVX2 and FMA the whole block is compiled for them, also with the portable kernels (whose
//! plain loops give the same bits either way). Which kernels run depends on K, the float type
//! and the CPU, never on the thread count, so results stay bit-identical for any thread count
//! on a given machine. The hand-vectorised kernels sum in another order than the portable ones,
//! so f32 results with K = 8, 16, 32 or 64 on CPUs with and without AVX2 agree to rounding, not
//! to the bit.

use crate::csr::all_finite;
use crate::real::{dot, Real};

/// The row kernels. `k` is the row width; an implementation may know it at compile time.
pub trait RowOps<T: Real>: Copy {
    /// The lane vectors that go with these kernels (see [`crate::lanes`]).
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
    /// first and do not keep it in cache; see [`crate::simd::stream`]), so that they may write a
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
    /// the last step `t = steps − 1` down to 0, where `s_{t,i} = s[t · stride + i]` (`c`
    /// alike) and `μ_t`, `p_t` are the `k` values at `t · row_stride` of `mu`, `p`. Returns
    /// whether every value written is finite.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn rank2_sums(self, out: &mut [T], k: usize, steps: usize, s: &[T], c: &[T], stride: usize, mu: &[T], p: &[T], row_stride: usize, stream: bool) -> bool {
        let _ = stream;
        let k = self.width(k);
        let n = out.len() / k;
        out.fill(T::ZERO);
        for t in (0..steps).rev() {
            let (s, c) = (&s[t * stride..t * stride + n], &c[t * stride..t * stride + n]);
            let (mu, p) = (&mu[t * row_stride..t * row_stride + k], &p[t * row_stride..t * row_stride + k]);
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

/// The constants of Adam's step `t` (1-based; `torch.optim.Adam` semantics):
/// `w −= c1 m / (sqrt(v) / c2 + ε)` with `c1 = α / (1 − β1^t)`, `c2 = sqrt(1 − β2^t)`.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep<T> {
    pub c1: T,
    pub c2: T,
    pub beta1: T,
    pub beta2: T,
    pub eps: T,
}

impl<T: Real> AdamStep<T> {
    pub fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, t: usize) -> Self {
        let t = t as i32;
        let (c1, c2) = (lr / (1.0 - beta1.powi(t)), (1.0 - beta2.powi(t)).sqrt());
        AdamStep { c1: T::of(c1), c2: T::of(c2), beta1: T::of(beta1), beta2: T::of(beta2), eps: T::of(eps) }
    }
}

/// Code to run with some [`RowOps`]: a block of users' work, generic over the kernels.
pub trait WithRowOps<T: Real> {
    type Output;
    fn run<R: RowOps<T>>(self, ops: R) -> Self::Output;
}

/// Runs `job` with the fastest row kernels for rows of width `k` of type `T` on this CPU.
#[inline]
pub fn with_row_ops<T: Real, J: WithRowOps<T>>(k: usize, job: J) -> J::Output {
    let job = if hand_vectorised_allowed() {
        match T::run_accelerated(k, job) {
            Ok(out) => return out,
            Err(job) => job,
        }
    } else {
        job
    };
    match k {
        2 => run_portable(Portable::<2>, job),
        4 => run_portable(Portable::<4>, job),
        8 => run_portable(Portable::<8>, job),
        16 => run_portable(Portable::<16>, job),
        _ => run_portable(Portable::<0>, job),
    }
}

/// Whether the hand-vectorised kernels may run: not when the environment variable
/// `MRM_PORTABLE_KERNELS` is `1` (read once per process, at the first kernel call). With it,
/// results are the same bits on every x86-64 CPU, AVX2 or not, at some cost in speed.
fn hand_vectorised_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| std::env::var("MRM_PORTABLE_KERNELS").map_or(true, |v| v.trim() != "1"))
}

/// Runs `job` with portable kernels, compiled for AVX2 + FMA where the CPU has them. The plain
/// loops do the same operations in the same order either way (no contraction into fused
/// multiply-adds, no reordered sums), so results do not depend on which one runs.
#[inline(always)]
fn run_portable<T: Real, const W: usize, J: WithRowOps<T>>(ops: Portable<W>, job: J) -> J::Output {
    #[cfg(target_arch = "x86_64")]
    if let Some(cpu) = avx2::Cpu::detect() {
        return cpu.run(ops, job);
    }
    job.run(ops)
}

/// Plain loops for any float type. `W` is the row width when known at compile time (the loops
/// then keep their K-wide accumulators in registers and unroll), else 0 (K read at run time).
#[derive(Clone, Copy, Debug, Default)]
pub struct Portable<const W: usize>;

impl<T: Real, const W: usize> RowOps<T> for Portable<W> {
    type Lanes = crate::lanes::Portable<T>;

    #[inline(always)]
    fn width(self, k: usize) -> usize {
        if W == 0 { k } else { W }
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

/// f32 rows of width 8 on x86-64 with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    use super::{RowOps, WithRowOps};
    use crate::real::Real;

    /// Proof that the CPU has AVX2 and FMA: only [`Cpu::detect`] makes one.
    #[derive(Clone, Copy, Debug)]
    pub struct Cpu(());

    impl Cpu {
        /// `Some` when this CPU has AVX2 and FMA (checked once, then cached by std).
        #[inline]
        pub fn detect() -> Option<Cpu> {
            (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")).then_some(Cpu(()))
        }

        /// Runs `job` with `ops`, with all of its inlined code compiled for AVX2 + FMA.
        #[inline]
        pub fn run<T: Real, R: RowOps<T>, J: WithRowOps<T>>(self, ops: R, job: J) -> J::Output {
            static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            let wide = *WIDE.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl"));
            // SAFETY: `self` exists only when the CPU has both features; `wide` only when it
            // also has the AVX-512 ones.
            unsafe {
                if wide {
                    run_with_features_512(ops, job)
                } else {
                    run_with_features(ops, job)
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_with_features<T: Real, R: RowOps<T>, J: WithRowOps<T>>(ops: R, job: J) -> J::Output {
        job.run(ops)
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
    unsafe fn run_with_features_512<T: Real, R: RowOps<T>, J: WithRowOps<T>>(ops: R, job: J) -> J::Output {
        job.run(ops)
    }

    /// Hand-vectorised kernels for f32 rows of `8 C` values (`C` registers per row); made from
    /// a [`Cpu`].
    #[derive(Clone, Copy, Debug)]
    pub struct F32Rows<const C: usize>(Cpu);

    impl<const C: usize> F32Rows<C> {
        #[inline]
        pub fn new(cpu: Cpu) -> Self {
            F32Rows(cpu)
        }

        /// Runs `job` with these kernels, compiled for AVX2 + FMA.
        #[inline]
        pub fn run<J: WithRowOps<f32>>(self, job: J) -> J::Output {
            self.0.run(self, job)
        }
    }

    impl<const C: usize> RowOps<f32> for F32Rows<C> {
        type Lanes = crate::lanes::avx2::F32x8;

        #[inline(always)]
        fn width(self, _k: usize) -> usize {
            8 * C
        }

        #[inline(always)]
        fn margins_into(self, rows: &[f32], k: usize, p: &[f32], z: &mut [f32]) {
            assert!(k == 8 * C && p.len() >= k && z.len() == rows.len() / k);
            let n = z.len();
            // SAFETY: the CPU has the features (an `F32Rows` holds a `Cpu`); every read is
            // inside `rows` (n rows of 8 C) or `p` (8 C), every store inside `z` (n values).
            unsafe { margins::<C>(&rows[..k * n], p, z) }
        }

        #[inline(always)]
        fn weighted_row_sums(self, rows: &[f32], k: usize, x: &[f32], out: &mut [f32]) {
            assert!(k == 8 * C && out.len() >= k);
            let n = (rows.len() / k).min(x.len());
            // SAFETY: as in `margins`, with stores inside `out` (8 C values).
            unsafe { weighted_row_sums::<C>(&rows[..k * n], &x[..n], out) }
        }

        const STREAMS: bool = true;

        #[inline(always)]
        fn zero_rows(self, out: &mut [f32], stream: bool) {
            if stream {
                crate::simd::stream::zero(out);
            } else {
                out.fill(0.0);
            }
        }

        #[inline(always)]
        fn rank2_sums(self, out: &mut [f32], k: usize, steps: usize, s: &[f32], c: &[f32], stride: usize, mu: &[f32], p: &[f32], row_stride: usize, stream: bool) -> bool {
            assert!(k == 8 * C);
            let n = out.len() / k;
            if steps == 0 {
                self.zero_rows(out, stream);
                return true;
            }
            let last = (steps - 1) * stride + n;
            let last_row = (steps - 1) * row_stride + k;
            assert!(s.len() >= last && c.len() >= last && mu.len() >= last_row && p.len() >= last_row);
            // SAFETY: the CPU has the features; writes stay inside the n rows of `out`, reads
            // inside `s`, `c` (checked above for the last step, the farthest) and `mu`, `p`.
            unsafe {
                // Four rows at a time share each step's loads of μ_t and p_t, where their sums
                // fit in registers.
                let blocked = if C <= 2 { n / 4 * 4 } else { 0 };
                let (head, tail) = out[..k * n].split_at_mut(k * blocked);
                let ok = rank2_sums::<C, 4>(head, steps, s, c, stride, mu, p, row_stride, stream);
                ok & rank2_sums::<C, 1>(tail, steps, &s[blocked..], &c[blocked..], stride, mu, p, row_stride, stream)
            }
        }

        #[inline(always)]
        fn outer(self, out: &mut [f32], k: usize, a: f32, s: &[f32], p: &[f32], stream: bool) -> bool {
            assert!(k == 8 * C && p.len() >= k);
            let n = (out.len() / k).min(s.len());
            // SAFETY: the CPU has the features; writes stay inside the n rows of `out`, reads
            // inside `s` (n values) and `p` (8 C).
            unsafe { outer::<C>(&mut out[..k * n], a, &s[..n], &p[..k], stream) }
        }

        #[inline(always)]
        fn neg_softplus(self, z: &mut [f32]) {
            // SAFETY: the CPU has the features; `map_lanes` stays inside `z`.
            unsafe { map_lanes(z, neg_softplus) }
        }

        #[inline(always)]
        fn neg_sigmoids(self, z: &mut [f32]) {
            // SAFETY: as in `neg_softplus`.
            unsafe { map_lanes(z, neg_sigmoid) }
        }
    }

    /// Row `i` (of `8 C` values at `r`) times `p`, lane by lane, its `C` registers summed.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn product<const C: usize>(r: *const f32, i: usize, p: &[__m256; C]) -> __m256 {
        let row = r.add(8 * C * i);
        let mut acc = _mm256_mul_ps(_mm256_loadu_ps(row), p[0]);
        for (c, &pc) in p.iter().enumerate().skip(1) {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(row.add(8 * c)), pc, acc);
        }
        acc
    }

    /// `z[i] = rows[i] · p` for `z.len()` rows of `8 C`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn margins<const C: usize>(rows: &[f32], p: &[f32], z: &mut [f32]) {
        let n = z.len();
        let (r, out) = (rows.as_ptr(), z.as_mut_ptr());
        let mut pv = [_mm256_setzero_ps(); C];
        for (c, v) in pv.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(p.as_ptr().add(8 * c));
        }
        let mut i = 0;
        while i + 8 <= n {
            // Lane j of `h_ab` holds pairwise sums of rows a and b within each 128-bit half;
            // two rounds of horizontal adds and one swap of halves leave row i+j's dot in lane j.
            let h01 = _mm256_hadd_ps(product(r, i, &pv), product(r, i + 1, &pv));
            let h23 = _mm256_hadd_ps(product(r, i + 2, &pv), product(r, i + 3, &pv));
            let h45 = _mm256_hadd_ps(product(r, i + 4, &pv), product(r, i + 5, &pv));
            let h67 = _mm256_hadd_ps(product(r, i + 6, &pv), product(r, i + 7, &pv));
            let q0 = _mm256_hadd_ps(h01, h23);
            let q1 = _mm256_hadd_ps(h45, h67);
            let low = _mm256_permute2f128_ps::<0x20>(q0, q1);
            let high = _mm256_permute2f128_ps::<0x31>(q0, q1);
            _mm256_storeu_ps(out.add(i), _mm256_add_ps(low, high));
            i += 8;
        }
        while i < n {
            *out.add(i) = _mm256_cvtss_f32(across_lanes(product(r, i, &pv), _mm256_add_ps));
            i += 1;
        }
    }

    /// `out[..8 C] = Σ_i x[i] rows[i]` over `x.len()` rows of `8 C`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn weighted_row_sums<const C: usize>(rows: &[f32], x: &[f32], out: &mut [f32]) {
        // Four independent accumulator sets hide the latency of the multiply-adds.
        const SETS: usize = 4;
        let (n, r, xs) = (x.len(), rows.as_ptr(), x.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); C]; SETS];
        let mut i = 0;
        while i + SETS <= n {
            for (j, set) in acc.iter_mut().enumerate() {
                let xi = _mm256_broadcast_ss(&*xs.add(i + j));
                let row = r.add(8 * C * (i + j));
                for (c, a) in set.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(xi, _mm256_loadu_ps(row.add(8 * c)), *a);
                }
            }
            i += SETS;
        }
        while i < n {
            let xi = _mm256_broadcast_ss(&*xs.add(i));
            let row = r.add(8 * C * i);
            for (c, a) in acc[0].iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(xi, _mm256_loadu_ps(row.add(8 * c)), *a);
            }
            i += 1;
        }
        let [a0, a1, a2, a3] = acc;
        for (c, (((x0, x1), x2), x3)) in a0.into_iter().zip(a1).zip(a2).zip(a3).enumerate() {
            let total = _mm256_add_ps(_mm256_add_ps(x0, x1), _mm256_add_ps(x2, x3));
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * c), total);
        }
    }

    /// The C registers of the 8 C values at `x`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load<const C: usize>(x: &[f32]) -> [__m256; C] {
        let mut v = [_mm256_setzero_ps(); C];
        for (c, r) in v.iter_mut().enumerate() {
            *r = _mm256_loadu_ps(x.as_ptr().add(8 * c));
        }
        v
    }

    /// `f` of all eight lanes of `v` in every lane, for an associative and commutative `f`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn across_lanes(v: __m256, f: unsafe fn(__m256, __m256) -> __m256) -> __m256 {
        // SAFETY: `f` is an AVX intrinsic (max or add) and the CPU has the features.
        unsafe {
            let v = f(v, _mm256_permute2f128_ps::<1>(v, v));
            let v = f(v, _mm256_permute_ps::<0b01_00_11_10>(v));
            f(v, _mm256_permute_ps::<0b10_11_00_01>(v))
        }
    }

    /// How a kernel stores the registers of its rows into `out`: non-temporal (see
    /// [`crate::simd::stream`]) when asked and the rows are aligned for it, else plainly.
    #[derive(Clone, Copy)]
    enum Put {
        Stream256,
        Stream128,
        Plain,
    }

    impl Put {
        /// Rows are 32 C bytes, so the alignment of the first holds for every register.
        #[inline(always)]
        fn of(out: &[f32], stream: bool) -> Put {
            match out.as_ptr() as usize {
                _ if !stream => Put::Plain,
                a if a % 32 == 0 => Put::Stream256,
                a if a % 16 == 0 => Put::Stream128,
                _ => Put::Plain,
            }
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn put(self, at: *mut f32, v: __m256) {
            match self {
                Put::Stream256 => _mm256_stream_ps(at, v),
                Put::Stream128 => {
                    _mm_stream_ps(at, _mm256_castps256_ps128(v));
                    _mm_stream_ps(at.add(4), _mm256_extractf128_ps::<1>(v));
                }
                Put::Plain => _mm256_storeu_ps(at, v),
            }
        }
    }

    /// `check` is the running sum of `v − v` over stored values: 0 while every one is finite,
    /// NaN from the first infinity or NaN on.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn add_check(check: __m256, v: __m256) -> __m256 {
        _mm256_add_ps(check, _mm256_sub_ps(v, v))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn check_passed(check: __m256) -> bool {
        _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(check, _mm256_setzero_ps())) == 0xff
    }

    /// `out_i = (a s_i) p` over rows of 8 C, stored non-temporally where aligned; whether all
    /// are finite.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn outer<const C: usize>(out: &mut [f32], a: f32, s: &[f32], p: &[f32], stream: bool) -> bool {
        let pv = load::<C>(p);
        let put = Put::of(out, stream);
        let (o, sp, av) = (out.as_mut_ptr(), s.as_ptr(), _mm256_set1_ps(a));
        let mut check = _mm256_setzero_ps();
        for i in 0..s.len() {
            let scaled = _mm256_mul_ps(av, _mm256_broadcast_ss(&*sp.add(i)));
            for (j, &pj) in pv.iter().enumerate() {
                let v = _mm256_mul_ps(scaled, pj);
                check = add_check(check, v);
                put.put(o.add(8 * C * i + 8 * j), v);
            }
        }
        check_passed(check)
    }

    /// `out_i = Σ_t (c_{t,i} p_t − s_{t,i} μ_t)`, `t` from `steps − 1` down: each row's sums
    /// stay in registers through the steps (two fused multiply-adds per register and step),
    /// and the row is stored once.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rank2_sums<const C: usize, const R: usize>(out: &mut [f32], steps: usize, s: &[f32], c: &[f32], stride: usize, mu: &[f32], p: &[f32], row_stride: usize, stream: bool) -> bool {
        let put = Put::of(out, stream);
        let mut check = _mm256_setzero_ps();
        let (o, sp, cp, mp, pp) = (out.as_mut_ptr(), s.as_ptr(), c.as_ptr(), mu.as_ptr(), p.as_ptr());
        let mut i = 0;
        while i < out.len() / (8 * C) {
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            for t in (0..steps).rev() {
                let (m, q) = (mp.add(t * row_stride), pp.add(t * row_stride));
                for j in 0..C {
                    let (mj, pj) = (_mm256_loadu_ps(m.add(8 * j)), _mm256_loadu_ps(q.add(8 * j)));
                    for (r, row) in acc.iter_mut().enumerate() {
                        let sv = _mm256_broadcast_ss(&*sp.add(t * stride + i + r));
                        let cv = _mm256_broadcast_ss(&*cp.add(t * stride + i + r));
                        row[j] = _mm256_fmadd_ps(cv, pj, _mm256_fnmadd_ps(sv, mj, row[j]));
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (j, &a) in row.iter().enumerate() {
                    check = add_check(check, a);
                    put.put(o.add(8 * C * (i + r) + 8 * j), a);
                }
            }
            i += R;
        }
        check_passed(check)
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
    fn neg_sigmoid(z: __m256) -> __m256 {
        let one = _mm256_set1_ps(1.0);
        _mm256_div_ps(one, _mm256_add_ps(one, exp(z)))
    }

    /// `max(−z, 0) + ln(1 + e^{−|z|})` in each lane; `ln(1 + y)` for `0 < y ≤ 1` as
    /// `ln_1p_fast` for f32 (same reduction and series) with fused multiply-adds.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn neg_softplus(z: __m256) -> __m256 {
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
    unsafe fn map_lanes(z: &mut [f32], f: unsafe fn(__m256) -> __m256) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Whichever kernels `with_row_ops` picks agree with f64 sums for every row count and the
    /// widths with hand-vectorised kernels (and one without).
    #[test]
    fn row_kernels_match_f64_sums() {
        struct Check<'a> {
            rows: &'a [f32],
            k: usize,
            p: &'a [f32],
            x: &'a [f32],
        }
        impl WithRowOps<f32> for Check<'_> {
            type Output = (Vec<f32>, Vec<f32>);
            fn run<R: RowOps<f32>>(self, ops: R) -> Self::Output {
                let (mut z, mut sums) = (Vec::new(), vec![0.0; self.k]);
                ops.margins(self.rows, self.k, self.p, &mut z);
                ops.weighted_row_sums(self.rows, self.k, self.x, &mut sums);
                (z, sums)
            }
        }
        let mut seed = 3;
        for k in [8, 16, 24, 32, 64] {
            for n in 0..40 {
                let rows: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
                let p: Vec<f32> = (0..k).map(|_| lcg(&mut seed)).collect();
                let x: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
                let (z, sums) = with_row_ops(k, Check { rows: &rows, k, p: &p, x: &x });
                assert_eq!(z.len(), n);
                let tol = 1e-6 * k as f64;
                for (i, d) in rows.chunks_exact(k).enumerate() {
                    let want: f64 = d.iter().zip(&p).map(|(&a, &b)| a as f64 * b as f64).sum();
                    assert!((z[i] as f64 - want).abs() < tol, "K {k} n {n} row {i}: {} vs {want}", z[i]);
                }
                for j in 0..k {
                    let want: f64 = rows.chunks_exact(k).zip(&x).map(|(d, &xi)| d[j] as f64 * xi as f64).sum();
                    assert!((sums[j] as f64 - want).abs() < 1e-5 * n.max(1) as f64, "K {k} n {n} column {j}: {} vs {want}", sums[j]);
                }
            }
        }
    }

    /// `rank2_sums` of whichever kernels `with_row_ops` picks agrees with f64 sums, for every
    /// row count (blocks of four and the rows after them), 0 to 6 steps and strided inputs.
    #[test]
    fn rank2_sums_match_f64() {
        struct Check<'a> {
            k: usize,
            n: usize,
            steps: usize,
            s: &'a [f32],
            c: &'a [f32],
            mu: &'a [f32],
            p: &'a [f32],
        }
        const STRIDE_EXTRA: usize = 3;
        impl WithRowOps<f32> for Check<'_> {
            type Output = Vec<f32>;
            fn run<R: RowOps<f32>>(self, ops: R) -> Vec<f32> {
                let mut out = vec![f32::NAN; self.n * self.k];
                ops.rank2_sums(&mut out, self.k, self.steps, self.s, self.c, self.n + STRIDE_EXTRA, self.mu, self.p, 2 * self.k, self.steps.is_multiple_of(2));
                out
            }
        }
        let mut seed = 11;
        for k in [8, 16, 24, 32, 64] {
            for n in 0..13 {
                for steps in 0..7 {
                    let stride = n + STRIDE_EXTRA;
                    let s: Vec<f32> = (0..steps * stride).map(|_| lcg(&mut seed)).collect();
                    let c: Vec<f32> = (0..steps * stride).map(|_| lcg(&mut seed)).collect();
                    let mu: Vec<f32> = (0..steps * 2 * k).map(|_| lcg(&mut seed)).collect();
                    let p: Vec<f32> = (0..steps * 2 * k).map(|_| lcg(&mut seed)).collect();
                    let got = with_row_ops(k, Check { k, n, steps, s: &s, c: &c, mu: &mu, p: &p });
                    for i in 0..n {
                        for j in 0..k {
                            let want: f64 = (0..steps)
                                .map(|t| c[t * stride + i] as f64 * p[t * 2 * k + j] as f64 - s[t * stride + i] as f64 * mu[t * 2 * k + j] as f64)
                                .sum();
                            let x = got[i * k + j] as f64;
                            assert!((x - want).abs() < 1e-5 * (steps.max(1) as f64), "K {k} n {n} T {steps} row {i} column {j}: {x} vs {want}");
                        }
                    }
                }
            }
        }
    }

    /// `outer`, `rank2_sums` and `zero_rows` of whichever kernels `with_row_ops` picks give
    /// the same bits at every alignment of `out` (the streamed stores of 32 and 16 bytes and the
    /// plain ones) and with plain stores asked for, write nothing outside `out`, and report
    /// non-finite values they write.
    #[test]
    fn row_writers_same_bits_at_every_alignment_and_report_non_finite() {
        struct Write<'a> {
            k: usize,
            n: usize,
            offset: usize,
            stream: bool,
            s: &'a [f32],
            c: &'a [f32],
            mu: &'a [f32],
        }
        impl WithRowOps<f32> for Write<'_> {
            type Output = (Vec<f32>, Vec<f32>, Vec<f32>, bool, bool);
            fn run<R: RowOps<f32>>(self, ops: R) -> Self::Output {
                let (k, n, at) = (self.k, self.n, self.offset);
                let mut bufs = [vec![-7.0f32; n * k + 16], vec![-7.0f32; n * k + 16], vec![-7.0f32; n * k + 16]];
                let ok_outer = ops.outer(&mut bufs[0][at..at + n * k], k, 0.75, self.s, self.mu, self.stream);
                let ok_sums = ops.rank2_sums(&mut bufs[1][at..at + n * k], k, 3, self.s, self.c, n, self.mu, &self.mu[1..], k, self.stream);
                ops.zero_rows(&mut bufs[2][at..at + n * k], self.stream);
                crate::simd::stream::fence();
                for b in &bufs {
                    assert!(b[..at].iter().chain(&b[at + n * k..]).all(|&x| x == -7.0), "wrote outside out");
                }
                let [a, b, c] = bufs;
                (a[at..at + n * k].to_vec(), b[at..at + n * k].to_vec(), c[at..at + n * k].to_vec(), ok_outer, ok_sums)
            }
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut seed = 13;
        for k in [8, 16, 24, 64] {
            for n in [0, 1, 3, 4, 5, 9] {
                let s: Vec<f32> = (0..3 * n).map(|_| lcg(&mut seed)).collect();
                let c: Vec<f32> = (0..3 * n).map(|_| lcg(&mut seed)).collect();
                let mu: Vec<f32> = (0..3 * k + 1).map(|_| lcg(&mut seed)).collect();
                let want = with_row_ops(k, Write { k, n, offset: 0, stream: true, s: &s, c: &c, mu: &mu });
                assert!(want.3 && want.4, "K {k} n {n}: finite values reported as not finite");
                assert!(want.2.iter().all(|&x| x.to_bits() == 0), "K {k} n {n}: zero_rows");
                for (offset, stream) in (1..8).map(|o| (o, true)).chain([(0, false), (3, false)]) {
                    let got = with_row_ops(k, Write { k, n, offset, stream, s: &s, c: &c, mu: &mu });
                    for (name, x, y) in [("outer", &want.0, &got.0), ("rank2_sums", &want.1, &got.1), ("zero_rows", &want.2, &got.2)] {
                        assert_eq!(bits(x), bits(y), "K {k} n {n} offset {offset}: {name}");
                    }
                }
                if n > 0 {
                    for bad in [f32::INFINITY, f32::NAN] {
                        let mut c_bad = c.clone();
                        c_bad[n + n / 2] = bad;
                        let got = with_row_ops(k, Write { k, n, offset: 0, stream: true, s: &s, c: &c_bad, mu: &mu });
                        assert!(got.3 && !got.4, "K {k} n {n}: {bad} in rank2_sums not reported");
                        let mut s_bad = s.clone();
                        s_bad[n - 1] = bad;
                        let got = with_row_ops(k, Write { k, n, offset: 0, stream: false, s: &s_bad, c: &c, mu: &mu });
                        assert!(!got.3, "K {k} n {n}: {bad} in outer not reported");
                    }
                }
            }
        }
    }

    /// The sigmoid and softplus kernels `with_row_ops` picks, and the softmax of their lanes, agree with f64 (std `exp`
    /// and `ln_1p`) to within 4e-7 relative (a few f32 ulp; both the hand-vectorised and the
    /// portable kernels stay under 3e-7 here, and a polynomial coefficient off by 1 % shows as
    /// 5e-7), from deep in the tails to the middle, at every length.
    #[test]
    fn elementwise_kernels_match_f64() {
        struct Check<'a> {
            z: &'a [f32],
            w: &'a [f32],
        }
        impl WithRowOps<f32> for Check<'_> {
            type Output = (Vec<f32>, Vec<f32>, Vec<f32>);
            fn run<R: RowOps<f32>>(self, ops: R) -> Self::Output {
                let (mut sig, mut soft, mut p) = (self.z.to_vec(), self.z.to_vec(), vec![0.0; self.w.len()]);
                ops.neg_sigmoids(&mut sig);
                ops.neg_softplus(&mut soft);
                // The softmax of the lanes that go with these kernels, the same `w` in every lane.
                use crate::lanes::{softmax, Lanes};
                let w: Vec<R::Lanes> = self.w.iter().map(|&x| R::Lanes::splat(x)).collect();
                let mut pv = w.clone();
                softmax(&w, &mut pv);
                let mut lane = [0.0f32; crate::lanes::LANES];
                for (pj, v) in p.iter_mut().zip(pv) {
                    v.store(&mut lane);
                    *pj = lane[0];
                }
                (sig, soft, p)
            }
        }
        const TOL: f64 = 4e-7;
        let mut seed = 5;
        for k in [8, 16, 32, 64] {
            for n in [1, 7, 8, 9, 31, 32, 33, 100] {
                // Margins from −80 to 80 (where the sigmoid is far below 1e-30 or near 1).
                let z: Vec<f32> = (0..n).map(|_| 80.0 * lcg(&mut seed)).collect();
                let w: Vec<f32> = (0..k).map(|_| 20.0 * lcg(&mut seed)).collect();
                let (sig, soft, p) = with_row_ops(k, Check { z: &z, w: &w });
                for ((&x, &s), &sp) in z.iter().zip(&sig).zip(&soft) {
                    let x = x as f64;
                    let want_s = 1.0 / (1.0 + x.exp());
                    let want_sp = (-x).max(0.0) + (-x.abs()).exp().ln_1p();
                    assert!((s as f64 - want_s).abs() <= TOL * want_s, "sigmoid(−{x}): {s} vs {want_s}");
                    assert!((sp as f64 - want_sp).abs() <= TOL * want_sp, "softplus(−{x}): {sp} vs {want_sp}");
                }
                // The kernel rounds w_j − max to f32 before its exponential; so does the reference.
                let max = w.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let e: Vec<f64> = w.iter().map(|&x| ((x - max) as f64).exp()).collect();
                let total: f64 = e.iter().sum();
                for (j, (&got, &ej)) in p.iter().zip(&e).enumerate() {
                    let want = ej / total;
                    assert!((got as f64 - want).abs() <= TOL * want, "K {k} softmax[{j}]: {got} vs {want}");
                }
            }
        }
    }
}
