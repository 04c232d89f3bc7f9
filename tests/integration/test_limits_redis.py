"""
Rate limits on a real redis-server: exact across three C{twistd} gateway
processes, and C{store.redis.on_error} while Redis hangs (SIGSTOP), dies
(SIGKILL) and comes back, without restarting a gateway.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from tests.integration.helpers import Harness, bounded, tick
from tests.integration.test_process import TWISTD, listening
from tests.redis_server import RedisServer, require_redis_server

#: store.redis.timeout in these tests, and the margin allowed on top of it.
TIMEOUT, MARGIN = 0.2, 0.8

THREE = """\
server:
  listen: ["tcp:0:interface=127.0.0.1"]
admin:
  listen: "tcp:0:interface=127.0.0.1"
store:
  backend: redis
  redis: {{url: "{redis}", prefix: "three:", timeout: 1s}}
pools:
  sim:
    instances: [{{id: sim-1, url: "{sim}"}}]
    health_check: {{enabled: false}}
routes:
  - {{path: /warm, pool: sim, rate_limit: "1000/hour"}}
  - {{path: /*, pool: sim, rate_limit: "{limit}/hour"}}
logging:
  output: "-"
"""


class Ok(Resource):
    """A backend answering 200 to everything."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"ok"


async def start_redis(case: TestCase) -> RedisServer:
    require_redis_server()
    server = RedisServer(reactor, case.mktemp())
    await server.start()
    case.addCleanup(server.stop)
    return server


async def get(client: Any, url: str) -> tuple[int, dict[str, str], float]:
    """Status, a few headers and the seconds the answer took."""
    started = time.monotonic()
    response = await bounded(client.get(url), 10)
    await bounded(response.content(), 10)
    headers = {name: (response.headers.getRawHeaders(name) or [""])[-1]
               for name in ("retry-after", "x-ratelimit-remaining")}
    return response.code, headers, time.monotonic() - started


class ThreeGatewaysTests(TestCase):
    timeout = 120

    async def test_one_limit_shared(self) -> None:
        """
        Three C{twistd clawproxy} processes sharing one Redis and a route's
        limit of N per hour let through exactly N of a burst of 3N spread
        over all three; the rest get 429.
        """
        n = 60
        server = await start_redis(self)
        h = Harness(self)
        sim = h.serve(Ok(), "sim-1")
        with open(h.path("gateway.yaml"), "w") as f:
            f.write(THREE.format(redis=server.url, limit=n, sim=sim.url))
        procs = [h.spawn(*TWISTD, "-n", "--pidfile=", "clawproxy", "-c", "gateway.yaml")
                 for _ in range(3)]
        ports = [await listening(proc, "clawproxy data plane", 60) for proc in procs]
        client = h.client()
        # Wait until each gateway reaches Redis (a limited answer, not a fail_open one).
        for port in ports:
            for _ in range(200):
                _, headers, _ = await get(client, f"http://127.0.0.1:{port}/warm")
                if headers["x-ratelimit-remaining"]:
                    break
                await tick(0.05)
            else:
                raise AssertionError(f"gateway on {port} never reached Redis")
        urls = [f"http://127.0.0.1:{ports[i % 3]}/v1/x" for i in range(3 * n)]
        results = await bounded(DeferredList(
            [client.get(url).addCallback(lambda r: r.content().addCallback(
                lambda _, r=r: r.code)) for url in urls], consumeErrors=True), 60)
        statuses = [code for ok, code in results if ok]
        self.assertEqual(len(statuses), 3 * n, results)
        self.assertEqual(statuses.count(200), n)
        self.assertEqual(statuses.count(429), 2 * n)
        for proc in procs:
            proc.signal("TERM")
        for proc in procs:
            await proc.wait(20)
            self.assertNotIn("Traceback", proc.output)


class OnErrorTests(TestCase):
    timeout = 120

    async def outage(self, on_error: str) -> None:
        """
        Limit 4/minute per client; Redis hangs then dies mid-run: every
        request is answered with the C{on_error} outcome within the timeout
        (+ a margin); Redis restarted: the limit holds again, same gateway.
        """
        server = await start_redis(self)
        h = Harness(self)
        sim = h.serve(Ok(), "sim-1")
        config = h.config(
            {"sim": {"instances": [sim.instance()], "health_check": {"enabled": False}}},
            store={"backend": "redis", "redis": {"url": server.url, "timeout": f"{TIMEOUT}s",
                                                 "on_error": on_error}},
            rate_limits={"default": "4/minute"})
        gw = await h.gateway(config)
        client = h.client()
        url = gw.url + "/v1/x"

        async def until_limited() -> list[int]:
            """Requests until the limit answers (a reconnecting store fails open/closed first)."""
            for _ in range(200):
                code, headers, _ = await get(client, url)
                if headers["x-ratelimit-remaining"]:
                    return [code] + [(await get(client, url))[0] for _ in range(4)]
                await tick(0.05)
            raise AssertionError("the limit never came back")

        self.assertEqual(await until_limited(), [200, 200, 200, 200, 429])
        expected = 200 if on_error == "fail_open" else 503

        server.pause()
        for _ in range(5):
            code, headers, took = await get(client, url)
            self.assertEqual(code, expected)
            self.assertLess(took, TIMEOUT + MARGIN)
            if expected == 503:
                self.assertEqual(headers["retry-after"], "1")
        await server.kill()
        for _ in range(5):
            code, headers, took = await get(client, url)
            self.assertEqual(code, expected)
            self.assertLess(took, TIMEOUT + MARGIN)
        await server.restart()
        self.assertEqual(await until_limited(), [200, 200, 200, 200, 429])

    async def test_fail_open(self) -> None:
        """C{fail_open}: through Redis's outage, requests go on (200)."""
        await self.outage("fail_open")

    async def test_fail_closed(self) -> None:
        """C{fail_closed}: through Redis's outage, 503 with Retry-After."""
        await self.outage("fail_closed")


class QueueOnRedisTests(TestCase):
    timeout = 60

    async def test_queue_released_as_capacity_returns(self) -> None:
        """
        With C{on_limit: queue} on Redis, a burst over the limit waits and is
        let through as the bucket refills (one every 1/rate seconds), not refused.
        """
        server = await start_redis(self)
        h = Harness(self)
        backend = h.serve(Ok(), "ok")
        config = h.config(
            {"ok": {"instances": [backend.instance()], "health_check": {"enabled": False}}},
            store={"backend": "redis", "redis": {"url": server.url, "timeout": "1s"}},
            rate_limits={"default": "5/s", "burst": 1, "on_limit": "queue",
                         "queue": {"max_size": 10, "max_wait": "5s"}})
        gw = await h.gateway(config)
        client = h.client()
        for _ in range(200):  # until the store is reached (fail_open answers carry no headers)
            _, headers, _ = await get(client, gw.url + "/warm")
            if headers["x-ratelimit-remaining"]:
                break
            await tick(0.05)
        await tick(0.25)  # the bucket is whole again
        started = time.monotonic()
        calls = [Deferred.fromCoroutine(get(client, gw.url + f"/v1/{i}")) for i in range(5)]
        results = await bounded(DeferredList(calls), 10)
        took = time.monotonic() - started
        self.assertEqual([r[1][0] for r in results], [200] * 5)
        # One at once, then four more, one every 0.2 s.
        self.assertGreater(took, 0.75)
        self.assertLess(took, 3.0)
