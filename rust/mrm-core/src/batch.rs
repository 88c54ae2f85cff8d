//! Batched, parallel drivers over many users: validation, chunking (so a caller can stop a
//! long call between chunks) and a block-parallel loop with a fixed reduction order, so results
//! are bit-identical for any thread count.

use rayon::prelude::*;

use crate::csr::{check_output_finite, check_rows_finite, Csr};
use crate::dispatch::{with_row_ops, Dtype, WithRowOps};
use crate::error::{non_finite, shape, shape_unless, value, Error, Result};
use crate::group::{lane_values, Group, Members};
use crate::inner::{InnerLoop, TRAJECTORY_BUDGET_BYTES};
use crate::lanes::LANES;
use crate::real::{all_finite, Real};
use crate::rows::RowOps;
use crate::simd::stream;

/// Users per unit of parallel work. Fixed, so reductions do not depend on the thread count.
const BLOCK_USERS: usize = 256;

/// Gradients of at least this many bytes (support and query rows together) are written with
/// non-temporal stores (see [`crate::simd::stream`]): larger than the caches, they would only evict
/// other data. Smaller ones are stored plainly and stay in cache for the caller.
const STREAM_MIN_BYTES: usize = 8 << 20;

/// The start of every user's inner loop: one `w0` of length K, or one row per user (U × K).
#[derive(Clone, Copy, Debug)]
pub enum Start<'a, T> {
    Shared(&'a [T]),
    PerUser(&'a [T]),
}

impl<'a, T: Real> Start<'a, T> {
    pub(crate) fn check(&self, k: usize, n_users: usize) -> Result<()> {
        let (values, expected, what) = match self {
            Start::Shared(w) => (*w, k, format!("shape ({k},)")),
            Start::PerUser(w) => (*w, n_users * k, format!("shape ({n_users}, {k})")),
        };
        shape_unless(values.len() == expected, "w0", || {
            format!("w0 must have {what} to match the data, got {} values", values.len())
        })?;
        if let Some(pos) = values.iter().position(|x| !x.is_finite()) {
            return match self {
                Start::Shared(_) => non_finite("w0", "w0 contains a non-finite value"),
                Start::PerUser(_) => non_finite("w0", format!("w0 contains a non-finite value (user {})", pos / k)),
            };
        }
        Ok(())
    }

    #[inline]
    pub(crate) fn of(&self, u: usize, k: usize) -> &'a [T] {
        match self {
            Start::Shared(w) => w,
            Start::PerUser(w) => &w[u * k..(u + 1) * k],
        }
    }

    pub(crate) fn users(&self, lo: usize, hi: usize, k: usize) -> Start<'a, T> {
        match self {
            Start::Shared(w) => Start::Shared(w),
            Start::PerUser(w) => Start::PerUser(&w[lo * k..hi * k]),
        }
    }
}

/// The most worker threads a caller should give a pool for these kernels (the bindings refuse
/// more): beyond the CPUs there is nothing to gain, and each thread costs a stack and a start.
pub const MAX_THREADS: usize = 1024;

/// How a long call is run: on which pool, in chunks of how many users, and a callback asked
/// between chunks, and every so many inner steps inside a group's long loop (from the workers,
/// so it must be cheap and thread-safe), whether to go on (return `false` to stop with
/// [`Error::Interrupted`]).
pub struct Control<'a> {
    pub pool: &'a rayon::ThreadPool,
    pub chunk_users: usize,
    pub keep_going: &'a (dyn Fn() -> bool + Sync),
}

/// Combines two blocks' results: both finite flags, or the first error.
fn both<X: std::ops::BitAnd<Output = X>>(a: Result<X>, b: Result<X>) -> Result<X> {
    Ok(a? & b?)
}

