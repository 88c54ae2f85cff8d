//! The one-user inner loop (SPEC §2) and its exact reverse-mode adjoint (SPEC §3), for the
//! tests only: the reference that the eight-user groups of [`crate::group`] are checked
//! against (it is the implementation the earlier releases ran, itself checked here against
//! finite differences).
//!
//! Notation: `p = softmax(w)`, `J = diag(p) − p pᵀ`, `z_i = d_i · p`, `s_i = σ(−z_i)`,
//! `g_p = −(1/n) Σ s_i d_i` (gradient in p), `g = J g_p` (gradient in w).

use crate::inner::{mean, positive_share, AdamStep, InnerLoop, Optimizer};
use crate::real::{dot, softmax_into, softmax_jvp, Real};
use crate::rows::RowOps;

/// Values in [-1, 1) from a fixed linear congruential sequence, for the tests.
pub(crate) fn lcg(seed: &mut u64) -> f64 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
}

/// SGD, and Adam with torch's default constants, for the tests.
pub(crate) fn optimizers() -> [Optimizer; 2] {
    [
        Optimizer::Sgd,
        Optimizer::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
    ]
}

/// Writes `g_p = −(1/n) Σ s_i d_i` of `rows` at `p` and every `s_i = σ(−z_i)` into `s`.
/// The inner steps never need the loss itself, so none is computed here.
#[inline(always)]
fn pairs_pass<T: Real, R: RowOps<T>>(ops: R, rows: &[T], k: usize, p: &[T], gp: &mut [T], s: &mut Vec<T>) {
    ops.margins(rows, k, p, s);
    ops.neg_sigmoids(s);
    ops.weighted_row_sums(rows, k, s, gp);
    let scale = -T::ONE / T::of(s.len() as f64);
    for g in gp.iter_mut() {
        *g *= scale;
    }
}

/// Mean loss and accuracy (strict `d · p > 0`) of `rows` at `p`; `(0, 0)` without rows.
/// `z` is scratch.
#[inline(always)]
pub(crate) fn loss_and_accuracy<T: Real, R: RowOps<T>>(
    ops: R,
    rows: &[T],
    k: usize,
    p: &[T],
    z: &mut Vec<T>,
) -> (T, T) {
    ops.margins(rows, k, p, z);
    let correct = positive_share(z);
    ops.neg_softplus(z);
    (mean(z), correct)
}

/// Per-thread scratch memory for one user at a time. Nothing here outlives a user.
pub(crate) struct Workspace<T> {
    p: Vec<T>,
    gp: Vec<T>,
    g: Vec<T>,
    m: Vec<T>,
    v: Vec<T>,
    lam: Vec<T>,
    lam_m: Vec<T>,
    lam_v: Vec<T>,
    lam_g: Vec<T>,
    mu: Vec<T>,
    a_mu: Vec<T>,
    tmp: Vec<T>,
    // Trajectory of the current user, step-major: pre-step p, g_p, g; post-step m, v; s_i.
    tr_p: Vec<T>,
    tr_gp: Vec<T>,
    tr_g: Vec<T>,
    tr_m: Vec<T>,
    tr_v: Vec<T>,
    tr_s: Vec<T>,
    /// Per-row scratch: `s_i` of the current step when no trajectory is kept, margins.
    rows: Vec<T>,
    /// Adam's constants of the first [`ADAM_TABLE`] steps, for the inner loop `adam_for`.
    adam: Vec<AdamStep<T>>,
    adam_for: Option<InnerLoop>,
}

/// Gives `buf` length `len`. Its values are left as they are: every buffer is written before it
/// is read within a user, except the Adam moments, which [`Workspace::adapt`] zeroes.
fn sized<T: Real>(buf: &mut Vec<T>, len: usize) {
    if buf.len() != len {
        buf.resize(len, T::ZERO);
    }
}

