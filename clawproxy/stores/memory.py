"""
The memory store: one process's state, for a single gateway, development
and tests. Everything runs synchronously, so every script is atomic; the
Deferreds it returns have already fired.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from clawproxy.interfaces import IStateStore
from clawproxy.stores.errors import StoreError
from clawproxy.stores.script import INCRBY, Script, as_reply, encode_arg, ttl_ms
from clawproxy.stores.stats import StoreStats

_NOT_AN_INTEGER = "value is not an integer or out of range"


class MemoryKeys:
    """
    A key space with Redis semantics (the L{clawproxy.stores.script.KeySpace}
    the Python twins of scripts run over), on an injected clock.

    Expired keys vanish when read, and in bulk as time passes: every write
    drops the keys whose time has come, so keys nobody reads again do not
    pile up.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._data: dict[str, tuple[bytes, float | None]] = {}
        self._expiries: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._data)

    def _entry(self, key: str) -> tuple[bytes, float | None] | None:
        entry = self._data.get(key)
        if entry is not None and entry[1] is not None and self._clock.seconds() > entry[1]:
            del self._data[key]
            return None
        return entry

    def _put(self, key: str, value: bytes, expires: float | None) -> None:
        self._data[key] = (value, expires)
        if expires is not None:
            heapq.heappush(self._expiries, (expires, key))

    def sweep(self) -> None:
        """Drop every key whose TTL has run out."""
        now = self._clock.seconds()
        heap = self._expiries
        while heap and heap[0][0] < now:
            expires, key = heapq.heappop(heap)
            entry = self._data.get(key)
            if entry is not None and entry[1] == expires:
                del self._data[key]

    def get(self, key: str) -> bytes | None:
        entry = self._entry(key)
        return None if entry is None else entry[0]

    def set(self, key: str, value: bytes, px: int | None = None) -> None:
        if not isinstance(value, bytes):
            raise StoreError(f"values are bytes, not {type(value).__name__}")
        expires = None if not px else self._clock.seconds() + px / 1000
        self._put(key, value, expires)

    def incrby(self, key: str, amount: int) -> int:
        entry = self._entry(key)
        try:
            value = (0 if entry is None else int(entry[0])) + amount
        except ValueError:
            raise StoreError(_NOT_AN_INTEGER) from None
        self._data[key] = (str(value).encode(), None if entry is None else entry[1])
        return value

    def pttl(self, key: str) -> int:
        entry = self._entry(key)
        if entry is None:
            return -2
        if entry[1] is None:
            return -1
        return max(0, round((entry[1] - self._clock.seconds()) * 1000))

    def pexpire(self, key: str, ms: int) -> int:
        entry = self._entry(key)
        if entry is None:
            return 0
        self._put(key, entry[0], self._clock.seconds() + ms / 1000)
        return 1

    def delete(self, key: str) -> int:
        if self._entry(key) is None:
            return 0
        del self._data[key]
        return 1

    def time(self) -> tuple[int, int]:
        now = self._clock.seconds()
        seconds = int(now)
        return seconds, int((now - seconds) * 1_000_000)


@implementer(IStateStore)
class MemoryStore:
    """
    L{IStateStore} in this process's memory; time is the injected clock.

    @ivar keys: the L{MemoryKeys} holding the data.
    """

    backend = "memory"
    #: This process's own memory: no other process sees it.
    shared = False

    def __init__(self, clock: IReactorTime, metrics: Any = None) -> None:
        self._clock = clock
        self.keys = MemoryKeys(clock)
        self.stats = StoreStats(self.backend, metrics)

    def connect(self) -> Deferred[None]:
        return succeed(None)

    def disconnect(self) -> Deferred[None]:
        return succeed(None)

    def health(self) -> dict[str, Any]:
        return self.stats.health()

    def now(self) -> Deferred[float]:
        return succeed(self._clock.seconds())

    def get(self, key: str) -> Deferred[bytes | None]:
        return self._do("get", self.keys.get, key)

    def set(self, key: str, value: bytes, ttl: float | None = None) -> Deferred[None]:
        if not isinstance(value, bytes):
            raise TypeError(f"values are bytes, not {type(value).__name__}")
        return self._do("set", self.keys.set, key, value, ttl_ms(ttl) or None)

    def incrby(self, key: str, amount: int, ttl: float | None = None) -> Deferred[int]:
        return self.run(INCRBY, [key], [int(amount), ttl_ms(ttl)])

    def delete(self, key: str) -> Deferred[bool]:
        return self._do("delete", lambda k: bool(self.keys.delete(k)), key)

    def run(self, script: Script, keys: Sequence[str],
            args: Sequence[bytes | str | int | float]) -> Deferred[Any]:
        argv = [encode_arg(a) for a in args]
        return self._do(script.name, _run_twin, script, self.keys, list(keys), argv)

    def _do(self, op: str, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.keys.sweep()
        try:
            result = fn(*args)
        except StoreError as e:
            self.stats.failed(op, reachable=True)
            return fail(e)
        return succeed(result)


def _run_twin(script: Script, keys: MemoryKeys, k: list[str], argv: list[bytes]) -> Any:
    """Run a script's Python twin; any error it raises is the script's error, as in Redis."""
    try:
        return as_reply(script.python(keys, k, argv))
    except StoreError:
        raise
    except Exception as e:
        raise StoreError(f"script {script.name} failed: {e!r}") from e
