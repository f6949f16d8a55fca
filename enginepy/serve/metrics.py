"""Prometheus metrics of one server (prometheus-client), in a registry of its own.

Gauges describe the engine as the loop thread last saw it (set after every step and every command drained);
counters and histograms are updated where things happen. Every object here is thread-safe (prometheus-client
locks internally), so the engine thread and the event loop both write to them.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

# Buckets in seconds. Time to first audio spans a GPU's ~0.1 s (delay pattern + codec lookahead at ~1 ms/step)
# to a loaded CPU's minutes; a step spans ~0.3 ms (H100, CUDA graphs) to ~1 s (CPU, large batch).
TTFA_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

# How a request ended: finished (audio sent), aborted (its client went away), failed (engine or request error:
# 500), rejected (queue full: 503), invalid (bad body: 400/413).
OUTCOMES = ("finished", "aborted", "failed", "rejected", "invalid")


class ServerMetrics:
    """The metrics of one server; `render()` gives the Prometheus text exposition."""

    def __init__(self, has_kv_blocks: bool):
        """has_kv_blocks: the engine has a paged KV pool (fast backend); without one, no free-blocks gauge."""
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends
        self.running = Gauge("enginepy_requests_running", "Requests decoding in the engine", registry=r)
        self.waiting = Gauge("enginepy_requests_waiting", "Requests queued for a free slot", registry=r)
        self.in_flight = Gauge("enginepy_requests_in_flight",
                               "Requests the server tracks (waiting, running, or being decoded/sent)", registry=r)
        self.free_slots = Gauge("enginepy_free_slots", "Engine slots free for a request", registry=r)
        self.stream_rows = Gauge("enginepy_stream_rows", "Rows open in the streaming audio decoder", registry=r)
        self.free_blocks = (Gauge("enginepy_kv_free_blocks", "Free self-attention KV-cache blocks", registry=r)
                            if has_kv_blocks else None)
        self.steps = Counter("enginepy_engine_steps", "Engine decode steps run", registry=r)
        self.audio_seconds = Counter("enginepy_audio_seconds", "Seconds of audio generated (completed frames)",
                                     registry=r)
        self.engine_failures = Counter("enginepy_engine_failures",
                                       "Engine steps that raised (their requests failed with 500)", registry=r)
        self.requests = Counter("enginepy_requests", "Requests by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # every series exists from the start, at 0
        self.ttfa = Histogram("enginepy_time_to_first_audio_seconds",
                              "Arrival to the first audio bytes sent (non-streamed: the whole body)", ["stream"],
                              buckets=TTFA_BUCKETS, registry=r)
        self.latency = Histogram("enginepy_request_latency_seconds", "Arrival to the last audio bytes sent",
                                 ["stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.step_time = Histogram("enginepy_step_seconds", "Wall time of one engine step (admission included)",
                                   buckets=STEP_BUCKETS, registry=r)

    def outcome(self, name: str) -> None:
        self.requests.labels(name).inc()

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def parse_samples(text: str) -> dict[str, float]:
    """Prometheus text (what /metrics serves) -> {'name{label="value",...}': value} (labels sorted; plain 'name'
    without labels), for clients and tests that read single values."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out
