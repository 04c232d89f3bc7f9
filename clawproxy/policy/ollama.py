"""
OpenAI <-> Ollama translation for C{protocol: ollama} pools (pure).

An OpenAI chat request becomes an Ollama C{/api/chat} request; Ollama's
answer (one JSON object, or NDJSON lines when streaming) becomes an OpenAI
C{chat.completion} or a stream of SSE C{chat.completion.chunk}s.
"""

from __future__ import annotations

import json
import time
from typing import Any

_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


def chat_request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """The Ollama C{/api/chat} body for an OpenAI chat completion request."""
    options = {theirs: body[ours] for ours, theirs in _OPTIONS.items() if ours in body}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        options["num_predict"] = max_tokens
    out: dict[str, Any] = {
        "model": model,
        "messages": body.get("messages", []),
        "stream": bool(body.get("stream", False)),
    }
    if options:
        out["options"] = options
    if body.get("response_format", {}).get("type") == "json_object":
        out["format"] = "json"
    return out


def _finish_reason(obj: dict[str, Any]) -> str:
    return "length" if obj.get("done_reason") == "length" else "stop"


def _usage(obj: dict[str, Any]) -> dict[str, int]:
    prompt = int(obj.get("prompt_eval_count") or 0)
    completion = int(obj.get("eval_count") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def chat_response(obj: dict[str, Any], model: str, completion_id: str) -> dict[str, Any]:
    """An OpenAI C{chat.completion} from Ollama's non-streamed answer."""
    message = obj.get("message") or {}
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": obj.get("model", model),
        "choices": [{
            "index": 0,
            "message": {"role": message.get("role", "assistant"),
                        "content": message.get("content", "")},
            "finish_reason": _finish_reason(obj),
        }],
        "usage": _usage(obj),
    }


class StreamTranslator:
    """
    Turn Ollama's NDJSON stream into OpenAI SSE chunks, line by line as
    bytes arrive (a line split across reads is kept until it is whole).
    """

    content_type = b"text/event-stream"

    def __init__(self, model: str, completion_id: str, include_usage: bool = False) -> None:
        self.model = model
        self.id = completion_id
        self.include_usage = include_usage
        self._buffer = b""
        self._started = False
        self.done = False
        #: The OpenAI C{usage} of the C{done} line, once it came.
        self.usage: dict[str, int] | None = None

    def feed(self, data: bytes) -> bytes:
        """SSE bytes for the complete NDJSON lines in C{self._buffer + data}."""
        self._buffer += data
        if b"\n" not in self._buffer:
            return b""
        *lines, self._buffer = self._buffer.split(b"\n")
        return b"".join(self._line(line) for line in lines if line.strip())

    def finish(self) -> bytes:
        """What is left to send when the upstream body has ended."""
        out = self._line(self._buffer) if self._buffer.strip() else b""
        self._buffer = b""
        if not self.done:
            out += b"data: [DONE]\n\n"
            self.done = True
        return out

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None, **extra: Any) -> bytes:
        """One SSE chunk; C{delta=None} for a chunk without choices (the usage chunk)."""
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model,
            "choices": [] if delta is None else [
                {"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    def _line(self, line: bytes) -> bytes:
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            return b""
        if not isinstance(obj, dict):
            return b""
        if "error" in obj:
            err = {"error": {"message": str(obj["error"]), "type": "upstream_error",
                             "code": "ollama_error"}}
            return b"data: " + json.dumps(err).encode() + b"\n\n"
        out = b""
        if not self._started:
            self._started = True
            out += self._chunk({"role": "assistant", "content": ""}, None)
        content = (obj.get("message") or {}).get("content", "")
        if content:
            out += self._chunk({"content": content}, None)
        if obj.get("done"):
            self.usage = _usage(obj)
            out += self._chunk({}, _finish_reason(obj))
            if self.include_usage:
                # As OpenAI sends it: a chunk of its own, with no choices.
                out += self._chunk(None, None, usage=self.usage)
            out += b"data: [DONE]\n\n"
            self.done = True
        return out


class CompletionCollector:
    """
    Collect Ollama's non-streamed answer and give the OpenAI completion at
    the end (the answer is one small JSON object).
    """

    content_type = b"application/json"

    def __init__(self, model: str, completion_id: str, limit: int = 8 * 1024 * 1024) -> None:
        self.model = model
        self.id = completion_id
        self._parts: list[bytes] = []
        self._size = 0
        self._limit = limit
        #: The OpenAI C{usage} of the answer, once it is translated.
        self.usage: dict[str, int] | None = None

    def feed(self, data: bytes) -> bytes:
        self._size += len(data)
        if self._size > self._limit:
            raise ValueError("Ollama answer too large to translate")
        self._parts.append(data)
        return b""

    def finish(self) -> bytes:
        raw = b"".join(self._parts)
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            # A streamed answer where a single one was asked for: merge it.
            content: list[str] = []
            last: dict[str, Any] = {}
            for line in raw.splitlines():
                try:
                    part = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if isinstance(part, dict):
                    content.append((part.get("message") or {}).get("content", ""))
                    last = part
            obj = dict(last, message={"role": "assistant", "content": "".join(content)})
        if not isinstance(obj, dict):
            obj = {}
        answer = chat_response(obj, self.model, self.id)
        self.usage = answer["usage"]
        return json.dumps(answer).encode()
