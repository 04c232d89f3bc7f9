"""
Adaptive throttling (SPEC C{rate_limits.adaptive}): tighten the rate limits
of a pool whose backends struggle, and relax them when they recover.

Each pool is judged on two signals, read at most once per
C{EVALUATE_EVERY} (L{clawproxy.policy.adaptive}) seconds (when a
request for the pool is limited, or the admin status is read; no timer):

  - C{latency_p95_above}: the p95 of the pool's upstream attempt latencies
    (what C{clawproxy_upstream_latency_seconds{pool}} observes) over a
    sliding window (L{LatencyWindow}), fed by L{Pool.latency
    <clawproxy.backends.registry.Pool.latency>};
  - C{gpu_memory_above}: the highest C{gpu_memory_used_percent} in the last
    health bodies of the pool's healthy instances (the active health checks
    keep them: C{inst.health}).

The hysteresis is L{Throttle}'s. While a pool is tight, every limit checked
for a request bound to it is multiplied by C{factor}
(L{tightened<clawproxy.policy.limits.tightened>}): the pool's C{max_qps}, and
for routes that name the pool also the agent's limit (or the default, or the
per-address one), the session interval and the route's limit -- not
C{rate_limits.global}, which guards the gateway, not a pool. A request bound
to a tight pool that no tightened limit looked at has a C{1 - factor} share
of such requests shed (L{AdaptiveShed}): served by the pool's fallback when
there is one, else 503 with C{Retry-After: 1} (C{adaptive_throttle}).

Shown under C{adaptive} in C{/admin/status} and as
C{clawproxy_adaptive_factor{pool}}.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from clawproxy.config import Config
from clawproxy.errors import Rejected
from clawproxy.interfaces import IAdminSection, IRelayWrapper
from clawproxy.policy import adaptive as timings
from clawproxy.policy.adaptive import TIGHT, LatencyWindow, Signal, Throttle
from clawproxy.web.context import RequestContext
from clawproxy.web.relay import NoInstance

__all__ = ["TIGHTENED_NOTE", "Adaptive", "AdaptiveShed"]

#: The C{ctx.notes} key a limit stage sets when it tightened a request's limits.
TIGHTENED_NOTE = "adaptive_tightened"
#: The health body field read for GPU memory (SPEC section 6).
GPU_FIELD = "gpu_memory_used_percent"


class _PoolState:
    __slots__ = ("checked", "credit", "pool", "shed", "throttle", "window")

    def __init__(self, pool: Any, factor: float, now: float) -> None:
        self.pool = pool
        self.window = LatencyWindow()
        # The module's timings, read now (a test may shorten them).
        self.throttle = Throttle(factor, now, timings.ENTER_AFTER, timings.LEAVE_AFTER)
        self.checked = -1e300
        self.credit = 0.0
        self.shed = 0


@implementer(IAdminSection)
class Adaptive:
    """The throttle of every pool, and the C{adaptive} admin section."""

    log = Logger()
    name = "adaptive"

    def __init__(self, config: Config, registry: Any, clock: Any, metrics: Any) -> None:
        adaptive = config.rate_limits.adaptive if config.rate_limits is not None else None
        assert adaptive is not None
        self.clock = clock
        self.metrics = metrics
        self.latency_above = adaptive.latency_p95_above
        self.gpu_above = adaptive.gpu_memory_above
        self.factor_value = adaptive.factor
        self.every = timings.EVALUATE_EVERY
        now = clock.seconds()
        self.pools: dict[str, _PoolState] = {}
        for name, pool in registry.pools.items():
            state = self.pools[name] = _PoolState(pool, adaptive.factor, now)
            if self.latency_above is not None:
                pool.latency_watchers = (*pool.latency_watchers, self._watcher(state))
            metrics.adaptive_factor.labels(name).set(1.0)

    def _watcher(self, state: _PoolState) -> Any:
        add, clock = state.window.add, self.clock

        def observe(inst: Any, seconds: float) -> None:
            add(clock.seconds(), seconds)

        return observe

    def factor(self, pool: str) -> float:
        """The factor on pool C{pool}'s limits now (evaluated at most once a second)."""
        state = self.pools.get(pool)
        if state is None:
            return 1.0
        now = self.clock.seconds()
        if now - state.checked >= self.every:
            self._evaluate(state, now)
        return state.throttle.factor

    def _evaluate(self, state: _PoolState, now: float) -> None:
        state.checked = now
        signals = []
        if self.latency_above is not None:
            signals.append(Signal("latency_p95", state.window.p95(now), self.latency_above))
        if self.gpu_above is not None:
            signals.append(Signal("gpu_memory", gpu_memory(state.pool), self.gpu_above))
        throttle = state.throttle
        if not throttle.evaluate(now, signals):
            return
        name = state.pool.name
        self.metrics.adaptive_factor.labels(name).set(throttle.factor)
        if throttle.state == TIGHT:
            state.credit = 0.0
            self.log.warn("pool {pool} struggles ({why}): its limits are tightened by {factor}",
                          pool=name, why=_readings(throttle.last), factor=throttle.factor)
        else:
            self.log.info("pool {pool} recovered ({why}): its limits are relaxed",
                          pool=name, why=_readings(throttle.last))

    def shed(self, pool: str) -> bool:
        """
        Whether to shed one more request of pool C{pool}, which no limit
        looked at: of every such request, a C{factor} share goes on (spread
        evenly: a credit of C{factor} per request, one spent per request let
        through).
        """
        factor = self.factor(pool)
        if factor >= 1.0:
            return False
        state = self.pools[pool]
        state.credit += factor
        if state.credit >= 1.0:
            state.credit -= 1.0
            return False
        state.shed += 1
        return True

    # -- admin

    def status(self) -> dict[str, Any]:
        now = self.clock.seconds()
        out: dict[str, Any] = {
            "latency_p95_above": self.latency_above,
            "gpu_memory_above": self.gpu_above,
            "factor": self.factor_value,
            "pools": {},
        }
        for name, state in self.pools.items():
            self.factor(name)
            t = state.throttle
            readings = {s.name: (None if s.value is None else round(s.value, 3))
                        for s in t.last}
            out["pools"][name] = {
                "state": t.state,
                "factor": t.factor,
                "since": round(now - t.since, 3),
                "reason": list(t.reason),
                "transitions": t.transitions,
                "shed": state.shed,
                **readings,
            }
        return out

    def endpoints(self) -> dict[tuple[bytes, bytes], Any]:
        return {}


