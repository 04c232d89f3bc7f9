"""
Token and spend budgets with reserve and settle (pure: the store scripts).

A budget is a fixed window of the store's time (C{100000/minute}: one
counter per minute, the same on every gateway sharing the store). Before a
call, L{RESERVE} adds the call's worst case (prompt estimate + completion
cap) to every budget of the agent at once, or to none; when the call ends,
L{SETTLE} replaces the reservation by what the call used (nothing for a call
that failed). Both are one atomic script, so concurrent requests, on one
gateway or on several sharing Redis, cannot both take the last part of a
budget.

A reservation is admitted when it fits what is left of the window, or when
the window is still untouched (so a budget smaller than one request's
reservation lets one request through per window instead of none): a window
never lets through more than its budget plus one reservation.

A counter's value is C{"WINDOW USED"} (window number, amount used); it
expires when its window ends. Amounts are integers: tokens, or millionths
of the currency for spend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from clawproxy.stores.script import KeySpace, Script

#: Spend is counted in millionths of the currency of C{models.prices}.
SPEND_SCALE = 1_000_000

#: Milliseconds a counter outlives its window (a settle that comes late still finds it).
_GRACE_MS = 60_000

_RESERVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local wins = {}
local used = {}
for i = 1, #KEYS do
  local period = tonumber(ARGV[3 * i - 2])
  local limit = tonumber(ARGV[3 * i - 1])
  local amount = tonumber(ARGV[3 * i])
  local win = math.floor(now / period)
  local u = 0
  local v = redis.call('GET', KEYS[i])
  if v then
    local w, x = string.match(v, '^(%d+) (%d+)$')
    if w and tonumber(w) == win then u = tonumber(x) end
  end
  if u > 0 and u + amount > limit then
    return {0, i, (win + 1) * period - now, u}
  end
  wins[i] = win
  used[i] = u
end
local out = {1}
for i = 1, #KEYS do
  local period = tonumber(ARGV[3 * i - 2])
  local amount = tonumber(ARGV[3 * i])
  local ttl = (wins[i] + 1) * period - now + tonumber(ARGV[3 * #KEYS + 1])
  redis.call('SET', KEYS[i], string.format('%d %d', wins[i], used[i] + amount), 'PX', ttl)
  out[i + 1] = wins[i]
end
return out
"""


def _now_ms(keys: KeySpace) -> int:
    sec, usec = keys.time()
    return sec * 1000 + usec // 1000


def _parse(value: bytes | None) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = value.split(b" ")
    if len(parts) != 2 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    return int(parts[0]), int(parts[1])


def _reserve(keys: KeySpace, k: Sequence[str], argv: Sequence[bytes]) -> list[int]:
    now = _now_ms(keys)
    n = len(k)
    wins, used = [], []
    for i in range(n):
        period, limit, amount = (int(float(a)) for a in argv[3 * i:3 * i + 3])
        win = now // period
        u = 0
        parsed = _parse(keys.get(k[i]))
        if parsed is not None and parsed[0] == win:
            u = parsed[1]
        if u > 0 and u + amount > limit:
            return [0, i + 1, (win + 1) * period - now, u]
        wins.append(win)
        used.append(u)
    grace = int(argv[3 * n])
    out = [1]
    for i in range(n):
        period, amount = int(float(argv[3 * i])), int(float(argv[3 * i + 2]))
        ttl = (wins[i] + 1) * period - now + grace
        keys.set(k[i], b"%d %d" % (wins[i], used[i] + amount), ttl)
        out.append(wins[i])
    return out


#: C{reserve(KEYS, [period_ms, limit, amount]... , grace_ms)}: add each
#: C{amount} to its key's window if every one fits (see the module doc).
#: Returns C{[1, window...]} (the windows the amounts went to, for
#: L{SETTLE}) or C{[0, i, retry_after_ms, used]} for the first budget C{i}
#: (1-based) that has no room.
RESERVE = Script("budget_reserve", _RESERVE_LUA, _reserve)

_SETTLE_LUA = """
for i = 1, #KEYS do
  local win = tonumber(ARGV[2 * i - 1])
  local delta = tonumber(ARGV[2 * i])
  local v = redis.call('GET', KEYS[i])
  if v then
    local w, x = string.match(v, '^(%d+) (%d+)$')
    if w and tonumber(w) == win then
      local ttl = redis.call('PTTL', KEYS[i])
      local u = math.max(0, tonumber(x) + delta)
      if ttl > 0 then
        redis.call('SET', KEYS[i], string.format('%d %d', win, u), 'PX', ttl)
      end
    end
  end
end
return 1
"""


def _settle(keys: KeySpace, k: Sequence[str], argv: Sequence[bytes]) -> int:
    for i, key in enumerate(k):
        win, delta = int(argv[2 * i]), int(argv[2 * i + 1])
        parsed = _parse(keys.get(key))
        if parsed is not None and parsed[0] == win:
            ttl = keys.pttl(key)
            if ttl > 0:
                keys.set(key, b"%d %d" % (win, max(0, parsed[1] + delta)), ttl)
    return 1


#: C{settle(KEYS, [window, delta]...)}: add C{delta} (negative to give back)
#: to each key that still counts the given window (a window that has ended
#: is left alone).
SETTLE = Script("budget_settle", _SETTLE_LUA, _settle)


def reserve_args(budgets: Sequence[tuple[float, float, int]]) -> list[Any]:
    """
    The C{ARGV} of L{RESERVE} for C{(period_seconds, limit, amount)} triples
    (limits and amounts in counter units).
    """
    args: list[Any] = []
    for period, limit, amount in budgets:
        args += [int(period * 1000), int(limit), int(amount)]
    args.append(_GRACE_MS)
    return args


def used_in(value: bytes | None, period: float, now: float) -> int:
    """What a counter's value says was used in the window of C{now} (0 if another)."""
    parsed = _parse(value)
    if parsed is None or parsed[0] != int(now * 1000) // int(period * 1000):
        return 0
    return parsed[1]
