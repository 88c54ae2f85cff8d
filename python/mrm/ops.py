"""The numpy API over the native kernels (SPEC §2–§4).

Every per-user set is CSR: ``values`` of shape (N, K) and ``offsets`` of shape (U + 1,), with
user ``u`` owning rows ``offsets[u]:offsets[u + 1]``. A row is a pair difference
``d = φ(chosen) − φ(rejected)``. float32 and float64 are both supported, never mixed in one call.
Arrays that are not C-contiguous are copied once. The GIL is released while the kernels run, on
a private thread pool of ``num_threads`` threads (else ``$MRM_NUM_THREADS``, else every CPU).
Results are bit-identical for any thread count. On x86-64 CPUs with AVX2 and FMA, float32 rows of
K = 8, 16, 32 or 64 run hand-vectorised kernels, whose results differ from other CPUs' by rounding;
``MRM_PORTABLE_KERNELS=1`` (read at the first kernel call) turns them off, for the same bits on
every CPU.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from mrm import _native

__all__ = [
    "MAX_STEPS", "MAX_THREADS", "TRAJECTORY_BUDGET_BYTES", "max_threads", "MetaForward", "adapt", "meta_forward", "meta_backward", "meta_value_and_grad", "rpo", "score", "pair_differences",
    "pair_differences_backward", "resolve_threads", "set_output_cache_limit", "output_cache_limit",
]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

MAX_STEPS: int = _native.MAX_STEPS
"""The most inner ``steps`` one call may take (100,000); more is a ValueError, not a clamp."""
MAX_THREADS: int = _native.MAX_THREADS
"""The hard ceiling on ``num_threads`` (1024); see :func:`max_threads` for the limit in force."""
TRAJECTORY_BUDGET_BYTES: int = _native.TRAJECTORY_BUDGET_BYTES
"""The inner trajectory the exact backward may keep per group of 8 users (1 GiB); a call that
would need more is a ValueError naming ``steps`` and the bytes, raised before any allocation."""


def _cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def max_threads() -> int:
    """The most threads a kernel call accepts: 4 × the CPUs this process may use, at least 64,
    at most :data:`MAX_THREADS`. More (argument or ``$MRM_NUM_THREADS``) is a ValueError."""
    return min(MAX_THREADS, max(64, 4 * _cpus()))


def _check_threads(num_threads: int, source: str) -> int:
    limit = max_threads()
    if num_threads > limit:
        raise ValueError(
            f"{source} must be <= {limit} (4 x the {_cpus()} CPUs, at least 64, at most {MAX_THREADS}), "
            f"got {num_threads}"
        )
    return num_threads


def _check_steps(steps) -> int:
    """``steps``: an int in ``0..=MAX_STEPS`` (any size of Python int is a clean error)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if steps > MAX_STEPS:
        raise ValueError(f"steps must be <= {MAX_STEPS}, got {steps}")
    return int(steps)


