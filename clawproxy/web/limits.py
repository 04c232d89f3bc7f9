"""
Rate limits as request stages of the data plane (SPEC C{rate_limits},
C{agents.NAME.rate_limit}, C{routes[].rate_limit}, C{pools.NAME.max_qps}).

L{RouteLimits} runs once the route is known (after auth): it gathers every
limit that applies to the request -- C{rate_limits.global}, the agent's own
C{rate_limit} or C{rate_limits.default} (per agent, or per client address
for anonymous requests), C{session_min_interval} per session, the route's
C{rate_limit}, and the pool's C{max_qps} when the route names its pool --
and decides them all in one atomic store call (L{LIMITS}). L{PoolLimits}
runs once the pool is chosen, for pools picked by model or split. A
configuration without limits adds neither (nothing to pay per request).

Every request a limit looked at carries C{X-RateLimit-Limit},
C{X-RateLimit-Remaining} and C{X-RateLimit-Reset} (seconds until the limit
is whole again) of its tightest limit; a refused one is answered 429 with
C{Retry-After} (the real wait, rounded up to whole seconds), or waits in a
L{FairQueue} with C{on_limit: queue}. When the store cannot be reached,
C{store.redis.on_error} decides: C{fail_open} lets the request through,
C{fail_closed} answers 503 with C{Retry-After} (the rule is
L{clawproxy.stores.onerror}'s).

With C{rate_limits.adaptive}, the limits of requests bound to a pool that
struggles are multiplied by its factor (all but C{global}), and requests no
limit looks at are shed in a share: see L{clawproxy.web.adaptive}.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from clawproxy.config import Config
from clawproxy.errors import Rejected
from clawproxy.interfaces import IAdminSection, IAgentUse, IRequestStage
from clawproxy.policy.fairqueue import FairQueue, QueueExpired, QueueFull
from clawproxy.policy.limits import Decision, Limit, Outcome, tightened
from clawproxy.policy.ratescript import LIMITS, apply, batch_args, parse_batch
from clawproxy.stores.memory import MemoryStore
from clawproxy.stores.onerror import fails_closed, on_store_failure
from clawproxy.units import Rate
from clawproxy.web.adaptive import TIGHTENED_NOTE, Adaptive, AdaptiveShed
from clawproxy.web.context import RequestContext
from clawproxy.web.headers import _is_trusted

__all__ = ["Limiter", "LimitsSection", "PoolLimits", "RouteLimits", "client_address",
           "limits_parts"]

_HEADERS = (b"x-ratelimit-limit", b"x-ratelimit-remaining", b"x-ratelimit-reset")
#: Agents shown in C{/admin/status}.
BUSIEST = 10
#: Agents (or addresses) whose last decision is kept for the admin API.
KEPT = 1000
#: Requests decided in one store call at most.
MAX_BATCH = 64


def client_address(ctx: RequestContext, trusted: Sequence[Any]) -> str:
    """
    The client's address for per-client limits: the peer's, or, when the
    peer is one of C{server.trusted_proxies}, the last address of its
    C{X-Forwarded-For} chain that is not itself a trusted proxy.
    """
    peer = ctx.client_ip
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    values = ctx.request.requestHeaders.getRawHeaders(b"x-forwarded-for")
    if not values:
        return peer
    chain = [a.strip() for v in values for a in v.decode("latin-1").split(",") if a.strip()]
    for address in reversed(chain):
        if not _is_trusted(address, trusted):
            try:
                return str(ipaddress.ip_address(address))
            except ValueError:
                return peer  # garbage from (or through) the proxy: not believed
    return chain[0] if chain else peer


def _session_id(ctx: RequestContext) -> str | None:
    """C{X-Session-ID}, else the JSON body's C{user}; hashed when long."""
    values = ctx.request.requestHeaders.getRawHeaders(b"x-session-id")
    sid: str | None = None
    if values:
        sid = values[-1].decode("latin-1")
    else:
        body = ctx.body
        if body is None and ctx.method == b"POST":
            try:
                body = ctx.json_body()
            except Rejected:
                body = None
        user = body.get("user") if isinstance(body, dict) else None
        if isinstance(user, str):
            sid = user
    if not sid:
        return None
    if len(sid) > 64 or not sid.isprintable():
        sid = "h:" + hashlib.sha256(sid.encode("utf-8", "surrogateescape")).hexdigest()
    return sid


