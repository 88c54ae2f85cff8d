"""Determinism across thread counts, concurrent callers, fork safety and GIL release."""

import multiprocessing as mp
import threading

import numpy as np
import pytest

from mrm import ops


def workload(n_users=70_000, k=8, dtype=np.float32, seed=0):
    """More users than one native chunk (65,536), several hundred parallel blocks."""
    rng = np.random.default_rng(seed)
    s_off = np.concatenate([[0], np.cumsum(rng.integers(0, 6, n_users))])
    q_off = np.concatenate([[0], np.cumsum(rng.integers(1, 6, n_users))])
    return dict(
        w0=rng.normal(scale=0.3, size=k).astype(dtype),
        support=rng.normal(size=(s_off[-1], k)).astype(dtype),
        support_offsets=s_off,
        query=rng.normal(size=(q_off[-1], k)).astype(dtype),
        query_offsets=q_off,
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bit_identical_for_any_thread_count(optimizer, dtype):
    data = workload(dtype=dtype)
    grad_losses = np.linspace(0.5, 1.5, len(data["support_offsets"]) - 1).astype(dtype)
    kw = dict(steps=3, lr=0.1, optimizer=optimizer)
    results = []
    for threads in (1, 2, 3):
        out = ops.meta_forward(**data, **kw, num_threads=threads)
        grads = ops.meta_backward(*data.values(), grad_losses, **kw, num_threads=threads)
        rewards = ops.score(data["query"], data["query_offsets"], out.weights, num_threads=threads)
        results.append([out.losses, out.weights, out.support_losses, out.accuracy, *grads, rewards])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_env_var_sets_thread_count(monkeypatch):
    monkeypatch.setenv("MRM_NUM_THREADS", "3")
    assert ops.resolve_threads(None) == 3
    assert ops.resolve_threads(1) == 1
    monkeypatch.setenv("MRM_NUM_THREADS", "zero")
    with pytest.raises(ValueError, match="MRM_NUM_THREADS"):
        ops.resolve_threads(None)


def test_concurrent_python_threads_get_the_serial_answer():
    data = workload(n_users=5_000, dtype=np.float64)
    grad_losses = np.ones(5_000)
    kw = dict(steps=4, lr=0.05)
    expected = ops.meta_backward(*data.values(), grad_losses, **kw)
    results, errors = [None] * 6, []

    def call(i):
        try:
            results[i] = ops.meta_backward(*data.values(), grad_losses, **kw, num_threads=1 + i % 2)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for got in results:
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)


def _child(queue):
    data = workload(n_users=2_000, dtype=np.float64)
    queue.put(ops.adapt(data["w0"], data["support"], data["support_offsets"], steps=2, lr=0.1, num_threads=2))


def test_safe_after_fork():
    data = workload(n_users=2_000, dtype=np.float64)
    expected = ops.adapt(data["w0"], data["support"], data["support_offsets"], steps=2, lr=0.1, num_threads=2)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    got = queue.get(timeout=60)  # a deadlocked pool in the child would time out here
    child.join(timeout=60)
    assert child.exitcode == 0
    np.testing.assert_array_equal(got, expected)


def test_gil_is_released_during_kernel_calls():
    data = workload(n_users=200_000, dtype=np.float64)
    done = threading.Event()
    ticks = 0

    def work():
        ops.meta_forward(**data, steps=20, lr=0.1, num_threads=1)
        done.set()

    worker = threading.Thread(target=work)
    worker.start()
    while not done.is_set():
        ticks += 1  # runs only while the worker does not hold the GIL
        done.wait(0.001)
    worker.join()
    assert ticks > 20