/// Checks that the exact backward's stored trajectory fits [`TRAJECTORY_BUDGET_BYTES`] for any
/// group of [`LANES`] consecutive users: an error naming `steps`, the users and the bytes.
fn check_trajectory_budget<T: Real>(support: &Csr<'_, T>, inner: &InnerLoop, first_order: bool) -> Result<()> {
    let (k, n_users) = (support.k, support.n_users());
    if inner.steps == 0 || n_users == 0 {
        return Ok(());
    }
    // Support rows of the eight consecutive users with the most.
    let (mut rows, mut first) = (0usize, 0usize);
    for u in 0..n_users {
        let n = support.users(u, (u + LANES).min(n_users)).n_rows();
        if n > rows {
            (rows, first) = (n, u);
        }
    }
    if rows == 0 {
        return Ok(()); // no user takes a step
    }
    // Per step: p, g_p, g, m, v (and with the exact backward μ/n and p/n) as K values per
    // lane, and each support row's s_i (and c_i).
    let per_step = if first_order {
        5 * LANES * k + rows
    } else {
        7 * LANES * k + 2 * rows
    } as u128;
    let bytes = inner.steps as u128 * per_step * std::mem::size_of::<T>() as u128;
    if bytes > TRAJECTORY_BUDGET_BYTES as u128 {
        let last = (first + LANES).min(n_users) - 1;
        return value(
            "steps",
            format!(
                "steps = {} would need {bytes} bytes of inner trajectory for users {first}..={last} \
             ({rows} support rows, K = {k}), more than the budget of {TRAJECTORY_BUDGET_BYTES} bytes \
             per group of {LANES} users; use fewer steps, first_order, or fewer support pairs per user",
                inner.steps
            ),
        );
    }
    Ok(())
}

impl<'a> Control<'a> {
    /// Runs on `pool` in chunks of `chunk_users`, never stopped (`keep_going` always says go on).
    pub fn new(pool: &'a rayon::ThreadPool, chunk_users: usize) -> Self {
        Control {
            pool,
            chunk_users,
            keep_going: &|| true,
        }
    }

    /// Calls `f(lo, hi)` for consecutive user ranges, checking `keep_going` in between.
    pub(crate) fn chunks(&self, n_users: usize, mut f: impl FnMut(usize, usize) -> Result<()>) -> Result<()> {
        let step = self.chunk_users.max(1);
        let mut lo = 0;
        while lo < n_users {
            let hi = (lo + step).min(n_users);
            f(lo, hi)?;
            lo = hi;
            if lo < n_users && !(self.keep_going)() {
                return Err(Error::Interrupted);
            }
        }
        Ok(())
    }
}

/// Block boundaries (relative user indices) for `n_users` users.
pub(crate) fn block_bounds(n_users: usize) -> Vec<(usize, usize)> {
    (0..n_users)
        .step_by(BLOCK_USERS)
        .map(|lo| (lo, (lo + BLOCK_USERS).min(n_users)))
        .collect()
}

/// Splits `buf` into consecutive pieces of the given lengths.
pub(crate) fn split_lengths<T>(buf: &mut [T], lengths: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    let mut rest = buf;
    let mut parts = Vec::new();
    for len in lengths {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(len);
        parts.push(head);
        rest = tail;
    }
    parts
}

/// Splits users `lo..hi` of an optional per-user output into per-block pieces.
fn optional_parts<'b, T>(buf: Option<&'b mut [T]>, lo: usize, hi: usize, sizes: &[usize]) -> Vec<Option<&'b mut [T]>> {
    match buf {
        Some(b) => split_lengths(&mut b[lo..hi], sizes.iter().copied())
            .into_iter()
            .map(Some)
            .collect(),
        None => sizes.iter().map(|_| None).collect(),
    }
}

/// Per-block row counts of `batch` (times K) for the given blocks.
fn block_row_lengths<'b, T: Real>(
    batch: &'b Csr<'_, T>,
    blocks: &'b [(usize, usize)],
) -> impl Iterator<Item = usize> + 'b {
    blocks.iter().map(move |&(lo, hi)| batch.users(lo, hi).values.len())
}

/// The lengths of a forward pass's outputs: `weights` (U × K) and the optional per-user
/// `support_losses`, `losses` and `accuracy` (U each).
pub(crate) fn check_forward_lengths<T>(
    k: usize,
    n_users: usize,
    weights: &[T],
    per_user: [&Option<&mut [T]>; 3],
) -> Result<()> {
    check_len("weights", weights, n_users * k)?;
    for (name, buf) in ["support_losses", "losses", "accuracy"].into_iter().zip(per_user) {
        if let Some(b) = buf {
            check_len(name, b, n_users)?;
        }
    }
    Ok(())
}

