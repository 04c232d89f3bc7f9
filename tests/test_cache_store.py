"""
Tests for L{clawproxy.cache.store}: the entry codec, and the bounds every
cache store keeps (TTL, LRU by entries and by encoded bytes, drops by route
and agent), held by the memory cache and the shared cache on a fake clock,
and by the shared cache on a real redis-server.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from clawproxy.cache.store import Entry, MemoryCache, SharedCache
from clawproxy.stores.memory import MemoryStore
from tests.test_store_contract import WAIT, RedisStoreCase


def entry(body: bytes = b"{}", route: str = "r", scope: str = "agent:a",
          stored: float = 0.0) -> Entry:
    return Entry(200, ((b"content-type", b"application/json"),), body, "m-1", stored, route,
                 scope)


def size(e: Entry) -> int:
    return len(e.encode())


def contract(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., Any]:
    @functools.wraps(test)
    def run(self: Any) -> Any:
        return self.drive(test(self))
    return run


class EntryTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """An entry survives encoding, binary body and headers included."""
        e = Entry(200, ((b"content-type", b"text/event-stream"),), b"data: \x00\xff\n\n",
                  None, 12.5, "/v1/*", "*", True)
        self.assertEqual(Entry.decode(e.encode()), e)

    def test_garbage(self) -> None:
        """Bytes that are not an entry raise ValueError."""
        self.assertRaises(ValueError, Entry.decode, b"garbage")


class CacheContract:
    """What every cache store does; a test case provides C{make}, C{drive}, C{advance}."""

    make: Callable[..., Any]

    @contract
    async def test_put_get(self) -> None:
        """A stored entry is read back; an absent key is None."""
        cache = self.make(10, 10_000)
        await cache.put("k1", entry(b'{"a":1}'), 60)
        self.assertEqual((await cache.get("k1")).body, b'{"a":1}')
        self.assertIsNone(await cache.get("k2"))

    @contract
    async def test_lifetime(self) -> None:
        """An entry is gone once its lifetime has passed."""
        cache = self.make(10, 10_000)
        await cache.put("k1", entry(), 1)
        await self.advance(0.5)
        self.assertIsNotNone(await cache.get("k1"))
        await self.advance(0.7)
        self.assertIsNone(await cache.get("k1"))

    @contract
    async def test_lru_entries(self) -> None:
        """Over max_entries, the least recently used entry goes (a read counts as use)."""
        cache = self.make(3, 100_000)
        for k in ("k1", "k2", "k3"):
            await cache.put(k, entry(k.encode()), 60)
            await self.advance(0.01)
        self.assertIsNotNone(await cache.get("k1"))  # k2 is now the oldest used
        await self.advance(0.01)
        await cache.put("k4", entry(b"k4"), 60)
        self.assertIsNone(await cache.get("k2"))
        for k in ("k1", "k3", "k4"):
            self.assertIsNotNone(await cache.get(k), k)
        self.assertEqual(cache.stats()["entries"], 3)

    @contract
    async def test_lru_bytes(self) -> None:
        """Over max_bytes (counted from encoded entries), the oldest go until it fits."""
        one = size(entry(b"x" * 100))
        cache = self.make(100, one * 3)
        for i in range(3):
            await cache.put(f"k{i}", entry(b"x" * 100), 60)
            await self.advance(0.01)
        self.assertEqual(cache.stats(), {"entries": 3, "bytes": one * 3})
        await cache.put("big", entry(b"y" * 200), 60)  # needs two entries' room
        self.assertIsNone(await cache.get("k0"))
        self.assertIsNone(await cache.get("k1"))
        self.assertIsNotNone(await cache.get("k2"))
        self.assertIsNotNone(await cache.get("big"))
        self.assertLessEqual(cache.stats()["bytes"], one * 3)

    @contract
    async def test_too_big(self) -> None:
        """An entry larger than max_bytes is not kept (and evicts nothing)."""
        cache = self.make(100, 500)
        await cache.put("small", entry(b"s"), 60)
        await cache.put("huge", entry(b"h" * 1000), 60)
        self.assertIsNone(await cache.get("huge"))
        self.assertIsNotNone(await cache.get("small"))

    @contract
    async def test_replace(self) -> None:
        """Storing a key again replaces it without counting it twice."""
        cache = self.make(10, 100_000)
        await cache.put("k", entry(b"old"), 60)
        await cache.put("k", entry(b"new!"), 60)
        self.assertEqual((await cache.get("k")).body, b"new!")
        self.assertEqual(cache.stats(), {"entries": 1, "bytes": size(entry(b"new!"))})

    @contract
    async def test_drop(self) -> None:
        """Entries are dropped all at once, or by route, or by scope."""
        cache = self.make(10, 100_000)
        await cache.put("a1", entry(route="r1", scope="agent:a"), 60)
        await cache.put("b1", entry(route="r1", scope="agent:b"), 60)
        await cache.put("a2", entry(route="r2", scope="agent:a"), 60)
        await cache.put("s2", entry(route="r2", scope="*"), 60)
        self.assertEqual(await cache.drop(scope="agent:a"), 2)
        self.assertIsNone(await cache.get("a1"))
        self.assertIsNotNone(await cache.get("b1"))
        self.assertEqual(await cache.drop(route="r1"), 1)
        self.assertEqual(await cache.drop(), 1)
        self.assertIsNone(await cache.get("s2"))
        self.assertEqual(cache.stats(), {"entries": 0, "bytes": 0})


class MemoryCacheTests(CacheContract, SynchronousTestCase):
    """The in-process LRU on a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()

    def make(self, max_entries: int, max_bytes: int) -> MemoryCache:
        return MemoryCache(self.clock, max_entries, max_bytes)

    def drive(self, coroutine: Coroutine[Any, Any, None]) -> None:
        self.successResultOf(Deferred.fromCoroutine(coroutine))

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


