"""Tests for L{clawproxy.metrics}."""

from __future__ import annotations

import attrs
from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from clawproxy.backends.registry import Registry
from clawproxy.config import parse_config
from clawproxy.metrics import CONTENT_TYPE, Metrics
from clawproxy.policy.breakers import NoBreakers
from clawproxy.web.admin import AdminResource

#: Every metric family of SPEC section 7 (without the C{clawproxy_} prefix):
#: its type and its label names.
SPEC = {
    "requests_total": ("counter", ("route", "method", "status", "agent")),
    "request_duration_seconds": ("histogram", ("route",)),
    "upstream_requests_total": ("counter", ("pool", "instance", "status")),
    "upstream_latency_seconds": ("histogram", ("pool", "instance")),
    "upstream_ttfb_seconds": ("histogram", ("pool", "instance")),
    "active_connections": ("gauge", ("pool", "instance")),
    "backend_up": ("gauge", ("pool", "instance")),
    "backend_weight": ("gauge", ("pool", "instance")),
    "circuit_breaker_state": ("gauge", ("name",)),
    "circuit_breaker_open_total": ("counter", ("name",)),
    "upstream_retries_total": ("counter", ("pool",)),
    "fallback_responses_total": ("counter", ("fallback",)),
    "rate_limited_total": ("counter", ("agent", "limit")),
    "cache_requests_total": ("counter", ("route", "result")),
    "coalesced_requests_total": ("counter", ("route",)),
    "tokens_total": ("counter", ("agent", "model", "kind")),
    "spend_total": ("counter", ("agent", "model")),
    "circuit_breaker_transitions_total": ("counter", ("name", "to")),
    "queue_depth": ("gauge", ("limit",)),
    "queue_wait_seconds": ("histogram", ()),
    "store_errors_total": ("counter", ("op",)),
    "store_latency_seconds": ("histogram", ()),
    "adaptive_factor": ("gauge", ("pool",)),
    "websocket_tunnels": ("gauge", ("route",)),
    "worker_restarts_total": ("counter", ()),
}

#: Families registered beyond SPEC section 7 (same shape as L{SPEC}).
EXTRA = {
    "upstream_errors_total": ("counter", ("pool", "instance", "error")),
    # issue 10: rate() of it is tokens/s per instance
    "instance_tokens_total": ("counter", ("pool", "instance", "kind")),
}

#: C{(name, type)} of every SPEC section 7 family and of the extra ones.
SPEC_FAMILIES = [(name, kind) for name, (kind, _) in {**SPEC, **EXTRA}.items()]


@attrs.define
class Pool:
    name: str


@attrs.define
class Inst:
    pool: Pool
    id: str
    healthy: bool = True
    base_weight: float = 1.0
    active: int = 0


class MetricsTests(SynchronousTestCase):
    """L{Metrics} registers the SPEC section 7 families on a registry of its own."""

    def test_families_registered_at_start(self) -> None:
        """Every family exists, with its type, before anything is recorded."""
        metrics = Metrics()
        families = {f.name: f.type for f in metrics.registry.collect()}
        for name, kind in SPEC_FAMILIES:
            # prometheus_client names a counter family without its _total suffix.
            key = "clawproxy_" + (name[:-6] if kind == "counter" else name)
            self.assertEqual(families.get(key), kind, name)

    def test_render_lists_every_family(self) -> None:
        """The text exposition lists every family, even at zero."""
        text = Metrics().render().decode()
        for name, kind in SPEC_FAMILIES:
            self.assertIn(f"# TYPE clawproxy_{name} {kind}\n", text)
        self.assertTrue(CONTENT_TYPE.startswith("text/plain"))

    def test_spec_labels(self) -> None:
        """Each family takes exactly the labels SPEC section 7 gives it."""
        metrics = Metrics()
        families = {}
        for value in vars(metrics).values():
            if hasattr(value, "collect") and hasattr(value, "labels"):
                families[value.collect()[0].name] = value
        for name, (kind, labels) in {**SPEC, **EXTRA}.items():
            family = families["clawproxy_" + (name[:-6] if kind == "counter" else name)]
            if labels:
                family.labels(**{label: "x" for label in labels})
            sample = name + ("_count" if kind == "histogram" else "")
            self.assertEqual(metrics.registry.get_sample_value(
                "clawproxy_" + sample, {label: "x" for label in labels}), 0.0, name)

    def test_metrics_page_lists_every_family(self) -> None:
        """C{GET /metrics} on the admin listener lists every SPEC family, even at zero."""
        clock = Clock()
        config = parse_config({"pools": {"main": {"instances": [
            {"id": "a", "url": "http://127.0.0.1:1"}]}}, "routes": [{"path": "/*"}]},
            environ={})
        metrics = Metrics()
        admin = AdminResource(Registry(config, clock), metrics, NoBreakers(), clock, None)
        client = StubTreq(admin)
        response = self.successResultOf(client.get("http://127.0.0.1:9901/metrics"))
        self.assertEqual(response.code, 200)
        text = self.successResultOf(response.text())
        for name, kind in SPEC_FAMILIES:
            self.assertIn(f"# TYPE clawproxy_{name} {kind}\n", text)
        self.assertIn("clawproxy_worker_restarts_total 0.0\n", text)

    def test_independent_registries(self) -> None:
        """Two L{Metrics} do not share (or clash over) samples."""
        a, b = Metrics(), Metrics()
        a.upstream_retries_total.labels("main").inc()
        self.assertEqual(a.registry.get_sample_value("clawproxy_upstream_retries_total",
                                                     {"pool": "main"}), 1.0)
        self.assertIsNone(b.registry.get_sample_value("clawproxy_upstream_retries_total",
                                                      {"pool": "main"}))

    def test_given_registry(self) -> None:
        """A registry passed in is the one used."""
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        self.assertIs(metrics.registry, registry)
        metrics.fallback_responses_total.labels("busy").inc(2)
        self.assertEqual(registry.get_sample_value("clawproxy_fallback_responses_total",
                                                   {"fallback": "busy"}), 2.0)

    def test_instance_changed(self) -> None:
        """The registry listener keeps C{backend_up}, C{backend_weight} and C{active} current."""
        metrics = Metrics()
        inst = Inst(Pool("main"), "gpu-1", healthy=True, base_weight=5.0, active=2)
        metrics.instance_changed(inst)

        def sample(name: str) -> float | None:
            return metrics.registry.get_sample_value(
                "clawproxy_" + name, {"pool": "main", "instance": "gpu-1"})

        self.assertEqual((sample("backend_up"), sample("backend_weight"),
                          sample("active_connections")), (1.0, 5.0, 2.0))
        inst.healthy, inst.base_weight, inst.active = False, 0.0, 0
        metrics.instance_changed(inst)
        self.assertEqual((sample("backend_up"), sample("backend_weight"),
                          sample("active_connections")), (0.0, 0.0, 0.0))

    def test_histogram_buckets(self) -> None:
        """Latency histograms have buckets from 5ms up to 2 minutes."""
        metrics = Metrics()
        metrics.request_duration.labels("/v1/*").observe(0.003)
        metrics.request_duration.labels("/v1/*").observe(90)
        get = metrics.registry.get_sample_value
        name = "clawproxy_request_duration_seconds_bucket"
        self.assertEqual(get(name, {"route": "/v1/*", "le": "0.005"}), 1.0)
        self.assertEqual(get(name, {"route": "/v1/*", "le": "60.0"}), 1.0)
        self.assertEqual(get(name, {"route": "/v1/*", "le": "120.0"}), 2.0)
