"""Arrow record batches of user-major logs as numpy CSR: the column names, user ids, the
list<list<float>> columns as (rows, offsets), :class:`Features` (one pair or candidate column
set, with φ applied to embeddings), the errors that name the user, and numpy CSR back to Arrow
list arrays.

Internal API of :mod:`mrm.batch`: ``USER``, ``PAIR_COLUMNS``, ``CANDIDATE_COLUMNS``,
:func:`as_checkpoint`, :func:`batch_user_ids`, :func:`is_list`, :func:`pick_source`,
:class:`Features`, :func:`explained`, :func:`list_array`, :func:`nested_list_array` and
:func:`check_unique`.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mrm.batch.parquet import batch_source
from mrm.checkpoint import Checkpoint

PathLike = Union[str, Path]

USER = "user_id"
PAIR_COLUMNS = {
    "features": ("chosen_features", "rejected_features"),
    "embeddings": ("chosen_embeddings", "rejected_embeddings"),
}
CANDIDATE_COLUMNS = {"features": "candidate_features", "embeddings": "candidate_embeddings"}


def as_checkpoint(checkpoint: Union[Checkpoint, PathLike]) -> Checkpoint:
    return checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.load(checkpoint)


def batch_user_ids(batch: pa.RecordBatch) -> pa.Array:
    column = batch.column(batch.schema.get_field_index(USER))
    if pa.types.is_dictionary(column.type):  # dictionary-encoded strings (pandas categoricals, Spark)
        column = column.dictionary_decode()
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ValueError(f"column {USER!r} must be a string column, got {column.type}")
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        path, first_row = batch_source(batch)
        where = f"row {first_row + row} of the file" if path is not None else f"row {row} of the batch"
        after = f", after user {column[row - 1].as_py()!r}" if row > 0 else ""
        raise ValueError(f"column {USER!r} has a null value ({where}{after})")
    return column.cast(pa.string())


def is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def pick_source(schema: pa.Schema, choices: dict, what: str, required: bool = True) -> Optional[str]:
    """Which form (``features`` or ``embeddings``) ``schema`` carries for ``what``."""
    for kind, columns in choices.items():
        columns = (columns,) if isinstance(columns, str) else columns
        if all(c in schema.names for c in columns):
            return kind
    if required:
        wanted = " or ".join(str(list(c) if not isinstance(c, str) else [c]) for c in choices.values())
        raise ValueError(f"the logs have no {what} columns: expected {wanted} (found {schema.names})")
    return None


def _value_dtype(schema: pa.Schema, column: str) -> np.dtype:
    t = schema.field(column).type
    if not (is_list(t) and is_list(t.value_type)):
        raise ValueError(f"column {column!r} must be list<list<float>> (user → rows → vector), got {t}")
    inner = t.value_type.value_type
    if not pa.types.is_floating(inner):
        raise ValueError(f"column {column!r} must hold floats, got {inner}")
    return np.dtype(np.float64) if pa.types.is_float64(inner) else np.dtype(np.float32)


def _nested_rows(batch: pa.RecordBatch, column: str, user_ids: pa.Array, width: int, width_name: str,
                 dtype: np.dtype, check_finite: bool) -> Tuple[np.ndarray, np.ndarray]:
    """A list<list<float>> column as CSR: rows (N, width) and per-user offsets (U + 1,).

    ``check_finite`` also rejects NaN and infinite values, naming the user and pair. The jobs
    leave it to the native kernels, which check every value anyway, and ask for it only to
    explain a kernel error (see :func:`explained`)."""
    array = batch.column(batch.schema.get_field_index(column))
    if not (is_list(array.type) and is_list(array.type.value_type)):
        raise ValueError(f"column {column!r} must be list<list<float>> (user → rows → vector), got {array.type}")
    if array.null_count:
        row = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"column {column!r}: user {user_ids[row].as_py()!r} has a null list")
    if pa.types.is_fixed_size_list(array.type):
        raise ValueError(f"column {column!r}: the outer list must be variable-length (one list per user)")
    outer = np.asarray(array.offsets, dtype=np.int64)
    inner = array.values.slice(int(outer[0]), int(outer[-1] - outer[0]))
    offsets = outer - outer[0]

    def user_of(row: int) -> str:
        return user_ids[int(np.searchsorted(offsets, row, side="right") - 1)].as_py()

    if inner.null_count:
        row = int(np.flatnonzero(inner.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"column {column!r}: user {user_of(row)!r} has a null vector")
    if pa.types.is_fixed_size_list(inner.type):
        lengths = np.full(len(inner), inner.type.list_size, dtype=np.int64)
        flat = inner.flatten()
    else:
        inner_offsets = np.asarray(inner.offsets, dtype=np.int64)
        lengths = np.diff(inner_offsets)
        flat = inner.values.slice(int(inner_offsets[0]), int(inner_offsets[-1] - inner_offsets[0]))
    bad = np.flatnonzero(lengths != width)
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"column {column!r}: user {user_of(row)!r} has a {int(lengths[row])}-dim vector, but the "
            f"checkpoint has {width_name} = {width}"
        )
    if not pa.types.is_floating(flat.type):
        raise ValueError(f"column {column!r} must hold floats, got {flat.type}")
    values = flat.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(len(inner), width)
    if not check_finite:
        return values, offsets
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        user = user_of(row)
        raise ValueError(
            f"column {column!r}: user {user!r} has a NaN, infinite or null value "
            f"(pair/response {row - int(offsets[np.searchsorted(offsets, row, side='right') - 1])} of that user)"
        )
    return values, offsets


class Features:
    """Turns one record batch into per-user CSR feature rows (K-dim), applying φ to embeddings."""

    def __init__(self, checkpoint: Checkpoint, schema: pa.Schema, kind: str, columns: Sequence[str]):
        self.checkpoint = checkpoint
        self.kind = kind
        self.columns = list(columns)
        if kind == "features":
            dtypes = {_value_dtype(schema, c) for c in columns}
            self.dtype = np.dtype(np.float64) if np.dtype(np.float64) in dtypes else np.dtype(np.float32)
            self.width, self.width_name = checkpoint.num_bases, "K (num_bases)"
        else:
            for c in columns:
                _value_dtype(schema, c)
            self.dtype = checkpoint.dtype
            self.width, self.width_name = checkpoint.input_dim, "D (input_dim)"

    def rows(self, batch: pa.RecordBatch, column: str, user_ids: pa.Array,
             check_finite: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        # Embeddings are checked before φ, which can map an infinite value to a finite one
        # (tanh, ReLU); the kernels check features themselves.
        check_finite = check_finite or self.kind == "embeddings"
        values, offsets = _nested_rows(batch, column, user_ids, self.width, self.width_name, self.dtype, check_finite)
        if self.kind == "embeddings":
            values = np.ascontiguousarray(self.checkpoint.features(values), dtype=self.dtype)
        return values, offsets

    def pairs(self, batch: pa.RecordBatch, user_ids: pa.Array):
        """(chosen (N, K), rejected (N, K), offsets (U + 1,)) of one batch."""
        chosen_column, rejected_column = self.columns
        chosen, offsets = self.rows(batch, chosen_column, user_ids)
        rejected, rejected_offsets = self.rows(batch, rejected_column, user_ids)
        if not np.array_equal(offsets, rejected_offsets):
            u = int(np.flatnonzero(np.diff(offsets) != np.diff(rejected_offsets))[0])
            raise ValueError(
                f"user {user_ids[u].as_py()!r} has {int(offsets[u + 1] - offsets[u])} entries in "
                f"{chosen_column!r} but {int(rejected_offsets[u + 1] - rejected_offsets[u])} in {rejected_column!r}"
            )
        return chosen, rejected, offsets

    def check_finite(self, batch: pa.RecordBatch, user_ids: pa.Array) -> None:
        """Raises a ValueError naming the column, user and pair of the first non-finite value."""
        for column in self.columns:
            self.rows(batch, column, user_ids, check_finite=True)


@contextmanager
def explained(readers, batch: pa.RecordBatch, user_ids: pa.Array, pairs=None):
    """Re-raises a kernel error caused by a non-finite input value as one that names the column,
    the user id and the pair; with ``pairs`` (the reader, chosen − rejected, offsets), a
    difference that overflows is named so too. Any other error has its batch user indices
    replaced by user ids."""
    try:
        yield
    except ValueError as exc:
        for reader in readers:
            if reader is not None:
                reader.check_finite(batch, user_ids)
        if pairs is not None:
            reader, differences, offsets = pairs
            finite = np.isfinite(differences).all(axis=1)
            if not finite.all():
                row = int(np.flatnonzero(~finite)[0])
                u = int(np.searchsorted(offsets, row, side="right") - 1)
                chosen, rejected = reader.columns
                raise ValueError(
                    f"columns {chosen!r} - {rejected!r}: user {user_ids[u].as_py()!r}, pair {row - int(offsets[u])}: "
                    f"the difference overflows {differences.dtype} (finite values too far apart)"
                ) from None

        def named(match: "re.Match") -> str:
            u = int(match.group(1))
            return f"user {user_ids[u].as_py()!r}" if u < len(user_ids) else match.group(0)

        message = re.sub(r"\buser (\d+)\b", named, str(exc))
        if message == str(exc):
            raise
        raise ValueError(message) from None


def list_array(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """A flat (N,) array and offsets (U + 1,) as an Arrow list array."""
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32 if offsets[-1] < 2**31 else np.int64)),
                                    pa.array(values))


def nested_list_array(rows: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """Rows (N, W) and offsets (U + 1,) as list<list<float>>."""
    n, width = rows.shape
    inner = list_array(np.ascontiguousarray(rows).reshape(-1), np.arange(n + 1, dtype=np.int64) * width)
    offsets = np.asarray(offsets, dtype=np.int64)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32 if offsets[-1] < 2**31 else np.int64)), inner)


def check_unique(user_id_chunks: List[pa.Array], where: str) -> None:
    if not user_id_chunks:
        return
    ids = pa.chunked_array(user_id_chunks, type=pa.string())
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        duplicate = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise ValueError(f"{where}: user {duplicate!r} has more than one row (user-major logs hold one row per user)")
