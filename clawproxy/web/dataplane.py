"""
The data plane of one configuration, built in one place.

The service builds it at start and again on every reload; the tests build it
the same way over a fake backend and a fake clock. Features plug in here: each
entry of L{FEATURES} turns a configuration into the parts it adds (request
stages, head checks, response filters, observers, admin sections), sorted by
the interfaces they provide. A new feature is its module, its config class, and one line in
L{FEATURES}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from zope.interface.verify import verifyObject

from clawproxy.backends.registry import Registry
from clawproxy.backends.shared_breakers import breaker_board
from clawproxy.config import Config
from clawproxy.interfaces import (
    PHASES,
    IAdminSection,
    IAttemptObserver,
    IFallbackProvider,
    IHeadCheck,
    IRelayWrapper,
    IRequestStage,
    IResponseFilter,
    IResponseObserver,
)
from clawproxy.metrics import Metrics
from clawproxy.policy.retry import RetryPolicy
from clawproxy.policy.routing import Router
from clawproxy.stores.memory import MemoryStore
from clawproxy.web.accesslog import AccessLog
from clawproxy.web.auth import auth_parts
from clawproxy.web.cache import cache_parts
from clawproxy.web.gateway import GatewayResource
from clawproxy.web.limits import limits_parts
from clawproxy.web.models import models_parts
from clawproxy.web.relay import Relay
from clawproxy.web.sessions import affinity_parts
from clawproxy.web.stream_errors import stream_error_parts
from clawproxy.web.tokens import token_parts
from clawproxy.web.tracing import tracing_parts

#: A feature: called with keyword arguments C{config}, C{router}, C{store}
#: (the L{IStateStore}), C{clock}, C{metrics} and C{registry} (the pools and
#: instances, for what a feature shows or reads of them), it returns the parts
#: it adds (taking C{**_} for the ones it does not use).
Feature = Callable[..., Iterable[Any]]

#: What each feature adds to the data plane for a configuration, in the order
#: its stages run within a phase.
FEATURES: tuple[Feature, ...] = (
    auth_parts,
    # Before the cache lookup: a request over its limit is refused even when
    # the answer is cached (as nginx's limit_req runs before proxy_cache).
    limits_parts,
    # Before the cache: its fill filter then stores what the client sees (a
    # usage chunk the gateway asked for on the client's behalf is already out).
    token_parts,
    cache_parts,
    stream_error_parts,
    affinity_parts,
    models_parts,
    # Last: its observer reads what the others noted (the tokens counted).
    tracing_parts,
)

_SEAMS = (IRequestStage, IHeadCheck, IResponseFilter, IResponseObserver, IAdminSection,
          IRelayWrapper, IFallbackProvider, IAttemptObserver)


@attrs.define(eq=False)
class Parts:
    """A data plane's plug-in parts, sorted by seam."""

    stages: list[Any] = attrs.Factory(list)
    head_checks: list[Any] = attrs.Factory(list)
    filters: list[Any] = attrs.Factory(list)
    observers: list[Any] = attrs.Factory(list)
    admin_sections: list[Any] = attrs.Factory(list)
    wrappers: list[Any] = attrs.Factory(list)
    fallbacks: dict[str, Any] = attrs.Factory(dict)
    attempt_observers: list[Any] = attrs.Factory(list)

    def add(self, part: Any) -> None:
        """
        File C{part} under every seam it provides, checking it implements
        each in full (a half-built part fails at start, not at a request).

        @raise TypeError: when C{part} provides none of the seams, or a
            stage names an unknown phase.
        """
        seams = [iface for iface in _SEAMS if iface.providedBy(part)]
        if not seams:
            raise TypeError(f"{part!r} provides none of the data plane's interfaces")
        for iface in seams:
            verifyObject(iface, part)
        if IRequestStage.providedBy(part):
            if part.phase not in PHASES:
                raise TypeError(f"{part!r}: unknown phase {part.phase!r}")
            self.stages.append(part)
        if IHeadCheck.providedBy(part):
            self.head_checks.append(part)
        if IResponseFilter.providedBy(part):
            self.filters.append(part)
        if IResponseObserver.providedBy(part):
            self.observers.append(part)
        if IAdminSection.providedBy(part):
            if any(s.name == part.name for s in self.admin_sections):
                raise TypeError(f"{part!r}: a second admin section named {part.name!r}")
            self.admin_sections.append(part)
        if IRelayWrapper.providedBy(part):
            self.wrappers.append(part)
        if IFallbackProvider.providedBy(part):
            if part.type in self.fallbacks:
                raise TypeError(f"{part!r}: a second provider of fallbacks of type {part.type!r}")
            self.fallbacks[part.type] = part
        if IAttemptObserver.providedBy(part):
            self.attempt_observers.append(part)


