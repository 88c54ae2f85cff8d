"""The native kernels against the independent autograd reference (tests/reference.py)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mrm
import reference

pytest.importorskip("torch")

HYPER = {"sgd": {"lr": 0.5}, "adam": {"lr": 0.05}}


def assert_close(actual, expected, rtol=1e-9, what="", atol=1e-14):
    """Norm-relative error: max |a − e| ≤ rtol · max |e| + atol.

    The small absolute floor covers outputs that cancel to ~1e-9 of the O(1) intermediate
    terms they are made of (e.g. the support gradient through one Adam sign-like step), where
    both implementations carry rounding of ~1e-17 absolute.
    """
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, what
    assert np.all(np.isfinite(actual)), what
    scale = float(np.abs(expected).max(initial=0.0))
    err = float(np.abs(actual - expected).max(initial=0.0))
    assert err <= rtol * scale + atol, f"{what}: max abs error {err:.3e} > {rtol:.0e} × {scale:.3e} + {atol:.0e}"


@st.composite
def batches(draw, k):
    """A ragged batch: 1–4 users, 0–50 support pairs (some users without), 1–50 query pairs."""
    n_users = draw(st.integers(1, 4))
    n_support = draw(st.lists(st.integers(0, 50), min_size=n_users, max_size=n_users))
    n_query = draw(st.lists(st.integers(1, 50), min_size=n_users, max_size=n_users))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([0.3, 1.0, 3.0]))
    per_user = draw(st.booleans())
    rng = np.random.default_rng(seed)
    support = rng.normal(scale=scale, size=(sum(n_support), k))
    query = rng.normal(scale=scale, size=(sum(n_query), k))
    w0 = rng.normal(scale=0.5, size=(n_users, k) if per_user else (k,))
    grad_losses = rng.normal(size=n_users)
    support_offsets = np.concatenate([[0], np.cumsum(n_support)]).astype(np.int64)
    query_offsets = np.concatenate([[0], np.cumsum(n_query)]).astype(np.int64)
    return w0, support, support_offsets, query, query_offsets, grad_losses


@pytest.mark.parametrize("k", [1, 2, 8, 64])
@pytest.mark.parametrize("steps", [0, 1, 3, 10])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_forward_backward_match_autograd(data, optimizer, steps, k):
    w0, support, s_off, query, q_off, grad_losses = data.draw(batches(k))
    first_order = data.draw(st.booleans())
    kw = dict(steps=steps, optimizer=optimizer, **HYPER[optimizer])

    out = mrm.ops.meta_forward(w0, support, s_off, query, q_off, **kw)
    ref_losses, ref_weights, ref_support_losses, ref_accuracy = reference.batch_forward(
        w0, support, s_off, query, q_off, **kw
    )
    assert_close(out.losses, ref_losses, what="losses")
    assert_close(out.weights, ref_weights, what="weights")
    assert_close(out.support_losses, ref_support_losses, what="support_losses")
    np.testing.assert_array_equal(out.accuracy, ref_accuracy)
    assert_close(mrm.ops.adapt(w0, support, s_off, **kw), ref_weights, what="adapt")

    grads = mrm.ops.meta_backward(w0, support, s_off, query, q_off, grad_losses, first_order=first_order, **kw)
    ref_grads = reference.batch_backward(
        w0, support, s_off, query, q_off, grad_losses, first_order=first_order, **kw
    )
    for name, got, want in zip(("grad_w0", "grad_support", "grad_query"), grads, ref_grads):
        assert_close(got, want, what=f"{name} (first_order={first_order})")

    # The fused pass returns the same bytes as the two calls checked above.
    fused, fused_grads = mrm.ops.meta_value_and_grad(
        w0, support, s_off, query, q_off, grad_losses, first_order=first_order, **kw
    )
    for name in ("losses", "weights", "support_losses", "accuracy"):
        np.testing.assert_array_equal(getattr(fused, name), getattr(out, name), err_msg=name)
    for name, got, want in zip(("grad_w0", "grad_support", "grad_query"), fused_grads, grads):
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_user_without_support_keeps_w0():
    w0 = np.array([0.3, -0.2, 0.1])
    support = np.array([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0]])
    weights = mrm.ops.adapt(w0, support, [0, 0, 2], steps=3, lr=0.1, optimizer="adam")
    np.testing.assert_array_equal(weights[0], w0)
    assert not np.array_equal(weights[1], w0)


def test_adam_zero_gradient_has_finite_adjoint():
    """K = 1: the gradient is exactly 0, Adam's v stays 0; the adjoint takes its finite limit."""
    rng = np.random.default_rng(1)
    support, query = rng.normal(size=(5, 1)), rng.normal(size=(4, 1))
    grads = mrm.ops.meta_backward(np.zeros(1), support, [0, 5], query, [0, 4], np.ones(1), steps=3, lr=0.1)
    ref = reference.batch_backward(np.zeros(1), support, [0, 5], query, [0, 4], np.ones(1), steps=3, lr=0.1, optimizer="adam")
    for got, want in zip(grads, ref):
        assert np.all(np.isfinite(got))
        assert_close(got, want)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_float32_close_to_float64(optimizer):
    rng = np.random.default_rng(7)
    n_support, n_query = rng.integers(1, 40, size=50), rng.integers(1, 40, size=50)
    s_off = np.concatenate([[0], np.cumsum(n_support)])
    q_off = np.concatenate([[0], np.cumsum(n_query)])
    support, query = rng.normal(size=(s_off[-1], 8)), rng.normal(size=(q_off[-1], 8))
    w0, gl = rng.normal(scale=0.3, size=8), np.ones(50)
    kw = dict(steps=5, optimizer=optimizer, **HYPER[optimizer])
    f64 = mrm.ops.meta_forward(w0, support, s_off, query, q_off, **kw)
    f32 = mrm.ops.meta_forward(*(a.astype(np.float32) for a in (w0, support)), s_off,
                               query.astype(np.float32), q_off, **kw)
    assert f32.losses.dtype == np.float32
    assert_close(f32.losses, f64.losses, rtol=1e-4, atol=1e-7)
    assert_close(f32.weights, f64.weights, rtol=1e-4, atol=1e-7)
    g64 = mrm.ops.meta_backward(w0, support, s_off, query, q_off, gl, **kw)
    g32 = mrm.ops.meta_backward(w0.astype(np.float32), support.astype(np.float32), s_off,
                                query.astype(np.float32), q_off, gl.astype(np.float32), **kw)
    for a, b in zip(g32, g64):
        assert a.dtype == np.float32
        assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("k", [5, 16, 32, 64])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_float32_close_to_float64_other_widths(optimizer, k):
    """As above for other K: 16, 32 and 64 run the hand-vectorised float32 kernels on CPUs with
    AVX2, 5 the portable ones. Users get at least 4 support pairs: with 1 or 2, Adam's first steps
    divide by sqrt(v) of coordinates whose gradient is nearly 0, and float32 rounding (in either
    kernel) is then amplified beyond 1e-4 in a few support-row gradients."""
    rng = np.random.default_rng(11)
    n_support, n_query = rng.integers(4, 40, size=50), rng.integers(1, 40, size=50)
    s_off = np.concatenate([[0], np.cumsum(n_support)])
    q_off = np.concatenate([[0], np.cumsum(n_query)])
    support, query = rng.normal(size=(s_off[-1], k)), rng.normal(size=(q_off[-1], k))
    w0, gl = rng.normal(scale=0.3, size=k), np.linspace(0.5, 1.5, 50)
    kw = dict(steps=5, optimizer=optimizer, **HYPER[optimizer])
    f64 = mrm.ops.meta_forward(w0, support, s_off, query, q_off, **kw)
    g64 = mrm.ops.meta_backward(w0, support, s_off, query, q_off, gl, **kw)
    narrow = [a.astype(np.float32) for a in (w0, support, query, gl)]
    f32 = mrm.ops.meta_forward(narrow[0], narrow[1], s_off, narrow[2], q_off, **kw)
    g32 = mrm.ops.meta_backward(narrow[0], narrow[1], s_off, narrow[2], q_off, narrow[3], **kw)
    for a, b in [(f32.losses, f64.losses), (f32.weights, f64.weights), *zip(g32, g64)]:
        assert a.dtype == np.float32
        assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_score_matches_reference():
    rng = np.random.default_rng(3)
    offsets = np.array([0, 4, 4, 9])
    features, weights = rng.normal(size=(9, 5)), rng.normal(size=(3, 5))
    assert_close(mrm.ops.score(features, offsets, weights), reference.score_reference(features, offsets, weights))


