"""
The data plane: the resource every client request reaches.

Request flow (SPEC section 3), read top to bottom in L{GatewayResource._handle}:
size checks, request id, builtin endpoints, phase C{identify}, routing, phase
C{route}, pool and model choice, phase C{pool}, request transforms and
rewrites, then the relay (availability decision, balancer, attempts with
failover, response filters), response transforms, observers, access log.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from clawproxy import __version__
from clawproxy.backends.registry import Pool, Registry
from clawproxy.compat import client_gone, is_h2_stream
from clawproxy.config import Config, expand_request_variables
from clawproxy.errors import Rejected, bad_request, not_found, unavailable
from clawproxy.interfaces import PHASES
from clawproxy.metrics import Metrics
from clawproxy.policy.routing import (
    Router,
    canonical_path,
    query_parameters,
    sticky_split,
    strip_base,
)
from clawproxy.web.accesslog import AccessLog
from clawproxy.web.context import LocalResponse, RequestContext
from clawproxy.web.relay import NoInstance, Relay, UpstreamBroken
from clawproxy.web.sessions import session_key
from clawproxy.web.translate import OLLAMA_TRANSLATIONS, rewrite_for
from clawproxy.web.tunnel import Tunnels, is_websocket

_JSON = b"application/json"
_SAFE_ID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


def new_request_id() -> str:
    return os.urandom(12).hex()


def format_uptime(seconds: float) -> str:
    """C{"2h 15m"}-style uptime."""
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h}h {m}m"
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {s}s"
    return f"{s}s"


def pools_summary(registry: Registry) -> dict[str, Any]:
    """Per-pool health as shown by C{GET /health}."""
    out = {}
    for name, pool in registry.pools.items():
        healthy = sum(1 for i in pool.instances if i.available() or i.state == "healthy")
        out[name] = {
            "healthy": healthy,
            "total": len(pool.instances),
            "status": "healthy" if healthy == len(pool.instances)
            else ("degraded" if healthy else "unhealthy"),
        }
    return out


class GatewayResource(Resource):
    """
    The root of the data plane; every path is handled here.

    @param stages: L{IRequestStage}s; each runs in its C{phase}
        (C{identify}, C{route} or C{pool}), in the order given.
    @param observers: L{IResponseObserver}s told about each finished request.
    @param router: the compiled routes (built from C{config} when not given).
    @param forward: the relay step, C{relay.forward} as wrapped by the
        L{IRelayWrapper}s (C{relay.forward} itself by default).
    @param fallbacks: L{IFallbackProvider}s by the fallback C{type} they serve.
    """

    isLeaf = True
    log = Logger()
    #: Requests being answered now (the shutdown drain waits for zero).
    in_flight = 0
    #: In a worker of C{server.workers > 1}, its number (bytes), sent back
    #: as C{X-Clawproxy-Worker} on every response; L{None} otherwise.
    worker_index: bytes | None = None

    def __init__(
        self,
        config: Config,
        registry: Registry,
        relay: Relay,
        metrics: Metrics,
        access_log: AccessLog,
        clock: IReactorTime,
        stages: Sequence[Any] = (),
        observers: Sequence[Any] = (),
        started: float | None = None,
        router: Router | None = None,
        forward: Any = None,
        fallbacks: dict[str, Any] | None = None,
        tunnels: Tunnels | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.registry = registry
        self.relay = relay
        self.forward = forward if forward is not None else relay.forward
        self.fallback_providers = dict(fallbacks or {})
        self.metrics = metrics
        self.access_log = access_log
        self.clock = clock
        self.identify = [st for st in stages if st.phase == "identify"]
        self.after_route = [st for st in stages if st.phase == "route"]
        self.after_pool = [st for st in stages if st.phase == "pool"]
        unknown = [st for st in stages if st.phase not in PHASES]
        if unknown:
            raise ValueError(f"stages with an unknown phase: {unknown!r}")
        self.observers = list(observers)
        self.router = router if router is not None else Router(config)
        self.tunnels = tunnels if tunnels is not None else Tunnels(
            getattr(relay.agent, "endpoints", None), clock, metrics)
        self.base = config.server.base_path.encode()
        self.started = clock.seconds() if started is None else started
        self._public_metrics = config.metrics.enabled and config.metrics.public
        self._metrics_path = config.metrics.path.encode()

    # -- entry point -----------------------------------------------------

    def render(self, request: Any) -> Any:
        raw, _, query = request.uri.partition(b"?")
        rid = request.requestHeaders.getRawHeaders(b"x-request-id")
        ctx = RequestContext(
            request=request,
            request_id=_client_request_id(rid) or new_request_id(),
            client_ip=_client_ip(request),
            method=request.method,
            path=raw,
            query=query,
            started=self.clock.seconds(),
        )
        request.setHeader(b"x-request-id", ctx.request_id.encode())
        if self.worker_index is not None:
            request.setHeader(b"x-clawproxy-worker", self.worker_index)
        self.in_flight += 1
        # Ask before handling: a request answered at once (builtin endpoint,
        # 4xx, fallback) finishes inside ensureDeferred, and a notifyFinish()
        # asked for after that never fires (no metrics, no log, in_flight leak).
        finished = request.notifyFinish()
        d = ensureDeferred(self._handle(ctx))
        d.addErrback(self._fail, ctx)
        finished.addBoth(self._finished, ctx, d)
        return NOT_DONE_YET

    async def _handle(self, ctx: RequestContext) -> None:
        request = ctx.request
        if getattr(request, "too_large", False):
            raise Rejected(413, "request body exceeds max_body_size", "invalid_request_error",
                           "request_too_large")
        path = canonical_path(ctx.path)
        ctx.path = path
        local = ctx.local_path = strip_base(path, self.base)
        if local is None:
            raise not_found("no route for this path", "route_not_found")
        builtin = self._builtin(local, ctx.method)
        if builtin is not None:
            self._write_local(ctx, builtin)
            return
        if self.identify and await self._run_phase(self.identify, ctx):
            return
        route = ctx.route = self._match(ctx, local)
        if self.after_route and await self._run_phase(self.after_route, ctx):
            return
        cfg = route.config
        pool = ctx.pool = self._choose_pool(ctx, cfg)
        if pool.config.protocol == "ollama" and local in OLLAMA_TRANSLATIONS:
            ctx.json_body()
        elif self.router.fallbacks and ctx.body is None:
            _try_json_body(ctx)  # a model fallback chain needs the model
        if ctx.body is not None:
            model = ctx.body.get("model")
            if isinstance(model, str):
                ctx.model = self.router.resolve_model(model)
        if self.after_pool and await self._run_phase(self.after_pool, ctx):
            return
        pool = ctx.pool  # a stage may have moved the request
        transforms = cfg.transforms
        if transforms is not None:
            self._transform_request(ctx, transforms.request_headers)
            for name, value in transforms.response_headers.set.items():
                # ${instance} is only known once one answers: the relay (or
                # _write_local) fills it in.
                ctx.response_headers.append(
                    (name.encode(), self._expand(value, ctx, instance=False).encode()))
        if ctx.body is not None:
            ctx.rewrite = rewrite_for(pool, local, ctx.method, ctx.body, ctx.model,
                                      ctx.request_id, ctx.body_changed)
        chain = self._fallback_chain(ctx, cfg) if self.router.fallbacks else []
        primary = pool
        fell_back = False
        while True:
            ctx.alternative = bool(chain)
            key, sticky = self._keys(ctx, pool)
            timeout = cfg.timeout if cfg.timeout is not None else pool.config.timeout
            try:
                if cfg.websocket.enabled and is_websocket(request):
                    # Answered (a normal response) or tunnelled (the request ends
                    # with the connection): either way, not finished here.
                    await self.tunnels.forward(ctx, pool, key, sticky, timeout, local,
                                               cfg.websocket, self.relay.trusted)
                    return
                await self.forward(ctx, pool, key, sticky, timeout, local)
                break
            except (NoInstance, Rejected) as e:
                if chain and self._pool_failed(ctx, e):
                    pool = self._next_model(ctx, local, *chain.pop(0))
                    fell_back = True
                    continue
                _drop_header(ctx, _FALLBACK_MODEL)
                fallback = cfg.fallback or primary.config.fallback
                if isinstance(e, NoInstance):
                    wait = self.registry.breakers.retry_after(pool.name)
                    if wait is not None:
                        ctx.error = "circuit_open"
                    answer = self._fallback(ctx, fallback)
                    if isinstance(answer, Deferred):
                        answer = await answer
                    if answer is None:
                        if wait is not None:
                            raise unavailable(f"circuit breaker open for pool {pool.name!r}",
                                              retry_after=max(1, math.ceil(wait)),
                                              code="circuit_open") from None
                        raise unavailable(f"no healthy instance in pool {pool.name!r}",
                                          code="no_healthy_upstream") from None
                    self._write_local(ctx, answer)
                    return
                # The attempts failed and nothing reached the client: a fallback
                # other than static (a cached answer) may still serve it.
                if (e.status not in (502, 503, 504) or not self.fallback_providers
                        or request.startedWriting):
                    raise
                answer = self._fallback(ctx, fallback, static=False)
                if isinstance(answer, Deferred):
                    answer = await answer
                if answer is None:
                    raise
                self._write_local(ctx, answer)
                return
        if fell_back:
            self.metrics.fallback_responses_total.labels("model:" + (ctx.model or "")).inc()
        if not request.finished and not client_gone(request):
            request.finish()

    # -- model fallback chains -------------------------------------------

    def _fallback_chain(self, ctx: RequestContext, cfg: Any) -> list[tuple[str, Pool]]:
        """
        The models to try, in order, should the request's model's pool fail,
        each with the pool that serves it (chosen as a route without C{pool}
        would, except that a route naming its pool keeps it for a model no
        pool names). Models no pool serves are left out.
        """
        chain = self.router.fallbacks_of(ctx.model)
        if not chain or ctx.body is None:
            return []
        default = ctx.pool.name if (cfg.pool is not None or cfg.split) else None
        discovered = self.registry.discovered()
        out = []
        for model in chain:
            try:
                name = self.router.pool_for_model(model, discovered, default)
            except Rejected:
                continue
            out.append((model, self.registry.pools[name]))
        return out

    def _pool_failed(self, ctx: RequestContext, error: Exception) -> bool:
        """
        Did the pool fail this request so that another model may take it?
        (No instance could take it, its retries are spent, or it answered a
        5xx or no first chunk that it does not retry; nothing reached the
        client. A timeout is not: the backend may have the request.)
        """
        request = ctx.request
        if request.startedWriting or client_gone(request):
            return False
        return isinstance(error, NoInstance) or ctx.error in _FAILED_POOL

    def _next_model(self, ctx: RequestContext, local: bytes, model: str, pool: Pool) -> Pool:
        """Move the request to C{model} on C{pool}: the body's model is rewritten."""
        self.log.info("{pool} failed {model}: trying {next}", pool=ctx.pool_name,
                      model=ctx.model, next=model)
        ctx.model = model
        ctx.pool = pool
        ctx.rewrite = rewrite_for(pool, local, ctx.method, ctx.body, model, ctx.request_id,
                                  ctx.body_changed)
        _drop_header(ctx, _FALLBACK_MODEL)
        ctx.response_headers.append((_FALLBACK_MODEL, model.encode()))
        return pool

    async def _run_phase(self, stages: list[Any], ctx: RequestContext) -> bool:
        """Run one phase's stages in order; True when one of them answered."""
        for stage in stages:
            answer = stage.process(ctx)
            if isinstance(answer, Deferred):
                answer = await answer
            if answer is not None:
                self._write_local(ctx, answer)
                return True
        return False

    # -- routing ---------------------------------------------------------

    def _match(self, ctx: RequestContext, local: bytes) -> Any:
        try:
            spath = local.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request("path is not valid UTF-8", "invalid_path") from None
        headers = ctx.request.requestHeaders

        def header(name: str) -> str | None:
            # Ask with bytes: with a str name, Headers answers str values.
            v = headers.getRawHeaders(name.encode("latin-1"))
            return v[-1].decode("latin-1") if v else None

        query = query_parameters(ctx.query)
        for route in self.router.candidates(spath, ctx.method):
            body = ctx.json_body() if route.needs_body else None
            if route.matches_conditions(header, body, ctx.agent, query):
                return route
        raise not_found(f"no route for {ctx.method.decode()} {spath}", "route_not_found")

    def _choose_pool(self, ctx: RequestContext, cfg: Any) -> Pool:
        if cfg.pool is not None:
            name = cfg.pool
        elif cfg.split:
            name = sticky_split(cfg.split, self._session_key(ctx))
        else:
            name = self.router.pool_for_model(ctx.json_body().get("model"),
                                              self.registry.discovered())
        return self.registry.pools[name]

    def _session_key(self, ctx: RequestContext) -> str:
        if ctx.agent is not None:
            return "agent:" + ctx.agent_name
        sid = ctx.request.requestHeaders.getRawHeaders(b"x-session-id")
        if sid:
            return "session:" + sid[-1].decode("latin-1")
        return "ip:" + ctx.client_ip

    def _keys(self, ctx: RequestContext, pool: Pool) -> tuple[str | None, str | None]:
        """(balancer hash key, affinity key) for this request."""
        algo = pool.config.algorithm
        if algo == "ip_hash":
            key: str | None = ctx.client_ip
        elif algo == "consistent_hash":
            key = self._session_key(ctx)
        else:
            key = None
        aff = pool.config.session_affinity
        if aff is None:
            return key, None
        return key, session_key(ctx, aff, set_cookie=True)

    # -- transforms and fallbacks ----------------------------------------

    def _expand(self, value: str, ctx: RequestContext, instance: bool = True) -> str:
        """
        C{value} with its per-request variables filled in. With C{instance}
        false, C{${instance}} is left for the relay (known once one answers).
        """
        if "${" not in value:
            return value
        return expand_request_variables(value, {
            "request_id": ctx.request_id, "agent": ctx.agent_name,
            "client_ip": ctx.client_ip, "route": ctx.route_name, "pool": ctx.pool_name,
            "instance": ctx.instance_id if instance else "${instance}",
        })

    def _transform_request(self, ctx: RequestContext, t: Any) -> None:
        headers = ctx.request.requestHeaders
        for name in t.remove:
            headers.removeHeader(name)
        for name, value in t.set.items():
            headers.setRawHeaders(name, [self._expand(value, ctx).encode()])

    def _fallback(self, ctx: RequestContext, name: str | None,
                  static: bool = True) -> LocalResponse | Deferred[Any] | None:
        """
        The fallback C{name}'s answer: a static one (unless C{static} is
        false: those answer only when no instance could take the request),
        or its L{IFallbackProvider}'s (an answer, L{None}, or a Deferred).
        """
        if not name:
            return None
        fb = self.config.fallbacks.get(name)
        if fb is None:
            return None
        if fb.type != "static":
            provider = self.fallback_providers.get(fb.type)
            return None if provider is None else provider.answer(ctx, fb)
        if not static:
            return None
        self.metrics.fallback_responses_total.labels(name).inc()
        headers = [(k.encode(), v.encode()) for k, v in fb.headers.items()]
        headers.append((b"x-clawproxy-fallback", name.encode()))
        return LocalResponse(fb.status, fb.body.encode(), fb.content_type.encode(),
                             tuple(headers))

    # -- builtin endpoints -----------------------------------------------

    def _builtin(self, local: bytes, method: bytes) -> LocalResponse | None:
        if local == b"/health" and method in (b"GET", b"HEAD"):
            return self.health_response()
        if local == b"/v1/models" and method == b"GET":
            return self.models_response()
        if self._public_metrics and local == self._metrics_path and method == b"GET":
            from clawproxy.metrics import CONTENT_TYPE
            return LocalResponse(200, self.metrics.render(), CONTENT_TYPE.encode())
        return None

    def models_response(self) -> LocalResponse:
        """
        C{GET /v1/models}: every model declared (pools' C{models}, aliases)
        or reported by an instance, in OpenAI's list shape, C{owned_by} the
        pool that serves it.
        """
        created = int(self.started)
        owners = self.router.model_owners(self.registry.discovered())
        data = [{"id": m, "object": "model", "created": created, "owned_by": pool}
                for m, pool in owners.items()]
        return LocalResponse(200, json.dumps({"object": "list", "data": data}).encode())

    def health_response(self) -> LocalResponse:
        pools = pools_summary(self.registry)
        up = [p for p in pools.values() if p["healthy"]]
        if not up:
            status, code = "unhealthy", 503
        elif len(up) == len(pools) and all(p["status"] == "healthy" for p in pools.values()):
            status, code = "healthy", 200
        else:
            status, code = "degraded", 200
        body = {
            "status": status,
            "version": __version__,
            "uptime": format_uptime(self.clock.seconds() - self.started),
            "pools": pools,
        }
        return LocalResponse(code, json.dumps(body).encode())

    # -- answering -------------------------------------------------------

    def _write_local(self, ctx: RequestContext, answer: LocalResponse) -> None:
        request = ctx.request
        if request.finished or client_gone(request):
            return
        ctx.status = answer.status
        request.setResponseCode(answer.status)
        request.setHeader(b"content-type", answer.content_type)
        for name, value in answer.headers:
            request.setHeader(name, value)
        for name, value in ctx.response_headers:
            request.setHeader(name, value.replace(b"${instance}", ctx.instance_id.encode()))
        request.setHeader(b"content-length", b"%d" % len(answer.body))
        ctx.bytes_sent = len(answer.body)
        if ctx.method != b"HEAD":
            request.write(answer.body)
        request.finish()

    def _fail(self, failure: Failure, ctx: RequestContext) -> None:
        """The one place that turns an exception into a response."""
        request = ctx.request
        if failure.check(CancelledError) or client_gone(request):
            ctx.error = ctx.error or "client_disconnected"
            return
        if request.finished:
            self.log.failure("error after the response finished", failure)
            return
        if request.startedWriting or failure.check(UpstreamBroken):
            # Bytes already reached the client: never end it cleanly.
            ctx.error = ctx.error or "aborted"
            ctx.aborted = True
            _abort(request)
            return
        if failure.check(Rejected):
            rej: Rejected = failure.value
        else:
            self.log.failure("unexpected error handling {path}", failure,
                             path=ctx.path.decode("latin-1"))
            rej = Rejected(500, "internal gateway error", "server_error", "internal_error")
        ctx.error = ctx.error or rej.code
        headers = tuple((k.encode(), v.encode()) for k, v in rej.headers)
        self._write_local(ctx, LocalResponse(rej.status, rej.body(), _JSON, headers))

    def _finished(self, result: Any, ctx: RequestContext, d: Deferred) -> None:
        self.in_flight -= 1
        if isinstance(result, Failure) and not (ctx.aborted or ctx.upgraded):
            # The client went away: stop everything done on its behalf, and
            # log it as nginx does (499), whatever was under way.
            ctx.error = "client_disconnected"
            ctx.status = 499
            d.cancel()
        now = self.clock.seconds()
        status = ctx.status or ctx.request.code
        route = ctx.route_name
        self.metrics.requests_total.labels(
            route, method_label(ctx.method), str(status), ctx.agent_label
        ).inc()
        self.metrics.request_duration.labels(route).observe(now - ctx.started)
        for observer in self.observers:
            try:
                observer.completed(ctx)
            except Exception:
                self.log.failure("response observer {observer} failed", observer=observer)
        self.access_log.record(ctx, now, time.time())


