"""
Cache entries and where they live.

Two stores with one interface (every method returns a Deferred):
  - L{MemoryCache}: this process's memory, an LRU bounded by C{max_entries}
    and by C{max_bytes} (the encoded size of each entry), with a lifetime per
    entry on the injected clock;
  - L{SharedCache}: the gateway's L{IStateStore} (Redis: shared by every
    gateway on it). Each entry is a key with a TTL (its lifetime), and an
    index of our own (a sorted set by last use, a hash of sizes, a byte
    counter) bounds the entries and bytes: every store evicts the least
    recently used entries over either bound, atomically (one script). Redis'
    own C{maxmemory} policy stays the operator's backstop for the server as
    a whole.

An entry's lifetime is its route's C{ttl} plus the longest C{max_stale} of
the cache fallbacks, so that a stale answer is still there to fall back on.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from clawproxy.stores.script import Script, ttl_ms


@attrs.frozen
class Entry:
    """
    One cached answer.

    @ivar headers: the response headers kept (C{content-type} and the like).
    @ivar body: the body; for a stream, its SSE events, ending with
        C{data: [DONE]}.
    @ivar model: the model the backend reported answering with.
    @ivar stored: when it was stored (seconds since the epoch).
    @ivar route: the route it was made for, and C{scope}, whose it is (for
        C{DELETE /admin/cache}).
    """

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    model: str | None
    stored: float
    route: str
    scope: str
    stream: bool = False

    def encode(self) -> bytes:
        head = {
            "s": self.status, "h": [[k.decode("latin-1"), v.decode("latin-1")]
                                    for k, v in self.headers],
            "m": self.model, "t": self.stored, "r": self.route, "a": self.scope,
            "x": self.stream,
        }
        return json.dumps(head, separators=(",", ":")).encode() + b"\n" + self.body

    @classmethod
    def decode(cls, data: bytes) -> Entry:
        """@raise ValueError: C{data} is not an encoded entry."""
        head_bytes, sep, body = data.partition(b"\n")
        if not sep:
            raise ValueError("not a cache entry")
        head = json.loads(head_bytes)
        return cls(
            int(head["s"]),
            tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in head["h"]),
            body, head["m"], float(head["t"]), head["r"], head["a"], bool(head["x"]),
        )


class MemoryCache:
    """An LRU of entries in this process, bounded by count and encoded bytes."""

    backend = "memory"

    def __init__(self, clock: IReactorTime, max_entries: int, max_bytes: int) -> None:
        self._clock = clock
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        #: key -> (entry, size, expires)
        self._data: OrderedDict[str, tuple[Entry, int, float]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._data)

    def lookup(self, key: str) -> Entry | None:
        """L{get}, synchronously (the lookup stage's fast path)."""
        item = self._data.get(key)
        if item is None:
            return None
        if self._clock.seconds() > item[2]:
            self._remove(key)
            return None
        self._data.move_to_end(key)
        return item[0]

    def get(self, key: str) -> Deferred[Entry | None]:
        return succeed(self.lookup(key))

    def put(self, key: str, entry: Entry, life: float) -> Deferred[None]:
        size = len(entry.encode())
        if key in self._data:
            self._remove(key)
        if size <= self.max_bytes:
            self._data[key] = (entry, size, self._clock.seconds() + life)
            self.bytes += size
            self.resize(self.max_entries, self.max_bytes)
        return succeed(None)

    def resize(self, max_entries: int, max_bytes: int) -> None:
        """New bounds (a reload): the least recently used go until it fits them."""
        self.max_entries, self.max_bytes = max_entries, max_bytes
        while len(self._data) > max_entries or self.bytes > max_bytes:
            self._remove(next(iter(self._data)))

    def drop(self, route: str | None = None, scope: str | None = None) -> Deferred[int]:
        doomed = [k for k, (e, _, _) in self._data.items()
                  if (route is None or e.route == route) and (scope is None or e.scope == scope)]
        for k in doomed:
            self._remove(k)
        return succeed(len(doomed))

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._data), "bytes": self.bytes}

    def _remove(self, key: str) -> None:
        _, size, _ = self._data.pop(key)
        self.bytes -= size


