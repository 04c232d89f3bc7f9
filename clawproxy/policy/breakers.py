"""
Circuit breakers: the state machine (L{Breaker}) and breaker boards, the
registry's availability policy for them (L{NoBreakers}, L{BreakerBoard}).

Pure policy: no reactor, no I/O; time comes from an injected
L{IReactorTime<twisted.internet.interfaces.IReactorTime>} and jitter from an
injected random source. Sharing breakers between gateways through a state
store is L{clawproxy.backends.shared_breakers}.

A breaker is C{CLOSED} (requests pass; failures are counted), C{OPEN}
(nothing passes, for C{open_timeout} plus jitter) or C{HALF_OPEN} (at most
C{half_open_requests} probe requests at a time pass; C{success_threshold}
successes within C{success_window} close it, one failure opens it again).
C{failure_threshold} failures within C{failure_window} open a closed breaker.
Failures are connect errors, resets, 5xx answers and timeouts; an answer
below 500 (4xx and 429 included) is a success. A breaker board counts a
refused connection neither way (L{board_outcome}): the registry's layer-4
mark already takes a refusing instance out at once and tries it again a
second later, so an instance that restarts is back as soon as it listens,
not kept out by a breaker its own restart opened.
"""

from __future__ import annotations

import math
import random as _random
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from clawproxy.interfaces import CANCELLED, OK, IAdminSection, IBreakerBoard

CLOSED, OPEN, HALF_OPEN = "CLOSED", "OPEN", "HALF_OPEN"

#: The value of C{clawproxy_circuit_breaker_state} for each state.
STATE_CODES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}

#: The outcome of a connection the instance refused (see L{board_outcome}).
REFUSED = "refused"


def board_outcome(outcome: str) -> str:
    """
    What a board tells its breakers of an attempt's C{outcome}: a refused
    connection becomes L{CANCELLED} (it frees a half-open probe slot and
    counts neither way), as the registry's layer-4 mark handles it; any
    other outcome is told as it is.
    """
    return CANCELLED if outcome == REFUSED else outcome


#: Called as C{listener(breaker, old_state, new_state)} on every transition.
Listener = Callable[["Breaker", str, str], None]


