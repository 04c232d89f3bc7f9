"""
The OpenAI <-> Ollama translation against payloads written by hand from the
public API references (tests/data/translation/README.md), plus the same
translation through the data plane (status, content type, body).
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from clawproxy.errors import Rejected
from clawproxy.policy.ollama import (
    CompletionCollector,
    EmbedCollector,
    ErrorTranslator,
    StreamTranslator,
    chat_request,
    embed_request,
    generate_request,
)
from tests.test_gateway import Harness

DATA = os.path.join(os.path.dirname(__file__), "data", "translation")


def cases(suffix: str) -> list[tuple[str, Any]]:
    names = sorted(n for n in os.listdir(DATA) if n.endswith(suffix))
    assert names, suffix
    out = []
    for name in names:
        with open(os.path.join(DATA, name)) as f:
            out.append((name, json.load(f)))
    return out


def without_ids(obj: Any) -> Any:
    """C{obj} without the fields the gateway makes up (C{id}, C{created})."""
    if isinstance(obj, dict):
        return {k: v for k, v in obj.items() if k not in ("id", "created")}
    return obj


def sse_payloads(body: bytes) -> list[Any]:
    out: list[Any] = []
    for block in body.split(b"\n\n"):
        if block.startswith(b"data: "):
            raw = block[6:]
            out.append("[DONE]" if raw == b"[DONE]" else without_ids(json.loads(raw)))
    return out


def ndjson(lines: list[Any]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


class PayloadTests(SynchronousTestCase):
    def test_requests(self) -> None:
        build = {"chat": chat_request, "completion": generate_request,
                 "embedding": embed_request}
        for name, case in cases(".request.json"):
            body = case["openai"]
            translate = build[case.get("kind", "chat")]
            self.assertEqual(translate(body, body["model"]), case["ollama"], name)

    def test_answers(self) -> None:
        for name, case in cases(".answer.json"):
            kind = case.get("kind", "chat")
            model = case["ollama"]["model"]
            collector: Any = EmbedCollector(model) if kind == "embedding" else (
                CompletionCollector(model, "chatcmpl-x", text=kind == "completion"))
            raw = json.dumps(case["ollama"]).encode()
            self.assertEqual(collector.feed(raw[:7]) + collector.feed(raw[7:]), b"")
            self.assertEqual(without_ids(json.loads(collector.finish())), case["openai"], name)

    def test_streams(self) -> None:
        for name, case in cases(".stream.json"):
            t = StreamTranslator("llama3.2", "chatcmpl-x", case["include_usage"],
                                 text=case.get("kind") == "completion")
            raw = ndjson(case["ollama"])
            # Read in uneven pieces: lines split across reads translate the same.
            out = b"".join(t.feed(raw[i:i + 37]) for i in range(0, len(raw), 37)) + t.finish()
            got = [p if p == "[DONE]" or "error" in p else dict(p, model="llama3.2")
                   for p in sse_payloads(out)]
            want = [p if p == "[DONE]" or "error" in p else dict(p, model="llama3.2")
                    for p in case["openai"]]
            self.assertEqual(got, want, name)

    def test_errors(self) -> None:
        for name, case in cases(".error.json"):
            t = ErrorTranslator(case["status"])
            t.feed(json.dumps(case["ollama"]).encode())
            self.assertEqual(json.loads(t.finish()), case["openai"], name)


class RefusedRequestTests(SynchronousTestCase):
    """What Ollama cannot be asked is refused with a 400, not dropped silently."""

    def check(self, body: dict[str, Any], code: str) -> None:
        with self.assertRaises(Rejected) as caught:
            chat_request(body, "m")
        self.assertEqual((caught.exception.status, caught.exception.code), (400, code))

    def test_image_by_url(self) -> None:
        self.check({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
            "unsupported_image_url")

    def test_unknown_part(self) -> None:
        self.check({"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]}]},
            "invalid_content")

    def test_bad_arguments(self) -> None:
        self.check({"messages": [{"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}]}]},
            "invalid_tool_call")

    def test_unknown_tool_choice(self) -> None:
        self.check({"messages": [], "tools": [{"type": "function", "function": {"name": "a"}}],
                    "tool_choice": {"type": "function", "function": {"name": "b"}}},
                   "invalid_tool_choice")


def ollama_harness(case: SynchronousTestCase, status: int, body: bytes,
                   content_type: bytes = b"application/json") -> Harness:
    gw = Harness(case, {
        "pools": {"o": {"instances": [{"id": "a", "url": "http://a.test:8000"}],
                        "protocol": "ollama", "health_check": {"enabled": False}}},
        "routes": [{"path": "/*", "pool": "o"}]})
    gw.backend.status["a"] = status
    gw.backend.body["a"] = body
    gw.backend.headers["a"] = [(b"content-type", content_type)]
    return gw


class ThroughGatewayTests(SynchronousTestCase):
    """The payloads through the data plane: what an OpenAI client receives."""

    def test_request_sent(self) -> None:
        case = dict(cases(".request.json"))["tools.request.json"]
        answer = dict(cases(".answer.json"))["chat.answer.json"]
        gw = ollama_harness(self, 200, json.dumps(answer["ollama"]).encode())
        gw.request("POST", "/v1/chat/completions", case["openai"])
        (seen,) = gw.backend.seen
        self.assertEqual(seen.uri, b"/api/chat")
        self.assertEqual(json.loads(seen.body), case["ollama"])

    def test_tool_call_answer(self) -> None:
        case = dict(cases(".answer.json"))["tool_calls.answer.json"]
        gw = ollama_harness(self, 200, json.dumps(case["ollama"]).encode())
        answer = gw.request("POST", "/v1/chat/completions",
                            {"model": "llama3.2", "messages": [{"role": "user", "content": "?"}]})
        self.assertEqual(answer.code, 200)
        self.assertEqual(without_ids(answer.json()), case["openai"])

    def test_stream(self) -> None:
        case = dict(cases(".stream.json"))["tool_calls.stream.json"]
        gw = ollama_harness(self, 200, ndjson(case["ollama"]), b"application/x-ndjson")
        answer = gw.request("POST", "/v1/chat/completions", {
            "model": "llama3.2", "stream": True, "messages": [{"role": "user", "content": "?"}]})
        self.assertEqual(answer.header("content-type"), "text/event-stream")
        self.assertEqual(sse_payloads(answer.body), [
            p if p == "[DONE]" else dict(p, model="llama3.2") for p in case["openai"]])

    def test_errors(self) -> None:
        """Ollama's errors keep their status and come in the SPEC's error shape."""
        for name, case in cases(".error.json"):
            gw = ollama_harness(self, case["status"], json.dumps(case["ollama"]).encode())
            answer = gw.request("POST", "/v1/chat/completions", {
                "model": "llama3.3", "messages": [{"role": "user", "content": "?"}]})
            self.assertEqual(answer.code, case["status"], name)
            self.assertEqual(answer.json(), case["openai"], name)

    def test_refused_not_sent(self) -> None:
        gw = ollama_harness(self, 200, b"{}")
        answer = gw.request("POST", "/v1/chat/completions", {"model": "m", "messages": [
            {"role": "user", "content": [{"type": "image_url",
                                          "image_url": {"url": "https://x.test/a.png"}}]}]})
        self.assertEqual(answer.code, 400)
        self.assertEqual(answer.json()["error"]["code"], "unsupported_image_url")
        self.assertEqual(gw.backend.seen, [])


class MoreEndpointTests(SynchronousTestCase):
    def test_embeddings_base64(self) -> None:
        """C{encoding_format: base64} (the openai SDK's default): little-endian float32."""
        import base64
        import struct
        collector = EmbedCollector("m", base64=True)
        collector.feed(json.dumps({"embeddings": [[0.5, -1.0]], "prompt_eval_count": 2}).encode())
        vector = json.loads(collector.finish())["data"][0]["embedding"]
        self.assertEqual(struct.unpack("<2f", base64.b64decode(vector)), (0.5, -1.0))

    def test_refused(self) -> None:
        for build, body, code in (
                (generate_request, {"prompt": ["a", "b"]}, "unsupported_prompt"),
                (generate_request, {"prompt": [1, 2]}, "unsupported_prompt"),
                (generate_request, {"prompt": "a", "n": 2}, "unsupported_n"),
                (embed_request, {"input": [[1, 2, 3]]}, "unsupported_input")):
            with self.assertRaises(Rejected) as caught:
                build(body, "m")
            self.assertEqual(caught.exception.code, code)

    def test_through_gateway(self) -> None:
        """On an Ollama pool: /v1/completions to /api/generate, /v1/embeddings to /api/embed."""
        answers = dict(cases(".answer.json"))
        for path, upstream, answer in (
                ("/v1/completions", b"/api/generate", answers["completion.answer.json"]),
                ("/v1/embeddings", b"/api/embed", answers["embedding.answer.json"])):
            gw = ollama_harness(self, 200, json.dumps(answer["ollama"]).encode())
            got = gw.request("POST", path, {"model": "m", "prompt": "hi", "input": "hi"})
            self.assertEqual(gw.backend.seen[0].uri, upstream)
            self.assertEqual(without_ids(got.json()), answer["openai"])
