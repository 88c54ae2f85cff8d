"""Reddit TL;DR human comparisons (Stiennon et al. 2020, ``summarize_from_feedback``) as the MRM
paper uses them.

Input: a local directory with the released ``comparisons/batch*.json`` files (or the directory
``comparisons`` itself). Each file is JSON lines; a record has ``info`` (``id``, ``post``,
``title``, ``subreddit``), ``summaries`` (two ``{text, policy, note}``), ``choice`` (0 or 1, the
preferred summary), ``worker``, ``split`` and ``batch``.

Construction (the released MRM preprocessing and its dataset builder):

1. Records whose ``split`` is ``"train"`` form the training side; every validation split
   (``"valid1"``, ``"valid2"``, or any other value starting with ``"valid"``) forms the test side.
   Other split values are skipped and counted.
2. Users are the workers present on both sides.
3. Pair: prompt = the post (``info.post``); with ``with_title=True`` it is
   ``"TITLE: {title}\\n\\nPOST: {post}"`` instead. chosen = ``summaries[choice].text``,
   rejected = the other summary.
4. Seen/unseen by SPEC §6 (sorted ids, ``random.Random(seed)``, first half seen).
5. A user's training pairs are shuffled with the user's RNG (:func:`user_rng`) and cut to
   ``seen_train_pairs`` (150, or 100 in the paper's second setting) for seen users and
   ``unseen_train_pairs`` (50) for unseen users; ``None`` keeps all. Test pairs are all of the
   user's validation comparisons, in file order. Each pair is its own group.

Deviations (documented choices):

- Files are read in natural order of the batch number in their name (``batch3`` before
  ``batch10``), records in file order; the official code read them in the order of the dataset
  hub's loading script, which may differ and changes which pairs the per-user shuffle keeps.
- The official prompt is the post alone; ``with_title`` is an option, off by default.
- Records without a post (the CNN/DM articles among the validation batches) are skipped and
  counted (``records_without_post``), as are records whose two summaries are identical
  (``identical_summaries``); this happens before users are chosen, so every user has pairs on
  both sides. ``workers_only_in_one_split`` counts the workers left out by step 2.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Union

from mrm.data.logs import nonblank_lines
from mrm.data.pairs import PreferenceData, build_preference_data, split_seen_users, user_rng

PathLike = Union[str, os.PathLike]


def _batch_files(directory: Path) -> List[Path]:
    root = directory / "comparisons" if (directory / "comparisons").is_dir() else directory
    files = [p for p in root.glob("*.json") if p.is_file()]
    if not files:
        raise FileNotFoundError(f"no comparisons/batch*.json files under {directory}")

    def natural(path: Path):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]

    return sorted(files, key=natural)


def _prompt(info: dict, with_title: bool) -> Optional[str]:
    post = info.get("post")
    if not isinstance(post, str) or not post.strip():
        return None
    if with_title and info.get("title"):
        return f"TITLE: {info['title']}\n\nPOST: {post}"
    return post


def load_tldr(
    directory: PathLike,
    *,
    seed: int = 42,
    seen_train_pairs: Optional[int] = 150,
    unseen_train_pairs: Optional[int] = 50,
    with_title: bool = False,
    name: str = "reddit-tldr",
) -> PreferenceData:
    """Load the TL;DR comparisons from ``directory`` (see the module doc)."""
    directory = Path(directory)
    counts = {"records_without_post": 0, "identical_summaries": 0, "other_splits": 0}
    sides: Dict[str, Dict[str, List[tuple]]] = {"train": {}, "test": {}}
    for path in _batch_files(directory):
        for line, raw in nonblank_lines(path):
            try:
                record = json.loads(raw.decode("utf-8"))
                split = str(record["split"])
                worker = str(record["worker"])
                choice = record["choice"]
                texts = [s["text"] for s in record["summaries"]]
                info = record["info"]
            except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}: line {line} is not a comparison record ({err!r})") from None
            if choice not in (0, 1) or len(texts) != 2 or not all(isinstance(t, str) for t in texts):
                raise ValueError(f"{path}: line {line}: expected two summaries and choice 0 or 1")
            if split == "train":
                side = "train"
            elif split.startswith("valid"):
                side = "test"
            else:
                counts["other_splits"] += 1
                continue
            prompt = _prompt(info, with_title)
            if prompt is None:
                counts["records_without_post"] += 1
                continue
            if texts[0] == texts[1]:
                counts["identical_summaries"] += 1
                continue
            sides[side].setdefault(worker, []).append((prompt, texts[choice], texts[1 - choice]))

    user_ids = sorted(set(sides["train"]) & set(sides["test"]))
    seen = split_seen_users(user_ids, seed)
    train, test = [], []
    for user, is_seen in zip(user_ids, seen):
        pairs = list(sides["train"][user])
        user_rng(seed, user).shuffle(pairs)
        limit = seen_train_pairs if is_seen else unseen_train_pairs
        if limit is not None:
            pairs = pairs[:limit]
        # Every pair is its own group: its position makes the key unique within the user.
        train.append([p + (("train", i),) for i, p in enumerate(pairs)])
        test.append([p + (("test", i),) for i, p in enumerate(sides["test"][user])])
    counts["workers_only_in_one_split"] = len(set(sides["train"]) ^ set(sides["test"]))
    return build_preference_data(user_ids, train, test, seen, name, counts)
