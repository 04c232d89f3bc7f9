"""Tests for L{clawproxy.web.relay}: the stream pipe, header rules and failure kinds."""

from __future__ import annotations

import io
import tempfile
from typing import Any

import attrs
import treq
from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.internet.error import (
    ConnectError,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import (
    PotentialDataLoss,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from clawproxy.compat import use_cooperator
from clawproxy.web.context import RequestContext
from clawproxy.web.headers import connection_named, forwarded_headers, response_headers
from clawproxy.web.pipe import (
    BytesProducer,
    NoFirstChunk,
    StreamPipe,
    StreamStalled,
    TranslateFilter,
    UpstreamBroken,
    body_producer,
)
from clawproxy.web.relay import classify
from tests.test_gateway import Harness, basic

SSE_ERROR = (b'data: {"error": {"message": "upstream stalled", "type": "upstream_error", '
             b'"code": "stall_timeout"}}\n\n')


class FakeRequest:
    """The client-side request as L{StreamPipe} uses it."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None
        self.streaming: bool | None = None
        self.unregistered = 0
        self.responseHeaders = Headers()
        self.channel: Any = object()

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert self.producer is None, "producer registered twice"
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self) -> None:
        self.producer = None
        self.unregistered += 1


def context(request: Any) -> RequestContext:
    return RequestContext(request=request, request_id="rid", client_ip="10.0.0.1",
                          method=b"POST", path=b"/v1/chat/completions", query=b"", started=0.0)


class StreamPipeTests(SynchronousTestCase):
    """L{StreamPipe} relays an upstream body chunk by chunk under flow control."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.request = FakeRequest()
        self.ctx = context(self.request)
        self.upstream = StringTransport()

    def pipe(self, stall: float | None = None, translator: Any = None) -> StreamPipe:
        filters = (TranslateFilter(translator),) if translator is not None else ()
        pipe = StreamPipe(self.request, self.ctx, self.clock, stall, filters)
        pipe.makeConnection(self.upstream)
        return pipe

    def first_chunk_pipe(self, timeout: float) -> StreamPipe:
        pipe = StreamPipe(self.request, self.ctx, self.clock, None)
        pipe.first_chunk_timeout = timeout
        pipe.makeConnection(self.upstream)
        return pipe

    def test_no_first_chunk(self) -> None:
        """
        A stream with no first chunk within C{first_token_timeout} is given up
        (so the relay can try another instance) and nothing reaches the client.
        """
        pipe = self.first_chunk_pipe(5)
        self.clock.advance(4.9)
        self.assertNoResult(pipe.done)
        self.clock.advance(0.1)
        self.failureResultOf(pipe.done, NoFirstChunk)
        self.assertEqual(self.request.written, [])
        self.assertEqual(self.upstream.producerState, "stopped")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_first_chunk_in_time(self) -> None:
        """A first chunk in time cancels the first-chunk deadline for good."""
        pipe = self.first_chunk_pipe(5)
        self.clock.advance(1)
        pipe.dataReceived(b"data: 1\n\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertNoResult(pipe.done)
        self.assertEqual(self.request.written, [b"data: 1\n\n"])

    def test_registers_upstream_as_producer(self) -> None:
        """The upstream transport becomes the client request's streaming producer."""
        self.pipe()
        self.assertIs(self.request.producer, self.upstream)
        self.assertTrue(self.request.streaming)

    def test_each_chunk_written_at_once(self) -> None:
        """Every chunk is written to the client as it arrives, and counted."""
        pipe = self.pipe()
        pipe.dataReceived(b"data: 1\n\n")
        self.assertEqual(self.request.written, [b"data: 1\n\n"])
        pipe.dataReceived(b"data: 2\n\n")
        self.assertEqual(self.request.written, [b"data: 1\n\n", b"data: 2\n\n"])
        self.assertEqual(self.ctx.bytes_sent, 18)
        self.assertNoResult(pipe.done)

    def test_clean_end(self) -> None:
        """At the end of the body the producer is unregistered and C{done} fires."""
        pipe = self.pipe(stall=30)
        pipe.dataReceived(b"x")
        pipe.connectionLost(Failure(ResponseDone()))
        self.assertIsNone(self.successResultOf(pipe.done))
        self.assertEqual((self.request.producer, self.request.unregistered), (None, 1))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_potential_data_loss_is_clean(self) -> None:
        """A body without a length that ends with the connection is complete."""
        pipe = self.pipe()
        pipe.connectionLost(Failure(PotentialDataLoss()))
        self.successResultOf(pipe.done)

    def test_truncated(self) -> None:
        """A body cut short fails C{done} with the reason, after unregistering."""
        pipe = self.pipe(stall=30)
        pipe.dataReceived(b"partial")
        reason = Failure(ResponseFailed([Failure(ConnectionLost("reset"))]))
        pipe.connectionLost(reason)
        self.failureResultOf(pipe.done, ResponseFailed)
        self.assertEqual(self.request.unregistered, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_stops_upstream(self) -> None:
        """Cancelling C{done} (the client left) stops reading upstream and the timer."""
        pipe = self.pipe(stall=30)
        pipe.done.cancel()
        self.failureResultOf(pipe.done, CancelledError)
        self.assertEqual(self.upstream.producerState, "stopped")
        self.assertEqual(self.request.unregistered, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # The aborted connection's own connectionLost changes nothing.
        pipe.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
        self.assertEqual(self.request.unregistered, 1)

    def test_cancel_after_client_gone(self) -> None:
        """When the request has lost its channel, cancelling does not unregister."""
        pipe = self.pipe()
        self.request.channel = None
        pipe.done.cancel()
        self.failureResultOf(pipe.done, CancelledError)
        self.assertEqual(self.request.unregistered, 0)
        self.assertEqual(self.upstream.producerState, "stopped")

    def test_stall_sse(self) -> None:
        """
        An SSE stream silent for C{stall_timeout} gets an SSE error event and
        ends cleanly; the upstream is given up.
        """
        self.request.responseHeaders.setRawHeaders(b"content-type",
                                                   [b"text/event-stream; charset=utf-8"])
        pipe = self.pipe(stall=10)
        pipe.dataReceived(b"data: 1\n\n")
        self.clock.advance(9.9)
        self.assertNoResult(pipe.done)
        self.clock.advance(0.1)
        self.assertEqual(self.request.written, [b"data: 1\n\n", SSE_ERROR])
        self.assertIsNone(self.successResultOf(pipe.done))
        self.assertEqual(self.ctx.error, "stall_timeout")
        self.assertEqual(self.upstream.producerState, "stopped")
        self.assertEqual(self.request.unregistered, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_chunks_reset_stall_timer(self) -> None:
        """Each chunk restarts the stall timer."""
        pipe = self.pipe(stall=10)
        for _ in range(5):
            self.clock.advance(9)
            pipe.dataReceived(b"tick")
        self.assertNoResult(pipe.done)
        pipe.connectionLost(Failure(ResponseDone()))
        self.successResultOf(pipe.done)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stall_not_sse(self) -> None:
        """A non-SSE body that stalls gets no event written, but is still given up."""
        self.request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        pipe = self.pipe(stall=5)
        self.clock.advance(5)
        self.assertEqual(self.request.written, [])
        self.failureResultOf(pipe.done, StreamStalled)

    def test_no_stall_timeout(self) -> None:
        """Without C{stall_timeout} no timer is set."""
        self.pipe(stall=None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_data_after_done_ignored(self) -> None:
        """Chunks arriving after the pipe gave up are not written."""
        pipe = self.pipe(stall=1)
        self.clock.advance(1)
        pipe.dataReceived(b"late")
        self.assertEqual(self.request.written, [])
        self.failureResultOf(pipe.done, StreamStalled)

    def test_translator(self) -> None:
        """With a translator, what it makes of each chunk is written, then its tail."""

        @attrs.define
        class Upper:
            content_type: bytes = b"text/event-stream"

            def feed(self, data: bytes) -> bytes:
                return data.upper() if data != b"skip" else b""

            def finish(self) -> bytes:
                return b"[DONE]"

        pipe = self.pipe(translator=Upper())
        pipe.dataReceived(b"a")
        pipe.dataReceived(b"skip")
        pipe.dataReceived(b"b")
        pipe.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.request.written, [b"A", b"B", b"[DONE]"])
        self.assertEqual(self.ctx.bytes_sent, 8)

    def test_translator_refuses(self) -> None:
        """A chunk the translator cannot read breaks the stream (abort, never end clean)."""

        class Refusing:
            def feed(self, data: bytes) -> bytes:
                raise ValueError("not NDJSON")

        pipe = self.pipe(translator=Refusing())
        pipe.dataReceived(b"<html>")
        self.failureResultOf(pipe.done, UpstreamBroken)
        self.assertEqual(self.ctx.error, "not NDJSON")
        self.assertEqual(self.upstream.producerState, "stopped")


class HeaderTests(SynchronousTestCase):
    """Which headers cross the gateway."""

    def test_connection_named(self) -> None:
        """Tokens of every C{Connection} header, lower-cased."""
        headers = Headers({b"Connection": [b"close, X-A", b" x-b ,"]})
        self.assertEqual(connection_named(headers), frozenset({b"close", b"x-a", b"x-b"}))
        self.assertEqual(connection_named(Headers()), frozenset())

    def test_response_headers(self) -> None:
        """
        Hop-by-hop, framing and C{Connection}-named headers are dropped, also
        when the agent kept C{Connection} aside as C{connection_header}; the
        names kept are lower-case (as the response filters get them).
        """

        @attrs.define
        class Response:
            headers: Headers
            connection_header: tuple[bytes, ...] = ()

        headers = Headers({
            b"Content-Type": [b"application/json"], b"Content-Length": [b"12"],
            b"Date": [b"x"], b"Server": [b"uvicorn"], b"Transfer-Encoding": [b"chunked"],
            b"Keep-Alive": [b"timeout=5"], b"Proxy-Authenticate": [b"Basic"],
            b"X-Secret": [b"1"], b"X-Other": [b"2"], b"Set-Cookie": [b"a=1", b"b=2"],
        })
        kept = response_headers(Response(headers, (b"X-Secret",)))
        self.assertEqual(sorted(kept), [
            (b"content-type", b"application/json"), (b"set-cookie", b"a=1"),
            (b"set-cookie", b"b=2"), (b"x-other", b"2"),
        ])
        self.assertIn((b"x-secret", b"1"), response_headers(Response(headers)))

    def test_forwarded_headers(self) -> None:
        """The proxy's own headers replace whatever the client sent for them."""

        class Request:
            requestHeaders = Headers({
                b"Host": [b"gw.example"], b"X-Forwarded-For": [b"6.6.6.6"],
                b"X-Forwarded-Proto": [b"https"], b"X-Forwarded-Host": [b"evil"],
                b"X-Request-Id": [b"client"], b"Content-Length": [b"3"],
                b"Connection": [b"X-Forwarded-Proto, X-Hop"], b"X-Hop": [b"1"],
                b"Authorization": [b"Bearer k"],
            })

            def isSecure(self) -> bool:
                return False

        out = forwarded_headers(Request(), context(None), b"10.0.0.5:8000", ())
        self.assertEqual(dict(out.getAllRawHeaders()), {
            b"Authorization": [b"Bearer k"],
            b"X-Forwarded-For": [b"10.0.0.1"],
            b"X-Forwarded-Proto": [b"http"],
            b"X-Forwarded-Host": [b"gw.example"],
            b"X-Request-Id": [b"rid"],
            b"Host": [b"10.0.0.5:8000"],
        })


class ClassifyTests(SynchronousTestCase):
    """L{classify} names a failure as C{retry_on} does."""

    def test_kinds(self) -> None:
        """Refused, timeout, connect failures and anything else."""
        cases = [
            (ConnectionRefusedError(), "refused"),
            (TimeoutError(), "timeout"),
            (defer.TimeoutError(), "timeout"),
            (ConnectError(), "connect_failure"),
            (DNSLookupError(), "connect_failure"),
            (ResponseNeverReceived([Failure(ConnectionLost())]), "connect_failure"),
            (ResponseFailed([Failure(ConnectionLost())]), "error"),
            (ValueError(), "error"),
        ]
        for exc, kind in cases:
            self.assertEqual(classify(Failure(exc)), kind, exc)


class BodyProducerTests(SynchronousTestCase):
    """L{body_producer} makes a fresh producer per attempt, so retries resend the body."""

    def test_none_and_empty(self) -> None:
        """No content or an empty body sends no body."""
        self.assertIsNone(body_producer(None))
        self.assertIsNone(body_producer(io.BytesIO()))
        with tempfile.TemporaryFile() as f:
            self.assertIsNone(body_producer(f))

    def test_memory(self) -> None:
        """An in-memory body is produced whole, with its length, as often as asked."""
        content = io.BytesIO(b'{"model": "m"}')
        for _ in range(2):
            producer = body_producer(content)
            self.assertIsInstance(producer, BytesProducer)
            self.assertEqual(producer.length, 14)
            sink = io.BytesIO()
            self.successResultOf(producer.startProducing(sink))
            self.assertEqual(sink.getvalue(), b'{"model": "m"}')

    def test_spooled_file(self) -> None:
        """A body spooled to a file can be produced again after a first attempt."""
        clock = Clock()
        cooperator = Cooperator(scheduler=lambda f: clock.callLater(0, f))
        data = b"x" * 300_000
        with tempfile.TemporaryFile() as f:
            f.write(data)
            for _ in range(2):
                producer = body_producer(f)
                use_cooperator(producer, cooperator)
                self.assertEqual(producer.length, len(data))
                sink = io.BytesIO()
                d = producer.startProducing(sink)
                while not d.called:
                    clock.advance(0)
                self.successResultOf(d)
                self.assertEqual(sink.getvalue(), data)
        cooperator.stop()


class Truncating(Resource):
    """A backend that promises 100 bytes, sends 10 and drops the connection."""

    isLeaf = True

    def render(self, request: Any) -> Any:
        request.setHeader(b"content-length", b"100")
        request.write(b"0123456789")
        request.channel.transport.loseConnection()
        return NOT_DONE_YET


class RelayedBodyTests(SynchronousTestCase):
    """Bodies through the whole relay."""

    def test_truncated_body_aborts_client(self) -> None:
        """
        When the upstream body is cut short after the head was relayed, the
        client connection is aborted (never ended cleanly) and nothing is retried.
        """
        gw = Harness(self, basic(retry={"retry_on": ["5xx", "connect_failure"]}),
                     backend=Truncating())
        d = gw.start("GET", "/v1/x")
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        body = treq.content(response)
        gw.flush()
        self.failureResultOf(body, ResponseFailed)
        (line,) = gw.log_lines()
        self.assertEqual((line["error"], line["attempts"]), ("truncated", 1))

    def test_head(self) -> None:
        """A HEAD answer is relayed with its headers and no body."""
        gw = Harness(self, basic())
        answer = gw.request("HEAD", "/v1/x")
        self.assertEqual((answer.code, answer.body), (200, b""))
        self.assertEqual(gw.backend.seen[0].method, b"HEAD")
