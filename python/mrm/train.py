"""Meta-training (SPEC §3, §6): learn the base reward functions φ_θ and the shared start w0 so
that each user is fitted from a few pairs (needs torch).

One outer step takes ``tasks_per_batch`` seen users, splits each user's training pairs into
support and query (reshuffled every epoch), runs every user's inner loop and its exact adjoint
in ONE native call (:func:`mrm.torch_ops.user_losses`), combines the per-user query losses with
RPO (or their mean), and takes an Adam step on θ and w0 with a cosine schedule, linear warm-up
and gradient-norm clipping. Seen and unseen users are evaluated every ``eval_every`` epochs
(SPEC §5); the best epoch is checkpointed; ``output_dir/last`` makes a run resumable.

Deviation from the official code, documented: the per-epoch split and user order come from
numpy's generator seeded with ``(seed, epoch)``, not Python's ``random`` module, so a run is
reproducible and resumable at any epoch but does not replay the official code's exact draws.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch

from mrm import evaluate as evaluation
from mrm import ops
from mrm._io import atomic_dir
from mrm._state import load_state, save_state
from mrm.data.pairs import PreferenceData, UserPairs, with_shots
from mrm.model import MetaRewardModel, ModelConfig
from mrm.torch_ops import rpo_objective, user_losses

__all__ = ["PRESETS", "preset", "TrainConfig", "MetaTrainer", "EpochPlan", "split_support_query", "split_support_sizes", "bt_pca_start", "fit_global_bradley_terry", "check_embeddings"]

STATE_NAME = "trainer_state"  # .safetensors (tensors) + .json (the rest): never a pickle
_OLD_STATE_NAME = "trainer_state.pt"  # written by earlier versions; never loaded
SELECTION_SHOTS = (5, 10, 20, 50)
"""Shot counts of ``select_on='seen-shots'``."""
HISTORY_NAME = "history.json"


@dataclass
class TrainConfig:
    """Meta-training settings. Defaults are the released MRM hyper-parameters (PRISM, SPEC §6)."""

    num_bases: int = 2
    hidden_sizes: List[int] = field(default_factory=list)
    scale: float = 0.01
    """Input scale of φ: 0.01 suits raw LLM hidden states; unit-norm sentence embeddings need ~1-10."""
    bias: bool = False
    activation: Optional[str] = None
    inner_optimizer: str = "adam"
    """'adam' or 'sgd' (T steps, SPEC §2) or 'map' (the posterior mode under a meta-learned prior, SPEC §7)."""
    inner_steps: Optional[int] = None
    """Steps of the sgd/adam loop (default 1, released); not for 'map'."""
    inner_lr: Optional[float] = None
    """Step size of the sgd/adam loop (default 1e-3, released); not for 'map'."""
    first_order: bool = False
    weight_map: str = "simplex"
    """'simplex' (softmax user weights) or 'linear' (unconstrained; 'map' only)."""
    prior: str = "per-base"
    """'map' only: one meta-learned prior log precision per base ('per-base') or one for all ('shared')."""
    init_log_precision: float = 0.0
    """'map' only: the prior's starting log precision η (λ = e^η)."""
    map_max_iter: int = 100
    map_tol: float = 1e-6
    support_sizes: Optional[List[int]] = None
    """[lo, hi]: each user's support size per epoch drawn uniformly from lo..hi pairs, with an
    item-disjoint query (see :func:`split_support_sizes`); None: the official ``val_ratio`` split."""
    init_ridge: float = 1.0
    """'bt-pca' only: the isotropic prior precision of the per-user deviation fits the PCA reads."""
    learn: str = "all"
    """Which parameters meta-training updates: 'all' (θ, w0 and η) or 'prior' (w0 and η only:
    φ stays at its start, e.g. the 'bt-pca' bases, and cannot memorise the seen users' items)."""
    init: str = "random"
    """'random' (torch's default init) or 'bt-pca': θ from the global Bradley–Terry direction plus
    the top principal directions of seen users' deviations from it, η from their variances (needs
    the 'map' solver, the 'linear' weight map and the linear φ with no hidden layer or bias)."""
    meta_lr: float = 1e-3
    epochs: int = 200
    tasks_per_batch: int = 2
    val_ratio: float = 0.9
    """Fraction of a user's training pairs (groups) used as query during meta-training."""
    objective: str = "rpo"
    """'rpo' (SPEC §3) or 'mean' (the plain mean of per-user query losses)."""
    tail: float = 0.5
    gamma: float = 0.5
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    eval_every: int = 1
    select_on: str = "seen"
    """Which user-level accuracy picks the best epoch: 'seen' (held-out pairs of the users seen in
    meta-training, each adapted on all its training pairs: no unseen-user information leaks into
    model selection), 'seen-shots' (the same test pairs, each seen user adapted on only its first
    5, 10, 20 and 50 training pairs, averaged: the regime new users are in) or 'last'."""
    seed: int = 42
    dtype: str = "float32"
    num_threads: Optional[int] = None

    def validate(self) -> None:
        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        for name in ("num_bases", "epochs", "tasks_per_batch", "eval_every"):
            positive_int(name)
        value = self.meta_lr
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"meta_lr must be a finite number > 0, got {value!r}")
        if self.inner_optimizer not in ops.SOLVERS:
            raise ValueError(f"inner_optimizer must be one of {', '.join(map(repr, ops.SOLVERS))}, got {self.inner_optimizer!r}")
        try:
            inner = self.inner()
        except (TypeError, ValueError) as exc:
            # the InnerLoop names its own fields: say which TrainConfig fields they come from
            raise ValueError(f"inner-loop settings (inner_steps, inner_lr, weight_map, map_max_iter, map_tol): {exc}") from None
        if inner.is_map:
            if self.prior not in ("per-base", "shared"):
                raise ValueError(f"prior must be 'per-base' or 'shared', got {self.prior!r}")
            if not (isinstance(self.init_log_precision, (int, float)) and abs(self.init_log_precision) <= ops.ETA_LIMIT):
                raise ValueError(f"init_log_precision must be a number within ±{ops.ETA_LIMIT}, got {self.init_log_precision!r}")
            if self.first_order:
                raise ValueError("first_order does not apply to the 'map' solver (its meta-gradient is implicit)")
        if self.support_sizes is not None:
            sizes = self.support_sizes
            if (not isinstance(sizes, (list, tuple)) or len(sizes) != 2
                    or any(isinstance(v, bool) or not isinstance(v, int) for v in sizes) or not 1 <= sizes[0] <= sizes[1]):
                raise ValueError(f"support_sizes must be [lo, hi] with 1 <= lo <= hi, got {sizes!r}")
        if self.learn not in ("all", "prior"):
            raise ValueError(f"learn must be 'all' or 'prior', got {self.learn!r}")
        if self.init not in ("random", "bt-pca"):
            raise ValueError(f"init must be 'random' or 'bt-pca', got {self.init!r}")
        if self.init == "bt-pca" and not (inner.is_map and self.weight_map == "linear" and not self.hidden_sizes
                                          and not self.bias and self.activation is None and self.num_bases >= 2):
            raise ValueError("init='bt-pca' needs inner_optimizer='map', weight_map='linear', num_bases >= 2 and the "
                             "linear φ (no hidden_sizes, bias or activation)")
        if self.objective not in ("rpo", "mean"):
            raise ValueError(f"objective must be 'rpo' or 'mean', got {self.objective!r}")
        if not 0 < self.val_ratio <= 1:
            raise ValueError(f"val_ratio must be in (0, 1], got {self.val_ratio!r}")
        if not 0 < self.tail <= 1:
            raise ValueError(f"tail must be in (0, 1], got {self.tail!r}")
        if not (math.isfinite(self.gamma)):
            raise ValueError(f"gamma must be finite, got {self.gamma!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not (self.grad_clip is None or (math.isfinite(self.grad_clip) and self.grad_clip > 0)):
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if self.select_on not in ("seen", "seen-shots", "last"):
            raise ValueError(f"select_on must be 'seen', 'seen-shots' or 'last', got {self.select_on!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        self.model_config(1).validate()

    def inner(self) -> ops.InnerLoop:
        """The adaptation settings as one :class:`mrm.ops.InnerLoop` (built once per use)."""
        if self.inner_optimizer == "map":
            if self.inner_steps is not None or self.inner_lr is not None:
                raise ValueError("inner_steps and inner_lr do not apply to inner_optimizer='map'")
            return ops.InnerLoop("map", max_iter=self.map_max_iter, tol=self.map_tol, weight_map=self.weight_map)
        return ops.InnerLoop(self.inner_optimizer, steps=self.inner_steps, lr=self.inner_lr, weight_map=self.weight_map)

    def model_config(self, input_dim: int) -> ModelConfig:
        is_map = self.inner_optimizer == "map"
        return ModelConfig(
            input_dim=input_dim, num_bases=self.num_bases, hidden_sizes=list(self.hidden_sizes),
            scale=self.scale, bias=self.bias, activation=self.activation, weight_map=self.weight_map,
            prior=self.prior if is_map else None,
        )

    @staticmethod
    def from_dict(raw: dict) -> "TrainConfig":
        known = {f.name for f in fields(TrainConfig)}
        raw = {k: v for k, v in raw.items() if k != "inner"}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        config = TrainConfig(**raw)
        config.validate()
        return config

    def to_dict(self) -> dict:
        """JSON-ready settings, with the resolved adaptation settings under ``inner``."""
        return {**asdict(self), "inner": self.inner().to_dict()}


PRESETS = {
    "released": {},
    "recommended": dict(
        num_bases=9, scale=1.0, inner_optimizer="map", weight_map="linear", prior="per-base", init="bt-pca",
        learn="prior", support_sizes=[5, 50], objective="mean", meta_lr=1e-2, epochs=10, tasks_per_batch=32,
        eval_every=1, select_on="seen-shots",
    ),
}
"""Named settings: 'released' is the paper's configuration (the TrainConfig defaults);
'recommended' is MAP adaptation with linear user weights over a global Bradley–Terry direction
plus 8 principal directions of seen users' deviations (init 'bt-pca'), the prior's precisions
meta-learned on item-disjoint 5–50-pair supports, the epoch chosen on seen users' test pairs at
5–50 shots (see README: what it gains over a global Bradley–Terry model, with intervals)."""


def preset(name: str, **overrides) -> "TrainConfig":
    """The TrainConfig of a named preset (see :data:`PRESETS`), with keyword overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose from {sorted(PRESETS)}")
    config = TrainConfig(**{**PRESETS[name], **overrides})
    config.validate()
    return config


def check_embeddings(embeddings, name: str = "embeddings") -> np.ndarray:
    """A finite 2-d float array, else a ValueError naming the first bad row."""
    arr = embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-d array (rows, D), got shape {arr.shape}")
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must be floating point, got {arr.dtype}")
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{name} row {row} contains NaN or Inf ({int((~finite).sum())} bad rows in all)")
    return arr


@dataclass
class EpochPlan:
    """One epoch's user order and support/query split, as pair indices grouped per user (CSR,
    users in batch order): batch b holds users ``b*tasks_per_batch : (b+1)*tasks_per_batch``."""

    users: np.ndarray
    support_pairs: np.ndarray
    support_offsets: np.ndarray
    query_pairs: np.ndarray
    query_offsets: np.ndarray


def split_support_query(pairs: UserPairs, users: np.ndarray, rng: np.random.Generator, val_ratio: float) -> EpochPlan:
    """Shuffle each user's groups and split them: the first ``max(1, int(n_groups · val_ratio))``
    groups are query, the rest support; a user with one group uses it for both (SPEC §6)."""
    users = np.asarray(users, dtype=np.int64)
    counts = np.diff(pairs.offsets)[users]
    starts = np.concatenate([[0], np.cumsum(counts)])
    n = int(starts[-1])
    # entries: every pair of every user, users in the given order, each user's pairs in stored order
    index = np.repeat(pairs.offsets[users] - starts[:-1], counts) + np.arange(n)
    owner = np.repeat(np.arange(len(users), dtype=np.int64), counts)
    groups = pairs.groups[index]
    same_user = owner[1:] == owner[:-1]
    if n == 0 or not np.any(same_user & (groups[1:] < groups[:-1])):
        # groups never decrease within a user (each pair its own group, or stored by group):
        # each run of equal groups is one group, no sort needed
        change = np.ones(n, dtype=bool)
        change[1:] = ~same_user | (groups[1:] != groups[:-1])
        group_id = np.cumsum(change) - 1
    else:
        # one id per (user, group), in sorted order
        by_group = _stable_order(owner, groups)
        change = np.ones(n, dtype=bool)
        o, g = owner[by_group], groups[by_group]
        change[1:] = (o[1:] != o[:-1]) | (g[1:] != g[:-1])
        group_id = np.empty(n, dtype=np.int64)
        group_id[by_group] = np.cumsum(change) - 1
    n_group_ids = int(change.sum())
    # within each user: groups in a random order (distinct random ranks, so no ties between
    # groups), a group's pairs together in stored order (the sort is stable)
    rank_of_group = rng.permutation(n_group_ids).astype(np.int64)
    order = np.argsort(owner * max(n_group_ids, 1) + rank_of_group[group_id], kind="stable")
    owner_sorted, gid_sorted = owner[order], group_id[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = gid_sorted[1:] != gid_sorted[:-1]
    groups_so_far = np.cumsum(new_group) - 1
    user_first_group = np.zeros(len(users), dtype=np.int64)
    groups_per_user = np.bincount(owner_sorted[new_group], minlength=len(users))
    user_first_group[1:] = np.cumsum(groups_per_user)[:-1]
    rank = groups_so_far - user_first_group[owner_sorted]
    n_query = np.maximum(1, np.floor(groups_per_user * val_ratio).astype(np.int64))
    single = groups_per_user[owner_sorted] <= 1
    is_query = (rank < n_query[owner_sorted]) | single
    is_support = (rank >= n_query[owner_sorted]) | single
    query_pairs, support_pairs = index[order[is_query]], index[order[is_support]]
    q_counts = np.bincount(owner_sorted[is_query], minlength=len(users))
    s_counts = np.bincount(owner_sorted[is_support], minlength=len(users))
    cs = lambda c: np.concatenate([[0], np.cumsum(c)]).astype(np.int64)  # noqa: E731
    return EpochPlan(users, support_pairs.astype(np.int64), cs(s_counts), query_pairs.astype(np.int64), cs(q_counts))


def split_support_sizes(pairs: UserPairs, users: np.ndarray, rng: np.random.Generator, lo: int, hi: int) -> EpochPlan:
    """Item-disjoint support/query split with a drawn support size: for each user a target
    ``n_s`` uniform on ``lo..hi``, then a random share ``f = sqrt(n_s / n)`` of the texts (items)
    its pairs use become support items; pairs with both sides among them are its support, pairs
    with both sides among the others its query, pairs across the two are left out this epoch. So
    meta-training sees the support sizes new users have and scores adaptation on items it did not
    adapt on, as evaluation does (pairs that share an item leak it from support into query and
    reward a prior too weak to generalise). A user whose split leaves either side empty uses all
    its pairs for both."""
    users = np.asarray(users, dtype=np.int64)
    sizes = rng.integers(lo, hi + 1, size=len(users))
    s_parts, q_parts = [], []
    for u, size in zip(users, sizes):
        idx = np.arange(pairs.offsets[u], pairs.offsets[u + 1])
        c, r = pairs.chosen[idx], pairs.rejected[idx]
        items, inverse = np.unique(np.concatenate([c, r]), return_inverse=True)
        share = math.sqrt(min(1.0, size / max(1, len(idx))))
        in_support = rng.random(len(items)) < share
        side_c, side_r = in_support[inverse[: len(idx)]], in_support[inverse[len(idx):]]
        s_idx, q_idx = idx[side_c & side_r], idx[~side_c & ~side_r]
        if s_idx.size == 0 or q_idx.size == 0:
            s_idx = q_idx = idx
        s_parts.append(s_idx)
        q_parts.append(q_idx)
    cs = lambda parts: np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)  # noqa: E731
    cat = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)  # noqa: E731
    return EpochPlan(users, cat(s_parts), cs(s_parts), cat(q_parts), cs(q_parts))


def bt_pca_start(model: MetaRewardModel, embeddings: np.ndarray, data: PreferenceData, *, subspace: int = 64,
                 ridge: float = 1.0) -> None:
    """Initialise a linear-map MAP model from the seen users' training pairs (SPEC §7's
    reference): base 0 = the global Bradley–Terry direction ``b`` (w0 = [1, 0, …]), bases 1..K−1
    = the top principal directions of the users' MAP deviations from ``b`` (fitted in the top
    ``subspace`` principal directions of the pair differences, isotropic ``ridge`` prior), η =
    −log of each coefficient's variance over users (empirical Bayes). Only seen users are read."""
    k = model.config.num_bases
    seen = np.flatnonzero(data.seen)
    pairs = data.train.select_users(seen)
    emb = np.asarray(embeddings, np.float64)
    x = emb[pairs.chosen] - emb[pairs.rejected]
    bt = fit_global_bradley_terry(embeddings, pairs, model.config)
    b = (bt.layers[0].weight.detach().double().numpy()[0] * model.config.scale)
    m = int(min(subspace, x.shape[1], max(1, x.shape[0] - 1), 64))
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    basis = vt[:m].T  # (D, m)
    y = np.ascontiguousarray(x @ basis)
    w0 = basis.T @ b
    solved = ops.map_adapt(w0, np.array([math.log(ridge)]), y, pairs.offsets,
                           inner=ops.InnerLoop("map", weight_map="linear", max_iter=200))
    deviations = solved.weights - w0
    second = deviations.T @ deviations / max(1, len(seen))
    values, vectors = np.linalg.eigh(second)
    order = np.argsort(values)[::-1][: k - 1]
    directions = basis @ vectors[:, order]  # (D, K−1), unit columns
    variances = np.maximum(values[order], 1e-8)
    along_b = deviations @ w0 / max(float(w0 @ w0), 1e-12)
    var_b = max(float(np.mean(along_b ** 2)), 1e-8)
    weight = np.concatenate([b[None, :], directions.T]) / model.config.scale
    eta = -np.log(np.concatenate([[var_b], variances]))
    eta = np.clip(eta, -ops.ETA_LIMIT + 1, ops.ETA_LIMIT - 1)
    with torch.no_grad():
        layer = model.layers[0]
        layer.weight.copy_(torch.as_tensor(weight, dtype=layer.weight.dtype))
        model.shared_weight.zero_()
        model.shared_weight[0] = 1.0
        if model.log_precision.numel() == k:
            model.log_precision.copy_(torch.as_tensor(eta, dtype=model.log_precision.dtype))
        else:
            model.log_precision.fill_(float(np.mean(eta)))


