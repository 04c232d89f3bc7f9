"""
Every use of a private Twisted name, in one place.

clawproxy reaches below Twisted's public API where Twisted offers no hook:
the HTTP/1.1 parser's state, the ALPN switch to HTTP/2, the HTTP/2
connection's stream bookkeeping, the client's response parser and the
connection pool's protocol factory. Each of those accesses lives here, as a
small named function, constant or base class whose docstring says what it
assumes of Twisted; C{tests/test_compat.py} has one test per assumption, so
a Twisted release that changes one fails a named test, not production.

The other modules import from here and never name a private Twisted
attribute, class or module (C{twisted.web._http2}, C{twisted.web._newclient},
C{_GenericHTTPChannelProtocol}, ...). setup.cfg pins Twisted to the range
these assumptions were tested against.

Names used per request are plain attribute reads (C{property(attrgetter(...))}
or a one-line function), so the seam costs the hot path nothing measurable.
A private hook Twisted or h2 calls (C{_requestAborted}, C{_receive_frame},
...) is an alias of its public name (L{_Hooks}), so the call lands on a
subclass's override with no forwarding call in between.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any

import h2.connection
import h2.exceptions
import h2.frame_buffer
from twisted.internet import tcp
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web._http2 import H2Connection as _TwistedH2Connection
from twisted.web._http2 import H2Stream as H2Stream
from twisted.web._newclient import BODY as _BODY
from twisted.web._newclient import STATUS as _STATUS
from twisted.web._newclient import HTTP11ClientProtocol as HTTP11ClientProtocol
from twisted.web._newclient import HTTPClientParser as HTTPClientParser
from twisted.web._newclient import Request as ClientRequest
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory


class _Hooks:
    """
    Private hooks a library calls, routed to public methods: for each
    C{private: public} in C{HOOKS}, this class and every subclass get
    C{private} as an alias of their own C{public}, so the library's call of
    C{private} runs a subclass's override of C{public} directly. (Each
    default C{public} calls the library's C{private} by class.)
    """

    HOOKS: dict[str, str] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for private, public in cls.HOOKS.items():
            setattr(cls, private, getattr(cls, public))


# -- server: requests ---------------------------------------------------------------------


def client_gone(request: Any) -> bool:
    """
    Whether the connection a server request came on has been lost.

    Assumes L{twisted.web.http.Request} keeps C{_disconnected}, C{False}
    until its C{connectionLost} runs and C{True} from then on, before the
    C{notifyFinish()} Deferreds fail. (Twisted has no public flag: a request
    only learns of it through C{notifyFinish()}.) Works for HTTP/1.1 and
    HTTP/2 requests alike.
    """
    return request._disconnected


# -- server: HTTP/1.1 channel -------------------------------------------------------------


class HTTPChannel(_Hooks, http.HTTPChannel):
    """
    L{twisted.web.http.HTTPChannel} with public names for the parser state
    clawproxy's channel reads and for the parser's refusal.

    Assumes C{HTTPChannel}:
      - keeps C{__first_line} (so C{_HTTPChannel__first_line}) truthy while
        the next line read is a request line, false from the request line
        until the request's content is in;
      - counts the head's bytes so far in C{_receivedHeaderSize};
      - stores the request line's parts in C{_command}, C{_path} and
        C{_version} (unset before the first request line), and reads
        C{_path} again when the request is handed on, so rewriting it
        rewrites the request's target;
      - calls C{_respondToBadRequestAndDisconnect()} whenever its parser
        refuses a request (malformed request line, header or framing);
      - keeps the transport's push producer in C{_networkProducer}
        (used by L{GenericHTTPChannelProtocol}'s switch to HTTP/2);
      - decodes a chunked request body with the C{_transferDecoder} it
        keeps, whose C{state} is C{"BODY"} while a chunk's data is read and
        whose C{length} then counts the chunk's bytes still due (set from
        the chunk-size line as soon as that line is in).
    """

    #: Truthy while the next line read is a request line.
    reading_request_line = property(attrgetter("_HTTPChannel__first_line"))
    #: Bytes of the current request head received so far.
    head_size = property(attrgetter("_receivedHeaderSize"))
    #: The current request line's version (e.g. C{b"HTTP/1.1"}).
    request_version = property(attrgetter("_version"))
    #: The transport as a push producer (pausing it stops reading the connection).
    network_producer = property(attrgetter("_networkProducer"))

    @property
    def request_method(self) -> bytes | None:
        """The current request line's method, or None before one was read."""
        return getattr(self, "_command", None)

    @property
    def request_target(self) -> bytes | None:
        """The current request line's target, or None before one was read."""
        return getattr(self, "_path", None)

    @request_target.setter
    def request_target(self, value: bytes) -> None:
        self._path = value

    @property
    def chunk_remaining(self) -> int | None:
        """Bytes still due of the chunk being read of a chunked body, or None."""
        decoder = self._transferDecoder
        if decoder is None or getattr(decoder, "state", None) != "BODY":
            return None
        return decoder.length

    HOOKS = {"_respondToBadRequestAndDisconnect": "parser_refused"}

    def parser_refused(self) -> None:
        """
        Twisted's parser refused the request. Twisted's own answer: a plain
        C{400 Bad Request} and the connection closed. Override to answer
        differently.
        """
        http.HTTPChannel._respondToBadRequestAndDisconnect(self)


