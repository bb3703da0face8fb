"""Prometheus metrics of a server: what the engine did, counted from its thread."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from cake.engine import Engine
from cake.request import Observer, Request

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics(Observer):
    """The engine's Observer, one registry per server (tests start several)."""

    def __init__(self, engine: Engine) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "cake_requests", "Finished requests, by endpoint and finish reason",
            ["endpoint", "finish"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "cake_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.cached_tokens = Counter(
            "cake_cached_prompt_tokens",
            "Prompt tokens found in a parked sequence's cache (not fed again)",
            registry=r,
        )
        self.generated = Counter(
            "cake_generation_tokens", "Tokens generated", registry=r
        )
        self.queue = Gauge(
            "cake_queue_depth", "Requests waiting for a sequence", registry=r
        )
        self.queue.set_function(lambda: engine.waiting)
        self.running = Gauge(
            "cake_running_sequences", "Sequences being generated", registry=r
        )
        self.running.set_function(lambda: engine.running)
        self.batch = Histogram(
            "cake_decode_batch_size", "Sequences per decode step", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )  # fmt: skip
        self.step_s = Histogram(
            "cake_step_seconds", "Seconds per forward call, by kind", ["kind"],
            registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )  # fmt: skip
        self.ttft = Histogram(
            "cake_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first token",
            registry=r, buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )  # fmt: skip
        self._endpoint: dict[int, str] = {}

    def tag(self, req: Request, endpoint: str) -> None:
        self._endpoint[id(req)] = endpoint

    def step(self, kind: str, batch: int, tokens: int, seconds: float) -> None:
        if kind == "decode":
            self.batch.observe(batch)
        self.step_s.labels(kind).observe(seconds)

    def first_token(self, req: Request) -> None:
        self.ttft.observe(req.stats.first_token_s)

    def finished(self, req: Request) -> None:
        st = req.stats
        endpoint = self._endpoint.pop(id(req), "api")
        self.requests.labels(endpoint, st.stop_reason).inc()
        self.prompt_tokens.inc(st.prompt_tokens)
        self.cached_tokens.inc(st.cached_tokens)
        self.generated.inc(st.decode_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
