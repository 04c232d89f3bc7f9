"""
HTTP/2 on the data plane: Twisted's H2Connection with clawproxy's caps.

Twisted refills a token bucket of stream resets per connection; on top of
that clawproxy caps:

  - the total resets one connection may cause (C{server.max_stream_resets}),
    and the resets one client address may cause across its connections
    (the same number, refilled over L{ADDRESS_RESET_WINDOW}: see
    L{ResetBudget}); a stream reset in the same read as its request is
    never handed to the gateway at all;
  - the streams open at once (C{server.max_concurrent_streams}, advertised
    in SETTINGS and enforced by h2);
  - the header block: an unfinished one must end within
    C{server.head_timeout} and hold at most L{HEADER_BLOCK_FACTOR} times
    C{server.max_header_size} bytes, else the connection is closed;
  - SETTINGS, PING and PRIORITY frames, at L{CONTROL_FRAME_BURST} then
    L{CONTROL_FRAME_RATE} a second (GOAWAY ENHANCE_YOUR_CALM beyond).

It also fixes Twisted's sending loop, which spun (and kept the idle timer
from firing) on a stream with data queued and no flow-control window left.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import priority
from hyperframe.frame import PingFrame, PriorityFrame, SettingsFrame
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from clawproxy import compat

#: An unfinished header block may hold this many times C{max_header_size}
#: bytes (HPACK-encoded; a decoded head over C{max_header_size} is answered
#: 431 on its stream, a block over this closes the connection).
HEADER_BLOCK_FACTOR = 4

#: SETTINGS, PING and PRIORITY frames one connection may send in a burst...
CONTROL_FRAME_BURST = 1000
#: ... and a second after it.
CONTROL_FRAME_RATE = 200

#: A client address may reset C{max_stream_resets} streams over its
#: connections; its budget refills in this many seconds.
ADDRESS_RESET_WINDOW = 10.0

_CONTROL_FRAMES = (SettingsFrame, PingFrame, PriorityFrame)
_STREAM_EVENTS = (h2.events.RequestReceived, h2.events.DataReceived, h2.events.StreamEnded,
                  h2.events.PriorityUpdated)


class ResetBudget:
    """
    Stream resets per client address, across connections: a leaky bucket of
    C{capacity} that drains in C{window} seconds on C{clock}.
    """

    def __init__(self, clock: Any, capacity: int, window: float = ADDRESS_RESET_WINDOW) -> None:
        self.clock = clock
        self.capacity = capacity
        self.rate = capacity / window
        #: address -> (level, when it was last updated)
        self.levels: dict[str, tuple[float, float]] = {}

    def _level(self, address: str, now: float) -> float:
        entry = self.levels.get(address)
        if entry is None:
            return 0.0
        level, then = entry
        return max(0.0, level - max(0.0, now - then) * self.rate)

    def spend(self, address: str) -> bool:
        """Count one reset from C{address}; False once it is over its budget."""
        now = self.clock.seconds()
        level = self._level(address, now) + 1
        if len(self.levels) > 10000:
            self._forget_drained(now)
        self.levels[address] = (level, now)
        return level <= self.capacity

    def exhausted(self, address: str) -> bool:
        """Whether C{address} is over its budget now (its new connections are refused)."""
        now = self.clock.seconds()
        level = self._level(address, now)
        if level == 0.0:
            self.levels.pop(address, None)
        return level > self.capacity

    def _forget_drained(self, now: float) -> None:
        for address in [a for a in self.levels if self._level(a, now) == 0.0]:
            del self.levels[address]


class _FlowAwareTree(priority.PriorityTree):
    """
    The priority tree Twisted's sending loop draws streams from, except that
    a stream which cannot send (data queued, no flow-control window) is
    blocked instead of handed out: Twisted's loop would pop it, send nothing
    and reschedule itself at once, forever (100 % CPU, and the idle timer
    reset on every pass). A WINDOW_UPDATE unblocks it again.
    """

    def __init__(self, sendable: Callable[[int], bool]) -> None:
        super().__init__()
        self._sendable = sendable

    def __next__(self) -> int:
        while True:
            stream_id = super().__next__()  # DeadlockError once all are blocked
            if self._sendable(stream_id):
                return stream_id
            self.block(stream_id)


class _RefusingConnection(compat.H2StateMachine):
    """
    h2's connection state machine, except that:

      - a stream opened beyond our C{SETTINGS_MAX_CONCURRENT_STREAMS} is
        refused with RST_STREAM REFUSED_STREAM, a stream error (RFC 9113
        section 5.1.2), so the client may retry it. h2 raises
        C{TooManyStreamsError} instead, which Twisted turns into a GOAWAY for
        the whole connection and every stream in flight;
      - a stream reset in the same read as its request (or the end of it) is
        never reported as received or ended: the server never starts it;
      - SETTINGS, PING and PRIORITY frames beyond L{CONTROL_FRAME_BURST},
        then L{CONTROL_FRAME_RATE} a second, are a connection error
        (ENHANCE_YOUR_CALM).
    """

    _admitting = False
    clock: Any = None
    _control_tokens = float(CONTROL_FRAME_BURST)
    _control_stamp: float | None = None

    @property
    def open_inbound_streams(self) -> int:  # type: ignore[override]
        n = h2.connection.H2Connection.open_inbound_streams.fget(self)  # type: ignore[attr-defined]
        # Let h2's own check pass once, for the stream refused just below.
        return n - 1 if self._admitting else n

    def headers_frame_received(self, frame: Any) -> Any:
        if (frame.stream_id in self.streams
                or self.open_inbound_streams < self.local_settings.max_concurrent_streams):
            return super().headers_frame_received(frame)
        # Accept the HEADERS (keeping HPACK and stream state right), then
        # reset the stream; the server never sees the request.
        self._admitting = True
        try:
            frames, events = super().headers_frame_received(frame)
        finally:
            self._admitting = False
        self.reset_stream(frame.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        return frames, [e for e in events if getattr(e, "stream_id", None) != frame.stream_id]

    def frame_received(self, frame: Any) -> Any:
        if isinstance(frame, _CONTROL_FRAMES) and self.clock is not None:
            now = self.clock.seconds()
            if self._control_stamp is not None:
                self._control_tokens = min(
                    float(CONTROL_FRAME_BURST),
                    self._control_tokens + max(0.0, now - self._control_stamp)
                    * CONTROL_FRAME_RATE)
            self._control_stamp = now
            if self._control_tokens < 1:
                raise h2.exceptions.DenialOfServiceError("too many control frames")
            self._control_tokens -= 1
        return super().frame_received(frame)

    def receive_data(self, data: Any) -> list[Any]:
        events = super().receive_data(data)
        if len(events) < 2:
            return events
        reset = {e.stream_id for e in events if isinstance(e, h2.events.StreamReset)}
        if not reset:
            return events
        kept = []
        for e in events:
            if isinstance(e, _STREAM_EVENTS) and e.stream_id in reset:
                if isinstance(e, h2.events.DataReceived):
                    # Nobody reads it: give the connection window back.
                    self.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                continue
            kept.append(e)
        return kept


class GatewayH2Connection(compat.H2Connection):
    """
    An H2Connection that refuses streams over the concurrency cap, closes
    connections abusing stream resets, control frames or header blocks, and
    waits (instead of spinning) on streams without flow-control window.
    """

    #: Seconds a connection closed by the idle timeout (GOAWAY, TLS
    #: close_notify) may take to close before it is aborted; Twisted waits
    #: 15 s, for a client that by then has been silent for C{client_timeout}.
    abortTimeout = 2

    resets = 0
    _head_call: Any = None
    _gone = False
    _refused_address = False

    def __init__(self, reactor: Any, max_concurrent_streams: int, max_resets: int,
                 max_header_size: int | None = None, head_timeout: float | None = None,
                 reset_budget: ResetBudget | None = None) -> None:
        super().__init__(reactor)
        self.reactor = reactor
        self.max_resets = max_resets
        self.head_timeout = head_timeout
        self.reset_budget = reset_budget
        self.address: str | None = None
        self.conn = _RefusingConnection(config=self.conn.config)
        self.conn.clock = reactor
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS:
                            max_concurrent_streams},
        )
        if max_header_size is not None:
            block = HEADER_BLOCK_FACTOR * max_header_size
            self.conn.max_header_block = block
            self.conn.decoder.max_header_list_size = max(
                block, h2.connection.H2Connection.DEFAULT_MAX_HEADER_LIST_SIZE)
        self.priority = _FlowAwareTree(self._sendable)

    # -- flow control ----------------------------------------------------

    def _sendable(self, stream_id: int) -> bool:
        """Whether the sending loop can make progress on C{stream_id} now."""
        if self.conn.local_flow_control_window(stream_id) > 0:
            return True
        return not self.next_outbound(stream_id)  # the end of the stream needs no window

    def window_updated(self, event: Any) -> None:
        super().window_updated(event)
        # Twisted unblocks the streams in the tree but leaves the loop asleep
        # until new data is written; a stream whose producer stays paused
        # (more queued than the new window) would then never send again.
        self.wake_sender()

    # -- connection ------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        peer = self.transport.getPeer()
        self.address = getattr(peer, "host", None)
        if self.reset_budget is not None and self.address is not None:
            self._refused_address = self.reset_budget.exhausted(self.address)

    def dataReceived(self, data: bytes) -> None:
        if self._gone:
            return
        if self._refused_address:
            # This address reset too many streams lately: no new connections.
            self._calm_down("too many stream resets from this address")
            return
        super().dataReceived(data)
        if self._gone or self.head_timeout is None:
            return
        if self.conn.header_block_pending:
            if self._head_call is None:
                self._head_call = self.reactor.callLater(self.head_timeout,
                                                         self._head_timed_out)
        else:
            self._cancel_head_timer()

    def _head_timed_out(self) -> None:
        self._head_call = None
        self.conn.drop_buffers()
        self._calm_down("request head not received in time",
                        h2.errors.ErrorCodes.PROTOCOL_ERROR)

    def _cancel_head_timer(self) -> None:
        if self._head_call is not None:
            if self._head_call.active():
                self._head_call.cancel()
            self._head_call = None

    def _calm_down(self, why: str,
                   code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM) -> None:
        """Send GOAWAY with C{code} and close the connection."""
        if self._gone:
            return
        try:
            self.conn.close_connection(error_code=code)
        except h2.exceptions.ProtocolError:
            pass  # already closed on h2's side
        self.terminate(Failure(ConnectionLost(why)))

    def connectionLost(self, reason: Failure, _cancelTimeouts: bool = True) -> None:
        self._gone = True
        self._cancel_head_timer()
        self.conn.drop_buffers()
        super().connectionLost(reason, _cancelTimeouts=_cancelTimeouts)

    def timeoutConnection(self) -> None:
        """
        As Twisted's (GOAWAY, then close), but let the transport really close:
        a TLS transport does not start its close while a producer is
        registered (see L{terminate}).
        """
        super().timeoutConnection()
        self.transport.unregisterProducer()

    # -- streams ---------------------------------------------------------

    # Twisted dispatches the rest of a read's events even after the
    # connection was closed in the middle of them; and a stream we refused
    # early is gone while the client may still be sending it.

    def stream_data(self, event: Any) -> None:
        if not self._gone and event.stream_id in self.streams:
            super().stream_data(event)

    def stream_ended(self, event: Any) -> None:
        if not self._gone and event.stream_id in self.streams:
            super().stream_ended(event)

    def stream_reset(self, event: Any) -> None:
        self.resets += 1
        over_address = (self.reset_budget is not None and self.address is not None
                        and not self.reset_budget.spend(self.address))
        if self.resets > self.max_resets or over_address:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.connectionLost(Failure(ConnectionLost("stream reset")))
                self.stream_done(event.stream_id)
            self._calm_down("too many stream resets")
            return
        if event.stream_id in self.streams:  # else reset before it was handed on
            super().stream_reset(event)

    def refuse_stream(self, stream_id: int, status: int,
                      headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """
        Answer a stream whose request is still arriving with a complete
        response, then ask the client to stop sending it (RST_STREAM
        NO_ERROR, RFC 9113 section 8.1), and forget it: the request is
        never processed.
        """
        stream = self.streams.get(stream_id)
        conn = self.conn
        try:
            head = [(b":status", b"%d" % status), *headers]
            fits = (conn.local_flow_control_window(stream_id) >= len(body)
                    and conn.max_outbound_frame_size >= len(body))
            if body and fits:
                conn.send_headers(stream_id, head)
                conn.send_data(stream_id, body, end_stream=True)
            else:
                conn.send_headers(stream_id, head, end_stream=True)
            conn.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
        except h2.exceptions.ProtocolError:
            try:
                conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            except h2.exceptions.ProtocolError:
                pass  # the stream is already closed on h2's side
        if self.flush_control_data() and stream is not None:
            self.stream_done(stream_id)
            stream.connectionLost(Failure(ConnectionLost("request refused")))

    def abortRequest(self, streamID: int) -> None:
        """
        Reset one stream whose response cannot be completed (RST_STREAM
        INTERNAL_ERROR), and tell its request.

        Twisted's version resets with NO_ERROR and forgets the stream without
        telling the request, whose C{notifyFinish()} then never fires: the
        gateway's in-flight count leaked, the request was never logged and a
        graceful stop waited out its whole grace period.
        """
        stream = self.streams.get(streamID)
        self.conn.reset_stream(streamID, h2.errors.ErrorCodes.INTERNAL_ERROR)
        if self.flush_control_data():
            self.stream_done(streamID)
            if stream is not None:
                stream.connectionLost(Failure(ConnectionLost("response aborted")))

    def terminate(self, reason: Failure) -> None:
        """
        As Twisted's, but let the transport really close: Twisted leaves this
        connection registered as the transport's producer, and a TLS
        transport does not start its close while one is registered, so a
        connection closed with GOAWAY lingered until the idle timeout.
        """
        if self.flush_control_data():
            self.transport.unregisterProducer()
            self.transport.loseConnection()
            self.lost_keeping_timers(reason)
