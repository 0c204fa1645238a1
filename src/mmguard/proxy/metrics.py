"""The proxy's Prometheus metrics (in the moderation server's registry, so ``/metrics`` shows both)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Histogram

__all__ = ["ProxyMetrics"]

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ProxyMetrics:
    """Per-rail checks and blocks, and the time the guard adds (in the server's registry)."""

    def __init__(self, registry: Any) -> None:
        self.checks = Counter("mmguard_proxy_checks", "Guard checks by rail", ["rail"], registry=registry)
        self.blocks = Counter("mmguard_proxy_blocks", "Requests or answers blocked, by rail", ["rail"],
                              registry=registry)
        self.flags = Counter("mmguard_proxy_flags", "Verdicts that flagged, by rail: blocked (--mode block) or "
                             "only reported (--mode score)", ["rail"], registry=registry)
        self.added = Histogram(
            "mmguard_proxy_added_seconds",
            "Time the guard added to a request: input check before forwarding, plus (non-streaming) the output "
            "checks, or (streaming) the wait between the upstream's end and the client's",
            ["stream"], buckets=_BUCKETS, registry=registry)
        self.hold = Histogram(
            "mmguard_proxy_stream_hold_seconds",
            "Per streamed event carrying answer text: time held back before it was released",
            buckets=_BUCKETS, registry=registry)
        self.upstream = Counter("mmguard_proxy_upstream_responses", "Upstream responses by status", ["status"],
                                registry=registry)
        self.upstream_errors = Counter("mmguard_proxy_upstream_errors", "Upstream unreachable, timed out or refused",
                                       ["reason"], registry=registry)
