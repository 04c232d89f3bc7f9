"""
Which breaker board a data plane uses, and breakers shared by the gateways
on one Redis store.

Gateways sharing a store count their failures together and publish every
opening there, so one sick backend is found once, not once per gateway:

  - each failure a closed breaker sees is also added, with the store's own
    time, to the breaker's shared list of recent failures (L{FAIL}); the
    C{failure_threshold}-th within C{failure_window}, from any gateway,
    opens the breaker in the store (a key that lives for the open period);
  - a breaker that opens locally (its own count, or a failed half-open
    probe) publishes its open period the same way;
  - every answer of the store, and a read of all the board's breakers at
    most once a second (L{READ_INTERVAL}, when requests come), opens the
    local breakers the store says are open, until the store's time is up.
    The attempt that finds a read due waits for it (see
    L{SharedBreakerBoard.admit}), so an idle gateway does not send its next
    request to a backend whose breaker another gateway opened meanwhile.

The decision for a request stays local and synchronous (the breaker
objects of L{clawproxy.policy.breakers}); the store only feeds them. After
its open period each gateway probes half-open by itself, and a failed
probe anywhere reopens the breaker for all. A success of a pool (whose
breaker counts failures with no success in between) clears the pool's
shared count. Store calls never hold or fail a request: when the store
cannot answer, the breakers go on with this gateway's own counts (logged
once, and once more when the store answers again).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from clawproxy.interfaces import CANCELLED, OK
from clawproxy.policy.breakers import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    Breaker,
    BreakerBoard,
    NoBreakers,
    board_outcome,
)
from clawproxy.stores.script import KeySpace, Script

#: Seconds between two reads of the shared state (while requests come).
READ_INTERVAL = 1.0

#: A shared open period whose end is this close (seconds) to the end of the
#: one this gateway published is taken to be that one.
_OWN = 0.5


def _now_ms(keys: KeySpace) -> int:
    sec, usec = keys.time()
    return sec * 1000 + usec // 1000


def _fail(keys: KeySpace, k: Sequence[str], argv: Sequence[bytes]) -> list[int]:
    threshold, window, open_ms, force = (int(a) for a in argv)
    if force:
        keys.set(k[1], b"1", open_ms)
        keys.delete(k[0])
        return [1, open_ms, 0]
    left = keys.pttl(k[1])
    if left > 0:
        return [1, left, 0]
    now = _now_ms(keys)
    raw = keys.get(k[0])
    kept = [t for t in (raw.split(b",") if raw else ()) if t and int(t) > now - window]
    kept.append(str(now).encode())
    if len(kept) >= threshold:
        keys.set(k[1], b"1", open_ms)
        keys.delete(k[0])
        return [1, open_ms, len(kept)]
    keys.set(k[0], b",".join(kept), window)
    return [0, 0, len(kept)]


#: C{FAIL([fails, open], [threshold, window_ms, open_ms, force])}: count one
#: failure (or, with C{force} 1, publish an opening). Answers C{[open,
#: ms_left, failures]}: C{open} 1 when the breaker is open in the store.
FAIL = Script(
    "breaker_fail",
    """
local threshold = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local open_ms = tonumber(ARGV[3])
if ARGV[4] == '1' then
  redis.call('SET', KEYS[2], '1', 'PX', open_ms)
  redis.call('DEL', KEYS[1])
  return {1, open_ms, 0}
