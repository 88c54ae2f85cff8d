"""The reward service without HTTP: embeddings → φ → personal weights from the store → rewards.

:class:`RewardService` is what ``mrm serve`` (:mod:`mrm.serve.app`) and the TRL reward function
(:mod:`mrm.integrations.trl`) call; it needs numpy only, plus torch/transformers when texts must
be embedded (a backbone). Scoring reads a consistent snapshot of the users' weights; users the
store does not know get the weights :func:`mrm.store.adapt_online` gives a user without state or
pairs (w0) and are flagged ``fallback``. Feedback goes to :meth:`mrm.store.UserStore.apply_feedback`
(one transaction per call, committed before the call returns).

Rewards: ``r_u(e) = φ(e) · softmax(w_u)`` (SPEC §1). With ``uncertainty_penalty = β > 0`` the
reward is ``r − β · sqrt(var_r)``, ``var_r = (J f)ᵀ Σ_u (J f)`` (SPEC §7), ``f = φ(e)``,
``J = diag(p) − p pᵀ``, Σ_u the user's stored Laplace covariance (an unknown user's: the prior
covariance ``I / prior_precision``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from mrm.checkpoint import Checkpoint
from mrm.store import AdaptSettings, Update, UserStore, adapt_online, check_user_id, laplace_covariance

__all__ = ["RewardService", "Scores"]

PathLike = Union[str, Path]


@dataclass(frozen=True)
class Scores:
    rewards: np.ndarray
    """(N,) float64 personal rewards (with the uncertainty penalty, if any)."""
    raw_rewards: np.ndarray
    """(N,) rewards without the penalty."""
    stddev: Optional[np.ndarray]
    """(N,) reward standard deviations (only with an uncertainty penalty)."""
    fallback: np.ndarray
    """(N,) bool: the row's user is unknown to the store (scored with w0)."""
    versions: np.ndarray
    """(N,) int64: the weights' version (0 for fallback rows)."""


