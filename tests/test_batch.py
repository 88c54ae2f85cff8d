"""Production batch jobs (mrm.batch, mrm.checkpoint, mrm.cli) against independent references:
one in-memory ops.adapt call, the torch MetaRewardModel, and hand-built grouping."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mrm import batch, ops
from mrm.checkpoint import Checkpoint

torch = pytest.importorskip("torch")
from mrm.model import MetaRewardModel, ModelConfig  # noqa: E402

K = 3
D = 6


def _torch_checkpoint(directory, *, hidden=(5,), bias=True, activation="gelu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = MetaRewardModel(ModelConfig(input_dim=D, num_bases=K, hidden_sizes=list(hidden), bias=bias,
                                        activation=activation, scale=0.5))
    with torch.no_grad():
        model.shared_weight.copy_(torch.randn(K))
    model = model.to(dtype)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    model = _torch_checkpoint(directory)
    return directory, model


def _features_logs(n_users=40, seed=1, dtype=np.float32, max_pairs=6, prefix="user"):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, max_pairs + 1, n_users)
    counts[0] = 0  # a user without pairs keeps w0
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    chosen = rng.normal(size=(offsets[-1], K)).astype(dtype)
    rejected = rng.normal(size=(offsets[-1], K)).astype(dtype)
    ids = [f"{prefix}{i:03d}" for i in range(n_users)]
    return ids, offsets, chosen, rejected


def _write(table, path, row_group_size=3):
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def _weights_by_user(path):
    table = pq.read_table(path)
    return {row["user_id"]: row for row in table.to_pylist()}


# ---- checkpoint ----------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "tanh"])
@pytest.mark.parametrize("bias", [False, True])
def test_checkpoint_features_equal_torch(tmp_path, activation, bias):
    hidden = (7, 4) if activation else (4,)
    model = _torch_checkpoint(tmp_path / "m", hidden=hidden, bias=bias, activation=activation)
    checkpoint = Checkpoint.load(tmp_path / "m")
    assert checkpoint.num_bases == K and checkpoint.input_dim == D
    np.testing.assert_array_equal(checkpoint.w0, model.shared_weight.detach().numpy())
    embeddings = np.random.default_rng(0).normal(size=(50, D)).astype(np.float32) * 3
    with torch.no_grad():
        expected = model.features(torch.from_numpy(embeddings)).numpy()
    np.testing.assert_allclose(checkpoint.features(embeddings), expected, rtol=1e-5, atol=1e-6)


def test_checkpoint_features_float64_equal_torch(tmp_path):
    model = _torch_checkpoint(tmp_path / "m", hidden=(5,), activation="gelu", dtype=torch.float64)
    checkpoint = Checkpoint.load(tmp_path / "m")
    assert checkpoint.dtype == np.float64
    embeddings = np.random.default_rng(1).normal(size=(20, D))
    with torch.no_grad():
        expected = model.features(torch.from_numpy(embeddings)).numpy()
    np.testing.assert_allclose(checkpoint.features(embeddings), expected, rtol=1e-12, atol=1e-14)


def test_checkpoint_save_roundtrip_loads_in_torch(tmp_path, model_dir):
    checkpoint = Checkpoint.load(model_dir[0])
    checkpoint.save(tmp_path / "copy")
    again = MetaRewardModel.from_pretrained(tmp_path / "copy")
    e = torch.randn(4, D)
    with torch.no_grad():
        torch.testing.assert_close(again.features(e), model_dir[1].features(e))


def test_checkpoint_bad_files(tmp_path, model_dir):
    source = model_dir[0]
    with pytest.raises(FileNotFoundError, match="not found"):
        Checkpoint.load(tmp_path / "nothing")

    def copy(name):
        target = tmp_path / name
        target.mkdir()
        for f in source.iterdir():
            (target / f.name).write_bytes(f.read_bytes())
        return target

    missing = copy("missing")
    (missing / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Checkpoint.load(missing)

    truncated = copy("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        Checkpoint.load(truncated)

    bad_json = copy("bad_json")
    (bad_json / "config.json").write_text('{"format": "mrm-fast/meta-reward-model", "input_')
    with pytest.raises(ValueError, match="not valid JSON"):
        Checkpoint.load(bad_json)

    wrong_format = copy("wrong_format")
    (wrong_format / "config.json").write_text('{"format": "something-else", "input_dim": 6}')
    with pytest.raises(ValueError, match="not an mrm-fast model config"):
        Checkpoint.load(wrong_format)

    wrong_shape = copy("wrong_shape")
    text = (wrong_shape / "config.json").read_text().replace('"input_dim": 6', '"input_dim": 9')
    (wrong_shape / "config.json").write_text(text)
    with pytest.raises(ValueError, match=r"layers.0.weight has shape \(5, 6\) but config.json implies \(5, 9\)"):
        Checkpoint.load(wrong_shape)

    no_bias = copy("no_bias")
    text = (no_bias / "config.json").read_text().replace('"bias": true', '"bias": false')
    (no_bias / "config.json").write_text(text)
    with pytest.raises(ValueError, match="unexpected tensors"):
        Checkpoint.load(no_bias)


# ---- adapt ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer,lr,dtype", [("adam", 0.05, np.float32), ("sgd", 0.5, np.float64)])
def test_streaming_adapt_equals_one_in_memory_call(tmp_path, model_dir, optimizer, lr, dtype):
    ids, offsets, chosen, rejected = _features_logs(dtype=dtype)
    logs = _write(batch.user_major_table(ids, offsets, chosen, rejected), tmp_path / "logs.parquet")
    assert pq.ParquetFile(logs).num_row_groups > 5
    summary = batch.adapt_users(model_dir[0], logs, tmp_path / "w.parquet", steps=4, lr=lr, optimizer=optimizer,
                                batch_users=2, threads=2, progress=False)
    assert (summary.users, summary.pairs) == (len(ids), offsets[-1])

    w0 = model_dir[1].shared_weight.detach().numpy().astype(dtype)
    differences = chosen - rejected
    expected = ops.adapt(w0, differences, offsets, steps=4, lr=lr, optimizer=optimizer)
    table = pq.read_table(tmp_path / "w.parquet")
    assert table.column("user_id").to_pylist() == ids
    got = np.array(table.column("weights").to_pylist(), dtype=dtype)
    np.testing.assert_array_equal(got, expected)  # streaming changes nothing, bit for bit
    np.testing.assert_array_equal(table.column("n_pairs").to_numpy(), np.diff(offsets))
    np.testing.assert_array_equal(table.column("version").to_numpy(), 1)
    np.testing.assert_array_equal(got[0], w0)  # the user without pairs

    # support_loss: the kernel's support loss at the adapted weights (users with pairs), 0 without
    has = np.diff(offsets) > 0
    keep = np.concatenate([[0], np.cumsum(np.diff(offsets)[has])])
    rows = np.concatenate([np.arange(offsets[u], offsets[u + 1]) for u in np.flatnonzero(has)])
    reference = ops.meta_forward(w0, differences[rows], keep, differences[rows], keep, steps=4, lr=lr,
                                 optimizer=optimizer)
    losses = table.column("support_loss").to_numpy()
    np.testing.assert_allclose(losses[has], reference.support_losses, rtol=1e-5 if dtype == np.float32 else 1e-12)
    assert np.all(losses[~has] == 0)


def test_warm_start_updates_only_users_with_new_pairs(tmp_path, model_dir):
    ids, offsets, chosen, rejected = _features_logs(n_users=30, seed=2)
    first = _write(batch.user_major_table(ids, offsets, chosen, rejected), tmp_path / "day1.parquet")
    weights = tmp_path / "weights.parquet"
    batch.adapt_users(model_dir[0], first, weights, steps=2, lr=0.1, batch_users=4, progress=False)
    before = _weights_by_user(weights)

    # Day 2: new pairs for 5 known users and 3 new users.
    rng = np.random.default_rng(3)
    new_ids = [ids[3], ids[7], ids[11], ids[20], ids[29], "new-a", "new-b", "new-c"]
    counts = rng.integers(1, 5, len(new_ids))
    new_offsets = np.concatenate([[0], np.cumsum(counts)])
    c2 = rng.normal(size=(new_offsets[-1], K)).astype(np.float32)
    r2 = rng.normal(size=(new_offsets[-1], K)).astype(np.float32)
    second = _write(batch.user_major_table(new_ids, new_offsets, c2, r2), tmp_path / "day2.parquet")
    # Updated in place: the output is the warm-start table itself.
    summary = batch.adapt_users(model_dir[0], second, weights, steps=2, lr=0.1, warm_start=weights,
                                overwrite=True, batch_users=3, progress=False)
    assert (summary.users, summary.warm_started, summary.copied) == (8, 5, 25)
    after = _weights_by_user(weights)
    assert set(after) == set(ids) | {"new-a", "new-b", "new-c"}

    w0 = model_dir[1].shared_weight.detach().numpy()
    start = np.array([before[u]["weights"] if u in before else w0 for u in new_ids], dtype=np.float32)
    expected = ops.adapt(start, c2 - r2, new_offsets, steps=2, lr=0.1)
    for i, user in enumerate(new_ids):
        np.testing.assert_array_equal(np.float32(after[user]["weights"]), expected[i])
        assert after[user]["n_pairs"] == counts[i]
        assert after[user]["version"] == (2 if user in before else 1)
    for user in set(ids) - set(new_ids):
        assert after[user] == before[user]  # copied through unchanged


def test_pairs_to_user_major_groups_by_user(tmp_path, model_dir):
    rng = np.random.default_rng(4)
    users = rng.choice(["carol", "alice", "bob", "dave"], size=25)
    chosen = rng.normal(size=(25, K)).astype(np.float32)
    rejected = rng.normal(size=(25, K)).astype(np.float32)
    import pandas as pd

    frame = pd.DataFrame({"user_id": users, "chosen": list(chosen), "rejected": list(rejected), "note": "x"})
    logs = batch.pairs_to_user_major(frame, tmp_path / "logs.parquet", row_group_users=2)
    table = pq.read_table(logs)
    assert table.column("user_id").to_pylist() == sorted(set(users))
    for row in table.to_pylist():
        mine = np.flatnonzero(users == row["user_id"])  # input order kept within a user
        np.testing.assert_array_equal(np.float32(row["chosen_features"]), chosen[mine])
        np.testing.assert_array_equal(np.float32(row["rejected_features"]), rejected[mine])
    with pytest.raises(FileExistsError):
        batch.pairs_to_user_major(frame, logs)


# ---- score ---------------------------------------------------------------------------------------


def test_score_embeddings_matches_torch_reward(tmp_path, model_dir):
    directory, model = model_dir
    rng = np.random.default_rng(5)
    ids = [f"u{i}" for i in range(12)]
    pair_counts = rng.integers(1, 4, len(ids))
    pair_offsets = np.concatenate([[0], np.cumsum(pair_counts)])
    cand_counts = rng.integers(0, 4, len(ids))
    cand_offsets = np.concatenate([[0], np.cumsum(cand_counts)])
    e_chosen = rng.normal(size=(pair_offsets[-1], D)).astype(np.float32)
    e_rejected = rng.normal(size=(pair_offsets[-1], D)).astype(np.float32)
    e_candidates = rng.normal(size=(cand_offsets[-1], D)).astype(np.float32)
    table = batch.user_major_table(ids, pair_offsets, e_chosen, e_rejected, kind="embeddings",
                                   candidates=e_candidates, candidate_offsets=cand_offsets)
    logs = _write(table, tmp_path / "logs.parquet")

    weights = tmp_path / "w.parquet"
    batch.adapt_users(directory, logs, weights, steps=3, lr=0.1, batch_users=5, progress=False)
    # Drop two users from the weights table: they must fall back to w0 and be counted.
    full = pq.read_table(weights)
    pq.write_table(full.filter(pa.compute.invert(pa.compute.is_in(full["user_id"], pa.array(["u2", "u9"])))),
                   tmp_path / "partial.parquet")
    summary = batch.score(directory, tmp_path / "partial.parquet", logs, tmp_path / "scores.parquet",
                          batch_users=5, progress=False)
    assert (summary.users, summary.pairs, summary.candidates, summary.fallback_users) == (
        12, pair_offsets[-1], cand_offsets[-1], 2)

    # Reference: torch adaptation (MetaRewardModel.adapt) and torch rewards.
    embeddings = torch.from_numpy(np.concatenate([e_chosen, e_rejected]))
    n = pair_offsets[-1]
    adapted = model.adapt(embeddings, np.arange(n), np.arange(n, 2 * n), pair_offsets, steps=3, lr=0.1)
    np.testing.assert_allclose(np.array(full.column("weights").to_pylist()), adapted, rtol=1e-4, atol=1e-5)
    scores = pq.read_table(tmp_path / "scores.parquet").to_pylist()
    for u, row in enumerate(scores):
        fallback = row["user_id"] in ("u2", "u9")
        assert row["fallback"] == fallback
        w = None if fallback else torch.from_numpy(adapted[u])
        with torch.no_grad():
            rc = model.reward(torch.from_numpy(e_chosen[pair_offsets[u]:pair_offsets[u + 1]]), w)
            rr = model.reward(torch.from_numpy(e_rejected[pair_offsets[u]:pair_offsets[u + 1]]), w)
            rk = model.reward(torch.from_numpy(e_candidates[cand_offsets[u]:cand_offsets[u + 1]]), w)
        np.testing.assert_allclose(row["chosen_rewards"], rc.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(row["rejected_rewards"], rr.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(row["candidate_rewards"], rk.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(row["p_chosen"], torch.sigmoid(rc - rr).numpy(), rtol=1e-4, atol=1e-5)
        assert row["accuracy"] == pytest.approx(float((rc > rr).float().mean()))


def test_score_without_weights_uses_w0_for_everyone(tmp_path, model_dir):
    ids, offsets, chosen, rejected = _features_logs(n_users=6, seed=6)
    logs = _write(batch.user_major_table(ids, offsets, chosen, rejected), tmp_path / "logs.parquet")
    summary = batch.score(model_dir[0], None, logs, tmp_path / "s.parquet", progress=False)
    assert summary.fallback_users == 6
    p = torch.softmax(model_dir[1].shared_weight.detach(), -1).numpy()
    got = np.concatenate([r for r in pq.read_table(tmp_path / "s.parquet").column("chosen_rewards").to_pylist()])
    np.testing.assert_allclose(got, chosen @ p, rtol=1e-5, atol=1e-6)


# ---- kill and rerun ------------------------------------------------------------------------------

_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import mrm.ops
    real_adapt, calls = mrm.ops.adapt, []
    def adapt_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the first batch has been written; die like a preempted job
            os.kill(os.getpid(), signal.SIGKILL)
        return real_adapt(*args, **kwargs)
    mrm.ops.adapt = adapt_then_die
    from mrm.batch import adapt_users
    adapt_users(sys.argv[1], sys.argv[2], sys.argv[3], steps=2, lr=0.1, batch_users=4, overwrite=True,
                progress=False)
""")


