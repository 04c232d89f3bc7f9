"""Tests for L{clawproxy.backends.upstream}: the agent's endpoint choice."""

from __future__ import annotations

import gc
import weakref

from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI
from twisted.web.http_headers import Headers

from clawproxy.backends.upstream import _EndpointCache, _watch_bare_lf, make_agent, make_pool
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
    """L{_watch_bare_lf} notes bare-LF heads and leaves no reference cycle behind."""

    def parser(self) -> HTTPClientParser:
        parser = HTTPClientParser(Request(b"GET", b"/", Headers(), None), lambda rest: None)
        _watch_bare_lf(parser)
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
        _watch_bare_lf(parser)
        ref = weakref.ref(parser)
        enabled = gc.isenabled()
        gc.disable()
        try:
            del parser
            self.assertIsNone(ref())
        finally:
            if enabled:
                gc.enable()


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