def gpu_memory(pool: Any) -> float | None:
    """The highest GPU memory percent the healthy instances of C{pool} last reported."""
    high = None
    for inst in pool.instances:
        health = inst.health
        if not health or not inst.healthy:
            continue
        value = health.get(GPU_FIELD)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if high is None or value > high:
            high = float(value)
    return high


def _readings(signals: Any) -> str:
    return ", ".join(f"{s.name} {'-' if s.value is None else f'{s.value:g}'}"
                     f" vs {s.threshold:g}" for s in signals)


@implementer(IRelayWrapper)
class AdaptiveShed:
    """
    Around the relay step (so a cached answer is never shed): a request
    bound to a tight pool whose limits no stage tightened is shed in a
    C{1 - factor} share. A shed request is served like one its pool cannot
    take: by the next model of its fallback chain, or its route's (else its
    pool's) static fallback; without those, 503 C{adaptive_throttle} with
    C{Retry-After: 1} (which a C{cache} fallback may still answer).
    """

    def __init__(self, adaptive: Adaptive, config: Config) -> None:
        self.adaptive = adaptive
        self.fallbacks = config.fallbacks

    def __repr__(self) -> str:
        return "<AdaptiveShed>"

    def wrap(self, forward: Any) -> Any:
        shed = self.adaptive.shed

        def shed_or_forward(ctx: RequestContext, pool: Any, *args: Any) -> Any:
            notes = ctx.notes
            if (notes is None or not notes.get(TIGHTENED_NOTE)) and shed(pool.name):
                raise self._shed(ctx, pool)
            return forward(ctx, pool, *args)

        return shed_or_forward

    def _shed(self, ctx: RequestContext, pool: Any) -> Exception:
        ctx.error = "adaptive_shed"
        name = ctx.route.config.fallback or pool.config.fallback
        fallback = self.fallbacks.get(name) if name else None
        if ctx.alternative or (fallback is not None and fallback.type == "static"):
            return NoInstance(pool.name)
        return Rejected(503, f"pool {pool.name!r} is overloaded: request shed by adaptive"
                        " throttling", "server_error", "adaptive_throttle",
                        (("Retry-After", "1"),))
