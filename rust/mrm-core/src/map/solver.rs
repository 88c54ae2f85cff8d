//! The per-user MAP solve, written once over [`Wide`] lanes: lane `l` holds user `l` of a group
//! of [`Wide::N`] users (one with `f64`, four with AVX2). Each lane follows its own path, with
//! masks for "still iterating" and "still searching a step"; a lane's arithmetic never mixes with
//! another's, so a user gets the same bits alone or in any group.
//!
//! Rows are stored pair-major and transposed, `d[i K' + j]` = lane values of pair `i`, component
//! `j`, with `K'` = K rounded up to a multiple of 4 (zeros after K), so the passes over the rows
//! run in fixed chunks of four components, their sums in registers. A group is padded to its
//! longest user with zero rows, and `valid[i]` (1 or 0 per lane) keeps the padding out of the
//! losses (a zero row adds nothing to gradients or curvature). Vectors that meet the rows (`p`,
//! `g_p`) are K' long with zeros after K; the K × K algebra uses their first K values.

use super::{MapSettings, WeightMap, ARMIJO, MAX_HALVINGS, PRECISION_FLOOR};
use crate::real::Real;
use crate::simd::wide::{exp, ln_1p, Mask, Wide};

/// Most lanes of any [`Wide`] implementation.
pub(super) const MAX_LANES: usize = 4;

/// The lanes of `v` as plain values (the first `V::N` are meaningful).
#[inline(always)]
pub(super) fn lanes<V: Wide>(v: V) -> [f64; MAX_LANES] {
    let mut out = [0.0; MAX_LANES];
    v.store(&mut out);
    out
}

/// Components per stored pair: `k` rounded up to a multiple of 4.
pub(super) fn padded(k: usize) -> usize {
    k.div_ceil(CHUNK) * CHUNK
}

/// Components a row pass handles at a time.
const CHUNK: usize = 4;

/// One group's pairs (support or query), transposed into lanes.
pub(super) struct Rows<V> {
    k: usize,
    /// Stored components per pair ([`padded`] `k`).
    kp: usize,
    /// Pairs per lane (padding not counted).
    pub count: [usize; MAX_LANES],
    /// Pairs stored per lane: the largest count.
    pub n: usize,
    pub d: Vec<V>,
    pub valid: Vec<V>,
}

impl<V: Wide> Rows<V> {
    pub fn new(k: usize) -> Self {
        Rows {
            k,
            kp: padded(k),
            count: [0; MAX_LANES],
            n: 0,
            d: Vec::new(),
            valid: Vec::new(),
        }
    }

    /// Lane `l < users.len()` gets the rows `users[l]` (`count × K` values), the others none.
    #[inline(always)]
    pub fn load<T: Real>(&mut self, users: &[&[T]]) {
        self.count = [0; MAX_LANES];
        for (c, rows) in self.count.iter_mut().zip(users) {
            *c = rows.len() / self.k;
        }
        self.fit_longest();
        for l in 0..V::N {
            self.write_lane(l, users.get(l).copied().unwrap_or(&[]));
        }
    }

    /// Lane `l` gets the rows `rows` (`count × K` values) in place of its own; the other
    /// lanes keep theirs.
    #[inline(always)]
    pub fn load_lane<T: Real>(&mut self, l: usize, rows: &[T]) {
        self.count[l] = rows.len() / self.k;
        self.fit_longest();
        self.write_lane(l, rows);
    }

    /// Lane `l` of every stored pair: `rows` (its count already set), then zeros.
    #[inline(always)]
    fn write_lane<T: Real>(&mut self, l: usize, rows: &[T]) {
        let (k, kp, count) = (self.k, self.kp, self.count[l]);
        let valid = V::flat_mut(&mut self.valid);
        for (i, v) in valid.iter_mut().skip(l).step_by(V::N).enumerate() {
            *v = (i < count) as u8 as f64;
        }
        let d = V::flat_mut(&mut self.d);
        for (i, pair) in d.chunks_exact_mut(kp * V::N).enumerate() {
            let values = rows.get(i * k..(i + 1) * k).unwrap_or(&[]);
            for j in 0..k {
                pair[j * V::N + l] = values.get(j).map_or(0.0, |x| x.to_f64());
            }
        }
    }