@attrs.define(eq=False)
class DataPlane:
    """Everything that answers client requests under one configuration."""

    config: Config
    registry: Registry
    router: Router
    relay: Relay
    resource: GatewayResource
    parts: Parts
    store: Any

    def check_head(self, method: bytes, path: bytes, headers: Any) -> None:
        """Run the head checks (the site calls this when a request head is in)."""
        for check in self.parts.head_checks:
            check.check_head(method, path, headers)


def build_data_plane(
    config: Config,
    clock: Any,
    agent: Any,
    metrics: Metrics,
    access_log: AccessLog,
    *,
    retry_policy: Any = None,
    breakers: Any = None,
    store: Any = None,
    previous: Registry | None = None,
    extra: Sequence[Any] = (),
    started: float | None = None,
    tunnels: Any = None,
) -> DataPlane:
    """
    Build the registry, routes, relay and resource for C{config}.

    @param agent: the upstream L{IAgent} (one persistent connection pool).
    @param retry_policy: an L{IRetryPolicy}; a new L{RetryPolicy} by default.
    @param breakers: an L{IBreakerBoard}, one of the registry's availability
        policies; by default the one C{config}'s C{circuit_breaker} sections
        ask for (L{breaker_board}), carrying over the state of the breakers
        of C{previous} that stay.
    @param previous: the registry of the data plane this one replaces (a
        reload): instances that stay keep their state (L{Registry.adopt}).
    @param store: the gateway's L{IStateStore} (a memory store by default).
    @param extra: parts added after the configured features' (tests plug in
        stages and filters this way).
    @param started: when the gateway started (for C{/health}'s uptime).
    @param tunnels: the gateway's L{Tunnels<clawproxy.web.tunnel.Tunnels>}
        (kept across reloads, so open WebSocket tunnels stay counted).
    """
    if store is None:
        store = MemoryStore(clock)
    if breakers is None:
        breakers = breaker_board(config, clock, metrics, store,
                                 previous.breakers if previous is not None else None)
    registry = Registry(config, clock, breakers=breakers)
    registry.subscribe(metrics.instance_changed)
    if previous is not None:
        registry.adopt(previous)
    router = Router(config)
    parts = Parts()
    if IAdminSection.providedBy(breakers):
        parts.add(breakers)
    for feature in FEATURES:
        for part in feature(config=config, router=router, store=store, clock=clock,
                            metrics=metrics, registry=registry):
            parts.add(part)
    for part in extra:
        parts.add(part)
    relay = Relay(
        agent, clock, metrics,
        retry_policy if retry_policy is not None else RetryPolicy(),
        config.server.trusted_proxies, parts.filters, parts.attempt_observers,
    )
    forward = relay.forward
    for wrapper in parts.wrappers:
        forward = wrapper.wrap(forward)
    resource = GatewayResource(
        config, registry, relay, metrics, access_log, clock,
        stages=parts.stages, observers=parts.observers, started=started, router=router,
        forward=forward, fallbacks=parts.fallbacks,
        tunnels=tunnels,
    )
    return DataPlane(config, registry, router, relay, resource, parts, store)
