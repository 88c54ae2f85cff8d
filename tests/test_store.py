"""The SQLite user store (mrm.store): atomic versioned updates, concurrent access, Parquet round trips,
and online adaptation checked against the autograd reference."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import reference
from mrm import batch, ops as mrm_ops, store as store_module
from mrm.checkpoint import Checkpoint
from mrm.ops import InnerLoop
from mrm.store import AdaptSettings, UserStore, adapt_online, laplace_covariance

K = 3


def _reference_replay(w0, blocks, settings):
    """Weights after applying each block of pairs in order, by the autograd reference."""
    w = torch.as_tensor(w0, dtype=torch.float64)
    for block in blocks:
        w = reference.adapt_user(w, torch.as_tensor(block), settings.steps, settings.lr, settings.optimizer).detach()
    return w.numpy()


def test_create_reopen_and_bad_opens(tmp_path):
    path = tmp_path / "users.db"
    with pytest.raises(ValueError, match="pass num_bases"):
        UserStore(path)
    with UserStore(path, K) as s:
        assert len(s) == 0 and s.num_bases == K
        assert s._writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with UserStore(path) as s:  # K read from the file
        assert s.num_bases == K
    with pytest.raises(ValueError, match="K = 3 weights, but K = 4"):
        UserStore(path, 4)
    with pytest.raises(FileNotFoundError):
        UserStore(tmp_path / "missing.db", readonly=True)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ValueError, match="junk.db"):
        UserStore(junk, K)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)").connection.commit()
    with pytest.raises(ValueError, match="pass num_bases to initialise"):
        UserStore(other)


def test_put_get_versions_and_errors(tmp_path):
    with UserStore(tmp_path / "u.db", K) as s:
        assert s.get("alice") is None
        first = s.put("alice", [0.1, 0.2, 0.3], n_pairs=4, support_loss=0.5)
        assert first.version == 1
        second = s.put("alice", [1.0, 0.0, -1.0])
        assert second.version == 2
        got = s.get("alice")
        np.testing.assert_array_equal(got.weights, [1.0, 0.0, -1.0])
        assert got.version == 2 and "alice" in s and s.user_ids() == ["alice"]
        with pytest.raises(ValueError, match="version 2, not 1"):
            s.put("alice", [0, 0, 0], expected_version=1)
        with pytest.raises(ValueError, match=r"shape \(3,\)"):
            s.put("bob", [0, 0])
        with pytest.raises(ValueError, match="non-finite"):
            s.put("bob", [0, np.nan, 0])
        with pytest.raises(TypeError, match="user_id must be a string"):
            s.put(7, [0, 0, 0])
        with pytest.raises(ValueError, match="non-empty"):
            s.get("")
        assert s.delete("alice") and not s.delete("alice")
    with UserStore(tmp_path / "u.db", readonly=True) as ro:
        with pytest.raises(ValueError, match="read-only"):
            ro.put("x", [0, 0, 0])


@pytest.mark.parametrize("optimizer,steps,lr", [("sgd", 3, 0.7), ("adam", 2, 0.05)])
def test_feedback_matches_reference_replay(tmp_path, optimizer, steps, lr):
    rng = np.random.default_rng(1)
    settings = AdaptSettings(InnerLoop(optimizer, steps=steps, lr=lr), prior_precision=0.5).validate()
    w0 = rng.normal(size=K)
    blocks = {u: [rng.normal(size=(rng.integers(1, 5), K)) for _ in range(3)] for u in ("a", "b")}
    with UserStore(tmp_path / "u.db", K) as s:
        # a's first two updates in one call (two versions), b's in separate calls, mixed order
        s.apply_feedback([("a", blocks["a"][0]), ("b", blocks["b"][0]), ("a", blocks["a"][1])], settings, w0)
        s.apply_feedback([("b", blocks["b"][1])], settings, w0)
        updates = s.apply_feedback([("b", blocks["b"][2]), ("a", blocks["a"][2])], settings, w0)
        assert [u.state.version for u in updates] == [3, 3]
        for user in ("a", "b"):
            state = s.get(user)
            np.testing.assert_allclose(state.weights, _reference_replay(w0, blocks[user], settings), rtol=0, atol=1e-12)
            assert state.n_pairs == sum(len(b) for b in blocks[user])
            np.testing.assert_array_equal(state.prior, w0)
            history, versions = s.history(user)
            np.testing.assert_array_equal(history, np.concatenate(blocks[user]))
            np.testing.assert_array_equal(versions, np.repeat([1, 2, 3], [len(b) for b in blocks[user]]))
            np.testing.assert_allclose(state.posterior, _laplace_by_autograd(state.weights, history, 0.5), atol=1e-12)


def _laplace_by_autograd(weights, d, lam):
    w = torch.as_tensor(weights, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda x: torch.softmax(x, 0), w)
    dt = torch.as_tensor(d)
    s = torch.sigmoid(dt @ torch.softmax(w, 0))
    a = (dt * (s * (1 - s))[:, None]).T @ dt
    return torch.linalg.inv(jac.T @ a @ jac + lam * torch.eye(len(w), dtype=torch.float64)).numpy()


def test_unknown_user_without_pairs_keeps_w0():
    settings = AdaptSettings()
    w0 = np.array([0.3, -0.1, 0.2])
    weights, losses, cov = adapt_online(settings, w0, [None], [np.zeros((0, K))])
    np.testing.assert_array_equal(weights[0], w0)
    assert losses[0] == 0 and cov is None
    np.testing.assert_allclose(laplace_covariance(w0, np.zeros((0, K)), 2.0), np.eye(K) / 2.0)


def test_failed_update_writes_nothing(tmp_path, monkeypatch):
    settings = AdaptSettings(InnerLoop("sgd", steps=1, lr=0.1))
    w0 = np.zeros(K)
    calls = {"n": 0}
    real = store_module.adapt_online

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom in the second round")
        return real(*args, **kwargs)

    with UserStore(tmp_path / "u.db", K) as s:
        monkeypatch.setattr(store_module, "adapt_online", failing)
        with pytest.raises(RuntimeError, match="boom"):
            s.apply_feedback([("a", np.ones((2, K))), ("a", np.ones((1, K)))], settings, w0)
        assert s.get("a") is None and len(s.history("a")[0]) == 0
        with pytest.raises(ValueError, match=r"feedback\[1\] \(user 'b'\).*shape"):
            s.apply_feedback([("a", np.ones((1, K))), ("b", np.ones((1, 2)))], settings, w0)
        with pytest.raises(ValueError, match="non-finite"):
            s.apply_feedback([("a", np.full((1, K), np.inf))], settings, w0)
        assert len(s) == 0


def test_readers_see_whole_updates_while_a_writer_runs(tmp_path):
    settings = AdaptSettings(InnerLoop("sgd", steps=1, lr=0.1))
    path = tmp_path / "u.db"
    stop = threading.Event()
    problems = []
    with UserStore(path, K) as writer:
        writer.put("u", np.zeros(K), version=0)

        def read():
            last = -1
            with UserStore(path, readonly=True) as reader:
                while not stop.is_set():
                    state = reader.get("u")
                    # weights are written as version * ones below: a torn row would break this
                    if not np.array_equal(state.weights, np.full(K, float(state.version))) or state.version < last:
                        problems.append((state.version, state.weights))
                    last = state.version

        threads = [threading.Thread(target=read) for _ in range(3)]
        for t in threads:
            t.start()
        for v in range(1, 60):
            writer.put("u", np.full(K, float(v)), version=v)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert not problems
        assert writer.get("u").version == 59
        del settings


def _write_many(path, worker, n):
    settings = AdaptSettings(InnerLoop("sgd", steps=1, lr=0.1))
    with UserStore(path, timeout=60) as s:
        for i in range(n):
            s.apply_feedback([("shared", np.full((1, K), worker + i / 100))], settings, np.zeros(K))


def test_two_writer_processes_never_lose_an_update(tmp_path):
    path = tmp_path / "u.db"
    UserStore(path, K, synchronous="NORMAL").close()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(path, w, 25)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    with UserStore(path, readonly=True) as s:
        state = s.get("shared")
        history, versions = s.history("shared")
        assert state.version == 50 and state.n_pairs == 50
        np.testing.assert_array_equal(versions, np.arange(1, 51))
        # replaying the history in version order gives the stored weights: no update was built on a stale state
        settings = AdaptSettings(InnerLoop("sgd", steps=1, lr=0.1))
        np.testing.assert_allclose(state.weights, _reference_replay(np.zeros(K), [h[None] for h in history], settings),
                                   atol=1e-12)


def test_parquet_round_trip_and_batch_interop(tmp_path):
    rng = np.random.default_rng(2)
    with UserStore(tmp_path / "u.db", K) as s:
        for i in range(7):
            s.put(f"user{i}", rng.normal(size=K), n_pairs=i, support_loss=0.1 * i, version=i + 1)
        assert s.export_parquet(tmp_path / "w.parquet") == 7
        with pytest.raises(FileExistsError):
            s.export_parquet(tmp_path / "w.parquet")
        table = batch.read_weights(tmp_path / "w.parquet", K, np.float64)
        assert table.user_ids.to_pylist() == [f"user{i}" for i in range(7)]
        for i in range(7):
            np.testing.assert_array_equal(table.weights[i], s.get(f"user{i}").weights)
        assert table.version.tolist() == list(range(1, 8)) and table.n_pairs.tolist() == list(range(7))
    with UserStore(tmp_path / "copy.db", K) as c:
        assert c.import_parquet(tmp_path / "w.parquet") == 7
        c.put("user0", np.zeros(K), version=50)  # newer here than in the table
        c.put("user1", np.zeros(K), version=1)  # older here than in the table (2)
        assert c.import_parquet(tmp_path / "w.parquet", on_conflict="newer") == 1
        assert c.get("user0").version == 50 and c.get("user1").version == 2
        assert c.import_parquet(tmp_path / "w.parquet", on_conflict="skip") == 0
        c.export_parquet(tmp_path / "w32.parquet", dtype=np.float32)
        assert pq.read_schema(tmp_path / "w32.parquet").field("weights").type.value_type == "float"
    with UserStore(tmp_path / "k4.db", 4) as wrong:
        with pytest.raises(ValueError, match="K = 4"):
            wrong.import_parquet(tmp_path / "w.parquet")
    with UserStore(tmp_path / "empty.db", K) as e:
        assert e.export_parquet(tmp_path / "empty.parquet") == 0
        assert len(batch.read_weights(tmp_path / "empty.parquet", K)) == 0


def test_import_adapt_users_output_and_score_with_export(tmp_path):
    """A store filled from `mrm adapt`'s table and exported again scores exactly as the table."""
    rng = np.random.default_rng(3)
    checkpoint = Checkpoint(input_dim=K, num_bases=K, hidden_sizes=[], scale=1.0, activation=None,
                            layers=[(np.eye(K), None)], w0=rng.normal(size=K))
    checkpoint.save(tmp_path / "model")
    offsets = np.array([0, 3, 5, 9])
    chosen, rejected = rng.normal(size=(9, K)), rng.normal(size=(9, K))
    pq.write_table(batch.user_major_table(["x", "y", "z"], offsets, chosen, rejected), tmp_path / "logs.parquet")
    batch.adapt_users(tmp_path / "model", tmp_path / "logs.parquet", tmp_path / "w.parquet", steps=2, lr=0.3,
                      optimizer="sgd", progress=False)
    with UserStore(tmp_path / "u.db", K) as s:
        assert s.import_parquet(tmp_path / "w.parquet") == 3
        s.export_parquet(tmp_path / "again.parquet")
    for name in ("w", "again"):
        batch.score(tmp_path / "model", tmp_path / f"{name}.parquet", tmp_path / "logs.parquet",
                    tmp_path / f"s-{name}.parquet", progress=False)
    a, b = pq.read_table(tmp_path / "s-w.parquet"), pq.read_table(tmp_path / "s-again.parquet")
    assert a.column("chosen_rewards").to_pylist() == b.column("chosen_rewards").to_pylist()