    /// Lane `l` holds no user (what is left in it is not read for any other lane).
    #[inline(always)]
    pub fn clear_lane(&mut self, l: usize) {
        self.count[l] = 0;
        self.fit_longest();
    }

    /// Stores as many pairs as the longest lane has: new positions are zeros in every lane.
    #[inline(always)]
    fn fit_longest(&mut self) {
        self.n = self.count.iter().copied().max().unwrap_or(0);
        let zero = V::splat(0.0);
        self.d.resize(self.n * self.kp, zero);
        self.valid.resize(self.n, zero);
    }

    /// Writes `value(i, j)` for every real pair `i` and component `j` of each lane `l` to
    /// `out[start_l + i K + j]`, where lane `l`'s rows start after those of the lanes before it
    /// (the group's users are consecutive in their CSR batch, and so are their rows).
    #[inline(always)]
    pub fn scatter<T: Real>(&self, out: &mut [T], mut value: impl FnMut(usize, usize) -> V) {
        let k = self.k;
        let mut start = [0; MAX_LANES];
        for l in 1..MAX_LANES {
            start[l] = start[l - 1] + self.count[l - 1] * k;
        }
        for i in 0..self.n {
            for j in 0..k {
                let x = lanes(value(i, j));
                for l in 0..V::N {
                    if i < self.count[l] {
                        out[start[l] + i * k + j] = T::of(x[l]);
                    }
                }
            }
        }
    }

    /// The stored pairs, [`padded`] K values each.
    #[inline(always)]
    pub fn pairs(&self) -> std::slice::ChunksExact<'_, V> {
        self.d.chunks_exact(self.kp)
    }

    /// `out[j] = Σ_i x_i d_ij` for every stored component `j` (`out` is K' long), eight
    /// components per pass where there are (eight independent sums hide the FMA latency).
    #[inline(always)]
    pub fn weighted_sum(&self, x: &[V], out: &mut [V]) {
        let mut col = 0;
        while col < self.kp {
            if col + 2 * CHUNK <= self.kp {
                self.weighted_sum_block::<{ 2 * CHUNK }>(x, col, out);
                col += 2 * CHUNK;
            } else {
                self.weighted_sum_block::<CHUNK>(x, col, out);
                col += CHUNK;
            }
        }
    }

    #[inline(always)]
    fn weighted_sum_block<const W: usize>(&self, x: &[V], col: usize, out: &mut [V]) {
        let mut acc = [V::splat(0.0); W];
        for (d, &xi) in self.pairs().zip(x) {
            for (a, &dj) in acc.iter_mut().zip(&d[col..col + W]) {
                *a = xi.mul_add(dj, *a);
            }
        }
        out[col..col + W].copy_from_slice(&acc);
    }

    /// The upper triangle of `A = Σ_i c_i d_i d_iᵀ` (and `A[r + 1][r]` for even `r`) into `a`
    /// (K' × K'): rows two at a time, their columns from `r` on in blocks of six, four or two,
    /// each block's sums held in registers over all pairs.
    #[inline(always)]
    fn curvature(&self, c: &[V], a: &mut [V]) {
        let kp = self.kp;
        for r in (0..kp).step_by(2) {
            let mut col = r;
            while col < kp {
                match kp - col {
                    2 => self.curvature_block::<2>(c, r, col, a),
                    4 | 8 => self.curvature_block::<4>(c, r, col, a),
                    _ => self.curvature_block::<6>(c, r, col, a),
                }
                col += match kp - col {
                    2 => 2,
                    4 | 8 => 4,
                    _ => 6,
                };
            }
        }
    }

    /// Rows `r`, `r + 1`, columns `col..col + W` of `A`.
    #[inline(always)]
    fn curvature_block<const W: usize>(&self, c: &[V], r: usize, col: usize, a: &mut [V]) {
        let kp = self.kp;
        let (mut acc0, mut acc1) = ([V::splat(0.0); W], [V::splat(0.0); W]);
        for (d, &ci) in self.pairs().zip(c) {
            let (c0, c1) = (ci.mul(d[r]), ci.mul(d[r + 1]));
            for ((a0, a1), &dj) in acc0.iter_mut().zip(&mut acc1).zip(&d[col..col + W]) {
                *a0 = c0.mul_add(dj, *a0);
                *a1 = c1.mul_add(dj, *a1);
            }
        }
        a[r * kp + col..r * kp + col + W].copy_from_slice(&acc0);
        a[(r + 1) * kp + col..(r + 1) * kp + col + W].copy_from_slice(&acc1);
    }
}

