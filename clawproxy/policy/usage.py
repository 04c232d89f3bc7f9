"""
Token usage read from LLM responses, and estimated when none is reported (pure).

Where the figures come from:

  - OpenAI JSON answers: their C{usage} object (C{prompt_tokens},
    C{completion_tokens});
  - OpenAI SSE streams: the chunk carrying C{usage} (the last one before
    C{[DONE]}, sent when the request asked for C{stream_options.include_usage});
  - Ollama answers (C{/api/chat}, C{/api/generate}, one JSON object or NDJSON
    lines): C{prompt_eval_count} and C{eval_count} of the C{done} object.

A JSON answer is decoded once, at its end (whole, up to a size cap). Of a
stream only the events that carry a C{usage} object are decoded, found with
a substring test: in the last few events when the chunks pass unchanged,
as they pass when the usage chunk is taken out of the stream.

When no backend reports usage, the figures are estimates (L{Usage.estimated}):
prompt tokens are the characters of the request's text (messages, prompt,
input) divided by L{CHARS_PER_TOKEN}, plus L{TOKENS_PER_MESSAGE} per message;
completion tokens are the characters of a JSON answer's text divided by
L{CHARS_PER_TOKEN}, or, for a stream, the number of events (each SSE event or
NDJSON line of an LLM stream carries about one token).
"""

from __future__ import annotations

import json
import re
from collections import deque
from typing import Any

import attrs

#: Characters per token in the text estimate (the usual figure for English text
#: with BPE tokenizers).
CHARS_PER_TOKEN = 4
#: Tokens a chat message costs beyond its text (role and separators).
TOKENS_PER_MESSAGE = 4

#: How much of a body's tail is kept to find its usage.
_TAIL = 16384


class _Tail:
    """The last chunks of a body (at least L{_TAIL} bytes of them), without copying."""

    __slots__ = ("chunks", "size")

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0

    def add(self, chunk: bytes) -> None:
        chunks = self.chunks
        chunks.append(chunk)
        self.size += len(chunk)
        while self.size - len(chunks[0]) >= _TAIL:
            self.size -= len(chunks.popleft())

    def bytes(self) -> bytes:
        return b"".join(self.chunks)


@attrs.define(slots=True)
class Usage:
    """Prompt and completion tokens of one answer."""

    prompt: int
    completion: int
    estimated: bool = False

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def usage_of(obj: Any) -> Usage | None:
    """
    The usage an OpenAI or Ollama JSON object reports, or L{None}.

    >>> usage_of({"usage": {"prompt_tokens": 3, "completion_tokens": 5}})
    Usage(prompt=3, completion=5, estimated=False)
    """
    if not isinstance(obj, dict):
        return None
    u = obj.get("usage")
    if isinstance(u, dict):
        p, c = u.get("prompt_tokens"), u.get("completion_tokens")
        if isinstance(p, int) and (isinstance(c, int) or c is None):
            return Usage(p, c or 0)
    if "eval_count" in obj or "prompt_eval_count" in obj:
        p, c = obj.get("prompt_eval_count") or 0, obj.get("eval_count") or 0
        if isinstance(p, int) and isinstance(c, int):
            return Usage(p, c)
    return None


