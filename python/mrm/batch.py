"""Production batch jobs over user-major Parquet logs: adapt every user, then score responses.

User-major layout
-----------------
One row per user, so that a batch of rows never splits a user. Columns:

* ``user_id`` — string, unique across the table.
* Preference pairs, either as base-reward features (K = the checkpoint's ``num_bases``)::

      chosen_features, rejected_features : list<list<float>>   (user → pairs → K floats)

  or as embeddings (D = the checkpoint's ``input_dim``; φ from the checkpoint is applied)::

      chosen_embeddings, rejected_embeddings : list<list<float>>   (user → pairs → D floats)

* Candidate responses to score (``score`` only), ``candidate_features`` (K) or
  ``candidate_embeddings`` (D), also ``list<list<float>>``.

The inner list may also be a ``fixed_size_list``. The outer list is the CSR of SPEC §4: its
offsets are the per-user offsets, its values the (N, K) rows. Floats are float32 or float64 and
the jobs compute in that type (float64 if the two columns differ); with embeddings they compute in
the checkpoint's type. Logs may be one ``.parquet`` file or a directory of them (hidden and
``_``-prefixed files are ignored). :func:`pairs_to_user_major` turns a per-pair table into this
layout; :func:`user_major_table` builds it from numpy CSR arrays.

User-weights table (the output of :func:`adapt_users`)
------------------------------------------------------
``user_id`` string, ``weights`` list<float> (K adapted logits), ``n_pairs`` int64 (pairs used in
this run), ``support_loss`` float64 (Bradley–Terry loss of those pairs at the adapted weights, from
the same native call that adapts them; 0 for a user without pairs), ``version`` int64 (how many
adapt runs have updated this user: 1 for a new user, +1 on each warm-start update).

Both jobs stream record batches of ``batch_users`` users, so memory is bounded by one batch (plus,
for warm starts and scoring, the user-weights table: user ids and K floats per user). The output
is written to a temporary file beside ``output`` and renamed into place only when the job
succeeds: a job killed part-way leaves the old output (or none), and can simply be rerun.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mrm import ops
from mrm._io import atomic_file
from mrm.checkpoint import Checkpoint

__all__ = [
    "AdaptSummary",
    "ScoreSummary",
    "WeightsTable",
    "adapt_users",
    "score",
    "pairs_to_user_major",
    "preference_data_to_user_major",
    "user_major_table",
    "read_weights",
]

PathLike = Union[str, Path]

USER = "user_id"
PAIR_COLUMNS = {
    "features": ("chosen_features", "rejected_features"),
    "embeddings": ("chosen_embeddings", "rejected_embeddings"),
}
CANDIDATE_COLUMNS = {"features": "candidate_features", "embeddings": "candidate_embeddings"}
DEFAULT_BATCH_USERS = 8192
# Dictionary encoding never pays for float lists and unique user ids, and costs most of the
# writing time; every Parquet file the jobs write goes without it.
WRITE_OPTIONS = {"use_dictionary": False}


@dataclass(frozen=True)
class AdaptSummary:
    """What :func:`adapt_users` did."""

    users: int
    """Users adapted from the logs."""
    pairs: int
    """Pairs read from the logs."""
    seconds: float
    output: Path
    warm_started: int = 0
    """Users that started from their previous weights (warm start) instead of w0."""
    copied: int = 0
    """Users of the warm-start table absent from the logs, copied through unchanged."""


@dataclass(frozen=True)
class ScoreSummary:
    """What :func:`score` did."""

    users: int
    pairs: int
    candidates: int
    fallback_users: int
    """Users absent from the weights table, scored with the shared start w0."""
    seconds: float
    output: Path


# ---- reading -------------------------------------------------------------------------------------


def _as_checkpoint(checkpoint: Union[Checkpoint, PathLike]) -> Checkpoint:
    return checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.load(checkpoint)


def parquet_files(path: PathLike) -> List[Path]:
    """The Parquet files of ``path``: the file itself, or a directory's ``*.parquet`` (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            f for f in path.rglob("*.parquet")
            if f.is_file() and not any(part.startswith((".", "_")) for part in f.relative_to(path).parts)
        )
        if not files:
            raise FileNotFoundError(f"no .parquet files in directory {path}")
        return files
    raise FileNotFoundError(f"{path} not found")


def parquet_files_or_none(path: PathLike) -> List[Path]:
    """Like :func:`parquet_files`, but an empty or missing directory gives an empty list."""
    try:
        return parquet_files(path)
    except FileNotFoundError:
        return []


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path} is not a readable Parquet file (corrupt or truncated?): {exc}") from None


