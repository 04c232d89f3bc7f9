"""
The body pipe: request bodies sent upstream from Twisted's spool, and
response bodies relayed to the client chunk by chunk.

Request bodies are sent from Twisted's spool (memory under 100 KB, a temp file
above) without copying them whole; response bodies are relayed with the
client's transport as flow control: a slow client pauses the upstream read,
a client that leaves aborts the upstream connection.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, PotentialDataLoss, ResponseDone
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from clawproxy.errors import sse_error_event
from clawproxy.interfaces import IBodyFilter
from clawproxy.web.context import RequestContext

log = Logger()


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


class Discard(Protocol):
    """Read a body we don't relay (a 5xx we retry) so the connection can be reused."""

    def dataReceived(self, data: bytes) -> None:
        pass


@implementer(IBodyFilter)
class TranslateFilter:
    """A L{BodyTranslator<clawproxy.web.translate.BodyTranslator>} (e.g. Ollama
    NDJSON to OpenAI SSE) as the first filter of a response."""

    rewrites = True

    def __init__(self, translator: Any) -> None:
        self.translator = translator

    def data(self, chunk: bytes) -> bytes:
        return self.translator.feed(chunk)

    def end(self, outcome: str) -> bytes:
        return self.translator.finish() if outcome == "complete" else b""


def begin_filters(filters: Sequence[Any], ctx: RequestContext, code: int,
                  headers: list[tuple[bytes, bytes]]) -> tuple[Any, ...]:
    """
    The body filters taking part in one relayed response, in chain order.

    @param filters: the data plane's L{IResponseFilter}s.
    @param headers: the response head as it will be relayed; filters may change it.
    """
    if not filters:
        return ()
    chain = []
    for factory in filters:
        part = factory.begin(ctx, code, headers)
        if part is not None:
            chain.append(part)
    return tuple(chain)


class StreamPipe(Protocol):
    """
    Relay an upstream body to the client as it arrives, through the response's
    body filters (none, usually: then each chunk is written as it comes).

    The upstream transport is registered as the client request's streaming
    producer, so a client that reads slowly pauses the upstream read.
    """

    def __init__(self, request: Any, ctx: RequestContext, clock: IReactorTime,
                 stall_timeout: float | None, filters: Sequence[Any] = ()) -> None:
        self.request = request
        self.filters = tuple(filters)
        self.ctx = ctx
        self.done: Deferred[None] = Deferred(self._cancel)
        self._clock = clock
        self._stall_timeout = stall_timeout
        self._stall_call = None
        self._registered = False

    #: Seconds to wait for the first body chunk before giving up on this
    #: upstream (the pool's C{first_token_timeout}, streams only).
    first_chunk_timeout: float | None = None
    #: Called once, when the first chunk comes (or by L{settle_first_chunk}).
    first_chunk: Any = None
    _first_call: Any = None

    def settle_first_chunk(self) -> None:
        """Call L{first_chunk} now if nobody has yet (the body ended without one)."""
        if self.first_chunk is not None:
            call, self.first_chunk = self.first_chunk, None
            call()

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
        if self.filters:
            self._end("broken")
        self.done.errback(Failure(NoFirstChunk()))
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        if self._first_call is not None:
            self._first_call.cancel()
            self._first_call = None
            self.settle_first_chunk()
        if self.filters:
            try:
                for f in self.filters:
                    data = f.data(data)
                    if not data:
                        return
            except ValueError as e:
                self._give_up(str(e))
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
            if self.filters:
                tail = self._end("complete")
                if tail:
                    self.ctx.bytes_sent += len(tail)
                    self.request.write(tail)
            self.done.callback(None)
        elif self.filters and (tail := self._end("broken")):
            # A filter ends the body in-band (e.g. an SSE error event): the
            # client is told, and the response ends instead of being aborted.
            self.ctx.error = "truncated"
            self.ctx.bytes_sent += len(tail)
            self.request.write(tail)
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def _end(self, outcome: str) -> bytes:
        """
        Tell each filter the response ended; what a filter appends passes
        through the filters after it. Returns the bytes to append.
        """
        out = b""
        for f in self.filters:
            try:
                if out:
                    out = f.data(out)
                out += f.end(outcome)
            except Exception:
                self.ctx.error = self.ctx.error or "filter_failed"
                log.failure("response filter {f!r} failed at the end", f=f)
                out = b""
        return out

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
            event = sse_error_event("upstream stalled", "upstream_error", "stall_timeout")
            if self.filters:
                event += self._end("stalled")
            self.ctx.bytes_sent += len(event)
            self.request.write(event)
            self.done.callback(None)
        else:
            # Any other body would look complete if ended now: abort instead.
            if self.filters:
                self._end("broken")
            self.done.errback(Failure(StreamStalled()))
        self.transport.stopProducing()

    def _give_up(self, why: str) -> None:
        """The body cannot be relayed (e.g. untranslatable): abort both sides."""
        self.ctx.error = why
        self._stop_timer()
        self._unregister()
        self._end("broken")
        self.done.errback(Failure(UpstreamBroken(why)))
        self.transport.stopProducing()

    def _cancel(self, d: Deferred[None]) -> None:
        """The client left: stop reading upstream (this aborts that connection)."""
        self._stop_timer()
        self._unregister()
        if self.filters:
            self._end("client_gone")
        self.transport.stopProducing()


class NoFirstChunk(Exception):
    """A stream sent headers but no chunk within C{first_token_timeout}."""


class StreamStalled(Exception):
    """An upstream stream sent nothing for C{stall_timeout}."""



class UpstreamBroken(Exception):
    """The upstream failed after response bytes reached the client: abort, never retry."""