/// How a group's solves ended, lane by lane.
#[derive(Clone, Copy, Debug)]
pub(super) struct Solved<V: Wide> {
    pub iterations: V,
    pub grad_norm: V,
    pub converged: V::Mask,
    /// The objective was not finite at the start or the gradient became non-finite.
    pub failed: V::Mask,
}

/// A solve's per-lane loop state.
struct Lanes<V: Wide> {
    /// `F` at `w`.
    f: V,
    /// Lanes taking Newton steps.
    active: V::Mask,
    /// Lanes whose last line search found no step: they stop at the next stop tests.
    finishing: V::Mask,
    end: Solved<V>,
}

impl<V: Wide> Lanes<V> {
    #[inline(always)]
    fn new(active: V::Mask, f: V) -> Self {
        let (zero, none) = (V::splat(0.0), V::none_true());
        Lanes {
            f,
            active,
            finishing: none,
            end: Solved {
                iterations: zero,
                grad_norm: zero,
                converged: none,
                failed: none,
            },
        }
    }

    /// The lanes of `fresh` hold new users: their counts start again.
    #[inline(always)]
    fn restart(&mut self, fresh: V::Mask) {
        let zero = V::splat(0.0);
        let end = &mut self.end;
        end.iterations = V::select(fresh, zero, end.iterations);
        end.grad_norm = V::select(fresh, zero, end.grad_norm);
        end.converged = end.converged.and_not(fresh);
        end.failed = end.failed.and_not(fresh);
    }
}

/// Where [`Work::solve_all`] sends the lanes whose solve ended, and finds the next users.
pub(super) trait Feed<V: Wide> {
    /// Lane `lane`'s solve ended: its values are in `ws` and `rows` (that lane), and `end`.
    fn done(&mut self, lane: usize, ws: &Work<V>, rows: &Rows<V>, end: &Solved<V>);
    /// Loads the next user into lane `lane` (`w0`, its start in `w`, its rows); false, with
    /// the lane left empty, when there is none.
    fn next(&mut self, lane: usize, ws: &mut Work<V>, rows: &mut Rows<V>) -> bool;
}

/// The mask of the lanes `l` with `flags[l]`.
#[inline(always)]
pub(super) fn mask_of<V: Wide>(flags: &[bool; MAX_LANES]) -> V::Mask {
    let mut x = [0.0; MAX_LANES];
    for (x, &f) in x.iter_mut().zip(flags) {
        *x = f as u8 as f64;
    }
    V::load(&x).gt(V::splat(0.0))
}

/// One thread's scratch for one group at a time.
pub(super) struct Work<V: Wide> {
    k: usize,
    pub w0: Vec<V>,
    pub lam: Vec<V>,
    pub w: Vec<V>,
    trial: Vec<V>,
    pub p: Vec<V>,
    p_trial: Vec<V>,
    pub gp: Vec<V>,
    pub grad: Vec<V>,
    step: Vec<V>,
    h: Vec<V>,
    t: Vec<V>,
    /// `A` in K' × K' (see [`Rows::curvature`]) and its per-pair weights `s_i (1 − s_i)`.
    a: Vec<V>,
    c: Vec<V>,
    chol: Vec<V>,
    inv_diag: Vec<V>,
    chol_gn: Vec<V>,
    inv_diag_gn: Vec<V>,
    pub z: Vec<V>,
    pub s: Vec<V>,
    s_trial: Vec<V>,
    /// `Σ softplus(−z_i)` of the support rows at `w`.
    pub loss: V,
}

