"""The one upstream agent of a gateway process and its connection pool."""

from __future__ import annotations

import weakref
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.web._newclient import BODY, HTTP11ClientProtocol
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer


class _ClientProtocol(HTTP11ClientProtocol):
    """
    Twisted's HTTP/1.1 client protocol, also keeping each response's
    C{Connection} header as C{response.connection_header}: Twisted's parser
    files it apart from C{response.headers}, and the relay needs the header
    names it lists to drop them (RFC 9110 section 7.6.1).
    """

    #: Upstream connections open now, across the process (a gauge reads it).
    open_connections = 0

    def connectionMade(self) -> None:
        _ClientProtocol.open_connections += 1
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        _ClientProtocol.open_connections -= 1
        super().connectionLost(reason)

    def request(self, request: Any) -> Any:
        d = super().request(request)
        parser = self._parser
        if parser is not None and not d.called:
            _watch_bare_lf(parser)
            d.addCallback(_keep_connection_header, parser)
        return d


def _watch_bare_lf(parser: Any) -> None:
    """
    Note on C{parser} whether the response head used a bare LF as a line end.

    Twisted's client splits lines on LF alone, so C{X-A: 1<LF>Set-Cookie: x}
    would become two headers where a stricter hop sees one: the relay answers
    502 for such a head (C{response.bare_lf}).
    """
    parser.bare_lf = False
    # The wrapper is stored on the parser, so it must not hold the parser
    # strongly: that cycle took each request's whole client-side graph
    # (parser, request, response, headers, producers) to the cyclic garbage
    # collector instead of freeing it at once.
    parser_ref = weakref.ref(parser)
    line_received = type(parser).lineReceived

    def checked(line: bytes) -> None:
        p = parser_ref()
        if p is None:
            return
        if line[-1:] != b"\r" and p.state != BODY:
            p.bare_lf = True
        line_received(p, line)

    parser.lineReceived = checked


def _keep_connection_header(response: Any, parser: Any) -> Any:
    response.connection_header = tuple(parser.connHeaders.getRawHeaders(b"connection") or ())
    response.bare_lf = parser.bare_lf
    return response


class _QuietClientFactory(_HTTP11ClientFactory):
    """Twisted's client factory without a log line per new upstream connection."""

    noisy = False

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _ClientProtocol(self._quiescentCallback)


def make_pool(reactor: Any, max_per_host: int = 1024, idle_timeout: float = 60.0
              ) -> HTTPConnectionPool:
    """
    A persistent connection pool with clawproxy's settings.

    C{max_per_host} idle connections are kept per upstream: a burst of
    concurrent streams needs one connection each, and the next burst finds
    them open instead of connecting again (each connect costs a reactor turn
    before its request can be written). Idle ones close after C{idle_timeout}.

    Twisted's silent resend of idempotent requests on a stale connection is
    turned off: the relay owns every retry (and counts it).
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = idle_timeout
    pool.retryAutomatically = False
    pool._factory = _QuietClientFactory
    return pool


def open_upstream_connections() -> int:
    """How many upstream connections this process has open."""
    return _ClientProtocol.open_connections


@implementer(IAgentEndpointFactory)
class _EndpointCache:
    """
    Reuse one endpoint per (scheme, host, port).

    C{Agent} asks its endpoint factory for a new C{HostnameEndpoint} (which
    IDNA-encodes the host) on every request, even when the pool then hands
    back an idle connection. Endpoints hold no per-connection state, so one
    per upstream serves every request.

    An C{http} upstream given as an IP address gets a plain TCP endpoint:
    C{HostnameEndpoint} would "resolve" the literal with C{getaddrinfo} in
    the reactor's thread pool on every new connection (a thread hop and a
    GIL hand-off before the connect even starts). Names still go through
    C{HostnameEndpoint}, so DNS changes are followed; C{https} upstreams keep
    Twisted's TLS endpoint whatever their host.
    """

    _MAX = 1024  # instance URLs come from the config; this only bounds a bug

    def __init__(self, factory: Any, reactor: Any, connect_timeout: float) -> None:
        self._factory = factory
        self._reactor = reactor
        self._timeout = connect_timeout
        self._endpoints: dict[tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: Any) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if len(self._endpoints) >= self._MAX:
                self._endpoints.clear()
            endpoint = self._endpoints[key] = self._new_endpoint(uri)
        return endpoint

    def _new_endpoint(self, uri: Any) -> Any:
        if uri.scheme == b"http":
            host = uri.host.decode("ascii", "replace")
            if isIPAddress(host):
                return TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
            if isIPv6Address(host):
                return TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        return self._factory.endpointForURI(uri)


def make_agent(reactor: Any, pool: HTTPConnectionPool, connect_timeout: float = 10.0) -> Agent:
    agent = Agent(reactor, pool=pool, connectTimeout=connect_timeout)
    agent._endpointFactory = _EndpointCache(agent._endpointFactory, reactor, connect_timeout)
    return agent