end
local left = redis.call('PTTL', KEYS[2])
if left > 0 then
  return {1, left, 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local kept = {}
local raw = redis.call('GET', KEYS[1])
if raw then
  for s in string.gmatch(raw, '[^,]+') do
    local ts = tonumber(s)
    if ts and ts > now - window then
      kept[#kept + 1] = s
    end
  end
end
kept[#kept + 1] = string.format('%d', now)
if #kept >= threshold then
  redis.call('SET', KEYS[2], '1', 'PX', open_ms)
  redis.call('DEL', KEYS[1])
  return {1, open_ms, #kept}
end
redis.call('SET', KEYS[1], table.concat(kept, ','), 'PX', window)
return {0, 0, #kept}
""",
    _fail,
)


def _read(keys: KeySpace, k: Sequence[str], argv: Sequence[bytes]) -> list[int]:
    return [keys.pttl(key) for key in k]


#: C{READ(keys)}: milliseconds left of each key (C{-2} when absent): of each
#: breaker's shared open period, and of each pool's shared failure count.
READ = Script(
    "breaker_read",
    """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('PTTL', key)
end
return out
""",
    _read,
)


def fails_key(name: str) -> str:
    return f"breaker:{name}:fails"


def open_key(name: str) -> str:
    return f"breaker:{name}:open"


class SharedBreakerBoard(BreakerBoard):
    """
    A L{BreakerBoard} whose breakers also count failures in, and take
    openings from, a state store shared with other gateways (see the
    module docstring).
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, metrics: Any = None, random: Any = None,
                 store: Any = None) -> None:
        super().__init__(clock, metrics, random)
        self.store = store
        self.on_transition = self._moved_shared
        self._adopting = False
        self._next_read = 0.0
        self._reading = False
        self._store_ok = True
        #: Pool breakers with failures counted in the store (a success clears them).
        self._shared_counts: set[str] = set()
        #: Breaker name -> when the open period this gateway published ends.
        self._published: dict[str, float] = {}

    # -- the availability policy, fed by the store -----------------------------

    def admit(self, instance: Any) -> bool | Deferred[bool]:
        """
        As L{BreakerBoard.admit}; when a read of the shared state is due and
        the store has been answering, the first attempt after it waits for
        the read (one store round trip, at most once per L{READ_INTERVAL}),
        so a gateway does not send a request to a backend whose breaker
        another gateway opened since.
        """
        read = self._maybe_read()
        # (Not read.called: a Deferred paused on an inner one is "called".)
        if read is None or not self._reading or not self._store_ok:
            return BreakerBoard.admit(self, instance)
        done: Deferred[None] = Deferred()

        def fire(result: Any) -> Any:
            if not done.called:  # unless cancelled (the client left)
                done.callback(None)
            return result

        read.addBoth(fire)
        return done.addCallback(lambda _: BreakerBoard.admit(self, instance))

    def retry_after(self, pool: str) -> float | None:
        self._maybe_read()
        return super().retry_after(pool)

    def record(self, instance: Any, outcome: str, reached: bool) -> None:
        pair = self._pairs.get(instance.id)
        if pair is None:
            return
        outcome = board_outcome(outcome)
        for b in pair:
            before = b.transitions
            b.record(outcome)
            if outcome == OK:
                if b.name in self._shared_counts:
                    self._shared_counts.discard(b.name)
                    self._call(self.store.delete(fails_key(b.name)))
            elif outcome != CANCELLED and b.transitions == before and b.state is CLOSED:
                self._count(b)

    # -- talking to the store --------------------------------------------------

    def _count(self, b: Breaker) -> None:
        """Add one failure of closed breaker C{b} to its shared count."""
        open_ms = round(b.open_timeout * (1.0 + b.jitter * self._random()) * 1000)
        d = self.store.run(FAIL, [fails_key(b.name), open_key(b.name)],
                           [b.failure_threshold, round(b.failure_window * 1000), open_ms, 0])
        self._call(d, b)

    def _moved_shared(self, b: Breaker, old: str, to: str) -> None:
        """Publish an opening this gateway decided."""
        if to != OPEN or self._adopting:
            return
        self._shared_counts.discard(b.name)
        self._published[b.name] = b.opened_until
        left = max(1, round((b.opened_until - self._clock.seconds()) * 1000))
        d = self.store.run(FAIL, [fails_key(b.name), open_key(b.name)],
                           [b.failure_threshold, round(b.failure_window * 1000), left, 1])
        self._call(d)

    def _maybe_read(self) -> Deferred[None] | None:
        """
        Read every breaker's shared state, if it is time (never twice at
        once). @return: the read's Deferred (it never fails), or L{None}.
        """
        now = self._clock.seconds()
        if now < self._next_read or self._reading:
            return None
        self._next_read = now + READ_INTERVAL
        self._reading = True
        names = list(self.breakers)
        pools = [n for n, b in self.breakers.items() if b.consecutive]
        keys = [open_key(n) for n in names] + [fails_key(n) for n in pools]
        d = self.store.run(READ, keys, [])
        d.addCallback(self._read_answer, names, pools)
        d.addBoth(self._read_done)
        self._call(d)
        return d

    def _read_done(self, result: Any) -> Any:
        self._reading = False
        return result

    def _read_answer(self, lefts: list[int], names: list[str], pools: list[str]) -> None:
        for name, left in zip(names, lefts):
            b = self.breakers.get(name)
            if b is not None and left > 0:
                self._adopt(b, left)
        for name, left in zip(pools, lefts[len(names):]):
            if left > 0:
                self._shared_counts.add(name)
            else:
                # Another gateway's success cleared the pool's count: so does this one.
                self._shared_counts.discard(name)
                self.breakers[name].forget_failures()

    def _fail_answer(self, reply: list[int], b: Breaker) -> None:
        is_open, left, count = reply
        if is_open:
            self._adopt(b, left)
        elif b.consecutive and count:
            self._shared_counts.add(b.name)

    def _adopt(self, b: Breaker, left_ms: int) -> None:
        """
        The store says C{b} is open for C{left_ms} more milliseconds: open it
        here until then, plus this gateway's own jitter (so that gateways do
        not all send their half-open probes at the same moment).
        """
        until = self._clock.seconds() + left_ms / 1000
        mine = self._published.get(b.name)
        if mine is not None and abs(until - mine) <= _OWN:
            return  # the open period this gateway published
        until += b.open_timeout * b.jitter * self._random()
        state = b.state
        if state is OPEN:
            if until > b.opened_until:
                b.opened_until = until
            return
        if state in (CLOSED, HALF_OPEN):
            self.log.info("circuit breaker {name} is open in the shared store",
                          name=b.name)
            self._adopting = True
            try:
                b.trip(until=until)
            finally:
                self._adopting = False

    def _call(self, d: Deferred[Any], b: Breaker | None = None) -> None:
        """Follow a store call: feed its answer back, never let it fail a request."""
        if b is not None:
            d.addCallback(self._fail_answer, b)
        d.addCallbacks(self._store_answered, self._store_failed)

    def _store_answered(self, _: Any) -> None:
        if not self._store_ok:
            self._store_ok = True
            self.log.info("shared circuit breaker state: the store answers again")

    def _store_failed(self, failure: Failure) -> None:
        if self._store_ok:
            self._store_ok = False
            self.log.warn(
                "shared circuit breaker state unavailable ({why}): breakers go on with this"
                " gateway's own counts", why=failure.getErrorMessage())


def breaker_board(config: Any, clock: IReactorTime, metrics: Any, store: Any,
                  previous: Any = None) -> BreakerBoard | NoBreakers:
    """
    The breaker board for C{config}: L{NoBreakers} when every pool turns
    C{circuit_breaker} off; a L{SharedBreakerBoard} when the store is shared
    (C{store.shared}: Redis, or a worker's view of its parent's memory
    store); else a L{BreakerBoard}.

    @param previous: the board of the data plane a reload replaces.
    """
    if getattr(store, "shared", False):
        return SharedBreakerBoard.from_config(config, clock, metrics, previous=previous,
                                              store=store)
    return BreakerBoard.from_config(config, clock, metrics, previous=previous)