impl<V: Wide> Work<V> {
    pub fn new(k: usize) -> Self {
        let zero = V::splat(0.0);
        let kp = padded(k);
        let v = || vec![zero; k];
        let m = || vec![zero; k * k];
        Work {
            k,
            w0: v(),
            lam: v(),
            w: v(),
            trial: v(),
            p: vec![zero; kp],
            p_trial: vec![zero; kp],
            gp: vec![zero; kp],
            grad: v(),
            step: v(),
            h: m(),
            t: m(),
            a: vec![zero; kp * kp],
            c: Vec::new(),
            chol: m(),
            inv_diag: v(),
            chol_gn: m(),
            inv_diag_gn: v(),
            z: Vec::new(),
            s: Vec::new(),
            s_trial: Vec::new(),
            loss: zero,
        }
    }

    /// Damped Newton (SPEC §7) from `w` for the group in the lanes, every lane on its own path.
    /// Leaves `w` = w*, and `p`, `s`, `loss`, `g_p`, `grad` at it, for every lane.
    #[inline(always)]
    pub fn solve(&mut self, rows: &Rows<V>, settings: &MapSettings) -> Solved<V> {
        let map = settings.weight_map;
        self.fit_pairs(rows);
        let (loss, f) = self.evaluate(map, rows, false);
        self.loss = loss;
        let mut st = Lanes::new(f.finite(), f);
        st.end.failed = V::all_true().and_not(f.finite());
        loop {
            self.stop_tests(map, rows, &mut st, settings);
            if !st.active.any() {
                break;
            }
            // the step matrix: the exact Hessian where it is positive definite, else Gauss–Newton;
            // lanes where neither factors (non-finite curvature) stop, not converged
            st.active = st.active.and(self.factor_hessian(rows, map, st.active));
            let direction = self.newton_step(st.f);
            let searching = st.active;
            let (left, _, _) = self.line_search(map, rows, &mut st, direction, searching, V::none_true());
            // no decrease left to find in this dtype: report the point as it is (its gradient
            // is taken at the top of the loop, where these lanes stop)
            st.active = st.active.and_not(left);
            st.finishing = left;
        }
        st.end
    }

    /// Damped Newton (SPEC §7) for every user `feed` has, [`Wide::N`] at a time: each lane
    /// takes the next user as soon as its own solve ends, and starts at once while the other
    /// lanes go on (its first evaluation joins their line search). Lanes never mix, so a user
    /// gets the same bits whichever lane holds it and whoever shares the group.
    #[inline(always)]
    pub fn solve_all(&mut self, rows: &mut Rows<V>, settings: &MapSettings, feed: &mut impl Feed<V>) {
        let map = settings.weight_map;
        let zero = V::splat(0.0);
        let mut loaded = [false; MAX_LANES];
        for (l, x) in loaded.iter_mut().enumerate().take(V::N) {
            *x = feed.next(l, self, rows);
        }
        let mut fresh = mask_of::<V>(&loaded);
        let mut st = Lanes::new(V::none_true(), zero);
        let mut searching = V::none_true();
        let mut direction = (zero, V::none_true());
        loop {
            self.fit_pairs(rows);
            let (left, started, failed_start) = self.line_search(map, rows, &mut st, direction, searching, fresh);
            st.active = st.active.or(started).and_not(left);
            st.finishing = left;
            st.end.failed = st.end.failed.or(failed_start);
            let stopping = self.stop_tests(map, rows, &mut st, settings);
            if st.active.any() {
                st.active = st.active.and(self.factor_hessian(rows, map, st.active));
            }
            let ended = stopping.and_not(st.active).or(failed_start);
            fresh = V::none_true();
            if ended.any() {
                let mut refilled = [false; MAX_LANES];
                for (l, r) in refilled.iter_mut().enumerate().take(V::N) {
                    if ended.lane(l) {
                        feed.done(l, self, rows, &st.end);
                        *r = feed.next(l, self, rows);
                    }
                }
                fresh = mask_of::<V>(&refilled);
                st.restart(fresh);
            }
            searching = st.active;
            if st.active.any() {
                direction = self.newton_step(st.f);
            } else if !fresh.any() {
                break;
            }
        }
    }

