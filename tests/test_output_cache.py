"""The output cache: memory of dropped gradient arrays is lent to later calls, never memory
that anything still refers to, within its limit; results are the same as without it."""

import numpy as np
import pytest

from mrm import ops

K = 8
ROWS = 20_000  # 20,000 × 8 float64 = 1.25 MiB per gradient array, above the cache's minimum


def batch(seed=0, rows=ROWS):
    rng = np.random.default_rng(seed)
    offsets = np.array([0, rows // 2, rows], dtype=np.int64)
    return (0.1 * rng.normal(size=K), rng.normal(size=(rows, K)), offsets, rng.normal(size=(rows, K)), offsets,
            np.array([1.0, 0.5]))


def grads(*args):
    return ops.meta_backward(*args, steps=1, lr=0.1, optimizer="sgd")


def address(array):
    return array.__array_interface__["data"][0]


@pytest.fixture(autouse=True)
def cache_limit():
    before = ops.output_cache_limit()
    ops.set_output_cache_limit(0)  # start from an empty cache
    ops.set_output_cache_limit(64 << 20)
    yield
    ops.set_output_cache_limit(before)


def uncached(*args):
    before = ops.output_cache_limit()
    ops.set_output_cache_limit(0)
    try:
        return grads(*args)
    finally:
        ops.set_output_cache_limit(before)


def test_dropped_arrays_are_reused_and_results_do_not_change():
    args = batch()
    first = grads(*args)
    addresses = [address(g) for g in first[1:]]
    del first
    second = grads(*batch(1))
    assert [address(g) for g in second[1:]] == addresses
    for got, want in zip(second, uncached(*batch(1))):
        np.testing.assert_array_equal(got, want)
    assert all(g.flags.c_contiguous and g.flags.writeable for g in second)


def test_memory_still_referred_to_is_never_reused():
    import torch

    first = grads(*batch())
    view, tensor, memory = first[1][5:], torch.from_numpy(first[2]), memoryview(first[1])
    kept = (view.copy(), tensor.clone(), np.asarray(memory).copy())
    del first
    second = grads(*batch(1))
    np.testing.assert_array_equal(view, kept[0])
    assert torch.equal(tensor, kept[1])
    np.testing.assert_array_equal(np.asarray(memory), kept[2])
    taken = {address(second[1]), address(second[2])}
    assert address(np.asarray(memory)) not in taken and tensor.data_ptr() not in taken


def test_a_smaller_output_reuses_a_larger_free_array():
    first = grads(*batch())
    address_support = address(first[1])
    del first
    smaller = grads(*batch(1, rows=ROWS * 7 // 8))
    assert smaller[1].shape == (ROWS * 7 // 8, K)
    assert address(smaller[1]) == address_support
    for got, want in zip(smaller, uncached(*batch(1, rows=ROWS * 7 // 8))):
        np.testing.assert_array_equal(got, want)


def test_limit_bounds_what_the_cache_holds():
    ops.set_output_cache_limit(3 << 20)  # room for two 1.25 MiB arrays
    kept = [grads(*batch(seed)) for seed in range(3)]  # all in use: only the first two are cached
    assert ops.set_output_cache_limit(3 << 20) <= 3 << 20
    del kept
    assert ops.set_output_cache_limit(0) == 0  # free arrays are released at once
    fresh = grads(*batch())
    assert fresh[1].base is None and fresh[2].base is None  # allocated normally, not a cached array's view


def test_bad_limits():
    with pytest.raises(ValueError, match="limit_bytes"):
        ops.set_output_cache_limit(-1)
    with pytest.raises(TypeError):
        ops.set_output_cache_limit(1.5)


@pytest.mark.parametrize("value", ["abc", "-1", "1.5"])
def test_bad_cache_environment_variable(monkeypatch, value):
    monkeypatch.setenv("MRM_OUTPUT_CACHE_MB", value)
    with pytest.raises(ValueError, match="MRM_OUTPUT_CACHE_MB"):
        grads(*batch())
