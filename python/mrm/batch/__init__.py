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

Modules (the package's internal API, which :mod:`mrm.integrations.ray`, :mod:`mrm.store` and
:mod:`mrm.cli` use; everything above is re-exported here):

* :mod:`mrm.batch.parquet` — the files of a path, record batches of whole users, read-ahead,
  the output and batch-size checks.
* :mod:`mrm.batch.arrow` — column names, Arrow → numpy CSR, the feature readers (φ applied to
  embeddings), errors that name the user, CSR → Arrow list arrays.
* :mod:`mrm.batch.weights` — the user-weights table: :class:`WeightsTable`, read and write.
* :mod:`mrm.batch.adapt_job` — :func:`adapt_users` and its per-batch ``Adapter``.
* :mod:`mrm.batch.score_job` — :func:`score` and its per-batch ``Scorer``.
* :mod:`mrm.batch.user_major` — builders of user-major logs.
"""

from mrm.batch.adapt_job import Adapter, AdaptSummary, adapt_users
from mrm.batch.arrow import CANDIDATE_COLUMNS, PAIR_COLUMNS, USER, Features, check_unique  # noqa: F401
from mrm.batch.parquet import DEFAULT_BATCH_USERS, WRITE_OPTIONS, parquet_files, parquet_files_or_none  # noqa: F401
from mrm.batch.parquet import check_batch_users, check_output, read_ahead, read_schema
from mrm.batch.score_job import Scorer, ScoreSummary, score
from mrm.batch.user_major import pairs_to_user_major, preference_data_to_user_major, user_major_table
from mrm.batch.weights import WeightsTable, read_weights, warm_rows_batches, weights_batch, weights_schema

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

# The names these helpers had when mrm.batch was one module, for code that still uses them.
_Adapter, _Scorer, _Features = Adapter, Scorer, Features
_read_ahead, _schema, _check_output, _check_batch_users, _check_unique = (
    read_ahead, read_schema, check_output, check_batch_users, check_unique)
_weights_schema, _weights_batch, _warm_rows_batches = weights_schema, weights_batch, warm_rows_batches
