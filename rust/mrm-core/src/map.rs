//! MAP adaptation under a meta-learned Gaussian prior (SPEC §7), its exact implicit
//! meta-gradient and the Laplace posterior.
//!
//! Per user: `w* = argmin_w F(w)`, `F(w) = Σ_i softplus(−d_i · p(w)) + ½ Σ_k λ_k (w − w0)_k²`,
//! `λ_k = exp(η_k)`, `p` the user-weight map (softmax or identity). Damped Newton from `w0` (or
//! a warm start): the step matrix is the exact Hessian where it is positive definite, else
//! Gauss–Newton `Jᵀ A J + Λ` (always positive definite); a backtracking (Armijo) line search on
//! `F`; stop at `‖∇F‖_∞ ≤ tol` or after `max_iter` steps. Every user is solved in f64 whatever
//! the input dtype (the K × K algebra is tiny next to the rows), independently of the others,
//! so results do not depend on the thread count.
//!
//! Notation: `J = ∂p/∂w` (`diag(p) − p pᵀ` for softmax, `I` for the identity), `z_i = d_i · p`,
//! `s_i = σ(−z_i)`, `g_p = −Σ s_i d_i`, `A = Σ s_i (1 − s_i) d_i d_iᵀ`.

// Index loops over K-sized vectors and K × K matrices say which entry is which.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use crate::batch::{check_len, check_same_shape, Control, Start};
use crate::csr::Csr;
use crate::error::{non_finite, non_finite_result, shape, value, Error, Kind, Result};
use crate::real::Real;

/// Largest K the solver takes (K × K matrices per user live on the stack of a workspace).
pub const MAX_K: usize = 64;
/// Largest `max_iter` accepted (each iteration is one pass over a user's rows).
pub const MAX_ITER: usize = 10_000;
/// `η` must lie in `[-ETA_LIMIT, ETA_LIMIT]`: `λ = e^η` stays well inside f64.
pub const ETA_LIMIT: f64 = 40.0;
/// Halvings of the step before the line search gives up.
const MAX_HALVINGS: usize = 60;
/// Armijo constant of the line search.
const ARMIJO: f64 = 1e-4;
/// Relative size of a decrease of `F` that f64 still resolves (about 50 ulp).
const PRECISION_FLOOR: f64 = 1e-14;
/// Users per unit of parallel work (fixed: block partial sums do not depend on threads).
const BLOCK_USERS: usize = 256;

/// How a user's weight vector is mapped to the weights of the K base rewards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightMap {
    /// `p = softmax(w)` (the paper's simplex).
    Simplex,
    /// `p = w` (unconstrained weights, as in PReF).
    Linear,
}

impl WeightMap {
    pub fn name(self) -> &'static str {
        match self {
            WeightMap::Simplex => "simplex",
            WeightMap::Linear => "linear",
        }
    }
}

/// Settings of the MAP solver.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MapSettings {
    pub max_iter: usize,
    pub tol: f64,
    pub weight_map: WeightMap,
}

impl MapSettings {
    pub fn validate(&self) -> Result<()> {
        if self.max_iter < 1 || self.max_iter > MAX_ITER {
            return value(
                "max_iter",
                format!("max_iter must be in [1, {MAX_ITER}], got {}", self.max_iter),
            );
        }
        if !(self.tol.is_finite() && self.tol > 0.0) {
            return value("tol", format!("tol must be finite and > 0, got {}", self.tol));
        }
        Ok(())
    }
}

/// The prior's log precisions: one value shared by the K components, or K values.
fn precisions<T: Real>(eta: &[T], k: usize) -> Result<Vec<f64>> {
    if eta.len() != 1 && eta.len() != k {
        return shape("eta", format!("eta must have 1 or K = {k} values, got {}", eta.len()));
    }
    if let Some(x) = eta.iter().find(|x| !(x.is_finite() && x.to_f64().abs() <= ETA_LIMIT)) {
        return value(
            "eta",
            format!("eta must be finite and within [-{ETA_LIMIT}, {ETA_LIMIT}], got {x:?}"),
        );
    }
    Ok((0..k)
        .map(|j| eta[if eta.len() == 1 { 0 } else { j }].to_f64().exp())
        .collect())
}

/// Per-user outputs of [`map_forward`]. Optional ones are skipped when `None`.
pub struct MapOutputs<'a, T> {
    /// `w*`, U × K.
    pub weights: &'a mut [T],
    /// Newton steps taken, U.
    pub iterations: &'a mut [i64],
    /// `‖∇F(w*)‖_∞`, U.
    pub grad_norm: &'a mut [T],
    /// Whether `‖∇F(w*)‖_∞ ≤ tol`, U.
    pub converged: &'a mut [bool],
    /// Mean support loss at `w*` (0 without support pairs), U.
    pub support_losses: Option<&'a mut [T]>,
    /// Mean query loss at `w*`, U (needs query rows).
    pub losses: Option<&'a mut [T]>,
    /// Share of query pairs with `d · p(w*) > 0`, U (needs query rows).
    pub accuracy: Option<&'a mut [T]>,
    /// Laplace covariance `H⁻¹` in `w` space (Gauss–Newton where `H` is not positive
    /// definite), U × K × K.
    pub covariance: Option<&'a mut [T]>,
}

/// One block's partial sums of the shared gradients (w0, eta), or the error of its first bad user.
type BlockSums = Result<(Vec<f64>, Vec<f64>)>;

/// Gradients written by [`map_backward`].
pub struct MapGradients<'a, T> {
    /// The shape of `w0` (summed over users when it is shared).
    pub w0: &'a mut [T],
    /// The shape of `eta`.
    pub eta: &'a mut [T],
    pub support: &'a mut [T],
    pub query: &'a mut [T],
}

