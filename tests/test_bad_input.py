"""Every bad input gets a ValueError/TypeError naming the argument (and the user), never a
crash, a hang, a Rust panic or a NaN in the output."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mrm
from mrm import ops

K = 3


def good():
    rng = np.random.default_rng(0)
    return dict(
        w0=np.zeros(K),
        support=rng.normal(size=(5, K)),
        support_offsets=np.array([0, 2, 5]),
        query=rng.normal(size=(4, K)),
        query_offsets=np.array([0, 1, 4]),
    )


def forward(**overrides):
    args = {**good(), **overrides}
    kw = {name: args.pop(name) for name in ("steps", "lr", "optimizer", "betas", "eps") if name in args}
    kw.setdefault("steps", 2)
    kw.setdefault("lr", 0.1)
    return ops.meta_forward(*args.values(), **kw)


def backward(**overrides):
    args = {**good(), **overrides}
    grad_losses = args.pop("grad_losses", np.ones(2))
    return ops.meta_backward(*args.values(), grad_losses, steps=2, lr=0.1)


def test_good_input_works():
    forward()
    backward()


@pytest.mark.parametrize("name,value", [("w0", np.zeros((1, 1, K))), ("support", np.zeros(5)), ("query", np.zeros((4, K, 1)))])
def test_wrong_ndim(name, value):
    with pytest.raises(ValueError, match=name):
        forward(**{name: value})


def test_offsets_wrong_ndim():
    with pytest.raises(ValueError, match="support_offsets"):
        forward(support_offsets=np.array([[0, 2, 5]]))


@pytest.mark.parametrize("name,value", [("w0", np.zeros(K + 1)), ("query", np.zeros((4, K + 1)))])
def test_k_mismatch(name, value):
    with pytest.raises(ValueError, match=f"K mismatch.*{name}"):
        forward(**{name: value})


def test_per_user_w0_wrong_user_count():
    with pytest.raises(ValueError, match="w0"):
        forward(w0=np.zeros((3, K)))


def test_offsets_not_starting_at_zero():
    with pytest.raises(ValueError, match=r"support_offsets\[0\] must be 0"):
        forward(support_offsets=np.array([1, 2, 5]))


def test_offsets_decreasing():
    with pytest.raises(ValueError, match=r"query_offsets must be non-decreasing.*user 1"):
        forward(query_offsets=np.array([0, 3, 2]), query=np.zeros((2, K)))


def test_offsets_not_ending_at_row_count():
    with pytest.raises(ValueError, match=r"support_offsets\[-1\] must equal the number of rows of support \(5\), got 4"):
        forward(support_offsets=np.array([0, 2, 4]))


def test_offsets_user_count_differs():
    with pytest.raises(ValueError, match="support_offsets describes 2 users but query_offsets describes 1"):
        forward(query_offsets=np.array([0, 4]))


@pytest.mark.parametrize("name,row,user", [("support", 3, 1), ("query", 0, 0)])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_name_the_user(name, row, user, bad):
    array = good()[name].copy()
    array[row, 1] = bad
    with pytest.raises(ValueError, match=f"{name} contains a non-finite value \\(row {row}, user {user}\\)"):
        forward(**{name: array})
    with pytest.raises(ValueError, match=f"user {user}"):
        backward(**{name: array})


def test_non_finite_w0():
    with pytest.raises(ValueError, match="w0 contains a non-finite value"):
        forward(w0=np.array([0.0, np.nan, 0.0]))
    w0 = np.zeros((2, K))
    w0[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"w0 contains a non-finite value \(user 1\)"):
        forward(w0=w0)


def test_non_finite_grad_losses():
    with pytest.raises(ValueError, match=r"grad_losses contains a non-finite value \(user 1\)"):
        backward(grad_losses=np.array([1.0, np.nan]))


def test_non_finite_score_inputs():
    with pytest.raises(ValueError, match=r"features contains a non-finite value \(row 2, user 1\)"):
        ops.score(np.array([[0.0, 1], [1, 1], [np.nan, 0]]), [0, 2, 3], np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"weights contains a non-finite value \(user 1\)"):
        ops.score(np.zeros((3, 2)), [0, 2, 3], np.array([[0.0, 0], [np.inf, 0]]))


def test_negative_steps():
    with pytest.raises(ValueError, match="steps must be >= 0"):
        forward(steps=-1)
    with pytest.raises(TypeError, match="steps must be an int"):
        forward(steps=1.5)


@pytest.mark.parametrize("name,value", [
    ("lr", np.nan), ("lr", np.inf), ("lr", 0.0), ("lr", -0.1),
    ("eps", np.nan), ("eps", 0.0), ("eps", -1e-8),
])
def test_bad_scalar_hyper_parameters(name, value):
    with pytest.raises(ValueError, match=name):
        forward(**{name: value})


@pytest.mark.parametrize("betas,index", [((1.0, 0.999), 0), ((0.9, np.nan), 1), ((-0.1, 0.9), 0), ((0.9, 1.5), 1)])
def test_bad_betas(betas, index):
    with pytest.raises(ValueError, match=rf"betas\[{index}\]"):
        forward(betas=betas)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer"):
        forward(optimizer="rmsprop")


@pytest.mark.parametrize("tail", [0.0, -0.5, 1.01, np.nan])
def test_bad_tail(tail):
    with pytest.raises(ValueError, match="tail"):
        ops.rpo(np.array([0.1, 0.2]), tail, 0.5)


def test_rpo_bad_losses():
    with pytest.raises(ValueError, match=r"losses contains a non-finite value \(user 1\)"):
        ops.rpo(np.array([0.1, np.nan]), 0.5, 0.5)
    with pytest.raises(ValueError, match="losses must contain at least one user"):
        ops.rpo(np.zeros(0), 0.5, 0.5)
    with pytest.raises(ValueError, match="gamma"):
        ops.rpo(np.array([0.1, 0.2]), 0.5, np.nan)


def test_mixed_float_dtypes():
    with pytest.raises(TypeError, match="mixed float dtypes: w0 is float64 but support is float32"):
        forward(support=good()["support"].astype(np.float32))
    with pytest.raises(TypeError, match="mixed float dtypes"):
        backward(grad_losses=np.ones(2, dtype=np.float32))


@pytest.mark.parametrize("name", ["w0", "support", "query"])
@pytest.mark.parametrize("dtype", [np.int64, np.int32, object, np.float16, bool])
def test_integer_or_object_arrays(name, dtype):
    with pytest.raises(TypeError, match=name):
        forward(**{name: good()[name].astype(dtype)})


def test_float_offsets_are_rejected():
    with pytest.raises(TypeError, match="support_offsets must be an integer array"):
        forward(support_offsets=np.array([0.0, 2.0, 5.0]))


def test_user_without_query_pairs():
    with pytest.raises(ValueError, match="query has no pairs for user 1"):
        forward(query_offsets=np.array([0, 4, 4]))
    with pytest.raises(ValueError, match="query has no pairs for user 1"):
        backward(query_offsets=np.array([0, 4, 4]))


def test_user_without_support_pairs_is_valid():
    out = forward(support_offsets=np.array([0, 0, 5]))
    np.testing.assert_array_equal(out.weights[0], np.zeros(K))


def test_overflow_is_an_error_not_nan():
    with pytest.raises(ValueError, match="not finite for user 0"):
        forward(support=np.full((5, K), 1e308) * np.array([1, -1, 0]), optimizer="sgd", lr=1e300)


def test_bad_num_threads():
    with pytest.raises(ValueError, match="num_threads"):
        ops.adapt(np.zeros(K), np.zeros((1, K)), [0, 1], steps=1, lr=0.1, num_threads=0)
    with pytest.raises(TypeError, match="num_threads"):
        ops.adapt(np.zeros(K), np.zeros((1, K)), [0, 1], steps=1, lr=0.1, num_threads=1.5)


@settings(max_examples=200, deadline=None)
@given(
    offsets=st.lists(st.integers(-(2**62), 2**62), min_size=0, max_size=6),
    rows=st.integers(0, 5),
    k=st.integers(0, 3),
)
def test_arbitrary_offsets_never_panic(offsets, rows, k):
    """Whatever the offsets, the answer is a result or a ValueError, never a PanicException."""
    support = np.ones((rows, k))
    try:
        ops.adapt(np.zeros(k), support, np.array(offsets, dtype=np.int64), steps=1, lr=0.1)
        ops.score(support, np.array(offsets, dtype=np.int64), np.zeros((max(len(offsets) - 1, 0), k)))
    except ValueError:
        pass


def test_native_module_direct_calls_do_not_panic():
    """Calling the native module directly with inconsistent shapes still raises ValueError."""
    with pytest.raises(ValueError):
        mrm._native.forward(np.zeros(4), np.zeros((2, 3)), np.array([0, 2]), None, None,
                            1, 0.1, "sgd", 0.9, 0.999, 1e-8, True, 1)
    with pytest.raises(ValueError):
        mrm._native.backward(np.zeros(3), np.zeros((2, 3)), np.array([0, 2]), np.zeros((1, 3)),
                             np.array([0, 1]), np.ones(5), 1, 0.1, "sgd", 0.9, 0.999, 1e-8, False, 1)
    with pytest.raises(ValueError):
        mrm._native.score(np.zeros((2, 3)), np.array([0, 2]), np.zeros((2, 3)), 1)


def test_pair_differences_bad_input():
    features = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match=r"rejected\[2\] = -1 is out of range for 4 feature rows \(pair 2\)"):
        ops.pair_differences(features, [0, 1, 2], [1, 2, -1])
    with pytest.raises(ValueError, match="chosen has 2 entries but rejected has 1"):
        ops.pair_differences(features, [0, 1], [1])
    with pytest.raises(TypeError, match="chosen must be an integer array"):
        ops.pair_differences(features, [0.0], [1])
    with pytest.raises(ValueError, match=r"chosen\[0\] = 9 is out of range for 3 feature rows"):
        ops.pair_differences_backward(np.ones((1, 2), np.float32), [9], [0], 3)
    with pytest.raises(ValueError, match="n_rows must be a non-negative int"):
        ops.pair_differences_backward(np.ones((1, 2), np.float32), [0], [0], -1)
    with pytest.raises((ValueError, MemoryError)):
        ops.pair_differences_backward(np.ones((0, 2), np.float32), [], [], 2**62)
    assert ops.pair_differences(features, [], []).shape == (0, 2)


def _backward_out(data, **hyper):
    return ops.meta_backward(*data.values(), np.ones(2), steps=2, lr=0.1, **hyper)


def test_backward_out_buffers_are_written_and_returned():
    data = good()
    want = _backward_out(data)
    out = tuple(np.full_like(data[name], np.nan) for name in ("w0", "support", "query"))
    got = _backward_out(data, out=out)
    assert all(g is o for g, o in zip(got, out))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    per_user = {**data, "w0": np.zeros((2, K))}
    out = tuple(np.empty_like(per_user[name]) for name in ("w0", "support", "query"))
    for g, w in zip(_backward_out(per_user, out=out), _backward_out(per_user)):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize(
    "which,buffer,error,match",
    [
        (1, np.zeros((4, K)), ValueError, r"out\[1\] must have the shape of support \(5, 3\)"),
        (2, np.zeros((4, K), dtype=np.float32), TypeError, r"out\[2\] must have dtype float64"),
        (1, np.zeros((K, 5)).T, ValueError, r"out\[1\] must be C-contiguous"),
        (0, [0.0, 0.0, 0.0], TypeError, r"out\[0\] must be a numpy array"),
    ],
)
def test_backward_out_bad_buffers(which, buffer, error, match):
    data = good()
    out = [np.empty_like(data[name]) for name in ("w0", "support", "query")]
    out[which] = buffer
    with pytest.raises(error, match=match):
        _backward_out(data, out=tuple(out))


def test_backward_out_read_only_or_sharing_an_input():
    data = good()
    out = [np.empty_like(data[name]) for name in ("w0", "support", "query")]
    out[2].flags.writeable = False
    with pytest.raises(ValueError, match=r"out\[2\] must be writeable"):
        _backward_out(data, out=tuple(out))
    out = (np.empty_like(data["w0"]), data["support"], np.empty_like(data["query"]))
    with pytest.raises(ValueError, match=r"out\[1\] must not share memory with an input array"):
        _backward_out(data, out=out)
    with pytest.raises(TypeError, match="out must be a tuple of 3 arrays"):
        _backward_out(data, out=out[:2])


def _error_of(call):
    try:
        call()
    except (TypeError, ValueError) as error:
        return type(error), str(error)
    return None


@pytest.mark.parametrize("overrides", [
    dict(support=np.zeros(5)),
    dict(query=np.zeros((4, K + 1))),
    dict(w0=np.zeros((3, K))),
    dict(support_offsets=np.array([1, 2, 5])),
    dict(query_offsets=np.array([0, 4, 4])),
    dict(query_offsets=np.array([0, 1, 2, 4])),
    dict(support=np.where(np.arange(15).reshape(5, K) == 10, np.nan, 1.0)),
    dict(query=np.where(np.arange(12).reshape(4, K) == 11, -np.inf, 1.0)),
    dict(w0=np.array([0.0, np.inf, 0.0])),
    dict(grad_losses=np.ones(3)),
    dict(grad_losses=np.array([1.0, np.nan])),
    dict(grad_losses=np.ones(2, dtype=np.float32)),
    dict(support=np.zeros((5, K), dtype=np.int64)),
    dict(steps=-1),
    dict(lr=np.inf),
    dict(optimizer="rmsprop"),
    dict(support=np.full((5, K), 1e308) * np.array([1, -1, 0]), optimizer="sgd", lr=1e300),
    dict(out=(np.zeros(K), np.zeros((5, K)), np.zeros((5, K)))),
    dict(out=(np.zeros(K), np.zeros((5, K), dtype=np.float32), np.zeros((4, K)))),
])
def test_value_and_grad_rejects_what_meta_backward_rejects(overrides):
    """meta_value_and_grad raises meta_backward's error (same type and message) on each bad input."""
    args = {**good(), **overrides}
    grad_losses = args.pop("grad_losses", np.ones(2))
    kw = dict(steps=2, lr=0.1)
    kw.update({name: args.pop(name) for name in ("steps", "lr", "optimizer", "out") if name in args})
    want = _error_of(lambda: ops.meta_backward(*args.values(), grad_losses, **kw))
    assert want is not None, "the case must be bad input for meta_backward"
    assert _error_of(lambda: ops.meta_value_and_grad(*args.values(), grad_losses, **kw)) == want
