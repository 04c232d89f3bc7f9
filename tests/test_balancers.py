"""Tests for L{clawproxy.policy.balancers}."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from clawproxy.policy.balancers import (
    ALGORITHMS,
    Balancer,
    ConsistentHash,
    IPHash,
    LeastConnections,
    LeastLatency,
    RoundRobin,
    WeightedRandom,
    WeightedRoundRobin,
    make_balancer,
    stable_hash,
)


@attrs.define
class Inst:
    """A stand-in for an instance as balancers see it."""

    id: str
    weight: float = 1.0
    active: int = 0


def instances(**weights: float) -> list[Inst]:
    """Instances named and weighted by keyword, in keyword order."""
    return [Inst(name, weight) for name, weight in weights.items()]


def pick_ids(balancer: Balancer, candidates: Sequence[Inst], count: int) -> list[str]:
    """The ids of C{count} successive keyless picks."""
    picked = []
    for _ in range(count):
        chosen = balancer.pick(candidates)
        assert chosen is not None
        picked.append(chosen.id)
    return picked


def key_map(
    balancer: Balancer, candidates: Sequence[Inst], keys: int = 10_000
) -> dict[str, str]:
    """Which instance each of C{keys} keys maps to."""
    result = {}
    for n in range(keys):
        chosen = balancer.pick(candidates, f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}")
        assert chosen is not None
        result[f"{n}"] = chosen.id
    return result


class DistributionMixin:
    """C{assertShare} and C{assertShares} for tests of a traffic split."""

    def assertShare(self, share: float, expected: float, tolerance: float) -> None:
        """C{share} is C{expected} +- C{tolerance} (trial has no C{delta=})."""
        if abs(share - expected) > tolerance:
            self.fail(  # type: ignore[attr-defined]
                f"share {share:.3f}, expected {expected:.3f} +- {tolerance}"
            )

    def assertShares(
        self, counts: Counter[str], weights: dict[str, float], tolerance: float
    ) -> None:
        """
        Each id's share of C{counts} is its share of C{weights} +- C{tolerance}.
        """
        total = sum(counts.values())
        weight_total = sum(weights.values())
        self.assertEqual(set(counts), set(weights))  # type: ignore[attr-defined]
        for name, weight in weights.items():
            share = counts[name] / total
            expected = weight / weight_total
            if abs(share - expected) > tolerance:
                self.fail(  # type: ignore[attr-defined]
                    f"{name}: share {share:.3f}, expected {expected:.3f} +- {tolerance}"
                )


class MakeBalancerTests(SynchronousTestCase):
    """L{make_balancer} and the behaviour common to every algorithm."""

    def test_algorithms(self) -> None:
        """ALGORITHMS names exactly the seven algorithms of the config contract."""
        self.assertEqual(
            ALGORITHMS,
            {
                "round_robin",
                "weighted_round_robin",
                "least_connections",
                "ip_hash",
                "consistent_hash",
                "random",
                "least_latency",
            },
        )

    def test_types(self) -> None:
        """Each algorithm name builds its balancer class."""
        expected = {
            "round_robin": RoundRobin,
            "weighted_round_robin": WeightedRoundRobin,
            "least_connections": LeastConnections,
            "ip_hash": IPHash,
            "consistent_hash": ConsistentHash,
            "random": WeightedRandom,
            "least_latency": LeastLatency,
        }
        for name, cls in expected.items():
            self.assertIsInstance(make_balancer(name), cls)

    def test_unknown(self) -> None:
        """An unknown algorithm name raises ValueError naming it."""
        e = self.assertRaises(ValueError, make_balancer, "fastest")
        self.assertIn("'fastest'", str(e))

    def test_separate_state(self) -> None:
        """Each call builds a new balancer, so pools do not share rotation state."""
        self.assertIsNot(make_balancer("round_robin"), make_balancer("round_robin"))

    def test_empty(self) -> None:
        """Every algorithm returns None for no candidates, with or without a key."""
        for name in ALGORITHMS:
            balancer = make_balancer(name, random.Random(1))
            self.assertIsNone(balancer.pick([]), name)
            self.assertIsNone(balancer.pick([], "10.0.0.1"), name)

    def test_single(self) -> None:
        """Every algorithm returns the only candidate, with or without a key."""
        only = [Inst("a", 0.25, 7)]
        for name in ALGORITHMS:
            balancer = make_balancer(name, random.Random(1))
            for _ in range(3):
                self.assertIs(balancer.pick(only), only[0], name)
                self.assertIs(balancer.pick(only, "10.0.0.1"), only[0], name)

    def test_returns_candidate(self) -> None:
        """Every algorithm returns one of the candidate objects themselves."""
        candidates = instances(a=5, b=3, c=1, d=1)
        for name in ALGORITHMS:
            balancer = make_balancer(name, random.Random(1))
            for n in range(50):
                self.assertIn(balancer.pick(candidates, f"k{n}"), candidates)


class StableHashTests(SynchronousTestCase):
    """L{stable_hash}."""

    def test_stable(self) -> None:
        """The hash is fixed across processes and runs, unlike the salted hash()."""
        self.assertEqual(stable_hash("clawproxy"), 2614982355826756641)

    def test_range(self) -> None:
        """Hashes are 64-bit unsigned integers and differ for different strings."""
        values = {stable_hash(f"k{n}") for n in range(1000)}
        self.assertEqual(len(values), 1000)
        self.assertTrue(all(0 <= v < 2**64 for v in values))

    def test_surrogates(self) -> None:
        """A string with a lone surrogate hashes rather than raising."""
        self.assertIsInstance(stable_hash("\udcff"), int)


class RoundRobinTests(SynchronousTestCase, DistributionMixin):
    """C{round_robin}."""

    def test_rotation(self) -> None:
        """Candidates are picked in turn, in order, ignoring weights."""
        candidates = instances(a=5, b=1, c=1)
        self.assertEqual(pick_ids(RoundRobin(), candidates, 7), list("abcabca"))

    def test_distribution(self) -> None:
        """10,000 picks over 4 weighted candidates split exactly evenly."""
        candidates = instances(a=5, b=3, c=1, d=1)
        counts = Counter(pick_ids(make_balancer("round_robin"), candidates, 10_000))
        self.assertEqual(counts, {"a": 2500, "b": 2500, "c": 2500, "d": 2500})

    def test_removed_other(self) -> None:
        """When another candidate leaves, rotation continues after the last pick."""
        balancer = RoundRobin()
        a, b, c, d = instances(a=1, b=1, c=1, d=1)
        self.assertEqual(pick_ids(balancer, [a, b, c, d], 2), ["a", "b"])
        self.assertEqual(pick_ids(balancer, [b, c, d], 4), ["c", "d", "b", "c"])
        self.assertEqual(pick_ids(balancer, [b, d], 3), ["d", "b", "d"])

    def test_removed_last_picked(self) -> None:
        """When the last picked candidate leaves, its successor comes next."""
        balancer = RoundRobin()
        a, b, c, d = instances(a=1, b=1, c=1, d=1)
        self.assertEqual(pick_ids(balancer, [a, b, c, d], 2), ["a", "b"])
        self.assertEqual(pick_ids(balancer, [a, c, d], 4), ["c", "d", "a", "c"])
        self.assertEqual(pick_ids(balancer, [a, c], 2), ["a", "c"])
        self.assertEqual(pick_ids(balancer, [a], 2), ["a", "a"])

    def test_added(self) -> None:
        """A candidate that joins takes its turn in the current round."""
        balancer = RoundRobin()
        a, b, c = instances(a=1, b=1, c=1)
        self.assertEqual(pick_ids(balancer, [a, c], 1), ["a"])
        self.assertEqual(pick_ids(balancer, [a, b, c], 6), list("bcabca"))

    def test_changing_set_stays_fair(self) -> None:
        """A candidate set that changes every 10 picks is still served evenly."""
        balancer = RoundRobin()
        full = instances(a=1, b=1, c=1, d=1)
        counts: Counter[str] = Counter()
        for n in range(1000):
            gone = n % 4
            candidates = [x for i, x in enumerate(full) if i != gone]
            counts.update(pick_ids(balancer, candidates, 10))
        self.assertShares(counts, {"a": 1, "b": 1, "c": 1, "d": 1}, 0.01)


class WeightedRoundRobinTests(SynchronousTestCase, DistributionMixin):
    """C{weighted_round_robin}: nginx's smooth weighted round robin."""

    def test_nginx_sequence(self) -> None:
        """Weights {a: 5, b: 1, c: 1} give nginx's C{a a b a c a a}, repeating."""
        candidates = instances(a=5, b=1, c=1)
        balancer = make_balancer("weighted_round_robin")
        self.assertEqual(pick_ids(balancer, candidates, 14), list("aabacaa" * 2))

    def test_distribution(self) -> None:
        """10,000 picks at weights 5:3:1:1 split exactly 5000:3000:1000:1000."""
        candidates = instances(a=5, b=3, c=1, d=1)
        counts = Counter(pick_ids(WeightedRoundRobin(), candidates, 10_000))
        self.assertEqual(counts, {"a": 5000, "b": 3000, "c": 1000, "d": 1000})

    def test_smooth(self) -> None:
        """Weights 5:3:1:1 never send more than two picks in a row to one instance."""
        candidates = instances(a=5, b=3, c=1, d=1)
        picked = "".join(pick_ids(WeightedRoundRobin(), candidates, 100))
        self.assertNotIn("aaa", picked)
        self.assertNotIn("bb", picked)

    def test_float_weights(self) -> None:
        """Float weights 0.5:1.5 split picks 1:3."""
        candidates = instances(a=0.5, b=1.5)
        counts = Counter(pick_ids(WeightedRoundRobin(), candidates, 4000))
        self.assertEqual(counts, {"a": 1000, "b": 3000})

    def test_weight_change(self) -> None:
        """A weight change takes effect on the picks that follow it."""
        balancer = WeightedRoundRobin()
        a, b = instances(a=1, b=1)
        self.assertEqual(Counter(pick_ids(balancer, [a, b], 100)), {"a": 50, "b": 50})
        b.weight = 3
        counts = Counter(pick_ids(balancer, [a, b], 4))
        self.assertEqual(counts, {"a": 1, "b": 3})
        b.weight = 0.25
        counts = Counter(pick_ids(balancer, [a, b], 5000))
        self.assertEqual(counts, {"a": 4000, "b": 1000})

    def test_departed_forgotten(self) -> None:
        """An id that left is forgotten and restarts from zero when it returns."""
        balancer = WeightedRoundRobin()
        a, b, c = instances(a=5, b=1, c=1)
        self.assertEqual(pick_ids(balancer, [a, b, c], 3), list("aab"))
        self.assertEqual(balancer._current, {"a": 1, "b": -4, "c": 3})
        self.assertEqual(pick_ids(balancer, [a, c], 1), ["a"])
        self.assertEqual(balancer._current, {"a": 0, "c": 4})
        b.weight = 10
        self.assertEqual(pick_ids(balancer, [a, b, c], 1), ["b"])
        self.assertEqual(balancer._current, {"a": 5, "b": -6, "c": 5})

    def test_state_bounded(self) -> None:
        """Only the ids of the current candidates are kept in the state."""
        balancer = WeightedRoundRobin()
        for n in range(100):
            balancer.pick([Inst(f"i{n}"), Inst("fixed")])
        self.assertEqual(balancer.pick([Inst("x", 1), Inst("y", 2)]).id, "y")  # type: ignore[union-attr]
        self.assertEqual(len(balancer._current), 2)


