"""Independent float64 reference for mrm-fast (SPEC.md sections 1-4).

Plain PyTorch, one user at a time, every derivative taken by autograd through the
unrolled inner loop. Slow on purpose: it is meant to be obviously correct, and the
native kernel is tested against it.

Array conventions follow SPEC section 4: ragged per-user sets are CSR
(`values (N, K)`, `offsets (U+1,)`, user u owns rows `offsets[u]:offsets[u+1]`).
"""

import numpy as np
import torch

DTYPE = torch.float64

# Added under the square root of Adam's second moment. When a gradient coordinate is
# exactly 0 (always the case for K = 1), v = 0 and d sqrt(v)/dv is infinite, but it is
# multiplied by dv/dg = 2 (1 - beta2) g = 0: the exact limit of the product is 0. With
# the shift the factor stays finite, so 0 * finite = 0 instead of 0 * inf = NaN. It is
# far below anything that changes a float64 value of sqrt(v) + eps.
_SQRT_SHIFT = 1e-300


def _t(x):
    return torch.as_tensor(np.asarray(x), dtype=DTYPE)


def bt_loss(w, D):
    """Bradley-Terry loss mean_i softplus(-D_i . softmax(w)); D is (n, K)."""
    return torch.nn.functional.softplus(-(D @ torch.softmax(w, dim=0))).mean()


def _inner_grad(w, support, create_graph):
    """Gradient of the support loss with respect to w.

    With create_graph the result stays differentiable (with respect to w and to the
    support rows), so a later backward pass goes through Hessian-vector products.
    Without it, the gradient is a constant (first-order mode).
    """
    if not (create_graph and w.requires_grad):
        w = w.detach().requires_grad_()
    with torch.enable_grad():
        (g,) = torch.autograd.grad(bt_loss(w, support), w, create_graph=create_graph)
    return g


def adapt_user(w0, support, steps, lr, optimizer, betas=(0.9, 0.999), eps=1e-8,
               first_order=False):
    """Run the inner loop from w0 on one user's support rows; return w_T.

    first_order=True treats every inner gradient as a constant, so d w_T / d w0 is
    the identity and the support rows get no gradient.
    """
    if support.shape[0] == 0:
        return w0
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"unknown optimizer {optimizer!r}")
    beta1, beta2 = betas
    w = w0
    m = torch.zeros_like(w0)
    v = torch.zeros_like(w0)
    for t in range(1, steps + 1):
        g = _inner_grad(w, support, create_graph=not first_order)
        if optimizer == "sgd":
            w = w - lr * g
        else:
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            denom = torch.sqrt(v + _SQRT_SHIFT) / np.sqrt(1 - beta2 ** t) + eps
            w = w - (lr / (1 - beta1 ** t)) * m / denom
    return w


def user_outputs(w0, support, query, **adapt_kw):
    """Everything the forward pass reports for one user (tensors in, tensors out).

    Returns a dict: `weights` (w_T), `loss` (query loss at w_T), `support_loss`
    (support loss at w_T, 0 with no support rows) and `accuracy` (float, fraction of
    query rows with D . softmax(w_T) > 0, strict). With no query rows, loss and
    accuracy are NaN.
    """
    w = adapt_user(w0, support, **adapt_kw)
    if support.shape[0] > 0:
        support_loss = bt_loss(w, support)
    else:
        support_loss = torch.zeros((), dtype=w.dtype)
    margins = query @ torch.softmax(w, dim=0)
    return {
        "weights": w,
        "loss": bt_loss(w, query),
        "support_loss": support_loss,
        "accuracy": (margins > 0).to(DTYPE).mean().item(),
    }


def _user_w0(w0, u):
    """w0 is either shared (K,) or per user (U, K)."""
    return w0 if w0.dim() == 1 else w0[u]


def _num_users(support_offsets, query_offsets):
    n_users = len(support_offsets) - 1
    if len(query_offsets) - 1 != n_users:
        raise ValueError("support and query offsets disagree on the number of users")
    return n_users


def batch_forward(w0, support, support_offsets, query, query_offsets, **adapt_kw):
    """Forward pass over U users (numpy in, numpy out).

    Returns (losses (U,), weights (U, K), support_losses (U,), accuracy (U,)).
    """
    w0 = _t(w0)
    support, query = _t(support), _t(query)
    so, qo = np.asarray(support_offsets), np.asarray(query_offsets)
    n_users = _num_users(so, qo)
    k = w0.shape[-1]
    losses, support_losses, accuracy = np.empty(n_users), np.empty(n_users), np.empty(n_users)
    weights = np.empty((n_users, k))
    for u in range(n_users):
        out = user_outputs(_user_w0(w0, u), support[so[u]:so[u + 1]],
                           query[qo[u]:qo[u + 1]], **adapt_kw)
        weights[u] = out["weights"].detach().numpy()
        losses[u] = out["loss"].item()
        support_losses[u] = out["support_loss"].item()
        accuracy[u] = out["accuracy"]
    return losses, weights, support_losses, accuracy


