"""MAP adaptation (SPEC §7) against an independent torch reference: a Newton solve with the
autograd Hessian, and the implicit gradient as autograd through one Newton step taken at the
(detached) solution, whose derivative is exactly ``−H⁻¹ ∂∇F/∂θ``. Also finite differences of
the converged solution, the Laplace covariance and the predictive variances."""

import numpy as np
import pytest
import torch

import mrm.ops as ops

torch.set_default_dtype(torch.float64)


def _data(seed=0, users=6, k=4, empty_support=True):
    rng = np.random.default_rng(seed)
    s_counts = rng.integers(1, 12, size=users)
    if empty_support:
        s_counts[2] = 0
    q_counts = rng.integers(1, 6, size=users)
    support = rng.normal(size=(int(s_counts.sum()), k))
    query = rng.normal(size=(int(q_counts.sum()), k))
    cs = lambda c: np.concatenate([[0], np.cumsum(c)]).astype(np.int64)  # noqa: E731
    return support, cs(s_counts), query, cs(q_counts)


def _p(w, weight_map):
    return torch.softmax(w, -1) if weight_map == "simplex" else w


def _objective(w, w0, lam, rows, weight_map):
    p = _p(w, weight_map)
    return torch.nn.functional.softplus(-(rows @ p)).sum() + 0.5 * (lam * (w - w0) ** 2).sum()


def _reference_solve(w0, lam, rows, weight_map):
    w = w0.detach().clone()
    for _ in range(200):
        w.requires_grad_(True)
        f = _objective(w, w0.detach(), lam.detach(), rows.detach(), weight_map)
        (g,) = torch.autograd.grad(f, w)
        if g.abs().max() < 1e-13:
            break
        h = torch.autograd.functional.hessian(lambda x: _objective(x, w0.detach(), lam.detach(), rows.detach(), weight_map), w.detach())
        step = torch.linalg.solve(h, g)
        t, f0 = 1.0, float(f.detach())
        while t > 1e-10:
            trial = (w - t * step).detach()
            if float(_objective(trial, w0.detach(), lam.detach(), rows.detach(), weight_map)) <= f0:
                break
            t /= 2
        w = trial
    return w.detach()


def _reference(w0_np, eta_np, support, so, query, qo, grad_losses, weight_map):
    """Losses and gradients w.r.t. (w0, eta, support, query) by autograd through one Newton step
    at each user's solution."""
    k = support.shape[1]
    w0 = torch.tensor(w0_np, requires_grad=True)
    eta = torch.tensor(eta_np, requires_grad=True)
    s = torch.tensor(support, requires_grad=True)
    q = torch.tensor(query, requires_grad=True)
    lam = torch.exp(eta).expand(k) if eta.numel() == 1 else torch.exp(eta)
    total, losses, solutions = 0.0, [], []
    for u in range(len(so) - 1):
        w0u = w0 if w0.ndim == 1 else w0[u]
        rows = s[so[u]:so[u + 1]]
        w_star = _reference_solve(w0u, lam, rows, weight_map)
        h = torch.autograd.functional.hessian(lambda x: _objective(x, w0u.detach(), lam.detach(), rows.detach(), weight_map), w_star)
        w_var = w_star.clone().requires_grad_(True)
        grad_f = torch.autograd.grad(_objective(w_var, w0u, lam, rows, weight_map), w_var, create_graph=True)[0]
        w_u = w_star - torch.linalg.solve(h, grad_f)
        loss = torch.nn.functional.softplus(-(q[qo[u]:qo[u + 1]] @ _p(w_u, weight_map))).mean()
        losses.append(float(loss))
        solutions.append(w_star.numpy())
        total = total + grad_losses[u] * loss
    total.backward()
    return np.array(losses), np.stack(solutions), (w0.grad.numpy(), s.grad.numpy(), q.grad.numpy(), eta.grad.numpy())


def _close(a, b, rtol=1e-7):
    scale = max(1.0, float(np.abs(b).max()))
    assert np.abs(a - b).max() <= rtol * scale, (np.abs(a - b).max(), scale)


