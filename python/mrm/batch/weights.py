"""The user-weights table (the output of :func:`mrm.batch.adapt_users`; columns in
:mod:`mrm.batch`'s docstring, with the optional ``covariance`` column that MAP adaptation
writes): :class:`WeightsTable` in memory, :func:`read_weights` to load and validate one, and
:func:`weights_schema` / :func:`weights_batch` / :func:`warm_rows_batches` to write one
(:mod:`mrm.store` exports its users through them too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mrm.batch.arrow import USER, batch_user_ids, is_list
from mrm.batch.parquet import open_parquet, parquet_files

PathLike = Union[str, Path]

@dataclass
class WeightsTable:
    """A user-weights table held in memory: ids, (U, K) logits and per-user metadata."""

    user_ids: pa.Array
    weights: np.ndarray
    n_pairs: np.ndarray
    support_loss: np.ndarray
    version: np.ndarray
    covariance: Optional[np.ndarray] = None
    """Laplace posterior covariance per user (U, K, K), in tables written by MAP adaptation."""

    def __len__(self) -> int:
        return len(self.user_ids)

    def lookup(self, user_ids: pa.Array) -> np.ndarray:
        """Row of each user in this table, -1 where absent: a binary search in the sorted ids,
        which are sorted once per table (not once per batch)."""
        if getattr(self, "_sorted_ids", None) is None:
            ids = np.asarray(self.user_ids.to_numpy(zero_copy_only=False), dtype=str)
            self._order = np.argsort(ids, kind="stable")
            self._sorted_ids = ids[self._order]
        wanted = np.asarray(user_ids.to_numpy(zero_copy_only=False), dtype=str)
        if len(self._sorted_ids) == 0:
            return np.full(len(wanted), -1, dtype=np.int64)
        position = np.searchsorted(self._sorted_ids, wanted)
        clipped = np.minimum(position, len(self._sorted_ids) - 1)
        found = self._sorted_ids[clipped] == wanted
        return np.where(found, self._order[clipped], -1).astype(np.int64)


def read_weights(path: PathLike, num_bases: int, dtype=np.float32) -> WeightsTable:
    """Load and validate a user-weights table (a file, or a directory of Parquet files)."""
    files = parquet_files(path)
    columns = [USER, "weights", "n_pairs", "support_loss", "version"]
    tables = []
    for f in files:
        parquet = open_parquet(f)
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"{f} is not a user-weights table: missing column(s) {missing}")
        try:
            optional = [c for c in ("covariance",) if c in parquet.schema_arrow.names]
            tables.append(parquet.read(columns=columns + optional))
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{f} could not be read (corrupt or truncated Parquet?): {exc}") from None
    table = pa.concat_tables(tables).combine_chunks() if len(tables) > 1 else tables[0].combine_chunks()
    batch = table.to_batches()[0] if table.num_rows else None
    if batch is None:
        empty = pa.array([], pa.string())
        return WeightsTable(empty, np.zeros((0, num_bases), dtype), np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))
    user_ids = batch_user_ids(batch)
    if pc.count_distinct(user_ids).as_py() != len(user_ids):
        counts = pc.value_counts(user_ids)
        duplicate = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise ValueError(f"{path}: user {duplicate!r} appears more than once in the weights table")
    weights_column = batch.column(batch.schema.get_field_index("weights"))
    if not is_list(weights_column.type) or weights_column.null_count:
        raise ValueError(f"{path}: column 'weights' must be a non-null list<float>, got {weights_column.type}")
    lengths = pc.list_value_length(weights_column).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(lengths != num_bases)
    if bad.size:
        raise ValueError(
            f"{path}: user {user_ids[int(bad[0])].as_py()!r} has {int(lengths[bad[0]])} weights but the "
            f"checkpoint has K = {num_bases}"
        )
    weights = pc.list_flatten(weights_column).to_numpy(zero_copy_only=False).astype(dtype).reshape(-1, num_bases)
    finite = np.isfinite(weights).all(axis=1)
    if not finite.all():
        raise ValueError(f"{path}: user {user_ids[int(np.flatnonzero(~finite)[0])].as_py()!r} has non-finite weights")

    def numbers(name, kind):
        col = batch.column(batch.schema.get_field_index(name))
        return col.to_numpy(zero_copy_only=False).astype(kind)

    covariance = None
    if "covariance" in table.schema.names:
        column = table.column("covariance").combine_chunks()
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if column.null_count or np.any(lengths != num_bases * num_bases):
            raise ValueError(f"{path}: column 'covariance' must hold K x K = {num_bases * num_bases} values per user")
        covariance = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(dtype).reshape(-1, num_bases, num_bases)
        if not np.isfinite(covariance).all():
            bad = int(np.flatnonzero(~np.isfinite(covariance).all(axis=(1, 2)))[0])
            raise ValueError(f"{path}: user {user_ids[bad].as_py()!r} has a non-finite covariance")
    return WeightsTable(user_ids, weights, numbers("n_pairs", np.int64), numbers("support_loss", np.float64),
                        numbers("version", np.int64), covariance)


def weights_schema(dtype: np.dtype, covariance: bool = False) -> pa.Schema:
    value = pa.float64() if dtype == np.float64 else pa.float32()
    fields = [
        (USER, pa.string()),
        ("weights", pa.list_(value)),
        ("n_pairs", pa.int64()),
        ("support_loss", pa.float64()),
        ("version", pa.int64()),
    ]
    if covariance:  # MAP adaptation: each user's Laplace covariance, K x K row-major
        fields.append(("covariance", pa.list_(value)))
    return pa.schema(fields)


def weights_batch(schema: pa.Schema, user_ids, weights, n_pairs, support_loss, version,
                  covariance: Optional[np.ndarray] = None) -> pa.RecordBatch:
    k = weights.shape[1]
    u = weights.shape[0]
    value = schema.field("weights").type.value_type
    flat = pa.array(np.ascontiguousarray(weights).reshape(-1), type=value)
    columns = [
        user_ids,
        pa.ListArray.from_arrays(pa.array(np.arange(u + 1, dtype=np.int32) * k), flat),
        pa.array(n_pairs, pa.int64()),
        pa.array(support_loss, pa.float64()),
        pa.array(version, pa.int64()),
    ]
    if "covariance" in schema.names:
        if covariance is None:
            raise ValueError("this user-weights table keeps covariances: the rows to write need one per user")
        cov = pa.array(np.ascontiguousarray(covariance, dtype=weights.dtype).reshape(-1), type=value)
        columns.append(pa.ListArray.from_arrays(pa.array(np.arange(u + 1, dtype=np.int64) * k * k), cov))
    return pa.record_batch(columns, schema=schema)


def warm_rows_batches(schema: pa.Schema, warm: WeightsTable, rows: np.ndarray, batch_users: int):
    """The given rows of a warm-start table, unchanged, as user-weights batches."""
    for lo in range(0, len(rows), batch_users):
        part = rows[lo:lo + batch_users]
        covariance = None if warm.covariance is None else warm.covariance[part]
        if covariance is None and "covariance" in schema.names:
            raise ValueError("the warm-start table has no covariance column: adapt it again with optimizer 'map'")
        yield weights_batch(schema, warm.user_ids.take(pa.array(part)), warm.weights[part], warm.n_pairs[part],
                            warm.support_loss[part], warm.version[part], covariance)
