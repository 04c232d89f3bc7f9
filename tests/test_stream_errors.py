"""An SSE response whose upstream fails mid-stream ends with one error event."""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from clawproxy.web.stream_errors import MAX_HELD, EventFramer, SSEErrors, event_end
from tests.test_gateway import Harness, basic


class Ctx:
    instance_id = "a"


class FramerTests(SynchronousTestCase):
    """Whole events pass; a partial one waits; a break ends with the error event."""

    def test_event_end(self) -> None:
        """The end of the last complete event, for each line ending."""
        self.assertEqual(event_end(b"data: 1\n\ndata: 2"), 9)
        self.assertEqual(event_end(b"data: 1\r\n\r\ndata"), 11)
        self.assertEqual(event_end(b"data: 1\r\rda"), 9)
        self.assertEqual(event_end(b"data: 1\n"), 0)

    def test_partial_events_held(self) -> None:
        """Bytes of an event not yet complete wait for the rest; order is kept."""
        f = EventFramer(Ctx())
        self.assertEqual(f.data(b"data: 1\n\ndata: "), b"data: 1\n\n")
        self.assertEqual(f.data(b"2"), b"")
        self.assertEqual(f.data(b"\n\ndata: 3\n\n"), b"data: 2\n\ndata: 3\n\n")
        self.assertEqual(f.data(b"data: 4"), b"")
        self.assertEqual(f.end("complete"), b"data: 4")

    def test_broken_drops_partial_event_and_adds_error(self) -> None:
        """At a break the partial event is dropped and one error event follows."""
        f = EventFramer(Ctx())
        f.data(b"data: 1\n\ndata: {\"choi")
        event = f.end("broken")
        self.assertTrue(event.startswith(b"data: ") and event.endswith(b"\n\n"))
        self.assertEqual(json.loads(event[6:]), {"error": {
            "message": "upstream a failed mid-stream", "type": "upstream_error",
            "code": "upstream_disconnected"}})

    def test_broken_before_any_byte(self) -> None:
        """Nothing reached the client: no event (the gateway can still answer 502)."""
        f = EventFramer(Ctx())
        f.data(b"data: {\"partial")
        self.assertEqual(f.end("broken"), b"")

    def test_stalled_and_client_gone_add_nothing(self) -> None:
        """The stall path writes its own event; a gone client gets nothing."""
        for outcome in ("stalled", "client_gone"):
            f = EventFramer(Ctx())
            f.data(b"data: 1\n\ndata: 2")
            self.assertEqual(f.end(outcome), b"")

    def test_huge_event_passes_through(self) -> None:
        """A partial event past MAX_HELD is passed on; a break then ends it first."""
        f = EventFramer(Ctx())
        big = b"data: " + b"x" * MAX_HELD
        self.assertEqual(f.data(b"data: 1\n\n" + big), b"data: 1\n\n" + big)
        self.assertTrue(f.end("broken").startswith(b"\n\ndata: {\"error\""))

    def test_only_sse_responses(self) -> None:
        """The filter takes part in text/event-stream responses only."""
        sse = SSEErrors()
        self.assertIsInstance(sse.begin(Ctx(), 200, [(b"content-type",
                                                      b"Text/Event-Stream; charset=utf-8")]),
                              EventFramer)
        self.assertIsNone(sse.begin(Ctx(), 200, [(b"content-type", b"application/json")]))
        self.assertIsNone(sse.begin(Ctx(), 200, []))


class DyingStream(Resource):
    """Sends SSE events (the last one cut in half), then drops the connection."""

    isLeaf = True

    def __init__(self, chunks: list[bytes]) -> None:
        super().__init__()
        self.chunks = chunks

    def render(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        for chunk in self.chunks:
            request.write(chunk)
        request.channel.transport.loseConnection()
        return NOT_DONE_YET


class GatewayTests(SynchronousTestCase):
    """Through the whole data plane."""

    def test_mid_stream_death_ends_with_error_event(self) -> None:
        """
        The client gets the complete events, then one error event, and the
        response ends; the access log says truncated and the metric counts it.
        """
        events = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\ndata: {"n"']
        gw = Harness(self, basic(), backend=DyingStream(events))
        answer = gw.request("POST", "/v1/chat/completions", {"stream": True})
        self.assertEqual(answer.code, 200)
        parts = answer.body.split(b"\n\n")
        self.assertEqual(parts[:2], [b'data: {"n": 1}', b'data: {"n": 2}'])
        self.assertEqual(json.loads(parts[2][6:])["error"]["code"], "upstream_disconnected")
        self.assertEqual(parts[3:], [b""])
        (line,) = gw.log_lines()
        self.assertEqual((line["status"], line["error"]), (200, "truncated"))
        self.assertEqual(gw.sample("upstream_errors_total", pool="main", instance="a",
                                   error="truncated"), 1)

    def test_non_sse_body_still_aborted(self) -> None:
        """Any other body cut short is aborted, as before."""
        from twisted.web.client import ResponseFailed

        class Cut(DyingStream):
            def render(self, request: Any) -> Any:
                request.setHeader(b"content-type", b"application/json")
                request.write(b'{"partial": ')
                request.channel.transport.loseConnection()
                return NOT_DONE_YET

        gw = Harness(self, basic(), backend=Cut([]))
        d = gw.start("GET", "/v1/x")
        body = treq.content(self.successResultOf(d))
        gw.flush()
        self.failureResultOf(body, ResponseFailed)
        self.assertEqual(gw.sample("upstream_errors_total", pool="main", instance="a",
                                   error="truncated"), 1)


class OllamaTests(SynchronousTestCase):
    """An Ollama NDJSON stream translated to SSE ends the same way when it breaks."""

    def test_translated_stream_broken_mid_way(self) -> None:
        """The translated events so far, then the error event; no partial line leaks."""

        class NDJSON(DyingStream):
            def render(self, request: Any) -> Any:
                request.setHeader(b"content-type", b"application/x-ndjson")
                for chunk in self.chunks:
                    request.write(chunk)
                request.channel.transport.loseConnection()
                return NOT_DONE_YET

        line = (b'{"model": "m", "created_at": "2026-01-01T00:00:00Z", '
                b'"message": {"role": "assistant", "content": "hi"}, "done": false}\n')
        gw = Harness(self, basic(protocol="ollama"),
                     backend=NDJSON([line, line, line[:30]]))
        answer = gw.request("POST", "/v1/chat/completions",
                            {"model": "m", "stream": True,
                             "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header("Content-Type"), "text/event-stream")
        events = [e for e in answer.body.split(b"\n\n") if e]
        payloads = [json.loads(e[6:]) for e in events]
        self.assertEqual([p.get("object") for p in payloads[:-1]],
                         ["chat.completion.chunk"] * (len(payloads) - 1))
        self.assertGreaterEqual(len(payloads), 3)
        self.assertEqual(payloads[-1]["error"]["code"], "upstream_disconnected")
