"""
The state store contract (L{clawproxy.interfaces.IStateStore}), held by the
memory store (on a L{Clock}, synchronously) and by the Redis store (against
a real redis-server the tests start, on the real reactor), plus what only
Redis can do: lose its scripts, die, hang, come back.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from clawproxy.config import RedisConfig, StoreConfig
from clawproxy.interfaces import IStateStore
from clawproxy.metrics import Metrics
from clawproxy.stores import Script, StoreError, StoreUnavailable, build_store
from clawproxy.stores.memory import MemoryStore
from clawproxy.stores.redis import RedisStore, RedisTarget, parse_redis_url
from clawproxy.stores.script import KeySpace
from tests.redis_server import RedisServer, require_redis_server

#: Every wait on a real server is bounded by this (seconds).
WAIT = 10.0
#: C{store.redis.timeout} in these tests (the SPEC default).
TIMEOUT = 0.2


def _bucket(keys: KeySpace, k: Sequence[str], argv: Sequence[bytes]) -> list[int]:
    capacity, rate, cost = float(argv[0]), float(argv[1]), float(argv[2])
    seconds, micros = keys.time()
    now = seconds * 1000 + micros // 1000
    state = keys.get(k[0])
    tokens, last = capacity, now
    if state is not None:
        text_tokens, text_last = state.split(b" ")
        tokens, last = float(text_tokens), int(text_last)
    tokens = min(capacity, tokens + max(0, now - last) * rate / 1000)
    allowed = 0
    if tokens >= cost:
        tokens -= cost
        allowed = 1
    keys.set(k[0], b"%.3f %d" % (tokens, now), px=int(argv[3]))
    return [allowed, int(tokens // 1)]


#: A token bucket as a feature would write one: the store's own time, one
#: key holding "tokens last_ms". ARGV: capacity, tokens per second, cost, TTL ms.
TOKEN_BUCKET = Script(
    "token_bucket",
    """
local capacity, rate, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('GET', KEYS[1])
local tokens, last = capacity, now
if state then
  local sep = string.find(state, ' ', 1, true)
  tokens = tonumber(string.sub(state, 1, sep - 1))
  last = tonumber(string.sub(state, sep + 1))
