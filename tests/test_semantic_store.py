"""
Tests for L{clawproxy.cache.semantic_store}: the semantic index in the state
store, held to the same results by the memory store (on a L{Clock}) and by a
real redis-server (the Lua scripts), including two gateways sharing one.
"""

from __future__ import annotations

import random
from collections.abc import Coroutine
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from clawproxy.cache.semantic import Fingerprint, band_keys, fingerprint
from clawproxy.cache.semantic_store import StoredSemanticIndex
from clawproxy.config import StoreConfig
from clawproxy.metrics import Metrics
from clawproxy.stores import build_store
from tests.test_store_contract import WAIT, RedisStoreCase, contract


def flip(value: int, *bits: int) -> int:
    for bit in bits:
        value ^= 1 << bit
    return value


class StoredIndexContract:
    """What L{StoredSemanticIndex} does on every store (C{store}, C{drive}, C{advance})."""

    def index(self, **kwargs: Any) -> StoredSemanticIndex:
        return StoredSemanticIndex(self.store, **kwargs)

    @contract
    async def test_add_lookup_remove(self) -> None:
        """A paraphrase finds the entry; a near-miss does not; removed, nothing does."""
        index = self.index()
        fp = fingerprint("What's the weather in Paris today?", "agent-a")
        self.assertTrue(await index.add("e1", fp, ttl=60))
        query = fingerprint("could you tell me the weather in paris today", "agent-a")
        self.assertEqual(await index.lookup(query), ("e1", 1.0, fp))
        self.assertIsNone(await index.lookup(fingerprint("weather in Rome today", "agent-a")))
        self.assertIsNone(await index.lookup(fingerprint("weather in Paris today", "agent-b")))
        self.assertTrue(await index.remove("e1", fp))
        self.assertFalse(await index.remove("e1", fp))
        self.assertIsNone(await index.lookup(query))

    @contract
    async def test_best_within_threshold(self) -> None:
        """The closest entry within the threshold wins; 10 bits away is too far at 0.85."""
        index = self.index()
        base = 0x0123456789ABCDEF
        await index.add("far", Fingerprint(flip(base, 0, 20, 40, 50, 60), 7))
        await index.add("near", Fingerprint(flip(base, 33, 63), 7))
        await index.add("too-far", Fingerprint(flip(base, *range(10)), 8))
        self.assertEqual(await index.lookup(Fingerprint(base, 7)),
                         ("near", 1 - 2 / 64, Fingerprint(flip(base, 33, 63), 7)))
        self.assertIsNone(await index.lookup(Fingerprint(base, 8)))
        self.assertEqual((await index.lookup(Fingerprint(base, 8), 0.8))[0], "too-far")

    @contract
    async def test_probe_guarantee(self) -> None:
        """Random entries up to 9 bits away are all found (the Lua popcount included)."""
        rng = random.Random(3)
        index = self.index()
        for n in range(60):
            base = rng.getrandbits(64)
            distance = rng.randint(0, 9)
            await index.add(f"e{n}", Fingerprint(flip(base, *rng.sample(range(64), distance)),
                                                 100 + n))
            found = await index.lookup(Fingerprint(base, 100 + n))
            self.assertEqual(found[:2], (f"e{n}", 1 - distance / 64))

    @contract
    async def test_replace_and_cap(self) -> None:
        """
        Adding an id again replaces its record; a bucket keeps its last
        C{bucket_cap} entries.
        """
        index = self.index(bucket_cap=3)
        fp = Fingerprint(0xABCDEF, 9)
        for n in range(5):
            await index.add(f"e{n}", fp)
        await index.add("e4", fp)
        for key in [index._key(k) for k in band_keys(fp)]:
            self.assertEqual(await self.store.get(key),
                             b"".join(b"0000000000abcdef e%d\n" % n for n in (2, 3, 4)))
        self.assertFalse(await index.remove("e0", fp))

    @contract
    async def test_ttl(self) -> None:
        """Buckets expire with their longest-lived entry."""
        index = self.index()
        short, long_ = Fingerprint(1, 5), Fingerprint(3, 5)
        await index.add("short", short, ttl=0.2)
        self.assertEqual((await index.lookup(short))[0], "short")
        await self.advance(0.35)
        self.assertIsNone(await index.lookup(short))
        await index.add("a", long_, ttl=0.2)
        await index.add("b", long_, ttl=1.0)
        await index.add("c", long_, ttl=0.2)
        await self.advance(0.35)
        self.assertIsNotNone(await index.lookup(long_))

    @contract
    async def test_nothing_to_compare(self) -> None:
        """A fingerprint without signature is neither indexed nor looked up."""
        index = self.index()
        self.assertFalse(await index.add("e", fingerprint("thanks!")))
        self.assertIsNone(await index.lookup(fingerprint("thanks!")))
        self.assertRaises(ValueError, index.add, "bad\nid", fingerprint("capital of France"))

    @contract
    async def test_one_round_trip(self) -> None:
        """A lookup is one script call, whatever it finds."""
        calls = []
        real = self.store.run

        def counting(script, keys, args):
            calls.append(script.name)
            return real(script, keys, args)

        self.store.run = counting
        index = self.index()
        await index.add("e", Fingerprint(0xF0F0, 4))
        del calls[:]
        await index.lookup(Fingerprint(0xF0F1, 4))
        await index.lookup(Fingerprint(0xF0F0, 5))
        self.assertEqual(calls, ["semantic_lookup", "semantic_lookup"])


class MemoryStoredIndexTests(StoredIndexContract, SynchronousTestCase):
    """The stored index on the memory store (the scripts' Python twins)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = build_store(StoreConfig(backend="memory"), self.clock, Metrics())
        self.successResultOf(self.store.connect())

    def drive(self, coroutine: Coroutine[Any, Any, None]) -> None:
        self.successResultOf(Deferred.fromCoroutine(coroutine))

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


class RedisStoredIndexTests(RedisStoreCase, StoredIndexContract, TestCase):
    """The stored index on a real redis-server (the Lua scripts)."""

    def drive(self, coroutine: Coroutine[Any, Any, None]) -> Deferred[None]:
        return Deferred.fromCoroutine(coroutine).addTimeout(WAIT, reactor)

    @contract
    async def test_shared_by_gateways(self) -> None:
        """What one gateway indexes, another gateway on the same Redis finds at once."""
        other_store = self.redis_store(self.server.url)
        await self.until_works(other_store)
        mine, theirs = self.index(), StoredSemanticIndex(other_store)
        fp = fingerprint("请问北京今天的天气如何?", "route:chat|model:m|agent:a")
        await theirs.add("cache-entry-1", fp, ttl=30)
        found = await mine.lookup(fingerprint("北京今天天气怎么样", "route:chat|model:m|agent:a"))
        self.assertEqual(found[:2], ("cache-entry-1", 1.0))
        self.assertIsNone(await mine.lookup(fingerprint("南京今天天气怎么样",
                                                        "route:chat|model:m|agent:a")))
        await mine.remove("cache-entry-1", found[2])
        self.assertIsNone(await theirs.lookup(fp))