def test_non_contiguous_inputs_are_accepted():
    rng = np.random.default_rng(4)
    support = np.asfortranarray(rng.normal(size=(6, 3)))
    query = rng.normal(size=(8, 6))[::2, ::2]
    assert not support.flags.c_contiguous and not query.flags.c_contiguous
    out = mrm.ops.meta_forward(np.zeros(3), support, [0, 2, 6], query, [0, 1, 4], steps=2, lr=0.1)
    ref = reference.batch_forward(np.zeros(3), support, [0, 2, 6], query, [0, 1, 4], steps=2, lr=0.1, optimizer="adam")
    assert_close(out.losses, ref[0])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_adapt_support_losses_match_reference(optimizer):
    rng = np.random.default_rng(3)
    counts = np.array([0, 3, 7, 1])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    support = rng.normal(size=(offsets[-1], 4))
    w0 = rng.normal(size=4)
    weights, losses = mrm.ops.adapt(w0, support, offsets, steps=3, optimizer=optimizer, return_support_losses=True,
                                    **HYPER[optimizer])
    # the reference's query = the support, so its query loss is the support loss at w_T
    _, ref_weights, ref_support_losses, _ = reference.batch_forward(
        w0, support, offsets, support, offsets, steps=3, optimizer=optimizer, **HYPER[optimizer])
    assert_close(weights, ref_weights, what="weights")
    assert_close(losses, ref_support_losses, what="support losses")
    assert losses[0] == 0.0
