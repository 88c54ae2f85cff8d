"""Reading user-major Parquet logs: the files of a path, record batches of whole users that
carry their file and first row, read-ahead on a helper thread; and the checks every job does
before it writes (the output path, the batch size) and its progress bar.

Internal API of :mod:`mrm.batch` (used by its jobs, :mod:`mrm.integrations.ray`, :mod:`mrm.store`
and :mod:`mrm.cli`): :func:`parquet_files`, :func:`parquet_files_or_none`, :func:`open_parquet`,
:func:`read_schema`, :func:`iter_batches`, :func:`batch_source`, :func:`in_file`,
:func:`read_ahead`, :func:`total_rows`, :func:`check_output`, :func:`check_batch_users`,
:func:`progress_bar`, :func:`start_job`, :func:`job_output`, :func:`job_results`,
``DEFAULT_BATCH_USERS`` and ``WRITE_OPTIONS``.
"""

from __future__ import annotations

import queue
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import pyarrow as pa
import pyarrow.parquet as pq

from mrm._io import atomic_file

PathLike = Union[str, Path]

DEFAULT_BATCH_USERS = 8192
# Dictionary encoding never pays for float lists and unique user ids, and costs most of the
# writing time; every Parquet file the jobs write goes without it.
WRITE_OPTIONS = {"use_dictionary": False}


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


def open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path} is not a readable Parquet file (corrupt or truncated?): {exc}") from None


def read_schema(files: Sequence[Path]) -> pa.Schema:
    return open_parquet(files[0]).schema_arrow


_SOURCE, _FIRST_ROW = b"mrm.source", b"mrm.first_row"


def batch_source(batch: pa.RecordBatch) -> Tuple[Optional[str], int]:
    """The file a batch of :func:`iter_batches` came from (None for other batches) and the
    file row of its first row."""
    meta = batch.schema.metadata or {}
    path = meta.get(_SOURCE)
    return (path.decode() if path is not None else None), int(meta.get(_FIRST_ROW, b"0"))


@contextmanager
def in_file(batch: pa.RecordBatch) -> Iterator[None]:
    """A ValueError about a batch's content names the file it came from."""
    try:
        yield
    except ValueError as exc:
        path, _ = batch_source(batch)
        if path is None or str(exc).startswith(path):
            raise
        raise ValueError(f"{path}: {exc}") from None


def iter_batches(files: Sequence[Path], columns: Sequence[str], batch_users: int) -> Iterator[pa.RecordBatch]:
    """Record batches of at most ``batch_users`` rows (users), with Parquet errors made readable.
    Each batch carries its file and first row in its schema metadata (see :func:`batch_source`)."""
    for path in files:
        first_row = 0
        parquet = open_parquet(path)
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


def read_ahead(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
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


def total_rows(files: Sequence[Path]) -> int:
    return sum(open_parquet(f).metadata.num_rows for f in files)


def check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists (pass overwrite=True / --overwrite to replace it)")
    if output.is_dir():
        raise ValueError(f"{output} is a directory; the output must be a Parquet file path")


def check_batch_users(batch_users) -> None:
    if isinstance(batch_users, bool) or not isinstance(batch_users, int) or batch_users < 1:
        raise ValueError(f"batch_users must be a positive integer, got {batch_users!r}")


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="user", unit_scale=True, disable=not enabled, dynamic_ncols=True)


# ---- the frame of a local job (mrm.batch.adapt_users, mrm.batch.score) ---------------------------

Result = TypeVar("Result")


@dataclass(frozen=True)
class JobSummary:
    """What a batch job did (local or Ray): the fields both jobs report."""

    users: int
    """Users read from the logs."""
    pairs: int
    """Pairs read from the logs."""
    seconds: float
    output: Path


def start_job(logs: PathLike, output: PathLike, overwrite: bool, batch_users) -> Tuple[Path, List[Path]]:
    """The checks a local job makes before it reads: ``output`` may be written, ``batch_users``
    is valid, the logs have Parquet files. Returns ``(output, files)``."""
    output = Path(output)
    check_output(output, overwrite)
    check_batch_users(batch_users)
    return output, parquet_files(logs)


@contextmanager
def job_output(output: Path, schema: pa.Schema, files: Sequence[Path], desc: str, progress: bool):
    """``(writer, bar)``: a Parquet writer of ``schema`` for ``output`` (replaced atomically, only
    when the block succeeds) and a progress bar over the users of ``files``."""
    with atomic_file(output) as handle, pq.ParquetWriter(handle, schema, **WRITE_OPTIONS) as writer, \
            progress_bar(total_rows(files), desc, progress) as bar:
        yield writer, bar


def job_results(job: Callable[[pa.RecordBatch], Result], files: Sequence[Path], columns: Sequence[str],
                batch_users: int) -> Iterator[Result]:
    """``job(batch)`` for each batch of whole users of ``files`` (read ahead on a helper thread);
    an error inside ``job`` names the batch's file and first row."""
    for batch in read_ahead(iter_batches(files, columns, batch_users)):
        with in_file(batch):
            result = job(batch)
        yield result
