"""
Upstream forwarding: one request relayed to a pool, with failover and streaming.

Request bodies are sent from Twisted's spool (memory under 100 KB, a temp file
above) without copying them whole; response bodies are relayed chunk by chunk
with the client's transport as flow control: a slow client pauses the upstream
read, a client that leaves aborts the upstream connection.
"""

from __future__ import annotations

import io
import ipaddress
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    FileBodyProducer,
    PotentialDataLoss,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from clawproxy.errors import Rejected, bad_gateway, gateway_timeout, unavailable
from clawproxy.metrics import Metrics
from clawproxy.web.context import RequestContext

#: Headers that describe one connection and are never forwarded (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        b"Connection", b"Keep-Alive", b"Proxy-Authenticate", b"Proxy-Authorization",
        b"Proxy-Connection", b"TE", b"Trailer", b"Transfer-Encoding", b"Upgrade",
    )
)
#: Request headers the gateway sets itself.
_OWN_REQUEST = frozenset(
    (b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto",
     b"x-forwarded-host", b"x-request-id")
)
#: Forwarding claims believed only from C{trusted_proxies}; from anyone else
#: they are dropped (the proxy's own X-Forwarded-* replace them).
_UNTRUSTED_FORWARDING = frozenset((b"forwarded", b"x-real-ip"))
#: Response headers Twisted's server (or the gateway, X-Request-ID) sets itself.
_OWN_RESPONSE = frozenset((b"date", b"server", b"content-length", b"x-request-id"))


def connection_named(headers: Headers) -> frozenset[bytes]:
    """Lower-cased names listed in the C{Connection} header(s)."""
    values = headers.getRawHeaders(b"connection")
    if not values:
        return frozenset()
    return frozenset(
        tok.strip().lower() for v in values for tok in v.split(b",") if tok.strip()
    )


def forwarded_headers(
    request: Any, ctx: RequestContext, upstream_host: bytes, trusted: Sequence[Any]
) -> Headers:
    """
    The headers sent upstream: the client's, less hop-by-hop and
    C{Connection}-named ones, then the proxy's own (which a client cannot strip).
    """
    incoming: Headers = request.requestHeaders
    peer = ctx.client_ip
    from_trusted = bool(trusted) and _is_trusted(peer, trusted)
    drop = HOP_BY_HOP | _OWN_REQUEST | connection_named(incoming)
    if not from_trusted:
        drop = drop | _UNTRUSTED_FORWARDING
    out = Headers()
    for name, values in incoming.getAllRawHeaders():
        if name.lower() not in drop:
            out.setRawHeaders(name, values)
    xff = incoming.getRawHeaders(b"x-forwarded-for")
    if xff and from_trusted:
        chain = b", ".join(xff) + b", " + peer.encode()
    else:
        chain = peer.encode()
    out.setRawHeaders(b"x-forwarded-for", [chain])
    out.setRawHeaders(b"x-forwarded-proto", [b"https" if request.isSecure() else b"http"])
    host = incoming.getRawHeaders(b"host")
    if host:
        out.setRawHeaders(b"x-forwarded-host", [host[-1]])
    out.setRawHeaders(b"x-request-id", [ctx.request_id.encode()])
    out.setRawHeaders(b"host", [upstream_host])
    return out


def _is_trusted(peer: str, trusted: Sequence[Any]) -> bool:
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(addr in net for net in trusted)


def response_headers(response: Any) -> list[tuple[bytes, bytes]]:
    """The upstream response's headers fit to relay: hop-by-hop and framing removed."""
    drop = HOP_BY_HOP | _OWN_RESPONSE | connection_named(response.headers)
    # Twisted's client keeps Connection out of response.headers; the upstream
    # agent (backends.upstream) saves it here.
    for value in getattr(response, "connection_header", ()):
        drop |= {tok.strip().lower() for tok in value.split(b",") if tok.strip()}
    out = [
        (name, value)
        for name, values in response.headers.getAllRawHeaders()
        if name.lower() not in drop
        for value in values
    ]
    for _, value in out:
        if b"\x00" in value or b"\n" in value or b"\r" in value:
            raise bad_gateway("upstream sent a header value with NUL, CR or LF")
    if getattr(response, "bare_lf", False):
        raise bad_gateway("upstream ended a header line with a bare LF")
    return out


