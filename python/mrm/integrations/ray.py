"""The batch jobs of :mod:`mrm.batch` as Ray Data pipelines (the ``mrm-fast[ray]`` extra).

``ray.data.read_parquet(logs)`` → ``map_batches`` with an actor class that loads the checkpoint
(and the user-weights table) once and sizes the kernel's thread pool from the CPUs Ray assigned
to it → ``write_parquet`` into a temporary directory, renamed to ``output`` only on success.
:func:`embed` runs the backbone in Ray actors (one GPU each when the cluster has GPUs) that write
their vectors into the same embedding cache as :class:`mrm.embed.EmbeddingCache`.
The per-batch computation is the one the local jobs run, so results are identical to
:func:`mrm.batch.adapt_users` and :func:`mrm.batch.score` (row order may differ; the output is a
directory of Parquet files, which the local jobs also accept as input).
"""

from __future__ import annotations

import time
import functools
import inspect
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mrm.batch import adapt_job, score_job
from mrm.batch.adapt_job import Adapter, AdaptSummary
from mrm.batch.arrow import USER, check_unique
from mrm.batch.parquet import (
    WRITE_OPTIONS, check_batch_users, parquet_files, parquet_files_or_none, read_schema,
)
from mrm.batch.score_job import Scorer, ScoreSummary
from mrm.batch.weights import read_weights, warm_rows_batches
from mrm._io import atomic_dir
from mrm.checkpoint import Checkpoint

__all__ = ["adapt_users", "embed", "score"]

PathLike = Union[str, Path]


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError(
            "mrm.integrations.ray needs Ray Data: install the extra with `pip install 'mrm-fast[ray]'` "
            f"(import failed: {exc})"
        ) from None
    return ray


def _assigned_threads(threads: Optional[int]) -> int:
    """The kernel's thread count inside a Ray worker: the argument, else the CPUs Ray assigned."""
    if threads is not None:
        return threads
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(round(cpus)))


def _batches(table: pa.Table):
    return table.combine_chunks().to_batches() if table.num_rows else []


class _AdaptWorker:
    """Ray actor: one checkpoint (and warm-start table) load, then one :class:`_Adapter` call per batch."""

    def __init__(self, checkpoint_dir, schema, steps, lr, optimizer, threads, warm_start):
        checkpoint = Checkpoint.load(checkpoint_dir)
        self.adapter = Adapter(checkpoint, schema, steps=steps, lr=lr, optimizer=optimizer,
                               threads=_assigned_threads(threads))
        if warm_start is not None:
            self.adapter.warm = read_weights(warm_start, checkpoint.num_bases, self.adapter.dtype)

    def __call__(self, table: pa.Table) -> pa.Table:
        results = [self.adapter(b)[0] for b in _batches(table)]
        return pa.Table.from_batches(results, schema=self.adapter.schema)


class _ScoreWorker:
    """Ray actor: one checkpoint and weights-table load, then one :class:`_Scorer` call per batch."""

    def __init__(self, checkpoint_dir, schema, weights, threads):
        checkpoint = Checkpoint.load(checkpoint_dir)
        self.scorer = Scorer(checkpoint, schema, None, _assigned_threads(threads))
        if weights is not None:
            self.scorer.weights = read_weights(weights, checkpoint.num_bases, self.scorer.dtype)

    def __call__(self, table: pa.Table) -> pa.Table:
        results = [self.scorer(b)[0] for b in _batches(table)]
        return pa.Table.from_batches(results, schema=self.scorer.schema)


def _checkpoint_dir(checkpoint: Union[Checkpoint, PathLike]) -> Path:
    if isinstance(checkpoint, Checkpoint):
        if checkpoint.path is None:
            raise ValueError("the Ray jobs need a checkpoint saved to a directory (Checkpoint.save)")
        return Path(checkpoint.path)
    return Path(checkpoint)


