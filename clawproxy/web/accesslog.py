"""One line per request: JSON (the default) or plain text (C{logging.format: text})."""

from __future__ import annotations

import json
import re
import sys
import time
from typing import IO, Any

from clawproxy.web.context import RequestContext

#: One encoder for every line (C{json.dumps} with options builds one per call).
_encode = json.JSONEncoder(separators=(",", ":")).encode

#: Bytes a text line shows escaped (C{%XX}), so one request stays one line of words.
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")


def _safe(text: str) -> str:
    return _UNSAFE.sub(lambda m: f"%{ord(m.group(0)):02X}", text) or "-"


def text_line(fields: dict[str, Any]) -> str:
    """
    The plain text form of a record: the time (UTC), client, method, path, status,
    duration, bytes, then C{name=value} words; C{-} for nothing.
    """
    ts = fields["ts"]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{round(ts * 1000) % 1000:03d}Z"
    return (
        f"{stamp} {_safe(fields['client'])} {_safe(fields['method'])} {_safe(fields['path'])}"
        f" {fields['status']} {fields['duration_ms']}ms {fields['bytes']}B"
        f" route={_safe(fields['route'])} agent={_safe(fields['agent'])}"
        f" pool={_safe(fields['pool'])} instance={_safe(fields['instance'])}"
        f" model={_safe(fields['model'] or '-')}"
        f" attempts={fields['attempts']} error={_safe(fields['error'] or '-')}"
        f" request_id={_safe(fields['request_id'])}"
        + (f" tokens={fields['prompt_tokens']}+{fields['completion_tokens']}"
           + ("~" if fields["tokens_estimated"] else "") if "prompt_tokens" in fields else "")
    )


class AccessLog:
    """
    Write an access-log line for each finished request.

    Each record is one line (JSON, or plain text with C{text=True}) written
    to C{out} at once (a file is line-buffered). Only the fields below are
    logged: never header values (so C{logging.redact} holds whatever it
    names), bodies, the query string or credentials. The line is written
    directly rather than through a C{twisted.logger} event: nothing else
    observed those events, and building and emitting one cost more than the
    JSON itself on every request (so C{logging.level} does not apply to it).
    """

    def __init__(self, out: IO[str] | None, clock: Any, owned: bool = False,
                 text: bool = False) -> None:
        """
        @param owned: whether C{out} is ours to close (a file we opened); a
            stream we were given (standard output) is flushed per line and
            left open.
        @param text: write plain text lines (L{text_line}) instead of JSON.
        """
        self._out = out
        self._owned = owned
        self._clock = clock
        self._format = text_line if text else _encode

    @classmethod
    def open(cls, output: str, clock: Any, format: str = "json") -> AccessLog:
        """
        @param output: C{-} (standard output), a file path, or C{off}.
        @param format: C{json} or C{text} (C{logging.format}).
        """
        text = format == "text"
        if output == "off":
            return cls(None, clock)
        if output == "-":
            return cls(sys.stdout, clock, text=text)
        return cls(open(output, "a", buffering=1, encoding="utf-8"), clock, owned=True,
                   text=text)

    def record(self, ctx: RequestContext, finished: float, timestamp: float) -> None:
        """Log C{ctx}, finished at C{finished} (reactor time) and C{timestamp} (epoch)."""
        out = self._out
        if out is None:
            return
        req = ctx.request
        fields = {
            "ts": round(timestamp, 3),
            "request_id": ctx.request_id,
            "client": ctx.client_ip,
            "method": ctx.method.decode("latin-1"),
            "path": ctx.path.decode("latin-1"),
            "route": ctx.route_name,
            "agent": ctx.agent_name,
            "pool": ctx.pool_name,
            "instance": ctx.instance_id,
            "model": ctx.model,
            "status": ctx.status or req.code,
            "duration_ms": round((finished - ctx.started) * 1000, 2),
            "bytes": ctx.bytes_sent,
            "attempts": ctx.attempts,
            "error": ctx.error,
        }
        notes = ctx.notes
        rec = notes.get("tokens") if notes else None
        usage = rec.usage if rec is not None else None
        if usage is not None:
            # Token counts of LLM calls; C{tokens_estimated}: no backend
            # reported them (see clawproxy.policy.usage).
            fields["prompt_tokens"] = usage.prompt
            fields["completion_tokens"] = usage.completion
            fields["tokens_estimated"] = usage.estimated
        out.write(self._format(fields) + "\n")
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
