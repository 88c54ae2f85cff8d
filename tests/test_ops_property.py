"""A property over every public ``mrm.ops`` function (issue #15): on any small input, a call
returns a finite result or raises ValueError / TypeError naming an argument. Never another
exception, a crash (abort, panic), a NaN or infinite output, or more than 10 s.

The property runs in a subprocess, so that a crash shows up as a failed test instead of taking
pytest down; the example counts are bounded (the whole test takes well under a minute)."""

import subprocess
import sys
import textwrap

_PROPERTY = textwrap.dedent(r'''
    import sys, time
    import numpy as np
    from hypothesis import HealthCheck, given, settings, strategies as st
    from mrm import ops

    ARGUMENTS = ("w0", "support", "query", "offsets", "grad_losses", "steps", "lr", "optimizer", "betas", "eps",
                 "num_threads", "out", "losses", "tail", "gamma", "features", "weights", "grad", "chosen",
                 "rejected", "n_rows", "limit_bytes", "MRM_")
    EXAMPLES = int(sys.argv[1])
    SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                        suppress_health_check=list(HealthCheck))

    floats = st.one_of(
        st.floats(-3.0, 3.0),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([0.0, -0.0, 1e-300, 1e-40, 3e38, -3e38, 1e308, -1e308]),
    )
    dtypes = st.sampled_from([np.float32, np.float64])
    ints = st.one_of(st.integers(-3, 12), st.sampled_from([2**31, 2**62, 2**63, 2**64, 10**30]))
    scalars = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 10**400 + 1),
                        st.sampled_from([0.1, 1.0, 1e-3, "x", None, True]))

    @st.composite
    def csr(draw, k, dtype, users=None):
        counts = draw(st.lists(st.integers(0, 4), min_size=users or 0, max_size=users or 4)) if users is None or users else []
        if users is not None:
            counts = (counts + [1] * users)[:users]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        values = np.array(draw(st.lists(floats, min_size=int(offsets[-1]) * k, max_size=int(offsets[-1]) * k)),
                          dtype=np.float64).reshape(-1, k)
        with np.errstate(over="ignore"):
            values = values.astype(dtype)
        offsets_form = draw(st.sampled_from(["int64", "int32", "list", "bad"]))
        if offsets_form == "int32":
            offsets = offsets.astype(np.int32)
        elif offsets_form == "list":
            offsets = offsets.tolist()
        elif offsets_form == "bad":
            offsets = draw(st.lists(st.integers(-2, 8), max_size=5))
        return values, offsets

    @st.composite
    def problem(draw):
        k = draw(st.integers(1, 4))
        dtype = draw(dtypes)
        n_users = draw(st.integers(0, 5))
        support, s_off = draw(csr(k, dtype))
        query, q_off = draw(csr(k, dtype, users=max(1, n_users)))
        w0 = np.array(draw(st.lists(st.one_of(st.floats(-2, 2), floats), min_size=k, max_size=k)), np.float64)
        if draw(st.booleans()):
            w0 = w0.astype(dtype)
        hyper = dict(steps=draw(ints), lr=draw(st.one_of(st.floats(1e-4, 2.0), scalars)),
                     optimizer=draw(st.sampled_from(["sgd", "adam", "lbfgs"])))
        if draw(st.booleans()):
            hyper["num_threads"] = draw(st.one_of(st.integers(1, 3), ints))
        if draw(st.booleans()):
            hyper["betas"] = (draw(st.one_of(st.floats(0, 0.999), scalars)), 0.999)
        return w0, support, s_off, query, q_off, hyper

    def finite(result):
        if isinstance(result, (tuple, list)):
            return all(finite(r) for r in result)
        if isinstance(result, ops.MetaForward):
            return all(finite(getattr(result, f)) for f in ("losses", "weights", "support_losses", "accuracy"))
        if isinstance(result, (int, float, np.ndarray, np.generic)):
            return bool(np.isfinite(np.asarray(result, dtype=np.float64)).all())
        raise AssertionError(f"unexpected result type {type(result).__name__}")

    def check(call):
        started = time.monotonic()
        try:
            with np.errstate(all="ignore"):
                result = call()
        except (ValueError, TypeError) as exc:
            message = str(exc)
            assert any(name in message for name in ARGUMENTS), f"error names no argument: {message!r}"
        else:
            assert finite(result), f"non-finite output {result!r}"
        elapsed = time.monotonic() - started
        assert elapsed < 10, f"{elapsed:.1f} s"

    @SETTINGS
    @given(problem())
    def adapt(p):
        w0, support, s_off, _, _, hyper = p
        check(lambda: ops.adapt(w0, support, s_off, **hyper))
        check(lambda: ops.adapt(w0, support, s_off, return_support_losses=True, **hyper))

    @SETTINGS
    @given(problem(), st.booleans(), st.one_of(st.floats(-2, 2), floats))
    def meta(p, first_order, grad_scale):
        w0, support, s_off, query, q_off, hyper = p
        n_users = len(q_off) - 1 if hasattr(q_off, "__len__") and len(q_off) else 0
        grad = np.full(max(n_users, 0), grad_scale, dtype=support.dtype)
        check(lambda: ops.meta_forward(w0, support, s_off, query, q_off, **hyper))
        check(lambda: ops.meta_backward(w0, support, s_off, query, q_off, grad, first_order=first_order, **hyper))
        check(lambda: ops.meta_value_and_grad(w0, support, s_off, query, q_off, grad, first_order=first_order,
                                              **hyper))

    @SETTINGS
    @given(st.lists(floats, max_size=9), dtypes, st.one_of(st.floats(0, 1.5), scalars),
           st.one_of(st.floats(-1, 2), scalars))
    def rpo(losses, dtype, tail, gamma):
        with np.errstate(over="ignore"):
            array = np.array(losses, np.float64).astype(dtype)
        check(lambda: ops.rpo(array, tail, gamma))

    @SETTINGS
    @given(problem(), st.lists(floats, min_size=1, max_size=12))
    def score(p, weights):
        _, support, s_off, _, _, hyper = p
        k = support.shape[1]
        n_users = len(s_off) - 1 if len(s_off) else 0
        w = np.resize(np.array(weights, np.float64), (max(n_users, 0), k)).astype(support.dtype)
        check(lambda: ops.score(support, s_off, w, **{k_: v for k_, v in hyper.items() if k_ == "num_threads"}))

    # n_rows: small, or too large to allocate (a valid large n_rows is a large output, by request)
    n_rows = st.one_of(st.integers(-3, 12), st.sampled_from([2**62, 2**63, 2**64, 10**30]))

    @SETTINGS
    @given(problem(), st.lists(ints, max_size=6), st.lists(ints, max_size=6), n_rows)
    def gathers(p, chosen, rejected, n_rows):
        _, features, _, _, _, _ = p
        check(lambda: ops.pair_differences(features, chosen, rejected))
        grad = np.ones((len(chosen), features.shape[1]), features.dtype)
        check(lambda: ops.pair_differences_backward(grad, chosen, rejected, n_rows))

    @SETTINGS
    @given(st.one_of(ints, scalars))
    def threads_and_cache(value):
        check(lambda: ops.resolve_threads(value))
        limit = ops.output_cache_limit()
        try:
            check(lambda: ops.set_output_cache_limit(value))
        finally:
            ops.set_output_cache_limit(limit)

    for prop in (adapt, meta, rpo, score, gathers, threads_and_cache):
        started = time.monotonic()
        prop()
        print(f"{prop.__name__}: {time.monotonic() - started:.1f} s", flush=True)
''')


def test_every_ops_function_gives_a_result_or_a_named_error():
    done = subprocess.run([sys.executable, "-c", _PROPERTY, "300"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
