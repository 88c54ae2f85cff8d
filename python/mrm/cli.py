"""The ``mrm`` command line: a thin layer over the library (each subcommand calls one function).

Add a subcommand by writing ``_add_NAME(parser)`` (its arguments; its docstring is the
description ``--help`` shows) and ``_run_NAME(args)`` (the call), and listing it with its
one-line help in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
from typing import Callable, Dict, List, NamedTuple, Optional

import numpy as np

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
mrm-fast: personalised reward models with Meta Reward Modeling.

`mrm demo` runs the whole pipeline on MovieLens-100K. `mrm embed` / `mrm train` / `mrm eval` take a
dataset from texts to an evaluated model (embeddings are cached). A checkpoint (config.json +
model.safetensors) holds the shared base reward functions and the
meta-learned start w0. From it, `mrm adapt` fits each user's weights on their logged preference
pairs, and `mrm score` rewards responses with those personal weights. Logs are user-major
Parquet: one row per user (see `python -c "import mrm.batch; help(mrm.batch)"`).
"""

EPILOG = """\
examples:
  mrm demo                                   # MovieLens-100K end to end (the README's main job)
  mrm train --data movielens --backbone minilm --output-dir run --num-bases 8 \\
            --inner-optimizer sgd --inner-steps 10 --inner-lr 1.0 --meta-lr 0.03 --tasks-per-batch 32 --epochs 60
  mrm eval --data movielens --checkpoint run/best --output-dir run/eval
  mrm to-user-major --data log:feedback.jsonl --backbone minilm --output logs.parquet
  mrm adapt --checkpoint ckpt/ --logs logs.parquet --output weights.parquet --steps 1 --lr 1e-3
  mrm adapt --checkpoint ckpt/ --logs today.parquet --warm-start weights.parquet \\
            --output weights.parquet --overwrite --steps 1 --lr 1e-3
  mrm score --checkpoint ckpt/ --weights weights.parquet --logs logs.parquet --output scores.parquet
"""


