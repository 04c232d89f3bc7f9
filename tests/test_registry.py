"""Tests for L{clawproxy.backends.registry}."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from clawproxy.backends.registry import Instance, Registry, reported_models
from clawproxy.config import parse_config
from clawproxy.interfaces import OK
from tests.test_availability import Recorder


def fail(inst: Instance, outcome: str = "5xx") -> None:
    """Record one failed attempt to C{inst} that reached it."""
    inst.pool.record(inst, outcome)


def registry(clock: Clock | None = None, instances: int = 2, **pool: Any) -> Registry:
    """A registry with pool C{main} of C{instances} instances (C{i1}, C{i2}...)."""
    cfg: dict[str, Any] = {
        "instances": [{"id": f"i{n}", "url": f"http://i{n}.test:8000"}
                      for n in range(1, instances + 1)],
        "health_check": {"healthy_threshold": 2, "unhealthy_threshold": 3},
    }
    cfg.update(pool)
    config = parse_config({"pools": {"main": cfg}, "routes": [{"path": "/*", "pool": "main"}]},
                          environ={})
    return Registry(config, clock or Clock())


class AvailabilityTests(SynchronousTestCase):
    """L{Instance.available} says whether an instance may take a new request."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = registry(self.clock)
        self.pool = self.registry.pools["main"]
        self.i1 = self.registry.instance("i1")
        assert self.i1 is not None

    def test_starts_available(self) -> None:
        """Instances start healthy and available, as in nginx and HAProxy."""
        self.assertTrue(self.i1.available())
        self.assertEqual(self.i1.state, "healthy")
        self.assertEqual([i.id for i in self.pool.candidates()], ["i1", "i2"])

    def test_unhealthy(self) -> None:
        """An instance failed by probes takes no traffic and reports C{unhealthy}."""
        for _ in range(3):
            self.registry.probe_result(self.i1, False)
        self.assertFalse(self.i1.available())
        self.assertEqual(self.i1.state, "unhealthy")
        self.assertFalse(self.i1.healthy)
        self.assertEqual([i.id for i in self.pool.candidates()], ["i2"])

    def test_drained(self) -> None:
        """A drained instance takes no new traffic and reports C{draining}; undrain restores."""
        self.registry.set_drained("i1", True)
        self.assertFalse(self.i1.available())
        self.assertEqual(self.i1.state, "draining")
        self.assertTrue(self.i1.healthy)
        self.registry.set_drained("i1", False)
        self.assertTrue(self.i1.available())
        self.assertEqual(self.i1.state, "healthy")

    def test_weight_zero(self) -> None:
        """Weight 0 takes no new traffic but the instance stays C{healthy}."""
        self.registry.set_weight("i1", 0)
        self.assertFalse(self.i1.available())
        self.assertEqual(self.i1.state, "healthy")
        self.assertEqual([i.id for i in self.pool.candidates()], ["i2"])
        self.registry.set_weight("i1", 2.5)
        self.assertTrue(self.i1.available())
        self.assertEqual(self.i1.weight, 2.5)

    def test_negative_weight(self) -> None:
        """A negative weight is refused and changes nothing."""
        self.assertRaises(ValueError, self.registry.set_weight, "i1", -1)
        self.assertEqual(self.i1.base_weight, 1.0)

    def test_unknown_instance(self) -> None:
        """Operations on an unknown id raise L{KeyError}."""
        self.assertRaises(KeyError, self.registry.set_weight, "nope", 1)
        self.assertRaises(KeyError, self.registry.set_drained, "nope", True)
        self.assertIsNone(self.registry.instance("nope"))

    def test_max_connections(self) -> None:
        """An instance at C{max_connections} in-flight requests takes no more."""
        config = parse_config({
            "pools": {"p": {"instances": [
                {"id": "x", "url": "http://x.test:1", "max_connections": 2}]}},
            "routes": [{"path": "/*", "pool": "p"}],
        }, environ={})
        reg = Registry(config, Clock())
        x = reg.instance("x")
        assert x is not None
        x.active = 1
        self.assertTrue(x.available())
        x.active = 2
        self.assertFalse(x.available())
        self.assertIsNone(reg.pools["p"].take())
        x.active = 1
        self.assertIs(reg.pools["p"].take(), x)

    def test_choose_excludes(self) -> None:
        """L{Pool.take} skips excluded ids and returns None when nothing is left."""
        self.assertEqual(self.pool.take(exclude={"i1"}).id, "i2")
        self.assertIsNone(self.pool.take(exclude={"i1", "i2"}))

    def test_iteration(self) -> None:
        """Iterating the registry yields every instance of every pool."""
        self.assertEqual([i.id for i in self.registry], ["i1", "i2"])
        self.assertIs(self.pool.by_id["i2"], self.registry.instance("i2"))