@pytest.mark.parametrize("weight_map", ["simplex", "linear"])
@pytest.mark.parametrize("per_user_w0", [False, True])
@pytest.mark.parametrize("eta_size", [1, 4])
def test_solution_and_implicit_gradient_match_autograd(weight_map, per_user_w0, eta_size):
    support, so, query, qo = _data(seed=eta_size + 2 * per_user_w0)
    rng = np.random.default_rng(7)
    users, k = len(so) - 1, support.shape[1]
    w0 = rng.normal(scale=0.5, size=(users, k) if per_user_w0 else (k,))
    eta = rng.normal(scale=0.5, size=eta_size)
    grad_losses = rng.uniform(0.1, 1.0, size=users)
    inner = ops.InnerLoop("map", tol=1e-12, weight_map=weight_map)
    ref_losses, ref_w, ref_grads = _reference(w0, eta, support, so, query, qo, grad_losses, weight_map)
    out, grads = ops.meta_value_and_grad(w0, support, so, query, qo, grad_losses, inner=inner, eta=eta)
    _close(out.weights, ref_w)
    _close(out.losses, ref_losses)
    grad_w0, grad_support, grad_query, grad_eta = grads
    for mine, ref in zip((grad_w0, grad_support, grad_query, grad_eta), ref_grads):
        assert mine.shape == ref.shape
        _close(mine, ref)
    # the separate calls give the same bits as the fused one
    alone = ops.meta_backward(w0, support, so, query, qo, grad_losses, inner=inner, eta=eta)
    for a, b in zip(alone, grads):
        np.testing.assert_array_equal(a, b)
    fwd = ops.meta_forward(w0, support, so, query, qo, inner=inner, eta=eta)
    np.testing.assert_array_equal(fwd.losses, out.losses)


def test_gradient_matches_finite_differences_of_the_converged_solution():
    support, so, query, qo = _data(seed=11, users=4, k=3)
    inner = ops.InnerLoop("map", tol=1e-13, weight_map="simplex")
    w0, eta = np.array([0.2, -0.1, 0.3]), np.array([0.4, -0.2, 0.1])
    gl = np.ones(len(so) - 1)

    def objective(w0_, eta_):
        return float(ops.meta_forward(w0_, support, so, query, qo, inner=inner, eta=eta_).losses.sum())

    _, _, _, grad_eta = ops.meta_backward(w0, support, so, query, qo, gl, inner=inner, eta=eta)
    grad_w0 = ops.meta_backward(w0, support, so, query, qo, gl, inner=inner, eta=eta)[0]
    h = 1e-6
    for j in range(3):
        e = np.zeros(3)
        e[j] = h
        fd_w0 = (objective(w0 + e, eta) - objective(w0 - e, eta)) / (2 * h)
        fd_eta = (objective(w0, eta + e) - objective(w0, eta - e)) / (2 * h)
        assert abs(fd_w0 - grad_w0[j]) < 1e-7
        assert abs(fd_eta - grad_eta[j]) < 1e-7


@pytest.mark.parametrize("weight_map", ["simplex", "linear"])
def test_covariance_is_the_inverse_hessian_and_predictive_variances_follow(weight_map):
    support, so, query, qo = _data(seed=3, users=5, k=3)
    w0, eta = np.array([0.1, 0.0, -0.2]), np.array([0.3])
    result = ops.map_adapt(w0, eta, support, so, inner=ops.InnerLoop("map", tol=1e-12, weight_map=weight_map),
                           return_covariance=True)
    assert result.converged.all()
    lam = torch.full((3,), float(np.exp(eta[0])))
    for u in range(len(so) - 1):
        rows = torch.tensor(support[so[u]:so[u + 1]])
        h = torch.autograd.functional.hessian(
            lambda x: _objective(x, torch.tensor(w0), lam, rows, weight_map), torch.tensor(result.weights[u]))
        _close(result.covariance[u], torch.linalg.inv(h).numpy(), rtol=1e-9)
    mean, var = ops.predict(query, qo, result.weights, covariance=result.covariance, weight_map=weight_map)
    for u in range(len(so) - 1):
        w = torch.tensor(result.weights[u])
        jac = torch.autograd.functional.jacobian(lambda x: _p(x, weight_map), w).numpy()
        for i in range(qo[u], qo[u + 1]):
            jf = jac.T @ query[i]
            assert abs(var[i] - jf @ result.covariance[u] @ jf) < 1e-12
            assert abs(mean[i] - query[i] @ _p(w, weight_map).numpy()) < 1e-12
    prob = ops.pair_probabilities(mean, var)
    assert ((prob > 0) & (prob < 1)).all() and np.all((prob - 0.5) * mean >= 0)
    assert np.all(np.abs(prob - 0.5) <= np.abs(ops.pair_probabilities(mean) - 0.5) + 1e-15)
    assert np.all(ops.information_gain(mean, var) >= 0)


