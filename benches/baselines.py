"""Fast PyTorch baselines for the benchmark: the same work as the native kernel
(SPEC.md sections 2-3), over many users at once, on padded tensors.

Layout: support_pad (U, P_s, K) and query_pad (U, P_q, K) hold each user's rows
first, then padding; the masks (U, P) are True (or 1) on real rows. w0 is the shared
init (K,). dtype and device follow the inputs. Each user's loss is the masked mean
over its rows (0 for a user with no rows); a user with no support rows keeps w0,
because its support gradient is 0 and both optimisers then leave w unchanged.

Two implementations:
  (a) padded_*: batched tensors with torch.autograd (create_graph through the loop);
  (b) func_*:   a per-user function, torch.func.grad for the inner steps, vmapped.
"""

import functools

import numpy as np
import torch


def csr_to_padded(values, offsets, dtype=None, device=None):
    """numpy CSR (values (N, K), offsets (U+1,)) -> (padded (U, P, K), mask (U, P) bool).

    P is the largest per-user row count; padding rows are zeros.
    """
    values = np.asarray(values)
    offsets = np.asarray(offsets, dtype=np.int64)
    counts = np.diff(offsets)
    n_users, k = len(counts), values.shape[1]
    width = int(counts.max()) if n_users else 0
    user = np.repeat(np.arange(n_users), counts)
    slot = np.arange(len(user)) - offsets[user]
    padded = np.zeros((n_users, width, k), dtype=values.dtype)
    padded[user, slot] = values[offsets[0]:offsets[-1]]
    mask = np.zeros((n_users, width), dtype=bool)
    mask[user, slot] = True
    return (torch.as_tensor(padded, dtype=dtype, device=device),
            torch.as_tensor(mask, device=device))


def _sqrt_shift(dtype):
    # Keeps d sqrt(v)/dv finite where v = 0 (a gradient coordinate that is exactly 0):
    # the chain rule then gives 0 * finite = 0, the exact limit, instead of NaN.
    return 1e-300 if dtype == torch.float64 else 1e-30


def _optimizer_step(w, m, v, g, t, lr, optimizer, betas, eps):
    """One inner step (t counts from 1); returns the new (w, m, v). Works elementwise,
    so the same code serves a (K,) user and a (U, K) batch."""
    if optimizer == "sgd":
        return w - lr * g, m, v
    if optimizer != "adam":
        raise ValueError(f"unknown optimizer {optimizer!r}")
    beta1, beta2 = betas
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denom = torch.sqrt(v + _sqrt_shift(v.dtype)) / np.sqrt(1 - beta2 ** t) + eps
    return w - (lr / (1 - beta1 ** t)) * m / denom, m, v


# ---------------------------------------------------------------------------
# (a) padded batch with torch.autograd
# ---------------------------------------------------------------------------

def _padded_losses(W, D, mask):
    """Per-user masked-mean BT loss: W (U, K), D (U, P, K), mask (U, P) float -> (U,)."""
    z = torch.bmm(D, torch.softmax(W, dim=1).unsqueeze(2)).squeeze(2)
    total = (torch.nn.functional.softplus(-z) * mask).sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1)


def _padded_inner_grad(W, D, mask):
    """Closed-form gradient of _padded_losses with respect to W (SPEC section 2):
    g_p = -(1/n) sum_i s_i d_i with s_i = sigmoid(-z_i), grad_w = p * g_p - p (p . g_p)."""
    p = torch.softmax(W, dim=1)
    s = torch.sigmoid(-torch.bmm(D, p.unsqueeze(2)).squeeze(2)) * mask
    g_p = -torch.bmm(s.unsqueeze(1), D).squeeze(1) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return p * g_p - p * (p * g_p).sum(dim=1, keepdim=True)


def _padded_adapt(w0, support_pad, support_mask, steps, lr, optimizer, betas, eps,
                  inner_grad):
    W = w0.expand(support_pad.shape[0], -1)
    m = torch.zeros_like(W)
    v = torch.zeros_like(W)
    for t in range(1, steps + 1):
        g = inner_grad(W, support_pad, support_mask)
        W, m, v = _optimizer_step(W, m, v, g, t, lr, optimizer, betas, eps)
    return W