/// One thread's scratch for one user at a time.
struct Work {
    k: usize,
    w: Vec<f64>,
    trial: Vec<f64>,
    p: Vec<f64>,
    gp: Vec<f64>,
    grad: Vec<f64>,
    step: Vec<f64>,
    v: Vec<f64>,
    mu: Vec<f64>,
    h: Vec<f64>,
    a: Vec<f64>,
    t: Vec<f64>,
    chol: Vec<f64>,
    z: Vec<f64>,
    s: Vec<f64>,
}

/// What the solver reports for one user.
#[derive(Clone, Copy, Debug)]
struct Solved {
    iterations: usize,
    grad_norm: f64,
    converged: bool,
}

impl Work {
    fn new(k: usize) -> Self {
        let v = || vec![0.0; k];
        let m = || vec![0.0; k * k];
        Work {
            k,
            w: v(),
            trial: v(),
            p: v(),
            gp: v(),
            grad: v(),
            step: v(),
            v: v(),
            mu: v(),
            h: m(),
            a: m(),
            t: m(),
            chol: m(),
            z: Vec::new(),
            s: Vec::new(),
        }
    }

    /// `p = map(w)`.
    #[inline(always)]
    fn map_weights(map: WeightMap, w: &[f64], p: &mut [f64]) {
        match map {
            WeightMap::Linear => p.copy_from_slice(w),
            WeightMap::Simplex => {
                let max = w.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
                let mut sum = 0.0;
                for (pi, &wi) in p.iter_mut().zip(w) {
                    *pi = (wi - max).exp();
                    sum += *pi;
                }
                for pi in p.iter_mut() {
                    *pi /= sum;
                }
            }
        }
    }

    /// `out = J v` (J is symmetric for both maps).
    #[inline(always)]
    fn jacobian_times(map: WeightMap, p: &[f64], v: &[f64], out: &mut [f64]) {
        match map {
            WeightMap::Linear => out.copy_from_slice(v),
            WeightMap::Simplex => {
                let pv: f64 = p.iter().zip(v).map(|(a, b)| a * b).sum();
                for ((o, &pi), &vi) in out.iter_mut().zip(p).zip(v) {
                    *o = pi * (vi - pv);
                }
            }
        }
    }

    /// Margins `z_i = d_i · p` of `rows` into `z`.
    #[inline(always)]
    fn margins(rows: &[f64], k: usize, p: &[f64], z: &mut Vec<f64>) {
        z.clear();
        z.extend(
            rows.chunks_exact(k)
                .map(|d| d.iter().zip(p).map(|(x, y)| x * y).sum::<f64>()),
        );
    }

    /// `Σ softplus(−z_i)` and every `s_i = σ(−z_i)` (into `s`), sharing one exponential.
    /// Branch-free polynomial `exp` and `ln_1p` (within a few ulp, see [`Real::exp_fast`]), so
    /// the loop vectorises: the library calls cost most of a solve otherwise.
    #[inline(always)]
    fn softplus_and_sigmoid(z: &[f64], s: &mut Vec<f64>) -> f64 {
        s.resize(z.len(), 0.0);
        let mut total = 0.0;
        for (si, &zi) in s.iter_mut().zip(z) {
            let e = (-zi.abs()).exp_fast();
            total += (-zi).max(0.0) + e.ln_1p_fast();
            let inv = 1.0 / (1.0 + e);
            *si = if zi >= 0.0 { e * inv } else { inv };
        }
        total
    }

    /// `½ Σ λ_k (w − w0)_k²`.
    #[inline(always)]
    fn prior(lam: &[f64], w: &[f64], w0: &[f64]) -> f64 {
        0.5 * lam
            .iter()
            .zip(w)
            .zip(w0)
            .map(|((l, a), b)| l * (a - b) * (a - b))
            .sum::<f64>()
    }

    /// `F` at `w` (margins left in `z`, sigmoids in `s`, `p` at `w`).
    #[inline(always)]
    fn objective(&mut self, rows: &[f64], map: WeightMap, w: &[f64], w0: &[f64], lam: &[f64]) -> f64 {
        Self::map_weights(map, w, &mut self.p);
        Self::margins(rows, self.k, &self.p, &mut self.z);
        Self::softplus_and_sigmoid(&self.z, &mut self.s) + Self::prior(lam, w, w0)
    }

    /// `g_p = −Σ s_i d_i` from the current `s`, then `∇F = J g_p + Λ (w − w0)` into `grad`.
    #[inline(always)]
    fn gradient(&mut self, rows: &[f64], map: WeightMap, w0: &[f64], lam: &[f64]) {
        let k = self.k;
        self.gp.iter_mut().for_each(|g| *g = 0.0);
        for (d, &si) in rows.chunks_exact(k).zip(&self.s) {
            for (g, x) in self.gp.iter_mut().zip(d) {
                *g -= si * x;
            }
        }
        Self::jacobian_times(map, &self.p, &self.gp, &mut self.grad);
        for j in 0..k {
            self.grad[j] += lam[j] * (self.w[j] - w0[j]);
        }
    }