def _parse(text: str, convert: Callable[[str], float], expected: str):
    """``convert(text)``; a text it cannot read is an argparse error "expected EXPECTED, got 'TEXT'"."""
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _parse(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _steps(text: str) -> int:
    """Inner steps: an integer in 0..MAX_STEPS (mrm.ops)."""
    from mrm.ops import MAX_STEPS

    value = _parse(text, int, "a whole number of steps")
    if not 0 <= value <= MAX_STEPS:
        raise argparse.ArgumentTypeError(f"expected 0 to {MAX_STEPS} steps, got {text}")
    return value


def _threads(text: str) -> int:
    """Kernel threads: 1..mrm.ops.max_threads()."""
    from mrm.ops import max_threads

    value = _positive_int(text)
    if value > max_threads():
        raise argparse.ArgumentTypeError(f"expected at most {max_threads()} threads (4 x the CPUs, at least 64), "
                                         f"got {text}")
    return value


def _finite_float(text: str) -> float:
    value = _parse(text, float, "a number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _refuse_existing_dir(path: str, overwrite: bool, flag: str, hint: str = "") -> None:
    """A run / report directory that already holds files is replaced only with ``flag``."""
    from pathlib import Path

    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} already exists and is not empty (pass {flag} to write into it and "
                              f"replace what it holds{hint})")


def _add_common(parser: argparse.ArgumentParser) -> None:
    """Options every batch job takes."""
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="model directory with config.json and model.safetensors")
    parser.add_argument("--logs", required=True, metavar="PARQUET",
                        help="user-major Parquet logs (a file or a directory of .parquet files)")
    parser.add_argument("--output", required=True, metavar="PARQUET",
                        help="where to write the result (a Parquet file, written atomically)")
    parser.add_argument("--threads", type=_threads, default=None, metavar="N",
                        help="kernel threads (default: $MRM_NUM_THREADS, else every CPU)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--batch-users", type=_positive_int, default=None, metavar="N",
                        help="users read and processed per batch (bounds memory; default 8192)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_adapt(parser: argparse.ArgumentParser) -> None:
    """Adapt every user in the logs from the checkpoint's w0 (or from their previous weights with --warm-start)
    with a few optimiser steps on their preference pairs, and write a user-weights table (user_id, weights,
    n_pairs, support_loss, version)."""
    _add_common(parser)
    parser.add_argument("--steps", type=_steps, default=1, metavar="T", help="inner steps per user (default 1)")
    parser.add_argument("--lr", type=_finite_float, default=1e-3, help="inner learning rate (default 1e-3)")
    parser.add_argument("--optimizer", choices=("adam", "sgd", "map"), default=None,
                        help="inner optimiser, or map for checkpoints trained with a prior (default: map for "
                             "those, else adam)")
    parser.add_argument("--warm-start", default=None, metavar="PARQUET",
                        help="a previous user-weights table: its users start from their weights (online update)")


def _run_adapt(args: argparse.Namespace) -> str:
    from mrm.batch import DEFAULT_BATCH_USERS, adapt_users

    summary = adapt_users(
        args.checkpoint, args.logs, args.output, steps=args.steps, lr=args.lr, optimizer=args.optimizer,
        threads=args.threads, warm_start=args.warm_start, overwrite=args.overwrite,
        batch_users=args.batch_users or DEFAULT_BATCH_USERS, progress=not args.no_progress,
    )
    extra = f", {summary.warm_started} warm-started, {summary.copied} copied unchanged" if args.warm_start else ""
    return (f"adapted {summary.users} users ({summary.pairs} pairs{extra}) in {summary.seconds:.2f} s "
            f"-> {summary.output}")


def _add_score(parser: argparse.ArgumentParser) -> None:
    """Score each user's candidate responses (candidate_* columns) and/or preference pairs (chosen_*/rejected_*
    columns: rewards and P(chosen beats rejected)) with the user's adapted weights. Users missing from --weights
    are scored with w0 and counted."""
    _add_common(parser)
    parser.add_argument("--weights", default=None, metavar="PARQUET",
                        help="user-weights table from `mrm adapt` (default: score everyone with w0)")


def _run_score(args: argparse.Namespace) -> str:
    from mrm.batch import DEFAULT_BATCH_USERS, score

    summary = score(
        args.checkpoint, args.weights, args.logs, args.output, threads=args.threads, overwrite=args.overwrite,
        batch_users=args.batch_users or DEFAULT_BATCH_USERS, progress=not args.no_progress,
    )
    return (f"scored {summary.users} users ({summary.pairs} pairs, {summary.candidates} candidates; "
            f"{summary.fallback_users} without weights used w0) in {summary.seconds:.2f} s -> {summary.output}")



# ---- the text pipeline: embed, train, eval, demo ---------------------------------------------

DATA_HELP = ("dataset: 'movielens' (MovieLens-100K from the installed recbole package), 'log:PATH' "
             "(Parquet/JSONL preference log: user_id, prompt, chosen, rejected[, split, group_id]), "
             "'prism:DIR' or 'tldr:DIR' (the official files)")


def _add_data_and_backbone(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="movielens", metavar="SPEC", help=DATA_HELP + " (default movielens)")
    parser.add_argument("--backbone", default="minilm", metavar="NAME|PATH",
                        help="embedding backbone: 'minilm', 'smollm2' (shipped in packages) or a local model "
                             "directory / .gguf file (default minilm)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="embedding cache for this backbone (default: $MRM_CACHE_DIR/<backbone>, else "
                             "$XDG_CACHE_HOME/mrm/<backbone>, i.e. ~/.cache/mrm/<backbone>: shared by every folder)")
    parser.add_argument("--response-only", action="store_true",
                        help="embed each response without its prompt (the official setup); a model trained this "
                             "way must be evaluated this way too")
    parser.add_argument("--batch-size", type=_positive_int, default=32, metavar="N",
                        help="texts per forward pass (default 32)")
    parser.add_argument("--seed", type=int, default=42, help="seen/unseen split and per-user RNG seed (default 42)")
    parser.add_argument("--no-progress", action="store_true", help="hide every progress bar")


def _skipped(data) -> str:
    """The data's skip counts as text ('' when nothing was skipped)."""
    counts = {k: v for k, v in (getattr(data, "skipped", None) or {}).items() if v}
    return ("skipped " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())) if counts else ""


def _embeddings(args: argparse.Namespace):
    from mrm.data import load_dataset
    from mrm.embed import default_cache_dir, embed_dataset

    data = load_dataset(args.data, seed=args.seed)
    skipped = _skipped(data)
    if skipped:
        print(f"mrm: {args.data}: {skipped}", file=sys.stderr, flush=True)
    if args.cache_dir is None:
        args.cache_dir = str(default_cache_dir(args.backbone))
    embeddings = embed_dataset(data, args.backbone, args.cache_dir, progress=not args.no_progress,
                               batch_size=args.batch_size, response_only=args.response_only)
    return data, embeddings


def _add_embed(parser: argparse.ArgumentParser) -> None:
    """Embed every (prompt, response) text of a dataset with a frozen backbone and keep the vectors in
    --cache-dir (resumable; later `mrm train` / `mrm eval` runs read them back)."""
    _add_data_and_backbone(parser)


def _run_embed(args: argparse.Namespace) -> str:
    data, embeddings = _embeddings(args)
    skipped = _skipped(data)
    return (f"{data.summary()}; {embeddings.shape[0]} texts x {embeddings.shape[1]} dims cached in {args.cache_dir}"
            + (f"; {skipped}" if skipped else ""))


def _add_to_user_major(parser: argparse.ArgumentParser) -> None:
    """Embed every (prompt, response) text of a dataset through the cache and write all of each user's pairs
    (train and test) as user-major Parquet logs with chosen_embeddings / rejected_embeddings columns, ready for
    `mrm adapt` and `mrm score` with a checkpoint trained on the same backbone."""
    _add_data_and_backbone(parser)
    parser.add_argument("--output", required=True, metavar="PARQUET", help="the user-major logs (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def _run_to_user_major(args: argparse.Namespace) -> str:
    from pathlib import Path

    from mrm.batch import preference_data_to_user_major
    from mrm.batch.parquet import check_output as _check_output

    _check_output(Path(args.output), args.overwrite)  # before the (long) embedding, not after
    data, embeddings = _embeddings(args)
    path = preference_data_to_user_major(data, embeddings, args.output, overwrite=args.overwrite)
    pairs = int(data.train.offsets[-1] + data.test.offsets[-1])
    return f"{len(data.user_ids)} users, {pairs} pairs, {embeddings.shape[1]}-dim embeddings -> {path}"


def _add_train(parser: argparse.ArgumentParser) -> None:
    """Meta-train the base reward functions and the shared start w0 on the dataset's seen users (MAML inner loop
    + RPO). Options left out take the released MRM hyper-parameters (K=2, one inner Adam step with lr 1e-3, meta
    lr 1e-3, 200 epochs, 2 users per step, RPO rho=0.5 gamma=0.5), except --scale. Writes OUTPUT/best (the best
    epoch's checkpoint), OUTPUT/last (resumable) and history.json."""
    _add_data_and_backbone(parser)
    parser.add_argument("--output-dir", required=True, metavar="DIR", help="run directory (created)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/last if present")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an existing, non-empty --output-dir (its best/, last/, history.json are "
                             "replaced)")
    parser.add_argument("--num-bases", type=_positive_int, default=None, metavar="K",
                        help="number of base reward functions K (default 2, released)")
    parser.add_argument("--hidden-sizes", type=_positive_int, nargs="*", default=[], metavar="H",
                        help="widths of hidden layers between the embedding and the K outputs (default none: one "
                             "linear map, released)")
    parser.add_argument("--scale", type=_finite_float, default=1.0,
                        help="input scale of the base functions (default 1.0 for unit-norm sentence embeddings; the "
                             "released 0.01 suits raw LLM hidden states)")
    parser.add_argument("--preset", choices=("released", "recommended"), default="released",
                        help="starting settings, which the other flags override: 'released' (the paper's) or "
                             "'recommended' (MAP adaptation under a meta-learned prior over a global Bradley-Terry "
                             "direction plus 8 personal directions; see the README) (default released)")
    parser.add_argument("--inner-optimizer", choices=("adam", "sgd", "map"), default=None,
                        help="per-user adaptation: adam/sgd steps, or map (the posterior mode under a meta-learned "
                             "Gaussian prior) (default adam, released)")
    parser.add_argument("--weight-map", choices=("simplex", "linear"), default=None,
                        help="user weights over the bases: softmax (simplex) or unconstrained (linear, map only) "
                             "(default simplex)")
    parser.add_argument("--support-sizes", type=_positive_int, nargs=2, default=None, metavar=("LO", "HI"),
                        help="meta-train on item-disjoint supports of LO..HI pairs per user instead of the "
                             "official 10 %% split (default: the official split; recommended: 5 50)")
    parser.add_argument("--inner-steps", type=_steps, default=None, metavar="T",
                        help="inner steps per user (default 1, released)")
    parser.add_argument("--inner-lr", type=_finite_float, default=None, help="inner learning rate (default 1e-3, released)")
    parser.add_argument("--first-order", action="store_true", help="first-order MAML (no Hessian terms)")
    parser.add_argument("--meta-lr", type=_finite_float, default=None, help="outer Adam learning rate (default 1e-3, released)")
    parser.add_argument("--epochs", type=_positive_int, default=None, help="meta-training epochs (default 200, released)")
    parser.add_argument("--tasks-per-batch", type=_positive_int, default=None, metavar="N",
                        help="users per outer step, all in one native call (default 2, released; 1024 is the fast path)")
    parser.add_argument("--objective", choices=("rpo", "mean"), default=None,
                        help="meta-objective: RPO or the plain mean of the users' query losses (default rpo)")
    parser.add_argument("--tail", type=_finite_float, default=None, help="RPO tail ratio rho (default 0.5)")
    parser.add_argument("--gamma", type=_finite_float, default=None, help="RPO smoothing, <= 0: hard mask (default 0.5)")
    parser.add_argument("--eval-every", type=_positive_int, default=None, metavar="EPOCHS",
                        help="evaluate (and checkpoint the best epoch) every this many epochs, and at the last "
                             "(default 10, released; 1, recommended)")
    parser.add_argument("--threads", type=_threads, default=None, metavar="N",
                        help="kernel and torch threads (default: $MRM_NUM_THREADS, else every CPU)")


def _train_config(args: argparse.Namespace):
    """The TrainConfig of `mrm train`: the preset, with the flags given on top."""
    from mrm.train import preset

    chosen = dict(
        num_bases=args.num_bases, hidden_sizes=list(args.hidden_sizes) or None, scale=args.scale,
        inner_optimizer=args.inner_optimizer, inner_steps=args.inner_steps, inner_lr=args.inner_lr,
        weight_map=args.weight_map, support_sizes=list(args.support_sizes) if args.support_sizes else None,
        first_order=args.first_order or None, meta_lr=args.meta_lr, epochs=args.epochs,
        tasks_per_batch=args.tasks_per_batch, objective=args.objective, tail=args.tail, gamma=args.gamma,
        # the command evaluates the released configuration every 10 epochs (its 200 epochs'
        # evaluations would cost more than the training); presets that set it keep theirs
        eval_every=args.eval_every if args.eval_every is not None else (10 if args.preset == "released" else None),
        seed=args.seed, num_threads=args.threads,
    )
    # options left out keep the preset's values (released: the paper's hyper-parameters)
    return preset(args.preset, **{k: v for k, v in chosen.items() if v is not None})


def _run_train(args: argparse.Namespace) -> str:
    from mrm.train import MetaTrainer

    config = _train_config(args)
    _refuse_existing_dir(args.output_dir, args.overwrite or args.resume, "--overwrite", " or --resume to continue it")
    data, embeddings = _embeddings(args)
    trainer = MetaTrainer(config, embeddings, data, output_dir=args.output_dir, resume=args.resume)
    best = trainer.fit(progress=not args.no_progress)
    return (f"best epoch {best.get('epoch')}: seen {best.get('seen', float('nan')):.4f}, unseen "
            f"{best.get('unseen', float('nan')):.4f} (worst 10 %: {best.get('unseen_worst10', float('nan')):.4f}) "
            f"-> {args.output_dir}/best")


def _add_eval(parser: argparse.ArgumentParser) -> None:
    """Adapt every user on its training pairs (unseen users: the first N of them for each --shots value) and
    score its test pairs (SPEC section 5). Writes report.json, per_user.csv and accuracy_vs_shots.png into
    --output-dir."""
    _add_data_and_backbone(parser)
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="model directory (e.g. RUN/best)")
    parser.add_argument("--output-dir", required=True, metavar="DIR", help="where report.json and the plots go")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an existing, non-empty --output-dir (its reports are replaced)")
    parser.add_argument("--shots", type=_positive_int, nargs="+", default=[5, 10, 20, 50], metavar="N",
                        help="unseen users adapted on their first N training pairs, for each N (default 5 10 20 50)")
    parser.add_argument("--steps", type=_steps, default=None, metavar="T",
                        help="inner steps (default: those the checkpoint was trained with)")
    parser.add_argument("--lr", type=_finite_float, default=None, help="inner lr (default: from the checkpoint)")
    parser.add_argument("--optimizer", choices=("adam", "sgd", "map"), default=None,
                        help="inner optimiser (default: from the checkpoint)")
    parser.add_argument("--threads", type=_threads, default=None, metavar="N",
                        help="kernel threads (default: $MRM_NUM_THREADS, else every CPU)")


def _run_eval(args: argparse.Namespace) -> str:
    from pathlib import Path

    from mrm.checkpoint import Checkpoint
    from mrm.data import with_shots
    from mrm.evaluate import evaluate_features, plot_shots, write_json

    _refuse_existing_dir(args.output_dir, args.overwrite, "--overwrite")
    checkpoint = Checkpoint.load(args.checkpoint)
    # the settings it was meta-trained with, unless the flags say otherwise
    inner = checkpoint.inner_loop(optimizer=args.optimizer, steps=args.steps, lr=args.lr)
    data, embeddings = _embeddings(args)
    if embeddings.shape[1] != checkpoint.input_dim:
        raise ValueError(f"--checkpoint expects {checkpoint.input_dim}-d embeddings but --backbone gives "
                         f"{embeddings.shape[1]}-d ones")
    features = checkpoint.features(embeddings.astype(np.float64))
    kw = dict(inner=inner, eta=checkpoint.eta, num_threads=args.threads)
    full = evaluate_features(features, checkpoint.w0.astype(np.float64), data, **kw)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    full.write_csv(out / "per_user.csv")
    summary = {"all_training_pairs": full.summary(), "by_shots": {}}
    for shots in sorted(args.shots):
        summary["by_shots"][shots] = evaluate_features(features, checkpoint.w0.astype(np.float64),
                                                       with_shots(data, shots), **kw).summary()
    write_json(out / "report.json", {"checkpoint": str(args.checkpoint), "data": args.data,
                                     "inner": inner.to_dict(), **summary})
    plot_shots({"unseen users": {s: v["unseen"] for s, v in summary["by_shots"].items()}}, out / "accuracy_vs_shots.png")
    return _accuracy_line(summary) + f" -> {out}/report.json"


def _accuracy_line(summary: dict) -> str:
    """seen, unseen at each shot count, and unseen on all training pairs: one line."""
    s = summary["all_training_pairs"]
    shots = ", ".join(f"@{n} {v['unseen']:.4f} (worst 10 % {v['unseen_worst10']:.4f})"
                      for n, v in summary["by_shots"].items())
    return (f"seen {s['seen']:.4f} (worst 10 % {s['seen_worst10']:.4f}); unseen {shots}; unseen on all their "
            f"training pairs {s['unseen']:.4f} (worst 10 % {s['unseen_worst10']:.4f})")


def _add_baseline(parser: argparse.ArgumentParser) -> None:
    """Fit one global reward model (phi with K = 1, L-BFGS on every user's training pairs: seen users' and, for
    each --shots value, the unseen users' first N) and report the same user-level accuracies as `mrm eval`.
    Writes report.json and OUTPUT/global-bt (a checkpoint fitted on all training pairs)."""
    _add_data_and_backbone(parser)
    parser.add_argument("--output-dir", required=True, metavar="DIR", help="where report.json and the checkpoint go")
    parser.add_argument("--shots", type=_positive_int, nargs="+", default=[5, 10, 20, 50], metavar="N",
                        help="unseen users' training pairs used, for each N (default 5 10 20 50)")
    parser.add_argument("--hidden-sizes", type=_positive_int, nargs="*", default=[], metavar="H",
                        help="hidden widths of phi (default none: a linear reward)")
    parser.add_argument("--scale", type=float, default=1.0, help="input scale of phi (default 1.0)")
    parser.add_argument("--l2", type=float, default=1e-4, help="L2 penalty on phi's weights (default 1e-4)")
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="kernel threads (default: $MRM_NUM_THREADS, else every CPU)")


