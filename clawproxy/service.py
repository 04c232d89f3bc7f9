"""
Assemble a gateway from a L{Config}: listeners, simulators, prober, admin.

L{build_service} takes the reactor as an argument, so tests build whole
gateways on a C{MemoryReactor} or on the real reactor with port 0.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from zope.interface import implementer

from clawproxy.backends.prober import HealthProber
from clawproxy.backends.registry import Registry
from clawproxy.backends.tls import UpstreamTLS
from clawproxy.backends.upstream import make_agent, make_pool, open_upstream_connections
from clawproxy.config import Config, ConfigError, load_config
from clawproxy.errors import Rejected
from clawproxy.interfaces import IAdminSection
from clawproxy.listener import Listener
from clawproxy.metrics import Metrics
from clawproxy.otel import close_all as close_tracing
from clawproxy.policy.auth import KeyStoreError, load_key_store
from clawproxy.policy.retry import RetryPolicy
from clawproxy.stores import StoreService, build_store
from clawproxy.web.accesslog import AccessLog
from clawproxy.web.admin import AdminResource
from clawproxy.web.context import RequestContext
from clawproxy.web.dataplane import build_data_plane
from clawproxy.web.gateway import GatewayResource, method_label, new_request_id
from clawproxy.web.site import GatewaySite, QuietSite
from clawproxy.web.tunnel import Tunnels

if TYPE_CHECKING:
    from clawproxy.web.tls import ServerTLS


class _Shutdown(Service):
    """
    On shutdown: wait (up to C{grace} seconds) for in-flight requests, then
    close idle upstream connections and the access log, and export the spans
    still queued (at most L{clawproxy.otel.SHUTDOWN_BOUND} seconds).

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
        done.addBoth(lambda _: close_tracing(clock))
        return done


