"""Tests for L{clawproxy.metrics}."""

from __future__ import annotations

import attrs
from prometheus_client import CollectorRegistry
from twisted.trial.unittest import SynchronousTestCase

from clawproxy.metrics import CONTENT_TYPE, Metrics
from tests.test_admin import SPEC_FAMILIES


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
