"""The native kernels as PyTorch custom ops with exact backward (needs torch).

``user_losses`` adapts every user from ``w0`` on its support differences and returns each
user's query loss; autograd reaches ``w0``, ``support`` and ``query`` (and through them the
base reward functions) via the native adjoint, with no unrolled graph. ``rpo_objective`` is
the Robust Personalization Objective. ``pair_differences`` gathers the pair differences of
base rewards by index, with a native scatter as its backward. CPU tensors only: move CUDA tensors with ``.cpu()``
(autograd follows the move).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from mrm import ops

__all__ = ["user_losses", "rpo_objective", "pair_differences"]


def _np(t: torch.Tensor):
    return t.detach().contiguous().numpy()


# The schemas of the adaptation ops: each takes the rows, then its solver's settings, and its
# backward op takes the same inputs after ``grad_losses``.
_ROWS = "Tensor support, Tensor support_offsets, Tensor query, Tensor query_offsets"
_LOOP = "int steps, float lr, str optimizer, float beta1, float beta2, float eps, bool first_order, int num_threads"
_MAP = "int max_iter, float tol, str weight_map, int num_threads"
torch.library.define("mrm::user_losses", f"(Tensor w0, {_ROWS}, {_LOOP}) -> Tensor")
torch.library.define(
    "mrm::user_losses_backward", f"(Tensor grad_losses, Tensor w0, {_ROWS}, {_LOOP}) -> (Tensor, Tensor, Tensor)"
)
torch.library.define("mrm::map_user_losses", f"(Tensor w0, Tensor eta, {_ROWS}, {_MAP}) -> Tensor")
torch.library.define(
    "mrm::map_user_losses_backward",
    f"(Tensor grad_losses, Tensor w0, Tensor eta, {_ROWS}, {_MAP}) -> (Tensor, Tensor, Tensor, Tensor)",
)


def _loop(steps, lr, optimizer, beta1, beta2, eps, first_order, num_threads):
    """The ``_LOOP`` settings as ``mrm.ops`` keywords (validated there)."""
    inner = ops.InnerLoop(optimizer, steps=steps, lr=lr, betas=(beta1, beta2), eps=eps)
    return {"inner": inner, "num_threads": num_threads or None}, first_order


def _map(max_iter, tol, weight_map, num_threads):
    """The ``_MAP`` settings as ``mrm.ops`` keywords (validated there)."""
    return {"inner": ops.InnerLoop("map", max_iter=max_iter, tol=tol, weight_map=weight_map),
            "num_threads": num_threads or None}


@torch.library.impl("mrm::user_losses", "CompositeExplicitAutograd")
def _user_losses(w0, support, support_offsets, query, query_offsets, *settings):
    options, _ = _loop(*settings)
    out = ops.meta_forward(_np(w0), _np(support), _np(support_offsets), _np(query), _np(query_offsets), **options)
    return torch.from_numpy(out.losses)


@torch.library.register_fake("mrm::user_losses")
def _(w0, support, support_offsets, query, query_offsets, *settings):
    return support.new_empty(support_offsets.shape[0] - 1)


@torch.library.impl("mrm::user_losses_backward", "CompositeExplicitAutograd")
def _user_losses_backward(grad_losses, w0, support, support_offsets, query, query_offsets, *settings):
    options, first_order = _loop(*settings)
    grads = ops.meta_backward(
        _np(w0), _np(support), _np(support_offsets), _np(query), _np(query_offsets),
        _np(grad_losses.to(support.dtype)), first_order=first_order, **options,
    )
    return tuple(torch.from_numpy(g) for g in grads)


@torch.library.register_fake("mrm::user_losses_backward")
def _(grad_losses, w0, support, support_offsets, query, query_offsets, *settings):
    return torch.empty_like(w0), torch.empty_like(support), torch.empty_like(query)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.settings = inputs[5:]


def _backward(ctx, grad_losses):
    w0, support, support_offsets, query, query_offsets = ctx.saved_tensors
    grad_w0, grad_support, grad_query = torch.ops.mrm.user_losses_backward(
        grad_losses.contiguous(), w0, support, support_offsets, query, query_offsets, *ctx.settings
    )
    return (grad_w0, grad_support, None, grad_query, None) + (None,) * len(ctx.settings)


torch.library.register_autograd("mrm::user_losses", _backward, setup_context=_setup_context)


@torch.library.impl("mrm::map_user_losses", "CompositeExplicitAutograd")
def _map_user_losses(w0, eta, support, support_offsets, query, query_offsets, *settings):
    out = ops.meta_forward(
        _np(w0), _np(support), _np(support_offsets), _np(query), _np(query_offsets), eta=_np(eta), **_map(*settings)
    )
    return torch.from_numpy(out.losses)


@torch.library.register_fake("mrm::map_user_losses")
def _(w0, eta, support, support_offsets, query, query_offsets, *settings):
    return support.new_empty(support_offsets.shape[0] - 1)


@torch.library.impl("mrm::map_user_losses_backward", "CompositeExplicitAutograd")
def _map_user_losses_backward(grad_losses, w0, eta, support, support_offsets, query, query_offsets, *settings):
    grad_w0, grad_support, grad_query, grad_eta = ops.meta_backward(
        _np(w0), _np(support), _np(support_offsets), _np(query), _np(query_offsets), _np(grad_losses.to(support.dtype)),
        eta=_np(eta), **_map(*settings),
    )
    return tuple(torch.from_numpy(g) for g in (grad_w0, grad_eta, grad_support, grad_query))


@torch.library.register_fake("mrm::map_user_losses_backward")
def _(grad_losses, w0, eta, support, support_offsets, query, query_offsets, *settings):
    return torch.empty_like(w0), torch.empty_like(eta), torch.empty_like(support), torch.empty_like(query)


def _map_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.settings = inputs[6:]


def _map_backward(ctx, grad_losses):
    w0, eta, support, support_offsets, query, query_offsets = ctx.saved_tensors
    grad_w0, grad_eta, grad_support, grad_query = torch.ops.mrm.map_user_losses_backward(
        grad_losses.contiguous(), w0, eta, support, support_offsets, query, query_offsets, *ctx.settings
    )
    return (grad_w0, grad_eta, grad_support, None, grad_query, None) + (None,) * len(ctx.settings)


torch.library.register_autograd("mrm::map_user_losses", _map_backward, setup_context=_map_setup_context)


@torch.library.custom_op("mrm::rpo", mutates_args=())
def _rpo(losses: torch.Tensor, tail: float, gamma: float) -> torch.Tensor:
    objective, _ = ops.rpo(_np(losses), tail, gamma)
    return torch.tensor(objective, dtype=losses.dtype)


@_rpo.register_fake
def _(losses, tail, gamma):
    return losses.new_empty(())


@torch.library.custom_op("mrm::rpo_backward", mutates_args=())
def _rpo_backward(grad_objective: torch.Tensor, losses: torch.Tensor, tail: float, gamma: float) -> torch.Tensor:
    _, grad = ops.rpo(_np(losses), tail, gamma)
    return torch.from_numpy(grad) * grad_objective


@_rpo_backward.register_fake
def _(grad_objective, losses, tail, gamma):
    return torch.empty_like(losses)


def _rpo_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.tail, ctx.gamma = inputs[1], inputs[2]


def _rpo_grad(ctx, grad_objective):
    (losses,) = ctx.saved_tensors
    return _rpo_backward(grad_objective, losses, ctx.tail, ctx.gamma), None, None


_rpo.register_autograd(_rpo_grad, setup_context=_rpo_setup_context)


@torch.library.custom_op("mrm::pair_differences", mutates_args=())
def _pair_differences(features: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(ops.pair_differences(_np(features), _np(chosen), _np(rejected)))


@_pair_differences.register_fake
def _(features, chosen, rejected):
    return features.new_empty((chosen.shape[0], features.shape[1]))


@torch.library.custom_op("mrm::pair_differences_backward", mutates_args=())
def _pair_differences_backward(grad: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
                               n_rows: int) -> torch.Tensor:
    return torch.from_numpy(ops.pair_differences_backward(_np(grad), _np(chosen), _np(rejected), n_rows))


@_pair_differences_backward.register_fake
def _(grad, chosen, rejected, n_rows):
    return grad.new_empty((n_rows, grad.shape[1]))


def _pair_setup_context(ctx, inputs, output):
    features, chosen, rejected = inputs
    ctx.save_for_backward(chosen, rejected)
    ctx.n_rows = features.shape[0]


def _pair_grad(ctx, grad):
    chosen, rejected = ctx.saved_tensors
    return _pair_differences_backward(grad.contiguous(), chosen, rejected, ctx.n_rows), None, None


_pair_differences.register_autograd(_pair_grad, setup_context=_pair_setup_context)


def _pair_backward_setup_context(ctx, inputs, output):
    _, chosen, rejected, _ = inputs
    ctx.save_for_backward(chosen, rejected)


def _pair_backward_grad(ctx, grad_features):
    # the adjoint is linear in ``grad``, and its own adjoint is the gather: double backward works
    chosen, rejected = ctx.saved_tensors
    return _pair_differences(grad_features.contiguous(), chosen, rejected), None, None, None


_pair_differences_backward.register_autograd(_pair_backward_grad, setup_context=_pair_backward_setup_context)


def _check_cpu(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(
                f"{name} is on {t.device}: the native kernels run on CPU tensors; move it with "
                f"{name}.cpu() (gradients flow back through the move)"
            )


def _offsets(name: str, t) -> torch.Tensor:
    """An integer argument (offsets or indices) as an int64 tensor."""
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    return t.to(torch.int64)


def _threads_arg(num_threads: Optional[int]) -> int:
    """0 means "resolve inside the op" (MRM_NUM_THREADS, then the machine): keeps the call
    traceable by torch.compile, which cannot trace the CPU-affinity query."""
    if num_threads is None:
        return 0
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
    return num_threads


class _Settings(NamedTuple):
    """Keyword settings of :func:`user_losses`, unvalidated (the op validates them)."""

    optimizer: str
    steps: Optional[int]
    lr: Optional[float]
    betas: Tuple[float, float]
    eps: float
    max_iter: int = 100
    tol: float = 1e-6
    weight_map: str = "simplex"


def user_losses(
    w0: torch.Tensor,
    support: torch.Tensor,
    support_offsets,
    query: torch.Tensor,
    query_offsets,
    *,
    inner: Optional[ops.InnerLoop] = None,
    eta: Optional[torch.Tensor] = None,
    steps: Optional[int] = None,
    lr: Optional[float] = None,
    optimizer: Optional[str] = None,
    betas: Optional[Tuple[float, float]] = None,
    eps: Optional[float] = None,
    first_order: bool = False,
    num_threads: Optional[int] = None,
) -> torch.Tensor:
    """Each user's query loss after its adaptation (U,), differentiable in w0, support, query
    (and ``eta``, the prior's log precisions, with the ``map`` solver).

    Same arguments as :func:`mrm.ops.meta_forward`, as CPU tensors (float32 or float64).
    """
    # The settings are read here but validated inside the op (mrm.ops builds the InnerLoop there):
    # constructing one calls the core, which torch.compile cannot trace (fullgraph=True).
    if inner is None:
        inner = _Settings(optimizer or "adam", steps, lr, betas or (0.9, 0.999), 1e-8 if eps is None else eps)
    elif any(v is not None for v in (steps, lr, optimizer, betas, eps)):
        raise TypeError("pass either inner= or the keyword settings (steps=, lr=, ...), not both")
    support_offsets = _offsets("support_offsets", support_offsets)
    query_offsets = _offsets("query_offsets", query_offsets)
    _check_cpu(w0=w0, support=support, query=query, support_offsets=support_offsets, query_offsets=query_offsets)
    if inner.optimizer == "map":
        if eta is None:
            raise TypeError("the 'map' solver needs eta, the prior's log precisions (a tensor of 1 or K values)")
        if first_order:
            raise ValueError("first_order does not apply to the 'map' solver (its gradient is implicit)")
        _check_cpu(eta=eta)
        return torch.ops.mrm.map_user_losses(
            w0, eta, support, support_offsets, query, query_offsets, int(inner.max_iter), float(inner.tol),
            inner.weight_map, _threads_arg(num_threads),
        )
    if eta is not None:
        raise ValueError("eta applies to the 'map' solver only")
    if inner.steps is None or inner.lr is None:
        raise TypeError("user_losses needs steps= and lr= (or inner=mrm.ops.InnerLoop(...))")
    beta1, beta2 = (float(b) for b in inner.betas)
    return torch.ops.mrm.user_losses(
        w0, support, support_offsets, query, query_offsets, int(inner.steps), float(inner.lr), inner.optimizer,
        beta1, beta2, float(inner.eps), bool(first_order), _threads_arg(num_threads),
    )


def rpo_objective(losses: torch.Tensor, tail: float, gamma: float) -> torch.Tensor:
    """RPO over per-user losses (a scalar), differentiable in ``losses`` (SPEC §3)."""
    _check_cpu(losses=losses)
    return _rpo(losses, float(tail), float(gamma))


def pair_differences(features: torch.Tensor, chosen, rejected) -> torch.Tensor:
    """``features[chosen] − features[rejected]`` (N, K), differentiable in ``features`` (rows, K);
    the backward pass is one native scatter instead of two index_add passes."""
    chosen = _offsets("chosen", chosen)
    rejected = _offsets("rejected", rejected)
    _check_cpu(features=features, chosen=chosen, rejected=rejected)
    return _pair_differences(features, chosen, rejected)
