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



def load_dataset(spec: str, *, seed: int = 42) -> PreferenceData:
    """A dataset by name: ``movielens`` (from the installed recbole package), ``log:PATH``
    (a Parquet/JSONL preference log), ``prism:DIR`` or ``tldr:DIR`` (the official files)."""
    kind, _, path = str(spec).partition(":")
    if kind == "movielens" and not path:
        return load_movielens(seed=seed)
    if kind == "log" and path:
        return read_preference_log(path, seed=seed)
    if kind == "prism" and path:
        return load_prism(path, seed=seed)
    if kind == "tldr" and path:
        return load_tldr(path, seed=seed)
    raise ValueError(
        f"unknown dataset {spec!r}: use 'movielens', 'log:PATH' (Parquet or JSONL with user_id, prompt, "
        f"chosen, rejected), 'prism:DIR' or 'tldr:DIR'"
    )


__all__ = [
    "load_dataset",
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
