"""The adapt job: :func:`adapt_users` over local files, and :class:`Adapter`, the per-batch
computation that it and the Ray job (:mod:`mrm.integrations.ray`) share.

(The module is not called ``adapt`` so that no submodule of :mod:`mrm.batch` has the name of a
function the package exports.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mrm import ops
from mrm.batch.arrow import PAIR_COLUMNS, USER, Features, as_checkpoint, batch_user_ids, check_unique, explained, pick_source
from mrm.batch.parquet import DEFAULT_BATCH_USERS, JobSummary, job_output, job_results, read_schema, start_job
from mrm.batch.weights import WeightsTable, read_weights, warm_rows_batches, weights_batch, weights_schema
from mrm.checkpoint import Checkpoint

PathLike = Union[str, Path]

@dataclass(frozen=True)
class AdaptSummary(JobSummary):
    """What :func:`adapt_users` did: the users adapted from the logs, and"""

    warm_started: int = 0
    """Users that started from their previous weights (warm start) instead of w0."""
    copied: int = 0
    """Users of the warm-start table absent from the logs, copied through unchanged."""


class Adapter:
    """Adapts one batch of user-major logs: the shared part of the local and Ray jobs."""

    def __init__(self, checkpoint: Checkpoint, schema: pa.Schema, *, steps: int, lr: float,
                 optimizer: Optional[str], threads: int, warm: Optional[WeightsTable] = None):
        kind = pick_source(schema, PAIR_COLUMNS, "preference-pair")
        self.reader = Features(checkpoint, schema, kind, PAIR_COLUMNS[kind])
        self.dtype = self.reader.dtype
        self.num_bases = checkpoint.num_bases
        self.w0 = checkpoint.w0.astype(self.dtype)
        self.threads = threads
        # one settings value, checked once before any output exists; by default the checkpoint's
        # own solver: MAP under its prior when it was trained with one
        if optimizer is None:
            optimizer = "map" if checkpoint.eta is not None else "adam"
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
        self.schema = weights_schema(self.dtype, covariance=self.inner.is_map)

    @property
    def columns(self) -> List[str]:
        return [USER, *self.reader.columns]

    def __call__(self, batch: pa.RecordBatch) -> Tuple[pa.RecordBatch, np.ndarray]:
        """(user-weights batch, rows of the warm-start table this batch updated)."""
        user_ids = batch_user_ids(batch)
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
        with explained([self.reader], batch, user_ids, (self.reader, differences, offsets)):
            covariance = None
            if self.inner.is_map:  # the prior stays centred on w0; stored weights only warm-start the solve
                result = ops.map_adapt(self.w0, self.eta, differences, offsets, inner=self.inner, init=start,
                                       return_covariance=True, num_threads=self.threads)
                result.raise_unconverged()
                weights, losses, covariance = result.weights, result.support_losses, result.covariance
            else:
                weights, losses = ops.adapt(start, differences, offsets, inner=self.inner, num_threads=self.threads,
                                            return_support_losses=True)
        return weights_batch(self.schema, user_ids, weights, np.diff(offsets), losses, version, covariance), warm_rows


def adapt_users(
    checkpoint: Union[Checkpoint, PathLike],
    logs: PathLike,
    output: PathLike,
    *,
    steps: int,
    lr: float,
    optimizer: Optional[str] = None,
    threads: Optional[int] = None,
    warm_start: Optional[PathLike] = None,
    overwrite: bool = False,
    batch_users: int = DEFAULT_BATCH_USERS,
    progress: bool = True,
) -> AdaptSummary:
    """Adapt every user of the user-major ``logs`` on its pairs; write a user-weights table.

    ``optimizer`` (``adam``, ``sgd`` or ``map``; default: ``map`` for a checkpoint trained with a
    prior, else ``adam``) with ``steps`` and ``lr`` (not used by ``map``).
    Each user starts from the checkpoint's w0, or, with ``warm_start`` (a user-weights table),
    from its previous weights when it has some. Users of ``warm_start`` without rows in ``logs``
    are copied to ``output`` unchanged (online update). ``output`` may be the ``warm_start`` path
    itself (with ``overwrite=True``): it is replaced only once the job has succeeded.
    """
    started = time.perf_counter()
    checkpoint = as_checkpoint(checkpoint)
    output, files = start_job(logs, output, overwrite, batch_users)
    adapter = Adapter(checkpoint, read_schema(files), steps=steps, lr=lr, optimizer=optimizer,
                      threads=ops.resolve_threads(threads))
    warm = read_weights(warm_start, checkpoint.num_bases, adapter.dtype) if warm_start is not None else None
    adapter.warm = warm
    touched = np.zeros(len(warm) if warm is not None else 0, dtype=bool)

    n_users = n_pairs = 0
    seen_ids: List[pa.Array] = []
    with job_output(output, adapter.schema, files, "adapt", progress) as (writer, bar):
        for result, warm_rows in job_results(adapter, files, adapter.columns, batch_users):
            writer.write_batch(result)
            touched[warm_rows] = True
            seen_ids.append(result.column(0))
            n_users += len(result)
            n_pairs += int(pc.sum(result.column(2)).as_py() or 0)
            bar.update(len(result))
        check_unique(seen_ids, str(logs))
        copied = np.flatnonzero(~touched)
        if warm is not None:
            for result in warm_rows_batches(adapter.schema, warm, copied, batch_users):
                writer.write_batch(result)
    return AdaptSummary(users=n_users, pairs=n_pairs, seconds=time.perf_counter() - started, output=output,
                        warm_started=int(touched.sum()), copied=len(copied))
