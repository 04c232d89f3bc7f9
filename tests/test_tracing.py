"""
Tests for L{clawproxy.web.tracing} and L{clawproxy.otel}: the spans a data
plane (over a fake backend and a fake clock) records into the SDK's
C{InMemorySpanExporter}, the trace context sent upstream, and the config.
"""

from __future__ import annotations

import json
from typing import Any

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from clawproxy import otel
from clawproxy.config import ConfigError, parse_config
from clawproxy.interfaces import IAttemptObserver, IRequestStage, IResponseObserver
from clawproxy.web.tracing import RequestTracer
from tests.test_cache import CacheHarness
from tests.test_cache import config as cache_config
from tests.test_gateway import Harness, RefusingAgent, basic

#: A client's trace context (W3C Trace Context's own example), sampled.
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


def sent_context(seen: Any) -> tuple[int, int, bool]:
    """The trace id, span id and sampled flag of the C{traceparent} a request carried."""
    (value,) = seen.headers.getRawHeaders(b"traceparent")
    _, trace_id, span_id, flags = value.decode().split("-")
    return int(trace_id, 16), int(span_id, 16), bool(int(flags, 16) & 1)


def traced(config: dict[str, Any], sample_rate: float = 1.0) -> dict[str, Any]:
    return {**config, "tracing": {"enabled": True, "sample_rate": sample_rate}}


