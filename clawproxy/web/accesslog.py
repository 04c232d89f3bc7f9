"""One JSON line per request."""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from clawproxy.web.context import RequestContext

#: One encoder for every line (C{json.dumps} with options builds one per call).
_encode = json.JSONEncoder(separators=(",", ":")).encode


class AccessLog:
    """
    Write an access-log line for each finished request.

    Each record is one JSON line written to C{out} at once (a file is
    line-buffered). Only the fields below are logged: never headers, bodies
    or credentials. The line is written directly rather than through a
    C{twisted.logger} event: nothing else observed those events, and building
    and emitting one cost more than the JSON itself on every request.
    """

    def __init__(self, out: IO[str] | None, clock: Any, owned: bool = False) -> None:
        """
        @param owned: whether C{out} is ours to close (a file we opened); a
            stream we were given (standard output) is flushed per line and
            left open.
        """
        self._out = out
        self._owned = owned
        self._clock = clock

    @classmethod
    def open(cls, output: str, clock: Any) -> AccessLog:
        """C{output} is C{-} (standard output), a file path, or C{off}."""
        if output == "off":
            return cls(None, clock)
        if output == "-":
            return cls(sys.stdout, clock)
        return cls(open(output, "a", buffering=1, encoding="utf-8"), clock, owned=True)

    def record(self, ctx: RequestContext, finished: float, timestamp: float) -> None:
        """Log C{ctx}, finished at C{finished} (reactor time) and C{timestamp} (epoch)."""
        out = self._out
        if out is None:
            return
        req = ctx.request
        out.write(
            _encode({
                "ts": round(timestamp, 3),
                "request_id": ctx.request_id,
                "client": ctx.client_ip,
                "method": ctx.method.decode("latin-1"),
                "path": ctx.path.decode("latin-1"),
                "route": ctx.route_name,
                "agent": ctx.agent_name,
                "pool": ctx.pool_name,
                "instance": ctx.instance_id,
                "status": ctx.status or req.code,
                "duration_ms": round((finished - ctx.started) * 1000, 2),
                "bytes": ctx.bytes_sent,
                "attempts": ctx.attempts,
                "error": ctx.error,
            })
            + "\n"
        )
        if not self._owned:
            out.flush()

    def close(self) -> None:
        # Under twistd, sys.stdout is by now a log redirect, not the stream
        # we were given: never close a stream we did not open.
        if self._out is None:
            return
        if self._owned:
            self._out.close()
        else:
            self._out.flush()
