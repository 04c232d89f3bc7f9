"""
HTTP/2 on the data plane: Twisted's H2Connection with clawproxy's caps.

Twisted refills a token bucket of stream resets per connection; on top of
that clawproxy caps the total resets one connection may cause
(C{server.max_stream_resets}) and the streams open at once
(C{server.max_concurrent_streams}, advertised in SETTINGS and enforced by h2).
"""

from __future__ import annotations

from typing import Any

import h2.connection
import h2.errors
import h2.settings
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from clawproxy import compat


class _RefusingConnection(compat.H2StateMachine):
    """
    h2's connection state machine, except that a stream opened beyond our
    C{SETTINGS_MAX_CONCURRENT_STREAMS} is refused with RST_STREAM
    REFUSED_STREAM, a stream error (RFC 9113 section 5.1.2), so the client
    may retry it. h2 raises C{TooManyStreamsError} instead, which Twisted
    turns into a GOAWAY for the whole connection and every stream in flight.
    """

    _admitting = False

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


class GatewayH2Connection(compat.H2Connection):
    """
    An H2Connection that refuses streams over the concurrency cap and closes
    connections abusing stream resets.
    """

    resets = 0

    def __init__(self, reactor: Any, max_concurrent_streams: int, max_resets: int) -> None:
        super().__init__(reactor)
        self.max_resets = max_resets
        self.conn = _RefusingConnection(config=self.conn.config)
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS:
                            max_concurrent_streams},
        )

    def stream_reset(self, event: Any) -> None:
        self.resets += 1
        if self.resets > self.max_resets:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.connectionLost(Failure(ConnectionLost("stream reset")))
                self.stream_done(event.stream_id)
            self.conn.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            self.terminate(Failure(ConnectionLost("too many stream resets")))
            return
        super().stream_reset(event)

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
