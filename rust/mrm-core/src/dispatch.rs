//! Which row kernels run: CPU detection, `MRM_PORTABLE_KERNELS`, and the float types the
//! batched kernels run on ([`Dtype`]: f32 and f64).
//!
//! [`with_row_ops`] picks the kernels of [`crate::rows`] for a block of users and runs the
//! block's code with them. On CPUs with AVX2 and FMA the whole block is compiled for them, also
//! with the portable kernels (whose plain loops give the same bits either way). Which kernels
//! run depends on K, the float type and the CPU, never on the thread count, so results stay
//! bit-identical for any thread count on a given machine. A new vector path (NEON, AVX-512
//! rows) or a new float type is a change here and in `rows`, not in the scalar maths.

use crate::real::Real;
#[cfg(target_arch = "x86_64")]
use crate::rows::avx2::F32Rows;
use crate::rows::{Portable, RowOps};
#[cfg(target_arch = "x86_64")]
use crate::simd::avx2::Cpu;

/// Code to run with some [`RowOps`]: a block of users' work, generic over the kernels.
pub trait WithRowOps<T: Real> {
    type Output;
    fn run<R: RowOps<T>>(self, ops: R) -> Self::Output;
}

/// Runs `job` with the fastest row kernels for rows of width `k` of type `T` on this CPU.
#[inline]
pub fn with_row_ops<T: Dtype, J: WithRowOps<T>>(k: usize, job: J) -> J::Output {
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
    if let Some(cpu) = Cpu::detect() {
        return run_compiled_for(cpu, ops, job);
    }
    job.run(ops)
}

/// A float type the batched kernels run on: [`Real`] and the row kernels for it. Implemented
/// for `f32` (hand-vectorised kernels on x86-64 CPUs with AVX2 and FMA) and `f64` (portable).
pub trait Dtype: Real {
    /// Runs `job` with row kernels specialised for this type, width `k` and this CPU, when
    /// there are any; otherwise hands `job` back (see [`with_row_ops`]).
    #[inline]
    fn run_accelerated<J: WithRowOps<Self>>(k: usize, job: J) -> Result<J::Output, J> {
        let _ = k;
        Err(job)
    }
}

impl Dtype for f32 {
    #[inline]
    fn run_accelerated<J: WithRowOps<f32>>(k: usize, job: J) -> Result<J::Output, J> {
        #[cfg(target_arch = "x86_64")]
        if let Some(cpu) = Cpu::detect() {
            match k {
                8 => return Ok(run_rows(F32Rows::<1>::new(cpu), job)),
                16 => return Ok(run_rows(F32Rows::<2>::new(cpu), job)),
                32 => return Ok(run_rows(F32Rows::<4>::new(cpu), job)),
                64 => return Ok(run_rows(F32Rows::<8>::new(cpu), job)),
                _ => {}
            }
        }
        let _ = k;
        Err(job)
    }
}

impl Dtype for f64 {}

/// Runs `job` with the hand-vectorised kernels `rows`, compiled for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[inline]
fn run_rows<const C: usize, J: WithRowOps<f32>>(rows: F32Rows<C>, job: J) -> J::Output {
    run_compiled_for(rows.cpu(), rows, job)
}

