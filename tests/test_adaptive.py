"""
Tests for adaptive throttling (SPEC C{rate_limits.adaptive}):
L{clawproxy.policy.adaptive} on a fake clock, and L{clawproxy.web.adaptive}
as the client sees it through a data plane over a fake backend.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from clawproxy.config import ConfigError, parse_config
from clawproxy.policy.adaptive import (
    ENTER_AFTER,
    LEAVE_AFTER,
    NORMAL,
    TIGHT,
    LatencyWindow,
    Signal,
    Throttle,
)
from clawproxy.policy.limits import Limit, decide, tightened
from clawproxy.units import Rate
from clawproxy.web.adaptive import Adaptive, AdaptiveShed
from tests.test_gateway import Harness
from tests.test_ratelimits import KEYS, codes, config, send


class LatencyWindowTests(SynchronousTestCase):
    """The sliding-window p95."""

    def test_too_few(self) -> None:
        """Fewer than C{min_samples} latencies in the window make no figure."""
        w = LatencyWindow(size=64, window=60.0, min_samples=20)
        for _ in range(19):
            w.add(0.0, 1.0)
        self.assertIsNone(w.p95(0.0))
        w.add(0.0, 1.0)
        self.assertEqual(w.p95(0.0), 1.0)

    def test_nearest_rank(self) -> None:
        """The p95 of 1..100 is 95; of 1..20, 19."""
        w = LatencyWindow(size=128, min_samples=1)
        for i in range(100, 0, -1):
            w.add(1.0, float(i))
        self.assertEqual(w.p95(1.0), 95.0)
        w = LatencyWindow(size=128, min_samples=1)
        for i in range(1, 21):
            w.add(1.0, float(i))
        self.assertEqual(w.p95(1.0), 19.0)

    def test_slides_in_time(self) -> None:
        """Latencies older than the window no longer count."""
        w = LatencyWindow(size=64, window=60.0, min_samples=5)
        for _ in range(10):
            w.add(0.0, 5.0)
        for _ in range(10):
            w.add(30.0, 0.1)
        self.assertEqual(w.p95(59.0), 5.0)
        self.assertEqual(w.p95(60.5), 0.1)
        self.assertIsNone(w.p95(91.0))

    def test_ring_keeps_the_last(self) -> None:
        """Only the last C{size} latencies are kept, however recent the others."""
        w = LatencyWindow(size=20, min_samples=20)
        for _ in range(20):
            w.add(0.0, 9.0)
        for _ in range(20):
            w.add(0.0, 0.5)
        self.assertEqual(w.p95(0.0), 0.5)


def slow(value: float | None) -> list[Signal]:
    return [Signal("latency_p95", value, 2.0)]


class ThrottleTests(SynchronousTestCase):
    """The hysteresis state machine, evaluated once a second on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = Throttle(0.5, self.clock.seconds())

    def run_for(self, seconds: float, value: float | None) -> list[bool]:
        changes = []
        for _ in range(int(seconds)):
            changes.append(self.throttle.evaluate(self.clock.seconds(), slow(value)))
            self.clock.advance(1)
        return changes

    def test_enter_after_consecutive(self) -> None:
        """Above the threshold for ENTER_AFTER seconds in a row: tight, factor applied."""
        self.assertEqual(self.throttle.factor, 1.0)
        self.run_for(ENTER_AFTER, 3.0)
        self.assertEqual(self.throttle.state, NORMAL)
        self.assertTrue(self.throttle.evaluate(self.clock.seconds(), slow(3.0)))
        self.assertEqual((self.throttle.state, self.throttle.factor), (TIGHT, 0.5))
        self.assertEqual(self.throttle.reason, ("latency_p95",))
        self.assertEqual(self.throttle.since, ENTER_AFTER)
        self.assertEqual(self.throttle.transitions, 1)

    def test_blip_does_not_enter(self) -> None:
        """A reading back under the threshold restarts the count."""
        self.run_for(ENTER_AFTER, 3.0)
        self.run_for(1, 1.95)  # under the threshold (within the hysteresis band)
        self.assertEqual(self.run_for(ENTER_AFTER, 3.0), [False] * int(ENTER_AFTER))
        self.assertEqual(self.throttle.state, NORMAL)

    def test_stays_in_band(self) -> None:
        """Once tight, a reading between 90% and 100% of the threshold keeps it tight."""
        self.run_for(ENTER_AFTER + 1, 3.0)
        self.assertEqual(self.throttle.state, TIGHT)
        self.assertEqual(self.run_for(100, 1.9), [False] * 100)
        self.assertEqual(self.throttle.state, TIGHT)

    def test_leave_after_recovery(self) -> None:
        """Below 90% of the threshold for LEAVE_AFTER seconds: normal again."""
        self.run_for(ENTER_AFTER + 1, 3.0)
        changes = self.run_for(LEAVE_AFTER, 1.7)
        self.assertEqual(changes, [False] * int(LEAVE_AFTER))
        self.assertEqual(self.throttle.state, TIGHT)
        self.assertTrue(self.throttle.evaluate(self.clock.seconds(), slow(1.7)))
        self.assertEqual((self.throttle.state, self.throttle.factor), (NORMAL, 1.0))
        self.assertEqual(self.throttle.transitions, 2)

    def test_relapse_restarts_leave(self) -> None:
        """A reading in the band (or above) while recovering restarts the count."""
        self.run_for(ENTER_AFTER + 1, 3.0)
        self.run_for(LEAVE_AFTER - 1, 1.0)
        self.run_for(1, 1.85)
        self.run_for(LEAVE_AFTER, 1.0)
        self.assertEqual(self.throttle.state, TIGHT)
        self.run_for(1, 1.0)
        self.assertEqual(self.throttle.state, NORMAL)

    def test_no_figure_counts_as_recovered(self) -> None:
        """No reading (too few samples, no health body) neither enters nor keeps it tight."""
        self.run_for(10, None)
        self.assertEqual(self.throttle.state, NORMAL)
        self.run_for(ENTER_AFTER + 1, 3.0)
        self.run_for(LEAVE_AFTER + 1, None)
        self.assertEqual(self.throttle.state, NORMAL)

    def test_any_signal_enters_all_must_recover(self) -> None:
        """One signal above enters; leaving needs every signal recovered."""
        t = Throttle(0.5, 0.0, enter_after=0.0, leave_after=0.0)
        self.assertTrue(t.evaluate(0, [Signal("latency_p95", 0.1, 2.0),
                                       Signal("gpu_memory", 90.0, 85.0)]))
        self.assertEqual(t.reason, ("gpu_memory",))
        self.assertFalse(t.evaluate(1, [Signal("latency_p95", 0.1, 2.0),
                                        Signal("gpu_memory", 80.0, 85.0)]))
        self.assertTrue(t.evaluate(2, [Signal("latency_p95", 0.1, 2.0),
                                       Signal("gpu_memory", 70.0, 85.0)]))


