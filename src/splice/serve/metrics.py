"""The server's Prometheus metrics, in a registry of its own (one per app, so that several
apps in one process, as in the tests, do not share counters).

    splice_requests_total{endpoint, status}      HTTP requests answered, by endpoint and code
    splice_prompt_tokens_total                   prompt tokens of accepted requests
    splice_generation_tokens_total               tokens generated
    splice_time_to_first_token_seconds           request arrival -> first token (histogram)
    splice_time_per_output_token_seconds         gap between consecutive tokens (histogram)
    splice_requests_running                      sequences in the decode batch (gauge)
    splice_requests_waiting                      requests queued for a batch slot (gauge)
    splice_adapters_loaded                       adapters held in memory (gauge)
    splice_adapter_loads_total / splice_adapter_evictions_total

The gauges are read when ``/metrics`` is scraped (``set_function``), from the engine's
``stats`` and the adapter cache.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "splice_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "splice_prompt_tokens", "prompt tokens of accepted requests", registry=r
        )
        self.generation_tokens = Counter("splice_generation_tokens", "tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "splice_time_to_first_token_seconds",
            "seconds from a request's arrival to its first token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "splice_time_per_output_token_seconds",
            "seconds between consecutive generated tokens of a request",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.running = Gauge("splice_requests_running", "sequences being decoded", registry=r)
        self.waiting = Gauge("splice_requests_waiting", "requests waiting for a slot", registry=r)
        self.adapters_loaded = Gauge(
            "splice_adapters_loaded", "adapters held in memory", registry=r
        )
        self.adapter_loads = Gauge(
            "splice_adapter_loads_total", "adapter loads since start", registry=r
        )
        self.adapter_evictions = Gauge(
            "splice_adapter_evictions_total", "adapters evicted or unloaded", registry=r
        )

    def watch(
        self,
        running: Callable[[], float],
        waiting: Callable[[], float],
        loaded: Callable[[], float],
        loads: Callable[[], float],
        evictions: Callable[[], float],
    ) -> None:
        """Read the gauges from these functions at each scrape."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        self.adapters_loaded.set_function(loaded)
        self.adapter_loads.set_function(loads)
        self.adapter_evictions.set_function(evictions)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
