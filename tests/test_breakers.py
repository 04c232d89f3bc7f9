"""The circuit breaker state machine and the breaker board, on a fake clock."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from clawproxy.backends.registry import Registry
from clawproxy.config import parse_config
from clawproxy.interfaces import CANCELLED, OK, IAdminSection, IBreakerBoard
from clawproxy.metrics import Metrics
from clawproxy.policy.breakers import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    Breaker,
    BreakerBoard,
    NoBreakers,
)


@attrs.frozen
class Cfg:
    failure_threshold: int = 3
    failure_window: float = 10.0
    success_threshold: int = 2
    success_window: float = 5.0
    open_timeout: float = 30.0
    half_open_requests: int = 1
    jitter: float = 0.0


class Seq:
    """A random source returning the given values in turn."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def __call__(self) -> float:
        return self.values.pop(0)


def breaker(clock: Clock, consecutive: bool = False, random: Any = None,
            **cfg: Any) -> tuple[Breaker, list[tuple[str, str]]]:
    moves: list[tuple[str, str]] = []
    b = Breaker("p/i", Cfg(**cfg), clock, random or (lambda: 0.0),
                lambda _b, old, to: moves.append((old, to)), consecutive)
    return b, moves


def fail(b: Breaker, n: int, outcome: str = "5xx") -> None:
    for _ in range(n):
        assert b.admit()
        b.record(outcome)


class TransitionTests(SynchronousTestCase):
    """Every transition of one breaker."""

    def test_opens_after_threshold_within_window(self) -> None:
        """CLOSED -> OPEN on the failure_threshold-th failure within failure_window."""
        clock = Clock()
        b, moves = breaker(clock)
        fail(b, 2)
        self.assertEqual(b.state, CLOSED)
        self.assertEqual(b.failure_count, 2)
        clock.advance(9.9)
        fail(b, 1)
        self.assertEqual(b.state, OPEN)
        self.assertEqual(moves, [(CLOSED, OPEN)])
        self.assertFalse(b.allows())
        self.assertFalse(b.admit())
        self.assertEqual(b.last_transition, (OPEN, 9.9))
        self.assertEqual(b.last_failure_time, 9.9)

    def test_old_failures_leave_the_window(self) -> None:
        """Failures older than failure_window do not count."""
        clock = Clock()
        b, _ = breaker(clock)
        fail(b, 2)
        clock.advance(10.5)
        fail(b, 2)
        self.assertEqual(b.state, CLOSED)
        self.assertEqual(b.failure_count, 2)
        fail(b, 1)
        self.assertEqual(b.state, OPEN)

    def test_every_failure_kind_counts_but_answers_below_500_do_not(self) -> None:
        """Connect errors, refusals, resets, 5xx and timeouts count; OK (4xx, 429) does not."""
        for kind in ("connect_failure", "refused", "error", "5xx", "timeout",
                     "first_token_timeout"):
            b, _ = breaker(Clock(), failure_threshold=1)
            fail(b, 1, kind)
            self.assertEqual(b.state, OPEN, kind)
        b, _ = breaker(Clock(), failure_threshold=1)
        for _ in range(10):
            b.admit()
            b.record(OK)
            b.admit()
            b.record(CANCELLED)
        self.assertEqual(b.state, CLOSED)
        self.assertEqual(b.failure_count, 0)

    def test_instance_success_does_not_reset(self) -> None:
        """An instance's failures count within the window whatever succeeds in between."""
        b, _ = breaker(Clock())
        for _ in range(3):
            fail(b, 1)
            b.admit()
            b.record(OK)
        self.assertEqual(b.state, OPEN)

    def test_pool_success_resets(self) -> None:
        """The pool's breaker (consecutive) forgets its failures on a success."""
        b, _ = breaker(Clock(), consecutive=True)
        for _ in range(5):
            fail(b, 2)
            b.admit()
            b.record(OK)
        self.assertEqual(b.state, CLOSED)
        fail(b, 3)
        self.assertEqual(b.state, OPEN)

    def test_half_open_after_open_timeout(self) -> None:
        """OPEN -> HALF_OPEN once open_timeout has passed, dated when it was due."""
        clock = Clock()
        b, moves = breaker(clock)
        fail(b, 3)
        clock.advance(29.9)
        self.assertEqual(b.state, OPEN)
        self.assertAlmostEqual(b.retry_after(), 0.1)
        clock.advance(5)
        self.assertEqual(b.state, HALF_OPEN)
        self.assertIsNone(b.retry_after())
        self.assertEqual(moves, [(CLOSED, OPEN), (OPEN, HALF_OPEN)])
        self.assertEqual(b.last_transition, (HALF_OPEN, 30.0))

    def test_half_open_closes_after_successes_within_window(self) -> None:
        """HALF_OPEN -> CLOSED after success_threshold probe successes within success_window."""
        clock = Clock()
        b, moves = breaker(clock)
        fail(b, 3)
        clock.advance(30)
        self.assertTrue(b.admit())
        b.record(OK)
        self.assertEqual(b.state, HALF_OPEN)
        self.assertEqual(b.success_count, 1)
        clock.advance(6)  # past success_window: the first success no longer counts
        self.assertTrue(b.admit())
        b.record(OK)
        self.assertEqual(b.state, HALF_OPEN)
        clock.advance(1)
        self.assertTrue(b.admit())
        b.record(OK)
        self.assertEqual(b.state, CLOSED)
        self.assertEqual(moves[-1], (HALF_OPEN, CLOSED))
        self.assertEqual(b.failure_count, 0)  # starts afresh

    def test_half_open_reopens_on_failure(self) -> None:
        """HALF_OPEN -> OPEN on a probe's failure, for a new open period."""
        clock = Clock()
        b, moves = breaker(clock)
        fail(b, 3)
        clock.advance(30)
        self.assertTrue(b.admit())
        b.record("timeout")
        self.assertEqual(b.state, OPEN)
        self.assertEqual(b.opened_until, 60.0)
        self.assertEqual(moves, [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN)])

    def test_open_ignores_late_outcomes(self) -> None:
        """Outcomes of requests admitted before the breaker opened change nothing."""
        clock = Clock()
        b, moves = breaker(clock)
        for _ in range(5):
            b.admit()
        for _ in range(3):
            b.record("5xx")
        b.record(OK)
        b.record("5xx")
        self.assertEqual(b.state, OPEN)
        clock.advance(30)
        b.record(OK)  # a late answer is not a probe's
        self.assertEqual(b.state, HALF_OPEN)
        self.assertEqual(b.success_count, 0)
        self.assertEqual(len(moves), 2)