pub(crate) fn check_len<T>(name: &str, buf: &[T], expected: usize) -> Result<()> {
    shape_unless(buf.len() == expected, name.to_owned(), || {
        format!("{name} must have {expected} values, got {}", buf.len())
    })
}

/// Support and query describe the same users with the same K.
pub(crate) fn check_same_shape<T: Real>(support: &Csr<'_, T>, query: &Csr<'_, T>) -> Result<()> {
    shape_unless(support.k == query.k, "query", || {
        format!("support has K = {} columns but query has K = {}", support.k, query.k)
    })?;
    let (s, q) = (support.n_users(), query.n_users());
    shape_unless(s == q, "query_offsets", || {
        format!("support_offsets describes {s} users but query_offsets describes {q}")
    })
}

fn check_same_users<T: Real>(support: &Csr<'_, T>, query: &Csr<'_, T>) -> Result<()> {
    check_same_shape(support, query)?;
    if let Some(u) = (0..query.n_users()).find(|&u| query.row_range(u).is_empty()) {
        return shape(
            "query",
            format!("query has no pairs for user {u}: every user needs at least one query pair"),
        );
    }
    Ok(())
}

/// Outputs of [`forward`]; each is U values (weights: U × K). `None` skips that output.
pub struct ForwardOutputs<'a, T> {
    pub weights: &'a mut [T],
    pub support_losses: Option<&'a mut [T]>,
    pub losses: Option<&'a mut [T]>,
    pub accuracy: Option<&'a mut [T]>,
}

impl<'a, T: Real> ForwardOutputs<'a, T> {
    /// The adapted weights alone (no per-user values).
    pub fn weights_only(weights: &'a mut [T]) -> Self {
        ForwardOutputs {
            weights,
            support_losses: None,
            losses: None,
            accuracy: None,
        }
    }

    fn check_lengths(&self, k: usize, n_users: usize) -> Result<()> {
        check_forward_lengths(
            k,
            n_users,
            self.weights,
            [&self.support_losses, &self.losses, &self.accuracy],
        )
    }

    /// The outputs of users `lo..hi`, split into the given blocks (relative user ranges).
    fn block_parts(&mut self, k: usize, lo: usize, hi: usize, blocks: &[(usize, usize)]) -> Vec<BlockValues<'_, T>> {
        let sizes: Vec<usize> = blocks.iter().map(|b| b.1 - b.0).collect();
        let weights = split_lengths(&mut self.weights[lo * k..hi * k], sizes.iter().map(|n| n * k));
        let support_losses = optional_parts(self.support_losses.as_deref_mut(), lo, hi, &sizes);
        let losses = optional_parts(self.losses.as_deref_mut(), lo, hi, &sizes);
        let accuracy = optional_parts(self.accuracy.as_deref_mut(), lo, hi, &sizes);
        weights
            .into_iter()
            .zip(support_losses)
            .zip(losses)
            .zip(accuracy)
            .map(|(((weights, support_losses), losses), accuracy)| BlockValues {
                weights,
                support_losses,
                losses,
                accuracy,
            })
            .collect()
    }

    /// An error naming the first user whose adapted weights or losses are not finite.
    fn check_finite(&self, k: usize, pool: &rayon::ThreadPool) -> Result<()> {
        check_output_finite("adapted weights", self.weights, k, pool)?;
        if let Some(l) = &self.losses {
            check_output_finite("query loss", l, 1, pool)?;
        }
        if let Some(l) = &self.support_losses {
            check_output_finite("support loss", l, 1, pool)?;
        }
        Ok(())
    }
}

