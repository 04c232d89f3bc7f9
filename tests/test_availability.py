"""
Tests for the registry's one availability decision (L{Pool.candidates},
L{Pool.take}, L{Pool.record}): balancers choose among the instances that may
take a request, each availability policy admits the chosen one once, and a
refusing or restarted instance leaves and returns at once.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from clawproxy.backends.registry import L4_RETRY_INTERVAL, Instance, Pool, Registry
from clawproxy.config import parse_config
from clawproxy.interfaces import CANCELLED, OK, IAvailabilityPolicy, IBreakerBoard
from clawproxy.policy.balancers import make_balancer
from clawproxy.policy.breakers import NoBreakers
from clawproxy.policy.health import PassiveEjection


@implementer(IBreakerBoard)
class TrialBreakers:
    """
    A TEST-ONLY breaker board whose states are set by hand (real breakers are
    a later issue). C{OPEN} excludes; C{HALF_OPEN} admits exactly C{probes}
    trial attempts: each admission takes a slot, a L{CANCELLED} outcome gives
    it back, C{probes} L{OK} outcomes close the breaker and a failure opens
    it again. Breakers are named C{POOL} and C{POOL/INSTANCE}.

    @ivar deferred: answer L{admit} with a Deferred, fired by L{flush} (as a
        shared store would answer later); the slot is taken when it fires.
    """

    def __init__(self, deferred: bool = False) -> None:
        self.deferred = deferred
        self.states: dict[str, str] = {}
        self.slots: dict[str, int] = {}
        self.needed: dict[str, int] = {}
        self.asked: list[str] = []
        self.admitted: list[str] = []
        self.outcomes: list[tuple[str, str]] = []
        self.pending: list[tuple[Deferred[bool], Instance]] = []

    def open(self, name: str) -> None:
        self.states[name] = "OPEN"

    def half_open(self, name: str, probes: int) -> None:
        self.states[name] = "HALF_OPEN"
        self.slots[name] = self.needed[name] = probes

    def flush(self) -> None:
        """Answer the admissions pending now, in order (not those they lead to)."""
        pending, self.pending = self.pending, []
        for d, inst in pending:
            d.callback(self._take(inst))

    def _names(self, inst: Instance) -> tuple[str, str]:
        return inst.pool.name, f"{inst.pool.name}/{inst.id}"

    def excludes(self, instance: Instance) -> bool:
        return any(self.states.get(n) == "OPEN" for n in self._names(instance))

    def admit(self, instance: Instance) -> bool | Deferred[bool]:
        self.asked.append(instance.id)
        if not self.deferred:
            return self._take(instance)
        entry: tuple[Deferred[bool], Instance]
        d: Deferred[bool] = Deferred(lambda _: self.pending.remove(entry))
        entry = (d, instance)
        self.pending.append(entry)
        return d

    def _take(self, inst: Instance) -> bool:
        names = self._names(inst)
        if any(self.states.get(n) == "OPEN" for n in names):
            return False
        trials = [n for n in names if self.states.get(n) == "HALF_OPEN"]
        if any(self.slots[n] <= 0 for n in trials):
            return False
        for n in trials:
            self.slots[n] -= 1
        self.admitted.append(inst.id)
        return True

    def record(self, instance: Instance, outcome: str, reached: bool) -> None:
        self.outcomes.append((instance.id, outcome))
        for n in self._names(instance):
            if self.states.get(n) != "HALF_OPEN":
                continue
            if outcome == CANCELLED:
                self.slots[n] += 1
            elif outcome == OK:
                self.needed[n] -= 1
                if self.needed[n] <= 0:
                    self.states[n] = "CLOSED"
            else:
                self.states[n] = "OPEN"

    def probed(self, instance: Instance, ok: bool) -> None:
        pass

    def state(self, name: str) -> str:
        return self.states.get(name, "CLOSED")

    def retry_after(self, pool: str) -> float | None:
        return None


@implementer(IBreakerBoard)
class Recorder:
    """
    A policy (or breaker board, every breaker closed) that excludes nothing,
    admits everything and remembers what it is told.
    """

    def __init__(self) -> None:
        self.outcomes: list[tuple[str, str]] = []

    def excludes(self, instance: Instance) -> bool:
        return False

    def admit(self, instance: Instance) -> bool:
        return True

    def record(self, instance: Instance, outcome: str, reached: bool) -> None:
        self.outcomes.append((instance.id, outcome))

    def probed(self, instance: Instance, ok: bool) -> None:
        pass

    def state(self, name: str) -> str:
        return "CLOSED"

    def retry_after(self, pool: str) -> float | None:
        return None


def config(instances: int = 3, **pool: Any) -> Any:
    """A config with pool C{main} of C{instances} instances (C{i1}, C{i2}...)."""
    cfg: dict[str, Any] = {
        "instances": [{"id": f"i{n}", "url": f"http://i{n}.test:8000"}
                      for n in range(1, instances + 1)],
        "health_check": {"healthy_threshold": 2, "unhealthy_threshold": 3},
    }
    cfg.update(pool)
    return parse_config({"pools": {"main": cfg}, "routes": [{"path": "/*", "pool": "main"}]},
                        environ={})


def ids(instances: Any) -> list[str]:
    return [i.id for i in instances]


def takes(pool: Pool, n: int) -> list[str | None]:
    """Ids chosen by C{n} synchronous L{Pool.take}s (no outcome recorded)."""
    out = []
    for _ in range(n):
        inst = pool.take()
        assert not isinstance(inst, Deferred)
        out.append(None if inst is None else inst.id)
    return out


class InterfaceTests(SynchronousTestCase):
    """The policies provide the interfaces the registry asks."""

    def test_provided(self) -> None:
        """Passive ejection is an availability policy; breaker boards are too."""
        self.assertTrue(verifyObject(IAvailabilityPolicy, PassiveEjection()))
        self.assertTrue(verifyObject(IBreakerBoard, NoBreakers()))
        self.assertTrue(verifyObject(IBreakerBoard, TrialBreakers()))

    def test_default_policies(self) -> None:
        """A registry asks passive ejection, then its breaker board (NoBreakers by default)."""
        reg = Registry(config(), Clock())
        passive, breakers = reg.pools["main"].policies
        self.assertIsInstance(passive, PassiveEjection)
        self.assertIsInstance(breakers, NoBreakers)
        self.assertIs(reg.breakers, breakers)
        board = TrialBreakers()
        self.assertIs(Registry(config(), Clock(), breakers=board).pools["main"].policies[1],
                      board)


class DecisionTests(SynchronousTestCase):
    """Which instances are candidates, and who is asked to admit."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.breakers = TrialBreakers()
        self.registry = Registry(config(passive={"max_fails": 1}), self.clock,
                                 breakers=self.breakers)
        self.pool = self.registry.pools["main"]
        self.i1, self.i2, self.i3 = self.pool.instances

    def test_every_reason_to_be_out(self) -> None:
        """
        Unhealthy, drained, weight 0, full, passively ejected and breaker-open
        instances are no candidates; the balancer chooses among the rest.
        """
        cfg = config(instances=7, passive={"max_fails": 1, "max_ejection_percent": 100},
                     health_check={"unhealthy_threshold": 1})
        reg = Registry(cfg, self.clock, breakers=self.breakers)
        pool = reg.pools["main"]
        i1, _, _, i4, i5, _, _ = pool.instances
        reg.probe_result(i1, False)
        reg.set_drained("i2", True)
        reg.set_weight("i3", 0)
        i4.max_connections, i4.active = 1, 1
        pool.record(i5, "5xx")
        self.breakers.open("main/i6")
        self.assertEqual(ids(pool.candidates()), ["i7"])
        self.assertEqual(takes(pool, 3), ["i7"] * 3)
        self.assertEqual(self.breakers.asked, ["i7"] * 3)

    def test_breaker_asked_once_for_the_chosen(self) -> None:
        """The breaker is asked once per attempt, for the chosen instance only."""
        self.assertEqual(takes(self.pool, 4), ["i1", "i2", "i3", "i1"])
        self.assertEqual(self.breakers.asked, ["i1", "i2", "i3", "i1"])

    def test_open_instance_breaker(self) -> None:
        """An instance whose breaker (C{POOL/INSTANCE}) is open is skipped, not even asked."""
        self.breakers.open("main/i2")
        self.assertEqual(ids(self.pool.candidates()), ["i1", "i3"])
        self.assertEqual(takes(self.pool, 4), ["i1", "i3", "i1", "i3"])
        self.assertNotIn("i2", self.breakers.asked)
        self.assertTrue(self.i2.healthy)

    def test_open_pool_breaker(self) -> None:
        """An open pool breaker (C{POOL}) leaves no instance to take the request."""
        self.breakers.open("main")
        self.assertEqual(takes(self.pool, 2), [None, None])
        self.assertEqual(self.breakers.asked, [])

    def test_half_open_admits_exactly_its_probes(self) -> None:
        """
        Six attempts in flight at once while C{main/i1} is half-open with two
        probes: exactly two go to i1, the others elsewhere.
        """
        self.breakers.half_open("main/i1", 2)
        chosen = takes(self.pool, 6)
        self.assertEqual(chosen.count("i1"), 2)
        self.assertEqual(sorted(set(chosen)), ["i1", "i2", "i3"])
        self.assertEqual(self.breakers.admitted.count("i1"), 2)

    def test_half_open_single_instance(self) -> None:
        """With nowhere else to go, attempts beyond the probe count get no instance."""
        breakers = TrialBreakers()
        pool = Registry(config(instances=1), self.clock, breakers=breakers).pools["main"]
        breakers.half_open("main/i1", 2)
        self.assertEqual(takes(pool, 5), ["i1", "i1", None, None, None])

    def test_cancelled_gives_the_slot_back(self) -> None:
        """An admitted attempt that never happened frees its trial slot."""
        breakers = TrialBreakers()
        pool = Registry(config(instances=1), self.clock, breakers=breakers).pools["main"]
        breakers.half_open("main/i1", 1)
        (inst,) = pool.instances
        self.assertEqual(takes(pool, 2), ["i1", None])
        pool.record(inst, CANCELLED)
        self.assertEqual(takes(pool, 1), ["i1"])
        pool.record(inst, OK)
        self.assertEqual(breakers.state("main/i1"), "CLOSED")
        self.assertEqual(takes(pool, 2), ["i1", "i1"])

    def test_outcomes_reach_every_policy(self) -> None:
        """L{Pool.record} tells every policy, with the failure count and passive health."""
        self.pool.record(self.i1, OK)
        self.pool.record(self.i2, "5xx")
        self.assertEqual(self.breakers.outcomes, [("i1", OK), ("i2", "5xx")])
        self.assertEqual((self.i1.failures, self.i2.failures), (0, 1))
        self.assertEqual(self.i2.state, "ejected")

    def test_refusal_releases_earlier_admissions(self) -> None:
        """
        When a later policy refuses the chosen instance, the policies that had
        admitted it are told the attempt will not happen, and another is chosen.
        """
        recorder, breakers = Recorder(), TrialBreakers()
        pool = Pool(config().pools["main"], self.clock, make_balancer("round_robin"),
                    [recorder, breakers])
        breakers.half_open("main/i1", 0)
        inst = pool.take()
        self.assertEqual(inst.id, "i2")
        self.assertEqual(recorder.outcomes, [("i1", CANCELLED)])
        self.assertEqual(breakers.asked, ["i1", "i2"])

    def test_affinity_pin_refused(self) -> None:
        """A session pinned to an instance its breaker refuses goes elsewhere."""
        breakers = TrialBreakers()
        reg = Registry(config(session_affinity={"method": "header"}), self.clock,
                       breakers=breakers)
        pool = reg.pools["main"]
        pool.affinity.set("s", "i3")
        self.assertEqual(pool.take(sticky_key="s").id, "i3")
        breakers.half_open("main/i3", 0)
        self.assertEqual(pool.take(sticky_key="s").id, "i1")
        self.assertEqual(pool.affinity.get("s"), "i1")