@implementer(IBodyProducer)
class BytesProducer:
    """Produce an in-memory body in one write."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Unclosable(io.RawIOBase):
    """A view of a spooled request body that FileBodyProducer may 'close' and we reread."""

    def __init__(self, f: Any) -> None:
        self._f = f
        f.seek(0)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        pass


def body_producer(content: Any) -> IBodyProducer | None:
    """A fresh producer for the request body, or None when there is none."""
    if content is None:
        return None
    if isinstance(content, io.BytesIO):
        data = content.getvalue()
        return BytesProducer(data) if data else None
    content.seek(0, 2)
    if content.tell() == 0:
        return None
    return FileBodyProducer(_Unclosable(content))


class _Discard(Protocol):
    """Read a body we don't relay (a 5xx we retry) so the connection can be reused."""

    def dataReceived(self, data: bytes) -> None:
        pass


class StreamPipe(Protocol):
    """
    Relay an upstream body to the client as it arrives.

    The upstream transport is registered as the client request's streaming
    producer, so a client that reads slowly pauses the upstream read.
    """

    def __init__(self, request: Any, ctx: RequestContext, clock: IReactorTime,
                 stall_timeout: float | None, translator: Any = None) -> None:
        self.request = request
        self.translator = translator
        self.ctx = ctx
        self.done: Deferred[None] = Deferred(self._cancel)
        self._clock = clock
        self._stall_timeout = stall_timeout
        self._stall_call = None
        self._registered = False

    #: Seconds to wait for the first body chunk before giving up on this
    #: upstream (the pool's C{first_token_timeout}, streams only).
    first_chunk_timeout: float | None = None
    _first_call: Any = None

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)
        self._registered = True
        if self._stall_timeout:
            self._stall_call = self._clock.callLater(self._stall_timeout, self._stalled)
        if self.first_chunk_timeout:
            self._first_call = self._clock.callLater(self.first_chunk_timeout,
                                                     self._no_first_chunk)

    def _no_first_chunk(self) -> None:
        """Nothing yet from upstream and nothing sent: let the relay try elsewhere."""
        self._first_call = None
        if self.done.called or self.ctx.bytes_sent:
            return
        self._stop_timer()
        self._unregister()
        self.done.errback(Failure(NoFirstChunk()))
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        if self._first_call is not None:
            self._first_call.cancel()
            self._first_call = None
        if self.translator is not None:
            try:
                data = self.translator.feed(data)
            except ValueError as e:
                self._give_up(str(e))
                return
            if not data:
                return
        self.ctx.bytes_sent += len(data)
        self.request.write(data)
        if self._stall_call is not None:
            self._stall_call.reset(self._stall_timeout)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._stop_timer()
        self._unregister()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            if self.translator is not None:
                tail = self.translator.finish()
                if tail:
                    self.ctx.bytes_sent += len(tail)
                    self.request.write(tail)
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            # After a client disconnect the request has no channel left (and
            # its transport dropped the producer itself): nothing to undo.
            if self.request.channel is not None:
                self.request.unregisterProducer()

    def _stop_timer(self) -> None:
        if self._first_call is not None:
            if self._first_call.active():
                self._first_call.cancel()
            self._first_call = None
        if self._stall_call is not None:
            if self._stall_call.active():
                self._stall_call.cancel()
            self._stall_call = None

    def _stalled(self) -> None:
        """No chunk for C{stall_timeout}: tell an SSE client, then give up on upstream."""
        self._stall_call = None
        if self.done.called:
            return
        ctype = self.request.responseHeaders.getRawHeaders(b"content-type") or [b""]
        self.ctx.error = "stall_timeout"
        self._unregister()
        if ctype[0].startswith(b"text/event-stream"):
            # An SSE client is told in-band and the stream ends cleanly.
            event = (b'data: {"error": {"message": "upstream stalled", '
                     b'"type": "upstream_error", "code": "stall_timeout"}}\n\n')
            self.ctx.bytes_sent += len(event)
            self.request.write(event)
            self.done.callback(None)
        else:
            # Any other body would look complete if ended now: abort instead.
            self.done.errback(Failure(StreamStalled()))
        self.transport.stopProducing()

    def _give_up(self, why: str) -> None:
        """The body cannot be relayed (e.g. untranslatable): abort both sides."""
        self.ctx.error = why
        self._stop_timer()
        self._unregister()
        self.done.errback(Failure(UpstreamBroken(why)))
        self.transport.stopProducing()

    def _cancel(self, d: Deferred[None]) -> None:
        """The client left: stop reading upstream (this aborts that connection)."""
        self._stop_timer()
        self._unregister()
        self.transport.stopProducing()


