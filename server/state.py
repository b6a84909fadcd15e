"""What a running server holds: model, hooks, engine, store, metrics; loading, readiness and draining."""

from __future__ import annotations

import asyncio
import logging

from basemodel import LoadedModel, load_model
from steering_vectors import CompiledProfile, fold_profile, install_steering

from .config import ServerConfig
from .engine import DrainingError, Engine
from .errors import NotReadyError
from .metrics import Metrics
from .store import VectorStore

__all__ = ["ServerState"]

log = logging.getLogger("steerserve")


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
        hooks = install_steering(loaded.model, max_slots=max(2 * cfg.max_batch_size + 1, 16))
        store = VectorStore(cfg.vector_dir, hooks.layout, max_bytes=cfg.max_upload_bytes)
        if cfg.fold:
            self.folded = store.compile(store.get_profile(cfg.fold))
            fold_profile(loaded.model, self.folded)
        self.metrics.set_model_info(
            model=loaded.model_id,
            quantization=loaded.quantization,
            device=str(loaded.device),
            dtype=loaded.dtype_name,
        )
        self.metrics.set_vectors_loaded(len(store))
        self.loaded, self.store = loaded, store
        return Engine(
            loaded.model,
            loaded.tokenizer,
            hooks,
            max_batch_size=cfg.max_batch_size,
            max_queue=cfg.max_queue,
            max_new_tokens_cap=cfg.max_new_tokens,
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
        except Exception as e:  # reported by /ready and the log; the process stays up for /health
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("model load failed")

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
            raise NotReadyError(self.load_error or "model is still loading")
        return self.engine, self.store, self.loaded