class Gateway(MultiService):
    """
    The root service of one gateway process.

    Its attributes give tests and the admin API the live parts: C{plane} (the
    L{DataPlane<clawproxy.web.dataplane.DataPlane>} in force) with its
    C{registry} and C{resource}, C{metrics}, C{store}, C{admin}, C{site}.
    """

    log = Logger()

    def __init__(self, config: Config, reactor: Any, access_log: AccessLog | None = None,
                 metrics: Metrics | None = None, worker: WorkerSetup | None = None) -> None:
        """
        @param worker: set in a worker process of C{server.workers > 1}: the
            sockets and channel its parent handed over. A gateway with
            several workers and no C{worker} is their parent.
        """
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.worker = worker
        #: The parent of several workers: it binds the listeners and runs the
        #: admin listener, prober and simulators; the workers serve the data plane.
        self.is_parent = worker is None and config.server.workers > 1
        self.metrics = metrics if metrics is not None else Metrics()
        self.access_log = access_log or AccessLog.open(config.logging.output, reactor,
                                                       config.logging.format)
        self.upstream_pool = make_pool(reactor)
        self.upstream_tls = UpstreamTLS()
        try:
            self.upstream_tls.configure(self.upstream_tls.prepare(config.pools))
        except ValueError as e:
            raise ConfigError([f"pools: {e}"]) from None
        self.agent = make_agent(reactor, self.upstream_pool, tls_policy=self.upstream_tls)
        self.tunnels = Tunnels(self.agent.endpoints, reactor, self.metrics)
        #: The certificate of the TLS listeners (replaced on reload), if any.
        self.server_tls: ServerTLS | None = None
        self.retry_policy = RetryPolicy()
        self.started = reactor.seconds()
        self.supervisor: Any = None
        # Built once: a reload keeps the store (like the listeners). A worker
        # reaches its parent's memory store over their channel.
        if worker is not None and config.store.backend == "memory":
            from clawproxy.stores.amp import AmpStore

            self.store: Any = AmpStore(reactor, self.metrics)
        else:
            self.store = build_store(config.store, reactor, self.metrics)
            if self.is_parent:
                # The parent serves its memory store to the workers: its own
                # parts (the admin API's cache drop, breakers) see the state
                # the workers keep there.
                self.store.shared = True
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
            trusted_proxies=config.server.trusted_proxies,
        )
        self.site.on_refused = self.refused
        self.metrics.watch_connections(lambda: self.site.open_connections,
                                       open_upstream_connections)
        self.site.early_checks.append(self._early_checks)
        self.admin = AdminResource(
            self.registry, self.metrics, self.breakers, reactor, config.admin.token,
            metrics_path=config.metrics.path if config.metrics.enabled else None,
            reload=self.reload if config.source else None,
            workers=config.server.workers, started=self.started, store=self.store,
            sections=self.plane.parts.admin_sections,
        )
        self.admin_site = QuietSite(self.admin, reactor=reactor)
        self.listeners: list[Listener] = []
        self._add_children(config)

    def _build(self, config: Config, previous: Registry | None = None) -> None:
        """(Re)build the parts that follow the config: the data plane and its prober."""
        self.plane = build_data_plane(
            config, self.reactor, self.agent, self.metrics, self.access_log,
            retry_policy=self.retry_policy, store=self.store,
            started=self.started, previous=previous, tunnels=self.tunnels,
        )
        if self.supervisor is not None:
            self.registry.watch(self.supervisor)
        if self.worker is not None:
            self.plane.resource.worker_index = str(self.worker.index).encode()
        self.prober = HealthProber(self.registry, self.agent, self.reactor)

    @property
    def breakers(self) -> Any:
        """The circuit breaker board of the data plane in force."""
        return self.plane.registry.breakers

    @property
    def registry(self) -> Registry:
        """The instance registry of the data plane in force."""
        return self.plane.registry

    @property
    def resource(self) -> GatewayResource:
        """The data-plane resource in force."""
        return self.plane.resource

    def _add_children(self, config: Config) -> None:
        from clawproxy.simulator import simulator_service

        # First child: started before and stopped after everything that may use it.
        StoreService(self.store).setServiceParent(self)
        worker = self.worker
        if worker is None:
            for i, sim in enumerate(config.simulators):
                simulator_service(sim, self.reactor, key=f"simulators[{i}].listen"
                                  ).setServiceParent(self)
        if config.server.tls is not None:
            from clawproxy.web.tls import ServerTLS

            self.server_tls = ServerTLS(config.server.tls)
        data_plane = data_plane_endpoints(config, self.reactor, self.server_tls)
        listeners = []
        if worker is not None:
            from clawproxy.workers.child import AdoptedEndpoint

            role = f"clawproxy data plane (worker {worker.index})"
            for (fd, family, tls), (_, source, _) in zip(worker.listen, data_plane):
                factory = self.site
                if tls:
                    from twisted.protocols.tls import TLSMemoryBIOFactory

                    factory = TLSMemoryBIOFactory(self.server_tls, False, self.site)
                listeners.append((AdoptedEndpoint(self.reactor, fd, family), factory, role,
                                  source))
        elif not self.is_parent:
            listeners = [(endpoint, self.site, role, source)
                         for endpoint, source, role in data_plane]
        if config.admin.listen and worker is None:
            listeners.append((serverFromString(self.reactor, config.admin.listen),
                              self.admin_site, "clawproxy admin",
                              f"admin.listen: {config.admin.listen}"))
        if self.is_parent:
            from clawproxy.workers.supervisor import Supervisor, worker_argv

            self.supervisor = Supervisor(
                self, config.server.workers, worker_argv(config.source or ""),
                [(endpoint, role, source, "TLS" in role) for endpoint, source, role in data_plane])
            self.registry.watch(self.supervisor)
            self.supervisor.setServiceParent(self)
            self.listeners.extend(self.supervisor.listeners)
            self.admin.metrics_text = self.supervisor.metrics_text
            self.admin.sections = self._parent_sections()
        for endpoint, factory, role, source in listeners:
            svc = Listener(endpoint, factory, role, source)
            svc.setServiceParent(self)
            self.listeners.append(svc)
        if worker is None:
            self.prober.setServiceParent(self)
        if not self.is_parent:
            _Shutdown(self).setServiceParent(self)

    def _parent_sections(self) -> list[Any]:
        """The parent's admin sections: the data plane's, merged from its workers'."""
        from clawproxy.workers.sections import MergedBreakers, MergedSection

        statuses = self.supervisor.section_statuses
        sections = [MergedSection(s, statuses) for s in self.plane.parts.admin_sections]
        for merged in sections:
            if merged.name == "circuit_breakers":
                self.admin.breakers = MergedBreakers(self.breakers, merged)
        return [*sections, ProcessesSection(self.supervisor)]

    def _early_checks(self, method: bytes, path: bytes, headers: Any) -> None:
        """Header-time checks of the data plane in force (they follow a reload)."""
        self.plane.check_head(method, path, headers)

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
            server_tls = self._prepare_server_tls(config)
            try:
                upstream_tls = self.upstream_tls.prepare(config.pools)
            except ValueError as e:
                raise ConfigError([f"pools: {e}"]) from None
        except (ConfigError, KeyStoreError) as e:
            self.log.warn("reload refused: {errors}", errors=e.errors)
            return succeed(list(e.errors))
        if server_tls is not None:
            assert self.server_tls is not None and config.server.tls is not None
            self.server_tls.replace(server_tls, config.server.tls)
        if self.upstream_tls.configure(upstream_tls):
            # Idle connections made with the old settings must not serve again.
            self.upstream_pool.closeCachedConnections()
        if self.worker is None:
            self.prober.disownServiceParent()
        self._build(config, previous=self.registry)
        if config.store != self.config.store:
            self.log.warn("store settings changed: they take effect when the gateway restarts")
        if config.server.workers != self.config.server.workers:
            self.log.warn("server.workers changed: it takes effect when the gateway restarts")
        self.config = config
        self.site.resource = self.resource
        self.admin.registry = self.registry
        self.admin.breakers = self.breakers
        self.admin.sections = self.plane.parts.admin_sections
        if self.worker is None:
            self.prober.setServiceParent(self)
        if self.supervisor is not None:
            self.admin.sections = self._parent_sections()
            self.supervisor.reload()
        self.log.info("configuration reloaded from {path}", path=config.source)
        return succeed([])


    def _prepare_server_tls(self, config: Config) -> Any:
        """
        The new certificate of the TLS listeners, loaded but not in force
        (C{None} when there is none to load). The listeners themselves stay.

        @raise ConfigError: the certificate or key cannot be used.
        """
        new, old = config.server.tls, self.config.server.tls
        if self.server_tls is None or new is None:
            if new is not None or old is not None:
                self.log.warn("server.tls added or removed: TLS listeners change when the"
                              " gateway restarts")
            return None
        if new.listen != old.listen:
            self.log.warn("server.tls.listen changed: it takes effect when the gateway"
                          " restarts; the new certificate is served now")
        return self.server_tls.prepare(new)


