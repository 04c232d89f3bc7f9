"""
OpenTelemetry, the optional extra C{clawproxy[otel]}: the tracer of a
C{tracing} configuration, and its shutdown.

Nothing here imports OpenTelemetry at module level: a gateway without the
extra loads this module (to say what is missing) and never the SDK.

Spans leave the process through a C{BatchSpanProcessor}, which queues them
(a bounded deque, dropping when full) and exports from its own thread: the
reactor thread only appends to the queue. One L{Tracing} per distinct
settings lives for the whole process (a reload that keeps the settings keeps
the tracer); L{close_all} flushes and stops them when the gateway stops.
"""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from clawproxy import __version__

log = Logger()

#: What to do when the extra is missing (the config error says it).
INSTALL = "pip install 'clawproxy[otel]'"
#: How long a stopping gateway waits for its spans to be exported.
SHUTDOWN_BOUND = 5.0
#: Seconds one OTLP export may take (the exporter's own timeout).
EXPORT_TIMEOUT = 5.0


def import_sdk() -> None:
    """
    Import the packages tracing needs.

    @raise ImportError: one is not installed.
    """
    import opentelemetry.exporter.otlp.proto.http.trace_exporter
    import opentelemetry.sdk.trace
    import opentelemetry.trace  # noqa: F401


def missing() -> str | None:
    """
    Why tracing cannot be enabled here: L{None} when the extra is installed,
    else a message that names what to install.
    """
    try:
        import_sdk()
    except ImportError as e:
        what = f" ({e.name} is not installed)" if e.name else ""
        return f"needs the OpenTelemetry extra{what}: {INSTALL}"
    return None


def otlp_url(endpoint: str | None) -> str | None:
    """
    The OTLP/HTTP traces URL for C{endpoint}: a collector's base URL gets
    C{/v1/traces}; a URL with a path is used as is; L{None} leaves the
    exporter's default (C{OTEL_EXPORTER_OTLP_TRACES_ENDPOINT}, else
    C{http://localhost:4318/v1/traces}).
    """
    if endpoint is None:
        return None
    scheme, sep, rest = endpoint.partition("://")
    if "/" not in rest.rstrip("/"):
        return f"{scheme}{sep}{rest.rstrip('/')}/v1/traces"
    return endpoint


class Tracing:
    """
    A tracer with its own provider (never the global one), its sampler
    (C{ParentBased(TraceIdRatioBased(sample_rate))}) and the W3C trace-context
    propagator.

    @ivar tracer: the OpenTelemetry tracer spans are started with.
    @ivar propagator: reads and writes C{traceparent} and C{tracestate}.
    """

    def __init__(self, sample_rate: float, processor: Any) -> None:
        """
        @param processor: the span processor spans go to once ended (a
            C{BatchSpanProcessor} over the configured exporter; tests give a
            C{SimpleSpanProcessor} over an C{InMemorySpanExporter}).
        """
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import (
            TraceContextTextMapPropagator,
        )

        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(sample_rate)),
            resource=Resource.create({"service.name": "clawproxy",
                                      "service.version": __version__}),
            shutdown_on_exit=False,
        )
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("clawproxy", __version__)
        self.propagator = TraceContextTextMapPropagator()
        self.closed: Deferred[None] | None = None

    @classmethod
    def from_config(cls, config: Any) -> Tracing:
        """A tracer exporting as the C{tracing} section C{config} says."""
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        if config.exporter == "console":
            exporter: Any = ConsoleSpanExporter(service_name="clawproxy")
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=otlp_url(config.endpoint),
                                        timeout=EXPORT_TIMEOUT)
        return cls(config.sample_rate, BatchSpanProcessor(exporter))

    def close(self, reactor: Any, bound: float = SHUTDOWN_BOUND) -> Deferred[None]:
        """
        Export what is queued and stop, off the reactor thread: fires once the
        provider has shut down or after C{bound} seconds, whichever comes
        first (an unreachable collector never holds a stopping gateway).
        """
        if self.closed is not None:
            return self.closed
        done: Deferred[None] = Deferred()
        self.closed = done

        def fire() -> None:
            if not done.called:
                done.callback(None)

        def run() -> None:
            try:
                self.provider.shutdown()
            except Exception:
                log.failure("tracing shutdown failed")
            reactor.callFromThread(fire)

        # A daemon thread, not the reactor's pool: the pool is joined when the
        # reactor stops, and an export stuck on a dead collector must not hold that.
        threading.Thread(target=run, name="clawproxy-tracing-shutdown", daemon=True).start()
        timer = reactor.callLater(bound, fire)
        done.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return done


#: The process's tracers, by settings (kept across reloads).
_live: dict[tuple[float, str, str | None], Tracing] = {}


def tracing_for(config: Any) -> Tracing:
    """The process's L{Tracing} for the C{tracing} section C{config}."""
    key = (config.sample_rate, config.exporter, config.endpoint)
    tracing = _live.get(key)
    if tracing is None:
        tracing = _live[key] = Tracing.from_config(config)
    return tracing


def close_all(reactor: Any, bound: float = SHUTDOWN_BOUND) -> Deferred[None]:
    """
    Flush and stop every tracer of the process (the gateway is stopping);
    fires within C{bound} seconds.
    """
    from twisted.internet.defer import DeferredList

    tracers = list(_live.values())
    _live.clear()
    d = DeferredList([t.close(reactor, bound) for t in tracers], consumeErrors=True)
    d.addCallback(lambda _: None)
    return d
