"""Prometheus metrics, one registry per app (so several apps can live in one process, e.g. in tests)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mmguard_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "mmguard_request_latency_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "mmguard_batch_size", "Conversations per model batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_latency = Histogram(
            "mmguard_batch_latency_seconds", "Model time per batch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "mmguard_queue_wait_seconds",
            "Time a conversation waited for its batch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("mmguard_queue_depth", "Conversations waiting for a batch", registry=r)
        self.in_flight = Gauge(
            "mmguard_in_flight_conversations", "Conversations inside the model", registry=r
        )
        self.verdicts = Counter("mmguard_verdicts", "Verdicts by label", ["verdict"], registry=r)
        self.verdict_categories = Counter(
            "mmguard_verdict_categories", "Unsafe verdicts by category code written", ["category"], registry=r
        )
        self.items = Counter(
            "mmguard_conversations", "Conversations judged, by input kind", ["kind"], registry=r
        )
        self.rejected = Counter(
            "mmguard_rejected", "Requests refused before the model, by reason", ["reason"], registry=r
        )
        self.model_errors = Counter(
            "mmguard_model_errors", "Model errors (each conversation once)", registry=r
        )
        self.fail_closed = Counter(
            "mmguard_fail_closed", "Conversations answered unsafe because of a model error", registry=r
        )

    def watch_image_encodings(self, engine: Any) -> None:
        """Export a FastEngine's image-encoding counters (how often a kept encoding was reused)."""
        if hasattr(engine, "images_encoded"):
            self.registry.register(_ImageEncodingCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ImageEncodingCollector(Collector):
    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield CounterMetricFamily("mmguard_image_encodings", "Images run through the vision encoder",
                                  value=self.engine.images_encoded)
        yield CounterMetricFamily("mmguard_image_encoding_reuses",
                                  "Images whose encoding was kept from an earlier batch",
                                  value=self.engine.image_cache_hits)
        yield GaugeMetricFamily("mmguard_image_encodings_kept", "Image encodings kept for later batches",
                                value=self.engine.cached_images)