class NoFirstChunk(Exception):
    """A stream sent headers but no chunk within C{first_token_timeout}."""


class StreamStalled(Exception):
    """An upstream stream sent nothing for C{stall_timeout}."""


class NoInstance(Exception):
    """No instance of the pool could take the request."""


def classify(failure: Failure) -> str:
    """Name the kind of upstream failure, as used in C{retry.retry_on}."""
    if failure.check(ConnectionRefusedError):
        return "refused"
    if failure.check(TimeoutError, defer.TimeoutError):
        return "timeout"
    if failure.check(ConnectError, DNSLookupError, ResponseNeverReceived):
        # ResponseNeverReceived: the connection closed before any response
        # byte, which is how a killed backend or a stale pooled connection
        # shows itself; nothing reached the client, so it is safe to resend.
        return "connect_failure"
    return "error"


class Relay:
    """
    Send requests to a pool's instances through one L{IAgent}.

    @ivar agent: the upstream agent (one persistent connection pool).
    """

    log = Logger()

    def __init__(self, agent: Any, clock: IReactorTime, metrics: Metrics,
                 retry_policy: Any, breakers: Any, trusted_proxies: Sequence[Any] = ()) -> None:
        self.agent = agent
        self.clock = clock
        self.metrics = metrics
        self.retry = retry_policy
        self.breakers = breakers
        self.trusted = tuple(trusted_proxies)

    async def forward(self, ctx: RequestContext, pool: Any, key: str | None,
                      sticky_key: str | None, timeout: float, upstream_path: bytes) -> None:
        """
        Relay C{ctx.request} to C{pool}, failing over per its retry policy.

        Returns once the response has been relayed in full.

        @param key: the balancer's hash key (client IP, session...), if any.
        @param sticky_key: the session-affinity key, if the pool has affinity.

        @raise Rejected: when the gateway must answer (no instance, timeout, 5xx
            with nothing to fail over to is relayed as is, not raised).
        @raise NoInstance: when no instance could take it (caller falls back).
        """
        tried: set[str] = set()
        self.retry.record_request(pool)
        metrics = self.metrics
        while True:
            inst = self._choose(pool, key, sticky_key, tried)
            if inst is None:
                if tried and ctx.error:
                    raise _failure_rejection(ctx.error)
                raise NoInstance(pool.name)
            tried.add(inst.id)
            ctx.instance = inst
            ctx.attempts += 1
            inst.active += 1
            inst.requests += 1
            active_gauge = metrics.active_connections.labels(pool.name, inst.id)
            active_gauge.inc()
            started = self.clock.seconds()
            try:
                delay = await self._attempt(ctx, pool, inst, timeout, upstream_path, started, tried)
            finally:
                inst.active -= 1
                active_gauge.dec()
                metrics.upstream_latency.labels(pool.name, inst.id).observe(
                    self.clock.seconds() - started
                )
            if delay is None:
                return
            metrics.upstream_retries_total.labels(pool.name).inc()
            if delay > 0:
                await _sleep(self.clock, delay)

    def _choose(self, pool: Any, key: str | None, sticky_key: str | None,
                tried: set[str]) -> Any:
        inst = None
        affinity = pool.affinity if sticky_key is not None else None
        if affinity is not None and not tried:
            sticky = pool.by_id.get(affinity.get(sticky_key) or "")
            if sticky is not None and sticky.available() and self.breakers.allow(pool, sticky):
                inst = sticky
        if inst is None:
            candidates = [
                i for i in pool.eligible(tried) if self.breakers.allow(pool, i)
            ]
            inst = pool.balancer.pick(candidates, key)
            if inst is not None and affinity is not None:
                affinity.set(sticky_key, inst.id)
        return inst

    async def _attempt(self, ctx: RequestContext, pool: Any, inst: Any, timeout: float,
                       upstream_path: bytes, started: float, tried: set[str]) -> float | None:
        """
        One upstream attempt. Returns None when the response was relayed, else
        the delay before retrying a failure that nothing reached the client for.

        @raise Rejected: the failure is not retried and the gateway answers.
        """
        request = ctx.request
        metrics = self.metrics
        rewrite = ctx.rewrite
        if rewrite is None:
            url = inst.url_bytes + upstream_path
            producer = body_producer(request.content)
        else:
            url = inst.url_bytes + (rewrite.path or upstream_path)
            producer = BytesProducer(rewrite.body)
        if ctx.query:
            url += b"?" + ctx.query
        headers = forwarded_headers(request, ctx, inst.host_header, self.trusted)
        d = self.agent.request(ctx.method, url, headers, producer)
        d.addTimeout(timeout, self.clock, onTimeoutCancel=_timed_out)
        try:
            response = await d
        except CancelledError:
            raise
        except Exception:
            if request._disconnected:
                # The client left: Agent reports its cancellation as
                # ResponseNeverReceived([CancelledError]). Not the instance's
                # fault, and nobody to retry for.
                raise CancelledError() from None
            failure = Failure()
            outcome = classify(failure)
            ctx.error = outcome
            metrics.upstream_requests_total.labels(pool.name, inst.id, outcome).inc()
            self.breakers.record(pool, inst, False)
            if outcome == "timeout":
                raise gateway_timeout(
                    f"upstream {inst.id} did not answer within {timeout:g}s"
                ) from None
            if outcome == "error":
                self.log.failure("request to {instance} failed", failure, instance=inst.id)
            self.registry_failure(inst)
            delay = self.retry.should_retry(pool, outcome, ctx.attempts)
            if delay is None:
                raise _failure_rejection(outcome) from None
            if failure.check(ResponseNeverReceived):
                # Most often a keep-alive connection the backend closed as we
                # sent on it: the instance itself may be fine, so it stays a
                # candidate for the retry (a dead one then refuses at once).
                tried.discard(inst.id)
            return delay
        now = self.clock.seconds()
        metrics.upstream_ttfb.labels(pool.name).observe(now - started)
        code = response.code
        metrics.upstream_requests_total.labels(pool.name, inst.id, _status_class(code)).inc()
        if code >= 500:
            self.breakers.record(pool, inst, False)
            self.registry_failure(inst)
            if pool.eligible(tried):
                delay = self.retry.should_retry(pool, "5xx", ctx.attempts)
                if delay is not None:
                    ctx.error = "5xx"
                    response.deliverBody(_Discard())
                    return delay
        else:
            self.breakers.record(pool, inst, True)
            self.registry_success(inst)
        try:
            if code < 100 or code > 599:
                raise bad_gateway(f"upstream {inst.id} sent status {code}")
            relayed = response_headers(response)
        except Rejected:
            # Garbage from upstream: don't read it, don't reuse the connection.
            ctx.error = "bad_upstream_response"
            response.deliverBody(_Discard())
            _drop_connection(response)
            raise
        ctx.status = code
        ctx.error = None
        saved_headers = request.responseHeaders.copy()
        request.setResponseCode(code, response.phrase)
        rh = request.responseHeaders
        for name, value in relayed:
            rh.addRawHeader(name, value)
        for name, value in ctx.response_headers:
            rh.setRawHeaders(name, [value.replace(b"${instance}", inst.id.encode())])
        rh.setRawHeaders(b"server-timing", [b"gateway;dur=%.1f, upstream;dur=%.1f" % (
            (started - ctx.started) * 1000, (now - started) * 1000)])
        translator = rewrite.response() if rewrite is not None and 200 <= code < 300 else None
        if translator is not None:
            rh.setRawHeaders(b"content-type", [translator.content_type])
        elif response.length is not UNKNOWN_LENGTH:
            rh.setRawHeaders(b"content-length", [b"%d" % response.length])
        if ctx.method == b"HEAD" or code in (204, 304):
            response.deliverBody(_Discard())
            return None
        pipe = StreamPipe(request, ctx, self.clock, pool.config.stall_timeout, translator)
        first = pool.config.first_token_timeout
        if first and _is_stream(response):
            pipe.first_chunk_timeout = first
        response.deliverBody(pipe)
        try:
            await pipe.done
        except NoFirstChunk:
            # Nothing reached the client: undo this answer and try elsewhere.
            request.responseHeaders = saved_headers
            request.setResponseCode(200)
            ctx.status = 0
            ctx.error = "first_token_timeout"
            metrics.upstream_requests_total.labels(pool.name, inst.id, ctx.error).inc()
            self.breakers.record(pool, inst, False)
            self.registry_failure(inst)
            delay = None
            if pool.eligible(tried):
                delay = self.retry.should_retry(pool, ctx.error, ctx.attempts)
            if delay is None:
                raise gateway_timeout(
                    f"upstream {inst.id} sent no first chunk within {first:g}s") from None
            return delay
        except (CancelledError, StreamStalled):
            raise
        except Exception:
            failure = Failure()
            ctx.error = "truncated"
            if not failure.check(ResponseFailed):
                self.log.failure("relaying body from {instance}", failure, instance=inst.id)
            raise UpstreamBroken(inst.id) from None
        return None

    # Passive health accounting; the registry is set by the gateway.
    registry: Any = None

    def registry_failure(self, inst: Any) -> None:
        if self.registry is not None:
            self.registry.passive_failure(inst)

    def registry_success(self, inst: Any) -> None:
        if self.registry is not None:
            self.registry.passive_success(inst)


