"""
The L{clawproxy.policy.ratescript.LIMITS} script on a real redis-server: the
Lua answers as its Python twin (the pure algorithms) does, under the store's
prefix, with TTLs.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from clawproxy.policy.limits import Limit
from clawproxy.policy.ratescript import LIMITS, parse_reply, script_args
from clawproxy.stores.memory import MemoryStore
from clawproxy.units import Rate
from tests.test_store_contract import WAIT, RedisHarness


async def burst(store: Any, limits: list[Limit], n: int) -> list[Any]:
    """C{n} requests at once (well within a millisecond of one another, or close)."""
    out = []
    keys, argv = script_args(limits)
    for _ in range(n):
        outcome = parse_reply(await store.run(LIMITS, keys, argv))
        out.append((outcome.allowed,
                    [(d.allowed, d.limit, d.remaining) for d in outcome.decisions]))
    return out


class LimitsOnRedisTests(RedisHarness, TestCase):
    timeout = 60

    def drive(self, coroutine: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(coroutine).addTimeout(3 * WAIT, reactor)

    def test_same_as_memory(self) -> Deferred[Any]:
        """
        Each algorithm, alone and all three together, lets the same requests
        through with the same remaining counts on Redis as in memory; refused
        ones carry the wait the algorithm computes.
        """

        async def check() -> None:
            server = await self.start_redis()
            redis = self.redis_store(server.url, prefix="gw:")
            await self.until_works(redis)
            memory = MemoryStore(reactor)
            for algorithm in ("token_bucket", "fixed_window", "sliding_window"):
                limits = [Limit.of("agent", "agent:" + algorithm, Rate(5, 3600), algorithm)]
                self.assertEqual(await burst(redis, limits, 7), await burst(memory, limits, 7))
            every = [Limit.of("a", "all:tb", Rate(3, 3600), "token_bucket", burst=4),
                     Limit.of("b", "all:fw", Rate(6, 3600), "fixed_window"),
                     Limit.of("c", "all:sw", Rate(2, 3600), "sliding_window")]
            on_redis = await burst(redis, every, 4)
            self.assertEqual(on_redis, await burst(memory, every, 4))
            self.assertEqual([allowed for allowed, _ in on_redis], [True, True, False, False])
            # The refused request took nothing: the bucket still has 2 of 4.
            self.assertEqual(on_redis[3][1][0], (True, 4, 1))
            # The token bucket refills one token per 1200 s.
            keys, argv = script_args([Limit.of("a", "tb2", Rate(3, 3600), "token_bucket", 1)])
            await redis.run(LIMITS, keys, argv)
            refused = parse_reply(await redis.run(LIMITS, keys, argv))
            self.assertFalse(refused.allowed)
            self.assertLess(abs(refused.retry_after - 1200), 0.5, refused.retry_after)
            # A batch decides requests in order, each all or nothing, as in memory.
            from clawproxy.policy.ratescript import batch_args, parse_batch

            one = Limit.of("agent", "batch:a", Rate(2, 3600), "fixed_window")
            other = Limit.of("route", "batch:r", Rate(1, 3600), "sliding_window")
            keys, argv = batch_args([[one], [one, other], [one], [other]])
            for store in (redis, memory):
                outcomes = parse_batch(await store.run(LIMITS, keys, argv))
                self.assertEqual([o.allowed for o in outcomes], [True, True, False, False])
            # Keys carry the prefix and a TTL.
            raw = await self.raw(server.port)
            ttl = await raw.execute_command("PTTL", "gw:agent:fixed_window")
            self.assertTrue(0 < int(ttl) <= 3601000, ttl)
            ttl = await raw.execute_command("PTTL", "gw:all:tb")
            self.assertTrue(0 < int(ttl) <= 4801000, ttl)

        return self.drive(check())