def build_service(config: Config, reactor: Any, worker: WorkerSetup | None = None) -> Gateway:
    """The whole gateway for C{config} (or one worker of it), not yet started."""
    return Gateway(config, reactor, worker=worker)


@attrs.frozen
class WorkerSetup:
    """
    What a worker process got from its parent.

    @ivar index: the worker's number, from 1.
    @ivar listen: the data-plane listening sockets, in config order (plain
        listeners, then TLS ones): C{(fd, address family, tls)}.
    @ivar channel: the descriptor of its end of the AMP channel to the parent.
    """

    index: int
    listen: tuple[tuple[int, int, bool], ...]
    channel: int


def data_plane_endpoints(config: Config, reactor: Any, server_tls: ServerTLS | None = None
                         ) -> list[tuple[Any, str, str]]:
    """
    C{(endpoint, config key, role)} of each data-plane listener, in config order.

    @param server_tls: the certificate every TLS listener serves (replaced on reload).
    """
    out = [(serverFromString(reactor, desc), f"server.listen[{i}]: {desc}",
            "clawproxy data plane") for i, desc in enumerate(config.server.listen)]
    if config.server.tls is not None:
        from clawproxy.web.tls import tls_endpoints

        out += [(endpoint, f"server.tls.listen[{i}]: {desc}", "clawproxy data plane (TLS)")
                for i, (desc, endpoint) in enumerate(
                    tls_endpoints(config.server.tls, reactor, server_tls))]
    return out


@implementer(IAdminSection)
class ProcessesSection:
    """The parent's C{processes} section of C{/admin/status}: its workers."""

    name = "processes"

    def __init__(self, supervisor: Any) -> None:
        self.supervisor = supervisor

    def status(self) -> dict[str, Any]:
        return self.supervisor.status()

    def endpoints(self) -> dict[Any, Any]:
        return {}
