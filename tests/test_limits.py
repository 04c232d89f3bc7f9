"""
Tests for L{clawproxy.policy.limits} (the algorithms, pure) and
L{clawproxy.policy.ratescript} run by the memory store on a L{Clock}.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from clawproxy.policy.limits import (
    Limit,
    State,
    decide,
    decode_state,
    encode_state,
    evaluate,
    fixed_window,
    sliding_window,
    token_bucket,
)
from clawproxy.policy.ratescript import LIMITS, parse_reply, script_args
from clawproxy.stores.memory import MemoryStore
from clawproxy.units import Rate, parse_rate


class Run:
    """Feed one limit requests at chosen times, keeping its state."""

    def __init__(self, limit: Limit) -> None:
        self.limit = limit
        self.state: State | None = None

    def at(self, now: float, cost: float = 1.0) -> Any:
        d = decide(self.limit, self.state, now, cost)
        if d.allowed:
            self.state = d.state
        return d

    def allowed(self, now: float, n: int) -> int:
        """How many of C{n} requests at C{now} are allowed."""
        return sum(self.at(now).allowed for _ in range(n))


def limit(rate: str, algorithm: str, burst: float | None = None) -> Limit:
    return Limit.of("test", "k", parse_rate(rate), algorithm, burst)


class TokenBucketTests(SynchronousTestCase):
    """C{token_bucket}."""

    def test_burst_then_refill(self) -> None:
        """A full bucket lets C{capacity} through at once, then one per 1/rate seconds."""
        run = Run(limit("60/minute", "token_bucket", burst=5))
        self.assertEqual(run.allowed(100.0, 10), 5)
        refused = run.at(100.0)
        self.assertFalse(refused.allowed)
        self.assertAlmostEqual(refused.retry_after, 1.0)
        self.assertFalse(run.at(100.999).allowed)
        self.assertTrue(run.at(101.0).allowed)
        self.assertFalse(run.at(101.0).allowed)
        # Three seconds refill three tokens, never more than the capacity.
        self.assertEqual(run.allowed(104.0, 10), 3)
        self.assertEqual(run.allowed(1000.0, 10), 5)

    def test_default_burst_is_count(self) -> None:
        """Without C{burst} the bucket holds the limit's count."""
        run = Run(limit("10/s", "token_bucket"))
        self.assertEqual(run.allowed(5.0, 20), 10)

    def test_headers(self) -> None:
        """Limit is the capacity, remaining the whole tokens left, reset the time to full."""
        d = token_bucket(None, 0.0, 1, rate=2.0, capacity=4)
        self.assertEqual((d.allowed, d.limit, d.remaining, d.reset), (True, 4, 3, 0.5))
        d = token_bucket((0.25, 0.0), 0.0, 1, rate=2.0, capacity=4)
        self.assertEqual((d.allowed, d.remaining, d.retry_after), (False, 0, 0.375))

    def test_retry_after_exact(self) -> None:
        """Waiting exactly C{retry_after} is enough, and a millisecond less is not."""
        for rate in ("7/s", "100/minute", "3/10s", "1000/hour"):
            for burst in (None, 1, 3):
                run = Run(limit(rate, "token_bucket", burst))
                now = 12345.678
                while run.at(now).allowed:
                    pass
                wait = run.at(now).retry_after
                self.assertGreater(wait, 0)
                self.assertFalse(run.at(now + wait - 0.001).allowed, (rate, burst))
                self.assertTrue(run.at(now + wait).allowed, (rate, burst))

    def test_cost_over_capacity(self) -> None:
        """A cost no bucket can hold is refused with an infinite wait."""
        d = token_bucket(None, 0.0, 5, rate=1.0, capacity=2)
        self.assertFalse(d.allowed)
        self.assertEqual(d.retry_after, math.inf)


class FixedWindowTests(SynchronousTestCase):
    """C{fixed_window}."""

    def test_window_edges(self) -> None:
        """C{count} per window; the count starts over exactly at the window's edge."""
        run = Run(limit("3/10s", "fixed_window"))
        self.assertEqual(run.allowed(20.0, 5), 3)
        refused = run.at(29.5)
        self.assertFalse(refused.allowed)
        self.assertAlmostEqual(refused.retry_after, 0.5)
        self.assertAlmostEqual(refused.reset, 0.5)
        self.assertFalse(run.at(29.999999).allowed)
        self.assertEqual(run.allowed(30.0, 5), 3)

    def test_remaining(self) -> None:
        """Remaining counts down to 0."""
        run = Run(limit("3/minute", "fixed_window"))
        self.assertEqual([run.at(60.0).remaining for _ in range(4)], [2, 1, 0, 0])

    def test_retry_after_exact(self) -> None:
        """Waiting C{retry_after} reaches the next window."""
        run = Run(limit("5/minute", "fixed_window"))
        run.allowed(1000.25, 5)
        wait = run.at(1000.25).retry_after
        self.assertAlmostEqual(wait, 19.75)
        self.assertFalse(run.at(1000.25 + wait - 0.001).allowed)
        self.assertTrue(run.at(1000.25 + wait).allowed)

    def test_stale_state(self) -> None:
        """A state from an older window counts as empty."""
        d = fixed_window((1.0, 99.0), 50.0, 1, 3, 10)
        self.assertEqual((d.allowed, d.state), (True, (5.0, 1.0)))


