"""
WebSocket pass-through (issue 11 point 4) with a real client and server
library (C{websockets}, its threaded API): an echo backend reached through
the gateway, frames both ways, close both ways, the handshake authenticated,
a non-101 answer relayed, the idle timeout and the per-route cap.

The library's client and server each run in a thread of their own; the
gateway runs on the reactor as in every integration test.
"""

from __future__ import annotations

import os
import ssl
import threading
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from clawproxy.config import hash_key
from tests.certs import CA
from tests.integration.edge import (
    API_KEY,
    h2_connect,
    h2_headers,
    parsed_access_lines,
    tls_section,
    write_cert,
)
from tests.integration.helpers import (
    Harness,
    RunningGateway,
    bounded,
    buffered,
    error_of,
    open_transport,
    parse_response,
    pool,
    refusing_port,
    response_complete,
    wait_for,
)
from tests.integration.tls_helpers import capture_log, write

try:
    from websockets.datastructures import Headers as WsHeaders
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.http11 import Response
    from websockets.sync.client import connect
    from websockets.sync.server import serve
except ImportError:  # the test extra is not installed
    connect = None  # type: ignore[assignment]

MB = 1024 * 1024


class EchoServer:
    """A C{websockets} echo server in a thread; C{bye} makes it close with 4001."""

    def __init__(self, ssl_context: Any = None) -> None:
        self.closed_by_client = threading.Event()
        self.close_codes: list[int | None] = []
        self.paths: list[str] = []
        self.server = serve(self.handle, "127.0.0.1", 0, max_size=None, compression=None,
                            process_request=self.process_request, ssl=ssl_context)
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def process_request(self, connection: Any, request: Any) -> Any:
        self.paths.append(request.path)
        if request.path.startswith("/forbidden"):
            return Response(403, "Forbidden", WsHeaders([("Content-Type", "text/plain")]),
                            b"no sockets for you")
        return None

    def handle(self, ws: Any) -> None:
        try:
            for message in ws:
                if message == "bye":
                    ws.close(4001, "bye")
                    return
                ws.send(message)
        except ConnectionClosed:
            pass
        self.close_codes.append(ws.close_code)
        self.closed_by_client.set()

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(5)


class WebSocketTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        if connect is None:
            self.skipTest("websockets is not installed (pip install -e .[test])")

    async def start(self, tls: bool = False, listener_tls: bool = False, **websocket: Any
                    ) -> tuple[RunningGateway, EchoServer]:
        h = self.h = Harness(self)
        server: dict[str, Any] = {}
        if listener_tls:
            self.gateway_cert = write_cert(h)
            server = {"server": {"tls": tls_section()}}
        pool_tls: dict[str, Any] = {}
        context = None
        if tls:
            # The instance is https:// with a certificate from a private CA:
            # the pool's tls.ca_file applies to the tunnel's connection too.
            ca = CA.make()
            cert, key = ca.issue("localhost")
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(write(h, "echo.pem", cert), write(h, "echo.key", key))
            pool_tls = {"tls": {"ca_file": write(h, "ca.pem", ca.cert_pem)}}
        echo = EchoServer(context)
        self.addCleanup(echo.stop)
        route: dict[str, Any] = {"path": "/*", "pool": "ws", "auth_required": True}
        if websocket:
            route["websocket"] = websocket
        scheme = "https" if tls else "http"
        config = h.config(
            {"ws": {"instances": [{"id": "echo", "url": f"{scheme}://127.0.0.1:{echo.port}"}],
                    "health_check": {"enabled": False}, **pool_tls}},
            [route], agents={"tester": {"keys": [hash_key(API_KEY)]}}, **server)
        return await h.gateway(config), echo

    def connect(self, gw: RunningGateway, path: str = "/realtime", key: str | None = API_KEY,
                ) -> Any:
        headers = {"X-API-Key": key} if key else {}
        return threads.deferToThread(
            connect, f"ws://127.0.0.1:{gw.port}{path}", additional_headers=headers,
            max_size=None, compression=None, proxy=None, open_timeout=5, close_timeout=5)

    def tunnels(self, gw: RunningGateway) -> float | None:
        return gw.gateway.metrics.registry.get_sample_value(
            "clawproxy_websocket_tunnels", {"route": "/*"})

    async def test_echo_text_and_binary(self) -> None:
        """
        Through the gateway, with an API key: a text frame and a 1 MB binary
        frame come back unchanged; the tunnel shows in the gauge while open;
        closing from the client reaches the backend (code 1000), the gauge
        goes back to 0 and the access log has the request as a 101.
        """
        gw, echo = await self.start()
        ws = await bounded(self.connect(gw))
        self.assertEqual(ws.response.status_code, 101)
        self.assertTrue(ws.response.headers["X-Request-ID"])
        self.assertEqual(self.tunnels(gw), 1)
        await bounded(threads.deferToThread(ws.send, "héllo"))
        self.assertEqual(await bounded(threads.deferToThread(ws.recv, 5)), "héllo")
        blob = os.urandom(MB)
        await bounded(threads.deferToThread(ws.send, blob), 20)
        self.assertEqual(await bounded(threads.deferToThread(ws.recv, 20), 20), blob)
        await bounded(threads.deferToThread(ws.close))
        await bounded(threads.deferToThread(echo.closed_by_client.wait, 5))
        self.assertEqual(echo.close_codes, [1000])
        await wait_for(lambda: self.tunnels(gw) == 0, "the tunnel gauge to return to 0")
        await wait_for(lambda: parsed_access_lines(gw), "the access log line")
        line = parsed_access_lines(gw)[-1]
        self.assertEqual(line["status"], 101, line)
        self.assertEqual(echo.paths, ["/realtime"])

    async def test_session_affinity(self) -> None:
        """
        A pool of two instances with cookie affinity: the 101 sets the cookie,
        and handshakes that send it back reach the same instance.
        """
        h = Harness(self)
        echoes = [EchoServer(), EchoServer()]
        for echo in echoes:
            self.addCleanup(echo.stop)
        gw = await h.gateway(h.config({"ws": {
            "instances": [{"id": f"echo-{i}", "url": f"http://127.0.0.1:{e.port}"}
                          for i, e in enumerate(echoes)],
            "health_check": {"enabled": False},
            "session_affinity": {"method": "cookie", "cookie_name": "AFF"}}}))
        ws = await bounded(self.connect(gw, key=None))
        cookie = ws.response.headers["Set-Cookie"].split(";")[0]
        self.assertTrue(cookie.startswith("AFF="), cookie)
        await bounded(threads.deferToThread(ws.close))
        first = [e for e in echoes if e.paths]
        self.assertEqual(len(first), 1)
        for _ in range(4):
            ws = await bounded(threads.deferToThread(
                connect, f"ws://127.0.0.1:{gw.port}/again", additional_headers={
                    "Cookie": cookie}, proxy=None, open_timeout=5, close_timeout=5))
            await bounded(threads.deferToThread(ws.close))
        self.assertEqual(first[0].paths, ["/realtime"] + ["/again"] * 4)

    async def test_https_instance(self) -> None:
        """
        An C{https://} instance behind a private CA (the pool's C{tls.ca_file}):
        the tunnel's connection is verified like the relay's, and frames flow.
        """
        gw, _echo = await self.start(tls=True)
        ws = await bounded(self.connect(gw))
        await bounded(threads.deferToThread(ws.send, b"\x00binary\xff"))
        self.assertEqual(await bounded(threads.deferToThread(ws.recv, 5)), b"\x00binary\xff")
        await bounded(threads.deferToThread(ws.close))

    async def test_tls_listener(self) -> None:
        """A C{wss://} client on the gateway's TLS listener: the tunnel runs inside TLS."""
        gw, echo = await self.start(listener_tls=True)
        context = ssl.create_default_context(cadata=self.gateway_cert.decode())
        ws = await bounded(threads.deferToThread(
            connect, f"wss://localhost:{gw.tls_port}/realtime",
            additional_headers={"X-API-Key": API_KEY}, ssl=context, max_size=None,
            compression=None, proxy=None, open_timeout=5, close_timeout=5))
        blob = os.urandom(MB)
        await bounded(threads.deferToThread(ws.send, blob), 20)
        self.assertEqual(await bounded(threads.deferToThread(ws.recv, 20), 20), blob)
        await bounded(threads.deferToThread(ws.close))
        await bounded(threads.deferToThread(echo.closed_by_client.wait, 5))
        self.assertEqual(echo.close_codes, [1000])
        await wait_for(lambda: self.tunnels(gw) == 0, "the tunnel gauge to return to 0")

    async def test_close_from_backend(self) -> None:
        """The backend closing (4001 "bye") reaches the client as that close."""
        gw, _echo = await self.start()
        ws = await bounded(self.connect(gw))
        await bounded(threads.deferToThread(ws.send, "bye"))
        with self.assertRaises(ConnectionClosed) as caught:
            await bounded(threads.deferToThread(ws.recv, 5))
        self.assertEqual((caught.exception.rcvd.code, caught.exception.rcvd.reason),
                         (4001, "bye"))
        await wait_for(lambda: self.tunnels(gw) == 0, "the tunnel gauge to return to 0")

    async def test_handshake_needs_key(self) -> None:
        """Without an API key (or with a wrong one) the handshake gets 401, sent nowhere."""
        gw, echo = await self.start()
        for key in (None, "sk-wrong"):
            with self.assertRaises(InvalidStatus) as caught:
                await bounded(self.connect(gw, key=key))
            self.assertEqual(caught.exception.response.status_code, 401)
        self.assertEqual(echo.paths, [])
        self.assertEqual(self.tunnels(gw) or 0, 0)

    async def test_non_101_relayed(self) -> None:
        """A backend that answers the handshake with 403 has that answer relayed as is."""
        gw, _echo = await self.start()
        with self.assertRaises(InvalidStatus) as caught:
            await bounded(self.connect(gw, path="/forbidden"))
        response = caught.exception.response
        self.assertEqual(response.status_code, 403)
        self.assertEqual(response.body, b"no sockets for you")
        self.assertEqual(self.tunnels(gw) or 0, 0)

    async def test_idle_timeout(self) -> None:
        """A tunnel with no traffic for C{idle_timeout} is closed; traffic keeps it open."""
        gw, _echo = await self.start(idle_timeout="1s")
        ws = await bounded(self.connect(gw))
        for _ in range(3):
            await bounded(threads.deferToThread(ws.send, "ping"))
            self.assertEqual(await bounded(threads.deferToThread(ws.recv, 5)), "ping")
            await bounded(threads.deferToThread(threading.Event().wait, 0.5))
        with self.assertRaises(ConnectionClosed):
            await bounded(threads.deferToThread(ws.recv, 5))
        await wait_for(lambda: self.tunnels(gw) == 0, "the tunnel gauge to return to 0")

    async def test_max_tunnels(self) -> None:
        """Over C{max_tunnels} on a route, a handshake gets 503; once one closes, it fits."""
        gw, _echo = await self.start(max_tunnels=1)
        first = await bounded(self.connect(gw))
        with self.assertRaises(InvalidStatus) as caught:
            await bounded(self.connect(gw))
        self.assertEqual(caught.exception.response.status_code, 503)
        self.assertIn(b"too_many_tunnels", caught.exception.response.body)
        await bounded(threads.deferToThread(first.close))
        await wait_for(lambda: self.tunnels(gw) == 0, "the tunnel gauge to return to 0")
        second = await bounded(self.connect(gw))
        await bounded(threads.deferToThread(second.close))


