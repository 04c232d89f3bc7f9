"""
The semantic index kept in the state store, so that every gateway on one
Redis finds the prompts the others cached: the same bands as
L{clawproxy.cache.semantic.SemanticIndex}, one store key per bucket, and
one L{Script} per operation, so a lookup is one round trip.

A bucket key is C{NAMESPACE:HEX}, C{HEX} being the bucket's int
(L{band_keys}: signature, band, bits); its value is one line per entry,
C{SIMHASH_HEX ENTRY_ID}. Every entry of a bucket has the same signature (it
is part of the key), so the guard holds by construction.

Why buckets in the store rather than a local index rebuilt from it: a local
copy would have to follow every other gateway's additions and removals (a
change feed, or a scan on every miss), and a gateway would miss what another
cached a moment ago. Here the store is the index: an addition is seen by the
next lookup of any gateway, and a lookup reads at most C{sum(width + 1)} small
keys inside Redis.

Memory is bounded: a bucket keeps its last L{BUCKET_CAP} entries, and
expires with the longest-lived of them (an entry added with a TTL gives its
buckets at least that TTL). An entry that expired in the cache may still be
named by a lookup until its buckets expire: the caller, finding no entry,
calls L{StoredSemanticIndex.remove} with the fingerprint the lookup returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed

from clawproxy.cache.semantic import (
    DEFAULT_THRESHOLD,
    Fingerprint,
    band_keys,
    max_distance,
    probe_keys,
)
from clawproxy.interfaces import IStateStore
from clawproxy.stores.script import KeySpace, Script, ttl_ms

#: The most entries one bucket keeps (the oldest go first).
BUCKET_CAP = 64


def _lines(blob: bytes | None) -> list[bytes]:
    return [line for line in (blob or b"").split(b"\n") if line]


def _keep_ttl(keys: KeySpace, key: str, value: bytes, ttl: int) -> None:
    """Set C{key}, its TTL the longer of its own and C{ttl} (0: none, kept none)."""
    left = keys.pttl(key)
    if ttl <= 0 or left == -1:
        keys.set(key, value)
    else:
        keys.set(key, value, px=max(left, ttl))


def _add(keys: KeySpace, k: Sequence[str], argv: Sequence[bytes]) -> int:
    record, entry_id = argv[0] + b" " + argv[1], argv[1]
    ttl, cap = int(argv[2]), int(argv[3])
    for key in k:
        kept = [line for line in _lines(keys.get(key)) if line[17:] != entry_id]
        kept.append(record)
        _keep_ttl(keys, key, b"\n".join(kept[-cap:]) + b"\n", ttl)
    return len(k)


#: C{add(bucket keys; simhash hex, entry id, ttl ms, cap)}.
ADD = Script(
    "semantic_add",
    """
