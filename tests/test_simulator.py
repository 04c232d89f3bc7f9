"""Tests for L{clawproxy.simulator}."""

from __future__ import annotations

import json
import random
from io import BytesIO
from typing import Any

import attrs
import treq
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from clawproxy.simulator import (
    DEFAULT_LISTEN,
    SimSettings,
    SimulatorResource,
    parse_sim_args,
    sim_main,
    simulator_service,
    simulator_site,
)

BASE = "http://sim.invalid"
# Binary-exact timings, so advancing the clock hits each tick exactly.
SETTINGS = SimSettings(id="sim-t", model="sim-small", ttft=1.0, tokens_per_second=4.0, max_tokens=4)
HELLO = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]


@attrs.frozen
class _Cfg:
    """Stands in for the config's C{SimulatorConfig}."""

    listen: str = "tcp:11777:interface=127.0.0.1"
    id: str = "sim-cfg"
    model: str = "m-cfg"
    ttft: float = 0.25
    tokens_per_second: float = 10.0
    max_tokens: int = 8
    failure_rate: float = 0.1
    hang_rate: float = 0.2


class _Disconnector(Protocol):
    """Receives a response body and can drop the connection mid-body."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        pass


class SimulatorTestCase(SynchronousTestCase):
    """Drives a L{SimulatorResource} through L{StubTreq} on a L{Clock}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.make(SETTINGS)

    def make(self, settings: SimSettings, rng: random.Random | None = None) -> None:
        self.sim = SimulatorResource(settings, self.clock, rng)
        self.stub = StubTreq(self.sim)

    def post(self, path: str, body: object) -> Deferred[Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        d = self.stub.post(BASE + path, data=data, headers={"Content-Type": "application/json"})
        self.stub.flush()
        return d

    def get(self, path: str) -> Any:
        d = self.stub.get(BASE + path)
        self.stub.flush()
        return self.successResultOf(d)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.stub.flush()

    def json_of(self, response: Any) -> Any:
        d = treq.json_content(response)
        self.stub.flush()
        return self.successResultOf(d)

    def stream(
        self, d: Deferred[Any], wait: float = SETTINGS.ttft
    ) -> tuple[Any, list[bytes], Deferred[None]]:
        """Advance C{wait} seconds to the first chunk and start collecting the body."""
        self.advance(wait)
        response = self.successResultOf(d)
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        self.stub.flush()
        return response, chunks, done

    def assert_sim_header(self, response: Any) -> None:
        self.assertEqual(response.headers.getRawHeaders("X-Sim-Instance"), ["sim-t"])

    def assert_idle(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.sim.active, 0)


class OpenAIChatTests(SimulatorTestCase):
    def test_completion_waits_for_generation(self) -> None:
        """
        A non-streamed chat completion is answered only after ttft plus the
        generation time of max_tokens tokens, never before.
        """
        d = self.post("/v1/chat/completions", {"model": "m1", "messages": HELLO})
        self.assertNoResult(d)
        self.assertEqual(self.sim.active, 1)
        self.advance(1.0 + 0.75)
        self.assertNoResult(d)
        self.advance(0.25)
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assert_sim_header(response)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["application/json"])
        self.assert_idle()
        self.assertEqual(self.sim.requests_served, 1)

    def test_completion_shape(self) -> None:
        """
        The answer is a C{chat.completion} with the requested model, an
        assistant message echoing the user's words, C{finish_reason} C{stop}
        and consistent usage counts.
        """
        d = self.post("/v1/chat/completions", {"model": "m1", "messages": HELLO})
        self.advance(10)
        body = self.json_of(self.successResultOf(d))
        self.assertTrue(body["id"].startswith("chatcmpl-"))
        self.assertEqual(body["object"], "chat.completion")
        self.assertEqual(body["created"], 0)
        self.assertEqual(body["model"], "m1")
        [choice] = body["choices"]
        self.assertEqual(choice["index"], 0)
        self.assertEqual(choice["finish_reason"], "stop")
        self.assertEqual(
            choice["message"], {"role": "assistant", "content": "hello world hello world"}
        )
        self.assertEqual(
            body["usage"], {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
        )

    def test_max_tokens_truncates(self) -> None:
        """
        A request's C{max_tokens} below the simulator's cap gives that many
        tokens with C{finish_reason} C{length}; without a model the simulator's
        own model is reported, and without user words the text is C{token0 ...}.
        """
        d = self.post("/v1/chat/completions", {"messages": [], "max_tokens": 2})
        self.advance(1.0 + 0.5)
        body = self.json_of(self.successResultOf(d))
        self.assertEqual(body["model"], "sim-small")
        self.assertEqual(body["choices"][0]["message"]["content"], "token0 token1")
        self.assertEqual(body["choices"][0]["finish_reason"], "length")
        self.assertEqual(body["usage"]["completion_tokens"], 2)

    def test_max_tokens_capped(self) -> None:
        """A C{max_tokens} above the simulator's cap is cut to the cap."""
        d = self.post("/v1/chat/completions", {"messages": HELLO, "max_tokens": 1000})
        self.advance(10)
        body = self.json_of(self.successResultOf(d))
        self.assertEqual(body["usage"]["completion_tokens"], SETTINGS.max_tokens)
        self.assertEqual(body["choices"][0]["finish_reason"], "stop")

    def test_stream(self) -> None:
        """
        A streamed completion is C{text/event-stream}: the role chunk arrives
        at ttft while the rest is still pending, then one chunk per token every
        1/tokens_per_second, a chunk with C{finish_reason}, and C{[DONE]}.
        """
        d = self.post("/v1/chat/completions", {"messages": HELLO, "stream": True})
        self.advance(0.5)
        self.assertNoResult(d)
        response, chunks, done = self.stream(d, 0.5)
        self.assertEqual(response.code, 200)
        self.assert_sim_header(response)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["text/event-stream"])
        self.assertEqual(b"".join(chunks).count(b"\n\n"), 1)
        self.assertNoResult(done)
        for k in range(1, 4):
            self.advance(0.25)
            self.assertEqual(b"".join(chunks).count(b"\n\n"), 1 + k)
        self.assertNoResult(done)
        self.advance(0.25)
        self.successResultOf(done)
        self.assert_idle()

        events = b"".join(chunks).split(b"\n\n")
        self.assertEqual(events[-1], b"")
        self.assertEqual(events[-2], b"data: [DONE]")
        for event in events[:-2]:
            self.assertTrue(event.startswith(b"data: "), event)
        parsed = [json.loads(e[len(b"data: ") :]) for e in events[:-2]]
        for chunk in parsed:
            self.assertEqual(chunk["object"], "chat.completion.chunk")
            self.assertEqual(chunk["id"], parsed[0]["id"])
        self.assertEqual(parsed[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        tokens = [c["choices"][0]["delta"]["content"] for c in parsed[1:-1]]
        self.assertEqual(tokens, ["hello", " world", " hello", " world"])
        final = parsed[-1]["choices"][0]
        self.assertEqual(final, {"index": 0, "finish_reason": "stop", "delta": {}})

    def test_stream_include_usage(self) -> None:
        """
        With C{stream_options.include_usage} a usage chunk with no choices
        comes just before C{[DONE]}.
        """
        body = {"messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
        d = self.post("/v1/chat/completions", body)
        _, chunks, done = self.stream(d)
        self.advance(1)
        self.successResultOf(done)
        events = b"".join(chunks).split(b"\n\n")
        usage = json.loads(events[-3][len(b"data: ") :])
        self.assertEqual(usage["choices"], [])
        self.assertEqual(usage["usage"]["completion_tokens"], 4)

    def test_stream_disconnect(self) -> None:
        """
        A client that goes away mid-stream cancels every pending timer and
        the request stops counting as active.
        """
        d = self.post("/v1/chat/completions", {"messages": HELLO, "stream": True})
        self.advance(1.0)
        response = self.successResultOf(d)
        body = _Disconnector()
        response.deliverBody(body)
        self.stub.flush()
        self.assertEqual(len(body.received), 1)
        self.assertNotEqual(self.clock.getDelayedCalls(), [])
        body.transport.stopProducing()
        self.stub.flush()
        self.assert_idle()
        self.assertEqual(self.sim.requests_served, 0)

    def test_text_completions(self) -> None:
        """C{/v1/completions} answers a C{text_completion} echoing the prompt."""
        d = self.post("/v1/completions", {"model": "m2", "prompt": "say this", "max_tokens": 3})
        self.advance(10)
        body = self.json_of(self.successResultOf(d))
        self.assertEqual(body["object"], "text_completion")
        self.assertEqual(body["model"], "m2")
        self.assertEqual(body["choices"][0]["text"], "say this say")
        self.assertEqual(body["choices"][0]["finish_reason"], "length")


class OllamaTests(SimulatorTestCase):
    def test_chat_streams_by_default(self) -> None:
        """
        C{/api/chat} streams NDJSON unless told otherwise: one line per token,
        the first at ttft, then a final C{done} line with the counts.
        """
        d = self.post("/api/chat", {"model": "llama", "messages": HELLO})
        self.advance(0.5)
        self.assertNoResult(d)
        self.advance(0.5)
        response = self.successResultOf(d)
        self.assert_sim_header(response)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["application/x-ndjson"])
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        self.stub.flush()
        self.assertEqual(b"".join(chunks).count(b"\n"), 1)
        self.assertNoResult(done)
        self.advance(1.0)
        self.successResultOf(done)
        self.assert_idle()

        lines = [json.loads(line) for line in b"".join(chunks).splitlines()]
        self.assertEqual(len(lines), 5)
        for line in lines[:-1]:
            self.assertEqual(line["model"], "llama")
            self.assertIs(line["done"], False)
            self.assertEqual(line["message"]["role"], "assistant")
            self.assertTrue(line["created_at"].endswith("Z"))
        self.assertEqual(
            "".join(line["message"]["content"] for line in lines), "hello world hello world"
        )
        final = lines[-1]
        self.assertIs(final["done"], True)
        self.assertEqual(final["done_reason"], "stop")
        self.assertEqual((final["prompt_eval_count"], final["eval_count"]), (4, 4))

    def test_chat_whole(self) -> None:
        """
        With C{stream: false} C{/api/chat} answers one JSON object after the
        whole generation time, with C{options.num_predict} limiting tokens.
        """
        body = {"messages": HELLO, "stream": False, "options": {"num_predict": 2}}
        d = self.post("/api/chat", body)
        self.advance(1.25)
        self.assertNoResult(d)
        self.advance(0.25)
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        answer = self.json_of(response)
        self.assertEqual(answer["model"], "sim-small")
        self.assertEqual(answer["message"], {"role": "assistant", "content": "hello world"})
        self.assertIs(answer["done"], True)
        self.assertEqual(answer["done_reason"], "length")
        self.assertEqual((answer["prompt_eval_count"], answer["eval_count"]), (4, 2))
        self.assertEqual(answer["total_duration"], 1_500_000_000)
        self.assert_idle()

    def test_unlimited_num_predict(self) -> None:
        """Ollama's C{num_predict: -1} means no request limit: the cap applies."""
        body = {"messages": HELLO, "stream": False, "options": {"num_predict": -1}}
        d = self.post("/api/chat", body)
        self.advance(10)
        answer = self.json_of(self.successResultOf(d))
        self.assertEqual((answer["eval_count"], answer["done_reason"]), (4, "stop"))

    def test_tags(self) -> None:
        """C{GET /api/tags} lists the simulator's model under C{name} and C{model}."""
        response = self.get("/api/tags")
        self.assertEqual(response.code, 200)
        self.assert_sim_header(response)
        [model] = self.json_of(response)["models"]
        self.assertEqual((model["name"], model["model"]), ("sim-small", "sim-small"))


class EndpointTests(SimulatorTestCase):
    def test_models(self) -> None:
        """C{GET /v1/models} is an OpenAI model list naming the simulator's model."""
        response = self.get("/v1/models")
        self.assertEqual(response.code, 200)
        self.assert_sim_header(response)
        model = {"id": "sim-small", "object": "model", "created": 0, "owned_by": "clawproxy-sim"}
        self.assertEqual(self.json_of(response), {"object": "list", "data": [model]})

    def test_health(self) -> None:
        """
        C{GET /health} reports status, id, model, cpu, mem, the configured GPU
        memory and the number of requests in flight.
        """
        self.post("/v1/chat/completions", {"messages": HELLO})
        response = self.get("/health")
        self.assertEqual(response.code, 200)
        self.assert_sim_header(response)
        body = self.json_of(response)
        self.assertEqual(body["status"], "ok")
        self.assertEqual((body["id"], body["model"]), ("sim-t", "sim-small"))
        self.assertEqual(body["gpu_memory_used_percent"], 42.0)
        self.assertEqual(body["active"], 1)
        self.assertIsInstance(body["cpu"], float)
        self.assertIsInstance(body["mem"], float)
        self.advance(10)
        self.assertEqual(self.json_of(self.get("/health"))["active"], 0)

    def test_unknown_path(self) -> None:
        """An unknown path answers 404 with an OpenAI-shaped JSON error."""
        response = self.get("/nope")
        self.assertEqual(response.code, 404)
        self.assert_sim_header(response)
        self.assertEqual(self.json_of(response)["error"]["code"], "not_found")

    def test_wrong_method(self) -> None:
        """A GET on a POST-only path answers 405 naming the allowed method."""
        response = self.get("/v1/chat/completions")
        self.assertEqual(response.code, 405)
        self.assert_sim_header(response)
        self.assertEqual(response.headers.getRawHeaders("Allow"), ["POST"])

    def test_bad_json(self) -> None:
        """A body that is not JSON answers 400 in the OpenAI error shape, at once."""
        response = self.successResultOf(self.post("/v1/chat/completions", b"{not json"))
        self.assertEqual(response.code, 400)
        self.assert_sim_header(response)
        error = self.json_of(response)["error"]
        self.assertEqual(set(error), {"message", "type", "code"})
        self.assertEqual(error["type"], "invalid_request_error")
        self.assert_idle()

    def test_bad_fields(self) -> None:
        """Non-object bodies, non-list messages and bad max_tokens answer 400."""
        for path, body in [
            ("/v1/chat/completions", [1, 2]),
            ("/v1/chat/completions", {"messages": "hi"}),
            ("/v1/chat/completions", {"messages": [], "max_tokens": 0}),
            ("/v1/chat/completions", {"messages": [], "max_tokens": "5"}),
            ("/api/chat", {"messages": [], "options": {"num_predict": True}}),
            ("/v1/completions", {"prompt": 5}),
        ]:
            response = self.successResultOf(self.post(path, body))
            self.assertEqual(response.code, 400, (path, body))
            self.assert_sim_header(response)
        self.assert_idle()


class FaultTests(SimulatorTestCase):
    def test_failure_rate(self) -> None:
        """With failure_rate 1 every chat request answers the simulated 500 error."""
        self.sim.set_failure_rate(1.0)
        for path in ["/v1/chat/completions", "/api/chat"]:
            response = self.successResultOf(self.post(path, {"messages": HELLO}))
            self.assertEqual(response.code, 500)
            self.assert_sim_header(response)
            self.assertEqual(
                self.json_of(response),
                {
                    "error": {
                        "message": "simulated failure",
                        "type": "server_error",
                        "code": "sim_failure",
                    }
                },
            )
        self.assertEqual(self.sim.requests_failed, 2)
        self.assert_idle()

    def test_failure_rate_uses_rng(self) -> None:
        """A partial failure rate fails the requests the injected rng picks."""
        self.make(attrs.evolve(SETTINGS, failure_rate=0.5), random.Random(7))
        dice = random.Random(7)
        expected = [dice.random() < 0.5 for _ in range(20)]
        codes = []
        for _ in range(20):
            d = self.post("/v1/chat/completions", {"messages": HELLO})
            self.advance(10)
            codes.append(self.successResultOf(d).code)
        self.assertEqual(codes, [500 if fail else 200 for fail in expected])

    def test_hang_rate(self) -> None:
        """
        With hang_rate 1 a request is never answered, holds no timers, and a
        client disconnect ends it.
        """
        self.sim.set_hang_rate(1.0)
        d = self.post("/v1/chat/completions", {"messages": HELLO, "stream": True})
        self.advance(3600)
        self.assertNoResult(d)
        self.assertEqual(self.sim.active, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        d.cancel()
        self.stub.flush()
        self.failureResultOf(d, ResponseNeverReceived)
        self.assert_idle()
        self.assertEqual(self.sim.requests_served, 0)


def _request(path: bytes, body: bytes) -> DummyRequest:
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    request.method = b"POST"
    request.path = path  # type: ignore[attr-defined]
    request.content = BytesIO(body)  # type: ignore[attr-defined]
    return request


class DisconnectTests(SynchronousTestCase):
    def test_no_write_after_disconnect(self) -> None:
        """
        After the client disconnects mid-stream nothing more is written, the
        request is never finished, and no timer is left on the clock.
        """
        clock = Clock()
        sim = SimulatorResource(SETTINGS, clock)
        request = _request(b"/api/chat", json.dumps({"messages": HELLO}).encode())
        self.assertEqual(sim.render(request), NOT_DONE_YET)
        clock.advance(1.25)
        self.assertEqual(len(request.written), 2)
        request.processingFailed(Failure(ConnectionError("gone")))
        clock.advance(10)
        self.assertEqual(len(request.written), 2)
        self.assertEqual(request.finished, 0)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(sim.active, 0)


class SiteTests(SynchronousTestCase):
    def test_site(self) -> None:
        """
        L{simulator_site} wraps a L{SimulatorResource} in a quiet site that
        keeps no access log.
        """
        site = simulator_site(SETTINGS, Clock())
        self.assertIsInstance(site.resource, SimulatorResource)
        self.assertFalse(site.noisy)
        self.assertIsNone(site.logPath)
        self.assertIsNone(site.log(DummyRequest([b""])))

    def test_settings_from_config(self) -> None:
        """L{SimSettings.from_config} copies every setting from a config entry."""
        self.assertEqual(
            SimSettings.from_config(_Cfg()),
            SimSettings("sim-cfg", "m-cfg", 0.25, 10.0, 8, 0.1, 0.2),
        )

    def test_settings_validated(self) -> None:
        """Impossible settings raise L{ValueError}."""
        for bad in [{"failure_rate": 1.5}, {"tokens_per_second": 0}, {"max_tokens": 0}]:
            self.assertRaises(ValueError, SimSettings, **bad)

    def test_service(self) -> None:
        """
        L{simulator_service} is named after the simulator and listens on the
        configured endpoint.
        """
        reactor = MemoryReactor()
        service = simulator_service(_Cfg(), reactor)
        self.assertEqual(service.name, "sim-cfg")
        service.startService()
        [(port, factory, _, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (11777, "127.0.0.1"))
        self.assertEqual(factory.resource.settings.id, "sim-cfg")
        service.stopService()


class ArgsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """Without arguments the simulator listens on the default endpoint with default settings."""
        self.assertEqual(parse_sim_args([]), (DEFAULT_LISTEN, SimSettings()))

    def test_all_options(self) -> None:
        """Every option lands in the settings; durations accept units."""
        argv = [
            "--listen", "tcp:0", "--id", "s9", "--model", "m", "--ttft", "250ms",
            "--tokens-per-second", "50", "--max-tokens", "16", "--failure-rate", "0.1",
            "--hang-rate", "0.05", "--gpu-memory", "90",
        ]  # fmt: skip
        self.assertEqual(
            parse_sim_args(argv),
            ("tcp:0", SimSettings("s9", "m", 0.25, 50.0, 16, 0.1, 0.05, 90.0)),
        )
        self.assertEqual(parse_sim_args(["--ttft", "2"])[1].ttft, 2.0)

    def test_bad_options(self) -> None:
        """Bad durations and impossible values make L{sim_main} exit 2 without running."""
        for argv in [["--ttft", "soon"], ["--failure-rate", "2"], ["--max-tokens", "0"]]:
            self.assertEqual(sim_main(argv), 2, argv)
        self.assertRaises(SystemExit, parse_sim_args, ["--hang-rate", "-1"])


def _raw(site: Any, clock: Clock, data: bytes) -> tuple[bytes, bool]:
    """
    Feed C{data} to a new connection of C{site}; return what it wrote and
    whether it was dropped without an answer (an exception out of the
    protocol drops a real connection).
    """
    proto = site.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    try:
        proto.dataReceived(data)
    except Exception:
        return transport.value(), True
    clock.advance(10)
    return transport.value(), False


def _post_head(content_type: bytes, body: bytes) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: sim\r\nContent-Type: " + content_type
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


class OddInputTests(SynchronousTestCase):
    """
    The simulator answers odd requests (400 JSON) and never drops the
    connection: a gateway in front of it counts a dropped connection
    against the instance (issue 7, failure 6).
    """

    def answer(self, data: bytes) -> tuple[int, Any]:
        clock = Clock()
        written, dropped = _raw(simulator_site(SETTINGS, clock), clock, data)
        self.assertFalse(dropped, "the connection was dropped")
        self.assertTrue(written.startswith(b"HTTP/1.1 "), written[:80])
        head, _, body = written.partition(b"\r\n\r\n")
        return int(head[9:12]), json.loads(body) if body else None

    def test_control_bytes_in_content_type(self) -> None:
        """
        A Content-Type carrying a byte Python treats as a line break (VT, FF,
        FS, GS, RS, NEL) made Twisted's form parsing raise, which dropped
        the connection; a control character is now a 400 JSON error, and NEL
        (obs-text, not a control character in HTTP) is served.
        """
        body = json.dumps({"messages": HELLO}).encode()
        for ct in (b"\x0bapplication/json", b"appli\x0ccation/json", b"text/\x1cplain",
                   b"multipart/\x1dform-data"):
            status, error = self.answer(_post_head(ct, body))
            self.assertEqual(status, 400, ct)
            self.assertEqual(error["error"]["code"], "invalid_header", ct)
        status, _ = self.answer(_post_head(b"application/\x85json", body))
        self.assertEqual(status, 200)

    def test_control_bytes_in_any_header(self) -> None:
        """A control character other than HTAB in any header value is a 400 JSON error."""
        status, error = self.answer(
            b"GET /v1/models HTTP/1.1\r\nHost: sim\r\nX-Odd: a\x01b\r\n\r\n")
        self.assertEqual((status, error["error"]["type"]), (400, "invalid_request_error"))
        status, _ = self.answer(b"GET /v1/models HTTP/1.1\r\nHost: sim\r\nX-Tab: a\tb\r\n\r\n")
        self.assertEqual(status, 200)

    def test_multipart_body(self) -> None:
        """
        A multipart Content-Type is not parsed as a form (the simulator reads
        JSON whatever the Content-Type): Twisted's form parsing answered a
        bare 400 and closed the connection.
        """
        status, answer = self.answer(_post_head(b"multipart/form-data; boundary=x",
                                                json.dumps({"messages": HELLO}).encode()))
        self.assertEqual((status, answer["object"]), (200, "chat.completion"))

    def test_deeply_nested_json(self) -> None:
        """JSON nested past the recursion limit is a 400, not a 500 "Processing Failed"."""
        status, error = self.answer(_post_head(b"application/json", b"[" * 100_000))
        self.assertEqual((status, error["error"]["code"]), (400, "bad_request"))
        status, error = self.answer(_post_head(
            b"application/json", b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"))
        self.assertEqual((status, error["error"]["code"]), (400, "bad_request"))

    def test_fuzzed_requests(self) -> None:
        """
        Two thousand seeded mutations of a valid request: each is answered or
        waits for more bytes; none drops the connection or answers 500.
        """
        rng = random.Random(7)
        base = _post_head(b"application/json", json.dumps(
            {"model": "m", "stream": True, "max_tokens": 3, "messages": HELLO}).encode())
        alphabet = bytes(range(256))
        for _ in range(2000):
            data = bytearray(base)
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(data))
                op = rng.random()
                if op < 0.4:
                    data[at] = rng.choice(alphabet)
                elif op < 0.7:
                    data[at:at] = bytes([rng.choice(alphabet)]) * rng.choice((1, 2, 50))
                else:
                    del data[at]
            clock = Clock()
            written, dropped = _raw(simulator_site(SETTINGS, clock), clock, bytes(data))
            self.assertFalse(dropped, bytes(data))
            self.assertFalse(written.startswith(b"HTTP/1.1 500"), bytes(data))