impl<T: Real> Default for Workspace<T> {
    fn default() -> Self {
        let e = Vec::new;
        Workspace {
            p: e(),
            gp: e(),
            g: e(),
            m: e(),
            v: e(),
            lam: e(),
            lam_m: e(),
            lam_v: e(),
            lam_g: e(),
            mu: e(),
            a_mu: e(),
            tmp: e(),
            tr_p: e(),
            tr_gp: e(),
            tr_g: e(),
            tr_m: e(),
            tr_v: e(),
            tr_s: e(),
            rows: e(),
            adam: Vec::new(),
            adam_for: None,
        }
    }
}

/// One Adam step on the K values of `w`, its moments `m`, `v` and gradient `g`.
#[inline(always)]
fn adam_step<T: Real>(c: &AdamStep<T>, w: &mut [T], m: &mut [T], v: &mut [T], g: &[T]) {
    let moments = m.iter_mut().zip(v.iter_mut());
    for ((wj, (mj, vj)), &gj) in w.iter_mut().zip(moments).zip(g) {
        *mj = c.beta1 * *mj + (T::ONE - c.beta1) * gj;
        *vj = c.beta2 * *vj + (T::ONE - c.beta2) * gj * gj;
        *wj -= c.c1 * *mj / (vj.sqrt() / c.c2 + c.eps);
    }
}

/// The adjoint of [`adam_step`]: from `λ` (of the updated `w`) and the step's
/// recorded `[m, v, g]` (after the step), updates the moments' adjoints `λ_m`, `λ_v`
/// (carried to the step before) and writes `λ_g`, the adjoint of the step's gradient.
#[inline(always)]
fn adam_adjoint<T: Real>(
    c: &AdamStep<T>,
    lam: &[T],
    recorded: [&[T]; 3],
    lam_m: &mut [T],
    lam_v: &mut [T],
    lam_g: &mut [T],
) {
    let [m, v, g] = recorded;
    let adjoints = lam_m.iter_mut().zip(lam_v.iter_mut()).zip(lam_g.iter_mut());
    for (((lm, lv), lg), (((&lam, &mj), &vj), &gj)) in adjoints.zip(lam.iter().zip(m).zip(v).zip(g)) {
        // w_t = w_{t−1} − c1 m / (sqrt(v)/c2 + ε)
        let root = vj.sqrt();
        let denom = root / c.c2 + c.eps;
        let lam_m = *lm - lam * c.c1 / denom;
        // ∂w/∂v = c1 m / (denom² · 2 c2 sqrt(v)); at v = 0 also m = 0: limit 0.
        let dw_dv = if root > T::ZERO {
            c.c1 * mj / (denom * denom * T::of(2.0) * c.c2 * root)
        } else {
            T::ZERO
        };
        let lam_v = *lv + lam * dw_dv;
        *lg = (T::ONE - c.beta1) * lam_m + T::of(2.0) * (T::ONE - c.beta2) * gj * lam_v;
        *lm = c.beta1 * lam_m;
        *lv = c.beta2 * lam_v;
    }
}

/// Steps whose Adam constants a workspace keeps (later ones are computed when needed).
const ADAM_TABLE: usize = 64;

impl<T: Real> Workspace<T> {
    fn prepare(&mut self, k: usize, steps: usize, n_support: usize, record: bool) {
        for b in [
            &mut self.p,
            &mut self.gp,
            &mut self.g,
            &mut self.m,
            &mut self.v,
            &mut self.lam,
            &mut self.lam_m,
            &mut self.lam_v,
            &mut self.lam_g,
            &mut self.mu,
            &mut self.a_mu,
            &mut self.tmp,
        ] {
            sized(b, k);
        }
        if record {
            for b in [
                &mut self.tr_p,
                &mut self.tr_gp,
                &mut self.tr_g,
                &mut self.tr_m,
                &mut self.tr_v,
            ] {
                sized(b, steps * k);
            }
            sized(&mut self.tr_s, steps * n_support);
        }
    }