class Limiter:
    """
    Decides sets of limits on the store, applying C{store.redis.on_error}
    when it cannot be reached, and keeps what operators see (use per agent).
    """

    log = Logger()

    def __init__(self, config: Config, store: Any, clock: Any, metrics: Any) -> None:
        self.store = store
        self.clock = clock
        self.metrics = metrics
        #: C{store.redis.on_error} applies to this store (L{fails_closed}).
        self.fail_closed = fails_closed(config, store)
        self.config = config
        #: The memory store's key space, run directly (the script's Python twin).
        self.memory = store.keys if isinstance(store, MemoryStore) else None
        #: Per agent (or client address), for the admin API: when its limits
        #: were last decided, that decision, and how many decisions so far.
        self.seen: dict[str, tuple[float, list[tuple[Limit, Decision]], int]] = {}
        self.refused: dict[str, int] = {}
        self._batch: list[tuple[Sequence[Limit], str, Deferred[Outcome | None]]] | None = None

    def check(self, limits: Sequence[Limit], who: str) -> Outcome | Deferred[Outcome | None]:
        """
        Decide C{limits} in one store call.

        @return: the L{Outcome} itself from a memory store (it answers at
            once: no Deferred, no text arguments on the hot path), else a
            Deferred firing with it, or with L{None} when the store could not
            answer and L{on_store_failure} lets the request go.
        @raise Rejected: (as the Deferred's failure) 503 under C{fail_closed}.
        """
        if self.memory is not None:
            self.memory.sweep()
            outcome = apply(self.memory, limits)
            self._remember(who, limits, outcome)
            return outcome
        # The checks asked for during one reactor turn go to the store as one
        # call (each request still all or nothing, in order): far fewer
        # round trips under load, at most one turn later.
        d: Deferred[Outcome | None] = Deferred(lambda _: None)
        if self._batch is None:
            self._batch = []
            self.clock.callLater(0, self._flush)
        self._batch.append((limits, who, d))
        if len(self._batch) >= MAX_BATCH:
            self._flush()
        return d

    def _flush(self) -> None:
        batch, self._batch = self._batch, None
        if not batch:
            return
        keys, argv = batch_args([limits for limits, _, _ in batch])
        try:
            d = self.store.run(LIMITS, keys, argv)
        except Exception as e:  # a store bug must not become a hung request
            d = fail(e)
        d.addCallback(self._decided, batch)
        d.addErrback(self._store_failed, batch)

    def _decided(self, reply: Any, batch: list[Any]) -> None:
        for (limits, who, d), outcome in zip(batch, parse_batch(reply)):
            self._remember(who, limits, outcome)
            if not d.called:  # not cancelled (its client left)
                d.callback(outcome)

    def _remember(self, who: str, limits: Sequence[Limit], outcome: Outcome) -> None:
        """Keep the last decision per agent (or address) for the admin API, bounded."""
        seen = self.seen
        before = seen.get(who)
        seen[who] = (self.clock.seconds(), list(zip(limits, outcome.decisions)),
                     1 if before is None else before[2] + 1)
        if len(seen) > 4 * KEPT:
            # Keep the most recent; and forget refusal counts of the forgotten.
            self.seen = dict(sorted(seen.items(), key=lambda kv: kv[1][0])[-KEPT:])
            self.refused = {who: n for who, n in self.refused.items() if who in self.seen}

    def _store_failed(self, failure: Any, batch: list[Any]) -> None:
        rejected = on_store_failure(failure, self.fail_closed, "rate limits")
        for _, _, d in batch:
            if d.called:
                continue
            if rejected is None:
                d.callback(None)
            else:
                d.errback(rejected)

    def count_refusal(self, ctx: RequestContext, limit: Limit, who: str) -> None:
        """A request of C{who} (agent, or C{ip:ADDRESS}) was refused by C{limit}."""
        self.metrics.rate_limited_total.labels(ctx.agent_label, limit.name).inc()
        self.refused[who] = self.refused.get(who, 0) + 1


