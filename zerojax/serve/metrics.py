"""`/metrics`: Prometheus text of the engine's load and latency (names as vLLM's, `zerojax:` prefix)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.running = Gauge("zerojax:num_requests_running", "Requests holding a sequence slot", registry=registry)
        self.waiting = Gauge("zerojax:num_requests_waiting", "Requests waiting for admission", registry=registry)
        self.pages_used = Gauge("zerojax:kv_pages_used", "KV cache pages in use", registry=registry)
        self.pages_free = Gauge("zerojax:kv_pages_free", "KV cache pages free or evictable", registry=registry)
        self.preemptions = Gauge("zerojax:num_preemptions", "Sequences preempted so far", registry=registry)
        self.prompt_tokens = Counter("zerojax:prompt_tokens", "Prompt tokens accepted", registry=registry)
        self.generation_tokens = Counter("zerojax:generation_tokens", "Tokens generated", registry=registry)
        self.aborted = Counter("zerojax:requests_aborted", "Requests cancelled by their client", registry=registry)
        self.ttft = Histogram("zerojax:time_to_first_token_seconds", "Time from acceptance to the first token",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram("zerojax:time_per_output_token_seconds",
                              "Mean time between a request's tokens after the first", buckets=LATENCY_BUCKETS,
                              registry=registry)

    def refresh(self, stats: dict) -> None:
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.pages_used.set(stats["pages_used"])
        self.pages_free.set(stats["pages_free"])
        self.preemptions.set(stats["preemptions"])

    def text(self) -> bytes:
        return generate_latest(self.registry)
