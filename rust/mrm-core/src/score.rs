//! Personalised rewards of feature rows at fixed per-user weights (no adaptation), in
//! parallel over blocks of users, chunked so that a caller can stop a long call.

use rayon::prelude::*;

use crate::batch::{block_bounds, check_len, split_lengths, Control};
use crate::csr::{check_rows_finite, Csr};
use crate::error::{non_finite, shape_unless, Result};
use crate::real::{dot, softmax_into, Real};

/// Per-user weights (U × K) must be finite; the error names the first bad user.
fn check_weights<T: Real>(weights: &[T], k: usize) -> Result<()> {
    match weights.iter().position(|x| !x.is_finite()) {
        Some(pos) => non_finite(
            "weights",
            format!("weights contains a non-finite value (user {})", pos / k),
        ),
        None => Ok(()),
    }
}

/// Personalised rewards `r = f · softmax(w_u)` for every row `f` of user `u`.
pub fn score<T: Real>(features: Csr<'_, T>, weights: &[T], rewards: &mut [T], ctl: &Control<'_>) -> Result<()> {
    let (k, n_users) = (features.k, features.n_users());
    shape_unless(weights.len() == n_users * k, "weights", || {
        format!(
            "weights must have shape ({n_users}, {k}) to match feature_offsets and features, got {} values",
            weights.len()
        )
    })?;
    check_weights(weights, k)?;
    check_len("rewards", rewards, features.n_rows())?;
    ctl.chunks(n_users, |lo, hi| {
        let feats = features.users(lo, hi);
        let blocks = block_bounds(hi - lo);
        let row_start = features.users(0, lo).n_rows();
        let r_parts = split_lengths(
            &mut rewards[row_start..row_start + feats.n_rows()],
            blocks.iter().map(|&(a, b)| feats.users(a, b).n_rows()),
        );
        let work: Vec<_> = blocks.iter().copied().zip(r_parts).collect();
        ctl.pool.install(|| {
            work.into_par_iter().for_each_init(
                || vec![T::ZERO; k],
                |p, (b, out)| {
                    let mut row = 0;
                    for u in b.0..b.1 {
                        softmax_into(&weights[(lo + u) * k..(lo + u + 1) * k], p);
                        for f in feats.rows(u).chunks_exact(k) {
                            out[row] = dot(f, p);
                            row += 1;
                        }
                    }
                },
            );
        });
        Ok(())
    })?;
    check_rows_finite("rewards", rewards, &features, ctl.pool)
}
