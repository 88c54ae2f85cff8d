//! Helpers shared by the integration tests (each test file uses its own part of them).
#![allow(dead_code)]

use mrm_core::{value_and_grad, Control, Csr, Dtype, Error, InnerLoop, Start};

pub fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
}

/// The three gradients of `value_and_grad`: w0, support rows, query rows.
pub type Grads<T> = (Vec<T>, Vec<T>, Vec<T>);

/// `value_and_grad` (gradients only) from a shared start into fresh zeroed gradients.
pub fn shared_backward<T: Dtype>(
    w0: &[T],
    support: Csr<'_, T>,
    query: Csr<'_, T>,
    grad_losses: &[T],
    inner: &InnerLoop,
    first_order: bool,
    ctl: &Control<'_>,
) -> Result<Grads<T>, Error> {
    let (mut gw, mut gs, mut gq) = (
        vec![T::ZERO; w0.len()],
        vec![T::ZERO; support.values.len()],
        vec![T::ZERO; query.values.len()],
    );
    value_and_grad(
        Start::Shared(w0),
        support,
        query,
        grad_losses,
        inner,
        first_order,
        None,
        &mut gw,
        &mut gs,
        &mut gq,
        ctl,
    )?;
    Ok((gw, gs, gq))
}