def _env():
    """The subprocess imports the installed mrm-fast, as a user's would (not the source tree,
    which has no compiled extension in a clean checkout)."""
    return dict(os.environ)


@pytest.mark.parametrize("old_output", [False, True])
def test_killed_adapt_leaves_no_partial_output_and_reruns(tmp_path, model_dir, old_output):
    ids, offsets, chosen, rejected = _features_logs(n_users=40, seed=7)
    logs = _write(batch.user_major_table(ids, offsets, chosen, rejected), tmp_path / "logs.parquet")
    output = tmp_path / "out" / "weights.parquet"
    output.parent.mkdir()
    if old_output:
        output.write_bytes(b"the previous table")
    script = tmp_path / "killed.py"
    script.write_text(_KILLED_RUN)
    run = subprocess.run([sys.executable, str(script), str(model_dir[0]), str(logs), str(output)],
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stderr
    if old_output:
        assert output.read_bytes() == b"the previous table"
    else:
        assert not output.exists()
    assert [p.name for p in output.parent.iterdir() if p.name.endswith(".parquet")] == (
        ["weights.parquet"] if old_output else [])

    summary = batch.adapt_users(model_dir[0], logs, output, steps=2, lr=0.1, batch_users=4, overwrite=True,
                                progress=False)
    assert summary.users == 40
    expected = ops.adapt(model_dir[1].shared_weight.detach().numpy(), chosen - rejected, offsets, steps=2, lr=0.1)
    np.testing.assert_array_equal(np.array(pq.read_table(output).column("weights").to_pylist(), np.float32), expected)


# ---- CLI -----------------------------------------------------------------------------------------


def _mrm(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "mrm.cli", *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=120, **kwargs)


def test_cli_end_to_end(tmp_path, model_dir):
    ids, offsets, chosen, rejected = _features_logs(n_users=15, seed=8)
    logs = _write(batch.user_major_table(ids, offsets, chosen, rejected), tmp_path / "logs.parquet")
    help_run = _mrm("--help")
    assert help_run.returncode == 0 and "adapt" in help_run.stdout and "score" in help_run.stdout
    assert _mrm("adapt", "--help").returncode == 0

    run = _mrm("adapt", "--checkpoint", model_dir[0], "--logs", logs, "--output", tmp_path / "w.parquet",
               "--steps", 3, "--lr", 0.05, "--threads", 1, "--no-progress")
    assert run.returncode == 0, run.stderr
    assert "adapted 15 users" in run.stdout
    expected = ops.adapt(model_dir[1].shared_weight.detach().numpy(), chosen - rejected, offsets, steps=3, lr=0.05)
    np.testing.assert_array_equal(
        np.array(pq.read_table(tmp_path / "w.parquet").column("weights").to_pylist(), np.float32), expected)

    run = _mrm("score", "--checkpoint", model_dir[0], "--weights", tmp_path / "w.parquet", "--logs", logs,
               "--output", tmp_path / "s.parquet", "--no-progress")
    assert run.returncode == 0, run.stderr
    assert "scored 15 users" in run.stdout and "0 without weights" in run.stdout
    p = np.exp(expected) / np.exp(expected).sum(1, keepdims=True)
    got = pq.read_table(tmp_path / "s.parquet").column("chosen_rewards").to_pylist()
    for u in range(15):
        np.testing.assert_allclose(got[u], chosen[offsets[u]:offsets[u + 1]] @ p[u], rtol=1e-5, atol=1e-6)

    # An existing output without --overwrite: exit 2, one line, no traceback.
    run = _mrm("score", "--checkpoint", model_dir[0], "--weights", tmp_path / "w.parquet", "--logs", logs,
               "--output", tmp_path / "s.parquet", "--no-progress")
    assert run.returncode == 2
    assert run.stderr.startswith("mrm: error: ") and "already exists" in run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    run = _mrm("adapt", "--checkpoint", tmp_path / "no-model", "--logs", logs, "--output", tmp_path / "x.parquet")
    assert run.returncode == 2 and run.stderr.startswith("mrm: error: ") and "Traceback" not in run.stderr


# ---- bad input -----------------------------------------------------------------------------------


def _adapt(model_dir, logs, output, **kwargs):
    return batch.adapt_users(model_dir[0], logs, output, steps=1, lr=0.1, progress=False, **kwargs)


def test_bad_parquet_files(tmp_path, model_dir):
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all" * 10)
    with pytest.raises(ValueError, match="garbage.parquet is not a readable Parquet file"):
        _adapt(model_dir, garbage, tmp_path / "o.parquet")
    ids, offsets, chosen, rejected = _features_logs(n_users=50, seed=9)
    good = _write(batch.user_major_table(ids, offsets, chosen, rejected), tmp_path / "good.parquet")
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        _adapt(model_dir, truncated, tmp_path / "o.parquet")
    with pytest.raises(FileNotFoundError):
        _adapt(model_dir, tmp_path / "missing.parquet", tmp_path / "o.parquet")
    assert not (tmp_path / "o.parquet").exists()


def _nested(rows):
    return pa.array(rows, type=pa.list_(pa.list_(pa.float32())))


def test_list_length_mismatch_names_user(tmp_path, model_dir):
    table = pa.table({
        "user_id": ["ann", "bob"],
        "chosen_features": _nested([[[1, 2, 3]], [[1, 2, 3], [0, 0, 1]]]),
        "rejected_features": _nested([[[0, 2, 3]], [[1, 2, 2]]]),
    })
    logs = _write(table, tmp_path / "logs.parquet")
    with pytest.raises(ValueError, match=r"user 'bob' has 2 entries in 'chosen_features' but 1 in 'rejected_features'"):
        _adapt(model_dir, logs, tmp_path / "o.parquet")
    assert not (tmp_path / "o.parquet").exists()


def test_nan_feature_names_user(tmp_path, model_dir):
    table = pa.table({
        "user_id": ["ann", "bob", "cid"],
        "chosen_features": _nested([[[1, 2, 3]], [[1, 2, 3]], [[1, 2, 3], [1, float("nan"), 3]]]),
        "rejected_features": _nested([[[0, 2, 3]], [[1, 2, 2]], [[1, 2, 2], [0, 0, 0]]]),
    })
    logs = _write(table, tmp_path / "logs.parquet", row_group_size=1)
    with pytest.raises(ValueError, match=r"'chosen_features': user 'cid' has a NaN.*pair/response 1"):
        _adapt(model_dir, logs, tmp_path / "o.parquet", batch_users=1)
    with pytest.raises(ValueError, match="user 'cid' has a NaN"):
        batch.score(model_dir[0], None, logs, tmp_path / "s.parquet", progress=False)


def test_infinite_embedding_is_an_error_even_where_phi_would_hide_it(tmp_path):
    # tanh maps an infinite input to a finite feature: the embeddings themselves must be checked
    directory = tmp_path / "tanh"
    _torch_checkpoint(directory, hidden=(4,), activation="tanh")
    row = [0.5] * D
    bad = [float("inf")] + [0.5] * (D - 1)
    table = pa.table({
        "user_id": ["ann", "bob"],
        "chosen_embeddings": _nested([[row], [row, bad]]),
        "rejected_embeddings": _nested([[row], [row, row]]),
    })
    logs = _write(table, tmp_path / "logs.parquet")
    with pytest.raises(ValueError, match=r"'chosen_embeddings': user 'bob' has a NaN, infinite or null value"):
        batch.adapt_users(directory, logs, tmp_path / "o.parquet", steps=2, lr=0.1, progress=False)
    assert not (tmp_path / "o.parquet").exists()
    with pytest.raises(ValueError, match="user 'bob' has a NaN, infinite or null value"):
        batch.score(directory, None, logs, tmp_path / "s.parquet", progress=False)


def test_k_mismatch(tmp_path, model_dir):
    table = pa.table({
        "user_id": ["ann"],
        "chosen_features": _nested([[[1, 2, 3, 4]]]),
        "rejected_features": _nested([[[0, 2, 3, 4]]]),
    })
    logs = _write(table, tmp_path / "logs.parquet")
    with pytest.raises(ValueError, match=r"user 'ann' has a 4-dim vector, but the checkpoint has K \(num_bases\) = 3"):
        _adapt(model_dir, logs, tmp_path / "o.parquet")
    # Embeddings of the wrong width name D.
    table = pa.table({"user_id": ["ann"], "candidate_embeddings": _nested([[[1.0] * (D + 1)]])})
    logs = _write(table, tmp_path / "cand.parquet")
    with pytest.raises(ValueError, match=r"D \(input_dim\) = 6"):
        batch.score(model_dir[0], None, logs, tmp_path / "s.parquet", progress=False)
    # A weights table with another K.
    weights = pa.table({"user_id": ["ann"], "weights": pa.array([[0.0, 1.0]], pa.list_(pa.float32())),
                        "n_pairs": [1], "support_loss": [0.5], "version": [1]})
    pq.write_table(weights, tmp_path / "w.parquet")
    ids, offsets, chosen, rejected = _features_logs(n_users=3)
    good = _write(batch.user_major_table(ids, offsets, chosen, rejected), tmp_path / "good.parquet")
    with pytest.raises(ValueError, match="user 'ann' has 2 weights but the checkpoint has K = 3"):
        batch.score(model_dir[0], tmp_path / "w.parquet", good, tmp_path / "s.parquet", progress=False)


def test_existing_output_and_other_bad_input(tmp_path, model_dir):
    ids, offsets, chosen, rejected = _features_logs(n_users=5)
    logs = _write(batch.user_major_table(ids, offsets, chosen, rejected), tmp_path / "logs.parquet")
    output = tmp_path / "o.parquet"
    output.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        _adapt(model_dir, logs, output)
    with pytest.raises(FileExistsError, match="already exists"):
        batch.score(model_dir[0], None, logs, output, progress=False)
    assert output.read_bytes() == b"keep me"

    no_pairs = _write(pa.table({"user_id": ["a"], "other": [1]}), tmp_path / "nopairs.parquet")
    with pytest.raises(ValueError, match="chosen_features"):
        _adapt(model_dir, no_pairs, tmp_path / "x.parquet")

    twice = pa.concat_tables([batch.user_major_table(ids, offsets, chosen, rejected)] * 2)
    with pytest.raises(ValueError, match="user 'user000' has more than one row"):
        _adapt(model_dir, _write(twice, tmp_path / "twice.parquet"), tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()

    with pytest.raises(ValueError, match="lr must be"):
        batch.adapt_users(model_dir[0], logs, tmp_path / "x.parquet", steps=1, lr=-1.0, progress=False)


def test_preference_data_to_user_major_writes_every_pair_of_every_user(tmp_path, model_dir):
    from mrm.data.pairs import PreferenceData, UserPairs

    rng = np.random.default_rng(5)
    n_texts = 30
    texts = [("p", f"r{i}") for i in range(n_texts)]
    train_lists, test_lists = [], []
    for u in range(5):
        pick = lambda n: [(int(rng.integers(n_texts)), int(rng.integers(n_texts)), i) for i in range(n)]  # noqa: E731
        train_lists.append(pick(int(rng.integers(1, 5))))
        test_lists.append(pick(int(rng.integers(0, 3))))
    data = PreferenceData(texts, [f"u{u}" for u in range(5)], UserPairs.from_lists(train_lists),
                          UserPairs.from_lists(test_lists), np.ones(5, bool))
    embeddings = rng.normal(size=(n_texts, D)).astype(np.float32)
    logs = batch.preference_data_to_user_major(data, embeddings, tmp_path / "logs.parquet", row_group_users=2)
    table = pq.read_table(logs)
    assert pq.ParquetFile(logs).num_row_groups == 3
    assert table.column("user_id").to_pylist() == data.user_ids
    for u in range(5):
        pairs = train_lists[u] + test_lists[u]
        got_c = np.array(table.column("chosen_embeddings")[u].as_py(), dtype=np.float32).reshape(-1, D)
        got_r = np.array(table.column("rejected_embeddings")[u].as_py(), dtype=np.float32).reshape(-1, D)
        np.testing.assert_array_equal(got_c, embeddings[[c for c, _, _ in pairs]].reshape(-1, D))
        np.testing.assert_array_equal(got_r, embeddings[[r for _, r, _ in pairs]].reshape(-1, D))
    summary = batch.adapt_users(model_dir[0], logs, tmp_path / "w.parquet", steps=2, lr=0.1, progress=False)
    assert summary.users == 5 and summary.pairs == sum(len(a) + len(b) for a, b in zip(train_lists, test_lists))
    with pytest.raises(FileExistsError):
        batch.preference_data_to_user_major(data, embeddings, logs)
    with pytest.raises(ValueError, match=r"embeddings must have shape \(30, D\)"):
        batch.preference_data_to_user_major(data, embeddings[:-1], tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


def test_read_ahead_keeps_order_errors_and_stops_with_the_caller():
    import threading

    from mrm.batch import _read_ahead

    assert list(_read_ahead(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise ValueError("broken file")

    seen = []
    with pytest.raises(ValueError, match="broken file"):
        for item in _read_ahead(failing()):
            seen.append(item)
    assert seen == [1, 2]

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    for item in _read_ahead(endless()):
        if item == 3:
            break
    assert len(produced) <= 6  # at most two ahead of the caller (and the one being made)
    assert not any(t.name == "mrm-read-ahead" for t in threading.enumerate())


# ---- MAP checkpoints: posterior covariance in the weights table, uncertainty in the scores -------


def test_map_checkpoint_adapts_with_its_prior_and_scores_with_uncertainty(tmp_path):
    torch.manual_seed(3)
    model = MetaRewardModel(ModelConfig(input_dim=D, num_bases=K, scale=0.5, weight_map="linear", prior="per-base"))
    with torch.no_grad():
        model.shared_weight.copy_(torch.randn(K))
        model.log_precision.copy_(torch.linspace(-0.5, 0.5, K))
    directory = tmp_path / "map-model"
    model.double().save_pretrained(directory, extra_config={"train": {"inner": {"optimizer": "map"}}})
    checkpoint = Checkpoint.load(directory)
    assert checkpoint.weight_map == "linear" and checkpoint.eta.shape == (K,)
    assert checkpoint.inner_loop().is_map
    ids, offsets, chosen, rejected = _features_logs(n_users=30, dtype=np.float64)
    logs = _write(batch.user_major_table(ids, offsets, chosen, rejected), tmp_path / "logs.parquet")
    weights_path = tmp_path / "weights.parquet"
    batch.adapt_users(directory, logs, weights_path, steps=1, lr=1.0, optimizer="map", batch_users=7, progress=False)
    table = batch.read_weights(weights_path, K, np.float64)
    expected = ops.map_adapt(checkpoint.w0, checkpoint.eta, chosen - rejected, offsets, return_covariance=True,
                             inner=ops.InnerLoop("map", weight_map="linear"))
    order = table.lookup(pa.array(ids))
    np.testing.assert_allclose(table.weights[order], expected.weights, rtol=0, atol=1e-12)
    np.testing.assert_allclose(table.covariance[order], expected.covariance, rtol=0, atol=1e-12)
    # a user without pairs: the prior's covariance
    np.testing.assert_allclose(table.covariance[order[0]], np.diag(np.exp(-checkpoint.eta)), atol=1e-12)
    scores_path = tmp_path / "scores.parquet"
    batch.score(directory, weights_path, logs, scores_path, progress=False)
    rows = {r["user_id"]: r for r in pq.read_table(scores_path).to_pylist()}
    for u, uid in enumerate(ids):
        lo, hi = offsets[u], offsets[u + 1]
        d = chosen[lo:hi] - rejected[lo:hi]
        margin = d @ expected.weights[u]
        var = np.einsum("ik,kl,il->i", d, expected.covariance[u], d)  # J = I for the linear map
        np.testing.assert_allclose(rows[uid]["margin_std"], np.sqrt(var), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(rows[uid]["p_chosen"], 1 / (1 + np.exp(-margin / np.sqrt(1 + np.pi * var / 8))),
                                   rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="adapt it with optimizer 'map'"):
        batch.adapt_users(directory, logs, tmp_path / "w2.parquet", steps=1, lr=1.0, optimizer="sgd", progress=False)
    # without an optimizer, a checkpoint with a prior adapts with MAP (the same table)
    default_path = tmp_path / "default.parquet"
    batch.adapt_users(directory, logs, default_path, steps=1, lr=1.0, batch_users=7, progress=False)
    default = batch.read_weights(default_path, K, np.float64)
    np.testing.assert_array_equal(default.weights[default.lookup(pa.array(ids))], table.weights[order])
    np.testing.assert_array_equal(default.covariance[default.lookup(pa.array(ids))], table.covariance[order])
