"""
A client cannot get healthy instances ejected (issue 7, failure 6): over
real sockets, a gateway in front of in-process simulators, one client
sending requests that make the backends fail.
"""

from __future__ import annotations

import json
from typing import Any

from treq.client import HTTPClient
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from tests.integration.helpers import HELLO, Harness, RunningGateway, bounded, pool

#: As etc/gateway.yaml: retries on 5xx and connection failures; passive
#: ejection at its defaults (3 failures in 30s, at most 50% of the pool).
RETRY = {"retry_on": ["5xx", "connect_failure", "refused"]}
BODY = json.dumps(HELLO).encode()


def chat_head(content_type: bytes, extra: bytes = b"") -> bytes:
    """A raw HTTP/1.1 chat request carrying C{content_type}."""
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: " + content_type
            + b"\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY)


class Choking(Resource):
    """
    A simulator that drops the connection, unanswered, on any request
    carrying C{X-Poison} (as a real model server crashing on some input),
    and serves every other request.
    """

    isLeaf = True

    def __init__(self, sim: Resource) -> None:
        super().__init__()
        self.sim = sim
        self.choked = 0

    def render(self, request: Any) -> Any:
        if request.getHeader(b"x-poison") is not None:
            self.choked += 1
            request.transport.abortConnection()
            return b""
        return self.sim.render(request)


async def states(client: HTTPClient, gw: RunningGateway) -> dict[str, tuple[str, str]]:
    """Each instance's C{(state, breaker)} as C{/admin/status} shows it."""
    response = await bounded(client.get(gw.admin_url + "/admin/status"))
    status = json.loads(await bounded(response.content()))
    return {i["id"]: (i["state"], i["breaker"])
            for p in status["pools"].values() for i in p["instances"]}


class ClientEjectionTests(TestCase):
    timeout = 60

    async def start(self, choking: bool = False,
                    **extra: Any) -> tuple[Harness, RunningGateway, list[Any]]:
        h = Harness(self)
        sims = [h.simulator(f"sim-{n}") for n in (1, 2, 3)]
        fronts = []
        if choking:
            for sim in sims:
                sim.site.resource = Choking(sim.site.resource)
                fronts.append(sim.site.resource)
        gw = await h.gateway(h.config(
            {"sim": pool(*sims, algorithm="least_connections", retry=RETRY, **extra)}))
        return h, gw, fronts

    async def test_odd_content_type(self) -> None:
        """
        The issue's case: twelve requests whose Content-Type carries C{\\x0b}
        are answered 400 with a JSON error (by the gateway at the head, or by
        the simulator, which used to drop the connection: 502), no instance
        records a failure or is ejected, and the next request is served.
        """
        h, gw, _ = await self.start()
        for _ in range(12):
            answer = await h.exchange(gw.port, chat_head(b"\x0bapplication/json"))
            self.assertEqual(answer.status, 400, answer.body)
            self.assertIn("message", json.loads(answer.body)["error"])
        client = h.client()
        shown = await states(client, gw)
        self.assertEqual(shown, {f"sim-{n}": ("healthy", "CLOSED") for n in (1, 2, 3)})
        self.assertEqual([gw.instance(f"sim-{n}").failures for n in (1, 2, 3)], [0, 0, 0])
        answer = await h.exchange(gw.port, chat_head(b"application/json"))
        self.assertEqual(answer.status, 200)

    async def test_one_client_cannot_eject(self) -> None:
        """
        Twelve requests from one client that every instance chokes on: the
        client gets 502s, the instances record the failures, but none is
        ejected nor has its breaker opened, and a normal request from another
        client is served at once by any of them.
        """
        h, gw, fronts = await self.start(choking=True)
        for _ in range(12):
            answer = await h.exchange(gw.port, chat_head(b"application/json", b"X-Poison: 1\r\n"))
            self.assertEqual(answer.status, 502)
        self.assertGreaterEqual(sum(f.choked for f in fronts), 12)
        self.assertGreaterEqual(sum(gw.instance(f"sim-{n}").failures for n in (1, 2, 3)), 12)
        client = h.client(bindAddress=("127.0.0.2", 0))
        shown = await states(client, gw)
        self.assertEqual(shown, {f"sim-{n}": ("healthy", "CLOSED") for n in (1, 2, 3)})
        served = set()
        for _ in range(6):
            response = await bounded(client.post(gw.url + "/v1/chat/completions", data=BODY))
            await bounded(response.content())
            self.assertEqual(response.code, 200)
            served.add(response.headers.getRawHeaders("x-sim-instance")[0])
        self.assertEqual(served, {"sim-1", "sim-2", "sim-3"})

    async def test_three_clients_can_eject(self) -> None:
        """
        The bound is per client address: the same requests from three
        addresses (127.0.0.1-3) do eject an instance, as failures seen by
        several clients should. (The pool's circuit breaker, which would
        rightly open on nine failures of the whole pool and answer 503, is
        off: this test is about passive ejection.)
        """
        h, gw, _ = await self.start(choking=True, circuit_breaker={"enabled": False})
        for n in (1, 2, 3):
            client = h.client(bindAddress=(f"127.0.0.{n}", 0))
            for _ in range(3):
                response = await bounded(client.post(
                    gw.url + "/v1/chat/completions", data=BODY, headers={"X-Poison": "1"}))
                await bounded(response.content())
                self.assertEqual(response.code, 502)
        shown = await states(h.client(), gw)
        self.assertIn("ejected", {state for state, _ in shown.values()})
