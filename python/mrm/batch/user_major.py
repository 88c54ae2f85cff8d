"""Building user-major logs: :func:`user_major_table` from numpy CSR,
:func:`preference_data_to_user_major` from a text dataset and its embeddings, and
:func:`pairs_to_user_major` from a per-pair table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mrm._io import atomic_file
from mrm.batch.arrow import CANDIDATE_COLUMNS, PAIR_COLUMNS, USER, is_list, nested_list_array
from mrm.batch.parquet import DEFAULT_BATCH_USERS, WRITE_OPTIONS, check_batch_users, check_output, open_parquet, parquet_files

PathLike = Union[str, Path]

def user_major_table(user_ids: Sequence[str], offsets, chosen=None, rejected=None, *, kind: str = "features",
                     candidates=None, candidate_offsets=None) -> pa.Table:
    """A user-major table from numpy CSR: pairs ``chosen``/``rejected`` (N, W) grouped by
    ``offsets`` (U + 1,), and/or ``candidates`` (M, W) grouped by ``candidate_offsets``.
    ``kind`` is ``"features"`` (W = K) or ``"embeddings"`` (W = D)."""
    if kind not in PAIR_COLUMNS:
        raise ValueError(f"kind must be 'features' or 'embeddings', got {kind!r}")
    arrays = {USER: pa.array(list(user_ids), pa.string())}
    if chosen is not None:
        chosen, rejected = np.asarray(chosen), np.asarray(rejected)
        if chosen.shape != rejected.shape or chosen.ndim != 2:
            raise ValueError(f"chosen and rejected must be (N, W) arrays of one shape, got {chosen.shape} and {rejected.shape}")
        offsets = np.asarray(offsets, dtype=np.int64)
        chosen_column, rejected_column = PAIR_COLUMNS[kind]
        arrays[chosen_column] = nested_list_array(chosen, offsets)
        arrays[rejected_column] = nested_list_array(rejected, offsets)
    if candidates is not None:
        arrays[CANDIDATE_COLUMNS[kind]] = nested_list_array(np.asarray(candidates),
                                                            np.asarray(candidate_offsets, dtype=np.int64))
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) != 1:
        raise ValueError(f"user_ids and offsets describe different user counts: {sorted(lengths)}")
    return pa.table(arrays)


def preference_data_to_user_major(
    data,
    embeddings,
    output: PathLike,
    *,
    row_group_users: int = DEFAULT_BATCH_USERS,
    overwrite: bool = False,
) -> Path:
    """Write a text dataset as user-major logs of response embeddings, for :func:`adapt_users`
    and :func:`score` with a checkpoint whose ``input_dim`` is the embedding width.

    ``data`` is a :class:`mrm.data.PreferenceData` (any loader, e.g. ``load_dataset("log:…")``)
    and ``embeddings`` (rows, D) its texts' embeddings (``mrm.embed.embed_dataset``; the
    ``mrm to-user-major`` command does both). Every pair of a user is written, its train pairs
    then its test pairs: in production both are the user's feedback. Users keep the dataset's
    order. Written atomically, ``row_group_users`` users per row group.
    """
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(data.texts):
        raise ValueError(
            f"embeddings must have shape ({len(data.texts)}, D), one row per text of the dataset, "
            f"got {embeddings.shape}"
        )
    if not np.issubdtype(embeddings.dtype, np.floating) or not np.isfinite(embeddings).all():
        raise ValueError("embeddings must be finite floats")
    check_batch_users(row_group_users)
    output = Path(output)
    check_output(output, overwrite)
    train, test = data.train, data.test
    n_train, n_test = np.diff(train.offsets), np.diff(test.offsets)
    offsets = np.concatenate([[0], np.cumsum(n_train + n_test)]).astype(np.int64)
    # position of every train pair, then every test pair, in the user-major order
    position = np.concatenate([
        np.repeat(offsets[:-1] - train.offsets[:-1], n_train) + np.arange(int(train.offsets[-1])),
        np.repeat(offsets[:-1] + n_train - test.offsets[:-1], n_test) + np.arange(int(test.offsets[-1])),
    ])
    chosen = np.empty(int(offsets[-1]), np.int64)
    rejected = np.empty(int(offsets[-1]), np.int64)
    chosen[position] = np.concatenate([train.chosen, test.chosen])
    rejected[position] = np.concatenate([train.rejected, test.rejected])
    none = np.zeros((0, embeddings.shape[1]), embeddings.dtype)
    schema = user_major_table([], [0], none, none, kind="embeddings").schema
    with atomic_file(output) as handle, pq.ParquetWriter(handle, schema, **WRITE_OPTIONS) as writer:
        for lo in range(0, len(data.user_ids), row_group_users):
            hi = min(lo + row_group_users, len(data.user_ids))
            rows = slice(int(offsets[lo]), int(offsets[hi]))
            writer.write_table(user_major_table(data.user_ids[lo:hi], offsets[lo:hi + 1] - offsets[lo],
                                                embeddings[chosen[rows]], embeddings[rejected[rows]],
                                                kind="embeddings"))
    return output


def _read_pair_table(pairs) -> pa.Table:
    if isinstance(pairs, pa.Table):
        return pairs
    if isinstance(pairs, (str, Path)):
        tables = []
        for f in parquet_files(pairs):
            try:
                tables.append(open_parquet(f).read())
            except (pa.ArrowException, OSError) as exc:
                raise ValueError(f"{f} could not be read (corrupt or truncated Parquet?): {exc}") from None
        return pa.concat_tables(tables)
    if hasattr(pairs, "to_dict") and hasattr(pairs, "columns"):  # a pandas DataFrame
        return pa.Table.from_pandas(pairs, preserve_index=False)
    raise TypeError(f"pairs must be a pyarrow Table, a pandas DataFrame or a Parquet path, got {type(pairs).__name__}")


def pairs_to_user_major(
    pairs,
    output: PathLike,
    *,
    kind: str = "features",
    user_column: str = USER,
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    row_group_users: int = DEFAULT_BATCH_USERS,
    overwrite: bool = False,
) -> Path:
    """Group a per-pair table (one row per pair: user id, chosen vector, rejected vector) into the
    user-major layout and write it to ``output`` atomically.

    ``kind`` says what the vectors are: ``"features"`` (K-dim φ outputs) or ``"embeddings"``
    (D-dim). Users come out sorted by id; a user's pairs keep their input order. The per-pair
    table is held in memory (this is a one-off conversion, not a streaming job).
    """
    if kind not in PAIR_COLUMNS:
        raise ValueError(f"kind must be 'features' or 'embeddings', got {kind!r}")
    output = Path(output)
    check_output(output, overwrite)
    table = _read_pair_table(pairs)
    for column in (user_column, chosen_column, rejected_column):
        if column not in table.column_names:
            raise ValueError(f"the pair table has no column {column!r} (has {table.column_names})")
    users = table.column(user_column)
    if users.null_count:
        raise ValueError(f"column {user_column!r} has null user ids")
    users = users.cast(pa.string())
    vectors = {}
    width = None
    for column in (chosen_column, rejected_column):
        array = table.column(column)
        if not is_list(array.type) or not pa.types.is_floating(array.type.value_type):
            raise ValueError(f"column {column!r} must hold one float vector per pair (list<float>), got {array.type}")
        if array.null_count:
            raise ValueError(f"column {column!r} has null vectors")
        lengths = pc.unique(pc.list_value_length(array)).to_pylist()
        if len(lengths) != 1 or (width is not None and lengths != [width]):
            raise ValueError(f"column {column!r}: every vector must have the same length, found lengths {sorted(lengths)}"
                             + (f" (the other column has {width})" if width is not None else ""))
        width = lengths[0]
        vectors[column] = array
    n = table.num_rows
    keyed = pa.table({"user": users, "row": pa.array(np.arange(n, dtype=np.int64))})
    order = pc.sort_indices(keyed, sort_keys=[("user", "ascending"), ("row", "ascending")])
    sorted_users = users.take(order)
    codes = sorted_users.combine_chunks().dictionary_encode().indices.to_numpy(zero_copy_only=False) if n else np.zeros(0)
    starts = np.concatenate([[0], np.flatnonzero(codes[1:] != codes[:-1]) + 1]) if n else np.zeros(0, np.int64)
    offsets = np.append(starts, n).astype(np.int64)
    index_type = np.int32 if n < 2**31 else np.int64
    columns = {USER: sorted_users.combine_chunks().take(pa.array(starts, pa.int64())) if n else pa.array([], pa.string())}
    for column, target in zip((chosen_column, rejected_column), PAIR_COLUMNS[kind]):
        inner = vectors[column].take(order).combine_chunks()
        columns[target] = pa.ListArray.from_arrays(pa.array(offsets.astype(index_type)), inner)
    result = pa.table(columns)
    with atomic_file(output) as handle:
        pq.write_table(result, handle, row_group_size=max(1, int(row_group_users)), **WRITE_OPTIONS)
    return output
