"""
Model discovery and model fallback chains on real sockets: simulators
behind a real gateway.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from tests.integration.helpers import (
    Harness,
    RunningGateway,
    bounded,
    error_of,
    refusing_port,
    wait_for,
)
from tests.integration.test_streaming import _Mute
from tests.redis_server import RedisServer, require_redis_server

BIG = {"model": "qwen3:32b", "messages": [{"role": "user", "content": "tell me more"}]}
CHAIN = {"fallbacks": {"qwen3:32b": ["qwen3:8b"]}}
CHAT = [{"path": "/v1/chat/completions", "methods": ["POST"]}]



def failing_big_pool(case: TestCase) -> tuple[Harness, Any, Any, dict[str, Any]]:
    """Pools C{big} (qwen3:32b, a simulator answering every completion 500) and C{small}."""
    h = Harness(case)
    big = h.simulator("big-1", model="qwen3:32b", failure_rate=1.0)
    small = h.simulator("small-1", model="qwen3:8b")
    pools = {
        "big": {"models": ["qwen3:32b"], "instances": [big.instance()],
                "health_check": {"enabled": False}},
        "small": {"models": ["qwen3:8b"], "instances": [small.instance()],
                  "health_check": {"enabled": False}},
    }
    return h, big, small, pools


class ModelFallbackTests(TestCase):
    """The primary model's pool fails: the next model of the chain answers."""

    timeout = 30

    async def start(self, big: dict[str, Any]) -> tuple[Harness, RunningGateway]:
        h = Harness(self)
        small = h.simulator("small-1", model="qwen3:8b")
        pools = {
            "big": {"models": ["qwen3:32b"], "health_check": {"enabled": False}, **big},
            "small": {"models": ["qwen3:8b"], "instances": [small.instance()],
                      "health_check": {"enabled": False}},
        }
        gw = await h.gateway(h.config(pools, CHAT, models=CHAIN))
        return h, gw

    async def post(self, h: Harness, gw: RunningGateway, body: dict[str, Any] = BIG
                   ) -> tuple[Any, bytes]:
        client = h.client()
        response = await bounded(client.post(gw.url + "/v1/chat/completions", json=body))
        return response, await bounded(response.content())

    def assertFellBack(self, h: Harness, response: Any, content: bytes) -> None:
        """The qwen3:8b simulator answered, as qwen3:8b, and the client and the log know."""
        self.assertEqual(response.code, 200, content)
        self.assertEqual(response.headers.getRawHeaders("x-clawproxy-fallback-model"),
                         ["qwen3:8b"])
        self.assertEqual(response.headers.getRawHeaders("x-sim-instance"), ["small-1"])
        self.assertEqual(json.loads(content)["model"], "qwen3:8b")
        with open(h.path("access.log")) as f:
            line = json.loads(f.read().splitlines()[-1])
        self.assertEqual((line["model"], line["pool"], line["instance"]),
                         ("qwen3:8b", "small", "small-1"))

    async def test_refusing_pool(self) -> None:
        """Every instance of the primary model's pool refuses connections."""
        port = refusing_port(self)
        h, gw = await self.start(
            {"instances": [{"id": "big-1", "url": f"http://127.0.0.1:{port}"}]})
        response, content = await self.post(h, gw)
        self.assertFellBack(h, response, content)

    async def test_failing_pool(self) -> None:
        """The primary model's simulator answers every completion with a 500."""
        h, big, _, pools = failing_big_pool(self)
        gw = await h.gateway(h.config(pools, CHAT, models=CHAIN))
        response, content = await self.post(h, gw)
        self.assertFellBack(h, response, content)
        self.assertEqual(big.resource.requests_failed, 1)
        # A stream falls back the same way, before any byte reached the client.
        response, content = await self.post(h, gw, {**BIG, "stream": True})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("x-clawproxy-fallback-model"),
                         ["qwen3:8b"])
        events = [json.loads(line[6:]) for line in content.decode().splitlines()
                  if line.startswith("data: {")]
        self.assertTrue(events)
        self.assertEqual({e["model"] for e in events}, {"qwen3:8b"})
        self.assertEqual(big.resource.requests_failed, 2)

    async def test_tokens_and_spend_of_the_answering_model(self) -> None:
        """
        After a fallback, tokens and spend are counted for the model that
        answered (qwen3:8b, at its price), by the instance that answered;
        nothing for the model asked for.
        """
        h, big, _, pools = failing_big_pool(self)
        prices = {"qwen3:32b": {"prompt": 100.0, "completion": 100.0},
                  "qwen3:8b": {"prompt": 1.0, "completion": 2.0}}
        gw = await h.gateway(h.config(pools, CHAT, models={**CHAIN, "prices": prices}))
        response, content = await self.post(h, gw)
        self.assertFellBack(h, response, content)
        usage = json.loads(content)["usage"]
        self.assertGreater(usage["completion_tokens"], 0)
        get = gw.gateway.metrics.registry.get_sample_value
        for kind in ("prompt", "completion"):
            self.assertEqual(get("clawproxy_tokens_total",
                                 {"agent": "-", "model": "qwen3:8b", "kind": kind}),
                             usage[kind + "_tokens"])
            self.assertIsNone(get("clawproxy_tokens_total",
                                  {"agent": "-", "model": "qwen3:32b", "kind": kind}))
            self.assertEqual(get("clawproxy_instance_tokens_total",
                                 {"pool": "small", "instance": "small-1", "kind": kind}),
                             usage[kind + "_tokens"])
        self.assertAlmostEqual(get("clawproxy_spend_total", {"agent": "-", "model": "qwen3:8b"}),
                               (usage["prompt_tokens"] * 1.0
                                + usage["completion_tokens"] * 2.0) / 1000)
        self.assertIsNone(get("clawproxy_spend_total", {"agent": "-", "model": "qwen3:32b"}))
        with open(h.path("access.log")) as f:
            line = json.loads(f.read().splitlines()[-1])
        self.assertEqual((line["prompt_tokens"], line["completion_tokens"]),
                         (usage["prompt_tokens"], usage["completion_tokens"]))
        self.assertEqual(big.resource.requests_failed, 1)


    async def test_no_first_token_then_ollama_pool(self) -> None:
        """
        A stream whose first chunk does not come within C{first_token_timeout}
        moves on to the next model, here on an C{ollama} pool: the request is
        translated for it and its answer translated back, as that model.
        """
        h = Harness(self)
        mute = _Mute()  # stream headers, then nothing
        big = h.serve(mute, id="big-1")
        small = h.simulator("small-1", model="qwen3:8b")
        pools = {
            "big": {"models": ["qwen3:32b"], "instances": [big.instance()],
                    "health_check": {"enabled": False}, "first_token_timeout": "200ms"},
            "small": {"models": ["qwen3:8b"], "instances": [small.instance()],
                      "protocol": "ollama", "health_check": {"enabled": False}},
        }
        gw = await h.gateway(h.config(pools, CHAT, models=CHAIN))
        response, content = await self.post(h, gw, {**BIG, "stream": True})
        self.assertEqual(response.code, 200, content)
        self.assertEqual(response.headers.getRawHeaders("x-clawproxy-fallback-model"),
                         ["qwen3:8b"])
        self.assertEqual(response.headers.getRawHeaders("x-sim-instance"), ["small-1"])
        self.assertEqual(response.headers.getRawHeaders("content-type"),
                         ["text/event-stream"])
        events = [json.loads(line[6:]) for line in content.decode().splitlines()
                  if line.startswith("data: {")]
        self.assertTrue(events)
        self.assertEqual({e["model"] for e in events}, {"qwen3:8b"})
        self.assertTrue(content.rstrip().endswith(b"data: [DONE]"))
        self.assertEqual(mute.requests, 1)


