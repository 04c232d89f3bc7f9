"""
Streaming through the gateway on real sockets: chunks pass as they come, a
client that leaves cancels the upstream, a client that stops reading pauses it.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tests.integration.edge import access_lines, parsed_access_lines
from tests.integration.helpers import (
    HELLO,
    Harness,
    bounded,
    buffered,
    pool,
    response_complete,
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
        client reads the first SSE event while the backend is still
        generating, each later event as soon as the backend sends it, and
        the whole stream then arrives intact. (The simulator runs on a fake
        clock, so the test releases each of its chunks.)
        """
        h = Harness(self)
        clock = Clock()
        # Binary fractions: every tick falls exactly on a sum of advances.
        sim = h.simulator("slow", clock=clock, ttft=0.0625, tokens_per_second=8.0,
                          max_tokens=8)
        gw = await h.gateway(h.config({"sim": pool(sim)}))
        pending = h.client().post(gw.url + "/v1/chat/completions",
                                  json={**HELLO, "stream": True})
        await wait_for(lambda: sim.resource.active == 1, "the request to reach the backend")
        clock.advance(0.0625)  # the backend sends its head and first event
        response = await bounded(pending)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        self.assertEqual(response.headers.getRawHeaders("x-sim-instance"), ["slow"])
        chunks: list[bytes] = []
        done = response.collect(chunks.append)

        def events() -> int:
            return b"".join(chunks).count(b"\n\n")

        await wait_for(lambda: events() == 1, "the first event")
        # The backend is still working on this very request.
        self.assertEqual((sim.resource.active, sim.resource.requests_served), (1, 0))
        for k in range(1, 9):
            clock.advance(0.125)  # the backend sends token k
            await wait_for(lambda k=k: events() >= k + 1, f"event {k + 1}")
        await bounded(done)
        body = b"".join(chunks)
        events_ = sse_events(body)
        self.assertEqual(events_[-1], b"[DONE]")
        pieces = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in events_[:-1]]
        self.assertEqual("".join(pieces).split(), ["hello", "there"] * 4)
        self.assertEqual(sim.resource.requests_served, 1)

    async def test_client_disconnect_cancels_upstream(self) -> None:
        """
        A client that closes its connection in the middle of a stream stops
        the backend's work: the simulator drops the request (its timer for
        the next token is cancelled, while its fake clock never let the
        answer end), and the gateway counts no active upstream request either.
        """
        h = Harness(self)
        clock = Clock()
        sim = h.simulator("slow", clock=clock, ttft=0.0625, tokens_per_second=8.0,
                          max_tokens=32)
        gw = await h.gateway(h.config({"sim": pool(sim)}))
        client = await h.raw(gw.port, stream_request(gw.port, {**HELLO, "stream": True}))
        await wait_for(lambda: sim.resource.active == 1, "the request to reach the backend")
        clock.advance(0.0625)
        await client.when(lambda data: b"data: " in data)
        self.assertEqual(sim.resource.active, 1)
        self.assertEqual(gw.instance("slow").active, 1)
        self.assertEqual(len(clock.getDelayedCalls()), 1)  # the next token
        client.transport.abortConnection()
        await wait_for(lambda: sim.resource.active == 0, "the simulator to drop the request")
        await wait_for(lambda: gw.instance("slow").active == 0, "the gateway to forget it")
        self.assertEqual(clock.getDelayedCalls(), [])
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
        await wait_for(lambda: first.resource.sim.active == 0, "the upstream request to end")
        # The access-log line is written once the gateway is done with the
        # request: any resend would have been made by then.
        await wait_for(lambda: access_lines(gw), "the access-log line")
        (line,) = parsed_access_lines(gw)
        self.assertEqual((line["status"], line["instance"], line["attempts"]),
                         (499, "first", 1))
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
        (upstream,) = [t for t in h.tracker.open() if t.getPeer().port == sim.number]
        # The gateway stops reading from the backend (its transport leaves
        # the reactor's readers) once the client's side is full.
        await wait_for(lambda: upstream not in reactor.getReaders(),
                       "the gateway to pause its upstream read")
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