def _run_baseline(args: argparse.Namespace) -> str:
    from pathlib import Path

    import torch

    from mrm.data import with_shots
    from mrm.evaluate import evaluate_features, write_json
    from mrm.model import ModelConfig
    from mrm.train import fit_global_bradley_terry

    data, embeddings = _embeddings(args)
    config = ModelConfig(input_dim=embeddings.shape[1], num_bases=1, hidden_sizes=list(args.hidden_sizes),
                         scale=args.scale)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    def fit_and_score(view):
        model = fit_global_bradley_terry(embeddings, view.train, config, l2=args.l2)
        with torch.no_grad():
            phi = model.features(torch.as_tensor(embeddings, dtype=torch.float64)).numpy()
        return model, evaluate_features(phi, np.zeros(1), view, steps=0, lr=1.0, num_threads=args.threads)

    model, full = fit_and_score(data)
    model.save_pretrained(out / "global-bt", extra_config={"baseline": "global-bradley-terry"})
    summary = {"all_training_pairs": full.summary(), "by_shots": {}}
    for shots in sorted(args.shots):
        summary["by_shots"][shots] = fit_and_score(with_shots(data, shots))[1].summary()
    write_json(out / "report.json", {"model": "global Bradley-Terry", "data": args.data, **summary})
    return "global Bradley-Terry: " + _accuracy_line(summary) + f" -> {out}/report.json"


