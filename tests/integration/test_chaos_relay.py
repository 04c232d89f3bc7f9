"""
The relay under network faults (issue 3): a L{ChaosProxy} sits between the
gateway and its only backend and cuts, stalls, resets or blackholes the
upstream connection.

Each test checks what the client sees (a status, or an aborted connection
when response bytes had already started) and that nothing leaks: the
gateway's C{clawproxy_open_connections{side="client"}} and
C{{side="upstream"}} gauges return to their baseline, and the proxy has no
connection left open.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import reactor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from tests.chaos import ChaosProxy
from tests.integration.edge import gauge_returns, open_connections
from tests.integration.helpers import (
    Backend,
    Harness,
    RawClient,
    RunningGateway,
    bounded,
    error_of,
    parse_response,
    response_complete,
    wait_for,
)

#: The response body the backend sends (big enough to cut in the middle).
BODY = bytes(range(256)) * 64

#: The pool's per-attempt timeout (connect + first byte), small so stalls end fast.
POOL_TIMEOUT = 0.5

REQUEST = b"GET /v1/big HTTP/1.1\r\nHost: gateway.test\r\n\r\n"


class Big(Resource):
    """A backend answering every request with L{BODY} (16 KiB, Content-Length)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def render(self, request: Any) -> bytes:
        self.requests += 1
        request.setHeader(b"content-type", b"application/octet-stream")
        return BODY


def metrics_gauge(text: bytes, side: str) -> float:
    """C{clawproxy_open_connections{side=...}} read from Prometheus text."""
    m = re.search(rb'^clawproxy_open_connections\{side="%s"\} (\S+)$' % side.encode(),
                  text, re.M)
    assert m is not None, text[:500]
    return float(m.group(1))