class LeastConnectionsTests(SynchronousTestCase, DistributionMixin):
    """C{least_connections}: minimise (active + 1) / weight."""

    def test_idle(self) -> None:
        """An idle instance is preferred to busy ones."""
        candidates = [Inst("a", 1, 3), Inst("b", 1, 0), Inst("c", 1, 2)]
        balancer = make_balancer("least_connections")
        self.assertEqual(pick_ids(balancer, candidates, 3), ["b", "b", "b"])

    def test_heavier_weight(self) -> None:
        """Among idle instances, the heaviest weight wins."""
        candidates = [Inst("a", 1, 0), Inst("b", 4, 0), Inst("c", 2, 0)]
        self.assertEqual(pick_ids(LeastConnections(), candidates, 3), ["b", "b", "b"])

    def test_weight_aware(self) -> None:
        """Active counts are scaled by weight: 5 in flight at weight 5 beats 1 at 1."""
        candidates = [Inst("a", 1, 1), Inst("b", 5, 5)]
        self.assertEqual(LeastConnections().pick(candidates).id, "b")  # type: ignore[union-attr]
        candidates[1].active = 10
        self.assertEqual(LeastConnections().pick(candidates).id, "a")  # type: ignore[union-attr]

    def test_ties_rotate(self) -> None:
        """Equally loaded instances take turns instead of the first always winning."""
        candidates = instances(a=1, b=1, c=1)
        self.assertEqual(pick_ids(LeastConnections(), candidates, 6), list("abcabc"))

    def test_ties_rotate_among_best(self) -> None:
        """Ties among a subset alternate between exactly those instances."""
        candidates = [
            Inst("a", 1, 0),
            Inst("b", 1, 4),
            Inst("c", 1, 0),
            Inst("d", 1, 9),
        ]
        self.assertEqual(pick_ids(LeastConnections(), candidates, 4), list("acac"))

    def test_shrinking_set(self) -> None:
        """Rotation state beyond a smaller candidate list wraps around safely."""
        balancer = LeastConnections()
        pick_ids(balancer, instances(a=1, b=1, c=1, d=1), 3)
        self.assertEqual(pick_ids(balancer, instances(a=1, b=1), 2), ["a", "b"])

    def test_distribution(self) -> None:
        """
        With 40 requests kept in flight and random completions, 10,000 picks at
        weights 5:3:1:1 split in proportion to weight.
        """
        rng = random.Random(42)
        candidates = instances(a=5, b=3, c=1, d=1)
        balancer = LeastConnections()
        in_flight: list[Inst] = []
        counts: Counter[str] = Counter()
        for _ in range(10_000):
            chosen = balancer.pick(candidates)
            assert chosen is not None
            chosen.active += 1
            in_flight.append(chosen)
            counts[chosen.id] += 1
            if len(in_flight) > 40:
                done = in_flight.pop(rng.randrange(len(in_flight)))
                done.active -= 1
        self.assertShares(counts, {"a": 5, "b": 3, "c": 1, "d": 1}, 0.03)


