"""
The data plane's seams, each exercised through a small test-only part:
request stages in every phase (answer, refuse, hold, cancelled when the client
leaves), head checks, and response filters (observe a stream's last chunk,
append an SSE event, rewrite).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers
from zope.interface import implementer

from clawproxy.errors import Rejected
from clawproxy.interfaces import (
    CANCELLED,
    OK,
    IAttemptObserver,
    IBodyFilter,
    IHeadCheck,
    IRequestStage,
    IResponseFilter,
    IResponseObserver,
)
from clawproxy.web.context import LocalResponse, RequestContext
from clawproxy.web.dataplane import Parts
from clawproxy.web.pipe import StreamPipe
from tests.test_availability import TrialBreakers
from tests.test_gateway import Harness, basic
from tests.test_relay import FakeRequest, context

SSE = [(b"content-type", b"text/event-stream")]


@implementer(IRequestStage)
class Stage:
    """
    A stage of C{phase} that records what it saw, then does C{action}:
    C{"go"} (go on), C{"answer"}, C{"refuse"} or C{"hold"}.
    """

    name = "test"

    def __init__(self, phase: str, action: str = "go") -> None:
        self.phase = phase
        self.action = action
        self.seen: list[tuple[str, str, str | None, Any]] = []
        self.held: list[Deferred[Any]] = []
        self.cancelled = 0

    def process(self, ctx: RequestContext) -> Any:
        self.seen.append((ctx.route_name, ctx.pool_name, ctx.model, ctx.body))
        if self.action == "answer":
            return LocalResponse(200, json.dumps({"answered_in": self.phase}).encode())
        if self.action == "refuse":
            raise Rejected(429, f"refused in {self.phase}", "rate_limit_error",
                           "rate_limited", (("Retry-After", "7"),))
        if self.action == "hold":
            def cancel(d: Deferred[Any]) -> None:
                self.cancelled += 1

            d: Deferred[Any] = Deferred(cancel)
            self.held.append(d)
            return d
        if self.action == "async-go":
            return succeed(None)
        return None


def routed(**pool: Any) -> dict[str, Any]:
    """Pool C{main} served for model C{m} (and alias C{fast}) by the route C{/v1/*}."""
    config = basic(**pool)
    config["pools"]["main"]["models"] = ["m"]
    config["models"] = {"aliases": {"fast": "m"}}
    config["routes"] = [{"path": "/v1/*"}]
    return config


class PhaseTests(SynchronousTestCase):
    """Stages run in their phase, in order, and may answer, refuse or hold."""

    def test_order_and_what_each_phase_knows(self) -> None:
        """
        C{identify} runs before routing, C{route} once the route is known,
        C{pool} once the pool and the model (after aliases) are resolved; the
        body is parsed once and shared.
        """
        stages = [Stage("pool"), Stage("route"), Stage("identify"), Stage("route", "async-go")]
        gw = Harness(self, routed(), extra=stages)
        answer = gw.request("POST", "/v1/chat/completions", {"model": "fast"})
        self.assertEqual(answer.code, 200)
        pool, route, identify, route2 = (s.seen for s in stages)
        self.assertEqual(identify, [("-", "-", None, None)])
        self.assertEqual(route, [("/v1/*", "-", None, {"model": "fast"})])
        self.assertEqual(route2, route)
        self.assertEqual(pool, [("/v1/*", "main", "m", {"model": "fast"})])
        # The alias was applied to what the instance received.
        self.assertEqual(json.loads(gw.backend.seen[0].body), {"model": "m"})

    def test_answer_in_each_phase(self) -> None:
        """A stage that answers ends the request there: later stages and the backend see nothing."""
        for phase in ("identify", "route", "pool"):
            answering, later = Stage(phase, "answer"), Stage("pool")
            gw = Harness(self, routed(), extra=[answering, later])
            answer = gw.request("POST", "/v1/chat/completions", {"model": "m"})
            self.assertEqual((answer.code, answer.json()), (200, {"answered_in": phase}))
            self.assertEqual(answer.header("content-type"), "application/json")
            self.assertIsNotNone(answer.header("x-request-id"))
            self.assertEqual(later.seen, [])
            self.assertEqual(gw.backend.seen, [])
            (line,) = gw.log_lines()
            self.assertEqual(line["status"], 200)

    def test_refuse_in_each_phase(self) -> None:
        """A stage that refuses gets the SPEC's JSON error with its status and headers."""
        for phase in ("identify", "route", "pool"):
            gw = Harness(self, routed(), extra=[Stage(phase, "refuse")])
            answer = gw.request("POST", "/v1/chat/completions", {"model": "m"})
            self.assertEqual(answer.code, 429)
            self.assertEqual(answer.json()["error"], {
                "message": f"refused in {phase}", "type": "rate_limit_error",
                "code": "rate_limited"})
            self.assertEqual(answer.header("retry-after"), "7")
            self.assertEqual(gw.backend.seen, [])

    def test_hold_then_release(self) -> None:
        """A held request waits, then goes on when the stage releases it."""
        for phase in ("identify", "route", "pool"):
            stage = Stage(phase, "hold")
            gw = Harness(self, routed(), extra=[stage])
            d = gw.start("POST", "/v1/chat/completions", {"model": "m"})
            self.assertNoResult(d)
            self.assertEqual(gw.backend.seen, [])
            stage.held[0].callback(None)
            answer = gw.finish(d)
            self.assertEqual(answer.code, 200)
            self.assertEqual(gw.backend.instances(), ["a"])

    def test_hold_then_answer(self) -> None:
        """A held request may be answered when released (e.g. a queue that expired)."""
        stage = Stage("route", "hold")
        gw = Harness(self, routed(), extra=[stage])
        d = gw.start("POST", "/v1/chat/completions", {"model": "m"})
        stage.held[0].callback(LocalResponse(503, b'{"queued": false}'))
        self.assertEqual(gw.finish(d).code, 503)
        self.assertEqual(gw.backend.seen, [])

    def test_held_request_cancelled_when_client_leaves(self) -> None:
        """A client that leaves while held cancels the stage's Deferred; logged as 499."""
        for phase in ("identify", "route", "pool"):
            stage = Stage(phase, "hold")
            gw = Harness(self, routed(), extra=[stage])
            d = gw.start("POST", "/v1/chat/completions", {"model": "m"})
            d.cancel()
            gw.flush()
            self.failureResultOf(d)
            self.assertEqual(stage.cancelled, 1)
            self.assertEqual(gw.backend.seen, [])
            (line,) = gw.log_lines()
            self.assertEqual((line["status"], line["error"]), (499, "client_disconnected"))
            self.assertEqual(gw.resource.in_flight, 0)

    def test_unknown_phase_refused_at_build(self) -> None:
        """A stage naming no known phase fails when the data plane is built."""
        with self.assertRaises(TypeError):
            Parts().add(Stage("later"))

    def test_part_without_seam_refused(self) -> None:
        """An object that provides no seam is refused, not silently ignored."""
        with self.assertRaises(TypeError):
            Parts().add(object())


@implementer(IHeadCheck)
class NoTeapots:
    def check_head(self, method: bytes, path: bytes, headers: Headers) -> None:
        if headers.getRawHeaders(b"x-teapot"):
            raise Rejected(418, "no teapots", "invalid_request_error", "teapot")


class HeadCheckTests(SynchronousTestCase):
    """Head checks are gathered by the data plane for the HTTP channel."""

    def test_check_head(self) -> None:
        """The data plane runs every head check; one may refuse."""
        gw = Harness(self, routed(), extra=[NoTeapots()])
        gw.plane.check_head(b"GET", b"/v1/x", Headers())
        e = self.assertRaises(Rejected, gw.plane.check_head, b"GET", b"/v1/x",
                              Headers({b"X-Teapot": [b"1"]}))
        self.assertEqual(e.status, 418)


@implementer(IResponseFilter, IBodyFilter)
class LastChunk:
    """Observes: keeps the last SSE event of every stream it sees."""

    name = "last-chunk"
    rewrites = False

    def __init__(self) -> None:
        self.last: list[bytes] = []
        self.ended: list[str] = []
        self._buffer = b""

    def begin(self, ctx: RequestContext, code: int, headers: list[tuple[bytes, bytes]]) -> Any:
        if (b"content-type", b"text/event-stream") in headers:  # names arrive lower-case
            self._buffer = b""
            return self
        return None

    def data(self, chunk: bytes) -> bytes:
        self._buffer = (self._buffer + chunk)[-4096:]
        return chunk

    def end(self, outcome: str) -> bytes:
        events = [e for e in self._buffer.split(b"\n\n") if e.strip()]
        self.last.append(events[-1] if events else b"")
        self.ended.append(outcome)
        return b""


@implementer(IResponseFilter, IBodyFilter)
class AppendEvent:
    """Appends one SSE event to every stream that completes."""

    name = "append"
    rewrites = True

    def begin(self, ctx: RequestContext, code: int, headers: list[tuple[bytes, bytes]]) -> Any:
        headers.append((b"x-filtered", b"yes"))
        return self

    def data(self, chunk: bytes) -> bytes:
        return chunk

    def end(self, outcome: str) -> bytes:
        return b'data: {"appended": true}\n\n' if outcome == "complete" else b""


@implementer(IResponseObserver)
class Seen:
    """Records each finished request's status and the Content-Length it was sent with."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.lengths: list[list[bytes] | None] = []

    def completed(self, ctx: RequestContext) -> None:
        self.statuses.append(ctx.status)
        self.lengths.append(ctx.request.responseHeaders.getRawHeaders(b"content-length"))


class FilterTests(SynchronousTestCase):
    """Response filters see the head, every chunk and the end of relayed responses."""

    def stream(self, gw: Harness, events: list[bytes]) -> Any:
        """Start a streamed request; the backend answers with C{events}, one write each."""
        gw.backend.hang.add("a")
        d = gw.start("POST", "/v1/chat/completions", {"model": "m", "stream": True})
        upstream = gw.backend.hanging[0]
        upstream.setHeader(b"content-type", b"text/event-stream")
        for event in events:
            upstream.write(event)
            gw.flush()
        upstream.finish()
        return gw.finish(d)

    def test_observe_last_chunk(self) -> None:
        """An observing filter sees a stream's last event; the client's body is unchanged."""
        last = LastChunk()
        gw = Harness(self, routed(), extra=[last])
        events = [b'data: {"n": 1}\n\n', b'data: {"n": 2, "usage": {"total_tokens": 9}}\n\n',
                  b"data: [DONE]\n\n"]
        answer = self.stream(gw, events)
        self.assertEqual(answer.body, b"".join(events))
        self.assertEqual(last.last, [b"data: [DONE]"])
        self.assertEqual(last.ended, ["complete"])

    def test_header_names_lower_case(self) -> None:
        """
        A filter gets the head's names lower-case, whatever case the
        upstream used; the client still gets every header.
        """
        names: list[bytes] = []

        @implementer(IResponseFilter)
        class Names:
            name = "names"

            def begin(self, ctx: RequestContext, code: int,
                      headers: list[tuple[bytes, bytes]]) -> Any:
                names.extend(n for n, _ in headers)

        gw = Harness(self, routed(), extra=[Names()])
        gw.backend.hang.add("a")
        d = gw.start("POST", "/v1/chat/completions", {"model": "m"})
        upstream = gw.backend.hanging[0]
        upstream.responseHeaders.addRawHeader(b"X-Model-Version", b"Qwen-3")
        upstream.responseHeaders.addRawHeader(b"content-TYPE", b"application/json")
        upstream.write(b"{}")
        upstream.finish()
        answer = gw.finish(d)
        self.assertIn(b"content-type", names)
        self.assertIn(b"x-model-version", names)
        self.assertEqual(names, [n.lower() for n in names])
        self.assertEqual(answer.header("X-Model-Version"), "Qwen-3")
        self.assertEqual(answer.header("Content-Type"), "application/json")

    def test_observe_stays_out_of_other_responses(self) -> None:
        """A filter that declines a response (not SSE) is not called for its body."""
        last, seen = LastChunk(), Seen()
        gw = Harness(self, routed(), extra=[last, seen])
        answer = gw.request("POST", "/v1/chat/completions", {"model": "m"})
        self.assertEqual(answer.code, 200)
        self.assertEqual(last.ended, [])
        self.assertEqual(seen.lengths, [[b"%d" % len(answer.body)]])

    def test_append_sse_event(self) -> None:
        """
        A filter may change the head and append an event; filters after it see
        the appended bytes, and the upstream's Content-Length is not relayed.
        """
        last, observer = LastChunk(), Seen()
        gw = Harness(self, routed(), extra=[AppendEvent(), last, observer])
        answer = self.stream(gw, [b"data: 1\n\n"])
        self.assertEqual(answer.body, b'data: 1\n\ndata: {"appended": true}\n\n')
        self.assertEqual(answer.header("x-filtered"), "yes")
        self.assertEqual(last.last, [b'data: {"appended": true}'])
        self.assertEqual(observer.statuses, [200])
        (line,) = gw.log_lines()
        self.assertEqual(line["bytes"], len(answer.body))

    def test_append_after_json_drops_content_length(self) -> None:
        """A rewriting filter over a sized body: the client gets the whole new body."""
        seen = Seen()
        gw = Harness(self, routed(), extra=[AppendEvent(), seen])
        answer = gw.request("POST", "/v1/chat/completions", {"model": "m"})
        self.assertEqual(answer.body, json.dumps(
            {"instance": "a", "uri": "/v1/chat/completions"}).encode()
            + b'data: {"appended": true}\n\n')
        self.assertEqual(seen.lengths, [None])

    def test_client_gone_told(self) -> None:
        """A filter is told when the client leaves mid-stream (the pipe is cancelled)."""
        last = LastChunk()
        request = FakeRequest()
        pipe = StreamPipe(request, context(request), Clock(), None, (last,))
        pipe.makeConnection(StringTransport())
        pipe.dataReceived(b"data: 1\n\n")
        pipe.done.cancel()
        self.failureResultOf(pipe.done)
        self.assertEqual(last.ended, ["client_gone"])
        self.assertEqual(last.last, [b"data: 1"])

    def test_broken_told_and_nothing_appended(self) -> None:
        """An upstream that breaks mid-body: filters are told; nothing is appended."""
        append = AppendEvent()
        request = FakeRequest()
        pipe = StreamPipe(request, context(request), Clock(), None, (append,))
        pipe.makeConnection(StringTransport())
        pipe.dataReceived(b"data: 1\n\n")
        pipe.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
        self.failureResultOf(pipe.done, ResponseFailed)
        self.assertEqual(request.written, [b"data: 1\n\n"])


@implementer(IResponseFilter, IBodyFilter)
class ErrorEvent:
    """Ends a broken SSE stream in-band with an error event."""

    name = "error-event"
    rewrites = True

    def begin(self, ctx: RequestContext, code: int, headers: list[tuple[bytes, bytes]]) -> Any:
        return self

    def data(self, chunk: bytes) -> bytes:
        return chunk

    def end(self, outcome: str) -> bytes:
        return b'data: {"error": {"code": "upstream_broken"}}\n\n' if outcome == "broken" else b""


class BrokenInBandTests(SynchronousTestCase):
    """A filter may end a broken body in-band instead of the abort."""

    def test_error_event_ends_cleanly(self) -> None:
        """The error event is written after what was relayed, and the pipe ends cleanly."""
        request = FakeRequest()
        ctx = context(request)
        pipe = StreamPipe(request, ctx, Clock(), None, (ErrorEvent(),))
        pipe.makeConnection(StringTransport())
        pipe.dataReceived(b"data: 1\n\n")
        pipe.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
        self.assertIsNone(self.successResultOf(pipe.done))
        self.assertEqual(request.written, [
            b"data: 1\n\n", b'data: {"error": {"code": "upstream_broken"}}\n\n'])
        self.assertEqual(ctx.error, "truncated")


class FirstChunkOutcomeTests(SynchronousTestCase):
    """
    A stream watched by C{first_token_timeout} ends its attempt with exactly
    one outcome for the availability policies: success once its first chunk
    comes, failure (only) when none comes in time.
    """

    def start_stream(self, code: int = 200) -> tuple[Harness, TrialBreakers, Any]:
        breakers = TrialBreakers()
        gw = Harness(self, routed(first_token_timeout="5s"), breakers=breakers)
        gw.backend.hang.update({"a", "b"})
        d = gw.start("POST", "/v1/chat/completions", {"model": "m", "stream": True})
        upstream = gw.backend.hanging[0]
        upstream.setResponseCode(code)
        upstream.setHeader(b"content-type", b"text/event-stream")
        upstream.write(b"")  # the head goes out, no body chunk yet
        gw.flush()
        return gw, breakers, d

    def test_success_recorded_at_first_chunk(self) -> None:
        """Nothing is recorded at the head; one OK at the first chunk."""
        gw, breakers, d = self.start_stream()
        self.assertEqual(breakers.outcomes, [])
        gw.backend.hanging[0].write(b"data: 1\n\n")
        gw.flush()
        self.assertEqual(breakers.outcomes, [("a", OK)])
        gw.backend.hanging[0].finish()
        self.assertEqual(gw.finish(d).body, b"data: 1\n\n")
        self.assertEqual(breakers.outcomes, [("a", OK)])

    def test_no_first_chunk_recorded_once_as_failure(self) -> None:
        """A stream with no first chunk in time: one failure, then the retry elsewhere."""
        gw, breakers, d = self.start_stream()
        gw.clock.advance(5)
        gw.flush()
        self.assertEqual(breakers.outcomes, [("a", "first_token_timeout")])
        gw.clock.advance(1)  # the retry's backoff
        gw.flush()
        self.assertEqual(gw.backend.instances(), ["a", "b"])
        upstream = gw.backend.hanging[1]
        upstream.setHeader(b"content-type", b"text/event-stream")
        upstream.write(b"data: 2\n\n")
        upstream.finish()
        self.assertEqual(gw.finish(d).body, b"data: 2\n\n")
        self.assertEqual(breakers.outcomes, [("a", "first_token_timeout"), ("b", OK)])

    def test_client_gone_before_first_chunk(self) -> None:
        """A client that leaves before the first chunk: the attempt is cancelled, not judged."""
        gw, breakers, d = self.start_stream()
        d.cancel()
        gw.flush()
        self.failureResultOf(d)
        self.assertEqual(breakers.outcomes, [("a", CANCELLED)])

    def test_bad_head_recorded_once(self) -> None:
        """A watched stream whose head is refused (502) is still recorded, once."""
        gw, breakers, d = self.start_stream(code=99)  # a status below 100: refused
        self.assertEqual(gw.finish(d).code, 502)
        self.assertEqual(breakers.outcomes, [("a", OK)])

    def test_broken_before_first_chunk_recorded_once_as_failure(self) -> None:
        """A watched stream whose body breaks before its first chunk: one failure, a 502."""
        gw, breakers, d = self.start_stream()
        gw.backend.hanging[0].loseConnection()  # the backend goes away mid-response
        gw.flush()
        self.assertEqual(breakers.outcomes, [("a", "error")])
        answer = gw.finish(d)
        self.assertEqual((answer.code, answer.json()["error"]["code"]), (502, "bad_gateway"))


class DeepJSONTests(SynchronousTestCase):
    """A body nested deeper than the JSON parser's stack is a 400, not a 500."""

    def test_deep_body(self) -> None:
        gw = Harness(self, routed())
        body = b"[" * 100000 + b"]" * 100000
        answer = gw.request("POST", "/v1/chat/completions", body,
                            headers={"Content-Type": "application/json"})
        self.assertEqual((answer.code, answer.json()["error"]["code"]), (400, "invalid_json"))
        self.assertEqual(gw.backend.seen, [])


@implementer(IAttemptObserver)
class AttemptLog:
    """Records each attempt's start and end; adds a header to each attempt."""

    def __init__(self, fail: bool = False) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.fail = fail

    def attempt_started(self, ctx: Any, attempt: Any) -> Any:
        if self.fail:
            raise RuntimeError("observer bug")
        self.events.append(("start", attempt.instance.id, attempt.number))
        attempt.headers.append((b"x-attempt", b"%d" % attempt.number))
        return f"token-{attempt.number}"

    def attempt_ended(self, ctx: Any, attempt: Any, token: Any) -> None:
        self.events.append(("end", attempt.instance.id, token, attempt.outcome, attempt.status))


class AttemptObserverTests(SynchronousTestCase):
    """L{IAttemptObserver}: told each upstream attempt's start and outcome."""

    def test_failover(self) -> None:
        """Two attempts (a 503 retried, then ok): each started and ended, headers sent."""
        log = AttemptLog()
        gw = Harness(self, basic(retry={"retry_on": ["5xx"], "base_delay": 0}), extra=[log])
        gw.backend.status["a"] = 503
        self.assertEqual(gw.request("GET", "/v1/x").code, 200)
        self.assertEqual(log.events, [
            ("start", "a", 1), ("end", "a", "token-1", "5xx", 503),
            ("start", "b", 2), ("end", "b", "token-2", OK, 200)])
        self.assertEqual([s.headers.getRawHeaders(b"x-attempt") for s in gw.backend.seen],
                         [[b"1"], [b"2"]])

    def test_timeout(self) -> None:
        """An attempt that times out ends with C{timeout} and no status."""
        log = AttemptLog()
        gw = Harness(self, basic(timeout="2s"), extra=[log])
        gw.backend.hang.add("a")
        d = gw.start("GET", "/v1/x")
        gw.clock.advance(2)
        self.assertEqual(gw.finish(d).code, 504)
        self.assertEqual(log.events[-1], ("end", "a", "token-1", "timeout", 0))

    def test_client_gone(self) -> None:
        """A client that leaves mid-attempt: the attempt ends C{cancelled}."""
        log = AttemptLog()
        gw = Harness(self, basic(), extra=[log])
        gw.backend.hang.add("a")
        d = gw.start("GET", "/v1/x")
        d.cancel()
        gw.flush()
        self.failureResultOf(d)
        self.assertEqual(log.events[-1], ("end", "a", "token-1", CANCELLED, 0))

    def test_observer_error_logged(self) -> None:
        """An observer that raises is logged; the request is served."""
        gw = Harness(self, basic(), extra=[AttemptLog(fail=True)])
        self.assertEqual(gw.request("GET", "/v1/x").code, 200)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
