"""Preference data: the in-memory pair layout, the on-disk log format and dataset loaders."""

from mrm.data.logs import read_preference_log, write_preference_log
from mrm.data.movielens import load_movielens
from mrm.data.pairs import (
    PreferenceData,
    TextTable,
    UserPairs,
    build_preference_data,
    conversation_prompt,
    prompt_messages,
    split_seen_users,
    user_rng,
    with_shots,
)
from mrm.data.prism import load_prism
from mrm.data.tldr import load_tldr

__all__ = [
    "PreferenceData",
    "TextTable",
    "UserPairs",
    "build_preference_data",
    "conversation_prompt",
    "load_movielens",
    "load_prism",
    "load_tldr",
    "prompt_messages",
    "read_preference_log",
    "split_seen_users",
    "user_rng",
    "with_shots",
    "write_preference_log",
]
