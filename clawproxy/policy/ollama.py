"""
OpenAI <-> Ollama translation for C{protocol: ollama} pools (pure).

An OpenAI chat request becomes an Ollama C{/api/chat} request (a legacy
completion C{/api/generate}, an embeddings request C{/api/embed}); Ollama's
answer (one JSON object, or NDJSON lines when streaming) becomes an OpenAI
C{chat.completion} or a stream of SSE C{chat.completion.chunk}s (a
C{text_completion}, an embeddings list); Ollama's errors keep their status
and take the SPEC's error shape.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from typing import Any

from clawproxy.errors import bad_request, error_body, sse_error_event

#: C{json.dumps(obj, separators=(",", ":"))} without building an encoder per call.
_compact = json.JSONEncoder(separators=(",", ":")).encode

_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


def _content(content: Any, images: list[str]) -> str:
    """
    The text of an OpenAI message C{content}: a string, or an array of parts
    whose text parts are joined (by newlines) and whose C{image_url} parts
    (base64 C{data:} URLs) go to C{images}.

    @raise Rejected: 400 for an image given by a URL Ollama cannot fetch.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request("message content must be a string or an array of parts",
                          "invalid_content")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url.startswith("data:") or "," not in url:
                raise bad_request("images sent to an Ollama pool must be base64 data: URLs",
                                  "unsupported_image_url")
            images.append(url.split(",", 1)[1])
        else:
            raise bad_request(f"content part type {kind!r} is not supported by Ollama pools",
                              "invalid_content")
    return "\n".join(texts)


def _arguments(raw: Any) -> Any:
    """OpenAI's tool call C{arguments} (a JSON string) as the object Ollama wants."""
    if isinstance(raw, str):
        try:
            return json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError):
            raise bad_request("tool call arguments must be a JSON object",
                              "invalid_tool_call") from None
    return raw if raw is not None else {}


def _messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages as Ollama's."""
    if not isinstance(messages, list):
        raise bad_request("messages must be an array", "invalid_messages")
    names: dict[str, str] = {}  # tool call id -> function name
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise bad_request("each message must be an object", "invalid_messages")
        images: list[str] = []
        msg: dict[str, Any] = {"role": m.get("role", "user"),
                               "content": _content(m.get("content"), images)}
        if images:
            msg["images"] = images
        calls = m.get("tool_calls")
        if isinstance(calls, list) and calls:
            msg["tool_calls"] = []
            for call in calls:
                fn = (call.get("function") or {}) if isinstance(call, dict) else {}
                if isinstance(call, dict) and isinstance(call.get("id"), str):
                    names[call["id"]] = fn.get("name", "")
                msg["tool_calls"].append({"function": {
                    "name": fn.get("name", ""), "arguments": _arguments(fn.get("arguments"))}})
        if msg["role"] == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id", ""))
            if name:
                msg["tool_name"] = name
        out.append(msg)
    return out


def _tools(tools: Any, choice: Any) -> list[Any] | None:
    """
    The tools offered to Ollama under OpenAI's C{tool_choice}: C{none} offers
    none, a named function offers only that one (Ollama cannot force a call:
    C{required} offers them all, as C{auto} does).
    """
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        chosen = [t for t in tools if isinstance(t, dict)
                  and (t.get("function") or {}).get("name") == name]
        if not chosen:
            raise bad_request(f"tool_choice names a function not in tools: {name!r}",
                              "invalid_tool_choice")
        return chosen
    return tools


def chat_request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """
    The Ollama C{/api/chat} body for an OpenAI chat completion request.

    @raise Rejected: 400 for what Ollama cannot be asked (an image URL, a
        content part of another type, arguments that are not JSON).
    """
    options = _options(body)
    out: dict[str, Any] = {
        "model": model,
        "messages": _messages(body.get("messages", [])),
        "stream": bool(body.get("stream", False)),
    }
    tools = _tools(body.get("tools"), body.get("tool_choice"))
    if tools:
        out["tools"] = tools
    if options:
        out["options"] = options
    fmt = body.get("response_format")
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_object":
            out["format"] = "json"
        elif fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            out["format"] = schema if isinstance(schema, dict) else "json"
    return out


def _options(body: dict[str, Any]) -> dict[str, Any]:
    """Ollama C{options} from an OpenAI request's sampling fields."""
    options = {theirs: body[ours] for ours, theirs in _OPTIONS.items() if ours in body}
    if isinstance(options.get("stop"), str):
        options["stop"] = [options["stop"]]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        options["num_predict"] = max_tokens
    return options


def generate_request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """
    The Ollama C{/api/generate} body for an OpenAI (legacy) completion request.

    @raise Rejected: 400 for several prompts, token-array prompts or C{n} > 1.
    """
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("an Ollama pool takes one text prompt per completion request",
                          "unsupported_prompt")
    if body.get("n", 1) != 1:
        raise bad_request("n > 1 is not supported by Ollama pools", "unsupported_n")
    out: dict[str, Any] = {"model": model, "prompt": prompt,
                           "stream": bool(body.get("stream", False))}
    if isinstance(body.get("suffix"), str):
        out["suffix"] = body["suffix"]
    options = _options(body)
    if options:
        out["options"] = options
    return out


