//! MAP adaptation under a meta-learned Gaussian prior (SPEC §7), its exact implicit
//! meta-gradient and the Laplace posterior.
//!
//! Per user: `w* = argmin_w F(w)`, `F(w) = Σ_i softplus(−d_i · p(w)) + ½ Σ_k λ_k (w − w0)_k²`,
//! `λ_k = exp(η_k)`, `p` the user-weight map (softmax or identity). Damped Newton from `w0` (or
//! a warm start): the step matrix is the exact Hessian where it is positive definite, else
//! Gauss–Newton `Jᵀ A J + Λ` (always positive definite); a backtracking (Armijo) line search on
//! `F`; stop at `‖∇F‖_∞ ≤ tol` or after `max_iter` steps. Every user is solved in f64 whatever
//! the input dtype, independently of the others: [`solver`] runs four users per AVX2 register
//! (one at a time on other CPUs), each lane on its own path, and a user gets the same bits
//! alone or in any group, so results depend neither on the thread count nor on the CPU.
//!
//! Notation: `J = ∂p/∂w` (`diag(p) − p pᵀ` for softmax, `I` for the identity), `z_i = d_i · p`,
//! `s_i = σ(−z_i)`, `g_p = −Σ s_i d_i`, `A = Σ s_i (1 − s_i) d_i d_iᵀ`.

// Index loops over K-sized vectors and K × K matrices say which entry is which.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use crate::batch::{check_forward_lengths, check_len, check_same_shape, Control, Start};
use crate::csr::Csr;
use crate::error::{non_finite, non_finite_result, shape, value, Error, Kind, Result};
use crate::real::Real;
use crate::simd::wide::{with_wide, Mask, Wide, WithWide};

mod solver;
use solver::{jacobian_times, lanes, map_weights, padded, pair_terms, row_dot, Feed, Rows, Solved, Work, MAX_LANES};

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

impl<'a, T> MapOutputs<'a, T> {
    /// The per-user solution and its report, without the optional outputs.
    pub fn solution(
        weights: &'a mut [T],
        iterations: &'a mut [i64],
        grad_norm: &'a mut [T],
        converged: &'a mut [bool],
    ) -> Self {
        MapOutputs {
            weights,
            iterations,
            grad_norm,
            converged,
            support_losses: None,
            losses: None,
            accuracy: None,
            covariance: None,
        }
    }
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

/// What every block of a call reads.
#[derive(Clone, Copy)]
struct Inputs<'a, T> {
    k: usize,
    start: Start<'a, T>,
    support: Csr<'a, T>,
    query: Option<Csr<'a, T>>,
    init: Option<&'a [T]>,
    lam: &'a [f64],
    settings: &'a MapSettings,
}

/// A value with `f(l)` in lane `l < m` and 0 in the others.
#[inline(always)]
fn gather<V: Wide>(m: usize, f: impl Fn(usize) -> f64) -> V {
    let mut lane = [0.0; MAX_LANES];
    for (l, x) in lane.iter_mut().enumerate().take(m) {
        *x = f(l);
    }
    V::load(&lane)
}

/// `out[(i + l) stride + offset]` = `x[l]`, for the group's `m` users from block index `i`.
#[inline(always)]
fn put<T: Real>(out: &mut [T], i: usize, m: usize, stride: usize, offset: usize, x: [f64; MAX_LANES]) {
    for l in 0..m {
        out[(i + l) * stride + offset] = T::of(x[l]);
    }
}