class Breaker:
    """
    One circuit breaker.

    The move from C{OPEN} to C{HALF_OPEN} happens when time is up and the
    breaker is next asked (L{state}, L{allows}, L{admit}...), dated at the
    time it was due: no timer runs.

    @ivar name: C{POOL} or C{POOL/INSTANCE}.
    @ivar consecutive: a success while closed clears the failures counted
        (the pool's breaker: it opens when the pool as a whole keeps
        failing, not when one instance of several does).
    @ivar opened_until: when an open breaker becomes half-open (clock seconds).
    @ivar last_transition: C{(state, clock seconds)} of the last change, or L{None}.
    """

    __slots__ = (
        "_clock",
        "_failures",
        "_probes_out",
        "_random",
        "_state",
        "_successes",
        "consecutive",
        "failure_threshold",
        "failure_window",
        "half_open_requests",
        "jitter",
        "last_failure_time",
        "last_transition",
        "listener",
        "name",
        "open_timeout",
        "opened_until",
        "success_threshold",
        "success_window",
        "transitions",
    )

    def __init__(self, name: str, cfg: Any, clock: IReactorTime,
                 random: Callable[[], float] | None = None, listener: Listener | None = None,
                 consecutive: bool = False) -> None:
        """
        @param cfg: a L{BreakerConfig<clawproxy.config.BreakerConfig>} (or
            anything with its attributes).
        @param random: returns a float in C{[0, 1)}: the jitter's source.
        @param listener: told of every transition.
        """
        self.name = name
        self._clock = clock
        self._random = random if random is not None else _random.random
        self.listener = listener
        self.consecutive = consecutive
        self.configure(cfg)
        self._state = CLOSED
        self._probes_out = 0
        self.opened_until = 0.0
        self.last_failure_time: float | None = None
        self.last_transition: tuple[str, float] | None = None
        self.transitions = 0

    def configure(self, cfg: Any) -> None:
        """Take new settings (a reload), keeping the state and what was counted."""
        self.failure_threshold = cfg.failure_threshold
        self.failure_window = cfg.failure_window
        self.success_threshold = cfg.success_threshold
        self.success_window = cfg.success_window
        self.open_timeout = cfg.open_timeout
        self.half_open_requests = cfg.half_open_requests
        self.jitter = cfg.jitter
        old_f = getattr(self, "_failures", ())
        old_s = getattr(self, "_successes", ())
        self._failures: deque[float] = deque(old_f, maxlen=self.failure_threshold)
        self._successes: deque[float] = deque(old_s, maxlen=self.success_threshold)

    # -- reading -----------------------------------------------------------

    @property
    def state(self) -> str:
        """C{CLOSED}, C{OPEN} or C{HALF_OPEN} now."""
        state = self._state
        if state is OPEN and self._clock.seconds() >= self.opened_until:
            self._move(HALF_OPEN, self.opened_until)
            return HALF_OPEN
        return state

    def allows(self) -> bool:
        """
        Could a request pass now? (Closed, or half-open with a probe slot
        free.) Takes nothing.
        """
        if self._state is CLOSED:
            return True
        state = self.state
        if state is HALF_OPEN:
            return self._probes_out < self.half_open_requests
        return state is CLOSED

    def retry_after(self) -> float | None:
        """Seconds until an open breaker becomes half-open, else L{None}."""
        if self.state is not OPEN:
            return None
        return max(0.0, self.opened_until - self._clock.seconds())

    @property
    def failure_count(self) -> int:
        """Failures within C{failure_window} (counted while closed)."""
        cutoff = self._clock.seconds() - self.failure_window
        return sum(1 for t in self._failures if t > cutoff)

    @property
    def success_count(self) -> int:
        """Successes within C{success_window} (counted while half-open)."""
        cutoff = self._clock.seconds() - self.success_window
        return sum(1 for t in self._successes if t > cutoff)

    @property
    def probes_out(self) -> int:
        """Half-open probe requests under way."""
        return self._probes_out

    def describe(self) -> dict[str, Any]:
        """What C{GET /health/circuit-breaker/NAME} answers."""
        state = self.state
        last = self.last_transition
        retry = self.retry_after()
        return {
            "name": self.name,
            "state": state,
            "failure_count": self.failure_count,
            "success_count": self.success_count,
            "last_failure_time": self.last_failure_time,
            "last_transition": None if last is None else {"to": last[0], "at": last[1]},
            "transitions": self.transitions,
            "probes_in_flight": self._probes_out,
            "retry_after": None if retry is None else math.ceil(retry),
        }

    # -- changing ----------------------------------------------------------

    def admit(self) -> bool:
        """
        Let one request pass, taking a probe slot when half-open (check and
        take in one step). Every admitted request must be L{record}ed.
        """
        if self._state is CLOSED:
            return True
        state = self.state
        if state is HALF_OPEN and self._probes_out < self.half_open_requests:
            self._probes_out += 1
            return True
        return state is CLOSED

    def record(self, outcome: str) -> None:
        """
        The outcome of a request: L{OK}, L{CANCELLED} (frees its probe slot,
        counts neither way) or a failure name.
        """
        if self._state is CLOSED and outcome == OK:  # the common case, kept short
            if self.consecutive and self._failures:
                self._failures.clear()
            return
        state = self.state
        if outcome == CANCELLED:
            if state is HALF_OPEN and self._probes_out:
                self._probes_out -= 1
            return
        now = self._clock.seconds()
        if outcome == OK:
            if state is CLOSED:
                if self.consecutive and self._failures:
                    self._failures.clear()
            elif state is HALF_OPEN and self._probes_out:
                # Only a probe's answer counts: one admitted before the
                # breaker opened tells nothing about the backend now.
                self._probes_out -= 1
                successes = self._successes
                successes.append(now)
                if (len(successes) == self.success_threshold
                        and now - successes[0] <= self.success_window):
                    self._move(CLOSED, now)
            return
        self.last_failure_time = now
        if state is CLOSED:
            failures = self._failures
            failures.append(now)
            if (len(failures) == self.failure_threshold
                    and now - failures[0] <= self.failure_window):
                self.trip(now)
        elif state is HALF_OPEN and self._probes_out:
            self._probes_out -= 1
            self.trip(now)

    def trip(self, now: float | None = None, until: float | None = None) -> None:
        """
        Open the breaker now, until C{until} (default: C{open_timeout} plus
        a jitter of up to C{jitter} times it).
        """
        if now is None:
            now = self._clock.seconds()
        if until is None:
            until = now + self.open_timeout * (1.0 + self.jitter * self._random())
        self.opened_until = until
        if self._state is not OPEN:
            self._move(OPEN, now)

    def forget_failures(self) -> None:
        """Drop the failures counted so far (another gateway saw the pool succeed)."""
        self._failures.clear()

    def close(self) -> None:
        """Close the breaker now (another gateway saw it recover)."""
        if self.state is not CLOSED:
            self._move(CLOSED, self._clock.seconds())

    def _move(self, to: str, at: float) -> None:
        old = self._state
        self._state = to
        self._probes_out = 0
        self._failures.clear()
        self._successes.clear()
        self.last_transition = (to, at)
        self.transitions += 1
        if self.listener is not None:
            self.listener(self, old, to)


