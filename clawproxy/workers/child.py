"""
A worker process's side: adopt the listening sockets the parent handed
over, and follow what the parent says over the channel.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from clawproxy.backends.registry import Instance, Registry
from clawproxy.compat import adopt_port_one_accept
from clawproxy.policy.health import ProbeState
from clawproxy.workers.commands import (
    GetMetrics,
    GetStatus,
    ProbeResult,
    SetDrained,
    SetWeight,
    Snapshot,
)


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """
    A listening socket inherited from the parent (file descriptor C{fd}),
    adopted as a port on first L{listen}; the port accepts one connection per
    readiness event, so the workers sharing the socket share its connections.
    The inherited descriptor is closed once adopted (the port holds a duplicate).
    """

    def __init__(self, reactor: Any, fd: int, family: int) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family

    def listen(self, factory: Any) -> Deferred[Any]:
        try:
            port = adopt_port_one_accept(self.reactor, self.fd, self.family, factory)
        except Exception:
            return fail(Failure())
        os.close(self.fd)
        return succeed(port)


def instance_state(inst: Instance) -> dict[str, Any]:
    """What a worker must know of an instance the parent probes and administers."""
    return {"id": inst.id, "healthy": inst.healthy, "drained": inst.drained,
            "weight": inst.base_weight, "health": inst.health}


def apply_state(registry: Registry, rows: list[dict[str, Any]]) -> None:
    """Take the parent's view of every instance (a worker that just started)."""
    for row in rows:
        inst = registry.instance(row["id"])
        if inst is None:
            continue
        hc = inst.pool.config.health_check
        inst.probe = ProbeState(hc.healthy_threshold, hc.unhealthy_threshold,
                                healthy=row["healthy"])
        inst.drained = row["drained"]
        inst.base_weight = row["weight"]
        if row["health"] is not None:
            registry.probe_result(inst, row["healthy"], row["health"])
        registry.changed(inst)


def worker_status(gateway: Any) -> dict[str, Any]:
    """A worker's own figures, for the parent's C{/admin/status}."""
    instances = {
        inst.id: {"active": inst.active, "requests": inst.requests, "failures": inst.failures}
        for inst in gateway.registry
    }
    return {
        "pid": os.getpid(),
        "in_flight": gateway.in_flight(),
        "requests": int(sum(
            sample.value for family in gateway.metrics.requests_total.collect()
            for sample in family.samples if sample.name.endswith("_total"))),
        "instances": instances,
        "sections": {s.name: s.status() for s in gateway.admin.sections},
    }


class WorkerChannel(amp.AMP):
    """
    A worker's end of its channel to the parent: applies the prober's and
    the admin API's decisions to the worker's registry, answers status and
    metrics, and shuts the worker down when the parent is gone.

    @ivar gateway: the worker's L{clawproxy.service.Gateway} (its registry
        changes on reload, so it is read at each call).
    """

    log = Logger()

    def __init__(self, gateway: Any, on_lost: Any) -> None:
        super().__init__()
        self.gateway = gateway
        self._on_lost = on_lost

    @ProbeResult.responder
    def probe_result(self, instance: str, ok: bool, health: bytes | None) -> dict[str, Any]:
        inst = self.gateway.registry.instance(instance)
        if inst is not None:
            self.gateway.registry.probe_result(
                inst, ok, json.loads(health) if health is not None else None)
        return {}

    @SetWeight.responder
    def set_weight(self, instance: str, weight: float) -> dict[str, Any]:
        if self.gateway.registry.instance(instance) is not None:
            self.gateway.registry.set_weight(instance, weight)
        return {}

    @SetDrained.responder
    def set_drained(self, instance: str, drained: bool) -> dict[str, Any]:
        if self.gateway.registry.instance(instance) is not None:
            self.gateway.registry.set_drained(instance, drained)
        return {}

    @Snapshot.responder
    def snapshot(self, instances: bytes) -> dict[str, Any]:
        apply_state(self.gateway.registry, json.loads(instances))
        return {}

    @GetStatus.responder
    def get_status(self) -> dict[str, Any]:
        return {"status": json.dumps(worker_status(self.gateway)).encode()}

    @GetMetrics.responder
    def get_metrics(self) -> dict[str, Any]:
        return {"text": self.gateway.metrics.render()}

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._on_lost()