/// A group's forward values into `out` (from block index `i`, `m` users): the solution and its
/// report, the mean support loss, and with `query` (its loss and correct-pair sums and pairs)
/// the mean query loss and accuracy.
#[inline(always)]
fn put_values<T: Real, V: Wide>(
    out: &mut MapOutputs<'_, T>,
    (i, m): (usize, usize),
    ws: &Work<V>,
    solved: &Solved<V>,
    support: &Rows<V>,
    query: Option<(V, V, &Rows<V>)>,
) {
    let k = ws.w.len();
    for (j, &w) in ws.w.iter().enumerate() {
        put(out.weights, i, m, k, j, lanes(w));
    }
    let its = lanes(solved.iterations);
    for l in 0..m {
        out.iterations[i + l] = its[l] as i64;
        out.converged[i + l] = solved.converged.lane(l);
    }
    put(out.grad_norm, i, m, 1, 0, lanes(solved.grad_norm));
    if let Some(sl) = out.support_losses.as_deref_mut() {
        put(sl, i, m, 1, 0, mean_lanes(ws.loss, &support.count));
    }
    if let Some((loss, correct, rows)) = query {
        if let Some(ql) = out.losses.as_deref_mut() {
            put(ql, i, m, 1, 0, mean_lanes(loss, &rows.count));
        }
        if let Some(qa) = out.accuracy.as_deref_mut() {
            put(qa, i, m, 1, 0, mean_lanes(correct, &rows.count));
        }
    }
}

/// The rows of users `g..g + m` (empty slices after them).
fn group_rows<'c, T: Real>(csr: &Csr<'c, T>, g: usize, m: usize) -> [&'c [T]; MAX_LANES] {
    std::array::from_fn(|l| if l < m { csr.rows(g + l) } else { &[] })
}

/// `total / count` lane by lane (0 where a lane has no pairs).
#[inline(always)]
fn mean_lanes<V: Wide>(total: V, count: &[usize; MAX_LANES]) -> [f64; MAX_LANES] {
    let mut x = lanes(total);
    for (x, &c) in x.iter_mut().zip(count) {
        *x = if c == 0 { 0.0 } else { *x / c as f64 };
    }
    x
}

