"""mrm.integrations.ray.embed: backbone actors on a local Ray give the local EmbeddingCache's vectors."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from mrm.embed import EmbeddingCache  # noqa: E402
from mrm.integrations import ray as mrm_ray  # noqa: E402


def test_ray_embed_equals_the_local_path(tmp_path):
    from test_embed import HISTORY, TEXTS, save_tiny_llama

    save_tiny_llama(tmp_path / "llama")
    texts = TEXTS + [(HISTORY, "cats are good")] + TEXTS[:3]  # repeats are embedded once
    local = EmbeddingCache(tmp_path / "local", tmp_path / "llama").embed(texts, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        distributed = mrm_ray.embed(texts, tmp_path / "llama", tmp_path / "ray-cache", workers=2, batch_texts=3)
    finally:
        ray.shutdown()
    np.testing.assert_allclose(distributed, local, rtol=0, atol=1e-6)
    # the actors wrote the ordinary cache: a plain EmbeddingCache reads every text back without a model
    cache = EmbeddingCache(tmp_path / "ray-cache", tmp_path / "llama")
    assert len(cache) == len(set(map(repr, texts)))
    np.testing.assert_array_equal(cache.embed(texts, progress=False), distributed)
