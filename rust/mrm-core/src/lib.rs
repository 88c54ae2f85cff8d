//! mrm-core: native kernels for Meta Reward Modeling (see SPEC.md in the project).
//!
//! Pure Rust, no Python: ragged per-user CSR batches in, slices out. Every entry point
//! validates its input and returns an [`Error`] (its [`Kind`], the argument and a message naming
//! it) instead of panicking.
//!
//! - [`batch::forward`]: each user's inner loop (SGD or Adam) from a shared or per-user start,
//!   with support/query loss and accuracy at the adapted weights;
//! - [`batch::value_and_grad`]: the exact (or first-order) gradient of a weighted sum of query
//!   losses with respect to the start and every support and query row, and optionally in the
//!   same pass what [`batch::forward`] gives;
//! - [`rpo::rpo`]: the Robust Personalization Objective and its gradient;
//! - [`score::score`]: personalised rewards of feature rows;
//! - [`map::map_forward`] / [`map::map_backward`]: MAP adaptation under a Gaussian prior, its
//!   exact implicit meta-gradient and the Laplace posterior (SPEC §7); [`map::predictive`]
//!   the posterior mean and variance of rewards or margins;
//! - [`gather::pair_differences`]: pair differences of feature rows picked by index, and their
//!   adjoint.

pub mod batch;
pub mod csr;
mod dispatch;
pub mod error;
pub mod gather;
mod group;
mod inner;
mod lanes;
pub mod map;
mod real;
#[cfg(test)]
mod reference;
mod rows;
pub mod rpo;
pub mod score;
mod simd;

pub use batch::{forward, value_and_grad, Control, ForwardOutputs, Start, MAX_THREADS};
pub use csr::Csr;
pub use dispatch::Dtype;
pub use error::{Error, Kind, Result};
pub use gather::{check_pairs, pair_differences, pair_differences_backward};
pub use inner::{InnerLoop, Optimizer, MAX_STEPS, TRAJECTORY_BUDGET_BYTES};
pub use map::{map_backward, map_forward, predictive, MapGradients, MapOutputs, MapSettings, WeightMap};
pub use real::Real;
pub use rpo::rpo;
pub use score::score;

/// The row kernels, as `dispatch` picks them, the scalar softmax and a few helpers: for the
/// timing programs in `examples/` and the integration tests only, not part of the supported API.
#[doc(hidden)]
pub mod bench {
    pub use crate::dispatch::{with_row_ops, WithRowOps};
    pub use crate::lanes::Lanes;
    pub use crate::real::{softmax_into, softmax_jvp};
    pub use crate::rows::{Rank2Terms, RowOps};

    /// The best (smallest) wall-clock seconds of `runs` calls of `f`.
    pub fn best_of(runs: usize, mut f: impl FnMut()) -> f64 {
        (0..runs)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// Memory for all four forward outputs of `n_users` users, kept between calls.
    pub struct Outputs<T> {
        pub weights: Vec<T>,
        pub support_losses: Vec<T>,
        pub losses: Vec<T>,
        pub accuracy: Vec<T>,
    }

    impl<T: crate::Real> Outputs<T> {
        pub fn new(n_users: usize, k: usize) -> Self {
            Outputs {
                weights: vec![T::ZERO; n_users * k],
                support_losses: vec![T::ZERO; n_users],
                losses: vec![T::ZERO; n_users],
                accuracy: vec![T::ZERO; n_users],
            }
        }

        /// All four outputs, written by the next call.
        pub fn all(&mut self) -> crate::ForwardOutputs<'_, T> {
            crate::ForwardOutputs {
                weights: &mut self.weights,
                support_losses: Some(&mut self.support_losses),
                losses: Some(&mut self.losses),
                accuracy: Some(&mut self.accuracy),
            }
        }
    }

    /// The program's integer arguments, each missing one from `defaults` (a bad one panics:
    /// these are timing programs, not tools).
    pub fn args<const N: usize>(defaults: [usize; N]) -> [usize; N] {
        let given: Vec<usize> = std::env::args()
            .skip(1)
            .map(|a| a.parse().expect("integer argument"))
            .collect();
        std::array::from_fn(|i| given.get(i).copied().unwrap_or(defaults[i]))
    }

    /// `n` pseudo-random values in [-1, 1) from a fixed linear congruential sequence (the same
    /// inputs in every run, so checksums can be compared across builds).
    pub fn uniform_values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }
}