def take_request_buffer(channel: http.HTTPChannel) -> bytes:
    """
    The bytes an HTTP/1.1 channel read past the request it is handling (and
    would parse once that request is done), taken from it.

    Assumes C{HTTPChannel} keeps them, while C{_handlingRequest}, as a list
    of byte strings in C{_dataBuffer}.
    """
    data = b"".join(channel._dataBuffer)
    channel._dataBuffer = []
    return data


#: Twisted's decoder of a chunked body: C{ChunkedDecoder(data_callback,
#: finish_callback)}, fed with C{dataReceived(bytes)}; C{finish_callback}
#: gets the bytes after the last chunk. Raises on malformed framing.
ChunkedDecoder = http._ChunkedTransferDecoder


# -- server: the HTTP/1.1-or-HTTP/2 switch ------------------------------------------------


class GenericHTTPChannelProtocol(http._GenericHTTPChannelProtocol):  # type: ignore[misc]
    """
    Twisted's wrapper that serves a connection with an HTTP/1.1 channel and
    switches to HTTP/2 when TLS ALPN chose C{h2}, with the HTTP/2 channel
    chosen by L{make_h2_channel} (Twisted hard-codes its own class).

    Assumes C{twisted.web.http._GenericHTTPChannelProtocol}:
      - wraps the channel it is built with in C{_channel} and proxies
        C{IProtocol} to it;
      - keeps the values set through its C{requestFactory}, C{site},
        C{factory}, C{timeOut} and C{callLater} properties in
        C{_requestFactory}, C{_site}, C{_factory}, C{_timeOut} and
        C{_callLater}, to hand them to a new channel;
      - decides once, in C{dataReceived}, while C{_negotiatedProtocol} is
        None, and then proxies every call to C{_channel}.
    """

    #: The HTTP/1.1 channel, or the HTTP/2 connection after a switch.
    channel = property(attrgetter("_channel"))

    def dataReceived(self, data: bytes) -> None:
        if self._negotiatedProtocol is None:
            negotiated = getattr(self._channel.transport, "negotiatedProtocol", None)
            if negotiated == b"h2":
                self._switch(self.make_h2_channel(), b"h2")
        super().dataReceived(data)

    def make_h2_channel(self) -> Any:
        """The HTTP/2 connection that takes over when ALPN chose C{h2}."""
        return _TwistedH2Connection()

    def _switch(self, new: Any, negotiated: bytes) -> None:
        """As Twisted's own switch: same transport, settings and producer registration."""
        old = self._channel
        network = old._networkProducer
        network.unregisterProducer()
        old.setTimeout(None)
        transport = old.transport
        new.requestFactory = self._requestFactory
        new.site = self._site
        new.factory = self._factory
        new.timeOut = self._timeOut
        new.callLater = self._callLater
        self._channel = new
        new.makeConnection(transport)
        network.registerProducer(new, True)
        self._negotiatedProtocol = negotiated


# -- server: HTTP/2 -----------------------------------------------------------------------

# H2Stream (imported above) is Twisted's per-stream channel: C{request.channel}
# of an HTTP/2 request. It has the public C{command}, C{path} and C{site} of the
# request and C{abortConnection()}, which resets just this stream.


def is_h2_stream(channel: Any) -> bool:
    """Whether C{channel} (a request's C{channel}) is an HTTP/2 stream."""
    return isinstance(channel, H2Stream)


def h2_connection_of(stream: Any) -> Any:
    """
    The HTTP/2 connection an C{H2Stream} belongs to. Assumes C{H2Stream}
    keeps it in C{_conn}.
    """
    return stream._conn


