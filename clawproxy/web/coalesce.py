"""
Request coalescing: identical concurrent cacheable requests (the same cache
key) make one upstream call, whose answer, streamed or not, is fanned out
to every request waiting on it.

The call (a L{Flight}) belongs to no client: the relay answers a
L{FlightRequest} standing in for one, and each waiting request is written
what it receives: the head when the first body byte comes (or at the end),
then every chunk. A request that joins late is first written the chunks so
far, then the live ones. A waiter that leaves stops being written to; the
call goes on while any other waits, and is cancelled (the upstream request
aborted) when the last one leaves. A call that fails before any byte fails
every waiter the same way (each answers its own error or fallback); one
that breaks mid-body aborts them all, as a relayed response would be.

Coalesced answers are not flow-controlled per client: the upstream is read
at its own pace and a slow client's bytes wait in its connection's buffer
(the answer is kept whole for late joiners anyway, for as long as the call
lasts).
"""

from __future__ import annotations

import io
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from clawproxy.compat import client_gone
from clawproxy.interfaces import IRelayWrapper
from clawproxy.metrics import Metrics
from clawproxy.web.context import RequestContext


class FlightRequest:
    """
    What the relay writes a shared upstream answer to, in place of a client
    request: the parts of L{twisted.web.server.Request} the relay and the
    body pipe use.
    """

    startedWriting = False
    finished = False
    _disconnected = False

    def __init__(self, flight: Flight, source: Any) -> None:
        self.flight = flight
        self.requestHeaders = source.requestHeaders.copy()
        self._secure = source.isSecure()
        content = source.content
        data = b""
        if content is not None:
            content.seek(0)
            data = content.read()
            content.seek(0)
        self.content = io.BytesIO(data)
        self.responseHeaders = Headers()
        self.code = 200
        self.code_message = b"OK"
        self.channel = self
        self.producer: Any = None

    def isSecure(self) -> bool:
        return self._secure

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code
        self.code_message = message or b""

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.responseHeaders.setRawHeaders(name, [value])

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        if data:
            self.startedWriting = True
            self.flight.chunk(data)

    def finish(self) -> None:
        self.finished = True


@attrs.define(eq=False)
class _Waiter:
    ctx: RequestContext
    done: Deferred[None] | None = None
    head_sent: bool = False


class Flight:
    """One shared upstream call and the requests waiting on it."""

    def __init__(self, coalescer: Coalescer, key: str) -> None:
        self.coalescer = coalescer
        self.key = key
        self.waiters: list[_Waiter] = []
        self.chunks: list[bytes] = []
        self.head: tuple[int, bytes, list[tuple[bytes, list[bytes]]]] | None = None
        self.ended = False
        self.call: Deferred[Any] | None = None
        self.fctx: RequestContext | None = None

    def start(self, forward: Any, ctx: RequestContext, *args: Any) -> None:
        """Make the one upstream call, answering a L{FlightRequest}."""
        fake = FlightRequest(self, ctx.request)
        self.fctx = attrs.evolve(ctx, request=fake,
                                 response_headers=list(ctx.response_headers),
                                 notes=dict(ctx.notes or {}))
        try:
            self.call = ensureDeferred(forward(self.fctx, *args))
        except Exception:
            self.call = fail()
        self.call.addBoth(self._ended)

    def join(self, ctx: RequestContext) -> Deferred[None]:
        """
        Wait on the call: C{ctx.request} is written its answer, and the
        Deferred fires (or fails as the call did) once it is all written.
        Cancelling it leaves the call.
        """
        waiter = _Waiter(ctx)
        waiter.done = Deferred(lambda _: self._leave(waiter))
        self.waiters.append(waiter)
        if self.head is not None:
            self._send_head(waiter)
            for chunk in self.chunks:
                self._write(waiter, chunk)
        return waiter.done

    def _leave(self, waiter: _Waiter) -> None:
        if waiter in self.waiters:
            self.waiters.remove(waiter)
        if not self.waiters and not self.ended and self.call is not None:
            self.coalescer.forget(self)
            self.call.cancel()

    def _capture_head(self) -> None:
        fake = self.fctx.request
        self.head = (fake.code, fake.code_message,
                     list(fake.responseHeaders.getAllRawHeaders()))

    def _send_head(self, waiter: _Waiter) -> None:
        request = waiter.ctx.request
        if waiter.head_sent or request.finished or client_gone(request):
            return
        waiter.head_sent = True
        code, message, headers = self.head
        request.setResponseCode(code, message)
        rh = request.responseHeaders
        for name, values in headers:
            rh.setRawHeaders(name, values)
        for name, value in waiter.ctx.response_headers:  # its own, not the first one's
            rh.setRawHeaders(name, [value.replace(b"${instance}",
                                                  self.fctx.instance_id.encode())])
        waiter.ctx.status = code

    def _write(self, waiter: _Waiter, data: bytes) -> None:
        request = waiter.ctx.request
        if request.finished or client_gone(request):
            return
        waiter.ctx.bytes_sent += len(data)
        request.write(data)

    def chunk(self, data: bytes) -> None:
        """A body chunk of the shared answer: to every waiter, and kept for late ones."""
        if self.head is None:
            self._capture_head()
            for waiter in self.waiters:
                self._send_head(waiter)
        self.chunks.append(data)
        for waiter in list(self.waiters):
            self._write(waiter, data)

    def _ended(self, result: Any) -> None:
        self.ended = True
        self.coalescer.forget(self)
        waiters, self.waiters = self.waiters, []
        fctx = self.fctx
        if not isinstance(result, Failure) and self.head is None:
            self._capture_head()  # an answer with no body
        for waiter in waiters:
            ctx = waiter.ctx
            ctx.instance, ctx.attempts = fctx.instance, fctx.attempts
            ctx.error = ctx.error or fctx.error
            if isinstance(result, Failure):
                if fctx.request.startedWriting:
                    ctx.aborted = True
                waiter.done.errback(result)
            else:
                self._send_head(waiter)
                waiter.done.callback(None)
        return None  # told every waiter (none left: the last one cancelled it)


@implementer(IRelayWrapper)
class Coalescer:
    """Wraps the relay step: requests with a cache key share calls in flight."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.flights: dict[str, Flight] = {}
        self.coalesced = 0

    def forget(self, flight: Flight) -> None:
        if self.flights.get(flight.key) is flight:
            del self.flights[flight.key]

    def wrap(self, forward: Any) -> Any:
        def coalesced(ctx: RequestContext, *args: Any) -> Any:
            notes = ctx.notes
            note = notes.get("cache") if notes else None
            if note is None:
                return forward(ctx, *args)
            flight = self.flights.get(note.key)
            if flight is None:
                flight = self.flights[note.key] = Flight(self, note.key)
                done = flight.join(ctx)
                flight.start(forward, ctx, *args)
                return done
            self.coalesced += 1
            self.metrics.coalesced_requests_total.labels(ctx.route_name).inc()
            return flight.join(ctx)

        return coalesced
