"""
The Redis store: state shared by every gateway that points at one Redis,
through txredisapi.

Each call is bounded by C{store.redis.timeout} on the injected clock and
fails with L{StoreUnavailable} when Redis cannot answer in time; the
connections reconnect by themselves (with a short backoff) once Redis is
back. Scripts are loaded once (C{SCRIPT LOAD}) and run by hash
(C{EVALSHA}); a Redis that lost them (restart, C{SCRIPT FLUSH}) gets them
again on the C{NOSCRIPT} answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from clawproxy.config import RedisConfig
from clawproxy.interfaces import IStateStore
from clawproxy.stores.errors import StoreError, StoreUnavailable
from clawproxy.stores.script import INCRBY, Script, encode_arg, ttl_ms
from clawproxy.stores.stats import StoreStats

#: Error replies that mean Redis cannot serve now (restarting, a long script,
#: a replica after failover, a wrong password), not that the command is wrong.
_UNAVAILABLE = ("LOADING", "BUSY", "MASTERDOWN", "READONLY", "NOAUTH", "WRONGPASS")


@attrs.frozen
class RedisTarget:
    """
    Where a C{store.redis.url} points: C{redis://[user:password@]host[:port][/db]},
    C{rediss://} (TLS) or C{unix:///path?db=N&password=P}.
    """

    host: str | None = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    def __str__(self) -> str:
        where = self.path if self.path is not None else f"{self.host}:{self.port}"
        return f"{where}/{self.db}"


def parse_redis_url(url: str) -> RedisTarget:
    """
    @raise ValueError: naming C{store.redis.url} when C{url} cannot be used.
    """

    def bad(why: str) -> ValueError:
        return ValueError(f"store.redis.url: {why}")

    parts = urlsplit(url)
    query = parse_qs(parts.query)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if "password" in query:
        password = query["password"][-1]
    if parts.scheme == "unix":
        if not parts.path:
            raise bad("a unix:// URL needs a socket path")
        db_text = query.get("db", ["0"])[-1]
        path, host, port = parts.path, None, 0
    elif parts.scheme in ("redis", "rediss"):
        try:
            port = parts.port or 6379
        except ValueError:
            raise bad("the port must be a number from 1 to 65535") from None
        db_text = parts.path.strip("/") or query.get("db", ["0"])[-1]
        path, host = None, parts.hostname or "127.0.0.1"
    else:
        raise bad("must be a redis://, rediss:// or unix:// URL")
    if not db_text.isdigit():
        raise bad(f"the database must be a number, not {db_text!r}")
    return RedisTarget(host, port, path, int(db_text), username, password,
                       parts.scheme == "rediss")


class _Protocol(txredisapi.RedisProtocol):
    """
    Notes when the connection last received anything (on the factory's
    C{clock}), and tells the factory's C{lost} callable when it closes.
    """

    last_received = float("-inf")

    def dataReceived(self, data: bytes, unpause: bool = False) -> Any:
        self.last_received = self.factory.clock.seconds()
        return super().dataReceived(data, unpause)

    def connectionLost(self, why: Failure) -> None:
        try:
            super().connectionLost(why)
        finally:
            self.factory.lost()


@implementer(IStateStore)
class RedisStore:
    """
    L{IStateStore} on a Redis server.

    @param reactor: the reactor the connections use, and the clock that
        bounds each call.
    """

    backend = "redis"
    #: Every gateway (and worker) on the same Redis sees the same state.
    shared = True
    log = Logger()

    #: Connections kept open; commands are pipelined on each.
    poolsize = 2
    #: Seconds between health checks (C{TIME}) while started.
    ping_interval = 5.0
    #: First and largest pause between reconnection attempts, in seconds.
    reconnect_delays = (0.1, 2.0)

    def __init__(self, config: RedisConfig, reactor: Any, metrics: Any = None) -> None:
        self.target = parse_redis_url(config.url)
        self.prefix = config.prefix
        self.timeout = config.timeout
        self.stats = StoreStats(self.backend, metrics)
        self._reactor = reactor
        self._factory: txredisapi.RedisFactory | None = None
        self._ping: LoopingCall | None = None
        self._loaded: set[str] = set()
        # A connection was lost or a call found Redis unreachable: while no
        # connection is up, fail at once instead of waiting out the timeout.
        self._down = False

    # -- life cycle

    def connect(self) -> Deferred[None]:
        if self._factory is not None:
            return succeed(None)
        t = self.target
        factory = txredisapi.RedisFactory(
            str(t), t.db or None, self.poolsize, isLazy=True, charset=None,
            password=t.password, username=t.username, convertNumbers=False,
        )
        factory.initialDelay, factory.maxDelay = self.reconnect_delays
        factory.protocol, factory.clock, factory.lost = _Protocol, self._reactor, self._lost
        # Fires once the pool is complete, or fails for good (a wrong
        # password): txredisapi stops trying then, and calls fail unavailable.
        factory.deferred.addErrback(self._gave_up)
        factory.startConnecting(self._endpoint())
        self._factory = factory
        self._down = False
        self._ping = LoopingCall(self._check)
        self._ping.clock = self._reactor
        self._ping.start(self.ping_interval, now=True).addErrback(
            lambda f: self.log.failure("store health check stopped", f))
        return succeed(None)

    def _lost(self) -> None:
        """A connection closed: until one is back, calls fail at once."""
        self._down = True

    def _gave_up(self, failure: Failure) -> None:
        self.log.error("giving up on Redis at {target}: {why}", target=str(self.target),
                       why=failure.getErrorMessage())

    def _endpoint(self) -> Any:
        t, timeout = self.target, max(1.0, self.timeout)
        if t.path is not None:
            return UNIXClientEndpoint(self._reactor, t.path, timeout=timeout)
        endpoint = HostnameEndpoint(self._reactor, t.host, t.port, timeout=timeout)
        if t.tls:
            endpoint = wrapClientTLS(optionsForClientTLS(t.host), endpoint)
        return endpoint

    def disconnect(self) -> Deferred[None]:
        factory, self._factory = self._factory, None
        if self._ping is not None and self._ping.running:
            self._ping.stop()
        self._ping = None
        if factory is None:
            return succeed(None)
        d = factory.disconnect()
        d.addTimeout(max(1.0, self.timeout), self._reactor)
        d.addErrback(lambda f: self.log.warn("Redis connections did not close: {why}",
                                             why=f.getErrorMessage()))
        return d

    def health(self) -> dict[str, Any]:
        health = self.stats.health()
        factory = self._factory
        health["healthy"] = bool(health["healthy"] and factory is not None and factory.size)
        return health

    def _check(self) -> Deferred[None]:
        """One health check: C{TIME}, timed and counted like any call."""
        d = self._call("ping", lambda conn: conn.execute_command("TIME"))
        return d.addCallbacks(lambda _: None, self._check_failed)

    def _check_failed(self, failure: Failure) -> None:
        if not failure.check(StoreError):  # already counted; anything else is a bug
            self.log.failure("store health check failed", failure)

    # -- IStateStore

    def now(self) -> Deferred[float]:
        d = self._call("now", lambda conn: conn.execute_command("TIME"))
        return d.addCallback(lambda t: int(t[0]) + int(t[1]) / 1_000_000)

    def get(self, key: str) -> Deferred[bytes | None]:
        k = self.prefix + key
        return self._call("get", lambda conn: conn.execute_command("GET", k))

    def set(self, key: str, value: bytes, ttl: float | None = None) -> Deferred[None]:
        if not isinstance(value, bytes):
            raise TypeError(f"values are bytes, not {type(value).__name__}")
        k, ms = self.prefix + key, ttl_ms(ttl)
        args = ("SET", k, value, "PX", ms) if ms else ("SET", k, value)
        d = self._call("set", lambda conn: conn.execute_command(*args))
        return d.addCallback(lambda _: None)

    def incrby(self, key: str, amount: int, ttl: float | None = None) -> Deferred[int]:
        return self.run(INCRBY, [key], [int(amount), ttl_ms(ttl)])

    def delete(self, key: str) -> Deferred[bool]:
        k = self.prefix + key
        d = self._call("delete", lambda conn: conn.execute_command("DEL", k))
        return d.addCallback(bool)

    def run(self, script: Script, keys: Sequence[str],
            args: Sequence[bytes | str | int | float]) -> Deferred[Any]:
        k = [self.prefix + key for key in keys]
        argv = [encode_arg(a) for a in args]

        async def load_and_run(conn: Any) -> Any:
            await self._load(conn, script)
            return await conn.evalsha(script.sha, k, argv)

        def reloaded(failure: Failure, conn: Any) -> Any:
            # Redis restarted or was told SCRIPT FLUSH since we loaded it.
            failure.trap(txredisapi.ScriptDoesNotExist)
            self._loaded.discard(script.sha)
            return Deferred.fromCoroutine(load_and_run(conn))

        def send(conn: Any) -> Deferred[Any]:
            # Plain callbacks once the script is loaded: this runs per request.
            if script.sha not in self._loaded:
                return Deferred.fromCoroutine(load_and_run(conn))
            return conn.evalsha(script.sha, k, argv).addErrback(reloaded, conn)

        return self._call(script.name, send)

    async def _load(self, conn: Any, script: Script) -> None:
        sha = await conn.script_load(script.lua)
        if (sha.decode() if isinstance(sha, bytes) else sha) != script.sha:
            raise StoreError(f"Redis named script {script.name} {sha!r}, not {script.sha}")
        self._loaded.add(script.sha)

    # -- one bounded call

    def _call(self, op: str, send: Callable[[Any], Deferred[Any]]) -> Deferred[Any]:
        """
        Run C{send(connection)} on a pooled connection, bounded by the timeout
        (the wait for a connection included), timed and counted.

        Plain callbacks rather than a coroutine: this runs for every call on
        the data plane, and each coroutine layer costs as much as the rest.
        """
        factory, clock = self._factory, self._reactor
        if factory is None:
            self._unreachable(op)
            return fail(StoreUnavailable(f"store {op}: the Redis store is not started"))
        if self._down and not factory.size:
            self._unreachable(op)
            return fail(StoreUnavailable(f"store {op}: no connection to Redis at {self.target}"))
        started = clock.seconds()
        used: list[Any] = []

        def connected(conn: Any) -> Deferred[Any]:
            used.append(conn)
            return send(conn)

        d = factory.getConnection(peek=True)
        d.addCallback(connected)
        d.addTimeout(self.timeout, clock)
        d.addCallbacks(self._answered, self._failed, (started,), None, (op, started, used))
        return d

    def _answered(self, result: Any, started: float) -> Any:
        self._down = False
        self.stats.succeeded(self._reactor.seconds() - started)
        return result

    def _failed(self, failure: Failure, op: str, started: float, used: list[Any]) -> Failure:
        e = failure.value
        if isinstance(e, defer.TimeoutError):
            # A connection that has received nothing since this call began
            # may be dead without knowing it (a host gone, a half-open
            # socket): drop it and let the pool reconnect. One that is busy
            # answering (a burst of calls) is kept.
            for conn in used:
                if (conn.transport is not None and conn.connected
                        and conn.last_received < started):
                    conn.transport.abortConnection()
            self._unreachable(op)
            return Failure(StoreUnavailable(
                f"store {op}: no answer from Redis at {self.target} within {self.timeout}s"))
        if isinstance(e, txredisapi.ConnectionError) or (
                isinstance(e, txredisapi.RedisError) and str(e).startswith(_UNAVAILABLE)):
            self._unreachable(op)
            return Failure(StoreUnavailable(f"store {op}: Redis at {self.target}: {e}"))
        if isinstance(e, txredisapi.RedisError):
            self.stats.failed(op, reachable=True, seconds=self._reactor.seconds() - started)
            return Failure(StoreError(f"store {op}: {e}"))
        return failure  # CancelledError (the caller gave up), or a bug

    def _unreachable(self, op: str) -> None:
        self._down = True
        self.stats.failed(op, reachable=False)