# -- the shared store's scripts -------------------------------------------------------------
#
# KEYS: [1] the entry (BASE .. hash), [2] the LRU index (sorted set: hash ->
# last use, ms), [3] the metadata hash (hash -> "size\troute\tscope"), [4]
# the byte counter. Evicted entries' keys are BASE .. hash, BASE being
# KEYS[1] less the hash: every key an eviction touches carries the store's
# prefix. The Python twins keep the index as JSON under KEYS[2]
# ({hash: [last_use, size, route, scope]}); the results are the same.

_LUA_FORGET = """
local function forget(h, base)
  local m = redis.call('HGET', KEYS[3], h)
  local size = 0
  if m then size = tonumber(string.match(m, '^(%d+)')) end
  redis.call('ZREM', KEYS[2], h)
  redis.call('HDEL', KEYS[3], h)
  redis.call('DEL', base .. h)
  if size > 0 then
    return redis.call('INCRBY', KEYS[4], -size)
  end
  return tonumber(redis.call('GET', KEYS[4]) or '0')
end
"""

_PUT_LUA = _LUA_FORGET + """
local h = ARGV[1]
local base = string.sub(KEYS[1], 1, #KEYS[1] - #h)
local total = forget(h, base)
local size = #ARGV[2]
local maxn, maxb = tonumber(ARGV[5]), tonumber(ARGV[6])
local evicted = 0
for _, old in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[8])) do
  total = forget(old, base)
end
if size <= maxb then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('ZADD', KEYS[2], ARGV[4], h)
  redis.call('HSET', KEYS[3], h, size .. '\\t' .. ARGV[7])
  total = redis.call('INCRBY', KEYS[4], size)
end
local count = redis.call('ZCARD', KEYS[2])
while count > maxn or total > maxb do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if not oldest then break end
  total = forget(oldest, base)
  count = count - 1
  evicted = evicted + 1
end
return {count, total, evicted}
"""

_GET_LUA = _LUA_FORGET + """
local v = redis.call('GET', KEYS[1])
if v then
  redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[1])
  return v
end
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  forget(ARGV[1], string.sub(KEYS[1], 1, #KEYS[1] - #ARGV[1]))
end
return false
"""

_DROP_LUA = _LUA_FORGET + """
local base = KEYS[1]
local dropped = 0
local all = redis.call('HGETALL', KEYS[3])
for i = 1, #all, 2 do
  local size, route, scope = string.match(all[i + 1], '^(%d+)\\t([^\\t]*)\\t(.*)$')
  if (ARGV[1] == '' or ARGV[1] == route) and (ARGV[2] == '' or ARGV[2] == scope) then
    forget(all[i], base)
    dropped = dropped + 1
  end
end
return {dropped, redis.call('ZCARD', KEYS[2]), tonumber(redis.call('GET', KEYS[4]) or '0')}
"""


def _index(keys: Any, k: Sequence[str]) -> dict[str, list[Any]]:
    raw = keys.get(k[1])
    return json.loads(raw) if raw else {}


def _save(keys: Any, k: Sequence[str], index: dict[str, list[Any]]) -> None:
    keys.set(k[1], json.dumps(index).encode())


def _forget(keys: Any, index: dict[str, list[Any]], h: str, base: str) -> None:
    index.pop(h, None)
    keys.delete(base + h)


def _total(index: dict[str, list[Any]]) -> int:
    return sum(v[1] for v in index.values())


def _put_twin(keys: Any, k: Sequence[str], argv: Sequence[bytes]) -> Any:
    h = argv[0].decode()
    base = k[0][: len(k[0]) - len(h)]
    index = _index(keys, k)
    _forget(keys, index, h, base)
    oldest_allowed = int(argv[7])
    for old in [o for o, v in index.items() if v[0] < oldest_allowed]:
        _forget(keys, index, old, base)
    value = argv[1]
    maxn, maxb = int(argv[4]), int(argv[5])
    if len(value) <= maxb:
        keys.set(k[0], value, int(argv[2]))
        route, _, scope = argv[6].decode().partition("\t")
        index[h] = [int(argv[3]), len(value), route, scope]
    evicted = 0
    while len(index) > maxn or _total(index) > maxb:
        oldest = min(index, key=lambda o: (index[o][0], o))
        _forget(keys, index, oldest, base)
        evicted += 1
    _save(keys, k, index)
    return [len(index), _total(index), evicted]


