//! Bounded work on any input: a documented maximum for `steps`, a documented trajectory budget
//! checked before anything is allocated, and `keep_going` asked inside one user's long loop.

use std::sync::atomic::{AtomicUsize, Ordering};

use mrm_core::{
    forward, Control, Csr, Error, ForwardOutputs, InnerLoop, Optimizer, Start, MAX_STEPS, TRAJECTORY_BUDGET_BYTES,
};

mod common;
use common::{pool, shared_backward};

fn sgd(steps: usize) -> InnerLoop {
    InnerLoop {
        steps,
        lr: 0.1,
        optimizer: Optimizer::Sgd,
    }
}

/// One user, `n` support rows and 3 query rows of K = 8: the gradients of `backward`.
fn run_backward(
    n: usize,
    inner: &InnerLoop,
    first_order: bool,
    keep_going: &(dyn Fn() -> bool + Sync),
) -> Result<(), Error> {
    let k = 8;
    let (support, query, w0) = (vec![0.5f64; n * k], vec![0.25f64; 3 * k], vec![0.0f64; k]);
    let (s_off, q_off) = ([0i64, n as i64], [0i64, 3]);
    let p = pool(2);
    let ctl = Control {
        keep_going,
        ..Control::new(&p, 1 << 16)
    };
    let s = Csr::new("support", &support, &s_off, k).unwrap();
    let q = Csr::new("query", &query, &q_off, k).unwrap();
    shared_backward(&w0, s, q, &[1.0], inner, first_order, &ctl).map(|_| ())
}

#[test]
fn steps_beyond_the_maximum_are_an_error_naming_steps() {
    for steps in [MAX_STEPS + 1, 100_000_000, 1 << 59, 1 << 61, 1 << 62, usize::MAX] {
        let err = run_backward(4, &sgd(steps), false, &|| true).unwrap_err();
        assert_eq!(
            err,
            Error::Invalid(format!("steps must be <= {MAX_STEPS}, got {steps}"))
        );
    }
    assert_eq!(run_backward(4, &sgd(MAX_STEPS), false, &|| true), Ok(()));
}

#[test]
fn a_trajectory_over_the_budget_is_an_error_naming_steps_and_bytes() {
    // 7·8·K + 2n values per step, f64: 4000 rows, 100,000 steps is about 6.8 GB.
    let err = run_backward(4000, &sgd(MAX_STEPS), false, &|| true)
        .unwrap_err()
        .to_string();
    let bytes = MAX_STEPS * (7 * 8 * 8 + 2 * 4000) * 8;
    assert!(bytes > TRAJECTORY_BUDGET_BYTES);
    assert!(
        err.starts_with(&format!("steps = {MAX_STEPS} would need {bytes} bytes")),
        "{err}"
    );
    assert!(err.contains("users 0..=0 (4000 support rows, K = 8)"), "{err}");
    // First-order keeps less (5·8·K + n per step): 100 steps fit either way.
    assert_eq!(run_backward(4000, &sgd(100), false, &|| true), Ok(()));
    assert_eq!(run_backward(4000, &sgd(100), true, &|| true), Ok(()));
}

#[test]
fn keep_going_is_asked_inside_one_users_long_loop() {
    // One user: no chunk boundary at all, so only the group's own checks can stop it.
    let calls = AtomicUsize::new(0);
    let stop_after_one = || calls.fetch_add(1, Ordering::Relaxed) < 1;
    assert_eq!(
        run_backward(10, &sgd(MAX_STEPS), false, &stop_after_one),
        Err(Error::Interrupted)
    );

    let k = 8;
    let support = vec![0.5f32; 10 * k];
    let (s_off, w0) = ([0i64, 10], vec![0.0f32; k]);
    let mut w = vec![0.0f32; k];
    let p = pool(2);
    let ctl = Control {
        keep_going: &|| false,
        ..Control::new(&p, 1 << 16)
    };
    let s = Csr::new("support", &support, &s_off, k).unwrap();
    let out = ForwardOutputs::weights_only(&mut w);
    assert_eq!(
        forward(Start::Shared(&w0), s, None, &sgd(MAX_STEPS), out, &ctl),
        Err(Error::Interrupted)
    );
    // A short loop never asks.
    let out = ForwardOutputs::weights_only(&mut w);
    assert_eq!(forward(Start::Shared(&w0), s, None, &sgd(3), out, &ctl), Ok(()));
}
