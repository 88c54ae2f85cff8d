"""The torch custom ops against autograd through an unrolled per-user reference (float64)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import reference  # noqa: E402
from mrm.model import MetaRewardModel, ModelConfig  # noqa: E402
from mrm.torch_ops import pair_differences, rpo_objective, user_losses  # noqa: E402

RTOL = 1e-9


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def _population(seed, n_users=5, dim=7, max_pairs=6):
    """Random embeddings and, per user, support and query pairs of embedding rows."""
    rng = np.random.default_rng(seed)
    n_rows = 40
    emb = torch.from_numpy(rng.normal(size=(n_rows, dim)) * 30.0)
    support_counts = rng.integers(0, max_pairs, size=n_users)
    support_counts[0] = 0  # a user with no support pairs keeps w0
    query_counts = rng.integers(1, max_pairs, size=n_users)
    pick = lambda n: (rng.integers(0, n_rows, size=n), rng.integers(0, n_rows, size=n))  # noqa: E731
    s_c, s_r = pick(int(support_counts.sum()))
    q_c, q_r = pick(int(query_counts.sum()))
    so = np.concatenate([[0], np.cumsum(support_counts)]).astype(np.int64)
    qo = np.concatenate([[0], np.cumsum(query_counts)]).astype(np.int64)
    return emb, (s_c, s_r, so), (q_c, q_r, qo)


def _model(seed, dim, hidden, k, activation=None):
    torch.manual_seed(seed)
    model = MetaRewardModel(ModelConfig(input_dim=dim, num_bases=k, hidden_sizes=hidden, activation=activation)).double()
    with torch.no_grad():
        model.shared_weight.normal_()
    return model


def _native_grads(model, emb, sup, qry, hyper, tail, gamma):
    model.zero_grad()
    s_c, s_r, so = sup
    q_c, q_r, qo = qry
    support = model.pair_differences(emb, s_c, s_r)
    query = model.pair_differences(emb, q_c, q_r)
    losses = user_losses(model.shared_weight, support, so, query, qo, **hyper)
    objective = rpo_objective(losses, tail, gamma)
    objective.backward()
    return objective.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _reference_grads(model, emb, sup, qry, hyper, tail, gamma):
    """Per-user loop, autograd through the unrolled inner loop (create_graph), torch.quantile."""
    model.zero_grad()
    s_c, s_r, so = sup
    q_c, q_r, qo = qry
    phi = model.features(emb)
    hyper = dict(hyper)
    hyper.pop("num_threads", None)
    losses = []
    for u in range(len(so) - 1):
        d_s = phi[s_c[so[u]:so[u + 1]]] - phi[s_r[so[u]:so[u + 1]]]
        d_q = phi[q_c[qo[u]:qo[u + 1]]] - phi[q_r[qo[u]:qo[u + 1]]]
        w = reference.adapt_user(model.shared_weight, d_s, **hyper)
        losses.append(reference.bt_loss(w, d_q))
    losses = torch.stack(losses)
    tau = torch.quantile(losses, 1.0 - tail)
    if gamma > 0:
        objective = (torch.sigmoid((losses - tau) / gamma) * losses).sum()
    else:
        objective = ((losses > tau).to(losses.dtype) * losses).sum()
    objective.backward()
    return objective.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adam", 0.05)])
@pytest.mark.parametrize("steps", [0, 1, 3])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("hidden,activation", [([], None), ([5], None), ([6], "tanh")])
def test_meta_gradient_into_theta_matches_unrolled_reference(optimizer, lr, steps, first_order, hidden, activation):
    emb, sup, qry = _population(seed=steps * 7 + len(hidden))
    hyper = dict(steps=steps, lr=lr, optimizer=optimizer, first_order=first_order)
    model = _model(0, emb.shape[1], hidden, 3, activation)
    obj_native, g_native = _native_grads(model, emb, sup, qry, hyper, tail=0.6, gamma=0.3)
    obj_ref, g_ref = _reference_grads(model, emb, sup, qry, hyper, tail=0.6, gamma=0.3)
    assert abs(obj_native - obj_ref) <= RTOL * max(1.0, abs(obj_ref))
    assert set(g_native) == set(g_ref)
    for name in g_ref:
        assert torch.count_nonzero(g_ref[name]) > 0 or steps == 0
        assert _rel_err(g_native[name], g_ref[name]) <= RTOL, name


def test_hard_rpo_mask_gradient_matches_reference():
    emb, sup, qry = _population(seed=3, n_users=6)
    hyper = dict(steps=2, lr=0.3, optimizer="sgd")
    model = _model(1, emb.shape[1], [4], 2)
    obj_native, g_native = _native_grads(model, emb, sup, qry, hyper, tail=0.5, gamma=0.0)
    obj_ref, g_ref = _reference_grads(model, emb, sup, qry, hyper, tail=0.5, gamma=0.0)
    assert abs(obj_native - obj_ref) <= RTOL * max(1.0, abs(obj_ref))
    for name in g_ref:
        assert _rel_err(g_native[name], g_ref[name]) <= RTOL, name


def _small_inputs(dtype=torch.float64, requires_grad=True):
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(3, generator=gen, dtype=dtype)
    support = torch.randn(7, 3, generator=gen, dtype=dtype)
    query = torch.randn(6, 3, generator=gen, dtype=dtype)
    so = torch.tensor([0, 3, 3, 7])
    qo = torch.tensor([0, 2, 4, 6])
    for t in (w0, support, query):
        t.requires_grad_(requires_grad)
    return w0, support, so, query, qo


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_gradcheck_user_losses(optimizer):
    w0, support, so, query, qo = _small_inputs()
    fn = lambda w, s, q: user_losses(w, s, so, q, qo, steps=2, lr=0.2, optimizer=optimizer)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (w0, support, query), eps=1e-6, atol=1e-7)


def test_gradcheck_rpo():
    losses = torch.tensor([0.3, 0.9, 0.1, 0.55, 0.72], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: rpo_objective(x, 0.5, 0.5), (losses,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    w0, support, so, query, qo = _small_inputs(dtype)
    args = (w0, support, so, query, qo, 2, 0.2, "adam", 0.9, 0.999, 1e-8, False, 1)
    torch.library.opcheck(torch.ops.mrm.user_losses.default, args)
    losses = torch.rand(5, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.mrm.rpo.default, (losses, 0.5, 0.5))
    features = torch.rand(6, 3, dtype=dtype, requires_grad=True)
    chosen, rejected = torch.tensor([0, 5, 2, 2]), torch.tensor([1, 0, 2, 4])
    torch.library.opcheck(torch.ops.mrm.pair_differences.default, (features, chosen, rejected))


def test_pair_differences_match_indexing_and_pass_gradcheck():
    features = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    chosen, rejected = torch.tensor([6, 0, 3, 3, 1]), torch.tensor([2, 0, 5, 6, 6])
    torch.testing.assert_close(pair_differences(features, chosen, rejected), features[chosen] - features[rejected],
                               rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda f: pair_differences(f, chosen, rejected), (features,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(lambda f: pair_differences(f, chosen, rejected), (features,))
    with pytest.raises(ValueError, match=r"chosen\[1\] = 7 is out of range for 7 feature rows"):
        pair_differences(features, torch.tensor([0, 7]), torch.tensor([1, 1]))


def test_float32_outputs_and_gradients_keep_dtype():
    w0, support, so, query, qo = _small_inputs(torch.float32)
    losses = user_losses(w0, support, so, query, qo, steps=1, lr=0.1)
    assert losses.dtype == torch.float32
    rpo_objective(losses, 0.5, 0.5).backward()
    assert w0.grad.dtype == support.grad.dtype == query.grad.dtype == torch.float32


def test_torch_compile_training_step():
    torch.manual_seed(0)
    emb, sup, qry = _population(seed=11)
    model = _model(2, emb.shape[1], [4], 3)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    s_c, s_r, so = (torch.as_tensor(x) for x in sup)
    q_c, q_r, qo = (torch.as_tensor(x) for x in qry)

    def meta_objective():
        phi = model.features(emb)
        losses = user_losses(model.shared_weight, phi[s_c] - phi[s_r], so, phi[q_c] - phi[q_r], qo, steps=2, lr=0.3, optimizer="sgd")
        return rpo_objective(losses, 0.5, 0.5)

    compiled_objective = torch.compile(meta_objective, backend="aot_eager", fullgraph=True)

    def step(objective_fn):
        objective = objective_fn()
        objective.backward()
        return objective.detach()

    eager_model_state = {k: v.clone() for k, v in model.state_dict().items()}
    optim.zero_grad()
    loss_compiled = step(compiled_objective)
    grads_compiled = [p.grad.clone() for p in model.parameters()]
    model.load_state_dict(eager_model_state)
    optim.zero_grad()
    loss_eager = step(meta_objective)
    assert torch.allclose(loss_compiled, loss_eager, rtol=1e-12, atol=0)
    for g, p in zip(grads_compiled, model.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-10, atol=1e-14)
    optim.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_cpu_tensor_is_a_clear_error():
    w0, support, so, query, qo = _small_inputs(requires_grad=False)
    with pytest.raises(ValueError, match="support is on meta"):
        user_losses(w0, support.to("meta"), so, query, qo, steps=1, lr=0.1)
    with pytest.raises(TypeError, match="support_offsets must be an integer"):
        user_losses(w0, support, so.double(), query, qo, steps=1, lr=0.1)


def test_bad_input_reaches_the_user_as_value_error():
    w0, support, so, query, qo = _small_inputs(requires_grad=False)
    support[4, 1] = float("nan")
    with pytest.raises(ValueError, match="user 2"):
        user_losses(w0, support, so, query, qo, steps=1, lr=0.1)