def _os_error_message(exc: OSError) -> str:
    """``PATH: reason`` for an operating-system error (permission, disk full, ...)."""
    if exc.filename is None:
        return str(exc)
    reason = exc.strerror or type(exc).__name__
    if exc.filename2 is not None:
        return f"{exc.filename} -> {exc.filename2}: {reason}"
    return f"{exc.filename}: {reason}"


def _add_demo(parser: argparse.ArgumentParser) -> None:
    """MovieLens-100K (from the installed recbole package) -> MiniLM embeddings (cached) -> a global
    Bradley-Terry model, MRM with the released hyper-parameters and MAP adaptation with the recommended preset
    (mean objective and RPO, several seeds) -> unseen users at several shots, with paired differences and
    bootstrap 95%% intervals. Prints the tables and writes report.json, table.md, accuracy_vs_shots.png and
    per_user_recommended.csv."""
    parser.add_argument("--output-dir", default="mrm-demo", metavar="DIR", help="default ./mrm-demo")
    parser.add_argument("--cache-dir", default=None, metavar="DIR", help="embedding cache (default OUTPUT/embedding-cache)")
    parser.add_argument("--shots", type=_positive_int, nargs="+", default=[5, 10, 20, 50], metavar="N",
                        help="unseen users' training pairs, for each N (default 5 10 20 50)")
    parser.add_argument("--official-epochs", type=_positive_int, default=200, metavar="N",
                        help="epochs of the released configuration (default 200)")
    parser.add_argument("--seeds", type=_positive_int, default=3, metavar="N",
                        help="training seeds of the recommended preset, averaged in its rows (default 3)")
    parser.add_argument("--best-epochs", type=_positive_int, default=10, metavar="N",
                        help="epochs of the recommended (MAP) preset (default 10)")
    parser.add_argument("--max-users", type=_positive_int, default=None, metavar="N",
                        help="use only N users (quick look; the table is then not comparable)")
    parser.add_argument("--threads", type=_threads, default=None, metavar="N",
                        help="kernel and torch threads (default: every CPU)")
    parser.add_argument("--no-progress", action="store_true", help="hide every progress bar")


