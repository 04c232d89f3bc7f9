"""
Budget accuracy on real sockets: 20 concurrent requests of one agent against
a 1,000-token-per-minute budget never get more than the budget plus one
request's reservation through, on one gateway and on two gateways sharing a
real redis-server.
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from clawproxy.config.fields import hash_key
from tests.integration.helpers import Harness, bounded, pool
from tests.redis_server import RedisServer, require_redis_server

KEY = "sk-budget-agent-0123456789"
#: Prompt estimate of the body below (4 per message + 11 chars / 4) + max_tokens.
RESERVATION = 7 + 100
BUDGET = 1000


def body() -> dict[str, Any]:
    return {"model": "sim-small", "max_tokens": 100,
            "messages": [{"role": "user", "content": "hello there"}]}


async def outside_window_end(period: float = 60.0, margin: float = 5.0) -> None:
    """Wait (at most C{margin}s) so that the test runs inside one budget window."""
    left = period - time.time() % period
    if left < margin:
        await deferLater(reactor, left + 0.05, lambda: None)


class BudgetAccuracyTests(TestCase):
    timeout = 60

    async def _burst(self, h: Harness, urls: list[str]) -> tuple[list[int], int]:
        """20 concurrent requests spread over C{urls}: (statuses, tokens let through)."""
        client = h.client()
        ds = []
        for i in range(20):
            ds.append(client.post(urls[i % len(urls)] + "/v1/chat/completions", json=body(),
                                  headers={"Authorization": f"Bearer {KEY}"}))
        results = await bounded(DeferredList(ds, consumeErrors=True), 20)
        statuses, through = [], 0
        for ok, response in results:
            self.assertTrue(ok, response)
            content = await bounded(response.content())
            statuses.append(response.code)
            if response.code == 200:
                usage = json.loads(content)["usage"]
                through += usage["prompt_tokens"] + usage["completion_tokens"]
            else:
                self.assertEqual(response.code, 429, content)
                self.assertEqual(json.loads(content)["error"]["code"], "token_budget_exceeded")
                self.assertIsNotNone(response.headers.getRawHeaders("retry-after"))
        return statuses, through

    def config(self, h: Harness, sim: Any, **sections: Any) -> Any:
        return h.config({"sim": pool(sim)}, agents={
            "agent": {"keys": [hash_key(KEY)], "token_limit": f"{BUDGET}/minute"}}, **sections)

    async def test_one_gateway(self) -> None:
        h = Harness(self)
        # Slow enough that every request is reserved before the first one settles.
        sim = h.simulator("sim", ttft=0.3, max_tokens=200)
        gw = await h.gateway(self.config(h, sim))
        await outside_window_end()
        statuses, through = await self._burst(h, [gw.url])
        self.assertLessEqual(through, BUDGET + RESERVATION)
        self.assertEqual(statuses.count(200), BUDGET // RESERVATION)
        self.assertEqual(statuses.count(429), 20 - BUDGET // RESERVATION)
        # What the admin API shows: the window's use, settled to what was used.
        response = await bounded(h.client().get(gw.admin_url + "/admin/budgets"))
        shown = json.loads(await bounded(response.content()))
        token_limit = shown["agents"]["agent"]["token_limit"]
        self.assertEqual((token_limit["limit"], token_limit["used"], token_limit["reserved"]),
                         ("1000/minute", float(through), 0.0))
        status = json.loads(await bounded((await bounded(
            h.client().get(gw.admin_url + "/admin/status"))).content()))
        self.assertEqual(status["tokens"]["pools"]["sim"]["completion_tokens"],
                         100 * statuses.count(200))

    async def test_two_gateways_sharing_redis(self) -> None:
        require_redis_server()
        server = RedisServer(reactor, self.mktemp())
        await server.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        h = Harness(self)
        sim = h.simulator("sim", ttft=0.3, max_tokens=200)
        store = {"backend": "redis", "redis": {"url": server.url, "timeout": "2s"}}
        gw1 = await h.gateway(self.config(h, sim, store=store))
        gw2 = await h.gateway(self.config(h, sim, store=store))
        await outside_window_end()
        statuses, through = await self._burst(h, [gw1.url, gw2.url])
        self.assertLessEqual(through, BUDGET + RESERVATION)
        self.assertEqual(statuses.count(200), BUDGET // RESERVATION)


class StoreDownTests(TestCase):
    """Redis down: budgets follow C{store.redis.on_error} within the store timeout."""

    timeout = 60

    async def down(self, on_error: str, stop: str) -> Any:
        require_redis_server()
        server = RedisServer(reactor, self.mktemp())
        await server.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        h = Harness(self)
        sim = h.simulator("sim")
        gw = await h.gateway(h.config(
            {"sim": pool(sim)},
            agents={"agent": {"keys": [hash_key(KEY)], "token_limit": "1000/minute"}},
            store={"backend": "redis", "redis": {"url": server.url, "timeout": "300ms",
                                                 "on_error": on_error}}))
        client = h.client()
        headers = {"Authorization": f"Bearer {KEY}"}
        ok = await bounded(client.post(gw.url + "/v1/chat/completions", json=body(),
                                       headers=headers))
        self.assertEqual(ok.code, 200)
        await bounded(ok.content())
        if stop == "kill":
            await server.kill()
        else:
            server.pause()  # a hung server: only the store timeout ends the wait
        started = reactor.seconds()
        response = await bounded(client.post(gw.url + "/v1/chat/completions", json=body(),
                                             headers=headers))
        content = json.loads(await bounded(response.content()))
        self.assertLess(reactor.seconds() - started, 2.0)
        self.flushLoggedErrors()
        return response, content

    async def test_fail_open_killed(self) -> None:
        response, content = await self.down("fail_open", "kill")
        self.assertEqual(response.code, 200, content)

    async def test_fail_closed_hung(self) -> None:
        response, content = await self.down("fail_closed", "pause")
        self.assertEqual(response.code, 503)
        self.assertEqual(content["error"]["code"], "store_unavailable")
        self.assertIsNotNone(response.headers.getRawHeaders("retry-after"))
