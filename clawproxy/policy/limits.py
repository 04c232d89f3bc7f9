"""
Rate limiting algorithms, as pure functions of (state, now, cost).

Each algorithm keeps its state in a small tuple of floats, written to the
store as text (L{encode_state} / L{decode_state}); L{clawproxy.policy.ratescript}
runs the same steps atomically in Redis (Lua) and in memory (these very
functions). Times are seconds (floats) on the store's clock.

  - C{token_bucket}: state C{(tokens, last)}; a bucket of C{capacity}
    tokens (C{rate_limits.burst}, default the limit's count) refilled at
    C{count / period} per second.
  - C{fixed_window}: state C{(window, used)}; at most C{count} per window
    C{[k * period, (k + 1) * period)}.
  - C{sliding_window}: state C{(window, used, previous)}; the usual sliding
    estimate C{previous * (1 - elapsed / period) + used} must stay within
    C{count}.

Every step answers a L{Decision}: whether the request is allowed, the new
state, what remains, when the limit is whole again (C{reset}) and, when
refused, the real wait until the same request would be allowed
(C{retry_after}), assuming nothing else takes from the limit meanwhile.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import attrs

from clawproxy.units import Rate

ALGORITHMS = ("token_bucket", "sliding_window", "fixed_window")

#: Float slack in comparisons, so that waiting exactly C{retry_after} is
#: enough despite rounding (a few ulps of the numbers involved).
EPSILON = 1e-9

State = tuple[float, ...]


@attrs.frozen
class Limit:
    """
    One limit as applied to one request.

    @ivar name: what kind of limit (C{global}, C{agent}, C{ip}, C{session},
        C{route}, C{pool}): the C{limit} label of the metrics.
    @ivar key: the store key holding its state (without the store's prefix).
    @ivar algorithm: one of L{ALGORITHMS}.
    @ivar count: requests allowed per C{period}.
    @ivar period: seconds.
    @ivar capacity: the token bucket's size (the burst); the count for windows.
    """

    name: str
    key: str
    algorithm: str
    count: float
    period: float
    capacity: float

    @classmethod
    def of(cls, name: str, key: str, rate: Rate, algorithm: str = "token_bucket",
           burst: float | None = None) -> Limit:
        """A limit of C{rate} (with C{burst} as a token bucket's capacity)."""
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown rate limit algorithm {algorithm!r}")
        count, period = float(rate.count), float(rate.period)
        if count < 1:
            # 0.5/s is one request per 2 s: no window or bucket holds half a request.
            count, period = 1.0, period / count
        capacity = burst if (burst is not None and algorithm == "token_bucket") else count
        return cls(name, key, algorithm, count, period, float(capacity))

    @property
    def args(self) -> list[bytes]:
        """This limit's arguments to the L{clawproxy.policy.ratescript.LIMITS} script."""
        return [self.algorithm.encode(), b"%r" % self.count, b"%r" % self.period,
                b"%r" % self.capacity]

    @property
    def ttl(self) -> float:
        """Seconds after the last change when the state is worth nothing (absent = whole)."""
        if self.algorithm == "token_bucket":
            return self.capacity * self.period / self.count + 1.0
        if self.algorithm == "fixed_window":
            return self.period + 1.0
        return 2 * self.period + 1.0


@functools.lru_cache(maxsize=4096)
def tightened(limit: Limit, factor: float) -> Limit:
    """
    C{limit} with its rate and its burst multiplied by C{factor} (adaptive
    throttling), under the same key: its state carries on. Below one request
    per period it becomes one request per longer period (as L{Limit.of}); a
    token bucket keeps a capacity of at least one request.
    """
    if factor >= 1.0:
        return limit
    count, period = limit.count * factor, limit.period
    if count < 1:
        count, period = 1.0, period / count
    if limit.algorithm == "token_bucket":
        capacity = max(1.0, limit.capacity * factor)
    else:
        capacity = count
    return attrs.evolve(limit, count=count, period=period, capacity=capacity)


@attrs.frozen
class Decision:
    """
    What one limit says about one request.

    @ivar allowed: whether it may go.
    @ivar state: the limit's state after the request (taken from when allowed).
    @ivar limit: the limit's headline number (C{X-RateLimit-Limit}).
    @ivar remaining: requests still allowed now (C{X-RateLimit-Remaining}).
    @ivar reset: seconds until the limit is whole again (C{X-RateLimit-Reset}).
    @ivar retry_after: seconds until this request would be allowed (0 when allowed).
    """

    allowed: bool
    state: State
    limit: int
    remaining: int
    reset: float
    retry_after: float


def token_bucket(state: State | None, now: float, cost: float, rate: float,
                 capacity: float) -> Decision:
    """
    A token bucket of C{capacity} refilled at C{rate} tokens per second.

    @param state: C{(tokens, last)} or L{None} (a full bucket).
    """
    if state is None:
        tokens = capacity
    else:
        tokens = min(capacity, state[0] + max(0.0, now - state[1]) * rate)
    allowed = tokens + EPSILON >= cost
    if allowed:
        tokens = max(0.0, tokens - cost)
        retry = 0.0
    elif cost > capacity:
        retry = math.inf
    else:
        retry = (cost - tokens) / rate
    return Decision(allowed, (tokens, now), int(capacity),
                    math.floor(tokens + EPSILON), (capacity - tokens) / rate, retry)


def fixed_window(state: State | None, now: float, cost: float, count: float,
                 period: float) -> Decision:
    """
    At most C{count} per window of C{period} seconds (windows start at
    multiples of C{period} on the store's clock, so every gateway agrees).

    @param state: C{(window, used)} or L{None}.
    """
    window = math.floor(now / period)
    used = state[1] if state is not None and state[0] == window else 0.0
    reset = (window + 1) * period - now
    allowed = used + cost <= count + EPSILON
    if allowed:
        used += cost
        retry = 0.0
    else:
        retry = reset if cost <= count else math.inf
    return Decision(allowed, (float(window), used), int(count),
                    max(0, math.floor(count - used + EPSILON)), reset, retry)


def sliding_window(state: State | None, now: float, cost: float, count: float,
                   period: float) -> Decision:
    """
    The sliding window estimate: the previous window's count weighted by how
    much of it still overlaps the last C{period} seconds, plus this window's.

    @param state: C{(window, used, previous)} or L{None}.
    """
    window = math.floor(now / period)
    used = previous = 0.0
    if state is not None:
        if state[0] == window:
            used, previous = state[1], state[2]
        elif state[0] == window - 1:
            previous = state[1]
    elapsed = now - window * period
    estimate = previous * (1 - elapsed / period) + used
    allowed = estimate + cost <= count + EPSILON
    if allowed:
        used += cost
        estimate += cost
        retry = 0.0
    elif cost > count:
        retry = math.inf
    elif used + cost > count + EPSILON:
        # Only in the next window: there, this window's requests weigh
        # used * (1 - e / period), which must fall to count - cost.
        retry = period - elapsed + max(0.0, period * (1 - (count - cost) / used))
    else:
        # Within this window, as the previous one slides out (previous > 0 here).
        retry = max(0.0, period * (1 - (count - used - cost) / previous) - elapsed)
    if used > 0:
        reset = 2 * period - elapsed
    elif previous > 0:
        reset = period - elapsed
    else:
        reset = 0.0
    return Decision(allowed, (float(window), used, previous), int(count),
                    max(0, math.floor(count - estimate + EPSILON)), reset, retry)


def decide(limit: Limit, state: State | None, now: float, cost: float = 1.0) -> Decision:
    """Apply C{limit}'s algorithm."""
    if limit.algorithm == "token_bucket":
        return token_bucket(state, now, cost, limit.count / limit.period, limit.capacity)
    if limit.algorithm == "fixed_window":
        return fixed_window(state, now, cost, limit.count, limit.period)
    return sliding_window(state, now, cost, limit.count, limit.period)


@attrs.frozen
class Outcome:
    """
    What a set of limits says about one request: allowed only if every one
    allows it (then each is taken from; if any refuses, none is).

    @ivar decisions: one per limit, in order.
    """

    allowed: bool
    decisions: tuple[Decision, ...]

    @property
    def retry_after(self) -> float:
        """The real wait: the longest of the refusing limits' waits."""
        return max((d.retry_after for d in self.decisions if not d.allowed), default=0.0)

    def tightest(self) -> int:
        """Index of the decision the C{X-RateLimit-*} headers describe."""
        if len(self.decisions) == 1:
            return 0
        if not self.allowed:
            return max(range(len(self.decisions)),
                       key=lambda i: (not self.decisions[i].allowed,
                                      self.decisions[i].retry_after))
        return min(range(len(self.decisions)),
                   key=lambda i: (self.decisions[i].remaining, -self.decisions[i].reset))


def evaluate(limits: Sequence[Limit], states: Sequence[State | None], now: float,
             cost: float = 1.0) -> Outcome:
    """Decide every limit for one request (all or nothing)."""
    if len(limits) == 1:
        d = decide(limits[0], states[0], now, cost)
        return Outcome(d.allowed, (d,))
    decisions = tuple(decide(limit, state, now, cost) for limit, state in zip(limits, states))
    return Outcome(all(d.allowed for d in decisions), decisions)


_FORMATS = {2: b"%.17g %.17g", 3: b"%.17g %.17g %.17g"}


def encode_state(state: State) -> bytes:
    """A state as stored: its numbers as C{%.17g} text (exact, and what the Lua writes)."""
    return _FORMATS[len(state)] % state


def decode_state(data: bytes | None, algorithm: str) -> State | None:
    """A stored state, or L{None} when absent or not of C{algorithm}'s shape."""
    if data is None:
        return None
    try:
        values = tuple(map(float, data.split(b" ")))
    except ValueError:
        return None
    size = 3 if algorithm == "sliding_window" else 2
    return values if len(values) == size else None
