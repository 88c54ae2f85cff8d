#!/usr/bin/env python
"""Benchmark one meta step: mrm-fast against two PyTorch baselines (benches/baselines.py).

Workload (per user): 32 support + 32 query pair differences, K = 8, T = 5 inner steps,
random normal differences (seeded), one shared w0; lr 0.1 for sgd, 0.01 for adam.

For every (optimizer, users) it measures
  * mrm: ``meta_forward`` (fwd), ``meta_forward`` + ``meta_backward`` with grad_losses = 1
    (fwd+bwd, two calls), and ``meta_value_and_grad`` (fused: the same outputs from one pass);
  * the padded autograd baseline and the torch.func (vmap) baseline, fwd and fwd+bwd, with
    ``torch.set_num_threads(threads)``; CSR -> padded conversion happens once, untimed;
  * peak memory of each call.

Every (implementation, optimizer, users, mode) measurement runs in a fresh Python process
(this script with the hidden ``--_worker`` flag), so peak RSS (VmHWM) belongs to that call
alone. The worker first warms up on 16 users (lazy imports, thread pools, torch.func set-up),
then records VmRSS before the inputs exist and after they are built, resets the
peak (``/proc/self/clear_refs`` = 5, where the kernel allows it), makes one call, and reads
VmHWM. Then it repeats the call for timing (the first, memory call is a warm-up).

    peak mem ratio = (peak RSS during the call - RSS before inputs were created) / input bytes

where "input bytes" are the CSR arrays (support, query, offsets, w0; for the torch baselines
the same CSR byte count, so the ratios are comparable; they also hold the padded masks).
A ratio of ~1 means the call allocates next to nothing; fwd+bwd returns gradients as large
as the inputs, so ~2 is its floor.

Usage:
    python benches/bench_meta_step.py                       # full default sweep
    python benches/bench_meta_step.py --users 1000,10000    # quick
    python benches/bench_meta_step.py --json /tmp/bench.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

N_SUPPORT = 32
N_QUERY = 32
K = 8
STEPS = 5
LR = {"sgd": 0.1, "adam": 0.01}
BETAS = (0.9, 0.999)
EPS = 1e-8

IMPLS = ("mrm", "padded", "func")
MODES = ("fwd", "fwdbwd")
MRM_MODES = MODES + ("fused",)  # fused: meta_value_and_grad, mrm only


# ---------------------------------------------------------------------------
# memory helpers (Linux /proc)
# ---------------------------------------------------------------------------

def _proc_status_kib(*keys):
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in keys:
                    out[name] = int(rest.split()[0])  # kB
    except OSError:
        pass
    return out


def rss_bytes():
    return _proc_status_kib("VmRSS").get("VmRSS", 0) * 1024


def hwm_bytes():
    return _proc_status_kib("VmHWM").get("VmHWM", 0) * 1024


def reset_peak():
    """Reset VmHWM to the current RSS (Linux >= 4.0). Returns False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# workload
# ---------------------------------------------------------------------------

