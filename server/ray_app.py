"""steerserve as a Ray Serve application (SPEC §9.4): N replicas of the same FastAPI app behind Ray's proxy.

Each replica is one :class:`SteerserveReplica` actor: it builds its own :class:`ReplicaState` (model,
hooks, store over the shared vector directory, engine, metrics) in its constructor, so Ray routes to it
only once the model is loaded, and then serves :func:`server.app.create_app` over that state
(``@serve.ingress()`` without an app: Serve calls ``__serve_build_asgi_app__`` on each replica after the
constructor). What a replica adds to the single-process server:

- ``X-Steerserve-Replica`` on every response: the replica's Ray id, stable for its lifetime;
- reports to the replica registry (:mod:`server.replica_registry`), which tells it to drain or cancel;
- its own metrics endpoint, and ``GET /metrics`` answering for every live replica
  (:mod:`server.replica_metrics`).

Resources (:func:`deployment_options`): one GPU per replica where the cluster has GPUs (and ``--device``
is not ``cpu``); CPUs per replica ``--replica-cpus``, by default the cluster's CPUs divided by the most
replicas there can be, and as many torch threads as whole CPUs (at least one: ``OMP_NUM_THREADS`` in the
replica's environment and ``torch.set_num_threads``). ``max_ongoing_requests`` is the batch size plus
the queue plus :data:`CONTROL_SLACK` (Ray's default of 5 would starve continuous batching); Ray's proxy
queues at most ``--max-queue`` more per caller and answers 429 with ``Retry-After`` beyond that.
Autoscaling (``--min-replicas``/``--max-replicas``) targets ``--max-batch-size`` ongoing requests per
replica: a replica with a full batch is at capacity.

``app(args)`` builds the application from a Serve config file (``import_path: server.ray_app:app``, the
``args`` being serve options by name), e.g. for a KubeRay ``RayService``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import ray
import torch
from fastapi import FastAPI
from ray import serve
from ray.serve.config import BackpressureConfig

from .app import create_app
from .auth import is_loopback
from .config import ServerConfig, config_from_mapping
from .edge import REQUEST_ID_HEADER
from .errors import NotReadyError
from .replica_metrics import MetricsEndpoint, fetch_expositions, merge_expositions
from .replica_registry import REPORT_INTERVAL_S, registry_actor
from .state import ServerState

__all__ = [
    "APP_NAME",
    "CONTROL_SLACK",
    "DEPLOYMENT",
    "PROXY_OWNED_OPTIONS",
    "REPLICA_HEADER",
    "ReplicaState",
    "SteerserveReplica",
    "app",
    "build_application",
    "check_proxy_options",
    "deployment_options",
]

log = logging.getLogger("steerserve")

APP_NAME = "steerserve"
DEPLOYMENT = "SteerserveReplica"
REPLICA_HEADER = "x-steerserve-replica"
#: ongoing requests a replica takes beyond its batch and queue: probes, /metrics, vector and profile calls
CONTROL_SLACK = 16
#: connection-level options that Ray Serve's HTTP proxy, not steerserve, applies in replica mode
PROXY_OWNED_OPTIONS = ("header_timeout", "max_header_bytes", "max_connections")


class ReplicaState(ServerState):
    """A replica's :class:`ServerState`: ``GET /metrics`` answers with every live replica's metrics."""

    def __init__(self, config: ServerConfig, replica_id: str, registry: Any) -> None:
        super().__init__(config)
        self.replica_id, self.registry = replica_id, registry

    async def exposition(self) -> tuple[bytes, str]:
        try:
            reports = await self.registry.replicas.remote()
        except ray.exceptions.RayError as e:
            raise NotReadyError(f"the replica registry is unreachable: {type(e).__name__}") from None
        urls = {rid: r.metrics_url for rid, r in reports.items() if rid != self.replica_id}
        own, others = await asyncio.gather(super().exposition(), fetch_expositions(urls))
        return merge_expositions({self.replica_id: own[0], **others})


class ReplicaHeader:
    """Pure ASGI middleware: ``X-Steerserve-Replica: <id>`` on every HTTP response.

    Ray's proxy gives every request an ``X-Request-Id`` (the client's, else a fresh one) and adds it to
    the response itself; the app's copy of the same id is dropped so that it is not sent twice (an id the
    edge replaced, a client id that is not a plain token, stays).
    """

    def __init__(self, app: Any, replica: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        proxy_id = (
            REQUEST_ID_HEADER.encode(),
            dict(scope.get("headers") or ()).get(REQUEST_ID_HEADER.encode()),
        )

        async def send_with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if (k.lower(), v) != proxy_id]
                message["headers"] = [*kept, self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()
class SteerserveReplica:
    """One replica: model, engine and store of its own; the vector directory shared with the others."""

    async def __init__(self, config: ServerConfig, threads: int) -> None:
        if not logging.getLogger().handlers:
            logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("steerserve").setLevel(config.log_level.upper())
        torch.set_num_threads(threads)
        context = serve.get_replica_context()
        self.replica_id = context.replica_tag
        self.registry = registry_actor(context.app_name)
        self.state = ReplicaState(config, self.replica_id, self.registry)
        self.state.preflight()
        await self.state.load_async()  # the engine starts from this long-lived event loop's thread
        if self.state.load_error is not None:
            raise RuntimeError(self.state.load_error)
        host = "127.0.0.1" if is_loopback(config.host) else ray.util.get_node_ip_address()
        self.endpoint = MetricsEndpoint(self.state.metrics, host)
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())
        log.info("replica %s ready (%d threads, metrics at %s)", self.replica_id, threads, self.endpoint.url)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.state)
        app.add_middleware(ReplicaHeader, replica=self.replica_id)  # type: ignore[arg-type]
        return app

    async def _report_forever(self) -> None:
        """Report to the registry every REPORT_INTERVAL_S seconds; follow its mode (drain, cancel)."""
        cancelled, reported = False, True
        while True:
            engine = self.state.engine
            idle = engine is None or engine.idle()
            try:
                mode = await self.registry.report.remote(
                    self.replica_id, self.endpoint.url, self.state.draining, idle
                )
                reported = True
            except ray.exceptions.RayError as e:  # the application is going away, or its registry died
                if reported:  # once per outage, not twice a second
                    log.warning("replica %s: cannot report to the registry: %s", self.replica_id, e)
                mode, reported = "serve", False
            if mode != "serve" and not self.state.draining:
                log.info("replica %s: draining (in flight: finish; new: 503)", self.replica_id)
                self.state.begin_drain()
            if mode == "cancel" and not cancelled and engine is not None:
                cancelled = True
                log.warning("replica %s: drain timeout: cancelling what is still running", self.replica_id)
                await asyncio.to_thread(engine.stop, 0.0)
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def __del__(self) -> None:
        """Ray's graceful shutdown, after the app's own shutdown (the engine has stopped)."""
        reporter = getattr(self, "_reporter", None)
        if reporter is not None:
            reporter.cancel()
        if hasattr(self, "endpoint"):
            self.endpoint.close()
        if hasattr(self, "registry"):
            try:
                await self.registry.forget.remote(self.replica_id)
            except ray.exceptions.RayError:
                pass  # the registry went first: it forgets silent replicas by itself


def deployment_options(config: ServerConfig, resources: Mapping[str, float]) -> tuple[dict[str, Any], int]:
    """Serve options of the replica deployment on a cluster with ``resources`` (``ray.cluster_resources()``),
    and the torch threads of each replica. ``ValueError`` for a device the cluster cannot give."""
    if config.device.startswith("cuda:"):
        raise ValueError(f"--device {config.device}: with --replicas each replica gets one GPU; use cuda")
    gpus = resources.get("GPU", 0.0)
    if config.device == "cuda" and gpus < 1:
        raise ValueError("--device cuda: the Ray cluster has no GPU")
    most = config.max_replicas or config.replicas
    cpus = config.replica_cpus or max(resources.get("CPU", 1.0) / most, 0.01)
    threads = max(1, math.floor(cpus))
    actor: dict[str, Any] = {
        "num_cpus": cpus,
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}},
    }
    if config.device != "cpu" and gpus >= 1:
        actor["num_gpus"] = 1
    options: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": config.max_batch_size + config.max_queue + CONTROL_SLACK,
        "max_queued_requests": config.max_queue,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=1),
        "graceful_shutdown_timeout_s": config.drain_timeout + 5.0,
        "graceful_shutdown_wait_loop_s": REPORT_INTERVAL_S,
    }
    if config.max_replicas:
        options["autoscaling_config"] = {
            "min_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "initial_replicas": config.replicas,
            "target_ongoing_requests": config.max_batch_size,
        }
    else:
        options["num_replicas"] = config.replicas
    return options, threads


def check_proxy_options(config: ServerConfig) -> None:
    """``ValueError`` naming the connection options that Ray's proxy would not honour if they were set."""
    defaults = {f.name: f.default for f in fields(ServerConfig)}
    changed = [n for n in PROXY_OWNED_OPTIONS if getattr(config, n) != defaults[n]]
    if changed:
        names = ", ".join("--" + n.replace("_", "-") for n in changed)
        raise ValueError(
            f"{names}: not supported with --replicas (Ray Serve's HTTP proxy, not steerserve, owns the "
            "connections)"
        )


def build_application(config: ServerConfig) -> Any:
    """The Serve application of ``config`` on the connected cluster."""
    check_proxy_options(config)
    options, threads = deployment_options(config, ray.cluster_resources())
    return SteerserveReplica.options(**options).bind(config, threads)


def app(args: dict[str, Any]) -> Any:
    """Application builder for Serve config files: ``import_path: server.ray_app:app``, ``args``: serve
    options by name (``{"replicas": 2, "vector_dir": "/data/vectors", ...}``)."""
    return build_application(config_from_mapping(args))
