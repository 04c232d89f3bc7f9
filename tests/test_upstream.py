"""Tests for L{clawproxy.backends.upstream}: the agent's endpoint choice."""

from __future__ import annotations

import gc
import weakref

from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import AccumulatingProtocol, MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI, ResponseFailed
from twisted.web.http_headers import Headers

from clawproxy.backends.upstream import (
    MAX_RESPONSE_HEAD,
    MAX_RESPONSE_HEADERS,
    UpstreamHeadTooLarge,
    _ClientProtocol,
    _EndpointCache,
    _watch_head,
    make_agent,
    make_pool,
)
from clawproxy.compat import ClientRequest as Request
from clawproxy.compat import HTTPClientParser


class EndpointTests(SynchronousTestCase):
    """L{make_agent} reuses one endpoint per upstream and skips DNS for IP literals."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.agent = make_agent(self.reactor, make_pool(self.reactor), connect_timeout=7.0)
        self.endpoints = _EndpointCache(self.reactor, connect_timeout=7.0)

    def endpoint(self, url: bytes):
        return self.endpoints.endpointForURI(URI.fromBytes(url))

    def connects_to(self, endpoint) -> tuple[str, int, float]:
        """Where C{endpoint} connects: host, port and connect timeout given to the reactor."""
        endpoint.connect(Factory.forProtocol(Protocol))
        ((host, port, _factory, timeout, _bind),) = self.reactor.tcpClients
        return host, port, timeout

    def test_reused(self) -> None:
        """Requests to the same scheme, host and port share one endpoint; others do not."""
        a = self.endpoint(b"http://127.0.0.1:8001/v1/chat/completions")
        self.assertIs(a, self.endpoint(b"http://127.0.0.1:8001/health?x=1"))
        self.assertIsNot(a, self.endpoint(b"http://127.0.0.1:8002/v1/chat/completions"))
        self.assertIsNot(a, self.endpoint(b"https://127.0.0.1:8001/v1/chat/completions"))

    def test_ipv4_literal(self) -> None:
        """An http upstream at an IPv4 address connects over plain TCP, no name resolution."""
        ep = self.endpoint(b"http://10.0.0.11:11434/api/chat")
        self.assertIsInstance(ep, TCP4ClientEndpoint)
        self.assertEqual(self.connects_to(ep), ("10.0.0.11", 11434, 7.0))

    def test_ipv6_literal(self) -> None:
        """An http upstream at an IPv6 address connects over plain TCP6."""
        ep = self.endpoint(b"http://[::1]:8080/")
        self.assertIsInstance(ep, TCP6ClientEndpoint)
        self.assertEqual(self.connects_to(ep), ("::1", 8080, 7.0))

    def test_hostname(self) -> None:
        """A name is resolved on each new connection, as Twisted's Agent does."""
        self.assertIsInstance(self.endpoint(b"http://gpu-1.internal:8000/"), HostnameEndpoint)

    def test_https_literal(self) -> None:
        """An https upstream keeps Twisted's TLS endpoint, even at an IP address."""
        ep = self.endpoint(b"https://10.0.0.11:8443/")
        self.assertNotIsInstance(ep, (TCP4ClientEndpoint, HostnameEndpoint))

    def test_connects_to_literal(self) -> None:
        """A request to an IP literal goes straight to connectTCP with the connect timeout."""
        self.agent.request(b"GET", b"http://127.0.0.1:8001/health")
        ((host, port, _factory, timeout, _bind),) = self.reactor.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 8001, 7.0))


