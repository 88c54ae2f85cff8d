//! Ragged per-user row sets in CSR layout (SPEC §4) and their validation.

use crate::error::{non_finite, non_finite_result, shape, Result};
use crate::real::{all_finite, Real};

/// Rows of width `k` grouped by user: user `u` owns rows `offsets[u]..offsets[u+1]`
/// (relative to `offsets[0]`, so a slice of a larger batch is itself a batch).
#[derive(Clone, Copy, Debug)]
pub struct Csr<'a, T> {
    pub values: &'a [T],
    pub offsets: &'a [i64],
    pub k: usize,
}

impl<'a, T: Real> Csr<'a, T> {
    /// Builds a batch after checking its shape, its offsets and that every value is finite.
    /// `name` is the argument name used in error messages (e.g. `"support"`).
    pub fn new(name: &str, values: &'a [T], offsets: &'a [i64], k: usize) -> Result<Self> {
        Self::new_in(name, values, offsets, k, None)
    }

    /// [`Csr::new`], scanning the values for non-finite ones on `pool` when one is given.
    pub fn new_in(
        name: &str,
        values: &'a [T],
        offsets: &'a [i64],
        k: usize,
        pool: Option<&rayon::ThreadPool>,
    ) -> Result<Self> {
        let batch = Self::shaped(name, values, offsets, k)?;
        batch.check_values(name, pool)?;
        Ok(batch)
    }

    /// A batch whose shape and offsets are checked but whose values are not scanned yet.
    /// [`crate::forward`] and [`crate::value_and_grad`] check each user's rows as they read them
    /// (while they are in cache) and then give the same error as [`Csr::new`] would.
    pub fn shaped(name: &str, values: &'a [T], offsets: &'a [i64], k: usize) -> Result<Self> {
        if k == 0 {
            return shape(
                name.to_owned(),
                format!("{name} must have at least one column (K >= 1)"),
            );
        }
        if !values.len().is_multiple_of(k) {
            return shape(
                name.to_owned(),
                format!("{name} has {} values, not a multiple of K = {k}", values.len()),
            );
        }
        check_offsets(name, offsets, values.len() / k)?;
        Ok(Csr { values, offsets, k })
    }

    /// An error naming the first non-finite value's row and user, if there is one.
    pub fn check_values(&self, name: &str, pool: Option<&rayon::ThreadPool>) -> Result<()> {
        if let Some(pos) = first_non_finite(self.values, pool) {
            let row = pos / self.k;
            return non_finite(
                name.to_owned(),
                format!(
                    "{name} contains a non-finite value (row {row}, user {})",
                    self.user_of_row(row)
                ),
            );
        }
        Ok(())
    }

    #[inline]
    pub fn n_users(&self) -> usize {
        self.offsets.len() - 1
    }

    #[inline]
    pub fn n_rows(&self) -> usize {
        self.values.len() / self.k
    }

    /// Row range of user `u`, relative to this batch.
    #[inline]
    pub fn row_range(&self, u: usize) -> std::ops::Range<usize> {
        let base = self.offsets[0];
        (self.offsets[u] - base) as usize..(self.offsets[u + 1] - base) as usize
    }

    /// The rows of user `u`, flattened (`n_u * k` values).
    #[inline]
    pub fn rows(&self, u: usize) -> &'a [T] {
        let r = self.row_range(u);
        &self.values[r.start * self.k..r.end * self.k]
    }

    /// The users `lo..hi` as a batch of their own.
    pub fn users(&self, lo: usize, hi: usize) -> Csr<'a, T> {
        let base = self.offsets[0];
        let start = (self.offsets[lo] - base) as usize * self.k;
        let end = (self.offsets[hi] - base) as usize * self.k;
        Csr {
            values: &self.values[start..end],
            offsets: &self.offsets[lo..=hi],
            k: self.k,
        }
    }

    /// The user owning row `row` (the last user when several end at the same row).
    pub fn user_of_row(&self, row: usize) -> usize {
        let target = self.offsets[0] + row as i64;
        // first u with offsets[u+1] > target
        self.offsets[1..].partition_point(|&o| o <= target)
    }
}