class TightenedTests(SynchronousTestCase):
    """L{tightened}: a limit's rate and burst times the factor, same key."""

    def test_token_bucket(self) -> None:
        limit = Limit.of("agent", "k", Rate(100, 60), burst=20)
        t = tightened(limit, 0.5)
        self.assertEqual((t.key, t.count, t.period, t.capacity), ("k", 50.0, 60.0, 10.0))
        self.assertIs(tightened(limit, 1.0), limit)

    def test_windows(self) -> None:
        limit = Limit.of("route", "k", Rate(10, 1), "fixed_window")
        t = tightened(limit, 0.6)
        self.assertEqual((t.count, t.capacity), (6.0, 6.0))
        self.assertEqual(decide(t, None, 0.5).limit, 6)

    def test_below_one(self) -> None:
        """Under one request per period: one per longer period (a session interval)."""
        session = Limit("session", "s", "token_bucket", 1.0, 1.2, 1.0)
        t = tightened(session, 0.5)
        self.assertEqual((t.count, t.period, t.capacity), (1.0, 2.4, 1.0))
        self.assertTrue(decide(t, None, 0.0).allowed)


class ConfigTests(SynchronousTestCase):
    """C{rate_limits.adaptive} is built (no longer refused) and checked."""

    def test_needs_a_threshold(self) -> None:
        with self.assertRaises(ConfigError) as e:
            parse_config(config({"adaptive": {"factor": 0.5}}), environ={})
        self.assertIn("rate_limits.adaptive.latency_p95_above", str(e.exception))

    def test_bad_factor(self) -> None:
        with self.assertRaises(ConfigError) as e:
            parse_config(config({"adaptive": {"gpu_memory_above": 80, "factor": 1.5}}),
                         environ={})
        self.assertIn("rate_limits.adaptive.factor", str(e.exception))

    def test_not_configured_costs_nothing(self) -> None:
        """Without C{adaptive}: no section, no shed stage, no latency watcher."""
        gw = Harness(self, config({"default": "3/minute"}))
        parts = gw.plane.parts
        self.assertFalse([p for p in parts.admin_sections if isinstance(p, Adaptive)])
        self.assertFalse([p for p in parts.wrappers if isinstance(p, AdaptiveShed)])
        self.assertEqual(gw.registry.pools["main"].latency_watchers, ())


