"""Prometheus metric families of SPEC section 7, all registered at start."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as _Counter
from prometheus_client import Gauge as _Gauge
from prometheus_client import Histogram as _Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _FastLabels:
    """
    C{labels()} that hands back an existing child straight from the family's
    own dict of children.

    prometheus_client validates the values, C{str()}s each one and takes a
    lock on every call, which is only needed to create a child; the data
    plane asks for the same few children on every request. Values that are
    not already strings, keyword labels and new label sets go the usual
    way. Reading the family's dict (rather than keeping a cache of our own)
    keeps C{remove()} and C{clear()} exact.
    """

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Any:
        if not labelkwargs:
            children = self.__dict__.get("_metrics")
            if children is not None:
                child = children.get(labelvalues)
                if child is not None:
                    return child
        return super().labels(*labelvalues, **labelkwargs)  # type: ignore[misc]


class Counter(_FastLabels, _Counter):
    pass


class Gauge(_FastLabels, _Gauge):
    pass


class Histogram(_FastLabels, _Histogram):
    pass


_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)

#: A shared store answers in well under a millisecond on a LAN.
_STORE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)


class Metrics:
    """
    Every clawproxy metric family, on a registry of its own.

    @ivar registry: the L{CollectorRegistry} served on C{/metrics}.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        p = "clawproxy_"
        self.requests_total = Counter(
            p + "requests_total", "Requests answered", ["route", "method", "status", "agent"],
            registry=r,
        )
        self.request_duration = Histogram(
            p + "request_duration_seconds", "Time to answer a request", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.upstream_requests_total = Counter(
            p + "upstream_requests_total", "Upstream attempts by outcome",
            ["pool", "instance", "status"], registry=r,
        )
        self.upstream_latency = Histogram(
            p + "upstream_latency_seconds", "Upstream attempt duration",
            ["pool", "instance"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.upstream_ttfb = Histogram(
            p + "upstream_ttfb_seconds", "Time to upstream response headers",
            ["pool", "instance"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.active_connections = Gauge(
            p + "active_connections", "In-flight upstream requests", ["pool", "instance"],
            registry=r,
        )
        self.backend_up = Gauge(
            p + "backend_up", "1 if the instance is healthy", ["pool", "instance"], registry=r,
        )
        self.backend_weight = Gauge(
            p + "backend_weight", "Current instance weight", ["pool", "instance"], registry=r,
        )
        self.circuit_breaker_state = Gauge(
            p + "circuit_breaker_state", "0 closed, 1 open, 2 half-open", ["name"], registry=r,
        )
        self.circuit_breaker_open_total = Counter(
            p + "circuit_breaker_open_total", "Times a breaker opened", ["name"], registry=r,
        )
        self.upstream_retries_total = Counter(
            p + "upstream_retries_total", "Upstream retries", ["pool"], registry=r,
        )
        self.fallback_responses_total = Counter(
            p + "fallback_responses_total", "Fallback responses served", ["fallback"], registry=r,
        )
        self.rate_limited_total = Counter(
            p + "rate_limited_total", "Requests refused by a limit", ["agent", "limit"],
            registry=r,
        )
        self.cache_requests_total = Counter(
            p + "cache_requests_total", "Cache lookups", ["route", "result"], registry=r,
        )
        self.coalesced_requests_total = Counter(
            p + "coalesced_requests_total", "Requests coalesced onto one upstream call",
            ["route"], registry=r,
        )
        self.tokens_total = Counter(
            p + "tokens_total", "Tokens used", ["agent", "model", "kind"], registry=r,
        )
        self.open_connections = Gauge(
            p + "open_connections", "TCP connections open now (client side, upstream side)",
            ["side"], registry=r,
        )
        self.spend_total = Counter(
            p + "spend_total", "Spend in the currency of models.prices", ["agent", "model"],
            registry=r,
        )
        self.circuit_breaker_transitions_total = Counter(
            p + "circuit_breaker_transitions_total", "Breaker state changes, by new state",
            ["name", "to"], registry=r,
        )
        self.queue_depth = Gauge(
            p + "queue_depth", "Requests waiting in a limit's queue", ["limit"], registry=r,
        )
        self.queue_wait = Histogram(
            p + "queue_wait_seconds", "Time requests waited in a queue",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.store_errors_total = Counter(
            p + "store_errors_total", "State store calls that failed", ["op"], registry=r,
        )
        self.store_latency = Histogram(
            p + "store_latency_seconds", "Time the shared state store took to answer",
            buckets=_STORE_BUCKETS, registry=r,
        )
        self.adaptive_factor = Gauge(
            p + "adaptive_factor", "Factor applied to rate limits by adaptive limiting",
            ["pool"], registry=r,
        )
        self.websocket_tunnels = Gauge(
            p + "websocket_tunnels", "WebSocket tunnels open now", ["route"], registry=r,
        )
        self.worker_restarts_total = Counter(
            p + "worker_restarts_total", "Worker processes restarted", registry=r,
        )
        self.upstream_errors_total = Counter(
            p + "upstream_errors_total", "Upstream attempts that failed, by kind: before"
            " an answer (refused, connect_failure, timeout, 5xx...) or after its head was"
            " relayed (truncated, stall_timeout)", ["pool", "instance", "error"], registry=r,
        )
        self.instance_tokens_total = Counter(
            p + "instance_tokens_total", "Tokens of the answers each instance produced (kind:"
            " prompt | completion; rate() gives tokens/s per instance)",
            ["pool", "instance", "kind"], registry=r,
        )

    def watch_connections(self, client: Any, upstream: Any) -> None:
        """
        Serve C{clawproxy_open_connections{side}} from two callables giving
        the client-side and upstream connections open now.
        """
        self.open_connections.labels("client").set_function(client)
        self.open_connections.labels("upstream").set_function(upstream)

    def instance_changed(self, inst) -> None:
        """Registry listener: keep C{backend_up} and C{backend_weight} current."""
        self.backend_up.labels(inst.pool.name, inst.id).set(1 if inst.healthy else 0)
        self.backend_weight.labels(inst.pool.name, inst.id).set(inst.base_weight)
        self.active_connections.labels(inst.pool.name, inst.id).set(inst.active)

    def render(self) -> bytes:
        return generate_latest(self.registry)