def embed_request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """
    The Ollama C{/api/embed} body for an OpenAI embeddings request.

    @raise Rejected: 400 for token-array inputs (Ollama embeds text).
    """
    text = body.get("input")
    if not (isinstance(text, str) or (isinstance(text, list) and text
                                      and all(isinstance(t, str) for t in text))):
        raise bad_request("input must be a string or an array of strings for Ollama pools",
                          "unsupported_input")
    out: dict[str, Any] = {"model": model, "input": text}
    if isinstance(body.get("dimensions"), int):
        out["dimensions"] = body["dimensions"]
    return out


def _finish_reason(obj: dict[str, Any], tool_calls: bool = False) -> str:
    if obj.get("done_reason") == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


def _tool_calls(calls: Any, first: int = 0) -> list[dict[str, Any]]:
    """Ollama's C{tool_calls} in OpenAI's shape (arguments as a JSON string)."""
    out = []
    for i, call in enumerate(calls if isinstance(calls, list) else [], first):
        fn = (call.get("function") or {}) if isinstance(call, dict) else {}
        args = fn.get("arguments", {})
        out.append({"id": f"call_{i}", "type": "function", "function": {
            "name": fn.get("name", ""),
            "arguments": args if isinstance(args, str) else json.dumps(args)}})
    return out


def _usage(obj: dict[str, Any]) -> dict[str, int]:
    prompt = int(obj.get("prompt_eval_count") or 0)
    completion = int(obj.get("eval_count") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def chat_response(obj: dict[str, Any], model: str, completion_id: str) -> dict[str, Any]:
    """An OpenAI C{chat.completion} from Ollama's non-streamed answer."""
    message = obj.get("message") or {}
    calls = _tool_calls(message.get("tool_calls"))
    answer: dict[str, Any] = {"role": message.get("role", "assistant"),
                              "content": message.get("content", "")}
    if calls:
        answer["tool_calls"] = calls
        answer["content"] = answer["content"] or None
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": obj.get("model", model),
        "choices": [{"index": 0, "message": answer,
                     "finish_reason": _finish_reason(obj, bool(calls))}],
        "usage": _usage(obj),
    }


