"""MetaRewardModel: K base reward functions φ_θ and the meta-learned start w0 (needs torch).

Reference form (SPEC §1, the released configuration): ``φ(e) = L_n(…L_1(scale · e))``, a stack
of ``nn.Linear`` without activations, ``scale = 0.01``, no bias, last width K. ``activation``
turns the stack into a small MLP (the activation goes between layers, never after the last).
Checkpoints are a directory holding ``config.json`` and ``model.safetensors``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import torch
from torch import nn

from mrm import ops, torch_ops
from mrm._format import CONFIG_NAME, FORMAT, PRIORS, WEIGHTS_NAME, check_tensors, read_config, read_safetensors
from mrm._io import atomic_dir

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


@dataclass
class ModelConfig:
    input_dim: int
    """D, the embedding width."""
    num_bases: int = 2
    """K, the number of base reward functions (2 in the released scripts)."""
    hidden_sizes: List[int] = field(default_factory=list)
    """Widths between the input and the K outputs (empty: one linear map D → K)."""
    scale: float = 0.01
    """Inputs are multiplied by this (0.01 suits raw LLM hidden states)."""
    bias: bool = False
    activation: Optional[str] = None
    """None: the official linear stack; 'relu' | 'gelu' | 'tanh': an MLP."""
    weight_map: str = "simplex"
    """How a user's weights mix the K bases: 'simplex' (softmax, the paper's) or 'linear' (SPEC §7)."""
    prior: Optional[str] = None
    """The MAP solver's Gaussian prior precisions ``exp(log_precision)``: None (no prior, the
    T-step loops), 'per-base' (K values) or 'shared' (one value)."""

    def validate(self) -> None:
        if not (isinstance(self.input_dim, int) and self.input_dim >= 1):
            raise ValueError(f"input_dim must be a positive int, got {self.input_dim!r}")
        if not (isinstance(self.num_bases, int) and self.num_bases >= 1):
            raise ValueError(f"num_bases must be a positive int, got {self.num_bases!r}")
        if any(not (isinstance(h, int) and h >= 1) for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive ints, got {self.hidden_sizes!r}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale != 0):
            raise ValueError(f"scale must be a finite non-zero number, got {self.scale!r}")
        if self.activation is not None and self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be None or one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        if self.weight_map not in ops.WEIGHT_MAPS:
            raise ValueError(f"weight_map must be 'simplex' or 'linear', got {self.weight_map!r}")
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be None, 'per-base' or 'shared', got {self.prior!r}")

    @staticmethod
    def from_dict(raw: dict) -> "ModelConfig":
        known = {f for f in ModelConfig.__dataclass_fields__}
        unknown = set(raw) - known - {"format"}
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        config = ModelConfig(**{k: v for k, v in raw.items() if k in known})
        config.hidden_sizes = list(config.hidden_sizes)
        config.validate()
        return config


class MetaRewardModel(nn.Module):
    """φ_θ (``layers``) and the shared start ``shared_weight`` (w0, K logits)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        widths = [config.input_dim, *config.hidden_sizes, config.num_bases]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=config.bias) for a, b in zip(widths[:-1], widths[1:]))
        self.activation = _ACTIVATIONS[config.activation]() if config.activation else None
        self.shared_weight = nn.Parameter(torch.zeros(config.num_bases))
        if config.prior is not None:
            # η: the MAP prior's log precisions (SPEC §7), meta-learned with θ and w0
            self.log_precision = nn.Parameter(torch.zeros(config.num_bases if config.prior == "per-base" else 1))
        else:
            self.log_precision = None

    @property
    def num_bases(self) -> int:
        return self.config.num_bases

    def features(self, embeddings: torch.Tensor) -> torch.Tensor:
        """φ(e): (N, D) → (N, K) base rewards."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.config.input_dim:
            raise ValueError(
                f"embeddings must have shape (N, {self.config.input_dim}), got {tuple(embeddings.shape)}"
            )
        x = embeddings.to(self.shared_weight.dtype)
        for i, layer in enumerate(self.layers):
            if i == 0:  # L1(scale·x) = (scale·W1) x + b1: scales the small matrix, not the (N, D) input
                x = torch.nn.functional.linear(x, layer.weight * self.config.scale, layer.bias)
            else:
                x = layer(x)
            if self.activation is not None and i < len(self.layers) - 1:
                x = self.activation(x)
        return x

    def reward(self, embeddings: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """r(e) = φ(e) · softmax(w): ``weights`` (K,) for all rows or (N, K) one per row;
        None uses the shared start w0."""
        phi = self.features(embeddings)
        w = self.shared_weight if weights is None else torch.as_tensor(weights, dtype=phi.dtype, device=phi.device)
        p = torch.softmax(w, dim=-1) if self.config.weight_map == "simplex" else w
        return (phi * p).sum(-1)

    def pair_differences(self, embeddings: torch.Tensor, chosen, rejected) -> torch.Tensor:
        """d = φ(e_chosen) − φ(e_rejected) for index arrays into ``embeddings``.

        φ runs once per distinct row (on all of ``embeddings``, without gathering them, when at
        least half of the rows are used); the K-wide results are then gathered per pair, so the
        backward pass scatters K-wide gradients, never D-wide ones.
        """
        chosen = torch.as_tensor(np.asarray(chosen), dtype=torch.int64, device=embeddings.device)
        rejected = torch.as_tensor(np.asarray(rejected), dtype=torch.int64, device=embeddings.device)
        index = torch.cat([chosen, rejected])
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= embeddings.shape[0]):
            bad = int(torch.nonzero((index < 0) | (index >= embeddings.shape[0]))[0])
            name, pair = ("chosen", bad) if bad < chosen.shape[0] else ("rejected", bad - chosen.shape[0])
            raise ValueError(f"{name}[{pair}] = {int(index[bad])} is out of range for {embeddings.shape[0]} embedding rows")
        rows, inverse = _used_rows(index, embeddings.shape[0])
        if rows is None:
            phi = self.features(embeddings)
        else:
            phi = self.features(embeddings.index_select(0, rows))
            n = chosen.shape[0]
            chosen, rejected = inverse[:n], inverse[n:]
        if phi.device.type == "cpu":
            return torch_ops.pair_differences(phi, chosen, rejected)
        return phi.index_select(0, chosen) - phi.index_select(0, rejected)

    @torch.no_grad()
    def adapt(
        self,
        embeddings: torch.Tensor,
        chosen,
        rejected,
        offsets,
        *,
        inner: Optional[ops.InnerLoop] = None,
        steps: Optional[int] = None,
        lr: Optional[float] = None,
        optimizer: Optional[str] = None,
        start: Optional[np.ndarray] = None,
        num_threads: Optional[int] = None,
    ) -> np.ndarray:
        """Adapted weights (U, K) for users whose pairs are ``chosen``/``rejected`` grouped by
        ``offsets``; from w0, or from ``start`` (K,) or (U, K) (a warm start). The ``map`` solver
        uses this model's prior (``log_precision``); ``start`` then warm-starts the solve."""
        inner = ops.inner_loop(inner, steps=steps, lr=lr, optimizer=optimizer)
        d = self.pair_differences(embeddings, chosen, rejected).cpu().numpy()
        w0 = self.shared_weight.detach().cpu().numpy().astype(d.dtype)
        if inner.is_map:
            if self.log_precision is None:
                raise ValueError("this model has no prior (config.prior is None): the 'map' solver needs one")
            eta = self.log_precision.detach().cpu().numpy().astype(d.dtype)
            init = None if start is None else np.broadcast_to(np.asarray(start, d.dtype), (len(offsets) - 1, d.shape[1])).copy()
            return ops.adapt(w0, d, np.asarray(offsets), inner=inner, eta=eta, init=init, num_threads=num_threads)
        if start is not None:
            w0 = np.asarray(start, d.dtype)
        return ops.adapt(w0, d, np.asarray(offsets), inner=inner, num_threads=num_threads)

    # ---- checkpoints -------------------------------------------------------------------------

    def save_pretrained(self, directory: Union[str, Path], *, extra_config: Optional[dict] = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``directory`` atomically."""
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            self.write_files(tmp, extra_config=extra_config)
        return directory

    def write_files(self, directory: Path, *, extra_config: Optional[dict] = None) -> None:
        """Write ``config.json`` + ``model.safetensors`` into an existing (temporary) directory."""
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        config = {"format": FORMAT, **asdict(self.config), **(extra_config or {})}
        save_file(state, str(Path(directory) / WEIGHTS_NAME), metadata={"format": FORMAT})
        (Path(directory) / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        from mrm.hub import write_model_card

        write_model_card(directory, config)  # README.md: the training config and the eval table

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], *, expected: Optional[ModelConfig] = None,
                        revision: Optional[str] = None, cache_dir=None, local_files_only: bool = False,
                        token: Optional[str] = None) -> "MetaRewardModel":
        """Load a checkpoint written by :meth:`save_pretrained`, from a local directory or a Hub
        repository id (``revision``, ``cache_dir``, ``local_files_only``, ``token``: as
        huggingface_hub's; see :mod:`mrm.hub`).

        ``expected``: fail with a clear error if the checkpoint's shape (D, K, hidden sizes)
        differs from this config.
        """
        from mrm.hub import resolve_pretrained

        directory = resolve_pretrained(directory, revision=revision, cache_dir=cache_dir,
                                       local_files_only=local_files_only, token=token)
        raw, config_path, weights_path = read_config(directory)
        model_keys = set(ModelConfig.__dataclass_fields__)
        config = ModelConfig.from_dict({k: v for k, v in raw.items() if k in model_keys or k == "format"})
        if expected is not None:
            for name in ("input_dim", "num_bases", "hidden_sizes"):
                have, want = getattr(config, name), getattr(expected, name)
                if list(np.atleast_1d(have)) != list(np.atleast_1d(want)):
                    raise ValueError(f"checkpoint {directory} has {name} = {have}, but the config asks for {want}")
        state = read_safetensors(weights_path, framework="torch")
        model = cls(config)
        stored = state.get("shared_weight")
        if isinstance(stored, torch.Tensor) and stored.is_floating_point():
            model = model.to(stored.dtype)  # keep the stored precision (float64 stays float64)
        model.load_checked_state(state, source=str(weights_path))
        model.extra_config = {k: v for k, v in raw.items() if k not in model_keys and k != "format"}
        return model

    def push_to_hub(self, repo_id: str, *, extra_config: Optional[dict] = None, **kwargs) -> str:
        """Upload this model (config.json, model.safetensors, README.md) to a Hub repository."""
        from mrm.hub import push_to_hub

        return push_to_hub(lambda d: self.save_pretrained(d, extra_config=extra_config), repo_id, **kwargs)

    def load_checked_state(self, state: dict, source: str) -> None:
        """load_state_dict with errors that name the culprit key and shapes."""
        expected = self.state_dict()
        check_tensors(
            state, {k: tuple(v.shape) for k, v in expected.items()}, source, expected_by="the model expects",
            hint="input_dim, hidden_sizes, bias or K",
        )
        self.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})

    @classmethod
    def from_official_checkpoint(cls, path: Union[str, Path], *, scale: float = 0.01) -> "MetaRewardModel":
        """Import an official MRM ``.pt`` state dict (keys ``layers.N.weight``, optional
        ``layers.N.bias``, ``shared_weight``). Layer sizes and K are read from the shapes."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"official checkpoint {path} not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt files
            raise ValueError(f"{path} could not be read as a PyTorch state dict (corrupt or truncated?): {exc}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or "shared_weight" not in state:
            raise ValueError(f"{path} is not an official MRM state dict (no 'shared_weight' key)")
        n_layers = 0
        while f"layers.{n_layers}.weight" in state:
            n_layers += 1
        if n_layers == 0:
            raise ValueError(f"{path} has no 'layers.0.weight' key")
        shapes = [tuple(state[f"layers.{i}.weight"].shape) for i in range(n_layers)]
        for i in range(1, n_layers):
            if shapes[i][1] != shapes[i - 1][0]:
                raise ValueError(f"{path}: layers.{i}.weight has shape {shapes[i]}, inconsistent with layers.{i - 1}")
        bias = "layers.0.bias" in state
        config = ModelConfig(
            input_dim=shapes[0][1],
            num_bases=shapes[-1][0],
            hidden_sizes=[s[0] for s in shapes[:-1]],
            scale=scale,
            bias=bias,
        )
        model = cls(config)
        if state["shared_weight"].is_floating_point():
            model = model.to(state["shared_weight"].dtype)
        keep = {k: v for k, v in state.items() if k == "shared_weight" or k.startswith("layers.")}
        model.load_checked_state(keep, source=str(path))
        return model


def _used_rows(index: torch.Tensor, n_rows: int):
    """``(None, None)`` when at least half of the ``n_rows`` rows occur in ``index`` (then φ on
    every row is cheaper than gathering the used ones), else the distinct values of ``index``
    (sorted) and each entry's position among them. A marking pass (O(n_rows)) when that is
    cheaper than sorting."""
    if n_rows <= 8 * index.numel():
        mark = torch.zeros(n_rows, dtype=torch.bool, device=index.device)
        mark[index] = True
        rows = torch.nonzero(mark).flatten()
        if 2 * rows.numel() >= n_rows:
            return None, None
        position = torch.cumsum(mark, 0) - 1
        return rows, position[index]
    return torch.unique(index, return_inverse=True)
