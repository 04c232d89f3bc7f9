"""
Breakers shared through a state store: two boards (two gateways) on one
store, on a fake clock; the store's scripts on memory and on a real
redis-server.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from clawproxy.backends.registry import Registry
from clawproxy.backends.shared_breakers import (
    FAIL,
    READ,
    READ_INTERVAL,
    SharedBreakerBoard,
    breaker_board,
    fails_key,
    open_key,
)
from clawproxy.config import parse_config
from clawproxy.interfaces import OK
from clawproxy.policy.breakers import CLOSED, HALF_OPEN, OPEN, BreakerBoard, NoBreakers
from clawproxy.stores.errors import StoreUnavailable
from clawproxy.stores.memory import MemoryStore


def config(**cb: Any) -> Any:
    return parse_config({
        "pools": {"main": {
            "instances": [{"id": "a", "url": "http://a.test"},
                          {"id": "b", "url": "http://b.test"}],
            "circuit_breaker": {"failure_threshold": 3, "open_timeout": "10s", "jitter": 0,
                                "success_threshold": 1, **cb}}},
        "routes": [{"path": "/*", "pool": "main"}],
    }, environ={})


class Gateway:
    """One gateway's board and registry on a shared store."""

    def __init__(self, clock: Clock, store: Any, random: Any = None, **cb: Any) -> None:
        cfg = config(**cb)
        board = SharedBreakerBoard.from_config(cfg, clock, random=random, store=store)
        assert isinstance(board, SharedBreakerBoard)
        self.board = board
        self.registry = Registry(cfg, clock, breakers=board)
        self.pool = self.registry.pools["main"]

    def fail(self, inst: str, outcome: str = "5xx") -> None:
        self.pool.record(self.pool.by_id[inst], outcome)

    def ok(self, inst: str) -> None:
        self.pool.record(self.pool.by_id[inst], OK)

    def state(self, name: str) -> str:
        return self.board.state(name)


class Broken:
    """A store that cannot be reached."""

    backend = "redis"
    shared = True

    def run(self, *a: Any) -> Any:
        return fail(StoreUnavailable("no connection to Redis"))

    def delete(self, *a: Any) -> Any:
        return fail(StoreUnavailable("no connection to Redis"))


class Slow:
    """
    A store that answers when told (L{flush}), through a coroutine as the
    Redis store does (so its Deferreds look "called" while they wait).
    """

    backend = "redis"
    shared = True

    def __init__(self, clock: Clock) -> None:
        self.memory = MemoryStore(clock)
        self.pending: list[Deferred[None]] = []

    def run(self, script: Any, keys: Any, args: Any) -> Deferred[Any]:
        gate: Deferred[None] = Deferred()
        self.pending.append(gate)

        async def answer() -> Any:
            await gate
            return await self.memory.run(script, keys, args)

        return Deferred.fromCoroutine(answer())

    def delete(self, key: str) -> Deferred[bool]:
        return self.memory.delete(key)

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for gate in pending:
            gate.callback(None)


class SlowStoreTests(SynchronousTestCase):
    """The attempt that finds a read due waits for it; the others do not."""

    def test_waits_for_the_due_read(self) -> None:
        """A breaker opened elsewhere keeps the first request after the read from going."""
        clock = Clock()
        store = Slow(clock)
        gw = Gateway(clock, store)
        store.memory.keys.set(open_key("main"), b"1", 5000)
        taken = gw.pool.take()
        self.assertIsInstance(taken, Deferred)
        self.assertNoResult(taken)
        self.assertEqual(gw.pool.take().id, "b")  # meanwhile others go on the local view
        store.flush()
        self.assertIsNone(self.successResultOf(taken))
        self.assertEqual(gw.state("main"), OPEN)
        self.assertIsNone(gw.pool.take())  # excluded now, without asking the store

    def test_no_wait_between_reads(self) -> None:
        """Within READ_INTERVAL of the last read, admission is synchronous."""
        clock = Clock()
        store = Slow(clock)
        gw = Gateway(clock, store)
        taken = gw.pool.take()
        store.flush()
        self.assertEqual(self.successResultOf(taken).id, "a")
        clock.advance(READ_INTERVAL / 2)
        self.assertEqual(gw.pool.take().id, "b")

    def test_client_leaving_while_waiting(self) -> None:
        """Cancelling a waiting admission leaves nothing behind."""
        clock = Clock()
        store = Slow(clock)
        gw = Gateway(clock, store)
        taken = gw.pool.take()
        taken.cancel()
        self.failureResultOf(taken)
        store.flush()
        self.assertEqual(gw.board.breakers["main"].probes_out, 0)
        self.assertIsNotNone(gw.pool.take())