class UpstreamBroken(Exception):
    """The upstream failed after response bytes reached the client: abort, never retry."""


_STREAM_TYPES = (b"text/event-stream", b"application/x-ndjson")


def _is_stream(response: Any) -> bool:
    ctype = response.headers.getRawHeaders(b"content-type")
    return bool(ctype) and ctype[0].lower().startswith(_STREAM_TYPES)


def _drop_connection(response: Any) -> None:
    """Close the connection a response came on, so the pool never reuses it."""
    transport = getattr(response, "_transport", None)
    if transport is not None:
        transport.stopProducing()


def _status_class(code: int) -> str:
    return str(code)


def _failure_rejection(outcome: str) -> Rejected:
    if outcome == "timeout":
        return gateway_timeout()
    if outcome == "5xx":
        return bad_gateway("every instance tried answered with an error")
    if outcome in ("connect_failure", "refused"):
        return Rejected(502, "could not connect to any upstream instance",
                        "upstream_error", "upstream_unreachable")
    return bad_gateway()


def _timed_out(result: Any, timeout: float) -> Any:
    """
    C{addTimeout}'s C{onTimeoutCancel} for upstream requests: a request
    cancelled by its timeout fails with C{ResponseNeverReceived([CancelledError])}
    (not C{CancelledError}), which must still count as a timeout.
    """
    if isinstance(result, Failure):
        raise defer.TimeoutError(timeout, "upstream request")
    return result


def _sleep(clock: IReactorTime, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred(lambda _: call.cancel() if call.active() else None)
    call = clock.callLater(seconds, d.callback, None)
    return d


__all__ = ["NoInstance", "Relay", "UpstreamBroken", "unavailable"]