def _run_demo(args: argparse.Namespace) -> str:
    from pathlib import Path

    from mrm.demo import DemoOptions, run_demo

    options = DemoOptions(
        output_dir=Path(args.output_dir), cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        shots=args.shots, official_epochs=args.official_epochs, best_epochs=args.best_epochs, seeds=args.seeds,
        max_users=args.max_users, threads=args.threads, progress=not args.no_progress,
    )
    run_demo(options)
    return f"demo finished: {args.output_dir}/report.json"


# ---- online serving ------------------------------------------------------------------------------


def _add_serve(parser: argparse.ArgumentParser) -> None:
    """Serve personalised rewards over HTTP (needs `pip install 'mrm-fast[serve]'`): POST /get_reward
    (OpenRLHF's remote reward model; the user id in `labels`), POST /score, POST /feedback (new pairs for a
    user: adapted from the stored state and committed before the reply), GET /users/{id}, GET /health, GET
    /metrics. User weights live in a SQLite store (--store)."""
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="model directory with config.json and model.safetensors")
    parser.add_argument("--store", required=True, metavar="DB", help="user-weights database (SQLite; created if missing)")
    parser.add_argument("--backbone", default=None, metavar="NAME|PATH",
                        help="embedding backbone for text requests ('minilm', 'smollm2' or a local model); "
                             "without it the service takes embeddings only")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="embedding cache (default: $MRM_CACHE_DIR or $XDG_CACHE_HOME/mrm/<backbone>)")
    parser.add_argument("--response-only", action="store_true", help="embed responses without their prompt")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--steps", type=int, default=None, metavar="T",
                        help="inner steps per feedback (default: the checkpoint's training setting)")
    parser.add_argument("--lr", type=float, default=None, help="inner learning rate (default: the checkpoint's)")
    parser.add_argument("--optimizer", choices=("adam", "sgd", "map"), default=None,
                        help="inner optimiser (default: the checkpoint's)")
    parser.add_argument("--uncertainty-penalty", type=float, default=0.0, metavar="BETA",
                        help="subtract BETA x the reward's posterior standard deviation")
    parser.add_argument("--import-weights", default=None, metavar="PARQUET",
                        help="load a user-weights table (from `mrm adapt`) into the store before serving")
    parser.add_argument("--synchronous", choices=("NORMAL", "FULL"), default="FULL",
                        help="SQLite durability: FULL survives power loss, NORMAL a killed process")
    parser.add_argument("--max-batch", type=_positive_int, default=512, metavar="N", help="rows per micro-batch")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, metavar="MS",
                        help="how long a micro-batch waits for more requests")
    parser.add_argument("--max-items", type=_positive_int, default=1024, metavar="N", help="rows per request")
    parser.add_argument("--max-body-mb", type=float, default=8.0, metavar="MB", help="request body limit")
    parser.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="texts per backbone forward")
    parser.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level")