class JitterTests(SynchronousTestCase):
    """The open period is open_timeout plus up to jitter times it."""

    def test_bounds(self) -> None:
        """random() in [0, 1) gives open periods in [open_timeout, open_timeout * (1 + jitter))."""
        for r, expected in ((0.0, 30.0), (0.5, 34.5), (0.999999, 30 * (1 + 0.3 * 0.999999))):
            clock = Clock()
            b, _ = breaker(clock, random=Seq(r), jitter=0.3)
            fail(b, 3)
            self.assertAlmostEqual(b.opened_until, expected)
            clock.advance(expected - 0.001)
            self.assertEqual(b.state, OPEN)
            clock.advance(0.001)
            self.assertEqual(b.state, HALF_OPEN)

    def test_seeded_sources_spread(self) -> None:
        """Breakers on one seeded source open for different times, all within bounds."""
        import random

        source = random.Random(7).random
        untils = set()
        for _ in range(50):
            b, _ = breaker(Clock(), random=source, jitter=0.1)
            fail(b, 3)
            self.assertTrue(30.0 <= b.opened_until < 33.0)
            untils.add(b.opened_until)
        self.assertGreater(len(untils), 40)

    def test_each_open_period_draws_again(self) -> None:
        """A reopening draws a new jitter."""
        clock = Clock()
        b, _ = breaker(clock, random=Seq(0.0, 1.0 - 1e-9), jitter=0.5)
        fail(b, 3)
        self.assertEqual(b.opened_until, 30.0)
        clock.advance(30)
        b.admit()
        b.record("5xx")
        self.assertAlmostEqual(b.opened_until, 30 + 45.0)


