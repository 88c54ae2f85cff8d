"""Hub-style checkpoints: the conventions of ``huggingface_hub.ModelHubMixin`` for MRM checkpoints.

A checkpoint directory holds ``config.json``, ``model.safetensors`` and a ``README.md`` model card
(YAML front matter, the training configuration and the evaluation table, from the config's
``train`` and ``metrics`` entries). ``from_pretrained(name_or_path, *, revision=None,
cache_dir=None, local_files_only=False, token=None)`` takes a local directory or a Hub repository
id (``owner/name``), which huggingface_hub resolves into its local cache (downloading unless
``local_files_only``); ``push_to_hub(repo_id, ...)`` uploads a saved copy. huggingface_hub is
imported only for Hub ids and uploads, never for local directories.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

__all__ = ["MODEL_CARD_NAME", "model_card", "push_to_hub", "resolve_pretrained", "write_model_card"]

MODEL_CARD_NAME = "README.md"
_FILES = ["config.json", "model.safetensors", MODEL_CARD_NAME]
PathLike = Union[str, Path]


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def model_card(config: dict) -> str:
    """The model card (Markdown with YAML front matter) of a checkpoint's ``config.json`` content."""
    shape = {k: config.get(k) for k in ("input_dim", "num_bases", "hidden_sizes", "scale", "bias", "activation")}
    lines = [
        "---", "library_name: mrm-fast", "tags:", "- reward-model", "- personalization", "- meta-learning",
        "- mrm-fast", "---", "", "# Meta Reward Model (mrm-fast)", "",
        "K base reward functions φ_θ over frozen-backbone embeddings and the meta-learned start w0; a user's "
        "reward is φ(e) · softmax(w_u), w_u adapted from w0 on the user's preference pairs "
        "(Meta Reward Modeling, Cai et al., SIGIR 2026).", "",
        "```python", "from mrm.checkpoint import Checkpoint          # numpy only",
        "checkpoint = Checkpoint.from_pretrained(\"<this repo or folder>\")", "```", "",
        "## Model", "", "| field | value |", "|---|---|",
        *[f"| {k} | {_cell(v)} |" for k, v in shape.items()], "",
    ]
    train = config.get("train")
    if isinstance(train, dict) and train:
        lines += ["## Training configuration", "", "| setting | value |", "|---|---|",
                  *[f"| {k} | {_cell(v)} |" for k, v in train.items()], ""]
    metrics = config.get("metrics")
    if isinstance(metrics, dict) and metrics:
        lines += ["## Evaluation", "", "User-level accuracy (per-user accuracy averaged over users; worst 10 % = "
                  "mean of the worst tenth of users), at the checkpoint's epoch.", "",
                  "| metric | value |", "|---|---|", *[f"| {k} | {_cell(v)} |" for k, v in metrics.items()], ""]
    other = {k: v for k, v in config.items() if k not in {"format", "train", "metrics", *shape}}
    if other:
        lines += ["## Other metadata", "", "```json", json.dumps(other, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def write_model_card(directory: PathLike, config: Optional[dict] = None) -> Path:
    """Write ``README.md`` into a (temporary) checkpoint directory from its config."""
    directory = Path(directory)
    if config is None:
        config = json.loads((directory / "config.json").read_text())
    path = directory / MODEL_CARD_NAME
    path.write_text(model_card(config), encoding="utf-8")
    return path


def resolve_pretrained(name_or_path: PathLike, *, revision: Optional[str] = None,
                       cache_dir: Optional[PathLike] = None, local_files_only: bool = False,
                       token: Optional[str] = None) -> Path:
    """A local checkpoint directory for ``name_or_path``: itself when it is a directory, else the
    snapshot of that Hub repository (from huggingface_hub's cache with ``local_files_only``)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/")):
        raise FileNotFoundError(f"checkpoint directory {name} not found (and it is not a Hub id 'owner/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"checkpoint directory {name} not found; to read it as a Hub id install "
                                "huggingface_hub") from None
    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=None if cache_dir is None else str(cache_dir),
                                      local_files_only=local_files_only, token=token, allow_patterns=_FILES))
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many types; all mean "not available"
        where = "in the local Hub cache" if local_files_only else "locally or on the Hub"
        raise FileNotFoundError(f"checkpoint {name!r} is not a local directory and was not found {where}: "
                                f"{type(exc).__name__}: {exc}") from None


def push_to_hub(save: Callable[[Path], object], repo_id: str, *, commit_message: str = "Upload MRM checkpoint",
                private: Optional[bool] = None, token: Optional[str] = None, revision: Optional[str] = None) -> str:
    """Save with ``save(directory)`` into a temporary directory and upload it to ``repo_id``
    (created when missing); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "checkpoint"
        save(target)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(target), commit_message=commit_message,
                                 revision=revision)
    return str(getattr(info, "commit_url", info))
