"""
WebSocket pass-through (HTTP/1.1 C{Upgrade: websocket}).

A handshake is a request like any other up to the choice of an instance
(the stages authenticate and limit it, the pool's balancer and affinity
pick the instance); L{Tunnels.forward} then opens a connection of its own to
that instance (through the upstream agent's endpoints, so C{https://}
instances get the pool's TLS settings), sends the handshake, and reads the
answer:

  - C{101}: the answer is relayed, the client connection is taken from the
    HTTP channel (L{GatewayChannel.take_over
    <clawproxy.web.site.GatewayChannel.take_over>}) and the two connections
    are joined byte for byte both ways, with flow control each way, until
    either side closes or neither sends a byte for C{idle_timeout};
  - anything else: relayed as a normal response, and the connection closed.

The gateway does not read the frames. HTTP/2 carries no C{Upgrade} (RFC
9113 8.2.2; Twisted does not offer RFC 8441's extended CONNECT), so this is
HTTP/1.1 only: over HTTP/2 a WebSocket handshake is refused by the HTTP/2
layer before it is routed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from zope.interface import implementer

from clawproxy.backends.tls import tls_failure
from clawproxy.compat import ChunkedDecoder, client_gone
from clawproxy.config import WebSocketConfig
from clawproxy.errors import Rejected, bad_gateway, gateway_timeout, unavailable
from clawproxy.interfaces import CANCELLED, OK
from clawproxy.metrics import Metrics
from clawproxy.web.context import RequestContext
from clawproxy.web.headers import HOP_BY_HOP, connection_named, forwarded_headers
from clawproxy.web.relay import NoInstance

#: The largest upstream answer head to a handshake.
MAX_HEAD = 64 * 1024
_RESPONSE_DROP = HOP_BY_HOP | frozenset((b"date", b"server", b"x-request-id"))


class NoEndpoints(Exception):
    """The upstream agent cannot open raw connections (a test double)."""


def is_websocket(request: Any) -> bool:
    """
    Whether C{request} asks for a WebSocket: an HTTP/1.1 C{GET} with
    C{Upgrade: websocket} and C{Connection: upgrade} (an C{Upgrade} header
    the C{Connection} header does not name is ignored, RFC 9110 7.8). The
    instance checks the rest of the handshake.
    """
    if request.method != b"GET" or request.clientproto != b"HTTP/1.1":  # HTTP/2: b"HTTP/2"
        return False
    headers = request.requestHeaders
    values = headers.getRawHeaders(b"upgrade")
    if not values:
        return False
    return (any(tok.strip().lower() == b"websocket" for v in values for tok in v.split(b","))
            and b"upgrade" in connection_named(headers))


class _Head:
    """A parsed upstream response head."""

    def __init__(self, raw: bytes) -> None:
        lines = raw.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise bad_gateway("upstream answered the WebSocket handshake with a bad status line")
        self.code = int(parts[1])
        self.reason = parts[2] if len(parts) > 2 else b""
        self.headers = Headers()
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip() or b"\n" in line or b"\x00" in line:
                raise bad_gateway("upstream sent a malformed header line")
            try:
                self.headers.addRawHeader(name, value.strip())
            except ValueError:  # a name or value Twisted refuses (InvalidHeaderName)
                raise bad_gateway("upstream sent a malformed header line") from None
        if not 100 <= self.code <= 599:
            raise bad_gateway(f"upstream sent status {self.code}")

    def relayed(self) -> list[tuple[bytes, bytes]]:
        """The headers fit to relay (hop-by-hop and the gateway's own dropped)."""
        drop = _RESPONSE_DROP | connection_named(self.headers)
        return [(n, v) for n, vs in self.headers.getAllRawHeaders() if n.lower() not in drop
                for v in vs]


def _reader(transport: Any) -> Any:
    """
    What pauses reading C{transport}: the transport itself, or for TLS (whose
    protocol is no push producer) the TCP transport below it; C{None} if none.
    """
    while transport is not None and not IPushProducer.providedBy(transport):
        transport = getattr(transport, "transport", None)
    return transport


@implementer(IPushProducer)
class _Pauser:
    """Pause reading one side while the other cannot take more (never stops it)."""

    def __init__(self, producer: Any) -> None:
        self._producer = producer

    def pauseProducing(self) -> None:
        if self._producer is not None:
            self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        if self._producer is not None:
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        pass


class _Upstream(Protocol):
    """
    The connection to the instance: reads the answer head, then either the
    body of a non-101 answer (into C{body}) or tunnel bytes (to C{tunnel}).
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.head: Deferred[tuple[bytes, bytes]] = Deferred()
        self.tunnel: Tunnel | None = None
        self.body: Any = None  # a callable taking bytes, while a body is read
        #: Fires (with None) once the connection is closed.
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_upstream(data)
        elif self.body is not None:
            self.body(data)
        elif not self.head.called:
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                head, rest = self.buffer[:end], self.buffer[end + 4:]
                self.buffer = b""
                self.head.callback((head, rest))
            elif len(self.buffer) > MAX_HEAD:
                self.head.errback(bad_gateway("upstream handshake answer head too large"))
                self.transport.abortConnection()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self.tunnel is not None:
            self.tunnel.upstream_lost()
        if not self.head.called:
            self.head.errback(reason)
        self.lost.callback(None)


class Tunnel:
    """
    One joined pair: the client's transport (taken from its HTTP channel)
    and the upstream connection. Bytes are copied as they come; each side
    stops being read while the other's write buffer is full.
    """

    def __init__(self, tunnels: Tunnels, ctx: RequestContext, upstream: _Upstream,
                 idle_timeout: float, done: Any) -> None:
        self.tunnels = tunnels
        self.ctx = ctx
        self.upstream = upstream
        self.client = ctx.request.channel.transport
        self.idle_timeout = idle_timeout
        self.closed = False
        self._done = done
        self._idle = tunnels.clock.callLater(idle_timeout, self._idle_expired)
        self._upstream_reader = _Pauser(_reader(upstream.transport))

    def start(self, channel: Any, early: bytes) -> None:
        """Join the two connections, with C{early} (bytes from the instance after its 101)."""
        # The upstream's write buffer full: stop reading the client (and back).
        self.upstream.transport.registerProducer(_Pauser(_reader(self.client)), True)
        # The client's write buffer full: the channel (the client transport's
        # producer) tells us, and we stop reading the upstream.
        buffered = channel.take_over(self)
        self.upstream.tunnel = self
        if early:
            self.from_upstream(early)
        if buffered:
            self.dataReceived(buffered)
        if self.upstream.lost.called:
            self._close()

    # client side (called by the channel)

    def dataReceived(self, data: bytes) -> None:
        self._idle.reset(self.idle_timeout)
        self.upstream.transport.write(data)

    def pauseProducing(self) -> None:
        """The client's write buffer is full: stop reading the upstream."""
        self._upstream_reader.pauseProducing()

    def resumeProducing(self) -> None:
        self._upstream_reader.resumeProducing()

    def connectionLost(self, reason: Failure) -> None:
        self._close()

    # upstream side

    def from_upstream(self, data: bytes) -> None:
        self._idle.reset(self.idle_timeout)
        self.ctx.bytes_sent += len(data)
        self.client.write(data)

    def upstream_lost(self) -> None:
        self._close()

    def _idle_expired(self) -> None:
        self.tunnels.log.info("WebSocket tunnel {request_id} idle for {t:g}s: closed",
                              request_id=self.ctx.request_id, t=self.idle_timeout)
        self.ctx.error = "idle_timeout"
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._idle.active():
            self._idle.cancel()
        # A TLS transport closes only once its producer is gone.
        self.upstream.transport.unregisterProducer()
        self.client.unregisterProducer()
        self.upstream.transport.loseConnection()
        self.client.loseConnection()
        self._done()


class Tunnels:
    """
    The WebSocket tunnels of a gateway: opens them (L{forward}) and counts
    them per route (the C{websocket_tunnels} gauge, C{max_tunnels}).

    @param endpoints: the upstream agent's endpoint factory
        (C{IAgentEndpointFactory}), for a connection of the tunnel's own.
    """

    log = Logger()

    def __init__(self, endpoints: Any, clock: IReactorTime, metrics: Metrics) -> None:
        self.endpoints = endpoints
        self.clock = clock
        self.metrics = metrics
        #: Tunnels open now or being opened (handshake under way), per route name.
        self.open: dict[str, int] = {}

    async def forward(self, ctx: RequestContext, pool: Any, key: str | None,
                      sticky_key: str | None, timeout: float, upstream_path: bytes,
                      cfg: WebSocketConfig, trusted: Any = ()) -> bool:
        """
        Send the handshake in C{ctx} to an instance of C{pool} and answer it.

        Returns C{True} once a tunnel is open (the request then ends with
        the connection), C{False} when a non-101 answer was relayed as a
        normal response (finished).

        @raise NoInstance: no instance could take it (the caller falls back).
        @raise Rejected: too many tunnels (503), no connection (502), no
            answer in C{timeout} (504).
        """
        if self.endpoints is None:
            raise NoEndpoints()
        route = ctx.route_name
        if self.open.get(route, 0) >= cfg.max_tunnels:
            raise unavailable(f"too many WebSocket connections on route {route}", 1,
                              "too_many_tunnels")
        # The slot is taken now, not at the 101: handshakes waiting for an
        # instance or an answer count, so a burst cannot pass the cap.
        self.open[route] = self.open.get(route, 0) + 1
        opened = False
        try:
            opened = await self._take(ctx, pool, key, sticky_key, timeout, upstream_path,
                                      cfg, trusted)
        finally:
            if not opened:
                self._release(route)
        return opened

    def _release(self, route: str) -> None:
        self.open[route] -= 1
        if not self.open[route]:
            del self.open[route]

    async def _take(self, ctx: RequestContext, pool: Any, key: str | None,
                    sticky_key: str | None, timeout: float, upstream_path: bytes,
                    cfg: WebSocketConfig, trusted: Any) -> bool:
        inst = pool.take(key, set(), sticky_key)
        if isinstance(inst, Deferred):
            inst = await inst
        if inst is None:
            raise NoInstance(pool.name)
        ctx.instance = inst
        ctx.attempts += 1
        inst.active += 1
        inst.requests += 1
        active = self.metrics.active_connections.labels(pool.name, inst.id)
        active.inc()
        opened = False
        try:
            opened = await self._handshake(ctx, pool, inst, timeout, upstream_path, cfg,
                                           trusted)
        finally:
            if not opened:
                inst.active -= 1
                active.dec()
        return opened

    async def _handshake(self, ctx: RequestContext, pool: Any, inst: Any, timeout: float,
                         upstream_path: bytes, cfg: WebSocketConfig, trusted: Any) -> bool:
        request = ctx.request
        uri = URI.fromBytes(inst.url_bytes + upstream_path)
        upstream = _Upstream()
        started = self.clock.seconds()
        try:
            connecting = connectProtocol(self.endpoints.endpointForURI(uri), upstream)
            connecting.addTimeout(timeout, self.clock)
            await connecting
        except CancelledError:
            pool.record(inst, CANCELLED)  # the client left
            raise
        except Exception:
            self._failed(ctx, pool, inst, Failure())
            raise Rejected(502, f"could not connect to upstream instance {inst.id}",
                           "upstream_error", "upstream_unreachable") from None
        headers = forwarded_headers(request, ctx, inst.host_header, trusted)
        headers.setRawHeaders(b"connection", [b"Upgrade"])
        headers.setRawHeaders(b"upgrade", [b"websocket"])
        target = uri.path + (b"?" + ctx.query if ctx.query else b"")
        lines = [b"GET " + target + b" HTTP/1.1"]
        lines += [name + b": " + value for name, values in headers.getAllRawHeaders()
                  for value in values]
        upstream.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
        upstream.head.addTimeout(timeout, self.clock)
        try:
            raw, rest = await upstream.head
            head = _Head(raw)
        except CancelledError:
            upstream.transport.abortConnection()
            pool.record(inst, CANCELLED)  # the client left
            raise
        except Rejected:
            upstream.transport.abortConnection()
            pool.record(inst, "error", client=ctx.client_ip)
            ctx.error = "bad_response"
            raise
        except Exception:
            upstream.transport.abortConnection()
            failure = Failure()
            self._failed(ctx, pool, inst, failure)
            if failure.check(defer.TimeoutError):
                raise gateway_timeout(f"upstream {inst.id} did not answer the WebSocket"
                                      f" handshake within {timeout:g}s") from None
            raise Rejected(502, f"upstream instance {inst.id} closed the WebSocket handshake",
                           "upstream_error", "upstream_unreachable") from None
        now = self.clock.seconds()
        self.metrics.upstream_ttfb.labels(pool.name, inst.id).observe(now - started)
        self.metrics.upstream_latency.labels(pool.name, inst.id).observe(now - started)
        self.metrics.upstream_requests_total.labels(pool.name, inst.id, str(head.code)).inc()
        pool.record(inst, "5xx" if head.code >= 500 else OK, client=ctx.client_ip)
        if head.code != 101:
            await self._relay_answer(ctx, upstream, head, rest)
            return False
        if client_gone(request):
            upstream.transport.abortConnection()
            return False
        self._open_tunnel(ctx, pool, inst, upstream, head, rest, cfg)
        return True

    def _failed(self, ctx: RequestContext, pool: Any, inst: Any, failure: Failure) -> None:
        """Record and log a handshake that got no answer (no connection, TLS, timeout)."""
        timed_out = bool(failure.check(defer.TimeoutError))
        outcome = "timeout" if timed_out else "connect_failure"
        # A connection that never opened: the instance is out at once (as in the relay).
        reached = not failure.check(ConnectError, DNSLookupError)
        pool.record(inst, outcome, reached=reached, client=ctx.client_ip)
        ctx.error = outcome
        why = tls_failure(failure) or failure.getErrorMessage() or failure.type.__name__
        self.log.warn("WebSocket handshake to {instance} failed: {why}", instance=inst.id,
                      why=why)

    def _open_tunnel(self, ctx: RequestContext, pool: Any, inst: Any, upstream: _Upstream,
                     head: _Head, early: bytes, cfg: WebSocketConfig) -> None:
        request = ctx.request
        route = ctx.route_name
        # The gateway's own headers replace the instance's of the same name
        # (the last value of each, as the relay's setRawHeaders leaves it).
        own = {n.lower(): (n, v) for n, v in ctx.response_headers}
        out = [b"HTTP/1.1 101 " + (head.reason or b"Switching Protocols")]
        out += [n + b": " + v for n, v in head.relayed() if n.lower() not in own]
        out += [b"Upgrade: websocket", b"Connection: Upgrade",
                b"X-Request-ID: " + ctx.request_id.encode()]
        out += [n + b": " + v.replace(b"${instance}", inst.id.encode())
                for n, v in own.values()]
        out += [b"Set-Cookie: " + cookie for cookie in request.cookies]  # session affinity
        request.channel.transport.write(b"\r\n".join(out) + b"\r\n\r\n")
        ctx.status = 101
        ctx.upgraded = True
        gauge = self.metrics.websocket_tunnels.labels(route)
        gauge.inc()
        active = self.metrics.active_connections.labels(pool.name, inst.id)

        def done() -> None:
            self._release(route)  # taken in forward
            gauge.dec()
            inst.active -= 1
            active.dec()

        Tunnel(self, ctx, upstream, cfg.idle_timeout, done).start(request.channel, early)

    async def _relay_answer(self, ctx: RequestContext, upstream: _Upstream, head: _Head,
                            rest: bytes) -> None:
        """Relay a non-101 answer to the handshake as a normal response, then close."""
        request = ctx.request
        ctx.status = head.code
        request.setResponseCode(head.code, head.reason or None)
        for name, value in head.relayed():
            if name.lower() != b"content-length":
                request.responseHeaders.addRawHeader(name, value)
        for name, value in ctx.response_headers:
            request.setHeader(name, value.replace(b"${instance}", ctx.instance_id.encode()))
        finished: Deferred[None] = Deferred()
        length = head.headers.getRawHeaders(b"content-length")
        chunked = any(b"chunked" in v.lower()
                      for v in head.headers.getRawHeaders(b"transfer-encoding") or ())
        if length and not chunked and not length[-1].isdigit():
            upstream.transport.abortConnection()
            raise bad_gateway("upstream sent a malformed Content-Length")
        if head.code in (204, 304) or (length and not chunked and int(length[-1]) == 0):
            finished.callback(None)
        elif chunked:
            decoder = ChunkedDecoder(self._writer(ctx),
                                     lambda extra: finished.called or finished.callback(None))
            upstream.body = decoder.dataReceived
        elif length:
            due = int(length[-1])
            request.setHeader(b"content-length", b"%d" % due)
            write = self._writer(ctx)

            def counted(data: bytes) -> None:
                nonlocal due
                data = data[:due]
                due -= len(data)
                write(data)
                if due <= 0 and not finished.called:
                    finished.callback(None)

            upstream.body = counted
        else:
            upstream.body = self._writer(ctx)
            upstream.lost.addCallback(lambda _: finished.called or finished.callback(None))
        if upstream.body is not None and rest:
            upstream.body(rest)
        upstream.lost.addCallback(
            lambda _: finished.called or finished.errback(
                bad_gateway("upstream closed before the end of its answer")))
        try:
            await finished
        finally:
            upstream.body = None
            upstream.transport.loseConnection()
        if not request.finished and not client_gone(request):
            request.finish()

    @staticmethod
    def _writer(ctx: RequestContext) -> Any:
        request = ctx.request

        def write(data: bytes) -> None:
            if data and not client_gone(request):
                ctx.bytes_sent += len(data)
                request.write(data)

        return write
