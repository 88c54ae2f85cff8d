"""Preference pairs grouped by user: the in-memory form every loader produces.

A dataset is a list of distinct (prompt, response) texts (one embedding row each) and, for each
user, pairs of rows (chosen, rejected). Pairs are CSR over users, like the kernels' data
(SPEC §4): user ``u`` owns pairs ``offsets[u]:offsets[u+1]``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

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
    skipped: Dict[str, int] = field(default_factory=dict)
    """What the loader left out, by reason, with counts (e.g. ``{"duplicate_pairs": 3}``)."""

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


# ---------------------------------------------------------------------------------------------
# The official protocol's seeded choices (SPEC §6), shared by every loader.


def split_seen_users(user_ids: Sequence[str], seed: int = 42) -> np.ndarray:
    """Seen mask (aligned with ``user_ids``): ids sorted, shuffled by ``random.Random(seed)``,
    the first ``n // 2`` seen, the rest unseen (SPEC §6)."""
    order = sorted(user_ids)
    if len(set(order)) != len(order):
        raise ValueError("user_ids must be distinct")
    random.Random(seed).shuffle(order)
    seen_ids = set(order[: len(order) // 2])
    return np.array([u in seen_ids for u in user_ids], dtype=bool)


def user_rng(seed: int, user_id: str) -> random.Random:
    """The per-user RNG of the official code: ``Random(seed + md5(user_id) mod 2**32)``.

    Independent of the process (unlike ``hash``) and of the other users.
    """
    digest = int(hashlib.md5(str(user_id).encode("utf-8")).hexdigest(), 16)
    return random.Random(seed + digest % (2**32))


# ---------------------------------------------------------------------------------------------
# Multi-turn prompts. A text row's prompt is one string; a conversation history is stored as the
# JSON list of its messages. A single user message is stored as its plain text.


def conversation_prompt(messages: Sequence[Dict[str, str]]) -> str:
    """Encode chat messages (``{"role", "content"}``, ending with the user's turn) as a prompt."""
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if not messages:
        raise ValueError("a conversation prompt needs at least one message")
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return json.dumps(messages, ensure_ascii=False)


def prompt_messages(prompt: str) -> List[Dict[str, str]]:
    """The chat messages of a prompt: the decoded history, or one user message."""
    if prompt.startswith('[{"role"'):
        try:
            decoded = json.loads(prompt)
        except ValueError:
            decoded = None
        if isinstance(decoded, list) and decoded and all(
            isinstance(m, dict) and set(m) == {"role", "content"} for m in decoded
        ):
            return decoded
    return [{"role": "user", "content": prompt}]


# ---------------------------------------------------------------------------------------------
# Building a PreferenceData from texts, and few-shot views of one.

PairText = Tuple[str, str, str, object]
"""(prompt, chosen response, rejected response, group key) of one pair."""


def build_preference_data(
    user_ids: Sequence[str],
    train: Sequence[Sequence[PairText]],
    test: Sequence[Sequence[PairText]],
    seen: np.ndarray,
    name: str,
    skipped: Optional[Dict[str, int]] = None,
) -> PreferenceData:
    """Assign text rows and group ids and pack per-user pair lists (one list per user) as CSR.

    Group keys are local to a user: equal keys of one user (train and test alike) share a group
    id; ids are distinct across users.
    """
    table = TextTable()
    group_ids: Dict[Tuple[int, object], int] = {}

    def pack(per_user):
        packed = []
        for u, pairs in enumerate(per_user):
            rows = []
            for prompt, chosen, rejected, group in pairs:
                key = (u, group)
                gid = group_ids.setdefault(key, len(group_ids))
                rows.append((table.row(prompt, chosen), table.row(prompt, rejected), gid))
            packed.append(rows)
        return UserPairs.from_lists(packed)

    train_pairs = pack(train)
    test_pairs = pack(test)
    return PreferenceData(
        texts=table.texts,
        user_ids=list(user_ids),
        train=train_pairs,
        test=test_pairs,
        seen=seen,
        name=name,
        skipped=dict(skipped or {}),
    )


def with_shots(data: PreferenceData, shots: int, users: str = "unseen") -> PreferenceData:
    """Keep only the first ``shots`` training pairs of the chosen users (``"unseen"``, ``"seen"``
    or ``"all"``); a user with fewer keeps all of them. Other users, test pairs and texts are
    unchanged. Loaders shuffle each user's training pairs, so the first ``shots`` are a uniform
    sample of them."""
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 0:
        raise ValueError(f"shots must be a non-negative integer, got {shots!r}")
    masks = {"unseen": ~data.seen, "seen": data.seen, "all": np.ones_like(data.seen)}
    if users not in masks:
        raise ValueError(f"users must be 'unseen', 'seen' or 'all', got {users!r}")
    selected = masks[users]
    counts = data.train.counts()
    keep_counts = np.where(selected, np.minimum(counts, int(shots)), counts)
    index = np.concatenate(
        [np.arange(data.train.offsets[u], data.train.offsets[u] + keep_counts[u]) for u in range(data.n_users)]
        or [np.zeros(0)]
    ).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(keep_counts)]).astype(np.int64)
    train = UserPairs(offsets, data.train.chosen[index], data.train.rejected[index], data.train.groups[index])
    return PreferenceData(
        texts=data.texts,
        user_ids=list(data.user_ids),
        train=train,
        test=data.test,
        seen=data.seen.copy(),
        name=f"{data.name} ({shots}-shot {users})",
        skipped=dict(data.skipped),
    )
