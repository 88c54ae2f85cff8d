"""The on-disk preference log: one row per preference pair, Parquet or JSONL.

Columns (all strings):

- ``user_id``   — who gave the preference (integers are accepted and read as their text, but not mixed with strings in one log);
- ``prompt``    — the prompt; a multi-turn history is the JSON list of its chat messages
  (see :func:`mrm.data.pairs.conversation_prompt`);
- ``chosen``    — the preferred response;
- ``rejected``  — the other response;
- ``split``     — optional, ``"train"`` or ``"test"``;
- ``group_id``  — optional; a user's pairs with the same group id move together when split
  (train/test here, support/query in meta-training), e.g. one conversation. A null group id
  makes the pair a group of its own.

The format follows the file suffix: ``.parquet``/``.pq`` is Parquet, ``.jsonl``/``.ndjson``/
``.json`` is JSON lines (one object per line, UTF-8). Other suffixes are sniffed (Parquet files
start with ``PAR1``).

Reading (:func:`read_preference_log`):

- Rows are validated; a bad row is a ``ValueError`` naming the file, the column and the row
  (0-based, in file order): a missing column, a non-string or empty text, a ``split`` other than
  ``"train"``/``"test"``.
- Skipped, and counted in ``PreferenceData.skipped`` (also logged on the ``mrm.data`` logger;
  ``mrm`` commands print the counts): ``same_text_pairs`` — ``chosen`` equal to ``rejected``
  (no preference to learn from); ``duplicate_pairs`` — a repeat of an earlier row's (user, prompt, chosen, rejected), whatever
  its split, so that one pair never lands in both train and test; ``users_below_min_pairs`` and
  ``pairs_of_users_below_min_pairs`` — users with fewer than ``min_pairs`` pairs left.
- Seen/unseen users follow SPEC §6 (sorted, ``random.Random(seed)``, first half seen).
- Without a ``split`` column each user's groups (or single pairs) are shuffled with the user's
  own RNG (:func:`mrm.data.pairs.user_rng`) and the first ``floor(n_groups * (1 - test_fraction))``
  (at least one, and at most ``n_groups - 1``) are training, the rest test. With the default
  ``test_fraction = 0.5`` this is the official PRISM per-user split. A user whose pairs all
  share one group keeps them for training. With a ``split`` column
  the file's split is used as it is; a user may then have no test pairs.
- Users are listed in sorted order of their id.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from mrm._io import atomic_file
from mrm.data.pairs import PreferenceData, build_preference_data, split_seen_users, user_rng

log = logging.getLogger("mrm.data")

PathLike = Union[str, os.PathLike]

REQUIRED_COLUMNS = ("user_id", "prompt", "chosen", "rejected")
OPTIONAL_COLUMNS = ("split", "group_id")
SPLITS = ("train", "test")


def _log_format(path: Path, for_writing: bool) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if for_writing:
        raise ValueError(f"{path}: cannot tell the log format from the suffix {suffix!r} (use .parquet or .jsonl)")
    with open(path, "rb") as handle:
        return "parquet" if handle.read(4) == b"PAR1" else "jsonl"


def _read_columns(path: Path) -> Dict[str, list]:
    """Column name -> list of Python values, for the known columns present."""
    if _log_format(path, for_writing=False) == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{path}: not a readable Parquet preference log ({err})") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(table.column_names)})")
        return {c: table.column(c).to_pylist() for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in table.column_names}

    records = read_json_lines(path)
    present = set().union(*records) if records else set()
    missing = [c for c in REQUIRED_COLUMNS if c not in present]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    for row, record in enumerate(records):
        lacking = [c for c in REQUIRED_COLUMNS if c not in record]
        if lacking:
            raise ValueError(f"{path}: row {row} lacks column(s) {', '.join(lacking)}")
    columns = {}
    for name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
        if name in present:
            columns[name] = [record.get(name) for record in records]
    return columns


def _validate_rows(source: str, columns: Dict[str, list], same_text_is_error: bool = True) -> None:
    """Raise a ValueError naming the column and row of the first bad value (a pair whose two
    texts are equal too, unless ``same_text_is_error`` is False: readers skip and count those)."""
    n = len(columns["user_id"])
    for name in ("prompt", "chosen", "rejected"):
        for row, value in enumerate(columns[name]):
            if not isinstance(value, str):
                raise ValueError(f"{source}: column {name!r}, row {row}: expected a string, got {type(value).__name__}")
            if not value.strip():
                raise ValueError(f"{source}: column {name!r}, row {row}: empty text")
    for name in ("user_id", "group_id"):
        if name not in columns:
            continue
        for row, value in enumerate(columns[name]):
            if value is None and name == "group_id":
                continue
            if isinstance(value, bool) or not isinstance(value, (str, int, np.integer)):
                raise ValueError(f"{source}: column {name!r}, row {row}: expected a string, got {type(value).__name__}")
            if isinstance(value, str) and not value.strip():
                raise ValueError(f"{source}: column {name!r}, row {row}: empty id")
        # Ids are read as text, so 0 and "0" would become one id: one type per column.
        first_int = next((r for r, v in enumerate(columns[name]) if isinstance(v, (int, np.integer))), None)
        first_str = next((r for r, v in enumerate(columns[name]) if isinstance(v, str)), None)
        if first_int is not None and first_str is not None:
            raise ValueError(
                f"{source}: column {name!r} mixes integer ids (row {first_int}: {columns[name][first_int]!r}) and "
                f"string ids (row {first_str}: {columns[name][first_str]!r}); use one type for every row"
            )
    for row in range(n if same_text_is_error else 0):
        if columns["chosen"][row] == columns["rejected"][row]:
            raise ValueError(f"{source}: row {row} (user {columns['user_id'][row]}): 'chosen' equals 'rejected'")
    if "split" in columns:
        for row, value in enumerate(columns["split"]):
            if value not in SPLITS:
                raise ValueError(f"{source}: column 'split', row {row}: {value!r} is not 'train' or 'test'")


def preference_data_from_rows(
    columns: Dict[str, list],
    *,
    source: str = "rows",
    seed: int = 42,
    test_fraction: float = 0.5,
    min_pairs: int = 2,
    name: str = "log",
) -> PreferenceData:
    """Validate log columns (name -> list, as in the file) and build the dataset (see module doc)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {', '.join(missing)}")
    lengths = {len(columns[c]) for c in columns}
    if len(lengths) > 1:
        raise ValueError(f"{source}: columns have different lengths")
    _validate_rows(source, columns, same_text_is_error=False)

    has_split = "split" in columns
    has_group = "group_id" in columns
    seen_keys = set()
    per_user: Dict[str, List[tuple]] = {}
    duplicates = same_text = 0
    for row in range(len(columns["user_id"])):
        user = str(columns["user_id"][row])
        pair = (columns["prompt"][row], columns["chosen"][row], columns["rejected"][row])
        if pair[1] == pair[2]:
            same_text += 1
            continue
        if (user,) + pair in seen_keys:
            duplicates += 1
            continue
        seen_keys.add((user,) + pair)
        group_id = columns["group_id"][row] if has_group else None
        group = ("row", row) if group_id is None else ("g", str(group_id))
        split = columns["split"][row] if has_split else None
        per_user.setdefault(user, []).append(pair + (group, split))

    small = sorted(u for u, pairs in per_user.items() if len(pairs) < min_pairs)
    skipped = {
        "same_text_pairs": same_text,
        "duplicate_pairs": duplicates,
        "users_below_min_pairs": len(small),
        "pairs_of_users_below_min_pairs": sum(len(per_user[u]) for u in small),
    }
    for user in small:
        del per_user[user]

    user_ids = sorted(per_user)
    train, test = [], []
    for user in user_ids:
        pairs = per_user[user]
        if has_split:
            train.append([p[:4] for p in pairs if p[4] == "train"])
            test.append([p[:4] for p in pairs if p[4] == "test"])
            continue
        groups = list(dict.fromkeys(p[3] for p in pairs))  # first-appearance order
        user_rng(seed, user).shuffle(groups)
        n_train = min(len(groups) - 1, max(1, int(len(groups) * (1.0 - test_fraction))))
        train_groups = set(groups[:n_train])
        # A single group (possible with group_id) goes to training only.
        if len(groups) == 1:
            train_groups = set(groups)
        train.append([p[:4] for p in pairs if p[3] in train_groups])
        test.append([p[:4] for p in pairs if p[3] not in train_groups])

    if any(skipped.values()):
        log.warning("%s: skipped %s", source, ", ".join(f"{k}={v}" for k, v in skipped.items() if v))
    return build_preference_data(user_ids, train, test, split_seen_users(user_ids, seed), name, skipped)