    /// The step matrix into `h`: with `exact`, `∇²F` (SPEC §2's HVP in sum form plus Λ), else
    /// Gauss–Newton `J A J + Λ`. Needs `p`, `s` and `g_p` at `w`.
    #[inline(always)]
    fn hessian(&mut self, rows: &[f64], map: WeightMap, lam: &[f64], exact: bool) {
        let k = self.k;
        // A = Σ s_i (1 − s_i) d_i d_iᵀ (upper triangle, mirrored below)
        // (full square rather than a triangle: the row updates vectorise; common K unrolled)
        match k {
            2 => accumulate_curvature::<2>(rows, &self.s, &mut self.a),
            4 => accumulate_curvature::<4>(rows, &self.s, &mut self.a),
            8 => accumulate_curvature::<8>(rows, &self.s, &mut self.a),
            16 => accumulate_curvature::<16>(rows, &self.s, &mut self.a),
            _ => {
                self.a.iter_mut().for_each(|x| *x = 0.0);
                for (d, &si) in rows.chunks_exact(k).zip(&self.s) {
                    let c = si * (1.0 - si);
                    for (row, &dr) in self.a.chunks_exact_mut(k).zip(d) {
                        let cr = c * dr;
                        for (x, &dc) in row.iter_mut().zip(d) {
                            *x += cr * dc;
                        }
                    }
                }
            }
        }
        match map {
            WeightMap::Linear => self.h.copy_from_slice(&self.a),
            WeightMap::Simplex => {
                // t = A J, h = J t (J symmetric); then the softmax curvature J (diag(g_p − c) − g_p pᵀ)
                let p = &self.p;
                for r in 0..k {
                    let ar = &self.a[r * k..(r + 1) * k];
                    let ap: f64 = ar.iter().zip(p).map(|(x, y)| x * y).sum();
                    for col in 0..k {
                        self.t[r * k + col] = (ar[col] - ap) * p[col];
                    }
                }
                for col in 0..k {
                    let pt: f64 = (0..k).map(|r| p[r] * self.t[r * k + col]).sum();
                    for r in 0..k {
                        self.h[r * k + col] = p[r] * (self.t[r * k + col] - pt);
                    }
                }
                if exact {
                    let gp = &self.gp;
                    let c: f64 = p.iter().zip(gp).map(|(x, y)| x * y).sum();
                    // N = diag(g_p − c) − g_p pᵀ; J N = p ⊙ (N − 1 (pᵀ N)) row-wise
                    for col in 0..k {
                        // column `col` of N: (g_p − c) e_col − g_p p_col
                        let mut pn = 0.0;
                        for r in 0..k {
                            let n = if r == col { gp[r] - c } else { 0.0 } - gp[r] * p[col];
                            self.t[r * k + col] = n;
                            pn += p[r] * n;
                        }
                        for r in 0..k {
                            self.h[r * k + col] += p[r] * (self.t[r * k + col] - pn);
                        }
                    }
                    // symmetric in exact arithmetic: average out the rounding
                    for r in 0..k {
                        for col in 0..r {
                            let m = 0.5 * (self.h[r * k + col] + self.h[col * k + r]);
                            self.h[r * k + col] = m;
                            self.h[col * k + r] = m;
                        }
                    }
                }
            }
        }
        for j in 0..k {
            self.h[j * k + j] += lam[j];
        }
    }

    /// Cholesky factor of `h` into `chol` (lower); false if `h` is not positive definite.
    #[inline(always)]
    fn factor(&mut self) -> bool {
        let k = self.k;
        let (h, l) = (&self.h, &mut self.chol);
        for r in 0..k {
            for c in 0..=r {
                let mut sum = h[r * k + c];
                for j in 0..c {
                    sum -= l[r * k + j] * l[c * k + j];
                }
                if r == c {
                    if !(sum > 0.0 && sum.is_finite()) {
                        return false;
                    }
                    l[r * k + r] = sum.sqrt();
                } else {
                    l[r * k + c] = sum / l[c * k + c];
                }
            }
        }
        true
    }

    /// Solves `h x = b` in place with the factor in `chol`.
    #[inline(always)]
    fn solve_in_place(chol: &[f64], k: usize, x: &mut [f64]) {
        for r in 0..k {
            let mut sum = x[r];
            for j in 0..r {
                sum -= chol[r * k + j] * x[j];
            }
            x[r] = sum / chol[r * k + r];
        }
        for r in (0..k).rev() {
            let mut sum = x[r];
            for j in r + 1..k {
                sum -= chol[j * k + r] * x[j];
            }
            x[r] = sum / chol[r * k + r];
        }
    }

    /// Damped Newton from `init` (SPEC §7). Leaves `w` = w*, and `p`, `z`, `s`, `g_p`, `grad`
    /// at it. `Err` only for an objective that is not finite at the start.
    #[inline(always)]
    fn solve(
        &mut self,
        rows: &[f64],
        w0: &[f64],
        init: &[f64],
        lam: &[f64],
        settings: &MapSettings,
    ) -> std::result::Result<Solved, ()> {
        let k = self.k;
        let map = settings.weight_map;
        self.w.copy_from_slice(init);
        let w = std::mem::take(&mut self.w);
        let mut f = self.objective(rows, map, &w, w0, lam);
        self.w = w;
        if !f.is_finite() {
            return Err(());
        }
        let mut iterations = 0;
        loop {
            self.gradient(rows, map, w0, lam);
            let grad_norm = self.grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
            if !grad_norm.is_finite() {
                return Err(());
            }
            if grad_norm <= settings.tol {
                return Ok(Solved {
                    iterations,
                    grad_norm,
                    converged: true,
                });
            }
            if iterations == settings.max_iter {
                return Ok(Solved {
                    iterations,
                    grad_norm,
                    converged: false,
                });
            }
            self.hessian(rows, map, lam, true);
            if !self.factor() {
                self.hessian(rows, map, lam, false);
                if !self.factor() {
                    return Ok(Solved {
                        iterations,
                        grad_norm,
                        converged: false,
                    });
                }
            }
            for j in 0..k {
                self.step[j] = -self.grad[j];
            }
            Self::solve_in_place(&self.chol, k, &mut self.step);
            let slope: f64 = self.step.iter().zip(&self.grad).map(|(a, b)| a * b).sum();
            let mut t = 1.0;
            let mut accepted = false;
            let mut trial = std::mem::take(&mut self.trial);
            // Below this predicted decrease F cannot tell better from worse in f64: the full
            // Newton step is taken as it is (the quadratic model is exact to rounding there).
            let resolvable = -slope > PRECISION_FLOOR * (1.0 + f.abs());
            for _ in 0..MAX_HALVINGS {
                for j in 0..k {
                    trial[j] = self.w[j] + t * self.step[j];
                }
                let ft = self.objective(rows, map, &trial, w0, lam);
                if ft.is_finite() && (ft <= f + ARMIJO * t * slope || !resolvable) {
                    f = ft;
                    accepted = true;
                    break;
                }
                t *= 0.5;
            }
            if accepted {
                std::mem::swap(&mut self.w, &mut trial);
                self.trial = trial;
                iterations += 1;
            } else {
                // no decrease is left to find in this dtype: report the point as it is
                self.trial = trial;
                let w = std::mem::take(&mut self.w);
                self.objective(rows, map, &w, w0, lam);
                self.w = w;
                self.gradient(rows, map, w0, lam);
                let grad_norm = self.grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
                return Ok(Solved {
                    iterations,
                    grad_norm,
                    converged: grad_norm <= settings.tol,
                });
            }
        }
    }