class IPHashTests(SynchronousTestCase, DistributionMixin):
    """C{ip_hash}: weighted rendezvous hashing of the client IP."""

    def test_sticky(self) -> None:
        """The same IP gets the same instance on every pick while the set is unchanged."""
        candidates = instances(a=1, b=1, c=1, d=1)
        balancer = make_balancer("ip_hash")
        first = key_map(balancer, candidates, 500)
        for _ in range(3):
            self.assertEqual(key_map(balancer, candidates, 500), first)
        self.assertEqual(key_map(IPHash(), candidates, 500), first)

    def test_order_independent(self) -> None:
        """The mapping depends on the ids, not on the order of the candidates."""
        candidates = instances(a=1, b=2, c=1, d=1)
        self.assertEqual(
            key_map(IPHash(), candidates, 1000),
            key_map(IPHash(), candidates[::-1], 1000),
        )

    def test_distribution(self) -> None:
        """10,000 IPs spread over weights 5:3:1:1 in proportion to weight."""
        candidates = instances(a=5, b=3, c=1, d=1)
        counts = Counter(key_map(IPHash(), candidates).values())
        self.assertShares(counts, {"a": 5, "b": 3, "c": 1, "d": 1}, 0.02)

    def test_removal_moves_only_its_keys(self) -> None:
        """When one of 4 instances leaves, only its IPs (about 25%) move."""
        candidates = instances(a=1, b=1, c=1, d=1)
        balancer = IPHash()
        before = key_map(balancer, candidates)
        after = key_map(balancer, [x for x in candidates if x.id != "c"])
        moved = [k for k in before if before[k] != after[k]]
        self.assertEqual({before[k] for k in moved}, {"c"})
        self.assertEqual(len(moved), sum(1 for v in before.values() if v == "c"))
        self.assertShare(len(moved) / len(before), 0.25, 0.03)

    def test_weight_change(self) -> None:
        """Raising one weight takes effect at once and only moves keys to it."""
        candidates = instances(a=1, b=1, c=1, d=1)
        balancer = IPHash()
        before = key_map(balancer, candidates)
        candidates[0].weight = 3
        after = key_map(balancer, candidates)
        self.assertEqual({after[k] for k in before if before[k] != after[k]}, {"a"})
        self.assertShares(
            Counter(after.values()), {"a": 3, "b": 1, "c": 1, "d": 1}, 0.02
        )

    def test_no_key(self) -> None:
        """Without a key, picks fall back to round robin."""
        candidates = instances(a=1, b=1, c=1)
        self.assertEqual(pick_ids(IPHash(), candidates, 6), list("abcabc"))