    /// Runs the inner loop in place on `w` (holding the start on entry, `w_T` on exit).
    /// With `record`, keeps the trajectory for [`Workspace::backward`].
    #[inline(always)]
    pub(crate) fn adapt<R: RowOps<T>>(
        &mut self,
        ops: R,
        w: &mut [T],
        support: &[T],
        k: usize,
        inner: &InnerLoop,
        record: bool,
    ) {
        let n = support.len() / k;
        let steps = if n == 0 { 0 } else { inner.steps };
        self.prepare(k, steps, n, record);
        if let (Optimizer::Adam { beta1, beta2, eps }, true) =
            (inner.optimizer, steps > 0 && self.adam_for != Some(*inner))
        {
            let table = inner.steps.min(ADAM_TABLE);
            self.adam = (1..=table)
                .map(|t| AdamStep::new(inner.lr, beta1, beta2, eps, t))
                .collect();
            self.adam_for = Some(*inner);
        }
        // K-wide slices of a length the compiler knows when `ops` has a compile-time width.
        let k = ops.width(k);
        let w = &mut w[..k];
        let (p, gp, g, m, v) = (
            &mut self.p[..k],
            &mut self.gp[..k],
            &mut self.g[..k],
            &mut self.m[..k],
            &mut self.v[..k],
        );
        m.fill(T::ZERO);
        v.fill(T::ZERO);
        let lr = T::of(inner.lr);
        for t in 0..steps {
            softmax_into(w, p);
            pairs_pass(ops, support, k, p, gp, &mut self.rows);
            softmax_jvp(p, gp, g);
            if record {
                self.tr_s[t * n..(t + 1) * n].copy_from_slice(&self.rows);
                self.tr_p[t * k..(t + 1) * k].copy_from_slice(p);
                self.tr_gp[t * k..(t + 1) * k].copy_from_slice(gp);
                self.tr_g[t * k..(t + 1) * k].copy_from_slice(g);
            }
            match inner.optimizer {
                Optimizer::Sgd => {
                    for (wi, &gi) in w.iter_mut().zip(g.iter()) {
                        *wi -= lr * gi;
                    }
                }
                Optimizer::Adam { beta1, beta2, eps } => {
                    let step = AdamStep::at(&self.adam, inner.lr, beta1, beta2, eps, t);
                    adam_step(&step, w, m, v, g);
                    if record {
                        self.tr_m[t * k..(t + 1) * k].copy_from_slice(m);
                        self.tr_v[t * k..(t + 1) * k].copy_from_slice(v);
                    }
                }
            }
        }
    }

    /// Support loss at `w` (0 for a user without support pairs).
    #[inline(always)]
    pub(crate) fn support_loss<R: RowOps<T>>(&mut self, ops: R, w: &[T], support: &[T], k: usize) -> T {
        softmax_into(w, &mut self.p);
        loss_and_accuracy(ops, support, k, &self.p, &mut self.rows).0
    }

    /// Query loss and accuracy at `w`.
    #[inline(always)]
    pub(crate) fn query_metrics<R: RowOps<T>>(&mut self, ops: R, w: &[T], query: &[T], k: usize) -> (T, T) {
        softmax_into(w, &mut self.p);
        loss_and_accuracy(ops, query, k, &self.p, &mut self.rows)
    }

