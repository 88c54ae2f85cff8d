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
    "InnerLoop", "MapResult", "MetaForward", "adapt", "map_adapt", "predict", "pair_probabilities", "information_gain",
    "MAX_STEPS", "MAX_THREADS", "TRAJECTORY_BUDGET_BYTES", "max_threads", "meta_forward", "meta_backward",
    "meta_value_and_grad", "rpo", "score", "pair_differences",
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


SOLVERS = ("sgd", "adam", "map")
ETA_LIMIT = 40.0
"""The MAP prior's log precisions must lie within ±ETA_LIMIT (λ = e^η stays well inside f64)."""
WEIGHT_MAPS = ("simplex", "linear")


@dataclass(frozen=True)
class InnerLoop:
    """How each user is adapted: the one settings value every stage takes (ops, torch ops,
    evaluation, batch jobs, Ray, the trainer), validated once here by the core's own rules.

    - ``"sgd"`` / ``"adam"`` (SPEC §2): ``steps`` steps of size ``lr`` (``torch.optim.Adam``
      semantics with ``betas``, ``eps``); defaults are the released values (1 step, 1e-3).
    - ``"map"`` (SPEC §7): the posterior mode under the Gaussian prior ``N(w0, diag(e^-eta))``
      by damped Newton, stopping at ``‖∇F‖∞ ≤ tol`` or after ``max_iter`` steps;
      ``weight_map`` is ``"simplex"`` (softmax user weights, the paper's) or ``"linear"``
      (unconstrained user weights). ``steps`` and ``lr`` do not apply.
    """

    optimizer: str = "adam"
    steps: Optional[int] = None
    lr: Optional[float] = None
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_iter: int = 100
    tol: float = 1e-6
    weight_map: str = "simplex"

    def __post_init__(self):
        if self.optimizer not in SOLVERS:
            raise ValueError(f"optimizer must be one of {', '.join(map(repr, SOLVERS))}, got {self.optimizer!r}")
        if self.weight_map not in WEIGHT_MAPS:
            raise ValueError(f"weight_map must be 'simplex' or 'linear', got {self.weight_map!r}")
        if self.optimizer == "map":
            for name in ("steps", "lr"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} does not apply to the 'map' solver (it runs to convergence); leave it unset")
        else:
            if self.weight_map != "simplex":
                raise ValueError(f"weight_map {self.weight_map!r} needs the 'map' solver; the {self.optimizer} loop uses softmax weights")
            object.__setattr__(self, "steps", 1 if self.steps is None else self.steps)
            object.__setattr__(self, "lr", 1e-3 if self.lr is None else self.lr)
            object.__setattr__(self, "steps", _check_steps(self.steps))
            _check_real("lr", self.lr)
        _check_int("max_iter", self.max_iter, 1)
        _check_real("eps", self.eps)
        _check_real("tol", self.tol)
        try:
            beta1, beta2 = self.betas
        except (TypeError, ValueError):
            raise TypeError(f"betas must be a pair of floats, got {self.betas!r}") from None
        beta1, beta2 = _real("betas[0]", beta1), _real("betas[1]", beta2)
        object.__setattr__(self, "betas", (beta1, beta2))
        _native.check_inner_loop(self.optimizer, int(self.steps or 0), float(self.lr or 1.0), beta1, beta2,
                                 float(self.eps), int(self.max_iter), float(self.tol), self.weight_map)

    @property
    def is_map(self) -> bool:
        return self.optimizer == "map"

    def to_dict(self) -> dict:
        """JSON-ready form (checkpoints and configs); :meth:`from_dict` reads it back."""
        keys = ("max_iter", "tol", "weight_map") if self.is_map else ("steps", "lr", "betas", "eps")
        return {"optimizer": self.optimizer, **{k: list(v) if k == "betas" else v for k in keys for v in [getattr(self, k)]}}

    @staticmethod
    def from_dict(raw: dict) -> "InnerLoop":
        if not isinstance(raw, dict):
            raise TypeError(f"inner-loop settings must be a dict, got {type(raw).__name__}")
        unknown = set(raw) - {f for f in InnerLoop.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown inner-loop settings: {sorted(unknown)}")
        raw = dict(raw)
        if "betas" in raw:
            raw["betas"] = tuple(raw["betas"])
        return InnerLoop(**raw)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_real(name: str, value) -> None:
    value = _real(name, value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")


def inner_loop(inner: Optional[InnerLoop] = None, **sugar) -> InnerLoop:
    """``inner``, or an :class:`InnerLoop` built from keyword sugar (``steps=, lr=, optimizer=,
    betas=, eps=``); not both."""
    given = {k: v for k, v in sugar.items() if v is not None}
    if inner is not None:
        if not isinstance(inner, InnerLoop):
            raise TypeError(f"inner must be an mrm.ops.InnerLoop, got {type(inner).__name__}")
        if given:
            raise TypeError(f"pass either inner= or {', '.join(sorted(given))}, not both")
        return inner
    if "optimizer" not in given:
        given["optimizer"] = "adam"
    if given["optimizer"] != "map" and ("steps" not in given or "lr" not in given):
        missing = [k for k in ("steps", "lr") if k not in given]
        raise TypeError(f"missing keyword argument(s) {', '.join(missing)} (or pass inner=mrm.ops.InnerLoop(...))")
    return InnerLoop(**given)


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


def _hyper(inner: InnerLoop) -> tuple:
    """The loop settings as the native entry points take them."""
    return int(inner.steps), float(inner.lr), inner.optimizer, *inner.betas, float(inner.eps)


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
    inner: Optional[InnerLoop] = None,
    eta=None,
    init=None,
    steps: Optional[int] = None,
    lr: Optional[float] = None,
    optimizer: Optional[str] = None,
    betas: Optional[Tuple[float, float]] = None,
    eps: Optional[float] = None,
    num_threads: Optional[int] = None,
    return_support_losses: bool = False,
):
    """Adapt every user's weights from ``w0`` on its support pairs, as ``inner`` says (an
    :class:`InnerLoop`; or the keyword sugar ``steps=, lr=, optimizer=, betas=, eps=``).

    ``w0`` is shared (K,) or per user (U, K). A user without support pairs keeps ``w0``.
    The ``map`` solver needs ``eta`` (the prior's log precisions, 1 or K values) and takes an
    optional warm start ``init`` (U, K); a user it cannot converge is a ValueError naming it
    (:func:`map_adapt` reports such users instead of raising).
    Returns the adapted weights, shape (U, K); with ``return_support_losses``, also each user's
    mean support loss at them, shape (U,) (0 for a user without pairs), from the same native pass.
    """
    inner = inner_loop(inner, steps=steps, lr=lr, optimizer=optimizer, betas=betas, eps=eps)
    if inner.is_map:
        result = map_adapt(w0, eta, support, support_offsets, inner=inner, init=init, num_threads=num_threads)
        result.raise_unconverged()
        return (result.weights, result.support_losses) if return_support_losses else result.weights
    _no_map_arguments(eta=eta, init=init)
    dtype, w0, support, support_offsets, _, _ = _prepare(w0, support, support_offsets)
    weights, support_losses, _, _ = _native.forward(
        w0, support, support_offsets, None, None, *_hyper(inner), bool(return_support_losses), resolve_threads(num_threads)
    )
    return (weights, support_losses) if return_support_losses else weights


def _no_map_arguments(**arguments) -> None:
    for name, value in arguments.items():
        if value is not None:
            raise ValueError(f"{name} applies to the 'map' solver only")


@dataclass(frozen=True)
class MapResult:
    """Result of :func:`map_adapt`, one entry per user (SPEC §7)."""

    weights: np.ndarray
    """The posterior mode ``w*`` (U, K)."""
    iterations: np.ndarray
    """Newton steps taken (U,), int64."""
    grad_norm: np.ndarray
    """``‖∇F(w*)‖∞`` (U,)."""
    converged: np.ndarray
    """Whether ``grad_norm <= tol`` (U,), bool."""
    support_losses: np.ndarray
    """Mean support loss at ``w*`` (U,) (0 without support pairs)."""
    losses: Optional[np.ndarray] = None
    """Mean query loss at ``w*`` (U,), with query rows."""
    accuracy: Optional[np.ndarray] = None
    """Share of query pairs with ``d · p(w*) > 0`` (U,), with query rows."""
    covariance: Optional[np.ndarray] = None
    """Laplace posterior covariance ``H⁻¹`` of ``w`` (U, K, K), with ``return_covariance``."""

    def raise_unconverged(self) -> None:
        """A ValueError naming the first user whose solve did not converge, if any."""
        bad = np.flatnonzero(~self.converged)
        if bad.size:
            u = int(bad[0])
            raise ValueError(
                f"the MAP solve did not converge for user {u} (‖∇F‖∞ = {float(self.grad_norm[u]):.3e} after "
                f"{int(self.iterations[u])} iterations; {bad.size} such users): raise max_iter or tol, or "
                "use mrm.ops.map_adapt, which reports them"
            )


def _eta(eta, dtype: np.dtype, k: int) -> np.ndarray:
    if eta is None:
        raise TypeError("the 'map' solver needs eta, the prior's log precisions (1 or K values)")
    eta = np.atleast_1d(np.asarray(eta))
    if eta.dtype.kind not in "fiu" or eta.dtype == np.bool_:
        raise TypeError(f"eta must be a float array, got dtype {eta.dtype}")
    if eta.ndim != 1 or eta.shape[0] not in (1, k):
        raise ValueError(f"eta must have 1 or K = {k} values, got shape {eta.shape}")
    return np.ascontiguousarray(eta, dtype=dtype)


def map_adapt(
    w0,
    eta,
    support,
    support_offsets,
    *,
    inner: Optional[InnerLoop] = None,
    init=None,
    query=None,
    query_offsets=None,
    return_covariance: bool = False,
    num_threads: Optional[int] = None,
) -> MapResult:
    """MAP adaptation of every user (SPEC §7): ``w*_u = argmin Σ softplus(−d·p(w)) + ½ (w − w0)ᵀ Λ (w − w0)``,
    ``Λ = diag(exp(eta))``, by damped Newton from ``w0`` (or the warm start ``init``, (U, K)).

    ``inner`` is an :class:`InnerLoop` with ``optimizer="map"`` (default: ``InnerLoop("map")``).
    Users that do not converge are reported (``converged``, ``grad_norm``), not raised. With
    ``query`` rows, also each user's query loss and accuracy at ``w*``; with
    ``return_covariance``, the Laplace covariance ``H⁻¹`` (U, K, K).
    """
    inner = InnerLoop("map") if inner is None else inner_loop(inner)
    if not inner.is_map:
        raise ValueError(f"map_adapt needs an InnerLoop with optimizer='map', got {inner.optimizer!r}")
    if (query is None) != (query_offsets is None):
        raise ValueError("query and query_offsets go together: pass both or neither")
    dtype, w0, support, support_offsets, query, query_offsets = _prepare(w0, support, support_offsets, query, query_offsets)
    k = support.shape[1]
    eta = _eta(eta, dtype, k)
    if init is not None:
        init = _float_array("init", init, (2,))
        _same_dtype(support=support, init=init)
        if init.shape != (len(support_offsets) - 1, k):
            raise ValueError(f"init must have shape ({len(support_offsets) - 1}, {k}), got {init.shape}")
    weights, iterations, grad_norm, converged, support_losses, losses, accuracy, covariance = _native.map_forward(
        w0, eta, support, support_offsets, query, query_offsets, init, int(inner.max_iter), float(inner.tol),
        inner.weight_map, bool(return_covariance), resolve_threads(num_threads),
    )
    return MapResult(weights, iterations, grad_norm, converged, support_losses, losses, accuracy, covariance)


def meta_forward(
    w0,
    support,
    support_offsets,
    query,
    query_offsets,
    *,
    inner: Optional[InnerLoop] = None,
    eta=None,
    steps: Optional[int] = None,
    lr: Optional[float] = None,
    optimizer: Optional[str] = None,
    betas: Optional[Tuple[float, float]] = None,
    eps: Optional[float] = None,
    num_threads: Optional[int] = None,
) -> MetaForward:
    """Adapt every user on its support pairs, then measure its query loss and accuracy.

    Every user needs at least one query pair. ``map``: a user whose solve does not converge is
    a ValueError naming it.
    """
    inner = inner_loop(inner, steps=steps, lr=lr, optimizer=optimizer, betas=betas, eps=eps)
    for name, value in (("query", query), ("query_offsets", query_offsets)):
        if value is None:
            raise TypeError(f"{name} must be an array, got None (use adapt() to adapt without query pairs)")
    if inner.is_map:
        result = map_adapt(w0, eta, support, support_offsets, inner=inner, query=query, query_offsets=query_offsets,
                           num_threads=num_threads)
        result.raise_unconverged()
        empty = np.flatnonzero(np.diff(np.asarray(query_offsets)) == 0)
        if empty.size:
            raise ValueError(f"query has no pairs for user {int(empty[0])}: every user needs at least one query pair")
        return MetaForward(losses=result.losses, weights=result.weights, support_losses=result.support_losses,
                           accuracy=result.accuracy)
    _no_map_arguments(eta=eta)
    dtype, w0, support, support_offsets, query, query_offsets = _prepare(
        w0, support, support_offsets, query, query_offsets, need_query=True
    )
    weights, support_losses, losses, accuracy = _native.forward(
        w0, support, support_offsets, query, query_offsets, *_hyper(inner), True, resolve_threads(num_threads)
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
    inner: Optional[InnerLoop] = None,
    eta=None,
    steps: Optional[int] = None,
    lr: Optional[float] = None,
    optimizer: Optional[str] = None,
    betas: Optional[Tuple[float, float]] = None,
    eps: Optional[float] = None,
    first_order: bool = False,
    num_threads: Optional[int] = None,
    out: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None,
):
    """Exact gradient of ``Σ_u grad_losses[u] · L_u`` (``L_u`` as in :func:`meta_forward`).

    Returns ``(grad_w0, grad_support, grad_query)``: ``grad_w0`` has the shape of ``w0`` (summed
    over users when ``w0`` is shared), the others the shapes of ``support`` and ``query``.
    The inner trajectory is recomputed, not stored. ``first_order=True`` treats the inner
    gradients as constants (FOMAML): support rows then get a zero gradient.

    The ``map`` solver returns ``(grad_w0, grad_support, grad_query, grad_eta)``: the implicit
    gradient at each user's solution (SPEC §7; memory independent of the iterations);
    ``first_order`` and ``out`` do not apply.

    ``out``: three writeable C-contiguous arrays of those shapes and the inputs' dtype, written
    and returned instead of new ones (a training loop can then reuse its gradient memory). They
    must not share memory with any input.
    """
    inner = inner_loop(inner, steps=steps, lr=lr, optimizer=optimizer, betas=betas, eps=eps)
    grads, _ = _meta_gradients(w0, support, support_offsets, query, query_offsets, grad_losses, inner, eta,
                               first_order, num_threads, out, with_values=False)
    return grads


def meta_value_and_grad(
    w0,
    support,
    support_offsets,
    query,
    query_offsets,
    grad_losses,
    *,
    inner: Optional[InnerLoop] = None,
    eta=None,
    steps: Optional[int] = None,
    lr: Optional[float] = None,
    optimizer: Optional[str] = None,
    betas: Optional[Tuple[float, float]] = None,
    eps: Optional[float] = None,
    first_order: bool = False,
    num_threads: Optional[int] = None,
    out: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None,
):
    """:func:`meta_forward` and :func:`meta_backward` in one pass over the rows.

    Returns ``(forward, grads)``, bit-identical to what the two calls return. Use it when
    ``grad_losses`` is known before the losses, e.g. ``1/U`` each for the mean query loss; when
    it depends on the losses (RPO), call the two functions instead.
    Arguments as in :func:`meta_backward`.
    """
    inner = inner_loop(inner, steps=steps, lr=lr, optimizer=optimizer, betas=betas, eps=eps)
    grads, forward = _meta_gradients(w0, support, support_offsets, query, query_offsets, grad_losses, inner, eta,
                                     first_order, num_threads, out, with_values=True)
    return forward, grads


def _meta_gradients(w0, support, support_offsets, query, query_offsets, grad_losses, inner: InnerLoop, eta,
                    first_order, num_threads, out, *, with_values: bool) -> Tuple[tuple, Optional[MetaForward]]:
    """``(grads, forward)`` of :func:`meta_value_and_grad` for either solver; ``forward`` is None
    unless ``with_values``."""
    if inner.is_map:
        grads, values = _map_backward(w0, eta, support, support_offsets, query, query_offsets, grad_losses, inner,
                                      first_order, num_threads, out, with_values=with_values)
    else:
        _no_map_arguments(eta=eta)
        grads, values = _backward(
            w0, support, support_offsets, query, query_offsets, grad_losses,
            _hyper(inner), first_order, num_threads, out, with_values=with_values,
        )
    if not with_values:
        return grads, None
    if inner.is_map:
        weights, _, _, _, support_losses, losses, accuracy, _ = values
    else:
        weights, support_losses, losses, accuracy = values
    return grads, MetaForward(losses=losses, weights=weights, support_losses=support_losses, accuracy=accuracy)


def _grad_losses(grad_losses, dtype, n_users: int) -> np.ndarray:
    grad_losses = _float_array("grad_losses", grad_losses, (1,))
    if grad_losses.dtype != dtype:
        raise TypeError(f"mixed float dtypes: support is {dtype} but grad_losses is {grad_losses.dtype}; "
                        "use one of float32 or float64 for every array")
    if grad_losses.shape[0] != n_users:
        raise ValueError(f"grad_losses has {grad_losses.shape[0]} entries but there are {n_users} users")
    return grad_losses


def _map_backward(w0, eta, support, support_offsets, query, query_offsets, grad_losses, inner, first_order,
                  num_threads, out, *, with_values: bool):
    if first_order:
        raise ValueError("first_order does not apply to the 'map' solver (its gradient is implicit, never unrolled)")
    if out is not None:
        raise ValueError("out= does not apply to the 'map' solver")
    dtype, w0, support, support_offsets, query, query_offsets = _prepare(w0, support, support_offsets, query, query_offsets)
    eta = _eta(eta, dtype, support.shape[1])
    grad_losses = _grad_losses(grad_losses, dtype, len(support_offsets) - 1)
    (grad_w0, grad_eta, grad_support, grad_query), values = _native.map_backward(
        w0, eta, support, support_offsets, query, query_offsets, grad_losses, int(inner.max_iter), float(inner.tol),
        inner.weight_map, resolve_threads(num_threads), bool(with_values),
    )
    return (grad_w0, grad_support, grad_query, grad_eta), values


def _backward(w0, support, support_offsets, query, query_offsets, grad_losses, hyper, first_order, num_threads, out,
              *, with_values: bool):
    dtype, w0, support, support_offsets, query, query_offsets = _prepare(
        w0, support, support_offsets, query, query_offsets, need_query=True
    )
    grad_losses = _grad_losses(grad_losses, dtype, len(support_offsets) - 1)
    if out is not None:
        out = _gradient_buffers(out, dtype, w0=w0, support=support, query=query)
    return _native.backward(
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
    return _native.rpo(losses, float(tail), float(gamma))


def score(features, feature_offsets, weights, *, weight_map: str = "simplex",
          num_threads: Optional[int] = None) -> np.ndarray:
    """Personalised rewards ``features[i] · p(weights[u])`` for each row ``i`` of user ``u``
    (``p`` = softmax for ``weight_map="simplex"``, the identity for ``"linear"``).

    ``features`` (N, K) grouped by user with ``feature_offsets`` (U + 1,); ``weights`` (U, K).
    Returns (N,).
    """
    if weight_map != "simplex":
        return predict(features, feature_offsets, weights, weight_map=weight_map, num_threads=num_threads)[0]
    features = _float_array("features", features, (2,))
    feature_offsets = _int_array("feature_offsets", feature_offsets)
    weights = _float_array("weights", weights, (2,))
    _same_dtype(features=features, weights=weights)
    _same_k(features=features, weights=weights)
    if weights.shape[0] != len(feature_offsets) - 1:
        raise ValueError(
            f"weights has {weights.shape[0]} rows but feature_offsets describes {len(feature_offsets) - 1} users"
        )
    return _native.score(features, feature_offsets, weights, resolve_threads(num_threads))


def _index(name: str, value) -> np.ndarray:
    return _int_array(name, value, "(one entry per pair)")


def pair_differences(features, chosen, rejected) -> np.ndarray:
    """``features[chosen[i]] − features[rejected[i]]`` for every pair ``i``: (N, K) from
    ``features`` (rows, K) and two index arrays (N,)."""
    features = _float_array("features", features, (2,))
    return _native.pair_differences(features, _index("chosen", chosen), _index("rejected", rejected))


def pair_differences_backward(grad, chosen, rejected, n_rows: int) -> np.ndarray:
    """The adjoint of :func:`pair_differences`: the gradient with respect to ``features``
    (n_rows, K) given the gradient ``grad`` (N, K) with respect to the differences."""
    grad = _float_array("grad", grad, (2,))
    if isinstance(n_rows, bool) or not isinstance(n_rows, numbers.Integral):
        raise TypeError(f"n_rows must be an int, got {type(n_rows).__name__}")
    if n_rows < 0 or n_rows > np.iinfo(np.int64).max:
        raise ValueError(f"n_rows must be a non-negative int that fits int64, got {n_rows!r}")
    return _native.pair_differences_backward(
        grad, _index("chosen", chosen), _index("rejected", rejected), int(n_rows)
    )


def predict(features, feature_offsets, weights, *, covariance=None, weight_map: str = "simplex",
            num_threads: Optional[int] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Posterior predictive of ``features[i] · p(w_u)`` for each row ``i`` of user ``u`` (SPEC §7):
    ``(mean, variance)``, each (N,). ``covariance`` (U, K, K) is the users' Laplace covariance
    (:func:`map_adapt` with ``return_covariance``); without it ``variance`` is None. Rows may be
    base-reward features (reward and its variance) or pair differences (margin and its variance).
    """
    if weight_map not in WEIGHT_MAPS:
        raise ValueError(f"weight_map must be 'simplex' or 'linear', got {weight_map!r}")
    features = _float_array("features", features, (2,))
    feature_offsets = _int_array("feature_offsets", feature_offsets)
    weights = _float_array("weights", weights, (2,))
    arrays = {"features": features, "weights": weights}
    if covariance is not None:
        covariance = _float_array("covariance", covariance, (3,))
        arrays["covariance"] = covariance
    _same_dtype(**arrays)
    k = _same_k(**arrays)
    n_users = len(feature_offsets) - 1
    if weights.shape[0] != n_users:
        raise ValueError(f"weights has {weights.shape[0]} rows but feature_offsets describes {n_users} users")
    if covariance is not None and covariance.shape != (n_users, k, k):
        raise ValueError(f"covariance must have shape ({n_users}, {k}, {k}), got {covariance.shape}")
    return _native.predictive(features, feature_offsets, weights, covariance, weight_map,
                                        resolve_threads(num_threads))


def pair_probabilities(margin, variance=None) -> np.ndarray:
    """P(chosen ≻ rejected) from a pair's predictive margin and its variance (SPEC §7): the probit
    approximation ``σ(m / sqrt(1 + π var / 8))``; without a variance, ``σ(m)``."""
    margin = np.asarray(margin)
    if variance is not None:
        margin = margin / np.sqrt(1.0 + np.pi * np.asarray(variance) / 8.0)
    return _sigmoid(margin)


def information_gain(margin, variance) -> np.ndarray:
    """Expected information of asking about a pair (SPEC §7): ``½ log(1 + s(1 − s) var)``, ``s = σ(m)``."""
    s = _sigmoid(np.asarray(margin))
    return 0.5 * np.log1p(s * (1.0 - s) * np.asarray(variance))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.result_type(x, np.float32), copy=False)