def _text_chars(value: Any) -> int:
    """Characters of text in a message content (a string or an array of parts)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        n = 0
        for part in value:
            if isinstance(part, str):
                n += len(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                n += len(part["text"])
        return n
    return 0


def estimate_prompt(body: dict[str, Any]) -> int:
    """Estimated prompt tokens of an OpenAI or Ollama request body."""
    chars = 0
    extra = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                chars += _text_chars(m.get("content"))
                extra += TOKENS_PER_MESSAGE
    for key in ("prompt", "input", "system"):
        chars += _text_chars(body.get(key))
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        chars += len(json.dumps(tools))
    return extra + -(-chars // CHARS_PER_TOKEN)


def estimate_text(chars: int) -> int:
    """Estimated tokens of C{chars} characters of text."""
    return -(-chars // CHARS_PER_TOKEN)


def max_completion(body: dict[str, Any]) -> int | None:
    """The completion cap a request sets (OpenAI or Ollama), or L{None}."""
    for value in (body.get("max_completion_tokens"), body.get("max_tokens"),
                  (body.get("options") or {}).get("num_predict")
                  if isinstance(body.get("options"), dict) else None):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def answer_chars(obj: Any) -> int:
    """Characters of generated text in a JSON answer (OpenAI or Ollama)."""
    if not isinstance(obj, dict):
        return 0
    n = 0
    choices = obj.get("choices")
    if isinstance(choices, list):
        for ch in choices:
            if isinstance(ch, dict):
                msg = ch.get("message")
                n += _text_chars(msg.get("content")) if isinstance(msg, dict) else 0
                n += _text_chars(ch.get("text"))
    msg = obj.get("message")
    if isinstance(msg, dict):
        n += _text_chars(msg.get("content"))
    n += _text_chars(obj.get("response"))
    return n


# -- streams ------------------------------------------------------------------------------


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _event_end(buf: bytes) -> int:
    """Where the last complete SSE event of C{buf} ends (0 when none is)."""
    lf, crlf = buf.rfind(b"\n\n"), buf.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


#: Between two SSE events.
_SEPARATOR = re.compile(rb"(\r\n\r\n|\n\n)")

#: What a chunk sent with C{include_usage} carries that others do not.
_USAGE_NULLS = (b',"usage":null', b', "usage": null', b',"usage": null')


class SseUsage:
    """
    Watch an OpenAI SSE stream for its usage chunk.

    In observe mode (the client asked for usage itself) each chunk is passed
    on as it is: only the last events are kept to be parsed at the end. With
    C{drop}, the gateway asked the backend for usage on the client's behalf:
    the usage chunk is taken out of the stream (and the C{"usage":null}
    fields other chunks then carry), so the client sees the stream it would
    have seen without the gateway. Events are then passed on whole: a
    partial event at the end of a read waits for the rest (a few bytes,
    rarely).
    """

    def __init__(self, drop: bool = False) -> None:
        self.drop = drop
        self.usage: Usage | None = None
        self.events = 0
        self._tail = _Tail()
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of C{chunk} to pass on."""
        if not self.drop:
            self.events += chunk.count(b"data:")
            self._tail.add(chunk)
            return chunk
        buf = self._pending + chunk if self._pending else chunk
        cut = _event_end(buf)
        if cut < len(buf):
            self._pending = buf[cut:]
            buf = buf[:cut]
        else:
            self._pending = b""
        if not buf:
            return b""
        self.events += buf.count(b"data:")
        if b'"usage"' not in buf:
            return buf
        return self._strip(buf)

    def _strip(self, buf: bytes) -> bytes:
        """C{buf} (whole events) without the usage chunk and C{"usage":null} fields."""
        parts = _SEPARATOR.split(buf)  # event, separator, event, separator, ..., rest
        out = []
        for i in range(0, len(parts), 2):
            event = parts[i]
            sep = parts[i + 1] if i + 1 < len(parts) else b""
            if b'"usage"' in event and b'"usage":null' not in event.replace(b" ", b""):
                obj = _loads(event.partition(b"data:")[2].strip())
                usage = usage_of(obj)
                if usage is not None:
                    self.usage = usage
                    if not obj.get("choices"):
                        self.events -= 1
                        continue
            for null in _USAGE_NULLS:
                if null in event:
                    event = event.replace(null, b"")
            out.append(event + sep)
        return b"".join(out)

    def finish(self) -> bytes:
        """Bytes left to pass on at the end (an unterminated last event)."""
        if self.drop:
            rest, self._pending = self._pending, b""
            return self._strip(rest) if b'"usage"' in rest else rest
        tail = self._tail.bytes()
        end = len(tail)
        while True:  # the last event with a usage object, parsed alone
            at = tail.rfind(b'"usage"', 0, end)
            if at < 0:
                return b""
            start = tail.rfind(b"data:", 0, at)
            stop = tail.find(b"\n", at)
            usage = usage_of(_loads(tail[start + 5:stop if stop >= 0 else len(tail)]))
            if usage is not None:
                self.usage = usage
                return b""
            end = max(start, 0)
            if start < 0:
                return b""

    def result(self) -> Usage | None:
        """The usage reported, else None."""
        return self.usage


class NdjsonUsage:
    """Watch an Ollama NDJSON stream: its C{done} line carries the counts."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.events = 0
        self._tail = _Tail()

    def feed(self, chunk: bytes) -> bytes:
        self.events += chunk.count(b"\n")
        self._tail.add(chunk)
        return chunk

    def finish(self) -> bytes:
        for line in reversed(self._tail.bytes().split(b"\n")):
            if b"eval_count" in line:
                usage = usage_of(_loads(line))
                if usage is not None:
                    self.usage = usage
                    self.events = max(0, self.events - 1)
                    break
        return b""


class JsonUsage:
    """
    Read a JSON answer's usage at its end (the body is kept up to C{limit}
    bytes; a larger one is estimated from its size).
    """

    def __init__(self, limit: int = 4 * 1024 * 1024) -> None:
        self.usage: Usage | None = None
        self.chars = 0
        self._parts: list[bytes] = []
        self._size = 0
        self._limit = limit

    def feed(self, chunk: bytes) -> bytes:
        self._size += len(chunk)
        if self._size <= self._limit:
            self._parts.append(chunk)
        return chunk

    def finish(self) -> bytes:
        if self._size > self._limit:
            self.chars = self._size
            self._parts = []
            return b""
        obj = _loads(b"".join(self._parts))
        self._parts = []
        self.usage = usage_of(obj)
        if self.usage is None:
            self.chars = answer_chars(obj)
        return b""
