"""RPO objective and gradient against torch.quantile + autograd."""

import numpy as np
import pytest

import mrm
import reference

pytest.importorskip("torch")


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 501])
@pytest.mark.parametrize("tail", [0.1, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("gamma", [0.5, 0.05, 2.0, 0.0, -1.0])
def test_rpo_matches_torch(n, tail, gamma):
    rng = np.random.default_rng(n * 1000 + int(tail * 100))
    losses = rng.uniform(0.1, 1.5, size=n)  # continuous: ties-free
    obj, grad = mrm.ops.rpo(losses, tail, gamma)
    ref_obj, ref_grad = reference.rpo_reference(losses, tail, gamma)
    assert abs(obj - ref_obj) <= 1e-9 * max(1.0, abs(ref_obj))
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_rpo_hard_mask_is_strict():
    losses = np.array([0.1, 0.2, 0.3, 0.4])
    # quantile(·, 0.5) = 0.25: only the two larger losses count
    obj, grad = mrm.ops.rpo(losses, 0.5, 0.0)
    assert obj == pytest.approx(0.7)
    np.testing.assert_array_equal(grad, [0, 0, 1, 1])
    # tail = 1: τ = min; the minimum itself is not > τ
    obj, grad = mrm.ops.rpo(losses, 1.0, -1.0)
    np.testing.assert_array_equal(grad, [0, 1, 1, 1])


def test_rpo_weighs_hard_users_more_than_mean():
    losses = np.linspace(0.2, 2.0, 20)
    _, grad = mrm.ops.rpo(losses, 0.5, 0.5)
    # The mean objective weighs every user alike. RPO weighs every user above the median loss
    # more than any user below it, leaving out the two users that define τ = quantile(L, 0.5)
    # (positions 9 and 10: rank 0.5 · 19 = 9.5), which also carry the gradient through τ.
    assert grad[11:].min() > grad[:9].max()


def test_rpo_float32():
    rng = np.random.default_rng(0)
    losses = rng.uniform(0.1, 1.0, 100)
    o64, g64 = mrm.ops.rpo(losses, 0.5, 0.5)
    o32, g32 = mrm.ops.rpo(losses.astype(np.float32), 0.5, 0.5)
    assert g32.dtype == np.float32
    assert abs(o32 - o64) <= 1e-4 * abs(o64)
    np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-5)
