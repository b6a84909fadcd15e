"""The FastAPI app (SPEC §6): the routers over one :class:`~server.state.ServerState`.

Errors are mapped to HTTP once (:mod:`server.errors`); the edge middleware (:mod:`server.edge`) caps and
times request bodies before anything parses them and records the request metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .edge import EdgeMiddleware
from .errors import install_error_handlers
from .routes import ROUTERS
from .state import ServerState

__all__ = ["create_app"]


def create_app(state: ServerState) -> FastAPI:
    """Build the FastAPI app around ``state``; if it holds no model yet, loading starts at startup."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(state.load_async()) if state.engine is None else None
        yield
        if loading is not None and not loading.done():
            loading.cancel()
        if state.engine is not None:
            await asyncio.to_thread(state.engine.stop, state.config.drain_timeout)

    app = FastAPI(
        title="steerserve",
        version="0.1.0",
        lifespan=lifespan,
        description="Inference-time steering server: RED, RAHF vectors and LoRA per request.",
    )
    app.state.steerserve = state
    install_error_handlers(app, state.metrics)
    app.add_middleware(EdgeMiddleware, config=state.config, metrics=state.metrics)  # type: ignore[arg-type]
    for router in ROUTERS:
        app.include_router(router)
    return app