def set_headers(ctx: RequestContext, d: Decision) -> None:
    """
    Put C{d}'s C{X-RateLimit-*} on the response, unless a tighter limit
    (fewer remaining) already did.
    """
    headers = ctx.response_headers
    for name, value in headers:
        if name == b"x-ratelimit-remaining":
            if int(value) < d.remaining:
                return
            break
    headers[:] = [h for h in headers if h[0] not in _HEADERS]
    headers += [(b"x-ratelimit-limit", b"%d" % d.limit),
                (b"x-ratelimit-remaining", b"%d" % d.remaining),
                (b"x-ratelimit-reset", b"%d" % math.ceil(d.reset))]


class _Stage:
    """What both limit stages share: check, then answer, refuse or queue."""

    log = Logger()
    #: The C{limit} label of this stage's queue metrics.
    label = ""

    def __init__(self, limiter: Limiter, config: Config, metrics: Any, clock: Any,
                 adaptive: Adaptive | None = None) -> None:
        self.limiter = limiter
        #: Adaptive throttling (C{rate_limits.adaptive}), if configured.
        self.adaptive = adaptive
        rl = config.rate_limits
        #: C{rate_limits.algorithm}: the algorithm of this stage's limits.
        self.algorithm = rl.algorithm if rl is not None else "token_bucket"
        self.queue: FairQueue | None = None
        if rl is not None and rl.on_limit == "queue":
            gauge = metrics.queue_depth.labels(self.label)
            self.queue = FairQueue(clock, rl.queue.max_size, rl.queue.max_wait, self._attempt,
                                   on_change=gauge.set)
        self.clock = clock
        self.metrics = metrics
        self.trusted = tuple(config.server.trusted_proxies)

    def limits_for(self, ctx: RequestContext) -> list[Limit]:
        raise NotImplementedError

    def _adapt(self, ctx: RequestContext, pool: str, limits: list[Limit]) -> list[Limit]:
        """C{limits} of a request bound to C{pool}, tightened while the pool is tight."""
        assert self.adaptive is not None
        factor = self.adaptive.factor(pool)
        if factor >= 1.0:
            return limits
        out = [limit if limit.name == "global" else tightened(limit, factor)
               for limit in limits]
        if any(limit.name != "global" for limit in limits):
            if ctx.notes is None:
                ctx.notes = {}
            ctx.notes[TIGHTENED_NOTE] = True
        return out

    def process(self, ctx: RequestContext) -> Deferred[None] | None:
        limits = self.limits_for(ctx)
        if not limits:
            return None
        if ctx.agent is not None:
            lane = ctx.agent_name
        else:
            lane = "ip:" + client_address(ctx, self.trusted)
        if self.queue is not None and self.queue.waiting(lane):
            return self._enqueue(ctx, limits, lane, 0.0, None)
        d = self.limiter.check(limits, lane)
        if not isinstance(d, Deferred):
            return self._decided(d, ctx, limits, lane)
        d.addCallback(self._decided, ctx, limits, lane)
        if d.called and not d.paused:
            result: list[Any] = []
            d.addBoth(result.append)
            if isinstance(result[0], Failure):
                result[0].raiseException()
            return result[0]
        return d

    def _decided(self, outcome: Outcome | None, ctx: RequestContext, limits: list[Limit],
                 lane: str) -> Any:
        if outcome is None:
            return None  # fail_open
        i = outcome.tightest()
        set_headers(ctx, outcome.decisions[i])
        if outcome.allowed:
            return None
        wait = outcome.retry_after
        if self.queue is not None and not math.isinf(wait):
            return self._enqueue(ctx, limits, lane, wait, limits[i])
        self.limiter.count_refusal(ctx, limits[i], lane)
        raise _too_many(wait, f"rate limit exceeded ({limits[i].name})")

    def _enqueue(self, ctx: RequestContext, limits: list[Limit], lane: str, wait: float,
                 limit: Limit | None) -> Deferred[None]:
        assert self.queue is not None
        try:
            d = self.queue.wait(lane, (ctx, limits, lane), wait)
        except QueueFull:
            self.limiter.count_refusal(ctx, limit or limits[0], lane)
            raise _too_many(max(wait, 1.0), "rate limit exceeded and the queue is full",
                            "queue_full") from None
        started = self.clock.seconds()

        def released(outcome: Outcome | None) -> None:
            self.metrics.queue_wait.observe(self.clock.seconds() - started)
            if outcome is not None:
                set_headers(ctx, outcome.decisions[outcome.tightest()])

        def expired(failure: Any) -> Any:
            if failure.check(QueueExpired):
                self.metrics.queue_wait.observe(self.clock.seconds() - started)
                self.limiter.count_refusal(ctx, limit or limits[0], lane)
                raise _too_many(1.0, "rate limit exceeded: waited too long in the queue",
                                "queue_timeout")
            return failure

        return d.addCallbacks(released, expired)

    def _attempt(self, item: Any) -> Deferred[tuple[bool, float, Any]]:
        ctx, limits, lane = item
        d = self.limiter.check(limits, lane)
        if not isinstance(d, Deferred):
            d = succeed(d)

        def decided(outcome: Outcome | None) -> tuple[bool, float, Any]:
            if outcome is None:
                return True, 0.0, None
            if not outcome.allowed:
                set_headers(ctx, outcome.decisions[outcome.tightest()])
            return outcome.allowed, outcome.retry_after, outcome

        return d.addCallback(decided)

    # -- admin

    def waiting(self) -> dict[str, Any]:
        if self.queue is None:
            return {}
        return {"depth": self.queue.depth, "lanes": self.queue.lanes()}