    /// Mean `softplus(−z)` and the share of `z > 0` of `rows` at the current `p`, leaving the
    /// margins in `z` and the sigmoids in `s`.
    #[inline(always)]
    fn mean_loss(&mut self, rows: &[f64]) -> (f64, f64) {
        Self::margins(rows, self.k, &self.p, &mut self.z);
        let n = self.z.len();
        if n == 0 {
            return (0.0, 0.0);
        }
        let correct = self.z.iter().filter(|&&z| z > 0.0).count();
        let total = Self::softplus_and_sigmoid(&self.z, &mut self.s);
        (total / n as f64, correct as f64 / n as f64)
    }
}

/// [`Work::solve`] compiled for AVX2 + FMA (every pass over the rows inlined into it).
///
/// # Safety
/// The CPU must support AVX2 and FMA (checked by [`solve_dispatched`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn solve_avx2(
    ws: &mut Work,
    rows: &[f64],
    w0: &[f64],
    init: &[f64],
    lam: &[f64],
    settings: &MapSettings,
) -> std::result::Result<Solved, ()> {
    ws.solve(rows, w0, init, lam, settings)
}

/// The solve for one user, compiled for AVX2 + FMA where the CPU has them. The loops do the same
/// operations in the same order either way (no contraction into fused multiply-adds), so the
/// results are the same bits on every x86-64 CPU, as for the portable row kernels.
fn solve_dispatched(
    ws: &mut Work,
    rows: &[f64],
    w0: &[f64],
    init: &[f64],
    lam: &[f64],
    settings: &MapSettings,
) -> std::result::Result<Solved, ()> {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::avx2::Cpu::detect().is_some() {
            // SAFETY: the CPU has AVX2 and FMA (just detected).
            return unsafe { solve_avx2(ws, rows, w0, init, lam, settings) };
        }
    }
    ws.solve(rows, w0, init, lam, settings)
}

/// `A = Σ_i s_i (1 − s_i) d_i d_iᵀ` into `a` (K × K) for a K known at compile time: the
/// accumulator stays in registers. Same sums in the same order as the general loop.
#[inline(always)]
fn accumulate_curvature<const K: usize>(rows: &[f64], s: &[f64], a: &mut [f64]) {
    let mut acc = [[0.0f64; K]; K];
    for (d, &si) in rows.chunks_exact(K).zip(s) {
        // a fixed-size copy: no bounds checks in the loops below (chunks are exactly K long)
        let d: [f64; K] = d.try_into().unwrap_or([0.0; K]);
        let c = si * (1.0 - si);
        for r in 0..K {
            let cr = c * d[r];
            for col in 0..K {
                acc[r][col] += cr * d[col];
            }
        }
    }
    for (out, row) in a.chunks_exact_mut(K).zip(&acc) {
        out.copy_from_slice(row);
    }
}

/// `values` as f64 into `out` (resized).
fn widen<T: Real>(values: &[T], out: &mut Vec<f64>) {
    out.clear();
    out.extend(values.iter().map(|x| x.to_f64()));
}

fn to_f64<T: Real>(values: &[T], out: &mut [f64]) {
    for (o, v) in out.iter_mut().zip(values) {
        *o = v.to_f64();
    }
}

fn check_common<T: Real>(
    start: &Start<'_, T>,
    support: &Csr<'_, T>,
    init: Option<&[T]>,
    settings: &MapSettings,
) -> Result<()> {
    settings.validate()?;
    let (k, n_users) = (support.k, support.n_users());
    if k > MAX_K {
        return shape("support", format!("the MAP solver takes K <= {MAX_K}, got K = {k}"));
    }
    start.check(k, n_users)?;
    support.check_values("support", None)?;
    if let Some(init) = init {
        check_len("init", init, n_users * k)?;
        if let Some(pos) = init.iter().position(|x| !x.is_finite()) {
            return non_finite("init", format!("init contains a non-finite value (user {})", pos / k));
        }
    }
    Ok(())
}

