"""Trainer state (optimiser, scheduler, RNG, history) as safetensors + JSON, never a pickle.

A nested state of dicts, lists, tuples, numbers, strings, None and torch tensors is split in two
files: ``<stem>.safetensors`` holds every tensor (bit for bit, any dtype and shape), and
``<stem>.json`` holds the rest, with ``{"__tensor__": name}`` where a tensor was. Tuples and dicts
whose keys are not all strings (an optimiser's state is keyed by parameter index) are tagged so
that they come back as they went in. Reading parses JSON and safetensors only: a crafted file can
be wrong (then a ValueError naming it), never run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["save_state", "load_state", "STATE_FORMAT"]

STATE_FORMAT = "mrm-fast/trainer-state"
_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"


def _encode(value: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().clone().contiguous()  # own memory: safetensors refuses shared
        return {_TENSOR: name}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {_DICT: [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"trainer state holds a {type(value).__name__}, which is not saved (tensors, numbers, "
                    "strings, None, lists, tuples and dicts are)")


def _decode(value: Any, tensors: Dict[str, torch.Tensor], source: Path) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, source) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {_TENSOR}:
        name = value[_TENSOR]
        if not isinstance(name, str) or name not in tensors:
            raise ValueError(f"{source}: refers to a tensor {name!r} that its .safetensors file does not hold")
        return tensors[name]
    if set(value) == {_TUPLE} and isinstance(value[_TUPLE], list):
        return tuple(_decode(v, tensors, source) for v in value[_TUPLE])
    if set(value) == {_DICT} and isinstance(value[_DICT], list):
        pairs = value[_DICT]
        if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise ValueError(f"{source}: a tagged dict is not a list of [key, value] pairs")
        try:
            return {_decode(k, tensors, source): _decode(v, tensors, source) for k, v in pairs}
        except TypeError:  # an unhashable key
            raise ValueError(f"{source}: a tagged dict has a key that cannot be a key") from None
    return {k: _decode(v, tensors, source) for k, v in value.items()}


def save_state(directory: Path, stem: str, state: Dict[str, Any]) -> None:
    """Writes ``state`` as ``directory/stem.safetensors`` and ``directory/stem.json`` (the
    directory is expected to be a fresh temporary one, made the real one atomically)."""
    tensors: Dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors)
    save_file(tensors, str(directory / f"{stem}.safetensors"))
    text = json.dumps({"format": STATE_FORMAT, "state": encoded})
    (directory / f"{stem}.json").write_text(text)


def load_state(directory: Path, stem: str) -> Dict[str, Any]:
    """Reads what :func:`save_state` wrote; a missing, truncated or crafted file is a ValueError
    naming it. Nothing in either file is ever executed."""
    tensors_path, json_path = directory / f"{stem}.safetensors", directory / f"{stem}.json"
    for path in (tensors_path, json_path):
        if not path.is_file():
            raise ValueError(f"{path} is missing (an incomplete checkpoint?)")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{tensors_path} could not be read (corrupt or truncated?): {exc}") from None
    try:
        raw = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{json_path} is not valid JSON (corrupt or truncated?): {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT or not isinstance(raw.get("state"), dict):
        raise ValueError(f"{json_path} is not an mrm-fast trainer state (expected format {STATE_FORMAT!r})")
    return _decode(raw["state"], tensors, json_path)