def make_inputs(n_users, dtype, seed):
    """Seeded CSR workload: support/query (U*32, K) normal, offsets (U+1,), shared w0 (K,)."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    w0 = (0.1 * rng.standard_normal(K)).astype(dt)
    # standard_normal(dtype=float32) generates directly, no float64 temporary.
    support = rng.standard_normal((n_users * N_SUPPORT, K), dtype=dt)
    query = rng.standard_normal((n_users * N_QUERY, K), dtype=dt)
    support_offsets = np.arange(n_users + 1, dtype=np.int64) * N_SUPPORT
    query_offsets = np.arange(n_users + 1, dtype=np.int64) * N_QUERY
    return w0, support, support_offsets, query, query_offsets


def memory_floor(n_users, dtype, seed, threads, repeats=5):
    """Median seconds to copy the inputs once into fresh gradient-sized arrays on ``threads``
    threads (numpy copies release the GIL). Forward+backward must read its inputs (twice, here
    once) and write gradients as large as them into fresh memory, so no implementation of it can
    be faster than this: a bound on the speedup any kernel can reach over a baseline."""
    from concurrent.futures import ThreadPoolExecutor

    _, support, _, query, _ = make_inputs(n_users, dtype, seed)

    def copy(part):
        source, target, lo, hi = part
        np.copyto(target[lo:hi], source[lo:hi])

    times = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            parts = []
            for source in (support, query):
                target = np.empty_like(source)
                bounds = np.linspace(0, len(source), threads + 1).astype(int)
                parts += [(source, target, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
            list(pool.map(copy, parts))
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def adapt_alone(n_users, optimizer, dtype, seed, threads, repeats=3):
    """Median seconds of ``mrm.ops.adapt`` (the inner loop alone, no losses) for ``n_users``."""
    import mrm

    w0, support, support_offsets, _, _ = make_inputs(n_users, dtype, seed)
    hyper = dict(steps=STEPS, lr=LR[optimizer], optimizer=optimizer, betas=BETAS, eps=EPS)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        mrm.ops.adapt(w0, support, support_offsets, num_threads=threads, **hyper)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def repeats_for(n_users, requested):
    if requested:
        return requested
    if n_users <= 10_000:
        return 7
    if n_users <= 100_000:
        return 5
    return 3


# ---------------------------------------------------------------------------
# one measurement (runs in its own process)
# ---------------------------------------------------------------------------

def worker(spec):
    impl, opt, n_users, mode = spec["impl"], spec["optimizer"], spec["users"], spec["mode"]
    threads, dtype, seed = spec["threads"], spec["dtype"], spec["seed"]
    reps, budget = spec["repeats"], spec["time_budget"]
    hyper = dict(steps=STEPS, lr=LR[opt], optimizer=opt, betas=BETAS, eps=EPS)

    if impl == "mrm":
        import mrm.ops as ops
    else:
        import torch
        import baselines as bl
        torch.set_num_threads(threads)

    def build(n):
        """Inputs for n users and a closure making the measured call; returns (call, bytes)."""
        w0, s, so, q, qo = make_inputs(n, dtype, seed)
        nbytes = sum(a.nbytes for a in (w0, s, so, q, qo))
        if impl == "mrm":
            ones = np.ones(n, dtype=s.dtype)
            nbytes += ones.nbytes

            def call():
                if mode == "fused":
                    fw, grads = ops.meta_value_and_grad(w0, s, so, q, qo, ones, num_threads=threads, **hyper)
                    return (fw.losses, fw.weights, fw.support_losses, fw.accuracy) + tuple(grads)
                fw = ops.meta_forward(w0, s, so, q, qo, num_threads=threads, **hyper)
                res = (fw.losses, fw.weights, fw.support_losses, fw.accuracy)
                if mode == "fwd":
                    return res
                return res + tuple(ops.meta_backward(w0, s, so, q, qo, ones,
                                                     num_threads=threads, **hyper))
            return call, nbytes

        tdt = torch.float32 if np.dtype(dtype) == np.float32 else torch.float64
        s_pad, s_mask = bl.csr_to_padded(s, so, dtype=tdt)
        q_pad, q_mask = bl.csr_to_padded(q, qo, dtype=tdt)
        tw0 = torch.as_tensor(w0, dtype=tdt)
        s = q = None  # the torch call only sees the padded tensors (frees them)
        fn = {("padded", "fwd"): bl.padded_forward,
              ("padded", "fwdbwd"): bl.padded_forward_backward,
              ("func", "fwd"): bl.func_forward,
              ("func", "fwdbwd"): bl.func_forward_backward}[(impl, mode)]

        def call():
            return fn(tw0, s_pad, s_mask, q_pad, q_mask, **hyper)
        return call, nbytes

    # Warm up on a few users first (lazy imports, thread pools, torch.func's first-call
    # set-up), so that the RSS before the inputs already holds them and the peak is the call's.
    warm_call, _ = build(16)
    warm_call()
    del warm_call
    gc.collect()
    rss_before = rss_bytes()

    call, input_bytes = build(n_users)
    rss_inputs = rss_bytes()
    peak_reset = reset_peak()

    t0 = time.perf_counter()
    out = call()
    t_first = time.perf_counter() - t0
    peak = hwm_bytes()
    output_bytes = sum(int(o.nbytes) if isinstance(o, np.ndarray) else
                       int(o.element_size() * o.nelement()) for o in out)
    del out

    times = []
    total = 0.0
    for i in range(reps):
        t0 = time.perf_counter()
        out = call()
        dt = time.perf_counter() - t0
        del out
        times.append(dt)
        total += dt
        if i >= 1 and total > budget:
            break
    return {
        **spec,
        "loadavg_1min_after": os.getloadavg()[0],
        "min_s": min(times) if times else t_first,
        "times": times,
        "median_s": statistics.median(times) if times else t_first,
        "first_call_s": t_first,
        "input_bytes": input_bytes,
        "output_bytes": output_bytes,
        "rss_before_inputs": rss_before,
        "rss_after_inputs": rss_inputs,
        "peak_rss": peak,
        "peak_reset": peak_reset,
        "extra_peak_bytes": peak - rss_inputs,
        "peak_ratio": (peak - rss_before) / input_bytes,
    }


def run_worker(spec, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {**spec, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            res = json.loads(line)
            res["process_wall_s"] = time.perf_counter() - t0
            return res
    return {**spec, "error": "no result from worker: " + proc.stdout[-300:]}


# ---------------------------------------------------------------------------
# correctness sanity check (in this process)
# ---------------------------------------------------------------------------

def sanity_check(threads, n_users=200):
    import torch
    import baselines as bl
    import mrm.ops as ops

    torch.set_num_threads(threads)
    rng = np.random.default_rng(1234)
    # Ragged, including one user with no support rows, to exercise the CSR path.
    s_counts = rng.integers(1, 2 * N_SUPPORT, n_users)
    s_counts[3] = 0
    q_counts = rng.integers(1, 2 * N_QUERY, n_users)
    so = np.concatenate([[0], np.cumsum(s_counts)]).astype(np.int64)
    qo = np.concatenate([[0], np.cumsum(q_counts)]).astype(np.int64)
    s = rng.standard_normal((so[-1], K))
    q = rng.standard_normal((qo[-1], K))
    w0 = 0.1 * rng.standard_normal(K)
    s_pad, s_mask = bl.csr_to_padded(s, so, dtype=torch.float64)
    q_pad, q_mask = bl.csr_to_padded(q, qo, dtype=torch.float64)
    tw0 = torch.as_tensor(w0)

    def unpad(padded, mask):
        return padded[mask].numpy()

    problems = []
    for opt in ("sgd", "adam"):
        hyper = dict(steps=STEPS, lr=LR[opt], optimizer=opt, betas=BETAS, eps=EPS)
        fw = ops.meta_forward(w0, s, so, q, qo, num_threads=threads, **hyper)
        gw0, gs, gq = ops.meta_backward(w0, s, so, q, qo, np.ones(n_users), num_threads=threads,
                                        **hyper)
        fused, fused_grads = ops.meta_value_and_grad(w0, s, so, q, qo, np.ones(n_users),
                                                     num_threads=threads, **hyper)
        for name, a, b in [("losses", fused.losses, fw.losses), ("weights", fused.weights, fw.weights),
                           ("grad_w0", fused_grads[0], gw0), ("grad_support", fused_grads[1], gs),
                           ("grad_query", fused_grads[2], gq)]:
            if not np.array_equal(a, b):
                problems.append(f"{opt}: meta_value_and_grad {name} differs from the two calls")
        p_losses, p_w = bl.padded_forward(tw0, s_pad, s_mask, q_pad, q_mask, **hyper)
        pb_losses, pb_gw0, pb_gs, pb_gq = bl.padded_forward_backward(
            tw0, s_pad, s_mask, q_pad, q_mask, **hyper)
        f_losses, f_w = bl.func_forward(tw0, s_pad, s_mask, q_pad, q_mask, **hyper)
        fb_losses, fb_gw0, fb_gs, fb_gq = bl.func_forward_backward(
            tw0, s_pad, s_mask, q_pad, q_mask, **hyper)
        checks = [
            ("padded fwd losses", fw.losses, p_losses.numpy()),
            ("padded fwd weights", fw.weights, p_w.numpy()),
            ("padded fwd+bwd losses", fw.losses, pb_losses.numpy()),
            ("padded grad_w0", gw0, pb_gw0.numpy()),
            ("padded grad_support", gs, unpad(pb_gs, s_mask)),
            ("padded grad_query", gq, unpad(pb_gq, q_mask)),
            ("func fwd losses", fw.losses, f_losses.numpy()),
            ("func fwd weights", fw.weights, f_w.numpy()),
            ("func fwd+bwd losses", fw.losses, fb_losses.detach().numpy()),
            ("func grad_w0", gw0, fb_gw0.detach().numpy()),
            ("func grad_support", gs, unpad(fb_gs.detach(), s_mask)),
            ("func grad_query", gq, unpad(fb_gq.detach(), q_mask)),
        ]
        worst = 0.0
        for name, a, b in checks:
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape:
                problems.append(f"{opt}: {name}: shape {a.shape} vs {b.shape}")
                continue
            err = float(np.max(np.abs(a - b) / (1e-8 + np.abs(b)))) if a.size else 0.0
            if not np.allclose(a, b, rtol=1e-7, atol=1e-10):
                problems.append(f"{opt}: {name}: max rel err {err:.3e}")
            worst = max(worst, float(np.max(np.abs(a - b))) if a.size else 0.0)
        print(f"sanity check ({opt}, {n_users} users, float64): mrm vs padded and torch.func, "
              f"max abs diff {worst:.2e}")
    if problems:
        sys.exit("SANITY CHECK FAILED, mrm and the baselines disagree:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------

def fmt_by_size(x, formats, below):
    """``x`` in the format of the first ``(threshold, format)`` of ``formats`` it reaches, else
    ``below(x)``; "—" for None."""
    if x is None:
        return "—"
    for threshold, fmt in formats:
        if x >= threshold:
            return fmt(x)
    return below(x)


def fmt_s(x):
    return fmt_by_size(x, [(100, "{:.0f}".format), (1, "{:.2f}".format), (0.01, "{:.3f}".format)],
                       lambda x: f"{x * 1e3:.2f} ms")


def fmt_bytes(n):
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def fmt_rate(x):
    return fmt_by_size(x, [(1e6, lambda x: f"{x / 1e6:.2f} M"), (1e3, lambda x: f"{x / 1e3:.1f} k")], "{:.0f}".format)


def summarize(results, optimizers, users, max_baseline):
    by = {(r["impl"], r["optimizer"], r["users"], r["mode"]): r for r in results}

    def t(impl, opt, u, mode):
        r = by.get((impl, opt, u, mode))
        return None if r is None or "error" in r else r["median_s"]

    rows = []
    for opt in optimizers:
        for u in users:
            row = {"optimizer": opt, "users": u}
            for impl in IMPLS:
                for mode in MODES:
                    row[f"{impl}_{mode}_s"] = t(impl, opt, u, mode)
            row["mrm_fused_s"] = t("mrm", opt, u, "fused")
            m_fb = row["mrm_fwdbwd_s"]
            bases = [x for x in (row["padded_fwdbwd_s"], row["func_fwdbwd_s"]) if x is not None]
            bases_f = [x for x in (row["padded_fwd_s"], row["func_fwd_s"]) if x is not None]
            row["speedup_vs_padded_fwdbwd"] = (row["padded_fwdbwd_s"] / m_fb
                                               if m_fb and row["padded_fwdbwd_s"] else None)
            row["speedup_vs_func_fwdbwd"] = (row["func_fwdbwd_s"] / m_fb
                                             if m_fb and row["func_fwdbwd_s"] else None)
            row["speedup_vs_faster_fwdbwd"] = min(bases) / m_fb if m_fb and bases else None
            m_fu = row["mrm_fused_s"]
            row["speedup_vs_faster_fused"] = min(bases) / m_fu if m_fu and bases else None
            row["mrm_users_per_s_fused"] = u / m_fu if m_fu else None
            row["speedup_vs_faster_fwd"] = (min(bases_f) / row["mrm_fwd_s"]
                                            if row["mrm_fwd_s"] and bases_f else None)
            row["mrm_users_per_s_fwdbwd"] = u / m_fb if m_fb else None
            row["mrm_users_per_s_fwd"] = u / row["mrm_fwd_s"] if row["mrm_fwd_s"] else None
            for impl, mode in [(i, m) for i in IMPLS for m in MODES] + [("mrm", "fused")]:
                r = by.get((impl, opt, u, mode))
                if r and "error" not in r:
                    row[f"{impl}_{mode}_peak_ratio"] = r["peak_ratio"]
                    row[f"{impl}_{mode}_extra_peak_bytes"] = r["extra_peak_bytes"]
                    row[f"{impl}_{mode}_input_bytes"] = r["input_bytes"]
                    row[f"{impl}_{mode}_output_bytes"] = r["output_bytes"]
            row["baselines_skipped"] = u > max_baseline
            rows.append(row)
    return rows


def sx(x):
    return "—" if x is None else f"{x:.1f}×"


def print_tables(rows, results, threads, skipped_note):
    print()
    print("## Meta step: mrm vs PyTorch baselines")
    print()
    print("| optimizer | users | mrm fwd s | mrm fwd+bwd s (two calls) | mrm fused s | padded fwd+bwd s "
          "| func fwd+bwd s | speedup vs faster baseline (two calls / fused) | mrm users/s (fused) "
          "| peak mem ratio (two calls / fused) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def ratio(x):
        return "—" if x is None else f"{x:.2f}"

    for r in rows:
        print(f"| {r['optimizer']} | {r['users']:,} | {fmt_s(r['mrm_fwd_s'])} "
              f"| {fmt_s(r['mrm_fwdbwd_s'])} | {fmt_s(r['mrm_fused_s'])} | {fmt_s(r['padded_fwdbwd_s'])} "
              f"| {fmt_s(r['func_fwdbwd_s'])} "
              f"| {sx(r['speedup_vs_faster_fwdbwd'])} / {sx(r['speedup_vs_faster_fused'])} "
              f"| {fmt_rate(r['mrm_users_per_s_fused'])} "
              f"| {ratio(r.get('mrm_fwdbwd_peak_ratio'))} / {ratio(r.get('mrm_fused_peak_ratio'))} |")
    print()
    print("two calls = meta_forward + meta_backward; fused = meta_value_and_grad (the same outputs, "
          "bit for bit, from one pass over the rows).")
    print("peak mem ratio = (peak RSS during the call − RSS before inputs existed) / input bytes;"
          " fwd+bwd returns gradients as large as its inputs, so ~2 is the floor.")
    if skipped_note:
        print(skipped_note)
    print()
    print("### Details: forward only, and speedups against each baseline")
    print()
    print("| optimizer | users | mrm fwd s | padded fwd s | func fwd s | speedup fwd (vs faster) "
          "| mrm fwd+bwd s | speedup vs padded | speedup vs func | mrm users/s (fwd) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['users']:,} | {fmt_s(r['mrm_fwd_s'])} "
              f"| {fmt_s(r['padded_fwd_s'])} | {fmt_s(r['func_fwd_s'])} "
              f"| {sx(r['speedup_vs_faster_fwd'])} | {fmt_s(r['mrm_fwdbwd_s'])} "
              f"| {sx(r['speedup_vs_padded_fwdbwd'])} | {sx(r['speedup_vs_func_fwdbwd'])} "
              f"| {fmt_rate(r['mrm_users_per_s_fwd'])} |")
    print()
    print("### Details: memory (each call in a fresh process)")
    print()
    print("| impl | mode | optimizer | users | input | output | RSS after inputs − before "
          "| extra peak over inputs | peak ratio | median s (runs) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['impl']} | {r['mode']} | {r['optimizer']} | {r['users']:,} "
                  f"| ERROR: {r['error']} | | | | | |")
            continue
        print(f"| {r['impl']} | {r['mode']} | {r['optimizer']} | {r['users']:,} "
              f"| {fmt_bytes(r['input_bytes'])} | {fmt_bytes(r['output_bytes'])} "
              f"| {fmt_bytes(r['rss_after_inputs'] - r['rss_before_inputs'])} "
              f"| {fmt_bytes(r['extra_peak_bytes'])} | {r['peak_ratio']:.2f} "
              f"| {fmt_s(r['median_s'])} ({len(r['times'])}) |")
    if any(not r.get("peak_reset", True) for r in results if "error" not in r):
        print("\nnote: /proc/self/clear_refs was not writable: peaks include building the inputs.")


def machine_info(threads):
    import mrm
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "mrm": getattr(mrm, "__version__", "?"),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "threads": threads,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    return info


def parse_list(text, conv=str):
    return [conv(x.strip().replace("_", "")) for x in text.split(",") if x.strip()]


def main(argv=None):
    import mrm.ops as ops

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", default="1000,10000,100000,1000000",
                    help="comma-separated user counts (default: %(default)s)")
    ap.add_argument("--optimizers", default="sgd,adam", help="default: %(default)s")
    ap.add_argument("--threads", type=int, default=ops.resolve_threads(None),
                    help="threads for mrm and torch (default: mrm.ops.resolve_threads(None) = "
                         "%(default)s)")
    ap.add_argument("--baseline-max-users", type=int, default=100_000,
                    help="skip the torch baselines above this many users (default: %(default)s)")
    ap.add_argument("--baselines", default="padded,func",
                    help="which torch baselines to run (default: %(default)s; '' for none)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--repeats", type=int, default=0,
                    help="timed repeats per measurement (default: 7 up to 1e4 users, 5 up to "
                         "1e5, 3 above)")
    ap.add_argument("--time-budget", type=float, default=60.0,
                    help="stop repeating once a measurement's timed runs exceed this many "
                         "seconds (after at least 2) (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker-timeout", type=float, default=3600.0,
                    help="seconds before a measurement process is abandoned")
    ap.add_argument("--skip-sanity", action="store_true", help="skip the correctness check")
    ap.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker:
        print(json.dumps(worker(json.loads(args._worker))), flush=True)
        return

    users = parse_list(args.users, int)
    optimizers = parse_list(args.optimizers)
    for o in optimizers:
        if o not in LR:
            ap.error(f"unknown optimizer {o!r}")
    baselines = parse_list(args.baselines)
    for b in baselines:
        if b not in ("padded", "func"):
            ap.error(f"unknown baseline {b!r}")
    threads = ops.resolve_threads(args.threads)

    info = machine_info(threads)
    print(f"# bench_meta_step: {N_SUPPORT} support + {N_QUERY} query pairs/user, K = {K}, "
          f"T = {STEPS}, {args.dtype}, lr sgd {LR['sgd']} / adam {LR['adam']}, seed {args.seed}")
    print(f"machine: {info.get('cpu', '?')}, {info['cpus_usable']} usable CPUs; "
          f"threads used (mrm and torch): {threads}; python {info['python']}, "
          f"numpy {info['numpy']}, torch {info['torch']}")
    sys.stdout.flush()

    if not args.skip_sanity:
        sanity_check(threads)
        sys.stdout.flush()

    results = []
    skipped = sorted({u for u in users if u > args.baseline_max_users})
    for opt in optimizers:
        for u in users:
            impls = ["mrm"] + ([b for b in baselines] if u <= args.baseline_max_users else [])
            for impl in impls:
                for mode in (MRM_MODES if impl == "mrm" else MODES):
                    spec = {"impl": impl, "optimizer": opt, "users": u, "mode": mode,
                            "threads": threads, "dtype": args.dtype, "seed": args.seed,
                            "repeats": repeats_for(u, args.repeats),
                            "time_budget": args.time_budget}
                    r = run_worker(spec, args.worker_timeout)
                    results.append(r)
                    if "error" in r:
                        print(f"  {impl:6s} {mode:6s} {opt:4s} U={u:>9,}: ERROR {r['error']}",
                              flush=True)
                    else:
                        print(f"  {impl:6s} {mode:6s} {opt:4s} U={u:>9,}: "
                              f"median {fmt_s(r['median_s'])} over {len(r['times'])} "
                              f"(first {fmt_s(r['first_call_s'])}), "
                              f"extra peak {fmt_bytes(r['extra_peak_bytes'])}, "
                              f"ratio {r['peak_ratio']:.2f}, load {r['loadavg_1min_after']:.1f}",
                              flush=True)

    note = ""
    if skipped and baselines:
        note = (f"Baselines skipped for {', '.join(f'{u:,}' for u in skipped)} users "
                f"(> --baseline-max-users {args.baseline_max_users:,}).")
    rows = summarize(results, optimizers, users, args.baseline_max_users)
    print_tables(rows, results, threads, note)
    floor_users = max((u for u in users if u <= args.baseline_max_users), default=None)
    if floor_users is not None:
        floor = memory_floor(floor_users, args.dtype, args.seed, threads)
        padded = [r["padded_fwdbwd_s"] for r in rows if r["users"] == floor_users and r.get("padded_fwdbwd_s")]
        bound = f"; padded fwd+bwd / floor = {min(padded) / floor:.1f}×, the most any kernel could gain" if padded else ""
        print(f"\nmemory floor at {floor_users:,} users: {fmt_s(floor)} to copy the inputs once into fresh "
              f"gradient-sized arrays on {threads} threads (fwd+bwd reads its inputs and writes gradients as "
              f"large){bound}")
    most = max(users)
    alone = ", ".join(f"{opt} {fmt_s(adapt_alone(most, opt, args.dtype, args.seed, threads))}"
                      for opt in optimizers)
    print(f"\nadaptation alone (mrm.ops.adapt, no losses) at {most:,} users: {alone}")
    loads = [r["loadavg_1min_after"] for r in results if "loadavg_1min_after" in r]
    print(f"\nthreads: {threads} (machine: {info['cpus_usable']} usable CPUs); 1-min load average "
          f"after the measurements: {min(loads, default=0):.1f} to {max(loads, default=0):.1f} "
          f"(a load well above {threads} means other processes shared the CPUs: timings noisy)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {"users": users, "optimizers": optimizers, "threads": threads,
                                  "dtype": args.dtype, "seed": args.seed, "K": K,
                                  "support_per_user": N_SUPPORT, "query_per_user": N_QUERY,
                                  "steps": STEPS, "lr": LR, "betas": BETAS, "eps": EPS,
                                  "baseline_max_users": args.baseline_max_users},
                       "machine": info, "summary": rows, "measurements": results}, f, indent=1)
        print(f"saved {args.json}")


if __name__ == "__main__":
    main()
