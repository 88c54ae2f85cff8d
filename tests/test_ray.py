"""The Ray Data pipelines (mrm.integrations.ray) give the local jobs' results."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from mrm import batch  # noqa: E402
from mrm.checkpoint import Checkpoint  # noqa: E402
from mrm.integrations import ray as mrm_ray  # noqa: E402

K = 4
D = 5


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    rng = np.random.default_rng(0)
    checkpoint = Checkpoint(
        input_dim=D, num_bases=K, hidden_sizes=[3], scale=0.3, activation="tanh",
        layers=[(rng.normal(size=(3, D)).astype(np.float32), rng.normal(size=3).astype(np.float32)),
                (rng.normal(size=(K, 3)).astype(np.float32), rng.normal(size=K).astype(np.float32))],
        w0=rng.normal(size=K).astype(np.float32),
    )
    checkpoint.save(root / "model")
    n_users = 60
    counts = rng.integers(0, 5, n_users)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    ids = [f"user{i:02d}" for i in range(n_users)]
    chosen = rng.normal(size=(offsets[-1], K)).astype(np.float32)
    rejected = rng.normal(size=(offsets[-1], K)).astype(np.float32)
    cand_counts = rng.integers(0, 3, n_users)
    cand_offsets = np.concatenate([[0], np.cumsum(cand_counts)])
    candidates = rng.normal(size=(cand_offsets[-1], K)).astype(np.float32)
    logs = root / "logs"
    logs.mkdir()
    table = batch.user_major_table(ids, offsets, chosen, rejected, candidates=candidates,
                                   candidate_offsets=cand_offsets)
    pq.write_table(table.slice(0, 30), logs / "part-0.parquet", row_group_size=7)
    pq.write_table(table.slice(30), logs / "part-1.parquet", row_group_size=7)
    # Embedding-form logs for a subset of users (φ applied inside the workers).
    e_chosen = rng.normal(size=(offsets[20], D)).astype(np.float32)
    e_rejected = rng.normal(size=(offsets[20], D)).astype(np.float32)
    pq.write_table(batch.user_major_table(ids[:20], offsets[:21], e_chosen, e_rejected, kind="embeddings"),
                   root / "embedding-logs.parquet", row_group_size=6)
    return root


def _sorted_rows(path):
    files = batch.parquet_files(path)
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    for row in rows:  # NaN != NaN: compare a marker instead
        row.update({k: "NaN" for k, v in row.items() if isinstance(v, float) and np.isnan(v)})
    return sorted(rows, key=lambda r: r["user_id"])


def test_ray_adapt_and_score_equal_local(data):
    model, logs = data / "model", data / "logs"
    local = batch.adapt_users(model, logs, data / "local-w.parquet", steps=3, lr=0.1, batch_users=8,
                              progress=False)
    remote = mrm_ray.adapt_users(model, logs, data / "ray-w", steps=3, lr=0.1, batch_users=5, workers=1)
    assert (remote.users, remote.pairs) == (local.users, local.pairs)
    assert _sorted_rows(data / "ray-w") == _sorted_rows(data / "local-w.parquet")  # bit-identical

    local_scores = batch.score(model, data / "local-w.parquet", logs, data / "local-s.parquet", progress=False)
    remote_scores = mrm_ray.score(model, data / "ray-w", logs, data / "ray-s", batch_users=5, workers=1)
    assert (remote_scores.users, remote_scores.pairs, remote_scores.candidates, remote_scores.fallback_users) == (
        local_scores.users, local_scores.pairs, local_scores.candidates, 0)
    assert _sorted_rows(data / "ray-s") == _sorted_rows(data / "local-s.parquet")

    with pytest.raises(FileExistsError):
        mrm_ray.score(model, data / "ray-w", logs, data / "ray-s")


def test_ray_warm_start_and_embeddings_equal_local(data):
    model = data / "model"
    base = data / "base-w.parquet"
    batch.adapt_users(model, data / "logs", base, steps=1, lr=0.1, progress=False)
    logs = data / "embedding-logs.parquet"
    local = batch.adapt_users(model, logs, data / "warm-local.parquet", steps=2, lr=0.1, warm_start=base,
                              progress=False)
    remote = mrm_ray.adapt_users(model, logs, data / "warm-ray", steps=2, lr=0.1, warm_start=base,
                                 batch_users=4, workers=1)
    assert (remote.users, remote.warm_started, remote.copied) == (local.users, local.warm_started, local.copied)
    assert (remote.warm_started, remote.copied) == (20, 40)
    got, want = _sorted_rows(data / "warm-ray"), _sorted_rows(data / "warm-local.parquet")
    assert [r["user_id"] for r in got] == [r["user_id"] for r in want]
    for a, b in zip(got, want):
        # φ is a matrix product whose last bits may depend on the batch's row count
        np.testing.assert_allclose(a.pop("weights"), b.pop("weights"), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(a.pop("support_loss"), b.pop("support_loss"), rtol=1e-6)
        assert a == b


def test_ray_jobs_take_the_local_jobs_arguments():
    """The Ray jobs have the local jobs' parameters and defaults (less ``progress``), plus the
    two Ray ones; a wrong argument is a TypeError that names it, before any work starts."""
    import inspect

    for remote, local in [(mrm_ray.adapt_users, batch.adapt_users), (mrm_ray.score, batch.score)]:
        theirs = {n: p.default for n, p in inspect.signature(local).parameters.items() if n != "progress"}
        ours = dict((n, p.default) for n, p in inspect.signature(remote).parameters.items())
        assert ours == {**theirs, "workers": None, "cpus_per_worker": 1.0}
    with pytest.raises(TypeError, match="progress"):
        mrm_ray.score("model", None, "logs", "out", progress=False)
    with pytest.raises(TypeError, match="steps"):
        mrm_ray.adapt_users("model", "logs", "out", lr=0.1)
