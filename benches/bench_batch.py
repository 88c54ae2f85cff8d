#!/usr/bin/env python
"""Benchmark the production batch jobs (mrm.batch) against a pandas + PyTorch implementation.

Workload: N users x 32 preference pairs, K = 8 base-reward features (float32, seeded normal),
a linear checkpoint with a random w0; adapt = 5 inner Adam steps, lr 0.01.

Jobs, each timed end to end (read Parquet, compute, write Parquet) in a fresh Python process so
that its peak RSS (ru_maxrss, which includes the interpreter and its imports) is its own:
  * adapt  — mrm: ``batch.adapt_users`` on user-major Parquet (streamed, bounded memory).
             baseline: pandas reads a per-pair Parquet (user_id, c0..c7, r0..r7), groups by user
             (factorize + cumcount), builds padded (U, 32, K) tensors with a mask, runs
             torch.optim.Adam on the (U, K) logits with autograd (Adam is elementwise, so one
             optimiser over all users equals one per user), computes the support loss, writes
             user_id / weights / n_pairs / support_loss with pyarrow.
  * score  — mrm: ``batch.score`` (rewards of both responses and P(chosen beats rejected)).
             baseline: pandas reads the per-pair Parquet and the weights table, merges them on
             user_id, torch computes softmax, rewards and sigmoid, writes one row per pair.
A third measurement, ``read``, only decodes the user-major logs (pyarrow, no compute, no
write): the floor for any job on that file.
Both sides use ``--threads`` threads (mrm kernel threads / torch.set_num_threads), and both write
Parquet without dictionary encoding (it costs most of the writing time for float columns).

Usage:
    python benches/bench_batch.py --users 10000,100000
    python benches/bench_batch.py --users 10000,100000,1000000 --plot   # docs/bench_batch_scaling.png
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PAIRS = 32
K = 8
STEPS = 5
LR = 0.01
CHUNK_USERS = 50_000


# ---- data -----------------------------------------------------------------------------------------


def generate(directory: Path, n_users: int, seed: int = 0) -> None:
    """user-major logs (mrm), per-pair logs (baseline) and a checkpoint, written in chunks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mrm import batch
    from mrm.checkpoint import Checkpoint

    rng = np.random.default_rng(seed)
    Checkpoint(input_dim=16, num_bases=K, hidden_sizes=[], scale=0.01, activation=None,
               layers=[(rng.normal(size=(K, 16)).astype(np.float32), None)],
               w0=rng.normal(size=K).astype(np.float32)).save(directory / "model", overwrite=True)
    user_major = per_pair = None
    for lo in range(0, n_users, CHUNK_USERS):
        count = min(CHUNK_USERS, n_users - lo)
        ids = [f"user{u:08d}" for u in range(lo, lo + count)]
        offsets = np.arange(count + 1, dtype=np.int64) * PAIRS
        chosen = rng.normal(size=(count * PAIRS, K)).astype(np.float32)
        rejected = rng.normal(size=(count * PAIRS, K)).astype(np.float32)
        table = batch.user_major_table(ids, offsets, chosen, rejected)
        flat = {"user_id": pa.array(np.repeat(np.array(ids, dtype=object), PAIRS), pa.string())}
        flat.update({f"c{j}": chosen[:, j] for j in range(K)})
        flat.update({f"r{j}": rejected[:, j] for j in range(K)})
        flat = pa.table(flat)
        if user_major is None:
            user_major = pq.ParquetWriter(directory / "logs.parquet", table.schema)
            per_pair = pq.ParquetWriter(directory / "pairs.parquet", flat.schema)
        user_major.write_table(table, row_group_size=8192)
        per_pair.write_table(flat, row_group_size=8192 * PAIRS)
    user_major.close()
    per_pair.close()


# ---- jobs (run inside a worker process) -----------------------------------------------------------


def mrm_adapt(d: Path, threads: int) -> None:
    from mrm import batch

    batch.adapt_users(d / "model", d / "logs.parquet", d / "mrm-weights.parquet", steps=STEPS, lr=LR,
                      threads=threads, overwrite=True, progress=False)


def mrm_score(d: Path, threads: int) -> None:
    from mrm import batch

    batch.score(d / "model", d / "mrm-weights.parquet", d / "logs.parquet", d / "mrm-scores.parquet",
                threads=threads, overwrite=True, progress=False)