fn check_query<T: Real>(support: &Csr<'_, T>, query: &Csr<'_, T>, require_rows: bool) -> Result<()> {
    check_same_shape(support, query)?;
    query.check_values("query", None)?;
    if require_rows {
        if let Some(u) = (0..query.n_users()).find(|&u| query.row_range(u).is_empty()) {
            return shape(
                "query",
                format!("query has no pairs for user {u}: every user needs at least one query pair"),
            );
        }
    }
    Ok(())
}

/// Splits `buf` into consecutive pieces of `unit ×` the block sizes.
fn pieces<'b, T>(buf: &'b mut [T], blocks: &[(usize, usize)], unit: usize) -> Vec<&'b mut [T]> {
    let mut rest = buf;
    blocks
        .iter()
        .map(|&(lo, hi)| {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut((hi - lo) * unit);
            rest = tail;
            head
        })
        .collect()
}

fn optional_pieces<'b, T>(
    buf: Option<&'b mut [T]>,
    blocks: &[(usize, usize)],
    unit: usize,
) -> Vec<Option<&'b mut [T]>> {
    match buf {
        Some(b) => pieces(b, blocks, unit).into_iter().map(Some).collect(),
        None => blocks.iter().map(|_| None).collect(),
    }
}

/// Pieces of an output with `per_row` values per row of `batch`, for the given blocks of users.
fn row_pieces<'b, T: Real, O>(
    buf: &'b mut [O],
    batch: &Csr<'_, T>,
    blocks: &[(usize, usize)],
    per_row: usize,
) -> Vec<&'b mut [O]> {
    let mut rest = buf;
    blocks
        .iter()
        .map(|&(lo, hi)| {
            let len = batch.users(lo, hi).n_rows() * per_row;
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(len);
            rest = tail;
            head
        })
        .collect()
}

fn blocks_of(lo: usize, hi: usize) -> Vec<(usize, usize)> {
    (lo..hi)
        .step_by(BLOCK_USERS)
        .map(|a| (a, (a + BLOCK_USERS).min(hi)))
        .collect()
}

#[allow(clippy::too_many_arguments)]
/// Solves every user's MAP problem (SPEC §7); with `query`, also its query loss and accuracy.
/// `init`: per-user warm starts (U × K), else `w0`. Non-convergence is reported per user in
/// `out.converged`, never an error here.
pub fn map_forward<T: Real>(
    start: Start<'_, T>,
    eta: &[T],
    support: Csr<'_, T>,
    query: Option<Csr<'_, T>>,
    init: Option<&[T]>,
    settings: &MapSettings,
    out: MapOutputs<'_, T>,
    ctl: &Control<'_>,
) -> Result<()> {
    check_common(&start, &support, init, settings)?;
    let (k, n_users) = (support.k, support.n_users());
    let lam = precisions(eta, k)?;
    if let Some(q) = &query {
        check_query(&support, q, false)?;
    } else if out.losses.is_some() || out.accuracy.is_some() {
        return value("query", "query losses and accuracy need query rows");
    }
    check_len("weights", out.weights, n_users * k)?;
    check_len("iterations", out.iterations, n_users)?;
    check_len("grad_norm", out.grad_norm, n_users)?;
    check_len("converged", out.converged, n_users)?;
    for (name, buf) in [
        ("support_losses", &out.support_losses),
        ("losses", &out.losses),
        ("accuracy", &out.accuracy),
    ] {
        if let Some(b) = buf {
            check_len(name, b, n_users)?;
        }
    }
    if let Some(c) = &out.covariance {
        check_len("covariance", c, n_users * k * k)?;
    }
    let MapOutputs {
        weights,
        iterations,
        grad_norm,
        converged,
        mut support_losses,
        mut losses,
        mut accuracy,
        mut covariance,
    } = out;
    ctl.chunks(n_users, |lo, hi| {
        let blocks = blocks_of(lo, hi);
        let rel: Vec<(usize, usize)> = blocks.iter().map(|&(a, b)| (a - lo, b - lo)).collect();
        let work: Vec<_> = blocks
            .iter()
            .copied()
            .zip(pieces(&mut weights[lo * k..hi * k], &rel, k))
            .zip(pieces(&mut iterations[lo..hi], &rel, 1))
            .zip(pieces(&mut grad_norm[lo..hi], &rel, 1))
            .zip(pieces(&mut converged[lo..hi], &rel, 1))
            .zip(optional_pieces(
                support_losses.as_deref_mut().map(|b| &mut b[lo..hi]),
                &rel,
                1,
            ))
            .zip(optional_pieces(losses.as_deref_mut().map(|b| &mut b[lo..hi]), &rel, 1))
            .zip(optional_pieces(
                accuracy.as_deref_mut().map(|b| &mut b[lo..hi]),
                &rel,
                1,
            ))
            .zip(optional_pieces(
                covariance.as_deref_mut().map(|b| &mut b[lo * k * k..hi * k * k]),
                &rel,
                k * k,
            ))
            .collect();
        let failed: Option<usize> = ctl.pool.install(|| {
            work.into_par_iter()
                .map_init(
                    || (Work::new(k), vec![0.0; k], vec![0.0; k], Vec::new(), Vec::new()),
                    |(ws, w0, init_u, rows64, query64), ((((((((block, wts), its), gn), conv), sl), ql), qa), cov)| {
                        let (mut sl, mut ql, mut qa, mut cov) = (sl, ql, qa, cov);
                        for u in block.0..block.1 {
                            let i = u - block.0;
                            to_f64(start.of(u, k), w0);
                            match init {
                                Some(x) => to_f64(&x[u * k..(u + 1) * k], init_u),
                                None => init_u.copy_from_slice(w0),
                            }
                            // the user's rows in f64 once: every pass of the solve reads them
                            widen(support.rows(u), rows64);
                            let rows = rows64.as_slice();
                            let Ok(solved) = solve_dispatched(ws, rows, w0, init_u, &lam, settings) else {
                                return Some(u);
                            };
                            for j in 0..k {
                                wts[i * k + j] = T::of(ws.w[j]);
                            }
                            its[i] = solved.iterations as i64;
                            gn[i] = T::of(solved.grad_norm);
                            conv[i] = solved.converged;
                            if let Some(c) = cov.as_deref_mut() {
                                // Laplace covariance: H⁻¹ (exact, else Gauss–Newton)
                                ws.hessian(rows, settings.weight_map, &lam, true);
                                if !ws.factor() {
                                    ws.hessian(rows, settings.weight_map, &lam, false);
                                    if !ws.factor() {
                                        return Some(u);
                                    }
                                }
                                for col in 0..k {
                                    ws.v.iter_mut()
                                        .enumerate()
                                        .for_each(|(j, x)| *x = (j == col) as u8 as f64);
                                    Work::solve_in_place(&ws.chol, k, &mut ws.v);
                                    for r in 0..k {
                                        c[i * k * k + r * k + col] = T::of(ws.v[r]);
                                    }
                                }
                            }
                            if let Some(sl) = sl.as_deref_mut() {
                                sl[i] = T::of(ws.mean_loss(rows).0);
                            }
                            if let Some(q) = &query {
                                widen(q.rows(u), query64);
                                let (loss, acc) = ws.mean_loss(query64.as_slice());
                                if let Some(ql) = ql.as_deref_mut() {
                                    ql[i] = T::of(loss);
                                }
                                if let Some(qa) = qa.as_deref_mut() {
                                    qa[i] = T::of(acc);
                                }
                            }
                        }
                        None
                    },
                )
                .find_first(|f| f.is_some())
                .flatten()
        });
        if let Some(u) = failed {
            return non_finite_result(format!(
                "the MAP objective is not finite for user {u} (support rows too large for this dtype)"
            ));
        }
        Ok(())
    })?;
    if let Some(pos) = weights.iter().position(|x| !x.is_finite()) {
        return non_finite_result(format!(
            "adapted weights are not finite for user {} (inputs too large for this dtype)",
            pos / k
        ));
    }
    Ok(())
}