class Refuse(Resource):
    """A backend answering every handshake 426, with a chunked body or a Content-Length."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setResponseCode(426)
        request.setHeader(b"x-backend", b"refuse")
        if request.path == b"/sized":
            request.setHeader(b"content-length", b"10")
            return b"use http/2"
        request.write(b"upgrade ")
        request.write(b"refused")
        request.finish()
        return NOT_DONE_YET


class Silent(Resource):
    """A backend that never answers."""

    isLeaf = True

    def render(self, request: Any) -> Any:
        request.notifyFinish().addErrback(lambda _: None)
        return NOT_DONE_YET


HANDSHAKE = (b"Host: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


class HandshakeAnswerTests(TestCase):
    """A non-101 answer to a handshake, relayed as a normal response (raw client, any backend)."""

    timeout = 30

    async def test_relayed(self) -> None:
        """
        Chunked or with a Content-Length, the backend's 426 reaches the
        client with its headers and body, and the connection stays usable.
        """
        h = Harness(self)
        backend = h.serve(Refuse(), "refuse")
        gw = await h.gateway(h.config({"p": pool(backend)}))
        handshake = HANDSHAKE
        client = await h.raw(gw.port)
        for path, body in ((b"/chunked", b"upgrade refused"), (b"/sized", b"use http/2")):
            del client.data[:]
            client.transport.write(b"GET " + path + b" HTTP/1.1\r\n" + handshake)
            response = parse_response(await client.when(response_complete))
            self.assertEqual((response.status, response.body), (426, body))
            self.assertEqual(response.header(b"x-backend"), b"refuse")
            self.assertIsNone(response.header(b"upgrade"))
        self.assertEqual(gw.gateway.tunnels.open, {})

    async def test_no_answer(self) -> None:
        """
        An instance that refuses the connection: 502 in the SPEC's shape; one
        that accepts it but never answers the handshake: 504 after the pool's
        timeout. Both logged, neither leaves a tunnel counted.
        """
        h = Harness(self)
        log = capture_log(self)
        held = h.serve(Silent(), "held")
        gw = await h.gateway(h.config(
            {"down": {"instances": [f"http://127.0.0.1:{refusing_port(self)}"],
                      "health_check": {"enabled": False}, "retry": {"max_retries": 0}},
             "held": {**pool(held), "timeout": "0.5s"}},
            [{"path": "/down", "pool": "down"}, {"path": "/held", "pool": "held"}]))
        for path, status in ((b"/down", 502), (b"/held", 504)):
            response = await h.exchange(gw.port, b"GET " + path + b" HTTP/1.1\r\n" + HANDSHAKE)
            self.assertEqual(response.status, status, response.body)
            error_of(response.body)
        self.assertEqual(len([line for line in log if "WebSocket handshake to" in line]), 2, log)
        self.assertEqual(gw.gateway.tunnels.open, {})

    async def test_h2_has_no_upgrade(self) -> None:
        """
        Over HTTP/2 a request with C{Upgrade} is malformed (RFC 9113 8.2.2):
        the stream is reset before it is routed, and no backend sees it.
        """
        h = Harness(self)
        backend = h.serve(Refuse(), "refuse")
        cert = write_cert(h)
        gw = await h.gateway(h.config({"p": pool(backend)}, server={"tls": tls_section()}))
        client = await h2_connect(h, gw.tls_port, cert)
        result = await bounded(client.request(h2_headers(b"GET", b"/ws", extra=[
            (b"upgrade", b"websocket"), (b"sec-websocket-version", b"13")])).done)
        self.assertIsNone(result.status)
        self.assertEqual(backend.connections, [])


@implementer(IPushProducer)
class Flood(Protocol):
    """
    A backend that accepts any handshake with 101 and then sends C{TOTAL}
    bytes as fast as its connection takes them (pausing when told to).
    """

    TOTAL = 64 * MB
    CHUNK = b"x" * 65536

    def __init__(self) -> None:
        self.head = b""
        self.sent = 0
        self.paused = False
        self.pauses = 0

    def dataReceived(self, data: bytes) -> None:
        if self.sent or b"\r\n\r\n" not in self.head + data:
            self.head += data
            return
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\n\r\n")
        self.transport.registerProducer(self, True)
        self.pump()

    def pump(self) -> None:
        while not self.paused and self.sent < self.TOTAL:
            self.sent += len(self.CHUNK)
            self.transport.write(self.CHUNK)

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        reactor.callLater(0, self.pump)

    def stopProducing(self) -> None:
        self.paused = True


class FlowControlTests(TestCase):
    timeout = 60

    async def test_slow_client_pauses_backend(self) -> None:
        """
        A client that stops reading its tunnel: the gateway stops reading the
        backend (which is paused, having sent far less than it would), its
        own buffer for the client stays small, and once the client reads
        again every byte arrives.
        """
        h = Harness(self)
        floods: list[Flood] = []

        def build(addr: Any) -> Flood:
            floods.append(Flood())
            return floods[-1]

        factory = Factory()
        factory.buildProtocol = build  # type: ignore[method-assign]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        gw = await h.gateway(h.config({"flood": {
            "instances": [f"http://127.0.0.1:{port.getHost().port}"],
            "health_check": {"enabled": False}}}))
        client = await h.raw(gw.port)
        client.transport.pauseProducing()  # read nothing for now
        client.transport.write(b"GET /stream HTTP/1.1\r\n" + HANDSHAKE)
        await wait_for(lambda: floods and floods[0].pauses, "the backend to be paused")
        flood = floods[0]
        # The kernel's buffers fill first; then the backend stays paused.
        for _ in range(40):
            before = flood.sent
            await bounded(deferLater(reactor, 0.25, lambda: None))
            if flood.paused and flood.sent == before:
                break
        else:
            self.fail(f"the backend never stalled (sent {flood.sent})")
        self.assertLess(flood.sent, Flood.TOTAL // 2)
        tunnel_side = [t for t in (open_transport(p) for p in h.tracker.protocols)
                       if t is not None and t.getHost().port == gw.port]
        self.assertEqual(len(tunnel_side), 1)
        self.assertLess(buffered(tunnel_side[0]), 4 * MB)

        client.transport.resumeProducing()
        head = len(b"HTTP/1.1 101 Switching Protocols\r\n")
        await wait_for(lambda: len(client.data) > Flood.TOTAL + head, "every byte", 30)
        body = bytes(client.data).partition(b"\r\n\r\n")[2]
        self.assertEqual(len(body), Flood.TOTAL)


class Scripted(Protocol):
    """One backend connection: reads a handshake, answers C{owner.answer} (or holds it)."""

    def __init__(self, owner: ScriptedBackend) -> None:
        self.owner = owner
        self.head = b""

    def dataReceived(self, data: bytes) -> None:
        if self in self.owner.held:
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.owner.held.append(self)
            if self.owner.answer is not None:
                self.transport.write(self.owner.answer)


class ScriptedBackend:
    """A raw backend whose handshakes get a fixed answer head, or wait for L{release}."""

    def __init__(self, case: TestCase, answer: bytes | None = None) -> None:
        self.answer = answer
        self.held: list[Scripted] = []
        factory = Factory()
        factory.buildProtocol = lambda addr: Scripted(self)  # type: ignore[method-assign]
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        case.addCleanup(self.port.stopListening)
        case.addCleanup(lambda: [p.transport.abortConnection() for p in self.held])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def release(self, answer: bytes) -> None:
        for p in self.held:
            p.transport.write(answer)


SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"


def head_complete(raw: bytes) -> bool:
    return b"\r\n\r\n" in raw


class HandshakeEdgeTests(TestCase):
    """Handshakes racing the cap, and odd 101 answers (a scripted raw backend)."""

    timeout = 30

    async def gateway(self, backend: ScriptedBackend, **route: Any) -> RunningGateway:
        h = self.h = Harness(self)
        return await h.gateway(h.config(
            {"ws": {"instances": [{"id": "s1", "url": backend.url}],
                    "health_check": {"enabled": False}}},
            [{"path": "/*", "pool": "ws", **route}]))

    async def test_burst_over_cap(self) -> None:
        """
        Four simultaneous handshakes on a route with C{max_tunnels: 2}: two
        reach the instance and become tunnels, two get 503 C{too_many_tunnels}
        at once; never more than two tunnels.
        """
        backend = ScriptedBackend(self)
        gw = await self.gateway(backend, websocket={"max_tunnels": 2})
        clients = [await self.h.raw(gw.port, b"GET /ws HTTP/1.1\r\n" + HANDSHAKE)
                   for _ in range(4)]
        await wait_for(lambda: len(backend.held) + sum(
            head_complete(bytes(c.data)) for c in clients) >= 4, "every handshake decided")
        self.assertEqual(len(backend.held), 2)
        backend.release(SWITCH + b"\r\n")
        for c in clients:
            await c.when(head_complete)
        statuses = sorted(parse_response(bytes(c.data)).status for c in clients)
        self.assertEqual(statuses, [101, 101, 503, 503])
        self.assertEqual(gw.gateway.tunnels.open, {"/*": 2})
        for c in clients:
            c.transport.loseConnection()
        await wait_for(lambda: gw.gateway.tunnels.open == {}, "the tunnels to close")

    async def test_refused_header_name(self) -> None:
        """
        A 101 with a header name Twisted refuses (it holds a space): 502
        C{bad_gateway} in the SPEC's shape, as the relay answers a bad head.
        """
        backend = ScriptedBackend(self, SWITCH + b"Bad Name: x\r\n\r\n")
        gw = await self.gateway(backend)
        response = await self.h.exchange(gw.port, b"GET /ws HTTP/1.1\r\n" + HANDSHAKE)
        self.assertEqual(response.status, 502, response.body)
        error = error_of(response.body)
        self.assertEqual((error["code"], error["message"]),
                         ("bad_gateway", "upstream sent a malformed header line"))
        self.assertEqual(gw.gateway.tunnels.open, {})

    async def test_own_headers_replace_upstream(self) -> None:
        """
        A header the route sets (C{transforms.response_headers}) that the 101
        also holds reaches the client once, with the gateway's value, as on
        the normal relay; the upstream's other headers pass.
        """
        backend = ScriptedBackend(
            self, SWITCH + b"X-Served-By: upstream\r\nX-Other: kept\r\n\r\n")
        gw = await self.gateway(backend, transforms={
            "response_headers": {"set": {"X-Served-By": "gw-${instance}"}}})
        client = await self.h.raw(gw.port, b"GET /ws HTTP/1.1\r\n" + HANDSHAKE)
        response = parse_response(await client.when(head_complete))
        self.assertEqual(response.status, 101)
        self.assertEqual(response.all(b"x-served-by"), [b"gw-s1"])
        self.assertEqual(response.all(b"x-other"), [b"kept"])
        client.transport.loseConnection()
