"""
The AMP commands between the parent and a worker, over the socket pair the
parent made for that worker (besides the store's, in L{clawproxy.stores.amp}).

Parent to worker: L{ProbeResult}, L{SetWeight}, L{SetDrained} (what the
health prober and the admin API decided), L{Snapshot} (the whole registry
state, when a worker starts), L{GetStatus} and L{GetMetrics} (for the one
C{/admin/status} and C{/metrics} the parent serves).
"""

from __future__ import annotations

from twisted.protocols import amp

from clawproxy.stores.amp import BigBytes


class ProbeResult(amp.Command):
    """An active health check of an instance passed (C{ok}) or failed; C{health} is JSON."""

    arguments = [(b"instance", amp.Unicode()), (b"ok", amp.Boolean()),
                 (b"health", BigBytes(optional=True))]
    response: list = []
    requiresAnswer = False


class SetWeight(amp.Command):
    arguments = [(b"instance", amp.Unicode()), (b"weight", amp.Float())]
    response: list = []
    requiresAnswer = False


class SetDrained(amp.Command):
    arguments = [(b"instance", amp.Unicode()), (b"drained", amp.Boolean())]
    response: list = []
    requiresAnswer = False


class Snapshot(amp.Command):
    """Every instance's state (JSON list of L{instance_state} rows)."""

    arguments = [(b"instances", BigBytes())]
    response: list = []


class GetStatus(amp.Command):
    """The worker's own figures: JSON of L{clawproxy.workers.child.worker_status}."""

    arguments: list = []
    response = [(b"status", BigBytes())]


class GetMetrics(amp.Command):
    """The worker's metrics, in the Prometheus text format."""

    arguments: list = []
    response = [(b"text", BigBytes())]