def test_non_convergence_is_reported_and_raised_where_it_matters():
    support, so, query, qo = _data(seed=5)
    inner = ops.InnerLoop("map", max_iter=1, tol=1e-14)
    result = ops.map_adapt(np.zeros(4), np.array([-3.0]), support, so, inner=inner)
    assert not result.converged.all()
    assert (result.iterations <= 1).all()
    assert result.converged[2]  # no support pairs: w0 is the solution
    with pytest.raises(ValueError, match="did not converge for user"):
        ops.adapt(np.zeros(4), support, so, inner=inner, eta=[-3.0])
    with pytest.raises(ValueError, match="did not converge for user"):
        ops.meta_backward(np.zeros(4), support, so, query, qo, np.ones(len(so) - 1), inner=inner, eta=[-3.0])


def test_user_without_support_keeps_w0_and_results_do_not_depend_on_threads():
    support, so, query, qo = _data(seed=8, users=600, k=8)
    w0 = np.linspace(-0.3, 0.3, 8).astype(np.float32)
    eta = np.zeros(8, np.float32)
    s32, q32 = support.astype(np.float32), query.astype(np.float32)
    one = ops.map_adapt(w0, eta, s32, so, num_threads=1, return_covariance=True)
    two = ops.map_adapt(w0, eta, s32, so, num_threads=2, return_covariance=True)
    for a, b in zip((one.weights, one.iterations, one.covariance), (two.weights, two.iterations, two.covariance)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(one.weights[2], w0)
    assert one.converged.all() and one.weights.dtype == np.float32
    g1 = ops.meta_backward(w0, s32, so, q32, qo, np.ones(600, np.float32), inner=ops.InnerLoop("map"), eta=eta, num_threads=1)
    g2 = ops.meta_backward(w0, s32, so, q32, qo, np.ones(600, np.float32), inner=ops.InnerLoop("map"), eta=eta, num_threads=2)
    for a, b in zip(g1, g2):
        np.testing.assert_array_equal(a, b)
    # float32 inputs are solved in float64 inside: the two dtypes agree to float32 rounding
    f64 = ops.map_adapt(w0.astype(np.float64), eta.astype(np.float64), s32.astype(np.float64), so)
    assert np.abs(f64.weights - one.weights).max() < 1e-5


@pytest.mark.parametrize("weight_map", ["simplex", "linear"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streamed_adaptation_equals_the_grouped_one(weight_map, dtype):
    """The solution alone streams users through the SIMD lanes (a lane takes the next user when
    its own solve ends); with covariances the users are solved in fixed groups. Same bits, on
    ragged users (some without pairs, some far from w0), warm starts, several blocks."""
    support, so, query, qo = _data(seed=11, users=700, k=6)
    support = (support * np.repeat(np.linspace(0.1, 3.0, 700), np.diff(so))[:, None]).astype(dtype)
    w0, eta = np.linspace(-0.2, 0.4, 6).astype(dtype), np.linspace(-1.0, 1.0, 6).astype(dtype)
    init = np.random.default_rng(3).normal(size=(700, 6)).astype(dtype)
    inner = ops.InnerLoop("map", weight_map=weight_map, tol=1e-9)
    for start in (None, init):
        streamed = ops.map_adapt(w0, eta, support, so, inner=inner, init=start, num_threads=2)
        grouped = ops.map_adapt(w0, eta, support, so, inner=inner, init=start, num_threads=2, return_covariance=True)
        for name in ("weights", "iterations", "grad_norm", "converged", "support_losses"):
            np.testing.assert_array_equal(getattr(streamed, name), getattr(grouped, name), err_msg=name)
        assert streamed.converged.all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eta=[np.nan]), "eta must be finite"),
        (dict(eta=[1e3]), "eta must be finite and within"),
        (dict(eta=[0.0, 1.0]), "eta must have 1 or K"),
        (dict(eta=None), "needs eta"),
        (dict(eta=[0.0], inner=dict(tol=0.0)), "tol must be"),
        (dict(eta=[0.0], inner=dict(tol=float("nan"))), "tol must be"),
        (dict(eta=[0.0], inner=dict(max_iter=0)), "max_iter must be"),
        (dict(eta=[0.0], inner=dict(weight_map="sphere")), "weight_map"),
        (dict(eta=[0.0], inner=dict(steps=3)), "steps does not apply"),
    ],
)
def test_bad_map_arguments_are_named(kwargs, match):
    support, so, _, _ = _data()
    inner_kw = kwargs.pop("inner", {})
    with pytest.raises((ValueError, TypeError), match=match):
        inner = ops.InnerLoop("map", **inner_kw)
        ops.adapt(np.zeros(4), support, so, inner=inner, **kwargs)