    /// The pair-sized scratch to the rows' length.
    #[inline(always)]
    fn fit_pairs(&mut self, rows: &Rows<V>) {
        let zero = V::splat(0.0);
        self.s.resize(rows.n, zero);
        self.s_trial.resize(rows.n, zero);
        self.z.resize(rows.n, zero);
    }

    /// The gradient at `w`, then the stop tests of the lanes that are iterating or finishing:
    /// a lane stops converged (‖∇F‖∞ ≤ tol), failed (not finite) or at `max_iter`; finishing
    /// lanes (no step found) stop here, converged or not. Returns the lanes tested.
    #[inline(always)]
    fn stop_tests(&mut self, map: WeightMap, rows: &Rows<V>, st: &mut Lanes<V>, settings: &MapSettings) -> V::Mask {
        let (tol, max_iter) = (V::splat(settings.tol), V::splat(settings.max_iter as f64));
        self.gradient(map, rows);
        let gn = self.grad.iter().fold(V::splat(0.0), |m, g| m.max(g.abs()));
        let stopping = st.active.or(st.finishing);
        let end = &mut st.end;
        end.grad_norm = V::select(stopping, gn, end.grad_norm);
        let bad = stopping.and_not(gn.finite());
        end.failed = end.failed.or(bad);
        let done = stopping.and_not(bad).and(gn.le(tol));
        end.converged = end.converged.or(done);
        st.active = st
            .active
            .and_not(bad)
            .and_not(done)
            .and_not(end.iterations.ge(max_iter));
        stopping
    }

    /// The Newton step `−H⁻¹ ∇F` (with the factor of `H` at hand) and its slope `step · ∇F`,
    /// with the lanes whose predicted decrease is resolvable in f64.
    #[inline(always)]
    fn newton_step(&mut self, f: V) -> (V, V::Mask) {
        for (s, g) in self.step.iter_mut().zip(&self.grad) {
            *s = g.neg();
        }
        solve_in_place(self.k, &self.chol, &self.inv_diag, &mut self.step);
        let slope = dot(&self.step, &self.grad);
        // Below this predicted decrease F cannot tell better from worse in f64: the full
        // Newton step is taken as it is (the quadratic model is exact to rounding there).
        let resolvable = slope
            .neg()
            .gt(V::splat(PRECISION_FLOOR).mul(V::splat(1.0).add(f.abs())));
        (slope, resolvable)
    }