def batch_backward(w0, support, support_offsets, query, query_offsets, grad_losses,
                   **adapt_kw):
    """Exact gradient of sum_u grad_losses[u] * L_u (numpy in, numpy out).

    adapt_kw holds steps, lr, optimizer and optionally betas, eps, first_order.
    Returns (grad_w0 (shape of w0), grad_support (N_s, K), grad_query (N_q, K)).
    A user without query rows is an input error (SPEC section 3).
    """
    w0 = _t(w0).requires_grad_()
    support = _t(support).requires_grad_()
    query = _t(query).requires_grad_()
    so, qo = np.asarray(support_offsets), np.asarray(query_offsets)
    n_users = _num_users(so, qo)
    grad_losses = np.asarray(grad_losses, dtype=np.float64)
    objective = torch.zeros((), dtype=DTYPE)
    for u in range(n_users):
        if qo[u + 1] == qo[u]:
            raise ValueError(f"user {u} has no query rows")
        w = adapt_user(_user_w0(w0, u), support[so[u]:so[u + 1]], **adapt_kw)
        objective = objective + float(grad_losses[u]) * bt_loss(w, query[qo[u]:qo[u + 1]])
    grads = torch.autograd.grad(objective, (w0, support, query), materialize_grads=True)
    return tuple(g.numpy() for g in grads)


def rpo_reference(losses, tail, gamma):
    """RPO objective over a batch of per-user losses and its gradient.

    tau = quantile(L, 1 - tail) (linear interpolation). gamma > 0: sum sigmoid((L -
    tau) / gamma) * L, differentiated through the sigmoid and through tau. gamma <= 0:
    sum 1[L > tau] * L with the mask held constant. Returns (float obj, numpy grad).
    """
    L = _t(losses).requires_grad_()
    tau = torch.quantile(L, 1.0 - tail)
    if gamma > 0:
        obj = (torch.sigmoid((L - tau) / gamma) * L).sum()
    else:
        obj = ((L > tau).to(DTYPE) * L).sum()
    (grad,) = torch.autograd.grad(obj, L)
    return obj.item(), grad.numpy()


def score_reference(features, offsets, weights):
    """Rewards features[row] . softmax(weights[u]) for the rows each user owns.

    weights is (U, K), or (K,) shared by all users. Returns numpy (N,).
    """
    features, weights = _t(features), _t(weights)
    offsets = np.asarray(offsets)
    rewards = np.empty(features.shape[0])
    for u in range(len(offsets) - 1):
        p = torch.softmax(_user_w0(weights, u), dim=0)
        rewards[offsets[u]:offsets[u + 1]] = (features[offsets[u]:offsets[u + 1]] @ p).numpy()
    return rewards


if __name__ == "__main__":
    # Self-check of the reference itself:
    #  1. SPEC section 2 closed forms (gradient, Hessian-vector product, d(lambda .
    #     grad)/d d_i) against autograd;
    #  2. the autograd meta-gradient through the unrolled loop (SGD and Adam) against
    #     central finite differences of the forward pass.
    rng = np.random.default_rng(0)
    K, n_s, n_q = 3, 5, 4
    worst = 0.0

    def report(name, got, want):
        global worst
        err = np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want)))
        worst = max(worst, err)
        print(f"  {name:<34} max rel err {err:.2e}")

    print("SPEC section 2 closed forms vs autograd")
    w = _t(rng.normal(size=K)).requires_grad_()
    D = _t(rng.normal(size=(n_s, K))).requires_grad_()
    lam = _t(rng.normal(size=K))
    p = torch.softmax(w, 0).detach()
    J = torch.diag(p) - torch.outer(p, p)
    s = torch.sigmoid(-(D @ p)).detach()
    Dd = D.detach()
    g_p = -(s[:, None] * Dd).mean(0)
    mu = J @ lam
    A = ((s * (1 - s))[:, None, None] * Dd[:, :, None] * Dd[:, None, :]).mean(0)
    g_w = _inner_grad(w, D, create_graph=True)
    hvp, dD = torch.autograd.grad(g_w @ lam, (w, D))
    report("grad_w L = J g_p", g_w.detach().numpy(), (p * g_p - p * (p @ g_p)).numpy())
    report("H lambda",
           hvp.numpy(),
           (J @ ((g_p - p @ g_p) * lam - g_p * (p @ lam)) + J @ A @ mu).numpy())
    report("d(lambda . grad_w L)/d d_i",
           dD.numpy(),
           (-(s[:, None] * mu - (s * (1 - s) * (Dd @ mu))[:, None] * p) / n_s).numpy())

    def query_loss(w0_, S_, Q_, kw):
        return batch_forward(w0_, S_, [0, n_s], Q_, [0, n_q], **kw)[0][0]

    def finite_diff(f, x, h=1e-6):
        g = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            xp, xm = x.copy(), x.copy()
            xp[i] += h
            xm[i] -= h
            g[i] = (f(xp) - f(xm)) / (2 * h)
        return g

    w0 = rng.normal(size=K)
    S = rng.normal(size=(n_s, K))
    Q = rng.normal(size=(n_q, K))
    for kw in (dict(optimizer="sgd", steps=3, lr=0.5),
               dict(optimizer="adam", steps=3, lr=0.05)):
        print(f"meta-gradient vs finite differences, {kw}")
        gw, gs, gq = batch_backward(w0, S, [0, n_s], Q, [0, n_q], [1.0], **kw)
        report("d L / d w0", gw, finite_diff(lambda x: query_loss(x, S, Q, kw), w0))
        report("d L / d support", gs, finite_diff(lambda x: query_loss(w0, x, Q, kw), S))
        report("d L / d query", gq, finite_diff(lambda x: query_loss(w0, S, x, kw), Q))

    print("K = 1 with Adam stays finite (gradient of softmax is exactly 0)")
    grads = batch_backward([0.3], [[1.0], [-2.0]], [0, 2], [[0.5]], [0, 1], [1.0],
                           optimizer="adam", steps=2, lr=0.1)
    assert all(np.isfinite(g).all() for g in grads), grads
    print("  finite:", [g.ravel().tolist() for g in grads])

    print(f"worst error {worst:.2e}")
    assert worst < 1e-7, "reference self-check failed"
    print("OK")