/// Adapts every user (SPEC §2); with `query`, also the query loss and accuracy at `w_T`.
/// The support loss is measured at the adapted weights `w_T`.
pub fn forward<T: Dtype>(
    start: Start<'_, T>,
    support: Csr<'_, T>,
    query: Option<Csr<'_, T>>,
    inner: &InnerLoop,
    out: ForwardOutputs<'_, T>,
    ctl: &Control<'_>,
) -> Result<()> {
    let (k, n_users) = (support.k, support.n_users());
    inner.validate()?;
    start.check(k, n_users)?;
    if let Some(q) = &query {
        check_same_users(&support, q)?;
    }
    out.check_lengths(k, n_users)?;
    if (out.losses.is_some() || out.accuracy.is_some()) && query.is_none() {
        return value("query", "losses and accuracy need query pairs");
    }
    let ForwardOutputs {
        weights,
        support_losses,
        losses,
        accuracy,
    } = out;
    let mut values = ForwardOutputs {
        weights,
        support_losses,
        losses,
        accuracy,
    };
    ctl.chunks(n_users, |lo, hi| {
        let sup = support.users(lo, hi);
        let qry = query.map(|q| q.users(lo, hi));
        let st = start.users(lo, hi, k);
        let blocks = block_bounds(hi - lo);
        let work: Vec<_> = blocks
            .iter()
            .copied()
            .zip(values.block_parts(k, lo, hi, &blocks))
            .collect();
        let keep_going = ctl.keep_going;
        let inputs_finite = ctl.pool.install(|| {
            work.into_par_iter()
                .map(|(users, values)| {
                    with_row_ops(
                        k,
                        ForwardBlock {
                            users,
                            start: st,
                            support: sup,
                            query: qry,
                            inner,
                            values,
                            keep_going,
                        },
                    )
                })
                .reduce(|| Ok(true), both)
        })?;
        if inputs_finite {
            Ok(())
        } else {
            input_error(&support, query.as_ref(), ctl.pool)
        }
    })?;
    values.check_finite(k, ctl.pool)
}