    /// Backtracking (Armijo) along `step` from `w` for the lanes of `searching`, halving the
    /// step from 1; the lanes of `fresh` are evaluated at `w` itself (their start) in the first
    /// trial. Returns the lanes that found no step, the fresh lanes whose start is finite, and
    /// those whose start is not.
    #[inline(always)]
    fn line_search(
        &mut self,
        map: WeightMap,
        rows: &Rows<V>,
        st: &mut Lanes<V>,
        (slope, resolvable): (V, V::Mask),
        mut searching: V::Mask,
        fresh: V::Mask,
    ) -> (V::Mask, V::Mask, V::Mask) {
        let one = V::splat(1.0);
        let (mut started, mut failed_start) = (V::none_true(), V::none_true());
        let mut first = fresh;
        let mut t = one;
        for _ in 0..MAX_HALVINGS {
            if !searching.or(first).any() {
                break;
            }
            for ((x, &w), &s) in self.trial.iter_mut().zip(&self.w).zip(&self.step) {
                *x = V::select(first, w, t.mul_add(s, w));
            }
            let (loss_t, ft) = self.evaluate(map, rows, true);
            if first.any() {
                started = first.and(ft.finite());
                failed_start = first.and_not(ft.finite());
            }
            let armijo = ft.le(V::splat(ARMIJO).mul(t).mul_add(slope, st.f));
            let accept = searching
                .and(ft.finite())
                .and(armijo.or(V::all_true().and_not(resolvable)));
            let take = accept.or(started.and(first));
            if take.any() {
                st.f = V::select(take, ft, st.f);
                self.loss = V::select(take, loss_t, self.loss);
                st.end.iterations = V::select(accept, st.end.iterations.add(one), st.end.iterations);
                for (a, &b) in self.w.iter_mut().zip(&self.trial) {
                    *a = V::select(take, b, *a);
                }
                for (a, &b) in self.p.iter_mut().zip(&self.p_trial) {
                    *a = V::select(take, b, *a);
                }
                for (a, &b) in self.s.iter_mut().zip(&self.s_trial) {
                    *a = V::select(take, b, *a);
                }
                searching = searching.and_not(accept);
            }
            first = V::none_true();
            t = t.mul(V::splat(0.5));
        }
        (searching, started, failed_start)
    }

    /// `(Σ softplus(−z_i), F)` at `w` (or at `trial`), with `p`, `z` and `s` (or `p_trial`,
    /// `z` and `s_trial`) left there.
    #[inline(always)]
    fn evaluate(&mut self, map: WeightMap, rows: &Rows<V>, trial: bool) -> (V, V) {
        let k = self.k;
        let (w, p, s) = if trial {
            (&self.trial, &mut self.p_trial, &mut self.s_trial)
        } else {
            (&self.w, &mut self.p, &mut self.s)
        };
        map_weights(map, w, &mut p[..k]);
        let (loss, _) = pair_terms::<V, false>(rows, p, &mut self.z, s);
        let mut prior = V::splat(0.0);
        for ((&l, &a), &b) in self.lam.iter().zip(w).zip(&self.w0) {
            let d = a.sub(b);
            prior = l.mul(d).mul_add(d, prior);
        }
        (loss, V::splat(0.5).mul_add(prior, loss))
    }

    /// `g_p = −Σ s_i d_i`, then `∇F = J g_p + Λ (w − w0)` into `grad`.
    #[inline(always)]
    fn gradient(&mut self, map: WeightMap, rows: &Rows<V>) {
        let k = self.k;
        rows.weighted_sum(&self.s, &mut self.gp);
        self.gp.iter_mut().for_each(|g| *g = g.neg());
        jacobian_times(map, &self.p[..k], &self.gp[..k], &mut self.grad);
        for (((g, &l), &a), &b) in self.grad.iter_mut().zip(&self.lam).zip(&self.w).zip(&self.w0) {
            *g = l.mul_add(a.sub(b), *g);
        }
    }

    /// The Cholesky factor of the exact Hessian at the current point (needs `p`, `s`, `g_p`
    /// there), replaced by that of Gauss–Newton in the lanes of `fallback` where the Hessian is
    /// not positive definite. Returns the lanes with a factor.
    #[inline(always)]
    pub fn factor_hessian(&mut self, rows: &Rows<V>, map: WeightMap, fallback: V::Mask) -> V::Mask {
        let k = self.k;
        let one = V::splat(1.0);
        self.c.resize(rows.n, one);
        for (c, &s) in self.c.iter_mut().zip(&self.s) {
            *c = s.mul(one.sub(s));
        }
        rows.curvature(&self.c, &mut self.a);
        self.step_matrix(map, true);
        let exact = factor(k, &self.h, &mut self.chol, &mut self.inv_diag);
        let need_gn = fallback.and_not(exact);
        if !need_gn.any() {
            return exact;
        }
        self.step_matrix(map, false);
        let ok = factor(k, &self.h, &mut self.chol_gn, &mut self.inv_diag_gn);
        for (c, g) in self.chol.iter_mut().zip(&self.chol_gn) {
            *c = V::select(need_gn, *g, *c);
        }
        for (c, g) in self.inv_diag.iter_mut().zip(&self.inv_diag_gn) {
            *c = V::select(need_gn, *g, *c);
        }
        exact.or(need_gn.and(ok))
    }

