//! Pair differences `d_i = f[chosen_i] − f[rejected_i]` of feature rows picked by index, and
//! their adjoint (the scatter of each `∂/∂d_i` back onto the two rows it came from).

use crate::error::{shape_unless, value, Error, Kind, Result};
use crate::real::Real;

/// Checks that every index is in `0..n_rows`; the error names the argument and the pair.
fn check_indices(name: &str, index: &[i64], n_rows: usize) -> Result<()> {
    if let Some(i) = index.iter().position(|&r| r < 0 || r as u64 >= n_rows as u64) {
        return value(
            name.to_owned(),
            format!(
                "{name}[{i}] = {} is out of range for {n_rows} feature rows (pair {i})",
                index[i]
            ),
        );
    }
    Ok(())
}

/// The error `what(row, column)` for the first non-finite value of `values` (rows of width `k`).
fn check_finite<T: Real>(values: &[T], k: usize, what: impl Fn(usize, usize) -> Error) -> Result<()> {
    match values.iter().position(|x| !x.is_finite()) {
        Some(pos) => Err(what(pos / k, pos % k)),
        None => Ok(()),
    }
}

/// Checks that `chosen` and `rejected` have one entry per pair, each in `0..n_rows` (callers
/// check before allocating `n_rows` rows of output).
pub fn check_pairs(chosen: &[i64], rejected: &[i64], n_rows: usize) -> Result<()> {
    shape_unless(chosen.len() == rejected.len(), "rejected", || {
        format!(
            "chosen has {} entries but rejected has {}: one of each per pair",
            chosen.len(),
            rejected.len()
        )
    })?;
    check_indices("chosen", chosen, n_rows)?;
    check_indices("rejected", rejected, n_rows)
}

