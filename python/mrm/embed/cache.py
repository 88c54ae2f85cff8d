"""EmbeddingCache: the backbone (:mod:`mrm.embed.backbone`) and the on-disk store
(:mod:`mrm.embed.store`) put together, and the per-user cache directory and dataset helpers."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from mrm.embed.backbone import BACKBONES, DTYPES, KINDS, Backbone, backbone_path
from mrm.embed.store import ShardStore
from mrm.embed.texts import Prompt, normalise_text

PathLike = Union[str, os.PathLike]


class EmbeddingCache(ShardStore, Backbone):
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

    @property
    def dim(self) -> int:
        """D, the embedding width (from the manifest when the cache exists, else the model)."""
        if self._model_dim is not None:
            return self._model_dim
        if self._manifest is not None:
            return int(self._manifest["dim"])
        self._load()
        return self._model_dim


    # -- embedding ----------------------------------------------------------------------------

    def embed(self, texts: Sequence[Tuple[Prompt, str]], progress: bool = True) -> np.ndarray:
        """Embeddings of (prompt, response) pairs, float32 (N, D); only uncached texts are computed."""
        items = [normalise_text(item, i) for i, item in enumerate(texts)]
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
            self._read_rows(rows_by_shard, out)
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