    /// The step matrix into `h` from `A` (in `a`): with `exact`, `∇²F` (SPEC §2's HVP in sum
    /// form plus Λ), else Gauss–Newton `J A J + Λ`. Needs `p` and `g_p` at `w`.
    #[inline(always)]
    fn step_matrix(&mut self, map: WeightMap, exact: bool) {
        let (k, kp) = (self.k, padded(self.k));
        let (p, gp, t, h) = (&self.p[..k], &self.gp[..k], &mut self.t, &mut self.h);
        // A from its upper triangle
        let full: &mut [V] = if map == WeightMap::Linear { &mut *h } else { &mut *t };
        for r in 0..k {
            for col in 0..k {
                full[r * k + col] = self.a[r.min(col) * kp + r.max(col)];
            }
        }
        if map == WeightMap::Simplex {
            // J A J + (exact) J N, N = diag(g_p − c) − g_p pᵀ, c = p · g_p (the softmax
            // curvature), as J M with M = A J + N: t = A J row by row, t += N, then
            // h = p_r (M_rc − (pᵀ M)_c), its upper triangle mirrored (symmetric in exact arithmetic)
            for r in 0..k {
                let ar = &mut t[r * k..(r + 1) * k];
                let ap = dot(ar, p);
                for (x, &pc) in ar.iter_mut().zip(p) {
                    *x = x.sub(ap).mul(pc);
                }
            }
            if exact {
                let c = dot(p, gp);
                for r in 0..k {
                    for col in 0..k {
                        t[r * k + col] = gp[r].neg_mul_add(p[col], t[r * k + col]);
                    }
                    t[r * k + r] = t[r * k + r].add(gp[r].sub(c));
                }
            }
            for col in 0..k {
                let pm = (0..k).fold(V::splat(0.0), |acc, r| p[r].mul_add(t[r * k + col], acc));
                for r in 0..=col {
                    let x = p[r].mul(t[r * k + col].sub(pm));
                    h[r * k + col] = x;
                    h[col * k + r] = x;
                }
            }
        }
        for (j, &l) in self.lam.iter().enumerate() {
            h[j * k + j] = h[j * k + j].add(l);
        }
    }

    /// `x ← H⁻¹ x` with the factor of the last [`Work::factor_hessian`].
    #[inline(always)]
    pub fn solve_with_factor(&self, x: &mut [V]) {
        solve_in_place(self.k, &self.chol, &self.inv_diag, x);
    }
}

/// `p = map(w)`.
#[inline(always)]
pub(super) fn map_weights<V: Wide>(map: WeightMap, w: &[V], p: &mut [V]) {
    match map {
        WeightMap::Linear => p.copy_from_slice(w),
        WeightMap::Simplex => {
            let max = w[1..].iter().fold(w[0], |m, &x| x.max(m));
            let mut sum = V::splat(0.0);
            for (pi, &wi) in p.iter_mut().zip(w) {
                *pi = exp(wi.sub(max));
                sum = sum.add(*pi);
            }
            let inv = V::splat(1.0).div(sum);
            for pi in p.iter_mut() {
                *pi = pi.mul(inv);
            }
        }
    }
}

/// `out = J v` (J is symmetric for both maps).
#[inline(always)]
pub(super) fn jacobian_times<V: Wide>(map: WeightMap, p: &[V], v: &[V], out: &mut [V]) {
    match map {
        WeightMap::Linear => out.copy_from_slice(v),
        WeightMap::Simplex => {
            let pv = dot(p, v);
            for ((o, &pi), &vi) in out.iter_mut().zip(p).zip(v) {
                *o = pi.mul(vi.sub(pv));
            }
        }
    }
}