/// Checks the shapes of a map between `rows` (a name and a length: rows of width `k`, which
/// the pairs index) and `per_pair` (one row of width `k` per pair).
fn check_shapes(
    k: usize,
    rows: (&'static str, usize),
    chosen: &[i64],
    rejected: &[i64],
    per_pair: (&'static str, usize),
) -> Result<()> {
    let ((rows_name, rows_len), (pair_name, pair_len)) = (rows, per_pair);
    shape_unless(k > 0 && rows_len.is_multiple_of(k), rows_name, || {
        format!("{rows_name} must have K >= 1 columns and a whole number of rows (K = {k})")
    })?;
    check_pairs(chosen, rejected, rows_len / k)?;
    let want = chosen.len() * k;
    shape_unless(pair_len == want, pair_name, || {
        format!("{pair_name} must have {want} values (pairs × K), got {pair_len}")
    })
}

/// Writes `out[i] = features[chosen[i]] − features[rejected[i]]` (rows of width `k`).
pub fn pair_differences<T: Real>(
    features: &[T],
    k: usize,
    chosen: &[i64],
    rejected: &[i64],
    out: &mut [T],
) -> Result<()> {
    check_shapes(k, ("features", features.len()), chosen, rejected, ("out", out.len()))?;
    for ((d, &c), &r) in out.chunks_exact_mut(k).zip(chosen).zip(rejected) {
        let (c, r) = (c as usize * k, r as usize * k);
        for ((o, &a), &b) in d.iter_mut().zip(&features[c..c + k]).zip(&features[r..r + k]) {
            *o = a - b;
        }
    }
    // A non-finite difference: a non-finite feature row it read, or an overflow of finite ones.
    check_finite(out, k, |i, col| {
        let (c, r) = (chosen[i] as usize, rejected[i] as usize);
        match [c, r].into_iter().find(|&row| !features[row * k + col].is_finite()) {
            Some(row) => Error::new(
                Kind::NonFinite,
                "features",
                format!("features contains a non-finite value (row {row}, column {col}; pair {i})"),
            ),
            None => Error::without_argument(
                Kind::NonFinite,
                format!(
                    "pair {i}: features[{c}] - features[{r}] overflows in column {col} (a difference beyond the dtype)"
                ),
            ),
        }
    })
}

/// The adjoint of [`pair_differences`]: `out` (rows × K) is set to `Σ_i grad[i]` over the pairs
/// whose chosen row it is, minus the same over the pairs whose rejected row it is, accumulated
/// in pair order (so the result does not depend on anything but the inputs).
pub fn pair_differences_backward<T: Real>(
    grad: &[T],
    k: usize,
    chosen: &[i64],
    rejected: &[i64],
    out: &mut [T],
) -> Result<()> {
    check_shapes(k, ("out", out.len()), chosen, rejected, ("grad", grad.len()))?;
    check_finite(grad, k, |i, col| {
        Error::new(
            Kind::NonFinite,
            "grad",
            format!("grad contains a non-finite value (pair {i}, column {col})"),
        )
    })?;
    out.fill(T::ZERO);
    for ((g, &c), &r) in grad.chunks_exact(k).zip(chosen).zip(rejected) {
        let c = c as usize * k;
        for (o, &x) in out[c..c + k].iter_mut().zip(g) {
            *o += x;
        }
        let r = r as usize * k;
        for (o, &x) in out[r..r + k].iter_mut().zip(g) {
            *o -= x;
        }
    }
    check_finite(out, k, |row, col| {
        Error::without_argument(
            Kind::NonFinite,
            format!("the gradient of feature row {row} overflows in column {col} (the sum of its pairs' grad rows)"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_and_adjoint_agree_with_the_definition() {
        let k = 3;
        let features: Vec<f64> = (0..5 * k).map(|i| (i * i) as f64 * 0.25 - 3.0).collect();
        let (chosen, rejected) = ([4i64, 0, 2, 2], [1i64, 0, 3, 4]);
        let mut d = vec![0.0; chosen.len() * k];
        pair_differences(&features, k, &chosen, &rejected, &mut d).unwrap();
        for i in 0..chosen.len() {
            for j in 0..k {
                let want = features[chosen[i] as usize * k + j] - features[rejected[i] as usize * k + j];
                assert_eq!(d[i * k + j], want);
            }
        }
        // <g, D f> = <Dᵀ g, f> for any g and f: the adjoint is the transpose
        let g: Vec<f64> = (0..chosen.len() * k).map(|i| (i as f64).sin()).collect();
        let mut back = vec![0.0; features.len()];
        pair_differences_backward(&g, k, &chosen, &rejected, &mut back).unwrap();
        let lhs: f64 = g.iter().zip(&d).map(|(a, b)| a * b).sum();
        let rhs: f64 = back.iter().zip(&features).map(|(a, b)| a * b).sum();
        assert!((lhs - rhs).abs() < 1e-12 * lhs.abs().max(1.0), "{lhs} vs {rhs}");
    }

    #[test]
    fn non_finite_inputs_and_overflows_are_errors_naming_where() {
        let mut out = vec![0.0f32; 2];
        let err = pair_differences(&[3e38f32, 1.0, -3e38, 1.0], 2, &[0], &[1], &mut out).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("pair 0: features[0] - features[1] overflows in column 0"),
            "{err}"
        );
        let err = pair_differences(&[0.0f32, f32::NAN, 0.0, 0.0], 2, &[0], &[1], &mut out).unwrap_err();
        assert_eq!(
            err.to_string(),
            "features contains a non-finite value (row 0, column 1; pair 0)"
        );
        let mut back = vec![0.0f32; 4];
        let err = pair_differences_backward(&[0.0f32, f32::INFINITY], 2, &[0], &[1], &mut back).unwrap_err();
        assert_eq!(err.to_string(), "grad contains a non-finite value (pair 0, column 1)");
        let err = pair_differences_backward(&[3e38f32, 0.0, 3e38, 0.0], 2, &[0, 0], &[1, 1], &mut back).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the gradient of feature row 0 overflows in column 0"),
            "{err}"
        );
    }

    #[test]
    fn bad_indices_are_errors_naming_the_pair() {
        let features = vec![0.0f32; 6];
        let mut out = vec![0.0f32; 4];
        let err = pair_differences(&features, 2, &[0, 3], &[1, 1], &mut out).unwrap_err();
        assert!(err.to_string().contains("chosen[1] = 3"), "{err}");
        let err = pair_differences(&features, 2, &[0, 1], &[-1, 1], &mut out).unwrap_err();
        assert!(err.to_string().contains("rejected[0] = -1"), "{err}");
        assert!(pair_differences(&features, 2, &[0], &[1, 1], &mut out).is_err());
    }
}
