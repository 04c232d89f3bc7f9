"""Tests for L{clawproxy.backends.prober}."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent
from twisted.web.resource import Resource

from clawproxy.backends.prober import DISCOVERY_INTERVAL, HealthProber
from clawproxy.backends.registry import Registry
from clawproxy.config import parse_config


class HealthEndpoint(Resource):
    """
    A fake backend: answers every path with C{status} and C{body}, and
    remembers what it was asked.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.status = 200
        self.body: bytes = json.dumps({"status": "ok"}).encode()
        self.seen: list[tuple[bytes, bytes, bytes | None]] = []

    def render(self, request: Any) -> bytes:
        self.seen.append((request.getHeader(b"host"), request.uri,
                          request.getHeader(b"user-agent")))
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        return self.body


class SilentAgent:
    """An L{IAgent} whose requests never get an answer (but can be cancelled)."""

    def __init__(self) -> None:
        self.pending: list[Deferred[Any]] = []
        self.cancelled = 0

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        d: Deferred[Any] = Deferred(cancel)
        self.pending.append(d)
        return d


class RaisingAgent:
    """An L{IAgent} whose C{request} raises at once."""

    calls = 0

    def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls += 1
        raise RuntimeError("agent exploded")


class KeyedEndpoint(HealthEndpoint):
    """A backend that answers 401 unless the probe carries its key (LiteLLM, vLLM)."""

    def render(self, request: Any) -> bytes:
        self.seen.append((request.getHeader(b"authorization"), request.uri,
                          request.getHeader(b"x-extra")))
        if request.getHeader(b"authorization") != b"Bearer sk-master":
            request.setResponseCode(401)
            return b'{"error": "unauthorized"}'
        return self.body


def make_registry(clock: Any, instances: int = 1, environ: dict[str, str] | None = None,
                  **health: Any) -> Registry:
    """Pool C{main} with C{instances} instances and the given C{health_check}."""
    hc: dict[str, Any] = {"interval": "5s", "timeout": "2s", "healthy_threshold": 2,
                          "unhealthy_threshold": 3}
    hc.update(health)
    config = parse_config({
        "pools": {"main": {
            "instances": [{"id": f"i{n}", "url": f"http://i{n}.test:8000"}
                          for n in range(1, instances + 1)],
            "health_check": hc,
        }},
        "routes": [{"path": "/*", "pool": "main"}],
    }, environ=environ or {})
    return Registry(config, clock)