def _workers(ray, workers: Optional[int], cpus_per_worker: float) -> int:
    if workers is not None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        return workers
    if not ray.is_initialized():
        ray.init()
    # Leave one CPU for the read and write tasks: actors holding every CPU starve them.
    return max(1, int((ray.cluster_resources().get("CPU", 1) - 1) // cpus_per_worker))


def _read_column(directory: Path, column: str) -> pa.ChunkedArray:
    files = parquet_files(directory)
    return pa.chunked_array([c for f in files for c in pq.read_table(f, columns=[column]).column(0).chunks],
                            type=pq.read_schema(files[0]).field(column).type)


class _Job:
    """One Ray job. Built in the driver, it checks what both jobs share before Ray starts any work
    (Ray, the output path, the batch size, the checkpoint and the logs' schema); :meth:`run` then
    sends the logs' batches of whole users through the worker actors."""

    def __init__(self, checkpoint, logs: PathLike, output: PathLike, overwrite: bool, batch_users: int,
                 workers: Optional[int], cpus_per_worker: float):
        self.ray = _import_ray()
        self.started = time.perf_counter()
        self.output = Path(output)
        if self.output.exists() and not overwrite:
            raise FileExistsError(f"{self.output} already exists (pass overwrite=True / --overwrite to replace it)")
        check_batch_users(batch_users)
        self.checkpoint_dir = _checkpoint_dir(checkpoint)
        self.checkpoint = Checkpoint.load(self.checkpoint_dir)
        self.schema = read_schema(parquet_files(logs))
        self.logs, self.overwrite, self.batch_users = logs, overwrite, batch_users
        self.workers, self.cpus_per_worker = workers, cpus_per_worker

    @contextmanager
    def run(self, worker: type, worker_args: tuple, job) -> Iterator[Path]:
        """Yields the temporary directory holding the Parquet files that the actors of ``worker``
        (built with ``worker_args``) wrote; it becomes ``output`` when the block succeeds. ``job``
        is the driver's own :class:`Adapter` or :class:`Scorer`: the columns to read, the schema of
        the output."""
        n_workers = _workers(self.ray, self.workers, self.cpus_per_worker)
        with atomic_dir(self.output, overwrite=self.overwrite) as tmp:
            dataset = self.ray.data.read_parquet(str(self.logs)).select_columns(job.columns)
            dataset = dataset.map_batches(
                worker,
                fn_constructor_args=(str(self.checkpoint_dir), self.schema, *worker_args),
                batch_size=self.batch_users,
                batch_format="pyarrow",
                concurrency=n_workers,
                num_cpus=self.cpus_per_worker,
            )
            dataset.write_parquet(str(tmp), **WRITE_OPTIONS)
            if not parquet_files_or_none(tmp):  # no users at all: still write a valid empty table
                pq.write_table(job.schema.empty_table(), tmp / "empty.parquet")
            yield tmp

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def _on_ray(local: Callable):
    """Gives a Ray job the signature of the local job ``local``, less ``progress``, plus
    ``workers`` and ``cpus_per_worker``: one place for the parameters, their defaults and their
    order. A call is bound and defaulted against it (an unknown or missing argument is a
    TypeError that names it), and the body receives every argument by name."""
    parameters = [p for name, p in inspect.signature(local).parameters.items() if name != "progress"]
    parameters += [
        inspect.Parameter("workers", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Optional[int]"),
        inspect.Parameter("cpus_per_worker", inspect.Parameter.KEYWORD_ONLY, default=1.0, annotation="float"),
    ]

    def wrap(body: Callable) -> Callable:
        signature = inspect.signature(local).replace(parameters=parameters,
                                                     return_annotation=inspect.signature(body).return_annotation)

        @functools.wraps(body)
        def job(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return body(**bound.arguments)

        job.__signature__ = signature
        return job

    return wrap


@_on_ray(adapt_job.adapt_users)
def adapt_users(checkpoint, logs, output, *, steps, lr, optimizer, threads, warm_start, overwrite, batch_users,
                workers, cpus_per_worker) -> AdaptSummary:
    """:func:`mrm.batch.adapt_users` on Ray Data; ``output`` is a directory of Parquet files.

    ``workers`` actors (default: (the cluster's CPUs − 1) / ``cpus_per_worker``, keeping one CPU
    for reading and writing) each run the kernel with ``threads`` threads (default: the CPUs Ray
    assigned to the actor, ``cpus_per_worker``).
    """
    job = _Job(checkpoint, logs, output, overwrite, batch_users, workers, cpus_per_worker)
    adapter = Adapter(job.checkpoint, job.schema, steps=steps, lr=lr, optimizer=optimizer, threads=1)  # checks inputs
    warm = read_weights(warm_start, job.checkpoint.num_bases, adapter.dtype) if warm_start is not None else None
    warm_path = None if warm_start is None else str(warm_start)
    copied = 0
    with job.run(_AdaptWorker, (steps, lr, optimizer, threads, warm_path), adapter) as tmp:
        user_ids = _read_column(tmp, USER)
        check_unique(list(user_ids.chunks), str(logs))
        versions = _read_column(tmp, "version").to_numpy()
        n_pairs = int(pc.sum(_read_column(tmp, "n_pairs")).as_py() or 0)
        if warm is not None:
            untouched = np.flatnonzero(~pc.is_in(warm.user_ids, value_set=user_ids.combine_chunks())
                                       .to_numpy(zero_copy_only=False))
            copied = len(untouched)
            if copied:
                unchanged = tmp / "warm-start-unchanged.parquet"
                with pq.ParquetWriter(unchanged, adapter.schema, **WRITE_OPTIONS) as writer:
                    for result in warm_rows_batches(adapter.schema, warm, untouched, batch_users):
                        writer.write_batch(result)
    return AdaptSummary(users=len(user_ids), pairs=n_pairs, seconds=job.seconds(), output=job.output,
                        warm_started=int((versions > 1).sum()), copied=copied)


@_on_ray(score_job.score)
def score(checkpoint, weights, logs, output, *, threads, overwrite, batch_users, workers, cpus_per_worker) -> ScoreSummary:
    """:func:`mrm.batch.score` on Ray Data; ``output`` is a directory of Parquet files."""
    job = _Job(checkpoint, logs, output, overwrite, batch_users, workers, cpus_per_worker)
    scorer = Scorer(job.checkpoint, job.schema, None, 1)  # checks the logs' columns before Ray starts
    if weights is not None:
        read_weights(weights, job.checkpoint.num_bases, scorer.dtype)  # checks the table once, in the driver
    n_pairs = n_candidates = 0
    with job.run(_ScoreWorker, (None if weights is None else str(weights), threads), scorer) as tmp:
        fallback = _read_column(tmp, "fallback")
        if scorer.pairs:
            n_pairs = int(pc.sum(pc.list_value_length(_read_column(tmp, "chosen_rewards"))).as_py() or 0)
        if scorer.candidates:
            n_candidates = int(pc.sum(pc.list_value_length(_read_column(tmp, "candidate_rewards"))).as_py() or 0)
    return ScoreSummary(users=len(fallback), pairs=n_pairs, candidates=n_candidates,
                        fallback_users=int(pc.sum(fallback).as_py() or 0), seconds=job.seconds(), output=job.output)


# ---- embeddings at scale ---------------------------------------------------------------------------


class _EmbedWorker:
    """Ray actor: one backbone load, then :meth:`EmbeddingCache.embed` per batch (its shards are
    written atomically into the shared cache directory)."""

    def __init__(self, cache_dir, model_path, cache_options):
        from mrm.embed import EmbeddingCache

        self.cache = EmbeddingCache(cache_dir, model_path, **cache_options)

    def __call__(self, table: pa.Table) -> pa.Table:
        import json

        prompts = [json.loads(p) for p in table.column("prompt").to_pylist()]
        responses = table.column("response").to_pylist()
        self.cache.embed(list(zip(prompts, responses)), progress=False)
        return pa.table({"done": pa.array([True] * len(responses))})


def embed(
    texts,
    backbone: PathLike,
    cache_dir: Optional[PathLike] = None,
    *,
    workers: Optional[int] = None,
    num_gpus: Optional[float] = None,
    cpus_per_worker: float = 1.0,
    batch_texts: int = 256,
    **cache_options,
) -> np.ndarray:
    """Embeddings (N, D) of (prompt, response) ``texts``, the texts missing from the cache computed
    by a Ray Data pipeline of backbone actors; the result equals :meth:`EmbeddingCache.embed`.

    ``backbone``: ``minilm`` / ``smollm2`` / a local model path; ``cache_dir`` (default
    :func:`mrm.embed.default_cache_dir`) must be visible to every worker (one machine, or shared
    storage). ``num_gpus`` per actor: default 1 when the cluster has GPUs, else 0. ``workers``:
    default the cluster's GPUs (with GPUs) or (CPUs − 1) / ``cpus_per_worker``. Only missing texts
    are sent to the actors, ``batch_texts`` at a time; ``cache_options`` go to
    :class:`~mrm.embed.EmbeddingCache` (``kind``, ``max_length``, ``dtype``, ``batch_size``...).
    """
    import json

    from mrm.embed import EmbeddingCache, backbone_path, default_cache_dir

    ray = _import_ray()
    model_path = backbone_path(backbone)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(backbone)
    if isinstance(batch_texts, bool) or not isinstance(batch_texts, int) or batch_texts < 1:
        raise ValueError(f"batch_texts must be a positive integer, got {batch_texts!r}")
    cache = EmbeddingCache(cache_dir, model_path, **cache_options)  # validates options and the cache
    items = [(p, r) for p, r in texts]
    cache._refresh_index()
    missing, seen = [], set()
    for prompt, response in items:
        key = cache.key(prompt, response)
        if key not in cache._index and key not in seen:
            seen.add(key)
            missing.append((prompt, response))
    if missing:
        if not ray.is_initialized():
            ray.init()
        resources = ray.cluster_resources()
        if num_gpus is None:
            num_gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
        if workers is None:
            workers = (max(1, int(resources.get("GPU", 1) // max(num_gpus, 1e-9))) if num_gpus
                       else max(1, int((resources.get("CPU", 1) - 1) // cpus_per_worker)))
        workers = max(1, min(int(workers), -(-len(missing) // batch_texts)))
        table = pa.table({"prompt": pa.array([json.dumps(p) for p, _ in missing]),
                          "response": pa.array([r for _, r in missing])})
        step = -(-len(missing) // workers)  # one block per worker, so every actor gets work
        dataset = ray.data.from_arrow([table.slice(lo, step) for lo in range(0, len(missing), step)])
        done = dataset.map_batches(
            _EmbedWorker, fn_constructor_args=(str(cache_dir), str(model_path), cache_options),
            batch_size=batch_texts, batch_format="pyarrow", concurrency=workers, num_cpus=cpus_per_worker,
            num_gpus=num_gpus,
        ).count()
        if done != len(missing):
            raise RuntimeError(f"the Ray embedding pipeline returned {done} of {len(missing)} texts")
    return cache.embed(items, progress=False)  # everything is cached now: read back in order
