"""A personalised reward function for TRL's online trainers (GRPOTrainer, RLOOTrainer, OnlineDPO).

TRL calls every entry of ``reward_funcs`` as ``f(prompts=..., completions=..., completion_ids=...,
**columns)`` with every other dataset column (``remove_unused_columns`` defaults to False), and
expects one float (or None) per completion. :class:`PersonalizedReward` reads the user of each
row from a column (``user_id`` by default), embeds (prompt, completion) with the backbone through
its embedding cache, in batches, and scores with the user's weights from a
:class:`~mrm.store.UserStore` — the same computation as ``mrm serve``'s ``/score``
(:class:`mrm.serve.RewardService`). Users the store does not know are scored with w0 and counted
(``unknown_users``, also logged through TRL's ``log_metric`` when the trainer offers it).

Both of TRL's data formats work: *standard* (prompts and completions are strings) and
*conversational* (prompts are lists of ``{"role", "content"}`` messages, completions a list with
the assistant's message(s)). Chat backbones see the conversation as their chat template renders
it; sentence encoders see the prompt's message contents as one text.

Example::

    from trl import GRPOConfig, GRPOTrainer
    from mrm.integrations.trl import PersonalizedReward

    reward = PersonalizedReward("run/best", backbone="minilm", store="users.db")
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=GRPOConfig(...),
                          train_dataset=dataset_with_prompt_and_user_id_columns)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import numpy as np

from mrm.checkpoint import Checkpoint
from mrm.serve.service import RewardService
from mrm.store import AdaptSettings, UserStore

__all__ = ["PersonalizedReward"]

PathLike = Union[str, Path]
_TRAINER_KWARGS = ("trainer_state", "log_extra", "log_metric", "environments")


def _completion_text(completion: Any, index: int) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and all(isinstance(m, dict) and "content" in m for m in completion):
        return "".join(str(m["content"]) for m in completion if m.get("role", "assistant") == "assistant")
    raise TypeError(f"completions[{index}] must be a string or a list of chat messages, got {type(completion).__name__}")


def _prompt_value(prompt: Any, index: int):
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    raise TypeError(f"prompts[{index}] must be a string or a list of chat messages, got {type(prompt).__name__}")


class PersonalizedReward:
    """``reward_funcs`` entry: personalised rewards r_u(completion) from an MRM checkpoint.

    Args:
        checkpoint: a :class:`~mrm.checkpoint.Checkpoint` or its directory.
        backbone: ``minilm`` / ``smollm2`` / a local model path, or a ready
            :class:`~mrm.embed.EmbeddingCache`.
        store: a :class:`~mrm.store.UserStore` or a database path.
        user_column: the dataset column holding the user id.
        cache_dir: the embedding cache (default: :func:`mrm.embed.default_cache_dir`).
        response_only: embed completions without their prompt.
        uncertainty_penalty: β ≥ 0; rewards become ``r − β · std(r)`` under the user's Laplace
            posterior (unknown users: the prior).
        batch_size: texts per backbone forward.
        settings: adaptation settings (default: the checkpoint's).
    """

    def __init__(self, checkpoint: Union[Checkpoint, PathLike], backbone, store: Union[UserStore, PathLike], *,
                 user_column: str = "user_id", cache_dir: Optional[PathLike] = None, response_only: bool = False,
                 uncertainty_penalty: float = 0.0, batch_size: int = 32, settings: Optional[AdaptSettings] = None):
        from mrm.embed import EmbeddingCache, backbone_path, default_cache_dir

        if not isinstance(user_column, str) or not user_column:
            raise ValueError(f"user_column must be a non-empty string, got {user_column!r}")
        if isinstance(backbone, EmbeddingCache):
            embedder = backbone
        else:
            embedder = EmbeddingCache(cache_dir if cache_dir is not None else default_cache_dir(backbone),
                                      backbone_path(backbone), batch_size=batch_size)
        self.service = RewardService(checkpoint, store, embedder=embedder, settings=settings,
                                     response_only=response_only, uncertainty_penalty=uncertainty_penalty)
        self.user_column = user_column
        self.unknown_users = 0
        """Rows scored so far whose user the store did not know (scored with w0)."""
        self.calls = 0
        self.__name__ = "personalized_reward"  # TRL names the reward's log entries after it

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids=None,
                 **columns) -> List[float]:
        if self.user_column not in columns:
            available = sorted(k for k in columns if k not in _TRAINER_KWARGS)
            raise ValueError(f"PersonalizedReward: the batch has no column {self.user_column!r} (columns: {available}); "
                             f"add it to the dataset or pass user_column=")
        users = columns[self.user_column]
        if len(users) != len(completions) or len(prompts) != len(completions):
            raise ValueError(f"PersonalizedReward: {len(prompts)} prompts, {len(completions)} completions and "
                             f"{len(users)} values of {self.user_column!r}: they must match")
        user_ids = [None if u is None else str(u) for u in users]
        texts = [_prompt_value(p, i) for i, p in enumerate(prompts)]
        responses = [_completion_text(c, i) for i, c in enumerate(completions)]
        scores = self.service.score_texts(user_ids, texts, responses)
        unknown = int(np.count_nonzero(scores.fallback))
        self.unknown_users += unknown
        self.calls += 1
        log_metric = columns.get("log_metric")
        if callable(log_metric):
            log_metric("mrm/unknown_user_fraction", unknown / max(1, len(user_ids)))
        return [float(r) for r in scores.rewards]
