"""The paper's metric (SPEC §5): per-user accuracy on held-out pairs, user-level averages for
seen / unseen / all users, the worst 10 % of users, a per-user CSV and accuracy-vs-shots plots.

Evaluation protocol (SPEC §6): each user is adapted from w0 on ALL its training pairs (the
support) and scored on its test pairs (the query). A pair counts as right when
``r_u(chosen) > r_u(rejected)`` strictly. Users without test pairs are left out and counted.
Needs numpy only, except :func:`pair_differences_numpy` callers that hold a torch model.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from mrm import ops
from mrm._io import atomic_file
from mrm.data.pairs import PreferenceData, UserPairs

WORST_FRACTION = 0.10


def worst_mean(accuracy: np.ndarray, fraction: float = WORST_FRACTION) -> float:
    """Mean accuracy of the worst ``fraction`` of users (at least one user)."""
    accuracy = np.asarray(accuracy, dtype=np.float64)
    if accuracy.size == 0:
        return float("nan")
    n = max(1, int(math.ceil(fraction * accuracy.size)))
    return float(np.sort(accuracy)[:n].mean())


@dataclass
class EvalResult:
    """Per-user accuracy (NaN for users without test pairs) and the user-level summary."""

    accuracy: np.ndarray
    losses: np.ndarray
    seen: np.ndarray
    weights: Optional[np.ndarray] = None
    user_ids: List[str] = field(default_factory=list)

    def summary(self) -> Dict[str, float]:
        has_test = ~np.isnan(self.accuracy)
        out: Dict[str, float] = {}
        for name, mask in (("seen", self.seen), ("unseen", ~self.seen), ("all", np.ones_like(self.seen))):
            acc = self.accuracy[mask & has_test]
            out[name] = float(acc.mean()) if acc.size else float("nan")
            out[f"{name}_worst10"] = worst_mean(acc)
            out[f"{name}_users"] = int(acc.size)
        out["users_without_test_pairs"] = int((~has_test).sum())
        return out

    def write_csv(self, path) -> None:
        """One row per user: user_id, seen, accuracy (empty without test pairs), query loss."""
        with atomic_file(path, "w") as handle:
            writer = csv.writer(handle)
            writer.writerow(["user_id", "seen", "accuracy", "test_loss"])
            for u in range(len(self.accuracy)):
                uid = self.user_ids[u] if self.user_ids else str(u)
                acc = "" if np.isnan(self.accuracy[u]) else f"{self.accuracy[u]:.6f}"
                loss = "" if np.isnan(self.losses[u]) else f"{self.losses[u]:.6f}"
                writer.writerow([uid, int(self.seen[u]), acc, loss])


def evaluate_differences(
    w0: np.ndarray,
    support: np.ndarray,
    support_offsets: np.ndarray,
    query: np.ndarray,
    query_offsets: np.ndarray,
    seen: np.ndarray,
    *,
    steps: int,
    lr: float,
    optimizer: str = "adam",
    user_ids: Sequence[str] = (),
    num_threads: Optional[int] = None,
) -> EvalResult:
    """Adapt every user on its support differences and score its query differences (K-dim)."""
    query_offsets = np.asarray(query_offsets, dtype=np.int64)
    support_offsets = np.asarray(support_offsets, dtype=np.int64)
    n_users = len(query_offsets) - 1
    has_test = np.diff(query_offsets) > 0
    accuracy = np.full(n_users, np.nan)
    losses = np.full(n_users, np.nan)
    weights = None
    users = np.flatnonzero(has_test)
    if users.size:
        s_sel = _select(support_offsets, users)
        q_sel = _select(query_offsets, users)
        start = w0 if np.ndim(w0) == 1 else np.asarray(w0)[users]
        out = ops.meta_forward(
            start, support[s_sel[0]], s_sel[1], query[q_sel[0]], q_sel[1],
            steps=steps, lr=lr, optimizer=optimizer, num_threads=num_threads,
        )
        accuracy[users] = out.accuracy
        losses[users] = out.losses
        weights = np.zeros((n_users, support.shape[1]), dtype=support.dtype)
        weights[:] = w0
        weights[users] = out.weights
    return EvalResult(accuracy, losses, np.asarray(seen, bool), weights, list(user_ids))


def _select(offsets: np.ndarray, users: np.ndarray):
    """Row index and new offsets of the given users' CSR rows."""
    counts = np.diff(offsets)[users]
    new_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rows = np.repeat(offsets[users] - new_offsets[:-1], counts) + np.arange(new_offsets[-1])
    return rows.astype(np.int64), new_offsets


def pair_differences(features: np.ndarray, pairs: UserPairs) -> np.ndarray:
    """d = φ(chosen) − φ(rejected) for every pair, from precomputed base rewards (rows, K)."""
    return ops.pair_differences(features, pairs.chosen, pairs.rejected)


def evaluate_features(
    features: np.ndarray,
    w0: np.ndarray,
    data: PreferenceData,
    *,
    steps: int,
    lr: float,
    optimizer: str = "adam",
    num_threads: Optional[int] = None,
) -> EvalResult:
    """SPEC §5/§6 evaluation from base rewards φ(e) of every embedding row (rows, K)."""
    features = np.ascontiguousarray(features)
    return evaluate_differences(
        np.asarray(w0, features.dtype),
        pair_differences(features, data.train), data.train.offsets,
        pair_differences(features, data.test), data.test.offsets,
        data.seen, steps=steps, lr=lr, optimizer=optimizer, user_ids=data.user_ids, num_threads=num_threads,
    )


def write_json(path, payload) -> None:
    with atomic_file(path, "w") as handle:
        json.dump(payload, handle, indent=2, default=_json_default)
        handle.write("\n")


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def plot_shots(curves: Dict[str, Dict[int, float]], path, *, title: str = "Unseen users: accuracy vs shots") -> None:
    """Accuracy-vs-shots curves (one line per method) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, curve in curves.items():
        shots = sorted(curve)
        ax.plot(shots, [curve[s] for s in shots], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xticks(sorted({s for c in curves.values() for s in c}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("training pairs per unseen user (shots)")
    ax.set_ylabel("user-level accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)