def padded_forward(w0, support_pad, support_mask, query_pad, query_mask, steps, lr,
                   optimizer, betas=(0.9, 0.999), eps=1e-8):
    """Adaptation and query losses, no backward. Returns (losses (U,), weights (U, K))."""
    with torch.no_grad():
        dtype = support_pad.dtype
        W = _padded_adapt(w0, support_pad, support_mask.to(dtype), steps, lr, optimizer,
                          betas, eps, _padded_inner_grad)
        return _padded_losses(W, query_pad, query_mask.to(dtype)), W


def padded_forward_backward(w0, support_pad, support_mask, query_pad, query_mask, steps,
                            lr, optimizer, betas=(0.9, 0.999), eps=1e-8):
    """Query losses and the exact gradient of losses.sum() (second order through the
    inner loop). Returns (losses (U,), grad_w0 (K,), grad_support_pad, grad_query_pad).
    """
    dtype = support_pad.dtype
    w0 = w0.detach().requires_grad_()
    support_pad = support_pad.detach().requires_grad_()
    query_pad = query_pad.detach().requires_grad_()
    smask, qmask = support_mask.to(dtype), query_mask.to(dtype)

    def inner_grad(W, D, mask):
        # Users are independent, so the gradient of the summed loss with respect to
        # W (U, K) is each user's own gradient. create_graph keeps it differentiable
        # for the backward pass (Hessian-vector products through every step).
        (g,) = torch.autograd.grad(_padded_losses(W, D, mask).sum(), W, create_graph=True)
        return g

    W = _padded_adapt(w0, support_pad, smask, steps, lr, optimizer, betas, eps, inner_grad)
    losses = _padded_losses(W, query_pad, qmask)
    grads = torch.autograd.grad(losses.sum(), (w0, support_pad, query_pad),
                                materialize_grads=True)
    return (losses.detach(),) + grads


# ---------------------------------------------------------------------------
# (b) torch.func: per-user function, vmapped over users
# ---------------------------------------------------------------------------

def _user_loss(w, D, mask):
    """One user's masked-mean BT loss: w (K,), D (P, K), mask (P,) float."""
    z = D @ torch.softmax(w, dim=0)
    return (torch.nn.functional.softplus(-z) * mask).sum() / mask.sum().clamp(min=1)


def _user_adapt(w0, S, Smask, steps, lr, optimizer, betas, eps):
    w = w0
    m = torch.zeros_like(w0)
    v = torch.zeros_like(w0)
    for t in range(1, steps + 1):
        g = torch.func.grad(_user_loss)(w, S, Smask)
        w, m, v = _optimizer_step(w, m, v, g, t, lr, optimizer, betas, eps)
    return w


def _user_query_loss(w0, S, Q, Smask, Qmask, **hyper):
    """Per-user meta-loss; returns (query loss, w_T) with w_T as auxiliary output."""
    w = _user_adapt(w0, S, Smask, **hyper)
    return _user_loss(w, Q, Qmask), w


def func_forward(w0, support_pad, support_mask, query_pad, query_mask, steps, lr,
                 optimizer, betas=(0.9, 0.999), eps=1e-8):
    """Adaptation and query losses, no backward. Returns (losses (U,), weights (U, K))."""
    dtype = support_pad.dtype
    f = functools.partial(_user_query_loss, steps=steps, lr=lr, optimizer=optimizer,
                          betas=betas, eps=eps)
    with torch.no_grad():  # torch.func.grad inside still differentiates
        return torch.func.vmap(f, in_dims=(None, 0, 0, 0, 0))(
            w0, support_pad, query_pad, support_mask.to(dtype), query_mask.to(dtype))


def func_forward_backward(w0, support_pad, support_mask, query_pad, query_mask, steps,
                          lr, optimizer, betas=(0.9, 0.999), eps=1e-8):
    """Same outputs as padded_forward_backward:
    (losses (U,), grad_w0 (K,), grad_support_pad, grad_query_pad)."""
    dtype = support_pad.dtype
    f = functools.partial(_user_query_loss, steps=steps, lr=lr, optimizer=optimizer,
                          betas=betas, eps=eps)
    per_user = torch.func.grad_and_value(f, argnums=(0, 1, 2), has_aux=True)
    (g_w0, g_s, g_q), (losses, _) = torch.func.vmap(per_user, in_dims=(None, 0, 0, 0, 0))(
        w0, support_pad, query_pad, support_mask.to(dtype), query_mask.to(dtype))
    # w0 is shared: vmap returns each user's contribution (U, K); the total is the sum.
    return losses, g_w0.sum(dim=0), g_s, g_q
