//! Hand-vectorised row kernels for f32 rows of 8, 16, 32 or 64 values on x86-64 CPUs with
//! AVX2 and FMA ([`F32Rows`], made from a [`Cpu`]).

use std::arch::x86_64::*;

use super::{Rank2Terms, RowOps};
use crate::simd::avx2::{across_lanes, map_lanes, neg_sigmoid, neg_softplus, Cpu};

/// Hand-vectorised kernels for f32 rows of `8 C` values (`C` registers per row); made from
/// a [`Cpu`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct F32Rows<const C: usize>(Cpu);

impl<const C: usize> F32Rows<C> {
    #[inline]
    pub(crate) fn new(cpu: Cpu) -> Self {
        F32Rows(cpu)
    }

    /// The proof of the CPU's features that these kernels need.
    #[inline]
    pub(crate) fn cpu(self) -> Cpu {
        self.0
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
    fn rank2_sums(self, out: &mut [f32], k: usize, steps: usize, terms: Rank2Terms<'_, f32>, stream: bool) -> bool {
        assert!(k == 8 * C);
        let n = out.len() / k;
        if steps == 0 {
            self.zero_rows(out, stream);
            return true;
        }
        let last = (steps - 1) * terms.stride + n;
        let last_row = (steps - 1) * terms.row_stride + k;
        assert!(terms.s.len() >= last && terms.c.len() >= last);
        assert!(terms.mu.len() >= last_row && terms.p.len() >= last_row);
        // SAFETY: the CPU has the features; writes stay inside the n rows of `out`, reads
        // inside `s`, `c` (checked above for the last step, the farthest) and `mu`, `p`.
        unsafe {
            // Four rows at a time share each step's loads of μ_t and p_t, where their sums
            // fit in registers.
            let blocked = if C <= 2 { n / 4 * 4 } else { 0 };
            let (head, tail) = out[..k * n].split_at_mut(k * blocked);
            let ok = rank2_sums::<C, 4>(head, steps, terms, stream);
            ok & rank2_sums::<C, 1>(tail, steps, terms.skip_rows(blocked), stream)
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
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn rank2_sums<const C: usize, const R: usize>(
    out: &mut [f32],
    steps: usize,
    terms: Rank2Terms<'_, f32>,
    stream: bool,
) -> bool {
    let Rank2Terms {
        s,
        c,
        stride,
        mu,
        p,
        row_stride,
    } = terms;
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
