"""Read a MetaRewardModel checkpoint with numpy only (no torch): φ_θ and the shared start w0.

A checkpoint is a directory with ``config.json`` (``format = "mrm-fast/meta-reward-model"``,
``input_dim``, ``num_bases``, ``hidden_sizes``, ``scale``, ``bias``, ``activation``) and
``model.safetensors`` (``layers.N.weight`` of shape (out, in), ``layers.N.bias`` when ``bias``,
``shared_weight`` of shape (K,)), as written by ``MetaRewardModel.save_pretrained``.
:meth:`Checkpoint.features` computes the same φ as ``MetaRewardModel.features`` (SPEC §1).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

# The checkpoint format lives in mrm._format (shared with mrm.model); its names stay importable from here.
from mrm._format import (
    ACTIVATIONS as ACTIVATIONS,
    CONFIG_NAME,
    FORMAT,
    MODEL_KEYS,
    PRIORS as PRIORS,
    WEIGHTS_NAME,
    check_tensors,
    expected_tensors,
    read_config,
    read_safetensors,
    validate_config,
)
from mrm._io import atomic_dir

__all__ = ["Checkpoint", "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT"]


def _erf(x: np.ndarray) -> np.ndarray:
    """Elementwise erf: scipy's when installed, else the C library's (slower, same values)."""
    try:
        from scipy.special import erf
    except ImportError:  # scipy is optional
        return np.frompyfunc(math.erf, 1, 1)(x).astype(x.dtype)
    return erf(x).astype(x.dtype, copy=False)


def _activate(name: str, x: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(x, 0)
    if name == "tanh":
        return np.tanh(x)
    # gelu, exact form (torch's default): x · Φ(x) = x/2 · (1 + erf(x / √2))
    return (0.5 * x * (1.0 + _erf(x / np.sqrt(2.0).astype(x.dtype)))).astype(x.dtype, copy=False)


@dataclass
class Checkpoint:
    """φ_θ as numpy arrays, and w0. Load with :meth:`load`."""

    input_dim: int
    """D, the embedding width."""
    num_bases: int
    """K, the number of base reward functions."""
    hidden_sizes: List[int]
    scale: float
    activation: Optional[str]
    layers: List[Tuple[np.ndarray, Optional[np.ndarray]]]
    """(weight (out, in), bias (out,) or None) per linear layer."""
    w0: np.ndarray
    """The meta-learned shared start (K,) logits."""
    path: Optional[Path] = None
    extra_config: dict = field(default_factory=dict)
    weight_map: str = "simplex"
    """'simplex' (softmax user weights) or 'linear' (SPEC §7)."""
    eta: Optional[np.ndarray] = None
    """The MAP prior's log precisions (1 or K values) when the model has a prior."""
    prior: Optional[str] = None

    def inner_loop(self, **settings):
        """The adaptation settings as an :class:`mrm.ops.InnerLoop`: the ones the model was
        meta-trained with (``config.json``'s ``train``: its ``inner`` entry, or the older
        ``inner_optimizer`` / ``inner_steps`` / ``inner_lr`` keys), else the released defaults,
        with ``settings`` (``optimizer=, steps=, lr=, max_iter=, tol=``; None: keep) on top. A bad
        stored value is a ValueError naming the file and key. The map solver takes this model's
        weight map."""
        from mrm import ops

        where = self.path / CONFIG_NAME if self.path else "the checkpoint's config.json"
        train = self.extra_config.get("train") or {}
        if not isinstance(train, dict):
            raise ValueError(f"{where}: 'train' must be an object of training settings, got {type(train).__name__}")
        given = {k: v for k, v in settings.items() if v is not None}
        stored = train.get("inner")
        if isinstance(stored, dict):
            base, source = dict(stored), "train.inner"
        else:
            optimizer = train.get("inner_optimizer", "adam")
            if optimizer not in ops.SOLVERS:
                raise ValueError(f"{where}: train.inner_optimizer must be one of {list(ops.SOLVERS)}, got {optimizer!r}")
            base, source = {"optimizer": optimizer}, "train"
            if optimizer != "map":
                base.update(steps=train.get("inner_steps", 1), lr=train.get("inner_lr", 1e-3))
                for key, value, ok, expected in (
                        ("inner_steps", base["steps"], lambda v: isinstance(v, int) and not isinstance(v, bool),
                         f"an integer from 0 to {ops.MAX_STEPS}"),
                        ("inner_lr", base["lr"], lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                         and math.isfinite(v) and v > 0, "a finite number > 0")):
                    if not ok(value) or (key == "inner_steps" and not 0 <= value <= ops.MAX_STEPS):
                        raise ValueError(f"{where}: train.{key} must be {expected}, got {value!r}")
        if given.get("optimizer", base.get("optimizer")) != base.get("optimizer"):
            # another solver than the trained one: keep only the trained step loop's steps and lr
            base = {k: v for k, v in base.items() if k in ("steps", "lr")} if given["optimizer"] != "map" else {}
        raw = {**base, **given}
        if raw.get("optimizer") == "map":
            raw.pop("steps", None), raw.pop("lr", None)
            raw.setdefault("weight_map", self.weight_map)
        try:
            return ops.InnerLoop.from_dict(raw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: bad adaptation settings in {source} or the flags ({raw}): {exc}") from None

    @property
    def bias(self) -> bool:
        return self.layers[0][1] is not None

    @property
    def dtype(self) -> np.dtype:
        return self.w0.dtype

    # ---- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "Checkpoint":
        """Read and validate ``config.json`` + ``model.safetensors`` in ``directory``."""
        directory = Path(directory)
        raw, config_path, weights_path = read_config(directory)
        fields = validate_config(raw, config_path)
        input_dim, num_bases, hidden = fields["input_dim"], fields["num_bases"], fields["hidden_sizes"]
        scale, bias, activation = fields["scale"], fields["bias"], fields["activation"]
        weight_map, prior = fields["weight_map"], fields["prior"]

        tensors = read_safetensors(weights_path)
        widths = [input_dim, *hidden, num_bases]
        expected = expected_tensors(input_dim, hidden, num_bases, bias, prior)
        check_tensors(
            tensors, expected, str(weights_path), expected_by="config.json implies",
            hint=f"input_dim={input_dim}, hidden_sizes={hidden}, num_bases={num_bases}",
        )
        dtypes = {t.dtype for t in tensors.values()}
        # One compute dtype for every tensor: float64 if any is, else float32 (float16 is widened).
        dtype = np.dtype(np.float64) if np.dtype(np.float64) in dtypes else np.dtype(np.float32)
        tensors = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in tensors.items()}
        layers = [
            (tensors[f"layers.{i}.weight"], tensors.get(f"layers.{i}.bias")) for i in range(len(widths) - 1)
        ]
        return cls(
            input_dim=input_dim,
            num_bases=num_bases,
            hidden_sizes=hidden,
            scale=float(scale),
            activation=activation,
            layers=layers,
            w0=tensors["shared_weight"],
            path=directory,
            extra_config={k: v for k, v in raw.items() if k not in MODEL_KEYS and k != "format"},
            weight_map=weight_map,
            eta=tensors.get("log_precision"),
            prior=prior,
        )

    def save(self, directory: Union[str, Path], *, overwrite: bool = False) -> Path:
        """Write this checkpoint (the same format ``MetaRewardModel.from_pretrained`` reads), atomically."""
        from safetensors.numpy import save_file

        directory = Path(directory)
        tensors = {"shared_weight": self.w0}
        if self.eta is not None:
            tensors["log_precision"] = self.eta
        for i, (weight, bias) in enumerate(self.layers):
            tensors[f"layers.{i}.weight"] = weight
            if bias is not None:
                tensors[f"layers.{i}.bias"] = bias
        config = {
            "format": FORMAT,
            "input_dim": self.input_dim,
            "num_bases": self.num_bases,
            "hidden_sizes": list(self.hidden_sizes),
            "scale": self.scale,
            "bias": self.bias,
            "activation": self.activation,
            "weight_map": self.weight_map,
            "prior": self.prior,
            **self.extra_config,
        }
        from mrm.hub import write_model_card

        with atomic_dir(directory, overwrite=overwrite) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME),
                      metadata={"format": FORMAT})
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            write_model_card(tmp, config)
        return directory

    # ---- Hub conventions (huggingface_hub.ModelHubMixin's names) ------------------------------

    def save_pretrained(self, directory: Union[str, Path], *, overwrite: bool = True) -> Path:
        """:meth:`save` under ModelHubMixin's name (config.json, model.safetensors, README.md)."""
        return self.save(directory, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, Path], *, revision: Optional[str] = None,
                        cache_dir: Optional[Union[str, Path]] = None, local_files_only: bool = False,
                        token: Optional[str] = None) -> "Checkpoint":
        """:meth:`load` from a local directory or a Hub repository id (see :mod:`mrm.hub`)."""
        from mrm.hub import resolve_pretrained

        return cls.load(resolve_pretrained(name_or_path, revision=revision, cache_dir=cache_dir,
                                           local_files_only=local_files_only, token=token))

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload this checkpoint to a Hub repository (see :func:`mrm.hub.push_to_hub`)."""
        from mrm.hub import push_to_hub

        return push_to_hub(lambda d: self.save(d), repo_id, **kwargs)

    # ---- φ -----------------------------------------------------------------------------------

    def features(self, embeddings) -> np.ndarray:
        """φ(e): embeddings (N, D) → base rewards (N, K), in the checkpoint's dtype."""
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.input_dim:
            raise ValueError(f"embeddings must have shape (N, {self.input_dim}), got {embeddings.shape}")
        if embeddings.dtype.kind not in "fiu":
            raise TypeError(f"embeddings must be numeric, got dtype {embeddings.dtype}")
        x = embeddings.astype(self.dtype, copy=False) * self.dtype.type(self.scale)
        last = len(self.layers) - 1
        for i, (weight, bias) in enumerate(self.layers):
            x = x @ weight.T
            if bias is not None:
                x += bias
            if self.activation is not None and i < last:
                x = _activate(self.activation, x)
        return x

    def rewards(self, embeddings, weights=None) -> np.ndarray:
        """r(e) = φ(e) · p(w) with ``weights`` (K,) or (N, K); None uses w0 (p: softmax, or the
        identity for the linear weight map)."""
        phi = self.features(embeddings)
        w = self.w0 if weights is None else np.asarray(weights, dtype=phi.dtype)
        if self.weight_map == "linear":
            return (phi * w).sum(-1)
        w = w - w.max(axis=-1, keepdims=True)
        p = np.exp(w)
        p /= p.sum(axis=-1, keepdims=True)
        return (phi * p).sum(-1)