def _schema(files: Sequence[Path]) -> pa.Schema:
    return _open_parquet(files[0]).schema_arrow


_SOURCE, _FIRST_ROW = b"mrm.source", b"mrm.first_row"


def _source(batch: pa.RecordBatch) -> Tuple[Optional[str], int]:
    """The file a batch of :func:`_iter_batches` came from (None for other batches) and the
    file row of its first row."""
    meta = batch.schema.metadata or {}
    path = meta.get(_SOURCE)
    return (path.decode() if path is not None else None), int(meta.get(_FIRST_ROW, b"0"))


@contextmanager
def _in_file(batch: pa.RecordBatch) -> Iterator[None]:
    """A ValueError about a batch's content names the file it came from."""
    try:
        yield
    except ValueError as exc:
        path, _ = _source(batch)
        if path is None or str(exc).startswith(path):
            raise
        raise ValueError(f"{path}: {exc}") from None


def _iter_batches(files: Sequence[Path], columns: Sequence[str], batch_users: int) -> Iterator[pa.RecordBatch]:
    """Record batches of at most ``batch_users`` rows (users), with Parquet errors made readable.
    Each batch carries its file and first row in its schema metadata (see :func:`_source`)."""
    for path in files:
        first_row = 0
        parquet = _open_parquet(path)
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} (has {parquet.schema_arrow.names})")
        # One row group at a time: asking for all of them lets the reader buffer them all.
        for row_group in range(parquet.num_row_groups):
            batches = parquet.iter_batches(batch_size=batch_users, row_groups=[row_group], columns=list(columns))
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except (pa.ArrowException, OSError) as exc:
                    raise ValueError(f"{path} could not be read (corrupt or truncated Parquet?): {exc}") from None
                meta = {**(batch.schema.metadata or {}), _SOURCE: str(path).encode(), _FIRST_ROW: str(first_row).encode()}
                first_row += batch.num_rows
                yield batch.replace_schema_metadata(meta)


