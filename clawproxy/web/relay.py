"""
The attempt loop: one request relayed to a pool, with failover.

Header hygiene lives in L{clawproxy.web.headers}, the body pipe in
L{clawproxy.web.pipe}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import UNKNOWN_LENGTH

from clawproxy.backends.tls import tls_failure
from clawproxy.compat import client_gone, drop_response_connection
from clawproxy.errors import Rejected, bad_gateway, gateway_timeout, unavailable
from clawproxy.interfaces import CANCELLED, OK
from clawproxy.metrics import Metrics
from clawproxy.web.context import RequestContext
from clawproxy.web.headers import forwarded_headers, response_headers
from clawproxy.web.pipe import (
    BytesProducer,
    Discard,
    NoFirstChunk,
    StreamPipe,
    StreamStalled,
    TranslateFilter,
    UpstreamBroken,
    begin_filters,
    body_producer,
)


@attrs.define(slots=True, eq=False)
class Attempt:
    """
    One upstream attempt, as the L{IAttemptObserver}s see it (made only when
    there are some).

    @ivar number: 1 for the request's first attempt, 2 for the next...
    @ivar headers: C{(name, value)} bytes pairs added to the upstream request.
    @ivar status: the upstream's status code, 0 until (unless) one comes.
    @ivar outcome: L{OK}, L{CANCELLED} or a failure name, once it ended.
    """

    pool: Any
    instance: Any
    number: int
    headers: list[tuple[bytes, bytes]] = attrs.Factory(list)
    status: int = 0
    outcome: str | None = None


class NoInstance(Exception):
    """No instance of the pool could take the request."""


class _GiveUp(Exception):
    """
    A connect failure (C{ctx.error}) that is not retried: the caller, which
    knows the instances tried, answers.
    """


def classify(failure: Failure) -> str:
    """Name the kind of upstream failure, as used in C{retry.retry_on}."""
    if failure.check(ConnectionRefusedError):
        return "refused"
    if failure.check(TimeoutError, defer.TimeoutError):
        return "timeout"
    if failure.check(ConnectError, DNSLookupError, ResponseNeverReceived):
        # ResponseNeverReceived: the connection closed before any response
        # byte, which is how a killed backend or a stale pooled connection
        # shows itself; nothing reached the client, so it is safe to resend.
        return "connect_failure"
    return "error"


class Relay:
    """
    Send requests to a pool's instances through one L{IAgent}.

    Which instance takes each attempt is the registry's decision
    (L{clawproxy.backends.registry.Pool.take}); every attempt's outcome goes
    back through one path, L{_record}, which also decides the retry.

    @ivar agent: the upstream agent (one persistent connection pool).
    """

    log = Logger()

    def __init__(self, agent: Any, clock: IReactorTime, metrics: Metrics,
                 retry_policy: Any, trusted_proxies: Sequence[Any] = (),
                 filters: Sequence[Any] = (), attempt_observers: Sequence[Any] = ()) -> None:
        self.agent = agent
        #: The L{IAttemptObserver}s told about each upstream attempt.
        self.attempt_observers = tuple(attempt_observers)
        #: The data plane's L{IResponseFilter}s, asked about each relayed response.
        self.filters = tuple(filters)
        self.clock = clock
        self.metrics = metrics
        self.retry = retry_policy
        self.trusted = tuple(trusted_proxies)

    async def forward(self, ctx: RequestContext, pool: Any, key: str | None,
                      sticky_key: str | None, timeout: float, upstream_path: bytes) -> None:
        """
        Relay C{ctx.request} to C{pool}, failing over per its retry policy.

        Returns once the response has been relayed in full.

        @param key: the balancer's hash key (client IP, session...), if any.
        @param sticky_key: the session-affinity key, if the pool has affinity.

        @raise Rejected: when the gateway must answer (no instance, timeout, 5xx
            with nothing to fail over to is relayed as is, not raised).
        @raise NoInstance: when no instance could take it (caller falls back).
        """
        tried: set[str] = set()
        names: list[str] = []  # every instance attempted, in order, for the error message
        self.retry.record_request(pool)
        metrics = self.metrics
        while True:
            inst = pool.take(key, tried, sticky_key)
            if isinstance(inst, Deferred):
                inst = await inst
            if inst is None:
                if names and ctx.error:
                    raise _failure_rejection(ctx.error, names)
                raise NoInstance(pool.name)
            tried.add(inst.id)
            if inst.id not in names:
                names.append(inst.id)
            ctx.instance = inst
            ctx.attempts += 1
            inst.active += 1
            inst.requests += 1
            active_gauge = metrics.active_connections.labels(pool.name, inst.id)
            active_gauge.inc()
            attempt = tokens = None
            if self.attempt_observers:
                attempt = Attempt(pool, inst, ctx.attempts)
                tokens = self._attempt_started(ctx, attempt)
            started = self.clock.seconds()
            try:
                delay = await self._attempt(ctx, pool, inst, timeout, upstream_path, started,
                                            tried, attempt)
            except _GiveUp:
                if attempt is not None:
                    self._attempt_ended(ctx, attempt, tokens, ctx.error or "error")
                raise _failure_rejection(ctx.error, names) from None
            except BaseException as e:
                if attempt is not None:
                    self._attempt_ended(ctx, attempt, tokens, _failed_with(ctx, e))
                raise
            finally:
                inst.active -= 1
                active_gauge.dec()
                elapsed = self.clock.seconds() - started
                metrics.upstream_latency.labels(pool.name, inst.id).observe(elapsed)
                if pool.latency_watchers:
                    pool.latency(inst, elapsed)
            if attempt is not None:
                # A relayed answer may still have failed in-band (ctx.error: truncated,
                # stall_timeout); a retried one failed with ctx.error.
                self._attempt_ended(ctx, attempt, tokens,
                                    OK if delay is None and ctx.error is None
                                    else ctx.error or "error")
            if delay is None:
                return
            metrics.upstream_retries_total.labels(pool.name).inc()
            if delay > 0:
                await deferLater(self.clock, delay)

    def _attempt_started(self, ctx: RequestContext, attempt: Attempt) -> list[Any]:
        """Tell the attempt observers C{attempt} starts; their tokens."""
        tokens = []
        for observer in self.attempt_observers:
            try:
                tokens.append(observer.attempt_started(ctx, attempt))
            except Exception:
                self.log.failure("attempt observer {observer} failed", observer=observer)
                tokens.append(None)
        return tokens

    def _attempt_ended(self, ctx: RequestContext, attempt: Attempt, tokens: Any,
                       outcome: str) -> None:
        """Tell the attempt observers C{attempt} ended with C{outcome}."""
        attempt.outcome = outcome
        for observer, token in zip(self.attempt_observers, tokens):
            try:
                observer.attempt_ended(ctx, attempt, token)
            except Exception:
                self.log.failure("attempt observer {observer} failed", observer=observer)

    async def _attempt(self, ctx: RequestContext, pool: Any, inst: Any, timeout: float,
                       upstream_path: bytes, started: float, tried: set[str],
                       attempt: Attempt | None = None) -> float | None:
        """
        One upstream attempt to C{inst}, which the pool admitted. Returns None
        when the response was relayed, else the delay before retrying a
        failure that nothing reached the client for.

        @raise Rejected: the failure is not retried and the gateway answers.
        @raise _GiveUp: a connect failure that is not retried.
        """
        request = ctx.request
        metrics = self.metrics
        rewrite = ctx.rewrite
        try:
            if rewrite is None:
                url = inst.url_bytes + upstream_path
                producer = body_producer(request.content)
            else:
                url = inst.url_bytes + (rewrite.path or upstream_path)
                producer = BytesProducer(rewrite.body)
            if ctx.query:
                url += b"?" + ctx.query
            headers = forwarded_headers(request, ctx, inst.host_header, self.trusted,
                                        attempt.headers if attempt is not None else ())
            d = self.agent.request(ctx.method, url, headers, producer)
        except BaseException:
            pool.record(inst, CANCELLED)  # the admitted attempt never started
            raise
        d.addTimeout(timeout, self.clock, onTimeoutCancel=_timed_out)
        try:
            response = await d
        except CancelledError:
            pool.record(inst, CANCELLED)
            raise
        except Exception:
            if client_gone(request):
                # The client left: Agent reports its cancellation as
                # ResponseNeverReceived([CancelledError]). Not the instance's
                # fault, and nobody to retry for.
                pool.record(inst, CANCELLED)
                raise CancelledError() from None
            failure = Failure()
            outcome = classify(failure)
            ctx.error = outcome
            if outcome == "error":
                if failure.check(ResponseFailed):
                    # A head Twisted's client refused (or one over our caps):
                    # the backend's fault, not a gateway bug; no traceback.
                    self.log.warn("bad response head from {instance}: {why}",
                                  instance=inst.id, why=_describe(failure))
                else:
                    self.log.failure("request to {instance} failed", failure, instance=inst.id)
            tls = tls_failure(failure)
            if tls is not None:
                # Not transient: the same instance would fail the same way.
                self.log.warn("TLS with {instance} failed: {why}", instance=inst.id, why=tls)
            elif failure.check(ResponseNeverReceived):
                # Most often a keep-alive connection the backend closed as we
                # sent on it: the instance itself may be fine, so it stays a
                # candidate for the retry (a dead one then refuses at once).
                tried.discard(inst.id)
            # A connection that never opened sent nothing upstream.
            reached = not failure.check(ConnectError, DNSLookupError)
            delay = self._record(ctx, pool, inst, outcome, outcome, tried, reached)
            if delay is not None:
                return delay
            if outcome == "timeout":
                raise gateway_timeout(
                    f"upstream {inst.id} did not answer within {timeout:g}s"
                ) from None
            raise _GiveUp() from None
        now = self.clock.seconds()
        code = response.code
        if attempt is not None:
            attempt.status = code
        metrics.upstream_ttfb.labels(pool.name, inst.id).observe(now - started)
        # A 5xx, however quick, counts as slow as the timeout for least_latency.
        pool.ttfb(inst, now - started if code < 500 else timeout)
        label = str(code)  # the status label of upstream_requests_total
        first = pool.config.first_token_timeout
        # A stream watched for its first chunk succeeds only once that chunk
        # comes: until then the attempt's outcome is open (one record each).
        watch_first = bool(first) and code < 500 and _is_stream(response)
        if code >= 500:
            delay = self._record(ctx, pool, inst, "5xx", label, tried)
            if delay is not None or ctx.alternative:
                ctx.error = "5xx"
                response.deliverBody(Discard())
                if delay is None:  # the caller tries elsewhere (another model)
                    raise bad_gateway(f"upstream {inst.id} answered {code}")
                return delay
        elif not watch_first:
            self._record(ctx, pool, inst, OK, label, tried)
        try:
            if code < 100 or code > 599:
                raise bad_gateway(f"upstream {inst.id} sent status {code}")
            relayed = response_headers(response)
        except Rejected as e:
            # Garbage from upstream: don't read it, don't reuse the connection.
            self.log.warn("bad response head from {instance}: {why}", instance=inst.id,
                          why=e.message)
            ctx.error = "bad_upstream_response"
            if watch_first:  # no body will be read: settle the attempt as unwatched ones are
                self._record(ctx, pool, inst, OK, label, tried)
            response.deliverBody(Discard())
            drop_response_connection(response)
            raise
        ctx.status = code
        ctx.error = None
        translator = None
        if rewrite is not None:
            translator = rewrite.response() if 200 <= code < 300 else (
                rewrite.error(code) if code >= 400 else None)
        if translator is not None:
            relayed = [h for h in relayed if h[0] != b"content-type"]
            relayed.append((b"content-type", translator.content_type))
        chain = begin_filters(self.filters, ctx, code, relayed)
        if translator is not None:
            chain = (TranslateFilter(translator), *chain)
        saved_headers = request.responseHeaders.copy()
        request.setResponseCode(code, response.phrase)
        rh = request.responseHeaders
        for name, value in relayed:
            rh.addRawHeader(name, value)
        for name, value in ctx.response_headers:
            rh.setRawHeaders(name, [value.replace(b"${instance}", inst.id.encode())])
        rh.setRawHeaders(b"server-timing", [b"gateway;dur=%.1f, upstream;dur=%.1f" % (
            (started - ctx.started) * 1000, (now - started) * 1000)])
        if response.length is not UNKNOWN_LENGTH and not (
                chain and any(f.rewrites for f in chain)):
            rh.setRawHeaders(b"content-length", [b"%d" % response.length])
        if ctx.method == b"HEAD" or code in (204, 304):
            if watch_first:
                self._record(ctx, pool, inst, OK, label, tried)
            response.deliverBody(Discard())
            return None
        pipe = StreamPipe(request, ctx, self.clock, pool.config.stall_timeout, chain)
        if watch_first:
            pipe.first_chunk_timeout = first
            pipe.first_chunk = lambda: self._record(ctx, pool, inst, OK, label, tried)
        response.deliverBody(pipe)
        try:
            await pipe.done
        except NoFirstChunk:
            # Nothing reached the client: undo this answer and try elsewhere.
            _take_back(ctx, saved_headers, "first_token_timeout")
            delay = self._record(ctx, pool, inst, ctx.error, ctx.error, tried)
            if delay is None:
                raise gateway_timeout(
                    f"upstream {inst.id} sent no first chunk within {first:g}s") from None
            return delay
        except CancelledError:
            if pipe.first_chunk is not None:
                pool.record(inst, CANCELLED)
            raise
        except StreamStalled:
            pipe.settle_first_chunk()
            metrics.upstream_errors_total.labels(pool.name, inst.id, "stall_timeout").inc()
            raise
        except Exception:
            if pipe.first_chunk is not None:
                # A watched stream that broke before its first chunk failed.
                pipe.first_chunk = None
                self._record(ctx, pool, inst, "error", "error", tried)
            failure = Failure()
            if failure.check(ResponseFailed, UpstreamBroken):
                self.log.warn("bad response body from {instance}: {why}",
                              instance=inst.id, why=_describe(failure))
            else:
                self.log.failure("relaying body from {instance}", failure, instance=inst.id)
            if not request.startedWriting and not client_gone(request):
                # No byte reached the client yet: it can still get a 502.
                _take_back(ctx, saved_headers, "bad_upstream_response")
                metrics.upstream_errors_total.labels(pool.name, inst.id, "truncated").inc()
                raise bad_gateway(
                    f"upstream {inst.id} broke off its response") from None
            ctx.error = "truncated"
            metrics.upstream_errors_total.labels(pool.name, inst.id, "truncated").inc()
            raise UpstreamBroken(inst.id) from None
        pipe.settle_first_chunk()
        if ctx.error is not None:
            # Ended in-band after the upstream failed (an SSE error event):
            # "truncated" or "stall_timeout".
            metrics.upstream_errors_total.labels(pool.name, inst.id, ctx.error).inc()
        return None

    def _record(self, ctx: RequestContext, pool: Any, inst: Any, outcome: str, label: str,
                tried: set[str], reached: bool = True) -> float | None:
        """
        The one bookkeeping path of an attempt's outcome: the
        C{upstream_requests_total} sample, then the registry (the instance's
        failure count, passive health, breakers), then the retry decision.

        @param outcome: L{OK} or a failure name as in C{retry.retry_on}.
        @param label: the metric's C{status} label (the status code, or the outcome).
        @param tried: ids not to retry on.
        @param reached: L{False} when the connection never opened.
        @return: the delay before retrying elsewhere, or L{None}: success, a
            timeout (never retried), nowhere else to go, or the retry policy
            says no.
        """
        self.metrics.upstream_requests_total.labels(pool.name, inst.id, label).inc()
        if outcome != OK:
            self.metrics.upstream_errors_total.labels(pool.name, inst.id, outcome).inc()
        pool.record(inst, outcome, reached, client=ctx.client_ip)
        if outcome == OK or outcome == "timeout" or not pool.candidates(tried):
            return None
        return self.retry.should_retry(pool, outcome, ctx.attempts, reached)


_STREAM_TYPES = (b"text/event-stream", b"application/x-ndjson")


def _is_stream(response: Any) -> bool:
    ctype = response.headers.getRawHeaders(b"content-type")
    return bool(ctype) and ctype[0].lower().startswith(_STREAM_TYPES)


def _take_back(ctx: RequestContext, saved_headers: Any, error: str) -> None:
    """
    Undo the answer an attempt began (status and headers) before any byte
    of it reached the client, and note why it failed.
    """
    request = ctx.request
    request.responseHeaders = saved_headers
    request.setResponseCode(200)
    ctx.status = 0
    ctx.error = error


def _failed_with(ctx: RequestContext, e: BaseException) -> str:
    """The outcome of an attempt that raised C{e}, for the attempt observers."""
    if isinstance(e, CancelledError):
        return CANCELLED
    return ctx.error or getattr(e, "code", None) or "error"


def _failure_rejection(outcome: str | None, tried: Sequence[str]) -> Rejected:
    """
    The gateway's answer when the last attempt failed with C{outcome} and
    no other attempt follows. (A timeout is never retried: L{Relay._attempt}
    answers it itself.)
    """
    if outcome == "5xx":
        return bad_gateway("every instance tried answered with an error")
    if outcome in ("connect_failure", "refused"):
        message = "could not connect to any upstream instance"
        if tried:
            message += f" (tried {', '.join(tried)})"
        return Rejected(502, message, "upstream_error", "upstream_unreachable")
    return bad_gateway()


def _describe(failure: Failure) -> str:
    """
    What went wrong with an upstream response, in one short line: the
    reasons a C{ResponseFailed} wraps (a parse error, a closed connection,
    a body cut short), else the exception itself.
    """
    exc = failure.value
    reasons = exc.reasons if isinstance(exc, ResponseFailed) else [failure]
    parts = []
    for reason in reasons:
        e = getattr(reason, "value", reason)
        if isinstance(e, ConnectionDone):
            parts.append("connection closed")
        elif isinstance(e, ConnectionLost):
            parts.append("connection lost")
        else:
            text = str(e)
            parts.append(f"{type(e).__name__}: {text}" if text else type(e).__name__)
    return "; ".join(parts)[:300]


def _timed_out(result: Any, timeout: float) -> Any:
    """
    C{addTimeout}'s C{onTimeoutCancel} for upstream requests: a request
    cancelled by its timeout fails with C{ResponseNeverReceived([CancelledError])}
    (not C{CancelledError}), which must still count as a timeout.
    """
    if isinstance(result, Failure):
        raise defer.TimeoutError(timeout, "upstream request")
    return result


__all__ = ["Attempt", "NoInstance", "Relay", "UpstreamBroken", "unavailable"]
