"""
The response cache over loopback: two gateways sharing one cache on a real
redis-server, and coalescing of concurrent requests to a real simulator.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.trial.unittest import TestCase

from tests.integration.helpers import HELLO, Harness, bounded, pool, tick
from tests.redis_server import RedisServer, require_redis_server


class SharedCacheTests(TestCase):
    """Gateways on one Redis share entries, bounds and drops."""

    timeout = 60

    async def _start(self) -> tuple[Harness, Any, Any, Any]:
        require_redis_server()
        server = RedisServer(reactor, self.mktemp(), ())
        await server.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        h = Harness(self)
        sim = h.simulator("sim-1", front=True)
        gateways = []
        for _ in range(2):
            config = h.config(
                {"main": pool(sim)},
                routes=[{"path": "/v1/*", "pool": "main", "cache": {"ttl": "1m"}}],
                store={"backend": "redis", "redis": {"url": server.url, "prefix": "gw:"}},
                cache={"store": "redis", "max_entries": 100},
            )
            gateways.append(await h.gateway(config))
        return h, sim, gateways[0], gateways[1]

    async def ask(self, client: Any, gw: Any, body: Any = HELLO, stream: bool = False
                  ) -> tuple[int, str | None, bytes]:
        response = await bounded(client.post(gw.url + "/v1/chat/completions",
                                             json.dumps({**body, "stream": stream}).encode(),
                                             headers={"Content-Type": "application/json"}))
        content = await bounded(response.content())
        cache = response.headers.getRawHeaders("x-cache")
        return response.code, cache[0] if cache else None, content

    async def stored(self, client: Any, gw: Any, entries: int) -> None:
        """Wait until C{gw} has stored its answer (the store runs after the response ends)."""
        async def count() -> int:
            response = await bounded(client.get(gw.admin_url + "/admin/status"))
            return (await bounded(response.json()))["cache"]["entries"]

        for _ in range(200):
            if await count() >= entries:
                return
            await tick()
        self.fail(f"the cache never held {entries} entries")

    def test_two_gateways(self) -> Deferred[None]:
        """One gateway's answer is the other's hit; a drop on one is seen by both."""
        async def run() -> None:
            h, sim, one, two = await self._start()
            client = h.client()
            code, how, first = await self.ask(client, one)
            self.assertEqual((code, how), (200, "MISS"))
            await self.stored(client, one, 1)
            code, how, second = await self.ask(client, two)
            self.assertEqual((code, how), (200, "HIT"))
            self.assertEqual(second, first)
            code, how, streamed = await self.ask(client, two, stream=True)
            self.assertEqual(how, "MISS")
            await self.stored(client, two, 2)
            code, how, replay = await self.ask(client, one, stream=True)
            self.assertEqual((how, replay), ("HIT", streamed))
            self.assertTrue(replay.endswith(b"data: [DONE]\n\n"))
            self.assertEqual(len(sim.resource.received), 2)
            response = await bounded(client.delete(two.admin_url + "/admin/cache"))
            self.assertEqual((await bounded(response.json()))["dropped"], 2)
            code, how, _ = await self.ask(client, one)
            self.assertEqual(how, "MISS")
            response = await bounded(client.get(one.admin_url + "/admin/status"))
            status = (await bounded(response.json()))["cache"]
            self.assertEqual((status["backend"], status["entries"]), ("redis", 1))
        return Deferred.fromCoroutine(run())


class CoalescingTests(TestCase):
    """Identical concurrent requests over real sockets make one upstream call."""

    timeout = 60

    def test_fifty_concurrent(self) -> Deferred[None]:
        """50 concurrent identical requests, streamed and not: 1 call each, 50 same answers."""
        async def run() -> None:
            h = Harness(self)
            sim = h.simulator("sim-1", front=True, ttft=0.5, tokens_per_second=200.0,
                              max_tokens=16)
            gw = await h.gateway(h.config(
                {"main": pool(sim)},
                routes=[{"path": "/v1/*", "pool": "main", "cache": {"ttl": "1m"}}]))
            client = h.client()
            for stream in (False, True):
                body = json.dumps({**HELLO, "stream": stream}).encode()

                async def one(body: bytes = body) -> tuple[int, bytes]:
                    response = await client.post(gw.url + "/v1/chat/completions", body,
                                                 headers={"Content-Type": "application/json"})
                    return response.code, await response.content()

                results = await bounded(DeferredList(
                    [Deferred.fromCoroutine(one()) for _ in range(50)], consumeErrors=True), 20)
                answers = [value for ok, value in results if ok]
                self.assertEqual(len(answers), 50)
                self.assertEqual({code for code, _ in answers}, {200})
                self.assertEqual(len({content for _, content in answers}), 1)
            self.assertEqual(len(sim.resource.received), 2)
            metrics = (await bounded((await bounded(client.get(gw.admin_url + "/metrics")))
                                     .text()))
            # Each of the 49 others joined the call (or, on a machine slow enough
            # that it came after the answer was stored, was a hit).
            samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines()
                           if line.startswith(("clawproxy_coalesced_requests_total{",
                                               "clawproxy_cache_requests_total{")))
            joined = float(samples['clawproxy_coalesced_requests_total{route="/v1/*"}'])
            hits = float(samples.get(
                'clawproxy_cache_requests_total{route="/v1/*",result="hit"}', 0))
            self.assertEqual(joined + hits, 98)
            self.assertGreater(joined, 0)
        return Deferred.fromCoroutine(run())
