"""Active health checks: one LoopingCall per pool, updating the registry."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import readBody
from twisted.web.http_headers import Headers

from clawproxy.backends.registry import Instance, Pool, Registry
from clawproxy.policy.health import parse_health_body

_MAX_BODY = 64 * 1024


class HealthProber(Service):
    """
    Probe every instance of every pool whose health check is enabled.

    Probes of a pool run together, once per C{interval}; a round never
    overlaps the next (LoopingCall waits for it). Each probe is bounded by
    the pool's C{timeout} and carries the pool's C{health_check.headers}
    (credentials for backends that need a key).
    """

    log = Logger()
    name = "prober"

    def __init__(self, registry: Registry, agent: Any, clock: IReactorTime) -> None:
        self.registry = registry
        self.agent = agent
        self.clock = clock
        self._loops: list[tuple[LoopingCall, Deferred]] = []
        self._inflight: set[Deferred] = set()

    def startService(self) -> None:
        super().startService()
        for pool in self.registry.pools.values():
            hc = pool.config.health_check
            if not hc.enabled:
                continue
            loop = LoopingCall(self.probe_pool, pool)
            loop.clock = self.clock
            d = loop.start(hc.interval, now=True)
            d.addErrback(self._died, pool)
            self._loops.append((loop, d))

    def stopService(self) -> Deferred | None:
        super().stopService()
        for loop, _ in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        # Probes in flight are cancelled (their outcome no longer counts), so
        # nothing of ours is left running or scheduled.
        for d in list(self._inflight):
            d.cancel()
        return None

    def _died(self, failure: Failure, pool: Pool) -> None:
        self.log.failure("health prober of pool {pool} stopped", failure, pool=pool.name)

    def probe_pool(self, pool: Pool) -> Deferred:
        """Probe each instance of C{pool}; fires when all are done, never fails."""
        return DeferredList([self.probe(pool, i) for i in pool.instances], consumeErrors=True)

    def probe(self, pool: Pool, inst: Instance) -> Deferred:
        hc = pool.config.health_check
        url = inst.url_bytes + hc.path.encode()
        headers = Headers({b"user-agent": [b"clawproxy-health"]})
        for name, value in hc.headers.items():  # health_check.headers, e.g. an API key
            headers.setRawHeaders(name.encode("ascii"), [value.encode("utf-8")])
        # maybeDeferred: an agent that raises fails this probe, not the whole loop.
        d = maybeDeferred(self.agent.request, b"GET", url, headers)

        def got(response: Any) -> Deferred:
            body = readBody(response)
            body.addCallback(lambda data: (response.code, data))
            return body

        d.addCallback(got)
        d.addTimeout(hc.timeout, self.clock)
        d.addCallbacks(self._judge, self._failed, callbackArgs=(inst,), errbackArgs=(inst,))
        d.addErrback(self._bug, inst)
        self._inflight.add(d)
        d.addBoth(self._settled, d)
        return d

    def _settled(self, result: Any, d: Deferred) -> Any:
        self._inflight.discard(d)
        return result

    def _judge(self, result: tuple[int, bytes], inst: Instance) -> None:
        if not self.running:
            return
        code, body = result
        hc = inst.pool.config.health_check
        ok = code == hc.expected_status
        if ok and hc.expected_body_contains is not None:
            ok = hc.expected_body_contains.encode() in body[:_MAX_BODY]
        self.registry.probe_result(inst, ok, parse_health_body(body[:_MAX_BODY]))

    def _failed(self, failure: Failure, inst: Instance) -> None:
        if not self.running:
            return  # cancelled by stopService (e.g. a reload): not the instance's fault
        self.log.debug("probe of {instance} failed: {why}", instance=inst.id,
                       why=failure.getErrorMessage())
        self.registry.probe_result(inst, False)

    def _bug(self, failure: Failure, inst: Instance) -> None:
        self.log.failure("probe bookkeeping for {instance} failed", failure, instance=inst.id)