class ProbeTransitionTests(SynchronousTestCase):
    """Probe results move an instance between healthy and unhealthy by thresholds."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = registry(self.clock)
        self.i1 = self.registry.instance("i1")
        self.seen: list[tuple[str, bool]] = []
        self.registry.subscribe(lambda inst: self.seen.append((inst.id, inst.healthy)))
        del self.seen[:]

    def test_unhealthy_threshold(self) -> None:
        """Only the third consecutive failure marks the instance down."""
        self.registry.probe_result(self.i1, False)
        self.clock.advance(5)
        self.registry.probe_result(self.i1, False)
        self.assertTrue(self.i1.healthy)
        self.clock.advance(5)
        self.registry.probe_result(self.i1, False)
        self.assertFalse(self.i1.healthy)
        self.assertEqual(self.seen, [("i1", False)])

    def test_success_resets_failures(self) -> None:
        """A success between failures restarts the count."""
        for ok in (False, False, True, False, False):
            self.registry.probe_result(self.i1, ok)
        self.assertTrue(self.i1.healthy)
        self.assertEqual(self.seen, [])

    def test_healthy_threshold(self) -> None:
        """A down instance needs two consecutive successes to come back."""
        for _ in range(3):
            self.registry.probe_result(self.i1, False)
        self.registry.probe_result(self.i1, True)
        self.assertFalse(self.i1.healthy)
        self.registry.probe_result(self.i1, False)
        self.registry.probe_result(self.i1, True)
        self.assertFalse(self.i1.healthy)
        self.registry.probe_result(self.i1, True)
        self.assertTrue(self.i1.healthy)
        self.assertTrue(self.i1.available())
        self.assertEqual(self.seen, [("i1", False), ("i1", True)])

    def test_health_body_kept(self) -> None:
        """The last health body is kept, and an empty result keeps the previous one."""
        self.registry.probe_result(self.i1, True, {"gpu_memory_used_percent": 40})
        self.assertEqual(self.i1.health, {"gpu_memory_used_percent": 40})
        self.registry.probe_result(self.i1, False)
        self.assertEqual(self.i1.health, {"gpu_memory_used_percent": 40})

    def test_reported_models_kept(self) -> None:
        """Models a probe reports are remembered on the instance."""
        self.registry.probe_result(self.i1, True, {"data": [{"id": "m1"}, {"id": "m2"}]})
        self.assertEqual(self.i1.models, ("m1", "m2"))
        self.registry.probe_result(self.i1, True, {"status": "ok"})
        self.assertEqual(self.i1.models, ("m1", "m2"))

    def test_unhealthy_forgets_affinity(self) -> None:
        """Sessions pinned to an instance that goes down are forgotten."""
        reg = registry(self.clock, session_affinity={"method": "header"})
        pool = reg.pools["main"]
        i1 = reg.instance("i1")
        pool.affinity.set("session-1", "i1")
        self.assertEqual(pool.affinity.get("session-1"), "i1")
        for _ in range(3):
            reg.probe_result(i1, False)
        self.assertIsNone(pool.affinity.get("session-1"))

    def test_drain_forgets_affinity(self) -> None:
        """Draining an instance forgets the sessions pinned to it."""
        reg = registry(self.clock, session_affinity={"method": "cookie"})
        pool = reg.pools["main"]
        pool.affinity.set("s", "i2")
        reg.set_drained("i2", True)
        self.assertIsNone(pool.affinity.get("s"))


class ListenerTests(SynchronousTestCase):
    """Listeners hear about every instance at once and about each change after."""

    def test_subscribe_and_changes(self) -> None:
        """A new listener is told every instance; weight, drain and health changes follow."""
        reg = registry()
        seen: list[str] = []
        reg.subscribe(lambda inst: seen.append(inst.id))
        self.assertEqual(seen, ["i1", "i2"])
        reg.set_weight("i2", 3)
        reg.set_drained("i1", True)
        reg.set_drained("i1", False)
        i2 = reg.instance("i2")
        for _ in range(3):
            reg.probe_result(i2, False)
        self.assertEqual(seen, ["i1", "i2", "i2", "i1", "i1", "i2"])

    def test_no_change_no_call(self) -> None:
        """Probe results that change nothing do not call listeners."""
        reg = registry()
        seen: list[Instance] = []
        reg.subscribe(seen.append)
        del seen[:]
        reg.probe_result(reg.instance("i1"), True, {"x": 1})
        reg.probe_result(reg.instance("i1"), False)
        self.assertEqual(seen, [])


class PassiveEjectionTests(SynchronousTestCase):
    """Failures of live requests eject an instance, nginx-style, within limits."""

    def test_eject_after_max_fails(self) -> None:
        """C{max_fails} failures within C{fail_timeout} eject for C{fail_timeout}."""
        clock = Clock()
        reg = registry(clock, passive={"max_fails": 3, "fail_timeout": "30s"})
        i1 = reg.instance("i1")
        seen: list[str] = []
        reg.subscribe(lambda inst: seen.append(inst.state))
        del seen[:]
        fail(i1)
        fail(i1)
        self.assertTrue(i1.available())
        fail(i1)
        self.assertFalse(i1.available())
        self.assertEqual(i1.state, "ejected")
        self.assertEqual(i1.failures, 3)
        self.assertEqual(seen, ["ejected"])
        clock.advance(29.9)
        self.assertEqual(i1.state, "ejected")
        clock.advance(0.1)
        self.assertEqual(i1.state, "healthy")
        self.assertTrue(i1.available())

    def test_success_resets_count(self) -> None:
        """A success between failures restarts the count."""
        reg = registry(passive={"max_fails": 2})
        i1 = reg.instance("i1")
        fail(i1)
        i1.pool.record(i1, OK)
        fail(i1)
        self.assertTrue(i1.available())

    def test_window(self) -> None:
        """Failures further apart than C{fail_timeout} do not add up."""
        clock = Clock()
        reg = registry(clock, passive={"max_fails": 2, "fail_timeout": "10s"})
        i1 = reg.instance("i1")
        fail(i1)
        clock.advance(10)
        fail(i1)
        self.assertTrue(i1.available())
        fail(i1)
        self.assertFalse(i1.available())

    def test_max_ejection_percent(self) -> None:
        """With 50%, a pool of two ejects one instance but never both."""
        reg = registry(passive={"max_fails": 1, "max_ejection_percent": 50})
        i1, i2 = reg.instance("i1"), reg.instance("i2")
        fail(i1)
        self.assertEqual(i1.state, "ejected")
        for _ in range(5):
            fail(i2)
        self.assertEqual(i2.state, "healthy")
        self.assertTrue(i2.available())
        self.assertEqual(i2.failures, 5)

    def test_single_instance_never_ejected(self) -> None:
        """The only instance of a pool is never ejected (nowhere else to go)."""
        reg = registry(instances=1, passive={"max_fails": 1})
        i1 = reg.instance("i1")
        for _ in range(10):
            fail(i1)
        self.assertTrue(i1.available())

    def test_max_fails_zero(self) -> None:
        """C{max_fails: 0} disables passive ejection."""
        reg = registry(passive={"max_fails": 0})
        i1 = reg.instance("i1")
        for _ in range(10):
            fail(i1)
        self.assertTrue(i1.available())
        self.assertEqual(i1.failures, 10)


class ClientBoundTests(SynchronousTestCase):
    """
    In a run of failures from one client address with no success between
    them, at most one per instance per C{fail_timeout} counts toward the
    instance's passive count and breakers: a client whose own requests make
    every instance fail cannot eject them (issue 7, failure 6).
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.breakers = Recorder()
        self.reg = Registry(self.reg_config(), self.clock, self.breakers)
        self.i1 = self.reg.instance("i1")

    def reg_config(self) -> Any:
        cfg = {"instances": [{"id": f"i{n}", "url": f"http://i{n}.test:8000"}
                             for n in (1, 2, 3)],
               "passive": {"max_fails": 3, "fail_timeout": "30s"}}
        return parse_config({"pools": {"main": cfg},
                             "routes": [{"path": "/*", "pool": "main"}]}, environ={})

    def test_one_client_does_not_eject(self) -> None:
        """
        Twenty failures from one client count once: the instance stays in,
        its breakers hear one failure, and the failures still show in its
        statistics.
        """
        for _ in range(20):
            self.i1.pool.record(self.i1, "5xx", client="198.51.100.7")
            self.clock.advance(1)
        self.assertEqual(self.i1.state, "healthy")
        self.assertTrue(self.i1.available())
        self.assertEqual(self.i1.failures, 20)
        self.assertEqual(self.breakers.outcomes.count(("i1", "5xx")), 1)
        self.assertEqual(self.breakers.outcomes.count(("i1", "cancelled")), 19)

    def test_three_clients_eject(self) -> None:
        """Failures from three different clients eject (C{max_fails: 3})."""
        for client in ("198.51.100.1", "198.51.100.2"):
            self.i1.pool.record(self.i1, "5xx", client=client)
        self.assertEqual(self.i1.state, "healthy")
        self.i1.pool.record(self.i1, "timeout", client="2001:db8::3")
        self.assertEqual(self.i1.state, "ejected")

    def test_counts_again_after_fail_timeout(self) -> None:
        """A client's failure counts again once C{fail_timeout} has passed since its last."""
        self.i1.pool.record(self.i1, "5xx", client="a")
        self.clock.advance(29)
        self.i1.pool.record(self.i1, "5xx", client="a")
        self.assertEqual(self.i1.passive.failures, 1)
        self.clock.advance(1)
        self.i1.pool.record(self.i1, "5xx", client="a")
        self.assertEqual(self.breakers.outcomes,
                         [("i1", "5xx"), ("i1", "cancelled"), ("i1", "5xx")])

    def test_success_forgives(self) -> None:
        """
        A client served by another instance between its failures on one is
        evidence against that instance: its failures count (a lone client
        still gets a failing instance ejected).
        """
        i2 = self.reg.instance("i2")
        for _ in range(2):
            self.i1.pool.record(self.i1, "5xx", client="a")
            i2.pool.record(i2, OK, client="a")
        self.assertEqual(self.i1.state, "healthy")
        self.i1.pool.record(self.i1, "5xx", client="a")
        self.assertEqual(self.i1.state, "ejected")

    def test_per_instance(self) -> None:
        """The bound is per instance: one client's failure counts on each instance once."""
        for inst in self.i1.pool.instances:
            inst.pool.record(inst, "5xx", client="a")
            self.assertEqual(inst.passive.failures, 1)

    def test_refusals_not_bound(self) -> None:
        """A refused connection (nothing reached the instance) is not the client's doing."""
        self.i1.pool.record(self.i1, "5xx", client="a")
        self.i1.pool.record(self.i1, "refused", reached=False, client="a")
        self.assertEqual(self.i1.state, "ejected")
        self.assertEqual(self.breakers.outcomes[-1], ("i1", "refused"))

    def test_without_client(self) -> None:
        """Callers that name no client count every failure, as before."""
        for _ in range(3):
            fail(self.i1)
        self.assertEqual(self.i1.state, "ejected")


