"""Prometheus metrics: request and token counters, latency histograms, engine gauges."""

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

    def render(self, engine: EngineClient) -> bytes:
        stats = engine.stats()
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_used.set(stats.kv_blocks_used)
        self.kv_total.set(stats.kv_blocks_total)
        return generate_latest(self.registry)
