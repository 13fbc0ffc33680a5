"""Latency histograms for /metrics, with prometheus_client: time to first token, time per output token after the
first, and end-to-end request time, each per choice, measured from the request's arrival (reading its body
included) on the monotonic clock. Buckets follow vLLM's (`vllm:time_to_first_token_seconds` and its siblings), so
dashboards built for it read these the same way."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
TPOT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class Latency:
    """One registry per server (several servers may live in one process, as in the tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram(
            "qwen2vl_time_to_first_token_seconds",
            "Time from arrival to the first token",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "qwen2vl_time_per_output_token_seconds",
            "Mean time per output token after the first",
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "qwen2vl_e2e_request_latency_seconds",
            "Time from arrival to the last token",
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )

    def observe(self, started: float, first: float | None, tokens: int, ended: float | None = None) -> None:
        """One finished choice: arrival time, its first token's time (None if it produced none), token count."""
        import time

        ended = time.monotonic() if ended is None else ended
        self.e2e.observe(ended - started)
        if first is not None:
            self.ttft.observe(first - started)
            if tokens > 1:
                self.tpot.observe((ended - first) / (tokens - 1))

    def text(self) -> str:
        return generate_latest(self.registry).decode()