class SlowStartTests(SynchronousTestCase):
    """An instance that comes back ramps its weight up over C{slow_start}."""

    def test_ramp(self) -> None:
        """After recovery the weight grows linearly (floor 5%) to the full weight."""
        clock = Clock()
        reg = registry(clock, slow_start="10s",
                       instances=1, health_check={"healthy_threshold": 1,
                                                  "unhealthy_threshold": 1})
        i1 = reg.instance("i1")
        reg.set_weight("i1", 4)
        self.assertEqual(i1.weight, 4.0)
        reg.probe_result(i1, False)
        clock.advance(100)
        reg.probe_result(i1, True)
        self.assertEqual(i1.weight, 4.0 * 0.05)
        clock.advance(5)
        self.assertAlmostEqual(i1.weight, 2.0)
        clock.advance(2.5)
        self.assertAlmostEqual(i1.weight, 3.0)
        clock.advance(2.5)
        self.assertEqual(i1.weight, 4.0)
        clock.advance(1)
        self.assertEqual(i1.weight, 4.0)
        self.assertEqual(i1.base_weight, 4.0)

    def test_no_slow_start(self) -> None:
        """Without C{slow_start} a recovered instance gets its full weight at once."""
        clock = Clock()
        reg = registry(clock, instances=1,
                       health_check={"healthy_threshold": 1, "unhealthy_threshold": 1})
        i1 = reg.instance("i1")
        reg.probe_result(i1, False)
        reg.probe_result(i1, True)
        self.assertEqual(i1.weight, 1.0)

    def test_startup_full_weight(self) -> None:
        """Instances start at full weight; slow start applies only to a return."""
        reg = registry(slow_start="1m")
        self.assertEqual([i.weight for i in reg], [1.0, 1.0])


