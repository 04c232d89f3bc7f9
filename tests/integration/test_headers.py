"""
What crosses the gateway in each direction: hop-by-hop headers stay on their
hop, the proxy's own forwarding headers cannot be forged or stripped.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from tests.integration.helpers import Harness, RunningGateway, pool


class Recorder(Resource):
    """A backend that records request headers and answers with hop-by-hop ones."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, Headers]] = []

    def render(self, request: Any) -> bytes:
        self.seen.append((request.method, request.uri, request.requestHeaders.copy()))
        request.setHeader(b"Connection", b"X-Secret")
        request.setHeader(b"X-Secret", b"1")
        request.setHeader(b"Keep-Alive", b"timeout=5, max=100")
        request.setHeader(b"Proxy-Authenticate", b'Basic realm="upstream"')
        request.setHeader(b"X-Visible", b"yes")
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"ok": true}'

    def last(self, name: bytes) -> list[bytes] | None:
        return self.seen[-1][2].getRawHeaders(name)


CLIENT_REQUEST = (
    b"GET /v1/echo?q=1 HTTP/1.1\r\n"
    b"Host: gateway.example:8080\r\n"
    b"Connection: close, X-Forwarded-For, X-Hop\r\n"
    b"X-Hop: secret\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
    b"Proxy-Connection: keep-alive\r\n"
    b"TE: trailers\r\n"
    b"X-Forwarded-For: 6.6.6.6\r\n"
    b"X-Forwarded-Proto: https\r\n"
    b"X-Forwarded-Host: evil.example\r\n"
    b"X-Request-ID: client-id-123\r\n"
    b"X-End-To-End: kept\r\n"
    b"\r\n"
)


class HopByHopTests(TestCase):
    timeout = 60

    async def start(self, **server: Any) -> tuple[Harness, RunningGateway, Recorder]:
        h = Harness(self)
        recorder = Recorder()
        backend = h.serve(recorder, "recorder")
        config = h.config({"echo": pool(backend)}, server=server) if server else h.config(
            {"echo": pool(backend)})
        return h, await h.gateway(config), recorder

    async def test_hop_by_hop_headers_stripped_both_ways(self) -> None:
        """
        The backend sees none of the client's hop-by-hop headers (nor those
        its C{Connection} names) but does see end-to-end ones; the client sees
        none of the backend's hop-by-hop headers (nor C{X-Secret}, which the
        backend's C{Connection} names) but does see the others.
        """
        h, gw, recorder = await self.start()
        response = await h.exchange(gw.port, CLIENT_REQUEST)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b'{"ok": true}')
        method, uri, _ = recorder.seen[-1]
        self.assertEqual((method, uri), (b"GET", b"/v1/echo?q=1"))
        for name in (b"x-hop", b"keep-alive", b"proxy-authorization", b"proxy-connection",
                     b"te", b"upgrade", b"trailer"):
            self.assertIsNone(recorder.last(name), name)
        for value in recorder.last(b"connection") or []:
            self.assertNotIn(b"x-hop", value.lower())
            self.assertNotIn(b"x-forwarded-for", value.lower())
        self.assertEqual(recorder.last(b"x-end-to-end"), [b"kept"])
        self.assertEqual(recorder.last(b"host"), [f"127.0.0.1:{recorder_port(h)}".encode()])
        # Back to the client.
        self.assertIsNone(response.header(b"x-secret"))
        self.assertIsNone(response.header(b"keep-alive"))
        self.assertIsNone(response.header(b"proxy-authenticate"))
        for value in response.all(b"connection"):
            self.assertNotIn(b"x-secret", value.lower())
        self.assertEqual(response.header(b"x-visible"), b"yes")

    async def test_forwarding_headers_set_by_the_proxy(self) -> None:
        """
        The backend gets C{X-Forwarded-For} (the real client address, not the
        client's claim, even though the client's C{Connection} names it),
        C{X-Forwarded-Proto}, C{X-Forwarded-Host} and the client's safe
        C{X-Request-ID}, which is echoed to the client.
        """
        h, gw, recorder = await self.start()
        response = await h.exchange(gw.port, CLIENT_REQUEST)
        self.assertEqual(response.status, 200)
        self.assertEqual(recorder.last(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(recorder.last(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(recorder.last(b"x-forwarded-host"), [b"gateway.example:8080"])
        self.assertEqual(recorder.last(b"x-request-id"), [b"client-id-123"])
        self.assertEqual(response.header(b"x-request-id"), b"client-id-123")

    async def test_request_id_made_when_missing_or_unsafe(self) -> None:
        """
        Without a usable C{X-Request-ID} from the client, the gateway makes
        one, sends it upstream and returns the same one to the client.
        """
        h, gw, recorder = await self.start()
        ids = []
        for extra in (b"", b"X-Request-ID: has spaces\r\n", b"X-Request-ID: " + b"a" * 300
                      + b"\r\n"):
            response = await h.exchange(
                gw.port, b"GET /v1/echo HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
            self.assertEqual(response.status, 200)
            made = response.header(b"x-request-id")
            self.assertTrue(made)
            self.assertEqual(recorder.last(b"x-request-id"), [made])
            ids.append(made)
        self.assertEqual(len(set(ids)), 3)
        self.assertNotIn(b"has spaces", ids)

    async def test_trusted_proxy_chain_extended(self) -> None:
        """
        A client inside C{trusted_proxies} has its C{X-Forwarded-For} kept,
        with its own address appended.
        """
        h, gw, recorder = await self.start(trusted_proxies=["127.0.0.0/8"])
        response = await h.exchange(
            gw.port,
            b"GET /v1/echo HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
        self.assertEqual(response.status, 200)
        self.assertEqual(recorder.last(b"x-forwarded-for"), [b"6.6.6.6, 127.0.0.1"])


def recorder_port(h: Harness) -> int:
    return h.backends[0].number