end
tokens = math.min(capacity, tokens + math.max(0, now - last) * rate / 1000)
local allowed = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
end
redis.call('SET', KEYS[1], string.format('%.3f %d', tokens, now), 'PX', ARGV[4])
return {allowed, math.floor(tokens)}
""",
    _bucket,
)

#: The results of L{bucket_sequence}: three taken, one refused, one refilled.
BUCKET_RESULTS = [[1, 2], [1, 1], [1, 0], [0, 0], [1, 1]]


async def bucket_sequence(store: IStateStore, advance: Callable[[float], Any]) -> list[Any]:
    """Take from a 3-token bucket refilling 4/s: four at once, then one 0.55s later."""
    results = []
    for _ in range(4):
        results.append(await store.run(TOKEN_BUCKET, ["bucket"], [3, 4.0, 1, 60000]))
    await advance(0.55)
    results.append(await store.run(TOKEN_BUCKET, ["bucket"], [3, 4.0, 1, 60000]))
    return results


def _shapes(keys: KeySpace, k: Sequence[str], argv: Sequence[bytes]) -> Any:
    return [list(argv), [7, b"x", False, 2.9], True, keys.get(k[0])]


#: Returns one of each reply shape: its arguments, a nested list holding an
#: int, bytes, a false (nil) and a fraction (truncated), a true, and a value
#: that may be absent (false in Lua, None in Python: nil in the reply).
SHAPES = Script(
    "shapes",
    "return {ARGV, {7, 'x', false, 2.9}, true, redis.call('GET', KEYS[1])}",
    _shapes,
)


def _refuse(keys: KeySpace, k: Sequence[str], argv: Sequence[bytes]) -> Any:
    keys.set(k[0], b"written before the error")
    raise StoreError("over budget")


#: Writes, then fails with an error reply.
REFUSE = Script(
    "refuse",
    "redis.call('SET', KEYS[1], 'written before the error') "
    "return redis.error_reply('over budget')",
    _refuse,
)


def _clock_script(keys: KeySpace, k: Sequence[str], argv: Sequence[bytes]) -> Any:
    seconds, micros = keys.time()
    return [seconds, micros]


#: The store's time, from inside a script.
CLOCK = Script(
    "clock",
    "local t = redis.call('TIME') return {tonumber(t[1]), tonumber(t[2])}",
    _clock_script,
)


def contract(
    test: Callable[[Any], Coroutine[Any, Any, None]],
) -> Callable[[Any], Any]:
    """Make an C{async def} contract check a test method of either test case."""

    @functools.wraps(test)
    def run(self: Any) -> Any:
        return self.drive(test(self))

    return run


class StoreContract:
    """
    What every L{IStateStore} does. A test case mixing this in provides
    C{store}, C{metrics}, C{drive(coroutine)}, C{advance(seconds)} (a
    coroutine) and C{wall()} (the time the store should report).
    """

    store: IStateStore
    metrics: Metrics

    def errors(self, op: str) -> float | None:
        return self.metrics.registry.get_sample_value("clawproxy_store_errors_total",
                                                      {"op": op})

    def test_provides(self) -> None:
        """The store provides the whole interface."""
        self.assertTrue(verifyObject(IStateStore, self.store))

    @contract
    async def test_absent(self) -> None:
        """A key never set reads as None, and deleting it reports it was not there."""
        self.assertIsNone(await self.store.get("nothing"))
        self.assertFalse(await self.store.delete("nothing"))

    @contract
    async def test_set_get(self) -> None:
        """Values are bytes, any bytes, and a set replaces the value."""
        self.assertIsNone(await self.store.set("k", b"\xff\x00 value"))
        self.assertEqual(await self.store.get("k"), b"\xff\x00 value")
        await self.store.set("k", b"")
        self.assertEqual(await self.store.get("k"), b"")
        big = bytes(range(256)) * 1024
        await self.store.set("big", big)
        self.assertEqual(await self.store.get("big"), big)

    @contract
    async def test_ttl(self) -> None:
        """
        A value set with a TTL is gone once it has passed; a set without TTL
        keeps the value for good.
        """
        await self.store.set("short", b"v", ttl=0.2)
        await self.store.set("kept", b"v", ttl=0.2)
        await self.store.set("kept", b"w")
        self.assertEqual(await self.store.get("short"), b"v")
        await self.advance(0.35)
        self.assertIsNone(await self.store.get("short"))
        self.assertEqual(await self.store.get("kept"), b"w")

    def test_bad_arguments(self) -> None:
        """
        A TTL that is not a positive number of seconds, a value that is not
        bytes, a script argument that is not a string or number: programming
        errors, raised at once.
        """
        self.assertRaises(ValueError, self.store.set, "k", b"v", ttl=0)
        self.assertRaises(ValueError, self.store.incrby, "k", 1, ttl=-1)
        self.assertRaises(TypeError, self.store.set, "k", "text")
        self.assertRaises(TypeError, self.store.run, SHAPES, ["k"], [True])
        self.assertRaises(TypeError, self.store.run, SHAPES, ["k"], [None])

    @contract
    async def test_incrby(self) -> None:
        """Counters start at 0, go up and down, and read back as their decimal bytes."""
        self.assertEqual(await self.store.incrby("n", 5), 5)
        self.assertEqual(await self.store.incrby("n", -7), -2)
        self.assertEqual(await self.store.get("n"), b"-2")
        await self.store.set("m", b"40")
        self.assertEqual(await self.store.incrby("m", 2), 42)

    @contract
    async def test_incrby_ttl_on_creation(self) -> None:
        """
        The TTL of C{incrby} is set when the counter is created, not pushed
        back by later additions: a fixed window.
        """
        self.assertEqual(await self.store.incrby("w", 1, ttl=0.4), 1)
        await self.advance(0.25)
        self.assertEqual(await self.store.incrby("w", 1, ttl=0.4), 2)
        await self.advance(0.25)
        self.assertIsNone(await self.store.get("w"))
        self.assertEqual(await self.store.incrby("w", 1, ttl=0.4), 1)

    @contract
    async def test_incrby_not_a_number(self) -> None:
        """
        Adding to a value that is not an integer fails with L{StoreError} (not
        L{StoreUnavailable}): counted as an error, the store still healthy.
        """
        await self.store.set("text", b"abc")
        with self.assertRaises(StoreError) as caught:
            await self.store.incrby("text", 1)
        self.assertNotIsInstance(caught.exception, StoreUnavailable)
        self.assertIn("not an integer", str(caught.exception))
        self.assertEqual(await self.store.get("text"), b"abc")
        self.assertEqual(self.errors("incrby"), 1.0)
        health = self.store.health()
        self.assertEqual((health["healthy"], health["errors"]), (True, 1))

    @contract
    async def test_delete(self) -> None:
        """Delete removes a key and says whether it was there."""
        await self.store.set("k", b"v", ttl=30)
        self.assertTrue(await self.store.delete("k"))
        self.assertIsNone(await self.store.get("k"))
        self.assertFalse(await self.store.delete("k"))

    @contract
    async def test_now(self) -> None:
        """C{now()} is the store's clock: the expected time, moving forward with it."""
        first = await self.store.now()
        self.assertIsInstance(first, float)
        self.assertLess(abs(first - self.wall()), 1.0)
        await self.advance(0.3)
        second = await self.store.now()
        self.assertGreaterEqual(second - first, 0.29)
        self.assertLess(second - first, 1.0)
        in_script = await self.store.run(CLOCK, [], [])
        self.assertLess(abs(in_script[0] + in_script[1] / 1e6 - second), 0.1)

    @contract
    async def test_script_token_bucket(self) -> None:
        """A token bucket script gives the same answers on every store."""
        self.assertEqual(await bucket_sequence(self.store, self.advance), BUCKET_RESULTS)

    @contract
    async def test_script_reply_shapes(self) -> None:
        """
        Arguments arrive as bytes; replies come back as Redis converts Lua
        values: ints (fractions truncated), bytes, nil for false, 1 for true.
        """
        await self.store.set("there", b"yes")
        result = await self.store.run(SHAPES, ["there"], [b"raw", "text", 3, 2.5])
        self.assertEqual(result, [[b"raw", b"text", b"3", b"2.5"], [7, b"x", None, 2], 1,
                                  b"yes"])
        self.assertEqual(await self.store.run(SHAPES, ["absent"], []),
                         [[], [7, b"x", None, 2], 1, None])

    @contract
    async def test_script_error(self) -> None:
        """
        A script's error fails the call with L{StoreError} carrying its message;
        what it wrote before stays written (as in Redis).
        """
        with self.assertRaises(StoreError) as caught:
            await self.store.run(REFUSE, ["k"], [])
        self.assertNotIsInstance(caught.exception, StoreUnavailable)
        self.assertIn("over budget", str(caught.exception))
        self.assertEqual(await self.store.get("k"), b"written before the error")
        self.assertEqual(self.errors("refuse"), 1.0)

    @contract
    async def test_health(self) -> None:
        """C{health()} names the backend and says it is healthy once used."""
        await self.store.get("k")
        health = self.store.health()
        self.assertEqual(set(health), {"backend", "healthy", "latency_ms", "errors"})
        self.assertEqual(health["backend"], self.store.backend)
        self.assertEqual((health["healthy"], health["errors"]), (True, 0))
        self.assertIsInstance(health["latency_ms"], float)


