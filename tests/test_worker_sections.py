"""
The parent's admin sections with C{server.workers > 1}: each is the merge
of its workers' statuses (L{clawproxy.workers.sections}), by the section's
own C{merge} or the default.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from clawproxy.policy.breakers import BreakerBoard
from clawproxy.web.cache import CacheAdmin
from clawproxy.web.models import ModelsSection
from clawproxy.workers.sections import MergedSection, merge_statuses


class Section:
    name = "tokens"

    def status(self) -> dict[str, Any]:
        return {"pools": {}}

    def endpoints(self) -> dict[Any, Any]:
        return {(b"GET", b"/admin/budgets"): "parent's"}


def tokens(rate: float, prompt: int, completion: int) -> dict[str, Any]:
    return {"pools": {"sim": {"tokens_per_second": rate, "prompt_tokens": prompt,
                              "completion_tokens": completion}}}


class DefaultMergeTests(SynchronousTestCase):
    def test_rules(self) -> None:
        """Numbers summed, equal values kept, different ones listed, keys united."""
        self.assertEqual(
            merge_statuses([{"n": 1, "f": 0.1, "s": "x", "t": "a", "only": [1]},
                            {"n": 2, "f": 0.2, "s": "x", "t": "b", "more": {"k": 3}}]),
            {"n": 3, "f": 0.3, "s": "x", "t": ["a", "b"], "only": [1], "more": {"k": 3}})
        self.assertEqual(merge_statuses([True, True]), True)
        self.assertEqual(merge_statuses([True, False]), [True, False])
        self.assertIsNone(merge_statuses([]))

    def test_tokens_section(self) -> None:
        """The tokens section (no merge of its own): every figure summed per pool."""
        reported = [tokens(2.5, 10, 40), tokens(1.25, 5, 20)]
        section = MergedSection(Section(), lambda name: reported if name == "tokens" else [])
        self.assertEqual(section.status(), tokens(3.75, 15, 60))
        self.assertEqual(section.endpoints(), {(b"GET", b"/admin/budgets"): "parent's"})

    def test_no_worker_reported(self) -> None:
        """Before any worker reports, the parent's own status."""
        self.assertEqual(MergedSection(Section(), lambda name: []).status(), {"pools": {}})


class SectionMergeTests(SynchronousTestCase):
    def test_cache(self) -> None:
        """Counts summed, the ratio of the sums, the shared store's size not doubled."""
        base = {"backend": "memory", "max_entries": 100, "max_bytes": 1000,
                "semantic_hit": 0, "stale": 0, "bypass": 0, "coalesced": 0, "in_flight": 0}
        merged = CacheAdmin.merge([
            {**base, "entries": 3, "bytes": 300, "hit": 1, "miss": 3, "hit_ratio": 0.25},
            {**base, "entries": 4, "bytes": 400, "hit": 3, "miss": 1, "hit_ratio": 0.75}])
        self.assertEqual(merged, {**base, "entries": 4, "bytes": 400, "hit": 4, "miss": 4,
                                  "hit_ratio": 0.5})

    def test_breakers(self) -> None:
        """A breaker is in its worst state among the workers; counts summed."""
        def b(state: str, failures: int, at: float | None, retry: int | None) -> Any:
            return {"p": {"name": "p", "state": state, "failure_count": failures,
                          "success_count": 0, "last_failure_time": at,
                          "last_transition": None if at is None else {"to": state, "at": at},
                          "transitions": 1 if at else 0, "probes_in_flight": 0,
                          "retry_after": retry}}

        merged = BreakerBoard.merge([b("CLOSED", 1, None, None), b("OPEN", 3, 50.0, 20),
                                     b("CLOSED", 2, 10.0, None)])
        self.assertEqual(merged["p"]["state"], "OPEN")
        self.assertEqual(merged["p"]["failure_count"], 6)
        self.assertEqual(merged["p"]["transitions"], 2)
        self.assertEqual(merged["p"]["last_transition"], {"to": "OPEN", "at": 50.0})
        self.assertEqual(merged["p"]["last_failure_time"], 50.0)
        self.assertEqual(merged["p"]["retry_after"], 20)

    def test_models_ttfb_averaged(self) -> None:
        """Time to first byte is averaged over the workers that measured it."""
        def m(ttfb: dict[str, float], found: list[str]) -> Any:
            return {"pools": {"p": {"declared": ["m"], "discovered": found, "ttfb_ms": ttfb}},
                    "aliases": {"x": "m"}, "fallbacks": {}}

        merged = ModelsSection.merge([m({"a": 10.0, "b": 30.0}, ["m2"]),
                                      m({"a": 20.0}, ["m1", "m2"])])
        self.assertEqual(merged["pools"]["p"]["ttfb_ms"], {"a": 15.0, "b": 30.0})
        self.assertEqual(merged["pools"]["p"]["declared"], ["m"])
        self.assertEqual(merged["pools"]["p"]["discovered"], ["m1", "m2"])
        self.assertEqual(merged["aliases"], {"x": "m"})


class LimitsMergeTests(SynchronousTestCase):
    def test_limits(self) -> None:
        """Requests and refusals summed; the least remaining, the longest reset."""
        from clawproxy.web.limits import LimitsSection

        def s(requests: int, remaining: int, reset: int, healthy: bool) -> Any:
            return {"store": {"backend": "memory", "healthy": healthy, "latency_ms": 0.2,
                              "errors": 1},
                    "on_error": "fail_open",
                    "agents": {"a": {"requests": requests, "refused": 1, "limits": {
                        "agent": {"limit": "20/hour", "algorithm": "token_bucket",
                                  "remaining": remaining, "reset": reset}}}}}

        merged = LimitsSection.merge([s(10, 5, 30, True), s(12, 3, 20, False)])
        self.assertEqual(merged["store"], {"backend": "memory", "healthy": False,
                                           "latency_ms": 0.2, "errors": 2})
        self.assertEqual(merged["agents"]["a"], {"requests": 22, "refused": 2, "limits": {
            "agent": {"limit": "20/hour", "algorithm": "token_bucket", "remaining": 3,
                      "reset": 30}}})
        self.assertEqual(merged["on_error"], "fail_open")


class MergedBreakersTests(SynchronousTestCase):
    def test_state_and_describe(self) -> None:
        """The workers' merged view where it names the breaker; else the parent's board."""
        from clawproxy.workers.sections import MergedBreakers

        class Board:
            name = "circuit_breakers"
            merge = staticmethod(BreakerBoard.merge)

            def state(self, name: str) -> str:
                return "CLOSED"

            def describe(self, name: str) -> Any:
                return {"name": name, "state": "CLOSED"} if name == "p" else None

            def status(self) -> Any:
                return {}

            def endpoints(self) -> Any:
                return {}

        reported: list[Any] = []
        view = MergedBreakers(Board(), MergedSection(Board(), lambda name: reported))
        self.assertEqual((view.state("p"), view.describe("p")["state"]), ("CLOSED", "CLOSED"))
        reported.append({"p": {"name": "p", "state": "OPEN"}})
        reported.append({"p": {"name": "p", "state": "CLOSED"}})
        self.assertEqual(view.state("p"), "OPEN")
        self.assertEqual(view.describe("p")["state"], "OPEN")
        self.assertEqual(view.state("q"), "CLOSED")
        self.assertIsNone(view.describe("q"))
