"""
Tests for L{clawproxy.compat}: one test per assumption it makes about
Twisted's private internals, so a Twisted release that breaks one fails
here, by name, rather than in production.
"""

from __future__ import annotations

import io
import sys
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
from twisted.application import app
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.logger import LogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import http, server
from twisted.web.client import FileBodyProducer, HTTPConnectionPool, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from clawproxy import compat

ADDR = IPv4Address("TCP", "10.0.0.7", 1)


class Held(Resource):
    """Keeps every request it is given, unanswered."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []

    def render(self, request: Any) -> Any:
        self.requests.append(request)
        request.notifyFinish().addErrback(lambda _: None)
        return server.NOT_DONE_YET


# -- server: requests ---------------------------------------------------------------------


class ClientGoneTests(SynchronousTestCase):
    """C{http.Request._disconnected} turns True when the connection is lost."""

    def test_flag(self) -> None:
        """False while connected; True once lost, and already True when notifyFinish fails."""
        held = Held()
        proto = server.Site(held).buildProtocol(ADDR)
        proto.makeConnection(StringTransport())
        proto.dataReceived(b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n")
        (request,) = held.requests
        self.assertFalse(compat.client_gone(request))
        seen: list[bool] = []
        request.notifyFinish().addErrback(lambda _: seen.append(compat.client_gone(request)))
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(compat.client_gone(request))
        self.assertEqual(seen, [True])


# -- server: HTTP/1.1 channel -------------------------------------------------------------


class RecordingChannel(compat.HTTPChannel):
    """Records the parser state compat exposes, line by line."""

    def __init__(self) -> None:
        super().__init__()
        self.states: list[tuple[bytes, bool, int]] = []
        self.refusals = 0

    def lineReceived(self, line: bytes) -> None:
        super().lineReceived(line)
        self.states.append((line, bool(self.reading_request_line), self.head_size))

    def parser_refused(self) -> None:
        self.refusals += 1
        super().parser_refused()


class HTTPChannelTests(SynchronousTestCase):
    """What L{compat.HTTPChannel} reads of Twisted's HTTP/1.1 parser."""

    def channel(self, resource: Any = None) -> tuple[RecordingChannel, StringTransport]:
        site = server.Site(resource or Held())
        channel = RecordingChannel()
        channel.site = site
        channel.requestFactory = site.requestFactory
        transport = StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, Failure(ConnectionDone()))
        return channel, transport

    def test_first_line_flag(self) -> None:
        """
        C{_HTTPChannel__first_line}: true before a request line, false from it
        until the request's content is in.
        """
        channel, _ = self.channel()
        self.assertTrue(channel.reading_request_line)
        channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n")
        self.assertEqual([s[1] for s in channel.states], [False, False, False, False])
        channel.dataReceived(b"ab")
        self.assertTrue(channel.reading_request_line)

    def test_head_size(self) -> None:
        """C{_receivedHeaderSize}: the head's line lengths so far, line ends not counted."""
        channel, _ = self.channel()
        channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: gw\r\n")
        self.assertEqual([s[2] for s in channel.states], [15, 23])

    def test_request_line_parts(self) -> None:
        """C{_command}, C{_path}, C{_version}: unset before a request line, then its parts."""
        channel, _ = self.channel()
        self.assertIsNone(channel.request_method)
        self.assertIsNone(channel.request_target)
        channel.dataReceived(b"POST /a?b=1 HTTP/1.0\r\n")
        self.assertEqual((channel.request_method, channel.request_target,
                          channel.request_version), (b"POST", b"/a?b=1", b"HTTP/1.0"))

    def test_rewritten_target_is_used(self) -> None:
        """C{_path} is read again when the request is handed on: rewriting it rewrites it."""
        held = Held()

        class Rewriting(RecordingChannel):
            def allHeadersReceived(self) -> None:
                self.request_target = b"/canonical"
                super().allHeadersReceived()

        site = server.Site(held)
        channel = Rewriting()
        channel.site = site
        channel.requestFactory = site.requestFactory
        channel.makeConnection(StringTransport())
        self.addCleanup(channel.connectionLost, Failure(ConnectionDone()))
        channel.dataReceived(b"GET /a/../canonical HTTP/1.1\r\nHost: gw\r\n\r\n")
        self.assertEqual(held.requests[0].uri, b"/canonical")

    def test_network_producer(self) -> None:
        """C{_networkProducer}: the transport, registered as its streaming producer."""
        channel, transport = self.channel()
        self.assertIs(channel.network_producer, transport)
        self.assertIs(transport.producer, channel)
        self.assertTrue(transport.streaming)

    def test_request_buffer(self) -> None:
        """
        C{_dataBuffer}: bytes read while a request is handled, kept in order;
        taking them leaves none to be parsed when the request is done.
        """
        channel, _ = self.channel()
        channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\nframe-1")
        channel.dataReceived(b"frame-2")
        self.assertEqual(compat.take_request_buffer(channel), b"frame-1frame-2")
        self.assertEqual(compat.take_request_buffer(channel), b"")

    def test_chunked_decoder(self) -> None:
        """C{_ChunkedTransferDecoder(data, finish)}: decodes chunks, hands on what follows."""
        data: list[bytes] = []
        rest: list[bytes] = []
        decoder = compat.ChunkedDecoder(data.append, rest.append)
        decoder.dataReceived(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\nnext")
        self.assertEqual((b"".join(data), rest), (b"abcde", [b"next"]))

    def test_chunk_remaining(self) -> None:
        """
        C{_transferDecoder}: None outside a chunked body; while a chunk's data
        is read, C{state == "BODY"} and C{length} is what the chunk-size line
        declared, less what has arrived.
        """
        channel, _ = self.channel()
        self.assertIsNone(channel.chunk_remaining)
        channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: gw\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
        self.assertIsNone(channel.chunk_remaining)
        channel.dataReceived(b"ffffffffffffffff1\r\nab")
        self.assertEqual(channel.chunk_remaining, 0xFFFFFFFFFFFFFFFF1 - 2)

    def test_parser_refusal_hook(self) -> None:
        """C{_respondToBadRequestAndDisconnect} is called for a refused request; default is 400."""
        channel, transport = self.channel()
        channel.dataReceived(b"GET /x HTTP/1.1 extra\r\n")
        self.assertEqual(channel.refusals, 1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "))
        self.assertTrue(transport.disconnecting)

    def test_header_value_with_cr_refused(self) -> None:
        """
        Twisted's parser refuses CR, LF or NUL inside a header value (Twisted
        >= 26.10; clawproxy's edge relies on it, which sets the version floor).
        """
        for line in (b"X-A: 1\rB: 2", b"X-A: 1\nB: 2", b"X-A: 1\x00"):
            channel, _ = self.channel()
            channel.dataReceived(b"GET /x HTTP/1.1\r\n" + line + b"\r\n\r\n")
            self.assertEqual(channel.refusals, 1, line)

    def test_site_form_parsing_off(self) -> None:
        """C{Site(parsePOSTFormSubmission=False)} (Twisted >= 25.5) leaves C{args} empty."""
        held = Held()
        proto = server.Site(held, parsePOSTFormSubmission=False).buildProtocol(ADDR)
        proto.makeConnection(StringTransport())
        body = b"a=1"
        proto.dataReceived(b"POST /x HTTP/1.1\r\nHost: gw\r\nContent-Type: "
                           b"application/x-www-form-urlencoded\r\nContent-Length: 3\r\n\r\n" + body)
        self.assertEqual(held.requests[0].args, {})
        proto.connectionLost(Failure(ConnectionDone()))


# -- server: the HTTP/1.1-or-HTTP/2 switch ------------------------------------------------


class FakeH2(http.HTTPChannel):
    """Stands in for an HTTP/2 connection: records what the switch gives it."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[bytes] = []

    def connectionMade(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)


class SwitchingProtocol(compat.GenericHTTPChannelProtocol):
    def make_h2_channel(self) -> Any:
        self.made = FakeH2()
        return self.made


class GenericProtocolTests(SynchronousTestCase):
    """What L{compat.GenericHTTPChannelProtocol} assumes of C{_GenericHTTPChannelProtocol}."""

    def build(self, negotiated: bytes | None) -> tuple[Any, server.Site, StringTransport]:
        self.clock = Clock()
        site = server.Site(Held(), timeout=33, reactor=self.clock)
        site.protocol = lambda: SwitchingProtocol(http.HTTPChannel())  # type: ignore[method-assign]
        proto = site.buildProtocol(ADDR)
        transport = StringTransport()
        transport.negotiatedProtocol = negotiated  # type: ignore[attr-defined]
        proto.makeConnection(transport)
        return proto, site, transport

    def test_wraps_channel(self) -> None:
        """C{_channel} is the channel it was built with; C{http_channel_of} finds it."""
        channel = http.HTTPChannel()
        proto = compat.GenericHTTPChannelProtocol(channel)
        self.assertIs(proto.channel, channel)
        self.assertIs(compat.http_channel_of(proto), channel)
        other = object()
        self.assertIs(compat.http_channel_of(other), other)

    def test_switch_to_h2(self) -> None:
        """
        When ALPN chose h2, C{make_h2_channel}'s connection takes over with the
        values the site set (C{_requestFactory}, C{_site}, C{_factory},
        C{_timeOut}, C{_callLater}), the same transport, and the transport's
        producer registration moved from the old channel (C{_networkProducer}).
        """
        proto, site, transport = self.build(b"h2")
        old = proto.channel
        self.assertIs(transport.producer, old)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        proto.dataReceived(b"PRI * HTTP/2.0")
        new = proto.made
        self.assertIs(proto.channel, new)
        self.assertIs(new.transport, transport)
        self.assertIs(transport.producer, new)
        self.assertEqual((new.site, new.factory, new.requestFactory, new.timeOut),
                         (site, site, site.requestFactory, 33))
        self.assertIs(new.callLater, old.callLater)
        self.assertEqual(new.received, [b"PRI * HTTP/2.0"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        proto.dataReceived(b"more")
        self.assertEqual(new.received, [b"PRI * HTTP/2.0", b"more"])

    def test_no_switch_for_http11(self) -> None:
        """Without h2 negotiated the HTTP/1.1 channel keeps the connection."""
        for negotiated in (None, b"http/1.1"):
            proto, _, _ = self.build(negotiated)
            channel = proto.channel
            proto.dataReceived(b"GET / HTTP/1.1\r\n")
            self.assertIs(proto.channel, channel)
            self.assertFalse(hasattr(proto, "made"))
            proto.connectionLost(Failure(ConnectionDone()))


# -- server: HTTP/2 -----------------------------------------------------------------------


def h2_server(conn_class: type = compat.H2Connection, timeout: float | None = None
              ) -> tuple[Any, h2.connection.H2Connection, StringTransport, Held, Clock]:
    """A server HTTP/2 connection on a memory transport, and an h2 client for it."""
    clock = Clock()
    held = Held()
    site = server.Site(held)
    conn = conn_class(clock)
    conn.requestFactory = site.requestFactory
    conn.site = site
    conn.factory = site
    conn.timeOut = timeout
    conn.callLater = clock.callLater
    transport = StringTransport()
    conn.makeConnection(transport)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    conn.dataReceived(client.data_to_send())
    return conn, client, transport, held, clock


def send_request(conn: Any, client: h2.connection.H2Connection, stream_id: int = 1) -> None:
    client.send_headers(stream_id, [(":method", "GET"), (":path", "/x"), (":scheme", "https"),
                                    (":authority", "gw")], end_stream=True)
    conn.dataReceived(client.data_to_send())


class H2Tests(SynchronousTestCase):
    """What L{compat.H2Connection} assumes of C{twisted.web._http2}."""

    def test_request_channel_is_h2_stream(self) -> None:
        """An HTTP/2 request's C{channel} is an C{H2Stream} with the request's command and path."""
        conn, client, _, held, _ = h2_server()
        send_request(conn, client)
        (request,) = held.requests
        self.assertTrue(compat.is_h2_stream(request.channel))
        self.assertIsInstance(request.channel, compat.H2Stream)
        self.assertEqual((request.channel.command, request.channel.path), (b"GET", b"/x"))
        self.assertIs(request.channel.site, conn.site)
        self.assertFalse(compat.is_h2_stream(http.HTTPChannel()))

    def test_parse_cookies_before_continue(self) -> None:
        """
        C{H2Stream} calls the request's C{parseCookies()} once the stream's
        headers are in and before it decides on C{100 Continue}: a request
        that drops C{Expect} there (a refused head) gets no C{100 Continue}.
        """

        def informational(request_class: type) -> list[Any]:
            conn, client, transport, _, _ = h2_server()
            conn.requestFactory = request_class
            client.send_headers(1, [(":method", "POST"), (":path", "/x"), (":scheme", "https"),
                                    (":authority", "gw"), ("expect", "100-continue")])
            conn.dataReceived(client.data_to_send())
            events = client.receive_data(transport.value())
            return [e for e in events if isinstance(e, h2.events.InformationalResponseReceived)]

        class Refusing(server.Request):
            def parseCookies(self) -> None:
                self.requestHeaders.removeHeader(b"expect")
                super().parseCookies()

        self.assertEqual(len(informational(server.Request)), 1)
        self.assertEqual(informational(Refusing), [])

    def test_state_machine_replaceable(self) -> None:
        """
        C{conn}, created in C{__init__}, may be replaced before C{connectionMade};
        h2 routes each HEADERS frame through C{_receive_headers_frame}; open
        streams are in C{streams}.
        """
        frames: list[int] = []

        class Counting(compat.H2StateMachine):
            def headers_frame_received(self, frame: Any) -> Any:
                frames.append(frame.stream_id)
                return super().headers_frame_received(frame)

        class Replacing(compat.H2Connection):
            def __init__(self, reactor: Any) -> None:
                super().__init__(reactor)
                self.conn = Counting(config=self.conn.config)

        conn, client, _, held, _ = h2_server(Replacing)
        send_request(conn, client)
        self.assertEqual(frames, [1])
        self.assertEqual(len(held.requests), 1)
        self.assertEqual(list(conn.streams), [1])

    def test_stream_reset_hook(self) -> None:
        """
        C{_requestAborted(event)} is called for each client reset; Twisted's
        handling tells the request and forgets the stream.
        """
        resets: list[int] = []

        class Recording(compat.H2Connection):
            def stream_reset(self, event: Any) -> None:
                resets.append(event.stream_id)
                super().stream_reset(event)

        conn, client, _, held, _ = h2_server(Recording)
        send_request(conn, client)
        lost: list[Failure] = []
        held.requests[0].notifyFinish().addErrback(lost.append)
        client.reset_stream(1)
        conn.dataReceived(client.data_to_send())
        self.assertEqual(resets, [1])
        self.assertEqual(len(lost), 1)
        self.assertNotIn(1, conn.streams)

    def test_abort_request_and_bookkeeping(self) -> None:
        """
        C{H2Stream.abortConnection()} calls C{abortRequest(streamID)};
        C{_tryToWriteControlData()} is True on a live connection and
        C{_requestDone(streamID)} forgets the stream.
        """
        aborted: list[int] = []

        class Recording(compat.H2Connection):
            def abortRequest(self, streamID: int) -> None:
                aborted.append(streamID)
                self.conn.reset_stream(streamID)
                self.assertions = self.flush_control_data()
                self.stream_done(streamID)

        conn, client, transport, held, _ = h2_server(Recording)
        send_request(conn, client)
        held.requests[0].channel.abortConnection()
        self.assertEqual(aborted, [1])
        self.assertTrue(conn.assertions)
        self.assertNotIn(1, conn.streams)
        events = client.receive_data(transport.value())
        self.assertIn(1, [e.stream_id for e in events if isinstance(e, h2.events.StreamReset)])

    def test_protocol_error_terminates(self) -> None:
        """A protocol error goes through C{_terminate(reason)}; Twisted's closes the transport."""
        reasons: list[Failure] = []

        class Recording(compat.H2Connection):
            def terminate(self, reason: Failure) -> None:
                reasons.append(reason)
                super().terminate(reason)

        clock = Clock()
        conn = Recording(clock)
        conn.callLater = clock.callLater
        transport = StringTransport()
        conn.makeConnection(transport)
        conn.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(len(reasons), 1)
        self.assertTrue(transport.disconnecting)

    def test_lost_keeping_timers(self) -> None:
        """
        C{connectionLost(reason, _cancelTimeouts=False)} tells the open
        streams and leaves the idle timeout armed.
        """
        conn, client, _, held, clock = h2_server(timeout=60)
        send_request(conn, client)
        lost: list[Failure] = []
        held.requests[0].notifyFinish().addErrback(lost.append)
        conn.lost_keeping_timers(Failure(ConnectionLost()))
        self.assertEqual(len(lost), 1)
        self.assertTrue([c for c in clock.getDelayedCalls() if c.getTime() == 60])


class H2SendingLoopTests(SynchronousTestCase):
    """What compat assumes of Twisted's HTTP/2 sending loop, queues and event dispatch."""

    def test_event_hooks(self) -> None:
        """
        h2's C{DataReceived}, C{StreamEnded} and C{WindowUpdated} go through
        C{_requestDataReceived}, C{_requestEnded} and C{_handleWindowUpdate}.
        """
        seen: list[str] = []

        class Recording(compat.H2Connection):
            def stream_data(self, event: Any) -> None:
                seen.append("data")
                super().stream_data(event)

            def stream_ended(self, event: Any) -> None:
                seen.append("ended")
                super().stream_ended(event)

            def window_updated(self, event: Any) -> None:
                seen.append("window")
                super().window_updated(event)

        conn, client, _, held, _ = h2_server(Recording)
        client.send_headers(1, [(":method", "POST"), (":path", "/x"), (":scheme", "https"),
                                (":authority", "gw")])
        client.send_data(1, b"body", end_stream=True)
        client.increment_flow_control_window(100)
        conn.dataReceived(client.data_to_send())
        self.assertEqual(seen, ["data", "ended", "window"])
        held.requests[0].content.seek(0)
        self.assertEqual(held.requests[0].content.read(), b"body")

    def test_queue_and_tree(self) -> None:
        """
        C{priority} may be replaced before streams open and is what the loop
        draws from; queued chunks are in C{_outboundStreamQueues}, the end of
        the response is not bytes; with every stream blocked the loop waits
        on C{_sendingDeferred}, which C{wake_sender()} fires.
        """
        import priority as priority_package

        drawn: list[int] = []

        class Tree(priority_package.PriorityTree):
            def __next__(self) -> int:
                stream_id = super().__next__()
                drawn.append(stream_id)
                return stream_id

        class Replacing(compat.H2Connection):
            def __init__(self, reactor: Any) -> None:
                super().__init__(reactor)
                self.priority = Tree()

        conn, client, transport, held, clock = h2_server(Replacing)
        clock.advance(0)  # the loop starts and waits: no stream yet
        self.assertIsNotNone(conn._sendingDeferred)
        send_request(conn, client)
        request = held.requests[0]
        request.write(b"hello")
        self.assertEqual(conn.next_outbound(1), None)  # sent at once by the woken loop
        self.assertEqual(drawn, [1])
        clock.advance(0)  # the loop's next pass: nothing to send, it waits again
        self.assertIsNotNone(conn._sendingDeferred)
        conn._outboundStreamQueues[1].append(b"queued")
        self.assertEqual(conn.next_outbound(1), b"queued")
        conn.priority.unblock(1)
        conn.wake_sender()
        self.assertEqual(conn.next_outbound(1), None)
        self.assertEqual(drawn, [1, 1])
        request.finish()
        self.assertEqual(conn.next_outbound(1), None)  # the end is not data
        clock.advance(0)
        clock.advance(0)
        events = client.receive_data(transport.value())
        self.assertIn(1, [e.stream_id for e in events if isinstance(e, h2.events.StreamEnded)])
        conn.wake_sender()  # nothing waits: harmless

    def test_idle_timeout_abort(self) -> None:
        """
        C{timeoutConnection} sends GOAWAY, closes, and aborts the transport
        C{abortTimeout} seconds later if it is still open.
        """

        class Quick(compat.H2Connection):
            abortTimeout = 2

        _conn, client, transport, _, clock = h2_server(Quick, timeout=10)
        transport.abortConnection = lambda: setattr(transport, "aborted", True)
        clock.advance(10)
        self.assertTrue(transport.disconnecting)
        events = client.receive_data(transport.value())
        self.assertTrue([e for e in events if isinstance(e, h2.events.ConnectionTerminated)])
        clock.advance(2)
        self.assertTrue(getattr(transport, "aborted", False))

    def test_h2_connection_of(self) -> None:
        """An C{H2Stream} keeps its connection in C{_conn}."""
        conn, client, _, held, _ = h2_server()
        send_request(conn, client)
        self.assertIs(compat.h2_connection_of(held.requests[0].channel), conn)


class H2StateMachineTests(SynchronousTestCase):
    """What compat assumes of h2's state machine and frame buffer."""

    def machine(self) -> compat.H2StateMachine:
        server_conn = compat.H2StateMachine(h2.config.H2Configuration(client_side=False))
        server_conn.initiate_connection()
        return server_conn

    def preamble(self) -> bytes:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        return client.data_to_send()

    def test_frame_hook(self) -> None:
        """Every frame goes through C{_receive_frame}, a header block once whole."""
        from hyperframe.frame import ContinuationFrame, HeadersFrame

        seen: list[str] = []

        class Recording(compat.H2StateMachine):
            def frame_received(self, frame: Any) -> Any:
                seen.append(type(frame).__name__)
                return super().frame_received(frame)

        machine = Recording(h2.config.H2Configuration(client_side=False))
        machine.initiate_connection()
        machine.receive_data(self.preamble())
        self.assertEqual(seen, ["SettingsFrame"])
        encoder = __import__("hpack").Encoder()
        block = encoder.encode([(":method", "GET"), (":path", "/"), (":scheme", "https"),
                                (":authority", "gw")])
        first = HeadersFrame(1, data=block[:3])
        first.flags.add("END_STREAM")
        rest = ContinuationFrame(1, data=block[3:])
        machine.receive_data(first.serialize())
        self.assertTrue(machine.header_block_pending)
        self.assertEqual(seen, ["SettingsFrame"])
        rest.flags.add("END_HEADERS")
        events = machine.receive_data(rest.serialize())
        self.assertFalse(machine.header_block_pending)
        self.assertEqual(seen, ["SettingsFrame", "HeadersFrame"])
        self.assertTrue([e for e in events if isinstance(e, h2.events.RequestReceived)])

    def test_pending_partial_frame(self) -> None:
        """Unparsed bytes starting a HEADERS frame count as a pending header block."""
        from hyperframe.frame import HeadersFrame

        machine = self.machine()
        machine.receive_data(self.preamble())
        frame = HeadersFrame(1, data=b"\x82" * 100)
        frame.flags.add("END_HEADERS")
        machine.receive_data(frame.serialize()[:20])
        self.assertTrue(machine.header_block_pending)
        machine.drop_buffers()
        self.assertFalse(machine.header_block_pending)

    def test_header_block_cap(self) -> None:
        """
        A block over C{max_header_block} bytes raises a C{ProtocolError} and
        queues GOAWAY ENHANCE_YOUR_CALM; the held frames are let go.
        """
        from hyperframe.frame import ContinuationFrame, HeadersFrame

        machine = self.machine()
        machine.max_header_block = 1000
        machine.receive_data(self.preamble())
        machine.data_to_send()
        machine.receive_data(HeadersFrame(1, data=b"\0" * 600).serialize())
        with self.assertRaises(h2.exceptions.ProtocolError):
            machine.receive_data(ContinuationFrame(1, data=b"\0" * 600).serialize())
        self.assertFalse(machine.header_block_pending)
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        events = client.receive_data(machine.data_to_send())
        (goaway,) = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        self.assertEqual(goaway.error_code, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)

    def test_decoder_limit(self) -> None:
        """The HPACK decoder's C{max_header_list_size} bounds a decoded header list."""
        machine = self.machine()
        self.assertEqual(machine.decoder.max_header_list_size,
                         h2.connection.H2Connection.DEFAULT_MAX_HEADER_LIST_SIZE)


# -- client -------------------------------------------------------------------------------


class ClientParserTests(SynchronousTestCase):
    """What compat assumes of C{HTTP11ClientProtocol} and its response parser."""

    def request(self) -> tuple[Any, Any, StringTransport, list[Any]]:
        proto = compat.HTTP11ClientProtocol()
        transport = StringTransport()
        proto.makeConnection(transport)
        responses: list[Any] = []
        request = compat.ClientRequest(b"GET", b"/", Headers({b"host": [b"h"]}), None)
        proto.request(request).addCallback(responses.append)
        return proto, compat.response_parser(proto), transport, responses

    def test_parser_kept(self) -> None:
        """
        C{_parser} is the request's C{HTTPClientParser}; it reads head lines,
        split on LF alone (a CR stays on the line), through C{self.lineReceived},
        and is in C{BODY} state once the head is in.
        """
        proto, parser, _, responses = self.request()
        self.assertIsInstance(parser, compat.HTTPClientParser)
        lines: list[tuple[bytes, bool]] = []
        original = type(parser).lineReceived

        def watching(line: bytes) -> None:
            lines.append((line, parser.state == compat.PARSER_BODY_STATE))
            original(parser, line)

        parser.lineReceived = watching
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        self.assertEqual(lines, [(b"HTTP/1.1 200 OK\r", False), (b"Content-Length: 2\r", False),
                                 (b"\r", False)])
        self.assertEqual(parser.state, compat.PARSER_BODY_STATE)
        self.assertEqual(len(responses), 1)

    def test_status_state(self) -> None:
        """
        C{state} is C{STATUS} when each status line is read, that of the
        final response after a 1xx too (the parser drops the interim head),
        and not C{STATUS} for header lines.
        """
        proto, parser, _, responses = self.request()
        seen: list[tuple[bytes, bool]] = []
        original = type(parser).lineReceived

        def watching(line: bytes) -> None:
            seen.append((line, parser.state == compat.PARSER_STATUS_STATE))
            original(parser, line)

        parser.lineReceived = watching
        proto.dataReceived(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                           b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual([flag for _, flag in seen],
                         [True, False, False, True, False, False])
        self.assertEqual(responses[0].code, 200)
        self.assertFalse(responses[0].headers.hasHeader(b"link"))

    def test_line_too_long_hook(self) -> None:
        """A head line over the parser's C{MAX_LENGTH} goes to C{self.lineLengthExceeded}."""
        proto, parser, _, _ = self.request()
        too_long: list[int] = []
        parser.lineLengthExceeded = lambda line: too_long.append(len(line))
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * parser.MAX_LENGTH)
        self.assertEqual(len(too_long), 1)
        self.assertGreater(too_long[0], parser.MAX_LENGTH)

    def test_parser_exception_fails_request(self) -> None:
        """
        An exception raised from the parser's C{lineReceived} fails the
        request with C{ResponseFailed} wrapping it and closes the connection.
        """
        proto = compat.HTTP11ClientProtocol()
        transport = StringTransport()
        proto.makeConnection(transport)
        d = proto.request(compat.ClientRequest(b"GET", b"/", Headers({b"host": [b"h"]}), None))
        parser = compat.response_parser(proto)

        class Refused(Exception):
            pass

        def refuse(line: bytes) -> None:
            raise Refused()

        parser.lineReceived = refuse
        proto.dataReceived(b"HTTP/1.1 200 OK\r\n")
        failure = self.failureResultOf(d, ResponseFailed)
        self.assertTrue(failure.value.reasons[0].check(Refused))
        self.assertTrue(transport.disconnecting)

    def test_connection_header(self) -> None:
        """C{connHeaders} holds the C{Connection} header, kept out of C{response.headers}."""
        proto, parser, _, responses = self.request()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-a\r\nX-A: 1\r\n"
                           b"Content-Length: 0\r\n\r\n")
        self.assertEqual(compat.connection_header(parser), (b"keep-alive, x-a",))
        self.assertFalse(responses[0].headers.hasHeader(b"connection"))
        self.assertEqual(responses[0].headers.getRawHeaders(b"x-a"), [b"1"])

    def test_drop_response_connection(self) -> None:
        """C{Response._transport} stops the connection's transport; a bare double is left alone."""
        proto, _, transport, responses = self.request()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        compat.drop_response_connection(responses[0])
        self.assertEqual(transport.producerState, "stopped")
        compat.drop_response_connection(object())


class FakeEndpoint:
    """Connects at once by building the factory's protocol."""

    def __init__(self) -> None:
        self.factories: list[Any] = []

    def connect(self, factory: Any) -> Any:
        self.factories.append(factory)
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        return succeed(proto)


class PoolTests(SynchronousTestCase):
    """What compat assumes of C{HTTPConnectionPool}: it builds protocols from C{_factory}."""

    def test_use_client_protocol(self) -> None:
        """The pool's connections use our protocol, given the pool's quiescent callback."""
        built: list[Any] = []

        def build(quiescent: Any) -> Any:
            built.append(quiescent)
            return compat.HTTP11ClientProtocol(quiescent)

        pool = HTTPConnectionPool(Clock(), persistent=True)
        compat.use_client_protocol(pool, build)
        endpoint = FakeEndpoint()
        proto = self.successResultOf(pool.getConnection(("http", b"h", 80), endpoint))
        self.assertIsInstance(proto, compat.HTTP11ClientProtocol)
        self.assertEqual(len(built), 1)
        self.assertTrue(callable(built[0]))
        self.assertFalse(endpoint.factories[0].noisy)

    def test_observe_client_protocols(self) -> None:
        """An observer sees each protocol the pool builds, still built by the pool's factory."""
        pool = HTTPConnectionPool(Clock(), persistent=True)
        compat.use_client_protocol(pool, compat.HTTP11ClientProtocol)
        seen: list[Any] = []
        compat.observe_client_protocols(pool, seen.append)
        proto = self.successResultOf(pool.getConnection(("http", b"h", 80), FakeEndpoint()))
        self.assertEqual(seen, [proto])


class CooperatorTests(SynchronousTestCase):
    """C{FileBodyProducer} keeps its cooperate function in C{_cooperate}."""

    def test_use_cooperator(self) -> None:
        """The producer runs on the given cooperator only."""
        clock = Clock()
        cooperator = Cooperator(scheduler=lambda f: clock.callLater(0, f))
        producer = FileBodyProducer(io.BytesIO(b"abc"))
        compat.use_cooperator(producer, cooperator)
        sink = io.BytesIO()
        d = producer.startProducing(sink)
        self.assertEqual(sink.getvalue(), b"")
        while not d.called:
            clock.advance(0)
        self.assertEqual(sink.getvalue(), b"abc")
        cooperator.stop()


class TwistdTests(SynchronousTestCase):
    """What clawproxy's C{twistd} plugin relies on."""

    def test_usage_error_exits_non_zero(self) -> None:
        """
        twistd exits with status 1 when the plugin's options refuse the
        command line (Twisted >= 26.10; before, it printed the error and
        exited 0, so a bad config did not fail the process).
        """

        class Refusing(usage.Options):
            def parseOptions(self, options: Any = None) -> None:
                raise usage.UsageError("invalid configuration")

        self.patch(sys, "stdout", io.StringIO())
        with self.assertRaises(SystemExit) as caught:
            app.run(lambda config: None, Refusing)
        self.assertEqual(caught.exception.code, 1)


class LogPublisherTests(SynchronousTestCase):
    """What the C{logging.level} filter assumes of C{twisted.logger}."""

    def test_publisher_observers(self) -> None:
        """
        The one private Twisted name the filter relies on: a C{LogPublisher} keeps its
        observers in the list C{_observers}, in the order they were added.
        """
        publisher = LogPublisher()
        first, second = (lambda e: None), (lambda e: None)
        publisher.addObserver(first)
        publisher.addObserver(second)
        self.assertEqual(compat.log_observers(publisher), [first, second])


class OneAcceptPortTests(TestCase):
    """L{compat.adopt_port_one_accept}: an inherited socket, one accept per event."""

    async def test_one_connection_per_read(self) -> None:
        import socket

        from twisted.internet import reactor
        from twisted.internet.protocol import Factory, Protocol

        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.setblocking(False)
        self.addCleanup(listener.close)
        accepted: list[Any] = []

        class Count(Protocol):
            def connectionMade(self) -> None:
                accepted.append(self)

        port = compat.adopt_port_one_accept(reactor, listener.fileno(), socket.AF_INET,
                                            Factory.forProtocol(Count))
        self.addCleanup(port.stopListening)
        port.stopReading()  # drive doRead by hand
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        for c in clients:
            self.addCleanup(c.close)
        port.doRead()
        self.assertEqual(len(accepted), 1)
        port.doRead()
        port.doRead()
        self.assertEqual(len(accepted), 3)
        self.assertEqual(port.getHost().port, listener.getsockname()[1])
        for proto in accepted:
            proto.transport.abortConnection()