impl<T: Real> Inputs<'_, T> {
    /// A workspace with `λ` in every lane (the same for every user).
    #[inline(always)]
    fn work<V: Wide>(&self) -> Work<V> {
        let mut ws = Work::<V>::new(self.k);
        ws.lam.iter_mut().zip(self.lam).for_each(|(x, &l)| *x = V::splat(l));
        ws
    }

    /// The group of users `g..g + m` into the lanes (the others empty): `w0`, the starts into
    /// `w`, the support rows; with `query`, its rows too.
    #[inline(always)]
    fn load<V: Wide>(&self, g: usize, m: usize, ws: &mut Work<V>, rows: &mut Rows<V>, query: Option<&mut Rows<V>>) {
        for l in 0..V::N {
            self.load_start((l < m).then_some(g + l), l, ws);
        }
        rows.load(&group_rows(&self.support, g, m)[..m]);
        if let (Some(q), Some(rows)) = (&self.query, query) {
            rows.load(&group_rows(q, g, m)[..m]);
        }
    }

    /// User `u` into lane `l`: its `w0`, its start into `w` and its support rows.
    #[inline(always)]
    fn load_lane<V: Wide>(&self, u: usize, l: usize, ws: &mut Work<V>, rows: &mut Rows<V>) {
        self.load_start(Some(u), l, ws);
        rows.load_lane(l, self.support.rows(u));
    }

    /// Lane `l` of `w0` and `w`: user `u`'s `w0` and start (its warm start, else `w0`), or zeros.
    #[inline(always)]
    fn load_start<V: Wide>(&self, u: Option<usize>, l: usize, ws: &mut Work<V>) {
        let k = self.k;
        let (start, w) = (V::flat_mut(&mut ws.w0), V::flat_mut(&mut ws.w));
        for j in 0..k {
            let (a, b) = match u {
                Some(u) => {
                    let a = self.start.of(u, k)[j].to_f64();
                    (a, self.init.map_or(a, |x| x[u * k + j].to_f64()))
                }
                None => (0.0, 0.0),
            };
            start[j * V::N + l] = a;
            w[j * V::N + l] = b;
        }
    }

    /// [`map_forward`] for the users `lo..hi` (their outputs in `out`); `Some(u)` for the first
    /// user whose objective is not finite.
    #[inline(always)]
    fn forward_block<V: Wide>(&self, (lo, hi): (usize, usize), out: &mut MapOutputs<'_, T>) -> Option<usize> {
        if self.query.is_none() && out.covariance.is_none() {
            // the solution alone: a lane takes the next user as soon as its own ends
            let mut ws = self.work::<V>();
            let mut rows = Rows::new(self.k);
            let mut feed = Stream {
                inputs: self,
                out,
                lo,
                next: lo,
                hi,
                user: [0; MAX_LANES],
                failed: None,
            };
            ws.solve_all(&mut rows, self.settings, &mut feed);
            return feed.failed;
        }
        let (k, map) = (self.k, self.settings.weight_map);
        let mut ws = self.work::<V>();
        let (mut rows, mut qrows) = (Rows::new(k), Rows::new(k));
        let mut unit = vec![V::splat(0.0); k];
        let (mut qz, mut qs) = (Vec::new(), Vec::new());
        for g in (lo..hi).step_by(V::N) {
            let (m, i) = (V::N.min(hi - g), g - lo);
            self.load(g, m, &mut ws, &mut rows, Some(&mut qrows));
            let solved = ws.solve(&rows, self.settings);
            let mut bad = solved.failed;
            if let Some(cov) = out.covariance.as_deref_mut() {
                // Laplace covariance: H⁻¹ (exact, else Gauss–Newton)
                bad = bad.or(V::all_true().and_not(ws.factor_hessian(&rows, map, V::all_true())));
                for col in 0..k {
                    for (j, x) in unit.iter_mut().enumerate() {
                        *x = V::splat((j == col) as u8 as f64);
                    }
                    ws.solve_with_factor(&mut unit);
                    for (r, &x) in unit.iter().enumerate() {
                        put(cov, i, m, k * k, r * k + col, lanes(x));
                    }
                }
            }
            if let Some(l) = (0..m).find(|&l| bad.lane(l)) {
                return Some(g + l);
            }
            let query = self.query.is_some().then(|| {
                qz.resize(qrows.n, V::splat(0.0));
                qs.resize(qrows.n, V::splat(0.0));
                let (loss, correct) = pair_terms::<V, true>(&qrows, &ws.p, &mut qz, &mut qs);
                (loss, correct, &qrows)
            });
            put_values(out, (i, m), &ws, &solved, &rows, query);
        }
        None
    }

    /// [`map_backward`] for the users `lo..hi`: their row gradients into `gs` and `gq` (their
    /// rows only), per-user `w0` gradients into `gw` (else summed), forward values into
    /// `values`; returns the block's sums of the shared gradients.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn backward_block<V: Wide>(
        &self,
        (lo, hi): (usize, usize),
        grad_losses: &[T],
        gs: &mut [T],
        gq: &mut [T],
        mut gw: Option<&mut [T]>,
        mut values: Option<&mut MapOutputs<'_, T>>,
    ) -> BlockSums {
        let (k, map, settings) = (self.k, self.settings.weight_map, self.settings);
        let zero = V::splat(0.0);
        let mut ws = self.work::<V>();
        let (mut rows, mut qrows) = (Rows::new(k), Rows::new(k));
        // gq_p and mu meet the rows: padded (see `solver`)
        let kp = padded(k);
        let (mut gq_p, mut v, mut mu) = (vec![zero; kp], vec![zero; k], vec![zero; kp]);
        let (mut qz, mut qs, mut curvature) = (Vec::new(), Vec::new(), Vec::new());
        let mut w0_part = vec![0.0; k];
        let mut eta_part = vec![0.0; k];
        let (mut s_at, mut q_at) = (0, 0);
        for g in (lo..hi).step_by(V::N) {
            let (m, i) = (V::N.min(hi - g), g - lo);
            self.load(g, m, &mut ws, &mut rows, Some(&mut qrows));
            let solved = ws.solve(&rows, settings);
            // back at w*: s and g_p of the support rows are there; H (exact)
            let pd = ws.factor_hessian(&rows, map, V::none_true());
            let (its, gns) = (lanes(solved.iterations), lanes(solved.grad_norm));
            for l in 0..m {
                let u = g + l;
                if solved.failed.lane(l) {
                    return Err(Error::without_argument(
                        Kind::NonFinite,
                        format!("the MAP objective is not finite for user {u} (support rows too large for this dtype)"),
                    ));
                }
                if !solved.converged.lane(l) {
                    return Err(Error::new(
                        Kind::Value,
                        "max_iter",
                        format!(
                        "the MAP solve did not converge for user {u} (‖∇F‖∞ = {:.3e} after {} iterations, tol {:.1e}): \
                         its implicit gradient would be wrong; raise max_iter or tol",
                        gns[l], its[l] as usize, settings.tol
                    ),
                    ));
                }
                if !pd.lane(l) {
                    return Err(Error::new(
                        Kind::Value,
                        "eta",
                        format!(
                            "the Hessian of the MAP objective is not positive definite at the solution for user {u}: \
                         no implicit gradient (a stronger prior, larger eta, makes it so)"
                        ),
                    ));
                }
            }
            // query: L = mean softplus(−q·p), ∇_p (gl L) = −(gl/m) Σ σ(−z_j) q_j
            qz.resize(qrows.n, zero);
            qs.resize(qrows.n, zero);
            let (loss, correct) = pair_terms::<V, true>(&qrows, &ws.p, &mut qz, &mut qs);
            let scale = gather::<V>(m, |l| -grad_losses[g + l].to_f64() / qrows.count[l] as f64);
            qrows.weighted_sum(&qs, &mut gq_p);
            gq_p.iter_mut().for_each(|x| *x = x.mul(scale));
            qrows.scatter(&mut gq[q_at..], |j, col| scale.mul(qs[j]).mul(ws.p[col]));
            q_at += qrows.count.iter().sum::<usize>() * k;
            // v = H⁻¹ ḡ with ḡ = J ∇_p (gl · L), μ = J v
            jacobian_times(map, &ws.p[..k], &gq_p[..k], &mut v);
            ws.solve_with_factor(&mut v);
            jacobian_times(map, &ws.p[..k], &v, &mut mu[..k]);
            // ∂/∂w0 = Λ v, ∂/∂η = −Λ (w* − w0) v, summed over users in user order
            for j in 0..k {
                let (vj, wj, w0j, lam) = (lanes(v[j]), lanes(ws.w[j]), lanes(ws.w0[j]), self.lam[j]);
                for l in 0..m {
                    let gj = lam * vj[l];
                    match gw.as_deref_mut() {
                        Some(gw) => gw[(i + l) * k + j] = T::of(gj),
                        None => w0_part[j] += gj,
                    }
                    eta_part[j] -= lam * (wj[l] - w0j[l]) * vj[l];
                }
            }
            // ∂/∂d_i = s_i μ − s_i (1 − s_i)(μ · d_i) p
            curvature.resize(rows.n, zero);
            for ((c, d), &si) in curvature.iter_mut().zip(rows.pairs()).zip(&ws.s) {
                *c = si.mul(V::splat(1.0).sub(si)).mul(row_dot(d, &mu));
            }
            rows.scatter(&mut gs[s_at..], |j, col| {
                curvature[j].neg_mul_add(ws.p[col], ws.s[j].mul(mu[col]))
            });
            s_at += rows.count.iter().sum::<usize>() * k;
            if let Some(out) = values.as_deref_mut() {
                // every lane converged here (the others are errors above)
                put_values(out, (i, m), &ws, &solved, &rows, Some((loss, correct, &qrows)));
            }
        }
        Ok((w0_part, eta_part))
    }
}