local id, ttl, cap = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
for k = 1, #KEYS do
  local kept = {}
  for line in string.gmatch(redis.call('GET', KEYS[k]) or '', '[^\\n]+') do
    if string.sub(line, 18) ~= id then kept[#kept + 1] = line end
  end
  kept[#kept + 1] = ARGV[1] .. ' ' .. id
  local value = table.concat(kept, '\\n', math.max(1, #kept - cap + 1)) .. '\\n'
  local left = redis.call('PTTL', KEYS[k])
  if ttl <= 0 or left == -1 then
    redis.call('SET', KEYS[k], value)
  else
    redis.call('SET', KEYS[k], value, 'PX', math.max(left, ttl))
  end
end
return #KEYS
""",
    _add,
)


def _remove(keys: KeySpace, k: Sequence[str], argv: Sequence[bytes]) -> int:
    removed = 0
    for key in k:
        lines = _lines(keys.get(key))
        kept = [line for line in lines if line[17:] != argv[0]]
        if len(kept) == len(lines):
            continue
        removed += 1
        if not kept:
            keys.delete(key)
        else:
            _keep_ttl(keys, key, b"\n".join(kept) + b"\n", keys.pttl(key))
    return removed


#: C{remove(bucket keys; entry id)}: the number of buckets it was in.
REMOVE = Script(
    "semantic_remove",
    """
local removed = 0
for k = 1, #KEYS do
  local kept, found = {}, false
  for line in string.gmatch(redis.call('GET', KEYS[k]) or '', '[^\\n]+') do
    if string.sub(line, 18) ~= ARGV[1] then kept[#kept + 1] = line else found = true end
  end
  if found then
    removed = removed + 1
    if #kept == 0 then
      redis.call('DEL', KEYS[k])
    else
      local left = redis.call('PTTL', KEYS[k])
      local value = table.concat(kept, '\\n') .. '\\n'
      if left > 0 then
        redis.call('SET', KEYS[k], value, 'PX', left)
      else
        redis.call('SET', KEYS[k], value)
      end
    end
  end
end
return removed
""",
    _remove,
)


def _lookup(keys: KeySpace, k: Sequence[str], argv: Sequence[bytes]) -> Any:
    query = int(argv[0], 16)
    limit, own = int(argv[1]), int(argv[2])
    best: list[Any] | None = None
    best_distance = limit + 1

    def read(bucket_keys: Sequence[str]) -> None:
        nonlocal best, best_distance
        for key in bucket_keys:
            for line in _lines(keys.get(key)):
                distance = (int(line[:16], 16) ^ query).bit_count()
                if distance < best_distance:
                    best, best_distance = [line[17:], distance, line[:16]], distance

    read(k[:own])
    if best_distance > 0:
        read(k[own:])
    return best


#: C{lookup(own bucket keys + neighbour keys; simhash hex, max distance,
#: number of own keys)}: C{[entry id, distance, its simhash hex]} or nil.
LOOKUP = Script(
    "semantic_lookup",
    """
local h1 = tonumber(string.sub(ARGV[1], 1, 8), 16)
local h2 = tonumber(string.sub(ARGV[1], 9, 16), 16)
local limit, own = tonumber(ARGV[2]), tonumber(ARGV[3])
local best, best_distance = false, limit + 1
local function pop(x)
  local c = 0
  while x ~= 0 do
    x = bit.band(x, x - 1)
    c = c + 1
  end
  return c
end
local function read(first, last)
  for k = first, last do
    for line in string.gmatch(redis.call('GET', KEYS[k]) or '', '[^\\n]+') do
      local d = pop(bit.bxor(h1, tonumber(string.sub(line, 1, 8), 16)))
              + pop(bit.bxor(h2, tonumber(string.sub(line, 9, 16), 16)))
      if d < best_distance then
        best, best_distance = {string.sub(line, 18), d, string.sub(line, 1, 16)}, d
      end
    end
  end
end
read(1, own)
if best_distance > 0 then read(own + 1, #KEYS) end
return best
""",
    _lookup,
)


class StoredSemanticIndex:
    """
    L{SemanticIndex} kept in an L{IStateStore} (memory or Redis): entry ids
    are text without newlines; every method returns a Deferred and fails
    with the store's errors (C{StoreUnavailable}, C{StoreError}).

    @ivar namespace: the prefix of the bucket keys (the store adds its own).
    """

    def __init__(self, store: IStateStore, namespace: str = "semantic",
                 bucket_cap: int = BUCKET_CAP) -> None:
        self._store = store
        self.namespace = namespace
        self._cap = bucket_cap

    def _key(self, key: int) -> str:
        return f"{self.namespace}:{key:x}"

    def add(self, entry_id: str, fp: Fingerprint, ttl: float | None = None) -> Deferred[bool]:
        """
        Index C{fp} under C{entry_id} (replacing that id's record in the same
        buckets); its buckets live at least C{ttl} seconds (L{None}: for good).

        @return: Deferred firing with whether it was indexed (not without a
            signature).
        """
        if "\n" in entry_id:
            raise ValueError(f"entry ids cannot hold a newline: {entry_id!r}")
        if not fp.signature:
            return succeed(False)
        keys = [self._key(k) for k in band_keys(fp)]
        d = self._store.run(ADD, keys, [f"{fp.simhash:016x}", entry_id, ttl_ms(ttl),
                                        self._cap])
        return d.addCallback(lambda _: True)

    def remove(self, entry_id: str, fp: Fingerprint) -> Deferred[bool]:
        """
        Drop C{entry_id}, added with C{fp}, from its buckets.
        @return: Deferred firing with whether any bucket held it.
        """
        if not fp.signature:
            return succeed(False)
        keys = [self._key(k) for k in band_keys(fp)]
        return self._store.run(REMOVE, keys, [entry_id]).addCallback(bool)

    def lookup(self, fp: Fingerprint, threshold: float = DEFAULT_THRESHOLD,
               ) -> Deferred[tuple[str, float, Fingerprint] | None]:
        """
        One round trip: the most similar entry within C{threshold} among the
        buckets a lookup reads (see L{SemanticIndex.lookup}).

        @return: Deferred firing with C{(entry_id, similarity, the entry's
            fingerprint)} or L{None}.
        """
        limit = max_distance(threshold)
        if not fp.signature:
            return succeed(None)
        own = [self._key(k) for k in band_keys(fp)]
        probes = [self._key(k) for k in probe_keys(fp)]
        own_set = set(own)
        keys = own + [k for k in probes if k not in own_set]
        d = self._store.run(LOOKUP, keys, [f"{fp.simhash:016x}", limit, len(own)])

        def found(reply: Any) -> tuple[str, float, Fingerprint] | None:
            if reply is None:
                return None
            entry_id, distance, simhash = reply
            return (entry_id.decode("utf-8"), 1.0 - int(distance) / 64,
                    Fingerprint(int(simhash, 16), fp.signature))

        return d.addCallback(found)

