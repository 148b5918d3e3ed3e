"""Prometheus metrics: request and token counters, latency histograms, engine gauges."""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from moerun.server.engine_client import EngineClient

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """One registry per app, so several servers (tests) never share counters."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "moerun_requests", "Finished requests", ["endpoint", "finish_reason"], registry=r
        )
        self.prompt_tokens = Counter("moerun_prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = Counter("moerun_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram(
            "moerun_time_to_first_token_seconds",
            "Time to first token",
            buckets=_LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            "moerun_inter_token_latency_seconds",
            "Time between output deltas",
            buckets=_LATENCY,
            registry=r,
        )
        self.running = Gauge("moerun_requests_running", "Requests running", registry=r)
        self.waiting = Gauge("moerun_requests_waiting", "Requests waiting", registry=r)
        self.kv_used = Gauge("moerun_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_total = Gauge("moerun_kv_blocks_total", "KV cache blocks", registry=r)
        self.prefix_queries = Gauge(
            "moerun_prefix_cache_queries_tokens",
            "Prompt tokens looked up in the prefix cache",
            registry=r,
        )
        self.prefix_hits = Gauge(
            "moerun_prefix_cache_hits_tokens",
            "Prompt tokens served from the prefix cache",
            registry=r,
        )
        self.cached_blocks = Gauge("moerun_prefix_cache_blocks",
                                   "KV blocks the prefix cache can find", registry=r)  # fmt: skip

    def render(self, engine: EngineClient) -> bytes:
        stats = engine.stats()
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_used.set(stats.kv_blocks_used)
        self.kv_total.set(stats.kv_blocks_total)
        self.prefix_queries.set(stats.prefix_queried_tokens)  # totals kept by the engine
        self.prefix_hits.set(stats.prefix_hit_tokens)
        self.cached_blocks.set(stats.cached_blocks)
        return generate_latest(self.registry)

    def count_finished(self, endpoint: str, generated: int, finish_reason: str | None) -> None:
        """One request of `endpoint` is over; without a finish reason it was aborted."""
        self.generation_tokens.inc(generated)
        self.requests.labels(endpoint, finish_reason or "abort").inc()


class DeltaClock:
    """Times the output deltas of one response: the first one's wait is the time to first
    token, each later one's the inter-token latency."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics, self._last, self._first = metrics, time.monotonic(), True

    def tick(self) -> None:
        now = time.monotonic()
        (self._metrics.ttft if self._first else self._metrics.itl).observe(now - self._last)
        self._last, self._first = now, False
