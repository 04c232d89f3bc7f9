"""
The shared backend registry: pools, their instances and each instance's live state.

The registry is the one place that decides which instances may take a
request: L{Pool.take} is that decision. An instance is a candidate when its
active health checks pass, it is not drained, its weight is above 0, it is
under C{max_connections} and no availability policy (passive ejection,
circuit breakers: L{IAvailabilityPolicy}) excludes it; the pool's balancer
chooses among the candidates (slow start ramps the weight it reads), and
the chosen one is then admitted by each policy, once. The prober and the
relay report to it (L{Registry.probe_result}, L{Pool.record}); the
balancer, admin and metrics read it.

An instance that refuses connections (or cannot be connected to) is out at
once, whatever C{max_ejection_percent} says, as HAProxy's C{observe layer4}
with C{on-error mark-down}: until an active health check passes, or for
L{L4_RETRY_INTERVAL} seconds, after which one request tries it again (a
refused connection costs nothing upstream and is retried elsewhere without
spending the retry budget). Such instances are still used when no other
instance of the pool may take the request, so a pool whose every instance
refuses answers as it did before (502, naming the instances tried).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from clawproxy.config import Config, InstanceConfig, PoolConfig
from clawproxy.interfaces import CANCELLED, OK, IAvailabilityPolicy, IBreakerBoard
from clawproxy.policy.affinity import AffinityTable
from clawproxy.policy.balancers import Balancer, make_balancer
from clawproxy.policy.breakers import NoBreakers
from clawproxy.policy.health import ClientBound, PassiveEjection, PassiveState, ProbeState

Listener = Callable[["Instance"], None]

#: Seconds an instance that refused a connection stays out unless an active
#: health check passes first (a constant for now: no config key).
L4_RETRY_INTERVAL = 1.0


class Instance:
    """
    One backend instance and its live state.

    @ivar base_weight: the weight set by config or admin; C{weight} is this
        ramped by slow start, which balancers read.
    @ivar config_weight: the weight the config file gave (a reload keeps a
        runtime weight only if it differs from this).
    @ivar down_until: when an instance that refused a connection may be
        tried again (clock seconds), or L{None}.
    """

    def __init__(self, pool: Pool, cfg: InstanceConfig, clock: IReactorTime) -> None:
        self.pool = pool
        self.id = cfg.id
        self.url = cfg.url
        self.url_bytes = cfg.url.encode("ascii")
        self.host_header = urlsplit(cfg.url).netloc.encode("ascii")
        self.base_weight = self.config_weight = float(cfg.weight)
        self.max_connections = cfg.max_connections
        self.drained = False
        self.active = 0
        self.requests = 0
        self.failures = 0
        self.down_until: float | None = None
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
    def down(self) -> bool:
        """Whether the instance refused a connection and is out for it now."""
        until = self.down_until
        if until is None:
            return False
        if self._clock.seconds() >= until:
            self.down_until = None
            return False
        return True

    @property
    def state(self) -> str:
        """C{healthy}, C{unhealthy}, C{draining} or C{ejected} (SPEC section 2, Names)."""
        if not self.probe.healthy:
            return "unhealthy"
        if self.drained:
            return "draining"
        if self.passive.ejected or self.down:
            return "ejected"
        return "healthy"

    def available(self) -> bool:
        """
        May this instance take a new request now, admission aside? (Healthy,
        not drained, weight > 0, under C{max_connections}, excluded by no
        policy, and not out for a refused connection.)
        """
        if not (
            self.probe.healthy
            and not self.drained
            and self.base_weight > 0
            and (self.max_connections is None or self.active < self.max_connections)
        ):
            return False
        for excludes in self.pool.excluders:
            if excludes(self):
                return False
        return not self.down

    def mark_up(self) -> None:
        """Start slow start (if configured) from now."""
        if self.pool.config.slow_start:
            self._up_since = self._clock.seconds()

    def success_rate(self) -> float:
        if not self.requests:
            return 1.0
        return max(0.0, (self.requests - self.failures) / self.requests)


class Pool:
    """
    A named set of instances behind one balancer, and the availability
    decision for them (L{candidates}, L{take}).

    @ivar policies: the availability policies, asked in order.
    """

    log = Logger()

    def __init__(self, cfg: PoolConfig, clock: IReactorTime, balancer: Balancer,
                 policies: Sequence[IAvailabilityPolicy] = (),
                 changed: Listener | None = None) -> None:
        self.name = cfg.name
        self.config = cfg
        self.balancer = balancer
        self.policies = tuple(policies)
        self.excluders = tuple(p.excludes for p in self.policies)
        self._admitters = tuple(p.admit for p in self.policies)
        self._observe_ttfb = getattr(balancer, "observe", None)
        self._changed = changed
        self._clock = clock
        self.instances = [Instance(self, i, clock) for i in cfg.instances]
        self.by_id = {i.id: i for i in self.instances}
        #: The models the instances reported (discovery), all together.
        self.discovered: frozenset[str] = frozenset()
        #: How much of the instances' failure counts one client may add.
        self.blame = ClientBound(cfg.passive.fail_timeout, clock)
        aff = cfg.session_affinity
        self.affinity = (AffinityTable(clock, aff.ttl, aff.max_entries)
                         if aff is not None else None)
        #: Told C{(instance, seconds)} of every finished upstream attempt
        #: (L{latency}); e.g. adaptive throttling keeps the pool's p95.
        self.latency_watchers: tuple[Callable[[Instance, float], None], ...] = ()

    def candidates(self, exclude: frozenset[str] | set[str] = frozenset()) -> list[Instance]:
        """
        The instances (in config order) that may take a request now, less
        the ids in C{exclude}. Instances out for a refused connection are
        returned only when no other instance may take it.
        """
        out = []
        spare = None
        excluders = self.excluders
        for i in self.instances:
            # Instance.available(), inlined: this runs for every instance of
            # every request (and a refused instance is kept as a spare).
            if (
                i.id in exclude
                or not i.probe.healthy
                or i.drained
                or i.base_weight <= 0
                or (i.max_connections is not None and i.active >= i.max_connections)
            ):
                continue
            for excludes in excluders:
                if excludes(i):
                    break
            else:
                if i.down_until is not None and i.down:
                    if spare is None:
                        spare = []
                    spare.append(i)
                else:
                    out.append(i)
        return out if out or spare is None else spare

    def take(self, key: str | None = None, exclude: frozenset[str] | set[str] = frozenset(),
             sticky_key: str | None = None) -> Instance | Deferred[Instance | None] | None:
        """
        Choose an instance for one attempt and take its admission: the one
        availability decision.

        The balancer picks among L{candidates} (or the pinned instance of
        C{sticky_key}, on a first attempt); each policy is then asked once
        to L{admit<IAvailabilityPolicy.admit>} that instance. A refused
        instance is set aside and another one picked. The caller must
        L{record} the outcome of the attempt it makes with the result.

        @param key: the balancer's hash key (client IP, session...), if any.
        @param exclude: ids not to choose (already tried).
        @param sticky_key: the session-affinity key, if the pool has affinity.
        @return: the instance, L{None} if none may take the request, or (only
            when a policy answers with a Deferred) a Deferred firing with one
            of those.
        """
        skipped = exclude
        while True:
            inst, pin = self._pick(key, skipped, sticky_key)
            if inst is None:
                return None
            index = 0
            for admit in self._admitters:
                answer = admit(inst)
                if isinstance(answer, Deferred):
                    return Deferred.fromCoroutine(
                        self._take_slowly(key, skipped, sticky_key, inst, pin, index, answer))
                if not answer:
                    self._release(inst, index)
                    break
                index += 1
            else:
                if pin:
                    self.affinity.set(sticky_key, inst.id)  # type: ignore[union-attr]
                return inst
            skipped = {*skipped, inst.id}

    def _pick(self, key: str | None, exclude: frozenset[str] | set[str],
              sticky_key: str | None) -> tuple[Instance | None, bool]:
        """The balancer's (or affinity's) choice, and whether to pin it to C{sticky_key}."""
        candidates = self.candidates(exclude)
        if sticky_key is None or self.affinity is None:
            return self.balancer.pick(candidates, key), False
        if not exclude:
            pinned = self.affinity.get(sticky_key)
            if pinned is not None:
                for c in candidates:
                    if c.id == pinned:
                        return c, False
        inst = self.balancer.pick(candidates, key)
        return inst, inst is not None

    async def _take_slowly(self, key: str | None, exclude: frozenset[str] | set[str],
                           sticky_key: str | None, inst: Instance, pin: bool, index: int,
                           answer: Any) -> Instance | None:
        """L{take} once a policy answered with a Deferred."""
        skipped = set(exclude)
        while True:
            if await self._admission(inst, index, answer):
                if pin:
                    self.affinity.set(sticky_key, inst.id)  # type: ignore[union-attr]
                return inst
            skipped.add(inst.id)
            picked, pin = self._pick(key, skipped, sticky_key)
            if picked is None:
                return None
            inst, index, answer = picked, 0, None

    async def _admission(self, inst: Instance, index: int, answer: Any) -> bool:
        """
        Finish asking the policies from C{index} on (C{answer} is that one's,
        if already given). On a refusal or an error, the policies that had
        admitted C{inst} are told the attempt will not happen (L{CANCELLED}).
        """
        policies = self.policies
        try:
            while True:
                if answer is None:
                    answer = policies[index].admit(inst)
                if isinstance(answer, Deferred):
                    answer = await answer
                if not answer:
                    self._release(inst, index)
                    return False
                index += 1
                if index == len(policies):
                    return True
                answer = None
        except BaseException:
            self._release(inst, index)
            raise

    def _release(self, inst: Instance, upto: int) -> None:
        for policy in self.policies[:upto]:
            policy.record(inst, CANCELLED, False)

    def record(self, inst: Instance, outcome: str, reached: bool = True,
               client: str | None = None) -> None:
        """
        The outcome of an attempt to C{inst} made with L{take}'s answer: the
        instance's failure count, its refused-connection mark and every
        policy (passive ejection, breakers) follow it.

        A failure that reached the instance counts for the policies only if
        C{client} had none counted against C{inst} in the last
        C{fail_timeout} without a success since (L{ClientBound}): one client
        cannot eject an instance, or open its breaker, with requests that
        fail everywhere. The policies are told such a failure as
        L{CANCELLED} (it frees any admission slot and counts neither way).

        @param outcome: L{OK}, L{CANCELLED} or a failure name (C{"refused"},
            C{"connect_failure"}, C{"5xx"}, C{"timeout"}, ...).
        @param reached: L{False} when the connection never opened: the
            instance is then out at once (see the module docstring).
        @param client: the client's address, or L{None} (every failure counts).
        """
        policies = self.policies
        if outcome == OK:
            if self.blame.marks and client is not None:
                self.blame.forgive(client)
            for policy in policies:
                policy.record(inst, OK, True)
            if inst.down_until is not None:
                inst.down_until = None
                if self._changed is not None:
                    self._changed(inst)
            return
        if outcome == CANCELLED:
            for policy in policies:
                policy.record(inst, CANCELLED, reached)
            return
        before = inst.state
        inst.failures += 1
        if not reached:
            if not inst.down:
                self.log.warn(
                    "{instance} refused a connection: out for {seconds}s or until a health "
                    "check passes", instance=inst.id, seconds=L4_RETRY_INTERVAL)
            inst.down_until = self._clock.seconds() + L4_RETRY_INTERVAL
        elif client is not None and not self.blame.counts(client, inst.id):
            outcome = CANCELLED
        for policy in policies:
            policy.record(inst, outcome, reached)
        if self._changed is not None and inst.state != before:
            self._changed(inst)

    def ttfb(self, inst: Instance, seconds: float) -> None:
        """
        C{inst} sent a response head C{seconds} after the request (a
        balancer that judges latency, C{least_latency}, learns from it).
        """
        if self._observe_ttfb is not None:
            self._observe_ttfb(inst.id, seconds)

    def latency(self, inst: Instance, seconds: float) -> None:
        """
        An upstream attempt to C{inst} ended (answered in full, failed or was
        cancelled) C{seconds} after it began: what C{upstream_latency_seconds}
        observes. Every L{latency_watchers} is told.
        """
        for watcher in self.latency_watchers:
            watcher(inst, seconds)

    def any_healthy(self) -> bool:
        return any(i.healthy for i in self.instances)


class Registry:
    """
    All pools by name and all instances by id.

    Listeners registered with L{subscribe} are told whenever an instance's
    health, weight, drain or ejection state changes (metrics keep their
    gauges this way).

    @ivar breakers: the circuit breakers, the second availability policy
        after passive ejection.
    """

    log = Logger()

    def __init__(self, config: Config, clock: IReactorTime,
                 breakers: IBreakerBoard | None = None) -> None:
        self.clock = clock
        self.breakers = breakers if breakers is not None else NoBreakers()
        self.policies: tuple[IAvailabilityPolicy, ...] = (PassiveEjection(), self.breakers)
        self.pools: dict[str, Pool] = {
            name: Pool(p, clock, make_balancer(p.algorithm, clock=clock), self.policies,
                       self.changed)
            for name, p in config.pools.items()
        }
        self._instances = {i.id: i for p in self.pools.values() for i in p.instances}
        self._listeners: list[Listener] = []
        self._watchers: list[Any] = []
        self._discovered: dict[str, frozenset[str]] | None = None

    def __iter__(self) -> Iterator[Instance]:
        return iter(self._instances.values())

    def instance(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)
        for inst in self._instances.values():
            listener(inst)

    def watch(self, watcher: Any) -> None:
        """
        Tell C{watcher} every probe result and admin change as it is made
        (C{watcher.probe_result(inst, ok, health)}, C{weight_set(id, weight)},
        C{drained_set(id, drained)}): a parent process tells its workers.
        """
        self._watchers.append(watcher)

    def changed(self, inst: Instance) -> None:
        for listener in self._listeners:
            listener(inst)

    def adopt(self, old: Registry) -> None:
        """
        Carry instance state over from the registry a reload replaces: an
        instance that keeps its id and URL keeps its drain state, probe state,
        refused-connection mark, last health body and reported models, and a
        weight set at runtime (admin, CLI); a weight changed in the file
        takes effect.
        """
        for inst in self:
            prev = old.instance(inst.id)
            if prev is None or prev.url != inst.url:
                continue
            inst.drained = prev.drained
            inst.probe = prev.probe
            inst.down_until = prev.down_until
            inst.health = prev.health
            if prev.models:
                self.models_reported(inst, prev.models)
            if prev.base_weight != prev.config_weight:
                inst.base_weight = prev.base_weight
            self.changed(inst)  # gauges follow the carried-over state

    # Operations used by admin, prober and relay.

    def set_weight(self, instance_id: str, weight: float) -> Instance:
        inst = self._require(instance_id)
        if weight < 0:
            raise ValueError("weight must be >= 0")
        inst.base_weight = float(weight)
        self.log.info("weight of {instance} set to {weight}", instance=instance_id, weight=weight)
        self.changed(inst)
        for watcher in self._watchers:
            watcher.weight_set(instance_id, inst.base_weight)
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
        for watcher in self._watchers:
            watcher.drained_set(instance_id, drained)
        return inst

    def probe_result(self, inst: Instance, ok: bool, health: dict | None = None) -> None:
        """
        Record an active probe's outcome. A passing probe also ends a
        refused-connection mark and (through the policies) a passive
        ejection at once.
        """
        for watcher in self._watchers:
            watcher.probe_result(inst, ok, health)
        if health is not None:
            inst.health = health
            models = reported_models(health)
            if models:
                self.models_reported(inst, models)
        before = inst.state
        if ok:
            inst.down_until = None
        for policy in inst.pool.policies:
            policy.probed(inst, ok)
        became = inst.probe.record(ok)
        if became is None:
            if inst.state != before:
                self.changed(inst)
            return
        if became:
            inst.mark_up()
            self.log.info("{instance} is healthy again", instance=inst.id)
        else:
            self.log.warn("{instance} is unhealthy", instance=inst.id)
            if inst.pool.affinity is not None:
                inst.pool.affinity.forget_instance(inst.id)
        self.changed(inst)

    def models_reported(self, inst: Instance, models: Sequence[str]) -> None:
        """
        C{inst} reported serving C{models} (model discovery, or a health
        probe of a model list): its pool's L{Pool.discovered} follows.
        """
        models = tuple(models)
        if models == inst.models:
            return
        inst.models = models
        pool = inst.pool
        pool.discovered = frozenset(m for i in pool.instances for m in i.models)
        self._discovered = None

    def discovered(self) -> dict[str, frozenset[str]]:
        """
        The models each pool's instances reported, by pool name (kept until
        a report changes it: routing by model asks on every request; do not
        change the mapping returned).
        """
        if self._discovered is None:
            self._discovered = {name: pool.discovered for name, pool in self.pools.items()}
        return self._discovered

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