def _softmax(w: np.ndarray) -> np.ndarray:
    p = np.exp(w - w.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


class RewardService:
    """Personalised rewards from a checkpoint and a user store.

    Args:
        checkpoint: a :class:`~mrm.checkpoint.Checkpoint` or its directory.
        store: a :class:`~mrm.store.UserStore` or a database path (created with the checkpoint's K).
        embedder: an :class:`~mrm.embed.EmbeddingCache` (or anything with ``embed(texts,
            progress=)`` and ``kind``) for text inputs; None: embeddings only.
        settings: online-adaptation settings (default: the checkpoint's, see
            :meth:`AdaptSettings.from_checkpoint`).
        response_only: embed responses without their prompt.
        uncertainty_penalty: β ≥ 0 (see the module doc).
        num_threads: kernel threads for adaptation.
    """

    def __init__(self, checkpoint: Union[Checkpoint, PathLike], store: Union[UserStore, PathLike], *,
                 embedder=None, settings: Optional[AdaptSettings] = None, response_only: bool = False,
                 uncertainty_penalty: float = 0.0, num_threads: Optional[int] = 1):
        self.checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.load(checkpoint)
        self.store = store if isinstance(store, UserStore) else UserStore(store, self.checkpoint.num_bases)
        if self.store.num_bases != self.checkpoint.num_bases:
            raise ValueError(f"the user store holds K = {self.store.num_bases} weights but the checkpoint has "
                             f"K = {self.checkpoint.num_bases} base rewards")
        self.embedder = embedder
        self.settings = (settings or AdaptSettings.from_checkpoint(self.checkpoint)).validate()
        self.response_only = bool(response_only)
        if not (isinstance(uncertainty_penalty, (int, float)) and np.isfinite(uncertainty_penalty)
                and uncertainty_penalty >= 0):
            raise ValueError(f"uncertainty_penalty must be a finite number >= 0, got {uncertainty_penalty!r}")
        self.uncertainty_penalty = float(uncertainty_penalty)
        self.num_threads = num_threads
        self.w0 = self.checkpoint.w0.astype(np.float64)
        self._embed_lock = threading.Lock()  # one backbone forward at a time
        self.unknown_users_scored = 0
        """How many scored rows had a user the store did not know (counted, scored with w0)."""

    # ---- inputs ----------------------------------------------------------------------------------

    @property
    def input_dim(self) -> int:
        return self.checkpoint.input_dim

    def check_embeddings(self, embeddings, name: str = "embeddings") -> np.ndarray:
        array = np.asarray(embeddings, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != self.input_dim:
            raise ValueError(f"{name} must have shape (N, {self.input_dim}) (the checkpoint's input_dim), "
                             f"got {array.shape}")
        if not np.isfinite(array).all():
            row = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
            raise ValueError(f"{name}[{row}] contains a non-finite value")
        return array

    def embed(self, prompts: Sequence[Any], responses: Sequence[str]) -> np.ndarray:
        """Embeddings (N, D) of (prompt, response) texts through the backbone and its cache."""
        if self.embedder is None:
            raise ValueError("this service has no backbone: send embeddings instead of texts "
                             "(or start it with a backbone)")
        if len(prompts) != len(responses):
            raise ValueError(f"prompts has {len(prompts)} entries but responses has {len(responses)}")
        texts = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            if not isinstance(response, str):
                raise TypeError(f"responses[{i}] must be a string, got {type(response).__name__}")
            if self.response_only:
                prompt = [] if getattr(self.embedder, "kind", "encoder") == "causal" else ""
            elif prompt is None:
                prompt = ""
            texts.append((prompt, response))
        with self._embed_lock:
            embeddings = self.embedder.embed(texts, progress=False)
        if embeddings.shape[1] != self.input_dim:
            raise ValueError(f"the backbone gives {embeddings.shape[1]}-d embeddings but the checkpoint expects "
                             f"{self.input_dim}-d ones")
        return embeddings.astype(np.float64)

    # ---- weights ---------------------------------------------------------------------------------

    def user_weights(self, user_ids: Sequence[Optional[str]]):
        """(weights (U, K), fallback (U,), versions (U,), covariances (U, K, K) or None) of
        distinct users; None or unknown ids get the weights of a user without state (w0)."""
        ids = [u for u in user_ids if u is not None]
        states = self.store.get_many(ids) if ids else {}
        missing = [u for u in user_ids if u is None or u not in states]
        start_of_unknown = None
        if missing:
            # unknown users go through the one adaptation function: no state, no pairs
            weights, _, _ = adapt_online(self.settings, self.w0, [None], [np.zeros((0, len(self.w0)))],
                                         num_threads=self.num_threads)
            start_of_unknown = weights[0]
        k = len(self.w0)
        weights = np.empty((len(user_ids), k))
        fallback = np.zeros(len(user_ids), dtype=bool)
        versions = np.zeros(len(user_ids), dtype=np.int64)
        covariances = np.empty((len(user_ids), k, k)) if self.uncertainty_penalty > 0 else None
        prior_cov = None
        for row, user in enumerate(user_ids):
            state = states.get(user) if user is not None else None
            if state is None:
                weights[row], fallback[row] = start_of_unknown, True
            else:
                weights[row], versions[row] = state.weights, state.version
            if covariances is not None:
                if state is not None and state.posterior is not None:
                    covariances[row] = state.posterior
                else:
                    if prior_cov is None:
                        prior_cov = (self.settings.prior_covariance(k) if self.settings.is_map else
                                     laplace_covariance(weights[row], np.zeros((0, k)), self.settings.prior_precision))
                    covariances[row] = prior_cov
        return weights, fallback, versions, covariances

    # ---- scoring ---------------------------------------------------------------------------------

    def score_embeddings(self, user_ids: Sequence[Optional[str]], embeddings) -> Scores:
        """Rewards of rows ``embeddings`` (N, D) for the users ``user_ids`` (N,) (None: w0)."""
        embeddings = self.check_embeddings(embeddings)
        if len(user_ids) != len(embeddings):
            raise ValueError(f"user_ids has {len(user_ids)} entries but there are {len(embeddings)} embeddings")
        for i, user in enumerate(user_ids):
            if user is not None:
                check_user_id(user, f"user_ids[{i}]")
        distinct = list(dict.fromkeys(user_ids))
        index = {u: i for i, u in enumerate(distinct)}
        rows = np.array([index[u] for u in user_ids], dtype=np.int64)
        weights, fallback, versions, covariances = self.user_weights(distinct)
        features = self.checkpoint.features(embeddings)  # (N, K) in the checkpoint's dtype
        features = features.astype(np.float64)
        linear = self.checkpoint.weight_map == "linear"
        p = (weights if linear else _softmax(weights))[rows]
        raw = (features * p).sum(-1)
        stddev = None
        rewards = raw
        if covariances is not None:
            # J f: f for linear weights; with J = diag(p) − p pᵀ (symmetric): p ⊙ f − p (p · f)
            jf = features if linear else p * features - p * (p * features).sum(-1, keepdims=True)
            var = np.einsum("ni,nij,nj->n", jf, covariances[rows], jf)
            stddev = np.sqrt(np.maximum(var, 0.0))
            rewards = raw - self.uncertainty_penalty * stddev
        self.unknown_users_scored += int(fallback[rows].sum())
        return Scores(rewards=rewards, raw_rewards=raw, stddev=stddev, fallback=fallback[rows], versions=versions[rows])

    def score_texts(self, user_ids: Sequence[Optional[str]], prompts: Sequence[Any], responses: Sequence[str]) -> Scores:
        return self.score_embeddings(user_ids, self.embed(prompts, responses))

    # ---- feedback --------------------------------------------------------------------------------

    def differences(self, chosen_embeddings, rejected_embeddings) -> np.ndarray:
        """φ(e_c) − φ(e_r) (N, K) of pairs given as embeddings."""
        chosen = self.check_embeddings(chosen_embeddings, "chosen_embeddings")
        rejected = self.check_embeddings(rejected_embeddings, "rejected_embeddings")
        if chosen.shape != rejected.shape:
            raise ValueError(f"chosen_embeddings has {len(chosen)} rows but rejected_embeddings has {len(rejected)}")
        both = self.checkpoint.features(np.concatenate([chosen, rejected])).astype(np.float64)
        return both[: len(chosen)] - both[len(chosen):]

    def text_differences(self, prompts: Sequence[Any], chosen: Sequence[str], rejected: Sequence[str]) -> np.ndarray:
        if not (len(prompts) == len(chosen) == len(rejected)):
            raise ValueError("prompts, chosen and rejected must have the same length")
        embeddings = self.embed(list(prompts) * 2, list(chosen) + list(rejected))
        n = len(chosen)
        return self.differences(embeddings[:n], embeddings[n:])

    def feedback(self, items: Sequence[Tuple[str, np.ndarray]]) -> List[Update]:
        """Apply (user_id, pair differences (N, K)) items in one committed transaction."""
        return self.store.apply_feedback(items, self.settings, self.w0, num_threads=self.num_threads)

    def user(self, user_id: str) -> Optional[Dict[str, Any]]:
        state = self.store.get(user_id)
        return None if state is None else state.to_json()
