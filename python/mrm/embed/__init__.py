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

Modules: :mod:`mrm.embed.backbone` (finding, loading and running the backbone; the bundled
models), :mod:`mrm.embed.store` (manifest, shards, checksums, index and keys),
:mod:`mrm.embed.cache` (:class:`EmbeddingCache`, both put together; :func:`default_cache_dir`,
:func:`embed_dataset`) and :mod:`mrm.embed.texts` (the (prompt, response) input). Everything is
re-exported here.
"""

# This module re-exports the names of its submodules.
# ruff: noqa: F401
from mrm.embed.backbone import (
    BACKBONES,
    DTYPES,
    ENCODER_MODEL_TYPES,
    FINGERPRINT_SAMPLE_BYTES,
    KINDS,
    TORCH_HINT,
    Backbone,
    _require_torch,
    backbone_path,
    minilm_path,
    smollm2_path,
)
from mrm.embed.cache import EmbeddingCache, default_cache_dir, embed_dataset
from mrm.embed.store import FORMAT, FORMAT_VERSION, KEY_BYTES, MANIFEST_NAME, SHARDS_DIR, ShardStore
from mrm.embed.texts import Message, Prompt
from mrm.embed.texts import normalise_text as _normalise_text

__all__ = ["EmbeddingCache", "minilm_path", "smollm2_path", "default_cache_dir", "embed_dataset", "backbone_path"]
