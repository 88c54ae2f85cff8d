#!/usr/bin/env python
"""RPO against the plain mean objective on the ground-truth population of the tests.

Each seed builds the PersonalLLM-style population of ``tests/test_train.py`` (every user's true
reward a Dirichlet mixture of K = 3 known base functions; 300 seen users with 40 pairs, 150
unseen users adapted from 10 pairs), meta-trains twice with the same settings and seed — once
with the mean of the users' query losses, once with RPO (ρ = 0.5, γ = 0.5) — and prints the
user-level accuracy (SPEC §5) of both, the worst-10 % users included. A measurement, not a test.

    python benches/rpo_vs_mean.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from test_train import _dirichlet_population  # noqa: E402
from mrm.train import MetaTrainer, TrainConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    print("| seed | objective | seen | seen worst-10 % | unseen | unseen worst-10 % |")
    print("|---:|---|---:|---:|---:|---:|")
    for seed in args.seeds:
        emb, data = _dirichlet_population(seed=seed)
        for objective in ("mean", "rpo"):
            config = TrainConfig(num_bases=3, scale=1.0, inner_optimizer="sgd", inner_steps=5, inner_lr=3.0,
                                 meta_lr=0.05, epochs=25, tasks_per_batch=32, val_ratio=0.5, objective=objective,
                                 tail=0.5, gamma=0.5, warmup_ratio=0.05, eval_every=25, seed=seed)
            trainer = MetaTrainer(config, emb, data)
            trainer.fit(progress=False)
            s = trainer.evaluate().summary()
            print(f"| {seed} | {objective} | {s['seen']:.3f} | {s['seen_worst10']:.3f} | {s['unseen']:.3f} "
                  f"| {s['unseen_worst10']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
