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
    inner: Optional[ops.InnerLoop] = None,
    eta=None,
    steps: Optional[int] = None,
    lr: Optional[float] = None,
    optimizer: Optional[str] = None,
    user_ids: Sequence[str] = (),
    num_threads: Optional[int] = None,
) -> EvalResult:
    """Adapt every user on its support differences (as ``inner`` says, or the keyword sugar)
    and score its query differences (K-dim)."""
    inner = ops.inner_loop(inner, steps=steps, lr=lr, optimizer=optimizer)
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
            start, support[s_sel[0]], s_sel[1], query[q_sel[0]], q_sel[1], inner=inner, eta=eta,
            num_threads=num_threads,
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
    inner: Optional[ops.InnerLoop] = None,
    eta=None,
    steps: Optional[int] = None,
    lr: Optional[float] = None,
    optimizer: Optional[str] = None,
    num_threads: Optional[int] = None,
) -> EvalResult:
    """SPEC §5/§6 evaluation from base rewards φ(e) of every embedding row (rows, K)."""
    inner = ops.inner_loop(inner, steps=steps, lr=lr, optimizer=optimizer)
    if eta is not None:
        eta = np.asarray(eta, features.dtype)
    features = np.ascontiguousarray(features)
    return evaluate_differences(
        np.asarray(w0, features.dtype),
        pair_differences(features, data.train), data.train.offsets,
        pair_differences(features, data.test), data.test.offsets,
        data.seen, inner=inner, eta=eta, user_ids=data.user_ids, num_threads=num_threads,
    )


@dataclass(frozen=True)
class PairedDifference:
    """Mean over users of a per-user accuracy difference, with a bootstrap 95 % interval."""

    mean: float
    low: float
    high: float
    users: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def format(self, points: bool = True) -> str:
        f = 100.0 if points else 1.0
        return f"{f * self.mean:+.2f} [{f * self.low:+.2f}, {f * self.high:+.2f}]"


def paired_difference(a: np.ndarray, b: np.ndarray, *, resamples: int = 10_000, seed: int = 0,
                      confidence: float = 0.95) -> PairedDifference:
    """Mean of ``a − b`` over the users where both are defined (per-user accuracies of two
    methods on the SAME users and test pairs), with a percentile bootstrap interval over users.
    ``a``/``b`` may be (users,) or (seeds, users): then each user's difference is first averaged
    over the seeds, and users are resampled."""
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape != b.shape:
        raise ValueError(f"paired_difference needs arrays of one shape, got {a.shape} and {b.shape}")
    diff = (a - b).mean(axis=0)
    diff = diff[~np.isnan(diff)]
    if diff.size == 0:
        nan = float("nan")
        return PairedDifference(nan, nan, nan, 0)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):
        stop = min(resamples, start + 1000)
        idx = rng.integers(0, diff.size, size=(stop - start, diff.size))
        means[start:stop] = diff[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return PairedDifference(float(diff.mean()), float(low), float(high), int(diff.size))


def worst_users_difference(a: np.ndarray, b: np.ndarray, *, fraction: float = WORST_FRACTION, resamples: int = 2000,
                           seed: int = 0) -> PairedDifference:
    """Difference of the worst-``fraction`` means of two methods over the same users, with a
    bootstrap 95 % interval (users resampled jointly for both methods)."""
    a, b = np.atleast_2d(np.asarray(a, np.float64)).mean(0), np.atleast_2d(np.asarray(b, np.float64)).mean(0)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    rng = np.random.default_rng(seed)
    point = worst_mean(a, fraction) - worst_mean(b, fraction)
    boots = np.empty(resamples)
    for r in range(resamples):
        idx = rng.integers(0, a.size, size=a.size)
        boots[r] = worst_mean(a[idx], fraction) - worst_mean(b[idx], fraction)
    low, high = np.quantile(boots, [0.025, 0.975])
    return PairedDifference(float(point), float(low), float(high), int(a.size))


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
    ax.legend(fontsize=8)
    _save(fig, ax, path)


def _save(fig, ax, path) -> None:
    """Grid, tight layout and an atomic PNG write, then the figure is closed."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)


def calibration(probabilities: np.ndarray, *, bins: int = 10) -> Dict:
    """Calibration of predicted P(chosen ≻ rejected) on held-out pairs (chosen is what the user
    preferred). Each pair counts in its more likely orientation: confidence ``max(p, 1 − p)``,
    right when ``p > 0.5``. Returns the expected calibration error (``bins`` equal-width bins of
    confidence on [0.5, 1]), accuracy of all pairs and of the 50 % most confident, and the
    reliability curve (per bin: mean confidence, accuracy, pair count)."""
    p = np.asarray(probabilities, np.float64).ravel()
    confidence = np.maximum(p, 1.0 - p)
    correct = p > 0.5
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    curve, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            conf, acc = float(confidence[mask].mean()), float(correct[mask].mean())
            ece += mask.mean() * abs(conf - acc)
            curve.append([conf, acc, int(mask.sum())])
    top = np.argsort(-confidence, kind="stable")[: max(1, p.size // 2)]
    return {"ece": float(ece), "accuracy": float(correct.mean()), "accuracy_top_half": float(correct[top].mean()),
            "mean_confidence": float(confidence.mean()), "pairs": int(p.size), "curve": curve}


def plot_reliability(curves: Dict[str, Dict], path, *, title: str = "Reliability of P(chosen ≻ rejected)") -> None:
    """Reliability diagram (accuracy against confidence per bin) of :func:`calibration` results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    ax.plot([0.5, 1.0], [0.5, 1.0], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for name, result in curves.items():
        conf, acc = [c[0] for c in result["curve"]], [c[1] for c in result["curve"]]
        ax.plot(conf, acc, marker="o", label=f"{name} (ECE {result['ece']:.3f})")
    ax.set_xlabel("confidence max(p, 1 − p)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7)
    _save(fig, ax, path)