/// Offsets must start at 0, never decrease and end at the row count.
pub fn check_offsets(name: &str, offsets: &[i64], n_rows: usize) -> Result<()> {
    let oname = format!("{name}_offsets");
    if offsets.is_empty() {
        return shape(
            oname.clone(),
            format!("{oname} must have at least one entry (U + 1 entries for U users)"),
        );
    }
    if offsets[0] != 0 {
        return shape(oname.clone(), format!("{oname}[0] must be 0, got {}", offsets[0]));
    }
    for u in 0..offsets.len() - 1 {
        if offsets[u + 1] < offsets[u] {
            return shape(
                oname.clone(),
                format!(
                    "{oname} must be non-decreasing: {oname}[{}] = {} < {oname}[{u}] = {} (user {u})",
                    u + 1,
                    offsets[u + 1],
                    offsets[u]
                ),
            );
        }
    }
    let last = offsets[offsets.len() - 1];
    if last != n_rows as i64 {
        return shape(
            oname.clone(),
            format!("{oname}[-1] must equal the number of rows of {name} ({n_rows}), got {last}"),
        );
    }
    Ok(())
}

/// Values scanned per piece: each piece is checked without an early exit (so the loop
/// vectorises), and only a piece that has a non-finite value is searched for its position.
const SCAN_PIECE: usize = 1 << 14;

/// Index of the first non-finite value, scanning on `pool` when one is given.
pub fn first_non_finite<T: Real>(values: &[T], pool: Option<&rayon::ThreadPool>) -> Option<usize> {
    let clean = all_finite::<T>;
    let piece = match pool {
        Some(pool) if values.len() > SCAN_PIECE => {
            use rayon::prelude::*;
            pool.install(|| values.par_chunks(SCAN_PIECE).position_first(|p| !clean(p)))
        }
        _ => values.chunks(SCAN_PIECE).position(|p| !clean(p)),
    }?;
    let start = piece * SCAN_PIECE;
    values[start..].iter().position(|x| !x.is_finite()).map(|i| start + i)
}

/// Returns an error naming the first user whose output is not finite.
pub(crate) fn check_output_finite<T: Real>(
    what: &str,
    values: &[T],
    per_user: usize,
    pool: &rayon::ThreadPool,
) -> Result<()> {
    if let Some(pos) = first_non_finite(values, Some(pool)) {
        return non_finite_result(format!(
            "{what} is not finite for user {} (inputs or learning rate too large for this dtype)",
            pos / per_user.max(1)
        ));
    }
    Ok(())
}

/// Same as [`check_output_finite`] for per-row outputs of a batch.
pub(crate) fn check_rows_finite<T: Real>(
    what: &str,
    values: &[T],
    batch: &Csr<'_, T>,
    pool: &rayon::ThreadPool,
) -> Result<()> {
    if let Some(pos) = first_non_finite(values, Some(pool)) {
        return non_finite_result(format!(
            "{what} is not finite for user {} (inputs or learning rate too large for this dtype)",
            batch.user_of_row(pos / batch.k)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_non_finite_finds_the_first_bad_value_with_and_without_a_pool() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let n = 5 * SCAN_PIECE + 123;
        for bad in [
            vec![],
            vec![0],
            vec![n - 1],
            vec![SCAN_PIECE - 1, SCAN_PIECE],
            vec![3 * SCAN_PIECE + 7, 4 * SCAN_PIECE + 1],
        ] {
            let mut values = vec![1.0f32; n];
            for (i, &at) in bad.iter().enumerate() {
                values[at] = if i % 2 == 0 { f32::NAN } else { f32::NEG_INFINITY };
            }
            let want = bad.iter().copied().min();
            assert_eq!(first_non_finite(&values, None), want);
            assert_eq!(first_non_finite(&values, Some(&pool)), want);
        }
    }
}