class ProbeTests(SynchronousTestCase):
    """Half-open admits a bounded number of probes."""

    def half_open(self, probes: int, **cfg: Any) -> tuple[Clock, Breaker]:
        clock = Clock()
        b, _ = breaker(clock, half_open_requests=probes, **cfg)
        fail(b, 3)
        clock.advance(30)
        return clock, b

    def test_admits_exactly_its_probe_count_under_concurrency(self) -> None:
        """100 requests asking at once while half-open: exactly half_open_requests pass."""
        for probes in (1, 3):
            _, b = self.half_open(probes)
            answers = [b.admit() for _ in range(100)]
            self.assertEqual(answers.count(True), probes)
            self.assertEqual(answers[:probes], [True] * probes)
            self.assertFalse(b.allows())
            self.assertEqual(b.probes_out, probes)

    def test_allows_takes_nothing(self) -> None:
        """Asking whether a request could pass takes no slot."""
        _, b = self.half_open(1)
        for _ in range(10):
            self.assertTrue(b.allows())
        self.assertTrue(b.admit())
        self.assertFalse(b.allows())

    def test_cancelled_frees_its_slot(self) -> None:
        """A CANCELLED probe gives its slot back and counts neither way."""
        _, b = self.half_open(1)
        self.assertTrue(b.admit())
        self.assertFalse(b.admit())
        b.record(CANCELLED)
        self.assertEqual(b.state, HALF_OPEN)
        self.assertEqual(b.success_count, 0)
        self.assertTrue(b.admit())

    def test_outcome_frees_slot_for_the_next_probe(self) -> None:
        """A probe's success frees its slot: the next probe may go."""
        _, b = self.half_open(1, success_threshold=3)
        for _ in range(2):
            self.assertTrue(b.admit())
            self.assertFalse(b.admit())
            b.record(OK)
        self.assertEqual(b.state, HALF_OPEN)
        self.assertTrue(b.admit())
        b.record(OK)
        self.assertEqual(b.state, CLOSED)
        self.assertEqual([b.admit() for _ in range(5)], [True] * 5)

    def test_reconfigure_keeps_state(self) -> None:
        """New settings (a reload) keep the state and the counts."""
        clock = Clock()
        b, _ = breaker(clock)
        fail(b, 2)
        b.configure(Cfg(failure_threshold=4))
        self.assertEqual(b.failure_count, 2)
        fail(b, 1)
        self.assertEqual(b.state, CLOSED)
        fail(b, 1)
        self.assertEqual(b.state, OPEN)


def config(**cb: Any) -> Any:
    breaker_cfg: Any = {"failure_threshold": 2, "open_timeout": "10s", "jitter": 0, **cb}
    return parse_config({
        "pools": {
            "main": {"instances": [{"id": "a", "url": "http://a.test"},
                                   {"id": "b", "url": "http://b.test"}],
                     "circuit_breaker": breaker_cfg},
            "plain": {"instances": [{"id": "c", "url": "http://c.test"}],
                      "circuit_breaker": {"enabled": False}},
        },
        "routes": [{"path": "/*", "pool": "main"}],
    }, environ={})


