"""Preference pairs grouped by user: the in-memory form every loader produces.

A dataset is a list of distinct (prompt, response) texts (one embedding row each) and, for each
user, pairs of rows (chosen, rejected). Pairs are CSR over users, like the kernels' data
(SPEC §4): user ``u`` owns pairs ``offsets[u]:offsets[u+1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np


@dataclass
class UserPairs:
    """Pairs of embedding rows grouped by user (CSR)."""

    offsets: np.ndarray
    """int64 (U + 1,): user ``u`` owns pairs ``offsets[u]:offsets[u+1]``."""
    chosen: np.ndarray
    """int64 (P,): embedding row of the preferred response."""
    rejected: np.ndarray
    """int64 (P,): embedding row of the other response."""
    groups: np.ndarray
    """int64 (P,): pairs sharing a group move together when a user's pairs are split into
    support and query (PRISM: one conversation). Loaders without groups give every pair its own."""

    def __post_init__(self):
        self.offsets = np.ascontiguousarray(self.offsets, dtype=np.int64)
        self.chosen = np.ascontiguousarray(self.chosen, dtype=np.int64)
        self.rejected = np.ascontiguousarray(self.rejected, dtype=np.int64)
        self.groups = np.ascontiguousarray(self.groups, dtype=np.int64)
        n = len(self.chosen)
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0 or self.offsets[-1] != n:
            raise ValueError(f"offsets must start at 0 and end at the pair count ({n})")
        if np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must be non-decreasing")
        if len(self.rejected) != n or len(self.groups) != n:
            raise ValueError("chosen, rejected and groups must have one entry per pair")

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_pairs(self) -> int:
        return len(self.chosen)

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def user(self, u: int) -> slice:
        return slice(int(self.offsets[u]), int(self.offsets[u + 1]))

    def check_rows(self, n_rows: int, what: str = "pairs") -> None:
        """Every chosen/rejected index must address one of ``n_rows`` embedding rows."""
        for name, idx in (("chosen", self.chosen), ("rejected", self.rejected)):
            bad = np.flatnonzero((idx < 0) | (idx >= n_rows))
            if bad.size:
                p = int(bad[0])
                u = int(np.searchsorted(self.offsets, p, side="right") - 1)
                raise ValueError(
                    f"{what}: {name} index {int(idx[p])} of pair {p} (user {u}) is out of range "
                    f"for {n_rows} embedding rows"
                )

    def select_users(self, users: Sequence[int]) -> "UserPairs":
        """The pairs of the given users, in that order."""
        users = np.asarray(users, dtype=np.int64)
        counts = self.counts()[users]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        index = np.concatenate([np.arange(self.offsets[u], self.offsets[u + 1]) for u in users]) if len(users) else np.zeros(0, np.int64)
        index = index.astype(np.int64)
        return UserPairs(offsets, self.chosen[index], self.rejected[index], self.groups[index])

    @staticmethod
    def from_lists(per_user: Sequence[Sequence[Tuple[int, int, int]]]) -> "UserPairs":
        """From one list of (chosen, rejected, group) triples per user."""
        counts = [len(p) for p in per_user]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        flat = [t for p in per_user for t in p]
        arr = np.array(flat, dtype=np.int64).reshape(-1, 3)
        return UserPairs(offsets, arr[:, 0], arr[:, 1], arr[:, 2])


@dataclass
class PreferenceData:
    """A whole dataset: texts to embed, and every user's train and test pairs.

    ``train`` and ``test`` list the same users in the same order. ``seen[u]`` marks the users
    that meta-training sees; the others are held out (unseen) and only adapted at evaluation.
    """

    texts: List[Tuple[str, str]]
    """(prompt, response) of each embedding row."""
    user_ids: List[str]
    train: UserPairs
    test: UserPairs
    seen: np.ndarray
    name: str = "dataset"

    def __post_init__(self):
        self.seen = np.asarray(self.seen, dtype=bool)
        n = len(self.user_ids)
        for what, pairs in (("train", self.train), ("test", self.test)):
            if pairs.n_users != n:
                raise ValueError(f"{what} pairs describe {pairs.n_users} users but there are {n} user ids")
            pairs.check_rows(len(self.texts), what)
        if self.seen.shape != (n,):
            raise ValueError(f"seen must have one entry per user ({n}), got shape {self.seen.shape}")

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def summary(self) -> str:
        return (
            f"{self.name}: {self.n_users} users ({int(self.seen.sum())} seen, {int((~self.seen).sum())} unseen), "
            f"{self.train.n_pairs} train + {self.test.n_pairs} test pairs, {len(self.texts)} distinct texts"
        )


class TextTable:
    """Assigns one embedding row per distinct (prompt, response)."""

    def __init__(self):
        self.rows: Dict[Tuple[str, str], int] = {}
        self.texts: List[Tuple[str, str]] = []

    def row(self, prompt: str, response: str) -> int:
        key = (prompt, response)
        found = self.rows.get(key)
        if found is None:
            found = self.rows[key] = len(self.texts)
            self.texts.append(key)
        return found
