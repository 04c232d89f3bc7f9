"""
Tracing over loopback: a real gateway, a simulator, and a small OTLP/HTTP
collector, all on the real reactor. The upstream sees the trace context; the
spans reach the collector by the exporter's own thread when the gateway stops.
"""

from __future__ import annotations

import json
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from clawproxy import otel
from tests.integration.helpers import HELLO, Harness, bounded, pool, wait_for

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"


class Tap(Resource):
    """In front of a simulator: keeps each request's C{traceparent}."""

    isLeaf = True

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.traceparents: list[bytes | None] = []

    def render(self, request: Any) -> Any:
        if request.path != b"/health":
            self.traceparents.append(request.getHeader(b"traceparent"))
        return self.inner.render(request)


class Collector(Resource):
    """An OTLP/HTTP trace collector: decodes each export it is sent."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[bytes] = []
        self.spans: list[Any] = []

    def render_POST(self, request: Any) -> bytes:
        self.paths.append(request.path)
        export = ExportTraceServiceRequest()
        export.ParseFromString(request.content.read())
        for resource_spans in export.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        request.setHeader(b"content-type", b"application/x-protobuf")
        return b""


class LoopbackTests(TestCase):
    timeout = 60

    async def test_traceparent_upstream_and_export(self) -> None:
        """
        A client's traceparent: the simulator receives one with the same trace
        id (the gateway's attempt span as parent); on stop, the request and
        attempt spans are exported to the collector, within the bound.
        """
        h = Harness(self)
        sim = h.simulator("sim-1")
        tap = Tap(sim.site.resource)
        sim.site.resource = tap
        collector = Collector()
        otlp = h.serve(collector, "collector")
        config = h.config({"main": pool(sim)}, [{"path": "/v1/*", "pool": "main"}],
                          tracing={"enabled": True, "sample_rate": 1.0, "endpoint": otlp.url})
        gw = await h.gateway(config)
        client = h.client()
        response = await bounded(client.post(
            gw.url + "/v1/chat/completions", json.dumps(HELLO).encode(),
            headers={"Content-Type": ["application/json"], "traceparent": [TRACEPARENT]}))
        self.assertEqual(response.code, 200)
        body = json.loads(await bounded(response.content()))
        self.assertIn("choices", body)

        (sent,) = tap.traceparents
        self.assertIsNotNone(sent)
        version, trace_id, span_id, flags = sent.decode().split("-")
        self.assertEqual((version, trace_id), ("00", CLIENT_TRACE))
        self.assertNotEqual(span_id, "00f067aa0ba902b7")
        self.assertTrue(int(flags, 16) & 1)

        await h._reset_connections()
        started = reactor.seconds()
        await bounded(gw.gateway.stopService(), otel.SHUTDOWN_BOUND + 2)
        self.assertLess(reactor.seconds() - started, otel.SHUTDOWN_BOUND + 1)
        await wait_for(lambda: len(collector.spans) >= 2, "the spans at the collector")
        self.assertEqual(set(collector.paths), {b"/v1/traces"})
        by_name = {s.name: s for s in collector.spans}
        request = by_name["clawproxy /v1/*"]
        attempt = by_name["clawproxy attempt sim-1"]
        self.assertEqual(request.trace_id.hex(), CLIENT_TRACE)
        self.assertEqual(attempt.trace_id.hex(), CLIENT_TRACE)
        self.assertEqual(attempt.parent_span_id, request.span_id)
        self.assertEqual(attempt.span_id.hex(), span_id)
        attrs = {a.key: a.value for a in request.attributes}
        self.assertEqual(attrs["http.response.status_code"].int_value, 200)
        self.assertEqual(attrs["clawproxy.instance"].string_value, "sim-1")
        self.assertGreater(attrs["gen_ai.usage.output_tokens"].int_value, 0)