def torch_adapt(d: Path, threads: int) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from safetensors.numpy import load_file

    torch.set_num_threads(threads)
    w0 = torch.from_numpy(load_file(str(d / "model" / "model.safetensors"))["shared_weight"])
    frame = pd.read_parquet(d / "pairs.parquet")
    codes, users = pd.factorize(frame["user_id"])
    diff = (frame[[f"c{j}" for j in range(K)]].to_numpy(np.float32)
            - frame[[f"r{j}" for j in range(K)]].to_numpy(np.float32))
    slot = frame.groupby(codes).cumcount().to_numpy()
    n_users = len(users)
    counts = np.bincount(codes, minlength=n_users)
    width = int(counts.max())
    padded = np.zeros((n_users, width, K), np.float32)
    padded[codes, slot] = diff
    mask = np.zeros((n_users, width), np.float32)
    mask[codes, slot] = 1.0
    del frame, diff
    padded, mask = torch.from_numpy(padded), torch.from_numpy(mask)
    denominator = torch.from_numpy(np.maximum(counts, 1).astype(np.float32))
    weights = np.empty((n_users, K), np.float32)
    losses = np.empty(n_users, np.float64)
    for lo in range(0, n_users, 65536):
        d_chunk, m_chunk, n_chunk = padded[lo:lo + 65536], mask[lo:lo + 65536], denominator[lo:lo + 65536]
        w = w0.repeat(len(d_chunk), 1).requires_grad_()
        optimizer = torch.optim.Adam([w], lr=LR)

        def per_user_loss():
            margins = (d_chunk * torch.softmax(w, -1)[:, None, :]).sum(-1)
            return (torch.nn.functional.softplus(-margins) * m_chunk).sum(1) / n_chunk

        for _ in range(STEPS):
            optimizer.zero_grad()
            per_user_loss().sum().backward()
            optimizer.step()
        with torch.no_grad():
            losses[lo:lo + len(d_chunk)] = per_user_loss().double().numpy()
        weights[lo:lo + len(d_chunk)] = w.detach().numpy()
    table = pa.table({
        "user_id": pa.array(np.asarray(users, dtype=object), pa.string()),
        "weights": pa.FixedSizeListArray.from_arrays(pa.array(weights.reshape(-1)), K),
        "n_pairs": counts.astype(np.int64),
        "support_loss": losses,
    })
    pq.write_table(table, d / "torch-weights.parquet", use_dictionary=False)


def torch_score(d: Path, threads: int) -> None:
    import pandas as pd
    import pyarrow.parquet as pq
    import torch

    torch.set_num_threads(threads)
    pairs = pd.read_parquet(d / "pairs.parquet")
    table = pq.read_table(d / "torch-weights.parquet", columns=["user_id", "weights"])
    weights = pd.DataFrame(np.asarray(table.column("weights").combine_chunks().flatten()).reshape(-1, K),
                           columns=[f"w{j}" for j in range(K)])
    weights["user_id"] = table.column("user_id").to_pandas()
    merged = pairs.merge(weights, on="user_id", how="left")
    p = torch.softmax(torch.from_numpy(merged[[f"w{j}" for j in range(K)]].to_numpy(np.float32)), -1)
    chosen = (torch.from_numpy(merged[[f"c{j}" for j in range(K)]].to_numpy(np.float32)) * p).sum(-1)
    rejected = (torch.from_numpy(merged[[f"r{j}" for j in range(K)]].to_numpy(np.float32)) * p).sum(-1)
    out = pd.DataFrame({"user_id": merged["user_id"], "chosen_reward": chosen.numpy(),
                        "rejected_reward": rejected.numpy(), "p_chosen": torch.sigmoid(chosen - rejected).numpy()})
    out.to_parquet(d / "torch-scores.parquet", index=False, use_dictionary=False)


