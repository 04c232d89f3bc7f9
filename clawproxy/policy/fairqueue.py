"""
A bounded waiting room for requests a limit refused (C{rate_limits.on_limit:
queue}), served fairly across lanes (agents, or client addresses).

Each lane is a FIFO. One pump tries the head of the lanes in round-robin
order: a lane whose head is let through goes to the back of the order; a lane
whose head is refused stays where it is but sleeps until the wait its refusal
named. So when capacity comes back a little at a time (a token bucket
refilling), the lanes waiting take turns: one agent flooding the queue cannot
starve another. A waiter leaves after C{max_wait} (L{QueueExpired}), or when
its Deferred is cancelled (its client left), freeing its place at once.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

#: Shortest pause (seconds) before a lane whose head was refused is tried again.
MIN_SLEEP = 0.001


class QueueFull(Exception):
    """The queue already holds C{max_size} requests."""


class QueueExpired(Exception):
    """The request waited C{max_wait} without being let through."""


@attrs.define(eq=False)
class Waiter:
    """One request in the queue."""

    lane: str
    item: Any
    since: float
    deferred: Deferred[Any] = attrs.field(default=None)
    timer: Any = None
    done: bool = False


#: What L{FairQueue} asks of a lane's head: a Deferred firing with
#: C{(allowed, retry_after, value)}; C{value} is what the waiter's Deferred
#: fires with when allowed. Failing fails that waiter.
Attempt = Callable[[Any], "Deferred[tuple[bool, float, Any]]"]


class FairQueue:
    """
    @param attempt: tries to let one waiting item through (see L{Attempt}).
    @param on_change: called with the depth whenever it changes.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, max_size: int, max_wait: float, attempt: Attempt,
                 on_change: Callable[[int], None] | None = None) -> None:
        self.clock = clock
        self.max_size = max_size
        self.max_wait = max_wait
        self.attempt = attempt
        self.on_change = on_change
        self.depth = 0
        self._lanes: OrderedDict[str, deque[Waiter]] = OrderedDict()
        self._asleep: dict[str, float] = {}
        self._pumping = False
        self._wake: Any = None

    def waiting(self, lane: str) -> bool:
        """Whether C{lane} has requests waiting (a newcomer of that lane joins them)."""
        return lane in self._lanes

    def lanes(self) -> dict[str, int]:
        """Requests waiting per lane."""
        return {lane: len(q) for lane, q in self._lanes.items()}

    def wait(self, lane: str, item: Any, retry_after: float = 0.0) -> Deferred[Any]:
        """
        Queue C{item} in C{lane}; it is tried once C{retry_after} has passed
        (the wait its last refusal named) and again as the pump comes by.

        @return: a Deferred firing with the attempt's value once let through,
            failing with L{QueueExpired} after C{max_wait}, or with the
            attempt's failure; cancelling it leaves the queue.
        @raise QueueFull: when C{max_size} requests already wait.
        """
        if self.depth >= self.max_size:
            raise QueueFull()
        now = self.clock.seconds()
        waiter = Waiter(lane, item, now)
        waiter.deferred = Deferred(lambda d: self._leave(waiter))
        waiter.timer = self.clock.callLater(self.max_wait, self._expire, waiter)
        queue = self._lanes.get(lane)
        if queue is None:
            queue = self._lanes[lane] = deque()
            if retry_after > 0:
                self._asleep[lane] = now + retry_after
        queue.append(waiter)
        self._changed(1)
        self._pump()
        return waiter.deferred

    # -- leaving

    def _remove(self, waiter: Waiter) -> None:
        waiter.done = True
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        queue = self._lanes.get(waiter.lane)
        if queue is None:
            return
        try:
            queue.remove(waiter)
        except ValueError:
            return
        if not queue:
            del self._lanes[waiter.lane]
            self._asleep.pop(waiter.lane, None)
        self._changed(-1)
        if not self._lanes and self._wake is not None and self._wake.active():
            self._wake.cancel()
            self._wake = None

    def _leave(self, waiter: Waiter) -> None:
        """The waiter's Deferred was cancelled: its client left."""
        self._remove(waiter)

    def _expire(self, waiter: Waiter) -> None:
        waiter.timer = None
        self._remove(waiter)
        waiter.deferred.errback(QueueExpired())

    def _changed(self, delta: int) -> None:
        self.depth += delta
        if self.on_change is not None:
            self.on_change(self.depth)

    # -- serving

    def _pump(self) -> None:
        if self._pumping:
            return
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = None
        self._pumping = True
        d = Deferred.fromCoroutine(self._serve())
        d.addErrback(lambda f: self.log.failure("rate limit queue stopped", f))

    async def _serve(self) -> None:
        try:
            while self._lanes:
                now = self.clock.seconds()
                lane = next((name for name in self._lanes
                             if self._asleep.get(name, 0.0) <= now), None)
                if lane is None:
                    wake = min(self._asleep.values())
                    self._wake = self.clock.callLater(max(0.0, wake - now), self._woken)
                    return
                waiter = self._lanes[lane][0]
                try:
                    allowed, retry_after, value = await self.attempt(waiter.item)
                except Exception as e:
                    if not waiter.done:
                        self._remove(waiter)
                        waiter.deferred.errback(e)
                    continue
                if waiter.done:
                    continue  # left while it was being tried
                if allowed:
                    self._remove(waiter)
                    if lane in self._lanes:
                        self._lanes.move_to_end(lane)
                    waiter.deferred.callback(value)
                elif math.isinf(retry_after):
                    self._remove(waiter)
                    waiter.deferred.errback(QueueExpired())
                else:
                    # Never less than MIN_SLEEP: a refusal that names no wait
                    # (rounding) must not be retried in a tight loop.
                    self._asleep[lane] = self.clock.seconds() + max(retry_after, MIN_SLEEP)
        finally:
            self._pumping = False

    def _woken(self) -> None:
        self._wake = None
        self._pump()
