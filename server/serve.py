"""Run the app under uvicorn with a draining shutdown: on SIGTERM the server keeps listening, answers new
requests with 503, lets in-flight requests finish (up to ``drain_timeout``), then exits."""

from __future__ import annotations

import logging
import threading
import time
from types import FrameType

import uvicorn

from basemodel import LoadedModel

from .app import create_app
from .config import ServerConfig
from .state import ServerState

__all__ = ["DrainingServer", "serve"]

log = logging.getLogger("steerserve")


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


def serve(config: ServerConfig, loaded: LoadedModel | None = None) -> None:
    """Serve ``config`` until a signal drains and stops it.

    ``loaded``: an already loaded model, served at once (the engine starts in this thread); without it
    the model of ``config`` loads at startup while ``/health`` answers and ``/ready`` says 503.
    """
    state = ServerState(config)
    if loaded is not None:
        state.load(loaded)
    uv = uvicorn.Config(
        create_app(state),
        host=config.host,
        port=config.port,
        log_level=config.log_level.lower(),
        timeout_graceful_shutdown=int(config.drain_timeout) + 5,
        access_log=False,
    )
    DrainingServer(uv, state).run()