def read_preference_log(
    path: PathLike,
    *,
    seed: int = 42,
    test_fraction: float = 0.5,
    min_pairs: int = 2,
    name: Optional[str] = None,
) -> PreferenceData:
    """Read a Parquet or JSONL preference log into a :class:`PreferenceData` (see module doc).

    ``PreferenceData.skipped`` counts the duplicate pairs and small users left out.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference log {path} does not exist")
    columns = _read_columns(path)
    return preference_data_from_rows(
        columns,
        source=str(path),
        seed=seed,
        test_fraction=test_fraction,
        min_pairs=min_pairs,
        name=name or path.stem,
    )


def preference_log_rows(data: PreferenceData) -> List[Dict[str, str]]:
    """The log rows of a dataset: every train and test pair with its split and group."""
    rows = []
    for split, pairs in (("train", data.train), ("test", data.test)):
        for u, user in enumerate(data.user_ids):
            for p in range(*pairs.user(u).indices(pairs.n_pairs)):
                prompt, chosen = data.texts[pairs.chosen[p]]
                rejected = data.texts[pairs.rejected[p]][1]
                rows.append(
                    {
                        "user_id": user,
                        "prompt": prompt,
                        "chosen": chosen,
                        "rejected": rejected,
                        "split": split,
                        "group_id": str(int(pairs.groups[p])),
                    }
                )
    return rows


def write_preference_log(path: PathLike, rows: Union[PreferenceData, Iterable[Mapping[str, object]]]) -> None:
    """Write rows (mappings with the log's columns, or a whole dataset) as Parquet or JSONL,
    chosen by the suffix, atomically. Rows are validated as on reading."""
    path = Path(path)
    fmt = _log_format(path, for_writing=True)
    rows = preference_log_rows(rows) if isinstance(rows, PreferenceData) else [dict(r) for r in rows]
    names = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if any(c in r for r in rows)]
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if rows and missing:
        raise ValueError(f"{path}: rows lack column(s) {', '.join(missing)}")
    columns = {c: [r.get(c) for r in rows] for c in names}
    if rows:
        _validate_rows(str(path), columns)
    for c in ("user_id", "group_id"):
        if c in columns:
            columns[c] = [None if v is None else str(v) for v in columns[c]]

    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(c, pa.string()) for c in (names or REQUIRED_COLUMNS)])
        table = pa.table({c: columns.get(c, []) for c in schema.names}, schema=schema)
        with atomic_file(path, "wb") as handle:
            pq.write_table(table, handle)
    else:
        with atomic_file(path, "wb") as handle:
            for i in range(len(rows)):
                record = {c: columns[c][i] for c in names if columns[c][i] is not None}
                handle.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")


def read_json_lines(path: Path) -> List[dict]:
    """The JSON objects of a JSON-lines file (blank lines skipped); a bad line is a ValueError
    naming the file and the line."""
    records = []
    for line_number, raw in nonblank_lines(path):
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{path}: line {line_number} is not valid JSON ({err})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {line_number} is not a JSON object")
        records.append(record)
    return records


def nonblank_lines(path: Path) -> Iterator[Tuple[int, bytes]]:
    """``(line number, line)`` of each line of ``path`` that is not blank (numbered from 1)."""
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield line_number, raw