/// The exact gradient of `Σ_u grad_losses[u] · L_u` (`L_u` the mean query loss at `w*_u`) with
/// respect to `w0`, `eta` and every support and query row, by implicit differentiation at the
/// solution (SPEC §7): `v = H⁻¹ ∇_w L_u`, `∂/∂w0 = Λ v`, `∂/∂η_k = −λ_k (w* − w0)_k v_k`,
/// `∂/∂d_i = s_i μ − s_i (1 − s_i)(μ · d_i) p` with `μ = J v`. A user whose solve does not
/// converge, or whose Hessian is not positive definite at `w*`, is an error naming it.
/// Optionally writes the forward outputs too (`values`).
#[allow(clippy::too_many_arguments)]
pub fn map_backward<T: Real>(
    start: Start<'_, T>,
    eta: &[T],
    support: Csr<'_, T>,
    query: Csr<'_, T>,
    grad_losses: &[T],
    settings: &MapSettings,
    grads: MapGradients<'_, T>,
    mut values: Option<MapOutputs<'_, T>>,
    ctl: &Control<'_>,
) -> Result<()> {
    check_common(&start, &support, None, settings)?;
    let (k, n_users) = (support.k, support.n_users());
    let lam = precisions(eta, k)?;
    check_query(&support, &query, true)?;
    check_len("grad_losses", grad_losses, n_users)?;
    if let Some(pos) = grad_losses.iter().position(|x| !x.is_finite()) {
        return non_finite(
            "grad_losses",
            format!("grad_losses contains a non-finite value (user {pos})"),
        );
    }
    let shared = matches!(start, Start::Shared(_));
    check_len("grad_w0", grads.w0, if shared { k } else { n_users * k })?;
    check_len("grad_eta", grads.eta, eta.len())?;
    check_len("grad_support", grads.support, support.values.len())?;
    check_len("grad_query", grads.query, query.values.len())?;
    if let Some(v) = &values {
        check_len("weights", v.weights, n_users * k)?;
    }
    let MapGradients {
        w0: grad_w0,
        eta: grad_eta,
        support: grad_support,
        query: grad_query,
    } = grads;
    let mut w0_sum = vec![0.0f64; k];
    let mut eta_sum = vec![0.0f64; k];
    let mut per_user_w0 = if shared { None } else { Some(&mut *grad_w0) };
    ctl.chunks(n_users, |lo, hi| {
        let blocks = blocks_of(lo, hi);
        let rel: Vec<(usize, usize)> = blocks.iter().map(|&(a, b)| (a - lo, b - lo)).collect();
        let s_lo = support.users(0, lo).values.len();
        let q_lo = query.users(0, lo).values.len();
        let s_len = support.users(lo, hi).values.len();
        let q_len = query.users(lo, hi).values.len();
        let chunk_support = support.users(lo, hi);
        let chunk_query = query.users(lo, hi);
        let gs = row_pieces(&mut grad_support[s_lo..s_lo + s_len], &chunk_support, &rel, k);
        let gq = row_pieces(&mut grad_query[q_lo..q_lo + q_len], &chunk_query, &rel, k);
        let gw = optional_pieces(per_user_w0.as_deref_mut().map(|b| &mut b[lo * k..hi * k]), &rel, k);
        let (vw, vi, vg, vc, vs, vl, va) = match values.as_mut() {
            Some(v) => (
                Some(&mut v.weights[lo * k..hi * k]),
                Some(&mut v.iterations[lo..hi]),
                Some(&mut v.grad_norm[lo..hi]),
                Some(&mut v.converged[lo..hi]),
                v.support_losses.as_deref_mut().map(|b| &mut b[lo..hi]),
                v.losses.as_deref_mut().map(|b| &mut b[lo..hi]),
                v.accuracy.as_deref_mut().map(|b| &mut b[lo..hi]),
            ),
            None => (None, None, None, None, None, None, None),
        };
        let work: Vec<_> = blocks
            .iter()
            .copied()
            .zip(gs)
            .zip(gq)
            .zip(gw)
            .zip(optional_pieces(vw, &rel, k))
            .zip(optional_pieces(vi, &rel, 1))
            .zip(optional_pieces(vg, &rel, 1))
            .zip(optional_pieces(vc, &rel, 1))
            .zip(optional_pieces(vs, &rel, 1))
            .zip(optional_pieces(vl, &rel, 1))
            .zip(optional_pieces(va, &rel, 1))
            .collect();
        let results: Vec<BlockSums> = ctl.pool.install(|| {
            work.into_par_iter()
                .map_init(
                    || (Work::new(k), vec![0.0; k], vec![0.0; k], vec![0.0; k], Vec::new(), Vec::new(), Vec::new()),
                    |(ws, w0, init, gq_p, rows64, query64, support_s), ((((((((((block, gs), gq), gw), vw), vi), vg), vc), vs), vl), va)| {
                        let (mut gw, mut vw, mut vi, mut vg, mut vc, mut vs, mut vl, mut va) = (gw, vw, vi, vg, vc, vs, vl, va);
                        let mut w0_part = vec![0.0; k];
                        let mut eta_part = vec![0.0; k];
                        let (mut s_at, mut q_at) = (0, 0);
                        for u in block.0..block.1 {
                            let i = u - block.0;
                            to_f64(start.of(u, k), w0);
                            widen(support.rows(u), rows64);
                            widen(query.rows(u), query64);
                            let (rows, qrows) = (rows64.as_slice(), query64.as_slice());
                            init.copy_from_slice(w0);
                            let solved = match solve_dispatched(ws, rows, w0, init, &lam, settings) {
                                Ok(s) => s,
                                Err(()) => {
                                    return Err(Error::without_argument(Kind::NonFinite, format!(
                                        "the MAP objective is not finite for user {u} (support rows too large for this dtype)"
                                    )))
                                }
                            };
                            if !solved.converged {
                                return Err(Error::new(Kind::Value, "max_iter", format!(
                                    "the MAP solve did not converge for user {u} (‖∇F‖∞ = {:.3e} after {} iterations, tol {:.1e}): \
                                     its implicit gradient would be wrong; raise max_iter or tol",
                                    solved.grad_norm, solved.iterations, settings.tol
                                )));
                            }
                            let support_loss = ws.mean_loss(rows).0;
                            // back at w*: s and g_p of the support rows, then H (exact)
                            let w = std::mem::take(&mut ws.w);
                            ws.objective(rows, settings.weight_map, &w, w0, &lam);
                            ws.w = w;
                            ws.gradient(rows, settings.weight_map, w0, &lam);
                            ws.hessian(rows, settings.weight_map, &lam, true);
                            if !ws.factor() {
                                return Err(Error::new(Kind::Value, "eta", format!(
                                    "the Hessian of the MAP objective is not positive definite at the solution for user {u}: \
                                     no implicit gradient (a stronger prior, larger eta, makes it so)"
                                )));
                            }
                            support_s.clear();
                            support_s.extend_from_slice(&ws.s);
                            // query: L = mean softplus(−q·p), ∇_p L = −(1/m) Σ σ(−z_j) q_j
                            let (loss, acc) = ws.mean_loss(qrows);
                            let m = (qrows.len() / k) as f64;
                            let gl = grad_losses[u].to_f64();
                            gq_p.iter_mut().for_each(|g| *g = 0.0);
                            for (q, &sj) in qrows.chunks_exact(k).zip(&ws.s) {
                                for (g, x) in gq_p.iter_mut().zip(q) {
                                    *g -= gl * sj * x.to_f64() / m;
                                }
                            }
                            for (j, (q, &sj)) in qrows.chunks_exact(k).zip(&ws.s).enumerate() {
                                let _ = q;
                                let c = -gl * sj / m;
                                for col in 0..k {
                                    gq[q_at + j * k + col] = T::of(c * ws.p[col]);
                                }
                            }
                            q_at += qrows.len();
                            // v = H⁻¹ ḡ with ḡ = J ∇_p (gl · L), μ = J v
                            Work::jacobian_times(settings.weight_map, &ws.p, gq_p, &mut ws.v);
                            Work::solve_in_place(&ws.chol, k, &mut ws.v);
                            Work::jacobian_times(settings.weight_map, &ws.p, &ws.v, &mut ws.mu);
                            for j in 0..k {
                                let g = lam[j] * ws.v[j];
                                match gw.as_deref_mut() {
                                    Some(gw) => gw[i * k + j] = T::of(g),
                                    None => w0_part[j] += g,
                                }
                                eta_part[j] -= lam[j] * (ws.w[j] - w0[j]) * ws.v[j];
                            }
                            for (j, d) in rows.chunks_exact(k).enumerate() {
                                let si = support_s[j];
                                let md: f64 = d.iter().zip(&ws.mu).map(|(x, y)| x.to_f64() * y).sum();
                                let c = si * (1.0 - si) * md;
                                for col in 0..k {
                                    gs[s_at + j * k + col] = T::of(si * ws.mu[col] - c * ws.p[col]);
                                }
                            }
                            s_at += rows.len();
                            if let Some(vw) = vw.as_deref_mut() {
                                for j in 0..k {
                                    vw[i * k + j] = T::of(ws.w[j]);
                                }
                            }
                            if let Some(vi) = vi.as_deref_mut() {
                                vi[i] = solved.iterations as i64;
                            }
                            if let Some(vg) = vg.as_deref_mut() {
                                vg[i] = T::of(solved.grad_norm);
                            }
                            if let Some(vc) = vc.as_deref_mut() {
                                vc[i] = true;
                            }
                            if let Some(vs) = vs.as_deref_mut() {
                                vs[i] = T::of(support_loss);
                            }
                            if let Some(vl) = vl.as_deref_mut() {
                                vl[i] = T::of(loss);
                            }
                            if let Some(va) = va.as_deref_mut() {
                                va[i] = T::of(acc);
                            }
                        }
                        Ok((w0_part, eta_part))
                    },
                )
                .collect()
        });
        // block partial sums in block order: the same bits for any thread count
        for r in results {
            let (w0_part, eta_part) = r?;
            for j in 0..k {
                w0_sum[j] += w0_part[j];
                eta_sum[j] += eta_part[j];
            }
        }
        Ok(())
    })?;
    if shared {
        for j in 0..k {
            grad_w0[j] = T::of(w0_sum[j]);
        }
    }
    if eta.len() == 1 {
        grad_eta[0] = T::of(eta_sum.iter().sum());
    } else {
        for j in 0..k {
            grad_eta[j] = T::of(eta_sum[j]);
        }
    }
    for (name, buf) in [
        ("grad_w0", &*grad_w0),
        ("grad_eta", &*grad_eta),
        ("grad_support", &*grad_support),
        ("grad_query", &*grad_query),
    ] {
        if buf.iter().any(|x| !x.is_finite()) {
            return non_finite_result(format!("{name} is not finite (inputs too large for this dtype)"));
        }
    }
    Ok(())
}

