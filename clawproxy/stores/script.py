"""
Atomic scripts: one Lua source for Redis and an equivalent Python function
for the memory store, so a feature states its atomic step once per backend
and the contract tests hold the two to the same results.

A script sees C{KEYS} (text) and C{ARGV} (bytes, as Redis passes them: an
int C{3} arrives as C{b"3"}), and returns what Redis can return from Lua:
an int, bytes, L{None} or a list of these. Lua numbers are truncated to
integers on the way out, so return fractions as strings. In Redis the keys
carry C{store.redis.prefix}; scripts must not build key names of their own.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs


class KeySpace(Protocol):
    """
    What the Python twin of a script may do: each method mirrors the Redis
    command of the same name (as C{redis.call} would run it).
    """

    def get(self, key: str) -> bytes | None: ...

    def set(self, key: str, value: bytes, px: int | None = None) -> None: ...

    def incrby(self, key: str, amount: int) -> int: ...

    def pttl(self, key: str) -> int:
        """Milliseconds left; C{-1} without TTL, C{-2} when absent."""

    def pexpire(self, key: str, ms: int) -> int: ...

    def delete(self, key: str) -> int: ...

    def time(self) -> tuple[int, int]:
        """The store's time as C{(seconds, microseconds)}, like C{TIME}."""


@attrs.frozen
class Script:
    """
    An atomic step over a few keys.

    @ivar name: short identifier, the C{op} label of the store metrics.
    @ivar lua: the source run by Redis (C{EVALSHA}).
    @ivar python: C{python(keys: KeySpace, KEYS, ARGV)}, the same step for the
        memory store.
    @ivar sha: the SHA1 of C{lua}, as Redis names the loaded script.
    """

    name: str
    lua: str
    python: Callable[[KeySpace, Sequence[str], Sequence[bytes]], Any]
    sha: str = attrs.field(init=False)

    @sha.default
    def _sha(self) -> str:
        return hashlib.sha1(self.lua.encode()).hexdigest()

    def __attrs_post_init__(self) -> None:
        _BY_SHA.setdefault(self.sha, self)


#: Every script made in this process, by SHA1 (a worker names the script its
#: parent runs for it by its SHA1: L{clawproxy.stores.amp}).
_BY_SHA: dict[str, Script] = {}


def script_by_sha(sha: str) -> Script | None:
    """The script with Lua source of SHA1 C{sha} made in this process, if any."""
    return _BY_SHA.get(sha)


def encode_arg(value: bytes | str | int | float) -> bytes:
    """One script argument as Redis receives it."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        raise TypeError("script arguments cannot be bool; pass 0 or 1")
    if isinstance(value, (int, float)):
        return repr(value).encode()
    raise TypeError(f"script arguments are bytes, str, int or float, not {type(value).__name__}")


def as_reply(value: Any) -> Any:
    """
    Convert what a Python twin returned the way Redis converts a Lua value:
    C{True} is 1, C{False} and L{None} are nil, numbers are truncated to
    integers, text becomes bytes. L{None} in a list stays in place, as a Lua
    C{false} (what C{redis.call('GET')} gives for an absent key) does; a
    real Lua C{nil} would end the table there, so Lua sources must not put
    one in a table.
    """
    if value is None or value is False:
        return None
    if value is True:
        return 1
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return math.trunc(value)
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes):
        return value
    if isinstance(value, (list, tuple)):
        return [as_reply(item) for item in value]
    raise TypeError(f"a script cannot return {type(value).__name__}")


def ttl_ms(ttl: float | None) -> int:
    """A TTL in seconds as whole milliseconds (rounded up), C{0} for none."""
    if ttl is None:
        return 0
    if not ttl > 0:
        raise ValueError(f"ttl must be > 0 seconds, not {ttl!r}")
    return max(1, math.ceil(ttl * 1000))


def _incrby(keys: KeySpace, k: Sequence[str], argv: Sequence[bytes]) -> int:
    value = keys.incrby(k[0], int(argv[0]))
    ttl = int(argv[1])
    if ttl > 0 and keys.pttl(k[0]) == -1:
        keys.pexpire(k[0], ttl)
    return value


#: C{incrby(key, amount, ttl_ms)}: add to a counter; a counter left without a
#: TTL (just created) gets C{ttl_ms} when it is > 0.
INCRBY = Script(
    "incrby",
    """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
local ttl = tonumber(ARGV[2])
if ttl > 0 and redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return value
""",
    _incrby,
)
