"""Tests for L{clawproxy.policy.health}."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from clawproxy.interfaces import CANCELLED, OK
from clawproxy.policy.health import (
    ClientBound,
    PassiveEjection,
    PassiveState,
    ProbeState,
    may_eject,
    parse_health_body,
)


class ProbeStateTests(SynchronousTestCase):
    """L{ProbeState}: consecutive probe results with thresholds."""

    def test_starts_healthy(self) -> None:
        """Instances start healthy with empty streaks."""
        state = ProbeState(2, 3)
        self.assertTrue(state.healthy)
        self.assertEqual(state.consecutive_successes, 0)
        self.assertEqual(state.consecutive_failures, 0)

    def test_initial_unhealthy(self) -> None:
        """healthy=False starts unhealthy."""
        self.assertFalse(ProbeState(2, 3, healthy=False).healthy)

    def test_becomes_unhealthy(self) -> None:
        """unhealthy_threshold consecutive failures mark it down, reported once."""
        state = ProbeState(2, 3)
        self.assertIsNone(state.record(False))
        self.assertIsNone(state.record(False))
        self.assertTrue(state.healthy)
        self.assertIs(state.record(False), False)
        self.assertFalse(state.healthy)
        self.assertEqual(state.consecutive_failures, 3)
        self.assertIsNone(state.record(False))
        self.assertEqual(state.consecutive_failures, 4)

    def test_becomes_healthy(self) -> None:
        """healthy_threshold consecutive successes bring it back, reported once."""
        state = ProbeState(2, 1)
        self.assertIs(state.record(False), False)
        self.assertIsNone(state.record(True))
        self.assertFalse(state.healthy)
        self.assertIs(state.record(True), True)
        self.assertTrue(state.healthy)
        self.assertIsNone(state.record(True))
        self.assertEqual(state.consecutive_successes, 3)

    def test_success_resets_failures(self) -> None:
        """A success in between restarts the failure streak."""
        state = ProbeState(2, 3)
        for ok in (False, False, True, False, False):
            self.assertIsNone(state.record(ok))
        self.assertTrue(state.healthy)
        self.assertEqual(state.consecutive_failures, 2)
        self.assertEqual(state.consecutive_successes, 0)
        self.assertIs(state.record(False), False)

    def test_failure_resets_successes(self) -> None:
        """A failure in between restarts the success streak."""
        state = ProbeState(3, 1, healthy=False)
        for ok in (True, True, False, True, True):
            self.assertIsNone(state.record(ok))
        self.assertFalse(state.healthy)
        self.assertEqual(state.consecutive_successes, 2)
        self.assertEqual(state.consecutive_failures, 0)
        self.assertIs(state.record(True), True)

    def test_healthy_success_no_transition(self) -> None:
        """Successes while healthy report no transition."""
        state = ProbeState(1, 1)
        for _ in range(5):
            self.assertIsNone(state.record(True))

    def test_invalid_thresholds(self) -> None:
        """Thresholds below 1 raise ValueError."""
        self.assertRaises(ValueError, ProbeState, 0, 3)
        self.assertRaises(ValueError, ProbeState, 2, 0)


class PassiveStateTests(SynchronousTestCase):
    """L{PassiveState}: nginx's max_fails / fail_timeout."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.state = PassiveState(3, 30, self.clock)

    def tearDown(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_not_ejected(self) -> None:
        """A new state is not ejected and has no failures."""
        self.assertFalse(self.state.ejected)
        self.assertIsNone(self.state.ejected_until)
        self.assertEqual(self.state.failures, 0)

    def test_eject(self) -> None:
        """The max_fails-th failure within fail_timeout ejects, reported once."""
        self.assertFalse(self.state.record_failure())
        self.clock.advance(10)
        self.assertFalse(self.state.record_failure())
        self.assertEqual(self.state.failures, 2)
        self.clock.advance(19.9)
        self.assertTrue(self.state.record_failure())
        self.assertTrue(self.state.ejected)
        self.assertAlmostEqual(self.state.ejected_until, 1059.9)  # type: ignore[arg-type]

    def test_ejection_ends(self) -> None:
        """An ejection lasts fail_timeout seconds, then the instance is back."""
        for _ in range(3):
            self.state.record_failure()
        self.clock.advance(29)
        self.assertTrue(self.state.ejected)
        self.clock.advance(1)
        self.assertFalse(self.state.ejected)
        self.assertIsNone(self.state.ejected_until)

    def test_fresh_count_after_ejection(self) -> None:
        """After an ejection ends, counting starts afresh from zero."""
        for _ in range(3):
            self.state.record_failure()
        self.clock.advance(30)
        self.assertFalse(self.state.record_failure())
        self.assertFalse(self.state.record_failure())
        self.assertEqual(self.state.failures, 2)
        self.assertTrue(self.state.record_failure())

    def test_failures_while_ejected_ignored(self) -> None:
        """Failures while ejected neither extend the ejection nor count later."""
        for _ in range(3):
            self.state.record_failure()
        self.clock.advance(20)
        for _ in range(5):
            self.assertFalse(self.state.record_failure())
        self.clock.advance(10)
        self.assertFalse(self.state.ejected)
        self.assertEqual(self.state.failures, 0)

    def test_window_expires(self) -> None:
        """Failures spread over more than fail_timeout do not eject."""
        self.state.record_failure()
        self.clock.advance(15)
        self.state.record_failure()
        self.clock.advance(15)  # the window opened by the first failure has closed
        self.assertFalse(self.state.record_failure())
        self.assertEqual(self.state.failures, 1)
        self.assertFalse(self.state.ejected)
        self.clock.advance(29)
        self.assertFalse(self.state.record_failure())
        self.assertTrue(self.state.record_failure())

    def test_success_resets_count(self) -> None:
        """A success resets the failure count."""
        self.state.record_failure()
        self.state.record_failure()
        self.state.record_success()
        self.assertEqual(self.state.failures, 0)
        self.assertFalse(self.state.record_failure())
        self.assertFalse(self.state.record_failure())
        self.assertTrue(self.state.record_failure())

    def test_success_keeps_ejection(self) -> None:
        """A success (from a request already in flight) does not end an ejection."""
        for _ in range(3):
            self.state.record_failure()
        self.state.record_success()
        self.assertTrue(self.state.ejected)

    def test_reset(self) -> None:
        """reset() ends an ejection and forgets failures."""
        for _ in range(3):
            self.state.record_failure()
        self.state.reset()
        self.assertFalse(self.state.ejected)
        self.assertFalse(self.state.record_failure())
        self.assertEqual(self.state.failures, 1)

    def test_max_fails_one(self) -> None:
        """max_fails=1 ejects on the first failure."""
        state = PassiveState(1, 10, self.clock)
        self.assertTrue(state.record_failure())
        self.assertTrue(state.ejected)
        self.clock.advance(10)
        self.assertFalse(state.ejected)

    def test_disabled(self) -> None:
        """max_fails=0 never counts nor ejects."""
        state = PassiveState(0, 30, self.clock)
        for _ in range(100):
            self.assertFalse(state.record_failure())
        self.assertFalse(state.ejected)
        self.assertEqual(state.failures, 0)

    def test_invalid(self) -> None:
        """A negative max_fails or fail_timeout raises ValueError."""
        self.assertRaises(ValueError, PassiveState, -1, 30, self.clock)
        self.assertRaises(ValueError, PassiveState, 3, -1, self.clock)


class MayEjectTests(SynchronousTestCase):
    """L{may_eject}: the max_ejection_percent cap."""

    def test_single_instance(self) -> None:
        """With 50%, the only instance of a pool is never ejected."""
        self.assertFalse(may_eject(1, 0, 50))

    def test_half(self) -> None:
        """With 50%, pools of 2 and 3 may eject one, a pool of 4 two."""
        self.assertTrue(may_eject(2, 0, 50))
        self.assertFalse(may_eject(2, 1, 50))
        self.assertTrue(may_eject(3, 0, 50))
        self.assertFalse(may_eject(3, 1, 50))
        self.assertTrue(may_eject(4, 1, 50))
        self.assertFalse(may_eject(4, 2, 50))

    def test_bounds(self) -> None:
        """0% never ejects; 100% may eject every instance; an empty pool none."""
        self.assertFalse(may_eject(10, 0, 0))
        self.assertTrue(may_eject(10, 9, 100))
        self.assertFalse(may_eject(10, 10, 100))
        self.assertFalse(may_eject(0, 0, 100))

    def test_fractional(self) -> None:
        """A fractional percentage is honoured: 33.4% of 3 allows one."""
        self.assertTrue(may_eject(3, 0, 33.4))
        self.assertFalse(may_eject(3, 0, 33.3))


class ParseHealthBodyTests(SynchronousTestCase):
    """L{parse_health_body}."""

    def test_object(self) -> None:
        """A JSON object is returned with all its fields."""
        body = (
            b'{"status": "ok", "cpu": 12.5, "mem": 40, "gpu_memory_used_percent": 87}'
        )
        self.assertEqual(
            parse_health_body(body),
            {"status": "ok", "cpu": 12.5, "mem": 40, "gpu_memory_used_percent": 87},
        )

    def test_not_object(self) -> None:
        """JSON that is not an object gives None."""
        for body in (b"[1, 2]", b'"ok"', b"42", b"null", b"true"):
            self.assertIsNone(parse_health_body(body), body)

    def test_garbage(self) -> None:
        """Empty, non-JSON, truncated, non-UTF-8 and absurdly nested bodies give None."""
        for body in (
            b"",
            b"OK",
            b"<html>healthy</html>",
            b'{"cpu": ',
            b"\xff\xfe\x00{",
            b"[" * 100_000,
            b"1" * 10_000,
        ):
            self.assertIsNone(parse_health_body(body), body[:20])

    def test_wrong_type(self) -> None:
        """A value that is not bytes gives None rather than raising."""
        self.assertIsNone(parse_health_body(None))  # type: ignore[arg-type]

    def test_str(self) -> None:
        """An already decoded body is accepted too."""
        self.assertEqual(parse_health_body('{"a": 1}'), {"a": 1})  # type: ignore[arg-type]


class _Pool:
    def __init__(self, n: int, clock: Clock, max_ejection_percent: float = 50) -> None:
        self.instances = [_Instance(self, f"i{k}", clock) for k in range(1, n + 1)]
        self.config = type("C", (), {"passive": type("P", (), {
            "max_ejection_percent": max_ejection_percent})()})()


class _Instance:
    def __init__(self, pool: _Pool, id: str, clock: Clock) -> None:
        self.pool = pool
        self.id = id
        self.passive = PassiveState(2, 30, clock)


class PassiveEjectionPolicyTests(SynchronousTestCase):
    """L{PassiveEjection}: passive health as an availability policy."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = _Pool(3, self.clock)
        self.i1, self.i2, self.i3 = self.pool.instances
        self.policy = PassiveEjection()

    def test_counts_reached_failures(self) -> None:
        """Failures of attempts that reached the instance eject it; it is then excluded."""
        self.policy.record(self.i1, "5xx", True)
        self.assertFalse(self.policy.excludes(self.i1))
        self.policy.record(self.i1, "timeout", True)
        self.assertTrue(self.policy.excludes(self.i1))
        self.assertTrue(self.policy.admit(self.i1))

    def test_ignores_unreached_and_cancelled(self) -> None:
        """Refused connections (the registry's business) and cancelled attempts do not count."""
        for _ in range(5):
            self.policy.record(self.i1, "refused", False)
            self.policy.record(self.i1, CANCELLED, True)
        self.assertFalse(self.policy.excludes(self.i1))
        self.assertEqual(self.i1.passive.failures, 0)

    def test_success_resets(self) -> None:
        """A success between failures restarts the count."""
        self.policy.record(self.i1, "5xx", True)
        self.policy.record(self.i1, OK, True)
        self.policy.record(self.i1, "5xx", True)
        self.assertFalse(self.policy.excludes(self.i1))

    def test_cap(self) -> None:
        """C{max_ejection_percent} 50 of three: one instance may be ejected, not two."""
        for inst in (self.i1, self.i2):
            for _ in range(2):
                self.policy.record(inst, "5xx", True)
        self.assertEqual([self.policy.excludes(i) for i in self.pool.instances],
                         [True, False, False])

    def test_probe_pass_ends_ejection(self) -> None:
        """A passing health check ends an ejection at once; a failing one does not."""
        for _ in range(2):
            self.policy.record(self.i1, "5xx", True)
        self.policy.probed(self.i1, False)
        self.assertTrue(self.policy.excludes(self.i1))
        self.policy.probed(self.i1, True)
        self.assertFalse(self.policy.excludes(self.i1))


class ClientBoundTests(SynchronousTestCase):
    """
    L{ClientBound} lets one failure per client per instance per window
    count, until the client's next success.
    """

    def test_once_per_window(self) -> None:
        """A client counts once per instance, then again only after C{window} seconds."""
        clock = Clock()
        bound = ClientBound(30.0, clock)
        self.assertTrue(bound.counts("a", "i1"))
        self.assertFalse(bound.counts("a", "i1"))
        self.assertTrue(bound.counts("a", "i2"))
        self.assertTrue(bound.counts("b", "i1"))
        clock.advance(29.9)
        self.assertFalse(bound.counts("a", "i1"))
        clock.advance(0.1)
        self.assertTrue(bound.counts("a", "i1"))
        self.assertFalse(bound.counts("a", "i1"))

    def test_forgive(self) -> None:
        """After a success of that client, its next failure counts again."""
        bound = ClientBound(30.0, Clock())
        bound.counts("a", "i1")
        bound.counts("b", "i1")
        bound.forgive("a")
        bound.forgive("c")
        self.assertTrue(bound.counts("a", "i1"))
        self.assertFalse(bound.counts("b", "i1"))

    def test_table_bounded(self) -> None:
        """
        Past C{MAX_CLIENTS} clients, expired entries are dropped; if none had
        expired the table starts afresh: it never grows past the cap.
        """
        class Small(ClientBound):
            MAX_CLIENTS = 4

        clock = Clock()
        bound = Small(10.0, clock)
        for c in "abc":
            bound.counts(c, "i1")
        clock.advance(10)
        bound.counts("d", "i1")
        bound.counts("e", "i1")
        self.assertEqual(len(bound), 2)
        for c in "fgh":
            bound.counts(c, "i1")
        self.assertLessEqual(len(bound), 4)
        self.assertFalse(bound.counts("h", "i1"))
