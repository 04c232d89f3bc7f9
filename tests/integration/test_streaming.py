"""
Streaming through the gateway on real sockets: chunks pass as they come, a
client that leaves cancels the upstream, a client that stops reading pauses it.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tests.integration.helpers import (
    HELLO,
    Harness,
    bounded,
    buffered,
    pool,
    response_complete,
    tick,
    wait_for,
)


def stream_request(port: int, body: dict[str, Any], close: bool = True) -> bytes:
    data = json.dumps(body).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        b"%sContent-Length: %d\r\n\r\n%s"
        % (port, b"Connection: close\r\n" if close else b"", len(data), data)
    )


def sse_events(body: bytes) -> list[bytes]:
    """The C{data:} payloads of an SSE body."""
    return [
        line[len(b"data: "):]
        for line in body.split(b"\n")
        if line.startswith(b"data: ")
    ]


class StreamingTests(TestCase):
    timeout = 60

    async def test_first_chunk_before_backend_finishes(self) -> None:
        """
        A C{"stream": true} chat request is relayed chunk by chunk: the
        client reads its first SSE event while the backend is still
        generating (1s of tokens), and the whole stream then arrives intact.
        """
        h = Harness(self)
        sim = h.simulator("slow", ttft=0.05, tokens_per_second=10.0, max_tokens=10)
        gw = await h.gateway(h.config({"sim": pool(sim)}))
        client = h.client()
        started = reactor.seconds()
        response = await bounded(client.post(
            gw.url + "/v1/chat/completions", json={**HELLO, "stream": True}
        ))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        self.assertEqual(response.headers.getRawHeaders("x-sim-instance"), ["slow"])
        chunks: list[tuple[float, bytes, int]] = []

        def got(data: bytes) -> None:
            chunks.append((reactor.seconds(), data, sim.resource.active))

        await bounded(response.collect(got), 10)
        finished = reactor.seconds()
        first_at, first, active_then = chunks[0]
        self.assertIn(b"data: ", first)
        # The backend was still working on this very request when the first
        # chunk reached the client...
        self.assertEqual(active_then, 1)
        # ...which was long before the whole answer was done (10 tokens at 10/s).
        self.assertLess(first_at - started, 0.5)
        self.assertGreater(finished - started, 0.9)
        self.assertGreater(len(chunks), 5)
        body = b"".join(c for _, c, _ in chunks)
        events = sse_events(body)
        self.assertEqual(events[-1], b"[DONE]")
        pieces = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]]
        self.assertEqual("".join(pieces).split(), ["hello", "there"] * 5)
        self.assertEqual(sim.resource.requests_served, 1)

    async def test_client_disconnect_cancels_upstream(self) -> None:
        """
        A client that closes its connection in the middle of a stream stops
        the backend's work at once: the simulator has no active request left
        long before its 4s answer would have ended, and the gateway counts no
        active upstream request either.
        """
        h = Harness(self)
        sim = h.simulator("slow", ttft=0.02, tokens_per_second=10.0, max_tokens=40)
        gw = await h.gateway(h.config({"sim": pool(sim)}))
        client = await h.raw(gw.port, stream_request(gw.port, {**HELLO, "stream": True}))
        await client.when(lambda data: b"data: " in data)
        self.assertEqual(sim.resource.active, 1)
        self.assertEqual(gw.instance("slow").active, 1)
        left = reactor.seconds()
        client.transport.abortConnection()
        await wait_for(lambda: sim.resource.active == 0, "the simulator to drop the request",
                       timeout=2.0)
        self.assertLess(reactor.seconds() - left, 2.0)
        await wait_for(lambda: gw.instance("slow").active == 0, "the gateway to forget it",
                       timeout=2.0)
        self.assertEqual(sim.resource.requests_served, 0)

    async def test_client_disconnect_before_answer_is_not_retried(self) -> None:
        """
        A client that gives up before any answer arrives (the backend is
        still thinking) cancels that upstream request, and the gateway does
        not resend it to another instance on the departed client's behalf.
        """
        h = Harness(self)
        first = h.simulator("first", front=True, hang_rate=1.0)
        second = h.simulator("second", front=True)
        retry = {"retry_on": ["5xx", "connect_failure", "refused"], "base_delay": 0}
        gw = await h.gateway(h.config({"sim": pool(first, second, retry=retry)}))
        client = await h.raw(gw.port, stream_request(gw.port, {**HELLO, "stream": True}))
        await wait_for(lambda: first.resource.sim.active == 1, "the request to reach a backend")
        client.transport.abortConnection()
        await wait_for(lambda: first.resource.sim.active == 0, "the upstream request to end",
                       timeout=2.0)
        # A resend would reach the second instance within a few reactor turns.
        for _ in range(20):
            await tick(0.01)
        self.assertEqual(second.resource.received, [])
        self.assertEqual(gw.instance("first").active, 0)
        self.assertEqual(gw.instance("second").active, 0)
        # Nor does the client's leaving count against the instance.
        self.assertEqual(gw.instance("first").failures, 0)

    async def test_slow_client_pauses_upstream(self) -> None:
        """
        A client that stops reading a ~20MB stream does not make the gateway
        buffer it: while the client reads nothing, the gateway holds well
        under 1MB for it (the rest waits upstream), and once the client reads
        again the whole stream arrives, ending with C{[DONE]}.
        """
        h = Harness(self)
        # ~2KB per event, 10000 events, generated as fast as the reactor turns.
        sim = h.simulator("big", ttft=0.0, tokens_per_second=1e6, max_tokens=10000)
        gw = await h.gateway(h.config({"sim": pool(sim)}))
        word = "x" * 2000
        body = {"model": "sim-small", "stream": True,
                "messages": [{"role": "user", "content": word}]}
        client = await h.raw(gw.port, stream_request(gw.port, body))
        await client.when(lambda data: b"data: " in data)
        client.transport.pauseProducing()
        # The simulator writes its whole answer regardless of its reader (it
        # has no flow control of its own): wait until it has.
        await wait_for(lambda: sim.resource.requests_served == 1, "the simulator to finish",
                       timeout=30)
        gateway_side = [t for t in h.tracker.open()
                        if t.getHost().port == gw.port]
        self.assertEqual(len(gateway_side), 1)
        # Let the reactor settle: the gateway would keep reading upstream now
        # if it were not paused.
        for _ in range(20):
            await tick(0.005)
        held = buffered(gateway_side[0])
        sim_side = [t for t in sim.open_transports()]
        backlog = sum(buffered(t) for t in sim_side)
        self.assertLess(held, 1024 * 1024)
        # Most of the answer has not left the backend yet: the gateway stopped
        # reading it (the kernel's socket buffers hold at most a few MB).
        self.assertGreater(backlog, 5 * 1024 * 1024)
        client.transport.resumeProducing()
        raw = await bounded(client.closed, 30)
        self.assertTrue(response_complete(raw))
        self.assertIn(b"data: [DONE]\n\n", raw[-200:])
        self.assertGreater(len(raw), 20 * 1024 * 1024)


class _Mute(Resource):
    """A backend that starts an SSE answer and then never sends a chunk."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def render(self, request: Any) -> Any:
        self.requests += 1
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"")  # headers out, no body
        return NOT_DONE_YET


class FirstTokenTimeoutTests(TestCase):
    timeout = 30

    async def test_stream_without_first_chunk_fails_over(self) -> None:
        """
        With C{first_token_timeout}, a stream whose headers came but whose
        first chunk does not is given up before anything reaches the client,
        and the request is served, in full, by another instance.
        """
        h = Harness(self)
        mute = _Mute()
        silent = h.serve(mute, id="mute")
        live = h.simulator("live")
        gw = await h.gateway(h.config({"sim": pool(
            silent, live, algorithm="round_robin", first_token_timeout="300ms",
        )}))
        response = await bounded(h.client().post(
            gw.url + "/v1/chat/completions", json={**HELLO, "stream": True}))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("x-sim-instance"), ["live"])
        body = await bounded(response.content())
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"), body[-60:])
        self.assertEqual(mute.requests, 1)
