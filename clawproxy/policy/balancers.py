"""
Load-balancing algorithms: choose one instance of a pool for a request.

Pure policy: no reactor, no I/O. A balancer gets only the candidates of the
registry's availability decision (L{clawproxy.backends.registry.Pool.candidates}:
healthy, not drained, weight > 0, under C{max_connections}, excluded by no
availability policy) in a stable order (config order) and returns one of
them. L{Balancer.pick} runs on every request, so each one is a single O(n)
pass with a small constant (or O(log n) for C{consistent_hash}) and
allocates nothing in the steady state.

Candidates are any objects with C{id: str}, C{weight: float} (current
effective weight, > 0) and C{active: int} (requests in flight); see
L{Candidate}.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Sequence
from hashlib import blake2b
from math import exp, log
from typing import Any, Protocol, TypeVar

__all__ = [
    "ALGORITHMS",
    "Balancer",
    "Candidate",
    "ConsistentHash",
    "IPHash",
    "LeastConnections",
    "LeastLatency",
    "RoundRobin",
    "WeightedRandom",
    "WeightedRoundRobin",
    "make_balancer",
    "stable_hash",
]


class Candidate(Protocol):
    """What a balancer reads from an instance."""

    @property
    def id(self) -> str:
        """Unique, stable instance id."""

    @property
    def weight(self) -> float:
        """Current effective weight (> 0 for candidates passed in)."""

    @property
    def active(self) -> int:
        """Requests in flight to this instance."""


C = TypeVar("C", bound=Candidate)


class Balancer(Protocol):
    """Chooses one candidate per request."""

    def pick(self, candidates: Sequence[C], key: str | None = None) -> C | None:
        """
        Choose a candidate.

        @param candidates: the eligible instances, in config order.
        @param key: the affinity key (client IP for C{ip_hash}, any string for
            C{consistent_hash}); ignored by the other algorithms.
        @return: one of C{candidates}, or L{None} only if it is empty.
        """


_TWO_POW_MINUS_53 = 2.0**-53


def stable_hash(data: str) -> int:
    """
    A 64-bit hash that is the same in every process and run (unlike L{hash}).

    @param data: any string (lone surrogates allowed).
    """
    digest = blake2b(data.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class RoundRobin:
    """
    Plain rotation, ignoring weights.

    Rotation continues after the last picked instance, found by id, so when
    the candidate set changes the next pick is still "the one after the last
    one" rather than a jump decided by a global counter. If the last picked
    instance has left, the rotation continues from the slot it occupied.
    """

    __slots__ = ("_last_id", "_last_index")

    def __init__(self) -> None:
        self._last_id: str | None = None
        self._last_index = -1

    def pick(self, candidates: Sequence[C], key: str | None = None) -> C | None:
        n = len(candidates)
        if not n:
            return None
        i = self._last_index
        last_id = self._last_id
        if 0 <= i < n and candidates[i].id == last_id:
            i += 1
        else:
            # The set changed: continue after the last pick wherever it is now.
            for j in range(n):
                if candidates[j].id == last_id:
                    i = j + 1
                    break
            else:
                # It left: its successor now sits in its slot.
                i = max(i, 0)
        if i >= n:
            i = 0
        chosen = candidates[i]
        self._last_index = i
        self._last_id = chosen.id
        return chosen


class WeightedRoundRobin:
    """
    nginx's smooth weighted round robin.

    Each pick adds every candidate's weight to its current weight, picks the
    largest (the first one on ties) and subtracts the total weight from it.
    Weights {a: 5, b: 1, c: 1} give C{a a b a c a a}. State is kept per
    candidate id, so a weight change takes effect on the next pick, and ids
    no longer among the candidates are forgotten (they restart from 0).
    """

    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def pick(self, candidates: Sequence[C], key: str | None = None) -> C | None:
        current = self._current
        total = 0.0
        best = None
        best_weight = 0.0
        for c in candidates:
            cid = c.id
            w = c.weight
            cw = current.get(cid, 0.0) + w
            current[cid] = cw
            total += w
            if best is None or cw > best_weight:
                best = c
                best_weight = cw
        if best is None:
            return None
        current[best.id] = best_weight - total
        if len(current) > len(candidates):
            self._current = {c.id: current[c.id] for c in candidates}
        return best


class LeastConnections:
    """
    Weight-aware least connections: minimise C{(active + 1) / weight}.

    The C{+ 1} (where nginx compares C{active / weight}) makes an idle heavy
    instance win over an idle light one. Ties go to the first candidate after
    the previous pick, so equally loaded instances take turns.
    """

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[C], key: str | None = None) -> C | None:
        n = len(candidates)
        if not n:
            return None
        start = self._next
        if start >= n:
            start = 0
        best_index = start
        c = candidates[start]
        best = (c.active + 1) / c.weight
        # Negative indices wrap: this visits start+1 .. n-1, then 0 .. start-1.
        for i in range(start + 1 - n, start):
            c = candidates[i]
            score = (c.active + 1) / c.weight
            if score < best:
                best = score
                best_index = i
        if best_index < 0:
            best_index += n
        self._next = best_index + 1
        return candidates[best_index]


class LeastLatency:
    """
    Least latency: minimise C{max(ttfb, FLOOR) * (active + 1) / weight}.

    C{ttfb} is the instance's recent time to first byte, an exponentially
    decayed average of the samples L{observe} is given (a sample C{dt}
    seconds after the previous one weighs C{1 - exp(-dt / DECAY)}). Between
    samples the average decays toward 0 with the same time constant, so an
    instance avoided for being slow, or back after an outage, is tried
    again before long and judged by what it does now. An instance with no
    sample yet (new, or first seen) is tried first while it has no request
    in flight; with some in flight it is costed at the best average known,
    so a new instance is not swamped before its first answer. C{FLOOR}
    keeps the requests in flight counting when every average is near 0
    (an idle pool balances as least connections). Ties go to the first
    candidate after the previous pick.

    @ivar DECAY: the time constant of the average, in seconds.
    """

    __slots__ = ("_clock", "_next", "_stats")

    DECAY = 10.0
    FLOOR = 0.001
    _MAX_IDS = 4096

    def __init__(self, clock: Any = None) -> None:
        """
        @param clock: an L{IReactorTime} (C{seconds()}); a frozen
            L{twisted.internet.task.Clock} when not given (tests).
        """
        if clock is None:
            from twisted.internet.task import Clock

            clock = Clock()
        self._clock = clock
        self._next = 0
        self._stats: dict[str, tuple[float, float]] = {}  # id -> (average, when)

    def observe(self, instance_id: str, seconds: float) -> None:
        """A time to first byte of C{instance_id} (failures count as slow ones)."""
        now = self._clock.seconds()
        stats = self._stats
        prev = stats.get(instance_id)
        if prev is None:
            if len(stats) >= self._MAX_IDS:
                stats.clear()
            stats[instance_id] = (seconds, now)
            return
        average, when = prev
        keep = exp(-(now - when) / self.DECAY) if now > when else 1.0
        stats[instance_id] = (average * keep + seconds * (1.0 - keep), now)

    def ttfb(self, instance_id: str) -> float | None:
        """The decayed average now, or L{None} before the first sample."""
        prev = self._stats.get(instance_id)
        if prev is None:
            return None
        average, when = prev
        idle = self._clock.seconds() - when
        return average * exp(-idle / self.DECAY) if idle > 0 else average

    def pick(self, candidates: Sequence[C], key: str | None = None) -> C | None:
        n = len(candidates)
        if not n:
            return None
        now = self._clock.seconds()
        stats = self._stats
        decay = self.DECAY
        floor = self.FLOOR
        start = self._next
        if start >= n:
            start = 0
        best_index: int | None = None
        best = 0.0
        best_known = None  # the lowest average, for instances not judged yet
        unjudged = None
        # Negative indices wrap: this visits start .. n-1, then 0 .. start-1.
        for i in range(start - n, start):
            c = candidates[i]
            entry = stats.get(c.id)
            if entry is None:
                if c.active == 0:
                    best_index = i  # never judged: try it first
                    break
                if unjudged is None:
                    unjudged = []
                unjudged.append(i)
                continue
            average, when = entry
            if now > when:
                average *= exp((when - now) / decay)
            if best_known is None or average < best_known:
                best_known = average
            if average < floor:
                average = floor
            score = average * (c.active + 1) / c.weight
            if best_index is None or score < best:
                best = score
                best_index = i
        else:
            if unjudged is not None:
                average = best_known if best_known is not None and best_known > floor else floor
                for i in unjudged:
                    c = candidates[i]
                    score = average * (c.active + 1) / c.weight
                    if best_index is None or score < best:
                        best = score
                        best_index = i
        assert best_index is not None
        if best_index < 0:
            best_index += n
        self._next = best_index + 1
        return candidates[best_index]


class IPHash:
    """
    Weighted rendezvous (highest random weight) hashing on the client IP.

    Each candidate scores C{weight / -ln(u)} where C{u} in (0, 1) is a stable
    hash of (key, id); the highest score wins. The same key maps to the same
    candidate while the set is unchanged, keys spread in proportion to
    weight, and when a candidate leaves only its own keys move. Without a key
    it falls back to L{RoundRobin}.
    """

    __slots__ = ("_fallback", "_id_hashes")

    _MAX_CACHED_IDS = 4096

    def __init__(self) -> None:
        self._id_hashes: dict[str, int] = {}
        self._fallback = RoundRobin()

    def pick(self, candidates: Sequence[C], key: str | None = None) -> C | None:
        if key is None or len(candidates) < 2:
            return self._fallback.pick(candidates)
        key_hash = stable_hash(key)
        id_hashes = self._id_hashes
        best = None
        best_score = -1.0
        for c in candidates:
            cid = c.id
            x = id_hashes.get(cid)
            if x is None:
                if len(id_hashes) >= self._MAX_CACHED_IDS:
                    id_hashes.clear()
                x = id_hashes[cid] = stable_hash(cid)
            # splitmix64's finaliser, inlined (hot loop): avalanches the pair.
            x ^= key_hash
            x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
            x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
            x ^= x >> 31
            # 53 random bits -> u in (0, 1), so -log(u) > 0.
            score = c.weight / -log(((x >> 11) + 0.5) * _TWO_POW_MINUS_53)
            if score > best_score:
                best = c
                best_score = score
        return best


class ConsistentHash:
    """
    A hash ring with virtual nodes, looked up by bisection.

    Each candidate gets C{round(160 * weight)} points (at least 1, at most
    L{MAX_POINTS}) at stable hashes of C{"id-j"}. The scale is absolute, not
    relative to the other weights, so one candidate leaving or changing
    weight moves only keys to or from that candidate. The ring is cached and
    rebuilt only when the (id, point count) list changes; per-id point hashes
    are cached too, so a slow-start weight ramp costs a sort, not rehashing.
    Without a key it falls back to L{RoundRobin}.
    """

    __slots__ = (
        "_counts",
        "_fallback",
        "_hashes",
        "_ids",
        "_owners",
        "_point_cache",
        "_weights",
    )

    POINTS_PER_WEIGHT = 160
    MAX_POINTS = 16_384
    _MAX_CACHED_IDS = 1024

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._weights: list[float] = []
        self._counts: list[int] = []
        self._hashes: list[int] = []
        self._owners: list[int] = []
        self._point_cache: dict[str, list[int]] = {}
        self._fallback = RoundRobin()

    @classmethod
    def points_for(cls, weight: float) -> int:
        """
        The number of ring points for C{weight}.

        @param weight: a candidate's effective weight.
        """
        points = round(weight * cls.POINTS_PER_WEIGHT)
        return 1 if points < 1 else min(points, cls.MAX_POINTS)

    def pick(self, candidates: Sequence[C], key: str | None = None) -> C | None:
        if key is None or len(candidates) < 2:
            return self._fallback.pick(candidates)
        ids = self._ids
        weights = self._weights
        n = len(candidates)
        if len(ids) != n:
            self._refresh(candidates)
        else:
            for i in range(n):
                c = candidates[i]
                if c.weight != weights[i] or c.id != ids[i]:
                    self._refresh(candidates)
                    break
        hashes = self._hashes
        i = bisect_right(hashes, stable_hash(key))
        if i == len(hashes):
            i = 0
        return candidates[self._owners[i]]

    def _refresh(self, candidates: Sequence[Candidate]) -> None:
        """Record the new (id, weight) list; rebuild the ring if points moved."""
        ids = [c.id for c in candidates]
        weights = [c.weight for c in candidates]
        counts = [self.points_for(w) for w in weights]
        self._weights = weights
        if ids == self._ids and counts == self._counts:
            return
        self._ids = ids
        self._counts = counts
        points: list[tuple[int, str, int]] = []
        for index, (cid, count) in enumerate(zip(ids, counts)):
            for h in self._points(cid, count):
                points.append((h, cid, index))
        points.sort()
        self._hashes = [p[0] for p in points]
        self._owners = [p[2] for p in points]

    def _points(self, cid: str, count: int) -> list[int]:
        """The first C{count} point hashes of C{cid}, cached per id."""
        cache = self._point_cache
        cached = cache.get(cid)
        if cached is None:
            if len(cache) >= self._MAX_CACHED_IDS:
                cache.clear()
            cached = cache[cid] = []
        for j in range(len(cached), count):
            cached.append(stable_hash(f"{cid}-{j}"))
        return cached[:count]


class WeightedRandom:
    """Weighted random choice, drawing from the injected L{random.Random}."""

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def pick(self, candidates: Sequence[C], key: str | None = None) -> C | None:
        if not candidates:
            return None
        total = 0.0
        for c in candidates:
            total += c.weight
        r = self._rng.random() * total
        for c in candidates:
            r -= c.weight
            if r < 0.0:
                return c
        return candidates[-1]  # float rounding left r at ~0


_FACTORIES = {
    "round_robin": lambda rng, clock: RoundRobin(),
    "weighted_round_robin": lambda rng, clock: WeightedRoundRobin(),
    "least_connections": lambda rng, clock: LeastConnections(),
    "ip_hash": lambda rng, clock: IPHash(),
    "consistent_hash": lambda rng, clock: ConsistentHash(),
    "random": lambda rng, clock: WeightedRandom(rng),
    "least_latency": lambda rng, clock: LeastLatency(clock),
}

ALGORITHMS: frozenset[str] = frozenset(_FACTORIES)
"""The names accepted by L{make_balancer} (the pool's C{algorithm} key)."""


def make_balancer(algorithm: str, rng: random.Random | None = None,
                  clock: Any = None) -> Balancer:
    """
    Build a balancer; each pool gets its own (they keep rotation state).

    @param algorithm: one of L{ALGORITHMS}.
    @param rng: the random source for C{random} (default: a fresh
        L{random.Random}); the other algorithms are deterministic.
    @param clock: the time source of C{least_latency} (an L{IReactorTime}).
    @raise ValueError: for an unknown algorithm.
    """
    factory = _FACTORIES.get(algorithm)
    if factory is None:
        raise ValueError(
            f"unknown balancing algorithm {algorithm!r}; expected one of "
            + ", ".join(sorted(ALGORITHMS))
        )
    return factory(rng, clock)