    /// Exact gradient of `grad_loss · L(w_T(w0, S); Q)` with respect to `w0` (into `grad_w0`),
    /// every support row (into `grad_support`) and every query row (into `grad_query`).
    /// Recomputes the trajectory. `first_order` treats the inner gradients as constants.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(crate) fn backward<R: RowOps<T>>(
        &mut self,
        ops: R,
        w0: &[T],
        support: &[T],
        query: &[T],
        k: usize,
        grad_loss: T,
        inner: &InnerLoop,
        first_order: bool,
        grad_w0: &mut [T],
        grad_support: &mut [T],
        grad_query: &mut [T],
    ) {
        let n = support.len() / k;
        let m_q = query.len() / k;
        let steps = if n == 0 { 0 } else { inner.steps };
        grad_w0.copy_from_slice(w0);
        // grad_w0 holds w during the forward sweep, then the adjoint λ_w.
        self.adapt(ops, grad_w0, support, k, inner, true);

        // Query: L_q = mean_j softplus(−q_j·p_T); ∂/∂q_j = −(1/m) s_j p_T; ∂/∂w_T = J g_p.
        softmax_into(grad_w0, &mut self.p);
        let scale = -grad_loss / T::of(m_q as f64);
        ops.margins(query, k, &self.p, &mut self.rows);
        ops.neg_sigmoids(&mut self.rows);
        ops.weighted_row_sums(query, k, &self.rows, &mut self.gp);
        ops.outer(grad_query, k, scale, &self.rows, &self.p, false);
        for x in self.gp.iter_mut() {
            *x *= scale;
        }
        softmax_jvp(&self.p, &self.gp, &mut self.lam);
        grad_support.fill(T::ZERO);

        if first_order || steps == 0 {
            grad_w0.copy_from_slice(&self.lam);
            return;
        }
        self.lam_m.fill(T::ZERO);
        self.lam_v.fill(T::ZERO);
        let lr = T::of(inner.lr);
        for t in (0..steps).rev() {
            let r = t * k..(t + 1) * k;
            // λ_g: adjoint of this step's gradient g_t, from the update rule.
            match inner.optimizer {
                Optimizer::Sgd => {
                    for (lg, &lam) in self.lam_g.iter_mut().zip(&self.lam) {
                        *lg = -lr * lam;
                    }
                }
                Optimizer::Adam { beta1, beta2, eps } => {
                    let step = AdamStep::at(&self.adam, inner.lr, beta1, beta2, eps, t);
                    let recorded = [&self.tr_m[r.clone()], &self.tr_v[r.clone()], &self.tr_g[r.clone()]];
                    adam_adjoint(
                        &step,
                        &self.lam,
                        recorded,
                        &mut self.lam_m,
                        &mut self.lam_v,
                        &mut self.lam_g,
                    );
                }
            }
            // λ_{w,t−1} = λ_{w,t} + H_t λ_g, and each support row gets ∂(λ_g · g_t)/∂d_i.
            hvp_and_row_grads(
                ops,
                support,
                k,
                &self.tr_p[r.clone()],
                &self.tr_gp[r.clone()],
                &self.tr_s[t * n..(t + 1) * n],
                &self.lam_g,
                &mut self.mu,
                &mut self.a_mu,
                &mut self.tmp,
                &mut self.rows,
                grad_support,
            );
            for (lam, &hvp) in self.lam.iter_mut().zip(&self.mu) {
                *lam += hvp;
            }
        }
        grad_w0.copy_from_slice(&self.lam);
    }
}

