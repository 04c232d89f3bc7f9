"""
SSE responses whose upstream fails mid-stream end with an error event
(SPEC section 3): the client's stream gets one C{data: {"error": {...}}}
event in OpenAI's shape, which SDKs raise as an error (the openai SDK's
C{APIError}), and then ends; never a clean-looking end, never a bare reset.

A response filter (L{SSEErrors}) takes part in every C{text/event-stream}
response: it passes whole events on as they come and holds back the
bytes of an event not yet complete, so that when the upstream breaks
off, the error event follows a complete event and the partial one is
dropped (a client never gets half a JSON chunk glued to the error).
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from clawproxy.errors import sse_error_event
from clawproxy.interfaces import IBodyFilter, IResponseFilter

#: The longest partial event held back; past it bytes are passed on as they come.
MAX_HELD = 256 * 1024

_BOUNDARIES = ((b"\n\n", 2), (b"\r\n\r\n", 4), (b"\r\r", 2))


def event_end(buf: bytes) -> int:
    """Where the last complete SSE event in C{buf} ends (0 when none does)."""
    end = 0
    for mark, size in _BOUNDARIES:
        i = buf.rfind(mark)
        if i >= 0 and i + size > end:
            end = i + size
    return end


@implementer(IBodyFilter)
class EventFramer:
    """One SSE response: whole events pass, a broken-off stream ends with an error event."""

    rewrites = True

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.held = b""
        #: Bytes passed on ended inside an event (only past L{MAX_HELD}).
        self.mid_event = False
        #: Some bytes were passed on to the client.
        self.sent = False

    def data(self, chunk: bytes) -> bytes:
        buf = self.held + chunk if self.held else chunk
        n = len(buf)
        end = n if buf.endswith(b"\n\n") else event_end(buf)
        if end == n:
            self.held = b""
            self.mid_event = False
            self.sent = True
            return buf
        if n - end > MAX_HELD:
            self.held = b""
            self.mid_event = self.sent = True
            return buf
        self.held = buf[end:]
        if end:
            self.mid_event = False
            self.sent = True
        return buf[:end]

    def end(self, outcome: str) -> bytes:
        held, self.held = self.held, b""
        if outcome == "complete":
            return held
        if outcome == "broken" and self.sent:
            # (Before any byte reached the client, the gateway can still
            # answer 502, or try another instance: no event then.)
            event = sse_error_event(
                f"upstream {self.ctx.instance_id} failed mid-stream", "upstream_error",
                "upstream_disconnected")
            return b"\n\n" + event if self.mid_event else event
        return b""


@implementer(IResponseFilter)
class SSEErrors:
    """Takes part in every C{text/event-stream} response (see the module docstring)."""

    name = "sse_errors"

    def begin(self, ctx: Any, code: int, headers: list[tuple[bytes, bytes]]) -> Any:
        for name, value in headers:
            if name == b"content-type":
                if value[:17].lower() == b"text/event-stream":
                    return EventFramer(ctx)
                return None
        return None


def stream_error_parts(**_: Any) -> list[Any]:
    """The data-plane feature: always on (SPEC section 3)."""
    return [SSEErrors()]
