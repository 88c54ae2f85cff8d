"""Online personalised rewards: :class:`RewardService` (library), :func:`create_app` (HTTP), :func:`run`.

``mrm serve`` is :func:`run`; see :mod:`mrm.serve.app` for the endpoints and
:mod:`mrm.serve.service` for what is computed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from mrm.serve.service import RewardService, Scores

__all__ = ["RewardService", "Scores", "ServeLimits", "create_app", "build_service", "run"]

LOOPBACK = "127.0.0.1"


def __getattr__(name):  # FastAPI is imported only when the HTTP layer is used
    if name in ("create_app", "ServeLimits"):
        from mrm.serve import app

        return getattr(app, name)
    raise AttributeError(name)


def build_service(checkpoint: Union[str, Path], store: Union[str, Path], *, backbone: Optional[str] = None,
                  cache_dir: Optional[Union[str, Path]] = None, response_only: bool = False,
                  steps: Optional[int] = None, lr: Optional[float] = None, optimizer: Optional[str] = None,
                  uncertainty_penalty: float = 0.0, synchronous: str = "FULL",
                  import_weights: Optional[Union[str, Path]] = None, batch_size: int = 32) -> RewardService:
    """A :class:`RewardService` from paths: the checkpoint, the store (created when missing), an
    optional backbone (``minilm``, ``smollm2`` or a local model; its cache in ``cache_dir``,
    default the per-user cache directory) and an optional user-weights table to import first."""
    from mrm.checkpoint import Checkpoint
    from mrm.store import AdaptSettings, UserStore

    loaded = Checkpoint.load(checkpoint)
    settings = AdaptSettings.from_checkpoint(loaded, steps=steps, lr=lr, optimizer=optimizer)
    user_store = UserStore(store, loaded.num_bases, synchronous=synchronous)
    if import_weights is not None:
        user_store.import_parquet(import_weights)
    embedder = None
    if backbone is not None:
        from mrm.embed import EmbeddingCache, backbone_path, default_cache_dir

        embedder = EmbeddingCache(cache_dir if cache_dir is not None else default_cache_dir(backbone),
                                  backbone_path(backbone), batch_size=batch_size)
    return RewardService(loaded, user_store, embedder=embedder, settings=settings, response_only=response_only,
                         uncertainty_penalty=uncertainty_penalty)


def run(service: RewardService, *, host: str = LOOPBACK, port: int = 8000, limits=None,
        log_level: str = "warning") -> None:
    """Serve ``service`` with uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError(f"mrm serve needs FastAPI and uvicorn: pip install 'mrm-fast[serve]' ({exc})") from None
    from mrm.serve.app import ServeLimits, create_app

    app = create_app(service, limits or ServeLimits())
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