/// Exact gradient of `Σ_u grad_losses[u] · L_u` (SPEC §3) with respect to `w0` (into
/// `grad_w0`: K values for a shared start, summed over users in a fixed order; U × K for a
/// per-user start), every support row and every query row (the backward pass).
///
/// With `values`, also in the same pass what [`forward`] with query pairs gives: the adapted
/// weights and each user's support loss, query loss and accuracy at them, bit-identical to
/// [`forward`]'s. Reads every row once instead of twice, for callers that know `grad_losses`
/// before the losses (a fixed weighting such as the mean).
#[allow(clippy::too_many_arguments)]
pub fn value_and_grad<T: Dtype>(
    start: Start<'_, T>,
    support: Csr<'_, T>,
    query: Csr<'_, T>,
    grad_losses: &[T],
    inner: &InnerLoop,
    first_order: bool,
    mut values: Option<ForwardOutputs<'_, T>>,
    grad_w0: &mut [T],
    grad_support: &mut [T],
    grad_query: &mut [T],
    ctl: &Control<'_>,
) -> Result<()> {
    let (k, n_users) = (support.k, support.n_users());
    inner.validate()?;
    start.check(k, n_users)?;
    check_same_users(&support, &query)?;
    if let Some(v) = &values {
        v.check_lengths(k, n_users)?;
    }
    check_len("grad_losses", grad_losses, n_users)?;
    if let Some(u) = grad_losses.iter().position(|x| !x.is_finite()) {
        return non_finite(
            "grad_losses",
            format!("grad_losses contains a non-finite value (user {u})"),
        );
    }
    check_trajectory_budget(&support, inner, first_order)?;
    let shared = matches!(start, Start::Shared(_));
    check_len("grad_w0", grad_w0, if shared { k } else { n_users * k })?;
    check_len("grad_support", grad_support, support.values.len())?;
    check_len("grad_query", grad_query, query.values.len())?;
    grad_w0.fill(T::ZERO);
    let stream = (grad_support.len() + grad_query.len()) * std::mem::size_of::<T>() >= STREAM_MIN_BYTES;

    // Each user's rows are checked as they are read, and its gradient rows as they are written;
    // only when some are not finite are whole arrays scanned, to name the first bad user.
    let mut all_outputs_finite = true;
    ctl.chunks(n_users, |lo, hi| {
        let (sup, qry, st) = (support.users(lo, hi), query.users(lo, hi), start.users(lo, hi, k));
        let blocks = block_bounds(hi - lo);
        let s_range = support.users(0, lo).values.len()..support.users(0, hi).values.len();
        let q_range = query.users(0, lo).values.len()..query.users(0, hi).values.len();
        let gs_parts = split_lengths(&mut grad_support[s_range], block_row_lengths(&sup, &blocks));
        let gq_parts = split_lengths(&mut grad_query[q_range], block_row_lengths(&qry, &blocks));
        // Per-user start: each block writes its users' rows. Shared: each block writes the
        // sum over its users (in user order), then blocks are summed in block order.
        let mut block_sums = if shared {
            vec![T::ZERO; blocks.len() * k]
        } else {
            Vec::new()
        };
        let gw_parts = if shared {
            split_lengths(&mut block_sums, blocks.iter().map(|_| k))
        } else {
            split_lengths(&mut grad_w0[lo * k..hi * k], blocks.iter().map(|b| (b.1 - b.0) * k))
        };
        let value_parts: Vec<Option<BlockValues<'_, T>>> = match values.as_mut() {
            Some(v) => v.block_parts(k, lo, hi, &blocks).into_iter().map(Some).collect(),
            None => blocks.iter().map(|_| None).collect(),
        };
        let work: Vec<_> = blocks
            .iter()
            .copied()
            .zip(gs_parts)
            .zip(gq_parts)
            .zip(gw_parts)
            .zip(value_parts)
            .collect();
        let keep_going = ctl.keep_going;
        let Flags(inputs_finite, outputs_finite) = ctl.pool.install(|| {
            work.into_par_iter()
                .map(|((((users, grad_support), grad_query), grad_w0), values)| {
                    let block = BackwardBlock {
                        users,
                        start: st,
                        support: sup,
                        query: qry,
                        grad_losses: &grad_losses[lo + users.0..lo + users.1],
                        inner,
                        first_order,
                        shared,
                        stream,
                        grad_w0,
                        grad_support,
                        grad_query,
                        values,
                        keep_going,
                    };
                    with_row_ops(k, block)
                })
                .reduce(|| Ok(Flags(true, true)), both)
        })?;
        if !inputs_finite {
            return input_error(&support, Some(&query), ctl.pool);
        }
        all_outputs_finite &= outputs_finite;
        for block in block_sums.chunks_exact(k) {
            for (acc, &x) in grad_w0.iter_mut().zip(block) {
                *acc += x;
            }
        }
        Ok(())
    })?;
    check_output_finite("grad_w0", grad_w0, if shared { usize::MAX } else { k }, ctl.pool)?;
    if !all_outputs_finite {
        check_rows_finite("grad_support", grad_support, &support, ctl.pool)?;
        check_rows_finite("grad_query", grad_query, &query, ctl.pool)?;
    }
    match &values {
        Some(v) => v.check_finite(k, ctl.pool),
        None => Ok(()),
    }
}

/// One block of users' forward work (users `users.0..users.1` of the chunk's batches).
struct ForwardBlock<'a, 'd, T> {
    users: (usize, usize),
    start: Start<'d, T>,
    support: Csr<'d, T>,
    query: Option<Csr<'d, T>>,
    inner: &'a InnerLoop,
    values: BlockValues<'a, T>,
    keep_going: &'a (dyn Fn() -> bool + Sync),
}

/// Users per finite-value scan ahead of the groups: their rows are read in one streaming pass
/// (which the hardware prefetches well) and are then in cache for the groups that use them.
const SCAN_USERS: usize = 64;

/// Rows of at most this many bytes (support and query together) are scanned ahead; more would
/// not stay in cache until used.
const SCAN_BYTES: usize = 256 << 10;

/// Which users' rows were scanned ahead (`..end`), and whether all their values were finite.
#[derive(Default)]
struct Scan {
    end: usize,
    finite: bool,
}