class PlainHealth(Resource):
    """In front of a simulator: C{/health} names no model (only discovery can tell)."""

    isLeaf = True

    def __init__(self, sim: Resource) -> None:
        super().__init__()
        self.sim = sim

    def render(self, request: Any) -> Any:
        if request.path == b"/health":
            return b'{"status": "ok"}'
        return self.sim.render(request)


class DiscoveryTests(TestCase):
    """The gateway learns what the simulators serve."""

    timeout = 30

    async def test_discovered_models(self) -> None:
        """
        A pool that declares nothing serves (and C{/v1/models} lists) what its
        instances report, C{owned_by} the pool; once every pool's models are
        known, a model none serves is 404 C{model_not_found}.
        """
        h = Harness(self)
        openai_sim = h.simulator("o-1", model="gpt-sim")
        ollama_sim = h.simulator("l-1", model="llama-sim")
        for sim in (openai_sim, ollama_sim):
            sim.site.resource = PlainHealth(sim.site.resource)
        health = {"path": "/health", "interval": "1s"}
        pools = {
            "openai": {"instances": [openai_sim.instance()], "health_check": health},
            "ollama": {"protocol": "ollama", "instances": [ollama_sim.instance()],
                       "health_check": health},
        }
        gw = await h.gateway(h.config(pools, CHAT))
        await wait_for(lambda: all(p.discovered for p in gw.registry.pools.values()),
                       "both pools' models")
        client = h.client()
        response = await bounded(client.get(gw.url + "/v1/models"))
        listed = json.loads(await bounded(response.content()))
        self.assertEqual(listed["object"], "list")
        self.assertEqual({(m["id"], m["owned_by"]) for m in listed["data"]},
                         {("gpt-sim", "openai"), ("llama-sim", "ollama")})
        for model, sim in (("gpt-sim", "o-1"), ("llama-sim", "l-1")):
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            response = await bounded(client.post(gw.url + "/v1/chat/completions", json=body))
            content = await bounded(response.content())
            self.assertEqual(response.code, 200, content)
            self.assertEqual(response.headers.getRawHeaders("x-sim-instance"), [sim])
            self.assertEqual(json.loads(content)["model"], model)
        body = {"model": "gpt-nope", "messages": []}
        response = await bounded(client.post(gw.url + "/v1/chat/completions", json=body))
        self.assertEqual(response.code, 404)
        self.assertEqual(error_of(await bounded(response.content()))["code"],
                         "model_not_found")


