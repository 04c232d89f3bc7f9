"""
Tracing (C{tracing}, the extra C{clawproxy[otel]}): an OpenTelemetry span
per request and a child span per upstream attempt.

The request span's parent is the client's W3C trace context
(C{traceparent}, C{tracestate}) when it sent one; each attempt sends its own
span's context upstream. Spans are timed on the gateway's clock and ended on
the reactor thread; exporting happens on the span processor's thread
(L{clawproxy.otel}).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from zope.interface import implementer

from clawproxy.interfaces import CANCELLED, OK, IAttemptObserver, IRequestStage, IResponseObserver
from clawproxy.web.context import RequestContext

#: Where the request span is kept.
NOTE = "tracing"


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


@implementer(IRequestStage, IResponseObserver, IAttemptObserver)
class RequestTracer:
    """
    The feature's one part: starts the request span (a stage of the
    C{identify} phase), adds an attempt span around each upstream attempt
    (and its trace context to the upstream request), and ends the request
    span with what the request turned out to be (an observer).
    """

    name = "tracing"
    phase = "identify"

    def __init__(self, tracing: Any, clock: Any) -> None:
        """
        @param tracing: a L{clawproxy.otel.Tracing}.
        """
        from opentelemetry import trace

        self.tracing = tracing
        self.clock = clock
        self._trace = trace
        self._server = trace.SpanKind.SERVER
        self._client = trace.SpanKind.CLIENT
        self._error = trace.StatusCode.ERROR

    # -- the request span ------------------------------------------------

    def process(self, ctx: RequestContext) -> None:
        self._start(ctx)

    def _start(self, ctx: RequestContext) -> Any:
        """Start C{ctx}'s request span, its parent the client's trace context."""
        headers = ctx.request.requestHeaders
        parent = None
        traceparent = headers.getRawHeaders(b"traceparent")
        if traceparent:
            carrier = {"traceparent": traceparent[0].decode("latin-1")}
            tracestate = headers.getRawHeaders(b"tracestate")
            if tracestate:
                carrier["tracestate"] = b",".join(tracestate).decode("latin-1")
            parent = self.tracing.propagator.extract(carrier)
        span = self.tracing.tracer.start_span(
            "clawproxy", context=parent, kind=self._server, start_time=_ns(ctx.started),
            attributes={
                "http.request.method": ctx.method.decode("latin-1"),
                "url.path": ctx.path.decode("latin-1"),
                "client.address": ctx.client_ip,
                "clawproxy.request_id": ctx.request_id,
            },
        )
        if ctx.notes is None:
            ctx.notes = {}
        ctx.notes[NOTE] = span
        return span

    def completed(self, ctx: RequestContext) -> None:
        notes = ctx.notes
        span = notes.get(NOTE) if notes else None
        if span is None:
            if ctx.error is None or ctx.request is None:
                return  # a builtin endpoint (/health, /metrics...): not traced
            span = self._start(ctx)  # refused before this stage ran (auth)
        span.update_name(f"clawproxy {ctx.route_name}")
        if span.is_recording():
            status = ctx.status or ctx.request.code
            attrs: dict[str, Any] = {
                "http.response.status_code": status,
                "clawproxy.route": ctx.route_name,
                "clawproxy.agent": ctx.agent_name,
                "clawproxy.attempts": ctx.attempts,
            }
            if ctx.pool is not None:
                attrs["clawproxy.pool"] = ctx.pool.name
            if ctx.instance is not None:
                attrs["clawproxy.instance"] = ctx.instance.id
            rec = notes.get("tokens") if notes else None
            model = ctx.model or getattr(rec, "model", None)
            if model is not None:
                attrs["gen_ai.request.model"] = model
            cache = ctx.request.responseHeaders.getRawHeaders(b"x-cache")
            if cache:
                attrs["clawproxy.cache"] = cache[0].decode("latin-1")
            usage = getattr(rec, "usage", None)
            if usage is not None:
                attrs["gen_ai.usage.input_tokens"] = usage.prompt
                attrs["gen_ai.usage.output_tokens"] = usage.completion
                attrs["clawproxy.tokens_estimated"] = usage.estimated
            if ctx.error is not None:
                attrs["error.type"] = ctx.error
            span.set_attributes(attrs)
            if status >= 500 or ctx.aborted:
                span.set_status(self._error, ctx.error)
        span.end(end_time=_ns(self.clock.seconds()))

    # -- attempt spans ---------------------------------------------------

    def attempt_started(self, ctx: RequestContext, attempt: Any) -> Any:
        notes = ctx.notes
        parent = notes.get(NOTE) if notes else None
        if parent is None:
            parent = self._start(ctx)
        trace = self._trace
        span = self.tracing.tracer.start_span(
            f"clawproxy attempt {attempt.instance.id}",
            context=trace.set_span_in_context(parent), kind=self._client,
            start_time=_ns(self.clock.seconds()),
            attributes={
                "clawproxy.pool": attempt.pool.name,
                "clawproxy.instance": attempt.instance.id,
                "clawproxy.attempt": attempt.number,
                "http.request.method": ctx.method.decode("latin-1"),
            },
        )
        carrier: dict[str, str] = {}
        self.tracing.propagator.inject(carrier, context=trace.set_span_in_context(span))
        attempt.headers.extend((k.encode(), v.encode("latin-1")) for k, v in carrier.items())
        return span

    def attempt_ended(self, ctx: RequestContext, attempt: Any, span: Any) -> None:
        if span.is_recording():
            outcome = attempt.outcome
            attrs: dict[str, Any] = {"clawproxy.outcome": outcome}
            if attempt.status:
                attrs["http.response.status_code"] = attempt.status
            if outcome not in (OK, CANCELLED):
                attrs["error.type"] = outcome
                span.set_status(self._error, outcome)
            span.set_attributes(attrs)
        span.end(end_time=_ns(self.clock.seconds()))


def tracing_parts(config: Any, clock: Any, **_: Any) -> Iterable[Any]:
    """
    The feature (L{clawproxy.web.dataplane.FEATURES}): with C{tracing.enabled},
    a L{RequestTracer} over the process's tracer for these settings; nothing
    otherwise (no stage, no observer: tracing off costs nothing).
    """
    if not config.tracing.enabled:
        return ()
    from clawproxy.otel import tracing_for

    return (RequestTracer(tracing_for(config.tracing), clock),)