def _real(name: str, value) -> float:
    """A real-number argument as a float; an int too large for a float is a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} is too large for a float (over 1.8e308)") from None


@dataclass(frozen=True)
class MetaForward:
    """Result of :func:`meta_forward`, one entry per user."""

    losses: np.ndarray
    """Query loss at the adapted weights, shape (U,)."""
    weights: np.ndarray
    """Adapted logits ``w_T``, shape (U, K)."""
    support_losses: np.ndarray
    """Support loss at the adapted weights (0 for a user without support pairs), shape (U,)."""
    accuracy: np.ndarray
    """Fraction of query pairs with ``d · softmax(w_T) > 0``, shape (U,)."""


def resolve_threads(num_threads: Optional[int]) -> int:
    """Thread count: the argument, else ``$MRM_NUM_THREADS``, else the CPUs this process may use.
    Also checks ``$MRM_PORTABLE_KERNELS`` and ``$MRM_OUTPUT_CACHE_MB``, which every kernel call
    reads through here."""
    portable = os.environ.get("MRM_PORTABLE_KERNELS", "").strip()
    if portable not in ("", "0", "1"):
        raise ValueError(f"MRM_PORTABLE_KERNELS must be 0 or 1, got {portable!r}")
    cache_mb = os.environ.get("MRM_OUTPUT_CACHE_MB", "").strip()
    if cache_mb and not cache_mb.isdigit():
        raise ValueError(f"MRM_OUTPUT_CACHE_MB must be a whole number of MiB (0 turns the cache off), got {cache_mb!r}")
    if num_threads is None:
        env = os.environ.get("MRM_NUM_THREADS", "").strip()
        if env:
            try:
                num_threads = int(env)
            except ValueError:
                raise ValueError(f"MRM_NUM_THREADS must be a positive integer, got {env!r}") from None
            if num_threads < 1:
                raise ValueError(f"MRM_NUM_THREADS must be a positive integer, got {env!r}")
            return _check_threads(num_threads, "MRM_NUM_THREADS")
        return min(_cpus(), max_threads())
    if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral):
        raise TypeError(f"num_threads must be an int or None, got {type(num_threads).__name__}")
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    return _check_threads(int(num_threads), "num_threads")


def _asarray(name: str, value) -> np.ndarray:
    """``np.asarray(value)``, with numpy's errors for ragged or odd input naming ``name``."""
    if value is None:
        raise TypeError(f"{name} must be an array, got None")
    try:
        return np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"{name} must be a rectangular array of numbers: {exc}") from None


def _float_array(name: str, value, ndims: Sequence[int]) -> np.ndarray:
    array = _asarray(name, value)
    if array.dtype not in _FLOATS:
        kind = "integer" if array.dtype.kind in "iub" else str(array.dtype)
        raise TypeError(f"{name} must be a float32 or float64 array, got {kind} dtype ({array.dtype})")
    if array.ndim not in ndims:
        shapes = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {shapes}, got {array.ndim}-D with shape {array.shape}")
    return np.ascontiguousarray(array)


def _int_array(name: str, value, shape: str = "(U + 1,)") -> np.ndarray:
    """A 1-D integer argument as contiguous int64 (``shape`` describes it in errors)."""
    array = _asarray(name, value)
    if array.size == 0 and array.ndim == 1:
        array = array.astype(np.int64)  # an empty list comes in as float64
    if array.dtype.kind not in "iu" or array.dtype == np.bool_:
        raise TypeError(f"{name} must be an integer array, got dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D {shape}, got {array.ndim}-D with shape {array.shape}")
    if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} has a value too large for int64")
    return np.ascontiguousarray(array, dtype=np.int64)





def _same_dtype(**arrays: np.ndarray) -> np.dtype:
    names = list(arrays)
    first = arrays[names[0]].dtype
    for name in names[1:]:
        if arrays[name].dtype != first:
            raise TypeError(
                f"mixed float dtypes: {names[0]} is {first} but {name} is {arrays[name].dtype}; "
                "use one of float32 or float64 for every array"
            )
    return first


def _same_k(**arrays: np.ndarray) -> int:
    names = list(arrays)
    k = arrays[names[0]].shape[-1]
    for name in names[1:]:
        if arrays[name].shape[-1] != k:
            raise ValueError(
                f"K mismatch: {names[0]} has K = {k} but {name} has K = {arrays[name].shape[-1]}"
            )
    return k


def _hyper(steps, lr, optimizer, betas, eps) -> tuple:
    steps = _check_steps(steps)
    if not isinstance(optimizer, str) or optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise TypeError(f"betas must be a pair of floats, got {betas!r}") from None
    beta1, beta2 = _real("betas[0]", beta1), _real("betas[1]", beta2)
    lr, eps = _real("lr", lr), _real("eps", eps)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be finite and > 0, got {lr}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    for i, b in enumerate((beta1, beta2)):
        if not (math.isfinite(b) and 0.0 <= b < 1.0):
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b}")
    return int(steps), float(lr), optimizer, beta1, beta2, float(eps)