def read_floor(d: Path, threads: int) -> None:
    """Decoding alone: every row group of the user-major logs, the columns the jobs read, with
    pyarrow's threads; nothing computed or written. No job on this file can take less."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(d / "logs.parquet")
    for row_group in range(parquet.num_row_groups):
        parquet.read_row_group(row_group, columns=["user_id", "chosen_features", "rejected_features"])


JOBS = {("adapt", "mrm"): mrm_adapt, ("score", "mrm"): mrm_score,
        ("adapt", "pandas+torch"): torch_adapt, ("score", "pandas+torch"): torch_score,
        ("read", "pyarrow"): read_floor}


def worker(job: str, impl: str, directory: str, threads: int) -> None:
    started = time.perf_counter()
    JOBS[(job, impl)](Path(directory), threads)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (belongs to this address space alone). ru_maxrss is not
    used: across fork + exec it keeps the parent's high-water mark (the data generator's)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(job: str, impl: str, directory: Path, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, __file__, "--_worker", job, impl, str(directory), str(threads)],
                         capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"{impl} {job} failed:\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def check_agreement(directory: Path) -> float:
    """Largest |mrm − torch| over the adapted weights (the two jobs must agree)."""
    import pyarrow.parquet as pq

    a = pq.read_table(directory / "mrm-weights.parquet").to_pydict()
    b = pq.read_table(directory / "torch-weights.parquet").to_pydict()
    order = {u: i for i, u in enumerate(b["user_id"])}
    wa = np.array(a["weights"], np.float32)
    wb = np.array(b["weights"], np.float32)[[order[u] for u in a["user_id"]]]
    return float(np.abs(wa - wb).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", default="10000,100000", help="comma-separated user counts (1e4 .. 1e6)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", action="store_true", help="write docs/bench_batch_scaling.png")
    parser.add_argument("--workdir", default=None, help="where to put the generated data (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    parser.add_argument("--_worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        job, impl, directory, threads = args._worker
        worker(job, impl, directory, int(threads))
        return

    sizes = [int(float(s)) for s in args.users.split(",")]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="mrm-bench-batch-"))
    results = []
    print(f"{PAIRS} pairs/user, K = {K}, adam T = {STEPS}, threads = {args.threads}; peak RSS includes imports")
    header = (f"{'users':>9} {'job':>5} {'impl':>13} {'seconds':>8} {'users/s':>10} {'peak MB':>8}"
              f" {'time ratio':>10} {'mem ratio':>9}")
    print(header)
    print("-" * len(header))
    try:
        for n in sizes:
            directory = root / f"n{n}"
            directory.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            generate(directory, n)
            generated = time.perf_counter() - started
            for job in ("adapt", "score"):
                row = {}
                for impl in ("mrm", "pandas+torch"):
                    row[impl] = measure(job, impl, directory, args.threads)
                    results.append({"users": n, "job": job, "impl": impl, **row[impl]})
                for impl in ("mrm", "pandas+torch"):
                    r = row[impl]
                    ratio = row["pandas+torch"]["seconds"] / row["mrm"]["seconds"]
                    memory = row["pandas+torch"]["peak_mb"] / row["mrm"]["peak_mb"]
                    extra = f" {ratio:>9.2f}x {memory:>8.2f}x" if impl == "pandas+torch" else ""
                    print(f"{n:>9} {job:>5} {impl:>13} {r['seconds']:>8.2f} {n / r['seconds']:>10.0f} "
                          f"{r['peak_mb']:>8.0f}{extra}", flush=True)
            floor = measure("read", "pyarrow", directory, args.threads)
            results.append({"users": n, "job": "read", "impl": "pyarrow", **floor})
            print(f"{'':>9} (decoding the user-major logs alone takes {floor['seconds']:.2f} s: the floor "
                  f"for any job on them)", flush=True)
            print(f"{'':>9} (data generation {generated:.1f} s; max |w_mrm - w_torch| = "
                  f"{check_agreement(directory):.1e})", flush=True)
            shutil.rmtree(directory, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print("time ratio = pandas+torch seconds / mrm seconds; mem ratio = pandas+torch peak / mrm peak")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, REPO / "docs" / "bench_batch_scaling.png", args.threads)


def plot(results, path: Path, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    styles = {"mrm": "-o", "pandas+torch": "--s"}
    for job, colour in (("adapt", "tab:blue"), ("score", "tab:orange")):
        for impl, style in styles.items():
            rows = [r for r in results if r["job"] == job and r["impl"] == impl]
            axis.plot([r["users"] for r in rows], [r["seconds"] for r in rows], style, color=colour,
                      label=f"{job}: {impl}")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("users (32 pairs each, K = 8)")
    axis.set_ylabel("seconds, end to end (read + compute + write)")
    axis.set_title(f"mrm batch jobs vs pandas + PyTorch ({threads} threads)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