def _get_twin(keys: Any, k: Sequence[str], argv: Sequence[bytes]) -> Any:
    h = argv[0].decode()
    value = keys.get(k[0])
    index = _index(keys, k)
    if value is not None:
        if h in index:
            index[h][0] = int(argv[1])
            _save(keys, k, index)
        return value
    if h in index:
        _forget(keys, index, h, k[0][: len(k[0]) - len(h)])
        _save(keys, k, index)
    return None


def _drop_twin(keys: Any, k: Sequence[str], argv: Sequence[bytes]) -> Any:
    route, scope = argv[0].decode(), argv[1].decode()
    index = _index(keys, k)
    doomed = [h for h, v in index.items()
              if (not route or route == v[2]) and (not scope or scope == v[3])]
    for h in doomed:
        _forget(keys, index, h, k[0])
    _save(keys, k, index)
    return [len(doomed), len(index), _total(index)]


#: C{put(entry, lru, meta, bytes; hash, value, px, now_ms, max_entries,
#: max_bytes, "route\tscope", oldest_allowed_ms)} -> C{[entries, bytes, evicted]}.
CACHE_PUT = Script("cache_put", _PUT_LUA, _put_twin)
#: C{get(entry, lru, meta, bytes; hash, now_ms)} -> the value or nil (marks it used).
CACHE_GET = Script("cache_get", _GET_LUA, _get_twin)
#: C{drop(base, lru, meta, bytes; route, scope)} ('' = any) -> C{[dropped, entries, bytes]}.
CACHE_DROP = Script("cache_drop", _DROP_LUA, _drop_twin)


class SharedCache:
    """
    Entries in the gateway's L{IStateStore}, shared by every gateway on it,
    bounded by the same C{max_entries} and C{max_bytes} through an index the
    scripts keep (see the module docstring).

    @param longest_life: the longest lifetime an entry may have (index
        members not used for longer are dropped at the next store).
    """

    NS = "cache:"

    def __init__(self, store: Any, clock: IReactorTime, max_entries: int, max_bytes: int,
                 longest_life: float) -> None:
        self.store = store
        self.backend = store.backend
        self._clock = clock
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.longest_life = longest_life
        self._last = {"entries": 0, "bytes": 0}

    def _keys(self, h: str) -> list[str]:
        ns = self.NS
        return [ns + "e:" + h, ns + "lru", ns + "meta", ns + "bytes"]

    def _ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    async def _get(self, key: str) -> Entry | None:
        raw = await self.store.run(CACHE_GET, self._keys(key), [key, self._ms()])
        if raw is None:
            return None
        try:
            return Entry.decode(raw)
        except (ValueError, KeyError, TypeError):
            return None

    def get(self, key: str) -> Deferred[Entry | None]:
        return Deferred.fromCoroutine(self._get(key))

    async def _put(self, key: str, entry: Entry, life: float) -> None:
        now = self._ms()
        oldest = now - int(self.longest_life * 1000)
        count, total, _ = await self.store.run(CACHE_PUT, self._keys(key), [
            key, entry.encode(), ttl_ms(life), now, self.max_entries, self.max_bytes,
            f"{entry.route}\t{entry.scope}", oldest])
        self._last = {"entries": int(count), "bytes": int(total)}

    def put(self, key: str, entry: Entry, life: float) -> Deferred[None]:
        return Deferred.fromCoroutine(self._put(key, entry, life))

    async def _drop(self, route: str | None, scope: str | None) -> int:
        keys = self._keys("")
        dropped, count, total = await self.store.run(CACHE_DROP, keys,
                                                     [route or "", scope or ""])
        self._last = {"entries": int(count), "bytes": int(total)}
        return int(dropped)

    def drop(self, route: str | None = None, scope: str | None = None) -> Deferred[int]:
        return Deferred.fromCoroutine(self._drop(route, scope))

    def stats(self) -> dict[str, int]:
        """The entries and bytes as of the last store or drop (synchronous)."""
        return dict(self._last)