def test_inner_loop_settings_value():
    loop = ops.InnerLoop("sgd", steps=10, lr=1.0)
    assert ops.InnerLoop.from_dict(loop.to_dict()) == loop
    assert ops.InnerLoop().steps == 1 and ops.InnerLoop().lr == 1e-3  # the released values
    mapped = ops.InnerLoop("map", weight_map="linear")
    assert ops.InnerLoop.from_dict(mapped.to_dict()) == mapped
    with pytest.raises(ValueError, match="weight_map 'linear' needs the 'map' solver"):
        ops.InnerLoop("adam", weight_map="linear")
    with pytest.raises(ValueError, match="lr must be finite"):
        ops.InnerLoop("sgd", steps=1, lr=-1.0)
    with pytest.raises(TypeError, match="not both"):
        ops.adapt(np.zeros(2), np.ones((1, 2)), [0, 1], inner=loop, steps=3)
    support, so, _, _ = _data(k=2)
    np.testing.assert_array_equal(ops.adapt(np.zeros(2), support, so, inner=loop),
                                  ops.adapt(np.zeros(2), support, so, steps=10, lr=1.0, optimizer="sgd"))


def test_torch_op_gradients_flow_into_theta_and_match_the_numpy_gradient():
    from mrm import torch_ops

    support, so, query, qo = _data(seed=13, users=5, k=3)
    inner = ops.InnerLoop("map", tol=1e-12, weight_map="linear")
    w0 = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    eta = torch.tensor([0.2, 0.0, -0.1], requires_grad=True)
    s = torch.tensor(support, requires_grad=True)
    q = torch.tensor(query, requires_grad=True)
    losses = torch_ops.user_losses(w0, s, so, q, qo, inner=inner, eta=eta)
    losses.sum().backward()
    grads = ops.meta_backward(w0.detach().numpy(), support, so, query, qo, np.ones(5), inner=inner, eta=eta.detach().numpy())
    for mine, ref in zip((w0.grad, s.grad, q.grad, eta.grad), grads):
        np.testing.assert_allclose(mine.numpy(), ref, rtol=0, atol=1e-14)
    args = (w0.detach(), eta.detach(), s.detach(), torch.as_tensor(so), q.detach(), torch.as_tensor(qo), 100, 1e-10, "simplex", 1)
    torch.library.opcheck(torch.ops.mrm.map_user_losses.default, args)