/// Runs `job` with `ops`, with all of its inlined code compiled for AVX2 + FMA (and AVX-512
/// where the CPU has it).
#[cfg(target_arch = "x86_64")]
#[inline]
fn run_compiled_for<T: Real, R: RowOps<T>, J: WithRowOps<T>>(cpu: Cpu, ops: R, job: J) -> J::Output {
    let _ = cpu;
    static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let wide = *WIDE.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl"));
    // SAFETY: `cpu` exists only when the CPU has both features; `wide` only when it also has
    // the AVX-512 ones.
    unsafe {
        if wide {
            run_with_features_512(ops, job)
        } else {
            run_with_features(ops, job)
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_with_features<T: Real, R: RowOps<T>, J: WithRowOps<T>>(ops: R, job: J) -> J::Output {
    job.run(ops)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn run_with_features_512<T: Real, R: RowOps<T>, J: WithRowOps<T>>(ops: R, job: J) -> J::Output {
    job.run(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::Rank2Terms;

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
                let (z, sums) = with_row_ops(
                    k,
                    Check {
                        rows: &rows,
                        k,
                        p: &p,
                        x: &x,
                    },
                );
                assert_eq!(z.len(), n);
                let tol = 1e-6 * k as f64;
                for (i, d) in rows.chunks_exact(k).enumerate() {
                    let want: f64 = d.iter().zip(&p).map(|(&a, &b)| a as f64 * b as f64).sum();
                    assert!(
                        (z[i] as f64 - want).abs() < tol,
                        "K {k} n {n} row {i}: {} vs {want}",
                        z[i]
                    );
                }
                for j in 0..k {
                    let want: f64 = rows
                        .chunks_exact(k)
                        .zip(&x)
                        .map(|(d, &xi)| d[j] as f64 * xi as f64)
                        .sum();
                    assert!(
                        (sums[j] as f64 - want).abs() < 1e-5 * n.max(1) as f64,
                        "K {k} n {n} column {j}: {} vs {want}",
                        sums[j]
                    );
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
            terms: Rank2Terms<'a, f32>,
        }
        const STRIDE_EXTRA: usize = 3;
        impl WithRowOps<f32> for Check<'_> {
            type Output = Vec<f32>;
            fn run<R: RowOps<f32>>(self, ops: R) -> Vec<f32> {
                let mut out = vec![f32::NAN; self.n * self.k];
                ops.rank2_sums(&mut out, self.k, self.steps, self.terms, self.steps.is_multiple_of(2));
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
                    let terms = Rank2Terms {
                        s: &s,
                        c: &c,
                        stride,
                        mu: &mu,
                        p: &p,
                        row_stride: 2 * k,
                    };
                    let got = with_row_ops(k, Check { k, n, steps, terms });
                    for i in 0..n {
                        for j in 0..k {
                            let want: f64 = (0..steps)
                                .map(|t| {
                                    c[t * stride + i] as f64 * p[t * 2 * k + j] as f64
                                        - s[t * stride + i] as f64 * mu[t * 2 * k + j] as f64
                                })
                                .sum();
                            let x = got[i * k + j] as f64;
                            assert!(
                                (x - want).abs() < 1e-5 * (steps.max(1) as f64),
                                "K {k} n {n} T {steps} row {i} column {j}: {x} vs {want}"
                            );
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
        /// Writes `n` rows of `k` at `offset`: `outer` of `terms.s` and `terms.mu`, `rank2_sums` of
        /// three steps of `terms`.
        struct Write<'a> {
            k: usize,
            n: usize,
            offset: usize,
            stream: bool,
            terms: Rank2Terms<'a, f32>,
        }
        impl WithRowOps<f32> for Write<'_> {
            type Output = (Vec<f32>, Vec<f32>, Vec<f32>, bool, bool);
            fn run<R: RowOps<f32>>(self, ops: R) -> Self::Output {
                let (k, n, at) = (self.k, self.n, self.offset);
                let mut bufs = [
                    vec![-7.0f32; n * k + 16],
                    vec![-7.0f32; n * k + 16],
                    vec![-7.0f32; n * k + 16],
                ];
                let (terms, stream) = (self.terms, self.stream);
                let ok_outer = ops.outer(&mut bufs[0][at..at + n * k], k, 0.75, terms.s, terms.mu, stream);
                let ok_sums = ops.rank2_sums(&mut bufs[1][at..at + n * k], k, 3, terms, stream);
                ops.zero_rows(&mut bufs[2][at..at + n * k], self.stream);
                crate::simd::stream::fence();
                for b in &bufs {
                    assert!(
                        b[..at].iter().chain(&b[at + n * k..]).all(|&x| x == -7.0),
                        "wrote outside out"
                    );
                }
                let [a, b, c] = bufs;
                (
                    a[at..at + n * k].to_vec(),
                    b[at..at + n * k].to_vec(),
                    c[at..at + n * k].to_vec(),
                    ok_outer,
                    ok_sums,
                )
            }
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut seed = 13;
        for k in [8, 16, 24, 64] {
            for n in [0, 1, 3, 4, 5, 9] {
                let s: Vec<f32> = (0..3 * n).map(|_| lcg(&mut seed)).collect();
                let c: Vec<f32> = (0..3 * n).map(|_| lcg(&mut seed)).collect();
                let mu: Vec<f32> = (0..3 * k + 1).map(|_| lcg(&mut seed)).collect();
                let terms = Rank2Terms {
                    s: &s,
                    c: &c,
                    stride: n,
                    mu: &mu,
                    p: &mu[1..],
                    row_stride: k,
                };
                let write = |offset, stream, terms: Rank2Terms<'_, f32>| {
                    with_row_ops(
                        k,
                        Write {
                            k,
                            n,
                            offset,
                            stream,
                            terms,
                        },
                    )
                };
                let want = write(0, true, terms);
                assert!(want.3 && want.4, "K {k} n {n}: finite values reported as not finite");
                assert!(want.2.iter().all(|&x| x.to_bits() == 0), "K {k} n {n}: zero_rows");
                for (offset, stream) in (1..8).map(|o| (o, true)).chain([(0, false), (3, false)]) {
                    let got = write(offset, stream, terms);
                    for (name, x, y) in [
                        ("outer", &want.0, &got.0),
                        ("rank2_sums", &want.1, &got.1),
                        ("zero_rows", &want.2, &got.2),
                    ] {
                        assert_eq!(bits(x), bits(y), "K {k} n {n} offset {offset}: {name}");
                    }
                }
                if n > 0 {
                    for bad in [f32::INFINITY, f32::NAN] {
                        let mut c_bad = c.clone();
                        c_bad[n + n / 2] = bad;
                        let got = write(0, true, Rank2Terms { c: &c_bad, ..terms });
                        assert!(got.3 && !got.4, "K {k} n {n}: {bad} in rank2_sums not reported");
                        let mut s_bad = s.clone();
                        s_bad[n - 1] = bad;
                        let got = write(0, false, Rank2Terms { s: &s_bad, ..terms });
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
                    assert!(
                        (s as f64 - want_s).abs() <= TOL * want_s,
                        "sigmoid(−{x}): {s} vs {want_s}"
                    );
                    assert!(
                        (sp as f64 - want_sp).abs() <= TOL * want_sp,
                        "softplus(−{x}): {sp} vs {want_sp}"
                    );
                }
                // The kernel rounds w_j − max to f32 before its exponential; so does the reference.
                let max = w.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let e: Vec<f64> = w.iter().map(|&x| ((x - max) as f64).exp()).collect();
                let total: f64 = e.iter().sum();
                for (j, (&got, &ej)) in p.iter().zip(&e).enumerate() {
                    let want = ej / total;
                    assert!(
                        (got as f64 - want).abs() <= TOL * want,
                        "K {k} softmax[{j}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}
