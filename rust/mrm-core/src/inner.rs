//! The inner loop's settings ([`InnerLoop`], its bounds), Adam's per-step constants, and the
//! per-user metrics (mean loss, accuracy) that the batch drivers share. The loop itself runs
//! eight users at a time in [`crate::group`]; the one-user loop it is checked against is the
//! test-only `crate::reference`.

use crate::error::{value, Result};
use crate::real::Real;

/// The inner optimiser.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    Sgd,
    /// `torch.optim.Adam` semantics, fresh state per user.
    Adam {
        beta1: f64,
        beta2: f64,
        eps: f64,
    },
}

/// The most inner steps one call may take. A step reads every support row once, so more would
/// be minutes of work per user; [`InnerLoop::validate`] rejects more (an error, not a clamp).
pub const MAX_STEPS: usize = 100_000;

/// The most bytes of inner trajectory the exact backward may keep for one group of eight users
/// (one per worker thread): `steps × (7·8·K + 2·n) × size_of(T)`, `n` the group's support rows.
/// A call that would need more is an error naming `steps` and the bytes, before any allocation.
pub const TRAJECTORY_BUDGET_BYTES: usize = 1 << 30;

/// The inner loop's hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InnerLoop {
    pub steps: usize,
    pub lr: f64,
    pub optimizer: Optimizer,
}

impl InnerLoop {
    pub fn validate(&self) -> Result<()> {
        if self.steps > MAX_STEPS {
            return value("steps", format!("steps must be <= {MAX_STEPS}, got {}", self.steps));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return value("lr", format!("lr must be finite and > 0, got {}", self.lr));
        }
        if let Optimizer::Adam { beta1, beta2, eps } = self.optimizer {
            for (name, b) in [("betas[0]", beta1), ("betas[1]", beta2)] {
                if !(b.is_finite() && (0.0..1.0).contains(&b)) {
                    return value(name, format!("{name} must be in [0, 1), got {b}"));
                }
            }
            if !(eps.is_finite() && eps > 0.0) {
                return value("eps", format!("eps must be finite and > 0, got {eps}"));
            }
        }
        Ok(())
    }
}

/// The constants of Adam's step `t` (1-based; `torch.optim.Adam` semantics):
/// `w −= c1 m / (sqrt(v) / c2 + ε)` with `c1 = α / (1 − β1^t)`, `c2 = sqrt(1 − β2^t)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamStep<T> {
    pub c1: T,
    pub c2: T,
    pub beta1: T,
    pub beta2: T,
    pub eps: T,
}

impl<T: Real> AdamStep<T> {
    pub(crate) fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, t: usize) -> Self {
        let t = t as i32;
        let (c1, c2) = (lr / (1.0 - beta1.powi(t)), (1.0 - beta2.powi(t)).sqrt());
        AdamStep {
            c1: T::of(c1),
            c2: T::of(c2),
            beta1: T::of(beta1),
            beta2: T::of(beta2),
            eps: T::of(eps),
        }
    }

    /// The constants of step `t` (0-based): from `table` (steps 1, 2, ...) when it has them.
    #[inline(always)]
    pub(crate) fn at(table: &[AdamStep<T>], lr: f64, beta1: f64, beta2: f64, eps: f64, t: usize) -> Self {
        match table.get(t) {
            Some(&step) => step,
            None => AdamStep::new(lr, beta1, beta2, eps, t + 1),
        }
    }
}

/// The share of values `> 0` (strict); 0 for none.
#[inline(always)]
pub(crate) fn positive_share<T: Real>(z: &[T]) -> T {
    if z.is_empty() {
        return T::ZERO;
    }
    T::of(z.iter().filter(|&&x| x > T::ZERO).count() as f64) / T::of(z.len() as f64)
}

/// The mean of `z`, summed in eight lanes in a fixed order; 0 for none.
#[inline(always)]
pub(crate) fn mean<T: Real>(z: &[T]) -> T {
    let n = z.len();
    if n == 0 {
        return T::ZERO;
    }
    let mut lanes = [T::ZERO; 8];
    let mut groups = z.chunks_exact(8);
    for g in &mut groups {
        for (a, &x) in lanes.iter_mut().zip(g) {
            *a += x;
        }
    }
    for (a, &x) in lanes.iter_mut().zip(groups.remainder()) {
        *a += x;
    }
    let total = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
    total / T::of(n as f64)
}