def _read_ahead(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """The same batches, with the next ones decoded on a helper thread while the caller works on
    the current one (Parquet decoding and the kernels both release the GIL). The reader runs at
    most two batches ahead (three decoded batches exist at once at most); its errors reach the caller in order, after the batches before them.
    A caller that stops early stops the reader."""
    slot: "queue.Queue" = queue.Queue(maxsize=1)
    stop = threading.Event()
    done = object()

    def offer(entry) -> bool:
        """Puts ``entry`` in the slot unless the consumer has gone; True when it was put."""
        while not stop.is_set():
            try:
                slot.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in batches:
                if not offer((item, None)):
                    return
            offer((done, None))
        except BaseException as exc:  # handed to the consumer, raised there
            offer((done, exc))

    worker = threading.Thread(target=produce, name="mrm-read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            try:
                item, error = slot.get(timeout=0.1)  # a timed wait, so Ctrl-C reaches us everywhere
            except queue.Empty:
                continue
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        worker.join()


def _total_rows(files: Sequence[Path]) -> int:
    return sum(_open_parquet(f).metadata.num_rows for f in files)


def _user_ids(batch: pa.RecordBatch) -> pa.Array:
    column = batch.column(batch.schema.get_field_index(USER))
    if pa.types.is_dictionary(column.type):  # dictionary-encoded strings (pandas categoricals, Spark)
        column = column.dictionary_decode()
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ValueError(f"column {USER!r} must be a string column, got {column.type}")
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        path, first_row = _source(batch)
        where = f"row {first_row + row} of the file" if path is not None else f"row {row} of the batch"
        after = f", after user {column[row - 1].as_py()!r}" if row > 0 else ""
        raise ValueError(f"column {USER!r} has a null value ({where}{after})")
    return column.cast(pa.string())


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _pick_source(schema: pa.Schema, choices: dict, what: str, required: bool = True) -> Optional[str]:
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
    if not (_is_list(t) and _is_list(t.value_type)):
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
    explain a kernel error (see :func:`_explained`)."""
    array = batch.column(batch.schema.get_field_index(column))
    if not (_is_list(array.type) and _is_list(array.type.value_type)):
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


class _Features:
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
def _explained(readers, batch: pa.RecordBatch, user_ids: pa.Array, pairs=None):
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


# ---- user-weights tables -------------------------------------------------------------------------


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
        parquet = _open_parquet(f)
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
    user_ids = _user_ids(batch)
    if pc.count_distinct(user_ids).as_py() != len(user_ids):
        counts = pc.value_counts(user_ids)
        duplicate = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise ValueError(f"{path}: user {duplicate!r} appears more than once in the weights table")
    weights_column = batch.column(batch.schema.get_field_index("weights"))
    if not _is_list(weights_column.type) or weights_column.null_count:
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


def _weights_schema(dtype: np.dtype, covariance: bool = False) -> pa.Schema:
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


def _list_array(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """A flat (N,) array and offsets (U + 1,) as an Arrow list array."""
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32 if offsets[-1] < 2**31 else np.int64)),
                                    pa.array(values))


def _nested_list_array(rows: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """Rows (N, W) and offsets (U + 1,) as list<list<float>>."""
    n, width = rows.shape
    inner = _list_array(np.ascontiguousarray(rows).reshape(-1), np.arange(n + 1, dtype=np.int64) * width)
    offsets = np.asarray(offsets, dtype=np.int64)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32 if offsets[-1] < 2**31 else np.int64)), inner)


def _weights_batch(schema: pa.Schema, user_ids, weights, n_pairs, support_loss, version,
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


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists (pass overwrite=True / --overwrite to replace it)")
    if output.is_dir():
        raise ValueError(f"{output} is a directory; the output must be a Parquet file path")


def _check_batch_users(batch_users) -> None:
    if isinstance(batch_users, bool) or not isinstance(batch_users, int) or batch_users < 1:
        raise ValueError(f"batch_users must be a positive integer, got {batch_users!r}")


def _check_unique(user_id_chunks: List[pa.Array], where: str) -> None:
    if not user_id_chunks:
        return
    ids = pa.chunked_array(user_id_chunks, type=pa.string())
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        duplicate = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise ValueError(f"{where}: user {duplicate!r} has more than one row (user-major logs hold one row per user)")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="user", unit_scale=True, disable=not enabled, dynamic_ncols=True)


# ---- jobs ----------------------------------------------------------------------------------------


class _Adapter:
    """Adapts one batch of user-major logs: the shared part of the local and Ray jobs."""

    def __init__(self, checkpoint: Checkpoint, schema: pa.Schema, *, steps: int, lr: float, optimizer: str,
                 threads: int, warm: Optional[WeightsTable] = None):
        kind = _pick_source(schema, PAIR_COLUMNS, "preference-pair")
        self.reader = _Features(checkpoint, schema, kind, PAIR_COLUMNS[kind])
        self.dtype = self.reader.dtype
        self.num_bases = checkpoint.num_bases
        self.w0 = checkpoint.w0.astype(self.dtype)
        self.threads = threads
        # one settings value, checked once before any output exists
        if optimizer == "map":
            if checkpoint.eta is None:
                raise ValueError("optimizer 'map' needs a checkpoint trained with a prior (inner_optimizer='map')")
            self.inner = ops.InnerLoop("map", weight_map=checkpoint.weight_map)
            self.eta = checkpoint.eta.astype(self.dtype)
        else:
            if checkpoint.weight_map != "simplex":
                raise ValueError(f"the checkpoint has {checkpoint.weight_map} user weights: adapt it with optimizer 'map', "
                                 f"not {optimizer!r}")
            self.inner = ops.InnerLoop(optimizer, steps=steps, lr=lr)
            self.eta = None
        self.warm = warm
        self.schema = _weights_schema(self.dtype, covariance=self.inner.is_map)

    @property
    def columns(self) -> List[str]:
        return [USER, *self.reader.columns]

    def __call__(self, batch: pa.RecordBatch) -> Tuple[pa.RecordBatch, np.ndarray]:
        """(user-weights batch, rows of the warm-start table this batch updated)."""
        user_ids = _user_ids(batch)
        chosen, rejected, offsets = self.reader.pairs(batch, user_ids)
        with np.errstate(over="ignore"):  # an overflow is named below, if the kernel finds one
            differences = chosen - rejected
        del chosen, rejected
        count = len(user_ids)
        start = np.broadcast_to(self.w0, (count, self.num_bases)).copy()
        version = np.ones(count, np.int64)
        warm_rows = np.zeros(0, np.int64)
        if self.warm is not None:
            rows = self.warm.lookup(user_ids)
            known = rows >= 0
            warm_rows = rows[known]
            start[known] = self.warm.weights[warm_rows]
            version[known] = self.warm.version[warm_rows] + 1
        with _explained([self.reader], batch, user_ids, (self.reader, differences, offsets)):
            covariance = None
            if self.inner.is_map:  # the prior stays centred on w0; stored weights only warm-start the solve
                result = ops.map_adapt(self.w0, self.eta, differences, offsets, inner=self.inner, init=start,
                                       return_covariance=True, num_threads=self.threads)
                result.raise_unconverged()
                weights, losses, covariance = result.weights, result.support_losses, result.covariance
            else:
                weights, losses = ops.adapt(start, differences, offsets, inner=self.inner, num_threads=self.threads,
                                            return_support_losses=True)
        return _weights_batch(self.schema, user_ids, weights, np.diff(offsets), losses, version, covariance), warm_rows


def _warm_rows_batches(schema: pa.Schema, warm: WeightsTable, rows: np.ndarray, batch_users: int):
    """The given rows of a warm-start table, unchanged, as user-weights batches."""
    for lo in range(0, len(rows), batch_users):
        part = rows[lo:lo + batch_users]
        covariance = None if warm.covariance is None else warm.covariance[part]
        if covariance is None and "covariance" in schema.names:
            raise ValueError("the warm-start table has no covariance column: adapt it again with optimizer 'map'")
        yield _weights_batch(schema, warm.user_ids.take(pa.array(part)), warm.weights[part], warm.n_pairs[part],
                             warm.support_loss[part], warm.version[part], covariance)


def adapt_users(
    checkpoint: Union[Checkpoint, PathLike],
    logs: PathLike,
    output: PathLike,
    *,
    steps: int,
    lr: float,
    optimizer: str = "adam",
    threads: Optional[int] = None,
    warm_start: Optional[PathLike] = None,
    overwrite: bool = False,
    batch_users: int = DEFAULT_BATCH_USERS,
    progress: bool = True,
) -> AdaptSummary:
    """Adapt every user of the user-major ``logs`` on its pairs; write a user-weights table.

    Each user starts from the checkpoint's w0, or, with ``warm_start`` (a user-weights table),
    from its previous weights when it has some. Users of ``warm_start`` without rows in ``logs``
    are copied to ``output`` unchanged (online update). ``output`` may be the ``warm_start`` path
    itself (with ``overwrite=True``): it is replaced only once the job has succeeded.
    """
    started = time.perf_counter()
    checkpoint = _as_checkpoint(checkpoint)
    output = Path(output)
    _check_output(output, overwrite)
    _check_batch_users(batch_users)
    files = parquet_files(logs)
    adapter = _Adapter(checkpoint, _schema(files), steps=steps, lr=lr, optimizer=optimizer,
                       threads=ops.resolve_threads(threads))
    warm = read_weights(warm_start, checkpoint.num_bases, adapter.dtype) if warm_start is not None else None
    adapter.warm = warm
    touched = np.zeros(len(warm) if warm is not None else 0, dtype=bool)

    n_users = n_pairs = 0
    seen_ids: List[pa.Array] = []
    with atomic_file(output) as handle, pq.ParquetWriter(handle, adapter.schema, **WRITE_OPTIONS) as writer, \
            _progress(_total_rows(files), "adapt", progress) as bar:
        for batch in _read_ahead(_iter_batches(files, adapter.columns, batch_users)):
            with _in_file(batch):
                result, warm_rows = adapter(batch)
            writer.write_batch(result)
            touched[warm_rows] = True
            seen_ids.append(result.column(0))
            n_users += len(result)
            n_pairs += int(pc.sum(result.column(2)).as_py() or 0)
            bar.update(len(result))
        _check_unique(seen_ids, str(logs))
        copied = np.flatnonzero(~touched)
        if warm is not None:
            for result in _warm_rows_batches(adapter.schema, warm, copied, batch_users):
                writer.write_batch(result)
    return AdaptSummary(users=n_users, pairs=n_pairs, seconds=time.perf_counter() - started, output=output,
                        warm_started=int(touched.sum()), copied=len(copied))


def _softmax(weights: np.ndarray) -> np.ndarray:
    p = np.exp(weights - weights.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x)).astype(x.dtype, copy=False)


class _Scorer:
    """Scores one batch of user-major logs: the shared part of the local and Ray jobs."""

    def __init__(self, checkpoint: Checkpoint, schema: pa.Schema, weights: Optional[WeightsTable], threads: int):
        self.checkpoint = checkpoint
        self.threads = threads
        self.weight_map = checkpoint.weight_map
        pair_kind = _pick_source(schema, PAIR_COLUMNS, "pair", required=False)
        candidate_kind = _pick_source(schema, CANDIDATE_COLUMNS, "candidate", required=False)
        if pair_kind is None and candidate_kind is None:
            raise ValueError(
                f"the logs have nothing to score: expected {list(PAIR_COLUMNS['features'])}, "
                f"{list(PAIR_COLUMNS['embeddings'])}, {CANDIDATE_COLUMNS['features']!r} or "
                f"{CANDIDATE_COLUMNS['embeddings']!r} columns (found {schema.names})"
            )
        self.pairs = _Features(checkpoint, schema, pair_kind, PAIR_COLUMNS[pair_kind]) if pair_kind else None
        self.candidates = (
            _Features(checkpoint, schema, candidate_kind, [CANDIDATE_COLUMNS[candidate_kind]]) if candidate_kind else None
        )
        dtypes = {r.dtype for r in (self.pairs, self.candidates) if r is not None}
        self.dtype = np.dtype(np.float64) if np.dtype(np.float64) in dtypes else np.dtype(np.float32)
        self.weights = weights
        value = pa.float64() if self.dtype == np.float64 else pa.float32()
        fields = [(USER, pa.string())]
        if self.candidates:
            fields.append(("candidate_rewards", pa.list_(value)))
        self.uncertain = checkpoint.eta is not None and checkpoint.weight_map is not None and checkpoint.prior is not None
        if self.candidates:
            if self.uncertain:
                fields.append(("candidate_reward_std", pa.list_(value)))
        if self.pairs:
            fields += [("chosen_rewards", pa.list_(value)), ("rejected_rewards", pa.list_(value)),
                       ("p_chosen", pa.list_(value)), ("accuracy", pa.float64())]
            if self.uncertain:
                fields.append(("margin_std", pa.list_(value)))
        fields.append(("fallback", pa.bool_()))
        self.schema = pa.schema(fields)

    @property
    def columns(self) -> List[str]:
        return [USER] + (self.pairs.columns if self.pairs else []) + (self.candidates.columns if self.candidates else [])

    def __call__(self, batch: pa.RecordBatch) -> Tuple[pa.RecordBatch, int, int]:
        """(output batch, pairs, candidates)."""
        user_ids = _user_ids(batch)
        count = len(user_ids)
        weights = np.broadcast_to(self.checkpoint.w0.astype(self.dtype), (count, self.checkpoint.num_bases)).copy()
        fallback = np.ones(count, dtype=bool)
        if self.weights is not None:
            rows = self.weights.lookup(user_ids)
            known = rows >= 0
            weights[known] = self.weights.weights[rows[known]]
            fallback = ~known
        columns = [user_ids]
        n_pairs = n_candidates = 0
        covariance = None
        if self.uncertain:
            # Laplace covariance from the table; a user without one has only the prior, diag(e^-η)
            k = self.checkpoint.num_bases
            eta = np.broadcast_to(self.checkpoint.eta.astype(np.float64), (k,))
            covariance = np.broadcast_to(np.diag(np.exp(-eta)).astype(self.dtype), (count, k, k)).copy()
            if self.weights is not None and self.weights.covariance is not None:
                covariance[known] = self.weights.covariance[rows[known]]

        def rewards(rows_k: np.ndarray, offsets: np.ndarray, with_std: bool = False):
            with _explained([self.pairs, self.candidates], batch, user_ids):
                if with_std:
                    mean, var = ops.predict(rows_k.astype(self.dtype, copy=False), offsets, weights,
                                            covariance=covariance, weight_map=self.weight_map, num_threads=self.threads)
                    return mean, np.sqrt(var)
                return ops.score(rows_k.astype(self.dtype, copy=False), offsets, weights, weight_map=self.weight_map,
                                 num_threads=self.threads)

        if self.candidates:
            (column,) = self.candidates.columns
            rows_k, offsets = self.candidates.rows(batch, column, user_ids)
            if self.uncertain:
                mean, std = rewards(rows_k, offsets, with_std=True)
                columns += [_list_array(mean, offsets), _list_array(std, offsets)]
            else:
                columns.append(_list_array(rewards(rows_k, offsets), offsets))
            n_candidates = int(offsets[-1])
        if self.pairs:
            chosen, rejected, offsets = self.pairs.pairs(batch, user_ids)
            chosen_rewards, rejected_rewards = rewards(chosen, offsets), rewards(rejected, offsets)
            margin_std = None
            if self.uncertain:
                # P(chosen ≻ rejected) under the Laplace posterior: σ(m / sqrt(1 + π var_m / 8)) (SPEC §7)
                _, margin_std = rewards(chosen - rejected, offsets, with_std=True)
                p_chosen = ops.pair_probabilities(chosen_rewards - rejected_rewards, margin_std ** 2).astype(self.dtype)
            else:
                # P(chosen beats rejected) = σ(r_c − r_r) (Bradley–Terry)
                p_chosen = _sigmoid(chosen_rewards - rejected_rewards)
            counts = np.diff(offsets)
            user_of_row = np.repeat(np.arange(count), counts)
            wins = np.bincount(user_of_row, weights=(chosen_rewards > rejected_rewards), minlength=count)
            accuracy = np.full(count, np.nan)
            np.divide(wins, counts, out=accuracy, where=counts > 0)
            columns += [_list_array(chosen_rewards, offsets), _list_array(rejected_rewards, offsets),
                        _list_array(p_chosen, offsets), pa.array(accuracy, pa.float64())]
            if margin_std is not None:
                columns.append(_list_array(margin_std.astype(self.dtype), offsets))
            n_pairs = int(offsets[-1])
        columns.append(pa.array(fallback, pa.bool_()))
        return pa.record_batch(columns, schema=self.schema), n_pairs, n_candidates


def score(
    checkpoint: Union[Checkpoint, PathLike],
    weights: Optional[PathLike],
    logs: PathLike,
    output: PathLike,
    *,
    threads: Optional[int] = None,
    overwrite: bool = False,
    batch_users: int = DEFAULT_BATCH_USERS,
    progress: bool = True,
) -> ScoreSummary:
    """Personalised rewards for every user of the user-major ``logs``, written to ``output``.

    For candidate columns: ``candidate_rewards`` r_u(e) = φ(e) · p(w_u). For pair columns:
    ``chosen_rewards``, ``rejected_rewards``, ``p_chosen`` = σ(r_c − r_r) and the user's
    ``accuracy`` (fraction with r_c > r_r, SPEC §5; NaN without pairs). A checkpoint with a MAP
    prior also gets ``candidate_reward_std`` and ``margin_std`` (Laplace posterior, from the
    weights table's ``covariance``; the prior's for users without one), and ``p_chosen`` is then
    the probit-corrected σ(m / sqrt(1 + π var_m / 8)) (SPEC §7). Users absent from the
    ``weights`` table (None: every user) are scored with w0, flagged ``fallback`` and counted.
    """
    started = time.perf_counter()
    checkpoint = _as_checkpoint(checkpoint)
    output = Path(output)
    _check_output(output, overwrite)
    _check_batch_users(batch_users)
    threads = ops.resolve_threads(threads)
    files = parquet_files(logs)
    scorer = _Scorer(checkpoint, _schema(files), None, threads)
    if weights is not None:
        scorer.weights = read_weights(weights, checkpoint.num_bases, scorer.dtype)

    n_users = n_pairs = n_candidates = n_fallback = 0
    with atomic_file(output) as handle, pq.ParquetWriter(handle, scorer.schema, **WRITE_OPTIONS) as writer, \
            _progress(_total_rows(files), "score", progress) as bar:
        for batch in _read_ahead(_iter_batches(files, scorer.columns, batch_users)):
            with _in_file(batch):
                result, pairs, candidates = scorer(batch)
            writer.write_batch(result)
            n_users += len(result)
            n_pairs += pairs
            n_candidates += candidates
            n_fallback += int(pc.sum(result.column(len(result.schema) - 1)).as_py() or 0)
            bar.update(len(result))
    return ScoreSummary(users=n_users, pairs=n_pairs, candidates=n_candidates, fallback_users=n_fallback,
                        seconds=time.perf_counter() - started, output=output)


# ---- building user-major logs --------------------------------------------------------------------


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
        arrays[chosen_column] = _nested_list_array(chosen, offsets)
        arrays[rejected_column] = _nested_list_array(rejected, offsets)
    if candidates is not None:
        arrays[CANDIDATE_COLUMNS[kind]] = _nested_list_array(np.asarray(candidates),
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
    _check_batch_users(row_group_users)
    output = Path(output)
    _check_output(output, overwrite)
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
                tables.append(_open_parquet(f).read())
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
    _check_output(output, overwrite)
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
        if not _is_list(array.type) or not pa.types.is_floating(array.type.value_type):
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
