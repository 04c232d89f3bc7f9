"""
Tests for L{clawproxy.web.sessions}: session keys, and affinity shared by
data planes through one state store.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import fail
from twisted.trial.unittest import SynchronousTestCase

from clawproxy.config import parse_config
from clawproxy.policy.affinity import conversation_key
from clawproxy.stores.errors import StoreUnavailable
from clawproxy.stores.memory import MemoryStore
from clawproxy.web.sessions import SharedAffinity, affinity_parts
from tests.test_gateway import Harness, two_instance_pool


def conversation_config(**pool: Any) -> dict[str, Any]:
    main = two_instance_pool(session_affinity={"method": "conversation", "ttl": "1h"},
                             algorithm="random", **pool)
    main["instances"].append({"id": "c", "url": "http://c.test:8000"})
    return {"pools": {"main": main}, "routes": [{"path": "/v1/*", "pool": "main"}]}


def turn(gw: Harness, n: int) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": f"question {n}"}]}
    return gw.request("POST", "/v1/chat/completions", body).json()["instance"]


class DownStore:
    """A store that cannot be reached."""

    backend = "redis"
    shared = True

    def __init__(self) -> None:
        self.calls = 0

    def get(self, key: str) -> Any:
        self.calls += 1
        return fail(StoreUnavailable("down"))

    def set(self, key: str, value: bytes, ttl: float | None = None) -> Any:
        self.calls += 1
        return fail(StoreUnavailable("down"))


class SharedAffinityTests(SynchronousTestCase):
    """L{SharedAffinity}: the sessions of several data planes on one store."""

    def test_shared(self) -> None:
        """A conversation begun on one data plane goes on where it began on another."""
        first = Harness(self, conversation_config())
        store = MemoryStore(first.clock)
        one = Harness(self, conversation_config(), extra=[SharedAffinity(store)])
        two = Harness(self, conversation_config(), extra=[SharedAffinity(store)])
        where = {n: turn(one, n) for n in range(30)}
        self.assertEqual(len(set(where.values())), 3)
        self.assertEqual({n: turn(two, n) for n in range(30)}, where)

    def test_store_down(self) -> None:
        """With the store unreachable, each data plane keeps its own sessions."""
        store = DownStore()
        gw = Harness(self, conversation_config(), extra=[SharedAffinity(store)])
        where = {n: turn(gw, n) for n in range(10)}
        self.assertEqual({n: turn(gw, n) for n in range(10)}, where)
        self.assertEqual(store.calls, 40)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_not_stored_after_failure(self) -> None:
        """An instance that answered a 5xx is not remembered for the session."""
        store = MemoryStore(Harness(self, conversation_config()).clock)
        gw = Harness(self, conversation_config(), extra=[SharedAffinity(store)])
        gw.backend.status.update({"a": 500, "b": 500, "c": 500})
        body = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
        self.assertEqual(gw.request("POST", "/v1/x", body).code, 500)
        key = "affinity:main:" + conversation_key(None, body)
        self.assertIsNone(self.successResultOf(store.get(key)))
        gw.backend.status.clear()
        self.assertEqual(gw.request("POST", "/v1/x", body).code, 200)
        self.assertIn(self.successResultOf(store.get(key)), (b"a", b"b", b"c"))

    def test_feature_only_when_shared(self) -> None:
        """The feature adds nothing on a memory store or without session affinity."""
        with_aff = parse_config(conversation_config(), environ={})
        without = parse_config({"pools": {"main": two_instance_pool()},
                                "routes": [{"path": "/*", "pool": "main"}]}, environ={})
        memory = MemoryStore(Harness(self, conversation_config()).clock)
        self.assertEqual(list(affinity_parts(config=with_aff, store=memory)), [])
        self.assertEqual(list(affinity_parts(config=without, store=DownStore())), [])
        (part,) = affinity_parts(config=with_aff, store=DownStore())
        self.assertIsInstance(part, SharedAffinity)
