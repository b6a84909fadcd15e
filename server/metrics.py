"""Prometheus metrics of SPEC §8 (prefix ``steer_``), in a registry of their own.

Every metric lives in ``Metrics.registry`` (not prometheus_client's global registry), so several servers
or tests in one process do not collide. Label values are bounded:

- ``route`` is a route *template* (``/v1/vectors/{name}``), never a raw URL; anything not in the known set
  becomes ``other`` (so scans of random paths cannot blow up the series count);
- ``status`` is the numeric HTTP status as a string;
- ``vector`` is the name of a *registered* vector: callers pass only names that exist in the store
  (e.g. the ``name`` fields of ``CompiledProfile.resolved``) and call :meth:`Metrics.forget_vector` when
  a vector is deleted; with :meth:`Metrics.track_vectors` every exposition also drops the series of
  vectors deleted by another process sharing the vector directory (a replica), and sets
  ``steer_vectors_loaded`` from the directory, not from this process's own uploads;
- ``result`` and ``reason`` come from fixed sets (:data:`UPLOAD_RESULTS`, :data:`REJECT_REASONS`); any other
  value is counted as ``other``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

try:  # the classic text format (what generate_latest writes); every Prometheus version reads it
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE
except ImportError:  # older prometheus_client
    from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE

__all__ = [
    "BATCH_BUCKETS",
    "CONTENT_TYPE",
    "INTER_TOKEN_BUCKETS",
    "LATENCY_BUCKETS",
    "REJECT_REASONS",
    "ROUTES",
    "UPLOAD_RESULTS",
    "Metrics",
]

#: Request, time-to-first-token and queue-wait latencies: 1 ms to 5 minutes.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
#: Time between two tokens of one request: 1 ms to 10 s, finer where decode steps land.
INTER_TOKEN_BUCKETS = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: Rows per forward step.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

#: Route templates of SPEC §6; any other route is labelled ``other``.
ROUTES = frozenset(
    {
        "/generate",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/vectors",
        "/v1/vectors/{name}",
        "/v1/profiles",
        "/v1/profiles/{name}",
        "/health",
        "/ready",
        "/metrics",
    }
)
#: ``steer_vector_uploads_total{result}`` values.
UPLOAD_RESULTS = (
    "created",
    "invalid",
    "incompatible",
    "too_large",
    "unauthorized",
    "forbidden",
    "other",
)
#: ``steer_rejected_requests_total{reason}`` values.
REJECT_REASONS = (
    "queue_full",
    "draining",
    "not_ready",
    "too_large",
    "invalid",
    "unauthorized",
    "forbidden",
    "not_found",
    "context_length",
    "other",
)
_OTHER = "other"

log = logging.getLogger(__name__)


class Metrics:
    """The SPEC §8 metrics and the small methods the engine and the HTTP layer call to update them.

    ``routes`` extends the set of route templates accepted as ``route`` label values.
    """

    def __init__(self, *, routes: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.routes = frozenset(ROUTES | set(routes))
        r = self.registry
        # prometheus_client appends "_total" to counter names: these are exposed as steer_*_total.
        self.requests = Counter(
            "steer_requests",
            "HTTP requests by route template and status code",
            ["route", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "steer_request_duration_seconds",
            "Time from request received to response complete",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "steer_time_to_first_token_seconds",
            "Time from request received to its first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "steer_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request",
            buckets=INTER_TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "steer_queue_wait_seconds",
            "Time a request waited before joining the running batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("steer_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("steer_generation_tokens", "Tokens generated", registry=r)
        self.batch_size = Histogram(
            "steer_batch_size", "Rows per forward step", buckets=BATCH_BUCKETS, registry=r
        )
        self.running_requests = Gauge("steer_running_requests", "Requests in the running batch", registry=r)
        self.waiting_requests = Gauge("steer_waiting_requests", "Requests queued for admission", registry=r)
        self.steered_requests = Counter(
            "steer_steered_requests", "Requests steered by each registered vector", ["vector"], registry=r
        )
        self.vectors_loaded = Gauge("steer_vectors_loaded", "Registered steering vectors", registry=r)
        self.vector_uploads = Counter(
            "steer_vector_uploads", "Vector uploads by result", ["result"], registry=r
        )
        self.rejected_requests = Counter(
            "steer_rejected_requests",
            "Requests rejected before generation, by reason",
            ["reason"],
            registry=r,
        )
        self.model_info = Gauge(
            "steer_model_info",
            "The served model (value 1)",
            ["model", "quantization", "device", "dtype"],
            registry=r,
        )
        self._vector_names: Callable[[], Collection[str]] | None = None
        self._steered_names: set[str] = set()
        for result in UPLOAD_RESULTS:  # fixed label sets: every series exists from the start (rate() works)
            self.vector_uploads.labels(result=result)
        for reason in REJECT_REASONS:
            self.rejected_requests.labels(reason=reason)

    # ------------------------------------------------------------------ HTTP layer

    def route_label(self, route: str) -> str:
        """``route`` if it is a known route template, else ``other``."""
        return route if route in self.routes else _OTHER

    def observe_request(self, route: str, status: int | str, seconds: float | None = None) -> None:
        """Count a finished HTTP request; ``route`` is the route template, ``status`` the status code.

        ``seconds`` (time to the complete response) goes to ``steer_request_duration_seconds`` when given.
        """
        try:
            code = int(status)
        except (TypeError, ValueError):
            code = 0
        label = str(code) if 100 <= code <= 599 else _OTHER
        self.requests.labels(route=self.route_label(route), status=label).inc()
        if seconds is not None:
            self.request_duration.observe(max(0.0, float(seconds)))

    def reject(self, reason: str) -> None:
        """Count a rejected request; reasons outside :data:`REJECT_REASONS` count as ``other``."""
        self.rejected_requests.labels(reason=reason if reason in REJECT_REASONS else _OTHER).inc()

    def upload(self, result: str) -> None:
        """Count a vector upload; results outside :data:`UPLOAD_RESULTS` count as ``other``."""
        self.vector_uploads.labels(result=result if result in UPLOAD_RESULTS else _OTHER).inc()

    def steered(self, names: Iterable[str]) -> None:
        """Count one steered request for each distinct vector it uses.

        Pass only names of registered vectors (base names without ``@pin``), e.g. the ``name`` fields of
        ``CompiledProfile.resolved``: that keeps the ``vector`` label's cardinality bounded.
        """
        for name in sorted(set(names)):
            self.steered_requests.labels(vector=name).inc()
            self._steered_names.add(name)

    def forget_vector(self, name: str) -> None:
        """Drop the ``steer_steered_requests_total`` series of a deleted vector."""
        self._steered_names.discard(name)
        try:
            self.steered_requests.remove(name)
        except KeyError:
            pass

    def track_vectors(self, names: Callable[[], Collection[str]]) -> None:
        """Read the registered vectors from ``names`` at every exposition: ``steer_vectors_loaded`` is
        their number, and the ``steer_steered_requests_total`` series of vectors no longer registered
        (deleted here or by another process sharing the directory) are dropped."""
        self._vector_names = names

    def _sync_vectors(self) -> None:
        if self._vector_names is None:
            return
        try:
            names = set(self._vector_names())
        except OSError as e:  # an unreadable directory: keep the last values, say why
            log.warning("steer_vectors_loaded not updated: %s", e)
            return
        self.vectors_loaded.set(len(names))
        for gone in sorted(self._steered_names - names):
            self.forget_vector(gone)

    def set_model_info(self, *, model: str, quantization: str, device: str, dtype: str) -> None:
        """Publish ``steer_model_info{model,quantization,device,dtype} 1`` (replacing any earlier value)."""
        self.model_info.clear()
        self.model_info.labels(model=model, quantization=quantization, device=device, dtype=dtype).set(1)

    # ------------------------------------------------------------------ engine

    def observe_queue_wait(self, seconds: float) -> None:
        """Time from arrival to admission into the running batch."""
        self.queue_wait.observe(max(0.0, float(seconds)))

    def observe_ttft(self, seconds: float) -> None:
        """Time from arrival to the first generated token."""
        self.time_to_first_token.observe(max(0.0, float(seconds)))

    def observe_inter_token(self, seconds: float) -> None:
        """Time between two consecutive tokens of one request."""
        self.inter_token_latency.observe(max(0.0, float(seconds)))

    def observe_batch(self, rows: int) -> None:
        """Rows in one forward step."""
        self.batch_size.observe(rows)

    def add_tokens(self, *, prompt: int = 0, generated: int = 0) -> None:
        """Add prompt and generated token counts."""
        if prompt > 0:
            self.prompt_tokens.inc(prompt)
        if generated > 0:
            self.generation_tokens.inc(generated)

    def set_queue(self, *, running: int, waiting: int) -> None:
        """Current sizes of the running batch and of the admission queue."""
        self.running_requests.set(running)
        self.waiting_requests.set(waiting)

    # ------------------------------------------------------------------ exposition

    def exposition(self) -> tuple[bytes, str]:
        """The body and content type of ``GET /metrics``."""
        self._sync_vectors()
        return generate_latest(self.registry), CONTENT_TYPE
