"""
Every feature that keeps state takes its shared path whenever the store is
shared (C{IStateStore.shared}), not only with Redis: a worker's view of its
parent's memory store (L{AmpStore}) is shared by every worker.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from clawproxy.backends.shared_breakers import SharedBreakerBoard, breaker_board
from clawproxy.cache.store import MemoryCache, SharedCache
from clawproxy.config import ConfigError, parse_config
from clawproxy.interfaces import IStateStore
from clawproxy.metrics import Metrics
from clawproxy.policy.breakers import BreakerBoard
from clawproxy.stores.amp import AmpStore
from clawproxy.stores.memory import MemoryStore
from clawproxy.web.cache import ResponseCache
from clawproxy.web.sessions import SharedAffinity, affinity_parts
from tests.test_store_amp import worker_of


def config(**top: Any) -> Any:
    return parse_config({
        "pools": {"main": {
            "instances": [{"id": "a", "url": "http://a.test"},
                          {"id": "b", "url": "http://b.test"}],
            "circuit_breaker": {"failure_threshold": 3},
            "session_affinity": {"method": "header", "header_name": "X-Session"}}},
        "routes": [{"path": "/*", "pool": "main", "cache": {"ttl": "1m"}}],
        **top,
    }, environ={})


class SharedFlagTests(SynchronousTestCase):
    def test_flags(self) -> None:
        """A process's memory store is not shared; a worker's view of its parent's is."""
        clock = Clock()
        memory = MemoryStore(clock)
        self.assertFalse(memory.shared)
        amp_store = AmpStore(clock)
        self.assertTrue(amp_store.shared)
        verifyObject(IStateStore, amp_store)
        from clawproxy.stores.redis import RedisStore

        self.assertTrue(RedisStore.shared)


class FeaturesFollowTheFlagTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.parent = MemoryStore(self.clock)
        self.worker_store, self.pump = worker_of(self.parent, self.clock)
        self.cfg = config()

    def test_breakers(self) -> None:
        """A worker's breakers keep their state in the parent's store."""
        self.assertIsInstance(breaker_board(self.cfg, self.clock, Metrics(), self.parent),
                              BreakerBoard)
        self.assertNotIsInstance(breaker_board(self.cfg, self.clock, Metrics(), self.parent),
                                 SharedBreakerBoard)
        self.assertIsInstance(
            breaker_board(self.cfg, self.clock, Metrics(), self.worker_store),
            SharedBreakerBoard)

    def test_affinity(self) -> None:
        """A worker's sessions are pinned in the parent's store."""
        self.assertEqual(list(affinity_parts(config=self.cfg, store=self.parent)), [])
        (part,) = affinity_parts(config=self.cfg, store=self.worker_store)
        self.assertIsInstance(part, SharedAffinity)

    def test_cache(self) -> None:
        """
        C{cache.store: memory} is the gateway's memory: in a worker, the
        parent's store, through the shared scripts; an entry one worker
        stores is found by another.
        """
        own = ResponseCache(self.cfg, self.parent, self.clock, Metrics())
        self.assertIsInstance(own.backend, MemoryCache)
        first = ResponseCache(self.cfg, self.worker_store, self.clock, Metrics())
        self.assertIsInstance(first.backend, SharedCache)
        other_store, other_pump = worker_of(self.parent, self.clock)
        second = ResponseCache(self.cfg, other_store, self.clock, Metrics())
        from clawproxy.cache.store import Entry

        entry = Entry(200, ((b"content-type", b"application/json"),), b'{"ok": 1}',
                      None, self.clock.seconds(), "r", "s")
        stored = first.backend.put("k", entry, 60)
        self.pump()
        self.successResultOf(stored)
        found = second.backend.get("k")
        other_pump()
        self.assertEqual(self.successResultOf(found).body, b'{"ok": 1}')

    def test_memory_cache_with_redis_and_workers_refused(self) -> None:
        """
        C{cache.store: memory} beside Redis with workers would be one cache
        per worker: refused, naming the key.
        """
        with self.assertRaises(ConfigError) as caught:
            config(server={"workers": 2}, store={"backend": "redis"})
        self.assertIn("cache.store", str(caught.exception))
        config(server={"workers": 2}, store={"backend": "redis"}, cache={"store": "redis"})
        config(server={"workers": 2})
        config(store={"backend": "redis"})