class TracingCase(SynchronousTestCase):
    """Data planes whose configured tracer exports to memory."""

    def setUp(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracings: list[otel.Tracing] = []

        def tracing_for(config: Any) -> otel.Tracing:
            tracing = otel.Tracing(config.sample_rate, SimpleSpanProcessor(self.exporter))
            self.tracings.append(tracing)
            return tracing

        self.patch(otel, "tracing_for", tracing_for)
        self.addCleanup(lambda: [t.provider.shutdown() for t in self.tracings])

    def spans(self) -> tuple[Any, list[Any]]:
        """The request span and its attempt spans, in order."""
        spans = self.exporter.get_finished_spans()
        (request,) = [s for s in spans if s.kind == SpanKind.SERVER]
        attempts = sorted((s for s in spans if s.kind == SpanKind.CLIENT),
                          key=lambda s: s.attributes["clawproxy.attempt"])
        return request, attempts


class RequestSpanTests(TracingCase):
    def test_request_and_attempt(self) -> None:
        """One request: a request span with what it was, one attempt span under it."""
        gw = Harness(self, traced(basic()))
        gw.clock.advance(100)
        answer = gw.request("POST", "/v1/chat/completions", {"model": "m", "messages": []})
        self.assertEqual(answer.code, 200)
        request, (attempt,) = self.spans()
        self.assertEqual(request.name, "clawproxy /v1/*")
        self.assertEqual(request.start_time, 100 * 10**9)
        attrs = dict(request.attributes)
        self.assertEqual(attrs["http.request.method"], "POST")
        self.assertEqual(attrs["url.path"], "/v1/chat/completions")
        self.assertEqual(attrs["http.response.status_code"], 200)
        self.assertEqual(attrs["clawproxy.route"], "/v1/*")
        self.assertEqual(attrs["clawproxy.pool"], "main")
        self.assertEqual(attrs["clawproxy.instance"], "a")
        self.assertEqual(attrs["clawproxy.attempts"], 1)
        self.assertEqual(attrs["clawproxy.agent"], "-")
        self.assertEqual(attrs["clawproxy.request_id"], answer.header("X-Request-ID"))
        self.assertNotIn("error.type", attrs)
        self.assertEqual(request.status.status_code, StatusCode.UNSET)
        self.assertIsNone(request.parent)

        self.assertEqual(attempt.parent.span_id, request.context.span_id)
        self.assertEqual(attempt.context.trace_id, request.context.trace_id)
        self.assertEqual(attempt.name, "clawproxy attempt a")
        self.assertEqual(dict(attempt.attributes), {
            "clawproxy.pool": "main", "clawproxy.instance": "a", "clawproxy.attempt": 1,
            "http.request.method": "POST", "clawproxy.outcome": "ok",
            "http.response.status_code": 200})

        # The upstream got the attempt span's context, sampled.
        (seen,) = gw.backend.seen
        self.assertEqual(sent_context(seen),
                         (attempt.context.trace_id, attempt.context.span_id, True))

    def test_failover(self) -> None:
        """A failover: attempt 1 failed (503 from a), attempt 2 ok (b), one trace."""
        gw = Harness(self, traced(basic(retry={"retry_on": ["5xx"], "base_delay": 0})))
        gw.backend.status["a"] = 503
        self.assertEqual(gw.request("GET", "/v1/x").code, 200)
        request, (first, second) = self.spans()
        self.assertEqual(request.attributes["clawproxy.attempts"], 2)
        self.assertEqual(request.attributes["clawproxy.instance"], "b")
        self.assertEqual((first.attributes["clawproxy.instance"],
                          first.attributes["clawproxy.outcome"],
                          first.attributes["http.response.status_code"],
                          first.attributes["error.type"]), ("a", "5xx", 503, "5xx"))
        self.assertEqual(first.status.status_code, StatusCode.ERROR)
        self.assertEqual((second.attributes["clawproxy.instance"],
                          second.attributes["clawproxy.attempt"],
                          second.attributes["clawproxy.outcome"]), ("b", 2, "ok"))
        for attempt in (first, second):
            self.assertEqual(attempt.parent.span_id, request.context.span_id)
        # Each attempt sent its own span's context upstream.
        self.assertEqual([sent_context(s) for s in gw.backend.seen],
                         [(a.context.trace_id, a.context.span_id, True) for a in (first, second)])

    def test_connect_failure(self) -> None:
        """An attempt that never connected: outcome C{refused}, no status."""
        gw = Harness(self, traced(basic(retry={"base_delay": 0})), wrap_agent=RefusingAgent)
        gw.agent.refuse.update({b"a.test:8000", b"b.test:8000"})
        self.assertEqual(gw.request("GET", "/v1/x").code, 502)
        request, attempts = self.spans()
        self.assertEqual([a.attributes["clawproxy.outcome"] for a in attempts],
                         ["refused", "refused"])
        self.assertNotIn("http.response.status_code", attempts[0].attributes)
        self.assertEqual(request.attributes["http.response.status_code"], 502)
        self.assertEqual(request.attributes["error.type"], "refused")
        self.assertEqual(request.status.status_code, StatusCode.ERROR)

    def test_client_parent(self) -> None:
        """
        The client's C{traceparent} (and C{tracestate}) is the request span's
        parent; the upstream receives the same trace id, the attempt's span id.
        """
        gw = Harness(self, traced(basic(), sample_rate=0.0))
        gw.request("GET", "/v1/x", headers={"traceparent": TRACEPARENT,
                                            "tracestate": "vendor=opaque"})
        # Sampled by the client: recorded although sample_rate is 0.
        request, (attempt,) = self.spans()
        self.assertEqual(request.context.trace_id, int(CLIENT_TRACE, 16))
        self.assertEqual(request.parent.span_id, int(CLIENT_SPAN, 16))
        self.assertTrue(request.parent.is_remote)
        (seen,) = gw.backend.seen
        self.assertEqual(sent_context(seen),
                         (int(CLIENT_TRACE, 16), attempt.context.span_id, True))
        self.assertEqual(seen.headers.getRawHeaders(b"tracestate"), [b"vendor=opaque"])

    def test_client_context_invalid(self) -> None:
        """A malformed C{traceparent} is ignored: a new trace, a valid one sent upstream."""
        gw = Harness(self, traced(basic()))
        gw.request("GET", "/v1/x", headers={"traceparent": "00-zz-not-a-context"})
        request, (attempt,) = self.spans()
        self.assertIsNone(request.parent)
        (seen,) = gw.backend.seen
        self.assertEqual(sent_context(seen),
                         (request.context.trace_id, attempt.context.span_id, True))

    def test_client_not_sampled(self) -> None:
        """A client's unsampled context is followed: nothing recorded, flag off upstream."""
        gw = Harness(self, traced(basic(), sample_rate=1.0))
        gw.request("GET", "/v1/x", headers={"traceparent": TRACEPARENT[:-2] + "00"})
        self.assertEqual(self.exporter.get_finished_spans(), ())
        (seen,) = gw.backend.seen
        trace_id, span_id, sampled = sent_context(seen)
        self.assertEqual(trace_id, int(CLIENT_TRACE, 16))
        self.assertNotEqual(span_id, int(CLIENT_SPAN, 16))  # the gateway's own span
        self.assertFalse(sampled)

    def test_sample_rate_zero(self) -> None:
        """C{sample_rate: 0}: nothing recorded, and the upstream is told not sampled."""
        gw = Harness(self, traced(basic(), sample_rate=0.0))
        for _ in range(20):
            self.assertEqual(gw.request("GET", "/v1/x").code, 200)
        self.assertEqual(self.exporter.get_finished_spans(), ())
        self.assertEqual({sent_context(s)[2] for s in gw.backend.seen}, {False})

    def test_tokens(self) -> None:
        """An LLM call's tokens (the backend's usage) are on the request span."""
        gw = Harness(self, traced(basic()))
        gw.backend.body["a"] = json.dumps({
            "choices": [{"message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        }).encode()
        gw.request("POST", "/v1/chat/completions",
                   {"model": "m", "messages": [{"role": "user", "content": "x"}]})
        request, _ = self.spans()
        self.assertEqual((request.attributes["gen_ai.usage.input_tokens"],
                          request.attributes["gen_ai.usage.output_tokens"],
                          request.attributes["clawproxy.tokens_estimated"]), (7, 3, False))
        self.assertEqual(request.attributes["gen_ai.request.model"], "m")

    def test_cache_result(self) -> None:
        """A cache MISS has an attempt; the HIT that follows has none, and says HIT."""
        gw = CacheHarness(self, traced(cache_config()))
        gw.ask()
        miss, attempts = self.spans()
        self.assertEqual(miss.attributes["clawproxy.cache"], "MISS")
        self.assertEqual(miss.attributes["clawproxy.agent"], "a")
        self.assertEqual(len(attempts), 1)
        self.exporter.clear()
        gw.ask()
        hit, attempts = self.spans()
        self.assertEqual(hit.attributes["clawproxy.cache"], "HIT")
        self.assertEqual((hit.attributes["clawproxy.attempts"], attempts), (0, []))

    def test_refused_by_auth(self) -> None:
        """A request refused before the tracing stage ran still gets its span."""
        gw = CacheHarness(self, traced(cache_config()))
        self.assertEqual(gw.ask(key="sk-wrong").code, 401)
        request, attempts = self.spans()
        self.assertEqual(request.attributes["http.response.status_code"], 401)
        self.assertEqual(attempts, [])

    def test_builtin_not_traced(self) -> None:
        """The gateway's own endpoints (C{/health}) make no spans."""
        gw = Harness(self, traced(basic()))
        self.assertEqual(gw.request("GET", "/health").code, 200)
        self.assertEqual(self.exporter.get_finished_spans(), ())


class PartsTests(TracingCase):
    def test_enabled(self) -> None:
        """Tracing on: one part, a stage of C{identify}, an observer of both kinds."""
        gw = Harness(self, traced(basic()))
        parts = gw.plane.parts
        (tracer,) = [p for p in parts.stages if p.name == "tracing"]
        self.assertIsInstance(tracer, RequestTracer)
        self.assertEqual(tracer.phase, "identify")
        self.assertTrue(IRequestStage.providedBy(tracer))
        self.assertTrue(IResponseObserver.providedBy(tracer))
        self.assertTrue(IAttemptObserver.providedBy(tracer))
        self.assertIn(tracer, parts.observers)
        self.assertEqual(parts.attempt_observers, [tracer])
        self.assertEqual(gw.relay.attempt_observers, (tracer,))
        # Last among the observers: the tokens are counted before it reads them.
        self.assertIs(parts.observers[-1], tracer)

    def test_disabled(self) -> None:
        """Tracing off (the default): no stage, no observer, no tracer built."""
        gw = Harness(self, basic())
        parts = gw.plane.parts
        everything = [*parts.stages, *parts.observers, *parts.attempt_observers]
        self.assertFalse([p for p in everything if isinstance(p, RequestTracer)])
        self.assertEqual(gw.relay.attempt_observers, ())
        self.assertEqual(self.tracings, [])
        gw.request("GET", "/v1/x", headers={"traceparent": TRACEPARENT})
        # The client's own context passes through untouched.
        (seen,) = gw.backend.seen
        self.assertEqual(seen.headers.getRawHeaders(b"traceparent"), [TRACEPARENT.encode()])


def errors(config: dict[str, Any]) -> list[str]:
    try:
        parse_config(config, environ={})
    except ConfigError as e:
        return list(e.errors)
    return []


class ConfigTests(SynchronousTestCase):
    def test_needs_extra(self) -> None:
        """
        Without the OpenTelemetry packages, C{tracing.enabled: true} is a
        config error that says what to install; tracing off needs nothing.
        """
        def import_sdk() -> None:
            raise ImportError("No module named 'opentelemetry'", name="opentelemetry")

        self.patch(otel, "import_sdk", import_sdk)
        self.assertEqual(errors(traced(basic())), [
            "tracing.enabled: needs the OpenTelemetry extra (opentelemetry is not installed):"
            " pip install 'clawproxy[otel]'"])
        self.assertEqual(errors(basic()), [])
        self.assertEqual(errors({**basic(), "tracing": {"enabled": False}}), [])

    def test_installed(self) -> None:
        """With the extra installed, tracing is accepted."""
        self.assertIsNone(otel.missing())
        self.assertEqual(errors(traced(basic())), [])

    def test_endpoint(self) -> None:
        """The endpoint is an http(s) URL, for the otlp exporter only."""
        tracing = {"enabled": True, "exporter": "console", "endpoint": "http://c:4318"}
        self.assertEqual(errors({**basic(), "tracing": tracing}),
                         ["tracing.endpoint: only the otlp exporter has an endpoint"])
        tracing = {"enabled": True, "endpoint": "collector:4318"}
        self.assertEqual(errors({**basic(), "tracing": tracing}), [
            "tracing.endpoint: must be an http:// or https:// URL, not 'collector:4318'"])

    def test_otlp_url(self) -> None:
        """A collector's base URL gets the OTLP traces path; a full URL is kept."""
        self.assertEqual(otel.otlp_url("http://c:4318"), "http://c:4318/v1/traces")
        self.assertEqual(otel.otlp_url("http://c:4318/"), "http://c:4318/v1/traces")
        self.assertEqual(otel.otlp_url("https://c/otlp/v1/traces"), "https://c/otlp/v1/traces")
        self.assertIsNone(otel.otlp_url(None))


class SlowExporter:
    """An exporter whose export blocks until released (a dead collector)."""

    def __init__(self) -> None:
        import threading

        self.release = threading.Event()
        self.exported: list[Any] = []

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.release.wait(10)
        self.exported.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 0) -> bool:
        return True


class ShutdownTests(SynchronousTestCase):
    def test_bounded(self) -> None:
        """
        Closing never holds the reactor: with an export stuck, the close still
        fires once C{bound} seconds pass (on the reactor's clock).
        """
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        exporter = SlowExporter()
        self.addCleanup(exporter.release.set)
        tracing = otel.Tracing(1.0, BatchSpanProcessor(exporter))
        tracing.tracer.start_span("x").end()
        clock = Clock()
        clock.callFromThread = lambda f, *a: None  # the thread's answer never comes
        d = tracing.close(clock, bound=5.0)
        self.assertNoResult(d)
        clock.advance(5.0)
        self.successResultOf(d)
        self.assertIs(tracing.close(clock), d)

    def test_flushes(self) -> None:
        """Closing exports the spans still queued, then fires."""
        import threading

        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        exporter = InMemorySpanExporter()
        tracing = otel.Tracing(1.0, BatchSpanProcessor(exporter, schedule_delay_millis=60000))
        tracing.tracer.start_span("queued").end()
        self.assertEqual(exporter.get_finished_spans(), ())
        fired = threading.Event()
        clock = Clock()
        clock.callFromThread = lambda f, *a: fired.set()
        tracing.close(clock)
        self.assertTrue(fired.wait(10))
        self.assertEqual([s.name for s in exporter.get_finished_spans()], ["queued"])