class ProberTests(SynchronousTestCase):
    """The prober drives instance health from periodic probes."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = HealthEndpoint()
        self.agent = RequestTraversalAgent(self.backend)

    def start(self, registry: Registry, agent: Any = None) -> HealthProber:
        prober = HealthProber(registry, agent or self.agent, self.clock)
        prober.startService()
        self.addCleanup(lambda: prober.running and prober.stopService())
        return prober

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.agent.flush()

    def test_first_probe_at_start(self) -> None:
        """Starting probes every instance at once, at C{url + path}, as clawproxy-health."""
        reg = make_registry(self.clock, instances=2, path="/api/tags")
        self.start(reg)
        health = [s for s in self.backend.seen if s[2] == b"clawproxy-health"]
        self.assertEqual(sorted(health), [
            (b"i1.test:8000", b"/api/tags", b"clawproxy-health"),
            (b"i2.test:8000", b"/api/tags", b"clawproxy-health"),
        ])

    def test_default_path(self) -> None:
        """An openai pool is probed at C{/v1/models} by default."""
        self.start(make_registry(self.clock))
        self.assertEqual([uri for _, uri, _ in self.backend.seen], [b"/v1/models"])

    def test_interval(self) -> None:
        """Probes repeat every C{interval}."""
        self.start(make_registry(self.clock))
        self.advance(4.9)
        self.assertEqual(len(self.backend.seen), 1)
        self.advance(0.1)
        self.assertEqual(len(self.backend.seen), 2)
        self.advance(5)
        self.advance(5)
        self.assertEqual(len(self.backend.seen), 4)

    def test_goes_unhealthy_and_back(self) -> None:
        """
        An instance answering 500 goes unhealthy at the third failed probe and
        comes back at the second good one.
        """
        reg = make_registry(self.clock)
        inst = reg.instance("i1")
        self.backend.status = 500
        self.start(reg)
        self.advance(5)
        self.assertTrue(inst.healthy)
        self.advance(5)
        self.assertFalse(inst.healthy)
        self.assertEqual(inst.state, "unhealthy")
        self.backend.status = 200
        self.advance(5)
        self.assertFalse(inst.healthy)
        self.advance(5)
        self.assertTrue(inst.healthy)
        self.assertTrue(inst.available())

    def test_expected_status(self) -> None:
        """A status other than C{expected_status} is a failure, even a 2xx."""
        reg = make_registry(self.clock, expected_status=204, unhealthy_threshold=1)
        self.start(reg)
        self.assertFalse(reg.instance("i1").healthy)

    def test_health_body_kept(self) -> None:
        """The JSON body of a probe is kept on the instance, with its models."""
        self.backend.body = json.dumps({
            "gpu_memory_used_percent": 42.5, "data": [{"id": "sim-small"}],
        }).encode()
        reg = make_registry(self.clock)
        self.start(reg)
        inst = reg.instance("i1")
        self.assertEqual(inst.health, {"gpu_memory_used_percent": 42.5,
                                       "data": [{"id": "sim-small"}]})
        self.assertEqual(inst.models, ("sim-small",))

    def test_non_json_body(self) -> None:
        """A body that is not a JSON object is fine for health and keeps no health data."""
        self.backend.body = b"OK"
        reg = make_registry(self.clock, unhealthy_threshold=1)
        self.start(reg)
        inst = reg.instance("i1")
        self.assertTrue(inst.healthy)
        self.assertIsNone(inst.health)

    def test_expected_body_contains(self) -> None:
        """With C{expected_body_contains}, a 200 without that text is a failure."""
        reg = make_registry(self.clock, expected_body_contains="ready",
                            unhealthy_threshold=1, healthy_threshold=1)
        self.backend.body = b'{"status": "starting"}'
        self.start(reg)
        inst = reg.instance("i1")
        self.assertFalse(inst.healthy)
        self.backend.body = b'{"status": "ready"}'
        self.advance(5)
        self.assertTrue(inst.healthy)

    def test_headers(self) -> None:
        """
        C{health_check.headers} (with C{${VAR}} from the environment) go with every probe,
        so a backend that needs a key passes its checks; without them it fails them.
        """
        backend = KeyedEndpoint()
        self.agent = RequestTraversalAgent(backend)
        reg = make_registry(self.clock, environ={"MASTER_KEY": "sk-master"},
                            unhealthy_threshold=1,
                            headers={"Authorization": "Bearer ${MASTER_KEY}", "X-Extra": 1})
        self.start(reg)
        self.advance(5)
        self.assertTrue(reg.instance("i1").healthy)
        self.assertEqual(backend.seen, [(b"Bearer sk-master", b"/v1/models", b"1")] * 2)

        keyless = make_registry(self.clock, unhealthy_threshold=1)
        self.start(keyless)
        self.assertFalse(keyless.instance("i1").healthy)
        self.assertEqual(backend.seen[-1], (None, b"/v1/models", None))

    def test_timeout_is_failure(self) -> None:
        """
        A probe with no answer within C{timeout} is cancelled and counts as a
        failure; rounds never overlap, so the next starts one interval later.
        """
        reg = make_registry(self.clock)
        agent = SilentAgent()
        self.start(reg, agent)
        inst = reg.instance("i1")
        self.clock.advance(1.9)
        self.assertEqual((len(agent.pending), agent.cancelled), (1, 0))
        self.clock.advance(0.1)
        self.assertEqual(agent.cancelled, 1)
        self.assertEqual(inst.probe.consecutive_failures, 1)
        self.clock.advance(3)  # t=5: second probe
        self.assertEqual(len(agent.pending), 2)
        self.clock.advance(2)  # t=7: it times out
        self.clock.advance(3)  # t=10: third probe
        self.assertTrue(inst.healthy)
        self.clock.advance(2)  # t=12: it times out
        self.assertEqual(agent.cancelled, 3)
        self.assertFalse(inst.healthy)

    def test_agent_raising_is_failure(self) -> None:
        """An agent that raises counts as a failed probe; probing goes on."""
        reg = make_registry(self.clock, unhealthy_threshold=2)
        agent = RaisingAgent()
        self.start(reg, agent)
        self.clock.advance(5)
        self.assertEqual(agent.calls, 2)
        self.assertFalse(reg.instance("i1").healthy)
        self.clock.advance(5)
        self.assertEqual(agent.calls, 3)

    def test_disabled(self) -> None:
        """
        A pool with C{health_check.enabled: false} is never probed, nor asked
        for its models.
        """
        reg = make_registry(self.clock, enabled=False)
        self.start(reg)
        self.advance(DISCOVERY_INTERVAL)
        self.assertEqual(self.backend.seen, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_service(self) -> None:
        """Stopping the prober stops the loop: no more probes, no delayed calls."""
        reg = make_registry(self.clock, instances=2)
        prober = self.start(reg)
        self.assertNotEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(prober.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.advance(60)
        self.assertEqual(len(self.backend.seen), 2)

    def test_stop_during_probe(self) -> None:
        """Stopping cancels a probe in flight; its outcome does not count; no timer is left."""
        reg = make_registry(self.clock, unhealthy_threshold=1)
        agent = SilentAgent()
        prober = self.start(reg, agent)
        prober.stopService()
        self.assertEqual(agent.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(reg.instance("i1").healthy)
        self.assertEqual(reg.instance("i1").probe.consecutive_failures, 0)
        self.clock.advance(60)
        self.assertEqual(len(agent.pending), 1)

    def test_stop_with_real_agent(self) -> None:
        """
        With Twisted's own Agent (on a memory reactor, so connecting never
        completes), stopping leaves no connection attempt or timer behind.
        """
        reactor = MemoryReactorClock()
        reg = make_registry(reactor, instances=2)
        prober = HealthProber(reg, Agent(reactor), reactor)
        prober.startService()
        self.assertEqual(len(reactor.tcpClients), 2)
        prober.stopService()
        self.assertEqual([c for c in reactor.getDelayedCalls() if c.active()], [])
        self.assertTrue(all(i.healthy for i in reg))


def discovery_registry(clock: Any, protocol: str = "openai", **health: Any) -> Registry:
    """Pool C{main} (instances i1, i2) of C{protocol}, health checks as given (at C{/health})."""
    config = parse_config({
        "pools": {"main": {
            "protocol": protocol,
            "instances": [{"id": "i1", "url": "http://i1.test:8000"},
                          {"id": "i2", "url": "http://i2.test:8000"}],
            "health_check": health or {"path": "/health"},
        }},
        "routes": [{"path": "/*", "pool": "main"}],
    }, environ={})
    return Registry(config, clock)


class ModelBackend(Resource):
    """Answers C{/v1/models} and C{/api/tags} with the models of each host, or C{status}."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.models: dict[bytes, list[str]] = {}
        self.status = 200
        self.seen: list[tuple[bytes, bytes, bytes | None]] = []

    def render(self, request: Any) -> bytes:
        host = request.getHeader(b"host")
        self.seen.append((host, request.path, request.getHeader(b"user-agent")))
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        names = self.models.get(host.split(b".")[0], [])
        if request.path == b"/health":
            return b'{"status": "ok"}'
        if request.path == b"/api/tags":
            return json.dumps({"models": [{"name": n, "model": n} for n in names]}).encode()
        return json.dumps({"object": "list",
                           "data": [{"id": n, "object": "model"} for n in names]}).encode()