class DeferredAdmissionTests(SynchronousTestCase):
    """A policy may answer admission later (a shared store): the decision waits for it."""

    def setUp(self) -> None:
        self.breakers = TrialBreakers(deferred=True)
        self.registry = Registry(config(instances=2), Clock(), breakers=self.breakers)
        self.pool = self.registry.pools["main"]

    def test_waits_for_the_answer(self) -> None:
        """L{Pool.take} answers with a Deferred that fires once the breaker has answered."""
        d = self.pool.take()
        self.assertIsInstance(d, Deferred)
        self.assertNoResult(d)
        self.breakers.flush()
        self.assertEqual(self.successResultOf(d).id, "i1")

    def test_slot_taken_when_answered(self) -> None:
        """
        Two attempts asked at once while the pool breaker is half-open with
        one trial slot: the first answer takes it; the second attempt is
        refused on i2, then on i1, and gets no instance.
        """
        self.breakers.half_open("main", 1)
        first, second = self.pool.take(), self.pool.take()
        self.assertEqual(self.breakers.asked, ["i1", "i2"])
        self.breakers.flush()
        self.assertEqual(self.successResultOf(first).id, "i1")
        self.assertNoResult(second)
        self.assertEqual(self.breakers.asked, ["i1", "i2", "i1"])
        self.breakers.flush()
        self.assertIsNone(self.successResultOf(second))
        self.assertEqual(self.breakers.admitted, ["i1"])

    def test_refused_everywhere(self) -> None:
        """When every instance is refused, the Deferred fires with L{None}."""
        self.breakers.half_open("main", 0)
        d = self.pool.take()
        self.breakers.flush()
        self.breakers.flush()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.breakers.asked, ["i1", "i2"])

    def test_cancelled_while_waiting(self) -> None:
        """
        Cancelling the decision (the client left) cancels the breaker's
        answer and tells the policies that had admitted the instance.
        """
        recorder = Recorder()
        pool = Pool(config(instances=2).pools["main"], Clock(), make_balancer("round_robin"),
                    [recorder, self.breakers])
        d = pool.take()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.breakers.pending, [])
        self.assertEqual(recorder.outcomes, [("i1", CANCELLED)])


