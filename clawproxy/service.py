"""
Assemble a gateway from a L{Config}: listeners, simulators, prober, admin.

L{build_service} takes the reactor as an argument, so tests build whole
gateways on a C{MemoryReactor} or on the real reactor with port 0.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from clawproxy.backends.prober import HealthProber
from clawproxy.backends.registry import Registry
from clawproxy.backends.upstream import make_agent, make_pool, open_upstream_connections
from clawproxy.config import Config, ConfigError, load_config
from clawproxy.errors import Rejected
from clawproxy.metrics import Metrics
from clawproxy.policy.auth import KeyStoreError, extract_key, load_key_store, missing_api_key
from clawproxy.policy.breakers import NoBreakers
from clawproxy.policy.retry import RetryPolicy
from clawproxy.policy.routing import canonical_path, strip_base
from clawproxy.web.accesslog import AccessLog
from clawproxy.web.admin import AdminResource
from clawproxy.web.auth import auth_stages
from clawproxy.web.context import RequestContext
from clawproxy.web.gateway import GatewayResource, method_label, new_request_id
from clawproxy.web.relay import Relay
from clawproxy.web.site import GatewaySite, QuietSite


class _Shutdown(Service):
    """
    On shutdown: wait (up to C{grace} seconds) for in-flight requests, then
    close idle upstream connections and the access log.

    Listeners stop at the same time, so new connections are refused while the
    requests already accepted are answered.
    """

    name = "shutdown"

    def __init__(self, gateway: Gateway, grace: float = 30.0) -> None:
        self.gateway = gateway
        self.grace = grace

    def stopService(self) -> Deferred:
        super().stopService()
        gateway, clock = self.gateway, self.gateway.reactor
        done: Deferred[None] = Deferred()
        deadline = clock.seconds() + self.grace
        if gateway.in_flight():
            gateway.log.info("waiting for {n} in-flight requests", n=gateway.in_flight())

        def check() -> None:
            if gateway.in_flight() == 0 or clock.seconds() >= deadline:
                done.callback(None)
            else:
                clock.callLater(0.05, check)

        check()
        done.addCallback(lambda _: gateway.upstream_pool.closeCachedConnections())
        done.addBoth(lambda _: gateway.access_log.close())
        return done


class Gateway(MultiService):
    """
    The root service of one gateway process.

    Its attributes give tests and the admin API the live parts: C{registry},
    C{metrics}, C{resource} (data plane), C{admin}, C{site}.
    """

    log = Logger()

    def __init__(self, config: Config, reactor: Any, access_log: AccessLog | None = None,
                 metrics: Metrics | None = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.metrics = metrics if metrics is not None else Metrics()
        self.access_log = access_log or AccessLog.open(config.logging.output, reactor)
        self.upstream_pool = make_pool(reactor)
        self.agent = make_agent(reactor, self.upstream_pool)
        self.breakers = NoBreakers()
        self.retry_policy = RetryPolicy()
        self.started = reactor.seconds()
        self._build(config)
        self.site = GatewaySite(
            self.resource, max_body_size=config.server.max_body_size,
            max_header_size=config.server.max_header_size,
            timeout=config.server.client_timeout, head_timeout=config.server.head_timeout,
            reactor=reactor, max_connections=config.server.max_connections,
            underscores_in_headers=config.server.underscores_in_headers,
            min_body_rate=config.server.min_body_rate,
            max_concurrent_streams=config.server.max_concurrent_streams,
            max_stream_resets=config.server.max_stream_resets,
        )
        self.site.on_refused = self.refused
        self.metrics.watch_connections(lambda: self.site.open_connections,
                                       open_upstream_connections)
        self.site.early_checks.append(self._early_checks)
        self.admin = AdminResource(
            self.registry, self.metrics, self.breakers, reactor, config.admin.token,
            metrics_path=config.metrics.path, reload=self.reload if config.source else None,
            workers=config.server.workers, started=self.started,
        )
        self.admin_site = QuietSite(self.admin, reactor=reactor)
        self.listeners: list[Service] = []
        self._add_children(config)

    def _build(self, config: Config) -> None:
        """(Re)build the parts that follow the config: registry, relay, resource."""
        self.registry = Registry(config, self.reactor, breakers=self.breakers)
        self.registry.subscribe(self.metrics.instance_changed)
        relay = Relay(self.agent, self.reactor, self.metrics, self.retry_policy,
                      config.server.trusted_proxies)
        self.relay = relay
        identify, stages = auth_stages(config)
        self.resource = GatewayResource(
            config, self.registry, relay, self.metrics, self.access_log, self.reactor,
            identify=identify, stages=stages, started=self.started,
        )
        self.early_auth = _early_auth_check(self.resource, identify)
        self.prober = HealthProber(self.registry, self.agent, self.reactor)

    def _add_children(self, config: Config) -> None:
        from clawproxy.simulator import simulator_service

        for sim in config.simulators:
            simulator_service(sim, self.reactor).setServiceParent(self)
        for desc in config.server.listen:
            svc = strports.service(desc, self.site, reactor=self.reactor)
            svc.setServiceParent(self)
            self.listeners.append(svc)
        if config.server.tls is not None:
            from clawproxy.web.tls import tls_services

            for svc in tls_services(config.server.tls, self.site, self.reactor):
                svc.setServiceParent(self)
                self.listeners.append(svc)
        if config.admin.listen:
            admin = StreamServerEndpointService(
                serverFromString(self.reactor, config.admin.listen), self.admin_site
            )
            admin.setServiceParent(self)
            self.listeners.append(admin)
        self.prober.setServiceParent(self)
        _Shutdown(self).setServiceParent(self)
        for what in not_yet_enforced(config):
            self.log.warn("{what} is configured but not enforced by this version", what=what)
        if config.server.workers > 1:
            self.log.warn(
                "server.workers is {n}, but this version runs one process; "
                "run several gateways with store: redis to scale out", n=config.server.workers
            )

    def _early_checks(self, method: bytes, path: bytes, headers: Any) -> None:
        """Header-time checks that follow the config (and so a reload)."""
        if self.early_auth is not None:
            self.early_auth(method, path, headers)

    def refused(self, channel: Any, method: bytes, path: bytes, rej: Rejected) -> str:
        """Count and log a request the HTTP channel refused before routing."""
        peer = getattr(channel.transport, "getPeer", lambda: None)()
        ctx = RequestContext(
            request=None, request_id=new_request_id(),
            client_ip=getattr(peer, "host", None) or "-", method=method[:16],
            path=path.partition(b"?")[0][:256], query=b"", started=self.reactor.seconds(),
        )
        ctx.status = rej.status
        ctx.error = rej.code
        self.metrics.requests_total.labels("-", method_label(method), str(rej.status), "-").inc()
        self.access_log.record(ctx, self.reactor.seconds(), time.time())
        return ctx.request_id

    def in_flight(self) -> int:
        """Data-plane requests being answered now."""
        return self.resource.in_flight

    def reload(self) -> Deferred:
        """
        Re-read the config file. Fires with the list of errors (empty when the
        new config is in force). Listeners and simulators stay as they are;
        pools, routes and policies follow the new file. Instances that keep
        their id keep their drain state and runtime weight.
        """
        try:
            config = load_config(self.config.source)
            load_key_store(config)
        except (ConfigError, KeyStoreError) as e:
            self.log.warn("reload refused: {errors}", errors=e.errors)
            return succeed(list(e.errors))
        old = self.registry
        self.prober.disownServiceParent()
        self._build(config)
        self.registry.adopt(old)
        self.config = config
        self.site.resource = self.resource
        self.admin.registry = self.registry
        self.prober.setServiceParent(self)
        self.log.info("configuration reloaded from {path}", path=config.source)
        return succeed([])


def _early_auth_check(resource: GatewayResource, identify: list[Any]) -> Any:
    """
    The API-key check run when a request's head is in, before its body is read
    or C{100 Continue} sent: a key that is presented but invalid is refused, and
    so is a request without one when every route its path can reach needs one.
    """
    if not identify:
        return None
    stage = identify[0]
    router = resource.router
    base = resource.base

    def check(method: bytes, target: bytes, headers: Any) -> None:
        rej = stage.check_headers(headers)
        if rej is not None:
            raise rej
        if extract_key(headers, stage.header_name) is not None:
            return
        local = strip_base(canonical_path(target.partition(b"?")[0]), base)
        if local is None:
            return
        routes = _reachable(router.candidates(local.decode("utf-8", "replace"), method),
                            headers)
        if routes and all(
            r.config.auth_required or r.config.allowed_agents is not None for r in routes
        ):
            raise missing_api_key(stage.header_name)

    return check


def _reachable(routes: list[Any], headers: Any) -> list[Any]:
    """
    The candidate routes a request without credentials can still end up on,
    in first-match order: up to and including the first one whose conditions
    are all decided by the head alone and match (later ones can never win).
    Routes with C{body.*} conditions stay in as undecided.
    """

    def header(name: str) -> str | None:
        v = headers.getRawHeaders(name.encode("latin-1"))
        return v[-1].decode("latin-1") if v else None

    out = []
    for route in routes:
        if any(key.startswith("body.") for key in route.config.match or {}):
            out.append(route)
        elif route.matches_conditions(header, None, None):
            out.append(route)
            break
    return out


def not_yet_enforced(config: Config) -> list[str]:
    """
    Configured features this version accepts but does not act on yet, so the
    operator is told at start instead of silently going without them.
    """
    found = []
    if config.rate_limits is not None:
        found.append("rate_limits")
    if config.auth is not None and config.auth.jwt is not None:
        found.append("auth.jwt")
    if config.store.backend != "memory":
        found.append(f"store.backend: {config.store.backend}")
    if config.tracing.enabled:
        found.append("tracing")
    if config.models.fallbacks:
        found.append("models.fallbacks")
    for name, agent in config.agents.items():
        for key in ("scopes", "rate_limit", "token_limit", "spend_limit"):
            if getattr(agent, key, None):
                found.append(f"agents.{name}.{key}")
        if getattr(agent, "inject_headers", None):
            found.append(f"agents.{name}.inject_headers")
    for name, pool in config.pools.items():
        if pool.max_qps is not None:
            found.append(f"pools.{name}.max_qps")
    for i, route in enumerate(config.routes):
        if route.rate_limit is not None:
            found.append(f"routes[{i}].rate_limit")
        if route.cache is not None and route.cache.enabled:
            found.append(f"routes[{i}].cache")
    return found


def build_service(config: Config, reactor: Any) -> Gateway:
    """The whole gateway for C{config}, not yet started."""
    return Gateway(config, reactor)