class SharedCacheMemoryTests(MemoryCacheTests):
    """The shared cache's scripts, run by their Python twins on a memory store."""

    def make(self, max_entries: int, max_bytes: int) -> SharedCache:
        return SharedCache(MemoryStore(self.clock), self.clock, max_entries, max_bytes, 3600)


class SharedCacheRedisTests(RedisStoreCase, CacheContract, TestCase):
    """The shared cache's Lua scripts on a real redis-server."""

    def make(self, max_entries: int, max_bytes: int) -> SharedCache:
        return SharedCache(self.store, reactor, max_entries, max_bytes, 3600)

    def drive(self, coroutine: Coroutine[Any, Any, None]) -> Deferred[None]:
        return Deferred.fromCoroutine(coroutine).addTimeout(WAIT * 3, reactor)

    @contract
    async def test_keys_carry_ttl_and_prefix(self) -> None:
        """In Redis each entry is a key under the store's prefix with a TTL."""
        cache = self.make(10, 100_000)
        await cache.put("k1", entry(), 60)
        raw = await self.raw(self.server.port)
        ttl = await raw.execute_command("PTTL", "test:cache:e:k1")
        self.assertTrue(0 < ttl <= 60_000, ttl)
        self.assertEqual(sorted(await raw.keys("*")), sorted(
            [b"test:cache:e:k1", b"test:cache:lru", b"test:cache:meta", b"test:cache:bytes"]))

    @contract
    async def test_two_gateways_share(self) -> None:
        """Two caches on one Redis see each other's entries and share the bounds."""
        other = SharedCache(self.redis_store(self.server.url), reactor, 2, 100_000, 3600)
        await self.until_works(other.store)
        mine = self.make(2, 100_000)
        await mine.put("k1", entry(b"one"), 60)
        self.assertEqual((await other.get("k1")).body, b"one")
        await self.advance(0.01)
        await other.put("k2", entry(b"two"), 60)
        await self.advance(0.01)
        await other.put("k3", entry(b"three"), 60)
        self.assertIsNone(await mine.get("k1"))
        self.assertEqual(other.stats()["entries"], 2)