def _too_many(wait: float, message: str, code: str = "rate_limit_exceeded") -> Rejected:
    seconds = 1 if math.isinf(wait) else max(1, math.ceil(wait))
    if not math.isinf(wait):
        message += f"; retry in {wait:.3f}s"
    return Rejected(429, message, "rate_limit_error", code, (("Retry-After", str(seconds)),))


@implementer(IRequestStage)
class RouteLimits(_Stage):
    """
    Once the route is known: the global, agent (or default), session and
    route limits, and the pool's C{max_qps} when the route names its pool.
    """

    name = "rate_limits"
    phase = "route"
    label = "route"

    def __init__(self, limiter: Limiter, config: Config, metrics: Any, clock: Any,
                 adaptive: Adaptive | None = None) -> None:
        super().__init__(limiter, config, metrics, clock, adaptive)
        rl = config.rate_limits
        algo = self.algorithm
        burst = rl.burst if rl is not None else None
        self.burst = burst
        self.global_ = Limit.of("global", f"rl:{algo}:global", rl.global_, algo, burst) \
            if rl is not None and rl.global_ is not None else None
        self.default = rl.default if rl is not None else None
        self.session = rl.session_min_interval if rl is not None else None
        self.agents: dict[str, Rate] = {name: a.rate_limit for name, a in config.agents.items()
                                        if a.rate_limit is not None}
        self.routes: dict[int, list[Limit]] = {}
        for i, route in enumerate(config.routes):
            limits = []
            if route.rate_limit is not None:
                limits.append(Limit.of("route", f"rl:{algo}:route:{i}", route.rate_limit, algo,
                                       burst))
            pool = config.pools.get(route.pool) if route.pool is not None else None
            if pool is not None and pool.max_qps is not None:
                limits.append(pool_limit(pool.name, pool.max_qps, algo))
            if limits:
                self.routes[id(route)] = limits
        self._agent_limits: dict[str, tuple[Rate, Limit]] = {}
        self.any = bool(self.global_ or self.default or self.session or self.agents
                        or self.routes)

    def __repr__(self) -> str:
        return "<RouteLimits>"

    def limits_for(self, ctx: RequestContext) -> list[Limit]:
        algo, burst = self.algorithm, self.burst
        limits = [self.global_] if self.global_ is not None else []
        if ctx.agent is not None:
            name = ctx.agent_name
            rate = self.agents.get(name) or getattr(ctx.agent, "rate_limit", None) \
                or self.default
            if rate is not None:
                cached = self._agent_limits.get(name)
                if cached is None or cached[0] != rate:
                    cached = (rate, Limit.of("agent", f"rl:{algo}:agent:{name}", rate, algo,
                                             burst))
                    if len(self._agent_limits) < 100_000:
                        self._agent_limits[name] = cached
                limits.append(cached[1])
        elif self.default is not None:
            ip = client_address(ctx, self.trusted)
            limits.append(Limit.of("ip", f"rl:{algo}:ip:{ip}", self.default, algo, burst))
        if self.session is not None:
            sid = _session_id(ctx)
            if sid is not None:
                # Session ids are the client's choice: scoped to the agent, or
                # to the address of an anonymous client, so nobody else's
                # requests can use up a session's turn. Owner and id may both
                # hold ':', so the owner is length-prefixed to keep keys apart.
                owner = ctx.agent_name if ctx.agent is not None else \
                    "ip:" + client_address(ctx, self.trusted)
                limits.append(Limit("session", f"rl:session:{len(owner)}:{owner}:{sid}",
                                    "token_bucket", 1.0, self.session, 1.0))
        route = self.routes.get(id(ctx.route.config))
        if route:
            limits += route
        if self.adaptive is not None and limits and ctx.route.config.pool is not None:
            limits = self._adapt(ctx, ctx.route.config.pool, limits)
        return limits