class H2Connection(_Hooks, _TwistedH2Connection):
    """
    Twisted's HTTP/2 server connection with public names for the stream
    bookkeeping clawproxy's subclass uses and overrides.

    Assumes C{twisted.web._http2.H2Connection}:
      - takes the reactor as its one argument, keeps its h2 state machine in
        C{conn} (created in C{__init__}, started in C{connectionMade}, so it
        may be replaced in between) and its open streams in C{streams};
      - calls C{_requestAborted(event)} for every stream the client resets
        (RST_STREAM);
      - C{_requestDone(streamID)} forgets a finished stream;
      - C{_tryToWriteControlData()} flushes frames and returns whether the
        connection is still usable;
      - tears the connection down through C{_terminate(reason)} (a
        protocol error, its own reset limit), which calls
        C{connectionLost(reason, _cancelTimeouts=False)};
      - C{H2Stream.abortConnection()} calls C{abortRequest(streamID)}.
    """

    HOOKS = {
        "_requestAborted": "stream_reset",
        "_terminate": "terminate",
        # The events, see below.
        "_requestDataReceived": "stream_data",
        "_requestEnded": "stream_ended",
        "_handleWindowUpdate": "window_updated",
    }

    def stream_reset(self, event: Any) -> None:
        """The client reset a stream (an h2 C{StreamReset} event). Twisted's handling."""
        _TwistedH2Connection._requestAborted(self, event)

    def stream_done(self, stream_id: int) -> None:
        """Forget a stream that is over."""
        self._requestDone(stream_id)

    def flush_control_data(self) -> bool:
        """Send pending control frames; False when the connection is gone."""
        return self._tryToWriteControlData()

    def terminate(self, reason: Failure) -> None:
        """Flush control frames and close the connection. Twisted's version."""
        _TwistedH2Connection._terminate(self, reason)

    def lost_keeping_timers(self, reason: Failure) -> None:
        """Tell the streams the connection is lost, leaving the idle timers armed."""
        self.connectionLost(reason, _cancelTimeouts=False)

    # The data-sending loop, its stream queues and the events it dispatches.
    #
    # Assumes C{twisted.web._http2.H2Connection}:
    #   - keeps a C{priority.PriorityTree} in C{priority} (created in
    #     C{__init__}, so it may be replaced before any stream opens); its
    #     sending loop C{_sendPrioritisedData} draws the next stream with
    #     C{next(self.priority)} and, on C{priority.DeadlockError}, waits on
    #     the Deferred C{_sendingDeferred} (None while the loop runs), which
    #     only new data (C{writeDataToStream}, C{endRequest}) fires;
    #   - queues each stream's outbound chunks in the deque
    #     C{_outboundStreamQueues[streamID]}, the end of the response being
    #     the object C{_END_STREAM_SENTINEL} (anything but bytes);
    #   - dispatches h2's C{DataReceived}, C{StreamEnded} and
    #     C{WindowUpdated} events to C{_requestDataReceived(event)},
    #     C{_requestEnded(event)} and C{_handleWindowUpdate(event)}, each
    #     expecting the stream to be in C{streams} (KeyError otherwise) except
    #     the last.

    def stream_data(self, event: Any) -> None:
        """Request body bytes arrived (an h2 C{DataReceived}). Twisted's handling."""
        _TwistedH2Connection._requestDataReceived(self, event)

    def stream_ended(self, event: Any) -> None:
        """The client ended a stream (an h2 C{StreamEnded}). Twisted's handling."""
        _TwistedH2Connection._requestEnded(self, event)

    def window_updated(self, event: Any) -> None:
        """The client opened a flow-control window (h2 C{WindowUpdated}). Twisted's handling."""
        _TwistedH2Connection._handleWindowUpdate(self, event)

    def next_outbound(self, stream_id: int) -> bytes | None:
        """
        The chunk the sending loop would send next on C{stream_id}: None when
        nothing is queued or the end of the response is next.
        """
        queue = self._outboundStreamQueues.get(stream_id)
        if not queue:
            return None
        head = queue[0]
        return head if isinstance(head, bytes) else None

    def wake_sender(self) -> None:
        """Restart the sending loop if it waits for a stream to become sendable."""
        d, self._sendingDeferred = self._sendingDeferred, None
        if d is not None:
            d.callback(None)


