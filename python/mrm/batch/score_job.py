"""The score job: :func:`score` over local files, and :class:`Scorer`, the per-batch computation
that it and the Ray job (:mod:`mrm.integrations.ray`) share.

(The module is not called ``score``: :mod:`mrm.batch` exports the function :func:`score`.)
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
from mrm.batch.arrow import (
    CANDIDATE_COLUMNS, PAIR_COLUMNS, USER, Features, as_checkpoint, batch_user_ids, explained, list_array, pick_source,
)
from mrm.batch.parquet import DEFAULT_BATCH_USERS, JobSummary, job_output, job_results, read_schema, start_job
from mrm.batch.weights import WeightsTable, read_weights
from mrm.checkpoint import Checkpoint

PathLike = Union[str, Path]

@dataclass(frozen=True)
class ScoreSummary(JobSummary):
    """What :func:`score` did: the users and pairs scored, and"""

    candidates: int = 0
    """Candidate responses scored."""
    fallback_users: int = 0
    """Users absent from the weights table, scored with the shared start w0."""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x)).astype(x.dtype, copy=False)


class Scorer:
    """Scores one batch of user-major logs: the shared part of the local and Ray jobs."""

    def __init__(self, checkpoint: Checkpoint, schema: pa.Schema, weights: Optional[WeightsTable], threads: int):
        self.checkpoint = checkpoint
        self.threads = threads
        self.weight_map = checkpoint.weight_map
        pair_kind = pick_source(schema, PAIR_COLUMNS, "pair", required=False)
        candidate_kind = pick_source(schema, CANDIDATE_COLUMNS, "candidate", required=False)
        if pair_kind is None and candidate_kind is None:
            raise ValueError(
                f"the logs have nothing to score: expected {list(PAIR_COLUMNS['features'])}, "
                f"{list(PAIR_COLUMNS['embeddings'])}, {CANDIDATE_COLUMNS['features']!r} or "
                f"{CANDIDATE_COLUMNS['embeddings']!r} columns (found {schema.names})"
            )
        self.pairs = Features(checkpoint, schema, pair_kind, PAIR_COLUMNS[pair_kind]) if pair_kind else None
        self.candidates = (
            Features(checkpoint, schema, candidate_kind, [CANDIDATE_COLUMNS[candidate_kind]]) if candidate_kind else None
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
        user_ids = batch_user_ids(batch)
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
            with explained([self.pairs, self.candidates], batch, user_ids):
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
                columns += [list_array(mean, offsets), list_array(std, offsets)]
            else:
                columns.append(list_array(rewards(rows_k, offsets), offsets))
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
            columns += [list_array(chosen_rewards, offsets), list_array(rejected_rewards, offsets),
                        list_array(p_chosen, offsets), pa.array(accuracy, pa.float64())]
            if margin_std is not None:
                columns.append(list_array(margin_std.astype(self.dtype), offsets))
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
    checkpoint = as_checkpoint(checkpoint)
    output, files = start_job(logs, output, overwrite, batch_users)
    threads = ops.resolve_threads(threads)
    scorer = Scorer(checkpoint, read_schema(files), None, threads)
    if weights is not None:
        scorer.weights = read_weights(weights, checkpoint.num_bases, scorer.dtype)

    n_users = n_pairs = n_candidates = n_fallback = 0
    with job_output(output, scorer.schema, files, "score", progress) as (writer, bar):
        for result, pairs, candidates in job_results(scorer, files, scorer.columns, batch_users):
            writer.write_batch(result)
            n_users += len(result)
            n_pairs += pairs
            n_candidates += candidates
            n_fallback += int(pc.sum(result.column(len(result.schema) - 1)).as_py() or 0)
            bar.update(len(result))
    return ScoreSummary(users=n_users, pairs=n_pairs, candidates=n_candidates, fallback_users=n_fallback,
                        seconds=time.perf_counter() - started, output=output)
