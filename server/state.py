"""What a running server holds: model, hooks, engine, store, metrics; loading, readiness and draining."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from basemodel import LoadedModel, load_model
from steering_vectors import CompiledProfile, fold_profile, install_steering

from .config import ServerConfig
from .engine import DrainingError, Engine
from .errors import NotReadyError
from .metrics import Metrics
from .store import VectorStore
from .vector_dir import VectorDir

__all__ = ["ServerState", "steering_slots"]

log = logging.getLogger("steerserve")


def steering_slots(max_batch_size: int) -> int:
    """The steering hooks' slot count for ``max_batch_size`` rows: twice the rows plus slot 0 (the
    identity), at least 16."""
    return max(2 * max_batch_size + 1, 16)


class ServerState:
    """Everything a running server holds: model, hooks, engine, store, metrics, readiness."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.loaded: LoadedModel | None = None
        self.engine: Engine | None = None
        self.store: VectorStore | None = None
        self.folded: CompiledProfile | None = None
        self.load_error: str | None = None
        self.draining = False
        #: called when loading fails (``steerserve serve`` exits then; in-process /ready stays 503)
        self.on_load_failure: Callable[[], None] | None = None

    @property
    def model_id(self) -> str:
        """The model's id in the API: ``--served-model-name``, else the loaded model's name."""
        if self.config.served_model_name:
            return self.config.served_model_name
        return self.loaded.model_id if self.loaded is not None else ""

    def preflight(self) -> None:
        """Refuse at once (``ValueError``) a missing model folder or a missing ``--fold`` profile."""
        cfg = self.config
        if cfg.model is not None and not Path(cfg.model).is_dir():
            raise ValueError(f"--model {cfg.model}: no such model directory")
        if cfg.fold and not VectorDir(cfg.vector_dir).has_profile(cfg.fold):
            raise ValueError(f"--fold {cfg.fold}: no saved profile of that name in {cfg.vector_dir}")

    @property
    def ready(self) -> bool:
        """Loaded and not draining (``GET /ready`` answers 200)."""
        return self.engine is not None and not self.draining

    def load(self, loaded: LoadedModel | None = None) -> None:
        """Load the model (unless given), install the hooks, open the store, start the engine."""
        self.engine = self._build(loaded).start()

    def _build(self, loaded: LoadedModel | None) -> Engine:
        """Everything but starting the engine loop (which must run in a thread that outlives loading)."""
        cfg = self.config
        loaded = loaded or load_model(
            cfg.model, quantization=cfg.quantization, dtype=cfg.dtype, device=cfg.device
        )
        hooks = install_steering(
            loaded.model,
            max_slots=steering_slots(cfg.max_batch_size),
            max_profile_rank=cfg.max_profile_rank,
        )
        store = VectorStore(
            cfg.vector_dir,
            hooks.layout,
            max_bytes=cfg.max_upload_bytes,
            max_vectors=cfg.max_vectors,
            max_versions=cfg.max_versions,
            model_names=None if cfg.allow_model_mismatch else (loaded.model_id, loaded.path.name),
            reserved_names=(cfg.served_model_name or loaded.model_id,),
            rank_limits={"max_lora_rank": cfg.max_lora_rank, "max_profile_rank": cfg.max_profile_rank},
        )
        if cfg.fold:
            try:
                self.folded = store.compile(store.get_profile(cfg.fold))
                fold_profile(loaded.model, self.folded)
            except (KeyError, ValueError) as e:
                raise ValueError(f"cannot fold profile {cfg.fold!r}: {e}") from None
            store.folded = cfg.fold
        self.metrics.set_model_info(
            model=cfg.served_model_name or loaded.model_id,
            quantization=loaded.quantization,
            device=str(loaded.device),
            dtype=loaded.dtype_name,
        )
        self.metrics.track_vectors(store.names)
        self.loaded, self.store = loaded, store
        return Engine(
            loaded.model,
            loaded.tokenizer,
            hooks,
            max_batch_size=cfg.max_batch_size,
            max_queue=cfg.max_queue,
            max_new_tokens_cap=cfg.max_new_tokens,
            kv_cache_tokens=cfg.kv_cache_tokens or None,
            max_batched_tokens=cfg.max_batched_tokens or None,
            observer=self.metrics,
        )

    async def load_async(self) -> None:
        """Load in a worker thread while /health answers; start the engine from the event loop's thread.

        An engine thread spawned by a short-lived loader thread decodes several times slower (measured
        4-8x on CPU: the OpenMP runtime ties the worker team to the thread that created it), so the
        engine loop is started here, from the long-lived main thread.
        """
        try:
            engine = await asyncio.to_thread(self._build, None)
            self.engine = engine.start()
            log.info("model loaded; ready")
        except Exception as e:  # one line in the log; `steerserve serve` exits, in-process /ready says 503
            self.load_error = "cannot load the model: " + " ".join(f"{type(e).__name__}: {e}".split())[:500]
            log.error("%s", self.load_error)
            log.debug("model load failed", exc_info=True)
            if self.on_load_failure is not None:
                self.on_load_failure()

    async def exposition(self) -> tuple[bytes, str]:
        """Body and content type of ``GET /metrics``: this process's metrics (a Ray replica answers for
        every replica, :class:`server.ray_app.ReplicaState`). In a worker thread: reading the vector
        count may wait for another process's write to the directory."""
        return await asyncio.to_thread(self.metrics.exposition)

    def begin_drain(self) -> None:
        """SIGTERM: stop taking requests (503), let the ones in flight finish."""
        self.draining = True
        if self.engine is not None:
            self.engine.drain()

    def require_engine(self) -> tuple[Engine, VectorStore, LoadedModel]:
        """The engine, store and model; :class:`DrainingError` or :class:`NotReadyError` (503) otherwise."""
        if self.draining:
            raise DrainingError("server is draining; not accepting new requests")
        if self.engine is None or self.store is None or self.loaded is None:
            raise NotReadyError("the model failed to load" if self.load_error else "model is still loading")
        return self.engine, self.store, self.loaded