class H2StateMachine(_Hooks, h2.connection.H2Connection):
    """
    h2's connection state machine with public hooks for incoming frames and
    for the header block being assembled.

    Assumes h2's C{H2Connection}:
      - handles each HEADERS frame in C{_receive_headers_frame(frame)} and
        every frame in C{_receive_frame(frame)} (returning events; a
        C{ProtocolError} raised there makes C{receive_data} queue a GOAWAY
        with its C{error_code} and re-raise);
      - reads frames through C{incoming_buffer}, an C{h2.frame_buffer.FrameBuffer}
        (created in C{__init__}) that keeps the received bytes not yet parsed
        in the bytearray C{_data} and the HEADERS and CONTINUATION frames of
        an unfinished header block in the list C{_headers_buffer}, and passes
        each parsed frame through C{_update_header_buffer(frame)};
      - keeps its HPACK decoder in C{decoder}, whose C{max_header_list_size}
        bounds a decoded header list.
    (h2 is Twisted's HTTP/2 engine, pulled in by C{twisted[http2]}.)
    """

    #: Most bytes of header block fragments one unfinished block may hold
    #: (None: h2's own bound, 64 CONTINUATION frames).
    max_header_block: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.incoming_buffer = _CappedFrameBuffer(self)

    HOOKS = {"_receive_headers_frame": "headers_frame_received",
             "_receive_frame": "frame_received"}

    def headers_frame_received(self, frame: Any) -> Any:
        """A HEADERS frame arrived; returns C{(frames to send, events)}."""
        return h2.connection.H2Connection._receive_headers_frame(self, frame)

    def frame_received(self, frame: Any) -> Any:
        """Any frame arrived (header blocks whole); returns its events."""
        return h2.connection.H2Connection._receive_frame(self, frame)

    @property
    def header_block_pending(self) -> bool:
        """
        Whether a header block has begun and not ended: HEADERS or
        CONTINUATION frames without END_HEADERS are held, or the bytes not
        yet parsed begin a HEADERS or CONTINUATION frame.
        """
        buffer = self.incoming_buffer
        if buffer._headers_buffer:
            return True
        data = buffer._data
        return len(data) > 3 and data[3] in (0x1, 0x9)

    def drop_buffers(self) -> None:
        """Let go of every received byte not yet handled (the connection is over)."""
        buffer = self.incoming_buffer
        buffer._headers_buffer = []
        buffer._data = bytearray()


