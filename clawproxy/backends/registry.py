"""
The shared backend registry: pools, their instances and each instance's live state.

The registry is the one place that knows whether an instance may take traffic.
The prober and the relay write to it; the balancer, admin and metrics read it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from clawproxy.config import Config, InstanceConfig, PoolConfig
from clawproxy.policy.affinity import AffinityTable
from clawproxy.policy.balancers import Balancer, make_balancer
from clawproxy.policy.health import PassiveState, ProbeState, may_eject

Listener = Callable[["Instance"], None]


class Instance:
    """
    One backend instance and its live state.

    @ivar base_weight: the weight set by config or admin; C{weight} is this
        ramped by slow start, which balancers read.
    """

    def __init__(self, pool: Pool, cfg: InstanceConfig, clock: IReactorTime) -> None:
        self.pool = pool
        self.id = cfg.id
        self.url = cfg.url
        self.url_bytes = cfg.url.encode("ascii")
        self.host_header = urlsplit(cfg.url).netloc.encode("ascii")
        self.base_weight = float(cfg.weight)
        self.max_connections = cfg.max_connections
        self.drained = False
        self.active = 0
        self.requests = 0
        self.failures = 0
        self.health: dict | None = None
        self.models: tuple[str, ...] = ()
        self._clock = clock
        self._up_since: float | None = None
        hc = pool.config.health_check
        self.probe = ProbeState(hc.healthy_threshold, hc.unhealthy_threshold)
        passive = pool.config.passive
        self.passive = PassiveState(passive.max_fails, passive.fail_timeout, clock)

    @property
    def healthy(self) -> bool:
        return self.probe.healthy

    @property
    def weight(self) -> float:
        """The weight balancers use: C{base_weight}, ramped during slow start."""
        slow = self.pool.config.slow_start
        if self._up_since is None or not slow:
            return self.base_weight
        elapsed = self._clock.seconds() - self._up_since
        if elapsed >= slow:
            self._up_since = None
            return self.base_weight
        return self.base_weight * max(0.05, elapsed / slow)

    @property
    def state(self) -> str:
        """C{healthy}, C{unhealthy}, C{draining} or C{ejected} (SPEC section 2, Names)."""
        if not self.probe.healthy:
            return "unhealthy"
        if self.drained:
            return "draining"
        if self.passive.ejected:
            return "ejected"
        return "healthy"

    def available(self) -> bool:
        """May this instance take a new request now?"""
        return (
            self.probe.healthy
            and not self.drained
            and self.base_weight > 0
            and not self.passive.ejected
            and (self.max_connections is None or self.active < self.max_connections)
        )

    def mark_up(self) -> None:
        """Start slow start (if configured) from now."""
        if self.pool.config.slow_start:
            self._up_since = self._clock.seconds()

    def success_rate(self) -> float:
        if not self.requests:
            return 1.0
        return max(0.0, (self.requests - self.failures) / self.requests)


class Pool:
    """A named set of instances behind one balancer."""

    def __init__(self, cfg: PoolConfig, clock: IReactorTime, balancer: Balancer) -> None:
        self.name = cfg.name
        self.config = cfg
        self.balancer = balancer
        self.instances = [Instance(self, i, clock) for i in cfg.instances]
        self.by_id = {i.id: i for i in self.instances}
        aff = cfg.session_affinity
        self.affinity = AffinityTable(clock, aff.ttl) if aff is not None else None

    def eligible(self, exclude: frozenset[str] | set[str] = frozenset()) -> list[Instance]:
        return [i for i in self.instances if i.id not in exclude and i.available()]

    def choose(
        self, key: str | None = None, exclude: frozenset[str] | set[str] = frozenset()
    ) -> Instance | None:
        """Pick an available instance, skipping the ids in C{exclude}."""
        return self.balancer.pick(self.eligible(exclude), key)

    def any_healthy(self) -> bool:
        return any(i.healthy for i in self.instances)

    def may_eject(self) -> bool:
        ejected = sum(1 for i in self.instances if i.passive.ejected)
        return may_eject(len(self.instances), ejected, self.config.passive.max_ejection_percent)


class Registry:
    """
    All pools by name and all instances by id.

    Listeners registered with L{subscribe} are told whenever an instance's
    health, weight or drain state changes (metrics keep their gauges this way).
    """

    log = Logger()

    def __init__(self, config: Config, clock: IReactorTime) -> None:
        self.clock = clock
        self.pools: dict[str, Pool] = {
            name: Pool(p, clock, make_balancer(p.algorithm)) for name, p in config.pools.items()
        }
        self._instances = {i.id: i for p in self.pools.values() for i in p.instances}
        self._listeners: list[Listener] = []

    def __iter__(self) -> Iterator[Instance]:
        return iter(self._instances.values())

    def instance(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)
        for inst in self._instances.values():
            listener(inst)

    def changed(self, inst: Instance) -> None:
        for listener in self._listeners:
            listener(inst)

    # Operations used by admin, prober and relay.

    def set_weight(self, instance_id: str, weight: float) -> Instance:
        inst = self._require(instance_id)
        if weight < 0:
            raise ValueError("weight must be >= 0")
        inst.base_weight = float(weight)
        self.log.info("weight of {instance} set to {weight}", instance=instance_id, weight=weight)
        self.changed(inst)
        return inst

    def set_drained(self, instance_id: str, drained: bool) -> Instance:
        inst = self._require(instance_id)
        inst.drained = drained
        self.log.info(
            "{instance} {what}", instance=instance_id, what="drained" if drained else "undrained"
        )
        if drained and inst.pool.affinity is not None:
            inst.pool.affinity.forget_instance(inst.id)
        self.changed(inst)
        return inst

    def probe_result(self, inst: Instance, ok: bool, health: dict | None = None) -> None:
        """Record an active probe's outcome."""
        if health is not None:
            inst.health = health
            inst.models = reported_models(health) or inst.models
        became = inst.probe.record(ok)
        if became is None:
            return
        if became:
            inst.mark_up()
            self.log.info("{instance} is healthy again", instance=inst.id)
        else:
            self.log.warn("{instance} is unhealthy", instance=inst.id)
            if inst.pool.affinity is not None:
                inst.pool.affinity.forget_instance(inst.id)
        self.changed(inst)

    def passive_failure(self, inst: Instance) -> None:
        """A live request to C{inst} failed in a way that counts against it."""
        inst.failures += 1
        if inst.passive.ejected or not inst.pool.may_eject():
            return
        if inst.passive.record_failure():
            self.log.warn(
                "{instance} ejected for {seconds}s after {fails} failures",
                instance=inst.id,
                seconds=inst.pool.config.passive.fail_timeout,
                fails=inst.pool.config.passive.max_fails,
            )
            self.changed(inst)

    def passive_success(self, inst: Instance) -> None:
        inst.passive.record_success()

    def _require(self, instance_id: str) -> Instance:
        inst = self._instances.get(instance_id)
        if inst is None:
            raise KeyError(instance_id)
        return inst


def reported_models(body: dict) -> tuple[str, ...]:
    """Model names in a probe answer: OpenAI C{/v1/models}, Ollama C{/api/tags}, or C{model}."""
    found: list[str] = []
    for item in body.get("data") or body.get("models") or ():
        if isinstance(item, dict):
            name = item.get("id") or item.get("name")
            if isinstance(name, str):
                found.append(name)
    if isinstance(body.get("model"), str):
        found.append(body["model"])
    return tuple(found)
