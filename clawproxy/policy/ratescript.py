"""
Every rate limit that applies to a request, decided in one atomic store
call: the L{LIMITS} script (Lua for Redis, L{clawproxy.policy.limits} itself
for the memory store) reads each limit's state, decides them all on the
store's clock (C{TIME}, so gateways with skewed clocks agree) and, only if
every one allows the request, takes from each and writes them back with a
TTL. One round trip per request, however many limits apply.

One call may decide several requests (a batch), in order, each one all or
nothing. C{KEYS}: one per limit, request after request. C{ARGV}: the cost,
the number of requests, how many limits each has, then per limit its
algorithm, count, period and capacity. The reply is, per request, C{[allowed,
n, then per limit: allowed, limit, remaining, reset_ms, retry_ms]}
(C{retry_ms} is C{-1} for a request that no wait would let through).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from clawproxy.policy.limits import Decision, Limit, Outcome, decode_state, encode_state, evaluate
from clawproxy.stores.script import KeySpace, Script

_LUA = """
local EPS = 1e-9
local cost = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

local function parse(raw, size)
  if not raw then return nil end
  local v = {}
  for x in string.gmatch(raw, '[^ ]+') do
    local num = tonumber(x)
    if num == nil then return nil end
    v[#v + 1] = num
  end
  if #v ~= size then return nil end
  return v
end

local function token_bucket(s, rate, capacity)
  local tokens = capacity
  if s then tokens = math.min(capacity, s[1] + math.max(0, now - s[2]) * rate) end
  local allowed = tokens + EPS >= cost
  local retry = 0
  if allowed then
    tokens = math.max(0, tokens - cost)
  elseif cost > capacity then
    retry = math.huge
  else
    retry = (cost - tokens) / rate
  end
  return allowed, {tokens, now}, math.floor(capacity), math.floor(tokens + EPS),
         (capacity - tokens) / rate, retry
end

local function fixed_window(s, count, period)
  local window = math.floor(now / period)
  local used = 0
  if s and s[1] == window then used = s[2] end
  local reset = (window + 1) * period - now
  local allowed = used + cost <= count + EPS
  local retry = 0
  if allowed then
    used = used + cost
  elseif cost <= count then
    retry = reset
  else
    retry = math.huge
  end
  return allowed, {window, used}, math.floor(count),
         math.max(0, math.floor(count - used + EPS)), reset, retry
end

local function sliding_window(s, count, period)
  local window = math.floor(now / period)
  local used, previous = 0, 0
  if s then
    if s[1] == window then
      used, previous = s[2], s[3]
    elseif s[1] == window - 1 then
      previous = s[2]
    end
  end
  local elapsed = now - window * period
  local estimate = previous * (1 - elapsed / period) + used
  local allowed = estimate + cost <= count + EPS
  local retry = 0
  if allowed then
    used = used + cost
    estimate = estimate + cost
  elseif cost > count then
    retry = math.huge
  elseif used + cost > count + EPS then
    retry = period - elapsed + math.max(0, period * (1 - (count - cost) / used))
  else
    retry = math.max(0, period * (1 - (count - used - cost) / previous) - elapsed)
  end
  local reset = 0
  if used > 0 then
    reset = 2 * period - elapsed
  elseif previous > 0 then
    reset = period - elapsed
  end
  return allowed, {window, used, previous}, math.floor(count),
         math.max(0, math.floor(count - estimate + EPS)), reset, retry
end

local ngroups = tonumber(ARGV[2])
local a = 2 + ngroups
local k = 0
local out = {}
for g = 1, ngroups do
  local n = tonumber(ARGV[2 + g])
  local all = 1
  local writes, res = {}, {}
  for i = 1, n do
    local algo = ARGV[a + 1]
    local count, period, capacity = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]),
                                    tonumber(ARGV[a + 4])
    a = a + 4
    local raw = redis.call('GET', KEYS[k + i])
    local allowed, state, limit, remaining, reset, retry, ttl
    if algo == 'token_bucket' then
      allowed, state, limit, remaining, reset, retry =
        token_bucket(parse(raw, 2), count / period, capacity)
      ttl = capacity * period / count + 1
    elseif algo == 'fixed_window' then
      allowed, state, limit, remaining, reset, retry = fixed_window(parse(raw, 2), count, period)
      ttl = period + 1
    else
      allowed, state, limit, remaining, reset, retry = sliding_window(parse(raw, 3), count, period)
      ttl = 2 * period + 1
    end
    if not allowed then all = 0 end
    local parts = {}
    for j = 1, #state do parts[j] = string.format('%.17g', state[j]) end
    writes[i] = {table.concat(parts, ' '), math.ceil(ttl * 1000)}
    local retry_ms = -1
    if retry ~= math.huge then retry_ms = math.ceil(retry * 1000) end
    res[#res + 1] = allowed and 1 or 0
    res[#res + 1] = limit
    res[#res + 1] = remaining
    res[#res + 1] = math.ceil(reset * 1000)
    res[#res + 1] = retry_ms
  end
  out[#out + 1] = all
  out[#out + 1] = n
  for j = 1, #res do out[#out + 1] = res[j] end
  if all == 1 then
    for i = 1, n do
      redis.call('SET', KEYS[k + i], writes[i][1], 'PX', writes[i][2])
    end
  end
  k = k + n
end
return out
"""


def _ms(seconds: float) -> int:
    return -1 if math.isinf(seconds) else math.ceil(seconds * 1000)


def apply(keys: KeySpace, limits: Sequence[Limit], cost: float = 1.0) -> Outcome:
    """
    What L{LIMITS} does, over a memory key space: decide C{limits} on the
    store's clock and, when all allow, write each one's new state with its TTL.
    """
    seconds, micros = keys.time()
    now = seconds + micros / 1000000
    states = [decode_state(keys.get(limit.key), limit.algorithm) for limit in limits]
    outcome = evaluate(limits, states, now, cost)
    if outcome.allowed:
        for limit, d in zip(limits, outcome.decisions):
            keys.set(limit.key, encode_state(d.state), px=math.ceil(limit.ttl * 1000))
    return outcome


def _twin(keys: KeySpace, k: Sequence[str], argv: Sequence[bytes]) -> list[int]:
    cost, ngroups = float(argv[0]), int(argv[1])
    a, first = 2 + ngroups, 0
    out: list[int] = []
    for g in range(ngroups):
        n = int(argv[2 + g])
        limits = []
        for i in range(n):
            limits.append(Limit("", k[first + i], argv[a].decode(), float(argv[a + 1]),
                                float(argv[a + 2]), float(argv[a + 3])))
            a += 4
        first += n
        outcome = apply(keys, limits, cost)
        out += [int(outcome.allowed), n]
        for d in outcome.decisions:
            out += [int(d.allowed), d.limit, d.remaining, _ms(d.reset), _ms(d.retry_after)]
    return out


#: Decide (and, when every one allows, take from) a request's limits at once.
LIMITS = Script("rate_limits", _LUA, _twin)


def script_args(limits: Sequence[Limit], cost: float = 1.0) -> tuple[list[str], list[Any]]:
    """The C{KEYS} and C{ARGV} of L{LIMITS} for one request's C{limits}."""
    return batch_args([limits], cost)


def batch_args(groups: Sequence[Sequence[Limit]],
               cost: float = 1.0) -> tuple[list[str], list[Any]]:
    """
    The C{KEYS} and C{ARGV} of L{LIMITS} deciding several requests in one
    call, in order: each group (one request's limits) is all or nothing, and
    sees what the groups before it took.
    """
    keys: list[str] = []
    argv: list[Any] = [cost, len(groups)]
    argv += [len(limits) for limits in groups]
    for limits in groups:
        for limit in limits:
            keys.append(limit.key)
            argv += limit.args
    return keys, argv


def parse_batch(reply: Sequence[int]) -> list[Outcome]:
    """The L{Outcome}s of a L{LIMITS} reply, one per group (states are not returned)."""
    outcomes = []
    i = 0
    while i < len(reply):
        allowed, n = int(reply[i]), int(reply[i + 1])
        i += 2
        decisions = []
        for _ in range(n):
            ok, limit, remaining, reset_ms, retry_ms = (int(x) for x in reply[i:i + 5])
            i += 5
            retry = math.inf if retry_ms < 0 else retry_ms / 1000
            decisions.append(Decision(bool(ok), (), limit, remaining, reset_ms / 1000, retry))
        outcomes.append(Outcome(bool(allowed), tuple(decisions)))
    return outcomes


def parse_reply(reply: Sequence[int]) -> Outcome:
    """The L{Outcome} of a one-request L{LIMITS} reply."""
    return parse_batch(reply)[0]
