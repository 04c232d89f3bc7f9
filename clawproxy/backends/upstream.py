"""The one upstream agent of a gateway process and its connection pool."""

from __future__ import annotations

import weakref
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.protocols.basic import LineReceiver
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from clawproxy.compat import (
    PARSER_BODY_STATE,
    PARSER_STATUS_STATE,
    HTTP11ClientProtocol,
    connection_header,
    response_parser,
    use_client_protocol,
)

#: The most header lines one upstream response head may have (interim 1xx
#: heads are counted apart). Envoy's and HAProxy's defaults are the same.
MAX_RESPONSE_HEADERS = 100
#: The most bytes the response head lines of one upstream request may take
#: together, interim 1xx heads included (Envoy's default is 60 KiB).
MAX_RESPONSE_HEAD = 64 * 1024


class UpstreamHeadTooLarge(Exception):
    """
    An upstream response head went past L{MAX_RESPONSE_HEADERS} lines or
    L{MAX_RESPONSE_HEAD} bytes (or had one line over Twisted's 16 KiB): the
    request fails and the connection is closed at once.
    """


class _ClientProtocol(HTTP11ClientProtocol):
    """
    Twisted's HTTP/1.1 client protocol, also keeping each response's
    C{Connection} header as C{response.connection_header}: Twisted's parser
    files it apart from C{response.headers}, and the relay needs the header
    names it lists to drop them (RFC 9110 section 7.6.1).

    A response head is bounded (Twisted's client keeps every header line it
    is sent): past L{max_headers} lines or L{max_head} bytes the request
    fails with C{ResponseFailed([UpstreamHeadTooLarge])} and Twisted closes
    the connection (it stops reading at once).
    """

    #: Upstream connections open now, across the process (a gauge reads it).
    open_connections = 0
    max_headers = MAX_RESPONSE_HEADERS
    max_head = MAX_RESPONSE_HEAD

    def connectionMade(self) -> None:
        _ClientProtocol.open_connections += 1
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        _ClientProtocol.open_connections -= 1
        super().connectionLost(reason)

    def request(self, request: Any) -> Any:
        d = super().request(request)
        parser = response_parser(self)
        if parser is not None and not d.called:
            _watch_head(parser, self.max_headers, self.max_head)
            d.addCallback(_keep_connection_header, parser)
        return d


def _watch_head(parser: Any, max_headers: int = MAX_RESPONSE_HEADERS,
                max_head: int = MAX_RESPONSE_HEAD) -> None:
    """
    Watch the response head C{parser} reads: note whether it used a bare LF
    as a line end, and refuse it past C{max_headers} header lines (per
    response, interim ones included) or C{max_head} bytes (all heads of the
    request together), or for one line longer than the parser takes.

    Twisted's client splits lines on LF alone, so C{X-A: 1<LF>Set-Cookie: x}
    would become two headers where a stricter hop sees one: the relay answers
    502 for such a head (C{response.bare_lf}).

    A refusal raises L{UpstreamHeadTooLarge} from the parser, which Twisted's
    protocol turns into a failed request and a closed connection.
    """
    parser.bare_lf = False
    # The wrappers are stored on the parser, so they must not hold the parser
    # strongly: that cycle took each request's whole client-side graph
    # (parser, request, response, headers, producers) to the cyclic garbage
    # collector instead of freeing it at once.
    parser_ref = weakref.ref(parser)
    line_received = type(parser).lineReceived
    # Countdowns: bytes left for every head of the request, and lines left
    # in this head before its blank line (the status line and the headers).
    left = max_head
    lines = 0

    def checked(line: bytes) -> None:
        nonlocal left, lines
        p = parser_ref()
        if p is None:
            return
        state = p.state
        if state != PARSER_BODY_STATE:
            if line[-1:] != b"\r":
                p.bare_lf = True
            left -= len(line) + 1
            if state == PARSER_STATUS_STATE:
                # A status line starts a head (the final one after any 1xx).
                lines = max_headers + 1
            lines -= 1
            if lines < 0 or left < 0:
                if left < 0:
                    raise UpstreamHeadTooLarge(f"response head over {max_head} bytes")
                if line.rstrip(b"\r"):  # not the blank line ending the head
                    raise UpstreamHeadTooLarge(
                        f"response head over {max_headers} header lines")
        line_received(p, line)

    parser.lineReceived = checked
    parser.lineLengthExceeded = _line_too_long


def _line_too_long(line: bytes) -> None:
    """C{LineReceiver.lineLengthExceeded} for a response head: refuse it."""
    raise UpstreamHeadTooLarge(f"response head line over {LineReceiver.MAX_LENGTH} bytes")


def _keep_connection_header(response: Any, parser: Any) -> Any:
    response.connection_header = connection_header(parser)
    response.bare_lf = parser.bare_lf
    return response


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
    use_client_protocol(pool, _ClientProtocol)
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
    Twisted's TLS endpoint whatever their host. Other endpoints are built as
    C{Agent}'s own default does: C{HostnameEndpoint}, wrapped in TLS with
    C{BrowserLikePolicyForHTTPS} for C{https}.
    """

    _MAX = 1024  # instance URLs come from the config; this only bounds a bug

    def __init__(self, reactor: Any, connect_timeout: float,
                 tls_policy: IPolicyForHTTPS | None = None) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = tls_policy if tls_policy is not None else BrowserLikePolicyForHTTPS()
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
        try:
            host = uri.host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"The host of the provided URI ({uri.host!r}) contains non-ASCII "
                             "octets, it should be ASCII decodable.") from None
        endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        if uri.scheme in (b"http", b"ws"):
            return endpoint
        if uri.scheme in (b"https", b"wss"):
            return wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")


def make_agent(reactor: Any, pool: HTTPConnectionPool, connect_timeout: float = 10.0,
               tls_policy: IPolicyForHTTPS | None = None) -> Agent:
    """
    An C{Agent} on C{pool} that connects through L{_EndpointCache}, with
    C{tls_policy} for C{https} (default: Twisted's C{BrowserLikePolicyForHTTPS}).
    Its C{endpoints} attribute is that endpoint factory, for connections of
    their own to the same instances (WebSocket tunnels).
    """
    endpoints = _EndpointCache(reactor, connect_timeout, tls_policy)
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    agent.endpoints = endpoints  # type: ignore[attr-defined]
    return agent
