#!/usr/bin/env python
"""Seconds per meta-training epoch: the native MetaTrainer against two PyTorch baselines.

Workload: U synthetic users (default 10,000), each with 64 training pairs over a pool of random
D = 384 embeddings, K = 8 base reward functions (one linear layer), val_ratio 0.5 → 32 support
+ 32 query pairs per user and epoch, RPO (ρ = 0.5, γ = 0.5), inner loop ``--optimizer`` with
``--steps`` steps, Adam outer step with clipping. float32, torch.set_num_threads = the kernel's
thread count.

  * mrm:      MetaTrainer.train_epoch, tasks_per_batch = --tasks-per-batch (one native call per batch);
  * padded:   the same outer loop with padded tensors and autograd through the unrolled inner
              loop (create_graph=True) for the same batches (benches/baselines.py);
  * per-user: the official code's shape: tasks_per_batch = 2, each user adapted on its own with
              autograd through the unrolled loop; timed on --per-user-sample users and scaled
              to a whole epoch (it would take hours otherwise; the scaling is printed).

    python benches/bench_train.py                 # 10,000 users
    python benches/bench_train.py --users 2000    # quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from baselines import _optimizer_step, _padded_losses  # noqa: E402
from mrm import ops  # noqa: E402
from mrm.data.pairs import PreferenceData, UserPairs  # noqa: E402
from mrm.train import MetaTrainer, TrainConfig  # noqa: E402


def synthetic(users: int, pool: int, dim: int, pairs: int, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(pool, dim)).astype(np.float32) / np.sqrt(dim)
    chosen = rng.integers(pool, size=users * pairs)
    rejected = rng.integers(pool, size=users * pairs)
    offsets = np.arange(users + 1, dtype=np.int64) * pairs
    train = UserPairs(offsets, chosen, rejected, np.arange(users * pairs))
    test = UserPairs(np.arange(users + 1, dtype=np.int64), rng.integers(pool, size=users), rng.integers(pool, size=users), np.arange(users))
    data = PreferenceData([("", "")] * pool, [str(u) for u in range(users)], train, test, np.ones(users, bool))
    return emb, data


def rpo_torch(losses: torch.Tensor, tail: float, gamma: float) -> torch.Tensor:
    tau = torch.quantile(losses, 1 - tail)
    return (torch.sigmoid((losses - tau) / gamma) * losses).sum()


def padded_epoch(trainer: MetaTrainer, plan, model, optimizer, emb_t, config) -> None:
    """The same epoch with padded tensors: every user has the same support/query counts here."""
    pairs = trainer.data.train
    tpb = config.tasks_per_batch
    n = len(plan.users)
    for first in range(0, n, tpb):
        last = min(n, first + tpb)
        s_idx = plan.support_pairs[plan.support_offsets[first]:plan.support_offsets[last]]
        q_idx = plan.query_pairs[plan.query_offsets[first]:plan.query_offsets[last]]
        b = last - first
        # φ exactly as the native trainer computes it, so the difference is the inner loop
        d = model.pair_differences(emb_t, np.concatenate([pairs.chosen[s_idx], pairs.chosen[q_idx]]),
                                   np.concatenate([pairs.rejected[s_idx], pairs.rejected[q_idx]]))
        support = d[:len(s_idx)].reshape(b, -1, config.num_bases)
        query = d[len(s_idx):].reshape(b, -1, config.num_bases)
        s_mask = torch.ones(support.shape[:2])
        q_mask = torch.ones(query.shape[:2])
        W = model.shared_weight.expand(b, -1)
        m = torch.zeros_like(W)
        v = torch.zeros_like(W)
        for t in range(1, config.inner_steps + 1):
            (g,) = torch.autograd.grad(_padded_losses(W, support, s_mask).sum(), W, create_graph=True)
            W, m, v = _optimizer_step(W, m, v, g, t, config.inner_lr, config.inner_optimizer, (0.9, 0.999), 1e-8)
        objective = rpo_torch(_padded_losses(W, query, q_mask), config.tail, config.gamma)
        optimizer.zero_grad()
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()


def per_user_steps(trainer: MetaTrainer, plan, model, optimizer, emb_t, config, n_users: int) -> None:
    """Official-style loop: two users per outer step, each adapted alone (autograd, create_graph)."""
    pairs = trainer.data.train
    for first in range(0, n_users, 2):
        losses = []
        for position in range(first, min(n_users, first + 2)):
            s = plan.support_pairs[plan.support_offsets[position]:plan.support_offsets[position + 1]]
            q = plan.query_pairs[plan.query_offsets[position]:plan.query_offsets[position + 1]]
            rows = np.concatenate([pairs.chosen[s], pairs.rejected[s], pairs.chosen[q], pairs.rejected[q]])
            phi = model.features(emb_t[rows])
            ns, nq = len(s), len(q)
            d_s = phi[:ns] - phi[ns:2 * ns]
            d_q = phi[2 * ns:2 * ns + nq] - phi[2 * ns + nq:]
            w, m, v = model.shared_weight, torch.zeros_like(model.shared_weight), torch.zeros_like(model.shared_weight)
            for t in range(1, config.inner_steps + 1):
                loss = torch.nn.functional.softplus(-(d_s @ torch.softmax(w, 0))).mean()
                (g,) = torch.autograd.grad(loss, w, create_graph=True)
                w, m, v = _optimizer_step(w, m, v, g, t, config.inner_lr, config.inner_optimizer, (0.9, 0.999), 1e-8)
            losses.append(torch.nn.functional.softplus(-(d_q @ torch.softmax(w, 0))).mean())
        objective = rpo_torch(torch.stack(losses), config.tail, config.gamma)
        optimizer.zero_grad()
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--pool", type=int, default=20_000, help="distinct embeddings")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--tasks-per-batch", type=int, default=1024)
    parser.add_argument("--per-user-sample", type=int, default=400)
    parser.add_argument("--threads", type=int, default=ops.resolve_threads(None))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    emb, data = synthetic(args.users, args.pool, args.dim, 64)
    print(f"{args.users:,} users x (32 + 32) pairs, D = {args.dim}, K = {args.k}, inner {args.optimizer}, "
          f"{args.threads} threads (torch and native), float32, torch {torch.__version__}")
    print("| inner steps | mrm s/epoch | padded s/epoch | per-user s/epoch (scaled) | vs padded | vs per-user |")
    print("|---:|---:|---:|---:|---:|---:|")
    for steps in args.steps:
        config = TrainConfig(num_bases=args.k, scale=1.0, inner_optimizer=args.optimizer, inner_steps=steps,
                             inner_lr=0.01, meta_lr=1e-3, epochs=3, tasks_per_batch=args.tasks_per_batch,
                             val_ratio=0.5, num_threads=args.threads)
        trainer = MetaTrainer(config, emb, data)
        trainer.train_epoch()  # warm-up (thread pools, allocator)
        started = time.perf_counter()
        trainer.train_epoch()
        t_mrm = time.perf_counter() - started

        emb_t = torch.as_tensor(emb)
        model = MetaTrainer(config, emb, data).model
        optimizer = torch.optim.Adam(model.parameters(), lr=config.meta_lr)
        started = time.perf_counter()
        plan = trainer.epoch_plan(1)  # an epoch's split is part of its work on both sides
        padded_epoch(trainer, plan, model, optimizer, emb_t, config)
        t_padded = time.perf_counter() - started

        sample = min(args.per_user_sample, args.users)
        started = time.perf_counter()
        per_user_steps(trainer, plan, model, optimizer, emb_t, config, sample)
        t_per_user = (time.perf_counter() - started) * args.users / sample
        print(f"| {steps} | {t_mrm:.2f} | {t_padded:.2f} | {t_per_user:.1f} | {t_padded / t_mrm:.1f}x | {t_per_user / t_mrm:.0f}x |",
              flush=True)
    print(f"(per-user timed on {min(args.per_user_sample, args.users)} users and scaled to {args.users:,})")
    # The same epoch without inner steps: what both implementations share (φ, gathers, outer step)
    # plus the query loss. No inner loop can make an epoch faster than this.
    config = TrainConfig(num_bases=args.k, scale=1.0, inner_optimizer=args.optimizer, inner_steps=0, inner_lr=0.01,
                         meta_lr=1e-3, epochs=3, tasks_per_batch=args.tasks_per_batch, val_ratio=0.5,
                         num_threads=args.threads)
    trainer = MetaTrainer(config, emb, data)
    trainer.train_epoch()
    started = time.perf_counter()
    trainer.train_epoch()
    print(f"floor: an epoch with no inner steps (T = 0) takes {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