def test_map_settings_refit_every_pair_under_the_learned_prior():
    rng = np.random.default_rng(5)
    k = 3
    w0 = np.array([0.2, -0.1, 0.4])
    eta = (0.3, -0.2, 0.1)
    settings = AdaptSettings(InnerLoop("map", weight_map="linear"), eta=eta).validate()
    history = [rng.normal(size=(4, k)), np.zeros((0, k))]
    new = [rng.normal(size=(3, k)), rng.normal(size=(2, k))]
    start = [None, None]
    weights, _, covariances = adapt_online(settings, w0, start, new, histories=history)
    for u in range(2):
        rows = np.concatenate([history[u], new[u]])
        ref = mrm_ops.map_adapt(w0, np.array(eta), rows, np.array([0, len(rows)]), return_covariance=True,
                                inner=InnerLoop("map", weight_map="linear"))
        np.testing.assert_allclose(weights[u], ref.weights[0], atol=1e-10)
        np.testing.assert_allclose(covariances[u], ref.covariance[0], atol=1e-10)
    np.testing.assert_allclose(settings.prior_covariance(k), np.diag(np.exp(-np.array(eta))))
    with pytest.raises(ValueError, match="needs the checkpoint's prior"):
        AdaptSettings(InnerLoop("map")).validate()