def text_response(obj: dict[str, Any], model: str, completion_id: str) -> dict[str, Any]:
    """An OpenAI C{text_completion} from Ollama's non-streamed C{/api/generate} answer."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": obj.get("model", model),
        "choices": [{"index": 0, "text": obj.get("response", ""), "logprobs": None,
                     "finish_reason": _finish_reason(obj)}],
        "usage": _usage(obj),
    }


class StreamTranslator:
    """
    Turn Ollama's NDJSON stream into OpenAI SSE chunks, line by line as
    bytes arrive (a line split across reads is kept until it is whole).
    """

    content_type = b"text/event-stream"

    def __init__(self, model: str, completion_id: str, include_usage: bool = False,
                 text: bool = False) -> None:
        """@param text: translate C{/api/generate} lines into C{text_completion} chunks."""
        self.model = model
        self.id = completion_id
        self.include_usage = include_usage
        self.text = text
        self._buffer = b""
        self._started = text  # text completions have no role chunk
        self._calls = 0
        self._created: int | None = None
        self._head_bytes = b""
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

    def _head(self) -> bytes:
        """
        A chunk's bytes up to its C{choices}: the same for every chunk of the
        stream but C{created}, so they are serialised once a second, not per chunk.
        """
        created = int(time.time())
        if created != self._created:
            self._created = created
            kind = b'"text_completion"' if self.text else b'"chat.completion.chunk"'
            self._head_bytes = (b'data: {"id":' + _compact(self.id).encode() + b',"object":'
                                + kind + b',"created":%d,"model":' % created
                                + _compact(self.model).encode() + b',"choices":')
        return self._head_bytes

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None,
               usage: dict[str, int] | None = None) -> bytes:
        """
        One SSE chunk (as C{json.dumps} with compact separators writes it);
        C{delta=None} for a chunk without choices (the C{usage} chunk).
        """
        if delta is None:
            choices: list[Any] = []
        elif self.text:
            choices = [{"index": 0, "text": delta.get("content", ""), "logprobs": None,
                        "finish_reason": finish}]
        else:
            choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
        out = self._head() + _compact(choices).encode()
        if usage is not None:
            out += b',"usage":' + _compact(usage).encode()
        return out + b"}\n\n"

    def _content(self, content: Any) -> bytes:
        """C{self._chunk({"content": content}, None)} (most lines' chunk), without its dicts."""
        text = _compact(content).encode()
        if self.text:
            return (self._head() + b'[{"index":0,"text":' + text
                    + b',"logprobs":null,"finish_reason":null}]}\n\n')
        return (self._head() + b'[{"index":0,"delta":{"content":' + text
                + b'},"finish_reason":null}]}\n\n')

    def _line(self, line: bytes) -> bytes:
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            return b""
        if not isinstance(obj, dict):
            return b""
        if "error" in obj:
            return sse_error_event(str(obj["error"]), "upstream_error", "ollama_error")
        out = b""
        if not self._started:
            self._started = True
            out += self._chunk({"role": "assistant", "content": ""}, None)
        message = obj.get("message") or {}
        content = obj.get("response", "") if self.text else message.get("content", "")
        if content:
            out += self._content(content)
        calls = message.get("tool_calls")
        if calls and (calls := _tool_calls(calls, self._calls)):
            for i, call in enumerate(calls, self._calls):
                call["index"] = i
            self._calls += len(calls)
            out += self._chunk({"tool_calls": calls}, None)
        if obj.get("done"):
            self.usage = _usage(obj)
            out += self._chunk({}, _finish_reason(obj, self._calls > 0))
            if self.include_usage:
                # As OpenAI sends it: a chunk of its own, with no choices.
                out += self._chunk(None, None, self.usage)
            out += b"data: [DONE]\n\n"
            self.done = True
        return out


class _Collector:
    """A JSON answer kept whole (up to C{limit} bytes) and translated at its end."""

    content_type = b"application/json"
    #: The error past C{limit}.
    too_large = "Ollama answer too large to translate"

    def __init__(self, limit: int) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._limit = limit
        #: The OpenAI C{usage} of the answer, once it is translated.
        self.usage: dict[str, int] | None = None

    def feed(self, data: bytes) -> bytes:
        self._size += len(data)
        if self._size > self._limit:
            raise ValueError(self.too_large)
        self._parts.append(data)
        return b""


class CompletionCollector(_Collector):
    """
    Collect Ollama's non-streamed answer and give the OpenAI completion at
    the end (the answer is one small JSON object).
    """

    def __init__(self, model: str, completion_id: str, limit: int = 8 * 1024 * 1024,
                 text: bool = False) -> None:
        """@param text: an C{/api/generate} answer, given as a C{text_completion}."""
        super().__init__(limit)
        self.model = model
        self.id = completion_id
        self.text = text

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
                    content.append(part.get("response", "") if self.text else
                                   (part.get("message") or {}).get("content", ""))
                    last = part
            obj = dict(last, response="".join(content),
                       message={"role": "assistant", "content": "".join(content)})
        if not isinstance(obj, dict):
            obj = {}
        answer = (text_response if self.text else chat_response)(obj, self.model, self.id)
        self.usage = answer["usage"]
        return json.dumps(answer).encode()


class EmbedCollector(_Collector):
    """
    Ollama's C{/api/embed} answer as an OpenAI embeddings list (floats, or
    base64 little-endian float32 with C{encoding_format: base64}, which the
    openai SDK asks for by default).
    """

    too_large = "Ollama embeddings too large to translate"

    def __init__(self, model: str, base64: bool = False, limit: int = 64 * 1024 * 1024) -> None:
        super().__init__(limit)
        self.model = model
        self.base64 = base64

    def finish(self) -> bytes:
        try:
            obj = json.loads(b"".join(self._parts))
        except (ValueError, RecursionError):
            obj = None
        if not isinstance(obj, dict):
            obj = {}
        vectors = obj.get("embeddings")
        if not isinstance(vectors, list):
            vectors = []
        data = []
        for i, vector in enumerate(vectors):
            value: Any = vector
            if self.base64 and isinstance(vector, list):
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        prompt = int(obj.get("prompt_eval_count") or 0)
        self.usage = {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt}
        return json.dumps({"object": "list", "data": data, "model": obj.get("model", self.model),
                           "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}).encode()


def error_kind(status: int, message: str) -> tuple[str, str]:
    """The SPEC's C{error.type} and C{error.code} for an Ollama error (its status and message)."""
    if status == 404:
        code = "model_not_found" if "model" in message else "not_found"
        kind = "invalid_request_error"
    elif status == 429:
        kind, code = "rate_limit_error", "rate_limited"
    elif 400 <= status < 500:
        kind, code = "invalid_request_error", "bad_request"
    else:
        kind, code = "upstream_error", "ollama_error"
    return kind, code


class ErrorTranslator:
    """
    Turn an Ollama error answer (C{{"error": "..."}} with its status) into
    the SPEC's error shape, keeping the status.
    """

    content_type = b"application/json"

    def __init__(self, status: int, limit: int = 64 * 1024) -> None:
        self.status = status
        self._parts: list[bytes] = []
        self._size = 0
        self._limit = limit

    def feed(self, data: bytes) -> bytes:
        self._size += len(data)
        if self._size <= self._limit:
            self._parts.append(data)
        return b""

    def finish(self) -> bytes:
        raw = b"".join(self._parts)
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            obj = None
        error = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(error, dict):  # already OpenAI-shaped (an OpenAI-compatible server)
            error = error.get("message")
        if not isinstance(error, str) or not error:
            error = raw[:500].decode("utf-8", "replace").strip() or f"Ollama answered {self.status}"
        return error_body(error, *error_kind(self.status, error))