class RollingRestartTests(SynchronousTestCase):
    """
    What a rolling restart needs from the decision: a refusing instance is
    out at once whatever the ejection cap, and a passing health check brings
    an instance back at once.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(
            config(passive={"max_fails": 3, "fail_timeout": "30s", "max_ejection_percent": 50}),
            self.clock)
        self.pool = self.registry.pools["main"]
        self.i1, self.i2, self.i3 = self.pool.instances
        self.seen: list[tuple[str, str]] = []
        self.registry.subscribe(lambda inst: self.seen.append((inst.id, inst.state)))
        del self.seen[:]

    def eject(self, inst: Instance) -> None:
        for _ in range(3):
            self.pool.record(inst, "5xx")
        self.assertEqual(inst.state, "ejected")

    def test_probe_pass_ends_ejection(self) -> None:
        """(a) A passing active health check ends a passive ejection at once."""
        self.eject(self.i1)
        self.clock.advance(5)
        self.registry.probe_result(self.i1, False)
        self.assertEqual(self.i1.state, "ejected")
        self.registry.probe_result(self.i1, True)
        self.assertEqual(self.i1.state, "healthy")
        self.assertEqual(ids(self.pool.candidates()), ["i1", "i2", "i3"])
        self.assertEqual(self.seen, [("i1", "ejected"), ("i1", "healthy")])

    def test_refused_out_at_once(self) -> None:
        """(b) One refused connection takes the instance out, for L{L4_RETRY_INTERVAL}."""
        self.pool.record(self.i1, "refused", reached=False)
        self.assertEqual(self.i1.state, "ejected")
        self.assertEqual(ids(self.pool.candidates()), ["i2", "i3"])
        self.assertEqual(self.i1.failures, 1)
        self.clock.advance(L4_RETRY_INTERVAL - 0.01)
        self.assertEqual(ids(self.pool.candidates()), ["i2", "i3"])
        self.clock.advance(0.01)
        self.assertEqual(ids(self.pool.candidates()), ["i1", "i2", "i3"])
        self.assertEqual(self.i1.state, "healthy")

    def test_refused_beyond_the_cap(self) -> None:
        """
        (b) With one instance of three already ejected for 5xx (all the 50%
        cap allows), a second that refuses connections is out too.
        """
        self.eject(self.i2)
        for _ in range(3):
            self.pool.record(self.i3, "5xx")
        self.assertEqual(self.i3.state, "healthy")  # the cap holds for 5xx...
        self.pool.record(self.i1, "refused", reached=False)
        self.assertEqual(ids(self.pool.candidates()), ["i3"])  # ...not for closed ports

    def test_refused_with_no_ejection_allowed(self) -> None:
        """(b) Even C{max_ejection_percent: 0} does not keep a refusing instance in."""
        reg = Registry(config(passive={"max_ejection_percent": 0}), self.clock)
        pool = reg.pools["main"]
        pool.record(pool.instances[0], "connect_failure", reached=False)
        self.assertEqual(ids(pool.candidates()), ["i2", "i3"])

    def test_probe_pass_ends_refusal(self) -> None:
        """(a, b) A refusing instance is back as soon as a health check passes."""
        self.pool.record(self.i1, "refused", reached=False)
        self.registry.probe_result(self.i1, False)
        self.assertEqual(ids(self.pool.candidates()), ["i2", "i3"])
        self.registry.probe_result(self.i1, True)
        self.assertEqual(ids(self.pool.candidates()), ["i1", "i2", "i3"])

    def test_refusal_is_not_a_passive_failure(self) -> None:
        """
        Refusals do not count toward C{max_fails}: three of them do not eject
        the instance for C{fail_timeout}, only for the short retry interval.
        """
        for _ in range(3):
            self.pool.record(self.i1, "refused", reached=False)
        self.assertFalse(self.i1.passive.ejected)
        self.clock.advance(L4_RETRY_INTERVAL)
        self.assertEqual(self.i1.state, "healthy")

    def test_every_instance_refusing(self) -> None:
        """
        When every instance refuses, they stay candidates (a refusal costs
        nothing), so requests still try them rather than finding none.
        """
        for inst in self.pool.instances:
            self.pool.record(inst, "refused", reached=False)
        self.assertEqual(ids(self.pool.candidates()), ["i1", "i2", "i3"])
        self.assertEqual(ids(self.pool.candidates({"i1"})), ["i2", "i3"])
        self.assertEqual({i.state for i in self.pool.instances}, {"ejected"})

    def test_success_ends_refusal(self) -> None:
        """An answer from a refusing instance (tried as the last one left) brings it back."""
        self.pool.record(self.i1, "refused", reached=False)
        self.pool.record(self.i1, OK)
        self.assertEqual(self.i1.state, "healthy")
        self.assertEqual(self.seen[-1], ("i1", "healthy"))
