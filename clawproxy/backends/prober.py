"""
Active health checks and model discovery: LoopingCalls per pool, updating
the registry.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import readBody
from twisted.web.http_headers import Headers

from clawproxy.backends.registry import Instance, Pool, Registry, reported_models
from clawproxy.policy.health import parse_health_body

_MAX_BODY = 64 * 1024
#: The largest model list read (LiteLLM in front of many providers lists many).
_MAX_MODELS_BODY = 1024 * 1024

#: Seconds between two model discoveries of a pool. The SPEC has no key for
#: it: model lists change when an operator pulls or loads a model, so once a
#: minute (and at start) is enough, and asking costs no tokens.
DISCOVERY_INTERVAL = 60.0

#: Where each protocol lists the models an instance serves (OpenAI
#: C{GET /v1/models}, Ollama C{GET /api/tags}); C{http} pools serve none.
DISCOVERY_PATHS = {"openai": "/v1/models", "ollama": "/api/tags"}


class HealthProber(Service):
    """
    Probe every instance of every pool whose health check is enabled.

    Probes of a pool run together, once per C{interval}; a round never
    overlaps the next (LoopingCall waits for it). Each probe is bounded by
    the pool's C{timeout} and carries the pool's C{health_check.headers}
    (credentials for backends that need a key).

    The prober also learns which models each instance of an C{openai} or
    C{ollama} pool serves (L{DISCOVERY_PATHS}), at start and every
    L{DISCOVERY_INTERVAL} seconds, with the health check's timeout and
    headers. A pool whose health check already probes that path learns its
    models from the probes instead; a pool that is not probed
    (C{health_check.enabled: false}) is not asked either. A failed
    discovery keeps the last list known.
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
        pools = self.registry.pools.values()
        for pool in pools:
            if pool.config.health_check.enabled:
                self._every(pool.config.health_check.interval, self.probe_pool, pool)
        for pool in pools:
            path = DISCOVERY_PATHS.get(pool.config.protocol)
            hc = pool.config.health_check
            if path is not None and hc.enabled and hc.path != path:
                self._every(DISCOVERY_INTERVAL, self.discover_pool, pool)

    def _every(self, interval: float, work: Any, pool: Pool) -> None:
        """Run C{work(pool)} now and every C{interval} seconds until L{stopService}."""
        loop = LoopingCall(work, pool)
        loop.clock = self.clock
        d = loop.start(interval, now=True)
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

    def discover_pool(self, pool: Pool) -> Deferred:
        """Ask each instance of C{pool} for its models; fires when all are done, never fails."""
        return DeferredList([self.discover(pool, i) for i in pool.instances],
                            consumeErrors=True)

    def discover(self, pool: Pool, inst: Instance) -> Deferred:
        """Ask C{inst} which models it serves; a failure keeps what it said before."""
        path = DISCOVERY_PATHS[pool.config.protocol]
        return self._track(self._get(pool, inst, path, b"clawproxy-discovery"),
                           self._learn, self._not_learned, inst)

    def _learn(self, result: tuple[int, bytes], inst: Instance) -> None:
        if not self.running:
            return
        code, data = result
        if code != 200 or len(data) > _MAX_MODELS_BODY:
            self.log.debug("model discovery of {instance}: status {code}, {size} bytes",
                           instance=inst.id, code=code, size=len(data))
            return
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict) or not isinstance(
                body.get("data", body.get("models")), list):
            self.log.debug("model discovery of {instance}: not a model list", instance=inst.id)
            return
        self.registry.models_reported(inst, reported_models(body))

    def _not_learned(self, failure: Failure, inst: Instance) -> None:
        if self.running:
            self.log.debug("model discovery of {instance} failed: {why}", instance=inst.id,
                           why=failure.getErrorMessage())

    def _get(self, pool: Pool, inst: Instance, path: str, agent_name: bytes) -> Deferred:
        """C{GET path} from C{inst} with the pool's probe headers: (status, body), bounded."""
        hc = pool.config.health_check
        url = inst.url_bytes + path.encode()
        headers = Headers({b"user-agent": [agent_name]})
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
        return d

    def probe(self, pool: Pool, inst: Instance) -> Deferred:
        return self._track(self._get(pool, inst, pool.config.health_check.path,
                                     b"clawproxy-health"), self._judge, self._failed, inst)

    def _track(self, d: Deferred, answered: Any, failed: Any, inst: Instance) -> Deferred:
        """
        Hand C{d}'s answer or failure to C{answered} or C{failed} (with C{inst}), keep C{d}
        in flight (L{stopService} cancels it) until it has, and never let it fail.
        """
        d.addCallbacks(answered, failed, callbackArgs=(inst,), errbackArgs=(inst,))
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
        if len(body) > _MAX_BODY and hc.path == DISCOVERY_PATHS.get(inst.pool.config.protocol):
            # A model list too long to keep as the health body (LiteLLM in
            # front of many providers): these probes are the pool's discovery.
            self._learn(result, inst)

    def _failed(self, failure: Failure, inst: Instance) -> None:
        if not self.running:
            return  # cancelled by stopService (e.g. a reload): not the instance's fault
        self.log.debug("probe of {instance} failed: {why}", instance=inst.id,
                       why=failure.getErrorMessage())
        self.registry.probe_result(inst, False)

    def _bug(self, failure: Failure, inst: Instance) -> None:
        self.log.failure("probe bookkeeping for {instance} failed", failure, instance=inst.id)
