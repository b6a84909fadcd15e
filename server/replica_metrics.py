"""Metrics of a replicated deployment: each replica's own endpoint, and one exposition of them all.

Why not Ray's metrics export (``ray.util.metrics``): Ray renames every application metric with a ``ray_``
prefix (``ray_steer_requests_total``), exports it through each node's dashboard agent (which a cluster
started without the dashboard may not run) and labels replicas its own way, so the SPEC §8 names, the
alerts and the dashboard would all have to be rewritten for one deployment mode. Instead:

- every replica serves its own registry, unchanged, at ``http://<node>:<port>/metrics``
  (:class:`MetricsEndpoint`, a free port, bound to loopback when the server is bound to loopback, else
  to the node's address); the replica registry lists these endpoints and can keep them in a Prometheus
  ``file_sd`` file whose target labels add ``replica`` (one scrape target, one ``up`` per replica);
- ``GET /metrics`` on the proxy address, whichever replica Ray routes it to, answers with every live
  replica's exposition merged (:func:`merge_expositions`): each family once, every sample labelled
  ``replica``. A replica that does not answer within :data:`FETCH_TIMEOUT_S` is left out of that scrape
  (and logged); its series continue at the next one.

Scrape one or the other, not both: both carry the same samples.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import urllib.request
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .metrics import CONTENT_TYPE, Metrics

__all__ = ["FETCH_TIMEOUT_S", "MetricsEndpoint", "fetch_expositions", "merge_expositions"]

log = logging.getLogger(__name__)

#: seconds one replica's exposition may take when the proxy's /metrics gathers them
FETCH_TIMEOUT_S = 2.0


class MetricsEndpoint:
    """``GET /metrics`` of one :class:`Metrics` on its own port, in a daemon thread (404 for other paths)."""

    def __init__(self, metrics: Metrics, host: str, port: int = 0) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404)
                    return
                body, ctype = metrics.exposition()
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="steerserve-metrics", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """``http://host:port/metrics``."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as r:  # noqa: S310 (our own http URL)
        return r.read()


async def fetch_expositions(urls: Mapping[str, str]) -> dict[str, bytes]:
    """The expositions of ``{replica: metrics URL}``, fetched at once; those that fail are left out."""

    async def one(replica: str, url: str) -> tuple[str, bytes | None]:
        try:
            return replica, await asyncio.to_thread(_fetch, url)
        except OSError as e:
            log.warning("metrics of replica %s (%s) left out of this scrape: %s", replica, url, e)
            return replica, None

    got = await asyncio.gather(*(one(r, u) for r, u in urls.items()))
    return {replica: body for replica, body in got if body is not None}


def _label(replica: str) -> bytes:
    value = replica.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'replica="{value}"'.encode()


def _with_label(line: bytes, label: bytes) -> bytes:
    """``name{a="b"} 1`` -> ``name{replica="r",a="b"} 1``; ``name 1`` -> ``name{replica="r"} 1``."""
    brace, space = line.find(b"{"), line.find(b" ")
    if brace == -1 or brace > space:
        return line[:space] + b"{" + label + b"}" + line[space:]
    rest = line[brace + 1 :]
    return line[: brace + 1] + label + (b"" if rest.startswith(b"}") else b",") + rest


def merge_expositions(parts: Mapping[str, bytes]) -> tuple[bytes, str]:
    """One text exposition of ``{replica: exposition}``: each family's ``# HELP`` and ``# TYPE`` once,
    then the samples of every replica, each with the label ``replica``; and its content type."""
    headers: dict[bytes, list[bytes]] = {}
    samples: dict[bytes, list[bytes]] = {}
    for replica, body in parts.items():
        label, family = _label(replica), b""
        for line in body.splitlines():
            if not line.strip():
                continue
            if line.startswith(b"#"):
                words = line.split(b" ", 3)
                if len(words) >= 3 and words[1] == b"HELP":
                    family = words[2]
                    samples.setdefault(family, [])
                if len(words) >= 3 and words[1] in (b"HELP", b"TYPE"):
                    known = headers.setdefault(family, [])
                    if len(known) < 2 and line not in known:
                        known.append(line)
                continue
            samples.setdefault(family, []).append(_with_label(line, label))
    out = [line for family in samples for line in (*headers.get(family, []), *samples[family])]
    return b"\n".join(out) + b"\n", CONTENT_TYPE