class ConsistentHashTests(SynchronousTestCase, DistributionMixin):
    """C{consistent_hash}: a hash ring with virtual nodes."""

    def test_sticky(self) -> None:
        """The same key gets the same instance in every balancer while the set is unchanged."""
        candidates = instances(a=1, b=1, c=1, d=1)
        balancer = make_balancer("consistent_hash")
        first = key_map(balancer, candidates, 1000)
        self.assertEqual(key_map(balancer, candidates, 1000), first)
        self.assertEqual(key_map(ConsistentHash(), candidates, 1000), first)

    def test_distribution(self) -> None:
        """10,000 keys spread over weights 5:3:1:1 roughly in proportion to weight."""
        candidates = instances(a=5, b=3, c=1, d=1)
        counts = Counter(key_map(ConsistentHash(), candidates).values())
        self.assertShares(counts, {"a": 5, "b": 3, "c": 1, "d": 1}, 0.04)

    def test_removal_moves_only_its_keys(self) -> None:
        """
        When one of 4 instances leaves, every key that moved was on it, all of
        its keys moved, and about 25% of 10,000 keys moved.
        """
        for gone in "abcd":
            candidates = instances(a=1, b=1, c=1, d=1)
            balancer = ConsistentHash()
            before = key_map(balancer, candidates)
            after = key_map(balancer, [x for x in candidates if x.id != gone])
            moved = [k for k in before if before[k] != after[k]]
            self.assertEqual({before[k] for k in moved}, {gone})
            self.assertEqual(len(moved), sum(1 for v in before.values() if v == gone))
            self.assertShare(len(moved) / len(before), 0.25, 0.05)

    def test_addition_moves_only_to_it(self) -> None:
        """When an instance joins, every key that moved went to it."""
        candidates = instances(a=1, b=1, c=1)
        balancer = ConsistentHash()
        before = key_map(balancer, candidates)
        after = key_map(balancer, [*candidates, Inst("d", 1.0)])
        moved = {after[k] for k in before if before[k] != after[k]}
        self.assertEqual(moved, {"d"})

    def test_weight_change(self) -> None:
        """A weight change takes effect at once and only moves keys to or from it."""
        candidates = instances(a=1, b=1, c=1, d=1)
        balancer = ConsistentHash()
        before = key_map(balancer, candidates)
        candidates[1].weight = 3
        after = key_map(balancer, candidates)
        self.assertEqual({after[k] for k in before if before[k] != after[k]}, {"b"})
        self.assertShares(
            Counter(after.values()), {"a": 1, "b": 3, "c": 1, "d": 1}, 0.05
        )
        candidates[1].weight = 1
        self.assertEqual(key_map(balancer, candidates), before)

    def test_points(self) -> None:
        """Points are 160 per unit of weight, at least 1 and at most MAX_POINTS."""
        self.assertEqual(ConsistentHash.points_for(1), 160)
        self.assertEqual(ConsistentHash.points_for(2.5), 400)
        self.assertEqual(ConsistentHash.points_for(0.001), 1)
        self.assertEqual(ConsistentHash.points_for(1e9), ConsistentHash.MAX_POINTS)

    def test_ring_cached(self) -> None:
        """
        The ring is rebuilt only when the (id, points) list changes, not on
        every pick nor for a weight change too small to change the points.
        """
        candidates = instances(a=1, b=2)
        balancer = ConsistentHash()
        balancer.pick(candidates, "k")
        ring = balancer._hashes
        self.assertEqual(len(ring), 480)
        balancer.pick(candidates, "k2")
        self.assertIs(balancer._hashes, ring)
        candidates[0].weight = 1.001
        balancer.pick(candidates, "k")
        self.assertIs(balancer._hashes, ring)
        candidates[0].weight = 1.5
        balancer.pick(candidates, "k")
        self.assertIsNot(balancer._hashes, ring)
        self.assertEqual(len(balancer._hashes), 560)

    def test_reorder(self) -> None:
        """Reordered candidates map each key to the same instance id."""
        candidates = instances(a=1, b=2, c=1)
        balancer = ConsistentHash()
        before = key_map(balancer, candidates, 1000)
        self.assertEqual(key_map(balancer, candidates[::-1], 1000), before)

    def test_no_key(self) -> None:
        """Without a key, picks fall back to round robin."""
        candidates = instances(a=1, b=1, c=1)
        self.assertEqual(pick_ids(ConsistentHash(), candidates, 6), list("abcabc"))