def slow_requests(gw: Harness, n: int, seconds: float, agent: str = "alpha",
                  body: Any = None) -> None:
    """C{n} requests the backend answers C{seconds} after they reach it."""
    gw.backend.hang = {"a", "b"}
    pending = [gw.start("POST" if body is not None else "GET", "/v1/x", body,
                        headers={"X-API-Key": KEYS[agent]}) for _ in range(n)]
    gw.backend.hang = set()
    gw.clock.advance(seconds)
    for request in gw.backend.hanging:
        request.write(b"{}")
        request.finish()
    gw.backend.hanging.clear()
    for d in pending:
        gw.testcase.assertEqual(gw.finish(d).code, 200)


def fast_requests(gw: Harness, n: int, agent: str = "alpha") -> None:
    for _ in range(n):
        gw.testcase.assertEqual(send(gw, agent).code, 200)


class LatencyThrottlingTests(SynchronousTestCase):
    """A pool whose p95 latency rises has its limits tightened, then relaxed."""

    def harness(self, limits: dict[str, Any], **pool: Any) -> Harness:
        rl = {"adaptive": {"latency_p95_above": "1s", "factor": 0.5}, **limits}
        return Harness(self, config(rl, {"alpha": {"rate_limit": "1000/minute"}}, **pool))

    def limit_of(self, gw: Harness, agent: str = "alpha") -> str | None:
        return send(gw, agent).header("X-RateLimit-Limit")

    def test_tighten_and_relax(self) -> None:
        """
        20 attempts of 2 s (p95 2 s > 1 s): after ENTER_AFTER seconds the
        agent limits of requests to the pool are halved (X-RateLimit-Limit,
        fewer requests per period, 429 with the tightened limit), the gauge
        and the admin status show it; once the slow attempts left the window
        and LEAVE_AFTER seconds passed, the limits are whole again.
        """
        gw = self.harness({"default": "4/minute"})
        self.assertEqual(self.limit_of(gw), "1000")
        slow_requests(gw, 20, 2.0)
        self.assertEqual(self.limit_of(gw), "1000")  # above, for 0 s so far
        gw.clock.advance(ENTER_AFTER)
        self.assertEqual(self.limit_of(gw), "500")
        self.assertEqual(gw.sample("adaptive_factor", pool="main"), 0.5)
        # gamma's default 4/minute is 2/minute now.
        answers = [send(gw, "gamma") for _ in range(3)]
        self.assertEqual([a.code for a in answers], [200, 200, 429])
        self.assertEqual(answers[2].header("X-RateLimit-Limit"), "2")
        self.assertEqual(answers[2].json()["error"]["code"], "rate_limit_exceeded")
        (section,) = [p for p in gw.plane.parts.admin_sections if p.name == "adaptive"]
        main = section.status()["pools"]["main"]
        self.assertEqual((main["state"], main["factor"], main["reason"]),
                         ("tight", 0.5, ["latency_p95"]))
        self.assertEqual(main["latency_p95"], 2.0)
        # Recovery: the slow attempts leave the 60 s window, fast ones come.
        gw.clock.advance(61)
        fast_requests(gw, 20)
        self.assertEqual(self.limit_of(gw), "500")  # recovered for 0 s so far
        gw.clock.advance(LEAVE_AFTER - 1)
        self.assertEqual(self.limit_of(gw), "500")
        gw.clock.advance(1)
        self.assertEqual(self.limit_of(gw), "1000")
        self.assertEqual(gw.sample("adaptive_factor", pool="main"), 1.0)
        gw.clock.advance(60)
        self.assertEqual(codes(gw, 5, "beta"), [200] * 4 + [429])

    def test_pool_max_qps_by_model(self) -> None:
        """A pool chosen by model: its C{max_qps} is tightened."""
        cfg = config({"adaptive": {"latency_p95_above": "1s", "factor": 0.5}},
                     routes=[{"path": "/v1/*"}], max_qps=100, models=["*"])
        gw = Harness(self, cfg)
        body = {"model": "m"}
        self.assertEqual(send(gw, "alpha", body=body).header("X-RateLimit-Limit"), "100")
        slow_requests(gw, 20, 2.0, body=body)
        send(gw, "alpha", body=body)
        gw.clock.advance(ENTER_AFTER)
        answers = [send(gw, "alpha", body=body) for _ in range(51)]
        self.assertEqual([a.code for a in answers], [200] * 50 + [429])
        self.assertEqual(answers[-1].header("X-RateLimit-Limit"), "50")

    def test_global_not_tightened(self) -> None:
        """
        C{rate_limits.global} guards the gateway: left whole. A request only
        it looks at is one no tightened limit looks at: shed in a share.
        """
        gw = self.harness({"global": "10000/minute"})
        slow_requests(gw, 20, 2.0)
        send(gw, "beta")
        gw.clock.advance(ENTER_AFTER)
        self.assertEqual(send(gw, "alpha").header("X-RateLimit-Limit"), "500")  # its own
        gamma = [send(gw, "gamma") for _ in range(2)]  # only the global limit applies
        self.assertEqual([a.code for a in gamma], [503, 200])
        self.assertEqual(gamma[1].header("X-RateLimit-Limit"), "10000")

    def test_shed_without_limits(self) -> None:
        """
        A tight pool with no limit for a request: half of such requests are
        answered 503 with Retry-After (evenly: every other one), counted in
        the status.
        """
        gw = Harness(self, config({"adaptive": {"latency_p95_above": "1s", "factor": 0.5}}))
        slow_requests(gw, 20, 2.0)
        self.assertEqual(send(gw, "alpha").code, 200)
        gw.clock.advance(ENTER_AFTER)
        answers = [send(gw, "alpha") for _ in range(6)]
        self.assertEqual([a.code for a in answers], [503, 200] * 3)
        self.assertEqual(answers[0].header("Retry-After"), "1")
        self.assertEqual(answers[0].json()["error"]["code"], "adaptive_throttle")
        (section,) = [p for p in gw.plane.parts.admin_sections if p.name == "adaptive"]
        self.assertEqual(section.status()["pools"]["main"]["shed"], 3)


    def test_shed_to_fallback(self) -> None:
        """A shed request of a route with a static fallback gets the fallback's answer."""
        cfg = config({"adaptive": {"latency_p95_above": "1s", "factor": 0.5}},
                     routes=[{"path": "/v1/*", "pool": "main", "fallback": "busy"}])
        cfg["fallbacks"] = {"busy": {"status": 200, "body": {"busy": True}}}
        gw = Harness(self, cfg)
        slow_requests(gw, 20, 2.0)
        send(gw, "alpha")
        gw.clock.advance(ENTER_AFTER)
        seen = len(gw.backend.seen)
        answers = [send(gw, "alpha") for _ in range(4)]
        self.assertEqual([a.header("X-Clawproxy-Fallback") for a in answers],
                         ["busy", None, "busy", None])
        self.assertEqual(answers[0].json(), {"busy": True})
        self.assertEqual(len(gw.backend.seen), seen + 2)
        self.assertEqual(gw.sample("fallback_responses_total", fallback="busy"), 2.0)
        self.assertEqual(gw.log_lines()[-4]["error"], "adaptive_shed")


    def test_shed_to_fallback_model(self) -> None:
        """A shed request for a model with a fallback chain goes to the next model."""
        cfg = {
            "pools": {
                "big": {"instances": [{"id": "a", "url": "http://a.test:8000"}],
                        "models": ["big"], "health_check": {"enabled": False}},
                "small": {"instances": [{"id": "b", "url": "http://b.test:8000"}],
                          "models": ["small"], "health_check": {"enabled": False}},
            },
            "routes": [{"path": "/v1/*"}],
            "models": {"fallbacks": {"big": ["small"]}},
            "rate_limits": {"adaptive": {"gpu_memory_above": 85, "factor": 0.5}},
        }
        gw = Harness(self, cfg)
        gw.registry.probe_result(gw.registry.instance("a"), True,
                                 {"gpu_memory_used_percent": 97})
        body = {"model": "big"}
        self.assertEqual(gw.request("POST", "/v1/x", body).code, 200)
        gw.clock.advance(ENTER_AFTER)
        answers = [gw.request("POST", "/v1/x", body) for _ in range(4)]
        self.assertEqual([a.code for a in answers], [200] * 4)
        self.assertEqual([a.header("X-Clawproxy-Fallback-Model") for a in answers],
                         ["small", None, "small", None])
        self.assertEqual(gw.backend.instances()[-4:], ["b", "a", "b", "a"])