#: What a pool's failure leaves in C{ctx.error} when another model may be tried.
_FAILED_POOL = frozenset(("5xx", "connect_failure", "refused", "first_token_timeout"))
_FALLBACK_MODEL = b"x-clawproxy-fallback-model"


def _try_json_body(ctx: RequestContext) -> None:
    """Parse the body as JSON if it is some (for its model); leave it be otherwise."""
    try:
        ctx.json_body()
    except Rejected:
        pass


def _drop_header(ctx: RequestContext, name: bytes) -> None:
    """Forget a response header the gateway meant to add."""
    ctx.response_headers[:] = [h for h in ctx.response_headers if h[0] != name]


def _abort(request: Any) -> None:
    """
    End a response that cannot be completed so the client sees it failed:
    HTTP/2 resets just this stream, HTTP/1.1 aborts the connection.
    """
    channel = request.channel
    if channel is None:
        return
    if is_h2_stream(channel):
        channel.abortConnection()
        return
    transport = getattr(channel, "transport", None)
    if transport is not None and hasattr(transport, "abortConnection"):
        transport.abortConnection()
    else:
        request.loseConnection()


_KNOWN_METHODS = frozenset(
    (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"CONNECT", b"TRACE")
)


def method_label(method: bytes) -> str:
    """A metric label that a client cannot blow up with made-up methods."""
    return method.decode("latin-1") if method in _KNOWN_METHODS else "OTHER"


def _client_ip(request: Any) -> str:
    addr = request.getClientAddress()
    return getattr(addr, "host", None) or "-"


def _client_request_id(values: Iterable[bytes] | None) -> str | None:
    """Keep a client's X-Request-ID when it is short and plain."""
    if not values:
        return None
    v = values[-1]
    if 0 < len(v) <= 128:
        s = v.decode("latin-1")
        if all(c in _SAFE_ID for c in s):
            return s
    return None