/// Predictive mean and variance of `rows · p(w*_u)` for every row of user `u` (SPEC §7): for a
/// feature row `f`, the reward `r = f · p` and `var = (J f)ᵀ Σ_u (J f)`; for a pair difference,
/// the margin and its variance. `covariance` (U × K × K) may be `None` (variances not written).
pub fn predictive<T: Real>(
    rows: Csr<'_, T>,
    weights: &[T],
    covariance: Option<&[T]>,
    weight_map: WeightMap,
    mean: &mut [T],
    mut variance: Option<&mut [T]>,
    ctl: &Control<'_>,
) -> Result<()> {
    let (k, n_users) = (rows.k, rows.n_users());
    check_len("weights", weights, n_users * k)?;
    if let Some(pos) = weights.iter().position(|x| !x.is_finite()) {
        return non_finite(
            "weights",
            format!("weights contains a non-finite value (user {})", pos / k),
        );
    }
    rows.check_values("features", Some(ctl.pool))?;
    check_len("rewards", mean, rows.n_rows())?;
    if let Some(c) = covariance {
        check_len("covariance", c, n_users * k * k)?;
        if let Some(pos) = c.iter().position(|x| !x.is_finite()) {
            return non_finite(
                "covariance",
                format!("covariance contains a non-finite value (user {})", pos / (k * k)),
            );
        }
        match &variance {
            Some(v) => check_len("variance", v, rows.n_rows())?,
            None => return value("variance", "a covariance needs a variance output"),
        }
    } else if variance.is_some() {
        return value("covariance", "variances need a covariance");
    }
    ctl.chunks(n_users, |lo, hi| {
        let blocks = blocks_of(lo, hi);
        let rel: Vec<(usize, usize)> = blocks.iter().map(|&(a, b)| (a - lo, b - lo)).collect();
        let r_lo = rows.users(0, lo).n_rows();
        let r_hi = rows.users(0, hi).n_rows();
        let chunk = rows.users(lo, hi);
        let means = row_pieces(&mut mean[r_lo..r_hi], &chunk, &rel, 1);
        let vars: Vec<Option<&mut [T]>> = match variance.as_deref_mut() {
            Some(v) => row_pieces(&mut v[r_lo..r_hi], &chunk, &rel, 1)
                .into_iter()
                .map(Some)
                .collect(),
            None => rel.iter().map(|_| None).collect(),
        };
        let work: Vec<_> = blocks.iter().copied().zip(means).zip(vars).collect();
        ctl.pool.install(|| {
            work.into_par_iter().for_each_init(
                || (vec![0.0f64; k], vec![0.0f64; k], vec![0.0f64; k], vec![0.0f64; k]),
                |(w, p, f, jf), ((block, m), var)| {
                    let mut var = var;
                    let mut at = 0;
                    for u in block.0..block.1 {
                        to_f64(&weights[u * k..(u + 1) * k], w);
                        Work::map_weights(weight_map, w, p);
                        for row in rows.rows(u).chunks_exact(k) {
                            to_f64(row, f);
                            m[at] = T::of(f.iter().zip(p.iter()).map(|(a, b)| a * b).sum());
                            if let (Some(var), Some(c)) = (var.as_deref_mut(), covariance) {
                                Work::jacobian_times(weight_map, p, f, jf);
                                let cov = &c[u * k * k..(u + 1) * k * k];
                                let mut total = 0.0;
                                for r in 0..k {
                                    let cr: f64 = (0..k).map(|col| cov[r * k + col].to_f64() * jf[col]).sum();
                                    total += jf[r] * cr;
                                }
                                var[at] = T::of(total.max(0.0));
                            }
                            at += 1;
                        }
                    }
                },
            );
        });
        Ok(())
    })
}