class GpuMemoryTests(SynchronousTestCase):
    """GPU memory from the instances' last health bodies."""

    def test_gpu_tightens(self) -> None:
        """The highest figure of the healthy instances above the threshold tightens."""
        rl = {"default": "10/minute", "adaptive": {"gpu_memory_above": 85, "factor": 0.6}}
        gw = Harness(self, config(rl))
        a, b = gw.registry.instance("a"), gw.registry.instance("b")
        gw.registry.probe_result(a, True, {"gpu_memory_used_percent": 40})
        gw.registry.probe_result(b, True, {"gpu_memory_used_percent": 93.5})
        self.assertEqual(send(gw, "alpha").header("X-RateLimit-Limit"), "10")
        gw.clock.advance(ENTER_AFTER)
        self.assertEqual(send(gw, "alpha").header("X-RateLimit-Limit"), "6")
        (section,) = [p for p in gw.plane.parts.admin_sections if p.name == "adaptive"]
        self.assertEqual(section.status()["pools"]["main"]["gpu_memory"], 93.5)
        # b recovers (under 90% of 85 = 76.5) for LEAVE_AFTER seconds.
        gw.registry.probe_result(b, True, {"gpu_memory_used_percent": 70})
        gw.clock.advance(1)
        send(gw, "beta")
        gw.clock.advance(LEAVE_AFTER)
        self.assertEqual(send(gw, "beta").header("X-RateLimit-Limit"), "10")

    def test_status_table(self) -> None:
        """C{clawproxy status} prints the section."""
        from clawproxy.cli import format_status
        from tests.test_admin import AdminHarness

        rl = {"default": "10/minute", "adaptive": {"gpu_memory_above": 85}}
        gw = Harness(self, config(rl))
        gw.registry.probe_result(gw.registry.instance("a"), True,
                                 {"gpu_memory_used_percent": 99})
        send(gw, "alpha")
        gw.clock.advance(ENTER_AFTER)
        send(gw, "alpha")
        admin = AdminHarness(self, sections=gw.plane.parts.admin_sections)
        status = admin.request("GET", "/admin/status").json()
        self.assertEqual(status["adaptive"]["pools"]["main"]["state"], "tight")
        table = format_status(status)
        self.assertRegex(table, r"main\s+tight\s+0\.6\s+gpu_memory")
