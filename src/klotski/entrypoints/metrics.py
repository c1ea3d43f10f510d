"""/metrics: the server's figures in Prometheus' text format (prometheus_client).

The engine's figures (queue depth, running sequences, tokens, tok/s, bubble ratio, bytes read per tier)
are read from the scheduler and the store at each scrape; request counts and latencies are recorded
as requests end.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000)


class _EngineCollector:
    """The scheduler's and the store's figures, as of the scrape."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        loading = GaugeMetricFamily("klotski_ready", "1 once the model is loaded and requests are served")
        loading.add_metric([], 1.0 if self.state.ready.is_set() else 0.0)
        yield loading
        scheduler = self.state.scheduler
        if scheduler is None:
            return
        s = scheduler.stats()
        gauges = {
            "klotski_queue_depth": ("sequences waiting to join the running group", s["waiting"]),
            "klotski_running_sequences": ("sequences in the running group", s["running"]),
            "klotski_running_batches": ("batches in the running group", s["batches"]),
            "klotski_tokens_per_second": ("generated tokens per second over the last 10 s", s["tokens_per_s"]),
            "klotski_bubble_ratio": ("share of step time compute waited on a transfer, since start", s["bubble_ratio"]),
        }
        policy = s["policy"] or {}
        gauges["klotski_group_batch_size"] = ("bs of the running (or last) group's plan", policy.get("batch_size", 0))
        gauges["klotski_group_num_batches"] = ("n of the running (or last) group's plan", policy.get("num_batches", 0))
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "klotski_generated_tokens": ("tokens generated", s["generated_tokens"]),
            "klotski_prompt_tokens": ("prompt tokens prefilled", s["prompt_tokens"]),
            "klotski_engine_steps": ("forward steps of the running group", s["steps"]),
            "klotski_engine_step_seconds": ("seconds spent in forward steps", s["step_s"]),
            "klotski_bubble_seconds": ("seconds compute waited on a transfer", s["bubble_s"]),
            "klotski_sequences_finished": ("sequences that reached a stop condition", s["finished"]),
            "klotski_sequences_cancelled": ("sequences cancelled (client gone, shutdown)", s["cancelled"]),
            "klotski_sequences_failed": ("sequences that failed in the engine", s["failed"]),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
        read = CounterMetricFamily("klotski_bytes_read", "weight bytes read, per tier", labels=["tier"])
        for tier, nbytes in sorted(s["store"].get("bytes_read", {}).items()):
            read.add_metric([str(tier)], float(nbytes))
        yield read


class Metrics:
    """One registry per app, so several servers in one process never share figures."""

    def __init__(self, state):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(state))
        self.requests = Counter(
            "klotski_requests",
            "HTTP generation requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "klotski_time_to_first_token_seconds",
            "seconds from arrival to the first token",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "klotski_request_seconds",
            "seconds from arrival to the last token",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def first_token(self, endpoint: str, seconds: float) -> None:
        self.ttft.labels(endpoint).observe(seconds)

    def request_done(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status == 200 and seconds is not None:
            self.latency.labels(endpoint).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
