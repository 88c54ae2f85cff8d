"""Two builds of the native module on the same inputs, in one process, alternated run by run
(the machine's drift then falls on both alike); their outputs must be bit-identical.

    python benches/ab_native.py BEFORE.so AFTER.so [--users 1000000] [--runs 8] [--threads 2]

Build each with `cargo build --release -p mrm-py` and copy `target/release/lib_native.so`
aside. Times `map_adapt` (the solution alone), `map_adapt` with covariances and
`meta_value_and_grad` with the map solver (the latter two at a tenth of the users), on the
inputs of `bench_map.py`; prints min and median per build.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import time

import numpy as np

import mrm.ops as ops
from bench_map import make


def load(path: str):
    loader = importlib.machinery.ExtensionFileLoader("mrm._native", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("mrm._native", path, loader=loader))
    loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    builds = {"before": load(args.before), "after": load(args.after)}
    k, n = 8, 32
    support, so, query, qo = make(args.users, k, n)
    small = args.users // 10
    s_small, q_small = support[: small * n], query[: small * n]
    o_small = so[: small + 1]
    gl = np.full(small, 1.0 / small, np.float32)
    for weight_map in ("simplex", "linear"):
        w0 = np.zeros(k, np.float32) if weight_map == "simplex" else np.full(k, 0.1, np.float32)
        eta = np.zeros(k, np.float32)
        inner = ops.InnerLoop("map", weight_map=weight_map)
        calls = {
            f"adapt {args.users}": lambda: ops.map_adapt(w0, eta, support, so, inner=inner,
                                                         num_threads=args.threads).weights,
            f"adapt+cov {small}": lambda: ops.map_adapt(w0, eta, s_small, o_small, inner=inner, num_threads=args.threads,
                                                        return_covariance=True).covariance,
            f"v+grad {small}": lambda: ops.meta_value_and_grad(w0, s_small, o_small, q_small, o_small, gl, inner=inner,
                                                               eta=eta, num_threads=args.threads)[1][1],
        }
        for name, call in calls.items():
            times = {b: [] for b in builds}
            reference = None
            for r in range(args.runs):
                for b in (("before", "after") if r % 2 == 0 else ("after", "before")):
                    ops._native = builds[b]
                    start = time.perf_counter()
                    out = call()
                    times[b].append(time.perf_counter() - start)
                    if reference is None:
                        reference = out.copy()
                    elif not np.array_equal(out, reference):
                        raise SystemExit(f"{weight_map} {name}: the two builds disagree")
            line = "  ".join(f"{b} min {min(t):.4f} median {sorted(t)[len(t) // 2]:.4f}" for b, t in times.items())
            print(f"{weight_map:>8} {name:>16}: {line}", flush=True)


if __name__ == "__main__":
    main()