/// The users `next..hi` of a block, streamed through the lanes by [`Work::solve_all`]; a
/// lane's results go to `out` as its solve ends.
struct Stream<'x, 'a, 'b, T> {
    inputs: &'x Inputs<'a, T>,
    out: &'x mut MapOutputs<'b, T>,
    /// The block's first user (`out` starts there).
    lo: usize,
    next: usize,
    hi: usize,
    /// The user in each lane.
    user: [usize; MAX_LANES],
    /// The first user whose objective is not finite.
    failed: Option<usize>,
}

impl<T: Real, V: Wide> Feed<V> for Stream<'_, '_, '_, T> {
    #[inline(always)]
    fn done(&mut self, l: usize, ws: &Work<V>, rows: &Rows<V>, end: &Solved<V>) {
        let (u, k) = (self.user[l], ws.w.len());
        let i = u - self.lo;
        for (j, &w) in ws.w.iter().enumerate() {
            self.out.weights[i * k + j] = T::of(lanes(w)[l]);
        }
        self.out.iterations[i] = lanes(end.iterations)[l] as i64;
        self.out.converged[i] = end.converged.lane(l);
        self.out.grad_norm[i] = T::of(lanes(end.grad_norm)[l]);
        if let Some(sl) = self.out.support_losses.as_deref_mut() {
            sl[i] = T::of(mean_lanes(ws.loss, &rows.count)[l]);
        }
        if end.failed.lane(l) {
            self.failed = Some(self.failed.map_or(u, |f| f.min(u)));
        }
    }

    #[inline(always)]
    fn next(&mut self, l: usize, ws: &mut Work<V>, rows: &mut Rows<V>) -> bool {
        if self.next == self.hi {
            rows.clear_lane(l);
            return false;
        }
        self.user[l] = self.next;
        self.inputs.load_lane(self.next, l, ws, rows);
        self.next += 1;
        true
    }
}