class ConversationAffinityTests(TestCase):
    """C{session_affinity: {method: conversation}} on real sockets."""

    timeout = 60

    async def test_hundred_conversations_over_three_instances(self) -> None:
        """
        100 conversations over 3 simulators each stay on one instance, turn
        after turn; killing one moves only its conversations, and they stay
        where they moved.
        """
        h = Harness(self)
        sims = [h.simulator(f"sim-{n}", ttft=0.0, max_tokens=1) for n in range(3)]
        pools = {"main": {"instances": [s.instance() for s in sims],
                          "health_check": {"enabled": False},
                          "session_affinity": {"method": "conversation", "ttl": "10m"}}}
        gw = await h.gateway(h.config(pools, CHAT))
        client = h.client()

        async def turn(n: int, turns: int) -> str:
            messages = [{"role": "system", "content": f"You are agent {n}."},
                        {"role": "user", "content": f"task {n}"}]
            for t in range(turns):
                messages += [{"role": "assistant", "content": "ok"},
                             {"role": "user", "content": f"step {t}"}]
            body = {"model": "sim-small", "messages": messages}
            response = await bounded(client.post(gw.url + "/v1/chat/completions", json=body))
            content = await bounded(response.content())
            self.assertEqual(response.code, 200, content)
            return response.headers.getRawHeaders("x-sim-instance")[0]

        async def everyone(turns: int) -> dict[int, str]:
            """One turn of each of the 100 conversations, one after the other."""
            return {n: await turn(n, turns) for n in range(100)}

        first = await everyone(0)
        self.assertEqual(set(first.values()), {"sim-0", "sim-1", "sim-2"})
        for turns in (1, 2):
            self.assertEqual(await everyone(turns), first)
        await sims[1].kill()
        after = await everyone(3)
        moved = {n for n in first if first[n] != after[n]}
        self.assertEqual(moved, {n for n in first if first[n] == "sim-1"})
        self.assertTrue(moved)
        self.assertNotIn("sim-1", after.values())
        self.assertEqual(await everyone(4), after)


class SharedAffinityTests(TestCase):
    """With C{store.backend: redis}, gateways on one store share their conversations."""

    timeout = 60

    async def test_two_gateways_one_conversation(self) -> None:
        """
        A conversation begun through one gateway goes on, through another
        gateway on the same Redis, on the instance that served it first.
        """
        require_redis_server()
        server = RedisServer(reactor, self.mktemp())
        await server.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        h = Harness(self)
        sims = [h.simulator(f"sim-{n}", ttft=0.0, max_tokens=1) for n in range(3)]
        pools = {"main": {"instances": [s.instance() for s in sims], "algorithm": "random",
                          "health_check": {"enabled": False},
                          "session_affinity": {"method": "conversation", "ttl": "10m"}}}
        store = {"backend": "redis", "redis": {"url": server.url, "timeout": "300ms"}}
        gw1 = await h.gateway(h.config(pools, CHAT, store=store))
        gw2 = await h.gateway(h.config(pools, CHAT, store=store))
        for gw in (gw1, gw2):
            await wait_for(lambda gw=gw: gw.gateway.store.health()["healthy"],
                           "the store to answer")
        client = h.client()

        async def turn(gw: RunningGateway, n: int, turns: int) -> str:
            messages = [{"role": "system", "content": f"You are agent {n}."},
                        {"role": "user", "content": f"task {n}"}]
            messages += [{"role": "user", "content": f"step {t}"} for t in range(turns)]
            body = {"model": "sim-small", "messages": messages}
            response = await bounded(client.post(gw.url + "/v1/chat/completions", json=body))
            await bounded(response.content())
            self.assertEqual(response.code, 200)
            return response.headers.getRawHeaders("x-sim-instance")[0]

        first = {n: await turn(gw1, n, 0) for n in range(30)}
        self.assertEqual(len(set(first.values())), 3)
        # gw2 never saw these conversations: its own (random) balancer would
        # spread them anew; the store sends each where it began.
        self.assertEqual({n: await turn(gw2, n, 1) for n in range(30)}, first)
        self.assertEqual({n: await turn(gw1, n, 2) for n in range(30)}, first)
        # Redis not answering: the lookup gives up after store.redis.timeout.
        server.pause()
        started = reactor.seconds()
        self.assertEqual(await turn(gw2, 0, 3), first[0])
        self.assertLess(reactor.seconds() - started, 2.0)
        # Redis gone: each gateway goes on with the sessions it knows.
        await server.kill()
        started = reactor.seconds()
        self.assertEqual({n: await turn(gw2, n, 3) for n in range(30)}, first)
        self.assertLess(reactor.seconds() - started, 30 * 0.3)  # within the store timeout