def pool_limit(name: str, max_qps: float, algorithm: str) -> Limit:
    """C{pools.NAME.max_qps}: per second, a token bucket holding one second's worth."""
    rate = Rate(float(max_qps), 1.0)
    return Limit.of("pool", f"rl:{algorithm}:pool:{name}", rate, algorithm,
                    max(1.0, float(max_qps)))


@implementer(IRequestStage)
class PoolLimits(_Stage):
    """Once the pool is chosen (by model or split): the pool's C{max_qps}."""

    name = "pool_limits"
    phase = "pool"
    label = "pool"

    def __init__(self, limiter: Limiter, config: Config, metrics: Any, clock: Any,
                 adaptive: Adaptive | None = None) -> None:
        super().__init__(limiter, config, metrics, clock, adaptive)
        self.pools = {name: pool_limit(name, p.max_qps, self.algorithm)
                      for name, p in config.pools.items() if p.max_qps is not None}

    def __repr__(self) -> str:
        return "<PoolLimits>"

    def limits_for(self, ctx: RequestContext) -> list[Limit]:
        if ctx.route.config.pool is not None:
            return []  # decided with the route's limits
        limit = self.pools.get(ctx.pool.name)
        if limit is None:
            return []
        if self.adaptive is not None:
            return self._adapt(ctx, ctx.pool.name, [limit])
        return [limit]