/// One block of [`map_forward`], for [`with_wide`].
struct ForwardJob<'x, 'a, 'b, T> {
    inputs: &'x Inputs<'a, T>,
    users: (usize, usize),
    out: &'x mut MapOutputs<'b, T>,
}

impl<T: Real> WithWide for ForwardJob<'_, '_, '_, T> {
    type Output = Option<usize>;
    #[inline(always)]
    fn run<V: Wide>(self) -> Option<usize> {
        self.inputs.forward_block::<V>(self.users, self.out)
    }
}

/// One block of [`map_backward`], for [`with_wide`].
struct BackwardJob<'x, 'a, 'b, T> {
    inputs: &'x Inputs<'a, T>,
    users: (usize, usize),
    grad_losses: &'x [T],
    gs: &'x mut [T],
    gq: &'x mut [T],
    gw: Option<&'x mut [T]>,
    values: Option<&'x mut MapOutputs<'b, T>>,
}

impl<T: Real> WithWide for BackwardJob<'_, '_, '_, T> {
    type Output = BlockSums;
    #[inline(always)]
    fn run<V: Wide>(self) -> BlockSums {
        self.inputs
            .backward_block::<V>(self.users, self.grad_losses, self.gs, self.gq, self.gw, self.values)
    }
}

/// `out`'s slices for the users `lo..hi`, cut into one [`MapOutputs`] per block.
fn split_outputs<'b, T>(
    out: &'b mut MapOutputs<'_, T>,
    lo: usize,
    hi: usize,
    rel: &[(usize, usize)],
    k: usize,
) -> Vec<MapOutputs<'b, T>> {
    let mut weights = pieces(&mut out.weights[lo * k..hi * k], rel, k).into_iter();
    let mut iterations = pieces(&mut out.iterations[lo..hi], rel, 1).into_iter();
    let mut grad_norm = pieces(&mut out.grad_norm[lo..hi], rel, 1).into_iter();
    let mut converged = pieces(&mut out.converged[lo..hi], rel, 1).into_iter();
    let per_user = |b: Option<&'b mut [T]>, unit: usize| {
        optional_pieces(b.map(|b| &mut b[lo * unit..hi * unit]), rel, unit).into_iter()
    };
    let mut support_losses = per_user(out.support_losses.as_deref_mut(), 1);
    let mut losses = per_user(out.losses.as_deref_mut(), 1);
    let mut accuracy = per_user(out.accuracy.as_deref_mut(), 1);
    let mut covariance = per_user(out.covariance.as_deref_mut(), k * k);
    rel.iter()
        .map(|_| MapOutputs {
            weights: weights.next().unwrap_or_default(),
            iterations: iterations.next().unwrap_or_default(),
            grad_norm: grad_norm.next().unwrap_or_default(),
            converged: converged.next().unwrap_or_default(),
            support_losses: support_losses.next().flatten(),
            losses: losses.next().flatten(),
            accuracy: accuracy.next().flatten(),
            covariance: covariance.next().flatten(),
        })
        .collect()
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
    pool: &rayon::ThreadPool,
) -> Result<()> {
    settings.validate()?;
    let (k, n_users) = (support.k, support.n_users());
    if k > MAX_K {
        return shape("support", format!("the MAP solver takes K <= {MAX_K}, got K = {k}"));
    }
    start.check(k, n_users)?;
    support.check_values("support", Some(pool))?;
    if let Some(init) = init {
        check_len("init", init, n_users * k)?;
        if let Some(pos) = init.iter().position(|x| !x.is_finite()) {
            return non_finite("init", format!("init contains a non-finite value (user {})", pos / k));
        }
    }
    Ok(())
}