class SharedTests(SynchronousTestCase):
    """Two gateways on one store see each other's failures and openings."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore(self.clock)
        self.one = Gateway(self.clock, self.store)
        self.two = Gateway(self.clock, self.store)

    def test_failures_count_together(self) -> None:
        """2 failures on one gateway and 1 on the other open the breaker."""
        self.one.fail("a")
        self.one.ok("b")
        self.one.fail("a")
        self.assertEqual(self.one.state("main/a"), CLOSED)
        self.two.fail("a")
        self.assertEqual(self.two.state("main/a"), OPEN)
        self.assertEqual(self.two.board.retry_after("main"), None)
        # The first gateway learns it at its next read (at most READ_INTERVAL later).
        self.assertEqual(self.one.state("main/a"), CLOSED)
        self.clock.advance(READ_INTERVAL)
        self.assertEqual(self.one.pool.take().id, "b")
        self.assertEqual(self.one.state("main/a"), OPEN)
        self.assertEqual(self.one.pool.candidates(), [self.one.pool.by_id["b"]])

    def test_refusals_count_nowhere(self) -> None:
        """Refused connections count neither locally nor in the store."""
        for _ in range(3):
            self.one.pool.record(self.one.pool.by_id["a"], "refused", reached=False)
            self.two.pool.record(self.two.pool.by_id["a"], "refused", reached=False)
        self.clock.advance(READ_INTERVAL)
        self.one.fail("a")
        self.one.ok("b")
        self.one.fail("a")
        self.assertEqual(self.one.state("main/a"), CLOSED)
        self.assertEqual(self.two.state("main/a"), CLOSED)

    def test_open_period_follows_the_store(self) -> None:
        """A gateway that learns an opening keeps it until the store's time is up."""
        for _ in range(3):
            self.two.fail("a")
        self.assertEqual(self.two.state("main/a"), OPEN)
        self.clock.advance(4)
        self.one.pool.take()
        self.assertEqual(self.one.state("main/a"), OPEN)
        self.assertAlmostEqual(self.one.board.breakers["main/a"].opened_until, 10.0)
        self.clock.advance(6)
        self.assertEqual(self.one.state("main/a"), HALF_OPEN)
        self.assertEqual(self.two.state("main/a"), HALF_OPEN)

    def test_adopted_opening_gets_local_jitter(self) -> None:
        """A gateway adopting an opening adds its own jitter, within its bound."""
        three = Gateway(self.clock, self.store, random=lambda: 0.5, jitter=0.2)
        for _ in range(3):
            self.two.fail("a")
        self.clock.advance(READ_INTERVAL)
        three.pool.take()
        self.assertAlmostEqual(three.board.breakers["main/a"].opened_until, 10.0 + 1.0)

    def test_local_opening_is_published(self) -> None:
        """A breaker opened by one gateway's own count is open for the other too."""
        board = self.one.board.breakers["main/a"]
        board.trip()
        self.clock.advance(READ_INTERVAL)
        self.assertIsNone(self.two.board.retry_after("main"))  # a read happens here
        self.assertEqual(self.two.state("main/a"), OPEN)

    def test_failed_probe_reopens_everywhere(self) -> None:
        """A half-open probe that fails on one gateway reopens the breaker on the other."""
        for _ in range(3):
            self.one.fail("a")
        self.clock.advance(READ_INTERVAL)
        self.two.pool.take()
        self.assertEqual(self.two.state("main/a"), OPEN)
        self.clock.advance(10)
        self.assertEqual(self.one.state("main/a"), HALF_OPEN)
        self.assertEqual(self.two.state("main/a"), HALF_OPEN)
        self.assertTrue(self.one.board.admit(self.one.pool.by_id["a"]))
        self.one.fail("a")
        self.assertEqual(self.one.state("main/a"), OPEN)
        self.clock.advance(READ_INTERVAL)
        self.two.pool.take()
        self.assertEqual(self.two.state("main/a"), OPEN)

    def test_own_opening_is_not_taken_back(self) -> None:
        """The gateway that published an opening does not reopen on reading it back."""
        for _ in range(3):
            self.one.fail("a")
        breaker = self.one.board.breakers["main/a"]
        self.assertEqual(breaker.transitions, 1)
        self.clock.advance(9.9)
        self.one.pool.take()
        self.clock.advance(0.1)
        self.one.pool.take()
        self.assertEqual(self.one.state("main/a"), HALF_OPEN)
        self.assertEqual(breaker.transitions, 2)

    def test_pool_success_clears_shared_count(self) -> None:
        """A pool's success on one gateway clears the failures counted by the other."""
        self.one.fail("a")
        self.one.fail("b")
        self.assertIsNotNone(self.store.keys.get(fails_key("main")))
        self.two.ok("b")  # the other gateway has not read the store yet: no call
        self.assertIsNotNone(self.store.keys.get(fails_key("main")))
        self.clock.advance(READ_INTERVAL)
        self.two.pool.take()
        self.two.ok("b")
        self.assertIsNone(self.store.keys.get(fails_key("main")))
        self.clock.advance(READ_INTERVAL)
        self.one.pool.take()  # reads: the pool's count is gone
        self.one.fail("a")
        self.assertEqual(self.one.state("main"), CLOSED)

    def test_store_down_keeps_local_breakers(self) -> None:
        """With the store unreachable the breakers work on local counts; logged once."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        gw = Gateway(self.clock, Broken())
        for _ in range(3):
            self.clock.advance(READ_INTERVAL)
            gw.pool.take()
            gw.fail("a")
        self.assertEqual(gw.state("main/a"), OPEN)
        warned = [e for e in events if "unavailable" in e.get("log_format", "")]
        self.assertEqual(len(warned), 1)

    def test_board_choice(self) -> None:
        """store.backend redis gives a shared board; memory a local one; none, NoBreakers."""
        clock = Clock()
        self.assertIsInstance(breaker_board(config(), clock, None, Broken()),
                              SharedBreakerBoard)
        board = breaker_board(config(), clock, None, MemoryStore(clock))
        self.assertIs(type(board), BreakerBoard)
        self.assertIsInstance(breaker_board(config(enabled=False), clock, None, Broken()),
                              NoBreakers)


class ScriptTests(SynchronousTestCase):
    """The scripts' Python twins on the memory store."""

    def test_fail_counts_in_window(self) -> None:
        """FAIL counts failures within the window and opens at the threshold."""
        clock = Clock()
        store = MemoryStore(clock)
        keys = [fails_key("x"), open_key("x")]

        def run(force: int = 0) -> Any:
            return self.successResultOf(store.run(FAIL, keys, [3, 1000, 5000, force]))

        self.assertEqual(run(), [0, 0, 1])
        clock.advance(1.5)
        self.assertEqual(run(), [0, 0, 1])  # the first one left the window
        clock.advance(0.1)
        self.assertEqual(run(), [0, 0, 2])
        self.assertEqual(run(), [1, 5000, 3])
        clock.advance(1)
        self.assertEqual(run(), [1, 4000, 0])
        self.assertEqual(self.successResultOf(store.run(READ, [keys[1], "nope"], [])),
                         [4000, -2])
        clock.advance(4)
        self.assertEqual(run(), [0, 0, 1])
        self.assertEqual(run(force=1), [1, 5000, 0])