class MemoryStoreTests(StoreContract, SynchronousTestCase):
    """The contract, held by L{MemoryStore} on a L{Clock}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000.25)
        self.metrics = Metrics()
        self.store = build_store(StoreConfig(backend="memory"), self.clock, self.metrics)
        self.successResultOf(self.store.connect())

    def tearDown(self) -> None:
        self.successResultOf(self.store.disconnect())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def drive(self, coroutine: Coroutine[Any, Any, None]) -> None:
        self.successResultOf(Deferred.fromCoroutine(coroutine))

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def wall(self) -> float:
        return self.clock.seconds()

    def test_memory_type(self) -> None:
        """C{store.backend: memory} builds a L{MemoryStore}."""
        self.assertIsInstance(self.store, MemoryStore)

    def test_expired_keys_dropped(self) -> None:
        """Keys whose TTL ran out are dropped even if nobody reads them again."""
        store = self.store
        for i in range(100):
            store.set(f"entry-{i}", b"v", ttl=10)
        store.incrby("counter", 1, ttl=20)
        store.set("forever", b"v")
        self.assertEqual(len(store.keys), 102)
        self.clock.advance(15)
        store.set("other", b"v")
        self.assertEqual(len(store.keys), 3)

    def test_time_in_scripts(self) -> None:
        """A script's C{time()} is the injected clock, as C{(seconds, microseconds)}."""
        self.assertEqual(self.successResultOf(self.store.run(CLOCK, [], [])),
                         [1_700_000_000, 250_000])

    def test_script_bug(self) -> None:
        """An exception in a Python twin is the script's error, like a Lua runtime error."""
        broken = Script("broken", "return 1", lambda keys, k, argv: 1 // 0)
        failure = self.failureResultOf(self.store.run(broken, [], []), StoreError)
        self.assertIn("ZeroDivisionError", str(failure.value))

    def test_unknown_backend(self) -> None:
        """A backend other than memory or redis is refused, naming the key."""
        e = self.assertRaises(ValueError, build_store, StoreConfig(backend="etcd"),
                              self.clock, None)
        self.assertIn("store.backend", str(e))


class RedisUrlTests(SynchronousTestCase):
    """L{parse_redis_url} reads C{store.redis.url}."""

    def test_forms(self) -> None:
        """Host, port, database, credentials, TLS and unix sockets."""
        self.assertEqual(parse_redis_url("redis://127.0.0.1:6379/0"), RedisTarget())
        self.assertEqual(parse_redis_url("redis://cache"), RedisTarget("cache"))
        self.assertEqual(
            parse_redis_url("rediss://app:p%40ss@cache.example:6380/3"),
            RedisTarget("cache.example", 6380, None, 3, "app", "p@ss", True),
        )
        self.assertEqual(parse_redis_url("redis://:secret@10.0.0.5/2").password, "secret")
        self.assertEqual(parse_redis_url("unix:///run/redis.sock?db=4&password=pw"),
                         RedisTarget(None, 0, "/run/redis.sock", 4, None, "pw"))

    def test_bad(self) -> None:
        """A URL that cannot be used is refused naming C{store.redis.url}."""
        for url, why in (("redis://cache/zero", "database must be a number"),
                         ("redis://cache:99999/0", "port"),
                         ("unix://", "socket path"),
                         ("http://cache", "redis://")):
            e = self.assertRaises(ValueError, parse_redis_url, url)
            self.assertIn("store.redis.url: ", str(e))
            self.assertIn(why, str(e))

    def test_not_started(self) -> None:
        """A Redis store that was never connected fails calls at once, unavailable."""
        metrics = Metrics()
        store = build_store(StoreConfig(backend="redis"), Clock(), metrics)
        self.assertIsInstance(store, RedisStore)
        self.failureResultOf(store.get("k"), StoreUnavailable)
        self.assertEqual(store.health(), {"backend": "redis", "healthy": False,
                                          "latency_ms": 0.0, "errors": 1})
        self.assertEqual(metrics.registry.get_sample_value(
            "clawproxy_store_errors_total", {"op": "get"}), 1.0)


class RedisHarness:
    """Starts a redis-server and connects stores to it; cleans both up."""

    async def start_redis(self, args: Sequence[str] = ()) -> RedisServer:
        require_redis_server()
        server = RedisServer(reactor, self.mktemp(), args)
        await server.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        return server

    def redis_store(self, url: str, prefix: str = "test:",
                    metrics: Metrics | None = None) -> RedisStore:
        config = StoreConfig("redis", RedisConfig(url=url, prefix=prefix, timeout=TIMEOUT))
        store = build_store(config, reactor, metrics)
        store.connect()
        self.addCleanup(store.disconnect)
        return store

    async def raw(self, port: int, db: int = 0, password: str | None = None) -> Any:
        """A plain txredisapi connection, to look at the server behind the store's back."""
        d = txredisapi.Connection("127.0.0.1", port, dbid=db, reconnect=False,
                                  password=password, charset=None, convertNumbers=False)
        conn = await d.addTimeout(WAIT, reactor)
        self.addCleanup(conn.disconnect)
        return conn

    async def until_works(self, store: IStateStore, deadline: float = WAIT) -> float:
        """Call C{store.now()} until it answers (each call is bounded); the seconds it took."""
        started = reactor.seconds()
        while True:
            try:
                await store.now()
                return reactor.seconds() - started
            except StoreUnavailable:
                if reactor.seconds() - started > deadline:
                    raise
            await deferLater(reactor, 0.05, lambda: None)

    async def advance(self, seconds: float) -> None:
        """Let C{seconds} of real time pass."""
        await deferLater(reactor, seconds, lambda: None)


class RedisStoreCase(RedisHarness):
    """
    A contract's test case on a real redis-server: C{setUp} starts one
    (C{self.server}) and connects C{self.store} to it, waiting until it answers.
    """

    timeout = 60

    def store_metrics(self) -> Metrics | None:
        """The metrics C{self.store} reports to (None: the store's own)."""
        return None

    async def _setUp(self) -> None:
        self.server = await self.start_redis()
        self.store = self.redis_store(self.server.url, metrics=self.store_metrics())
        await self.until_works(self.store)

    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._setUp())

    def wall(self) -> float:
        return time.time()