@implementer(IBreakerBoard)
class NoBreakers:
    """
    The board when every pool turns circuit breakers off: every breaker closed.

    Passive health (C{max_fails}/C{fail_timeout}) still ejects failing
    instances; this board excludes nothing, admits everything and keeps no
    state.
    """

    def excludes(self, instance: Any) -> bool:
        return False

    def admit(self, instance: Any) -> bool:
        return True

    def record(self, instance: Any, outcome: str, reached: bool) -> None:
        pass

    def probed(self, instance: Any, ok: bool) -> None:
        pass

    def state(self, name: str) -> str:
        return "CLOSED"

    def retry_after(self, pool: str) -> float | None:
        return None


@implementer(IBreakerBoard, IAdminSection)
class BreakerBoard:
    """
    The breakers of the pools that do not turn C{circuit_breaker} off: one
    per pool (C{POOL}) and one per instance (C{POOL/INSTANCE}).

    An instance is out of the availability decision while its breaker or
    its pool's is open (or half-open with every probe slot taken); the
    chosen instance is admitted by both, each taking a probe slot when
    half-open. Every attempt's outcome goes to both breakers (a refused
    connection as L{CANCELLED}: L{board_outcome}). Active health
    checks do not move breakers: they judge real traffic only.

    @ivar breakers: every breaker by name.
    """

    log = Logger()
    name = "circuit_breakers"

    def __init__(self, clock: IReactorTime, metrics: Any = None,
                 random: Callable[[], float] | None = None) -> None:
        self._clock = clock
        self._metrics = metrics
        self._random = random if random is not None else _random.Random().random
        self.breakers: dict[str, Breaker] = {}
        #: instance id -> (its breaker, its pool's breaker)
        self._pairs: dict[str, tuple[Breaker, Breaker]] = {}
        #: Told of every transition after the metrics (the shared board listens).
        self.on_transition: Listener | None = None

    @classmethod
    def from_config(cls, config: Any, clock: IReactorTime, metrics: Any = None,
                    random: Callable[[], float] | None = None,
                    previous: Any = None, **kw: Any) -> BreakerBoard | NoBreakers:
        """
        The board for C{config}'s pools, or L{NoBreakers} when every pool
        turns C{circuit_breaker} off (then it costs nothing per request).

        @param previous: the board a reload replaces: breakers that keep
            their name keep their state.
        @param kw: more arguments for C{cls}.
        """
        pools = {name: p for name, p in config.pools.items()
                 if p.circuit_breaker is not None and p.circuit_breaker.enabled}
        if not pools:
            if isinstance(previous, BreakerBoard):
                previous.forget(previous.breakers)
            return NoBreakers()
        board = cls(clock, metrics, random, **kw)
        old = previous.breakers if isinstance(previous, BreakerBoard) else {}
        for name, p in pools.items():
            pb = board._add(name, p.circuit_breaker, old, consecutive=True)
            for inst in p.instances:
                ib = board._add(f"{name}/{inst.id}", p.circuit_breaker, old)
                board._pairs[inst.id] = (ib, pb)
        if isinstance(previous, BreakerBoard):
            previous.forget(set(old) - set(board.breakers))
        return board

    def _add(self, name: str, cfg: Any, old: dict[str, Breaker],
             consecutive: bool = False) -> Breaker:
        b = old.get(name)
        if b is None:
            b = Breaker(name, cfg, self._clock, self._random, consecutive=consecutive)
        else:
            b.configure(cfg)
        b.listener = self._moved
        self.breakers[name] = b
        m = self._metrics
        if m is not None:
            m.circuit_breaker_state.labels(name).set_function(
                lambda b=b: STATE_CODES[b.state])
            m.circuit_breaker_open_total.labels(name)
            for to in STATE_CODES:
                m.circuit_breaker_transitions_total.labels(name, to)
        return b

    def forget(self, names: Iterable[str]) -> None:
        """Drop the metrics of breakers that are gone (a reload removed them)."""
        m = self._metrics
        if m is None:
            return
        for name in list(names):
            for family in (m.circuit_breaker_state, m.circuit_breaker_open_total):
                try:
                    family.remove(name)
                except KeyError:
                    pass
            for to in STATE_CODES:
                try:
                    m.circuit_breaker_transitions_total.remove(name, to)
                except KeyError:
                    pass

    def _moved(self, breaker: Breaker, old: str, to: str) -> None:
        log = self.log.warn if to == OPEN else self.log.info
        log("circuit breaker {name}: {old} -> {to}", name=breaker.name, old=old, to=to)
        m = self._metrics
        if m is not None:
            m.circuit_breaker_transitions_total.labels(breaker.name, to).inc()
            if to == OPEN:
                m.circuit_breaker_open_total.labels(breaker.name).inc()
        if self.on_transition is not None:
            self.on_transition(breaker, old, to)

    # -- IAvailabilityPolicy -------------------------------------------------

    def excludes(self, instance: Any) -> bool:
        pair = self._pairs.get(instance.id)
        if pair is None:
            return False
        ib, pb = pair
        if ib._state is CLOSED and pb._state is CLOSED:
            return False
        return not (pb.allows() and ib.allows())

    def admit(self, instance: Any) -> bool:
        pair = self._pairs.get(instance.id)
        if pair is None:
            return True
        ib, pb = pair
        if ib._state is CLOSED and pb._state is CLOSED:
            return True
        if not pb.admit():
            return False
        if not ib.admit():
            pb.record(CANCELLED)
            return False
        return True

    def record(self, instance: Any, outcome: str, reached: bool) -> None:
        pair = self._pairs.get(instance.id)
        if pair is None:
            return
        ib, pb = pair
        outcome = board_outcome(outcome)
        ib.record(outcome)
        pb.record(outcome)

    def probed(self, instance: Any, ok: bool) -> None:
        pass

    # -- IBreakerBoard and admin ---------------------------------------------

    def state(self, name: str) -> str:
        b = self.breakers.get(name)
        return CLOSED if b is None else b.state

    def describe(self, name: str) -> dict[str, Any] | None:
        """C{GET /health/circuit-breaker/NAME}: L{None} for an unknown name."""
        b = self.breakers.get(name)
        return None if b is None else b.describe()

    def retry_after(self, pool: str) -> float | None:
        """
        Seconds until pool C{pool} may take a request again when its breakers
        keep it from taking any now: its own breaker's time to half-open, or
        the soonest of its instances' when all of theirs are open. L{None}
        when breakers are not what stops it.
        """
        pb = self.breakers.get(pool)
        if pb is None:
            return None
        if not pb.allows():
            return _wait(pb)
        mine = [ib for ib, p in self._pairs.values() if p is pb]
        if mine and not any(ib.allows() for ib in mine):
            return min(_wait(ib) for ib in mine)
        return None

    def status(self) -> dict[str, Any]:
        """The C{circuit_breakers} section of C{/admin/status}."""
        return {name: b.describe() for name, b in self.breakers.items()}

    @staticmethod
    def merge(statuses: list[dict[str, Any]]) -> dict[str, Any]:
        """
        The workers' sections as one (C{server.workers > 1}): each breaker in
        its worst state among the workers (C{OPEN}, then C{HALF_OPEN}), its
        counts summed, its latest failure and transition, its longest wait.
        """
        worst = {OPEN: 2, HALF_OPEN: 1, CLOSED: 0}
        out: dict[str, Any] = {}
        for status in statuses:
            for name, b in status.items():
                m = out.get(name)
                if m is None:
                    out[name] = dict(b)
                    continue
                if worst.get(b["state"], 0) > worst.get(m["state"], 0):
                    m["state"] = b["state"]
                for key in ("failure_count", "success_count", "transitions",
                            "probes_in_flight"):
                    m[key] = m.get(key, 0) + b.get(key, 0)
                for key in ("last_failure_time", "retry_after"):
                    if b.get(key) is not None and (m.get(key) is None or b[key] > m[key]):
                        m[key] = b[key]
                last = b.get("last_transition")
                if last and (not m.get("last_transition")
                             or last["at"] > m["last_transition"]["at"]):
                    m["last_transition"] = last
        return out

    def endpoints(self) -> dict[Any, Any]:
        return {}


def _wait(breaker: Breaker) -> float:
    """Time until a breaker that refuses requests may take one: its open
    time left, or a second when half-open with every probe slot taken."""
    wait = breaker.retry_after()
    return 1.0 if wait is None else wait
