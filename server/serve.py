"""Run the app under uvicorn with guarded connections and a draining shutdown.

- Connections: :class:`~server.connection.GuardedProtocol` (header timeout, header size cap, connection
  cap); the open-file limit is raised to fit ``--max-connections`` (or serving is refused).
- SIGTERM: the server keeps listening, answers new requests with 503, lets in-flight requests finish (up to
  ``drain_timeout``), then exits.
- A model, quantization or ``--fold`` profile that cannot be loaded stops the process with a non-zero exit
  status and a one-line reason, instead of a server that is alive but never ready.
"""

from __future__ import annotations

import functools
import logging
import resource
import threading
import time
from types import FrameType
from typing import Any

import uvicorn

from basemodel import LoadedModel

from .app import create_app
from .config import ServerConfig
from .connection import ConnectionLimits, GuardedProtocol
from .state import ServerState

__all__ = ["DrainingServer", "serve", "uvicorn_config"]

log = logging.getLogger("steerserve")

#: file descriptors kept free beyond the connection cap: the listener, model files, logs, the vector store
_SPARE_FDS = 64


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of closing the listener at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.state.draining:  # a second signal: stop now
            super().handle_exit(sig, frame)
            return
        log.info("signal %s: draining (in-flight requests finish, new ones get 503)", sig)
        self.state.begin_drain()
        threading.Thread(target=self._exit_when_drained, name="steerserve-drain", daemon=True).start()

    def _exit_when_drained(self) -> None:
        deadline = time.monotonic() + self.state.config.drain_timeout
        engine = self.state.engine
        while engine is not None and not engine.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        if engine is not None and not engine.idle():
            # Past the drain timeout: end what is still running (finish_reason "cancelled") so that its
            # responses complete now, instead of uvicorn waiting on their connections for longer still.
            log.warning("drain timeout reached: cancelling the requests still in flight")
            engine.stop(timeout=0.0)
        time.sleep(0.2)  # let the last responses flush
        self.should_exit = True


def uvicorn_config(app: Any, config: ServerConfig, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration of ``app`` under ``config``'s connection limits."""
    limits = ConnectionLimits(
        header_timeout=config.header_timeout,
        max_header_bytes=config.max_header_bytes,
        max_connections=config.max_connections,
    )
    options: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "http": functools.partial(GuardedProtocol, limits=limits),
        "log_level": config.log_level.lower(),
        "timeout_graceful_shutdown": int(config.drain_timeout) + 5,
        "access_log": False,
        **overrides,
    }
    return uvicorn.Config(app, **options)


def ensure_fd_limit(max_connections: int) -> None:
    """Raise the soft open-file limit to fit ``max_connections`` (``ValueError`` if the hard one is lower)."""
    need = max_connections + _SPARE_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ValueError(
            f"--max-connections {max_connections} needs {need} file descriptors but the limit is {hard} "
            "(raise `ulimit -n` or lower --max-connections)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def serve(config: ServerConfig, loaded: LoadedModel | None = None) -> None:
    """Serve ``config`` until a signal drains and stops it.

    With ``config.replicas``, runs the Ray Serve application instead (:mod:`server.ray_serve`).
    ``loaded``: an already loaded model, served at once (the engine starts in this thread); without it
    the model of ``config`` loads at startup while ``/health`` answers and ``/ready`` says 503. Raises
    ``ValueError`` for a configuration that cannot be served, and ``SystemExit`` with a one-line reason when
    loading fails.
    """
    if config.replicas:
        from .ray_serve import serve_replicas

        serve_replicas(config)
        return
    ensure_fd_limit(config.max_connections)
    state = ServerState(config)
    state.preflight()
    if loaded is not None:
        state.load(loaded)
    server = DrainingServer(uvicorn_config(create_app(state), config), state)
    state.on_load_failure = lambda: setattr(server, "should_exit", True)
    server.run()
    if state.load_error is not None:
        raise SystemExit(f"steerserve: error: {state.load_error}")