class SuccessRateTests(SynchronousTestCase):
    """L{Instance.success_rate} is the share of requests that did not fail."""

    def test_rate(self) -> None:
        """No requests is a rate of 1; otherwise (requests - failures) / requests."""
        reg = registry()
        i1 = reg.instance("i1")
        self.assertEqual(i1.success_rate(), 1.0)
        i1.requests = 4
        i1.failures = 1
        self.assertEqual(i1.success_rate(), 0.75)


class ReportedModelsTests(SynchronousTestCase):
    """L{reported_models} reads model names from probe answers."""

    def test_openai(self) -> None:
        """OpenAI C{/v1/models}: C{data[].id}."""
        self.assertEqual(reported_models({"object": "list", "data": [{"id": "a"}, {"id": "b"}]}),
                         ("a", "b"))

    def test_ollama(self) -> None:
        """Ollama C{/api/tags}: C{models[].name}."""
        self.assertEqual(reported_models({"models": [{"name": "qwen3:8b"}, {"size": 3}]}),
                         ("qwen3:8b",))

    def test_model_field(self) -> None:
        """A health body's C{model} string counts too."""
        self.assertEqual(reported_models({"status": "ok", "model": "sim-small"}), ("sim-small",))

    def test_nothing(self) -> None:
        """Bodies without models report none, whatever their shape."""
        self.assertEqual(reported_models({}), ())
        self.assertEqual(reported_models({"data": ["x", 1], "model": 3}), ())