impl Scan {
    /// Scans users `lo..` (up to [`SCAN_USERS`] of them, before `end`) when there are query
    /// rows and all their rows fit in [`SCAN_BYTES`]; else only the users of the next group are
    /// covered, unscanned (adaptation alone checks each user's support rows as it goes: faster
    /// there, measured).
    fn ahead<T: Real>(&mut self, lo: usize, end: usize, support: Csr<'_, T>, query: Option<Csr<'_, T>>) {
        let hi = (lo + SCAN_USERS).min(end);
        let s = support.users(lo, hi).values;
        let q = query.map_or(&[] as &[T], |q| q.users(lo, hi).values);
        if query.is_some() && (s.len() + q.len()) * std::mem::size_of::<T>() <= SCAN_BYTES {
            (self.end, self.finite) = (hi, all_finite(s) & all_finite(q));
        } else {
            (self.end, self.finite) = ((lo + LANES).min(end), false);
        }
    }
}

/// The group of up to [`LANES`] consecutive users of the block from `lo` on (before `end`):
/// the members and their user indices. A user with a non-finite row gets no rows (it is
/// skipped, and the call ends in an error naming it) and clears `inputs_finite`.
#[inline(always)]
fn group_at<'d, T: Real>(
    lo: usize,
    end: usize,
    start: Start<'d, T>,
    support: Csr<'d, T>,
    query: Option<Csr<'d, T>>,
    scan: &mut Scan,
    inputs_finite: &mut bool,
) -> (Members<'d, T>, std::ops::Range<usize>) {
    let k = support.k;
    let hi = (lo + LANES).min(end);
    if lo >= scan.end {
        scan.ahead(lo, end, support, query);
    }
    let mut members = Members::new();
    members.len = hi - lo;
    for (l, u) in (lo..hi).enumerate() {
        members.start[l] = start.of(u, k);
        let s = support.rows(u);
        let q = match &query {
            Some(q) => q.rows(u),
            None => &[],
        };
        if scan.finite || all_finite(s) && all_finite(q) {
            (members.support[l], members.query[l]) = (s, q);
        } else {
            *inputs_finite = false;
        }
    }
    (members, lo..hi)
}

/// The groups of up to [`LANES`] consecutive users of a block, in order (see [`group_at`]).
/// An iterator of its own rather than a callback: the caller's loop body stays in the caller,
/// inlined into the kernels' target-feature context.
struct Groups<'d, T> {
    next: usize,
    end: usize,
    start: Start<'d, T>,
    support: Csr<'d, T>,
    query: Option<Csr<'d, T>>,
    scan: Scan,
    /// Whether every row of the users so far was finite.
    inputs_finite: bool,
}

impl<'d, T: Real> Groups<'d, T> {
    #[inline(always)]
    fn new(users: (usize, usize), start: Start<'d, T>, support: Csr<'d, T>, query: Option<Csr<'d, T>>) -> Self {
        Groups {
            next: users.0,
            end: users.1,
            start,
            support,
            query,
            scan: Scan::default(),
            inputs_finite: true,
        }
    }

    /// The next group's members and user indices.
    #[inline(always)]
    fn next_group(&mut self) -> Option<(Members<'d, T>, std::ops::Range<usize>)> {
        if self.next >= self.end {
            return None;
        }
        let (start, support, query) = (self.start, self.support, self.query);
        let group = group_at(
            self.next,
            self.end,
            start,
            support,
            query,
            &mut self.scan,
            &mut self.inputs_finite,
        );
        self.next = group.1.end;
        Some(group)
    }
}

impl<T: Real> WithRowOps<T> for ForwardBlock<'_, '_, T> {
    /// Whether every row of the block's users was finite (a user with a non-finite row is
    /// skipped: the call ends in an error naming it), or an interruption.
    type Output = Result<bool>;

    #[inline(always)]
    fn run<R: RowOps<T>>(self, ops: R) -> Result<bool> {
        let (k, first_user, mut values) = (self.support.k, self.users.0, self.values);
        let mut group = Group::<T, R::Lanes>::new(k);
        let mut groups = Groups::new(self.users, self.start, self.support, self.query);
        while let Some((members, range)) = groups.next_group() {
            group.adapt(ops, &members, self.inner, false, self.keep_going)?;
            values.write(ops, k, &mut group, &members, range.start - first_user, false);
        }
        Ok(groups.inputs_finite)
    }
}