class DiscoveryTests(SynchronousTestCase):
    """The prober learns which models each instance serves."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = ModelBackend()
        self.agent = RequestTraversalAgent(self.backend)

    def start(self, registry: Registry, agent: Any = None) -> HealthProber:
        prober = HealthProber(registry, agent or self.agent, self.clock)
        prober.startService()
        self.addCleanup(lambda: prober.running and prober.stopService())
        self.agent.flush()
        return prober

    def test_openai_models(self) -> None:
        """An openai pool's instances are asked C{GET /v1/models} at start; the pool knows all."""
        self.backend.models = {b"i1": ["qwen3:8b", "qwen3:32b"], b"i2": ["llama3"]}
        reg = discovery_registry(self.clock)
        self.start(reg)
        self.assertEqual(reg.instance("i1").models, ("qwen3:8b", "qwen3:32b"))
        self.assertEqual(reg.pools["main"].discovered, {"qwen3:8b", "qwen3:32b", "llama3"})
        self.assertEqual({(p, ua) for _, p, ua in self.backend.seen if p != b"/health"},
                         {(b"/v1/models", b"clawproxy-discovery")})

    def test_ollama_tags(self) -> None:
        """An ollama pool's instances are asked C{GET /api/tags}."""
        self.backend.models = {b"i1": ["qwen3:8b"]}
        reg = discovery_registry(self.clock, protocol="ollama")
        self.start(reg)
        self.assertEqual(reg.instance("i1").models, ("qwen3:8b",))
        self.assertEqual({p for _, p, _ in self.backend.seen}, {b"/api/tags", b"/health"})

    def test_http_pool_not_asked(self) -> None:
        """An C{http} pool serves no models: nothing is asked."""
        self.start(discovery_registry(self.clock, protocol="http"))
        self.clock.advance(DISCOVERY_INTERVAL)
        self.agent.flush()
        self.assertEqual({p for _, p, _ in self.backend.seen}, {b"/health"})

    def test_refreshed_and_failure_keeps_last(self) -> None:
        """
        The list is asked again every L{DISCOVERY_INTERVAL}; a failed answer
        (5xx, garbage, a refused connection) keeps the last list known.
        """
        self.backend.models = {b"i1": ["a"]}
        reg = discovery_registry(self.clock)
        self.start(reg)
        self.backend.models = {b"i1": ["a", "b"]}
        self.clock.advance(DISCOVERY_INTERVAL - 1)
        self.agent.flush()
        self.assertEqual(reg.instance("i1").models, ("a",))
        self.clock.advance(1)
        self.agent.flush()
        self.assertEqual(reg.instance("i1").models, ("a", "b"))
        self.backend.status = 500
        self.clock.advance(DISCOVERY_INTERVAL)
        self.agent.flush()
        self.assertEqual(reg.instance("i1").models, ("a", "b"))
        self.assertEqual(len([s for s in self.backend.seen if s[1] == b"/v1/models"]), 6)

    def test_agent_failure_keeps_last(self) -> None:
        """An agent that fails (no backend) leaves the models unknown, without errors logged."""
        reg = discovery_registry(self.clock)
        self.start(reg, RaisingAgent())
        self.assertEqual(reg.pools["main"].discovered, frozenset())

    def test_health_probe_on_models_path(self) -> None:
        """A pool whose health check probes C{/v1/models} learns from the probes only."""
        self.backend.models = {b"i1": ["a"]}
        reg = discovery_registry(self.clock, path="/v1/models")
        self.start(reg)
        self.assertEqual(reg.instance("i1").models, ("a",))
        self.assertEqual({ua for _, _, ua in self.backend.seen}, {b"clawproxy-health"})

    def test_long_list_from_health_probes(self) -> None:
        """A model list longer than a health body is kept whole when probes ask for it."""
        names = [f"provider/model-{n:05d}" for n in range(3000)]
        self.backend.models = {b"i1": names}
        reg = discovery_registry(self.clock, path="/v1/models")
        self.start(reg)
        self.assertEqual(reg.instance("i1").models, tuple(names))
        self.assertIsNone(reg.instance("i1").health)

    def test_health_probe_elsewhere(self) -> None:
        """A pool probed at C{/health} is still asked for its models."""
        self.backend.models = {b"i1": ["a"]}
        reg = discovery_registry(self.clock)
        self.start(reg)
        self.assertEqual(reg.instance("i1").models, ("a",))
        self.assertEqual({ua for _, _, ua in self.backend.seen},
                         {b"clawproxy-health", b"clawproxy-discovery"})
