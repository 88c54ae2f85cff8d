"""Hub-style checkpoints (mrm.hub): model card, from_pretrained with a local dir or a Hub id resolved
from a local Hub cache (local_files_only, no network), push_to_hub through a stand-in HfApi."""

from __future__ import annotations

import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mrm.checkpoint import Checkpoint  # noqa: E402

hub = pytest.importorskip("huggingface_hub")


def _checkpoint():
    rng = np.random.default_rng(0)
    return Checkpoint(input_dim=4, num_bases=2, hidden_sizes=[], scale=1.0, activation=None,
                      layers=[(rng.normal(size=(2, 4)), None)], w0=rng.normal(size=2),
                      extra_config={"train": {"inner_steps": 10, "inner_optimizer": "sgd", "meta_lr": 0.03},
                                    "metrics": {"epoch": 12, "seen": 0.6381, "unseen": 0.6129}})


def _table(card: str, heading: str) -> dict:
    section = card.split(f"## {heading}")[1].split("\n## ")[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return {k.strip(): v.strip() for k, v in rows[1:]}


def test_model_card_has_training_config_and_eval_table(tmp_path):
    _checkpoint().save_pretrained(tmp_path / "ckpt")
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mrm-fast")
    assert _table(card, "Training configuration") == {"inner_steps": "10", "inner_optimizer": "sgd", "meta_lr": "0.03"}
    assert _table(card, "Evaluation") == {"epoch": "12", "seen": "0.6381", "unseen": "0.6129"}
    assert _table(card, "Model")["num_bases"] == "2"


def test_meta_reward_model_save_and_load_pretrained(tmp_path):
    torch = pytest.importorskip("torch")
    from mrm.model import MetaRewardModel, ModelConfig

    model = MetaRewardModel(ModelConfig(input_dim=4, num_bases=3))
    model.save_pretrained(tmp_path / "m", extra_config={"train": {"epochs": 5}, "metrics": {"seen": 0.5}})
    card = (tmp_path / "m" / "README.md").read_text()
    assert _table(card, "Training configuration") == {"epochs": "5"}
    loaded = MetaRewardModel.from_pretrained(tmp_path / "m", local_files_only=True)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def _fake_hub_cache(cache, repo_id, source):
    """The layout huggingface_hub's cache uses: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(source, root / "snapshots" / commit)


def test_from_pretrained_hub_id_with_local_files_only(tmp_path):
    original = _checkpoint()
    original.save(tmp_path / "ckpt")
    _fake_hub_cache(tmp_path / "hub", "acme/mrm-tiny", tmp_path / "ckpt")
    loaded = Checkpoint.from_pretrained("acme/mrm-tiny", cache_dir=tmp_path / "hub", local_files_only=True)
    np.testing.assert_array_equal(loaded.w0, original.w0)
    np.testing.assert_array_equal(loaded.layers[0][0], original.layers[0][0])
    local = Checkpoint.from_pretrained(tmp_path / "ckpt")
    np.testing.assert_array_equal(local.w0, original.w0)
    with pytest.raises(FileNotFoundError, match="not found in the local Hub cache"):
        Checkpoint.from_pretrained("acme/absent", cache_dir=tmp_path / "hub", local_files_only=True)
    with pytest.raises(FileNotFoundError, match="not a Hub id"):
        Checkpoint.from_pretrained(tmp_path / "no" / "such" / "dir")


def test_push_to_hub_uploads_a_saved_copy(tmp_path, monkeypatch):
    uploaded = {}

    class StandInApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploaded["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None):
            shutil.copytree(folder_path, tmp_path / "uploaded")
            return "commit-url"

    monkeypatch.setattr(hub, "HfApi", StandInApi)
    assert _checkpoint().push_to_hub("acme/mrm-tiny") == "commit-url"
    assert uploaded["repo"] == "acme/mrm-tiny"
    assert sorted(p.name for p in (tmp_path / "uploaded").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert Checkpoint.load(tmp_path / "uploaded").num_bases == 2
