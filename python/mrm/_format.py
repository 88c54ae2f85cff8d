"""The checkpoint format, torch-free: what :class:`mrm.checkpoint.Checkpoint` (numpy) and
:class:`mrm.model.MetaRewardModel` (torch) both read and write.

A checkpoint is a directory with ``config.json`` (``CONFIG_NAME``; ``"format": FORMAT`` and the
model keys ``MODEL_KEYS``, checked by :func:`read_config` and :func:`validate_config`) and
``model.safetensors`` (``WEIGHTS_NAME``; the tensors :func:`expected_tensors` lists, read by
:func:`read_safetensors` and checked by :func:`check_tensors`). torch is imported only by
``read_safetensors(..., framework="torch")``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT", "ACTIVATIONS", "PRIORS", "MODEL_KEYS",
    "read_config", "validate_config", "expected_tensors", "read_safetensors", "check_tensors",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "mrm-fast/meta-reward-model"
ACTIVATIONS = ("relu", "gelu", "tanh")
PRIORS = (None, "per-base", "shared")
MODEL_KEYS = ("input_dim", "num_bases", "hidden_sizes", "scale", "bias", "activation", "weight_map", "prior")
"""The config keys that describe the model; the others (``train``, ``eval``...) are extra config."""


def read_config(directory: Union[str, Path]) -> Tuple[dict, Path, Path]:
    """The validated ``config.json`` of a checkpoint directory, its path and the weights' path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} not found")
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint file {p} not found")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path} is not valid JSON (corrupt or truncated checkpoint): {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{config_path} is not an mrm-fast model config (format {found!r}, expected {FORMAT!r})")
    return raw, config_path, weights_path


def _positive_int(path: Path, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{path}: {name} must be a positive integer, got {value!r}")
    return value


def validate_config(raw: dict, config_path: Path) -> dict:
    """The model keys of a ``config.json`` (as :func:`read_config` returns it), checked and with
    their defaults filled in; a bad value is a ValueError naming the file and key."""
    if "input_dim" not in raw:
        raise ValueError(f"{config_path}: missing 'input_dim'")
    input_dim = _positive_int(config_path, "input_dim", raw["input_dim"])
    num_bases = _positive_int(config_path, "num_bases", raw.get("num_bases", 2))
    hidden = raw.get("hidden_sizes", [])
    if not isinstance(hidden, list):
        raise ValueError(f"{config_path}: hidden_sizes must be a list, got {hidden!r}")
    hidden = [_positive_int(config_path, "hidden_sizes[]", h) for h in hidden]
    scale = raw.get("scale", 0.01)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
        raise ValueError(f"{config_path}: scale must be a finite non-zero number, got {scale!r}")
    bias = raw.get("bias", False)
    if not isinstance(bias, bool):
        raise ValueError(f"{config_path}: bias must be true or false, got {bias!r}")
    activation = raw.get("activation")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"{config_path}: activation must be null or one of {list(ACTIVATIONS)}, got {activation!r}")

    weight_map = raw.get("weight_map", "simplex")
    if weight_map not in ("simplex", "linear"):
        raise ValueError(f"{config_path}: weight_map must be 'simplex' or 'linear', got {weight_map!r}")
    prior = raw.get("prior")
    if prior not in PRIORS:
        raise ValueError(f"{config_path}: prior must be null, 'per-base' or 'shared', got {prior!r}")
    return {"input_dim": input_dim, "num_bases": num_bases, "hidden_sizes": hidden, "scale": scale, "bias": bias,
            "activation": activation, "weight_map": weight_map, "prior": prior}


def expected_tensors(input_dim: int, hidden_sizes: List[int], num_bases: int, bias: bool,
                     prior: Optional[str]) -> Dict[str, tuple]:
    """The tensors of ``model.safetensors`` and their shapes, for a model of this config."""
    widths = [input_dim, *hidden_sizes, num_bases]
    expected = {"shared_weight": (num_bases,)}
    if prior is not None:
        expected["log_precision"] = (num_bases if prior == "per-base" else 1,)
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        expected[f"layers.{i}.weight"] = (n_out, n_in)
        if bias:
            expected[f"layers.{i}.bias"] = (n_out,)
    return expected


def read_safetensors(path: Path, framework: str = "numpy") -> dict:
    """The tensors of a ``.safetensors`` file as numpy arrays (``framework="torch"``: torch
    tensors, which keeps dtypes numpy lacks, bfloat16); a file that cannot be read is a
    ValueError naming it."""
    from safetensors import SafetensorError

    if framework == "torch":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{path} could not be read (corrupt or truncated checkpoint): {exc}") from None
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{path} could not be read (corrupt or truncated checkpoint?): {exc}") from None


def check_tensors(tensors: Mapping, expected: Mapping[str, tuple], source: str, *, expected_by: str, hint: str) -> None:
    """The tensors of a checkpoint (numpy arrays or torch tensors) have exactly the expected keys
    and shapes and hold finite floats; otherwise a ValueError naming the key."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model ({hint} differ?): "
                         f"missing tensors {missing}, unexpected tensors {unexpected}")
    for key, want in expected.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != tuple(want):
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)} but {expected_by} {tuple(want)} ({hint})")
        is_torch = hasattr(tensor, "is_floating_point")
        if not (tensor.is_floating_point() if is_torch else tensor.dtype.kind == "f"):
            raise ValueError(f"{source}: {key} has dtype {tensor.dtype}, expected a float type")
        if not bool(tensor.isfinite().all() if is_torch else np.isfinite(tensor).all()):
            raise ValueError(f"{source}: {key} contains non-finite values")
