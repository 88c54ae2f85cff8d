//! The Robust Personalization Objective over a batch of per-user losses (SPEC §3).

use crate::error::{invalid, Result};
use crate::real::{sigmoid, Real};

/// `torch.lerp` as computed on the CPU: `a + w (b − a)` for `w < 0.5`, else `b − (b − a)(1 − w)`.
#[inline]
fn lerp<T: Real>(a: T, b: T, w: T) -> T {
    if w < T::of(0.5) {
        a + w * (b - a)
    } else {
        b - (b - a) * (T::ONE - w)
    }
}

/// RPO objective and its gradient with respect to every loss.
///
/// `τ = quantile(L, 1 − tail)` (linear interpolation, `torch.quantile` semantics).
/// `gamma > 0`: `Σ_u σ((L_u − τ)/γ) L_u`, differentiated through σ and τ.
/// `gamma ≤ 0`: `Σ_u 1[L_u > τ] L_u` with a constant mask.
pub fn rpo<T: Real>(losses: &[T], tail: f64, gamma: f64) -> Result<(T, Vec<T>)> {
    if losses.is_empty() {
        return invalid("losses must contain at least one user");
    }
    if let Some(u) = losses.iter().position(|x| !x.is_finite()) {
        return invalid(format!("losses contains a non-finite value (user {u})"));
    }
    if !(tail.is_finite() && tail > 0.0 && tail <= 1.0) {
        return invalid(format!("tail must be in (0, 1], got {tail}"));
    }
    if !gamma.is_finite() {
        return invalid(format!("gamma must be finite, got {gamma}"));
    }
    let n = losses.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| losses[a].partial_cmp(&losses[b]).unwrap_or(std::cmp::Ordering::Equal));
    let rank = T::of(1.0 - tail) * T::of((n - 1) as f64);
    let below = (rank.to_f64().floor() as usize).min(n - 1);
    let above = (rank.to_f64().ceil() as usize).min(n - 1);
    let frac = rank - T::of(below as f64);
    let (i_below, i_above) = (order[below], order[above]);
    let tau = lerp(losses[i_below], losses[i_above], frac);

    let mut grad = vec![T::ZERO; n];
    let mut objective = T::ZERO;
    if gamma <= 0.0 {
        for (g, &l) in grad.iter_mut().zip(losses) {
            if l > tau {
                *g = T::ONE;
                objective += l;
            }
        }
        return Ok((objective, grad));
    }
    let gamma = T::of(gamma);
    // ∂obj/∂L_u = σ_u + L_u σ_u(1−σ_u)/γ − c ∂τ/∂L_u,  c = Σ_v L_v σ_v (1−σ_v)/γ
    let mut through_tau = T::ZERO;
    for (g, &l) in grad.iter_mut().zip(losses) {
        let s = sigmoid((l - tau) / gamma);
        let slope = l * s * (T::ONE - s) / gamma;
        objective += s * l;
        *g = s + slope;
        through_tau += slope;
    }
    grad[i_below] -= through_tau * (T::ONE - frac);
    grad[i_above] -= through_tau * frac;
    Ok((objective, grad))
}