class RedisStoreTests(RedisStoreCase, StoreContract, TestCase):
    """The contract, held by L{RedisStore} against a real redis-server."""

    def store_metrics(self) -> Metrics:
        self.metrics = Metrics()
        return self.metrics

    def drive(self, coroutine: Coroutine[Any, Any, None]) -> Deferred[None]:
        return Deferred.fromCoroutine(coroutine).addTimeout(WAIT, reactor)


class RedisOnlyTests(RedisHarness, TestCase):
    """What only a Redis store meets: a shared server that loses scripts, dies and hangs."""

    timeout = 60

    @contract
    async def test_same_results_as_memory(self) -> None:
        """The same script, run on a memory store and on Redis, answers the same."""
        server = await self.start_redis()
        redis = self.redis_store(server.url)
        memory = MemoryStore(reactor)
        on_memory = await bucket_sequence(memory, self.advance)
        on_redis = await bucket_sequence(redis, self.advance)
        self.assertEqual(on_redis, on_memory)
        self.assertEqual(on_redis, BUCKET_RESULTS)

    def drive(self, coroutine: Coroutine[Any, Any, None]) -> Deferred[None]:
        return Deferred.fromCoroutine(coroutine).addTimeout(3 * WAIT, reactor)

    @contract
    async def test_script_reloaded_after_flush(self) -> None:
        """
        A script is loaded once and run by hash; after C{SCRIPT FLUSH} (as after
        a restart) the store loads it again on the C{NOSCRIPT} answer.
        """
        server = await self.start_redis()
        store = self.redis_store(server.url)
        raw = await self.raw(server.port)
        self.assertEqual(await raw.script_exists(TOKEN_BUCKET.sha), False)
        self.assertEqual(await store.run(TOKEN_BUCKET, ["b"], [3, 0.001, 1, 60000]), [1, 2])
        self.assertEqual(await raw.script_exists(TOKEN_BUCKET.sha), True)
        await raw.script_flush()
        self.assertEqual(await raw.script_exists(TOKEN_BUCKET.sha), False)
        self.assertEqual(await store.run(TOKEN_BUCKET, ["b"], [3, 0.001, 1, 60000]), [1, 1])
        self.assertEqual(await raw.script_exists(TOKEN_BUCKET.sha), True)

    @contract
    async def test_prefix_and_database(self) -> None:
        """Keys carry C{store.redis.prefix} and live in the URL's database."""
        server = await self.start_redis()
        store = self.redis_store(f"redis://127.0.0.1:{server.port}/3", prefix="gw:")
        await store.set("k", b"v")
        await store.incrby("n", 2, ttl=30)
        in_3 = await self.raw(server.port, db=3)
        in_0 = await self.raw(server.port, db=0)
        self.assertEqual(sorted(await in_3.keys("*")), [b"gw:k", b"gw:n"])
        self.assertEqual(await in_3.get("gw:n"), b"2")
        self.assertEqual(await in_0.keys("*"), [])

    @contract
    async def test_password(self) -> None:
        """The URL's password is sent; a wrong one makes the store unavailable."""
        server = await self.start_redis(["--requirepass", "s3cret"])
        store = self.redis_store(f"redis://:s3cret@127.0.0.1:{server.port}/0")
        await self.until_works(store)
        await store.set("k", b"v")
        self.assertEqual(await store.get("k"), b"v")
        wrong = self.redis_store(f"redis://:guess@127.0.0.1:{server.port}/0")
        started = reactor.seconds()
        with self.assertRaises(StoreUnavailable):
            await wrong.get("k")
        self.assertLess(reactor.seconds() - started, TIMEOUT + 0.3)

    @contract
    async def test_shared_between_gateways(self) -> None:
        """Two stores on one Redis (two gateways) share counters and agree on the time."""
        server = await self.start_redis()
        a, b = self.redis_store(server.url), self.redis_store(server.url)
        self.assertEqual(await a.incrby("hits", 1, ttl=60), 1)
        self.assertEqual(await b.incrby("hits", 1, ttl=60), 2)
        self.assertLess(abs(await a.now() - await b.now()), 0.1)

    @contract
    async def test_killed_and_restarted(self) -> None:
        """
        Redis killed under the store: a call in flight fails with
        L{StoreUnavailable} at once, later calls within the timeout, none
        hangs; the store reports itself unhealthy. Redis restarted on the same
        port: the same store object works again by itself.
        """
        server = await self.start_redis()
        metrics = Metrics()
        store = self.redis_store(server.url, metrics=metrics)
        await self.until_works(store)
        await store.set("k", b"v")

        server.pause()  # so that a call is surely in flight when Redis dies
        in_flight = store.get("k")
        await deferLater(reactor, 0.05, lambda: None)
        killed = reactor.seconds()
        await server.kill()
        with self.assertRaises(StoreUnavailable):
            await in_flight
        self.assertLess(reactor.seconds() - killed, TIMEOUT)

        for op in (lambda: store.get("k"), lambda: store.incrby("n", 1), store.now):
            started = reactor.seconds()
            with self.assertRaises(StoreUnavailable):
                await op()
            self.assertLess(reactor.seconds() - started, TIMEOUT + 0.1)
        health = store.health()
        self.assertFalse(health["healthy"])
        self.assertGreaterEqual(health["errors"], 4)
        self.assertGreaterEqual(metrics.registry.get_sample_value(
            "clawproxy_store_errors_total", {"op": "get"}), 2.0)

        await server.restart()
        await self.until_works(store, deadline=5.0)
        self.assertIsNone(await store.get("k"))  # no persistence: a new, empty Redis
        self.assertEqual(await store.incrby("n", 1), 1)
        self.assertEqual(await store.run(TOKEN_BUCKET, ["b"], [3, 0.001, 1, 60000]), [1, 2])
        self.assertTrue(store.health()["healthy"])

    @contract
    async def test_hung(self) -> None:
        """
        A Redis that accepts but does not answer (stopped): calls fail with
        L{StoreUnavailable} after the timeout, not later; once it answers
        again the store works.
        """
        server = await self.start_redis()
        store = self.redis_store(server.url)
        await self.until_works(store)
        server.pause()
        try:
            for _ in range(3):
                started = reactor.seconds()
                with self.assertRaises(StoreUnavailable):
                    await store.get("k")
                elapsed = reactor.seconds() - started
                self.assertLess(elapsed, TIMEOUT + 0.1)
        finally:
            server.resume()
        await self.until_works(store, deadline=5.0)
        await store.set("k", b"v")
        self.assertEqual(await store.get("k"), b"v")

    @contract
    async def test_cancel(self) -> None:
        """
        A caller that gives up cancels its call: it fails with
        L{CancelledError} at once, is not counted as a store error, and the
        store goes on working.
        """
        server = await self.start_redis()
        metrics = Metrics()
        store = self.redis_store(server.url, metrics=metrics)
        await self.until_works(store)
        server.pause()
        try:
            d = store.get("k")
            d.cancel()
            with self.assertRaises(CancelledError):
                await d
        finally:
            server.resume()
        self.assertEqual(store.health()["errors"], 0)
        self.assertIsNone(metrics.registry.get_sample_value(
            "clawproxy_store_errors_total", {"op": "get"}))
        await store.set("k", b"v")
        self.assertEqual(await store.get("k"), b"v")

    @contract
    async def test_nothing_listening(self) -> None:
        """A store started with no Redis to reach fails calls within the timeout."""
        server = await self.start_redis()
        port = server.port
        await server.stop()
        store = self.redis_store(f"redis://127.0.0.1:{port}/0")
        started = reactor.seconds()
        with self.assertRaises(StoreUnavailable):
            await store.get("k")
        self.assertLess(reactor.seconds() - started, TIMEOUT + 0.1)
        self.assertFalse(store.health()["healthy"])

    @contract
    async def test_disconnect(self) -> None:
        """After C{disconnect()} calls fail at once; C{connect()} again works again."""
        server = await self.start_redis()
        store = self.redis_store(server.url)
        await self.until_works(store)
        await store.disconnect()
        with self.assertRaises(StoreUnavailable):
            await store.get("k")
        store.connect()
        await self.until_works(store)

    @contract
    async def test_latency_recorded(self) -> None:
        """Each answered call is timed into C{clawproxy_store_latency_seconds} and health."""
        server = await self.start_redis()
        metrics = Metrics()
        store = self.redis_store(server.url, metrics=metrics)
        await self.until_works(store)
        get = metrics.registry.get_sample_value
        before = get("clawproxy_store_latency_seconds_count")
        for i in range(10):
            await store.set(f"k{i}", b"v")
        self.assertEqual(get("clawproxy_store_latency_seconds_count"), before + 10)
        health = store.health()
        self.assertTrue(health["healthy"])
        self.assertGreater(health["latency_ms"], 0.0)
        self.assertLess(health["latency_ms"], TIMEOUT * 1000)