fn check_query<T: Real>(
    support: &Csr<'_, T>,
    query: &Csr<'_, T>,
    require_rows: bool,
    pool: &rayon::ThreadPool,
) -> Result<()> {
    check_same_shape(support, query)?;
    query.check_values("query", Some(pool))?;
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
    mut out: MapOutputs<'_, T>,
    ctl: &Control<'_>,
) -> Result<()> {
    check_common(&start, &support, init, settings, ctl.pool)?;
    let (k, n_users) = (support.k, support.n_users());
    let lam = precisions(eta, k)?;
    if let Some(q) = &query {
        check_query(&support, q, false, ctl.pool)?;
    } else if out.losses.is_some() || out.accuracy.is_some() {
        return value("query", "query losses and accuracy need query rows");
    }
    check_forward_lengths(
        k,
        n_users,
        out.weights,
        [&out.support_losses, &out.losses, &out.accuracy],
    )?;
    check_len("iterations", out.iterations, n_users)?;
    check_len("grad_norm", out.grad_norm, n_users)?;
    check_len("converged", out.converged, n_users)?;
    if let Some(c) = &out.covariance {
        check_len("covariance", c, n_users * k * k)?;
    }
    let inputs = Inputs {
        k,
        start,
        support,
        query,
        init,
        lam: &lam,
        settings,
    };
    ctl.chunks(n_users, |lo, hi| {
        let blocks = blocks_of(lo, hi);
        let rel: Vec<(usize, usize)> = blocks.iter().map(|&(a, b)| (a - lo, b - lo)).collect();
        let work: Vec<_> = blocks
            .into_iter()
            .zip(split_outputs(&mut out, lo, hi, &rel, k))
            .collect();
        let failed: Option<usize> = ctl.pool.install(|| {
            work.into_par_iter()
                .map(|(users, mut out)| {
                    with_wide(ForwardJob {
                        inputs: &inputs,
                        users,
                        out: &mut out,
                    })
                })
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
    if let Some(pos) = out.weights.iter().position(|x| !x.is_finite()) {
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
    check_common(&start, &support, None, settings, ctl.pool)?;
    let (k, n_users) = (support.k, support.n_users());
    let lam = precisions(eta, k)?;
    check_query(&support, &query, true, ctl.pool)?;
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
    let inputs = Inputs {
        k,
        start,
        support,
        query: Some(query),
        init: None,
        lam: &lam,
        settings,
    };
    ctl.chunks(n_users, |lo, hi| {
        let blocks = blocks_of(lo, hi);
        let rel: Vec<(usize, usize)> = blocks.iter().map(|&(a, b)| (a - lo, b - lo)).collect();
        let s_lo = support.users(0, lo).values.len();
        let q_lo = query.users(0, lo).values.len();
        let s_len = support.users(lo, hi).values.len();
        let q_len = query.users(lo, hi).values.len();
        let gs = row_pieces(&mut grad_support[s_lo..s_lo + s_len], &support.users(lo, hi), &rel, k);
        let gq = row_pieces(&mut grad_query[q_lo..q_lo + q_len], &query.users(lo, hi), &rel, k);
        let gw = optional_pieces(per_user_w0.as_deref_mut().map(|b| &mut b[lo * k..hi * k]), &rel, k);
        let vals: Vec<Option<MapOutputs<'_, T>>> = match values.as_mut() {
            Some(v) => split_outputs(v, lo, hi, &rel, k).into_iter().map(Some).collect(),
            None => rel.iter().map(|_| None).collect(),
        };
        let work: Vec<_> = blocks.into_iter().zip(gs).zip(gq).zip(gw).zip(vals).collect();
        let results: Vec<BlockSums> = ctl.pool.install(|| {
            work.into_par_iter()
                .map(|((((users, gs), gq), gw), mut vals)| {
                    with_wide(BackwardJob {
                        inputs: &inputs,
                        users,
                        grad_losses,
                        gs,
                        gq,
                        gw,
                        values: vals.as_mut(),
                    })
                })
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
                        map_weights::<f64>(weight_map, w, p);
                        for row in rows.rows(u).chunks_exact(k) {
                            to_f64(row, f);
                            m[at] = T::of(f.iter().zip(p.iter()).map(|(a, b)| a * b).sum());
                            if let (Some(var), Some(c)) = (var.as_deref_mut(), covariance) {
                                jacobian_times::<f64>(weight_map, p, f, jf);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::lcg;

    /// Support rows and offsets, query rows and offsets, per-user starts.
    type Batch = (Vec<f64>, Vec<i64>, Vec<f64>, Vec<i64>, Vec<f64>);

    /// Users with 3 to 40 pairs (so groups mix lengths and padding), K = 5 (padded to 8).
    fn batch(n_users: usize, k: usize, seed: u64) -> Batch {
        let mut state = seed;
        let (mut so, mut qo) = (vec![0i64], vec![0i64]);
        for u in 0..n_users {
            so.push(so[u] + ((u * 7 + 3) % 41) as i64);
            qo.push(qo[u] + 1 + ((u * 5) % 9) as i64);
        }
        let mut values = |n: i64| -> Vec<f64> { (0..n as usize * k).map(|_| 1.5 * lcg(&mut state)).collect() };
        let support = values(so[n_users]);
        let query = values(qo[n_users]);
        let w0: Vec<f64> = (0..n_users * k).map(|i| 0.3 * ((i % 7) as f64 - 3.0) / 3.0).collect();
        (support, so, query, qo, w0)
    }

    /// Every output of one block, as bits.
    fn run_block<V: Wide>(inputs: &Inputs<'_, f64>, n_users: usize, k: usize, grad_losses: &[f64]) -> Vec<u64> {
        let mut weights = vec![0.0; n_users * k];
        let (mut its, mut gn, mut conv) = (vec![0i64; n_users], vec![0.0; n_users], vec![false; n_users]);
        let (mut sl, mut ql, mut qa) = (vec![0.0; n_users], vec![0.0; n_users], vec![0.0; n_users]);
        let mut cov = vec![0.0; n_users * k * k];
        let mut out = MapOutputs {
            weights: &mut weights,
            iterations: &mut its,
            grad_norm: &mut gn,
            converged: &mut conv,
            support_losses: Some(&mut sl),
            losses: Some(&mut ql),
            accuracy: Some(&mut qa),
            covariance: Some(&mut cov),
        };
        assert_eq!(inputs.forward_block::<V>((0, n_users), &mut out), None);
        // The solution alone streams the users through the lanes (a lane takes the next user
        // when its own solve ends): the same bits as solving them in fixed groups.
        let streamed = Inputs { query: None, ..*inputs };
        let mut w2 = vec![0.0; n_users * k];
        let (mut its2, mut gn2, mut conv2) = (vec![0i64; n_users], vec![0.0; n_users], vec![false; n_users]);
        let mut sl2 = vec![0.0; n_users];
        let mut out2 = MapOutputs::solution(&mut w2, &mut its2, &mut gn2, &mut conv2);
        out2.support_losses = Some(&mut sl2);
        assert_eq!(streamed.forward_block::<V>((0, n_users), &mut out2), None);
        let bits = |x: &[f64]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&w2), bits(&weights), "weights");
        assert_eq!(bits(&gn2), bits(&gn), "gradient norms");
        assert_eq!(bits(&sl2), bits(&sl), "support losses");
        assert_eq!((&its2, &conv2), (&its, &conv), "iterations, converged");
        let (support, query) = (inputs.support, inputs.query.unwrap());
        let (mut gs, mut gq, mut gw) = (
            vec![0.0; support.values.len()],
            vec![0.0; query.values.len()],
            vec![0.0; n_users * k],
        );
        let (_, eta) = inputs
            .backward_block::<V>((0, n_users), grad_losses, &mut gs, &mut gq, Some(&mut gw), None)
            .unwrap();
        let floats = weights.iter().chain(&gn).chain(&sl).chain(&ql).chain(&qa).chain(&cov);
        let grads = gs.iter().chain(&gq).chain(&gw).chain(&eta);
        let mut bits: Vec<u64> = floats.chain(grads).map(|x| x.to_bits()).collect();
        bits.extend(its.iter().map(|&i| i as u64).chain(conv.iter().map(|&c| c as u64)));
        bits
    }

    #[test]
    fn four_lanes_give_each_user_the_bits_it_gets_alone() {
        // K = 5 (padded to 8), 1 and 13; 30 users include one without support pairs (user 23)
        for (n_users, k, warm) in [(23, 5, false), (30, 1, true), (30, 13, true)] {
            four_lanes_case(n_users, k, warm);
        }
    }

    fn four_lanes_case(n_users: usize, k: usize, warm: bool) {
        let (support, so, query, qo, w0) = batch(n_users, k, 7);
        let starts: Vec<f64> = (0..n_users * k).map(|i| 0.2 * ((i % 5) as f64 - 2.0)).collect();
        let grad_losses: Vec<f64> = (0..n_users).map(|u| 0.1 + u as f64 / 10.0).collect();
        for weight_map in [WeightMap::Linear, WeightMap::Simplex] {
            let settings = MapSettings {
                max_iter: 100,
                tol: 1e-10,
                weight_map,
            };
            let lam: Vec<f64> = (0..k).map(|j| (0.2 * j as f64 - 0.3).exp()).collect();
            let inputs = Inputs {
                k,
                start: Start::PerUser(&w0),
                support: Csr::new("support", &support, &so, k).unwrap(),
                query: Some(Csr::new("query", &query, &qo, k).unwrap()),
                init: warm.then_some(&starts[..]),
                lam: &lam,
                settings: &settings,
            };
            let alone = run_block::<f64>(&inputs, n_users, k, &grad_losses);
            // the scalar path converged (and so is a fair reference)
            assert!(alone[alone.len() - n_users..].iter().all(|&c| c == 1), "{weight_map:?}");
            #[cfg(target_arch = "x86_64")]
            if crate::simd::avx2::Cpu::detect().is_some() {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn four(inputs: &Inputs<'_, f64>, n: usize, k: usize, gl: &[f64]) -> Vec<u64> {
                    run_block::<crate::simd::wide::avx2::F64x4>(inputs, n, k, gl)
                }
                // SAFETY: the CPU has AVX2 and FMA (just detected).
                let grouped = unsafe { four(&inputs, n_users, k, &grad_losses) };
                assert!(
                    alone == grouped,
                    "{weight_map:?}, K = {k}: four users per register changed some bits"
                );
            }
        }
    }
}
