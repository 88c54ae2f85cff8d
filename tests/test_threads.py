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


_PORTABLE_RUN = """
import sys
import numpy as np
from mrm import ops
data = dict(np.load(sys.argv[1]))
grad_losses = data.pop("grad_losses")
hyper = dict(steps=3, lr=0.1, optimizer="sgd")
out = ops.meta_forward(**data, **hyper)
grads = ops.meta_backward(**data, grad_losses=grad_losses, **hyper)
np.savez(sys.argv[2], losses=out.losses, weights=out.weights, grad_w0=grads[0],
         grad_support=grads[1], grad_query=grads[2])
"""


def _has_avx2_and_fma():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


@pytest.mark.parametrize("k", [8, 16])
def test_portable_kernels_switch(tmp_path, k):
    """MRM_PORTABLE_KERNELS=1 turns the hand-vectorised float32 kernels off: the results agree with
    the default ones to rounding, and (on a CPU that has AVX2 and FMA) are not the same bits."""
    import subprocess
    import sys

    data = workload(n_users=3000, k=k, seed=4)
    grad_losses = np.linspace(0.5, 1.5, len(data["support_offsets"]) - 1).astype(np.float32)
    np.savez(tmp_path / "in.npz", grad_losses=grad_losses, **data)
    results = {}
    for flag in ("0", "1"):
        env = dict(__import__("os").environ, MRM_PORTABLE_KERNELS=flag)
        subprocess.run([sys.executable, "-c", _PORTABLE_RUN, str(tmp_path / "in.npz"), str(tmp_path / f"{flag}.npz")],
                       env=env, check=True)
        results[flag] = np.load(tmp_path / f"{flag}.npz")
    differs = False
    for name in results["0"].files:
        fast, portable = results["0"][name], results["1"][name]
        np.testing.assert_allclose(fast, portable, rtol=2e-4, atol=1e-6 * np.abs(portable).max(), err_msg=name)
        differs |= not np.array_equal(fast, portable)
    if _has_avx2_and_fma():
        assert differs, "MRM_PORTABLE_KERNELS=1 gave the same bits as the hand-vectorised kernels"


def test_portable_kernels_bad_value(monkeypatch):
    monkeypatch.setenv("MRM_PORTABLE_KERNELS", "yes")
    data = workload(n_users=10)
    with pytest.raises(ValueError, match="MRM_PORTABLE_KERNELS must be 0 or 1"):
        ops.adapt(data["w0"], data["support"], data["support_offsets"], steps=1, lr=0.1)