def _kernel(name: str, dtype: np.dtype):
    return getattr(_native, f"{name}_{'f32' if dtype == np.float32 else 'f64'}")


def _prepare(w0, support, support_offsets, query=None, query_offsets=None, *, need_query: bool = False):
    w0 = _float_array("w0", w0, (1, 2))
    support = _float_array("support", support, (2,))
    support_offsets = _int_array("support_offsets", support_offsets)
    arrays = {"w0": w0, "support": support}
    if query is not None or need_query:  # None where query pairs are needed: a TypeError naming it
        query = _float_array("query", query, (2,))
        query_offsets = _int_array("query_offsets", query_offsets)
        arrays["query"] = query
        if len(query_offsets) != len(support_offsets):
            raise ValueError(
                f"support_offsets describes {len(support_offsets) - 1} users but query_offsets "
                f"describes {len(query_offsets) - 1}"
            )
    dtype = _same_dtype(**arrays)
    _same_k(**arrays)
    n_users = len(support_offsets) - 1
    if w0.ndim == 2 and w0.shape[0] != n_users:
        raise ValueError(f"w0 has {w0.shape[0]} rows but support_offsets describes {n_users} users")
    return dtype, w0, support, support_offsets, query, query_offsets


def adapt(
    w0,
    support,
    support_offsets,
    *,
    steps: int,
    lr: float,
    optimizer: str = "adam",
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    num_threads: Optional[int] = None,
    return_support_losses: bool = False,
):
    """Adapt every user's logits from ``w0`` with ``steps`` inner steps on its support pairs.

    ``w0`` is shared (K,) or per user (U, K). A user without support pairs keeps ``w0``.
    Returns the adapted logits, shape (U, K); with ``return_support_losses``, also each user's
    support loss at its adapted logits, shape (U,) (0 for a user without pairs), from the same
    native pass.
    """
    dtype, w0, support, support_offsets, _, _ = _prepare(w0, support, support_offsets)
    hyper = _hyper(steps, lr, optimizer, betas, eps)
    weights, support_losses, _, _ = _kernel("forward", dtype)(
        w0, support, support_offsets, None, None, *hyper, bool(return_support_losses), resolve_threads(num_threads)
    )
    return (weights, support_losses) if return_support_losses else weights


def meta_forward(
    w0,
    support,
    support_offsets,
    query,
    query_offsets,
    *,
    steps: int,
    lr: float,
    optimizer: str = "adam",
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    num_threads: Optional[int] = None,
) -> MetaForward:
    """Adapt every user on its support pairs, then measure its query loss and accuracy.

    Every user needs at least one query pair.
    """
    dtype, w0, support, support_offsets, query, query_offsets = _prepare(
        w0, support, support_offsets, query, query_offsets, need_query=True
    )
    hyper = _hyper(steps, lr, optimizer, betas, eps)
    weights, support_losses, losses, accuracy = _kernel("forward", dtype)(
        w0, support, support_offsets, query, query_offsets, *hyper, True, resolve_threads(num_threads)
    )
    return MetaForward(losses=losses, weights=weights, support_losses=support_losses, accuracy=accuracy)


