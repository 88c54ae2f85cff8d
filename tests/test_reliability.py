"""Issue #15, item by item: bounded work on any input, no code execution from files, named
errors everywhere, nothing left behind. Each test runs the issue's repro as written."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from mrm import ops

# --- 1. bounded work: steps, trajectory memory, interrupts ------------------------------------


def _backward(steps, n_support=4):
    return ops.meta_backward(np.zeros(8), np.ones((n_support, 8)), [0, n_support], np.ones((3, 8)), [0, 3],
                             np.ones(1), steps=steps, lr=0.1)


@pytest.mark.parametrize("steps", [10**8, 2**59, 2**61, 2**62, 2**64, 10**30])
def test_steps_beyond_the_maximum_are_a_value_error(steps):
    with pytest.raises(ValueError, match=rf"steps must be <= {ops.MAX_STEPS}, got {steps}"):
        _backward(steps)
    with pytest.raises(ValueError, match="steps must be <="):
        ops.meta_value_and_grad(np.zeros(8), np.ones((4, 8)), [0, 4], np.ones((3, 8)), [0, 3], np.ones(1),
                                steps=steps, lr=0.1)
    with pytest.raises(ValueError, match="steps must be <="):
        ops.adapt(np.zeros(8), np.ones((1, 8)), [0, 1], steps=steps, lr=0.1)


def test_the_maximum_itself_runs_and_the_trajectory_budget_is_named():
    assert ops.MAX_STEPS == 100_000
    grads = _backward(ops.MAX_STEPS)
    assert all(np.isfinite(g).all() for g in grads)
    # 4000 support rows × 100,000 steps: over the 1 GiB budget, before any allocation.
    with pytest.raises(ValueError, match=r"steps = 100000 would need \d+ bytes of inner trajectory for users 0\.\.=0"):
        _backward(ops.MAX_STEPS, n_support=4000)


_INTERRUPT = textwrap.dedent("""
    import os, signal, sys, threading, time
    import numpy as np
    from mrm import ops
    support = np.ones((1_000_000, 8), np.float32)  # one user: 100,000 steps would take minutes
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    start = time.monotonic()
    try:
        ops.adapt(np.zeros(8, np.float32), support, [0, len(support)], steps=ops.MAX_STEPS, lr=0.1)
    except KeyboardInterrupt:
        print("interrupted", time.monotonic() - start)