class ChaosRelayTests(TestCase):
    """Faults between gateway and backend: the client's answer, and no leaked connection."""

    timeout = 30

    async def start(self) -> tuple[Harness, RunningGateway, ChaosProxy, Backend]:
        h = Harness(self)
        backend = h.serve(Big(), "big")
        proxy = ChaosProxy(reactor, "127.0.0.1", backend.number)
        port = await bounded(proxy.start())
        self.addCleanup(proxy.stop)
        config = h.config({"chaos": {
            "instances": [{"id": "chaos-1", "url": f"http://127.0.0.1:{port}"}],
            "health_check": {"enabled": False},
            "timeout": f"{int(POOL_TIMEOUT * 1000)}ms",
            "retry": {"max_retries": 0},
        }})
        gw = await h.gateway(config)
        self.baseline = {side: open_connections(gw, side) for side in ("client", "upstream")}
        return h, gw, proxy, backend

    async def head_length(self, h: Harness, backend: Backend) -> int:
        """The size of the backend's response head (asked directly, not through the proxy)."""
        proto = await h.raw(backend.number, REQUEST)
        raw = await proto.when(response_complete)
        proto.transport.loseConnection()
        return raw.index(b"\r\n\r\n") + 4

    async def no_leaks(self, gw: RunningGateway, proxy: ChaosProxy,
                       client: RawClient | None = None) -> None:
        """
        Close the client (if still open), then wait, bounded, for both gauges
        to return to their baseline and the proxy to have no connection open.
        """
        if client is not None and client.reason is None:
            client.transport.loseConnection()
            await bounded(client.closed)
        await gauge_returns(gw, "client", self.baseline["client"])
        await gauge_returns(gw, "upstream", self.baseline["upstream"])
        await bounded(proxy.wait_idle(5))
        self.assertEqual(proxy.connections_open, 0)

    def assert_aborted(self, client: RawClient, raw: bytes) -> None:
        """The client's connection was reset (not closed cleanly) before a whole response."""
        self.assertTrue(client.reason.check(ConnectionLost), client.reason)
        self.assertFalse(client.reason.check(ConnectionDone), client.reason)
        self.assertFalse(response_complete(raw), raw[:300])

    async def test_pass_through_control(self) -> None:
        """
        With the proxy passing everything, the client gets the whole 16 KiB
        body, and afterwards only the pooled upstream connection stays open.
        """
        h, gw, proxy, _ = await self.start()
        response = await h.exchange(gw.port, REQUEST)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, BODY)
        await gauge_returns(gw, "client", self.baseline["client"])
        self.assertEqual(open_connections(gw, "upstream"), self.baseline["upstream"] + 1)
        self.assertEqual(proxy.connections_open, 1)
        await gw.gateway.upstream_pool.closeCachedConnections()
        await self.no_leaks(gw, proxy)

    async def test_cut_mid_response_aborts_client(self) -> None:
        """
        The upstream connection is cut (FIN) 1 KiB into the body: the client
        has its connection aborted (reset), never a clean end of a short
        body; no connection is left open anywhere.
        """
        h, gw, proxy, backend = await self.start()
        proxy.cut_after(await self.head_length(h, backend) + 1024)
        client = await h.raw(gw.port, REQUEST)
        raw = await bounded(client.closed)
        self.assert_aborted(client, raw)
        if raw:
            # What did arrive is the start of the backend's 200, never an error page.
            self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), raw[:100])
        await self.no_leaks(gw, proxy)

    async def test_cut_before_any_byte_is_502(self) -> None:
        """
        The upstream connection closes before any response byte: the client
        gets a 502 C{upstream_unreachable} (nothing was relayed yet, and the
        pool has no other instance).
        """
        h, gw, proxy, _ = await self.start()
        proxy.cut_after(0)
        client = await h.raw(gw.port, REQUEST)
        raw = await client.when(response_complete)
        response = parse_response(raw)
        self.assertEqual(response.status, 502)
        self.assertEqual(error_of(response.body)["code"], "upstream_unreachable")
        await self.no_leaks(gw, proxy, client)

    async def test_stall_before_headers_is_504(self) -> None:
        """
        The backend's response is held back entirely (connection kept open):
        after the pool's C{timeout} the client gets a 504
        C{gateway_timeout}, and the stalled upstream connection is closed.
        """
        h, gw, proxy, _ = await self.start()
        proxy.stall("downstream", after_bytes=0)
        client = await h.raw(gw.port, REQUEST)
        started = reactor.seconds()
        raw = await client.when(response_complete)
        response = parse_response(raw)
        self.assertEqual(response.status, 504)
        self.assertEqual(error_of(response.body)["code"], "gateway_timeout")
        self.assertGreaterEqual(reactor.seconds() - started, POOL_TIMEOUT * 0.9)
        await self.no_leaks(gw, proxy, client)

    async def test_stall_mid_headers_is_504(self) -> None:
        """
        The backend's response stops halfway through its head: the client
        gets a 504 once the pool's C{timeout} passes.
        """
        h, gw, proxy, backend = await self.start()
        proxy.stall("downstream", after_bytes=await self.head_length(h, backend) // 2)
        client = await h.raw(gw.port, REQUEST)
        raw = await client.when(response_complete)
        self.assertEqual(parse_response(raw).status, 504)
        await self.no_leaks(gw, proxy, client)

    async def test_reset_after_headers_is_502(self) -> None:
        """
        The upstream connection is reset (RST) right after the response
        head, before any body byte: nothing had reached the client yet (the
        head is relayed with the first body bytes), so it gets a 502
        C{bad_gateway} JSON instead of a reset connection (issue 7); nothing
        is left open.
        """
        h, gw, proxy, backend = await self.start()
        proxy.reset_after(await self.head_length(h, backend))
        client = await h.raw(gw.port, REQUEST)
        raw = await client.when(response_complete)
        response = parse_response(raw)
        self.assertEqual(response.status, 502)
        self.assertEqual(error_of(response.body)["code"], "bad_gateway")
        await self.no_leaks(gw, proxy, client)

    async def test_reset_mid_body_aborts_client(self) -> None:
        """An upstream reset 4 KiB into the body aborts the client's connection."""
        h, gw, proxy, backend = await self.start()
        proxy.reset_after(await self.head_length(h, backend) + 4096)
        client = await h.raw(gw.port, REQUEST)
        raw = await bounded(client.closed)
        self.assert_aborted(client, raw)
        await self.no_leaks(gw, proxy)

    async def test_blackhole_is_504(self) -> None:
        """
        A blackholed upstream (TCP connect succeeds, nothing is ever
        answered) gives the client a 504 C{gateway_timeout} after the pool's
        C{timeout}: a timeout, not a connect failure (502), because the
        connection itself was accepted.
        """
        h, gw, proxy, backend = await self.start()
        proxy.blackhole()
        client = await h.raw(gw.port, REQUEST)
        raw = await client.when(response_complete)
        response = parse_response(raw)
        self.assertEqual(response.status, 504)
        self.assertEqual(error_of(response.body)["code"], "gateway_timeout")
        self.assertEqual(backend.resource.requests, 0)
        await self.no_leaks(gw, proxy, client)

    async def test_refused_connect_is_502(self) -> None:
        """
        An upstream that refuses connections gives the client a 502
        C{upstream_unreachable} at once.
        """
        h, gw, proxy, _ = await self.start()
        await bounded(proxy.refuse())
        client = await h.raw(gw.port, REQUEST)
        raw = await client.when(response_complete)
        response = parse_response(raw)
        self.assertEqual(response.status, 502)
        self.assertEqual(error_of(response.body)["code"], "upstream_unreachable")
        await self.no_leaks(gw, proxy, client)

    async def test_gauges_visible_on_metrics_page(self) -> None:
        """
        The open-connection gauges a user watches on the admin C{/metrics}
        page read one client and one upstream connection during a stalled
        request, and fall back to their baseline after the 504.
        """
        h, gw, proxy, _ = await self.start()
        scraper = h.client()

        async def scrape() -> bytes:
            r = await bounded(scraper.get(gw.admin_url + "/metrics"))
            return await bounded(r.content())

        before = await scrape()
        proxy.stall("downstream", after_bytes=0)
        client = await h.raw(gw.port, REQUEST)
        await wait_for(lambda: open_connections(gw, "upstream") == self.baseline["upstream"] + 1,
                       "the stalled upstream connection")
        during = await scrape()
        self.assertEqual(metrics_gauge(during, "client"), metrics_gauge(before, "client") + 1)
        self.assertEqual(metrics_gauge(during, "upstream"),
                         metrics_gauge(before, "upstream") + 1)
        raw = await client.when(response_complete)
        self.assertEqual(parse_response(raw).status, 504)
        await self.no_leaks(gw, proxy, client)
        after = await scrape()
        self.assertEqual(metrics_gauge(after, "upstream"), metrics_gauge(before, "upstream"))