def meta_backward(
    w0,
    support,
    support_offsets,
    query,
    query_offsets,
    grad_losses,
    *,
    steps: int,
    lr: float,
    optimizer: str = "adam",
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    first_order: bool = False,
    num_threads: Optional[int] = None,
    out: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact gradient of ``Σ_u grad_losses[u] · L_u`` (``L_u`` as in :func:`meta_forward`).

    Returns ``(grad_w0, grad_support, grad_query)``: ``grad_w0`` has the shape of ``w0`` (summed
    over users when ``w0`` is shared), the others the shapes of ``support`` and ``query``.
    The inner trajectory is recomputed, not stored. ``first_order=True`` treats the inner
    gradients as constants (FOMAML): support rows then get a zero gradient.

    ``out``: three writeable C-contiguous arrays of those shapes and the inputs' dtype, written
    and returned instead of new ones (a training loop can then reuse its gradient memory). They
    must not share memory with any input.
    """
    grads, _ = _backward(
        w0, support, support_offsets, query, query_offsets, grad_losses,
        _hyper(steps, lr, optimizer, betas, eps), first_order, num_threads, out, with_values=False,
    )
    return grads


def meta_value_and_grad(
    w0,
    support,
    support_offsets,
    query,
    query_offsets,
    grad_losses,
    *,
    steps: int,
    lr: float,
    optimizer: str = "adam",
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    first_order: bool = False,
    num_threads: Optional[int] = None,
    out: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None,
) -> Tuple[MetaForward, Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`meta_forward` and :func:`meta_backward` in one pass over the rows.

    Returns ``(forward, (grad_w0, grad_support, grad_query))``, bit-identical to what the two
    calls return. Use it when ``grad_losses`` is known before the losses, e.g. ``1/U`` each for
    the mean query loss; when it depends on the losses (RPO), call the two functions instead.
    Arguments as in :func:`meta_backward`.
    """
    grads, values = _backward(
        w0, support, support_offsets, query, query_offsets, grad_losses,
        _hyper(steps, lr, optimizer, betas, eps), first_order, num_threads, out, with_values=True,
    )
    weights, support_losses, losses, accuracy = values
    return MetaForward(losses=losses, weights=weights, support_losses=support_losses, accuracy=accuracy), grads


def _backward(w0, support, support_offsets, query, query_offsets, grad_losses, hyper, first_order, num_threads, out,
              *, with_values: bool):
    dtype, w0, support, support_offsets, query, query_offsets = _prepare(
        w0, support, support_offsets, query, query_offsets, need_query=True
    )
    grad_losses = _float_array("grad_losses", grad_losses, (1,))
    _same_dtype(support=support, grad_losses=grad_losses)
    if grad_losses.shape[0] != len(support_offsets) - 1:
        raise ValueError(
            f"grad_losses has {grad_losses.shape[0]} entries but there are {len(support_offsets) - 1} users"
        )
    if out is not None:
        out = _gradient_buffers(out, dtype, w0=w0, support=support, query=query)
    return _kernel("backward", dtype)(
        w0, support, support_offsets, query, query_offsets, grad_losses, *hyper, bool(first_order),
        resolve_threads(num_threads), out, bool(with_values),
    )


def _gradient_buffers(out, dtype: np.dtype, **like: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checks ``meta_backward``'s ``out``: one writeable C-contiguous array per gradient, each
    with the shape of its input (``like``, in order) and ``dtype``."""
    if not isinstance(out, (tuple, list)) or len(out) != len(like):
        raise TypeError(f"out must be a tuple of {len(like)} arrays (grad_w0, grad_support, grad_query)")
    for i, (buffer, (name, array)) in enumerate(zip(out, like.items())):
        if not isinstance(buffer, np.ndarray):
            raise TypeError(f"out[{i}] must be a numpy array, got {type(buffer).__name__}")
        if buffer.dtype != dtype:
            raise TypeError(f"out[{i}] must have dtype {dtype} like the inputs, got {buffer.dtype}")
        if buffer.shape != array.shape:
            raise ValueError(f"out[{i}] must have the shape of {name} {array.shape}, got {buffer.shape}")
        if not buffer.flags.c_contiguous:
            raise ValueError(f"out[{i}] must be C-contiguous")
        if not buffer.flags.writeable:
            raise ValueError(f"out[{i}] must be writeable")
    return tuple(out)


def set_output_cache_limit(limit_bytes: int) -> int:
    """Limit (bytes) of the cache that lends the memory of dropped gradient arrays to later calls.

    ``meta_backward`` / ``meta_value_and_grad`` return gradient arrays of 1 MiB or more as views
    of cached arrays. Once every reference to one is gone (views, tensors, memoryviews), a
    later call reuses its memory, already mapped, instead of page-faulting fresh memory.
    The default limit is ``$MRM_OUTPUT_CACHE_MB`` MiB, else 1024 MiB; 0 turns the cache off.
    Free arrays over the new limit are released at once. Returns the bytes the cache still holds.
    """
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, numbers.Integral):
        raise TypeError(f"limit_bytes must be an int, got {type(limit_bytes).__name__}")
    limit_bytes = operator.index(limit_bytes)
    if not 0 <= limit_bytes < 2**63:
        raise ValueError(f"limit_bytes must be >= 0 and < 2**63, got {limit_bytes}")
    return _native.set_output_cache_limit(limit_bytes)


def output_cache_limit() -> int:
    """The output cache's current limit in bytes (see :func:`set_output_cache_limit`)."""
    return _native.output_cache_limit()


def rpo(losses, tail: float, gamma: float) -> Tuple[float, np.ndarray]:
    """Robust Personalization Objective over per-user losses, and its gradient (U,).

    ``τ = quantile(losses, 1 − tail)`` (linear interpolation). ``gamma > 0``:
    ``Σ σ((L − τ)/γ) L``, differentiated through σ and τ; ``gamma ≤ 0``: ``Σ 1[L > τ] L``.
    """
    losses = _float_array("losses", losses, (1,))
    tail, gamma = _real("tail", tail), _real("gamma", gamma)
    if not (math.isfinite(tail) and 0.0 < tail <= 1.0):
        raise ValueError(f"tail must be in (0, 1], got {tail}")
    return _kernel("rpo", losses.dtype)(losses, float(tail), float(gamma))


def score(features, feature_offsets, weights, *, num_threads: Optional[int] = None) -> np.ndarray:
    """Personalised rewards ``features[i] · softmax(weights[u])`` for each row ``i`` of user ``u``.

    ``features`` (N, K) grouped by user with ``feature_offsets`` (U + 1,); ``weights`` (U, K).
    Returns (N,).
    """
    features = _float_array("features", features, (2,))
    feature_offsets = _int_array("feature_offsets", feature_offsets)
    weights = _float_array("weights", weights, (2,))
    dtype = _same_dtype(features=features, weights=weights)
    _same_k(features=features, weights=weights)
    if weights.shape[0] != len(feature_offsets) - 1:
        raise ValueError(
            f"weights has {weights.shape[0]} rows but feature_offsets describes {len(feature_offsets) - 1} users"
        )
    return _kernel("score", dtype)(features, feature_offsets, weights, resolve_threads(num_threads))


def _index(name: str, value) -> np.ndarray:
    return _int_array(name, value, "(one entry per pair)")


def pair_differences(features, chosen, rejected) -> np.ndarray:
    """``features[chosen[i]] − features[rejected[i]]`` for every pair ``i``: (N, K) from
    ``features`` (rows, K) and two index arrays (N,)."""
    features = _float_array("features", features, (2,))
    return _kernel("pair_differences", features.dtype)(features, _index("chosen", chosen), _index("rejected", rejected))


def pair_differences_backward(grad, chosen, rejected, n_rows: int) -> np.ndarray:
    """The adjoint of :func:`pair_differences`: the gradient with respect to ``features``
    (n_rows, K) given the gradient ``grad`` (N, K) with respect to the differences."""
    grad = _float_array("grad", grad, (2,))
    if isinstance(n_rows, bool) or not isinstance(n_rows, numbers.Integral):
        raise TypeError(f"n_rows must be an int, got {type(n_rows).__name__}")
    if n_rows < 0 or n_rows > np.iinfo(np.int64).max:
        raise ValueError(f"n_rows must be a non-negative int that fits int64, got {n_rows!r}")
    return _kernel("pair_differences_backward", grad.dtype)(
        grad, _index("chosen", chosen), _index("rejected", rejected), int(n_rows)
    )
