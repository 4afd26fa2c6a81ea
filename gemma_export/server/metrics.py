"""Prometheus series of one server (its own registry, so several servers can live in one
process, as in the tests). The engine reports through the `engine.Observer` methods; the
HTTP layer counts finished requests by status."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gemma_export.server.engine import Observer

# Seconds. Time to first token spans a lone short prompt (ms) to a queue behind 16 long ones.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class ServerMetrics(Observer):
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self._requests = Counter("gemma_export_requests", "HTTP API requests by route and status",
                                 ["route", "status"], registry=r)
        self._prompt = Counter("gemma_export_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self._generated = Counter("gemma_export_generation_tokens", "Tokens generated", registry=r)
        self._queue = Gauge("gemma_export_queue_depth", "Requests waiting for a slot in the batch", registry=r)
        self._running = Gauge("gemma_export_running_batch_size", "Rows in the running decode batch", registry=r)
        self._ttft = Histogram("gemma_export_time_to_first_token_seconds", "Submit to first token",
                               buckets=TTFT_BUCKETS, registry=r)
        self._itl = Histogram("gemma_export_inter_token_latency_seconds", "Between two tokens of one request",
                              buckets=ITL_BUCKETS, registry=r)

    # engine.Observer
    def queue_depth(self, n: int) -> None:
        self._queue.set(n)

    def running(self, n: int) -> None:
        self._running.set(n)

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def tokens(self, prompt: int = 0, generated: int = 0) -> None:
        if prompt:
            self._prompt.inc(prompt)
        if generated:
            self._generated.inc(generated)

    # HTTP
    def request(self, route: str, status: int) -> None:
        self._requests.labels(route, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
