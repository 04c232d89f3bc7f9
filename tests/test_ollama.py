"""Tests for L{clawproxy.policy.ollama} and L{clawproxy.web.translate}."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from clawproxy.config import parse_config
from clawproxy.policy.ollama import (
    CompletionCollector,
    StreamTranslator,
    chat_request,
)
from clawproxy.web.translate import OllamaChat, Rewrite, rewrite_for


def _events(sse: bytes) -> list[object]:
    out: list[object] = []
    for block in sse.split(b"\n\n"):
        if block.startswith(b"data: "):
            payload = block[6:]
            out.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return out


class ChatRequestTests(SynchronousTestCase):
    def test_options_mapped(self) -> None:
        """OpenAI sampling fields become Ollama options; max_tokens is num_predict."""
        body = {"model": "fast", "messages": [{"role": "user", "content": "hi"}],
                "temperature": 0.2, "max_tokens": 7, "stop": ["x"], "stream": True}
        out = chat_request(body, "qwen3:8b")
        self.assertEqual(out["model"], "qwen3:8b")
        self.assertEqual(out["messages"], body["messages"])
        self.assertTrue(out["stream"])
        self.assertEqual(out["options"], {"temperature": 0.2, "stop": ["x"], "num_predict": 7})

    def test_stream_defaults_off(self) -> None:
        """OpenAI's default is not to stream, unlike Ollama's: it is sent explicitly."""
        self.assertIs(chat_request({"messages": []}, "m")["stream"], False)


class StreamTranslatorTests(SynchronousTestCase):
    def test_lines_split_across_reads(self) -> None:
        """NDJSON lines become SSE chunks as soon as each line is whole."""
        t = StreamTranslator("m", "chatcmpl-1")
        first = json.dumps({"message": {"role": "assistant", "content": "Hel"}, "done": False})
        self.assertEqual(t.feed(first[:10].encode()), b"")
        events = _events(t.feed(first[10:].encode() + b"\n"))
        self.assertEqual(events[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        self.assertEqual(events[1]["choices"][0]["delta"], {"content": "Hel"})
        last = {"message": {"content": "lo"}, "done": True, "done_reason": "length",
                "prompt_eval_count": 3, "eval_count": 2}
        events = _events(t.feed(json.dumps(last).encode() + b"\n"))
        self.assertEqual(events[0]["choices"][0]["delta"], {"content": "lo"})
        self.assertEqual(events[1]["choices"][0]["finish_reason"], "length")
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual(t.finish(), b"")

    def test_usage_when_asked(self) -> None:
        """With stream_options.include_usage a last chunk carries token counts."""
        t = StreamTranslator("m", "c", include_usage=True)
        line = {"message": {"content": ""}, "done": True, "prompt_eval_count": 3,
                "eval_count": 4}
        events = _events(t.feed(json.dumps(line).encode() + b"\n"))
        self.assertEqual(events[-2]["usage"],
                         {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
        # As OpenAI sends it: in a chunk of its own, after the finish chunk.
        self.assertEqual(events[-2]["choices"], [])
        self.assertEqual(events[-3]["choices"][0]["finish_reason"], "stop")
        self.assertNotIn("usage", events[-3])

    def test_unterminated_stream_still_ends(self) -> None:
        """A stream that ends without done=true still ends with [DONE]."""
        t = StreamTranslator("m", "c")
        t.feed(b'{"message": {"content": "a"}, "done": false}')
        events = _events(t.finish())
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual(events[-2]["choices"][0]["delta"], {"content": "a"})

    def test_error_line(self) -> None:
        """An Ollama error line becomes an SSE error event in the OpenAI shape."""
        t = StreamTranslator("m", "c")
        events = _events(t.feed(b'{"error": "model not loaded"}\n'))
        self.assertEqual(events[0]["error"]["message"], "model not loaded")


class CompletionCollectorTests(SynchronousTestCase):
    def test_single_object(self) -> None:
        """A non-streamed Ollama answer becomes a chat.completion with usage."""
        c = CompletionCollector("m", "chatcmpl-9")
        obj = {"model": "qwen3:8b", "message": {"role": "assistant", "content": "hey"},
               "done": True, "done_reason": "stop", "prompt_eval_count": 1, "eval_count": 2}
        raw = json.dumps(obj).encode()
        self.assertEqual(c.feed(raw[:5]) + c.feed(raw[5:]), b"")
        out = json.loads(c.finish())
        self.assertEqual(out["object"], "chat.completion")
        self.assertEqual(out["id"], "chatcmpl-9")
        self.assertEqual(out["choices"][0]["message"]["content"], "hey")
        self.assertEqual(out["usage"]["total_tokens"], 3)

    def test_ndjson_merged(self) -> None:
        """If Ollama streams anyway, the lines are merged into one completion."""
        c = CompletionCollector("m", "c")
        c.feed(b'{"message": {"content": "a"}, "done": false}\n'
               b'{"message": {"content": "b"}, "done": true, "eval_count": 2}\n')
        out = json.loads(c.finish())
        self.assertEqual(out["choices"][0]["message"]["content"], "ab")

    def test_limit(self) -> None:
        """An answer over the limit is refused rather than held in memory."""
        c = CompletionCollector("m", "c", limit=10)
        self.assertRaises(ValueError, c.feed, b"x" * 11)


def _pool(protocol: str):
    from twisted.internet.task import Clock

    from clawproxy.backends.registry import Registry

    cfg = parse_config({
        "pools": {"p": {"protocol": protocol, "models": ["qwen3:*"],
                        "instances": [{"id": "a", "url": "http://127.0.0.1:1"}]}},
        "routes": [{"path": "/v1/chat/completions"}],
    }, environ={})
    return Registry(cfg, Clock()).pools["p"]


class RewriteForTests(SynchronousTestCase):
    def test_ollama_pool(self) -> None:
        """Chat completions to an ollama pool go to /api/chat with the resolved model."""
        rw = rewrite_for(_pool("ollama"), b"/v1/chat/completions", b"POST",
                         {"model": "fast", "messages": []}, "qwen3:8b", "rid")
        self.assertIsInstance(rw, OllamaChat)
        self.assertEqual(rw.path, b"/api/chat")
        self.assertEqual(json.loads(rw.body)["model"], "qwen3:8b")

    def test_alias_on_openai_pool(self) -> None:
        """An alias is replaced by its model in the body sent to an OpenAI pool."""
        rw = rewrite_for(_pool("openai"), b"/v1/chat/completions", b"POST",
                         {"model": "fast", "messages": []}, "qwen3:8b", "rid")
        self.assertIsInstance(rw, Rewrite)
        self.assertIsNone(rw.path)
        self.assertEqual(json.loads(rw.body)["model"], "qwen3:8b")
        self.assertIsNone(rw.response())

    def test_nothing_to_change(self) -> None:
        """The client's body is sent unchanged when no alias or translation applies."""
        self.assertIsNone(rewrite_for(_pool("openai"), b"/v1/chat/completions", b"POST",
                                      {"model": "qwen3:8b"}, "qwen3:8b", "rid"))
        self.assertIsNone(rewrite_for(_pool("ollama"), b"/api/chat", b"POST", None, None, "r"))