class WeightedRandomTests(SynchronousTestCase, DistributionMixin):
    """C{random}: weighted random choice."""

    def test_distribution(self) -> None:
        """10,000 picks at weights 5:3:1:1 split in proportion to weight."""
        candidates = instances(a=5, b=3, c=1, d=1)
        balancer = make_balancer("random", random.Random(7))
        counts = Counter(pick_ids(balancer, candidates, 10_000))
        self.assertShares(counts, {"a": 5, "b": 3, "c": 1, "d": 1}, 0.03)

    def test_injected_rng(self) -> None:
        """Picks come from the injected rng: the same seed gives the same picks."""
        candidates = instances(a=1, b=1, c=1)
        first = pick_ids(WeightedRandom(random.Random(3)), candidates, 50)
        self.assertEqual(
            pick_ids(WeightedRandom(random.Random(3)), candidates, 50), first
        )
        self.assertEqual(len(set(first)), 3)

    def test_weight_change(self) -> None:
        """A weight change takes effect on the next picks."""
        candidates = instances(a=1, b=1)
        balancer = WeightedRandom(random.Random(11))
        candidates[0].weight = 9
        counts = Counter(pick_ids(balancer, candidates, 10_000))
        self.assertShares(counts, {"a": 9, "b": 1}, 0.02)

    def test_extreme_draws(self) -> None:
        """Draws at the ends of [0, 1) pick the first and the last candidate."""

        class Fixed(random.Random):
            def __init__(self, value: float) -> None:
                super().__init__()
                self.value = value

            def random(self) -> float:
                return self.value

        candidates = instances(a=0.1, b=0.2, c=0.3)
        self.assertEqual(WeightedRandom(Fixed(0.0)).pick(candidates).id, "a")  # type: ignore[union-attr]
        last = WeightedRandom(Fixed(0.9999999999999999)).pick(candidates)
        self.assertEqual(last.id, "c")  # type: ignore[union-attr]