class SlidingWindowTests(SynchronousTestCase):
    """C{sliding_window}."""

    def test_previous_window_weighs(self) -> None:
        """
        Half-way through a window, half of the previous window's requests
        still count: no burst of twice the limit across a window edge.
        """
        run = Run(limit("10/minute", "sliding_window"))
        self.assertEqual(run.allowed(59.0, 10), 10)
        self.assertEqual(run.allowed(60.0, 10), 0)  # the previous window still counts whole
        self.assertEqual(run.allowed(90.0, 10), 5)  # half of it has slid out
        self.assertEqual(run.allowed(180.0, 20), 10)  # two windows later: nothing counts

    def test_retry_after_exact(self) -> None:
        """Waiting exactly C{retry_after} is enough, a millisecond less is not, in either case."""
        for start in (0.0, 15.0, 42.5, 59.9):
            for first in (3, 10):
                run = Run(limit("10/minute", "sliding_window"))
                run.allowed(start, first)
                run.allowed(60.0 + start / 2, 10)
                now = 60.0 + start / 2
                wait = run.at(now).retry_after
                self.assertGreater(wait, 0, (start, first))
                self.assertFalse(run.at(now + wait - 0.001).allowed, (start, first, wait))
                self.assertTrue(run.at(now + wait).allowed, (start, first, wait))

    def test_reset_and_remaining(self) -> None:
        """Remaining is what the estimate leaves; reset is when nothing counts any more."""
        d = sliding_window(None, 30.0, 1, 4, 60)
        self.assertEqual((d.remaining, d.reset), (3, 90.0))
        d = sliding_window((0.0, 4.0, 0.0), 90.0, 1, 4, 60)
        self.assertEqual((d.allowed, d.remaining, d.reset), (True, 1, 90.0))


class EvaluateTests(SynchronousTestCase):
    """Several limits on one request."""

    def test_all_or_nothing(self) -> None:
        """A request refused by one limit takes from none; the wait is the longest."""
        a = limit("5/s", "token_bucket")
        b = limit("1/minute", "fixed_window")
        first = evaluate([a, b], [None, None], 0.5)
        self.assertTrue(first.allowed)
        second = evaluate([a, b], [d.state for d in first.decisions], 0.5)
        self.assertFalse(second.allowed)
        self.assertTrue(second.decisions[0].allowed)
        self.assertAlmostEqual(second.retry_after, 59.5)
        self.assertEqual(second.tightest(), 1)

    def test_tightest_allowed(self) -> None:
        """When every limit allows, the headers describe the one with the least left."""
        out = evaluate([limit("5/s", "token_bucket"), limit("2/s", "token_bucket")],
                       [None, None], 0.0)
        self.assertEqual(out.tightest(), 1)

    def test_state_text(self) -> None:
        """States survive the store's text form exactly; junk reads as absent."""
        state = (0.1 + 0.2, 1733320000.123456)
        self.assertEqual(decode_state(encode_state(state), "token_bucket"), state)
        self.assertIsNone(decode_state(b"1 2", "sliding_window"))
        self.assertIsNone(decode_state(b"x y", "token_bucket"))
        self.assertIsNone(decode_state(None, "token_bucket"))

    def test_unknown_algorithm(self) -> None:
        self.assertRaises(ValueError, Limit.of, "x", "k", Rate(1, 1), "leaky")


class ScriptOnMemoryTests(SynchronousTestCase):
    """The L{LIMITS} script's Python twin, run by the memory store on a clock."""

    def run_script(self, store: MemoryStore, limits: list[Limit]) -> Any:
        keys, argv = script_args(limits)
        return parse_reply(self.successResultOf(store.run(LIMITS, keys, argv)))

    def test_same_as_pure(self) -> None:
        """Each algorithm through the store answers as the pure functions do."""
        for algorithm in ("token_bucket", "fixed_window", "sliding_window"):
            clock = Clock()
            clock.advance(1000)
            store = MemoryStore(clock)
            lim = limit("3/s", algorithm)
            run = Run(lim)
            for step in (0, 0, 0, 0, 0.25, 0.5, 1.0, 0.1):
                clock.advance(step)
                got = self.run_script(store, [lim])
                want = run.at(clock.seconds())
                self.assertEqual((got.allowed, got.decisions[0].remaining),
                                 (want.allowed, want.remaining), algorithm)
                self.assertEqual(got.decisions[0].retry_after,
                                 math.ceil(want.retry_after * 1000) / 1000)

    def test_ttl_and_no_write_on_refusal(self) -> None:
        """States expire once worthless; a refused request writes nothing."""
        clock = Clock()
        store = MemoryStore(clock)
        a = Limit.of("a", "a", Rate(2, 1))
        b = Limit.of("b", "b", Rate(1, 60), "fixed_window")
        self.assertTrue(self.run_script(store, [a, b]).allowed)
        before = store.keys.get("a")
        self.assertFalse(self.run_script(store, [a, b]).allowed)
        self.assertEqual(store.keys.get("a"), before)
        self.assertEqual(store.keys.pttl("a"), 2000)
        self.assertEqual(store.keys.pttl("b"), 61000)
        clock.advance(62)
        self.assertEqual((store.keys.get("a"), store.keys.get("b")), (None, None))


class BatchTests(SynchronousTestCase):
    """Several requests decided in one L{LIMITS} call."""

    def test_in_order(self) -> None:
        """Each request is all or nothing and sees what the ones before it took."""
        from clawproxy.policy.ratescript import batch_args, parse_batch

        store = MemoryStore(Clock())
        one = Limit.of("agent", "a", Rate(2, 60), "fixed_window")
        other = Limit.of("route", "r", Rate(1, 60), "fixed_window")
        keys, argv = batch_args([[one], [one, other], [one], [other]])
        outcomes = parse_batch(self.successResultOf(store.run(LIMITS, keys, argv)))
        self.assertEqual([o.allowed for o in outcomes], [True, True, False, False])
        self.assertEqual([len(o.decisions) for o in outcomes], [1, 2, 1, 1])
        self.assertEqual(outcomes[1].decisions[1].remaining, 0)
