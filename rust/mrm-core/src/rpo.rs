//! The Robust Personalization Objective over a batch of per-user losses (SPEC §3).

use crate::error::{non_finite, shape, value, Result};
use crate::real::Real;

/// `torch.lerp` as computed on the CPU: `a + w (b − a)` for `w < 0.5`, else `b − (b − a)(1 − w)`.
#[inline]
fn lerp<T: Real>(a: T, b: T, w: T) -> T {
    if w < T::of(0.5) {
        a + w * (b - a)
    } else {
        b - (b - a) * (T::ONE - w)
    }
}

/// `τ` between `a` and `b`: [`lerp`] (torch's bits) where `b − a` is finite, else the
/// convex combination in f64, which cannot overflow for finite `a`, `b`.
#[inline]
fn quantile_between<T: Real>(a: T, b: T, w: T) -> T {
    let tau = lerp(a, b, w);
    if tau.is_finite() {
        return tau;
    }
    let (a, b, w) = (a.to_f64(), b.to_f64(), w.to_f64());
    T::of((1.0 - w) * a + w * b)
}

/// `σ(x)` and `σ'(x) = σ(x)(1 − σ(x))`, both without overflow or cancellation for any `x`
/// (including ±∞): `σ' = e^{−|x|} / (1 + e^{−|x|})²`.
#[inline]
fn sigmoid_and_slope(x: f64) -> (f64, f64) {
    let e = (-x.abs()).exp();
    let s = if x >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
    (s, e / ((1.0 + e) * (1.0 + e)))
}

/// RPO objective and its gradient with respect to every loss.
///
/// `τ = quantile(L, 1 − tail)` (linear interpolation, `torch.quantile` semantics).
/// `gamma > 0`: `Σ_u σ((L_u − τ)/γ) L_u`, differentiated through σ and τ.
/// `gamma ≤ 0`: `Σ_u 1[L_u > τ] L_u` with a constant mask.
///
/// The smooth objective is computed in f64 (for f32 losses too), with the terms that cancel
/// exactly (a loss that is τ itself) cancelled in the formula, not in rounding. A result that
/// does not fit the dtype (losses near its largest value; `gamma` so small that the gradient
/// of a loss within `gamma` of τ is beyond it) is an error naming `losses` or `gamma`.
pub fn rpo<T: Real>(losses: &[T], tail: f64, gamma: f64) -> Result<(T, Vec<T>)> {
    if losses.is_empty() {
        return shape("losses", "losses must contain at least one user");
    }
    if let Some(u) = losses.iter().position(|x| !x.is_finite()) {
        return non_finite("losses", format!("losses contains a non-finite value (user {u})"));
    }
    if !(tail.is_finite() && tail > 0.0 && tail <= 1.0) {
        return value("tail", format!("tail must be in (0, 1], got {tail}"));
    }
    if !gamma.is_finite() {
        return value("gamma", format!("gamma must be finite, got {gamma}"));
    }
    let n = losses.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| losses[a].partial_cmp(&losses[b]).unwrap_or(std::cmp::Ordering::Equal));
    let rank = T::of(1.0 - tail) * T::of((n - 1) as f64);
    let below = (rank.to_f64().floor() as usize).min(n - 1);
    let above = (rank.to_f64().ceil() as usize).min(n - 1);
    let frac = rank - T::of(below as f64);
    let (i_below, i_above) = (order[below], order[above]);
    let tau = quantile_between(losses[i_below], losses[i_above], frac);

    let mut grad = vec![T::ZERO; n];
    if gamma <= 0.0 {
        let mut objective = 0.0f64;
        for (g, &l) in grad.iter_mut().zip(losses) {
            if l > tau {
                *g = T::ONE;
                objective += l.to_f64();
            }
        }
        return Ok((finite_objective(objective)?, grad));
    }
    // ∂obj/∂L_u = σ_u + c_u − c ∂τ/∂L_u,  c_v = L_v σ'_v / γ,  c = Σ_v c_v,
    // ∂τ/∂L = 1 − frac at i_below and frac at i_above (both 1 at one index when they coincide).
    let (tau, frac) = (tau.to_f64(), frac.to_f64());
    let mut objective = 0.0f64;
    let (mut slope, mut sig) = (vec![0.0f64; n], vec![0.0f64; n]);
    let mut rest = 0.0f64; // Σ c_v over the losses other than i_below and i_above
    for (u, &l) in losses.iter().enumerate() {
        let l = l.to_f64();
        let (s, ds) = sigmoid_and_slope((l - tau) / gamma);
        objective += s * l;
        (sig[u], slope[u]) = (s, l * ds / gamma);
        if u != i_below && u != i_above {
            rest += slope[u];
        }
    }
    let objective = finite_objective(objective)?;
    for (g, (&s, &c)) in grad.iter_mut().zip(sig.iter().zip(&slope)) {
        *g = T::of(s + c);
    }
    if i_below == i_above {
        // τ is this loss itself: its own σ term is constant in it (c_u − c_u, dropped).
        grad[i_below] = T::of(sig[i_below] - rest);
    } else {
        let (ca, cb) = (slope[i_below], slope[i_above]);
        // The two large slopes of losses near τ first, so that what cancels cancels exactly.
        grad[i_below] = T::of(sig[i_below] + (frac * ca - (1.0 - frac) * cb) - (1.0 - frac) * rest);
        grad[i_above] = T::of(sig[i_above] + ((1.0 - frac) * cb - frac * ca) - frac * rest);
    }
    if let Some(u) = grad.iter().position(|g| !g.is_finite()) {
        return value(
            "gamma",
            format!(
                "gamma = {gamma:e} is too small for these losses: the gradient of user {u}'s loss overflows \
             (a loss within gamma of the quantile weighs about loss / gamma); use a larger gamma, or \
             gamma <= 0 for the hard mask"
            ),
        );
    }
    Ok((objective, grad))
}

/// The objective in the losses' dtype, or an error naming `losses` when it overflows there.
fn finite_objective<T: Real>(objective: f64) -> Result<T> {
    let value = T::of(objective);
    if !value.is_finite() {
        return non_finite(
            "losses",
            format!("losses are too large: the RPO objective (about {objective:e}) overflows their dtype"),
        );
    }
    Ok(value)
}