@implementer(IAdminSection, IAgentUse)
class LimitsSection:
    """
    C{limits} in C{/admin/status}: the store's health, each stage's queue
    and the use of each limit by the busiest agents; its part of C{GET
    /admin/limits?agent=NAME} (L{agent_use}): one agent's limits and
    current use.
    """

    name = "limits"

    def __init__(self, limiter: Limiter, stages: Sequence[_Stage], config: Config) -> None:
        self.limiter = limiter
        self.stages = stages
        self.config = config

    def status(self) -> dict[str, Any]:
        seen = self.limiter.seen
        refused = self.limiter.refused
        busiest = sorted(seen, key=lambda who: (seen[who][2], refused.get(who, 0)),
                         reverse=True)[:BUSIEST]
        out: dict[str, Any] = {
            "store": self.limiter.store.health(),
            "on_error": "fail_closed" if self.limiter.fail_closed else "fail_open",
            "agents": {who: self._use(who) for who in busiest},
        }
        queues = {st.label: st.waiting() for st in self.stages if st.queue is not None}
        if queues:
            out["queues"] = queues
        return out

    def _use(self, who: str) -> dict[str, Any]:
        _, decisions, count = self.limiter.seen[who]
        return {
            "requests": count,
            "refused": self.limiter.refused.get(who, 0),
            "limits": {
                limit.name: {"limit": str(_rate_text(limit)), "algorithm": limit.algorithm,
                             "remaining": d.remaining, "reset": math.ceil(d.reset)}
                for limit, d in decisions
            },
        }

    @staticmethod
    def merge(statuses: list[dict[str, Any]]) -> dict[str, Any]:
        """
        The workers' sections as one (C{server.workers > 1}): requests,
        refusals and queues summed; a limit's C{remaining} the least and its
        C{reset} the longest any worker last saw (they decide on one shared
        store); the store healthy if every worker reaches it.
        """
        from clawproxy.workers.sections import merge_statuses

        out = merge_statuses(statuses)
        stores = [s["store"] for s in statuses if "store" in s]
        if stores:
            out["store"] = {"backend": stores[0].get("backend"),
                            "healthy": all(s.get("healthy") for s in stores),
                            "latency_ms": max(s.get("latency_ms", 0) for s in stores),
                            "errors": sum(s.get("errors", 0) for s in stores)}
        for who, use in out.get("agents", {}).items():
            for name, limit in use.get("limits", {}).items():
                seen = [s["agents"][who]["limits"][name] for s in statuses
                        if name in s.get("agents", {}).get(who, {}).get("limits", {})]
                limit["remaining"] = min(x["remaining"] for x in seen)
                limit["reset"] = max(x["reset"] for x in seen)
        return out

    def endpoints(self) -> dict[tuple[bytes, bytes], Any]:
        return {}

    def agent_use(self, name: str) -> Deferred[dict[str, Any]]:
        """Agent C{name}'s configured limits, last decision and stored state."""
        agent = self.config.agents.get(name)
        configured: dict[str, Any] = {}
        rl = self.config.rate_limits
        if agent is not None and agent.rate_limit is not None:
            configured["rate_limit"] = str(agent.rate_limit)
        elif rl is not None and rl.default is not None:
            configured["rate_limit"] = str(rl.default) + " (default)"
        if rl is not None and rl.global_ is not None:
            configured["global"] = str(rl.global_)
        if rl is not None and rl.session_min_interval is not None:
            configured["session_min_interval"] = rl.session_min_interval
        for budget in ("token_limit", "spend_limit"):
            value = getattr(agent, budget, None) if agent is not None else None
            if value is not None:
                configured[budget] = str(value)
        out: dict[str, Any] = {"known": agent is not None,
                               "configured": configured,
                               "refused": self.limiter.refused.get(name, 0)}
        if name in self.limiter.seen:
            out.update(self._use(name))
            out["seen_ago"] = round(self.limiter.clock.seconds() - self.limiter.seen[name][0], 3)
        out["current"] = {}
        d = self._current(name)
        return d.addCallback(lambda current: {**out, "current": current})

    def _current(self, name: str) -> Deferred[dict[str, Any]]:
        """The agent's own limit as the store holds it now (read, not taken from)."""
        route = next((st for st in self.stages if isinstance(st, RouteLimits)), None)
        if route is None:
            return succeed({})
        rate = route.agents.get(name) or route.default
        if rate is None:
            return succeed({})
        limit = Limit.of("agent", f"rl:{route.algorithm}:agent:{name}", rate, route.algorithm,
                         route.burst)
        d = self.limiter.store.get(limit.key)

        def read(raw: bytes | None) -> dict[str, Any]:
            return {"key": limit.key, "state": raw.decode() if raw is not None else None,
                    "limit": str(rate), "algorithm": limit.algorithm}

        def failed(f: Any) -> dict[str, Any]:
            return {"key": limit.key, "error": f.getErrorMessage()}

        return d.addCallbacks(read, failed)


def _rate_text(limit: Limit) -> str:
    return str(Rate(limit.count, limit.period))


def limits_parts(config: Config, store: Any, clock: Any, metrics: Any, registry: Any = None,
                 **_: Any) -> list[Any]:
    """
    The rate limit stages C{config} asks for (none when it sets no limit
    and no C{adaptive} section), with their admin sections.
    """
    limiter = Limiter(config, store, clock, metrics)
    rl = config.rate_limits
    adaptive = (Adaptive(config, registry, clock, metrics)
                if rl is not None and rl.adaptive is not None and registry is not None else None)
    stages: list[_Stage] = []
    route = RouteLimits(limiter, config, metrics, clock, adaptive)
    if route.any:
        stages.append(route)
    if any(p.max_qps is not None for p in config.pools.values()) and any(
            r.pool is None for r in config.routes):
        stages.append(PoolLimits(limiter, config, metrics, clock, adaptive))
    parts: list[Any] = []
    if stages:
        parts += [*stages, LimitsSection(limiter, stages, config)]
    if adaptive is not None:
        parts += [AdaptiveShed(adaptive, config), adaptive]
    return parts
