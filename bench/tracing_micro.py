"""
What tracing costs per request, in process (no sockets).

    PYTHONPATH=. python3 bench/tracing_micro.py [--n 3000]

1. The tracer's own work for one request with one upstream attempt (request span
   started, attempt span started and its ``traceparent`` written, both ended),
   sampled (spans go to a C{BatchSpanProcessor} over an exporter that drops them,
   its thread exporting as in production), unsampled (C{sample_rate: 0}) and
   under a client's sampled ``traceparent``.
2. A whole request through the data plane (the tests' in-process harness: fake
   backend, fake clock, StubTreq), tracing off vs on (sampled).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from clawproxy import otel
from clawproxy.interfaces import OK
from clawproxy.web.context import RequestContext
from clawproxy.web.relay import Attempt
from clawproxy.web.tracing import RequestTracer

TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Drop(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class _Named:
    def __init__(self, name: str) -> None:
        self.name = self.id = name


def tracing(rate: float) -> otel.Tracing:
    return otel.Tracing(rate, BatchSpanProcessor(Drop()))


def tracer_work(rate: float, parent: bytes | None, n: int) -> float:
    """Microseconds of tracer work per request (best of 5)."""
    clock = Clock()
    tracer = RequestTracer(tracing(rate), clock)
    pool, inst = _Named("main"), _Named("a")
    best = float("inf")
    for _ in range(5):
        ctxs = []
        for i in range(n):
            request = DummyRequest([b"v1", b"chat", b"completions"])
            if parent is not None:
                request.requestHeaders.setRawHeaders(b"traceparent", [parent])
            ctx = RequestContext(request, f"r{i}", "127.0.0.1", b"POST",
                                 b"/v1/chat/completions", b"", 0.0)
            ctx.status = 200
            ctxs.append(ctx)
        start = time.perf_counter()
        for ctx in ctxs:
            tracer.process(ctx)
            attempt = Attempt(pool, inst, 1)
            span = tracer.attempt_started(ctx, attempt)
            attempt.outcome, attempt.status = OK, 200
            tracer.attempt_ended(ctx, attempt, span)
            tracer.completed(ctx)
        best = min(best, time.perf_counter() - start)
    tracer.tracing.provider.shutdown()
    return best / n * 1e6


def whole_request(enabled: bool, n: int) -> float:
    """Microseconds per request through the in-process data plane (best of 5)."""
    from tests.test_gateway import Harness, basic

    config = basic()
    if enabled:
        config["tracing"] = {"enabled": True, "sample_rate": 1.0}
    made: list[otel.Tracing] = []

    def tracing_for(cfg: Any) -> otel.Tracing:
        made.append(tracing(cfg.sample_rate))
        return made[-1]

    saved, otel.tracing_for = otel.tracing_for, tracing_for
    try:
        gw = Harness(SynchronousTestCase(), config)
    finally:
        otel.tracing_for = saved
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            gw.request("POST", "/v1/chat/completions", body)
            gw.clients.clear()
        best = min(best, time.perf_counter() - start)
    for t in made:
        t.provider.shutdown()
    return best / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=3000)
    n = parser.parse_args().n
    print(f"tracer work per request, sampled:             {tracer_work(1.0, None, n):7.1f} us")
    print(f"tracer work per request, sample_rate 0:       {tracer_work(0.0, None, n):7.1f} us")
    print(f"tracer work per request, client parent (01):  "
          f"{tracer_work(0.0, TRACEPARENT, n):7.1f} us")
    offs, ons = [], []
    for _ in range(3):  # alternated, so the machine's load falls on both alike
        offs.append(whole_request(False, n // 3))
        ons.append(whole_request(True, n // 3))
    off, on = sorted(offs)[1], sorted(ons)[1]
    print("whole request in process, tracing off (3 runs):  "
          + ", ".join(f"{x:.0f}" for x in offs) + f" us, median {off:.0f}")
    print("whole request in process, tracing on  (3 runs):  "
          + ", ".join(f"{x:.0f}" for x in ons) + f" us, median {on:.0f} (+{on - off:.0f})")


if __name__ == "__main__":
    main()
