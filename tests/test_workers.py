"""The parent's merge of its workers' metrics (L{clawproxy.workers.supervisor.merge_metrics})."""

from __future__ import annotations

from prometheus_client.exposition import generate_latest
from twisted.trial.unittest import SynchronousTestCase

from clawproxy.metrics import Metrics
from clawproxy.workers.supervisor import _Families, merge_metrics


def text(m: Metrics) -> str:
    return m.render().decode()


class MergeMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.parent, self.one, self.two = Metrics(), Metrics(), Metrics()

    def merged(self) -> str:
        families = merge_metrics(text(self.parent), [text(self.one), text(self.two)])
        return generate_latest(_Families(families)).decode()

    def value(self, page: str, line_start: str) -> float:
        (line,) = [ln for ln in page.splitlines() if ln.startswith(line_start + " ")]
        return float(line.rsplit(" ", 1)[1])

    def test_counters_and_histograms_sum(self) -> None:
        """Counters and histogram buckets of the workers add up, label by label."""
        self.one.requests_total.labels("chat", "POST", "200", "a").inc(3)
        self.two.requests_total.labels("chat", "POST", "200", "a").inc(4)
        self.two.requests_total.labels("chat", "POST", "429", "a").inc()
        self.one.request_duration.labels("chat").observe(0.2)
        self.two.request_duration.labels("chat").observe(0.3)
        page = self.merged()
        labels = 'agent="a",method="POST",route="chat"'
        self.assertEqual(self.value(page, f'clawproxy_requests_total{{{labels},status="200"}}'),
                         7)
        self.assertEqual(self.value(page, f'clawproxy_requests_total{{{labels},status="429"}}'),
                         1)
        self.assertEqual(self.value(page, 'clawproxy_request_duration_seconds_count{route="chat"}'),
                         2)
        self.assertNotIn("_created", page)

    def test_parent_only_families(self) -> None:
        """Health and weight gauges and restarts come from the parent alone."""
        for m in (self.parent, self.one, self.two):
            m.backend_up.labels("sim", "sim-1").set(1)
        self.parent.worker_restarts_total.inc(2)
        page = self.merged()
        self.assertEqual(self.value(page, 'clawproxy_backend_up{instance="sim-1",pool="sim"}'), 1)
        self.assertEqual(self.value(page, "clawproxy_worker_restarts_total"), 2)

    def test_states_by_maximum(self) -> None:
        """A breaker open in any worker shows open."""
        self.one.circuit_breaker_state.labels("sim").set(0)
        self.two.circuit_breaker_state.labels("sim").set(1)
        page = self.merged()
        self.assertEqual(self.value(page, 'clawproxy_circuit_breaker_state{name="sim"}'), 1)

    def test_factors_by_minimum(self) -> None:
        """A pool throttled in any process shows its tightest factor (not a sum)."""
        self.parent.adaptive_factor.labels("sim").set(1.0)
        self.one.adaptive_factor.labels("sim").set(1.0)
        self.two.adaptive_factor.labels("sim").set(0.6)
        page = self.merged()
        self.assertEqual(self.value(page, 'clawproxy_adaptive_factor{pool="sim"}'), 0.6)