class BareLFWatchTests(SynchronousTestCase):
    """L{_watch_head} notes bare-LF heads and leaves no reference cycle behind."""

    def parser(self) -> HTTPClientParser:
        parser = HTTPClientParser(Request(b"GET", b"/", Headers(), None), lambda rest: None)
        _watch_head(parser)
        parser.makeConnection(StringTransport())
        return parser

    def test_crlf(self) -> None:
        """A head with CRLF line ends is not flagged."""
        parser = self.parser()
        parser.dataReceived(b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n")
        self.assertFalse(parser.bare_lf)
        self.assertEqual(parser.response.headers.getRawHeaders(b"x-a"), [b"1"])

    def test_bare_lf(self) -> None:
        """A head line ended by LF alone is flagged."""
        parser = self.parser()
        parser.dataReceived(b"HTTP/1.1 200 OK\r\nX-A: 1\nSet-Cookie: x\r\n"
                            b"Content-Length: 0\r\n\r\n")
        self.assertTrue(parser.bare_lf)

    def test_freed_by_refcount(self) -> None:
        """A watched parser is freed as soon as it is dropped, without the cyclic collector."""
        parser = HTTPClientParser(Request(b"GET", b"/", Headers(), None), lambda rest: None)
        _watch_head(parser)
        ref = weakref.ref(parser)
        enabled = gc.isenabled()
        gc.disable()
        try:
            del parser
            self.assertIsNone(ref())
        finally:
            if enabled:
                gc.enable()


def header_lines(n: int, width: int = 20) -> bytes:
    """C{n} distinct header lines, each C{width} bytes long with its CRLF."""
    return b"".join(b"X-%05d: %s\r\n" % (i, b"a" * (width - 11)) for i in range(n))


class HeadCapTests(SynchronousTestCase):
    """
    L{_watch_head} bounds a response head: header lines per response, bytes
    over every head of the request, and the length of one line.
    """

    def parser(self, **caps: int) -> tuple[HTTPClientParser, list]:
        parser = HTTPClientParser(Request(b"GET", b"/", Headers(), None), lambda rest: None)
        _watch_head(parser, **caps)
        parser.makeConnection(StringTransport())
        responses: list = []
        parser._responseDeferred.addCallback(responses.append)
        return parser, responses

    def test_defaults(self) -> None:
        """The caps are 100 header lines and 64 KiB of head."""
        self.assertEqual((MAX_RESPONSE_HEADERS, MAX_RESPONSE_HEAD), (100, 65536))
        self.assertEqual((_ClientProtocol.max_headers, _ClientProtocol.max_head),
                         (100, 65536))

    def test_at_the_count_cap(self) -> None:
        """A head with exactly C{max_headers} header lines is read whole."""
        parser, responses = self.parser(max_headers=10)
        parser.dataReceived(b"HTTP/1.1 200 OK\r\n" + header_lines(9)
                            + b"Content-Length: 0\r\n\r\n")
        self.assertEqual(responses[0].code, 200)
        self.assertEqual(responses[0].headers.getRawHeaders(b"x-00008"), [b"a" * 9])

    def test_over_the_count_cap(self) -> None:
        """One header line more than C{max_headers} is refused as it arrives."""
        parser, responses = self.parser(max_headers=10)
        parser.dataReceived(b"HTTP/1.1 200 OK\r\n" + header_lines(10))
        e = self.assertRaises(UpstreamHeadTooLarge, parser.dataReceived, b"X-B: 1\r\n")
        self.assertEqual(str(e), "response head over 10 header lines")
        self.assertEqual(responses, [])

    def test_over_the_size_cap(self) -> None:
        """A head over C{max_head} bytes is refused, however few its lines."""
        parser, responses = self.parser(max_head=1000)
        e = self.assertRaises(UpstreamHeadTooLarge, parser.dataReceived,
                              b"HTTP/1.1 200 OK\r\n" + header_lines(5, width=200)
                              + b"Content-Length: 0\r\n\r\n")
        self.assertEqual(str(e), "response head over 1000 bytes")
        self.assertEqual(responses, [])

    def test_interim_heads(self) -> None:
        """
        Each interim (1xx) head has its own line count, but their bytes
        count towards the request's head size: a flood of C{103}s is refused.
        """
        parser, responses = self.parser(max_headers=10)
        hints = b"HTTP/1.1 103 Early Hints\r\n" + header_lines(10) + b"\r\n"
        parser.dataReceived(hints + b"HTTP/1.1 200 OK\r\n" + header_lines(9)
                            + b"Content-Length: 0\r\n\r\n")
        self.assertEqual(responses[0].code, 200)
        self.assertIsNone(responses[0].headers.getRawHeaders(b"link"))

        parser, responses = self.parser(max_head=4096)
        self.assertRaises(UpstreamHeadTooLarge, parser.dataReceived, hints * 20)
        self.assertEqual(responses, [])

    def test_long_line(self) -> None:
        """A head line longer than the parser takes (16 KiB) is refused at once."""
        parser, _ = self.parser()
        e = self.assertRaises(UpstreamHeadTooLarge, parser.dataReceived,
                              b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 20000)
        self.assertEqual(str(e), "response head line over 16384 bytes")

    def test_body_not_counted(self) -> None:
        """Body bytes after the head are not counted against the caps."""
        parser, responses = self.parser(max_head=100)
        parser.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
        body = AccumulatingProtocol()
        body.closedDeferred = None
        responses[0].deliverBody(body)
        parser.dataReceived(b"x\n" * 2500)
        self.assertEqual(body.data, b"x\n" * 2500)


class HeadCapProtocolTests(SynchronousTestCase):
    """A capped head fails the request and closes the connection."""

    def test_refused(self) -> None:
        """
        Past the cap, the request's Deferred fails with C{ResponseFailed}
        wrapping L{UpstreamHeadTooLarge}, the connection is closed and
        nothing more is read.
        """
        proto = _ClientProtocol()
        transport = StringTransport()
        proto.makeConnection(transport)
        d = proto.request(Request(b"GET", b"/", Headers({b"host": [b"h"]}), None))
        proto.dataReceived(b"HTTP/1.1 200 OK\r\n")
        proto.dataReceived(header_lines(200))
        failure = self.failureResultOf(d, ResponseFailed)
        (reason,) = failure.value.reasons
        self.assertTrue(reason.check(UpstreamHeadTooLarge))
        self.assertTrue(transport.disconnecting)
        proto.dataReceived(header_lines(200))  # after the refusal: ignored, no error


class PoolTests(SynchronousTestCase):
    def test_keeps_a_burst(self) -> None:
        """
        The pool keeps enough idle connections per upstream for a burst of
        hundreds of concurrent streams: the next burst reuses them instead of
        connecting again (bench/burst.sh: 400 streams at once).
        """
        pool = make_pool(MemoryReactorClock())
        self.assertGreaterEqual(pool.maxPersistentPerHost, 1024)
        self.assertFalse(pool.retryAutomatically)