""")


def test_ctrl_c_stops_one_long_user():
    done = subprocess.run([sys.executable, "-c", _INTERRUPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    word, seconds = done.stdout.split()
    assert word == "interrupted" and float(seconds) < 30


# --- 3. bounded threads ------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [5000, 100_000, 2**64])
def test_too_many_threads_are_a_value_error(threads):
    with pytest.raises(ValueError, match=rf"num_threads must be <= {ops.max_threads()}"):
        ops.adapt(np.zeros(2), np.ones((1, 2)), [0, 1], steps=1, lr=0.1, num_threads=threads)


def test_too_many_threads_from_the_environment(monkeypatch):
    monkeypatch.setenv("MRM_NUM_THREADS", "100000")
    with pytest.raises(ValueError, match="MRM_NUM_THREADS must be <="):
        ops.adapt(np.zeros(2), np.ones((1, 2)), [0, 1], steps=1, lr=0.1)


def test_the_native_pool_refuses_more_than_max_threads():
    from mrm import _native

    args = (np.zeros(2), np.ones((1, 2)), np.array([0, 1]), None, None, 1, 0.1, "sgd", 0.9, 0.999, 1e-8, False)
    with pytest.raises(ValueError, match=f"num_threads must be <= {ops.MAX_THREADS}"):
        _native.forward(*args, ops.MAX_THREADS + 1)
    assert 64 <= ops.max_threads() <= ops.MAX_THREADS


# --- 4. finite results: rpo, pair_differences ------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rpo_with_a_tiny_gamma_is_finite_and_right(dtype):
    # τ = 2 is the middle loss itself: its σ is constant in it (σ(0) = 1/2); the others are
    # hard 0 / 1 at this γ, with slopes that underflow to 0.
    obj, grad = ops.rpo(np.array([1, 2, 3], dtype), 0.5, 1e-300)
    assert obj == pytest.approx(4.0) and grad.dtype == dtype
    np.testing.assert_allclose(grad, [0.0, 0.5, 1.0])


def test_rpo_with_extreme_losses_is_right():
    # τ = 0 (the convex combination, where torch's lerp form overflows): σ = 0 and 1.
    obj, grad = ops.rpo([-1e308, 1e308], 0.5, 0.5)
    assert obj == 1e308
    np.testing.assert_array_equal(grad, [0.0, 1.0])
    obj, grad = ops.rpo(np.float32([3e38, 3e38]), 0.5, 0.5)  # both are τ: 1/2 each
    np.testing.assert_allclose(grad, [0.5, 0.5])


def test_rpo_overflow_is_a_value_error_naming_the_argument():
    # A loss tied with τ without being τ has a gradient of about loss / (4 γ): beyond float32.
    with pytest.raises(ValueError, match="gamma = 1e-300 is too small"):
        ops.rpo(np.float32([1.0, 2.0, 2.0, 2.0, 3.0]), 0.5, 1e-300)
    with pytest.raises(ValueError, match="losses are too large"):
        ops.rpo(np.float32([1.0, 3e38, 3e38, 3e38]), 1.0, 0.0)
    with pytest.raises(ValueError, match="gamma is too large for a float"):
        ops.rpo([1.0, 2.0], 0.5, 10**400)


def test_pair_differences_overflow_and_non_finite_are_named():
    with pytest.raises(ValueError, match=r"pair 0: features\[0\] - features\[1\] overflows in column 0"):
        ops.pair_differences(np.float32([[3e38], [-3e38]]), [0], [1])
    with pytest.raises(ValueError, match=r"features contains a non-finite value \(row 1, column 0; pair 0\)"):
        ops.pair_differences(np.float32([[1.0], [np.inf]]), [0], [1])
    # A NaN in a row no pair reads is not looked at.
    assert ops.pair_differences(np.float32([[1.0], [2.0], [np.nan]]), [0], [1]).tolist() == [[-1.0]]
    with pytest.raises(ValueError, match=r"grad contains a non-finite value \(pair 1, column 0\)"):
        ops.pair_differences_backward(np.float32([[1.0], [np.nan]]), [0, 0], [1, 1], 2)
    with pytest.raises(ValueError, match="the gradient of feature row 0 overflows in column 0"):
        ops.pair_differences_backward(np.float32([[3e38], [3e38]]), [0, 0], [1, 1], 2)


# --- 2. no code execution from files -----------------------------------------------------------


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: proof that a loader unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_never_unpickles_a_planted_trainer_state(tmp_path):
    import pickle

    torch = pytest.importorskip("torch")
    from mrm.train import MetaTrainer, TrainConfig
    from test_train import _random_data

    emb, data = _random_data(seed=4, n_users=10)
    config = TrainConfig(scale=0.5, dtype="float64", epochs=2, select_on="last")
    first = MetaTrainer(config, emb, data, output_dir=tmp_path / "run")
    first.train_epoch(), first._checkpoint()
    last = tmp_path / "run" / "last"
    assert {p.name for p in last.iterdir()} >= {"trainer_state.safetensors", "trainer_state.json"}
    marker = tmp_path / "pwned"
    # torch.save's format (a zip holding a pickle) and a bare pickle, in every place a loader
    # might look: the old name, and in place of the new files.
    torch.save({"epoch": _Payload(str(marker))}, last / "trainer_state.pt")
    for name in ("trainer_state.safetensors", "trainer_state.json"):
        original = (last / name).read_bytes()
        (last / name).write_bytes(pickle.dumps(_Payload(str(marker))))
        with pytest.raises(ValueError, match=f"{name}"):
            MetaTrainer(config, emb, data, output_dir=tmp_path / "run", resume=True)
        (last / name).write_bytes(original)
    resumed = MetaTrainer(config, emb, data, output_dir=tmp_path / "run", resume=True)  # the real state is intact
    assert resumed.epoch == 1
    # Only the old pickle: refused by name, never opened.
    for name in ("trainer_state.safetensors", "trainer_state.json"):
        (last / name).unlink()
    with pytest.raises(ValueError, match="trainer_state.pt is a pickle"):
        MetaTrainer(config, emb, data, output_dir=tmp_path / "run", resume=True)
    assert not marker.exists()
    # The payload is live: a plain unpickle does run it (so the checks above mean something).
    pickle.loads(pickle.dumps(_Payload(str(marker))))
    assert marker.exists()


# --- 5. named errors: the CLI's one line, and the API's ValueError/TypeError -------------------


def _cli(*args, cwd, env=None):
    run = subprocess.run([sys.executable, "-m", "mrm.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                         timeout=120, env={**os.environ, **(env or {})})
    return run.returncode, run.stdout, run.stderr


def _one_line_error(rc, stderr, *needles):
    assert rc == 2, stderr
    assert stderr.startswith("mrm: error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in stderr, stderr


@pytest.fixture()
def job(tmp_path):
    """A checkpoint and user-major logs for adapt / score, in tmp_path."""
    pytest.importorskip("torch")
    import test_batch
    from mrm import batch

    test_batch._torch_checkpoint(tmp_path / "ckpt")
    ids, offsets, chosen, rejected = test_batch._features_logs(n_users=5, seed=8)
    test_batch._write(batch.user_major_table(ids, offsets, chosen, rejected), tmp_path / "logs.parquet")
    return tmp_path


def test_cli_huge_steps_and_threads_are_one_line(job):
    for flag, value in (("--steps", "1000000000000000000000000000000"), ("--threads", "100000"), ("--lr", "1e400")):
        rc, _, err = _cli("adapt", "--checkpoint", "ckpt", "--logs", "logs.parquet", "--output", "w.parquet",
                          flag, value, cwd=job)
        _one_line_error(rc, err, f"argument {flag}")
    rc, _, err = _cli("adapt", "--checkpoint", "ckpt", "--logs", "logs.parquet", "--output", "w.parquet",
                      cwd=job, env={"MRM_NUM_THREADS": "100000"})
    _one_line_error(rc, err, "MRM_NUM_THREADS must be <=")
    assert not (job / "w.parquet").exists()


_UNWRITABLE = textwrap.dedent("""
    import errno, os, sys, tempfile
    from mrm import cli
    kind = sys.argv[1]
    if kind == "permission":  # as root, chmod does not stop a write: fail the temp file as a read-only dir would
        def refuse(*args, dir=None, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, ".tmp"))
        tempfile.mkstemp = refuse
    else:  # a full disk: the write or the fsync fails, with no file name of its own
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync = full
    sys.exit(cli.main(sys.argv[2:]))
