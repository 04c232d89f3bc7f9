"""
CPU cost of token accounting and of the Ollama translation per stream, in
process (less sensitive to a shared machine than end-to-end TTFB).

    PYTHONPATH=. python3 bench/tokens_micro.py [--tokens 24] [--repeat 2000]

A stream is what the simulator sends for a 24-token answer, one read per
event: OpenAI SSE (role chunk, tokens, finish chunk, usage chunk, [DONE]) or
Ollama NDJSON (token lines, done line). Printed: microseconds per stream and
per event for each path, best of 5.
"""

from __future__ import annotations

import argparse
import json
import timeit

from clawproxy.policy.ollama import StreamTranslator
from clawproxy.policy.usage import SseUsage, estimate_prompt

HEAD = {"id": "chatcmpl-sim-1", "object": "chat.completion.chunk", "created": 0,
        "model": "sim-stream"}


def sse(tokens: int, usage: bool) -> list[bytes]:
    def ev(obj: object) -> bytes:
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    out = [ev({**HEAD, "choices": [{"index": 0, "finish_reason": None,
                                    "delta": {"role": "assistant", "content": ""}}]})]
    out += [ev({**HEAD, "choices": [{"index": 0, "finish_reason": None,
                                     "delta": {"content": " tok"}}]}) for _ in range(tokens)]
    out.append(ev({**HEAD, "choices": [{"index": 0, "finish_reason": "stop", "delta": {}}]}))
    if usage:
        out.append(ev({**HEAD, "choices": [], "usage": {
            "prompt_tokens": 2, "completion_tokens": tokens, "total_tokens": tokens + 2}}))
    out.append(b"data: [DONE]\n\n")
    return out


def ndjson(tokens: int) -> list[bytes]:
    lines = [json.dumps({"model": "sim-stream", "created_at": "2026-12-04T00:00:00Z",
                         "message": {"role": "assistant", "content": " tok"},
                         "done": False}).encode() + b"\n" for _ in range(tokens)]
    lines.append(json.dumps({"model": "sim-stream", "created_at": "2026-12-04T00:00:00Z",
                             "message": {"role": "assistant", "content": ""}, "done": True,
                             "done_reason": "stop", "prompt_eval_count": 2,
                             "eval_count": tokens}).encode() + b"\n")
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--repeat", type=int, default=2000)
    a = p.parse_args()
    plain = sse(a.tokens, usage=False)
    asked = sse(a.tokens, usage=True)
    lines = ndjson(a.tokens)
    request = (b'{"model":"sim-stream","stream":true,"max_tokens":24,'
               b'"messages":[{"role":"user","content":"stream please"}]}')

    def passthrough() -> None:
        for e in plain:
            e[:0]  # touch each chunk, as the relay's write does not copy it

    def observe() -> None:
        w = SseUsage()
        for e in asked:
            w.feed(e)
        w.finish()

    def drop() -> None:
        w = SseUsage(drop=True)
        for e in asked:
            w.feed(e)
        w.finish()

    def translate() -> None:
        t = StreamTranslator("sim-stream", "chatcmpl-x")
        for line in lines:
            t.feed(line)
        t.finish()

    def stage() -> None:
        body = json.loads(request)
        body = dict(body, stream_options={"include_usage": True})
        json.dumps(body, separators=(",", ":")).encode()
        estimate_prompt(body)

    rows = [("pass-through (no filter)", passthrough, len(plain)),
            ("accounting, client asked include_usage (observe)", observe, len(asked)),
            ("accounting, usage asked for and dropped", drop, len(asked)),
            ("Ollama translation (NDJSON -> SSE)", translate, len(lines)),
            ("request side: parse + add include_usage + re-serialise + estimate", stage, 1)]
    print(f"{a.tokens}-token stream, best of 5 x {a.repeat}")
    for name, fn, events in rows:
        best = min(timeit.repeat(fn, number=a.repeat, repeat=5)) / a.repeat
        print(f"  {name:66s} {best * 1e6:8.1f} us/stream {best * 1e6 / events:6.2f} us/event")


if __name__ == "__main__":
    main()