class LeastLatencyTests(SynchronousTestCase):
    """C{least_latency}: lowest decayed time to first byte, weighted by requests in flight."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.balancer = LeastLatency(self.clock)

    def tearDown(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def observe(self, **ttfb: float) -> None:
        for name, seconds in ttfb.items():
            self.balancer.observe(name, seconds)

    def test_new_instances_tried_first(self) -> None:
        """An instance never judged is tried before the fastest judged one, once each."""
        a, b, c = candidates = instances(a=1, b=1, c=1)
        self.observe(a=0.01)
        self.assertIs(self.balancer.pick(candidates), b)
        b.active = 1  # its first request is in flight: not yet judged, not swamped
        self.assertIs(self.balancer.pick(candidates), c)
        c.active = 1
        self.assertIs(self.balancer.pick(candidates), a)

    def test_lowest_ttfb(self) -> None:
        """Idle instances: the lowest average wins, every time."""
        candidates = instances(a=1, b=1, c=1)
        self.observe(a=0.5, b=0.1, c=1.0)
        self.assertEqual(pick_ids(self.balancer, candidates, 5), ["b"] * 5)

    def test_in_flight_weighs(self) -> None:
        """The average is multiplied by requests in flight + 1 (and divided by weight)."""
        a, b = candidates = instances(a=1, b=1)
        self.observe(a=0.1, b=0.5)
        a.active = 4  # 0.1 * 5 = 0.5: a tie, which goes round
        self.assertEqual(sorted(pick_ids(self.balancer, candidates, 2)), ["a", "b"])
        a.active = 5  # 0.6 > 0.5
        self.assertEqual(pick_ids(self.balancer, candidates, 3), ["b"] * 3)
        b.weight = 0.5  # 0.5 * 1 / 0.5 = 1.0 > 0.6
        self.assertEqual(pick_ids(self.balancer, candidates, 3), ["a"] * 3)

    def test_decayed_average(self) -> None:
        """A sample C{dt} after the last weighs C{1 - exp(-dt / DECAY)}."""
        self.observe(a=1.0)
        self.assertEqual(self.balancer.ttfb("a"), 1.0)
        self.clock.advance(LeastLatency.DECAY)
        self.observe(a=0.0)
        self.assertAlmostEqual(self.balancer.ttfb("a"), math.exp(-1))
        # Samples at the same instant keep the average as it is.
        self.observe(a=5.0)
        self.assertAlmostEqual(self.balancer.ttfb("a"), math.exp(-1))
        self.assertIsNone(self.balancer.ttfb("b"))

    def test_slow_instance_tried_again(self) -> None:
        """
        An instance avoided for being slow decays toward 0 while unused, so
        it is tried again (then judged by its new answers); the busy fast one
        keeps its average.
        """
        candidates = instances(a=1, b=1)
        self.observe(a=0.1, b=2.0)
        seen = []
        for _ in range(40):
            self.clock.advance(1)
            chosen = self.balancer.pick(candidates)
            seen.append(chosen.id)
            self.observe(**{chosen.id: 0.1 if chosen.id == "a" else 2.0})
        # 2.0 * exp(-t / 10) < 0.1 once t > 10 * ln 20 (about 30s)
        self.assertEqual(seen[:29], ["a"] * 29)
        self.assertIn("b", seen[29:32])
        self.assertEqual(seen.count("b"), 1)

    def test_idle_pool_is_least_connections(self) -> None:
        """With every average near 0, requests in flight decide (ties go round)."""
        a, b, _ = candidates = instances(a=1, b=1, c=1)
        self.observe(a=0.2, b=0.2, c=0.2)
        self.clock.advance(1000)
        self.assertEqual(sorted(pick_ids(self.balancer, candidates, 3)), ["a", "b", "c"])
        a.active, b.active = 2, 1
        self.assertEqual(pick_ids(self.balancer, candidates, 2), ["c", "c"])

    def test_make_balancer_clock(self) -> None:
        """C{make_balancer} passes the clock on."""
        balancer = make_balancer("least_latency", clock=self.clock)
        balancer.observe("a", 1.0)
        self.clock.advance(LeastLatency.DECAY)
        self.assertAlmostEqual(balancer.ttfb("a"), math.exp(-1))