class _CappedFrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, refusing a header block over C{owner.max_header_block} bytes."""

    def __init__(self, owner: H2StateMachine) -> None:
        super().__init__(server=not owner.config.client_side)
        self._owner = owner

    def _update_header_buffer(self, f: Any) -> Any:
        out = super()._update_header_buffer(f)
        held = self._headers_buffer
        cap = self._owner.max_header_block
        if held and cap is not None and sum(len(x.data) for x in held) > cap:
            self._headers_buffer = []
            raise h2.exceptions.DenialOfServiceError("header block over max_header_size")
        return out


# -- client: protocol and parser ----------------------------------------------------------

# Imported above: HTTP11ClientProtocol, Twisted's HTTP/1.1 client protocol (not
# in C{twisted.web.client.__all__}); HTTPClientParser, its response parser, and
# ClientRequest, its request (tests build a parser from them).

#: The parser's C{state} once the response head is in.
PARSER_BODY_STATE = _BODY
#: The parser's C{state} while the next line read is a status line: before
#: the first one, and again after each interim (1xx) response's head, which
#: the parser drops.
PARSER_STATUS_STATE = _STATUS


def response_parser(protocol: Any) -> Any:
    """
    The response parser of the request C{protocol.request()} just sent.

    Assumes C{HTTP11ClientProtocol.request} creates an C{HTTPClientParser}
    and keeps it in C{_parser} while the response is read; that the parser
    splits the head on LF alone (a CR stays at the end of the line) and reads
    each line through C{self.lineReceived} (so an instance attribute
    replaces it), has C{state} equal to L{PARSER_STATUS_STATE} when a status
    line is read (after a 1xx head too) and L{PARSER_BODY_STATE} once
    the head is in, and files the C{Connection} header apart from
    C{response.headers} (see L{connection_header}). A line longer than the
    parser's C{MAX_LENGTH} goes to C{self.lineLengthExceeded(line)} instead;
    an exception raised by either makes the protocol close the connection
    and fail the request with C{ResponseFailed} wrapping it.
    """
    return protocol._parser


def connection_header(parser: Any) -> tuple[bytes, ...]:
    """
    The values of a response's C{Connection} header.

    Assumes C{HTTPClientParser} files the connection-level headers
    (C{Connection}, C{Content-Length}, C{Transfer-Encoding}, ...) in
    C{connHeaders} instead of the response's C{headers}.
    """
    return tuple(parser.connHeaders.getRawHeaders(b"connection") or ())


def drop_response_connection(response: Any) -> None:
    """
    Close the connection a client response came on, so the pool never
    reuses it.

    Assumes C{twisted.web._newclient.Response} keeps its connection's
    transport (a producer) in C{_transport}; a response without one (a test
    double) is left alone.
    """
    transport = getattr(response, "_transport", None)
    if transport is not None:
        transport.stopProducing()


# -- client: connection pool --------------------------------------------------------------


def use_client_protocol(pool: HTTPConnectionPool,
                        build: Callable[[Callable[[Any], None]], Any]) -> None:
    """
    Make C{pool} build its connections' protocols with C{build(quiescent)}
    (C{quiescent} being the pool's callback for a connection ready for
    reuse), and log no line per new connection.

    Assumes C{HTTPConnectionPool} builds one client factory per connection
    as C{pool._factory(quiescentCallback, metadata)}, and that
    C{_HTTP11ClientFactory} keeps the callback in C{_quiescentCallback}.
    """

    class _Factory(_HTTP11ClientFactory):
        noisy = False

        def buildProtocol(self, addr: Any) -> Any:
            return build(self._quiescentCallback)

    pool._factory = _Factory


# -- logging ------------------------------------------------------------------------------


def log_observers(publisher: Any) -> list[Any]:
    """
    The observers of a C{twisted.logger.LogPublisher}, in the order they were
    added (twistd offers no public way to wrap the ones it made). Assumes the
    publisher keeps them in the list C{_observers}.
    """
    return list(publisher._observers)


# -- tests only ---------------------------------------------------------------------------
#
# Not used by clawproxy itself: seams only its tests reach through.


def http_channel_of(protocol: Any) -> Any:
    """
    The channel inside a protocol built by a L{twisted.web.server.Site}
    (Twisted wraps each in C{_GenericHTTPChannelProtocol}, keeping it in
    C{_channel}); any other protocol is returned as is.
    """
    return getattr(protocol, "_channel", protocol)


def observe_client_protocols(pool: HTTPConnectionPool, seen: Callable[[Any], None]) -> None:
    """
    Call C{seen(protocol)} for every connection C{pool} opens from now on
    (for tests). Assumes what L{use_client_protocol} assumes.
    """
    base = pool._factory

    class _Observed(base):  # type: ignore[misc, valid-type]
        def buildProtocol(self, addr: Any) -> Any:
            proto = super().buildProtocol(addr)
            seen(proto)
            return proto

    pool._factory = _Observed


def use_cooperator(producer: Any, cooperator: Any) -> None:
    """
    Make a C{FileBodyProducer} built elsewhere run on C{cooperator} (for
    tests). Assumes C{FileBodyProducer} keeps C{cooperator.cooperate} in
    C{_cooperate}.
    """
    producer._cooperate = cooperator.cooperate


__all__ = [
    "PARSER_BODY_STATE",
    "PARSER_STATUS_STATE",
    "ChunkedDecoder",
    "ClientRequest",
    "GenericHTTPChannelProtocol",
    "H2Connection",
    "H2StateMachine",
    "H2Stream",
    "HTTP11ClientProtocol",
    "HTTPChannel",
    "HTTPClientParser",
    "client_gone",
    "connection_header",
    "drop_response_connection",
    "h2_connection_of",
    "http_channel_of",
    "is_h2_stream",
    "log_observers",
    "observe_client_protocols",
    "response_parser",
    "take_request_buffer",
    "use_client_protocol",
    "use_cooperator",
]


# -- worker processes: sharing one listening socket --------------------------------------


class _OneAcceptPort(tcp.Port):
    """
    A TCP port that accepts one connection per readiness event, as nginx
    does with C{multi_accept off}: several worker processes wait on one
    shared listening socket, and each takes one connection at a time, so a
    burst of connections spreads over the workers (the least busy one wakes
    first) instead of all going to whichever woke first.

    Assumes C{tcp.Port.doRead} accepts up to C{self.numberAccepts}
    connections (and re-sizes it afterwards), and that the private
    classmethod C{Port._fromListeningDescriptor} (what
    C{reactor.adoptStreamPort} uses) builds a port of C{cls} over an
    inherited descriptor.
    """

    def doRead(self) -> None:
        self.numberAccepts = 1
        super().doRead()


def adopt_port_one_accept(reactor: Any, fd: int, family: int, factory: Any) -> Any:
    """
    C{reactor.adoptStreamPort(fd, family, factory)}, with a port that accepts
    one connection per readiness event (L{_OneAcceptPort}).
    """
    port = _OneAcceptPort._fromListeningDescriptor(reactor, fd, family, factory)
    port.startListening()
    return port