/// One block's share of [`ForwardOutputs`]: its users' rows of each output.
struct BlockValues<'a, T> {
    weights: &'a mut [T],
    support_losses: Option<&'a mut [T]>,
    losses: Option<&'a mut [T]>,
    accuracy: Option<&'a mut [T]>,
}

impl<T: Real> BlockValues<'_, T> {
    /// The adapted weights `w_T` of a group (left in `group` by its inner loop), and each
    /// member's support loss, query loss and accuracy at `w_T`, for the members starting at
    /// the block's user `first`. With `margins_kept`, the query margins at `w_T` are the ones
    /// the group's backward kept (the same values), not computed again.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn write<R: RowOps<T>>(
        &mut self,
        ops: R,
        k: usize,
        group: &mut Group<T, R::Lanes>,
        members: &Members<'_, T>,
        first: usize,
        margins_kept: bool,
    ) {
        let k = ops.width(k);
        let (n, users) = (members.len, first..first + members.len);
        let w_rows = group.weight_rows(ops);
        self.weights[first * k..(first + n) * k].copy_from_slice(&w_rows[..n * k]);
        group.softmax_rows(ops);
        let (mut losses, mut accuracy) = ([T::ZERO; LANES], [T::ZERO; LANES]);
        if let Some(out) = self.support_losses.as_deref_mut() {
            group.mean_losses(ops, members, false, false, &mut losses, None);
            out[users.clone()].copy_from_slice(&losses[..n]);
        }
        if self.losses.is_some() || self.accuracy.is_some() {
            group.mean_losses(ops, members, true, margins_kept, &mut losses, Some(&mut accuracy));
            if let Some(out) = self.losses.as_deref_mut() {
                out[users.clone()].copy_from_slice(&losses[..n]);
            }
            if let Some(out) = self.accuracy.as_deref_mut() {
                out[users].copy_from_slice(&accuracy[..n]);
            }
        }
    }
}

/// One block of users' backward work. `grad_w0` holds the block's users' rows (per-user start)
/// or the block's sum over its users in user order (shared start).
struct BackwardBlock<'a, 'd, T> {
    users: (usize, usize),
    start: Start<'d, T>,
    support: Csr<'d, T>,
    query: Csr<'d, T>,
    grad_losses: &'d [T],
    inner: &'a InnerLoop,
    first_order: bool,
    shared: bool,
    /// Whether the gradient rows are written with non-temporal stores.
    stream: bool,
    grad_w0: &'a mut [T],
    grad_support: &'a mut [T],
    grad_query: &'a mut [T],
    /// With [`value_and_grad`]: the block's share of the forward outputs.
    values: Option<BlockValues<'a, T>>,
    keep_going: &'a (dyn Fn() -> bool + Sync),
}

/// A backward block's (inputs finite, outputs finite).
struct Flags(bool, bool);

impl std::ops::BitAnd for Flags {
    type Output = Flags;
    fn bitand(self, other: Flags) -> Flags {
        Flags(self.0 & other.0, self.1 & other.1)
    }
}

