"""Headroom probe for issue #14's accuracy targets: how far could the prior's strength alone
move the MAP adaptation on MovieLens-100K, if it were chosen on the very users reported?

    python benches/probe_headroom.py [--shots 5 10 20 50] [--offsets -4 -3 -2 -1 0 1 2 3 4]

The model is the demo's empirical-Bayes start (`bt-pca`, the recommended preset's start; the
demo shows meta-training on top of it changes no accuracy by more than 0.001). Every user's
prior log precisions η are shifted by one offset δ (λ × e^δ), and the unseen users are adapted
at each shot count. The best δ per shot count is picked ON THE UNSEEN USERS' TEST PAIRS: an
oracle, so the printed maximum is a ceiling for any choice of prior strength, never a result
(no reported model is selected this way). Paired differences against the global Bradley–Terry
model refitted at each shot count, in points, with bootstrap 95 % intervals over users.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import replace
from pathlib import Path

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--offsets", type=float, nargs="+", default=[-4, -3, -2, -1, -0.5, 0, 0.5, 1, 2, 3, 4])
    parser.add_argument("--cache-dir", type=Path, default=Path("mrm-demo/embedding-cache"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from mrm.data.movielens import load_movielens
    from mrm.data.pairs import with_shots
    from mrm.demo import PROTOCOL, official_config
    from mrm.embed import EmbeddingCache, minilm_path
    from mrm.evaluate import evaluate_features, paired_difference
    from mrm.model import MetaRewardModel
    from mrm.train import MetaTrainer, bt_pca_start, fit_global_bradley_terry, preset

    torch.set_num_threads(args.threads)
    data = load_movielens(seed=42, **PROTOCOL)
    embeddings = EmbeddingCache(args.cache_dir, minilm_path(), kind="encoder").embed(data.texts, progress=False)
    unseen = ~np.asarray(data.seen, bool)
    recommended = preset("recommended", num_threads=args.threads)
    model = MetaRewardModel(recommended.model_config(embeddings.shape[1])).double()
    bt_pca_start(model, embeddings, data, ridge=recommended.init_ridge)
    trainer = MetaTrainer(replace(recommended, dtype="float64"), embeddings, data, model=copy.deepcopy(model))
    features = trainer.features()
    w0 = trainer.model.shared_weight.detach().cpu().numpy()
    eta = trainer.model.log_precision.detach().cpu().numpy()
    print(f"{'shots':>5} {'δ':>5} {'MAP − BT, points [95 % CI]':>30}")
    for s in args.shots:
        split = with_shots(data, s)
        bt = fit_global_bradley_terry(embeddings, split.train, official_config().model_config(embeddings.shape[1]))
        with torch.no_grad():
            phi = bt.features(torch.as_tensor(embeddings, dtype=torch.float64)).numpy()
        base = evaluate_features(phi, np.zeros(1), split, steps=0, lr=1.0, num_threads=args.threads).accuracy[unseen]
        best = None
        for delta in args.offsets:
            acc = evaluate_features(features, w0, split, inner=trainer.inner, eta=eta + delta,
                                    num_threads=args.threads).accuracy[unseen]
            d = paired_difference(acc, base)
            print(f"{s:>5} {delta:>+5.1f} {100 * d.mean:>+8.2f} [{100 * d.low:+.2f}, {100 * d.high:+.2f}]", flush=True)
            if best is None or d.mean > best[1].mean:
                best = (delta, d)
        delta, d = best
        print(f"{s:>5} oracle best δ = {delta:+.1f}: {100 * d.mean:+.2f} [{100 * d.low:+.2f}, {100 * d.high:+.2f}]",
              flush=True)


if __name__ == "__main__":
    main()
