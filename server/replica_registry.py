"""The replicas' registry: which steerserve replicas are alive, where their metrics are, and whether to drain.

One small Ray actor per application (named ``registry:<app>`` in the ``steerserve`` namespace, no CPU).
Every replica reports to it every :data:`REPORT_INTERVAL_S` seconds (its id, its metrics URL, whether it
is draining and idle) and reads back the application's mode:

- ``serve``: normal operation;
- ``drain``: SIGTERM reached ``steerserve serve --replicas``: every replica answers new requests with 503
  and lets the ones in flight finish (SPEC §7), then reports ``idle``;
- ``cancel``: the drain timeout passed: the requests still running end now (``finish_reason`` cancelled).

A replica that has not reported for :data:`TTL_S` seconds (killed, or its node lost) is forgotten. The
registry is what ``GET /metrics`` on the proxy address reads to reach every replica, and, with
``--metrics-sd-file``, it keeps a Prometheus ``file_sd`` target list of the live replicas' metrics
endpoints (label ``replica``), rewritten atomically whenever that set changes.

:class:`ReplicaRegistry` is a plain class (tested without Ray); :func:`registry_actor` runs it as the actor.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steering_vectors.artifact import atomic_write_bytes

__all__ = [
    "MODES",
    "NAMESPACE",
    "REPORT_INTERVAL_S",
    "TTL_S",
    "ReplicaRegistry",
    "ReplicaReport",
    "registry_actor",
    "registry_name",
]

log = logging.getLogger(__name__)

NAMESPACE = "steerserve"
#: seconds between two reports of a replica (a drain reaches every replica within this time)
REPORT_INTERVAL_S = 0.5
#: a replica silent for this long is forgotten
TTL_S = 3.0
MODES = ("serve", "drain", "cancel")


def registry_name(app: str) -> str:
    """The actor name of application ``app``'s registry."""
    return f"registry:{app}"


@dataclass(frozen=True)
class ReplicaReport:
    """The last report of one replica."""

    replica: str
    metrics_url: str
    draining: bool
    idle: bool
    seen: float


class ReplicaRegistry:
    """Live replicas, the application's mode, and the optional ``file_sd`` list (see the module doc)."""

    def __init__(self, sd_file: str | None = None, ttl: float = TTL_S) -> None:
        self.sd_file = Path(sd_file) if sd_file else None
        self.ttl = ttl
        self.mode = "serve"
        self._reports: dict[str, ReplicaReport] = {}
        self._written: list[tuple[str, str]] | None = None
        self._write_sd()

    def report(self, replica: str, metrics_url: str, draining: bool, idle: bool) -> str:
        """Record a replica's report; returns the mode it must follow."""
        self._reports[replica] = ReplicaReport(replica, metrics_url, draining, idle, time.monotonic())
        self._expire()
        return self.mode

    def forget(self, replica: str) -> None:
        """A replica shutting down cleanly leaves at once."""
        self._reports.pop(replica, None)
        self._write_sd()

    def set_mode(self, mode: str) -> None:
        """``serve``, ``drain`` or ``cancel`` (``ValueError`` otherwise); a drain is never undone."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
        if MODES.index(mode) < MODES.index(self.mode):
            raise ValueError(f"cannot go from {self.mode!r} back to {mode!r}")
        self.mode = mode

    def replicas(self) -> dict[str, ReplicaReport]:
        """The live replicas by id."""
        self._expire()
        return dict(self._reports)

    def drained(self) -> bool:
        """Every live replica has acknowledged the drain and has nothing left in flight."""
        live = self.replicas().values()
        return self.mode != "serve" and all(r.draining and r.idle for r in live)

    def _expire(self) -> None:
        now = time.monotonic()
        for rid in [r.replica for r in self._reports.values() if now - r.seen > self.ttl]:
            log.warning("replica %s stopped reporting; forgotten", rid)
            del self._reports[rid]
        self._write_sd()

    def _write_sd(self) -> None:
        """Rewrite the ``file_sd`` list when the set of (replica, endpoint) changed."""
        if self.sd_file is None:
            return
        targets = sorted((r.replica, r.metrics_url) for r in self._reports.values())
        if targets == self._written:
            return
        groups = [
            {"targets": [url.split("://", 1)[-1].split("/", 1)[0]], "labels": {"replica": rid}}
            for rid, url in targets
        ]
        atomic_write_bytes(self.sd_file, json.dumps(groups, indent=2).encode() + b"\n")
        self._written = targets


def registry_actor(app: str, *, sd_file: str | None = None, pin_here: bool = False) -> Any:
    """The registry actor of ``app``: the existing one, else a new detached one (no CPU reserved).

    ``pin_here`` places a new one on this node (``steerserve serve`` does, so that ``sd_file`` is a path
    on the machine it runs on); replicas that find none (an application deployed from a Serve config)
    create it wherever Ray likes.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options: dict[str, Any] = {
        "name": registry_name(app),
        "namespace": NAMESPACE,
        "get_if_exists": True,
        "lifetime": "detached",
        "num_cpus": 0,
    }
    if pin_here:
        node = ray.get_runtime_context().get_node_id()
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
    return ray.remote(ReplicaRegistry).options(**options).remote(sd_file)