/// The rows of consecutive users `range` of `batch` in `buf` (which holds the rows of the
/// batch's users from row `base` on), one slice per user; lanes past the users get none.
fn member_rows<'b, T: Real>(
    buf: &'b mut [T],
    batch: &Csr<'_, T>,
    base: usize,
    range: std::ops::Range<usize>,
) -> [&'b mut [T]; LANES] {
    let k = batch.k;
    let mut out: [&'b mut [T]; LANES] = Default::default();
    let lo = batch.row_range(range.start).start;
    let hi = batch.row_range(range.end - 1).end;
    let mut rest = &mut buf[(lo - base) * k..(hi - base) * k];
    for (slot, u) in out.iter_mut().zip(range) {
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(batch.row_range(u).len() * k);
        *slot = mine;
        rest = tail;
    }
    out
}

impl<T: Real> WithRowOps<T> for BackwardBlock<'_, '_, T> {
    /// Whether every input row and every gradient row of the block's users was finite (a user
    /// with a non-finite input row is skipped: the call ends in an error naming it), or an
    /// interruption or failed allocation.
    type Output = Result<Flags>;

    #[inline(always)]
    fn run<R: RowOps<T>>(self, ops: R) -> Result<Flags> {
        let BackwardBlock {
            users,
            start,
            support,
            query,
            grad_losses,
            inner,
            first_order,
            shared,
            stream,
            grad_w0,
            grad_support,
            grad_query,
            mut values,
            keep_going,
        } = self;
        // Rows go straight into the outputs, unless they are to be streamed and only a copy
        // from scratch can stream them (kernels without non-temporal stores of their own).
        let direct = R::STREAMS || !stream;
        let k = support.k;
        let (s_base, q_base) = (support.row_range(users.0).start, query.row_range(users.0).start);
        let mut group = Group::<T, R::Lanes>::new(k);
        // λ of the group's users, K rows of one value per lane.
        let mut lam = vec![[T::ZERO; LANES]; k];
        let (mut scratch_s, mut scratch_q) = (Vec::new(), Vec::new());
        let mut outputs_finite = true;
        let mut groups = Groups::new(users, start, support, Some(query));
        while let Some((members, range)) = groups.next_group() {
            let members = &members;
            let first = range.start - users.0;
            let mut scale = [T::ZERO; LANES];
            scale[..members.len].copy_from_slice(&grad_losses[first..first + members.len]);
            // Written in place, or built in scratch (in cache) and then streamed out.
            let s_rows = support.row_range(range.start).start..support.row_range(range.end - 1).end;
            let q_rows = query.row_range(range.start).start..query.row_range(range.end - 1).end;
            let (mut gs, mut gq) = if direct {
                (
                    member_rows(grad_support, &support, s_base, range.clone()),
                    member_rows(grad_query, &query, q_base, range.clone()),
                )
            } else {
                scratch_s.resize(s_rows.len() * k, T::ZERO);
                scratch_q.resize(q_rows.len() * k, T::ZERO);
                (
                    member_rows(&mut scratch_s, &support, s_rows.start, range.clone()),
                    member_rows(&mut scratch_q, &query, q_rows.start, range.clone()),
                )
            };
            // A user skipped for non-finite input gets no gradient rows (the call fails).
            for (l, (a, b)) in gs.iter_mut().zip(gq.iter_mut()).enumerate().take(members.len) {
                if members.query[l].is_empty() {
                    (*a, *b) = (&mut [], &mut []);
                }
            }
            outputs_finite &= group.backward(
                ops,
                members,
                scale,
                inner,
                first_order,
                values.is_some(),
                stream,
                &mut gs,
                &mut gq,
                keep_going,
            )?;
            // The backward leaves the group's adapted weights and query margins in place.
            if let Some(v) = values.as_mut() {
                v.write(ops, k, &mut group, members, first, true);
            }
            if !direct {
                stream::copy(
                    &mut grad_support[(s_rows.start - s_base) * k..(s_rows.end - s_base) * k],
                    &scratch_s,
                );
                stream::copy(
                    &mut grad_query[(q_rows.start - q_base) * k..(q_rows.end - q_base) * k],
                    &scratch_q,
                );
            }
            for (row, &v) in lam.iter_mut().zip(&group.lam) {
                *row = lane_values(v);
            }
            for l in 0..members.len {
                if shared {
                    for (acc, row) in grad_w0.iter_mut().zip(&lam) {
                        *acc += row[l];
                    }
                } else {
                    for (j, row) in lam.iter().enumerate() {
                        grad_w0[(first + l) * k + j] = row[l];
                    }
                }
            }
        }
        stream::fence();
        Ok(Flags(groups.inputs_finite, outputs_finite))
    }
}

/// The error for non-finite input rows, naming the first one (support before query).
fn input_error<T: Real>(support: &Csr<'_, T>, query: Option<&Csr<'_, T>>, pool: &rayon::ThreadPool) -> Result<()> {
    support.check_values("support", Some(pool))?;
    if let Some(q) = query {
        q.check_values("query", Some(pool))?;
    }
    non_finite("support", "support or query contains a non-finite value")
}
