"""``steerserve serve --replicas N``: run the Ray Serve application until a signal drains it (SPEC §9.4).

1. Join the Ray cluster at ``--ray-address``, or start a local one (all CPUs of this machine, a 200 MiB
   object store, no dashboard).
2. Start Ray Serve's HTTP proxy on ``--host``/``--port`` and the replica registry (pinned to this machine,
   where it writes ``--metrics-sd-file``), deploy the replicas (:mod:`server.ray_app`) and wait until
   every one has loaded the model.
3. On SIGTERM or SIGINT: every replica drains (new requests 503, ``/ready`` 503, in-flight requests
   finish) for up to ``--drain-timeout`` seconds; what still runs then is cancelled. Then the application
   is deleted (Ray waits for the last responses to flush) and a local cluster is shut down. A second
   signal skips the rest of the drain.

A model that cannot be loaded makes the deployment fail: the process exits with a one-line reason.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from types import FrameType

from .config import ServerConfig
from .replica_registry import NAMESPACE, REPORT_INTERVAL_S, registry_name
from .state import ServerState

__all__ = ["OBJECT_STORE_BYTES", "serve_replicas"]

log = logging.getLogger("steerserve")

#: object store of a local cluster: replicas exchange no large objects
OBJECT_STORE_BYTES = 200 * 1024 * 1024


class _Signals:
    """First SIGTERM/SIGINT: ``stop``; the second: ``hurry`` (skip the rest of the drain)."""

    def __init__(self) -> None:
        self.stop, self.hurry = threading.Event(), threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, sig: int, _frame: FrameType | None) -> None:
        if self.stop.is_set():
            self.hurry.set()
            return
        log.info("signal %s: draining every replica (in-flight requests finish, new ones get 503)", sig)
        self.stop.set()

    def wait(self) -> None:
        while not self.stop.wait(1.0):  # a timed wait lets the handlers run
            pass


def _drain(registry: object, timeout: float, hurry: threading.Event) -> None:
    """Drain every replica for up to ``timeout`` seconds, then cancel what still runs."""
    import ray

    ray.get(registry.set_mode.remote("drain"))  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not hurry.is_set():
        if ray.get(registry.drained.remote()):  # type: ignore[attr-defined]
            log.info("every replica is drained")
            return
        time.sleep(0.1)
    log.warning("drain timeout reached: cancelling the requests still in flight")
    ray.get(registry.set_mode.remote("cancel"))  # type: ignore[attr-defined]
    deadline = time.monotonic() + 4 * REPORT_INTERVAL_S
    while time.monotonic() < deadline and not ray.get(registry.drained.remote()):  # type: ignore[attr-defined]
        time.sleep(0.1)


def _connect(config: ServerConfig) -> bool:
    """Join ``--ray-address`` or start a local cluster; True when a local cluster was started."""
    import ray

    level = config.log_level.upper()
    if config.ray_address:
        ray.init(address=config.ray_address, logging_level=level)
        return False
    ray.init(
        address="local",
        num_cpus=len(os.sched_getaffinity(0)),
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=False,
        logging_level=level,
    )
    return True


def _fresh_registry(config: ServerConfig, app_name: str) -> object:
    """A new registry for this run (one left by an earlier run that died may still be in drain mode)."""
    import ray

    from .replica_registry import registry_actor

    try:
        ray.kill(ray.get_actor(registry_name(app_name), namespace=NAMESPACE))
    except ValueError:
        pass  # none left over
    return registry_actor(app_name, sd_file=config.metrics_sd_file, pin_here=True)


def _failure(error: RuntimeError) -> str:
    """One line: the replicas' own reason (their constructor's ``RuntimeError``, e.g. the model that
    cannot load), from the deployment's status, else Ray's message."""
    import ray
    from ray import serve

    from .ray_app import APP_NAME, DEPLOYMENT

    try:
        message = serve.status().applications[APP_NAME].deployments[DEPLOYMENT].message
    except (KeyError, ray.exceptions.RayError):
        message = ""
    reasons = re.findall(r"RuntimeError: (?!Traceback)(.+)", message)
    return " ".join((reasons[-1] if reasons else str(error)).split())[:500]


def serve_replicas(config: ServerConfig) -> None:
    """Serve ``config`` as ``config.replicas`` Ray Serve replicas until a signal drains them.

    Raises ``ValueError`` for a configuration that cannot be served (or naming the ``steerserve[ray]``
    extra when Ray is missing), and ``SystemExit`` with a one-line reason when the replicas cannot start.
    """
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ValueError("--replicas needs Ray Serve: pip install 'steerserve[ray]'") from None
    from .ray_app import APP_NAME, build_application, check_proxy_options

    check_proxy_options(config)
    if not config.ray_address:
        ServerState(config).preflight()  # on a remote cluster the paths are the replicas' to check
    local = _connect(config)
    log.info("Ray cluster at %s", ray.get_runtime_context().gcs_address)
    signals = _Signals()  # after ray.init, which installs a SIGTERM handler of its own
    registry = None
    try:
        serve.start(http_options={"host": config.host or "0.0.0.0", "port": config.port})
        registry = _fresh_registry(config, APP_NAME)
        try:
            serve.run(build_application(config), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:
            raise SystemExit(f"steerserve: error: the replicas did not start: {_failure(e)}") from None
        host = config.host or "0.0.0.0"
        log.info("%d replicas serving on http://%s:%d", config.replicas, host, config.port)
        signals.wait()
        _drain(registry, config.drain_timeout, signals.hurry)
        serve.delete(APP_NAME)
    finally:
        if registry is not None:
            ray.kill(registry)
        if local:
            serve.shutdown()
            ray.shutdown()