/// `d · p` for a stored pair and a K'-long `p`, four components at a time.
#[inline(always)]
pub(super) fn row_dot<V: Wide>(d: &[V], p: &[V]) -> V {
    let mut acc = V::splat(0.0);
    for (dc, pc) in d.chunks_exact(CHUNK).zip(p.chunks_exact(CHUNK)) {
        for (&x, &y) in dc.iter().zip(pc) {
            acc = x.mul_add(y, acc);
        }
    }
    acc
}

#[inline(always)]
pub(super) fn dot<V: Wide>(a: &[V], b: &[V]) -> V {
    a.iter().zip(b).fold(V::splat(0.0), |acc, (&x, &y)| x.mul_add(y, acc))
}

/// Margins `z_i = d_i · p` into `z`, then `s_i = σ(−z_i)` into `s`; returns `Σ softplus(−z_i)`
/// over the real pairs and (with `COUNT`, else 0) how many of them have `z_i > 0`. One
/// exponential per pair serves both; the margins go first, in a pass of their own, so that
/// pairs overlap in the CPU.
#[inline(always)]
pub(super) fn pair_terms<V: Wide, const COUNT: bool>(rows: &Rows<V>, p: &[V], z: &mut [V], s: &mut [V]) -> (V, V) {
    let (zero, one) = (V::splat(0.0), V::splat(1.0));
    for (zi, d) in z[..rows.n].iter_mut().zip(rows.pairs()) {
        *zi = row_dot(d, p);
    }
    // the exponentials in a pass of their own too: each is a long chain, the pairs' chains
    // are independent, and short loop bodies let the CPU run many of them at once
    for (si, &zi) in s[..rows.n].iter_mut().zip(&z[..rows.n]) {
        *si = exp(zi.abs().neg());
    }
    let mut total = zero;
    let mut correct = zero;
    for ((si, &zi), &valid) in s[..rows.n].iter_mut().zip(&z[..rows.n]).zip(&rows.valid) {
        let y = *si;
        let u = one.add(y);
        let inv = one.div(u);
        let softplus = zi.neg().max(zero).add(ln_1p(y, u, inv));
        total = valid.mul_add(softplus, total);
        if COUNT {
            correct = correct.add(V::select(zi.gt(zero), valid, zero));
        }
        *si = V::select(zi.ge(zero), y.mul(inv), inv);
    }
    (total, correct)
}

/// Cholesky factor of `h` into `chol` (lower) and the reciprocals of its diagonal; the lanes
/// where `h` is positive definite.
#[inline(always)]
fn factor<V: Wide>(k: usize, h: &[V], chol: &mut [V], inv_diag: &mut [V]) -> V::Mask {
    let zero = V::splat(0.0);
    let mut ok = V::all_true();
    for r in 0..k {
        for c in 0..=r {
            let mut sum = h[r * k + c];
            for j in 0..c {
                sum = chol[r * k + j].neg_mul_add(chol[c * k + j], sum);
            }
            if r == c {
                ok = ok.and(sum.gt(zero)).and(sum.finite());
                let d = sum.sqrt();
                chol[r * k + r] = d;
                inv_diag[r] = V::splat(1.0).div(d);
            } else {
                chol[r * k + c] = sum.mul(inv_diag[c]);
            }
        }
    }
    ok
}

/// Solves `h x = b` in place with the factor.
#[inline(always)]
fn solve_in_place<V: Wide>(k: usize, chol: &[V], inv_diag: &[V], x: &mut [V]) {
    for r in 0..k {
        let mut sum = x[r];
        for j in 0..r {
            sum = chol[r * k + j].neg_mul_add(x[j], sum);
        }
        x[r] = sum.mul(inv_diag[r]);
    }
    for r in (0..k).rev() {
        let mut sum = x[r];
        for j in r + 1..k {
            sum = chol[j * k + r].neg_mul_add(x[j], sum);
        }
        x[r] = sum.mul(inv_diag[r]);
    }
}
