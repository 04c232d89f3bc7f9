"""Token usage read from answers, and estimated (clawproxy.policy.usage)."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from clawproxy.policy.usage import (
    JsonUsage,
    NdjsonUsage,
    SseUsage,
    Usage,
    estimate_prompt,
    max_completion,
    usage_of,
)


def event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def chunk(content: str | None = None, usage_null: bool = False, finish: str | None = None
          ) -> bytes:
    obj: dict[str, object] = {"id": "c1", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {} if content is None else {"content": content},
         "finish_reason": finish}]}
    if usage_null:
        obj["usage"] = None
    return event(obj)


USAGE = event({"id": "c1", "object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})
DONE = b"data: [DONE]\n\n"


class UsageOfTests(SynchronousTestCase):
    def test_openai(self) -> None:
        self.assertEqual(usage_of({"usage": {"prompt_tokens": 3, "completion_tokens": 5}}),
                         Usage(3, 5))
        # Embeddings report no completion tokens.
        self.assertEqual(usage_of({"usage": {"prompt_tokens": 7, "total_tokens": 7}}),
                         Usage(7, 0))

    def test_ollama(self) -> None:
        self.assertEqual(usage_of({"done": True, "prompt_eval_count": 26, "eval_count": 290}),
                         Usage(26, 290))

    def test_none(self) -> None:
        for obj in ({}, {"usage": None}, {"usage": {"prompt_tokens": "x"}}, [], "x", None):
            self.assertIsNone(usage_of(obj))


class EstimateTests(SynchronousTestCase):
    def test_prompt(self) -> None:
        """Characters / 4, rounded up, plus 4 per message."""
        body = {"messages": [{"role": "system", "content": "x" * 10},
                             {"role": "user", "content": [{"type": "text", "text": "y" * 6},
                                                          {"type": "image_url"}]}]}
        self.assertEqual(estimate_prompt(body), 8 + 4)
        self.assertEqual(estimate_prompt({"prompt": "abcde"}), 2)
        self.assertEqual(estimate_prompt({"input": ["abcd", "efgh"]}), 2)

    def test_max_completion(self) -> None:
        self.assertEqual(max_completion({"max_tokens": 50}), 50)
        self.assertEqual(max_completion({"max_completion_tokens": 20, "max_tokens": 50}), 20)
        self.assertEqual(max_completion({"options": {"num_predict": 9}}), 9)
        self.assertIsNone(max_completion({"max_tokens": True}))
        self.assertIsNone(max_completion({}))


class SseObserveTests(SynchronousTestCase):
    """The client asked for usage itself: every byte passes, usage is read at the end."""

    def test_usage_chunk_read(self) -> None:
        w = SseUsage()
        body = chunk("hi", True) + chunk(None, True, "stop") + USAGE + DONE
        out = b"".join(w.feed(body[i:i + 7]) for i in range(0, len(body), 7))
        self.assertEqual(out + w.finish(), body)
        self.assertEqual(w.usage, Usage(12, 3))

    def test_no_usage(self) -> None:
        w = SseUsage()
        w.feed(chunk("a") + chunk("b") + chunk(None, finish="stop") + DONE)
        w.finish()
        self.assertIsNone(w.usage)
        self.assertEqual(w.events, 4)


class SseDropTests(SynchronousTestCase):
    """The gateway asked for usage: the client sees the stream it would have without it."""

    def test_dropped_whole(self) -> None:
        w = SseUsage(drop=True)
        out = b"".join(w.feed(c) for c in (chunk("hi"), chunk(None, finish="stop"), USAGE, DONE))
        self.assertEqual(out + w.finish(), chunk("hi") + chunk(None, finish="stop") + DONE)
        self.assertEqual(w.usage, Usage(12, 3))

    def test_dropped_split_anywhere(self) -> None:
        """Split at every byte offset, the output is the same."""
        body = chunk("hi", True) + chunk(None, True, "stop") + USAGE + DONE
        want = chunk("hi") + chunk(None, finish="stop") + DONE
        for cut in range(1, len(body)):
            w = SseUsage(drop=True)
            out = w.feed(body[:cut]) + w.feed(body[cut:]) + w.finish()
            self.assertEqual(out, want, cut)
            self.assertEqual(w.usage, Usage(12, 3))

    def test_crlf_framing(self) -> None:
        """Events separated by CRLF CRLF are framed and dropped the same way."""
        def crlf(b: bytes) -> bytes:
            return b.replace(b"\n\n", b"\r\n\r\n")
        body = crlf(chunk("hi") + USAGE + DONE)
        for cut in range(1, len(body)):
            w = SseUsage(drop=True)
            out = w.feed(body[:cut]) + w.feed(body[cut:]) + w.finish()
            self.assertEqual(out, crlf(chunk("hi") + DONE), cut)
            self.assertEqual(w.usage, Usage(12, 3))

    def test_whole_events_pass_at_once(self) -> None:
        """A read that ends on an event boundary is passed on whole, at once."""
        w = SseUsage(drop=True)
        self.assertEqual(w.feed(chunk("a") + chunk("b")), chunk("a") + chunk("b"))
        self.assertEqual(w.feed(b"data: {\"x"), b"")
        self.assertEqual(w.feed(b"\":1}\n\n"), b"data: {\"x\":1}\n\n")

    def test_content_mentioning_usage_kept(self) -> None:
        """A token that says "usage" is not a usage chunk."""
        w = SseUsage(drop=True)
        body = chunk('"usage"') + DONE
        self.assertEqual(w.feed(body) + w.finish(), body)


class NdjsonTests(SynchronousTestCase):
    def test_done_line(self) -> None:
        w = NdjsonUsage()
        lines = [json.dumps({"message": {"content": "a"}, "done": False}).encode() + b"\n",
                 json.dumps({"done": True, "prompt_eval_count": 4, "eval_count": 1}).encode()
                 + b"\n"]
        self.assertEqual(b"".join(w.feed(x) for x in lines), b"".join(lines))
        w.finish()
        self.assertEqual(w.usage, Usage(4, 1))


class JsonTests(SynchronousTestCase):
    def test_openai(self) -> None:
        w = JsonUsage()
        body = json.dumps({"choices": [{"message": {"content": "hello"}}],
                           "usage": {"prompt_tokens": 2, "completion_tokens": 1}}).encode()
        w.feed(body[:10])
        w.feed(body[10:])
        w.finish()
        self.assertEqual(w.usage, Usage(2, 1))

    def test_estimated_chars(self) -> None:
        w = JsonUsage()
        w.feed(json.dumps({"choices": [{"message": {"content": "x" * 9}}]}).encode())
        w.finish()
        self.assertIsNone(w.usage)
        self.assertEqual(w.chars, 9)

    def test_too_large(self) -> None:
        w = JsonUsage(limit=10)
        w.feed(b"x" * 11)
        w.finish()
        self.assertEqual((w.usage, w.chars), (None, 11))