""")


@pytest.mark.parametrize("kind,reason", [("permission", "Permission denied"), ("full", "No space left on device")])
@pytest.mark.parametrize("command", ["adapt", "score"])
def test_cli_unwritable_output_is_one_line_naming_the_path(job, kind, reason, command):
    (job / "out").mkdir()
    done = subprocess.run([sys.executable, "-c", _UNWRITABLE, kind, command, "--checkpoint", "ckpt", "--logs",
                           "logs.parquet", "--output", "out/result.parquet", "--no-progress"],
                          cwd=job, capture_output=True, text=True, timeout=120)
    _one_line_error(done.returncode, done.stderr, "out", reason)
    assert list((job / "out").iterdir()) == []  # nothing half-written left behind


def test_cli_eval_with_a_bad_trained_setting_names_the_file_and_key(job):
    import json

    config = json.loads((job / "ckpt" / "config.json").read_text())
    config["train"] = {"inner_steps": "ten"}
    (job / "ckpt" / "config.json").write_text(json.dumps(config))
    rc, _, err = _cli("eval", "--checkpoint", "ckpt", "--output-dir", "ev", cwd=job)
    _one_line_error(rc, err, "config.json: train.inner_steps must be an integer", "'ten'")


@pytest.mark.parametrize("call,name", [
    (lambda: ops.adapt(np.zeros(2), np.ones((1, 2)), [0, 1], steps=2**64, lr=0.1), "steps"),
    (lambda: ops.adapt(np.zeros(2), np.ones((1, 2)), [0, 1], steps=1, lr=10**400), "lr"),
    (lambda: ops.adapt(np.zeros(2), np.ones((1, 2)), [0, 1], steps=1, lr=0.1, eps=10**400), "eps"),
    (lambda: ops.adapt(np.zeros(2), np.ones((1, 2)), [0, 1], steps=1, lr=0.1, betas=(10**400, 0.9)), r"betas\[0\]"),
    (lambda: ops.adapt(np.zeros(2), np.ones((1, 2)), [0, 1], steps=1, lr=0.1, num_threads=2**64), "num_threads"),
    (lambda: ops.rpo([1.0, 2.0], 10**400, 0.5), "tail"),
    (lambda: ops.pair_differences_backward(np.ones((1, 2)), [0], [0], 2**64), "n_rows"),
    (lambda: ops.pair_differences_backward(np.ones((1, 2)), [0], [0], 2**62), "n_rows"),
    (lambda: ops.adapt(np.zeros(2), [[1.0, 2.0], [3.0]], [0, 2], steps=1, lr=0.1), "support"),
    (lambda: ops.adapt(np.zeros(2), np.ones((2, 2)), [[0], [1, 2]], steps=1, lr=0.1), "support_offsets"),
    (lambda: ops.rpo([1.0, [2.0]], 0.5, 0.5), "losses"),
])
def test_api_overflow_and_ragged_input_are_value_errors_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_meta_forward_without_query_is_a_type_error():
    with pytest.raises(TypeError, match="query must be an array, got None"):
        ops.meta_forward(np.zeros(2), np.ones((1, 2)), [0, 1], None, [0, 1], steps=1, lr=0.1)
    with pytest.raises(TypeError, match="query_offsets must be an array, got None"):
        ops.meta_backward(np.zeros(2), np.ones((1, 2)), [0, 1], np.ones((1, 2)), None, np.ones(1), steps=1, lr=0.1)


def test_int32_offsets_work_like_int64():
    data = (np.zeros(2), np.ones((3, 2)), np.array([0, 1, 3], np.int32), np.ones((2, 2)), np.array([0, 1, 2], np.int32))
    wide = tuple(np.asarray(x, np.int64) if x.dtype == np.int32 else x for x in data)
    got = ops.meta_forward(*data, steps=2, lr=0.1)
    want = ops.meta_forward(*wide, steps=2, lr=0.1)
    np.testing.assert_array_equal(got.losses, want.losses)


# --- 6. train / eval refuse an existing output directory -------------------------------------


def test_cli_train_and_eval_refuse_an_existing_output_dir(job):
    (job / "run").mkdir()
    (job / "run" / "history.json").write_text("{}")
    rc, _, err = _cli("train", "--output-dir", "run", "--data", "movielens", cwd=job)
    _one_line_error(rc, err, "run already exists and is not empty", "--overwrite", "--resume")
    (job / "ev").mkdir()
    (job / "ev" / "report.json").write_text("{}")
    rc, _, err = _cli("eval", "--checkpoint", "ckpt", "--output-dir", "ev", cwd=job)
    _one_line_error(rc, err, "ev already exists and is not empty", "--overwrite")
    assert (job / "run" / "history.json").read_text() == "{}" and (job / "ev" / "report.json").read_text() == "{}"


# --- 7. batch-job errors say where: file, column, user id, pair ------------------------------


def _nested(rows):
    import pyarrow as pa

    return pa.array(rows, type=pa.list_(pa.list_(pa.float32())))


def _logs(job, name, user_ids, chosen, rejected):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = job / name
    pq.write_table(pa.table({"user_id": user_ids, "chosen_features": _nested(chosen),
                             "rejected_features": _nested(rejected)}), path, row_group_size=2)
    return path


def _adapt_error(job, logs):
    from mrm import batch

    with pytest.raises(ValueError) as error:
        batch.adapt_users(job / "ckpt", logs, job / "w.parquet", steps=1, lr=0.1, progress=False, batch_users=2)
    assert not (job / "w.parquet").exists()
    return str(error.value)


def test_content_errors_name_the_file_column_user_and_pair(job):
    ok = [[[1, 0, 0]]]
    logs = _logs(job, "nan.parquet", ["a", "b", "c"], [ok[0], ok[0], [[1, 0, 0], [np.nan, 0, 0]]],
                 [ok[0], ok[0], [[0, 0, 0], [0, 0, 0]]])
    assert _adapt_error(job, logs) == (f"{logs}: column 'chosen_features': user 'c' has a NaN, infinite or null "
                                       "value (pair/response 1 of that user)")


def test_a_finite_overflow_is_named_as_an_overflow(job):
    logs = _logs(job, "overflow.parquet", ["a", "b"], [[[1, 0, 0]], [[0, 3e38, 0]]], [[[0, 0, 0]], [[0, -3e38, 0]]])
    message = _adapt_error(job, logs)
    assert message == (f"{logs}: columns 'chosen_features' - 'rejected_features': user 'b', pair 0: the difference "
                       "overflows float32 (finite values too far apart)")


def test_a_null_user_id_names_the_file_row_and_the_user_before(job):
    logs = _logs(job, "null.parquet", ["a", "b", "c", None], [[[1, 0, 0]]] * 4, [[[0, 0, 0]]] * 4)
    assert _adapt_error(job, logs) == f"{logs}: column 'user_id' has a null value (row 3 of the file, after user 'c')"


def test_a_dictionary_encoded_user_id_column_is_read(job):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mrm import batch

    ids = pa.array(["a", "b", "c"]).dictionary_encode()
    logs = _logs(job, "dict.parquet", ids, [[[1, 0, 0]]] * 3, [[[0, 1, 0]]] * 3)
    plain = _logs(job, "plain.parquet", ["a", "b", "c"], [[[1, 0, 0]]] * 3, [[[0, 1, 0]]] * 3)
    batch.adapt_users(job / "ckpt", logs, job / "w1.parquet", steps=1, lr=0.1, progress=False)
    batch.adapt_users(job / "ckpt", plain, job / "w2.parquet", steps=1, lr=0.1, progress=False)
    assert pq.read_table(job / "w1.parquet").equals(pq.read_table(job / "w2.parquet"))


# --- 8. nothing left behind, no silent corruption -------------------------------------------


def test_stale_temp_files_of_a_dead_writer_are_removed_by_the_next_write(tmp_path):
    from mrm._io import _host, atomic_file, remove_stale

    host = _host()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    target = tmp_path / "out.parquet"
    stale = tmp_path / f".out.parquet.mrm-tmp-{pid}@{host}.abc123.tmp"
    stale.write_bytes(b"half a table")
    live = tmp_path / f".out.parquet.mrm-tmp-{os.getpid()}@{host}.live01.tmp"  # a live writer's: kept
    live.write_bytes(b"in progress")
    other = tmp_path / f".out.parquet.mrm-tmp-{pid}@not-{host}.zz.tmp"  # another host's: kept
    other.write_bytes(b"not ours")
    with atomic_file(target) as handle:
        writing = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".out.parquet.mrm-tmp-{os.getpid()}@")]
        assert len(writing) == 2  # its own temp file, recognisable while it is written (and `live`)
        handle.write(b"new")
    assert target.read_bytes() == b"new" and not stale.exists() and live.exists() and other.exists()
    # A directory write that died between moving the old content aside and the new in: put back.
    old = tmp_path / f".best.mrm-old-{pid}@{host}.x1.tmp"
    (old / "content").mkdir(parents=True)
    (old / "content" / "model.safetensors").write_bytes(b"the old model")
    remove_stale(tmp_path / "best")
    assert (tmp_path / "best" / "model.safetensors").read_bytes() == b"the old model" and not old.exists()


def test_outputs_honour_the_umask(tmp_path):
    from mrm._io import atomic_dir, atomic_file

    old = os.umask(0o027)
    try:
        with atomic_file(tmp_path / "f.bin") as handle:
            handle.write(b"x")
        with atomic_dir(tmp_path / "d"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750


def test_no_directory_is_created_through_dotdot(job):
    rc, _, err = _cli("adapt", "--checkpoint", "ckpt", "--logs", "logs.parquet", "--output", "a/../x.parquet", cwd=job)
    _one_line_error(rc, err, "does not exist", "'..'")
    assert not (job / "a").exists() and not (job / "x.parquet").exists()
    rc, _, err = _cli("adapt", "--checkpoint", "ckpt", "--logs", "logs.parquet", "--output", "new/x.parquet",
                      "--no-progress", cwd=job)
    assert rc == 0, err  # a directory the user named is created


def test_mixed_integer_and_string_user_ids_are_an_error_naming_the_rows(tmp_path):
    import json

    from mrm.data.logs import read_preference_log

    rows = [{"user_id": 0, "prompt": "p", "chosen": "a", "rejected": "b"},
            {"user_id": "0", "prompt": "q", "chosen": "c", "rejected": "d"}]
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"column 'user_id' mixes integer ids \(row 0: 0\) and string ids \(row 1: '0'\)"):
        read_preference_log(path)


def test_a_corrupt_embedding_shard_is_re_embedded(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import warnings

    from mrm.embed import EmbeddingCache
    from test_embed import TEXTS, save_tiny_bert

    save_tiny_bert(tmp_path / "bert", hidden_size=16)
    cache = EmbeddingCache(tmp_path / "cache", tmp_path / "bert", batch_size=2)
    want = cache.embed(TEXTS, progress=False)
    (shard,) = (tmp_path / "cache" / "shards").iterdir()
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x40  # one flipped bit inside the last embedding: still a valid safetensors file
    shard.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = EmbeddingCache(tmp_path / "cache", tmp_path / "bert", batch_size=2).embed(TEXTS, progress=False)
    assert any("fails its checksum" in str(w.message) for w in caught)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not shard.exists()