/// For one inner step at `p` (with its `g_p` and `s_i`): writes `H λ` into `hvp` and adds
/// `∂(λ · ∇_w L)/∂d_i` to each row of `grad_rows` (SPEC §2). `a_mu`, `tmp` and `c_vals` are scratch.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn hvp_and_row_grads<T: Real, R: RowOps<T>>(
    ops: R,
    rows: &[T],
    k: usize,
    p: &[T],
    gp: &[T],
    s_vals: &[T],
    lam: &[T],
    hvp: &mut [T],
    a_mu: &mut [T],
    tmp: &mut [T],
    c_vals: &mut Vec<T>,
    grad_rows: &mut [T],
) {
    let k = ops.width(k);
    let inv_n = T::ONE / T::of((rows.len() / k) as f64);
    let mu = &mut tmp[..k];
    let (p, gp, lam) = (&p[..k], &gp[..k], &lam[..k]);
    softmax_jvp(p, lam, mu);
    // c_i = s_i (1 − s_i)(μ · d_i);  ∂/∂d_i = −(1/n)[s_i μ − c_i p]
    ops.margins(rows, k, mu, c_vals);
    for (c, &s) in c_vals.iter_mut().zip(s_vals) {
        *c *= s * (T::ONE - s);
    }
    ops.weighted_row_sums(rows, k, c_vals, a_mu);
    ops.sub_rank2(grad_rows, k, inv_n, s_vals, mu, c_vals, p);
    // H λ = J[(g_p − (p·g_p)) ⊙ λ − g_p (p·λ) + A μ],  A μ = (1/n) Σ c_i d_i
    let p_gp = dot(p, gp);
    let p_lam = dot(p, lam);
    for ((a, &gpj), &lj) in a_mu[..k].iter_mut().zip(gp).zip(lam) {
        *a = (gpj - p_gp) * lj - gpj * p_lam + inv_n * *a;
    }
    softmax_jvp(p, &a_mu[..k], hvp);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::real::{softmax_into, softmax_jvp};
    use crate::rows::Portable;

    /// ∇_w L at `w` through the closed forms (g = J g_p).
    fn gradient(w: &[f64], rows: &[f64], k: usize) -> Vec<f64> {
        let (mut p, mut gp, mut g) = (vec![0.0; k], vec![0.0; k], vec![0.0; k]);
        softmax_into(w, &mut p);
        let mut s = Vec::new();
        pairs_pass(Portable::<0>, rows, k, &p, &mut gp, &mut s);
        softmax_jvp(&p, &gp, &mut g);
        g
    }

    fn loss(w: &[f64], rows: &[f64], k: usize) -> f64 {
        let mut p = vec![0.0; k];
        softmax_into(w, &mut p);
        loss_and_accuracy(Portable::<0>, rows, k, &p, &mut Vec::new()).0
    }

    /// `n` rows of K values uniform in `[-scale, scale)`, then K weights in `[-1, 1)`.
    fn rows_and_weights(k: usize, n: usize, scale: f64, seed: &mut u64) -> (Vec<f64>, Vec<f64>) {
        let rows = (0..n * k).map(|_| scale * lcg(seed)).collect();
        let w = (0..k).map(|_| lcg(seed)).collect();
        (rows, w)
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (k, mut seed) = (5, 1);
        let (rows, w) = rows_and_weights(k, 7, 2.0, &mut seed);
        let g = gradient(&w, &rows, k);
        let h = 1e-6;
        for j in 0..k {
            let (mut plus, mut minus) = (w.clone(), w.clone());
            plus[j] += h;
            minus[j] -= h;
            let fd = (loss(&plus, &rows, k) - loss(&minus, &rows, k)) / (2.0 * h);
            assert!((fd - g[j]).abs() < 1e-9, "coordinate {j}: fd {fd} vs {}", g[j]);
        }
    }

    #[test]
    fn hvp_and_row_gradients_match_finite_differences() {
        let (k, n, mut seed) = (4, 6, 7);
        let (rows, w) = rows_and_weights(k, n, 1.5, &mut seed);
        let lam: Vec<f64> = (0..k).map(|_| lcg(&mut seed)).collect();
        let (mut p, mut gp, mut s) = (vec![0.0; k], vec![0.0; k], Vec::new());
        softmax_into(&w, &mut p);
        pairs_pass(Portable::<0>, &rows, k, &p, &mut gp, &mut s);
        let (mut hvp, mut a, mut t) = (vec![0.0; k], vec![0.0; k], vec![0.0; k]);
        let mut row_grads = vec![0.0; n * k];
        hvp_and_row_grads(
            Portable::<4>,
            &rows,
            k,
            &p,
            &gp,
            &s,
            &lam,
            &mut hvp,
            &mut a,
            &mut t,
            &mut Vec::new(),
            &mut row_grads,
        );

        let h = 1e-6;
        // H λ = d/dε ∇L(w + ε λ)
        let shifted = |eps: f64| -> Vec<f64> {
            let ws: Vec<f64> = w.iter().zip(&lam).map(|(a, b)| a + eps * b).collect();
            gradient(&ws, &rows, k)
        };
        let (gp_plus, gp_minus) = (shifted(h), shifted(-h));
        for j in 0..k {
            let fd = (gp_plus[j] - gp_minus[j]) / (2.0 * h);
            assert!((fd - hvp[j]).abs() < 1e-8, "Hλ[{j}]: fd {fd} vs {}", hvp[j]);
        }
        // ∂(λ · ∇L)/∂d_i
        let objective = |r: &[f64]| -> f64 { gradient(&w, r, k).iter().zip(&lam).map(|(a, b)| a * b).sum() };
        for idx in 0..n * k {
            let (mut plus, mut minus) = (rows.clone(), rows.clone());
            plus[idx] += h;
            minus[idx] -= h;
            let fd = (objective(&plus) - objective(&minus)) / (2.0 * h);
            assert!(
                (fd - row_grads[idx]).abs() < 1e-8,
                "row value {idx}: fd {fd} vs {}",
                row_grads[idx]
            );
        }
    }

    /// One user's adapted weights, support and query losses and all three gradients.
    fn user_run<T: Real, R: RowOps<T>>(
        ops: R,
        w0: &[T],
        support: &[T],
        query: &[T],
        k: usize,
        inner: &InnerLoop,
    ) -> Vec<f64> {
        let mut ws = Workspace::<T>::default();
        let mut w = w0.to_vec();
        ws.adapt(ops, &mut w, support, k, inner, false);
        let support_loss = ws.support_loss(ops, &w, support, k);
        let (query_loss, _) = ws.query_metrics(ops, &w, query, k);
        let (mut gw, mut gs, mut gq) = (
            vec![T::ZERO; k],
            vec![T::ZERO; support.len()],
            vec![T::ZERO; query.len()],
        );
        ws.backward(
            ops,
            w0,
            support,
            query,
            k,
            T::of(0.7),
            inner,
            false,
            &mut gw,
            &mut gs,
            &mut gq,
        );
        let mut out: Vec<f64> = [support_loss, query_loss].iter().map(|x| x.to_f64()).collect();
        out.extend(w.iter().chain(&gw).chain(&gs).chain(&gq).map(|x| x.to_f64()));
        out
    }

    /// The f32 kernels this CPU runs (hand-vectorised ones where it has them) give the same
    /// inner loop and gradients as the f64 portable ones, to f32 rounding, for ragged users.
    #[test]
    fn f32_kernels_match_f64_portable_kernels() {
        use crate::dispatch::{with_row_ops, WithRowOps};
        struct Run<'a> {
            w0: &'a [f32],
            support: &'a [f32],
            query: &'a [f32],
            k: usize,
            inner: &'a InnerLoop,
        }
        impl WithRowOps<f32> for Run<'_> {
            type Output = Vec<f64>;
            fn run<R: RowOps<f32>>(self, ops: R) -> Vec<f64> {
                user_run(ops, self.w0, self.support, self.query, self.k, self.inner)
            }
        }
        let mut seed = 11;
        for k in [2, 8, 16, 64] {
            for n in [0, 1, 3, 7, 8, 9, 17, 40] {
                for optimizer in optimizers() {
                    let inner = InnerLoop {
                        steps: 3,
                        lr: 0.3,
                        optimizer,
                    };
                    let support: Vec<f64> = (0..n * k).map(|_| lcg(&mut seed)).collect();
                    let query: Vec<f64> = (0..5 * k).map(|_| lcg(&mut seed)).collect();
                    let w0: Vec<f64> = (0..k).map(|_| 0.5 * lcg(&mut seed)).collect();
                    let narrow = |v: &[f64]| -> Vec<f32> { v.iter().map(|&x| x as f32).collect() };
                    let (s32, q32, w32) = (narrow(&support), narrow(&query), narrow(&w0));
                    let want = user_run(Portable::<0>, &w0, &support, &query, k, &inner);
                    let got = with_row_ops(
                        k,
                        Run {
                            w0: &w32,
                            support: &s32,
                            query: &q32,
                            k,
                            inner: &inner,
                        },
                    );
                    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 * scale,
                            "K {k} n {n} {optimizer:?} value {i}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
