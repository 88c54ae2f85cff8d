"""The on-disk half of :class:`mrm.embed.EmbeddingCache`: the manifest, the immutable
safetensors shards with their checksums, and the index of cached keys (layout in
:mod:`mrm.embed`'s docstring).

:class:`ShardStore` is a mixin: it reads and sets the cache's ``cache_dir``, ``_manifest``,
``_index``, ``_indexed_shards`` and ``_cleaned``, and needs from the backbone half
(:class:`mrm.embed.backbone.Backbone`) its identity: ``fingerprint``, ``backbone_id``,
``model_path``, ``gguf_file``, ``kind``, ``pooling``, ``max_length`` and ``dtype``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from mrm._io import atomic_file, read_json, remove_stale_in
from mrm.embed.texts import Prompt, normalise_text

FORMAT = "mrm-fast/embedding-cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
KEY_BYTES = 32


def _shard_digest(keys: np.ndarray, embeddings: np.ndarray) -> str:
    """sha256 of a shard's keys and embeddings (dtypes and shapes included), stored in it."""
    digest = hashlib.sha256()
    for array in (keys, embeddings):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()



class ShardStore:
    """The cache directory: manifest, shards, index and keys (a mixin of :class:`EmbeddingCache`)."""

    @property
    def _shards_dir(self) -> Path:
        return self.cache_dir / SHARDS_DIR

    def _check_manifest(self) -> Optional[dict]:
        manifest = read_json(self.cache_dir / MANIFEST_NAME)
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

    def _read_rows(self, rows_by_shard: Dict[str, List[Tuple[int, int]]], out: np.ndarray) -> None:
        """Copy cached vectors into ``out``: ``rows_by_shard`` maps a shard's name to (row of
        ``out``, row of the shard) pairs."""
        from safetensors import safe_open

        for shard, pairs in rows_by_shard.items():
            with safe_open(str(self._shards_dir / shard), framework="numpy") as handle:
                vectors = handle.get_tensor("embeddings")
            positions, rows = zip(*pairs)
            out[list(positions)] = vectors[list(rows)]

    # -- keys ---------------------------------------------------------------------------------

    def key(self, prompt: Prompt, response: str) -> bytes:
        """Content hash of (backbone, pooling, max_length, dtype, text): the cache key."""
        return self._key(*normalise_text((prompt, response), 0))

    def _key(self, prompt: Prompt, response: str) -> bytes:
        record = [
            FORMAT_VERSION, self.fingerprint, self.pooling, self.max_length, self.dtype, prompt, response
        ]
        encoded = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(encoded).digest()