class BoardTests(SynchronousTestCase):
    """The board as the registry's availability policy."""

    def build(self, previous: Any = None, **cb: Any) -> tuple[Clock, BreakerBoard, Registry]:
        clock = Clock()
        self.metrics = Metrics()
        cfg = config(**cb)
        board = BreakerBoard.from_config(cfg, clock, self.metrics, previous=previous)
        assert isinstance(board, BreakerBoard)
        return clock, board, Registry(cfg, clock, breakers=board)

    def sample(self, family: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value("clawproxy_" + family, labels)

    def test_interfaces(self) -> None:
        """The board is an IBreakerBoard and an admin section."""
        _, board, _ = self.build()
        self.assertTrue(verifyObject(IBreakerBoard, board))
        self.assertTrue(verifyObject(IAdminSection, board))
        self.assertTrue(verifyObject(IBreakerBoard, NoBreakers()))

    def test_no_section_default_breakers(self) -> None:
        """
        Without a circuit_breaker section a pool has breakers with the SPEC's
        defaults; the board is NoBreakers only when every pool turns them off.
        """
        cfg = parse_config({"pools": {"p": {"instances": [{"id": "i", "url": "http://h:1"}]}},
                            "routes": [{"path": "/*", "pool": "p"}]}, environ={})
        board = BreakerBoard.from_config(cfg, Clock())
        assert isinstance(board, BreakerBoard)
        self.assertEqual(sorted(board.breakers), ["p", "p/i"])
        b = board.breakers["p/i"]
        self.assertEqual((b.failure_threshold, b.failure_window, b.success_threshold,
                          b.success_window, b.open_timeout), (5, 60.0, 3, 30.0, 30.0))
        cfg = config(enabled=False)
        self.assertIsInstance(BreakerBoard.from_config(cfg, Clock()), NoBreakers)

    def test_names(self) -> None:
        """A breaker per configured pool and per instance of it, none for other pools."""
        _, board, _ = self.build()
        self.assertEqual(sorted(board.breakers), ["main", "main/a", "main/b"])
        self.assertIsNone(board.describe("plain"))
        self.assertEqual(board.state("plain/c"), CLOSED)

    def test_open_instance_is_out(self) -> None:
        """An instance whose breaker opened is out of the availability decision."""
        clock, board, reg = self.build()
        pool = reg.pools["main"]
        a = pool.by_id["a"]
        pool.record(a, "5xx")
        pool.record(pool.by_id["b"], OK)  # the pool as a whole still works
        pool.record(a, "5xx")
        self.assertEqual(board.state("main/a"), OPEN)
        self.assertEqual(board.state("main"), CLOSED)
        self.assertEqual([i.id for i in pool.candidates()], ["b"])
        self.assertEqual({pool.take().id for _ in range(4)}, {"b"})
        self.assertIsNone(board.retry_after("main"))
        self.assertEqual(self.sample("circuit_breaker_state", name="main/a"), 1)
        self.assertEqual(self.sample("circuit_breaker_transitions_total", name="main/a",
                                     to="OPEN"), 1)
        self.assertEqual(self.sample("circuit_breaker_open_total", name="main/a"), 1)
        clock.advance(10)
        self.assertEqual(self.sample("circuit_breaker_state", name="main/a"), 2)
        self.assertEqual(self.sample("circuit_breaker_transitions_total", name="main/a",
                                     to="HALF_OPEN"), 1)

    def test_open_pool_excludes_everything(self) -> None:
        """An open pool breaker leaves no candidate and says when to retry."""
        clock, board, reg = self.build(failure_threshold=3)
        pool = reg.pools["main"]
        for inst in ("a", "b", "a"):
            pool.record(pool.by_id[inst], "connect_failure", reached=False)
        self.assertEqual(board.state("main"), OPEN)
        self.assertEqual(pool.candidates(), [])
        self.assertIsNone(pool.take())
        self.assertEqual(board.retry_after("main"), 10.0)
        clock.advance(4)
        self.assertEqual(board.retry_after("main"), 6.0)

    def test_half_open_pool_admits_its_probes(self) -> None:
        """A half-open pool lets half_open_requests attempts through, in any instance."""
        clock, board, reg = self.build(failure_threshold=1, half_open_requests=2)
        pool = reg.pools["main"]
        pool.record(pool.by_id["a"], "5xx")
        clock.advance(10)
        got = [pool.take() for _ in range(5)]
        self.assertEqual(sum(1 for g in got if g is not None), 2)
        self.assertEqual(board.retry_after("main"), 1.0)  # half-open, slots taken
        taken = [g for g in got if g is not None]
        pool.record(taken[0], CANCELLED)
        self.assertIsNotNone(pool.take())

    def test_every_instance_open(self) -> None:
        """When every instance's breaker is open, retry_after is the soonest half-open."""
        clock, board, reg = self.build(failure_threshold=1)
        pool = reg.pools["main"]
        pool.record(pool.by_id["a"], "5xx")
        pool.record(pool.by_id["b"], OK)
        clock.advance(3)
        pool.record(pool.by_id["b"], "5xx")
        self.assertEqual(board.state("main"), OPEN)  # and the pool's too (threshold 1)
        board.breakers["main"].close()
        self.assertEqual(board.retry_after("main"), 7.0)  # a opens 7s more, b 10s
        clock.advance(7)
        self.assertIsNone(board.retry_after("main"))  # a half-open: a probe may go
        self.assertEqual(pool.take().id, "a")
        self.assertEqual(board.retry_after("main"), 1.0)  # a's slot taken, b open 3s more
        self.assertIsNone(pool.take())

    def test_describe_and_status(self) -> None:
        """describe() answers the SPEC fields plus the last transition."""
        clock, board, reg = self.build()
        pool = reg.pools["main"]
        clock.advance(100)
        pool.record(pool.by_id["a"], "5xx")
        info = board.describe("main/a")
        self.assertEqual(info["name"], "main/a")
        self.assertEqual(info["state"], CLOSED)
        self.assertEqual(info["failure_count"], 1)
        self.assertEqual(info["success_count"], 0)
        self.assertEqual(info["last_failure_time"], 100.0)
        self.assertIsNone(info["last_transition"])
        pool.record(pool.by_id["a"], "5xx")
        info = board.describe("main/a")
        self.assertEqual(info["last_transition"], {"to": OPEN, "at": 100.0})
        self.assertEqual(info["retry_after"], 10)
        self.assertEqual(set(board.status()), {"main", "main/a", "main/b"})

    def test_reload_keeps_state_of_breakers_that_stay(self) -> None:
        """A new board built over the old one keeps the breakers that keep their name."""
        clock, board, reg = self.build(failure_threshold=1)
        pool = reg.pools["main"]
        pool.record(pool.by_id["a"], "5xx")
        new = BreakerBoard.from_config(config(failure_threshold=3), clock, self.metrics,
                                       previous=board)
        self.assertEqual(new.state("main/a"), OPEN)
        self.assertIs(new.breakers["main/a"], board.breakers["main/a"])
        self.assertEqual(new.breakers["main/a"].failure_threshold, 3)
        self.assertEqual(self.sample("circuit_breaker_state", name="main/a"), 1)
        cfg = parse_config({"pools": {"main": {
            "instances": [{"id": "a", "url": "http://a.test"}],
            "circuit_breaker": {"failure_threshold": 3}}},
            "routes": [{"path": "/*", "pool": "main"}]}, environ={})
        newer = BreakerBoard.from_config(cfg, clock, self.metrics, previous=new)
        self.assertEqual(sorted(newer.breakers), ["main", "main/a"])
        self.assertIsNone(self.sample("circuit_breaker_state", name="main/b"))
        self.assertEqual(self.sample("circuit_breaker_state", name="main/a"), 1)


def gateway_config(fallback: bool = True, **cb: Any) -> dict[str, Any]:
    from tests.test_gateway import two_instance_pool

    breaker_cfg = {"failure_threshold": 3, "success_threshold": 2, "open_timeout": "10s",
                   "jitter": 0, **cb}
    # passive.fail_timeout bounds how often one client's failures count
    # (ClientBound): tiny here, so one test client can open a breaker.
    pool = two_instance_pool(circuit_breaker=breaker_cfg,
                             passive={"max_fails": 0, "fail_timeout": "1ms"})
    if fallback:
        pool["fallback"] = "busy"
    return {"pools": {"main": pool}, "routes": [{"path": "/v1/*", "pool": "main"}],
            "fallbacks": {"busy": {"status": 200, "body": '{"busy": true}'}}}


class GatewayTests(SynchronousTestCase):
    """Breakers seen from a client of the data plane (fake backend, fake clock)."""

    def harness(self, **kw: Any) -> Any:
        from tests.test_gateway import Harness

        return Harness(self, gateway_config(**kw))

    def fail_all(self, h: Any, n: int) -> list[int]:
        h.backend.status.update(a=500, b=502)
        codes = []
        for _ in range(n):
            codes.append(h.request("POST", "/v1/chat", {"x": 1}).code)
            h.clock.advance(0.01)
        return codes

    def test_open_pool_serves_fallback_at_once(self) -> None:
        """Once the pool breaker opens, its fallback answers without asking a backend."""
        h = self.harness()
        self.assertEqual(self.fail_all(h, 3), [500, 502, 500])
        self.assertEqual(h.registry.breakers.state("main"), OPEN)
        asked = len(h.backend.seen)
        answer = h.request("POST", "/v1/chat", {"x": 1})
        self.assertEqual((answer.code, answer.json()), (200, {"busy": True}))
        self.assertEqual(answer.header("X-Clawproxy-Fallback"), "busy")
        self.assertEqual(len(h.backend.seen), asked)
        self.assertEqual(h.sample("fallback_responses_total", fallback="busy"), 1)
        self.assertEqual(h.log_lines()[-1]["error"], "circuit_open")

    def test_open_pool_without_fallback_is_503_with_retry_after(self) -> None:
        """No fallback: 503 circuit_open, Retry-After the time until half-open."""
        h = self.harness(fallback=False)
        self.fail_all(h, 3)
        h.clock.advance(3.5)
        answer = h.request("POST", "/v1/chat", {"x": 1})
        self.assertEqual(answer.code, 503)
        self.assertEqual(answer.json()["error"]["code"], "circuit_open")
        self.assertEqual(answer.json()["error"]["type"], "upstream_error")
        self.assertEqual(answer.header("Retry-After"), "7")  # 10 - 0.02 - 3.5, rounded up

    def test_recovery_closes_the_breaker(self) -> None:
        """After open_timeout, probes go through; success_threshold successes close it."""
        h = self.harness()
        self.fail_all(h, 3)
        h.backend.status.clear()
        h.clock.advance(10)
        self.assertEqual(h.registry.breakers.state("main"), HALF_OPEN)
        self.assertEqual(h.request("POST", "/v1/chat", {"x": 1}).code, 200)
        self.assertEqual(h.registry.breakers.state("main"), HALF_OPEN)
        answer = h.request("POST", "/v1/chat", {"x": 1})
        self.assertIsNone(answer.header("X-Clawproxy-Fallback"))
        self.assertEqual(h.registry.breakers.state("main"), CLOSED)
        get = h.metrics.registry.get_sample_value
        self.assertEqual(get("clawproxy_circuit_breaker_state", {"name": "main"}), 0)
        self.assertEqual(get("clawproxy_circuit_breaker_transitions_total",
                             {"name": "main", "to": "CLOSED"}), 1)

    def test_half_open_probe_failure_reopens(self) -> None:
        """A failing probe opens the pool again: the next request gets the fallback."""
        h = self.harness()
        self.fail_all(h, 3)
        h.clock.advance(10)
        self.assertIn(h.request("POST", "/v1/chat", {"x": 1}).code, (500, 502))
        self.assertEqual(h.registry.breakers.state("main"), OPEN)
        self.assertEqual(h.request("POST", "/v1/chat", {"x": 1}).json(), {"busy": True})

    def test_half_open_admits_one_probe_while_it_runs(self) -> None:
        """While the single probe is in flight, other requests get the fallback at once."""
        h = self.harness()
        self.fail_all(h, 3)
        h.backend.status.clear()
        h.backend.hang.update({"a", "b"})
        h.clock.advance(10)
        probe = h.start("POST", "/v1/chat", {"x": 1})
        self.assertNoResult(probe)
        asked = len(h.backend.seen)
        for _ in range(5):
            self.assertEqual(h.request("POST", "/v1/chat", {"x": 1}).json(), {"busy": True})
        self.assertEqual(len(h.backend.seen), asked)
        h.clock.advance(30)  # the probe times out: 504, counted, the breaker reopens
        self.assertEqual(h.finish(probe).code, 504)
        self.assertEqual(h.registry.breakers.state("main"), OPEN)

    def test_4xx_and_429_do_not_count(self) -> None:
        """Client errors are answers: they never open a breaker."""
        h = self.harness()
        h.backend.status.update(a=400, b=429)
        for _ in range(10):
            h.request("POST", "/v1/chat", {"x": 1})
            h.clock.advance(0.01)
        self.assertEqual(h.registry.breakers.state("main"), CLOSED)
        self.assertEqual(h.registry.breakers.state("main/a"), CLOSED)

    def test_open_instance_gets_no_traffic(self) -> None:
        """An instance whose breaker opened is skipped while the pool keeps serving."""
        h = self.harness()
        h.backend.status["a"] = 500
        for _ in range(8):
            h.request("POST", "/v1/chat", {"x": 1})
            h.clock.advance(0.01)
        self.assertEqual(h.registry.breakers.state("main/a"), OPEN)
        self.assertEqual(h.registry.breakers.state("main"), CLOSED)
        before = len(h.backend.seen)
        for _ in range(4):
            self.assertEqual(h.request("POST", "/v1/chat", {"x": 1}).code, 200)
        self.assertEqual(h.backend.instances()[before:], ["b"] * 4)

    def test_refusals_of_a_rolling_restart_open_no_breaker(self) -> None:
        """
        With the default breakers (no circuit_breaker section), instance a
        refuses connections for ten seconds (restarting), then b does: every
        request is answered 200. The refusals (layer 4: the instance is out
        for L4_RETRY_INTERVAL and the request retried elsewhere) count for
        no breaker, so a is taken again as soon as it is back, while b
        restarts, instead of being kept out by a breaker its restart opened.
        """
        from clawproxy.backends.registry import L4_RETRY_INTERVAL
        from tests.test_gateway import Harness, RefusingAgent, basic

        h = Harness(self, basic(retry={"base_delay": 0}), wrap_agent=RefusingAgent)
        codes = []
        for down in (b"a.test:8000", b"b.test:8000"):
            h.agent.refuse = {down}
            for _ in range(10):
                for _ in range(3):
                    codes.append(h.request("POST", "/v1/chat", {"x": 1}).code)
                h.clock.advance(L4_RETRY_INTERVAL)
        self.assertEqual(codes, [200] * 60)
        self.assertEqual(h.sample("upstream_requests_total", pool="main", instance="a",
                                  status="refused"), 10)
        for name in ("main", "main/a", "main/b"):
            self.assertEqual(h.registry.breakers.state(name), CLOSED)
            self.assertEqual(h.metrics.registry.get_sample_value(
                "clawproxy_circuit_breaker_open_total", {"name": name}), 0)

    def test_connect_failures_still_count(self) -> None:
        """A connection that fails otherwise (unreachable, timed out) counts as before."""
        from twisted.internet.error import ConnectError

        from clawproxy.backends.registry import L4_RETRY_INTERVAL
        from tests.test_gateway import Harness, basic

        class Unreachable:
            def __init__(self, agent: Any) -> None:
                self.agent = agent

            def request(self, method: bytes, uri: bytes, *a: Any) -> Any:
                from twisted.internet.defer import fail

                if uri.split(b"/")[2] == b"a.test:8000":
                    return fail(ConnectError("no route to host"))
                return self.agent.request(method, uri, *a)

        h = Harness(self, basic(retry={"base_delay": 0}), wrap_agent=Unreachable)
        for _ in range(5):
            self.assertEqual(h.request("POST", "/v1/chat", {"x": 1}).code, 200)
            h.clock.advance(L4_RETRY_INTERVAL)
        self.assertEqual(h.registry.breakers.state("main/a"), OPEN)


class AdminTests(SynchronousTestCase):
    """Breakers through the admin API."""

    def test_endpoint_status_and_cli(self) -> None:
        """/health/circuit-breaker/NAME, /admin/status and `clawproxy status` show the state."""
        from treq.testing import StubTreq

        from clawproxy.cli import format_status
        from clawproxy.web.admin import AdminResource
        from tests.test_gateway import Harness

        h = Harness(self, gateway_config())
        GatewayTests().fail_all(h, 3)
        admin = AdminResource(h.registry, h.metrics, h.registry.breakers, h.clock, None,
                              sections=h.plane.parts.admin_sections)
        client = StubTreq(admin)

        def get(path: str) -> Any:
            d = client.get("http://127.0.0.1:9901" + path)
            client.flush()
            response = self.successResultOf(d)
            return response.code, self.successResultOf(response.json())

        code, info = get("/health/circuit-breaker/main")
        self.assertEqual(code, 200)
        self.assertEqual(info["state"], OPEN)
        self.assertEqual(info["last_transition"]["to"], OPEN)
        self.assertEqual(info["retry_after"], 10)
        code, info = get("/health/circuit-breaker/main/a")
        self.assertEqual((code, info["name"], info["state"]), (200, "main/a", CLOSED))
        self.assertEqual(info["failure_count"], 2)
        self.assertEqual(get("/health/circuit-breaker/nope")[0], 404)
        code, status = get("/admin/status")
        self.assertEqual(status["pools"]["main"]["breaker"], OPEN)
        self.assertEqual(status["circuit_breakers"]["main"]["state"], OPEN)
        text = format_status(status)
        self.assertRegex(text, r"\nmain +OPEN +0 +0 +OPEN at 00:00:00 +10s")


class ReloadTests(SynchronousTestCase):
    """A gateway reload keeps the breakers that stay."""

    def test_reload_keeps_open_breaker(self) -> None:
        """
        An open breaker stays open across a reload that keeps its pool (with
        new settings); the admin API serves the new board; a reload without
        breakers drops them.
        """
        from twisted.internet.testing import MemoryReactorClock

        from clawproxy.config import load_config
        from clawproxy.service import build_service

        path = self.mktemp()
        base = ('pools: {main: {instances: [{id: a, url: "http://127.0.0.1:1"}], '
                'circuit_breaker: {failure_threshold: %d}}}\n'
                'routes: [{path: /*}]\nlogging: {output: "off"}\n')
        with open(path, "w") as f:
            f.write(base % 1)
        gateway = build_service(load_config(path, environ={}), MemoryReactorClock())
        pool = gateway.registry.pools["main"]
        pool.record(pool.by_id["a"], "5xx")
        self.assertEqual(gateway.breakers.state("main/a"), OPEN)
        old = gateway.breakers
        with open(path, "w") as f:
            f.write(base % 4)
        self.assertEqual(self.successResultOf(gateway.reload()), [])
        self.assertIsNot(gateway.breakers, old)
        self.assertEqual(gateway.breakers.state("main/a"), OPEN)
        self.assertEqual(gateway.breakers.breakers["main/a"].failure_threshold, 4)
        self.assertIs(gateway.admin.breakers, gateway.breakers)
        self.assertEqual(gateway.admin.status()["pools"]["main"]["breaker"], OPEN)
        with open(path, "w") as f:
            f.write((base % 4).replace("{failure_threshold: 4}", "{enabled: false}"))
        self.assertEqual(self.successResultOf(gateway.reload()), [])
        self.assertIsInstance(gateway.breakers, NoBreakers)
        self.assertIsNone(gateway.metrics.registry.get_sample_value(
            "clawproxy_circuit_breaker_state", {"name": "main/a"}))


class ConfigTests(SynchronousTestCase):
    """The circuit_breaker section is read and checked."""

    def test_bad_values_named(self) -> None:
        """Impossible values are refused with their path."""
        from clawproxy.config import ConfigError

        with self.assertRaises(ConfigError) as e:
            parse_config({"pools": {"p": {"instances": ["http://h:1"], "circuit_breaker": {
                "failure_threshold": 0, "jitter": 2, "half_open_requests": 0,
                "open_timeout": "0s"}}}, "routes": [{"path": "/*", "pool": "p"}]}, environ={})
        self.assertEqual(e.exception.errors, [
            "pools.p.circuit_breaker.failure_threshold: must be >= 1",
            "pools.p.circuit_breaker.open_timeout: must be > 0",
            "pools.p.circuit_breaker.half_open_requests: must be >= 1",
            "pools.p.circuit_breaker.jitter: must be <= 1",
        ])

    def test_empty_section_enables_defaults(self) -> None:
        """`circuit_breaker:` with nothing under it turns breakers on with the defaults."""
        from clawproxy.config import load_config

        path = self.mktemp()
        with open(path, "w") as f:
            f.write('pools: {p: {instances: ["http://h:1"], circuit_breaker: }}\n'
                    "routes: [{path: /*}]\n")
        cb = load_config(path, environ={}).pools["p"].circuit_breaker
        self.assertEqual((cb.enabled, cb.failure_threshold, cb.open_timeout, cb.jitter),
                         (True, 5, 30.0, 0.1))