class AdoptTests(SynchronousTestCase):
    """L{Registry.adopt}: instance state carried across a config reload."""

    def reload(self, old: Registry, **pool: Any) -> Registry:
        new = registry(old.clock, **pool)
        seen: list[str] = []
        new.subscribe(lambda inst: seen.append(inst.id))
        del seen[:]
        new.adopt(old)
        self.told = seen
        return new

    def test_carried(self) -> None:
        """
        An instance that keeps its id and URL keeps its drain state, probe
        state, refused-connection mark, health body, models and a runtime
        weight; listeners hear about each one carried.
        """
        clock = Clock()
        old = registry(clock, health_check={"unhealthy_threshold": 1})
        i1, i2 = old.instance("i1"), old.instance("i2")
        old.set_drained("i1", True)
        old.set_weight("i1", 7)
        old.probe_result(i2, False, {"data": [{"id": "m"}]})
        i2.pool.record(i2, "refused", reached=False)
        new = self.reload(old)
        n1, n2 = new.instance("i1"), new.instance("i2")
        self.assertIsNot(n1, i1)
        self.assertEqual((n1.drained, n1.base_weight, n1.state), (True, 7.0, "draining"))
        self.assertFalse(n2.healthy)
        self.assertEqual((n2.health, n2.models), ({"data": [{"id": "m"}]}, ("m",)))
        self.assertEqual(n2.down_until, i2.down_until)
        self.assertEqual(self.told, ["i1", "i2"])

    def test_weight_from_file_wins(self) -> None:
        """
        A weight changed in the file takes effect, unless one was set at
        runtime (admin, CLI): that one survives.
        """
        def weighted(weight: int) -> Registry:
            return Registry(parse_config({
                "pools": {"main": {"instances": [
                    {"id": "i1", "url": "http://i1.test:8000", "weight": weight},
                    {"id": "i2", "url": "http://i2.test:8000", "weight": weight}]}},
                "routes": [{"path": "/*", "pool": "main"}]}, environ={}), Clock())

        old = weighted(3)
        old.set_weight("i2", 7)
        new = weighted(5)
        new.adopt(old)
        self.assertEqual(new.instance("i1").base_weight, 5.0)
        self.assertEqual(new.instance("i2").base_weight, 7.0)
        newer = weighted(2)
        newer.adopt(new)
        self.assertEqual(newer.instance("i1").base_weight, 2.0)
        self.assertEqual(newer.instance("i2").base_weight, 7.0)

    def test_new_url_starts_afresh(self) -> None:
        """An instance whose URL changed, or a new id, starts with fresh state."""
        old = registry()
        old.set_drained("i1", True)
        new = Registry(parse_config({
            "pools": {"main": {"instances": [{"id": "i1", "url": "http://elsewhere.test:1"},
                                             {"id": "i9", "url": "http://i9.test:1"}]}},
            "routes": [{"path": "/*", "pool": "main"}]}, environ={}), Clock())
        new.adopt(old)
        self.assertFalse(new.instance("i1").drained)
        self.assertEqual(new.instance("i9").state, "healthy")
