"""Tests for L{clawproxy.web.site}: limits enforced before any resource runs."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from clawproxy.web.site import (
    FD_RESERVE,
    GatewayRequest,
    GatewaySite,
    _Discarding,
    default_max_connections,
    fd_limit,
    per_address_cap,
)


class Recorder(Resource):
    """Answers with the body length it got; remembers each request."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, bool]] = []

    def render(self, request: Any) -> bytes:
        body = request.content.read()
        self.seen.append((request.method, body, getattr(request, "too_large", False)))
        return b"got %d" % len(body)


class Holding(Resource):
    """Keeps every request open (the test finishes it)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Any] = []

    def render(self, request: Any) -> Any:
        self.held.append(request)
        return NOT_DONE_YET


class Connection:
    """One client connection to a L{GatewaySite}, over a L{StringTransport}."""

    def __init__(self, site: GatewaySite, host: str = "10.0.0.7") -> None:
        peer = IPv4Address("TCP", host, 50000)
        self.transport = StringTransport(peerAddress=peer)
        self.protocol = site.buildProtocol(peer)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        """Status, lower-cased headers and body of the first response written."""
        raw = self.transport.value()
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return status, headers, body

    def close(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


class SiteTests(SynchronousTestCase):
    """A L{GatewaySite} with a 100-byte body limit and a 1 KiB head limit."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resource = Recorder()
        self.site = GatewaySite(self.resource, max_body_size=100, max_header_size=1024,
                                timeout=60, head_timeout=10, reactor=self.reactor)

    def connect(self) -> Connection:
        conn = Connection(self.site)
        self.addCleanup(lambda: conn.transport.disconnected or conn.close())
        return conn

    def assertRefused(self, conn: Connection, status: int, code: str) -> None:
        """The connection got a JSON error C{status}/C{code} and is being closed."""
        got, headers, body = conn.response()
        self.assertEqual(got, status)
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertEqual(headers[b"connection"], b"close")
        self.assertEqual(int(headers[b"content-length"]), len(body))
        self.assertEqual(json.loads(body)["error"]["code"], code)
        self.assertTrue(conn.transport.disconnecting)
        self.assertEqual(self.resource.seen, [])

    def test_idle_keepalive_closed_after_client_timeout(self) -> None:
        """
        A kept-alive connection left idle for C{client_timeout} (60 s here) is
        closed; one that keeps sending requests is not.
        """
        busy, idle = self.connect(), self.connect()
        for conn in (busy, idle):
            conn.send(b"GET /v1/x HTTP/1.1\r\nHost: gw\r\n\r\n")
            self.assertEqual(conn.response()[0], 200)
        for _ in range(5):
            self.reactor.advance(30)
            busy.send(b"GET /v1/x HTTP/1.1\r\nHost: gw\r\n\r\n")
        self.assertTrue(idle.transport.disconnecting)
        self.assertFalse(busy.transport.disconnecting)

    def test_small_body(self) -> None:
        """A body within the limit reaches the resource whole."""
        conn = self.connect()
        conn.send(b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n" + b"a" * 100)
        self.assertEqual(self.resource.seen, [(b"POST", b"a" * 100, False)])
        self.assertEqual(conn.response()[0], 200)
        self.assertEqual(conn.response()[2], b"got 100")

    def test_content_length_over_limit(self) -> None:
        """
        A declared Content-Length over the limit is refused with 413 as soon as
        the head is in; the body that follows is not read.
        """
        conn = self.connect()
        conn.send(b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 101\r\n\r\n")
        self.assertRefused(conn, 413, "request_too_large")
        conn.send(b"b" * 101)
        self.assertEqual(self.resource.seen, [])

    def test_chunked_over_limit(self) -> None:
        """A chunked body that grows over the limit is refused with 413, not kept."""
        conn = self.connect()
        conn.send(b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.send(b"40\r\n" + b"c" * 64 + b"\r\n")
        self.assertEqual(conn.transport.value(), b"")
        request = conn.protocol.channel.requests[-1]
        conn.send(b"40\r\n" + b"c" * 64 + b"\r\n")
        self.assertTrue(request.too_large)
        self.assertIsInstance(request.content, _Discarding)
        self.assertRefused(conn, 413, "request_too_large")
        conn.send(b"40\r\n" + b"c" * 64 + b"\r\n0\r\n\r\n")
        self.assertEqual(self.resource.seen, [])

    def test_chunked_within_limit(self) -> None:
        """A chunked body within the limit reaches the resource whole."""
        conn = self.connect()
        conn.send(b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"32\r\n" + b"d" * 50 + b"\r\n32\r\n" + b"d" * 50 + b"\r\n0\r\n\r\n")
        self.assertEqual(self.resource.seen, [(b"POST", b"d" * 100, False)])

    def test_header_block_too_large(self) -> None:
        """A head whose lines add up past C{max_header_size} is answered 431 JSON."""
        conn = self.connect()
        conn.send(b"GET /v1/x HTTP/1.1\r\nHost: gw\r\n")
        for n in range(20):
            conn.send(b"X-Filler-%d: %s\r\n" % (n, b"f" * 60))
        self.assertRefused(conn, 431, "headers_too_large")

    def test_line_too_long(self) -> None:
        """One line longer than C{max_header_size} is answered 431 JSON, not just closed."""
        conn = self.connect()
        conn.send(b"GET /v1/x HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"z" * 2000)
        self.assertRefused(conn, 431, "headers_too_large")

    def test_request_line_too_long(self) -> None:
        """An over-long request line is answered 431 as well."""
        conn = self.connect()
        conn.send(b"GET /" + b"p" * 2000 + b" HTTP/1.1\r\n")
        self.assertRefused(conn, 431, "headers_too_large")

    def test_head_deadline(self) -> None:
        """A head still incomplete C{head_timeout} after its first byte is answered 408."""
        conn = self.connect()
        conn.send(b"GET /v1/x HTTP/1.1\r\n")
        for _ in range(9):
            self.reactor.advance(1)
            conn.send(b"X-Slow: 1\r\n")
        self.assertEqual(conn.transport.value(), b"")
        self.reactor.advance(1)
        self.assertRefused(conn, 408, "request_timeout")

    def test_chunk_size_overflow_refused_at_once(self) -> None:
        """
        A chunk size past 63 bits (C{ffffffffffffffff1}) is answered 400 as
        soon as its line is in, not after the body-rate or head deadline.
        """
        conn = self.connect()
        conn.send(b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"ffffffffffffffff1\r\nabc")
        self.assertRefused(conn, 400, "malformed_request")

    def test_chunk_over_limit_refused_at_its_size_line(self) -> None:
        """A chunk that would take the body past C{max_body_size} is answered 413 at once."""
        conn = self.connect()
        conn.send(b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"32\r\n" + b"d" * 50 + b"\r\n")
        self.assertEqual(conn.transport.value(), b"")
        conn.send(b"33\r\n")
        self.assertRefused(conn, 413, "request_too_large")

    def test_unknown_expect(self) -> None:
        """An C{Expect} other than C{100-continue} is answered 417, and no 100 Continue."""
        conn = self.connect()
        conn.send(b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\n"
                  b"Expect: 100-continue-please\r\n\r\n")
        self.assertRefused(conn, 417, "expectation_failed")

    def test_control_bytes(self) -> None:
        """A target with a DEL, or a header value with a vertical tab: 400 at the head."""
        for head, code in [(b"GET /v1/mo\x7fdels HTTP/1.1\r\nHost: gw\r\n", "invalid_target"),
                           (b"GET /v1/x?\x80 HTTP/1.1\r\nHost: gw\r\n", "invalid_target"),
                           (b"GET /v1/x HTTP/1.1\r\nHost: gw\r\nContent-Type: a\x0bb\r\n",
                            "invalid_header")]:
            conn = self.connect()
            conn.send(head + b"\r\n")
            self.assertRefused(conn, 400, code)

    def test_head_in_time(self) -> None:
        """A complete head cancels the head deadline."""
        conn = self.connect()
        conn.send(b"GET /v1/x HTTP/1.1\r\nHost: gw\r\n\r\n")
        self.reactor.advance(10)
        self.assertEqual(conn.response()[0], 200)
        conn.close()
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class GotLengthTests(SynchronousTestCase):
    """L{GatewayRequest.gotLength} decides from the declared length alone."""

    def request(self, limit: int) -> GatewayRequest:
        site = GatewaySite(Recorder(), max_body_size=limit, max_header_size=1024, timeout=60,
                           reactor=MemoryReactorClock())
        protocol = site.buildProtocol(IPv4Address("TCP", "10.0.0.7", 1))
        protocol.makeConnection(StringTransport())
        self.addCleanup(protocol.connectionLost, Failure(ConnectionDone()))
        return GatewayRequest(protocol.channel, False)

    def test_over_limit(self) -> None:
        """Over the limit: flagged, and the body goes to a sink that keeps nothing."""
        request = self.request(10)
        request.gotLength(11)
        self.assertTrue(request.too_large)
        self.assertIsInstance(request.content, _Discarding)
        request.handleContentChunk(b"x" * 11)
        request.content.seek(0)
        self.assertEqual(request.content.read(), b"")

    def test_within_limit(self) -> None:
        """At or under the limit the body is kept as usual."""
        request = self.request(10)
        request.gotLength(10)
        self.assertFalse(request.too_large)
        request.handleContentChunk(b"y" * 10)
        request.content.seek(0)
        self.assertEqual(request.content.read(), b"y" * 10)


class BackpressureTests(SynchronousTestCase):
    """A connection whose answers back up is not read (pipelining without reading)."""

    def setUp(self) -> None:
        self.resource = Holding()
        self.site = GatewaySite(self.resource, max_body_size=100, max_header_size=1024,
                                timeout=60, reactor=MemoryReactorClock())
        self.conn = Connection(self.site)
        self.addCleanup(self.conn.close)

    def test_full_output_pauses_reading_during_a_request(self) -> None:
        """
        The transport fills while a request is handled: the connection stops
        being read at once (Twisted waited for the next request), stays
        paused after the buffer drains until the request is done, then reads
        again and handles the next pipelined request.
        """
        channel = self.conn.protocol.channel
        get = b"GET /v1/x HTTP/1.1\r\nHost: gw\r\n\r\n"
        self.conn.send(get + get)
        self.assertEqual(len(self.resource.held), 1)
        self.assertEqual(self.conn.transport.producerState, "producing")
        channel.pauseProducing()  # the transport's write buffer is full
        self.assertEqual(self.conn.transport.producerState, "paused")
        channel.resumeProducing()  # drained, but the request is still open
        self.assertEqual(self.conn.transport.producerState, "paused")
        self.resource.held[0].finish()
        self.assertEqual(self.conn.transport.producerState, "producing")
        self.assertEqual(len(self.resource.held), 2)

    def test_stays_paused_while_output_full(self) -> None:
        """A request that ends while the transport is still full does not resume reading."""
        channel = self.conn.protocol.channel
        self.conn.send(b"GET /v1/x HTTP/1.1\r\nHost: gw\r\n\r\n")
        channel.pauseProducing()
        self.resource.held[0].finish()
        self.assertEqual(self.conn.transport.producerState, "paused")
        channel.resumeProducing()
        self.assertEqual(self.conn.transport.producerState, "producing")


class ConnectionCapTests(SynchronousTestCase):
    """The global and per-address connection caps of a L{GatewaySite}."""

    def site(self, **kw: Any) -> GatewaySite:
        return GatewaySite(Recorder(), max_body_size=100, max_header_size=1024, timeout=60,
                           reactor=MemoryReactorClock(), **kw)

    def connect(self, site: GatewaySite, host: str) -> Connection:
        conn = Connection(site, host)
        self.addCleanup(lambda: conn.transport.disconnected or conn.close())
        return conn

    def assertRefused(self, conn: Connection, message: str) -> None:
        status, headers, body = conn.response()
        self.assertEqual(status, 503)
        self.assertEqual(headers[b"retry-after"], b"1")
        self.assertEqual(json.loads(body)["error"],
                         {"message": message, "type": "server_error",
                          "code": "too_many_connections"})
        self.assertTrue(conn.transport.disconnecting)

    def test_default_from_fd_limit(self) -> None:
        """Unset, C{max_connections} is half the open-file limit less L{FD_RESERVE}."""
        site = self.site()
        self.assertEqual(site.max_connections, (fd_limit() - FD_RESERVE) // 2)
        self.assertEqual(default_max_connections(20000), 9968)
        self.assertEqual(default_max_connections(1024), 480)
        self.assertEqual(default_max_connections(10), 1)

    def test_per_address_cap(self) -> None:
        """Three quarters of the global cap; all of it under 4."""
        self.assertEqual([per_address_cap(n) for n in (1, 2, 3, 4, 8, 9968)],
                         [1, 2, 3, 3, 6, 7476])

    def test_one_address_does_not_lock_out_another(self) -> None:
        """
        With C{max_connections: 8}, one address gets 6 connections and a 503
        for the 7th; another address is still served, until the global cap.
        """
        site = self.site(max_connections=8)
        hog = [self.connect(site, "10.0.0.1") for _ in range(7)]
        for conn in hog[:6]:
            self.assertEqual(conn.transport.value(), b"")
        self.assertRefused(hog[6], "too many open connections from this address")
        self.assertEqual(site.per_address, {"10.0.0.1": 6})
        other = [self.connect(site, "10.0.0.2") for _ in range(3)]
        other[0].send(b"GET /v1/x HTTP/1.1\r\nHost: gw\r\n\r\n")
        self.assertEqual(other[0].response()[0], 200)
        self.assertEqual(other[1].transport.value(), b"")
        self.assertRefused(other[2], "too many open connections")
        # A closed connection frees its address's share.
        hog[0].close()
        self.assertEqual(site.per_address, {"10.0.0.1": 5, "10.0.0.2": 2})
        self.assertEqual(self.connect(site, "10.0.0.1").transport.value(), b"")
        for conn in hog[1:6] + other[:2]:
            conn.close()
        self.assertEqual(site.per_address, {"10.0.0.1": 1})

    def test_trusted_proxy_exempt(self) -> None:
        """An address in C{trusted_proxies} may use the whole global cap."""
        site = self.site(max_connections=4,
                         trusted_proxies=[ipaddress.ip_network("10.1.0.0/16")])
        conns = [self.connect(site, "10.1.2.3") for _ in range(5)]
        for conn in conns[:4]:
            self.assertEqual(conn.transport.value(), b"")
        self.assertRefused(conns[4], "too many open connections")
