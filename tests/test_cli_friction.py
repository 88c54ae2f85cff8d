"""What a new user running `mrm` on their own log hit (issue #16's friction list), on a tiny local
encoder and a synthetic log: help and defaults on every flag, --no-progress, the per-user cache
directory, counted skips, same-text pairs, response-only embeddings, shots in `mrm eval`'s line,
and the global Bradley-Terry baseline."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mrm.checkpoint import Checkpoint  # noqa: E402
from mrm.cli import build_parser  # noqa: E402

WORDS = "the a is good bad answer cats dogs weather today sunny rainy yes no maybe because".split()


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def test_every_flag_has_help_and_shows_its_default():
    missing, no_default = [], []
    for name, sub in _subparsers(build_parser()).items():
        shows_defaults = sub.formatter_class is argparse.ArgumentDefaultsHelpFormatter
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            flag = f"{name} {action.option_strings[-1]}"
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(flag)
            elif (action.default not in (None, False, [], argparse.SUPPRESS) and not action.required
                  and not shows_defaults and "default" not in action.help):
                no_default.append(flag)
    assert not missing, f"flags without help: {missing}"
    assert not no_default, f"flags whose help does not show the default: {no_default}"
    from mrm.cli import _train_config

    def eval_every(*flags):
        return _train_config(build_parser().parse_args(["train", "--output-dir", "x", *flags])).eval_every

    # released: every 10 epochs; the recommended preset keeps its own (every epoch); a flag wins
    assert eval_every() == 10
    assert eval_every("--preset", "recommended") == 1
    assert eval_every("--preset", "recommended", "--eval-every", "5") == 5


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from test_embed import save_tiny_bert

    tmp = tmp_path_factory.mktemp("friction")
    save_tiny_bert(tmp / "bert", hidden_size=16)
    rng = np.random.default_rng(0)
    rows = []
    for u in range(8):
        for i in range(8):
            words = rng.choice(WORDS, size=6)
            rows.append({"user_id": f"u{u}", "prompt": " ".join(words[:2]), "chosen": " ".join(words[2:4]) + f" {i}",
                         "rejected": " ".join(words[4:]) + f" {i}"})
    rows.append(dict(rows[0]))  # a duplicate pair
    rows.append(dict(rows[1]))  # another
    rows.append({"user_id": "u1", "prompt": "the weather", "chosen": "sunny", "rejected": "sunny"})  # same text
    (tmp / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rng = np.random.default_rng(1)
    Checkpoint(input_dim=16, num_bases=2, hidden_sizes=[], scale=1.0, activation=None,
               layers=[(rng.normal(size=(2, 16)), None)], w0=np.zeros(2)).save(tmp / "model")
    return tmp


def _mrm(workspace, *args, cwd):
    # the installed mrm-fast, as a user's would run it (a clean checkout has no compiled extension)
    env = dict(os.environ, HF_HUB_OFFLINE="1", XDG_CACHE_HOME=str(workspace / "xdg"))
    env.pop("MRM_CACHE_DIR", None)
    env.pop("TQDM_DISABLE", None)
    return subprocess.run([sys.executable, "-m", "mrm.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_embed_baseline_and_eval_on_a_users_own_log(workspace, tmp_path):
    log, bert = f"log:{workspace / 'log.jsonl'}", str(workspace / "bert")
    elsewhere = tmp_path / "some-other-folder"
    elsewhere.mkdir()
    done = _mrm(workspace, "embed", "--data", log, "--backbone", bert, "--no-progress", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    # no bar at all (tqdm draws "%|"), skips counted and printed, cache in $XDG_CACHE_HOME/mrm, not ./mrm-cache
    assert "%|" not in done.stderr and "Loading weights" not in done.stderr
    assert "1 same text pairs" in done.stdout and "2 duplicate pairs" in done.stdout
    assert not (elsewhere / "mrm-cache").exists()
    caches = list((workspace / "xdg" / "mrm").iterdir())
    assert len(caches) == 1 and caches[0].name.startswith("bert-")

    done = _mrm(workspace, "eval", "--data", log, "--backbone", bert, "--checkpoint", str(workspace / "model"),
                "--output-dir", "ev", "--shots", "1", "2", "--steps", "2", "--lr", "0.5", "--optimizer", "sgd",
                "--no-progress", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    report = json.loads((elsewhere / "ev" / "report.json").read_text())
    line = done.stdout.strip().splitlines()[-1]
    for shots in ("1", "2"):
        assert f"@{shots} {report['by_shots'][shots]['unseen']:.4f}" in line
    assert "%|" not in done.stderr

    done = _mrm(workspace, "baseline", "--data", log, "--backbone", bert, "--output-dir", "bt", "--shots", "2",
                "--no-progress", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    report = json.loads((elsewhere / "bt" / "report.json").read_text())
    assert 0 <= report["by_shots"]["2"]["unseen"] <= 1 and "@2" in done.stdout
    assert Checkpoint.load(elsewhere / "bt" / "global-bt").num_bases == 1


def test_response_only_embeds_the_response_alone(workspace, tmp_path):
    from mrm.data import read_preference_log
    from mrm.embed import EmbeddingCache, embed_dataset

    data = read_preference_log(workspace / "log.jsonl")
    alone = embed_dataset(data, workspace / "bert", tmp_path / "cache", progress=False, response_only=True)
    direct = EmbeddingCache(tmp_path / "direct", workspace / "bert").embed([("", r) for _, r in data.texts],
                                                                          progress=False)
    np.testing.assert_allclose(alone, direct, atol=1e-6)
    with_prompt = embed_dataset(data, workspace / "bert", tmp_path / "cache", progress=False)
    assert np.abs(with_prompt - alone).max() > 1e-3


def test_default_cache_dir(monkeypatch, tmp_path):
    from mrm.embed import default_cache_dir

    monkeypatch.delenv("MRM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir("minilm") == tmp_path / "mrm" / "minilm"
    a, b = tmp_path / "one" / "model", tmp_path / "two" / "model"
    assert default_cache_dir(a) != default_cache_dir(b) and default_cache_dir(a).parent == tmp_path / "mrm"
    monkeypatch.setenv("MRM_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir("minilm") == tmp_path / "mine" / "minilm"