def _run_serve(args: argparse.Namespace) -> str:
    from mrm.serve import build_service, run
    from mrm.serve.app import ServeLimits

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    service = build_service(args.checkpoint, args.store, backbone=args.backbone, cache_dir=args.cache_dir,
                            response_only=args.response_only, steps=args.steps, lr=args.lr, optimizer=args.optimizer,
                            uncertainty_penalty=args.uncertainty_penalty, synchronous=args.synchronous,
                            import_weights=args.import_weights, batch_size=args.batch_size)
    limits = ServeLimits(max_body_bytes=int(args.max_body_mb * (1 << 20)), max_items=args.max_items,
                         max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    print(f"mrm serve: http://{args.host}:{args.port} (store {args.store}, {len(service.store)} users)",
          file=sys.stderr, flush=True)
    run(service, host=args.host, port=args.port, limits=limits, log_level=args.log_level)
    return "mrm serve: stopped"


class Subcommand(NamedTuple):
    """One ``mrm`` subcommand: its one-line help, its arguments and the call it makes. The
    description under ``mrm NAME --help`` is the docstring of ``add_arguments``."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], str]
    """Runs the subcommand and returns its one-line report."""
    epilog: Optional[str] = None
    formatter_class: type = argparse.HelpFormatter


SUBCOMMANDS: Dict[str, Subcommand] = {
    "demo": Subcommand("the main job: MovieLens-100K end to end, with baselines", _add_demo, _run_demo),
    "embed": Subcommand("embed a dataset's texts once into the cache", _add_embed, _run_embed),
    "to-user-major": Subcommand("a text dataset -> user-major Parquet logs of embeddings (for adapt/score)",
                                _add_to_user_major, _run_to_user_major),
    "train": Subcommand("meta-train a reward model on the seen users", _add_train, _run_train),
    "eval": Subcommand("user-level accuracy of a checkpoint (seen / unseen / worst 10 %%, by shots)",
                       _add_eval, _run_eval),
    "baseline": Subcommand("the global Bradley-Terry baseline (no personalization), evaluated like `mrm eval`",
                           _add_baseline, _run_baseline),
    "adapt": Subcommand("fit each user's weights on their logged pairs -> user-weights table", _add_adapt, _run_adapt,
                        epilog="With --warm-start, users absent from the logs are copied through unchanged."),
    "score": Subcommand("personalised rewards for the logged responses", _add_score, _run_score),
    "serve": Subcommand("HTTP reward service: OpenRLHF /get_reward, /score, /feedback (online adaptation)",
                        _add_serve, _run_serve, formatter_class=argparse.ArgumentDefaultsHelpFormatter),
}


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line, ``mrm: error: …`` (exit code 2), like every other."""

    def error(self, message: str):
        self.exit(2, f"mrm: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``mrm`` parser with every subcommand of :data:`SUBCOMMANDS`."""
    parser = _Parser(prog="mrm", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    try:
        from mrm import __version__
    except ImportError:  # the native module is missing: --version still parses
        __version__ = "unknown"
    parser.add_argument("--version", action="version", version=f"mrm-fast {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", parser_class=_Parser)
    for name, command in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=inspect.getdoc(command.add_arguments),
                                    epilog=command.epilog, formatter_class=command.formatter_class)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def _silence_progress_bars() -> None:
    """--no-progress: no bar from this package (its calls pass progress=False) nor from the libraries
    it loads (transformers' "Loading weights", huggingface_hub, Ray Data, any tqdm)."""
    import os

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``mrm``; returns the exit status (2 with a one-line message on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "no_progress", False):
        _silence_progress_bars()
    try:
        report = args.run(args)
    except (ValueError, TypeError, OverflowError, OSError) as exc:
        # Bad input, bad files, permissions, a full disk: one line naming the path or flag.
        # MRM_TRACEBACK=1 shows the traceback instead (for bug reports).
        if os.environ.get("MRM_TRACEBACK", "").strip() == "1":
            raise
        text = _os_error_message(exc) if isinstance(exc, OSError) else str(exc)
        message = " ".join(text.split())  # one line
        print(f"mrm: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mrm: interrupted (the output was not replaced)", file=sys.stderr)
        return 130
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