def _stable_order(owner: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Entries sorted by (owner, group), stably: one sort of a combined key when it fits in
    int64, else a two-key lexsort."""
    g_min, g_max = int(groups.min()), int(groups.max())
    span = g_max - g_min + 1
    if span < 2**62 // max(int(owner[-1]) + 1, 1):
        return np.argsort(owner * span + (groups - g_min), kind="stable")
    return np.lexsort((groups, owner))


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up to 1 over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class MetaTrainer:
    """Meta-trains a :class:`MetaRewardModel` on the seen users of a :class:`PreferenceData`.

    ``embeddings``: (rows, D), one row per ``data.texts`` entry. ``output_dir``: where ``best/``
    (the best epoch's model), ``last/`` (model + optimiser state, for ``resume``) and
    ``history.json`` go; None keeps everything in memory.
    """

    def __init__(
        self,
        config: TrainConfig,
        embeddings,
        data: PreferenceData,
        *,
        output_dir: Union[str, Path, None] = None,
        resume: bool = False,
        model: Optional[MetaRewardModel] = None,
    ):
        config.validate()
        self.config = config
        emb = check_embeddings(embeddings)
        if emb.shape[0] != len(data.texts):
            raise ValueError(f"embeddings has {emb.shape[0]} rows but the data has {len(data.texts)} texts")
        self.dtype = torch.float32 if config.dtype == "float32" else torch.float64
        self.embeddings = torch.as_tensor(np.ascontiguousarray(emb), dtype=self.dtype)
        self.data = data
        data.train.check_rows(emb.shape[0], "train")
        data.test.check_rows(emb.shape[0], "test")
        self.seen_users = np.flatnonzero(data.seen)
        if self.seen_users.size == 0:
            raise ValueError("the data has no seen users to meta-train on")
        empty = self.seen_users[data.train.counts()[self.seen_users] == 0]
        if empty.size:
            raise ValueError(
                f"seen user {data.user_ids[int(empty[0])]!r} (index {int(empty[0])}) has no training pairs "
                f"({empty.size} such users): drop them or mark them unseen"
            )
        torch.manual_seed(config.seed)
        self.inner = config.inner()
        if model is None:
            model = MetaRewardModel(config.model_config(emb.shape[1]))
            if model.log_precision is not None:
                with torch.no_grad():
                    model.log_precision.fill_(config.init_log_precision)
            if config.init == "bt-pca":
                bt_pca_start(model, emb, data, ridge=config.init_ridge)
        self.model = model.to(self.dtype)
        if self.model.config.input_dim != emb.shape[1]:
            raise ValueError(f"the model expects input_dim {self.model.config.input_dim}, embeddings have D = {emb.shape[1]}")
        if config.learn == "prior":
            for layer in self.model.layers:
                layer.requires_grad_(False)
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=config.meta_lr)
        self.batches_per_epoch = math.ceil(len(self.seen_users) / config.tasks_per_batch)
        self.total_steps = config.epochs * self.batches_per_epoch
        self.warmup_steps = int(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: cosine_with_warmup(step, self.total_steps, self.warmup_steps)
        )
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.epoch = 0
        self.history: List[Dict] = []
        self.best: Optional[Dict] = None
        self.best_state: Optional[Dict[str, torch.Tensor]] = None
        if resume:
            if self.output_dir is None:
                raise ValueError("resume=True needs an output_dir")
            if (self.output_dir / "last").is_dir():
                self._load_last()

    # ---- one epoch ---------------------------------------------------------------------------

    def epoch_plan(self, epoch: int) -> EpochPlan:
        """The user order and support/query split of ``epoch`` (a pure function of seed, epoch)."""
        rng = np.random.default_rng([self.config.seed, epoch])
        users = self.seen_users[rng.permutation(len(self.seen_users))]
        if self.config.support_sizes is not None:
            return split_support_sizes(self.data.train, users, rng, *self.config.support_sizes)
        return split_support_query(self.data.train, users, rng, self.config.val_ratio)

    def _batch_losses(self, plan: EpochPlan, first: int, last: int) -> torch.Tensor:
        """Per-user query losses of users ``first:last`` of the plan (one native call)."""
        pairs = self.data.train
        s_idx = plan.support_pairs[plan.support_offsets[first]:plan.support_offsets[last]]
        q_idx = plan.query_pairs[plan.query_offsets[first]:plan.query_offsets[last]]
        s_off = plan.support_offsets[first:last + 1] - plan.support_offsets[first]
        q_off = plan.query_offsets[first:last + 1] - plan.query_offsets[first]
        n_s = len(s_idx)
        chosen = np.concatenate([pairs.chosen[s_idx], pairs.chosen[q_idx]])
        rejected = np.concatenate([pairs.rejected[s_idx], pairs.rejected[q_idx]])
        d = self.model.pair_differences(self.embeddings, chosen, rejected)
        c = self.config
        return user_losses(
            self.model.shared_weight, d[:n_s], torch.from_numpy(s_off), d[n_s:], torch.from_numpy(q_off),
            inner=self.inner, eta=self.model.log_precision, first_order=c.first_order, num_threads=c.num_threads,
        )

    def meta_objective(self, losses: torch.Tensor) -> torch.Tensor:
        if self.config.objective == "rpo":
            return rpo_objective(losses, self.config.tail, self.config.gamma)
        return losses.mean()

    def train_epoch(self, progress: Optional[Callable[[int], None]] = None) -> Dict[str, float]:
        """One pass over the seen users; returns the mean objective and mean query loss."""
        self.model.train()
        plan = self.epoch_plan(self.epoch)
        tpb = self.config.tasks_per_batch
        n = len(plan.users)
        objective_sum = loss_sum = 0.0
        for first in range(0, n, tpb):
            last = min(n, first + tpb)
            losses = self._batch_losses(plan, first, last)
            objective = self.meta_objective(losses)
            self.optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if self.config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.config.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            objective_sum += float(objective.detach())
            loss_sum += float(losses.detach().sum())
            if progress is not None:
                progress(last - first)
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise FloatingPointError(
                f"meta-training diverged in epoch {self.epoch} (non-finite parameters): lower meta_lr or inner_lr"
            )
        self.epoch += 1
        return {"objective": objective_sum / self.batches_per_epoch, "train_query_loss": loss_sum / n}

    # ---- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def features(self) -> np.ndarray:
        """φ(e) of every embedding row, (rows, K), in chunks."""
        self.model.eval()
        out = [self.model.features(self.embeddings[i:i + 65536]) for i in range(0, len(self.embeddings), 65536)]
        return torch.cat(out).cpu().numpy()

    def evaluate(self, data: Optional[PreferenceData] = None, *, adapt: bool = True,
                 features: Optional[np.ndarray] = None) -> evaluation.EvalResult:
        """SPEC §5: adapt each user on all its training pairs, score its test pairs
        (``adapt=False``: every user keeps w0)."""
        features = self.features() if features is None else features
        if not adapt:
            inner, eta = ops.InnerLoop("sgd", steps=0), None
        else:
            inner = self.inner
            eta = None if self.model.log_precision is None else self.model.log_precision.detach().cpu().numpy()
        return evaluation.evaluate_features(
            features, self.model.shared_weight.detach().cpu().numpy(), data or self.data,
            inner=inner, eta=eta, num_threads=self.config.num_threads,
        )

    def evaluate_summary(self) -> Dict[str, float]:
        """The evaluation record of one epoch: seen/unseen accuracy with all training pairs and,
        for ``select_on='seen-shots'``, the seen users' mean accuracy at 5/10/20/50 shots."""
        features = self.features()
        record = self.evaluate(features=features).summary()
        if self.config.select_on == "seen-shots":
            accs = [self.evaluate(with_shots(self.data, s, users="seen"), features=features).summary()["seen"]
                    for s in SELECTION_SHOTS]
            record["seen_shots"] = float(np.mean(accs))
        return record

    # ---- the loop ----------------------------------------------------------------------------

    def fit(self, *, progress: bool = True, log: Optional[Callable[[Dict], None]] = None) -> Dict:
        """Train until ``config.epochs``; returns the best epoch's record. With an output_dir,
        ``best/`` and ``last/`` are (re)written atomically after each evaluation."""
        from tqdm.auto import tqdm

        c = self.config
        n_seen = len(self.seen_users)
        bar = tqdm(total=(c.epochs - self.epoch) * n_seen, unit="user", desc="meta-training", disable=not progress,
                   dynamic_ncols=True, leave=False)
        try:
            while self.epoch < c.epochs:
                started = time.perf_counter()
                record = {"epoch": self.epoch + 1, **self.train_epoch(progress=bar.update)}
                record["seconds"] = time.perf_counter() - started
                if self.epoch % c.eval_every == 0 or self.epoch == c.epochs:
                    record.update(self.evaluate_summary())
                    self._consider_best(record)
                    self._checkpoint()
                    bar.set_postfix(seen=f"{record['seen']:.3f}", unseen=f"{record['unseen']:.3f}", obj=f"{record['objective']:.4f}")
                self.history.append(record)
                if log is not None:
                    log(record)
        finally:
            bar.close()
        if self.best_state is not None and c.select_on != "last":
            self.model.load_state_dict(self.best_state)
        if self.output_dir is not None:
            evaluation.write_json(self.output_dir / HISTORY_NAME, {"config": c.to_dict(), "history": self.history, "best": self.best})
        return self.best or (self.history[-1] if self.history else {})

    def _consider_best(self, record: Dict) -> None:
        key = {"seen": "seen", "seen-shots": "seen_shots"}.get(self.config.select_on)
        better = self.best is None or key is None or record[key] > self.best[key]
        if better:
            self.best = dict(record)
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if self.output_dir is not None:
                with atomic_dir(self.output_dir / "best") as tmp:
                    self.model.write_files(tmp, extra_config={"train": self.config.to_dict(), "metrics": record})

    def _checkpoint(self) -> None:
        if self.output_dir is None:
            return
        state = {
            "epoch": self.epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
            "best": self.best,
            "best_state": self.best_state,
            "torch_rng": torch.get_rng_state(),
            "config": asdict(self.config),
        }
        with atomic_dir(self.output_dir / "last") as tmp:
            self.model.write_files(tmp, extra_config={"train": self.config.to_dict()})
            save_state(tmp, STATE_NAME, state)

    def _load_last(self) -> None:
        last = self.output_dir / "last"
        model = MetaRewardModel.from_pretrained(last, expected=self.model.config)
        if (last / _OLD_STATE_NAME).exists() and not (last / f"{STATE_NAME}.json").exists():
            raise ValueError(f"cannot resume from {last}: its {_OLD_STATE_NAME} is a pickle from an earlier version, "
                             "which mrm does not load (it could run code); start a new run")
        state = load_state(last, STATE_NAME)
        try:
            saved = TrainConfig(**state["config"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{last / STATE_NAME}.json: not a trainer state of this version ({exc})") from None
        for name in ("num_bases", "hidden_sizes", "tasks_per_batch", "seed", "epochs"):
            if getattr(saved, name) != getattr(self.config, name):
                raise ValueError(
                    f"cannot resume from {last}: it was trained with {name} = {getattr(saved, name)!r}, "
                    f"this run asks for {getattr(self.config, name)!r}"
                )
        self.model.load_state_dict({k: v.to(self.dtype) for k, v in model.state_dict().items()})
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.epoch = int(state["epoch"])
            self.history = list(state["history"])
            self.best = state["best"]
            self.best_state = state["best_state"]
            torch.set_rng_state(state["torch_rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise ValueError(f"{last / STATE_NAME}.json / .safetensors do not hold a usable trainer state: "
                             f"{type(exc).__name__}: {exc}") from None


def fit_global_bradley_terry(
    embeddings,
    pairs: UserPairs,
    model_config: ModelConfig,
    *,
    l2: float = 1e-4,
    max_iter: int = 200,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> MetaRewardModel:
    """The best single global reward model (no personalization): φ with K = 1 fitted by L-BFGS to
    minimise mean softplus(−(r(c) − r(r))) over ALL the given pairs, + ``l2``·‖θ‖²."""
    emb = torch.as_tensor(check_embeddings(embeddings), dtype=dtype)
    pairs.check_rows(emb.shape[0], "pairs")
    if pairs.n_pairs == 0:
        raise ValueError("fit_global_bradley_terry needs at least one pair")
    torch.manual_seed(seed)
    config = ModelConfig(
        input_dim=emb.shape[1], num_bases=1, hidden_sizes=list(model_config.hidden_sizes),
        scale=model_config.scale, bias=model_config.bias, activation=model_config.activation,
    )
    model = MetaRewardModel(config).to(dtype)
    model.shared_weight.requires_grad_(False)
    rows, inverse = np.unique(np.concatenate([pairs.chosen, pairs.rejected]), return_inverse=True)
    x = emb[torch.from_numpy(rows)]
    chosen = torch.from_numpy(inverse[: pairs.n_pairs])
    rejected = torch.from_numpy(inverse[pairs.n_pairs:])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.LBFGS(params, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure():
        optimizer.zero_grad()
        phi = model.features(x)[:, 0]
        loss = torch.nn.functional.softplus(-(phi[chosen] - phi[rejected])).mean()
        loss = loss + l2 * sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    optimizer.step(closure)
    return model