class RedisScriptTests(TestCase):
    """The Lua scripts answer as their twins do, on a real redis-server."""

    timeout = 60

    async def test_scripts_on_redis(self) -> None:
        """FAIL and READ in Lua: counting, opening, the time left."""
        from tests.test_store_contract import RedisHarness

        harness = RedisHarness()
        harness.mktemp = self.mktemp  # type: ignore[attr-defined]
        harness.addCleanup = self.addCleanup  # type: ignore[attr-defined]
        server = await harness.start_redis()
        store = harness.redis_store(server.url)
        await harness.until_works(store)
        keys = [fails_key("x"), open_key("x")]
        self.assertEqual(await store.run(FAIL, keys, [3, 1000, 5000, 0]), [0, 0, 1])
        self.assertEqual(await store.run(FAIL, keys, [3, 1000, 5000, 0]), [0, 0, 2])
        reply = await store.run(FAIL, keys, [3, 1000, 5000, 0])
        self.assertEqual(reply, [1, 5000, 3])
        reply = await store.run(FAIL, keys, [3, 1000, 5000, 0])
        self.assertEqual(reply[0], 1)
        self.assertTrue(4000 < reply[1] <= 5000)
        left = await store.run(READ, [keys[1], "nope"], [])
        self.assertTrue(4000 < left[0] <= 5000)
        self.assertEqual(left[1], -2)
        self.assertEqual(await store.run(FAIL, keys, [3, 1000, 300, 1]), [1, 300, 0])
