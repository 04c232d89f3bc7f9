"""
Health state machines: active probes, passive (nginx-style) ejection.

Pure policy: no reactor, no I/O; time comes from an injected
L{IReactorTime<twisted.internet.interfaces.IReactorTime>}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from clawproxy.interfaces import CANCELLED, OK, IAvailabilityPolicy

__all__ = [
    "ClientBound",
    "PassiveEjection",
    "PassiveState",
    "ProbeState",
    "may_eject",
    "parse_health_body",
]


class ProbeState:
    """
    An instance's health as seen by active probes.

    Instances start healthy (as in nginx and HAProxy). C{unhealthy_threshold}
    consecutive failures mark a healthy instance down; C{healthy_threshold}
    consecutive successes bring it back. A success resets the failure streak
    and a failure resets the success streak.
    """

    __slots__ = (
        "_failures",
        "_healthy",
        "_successes",
        "healthy_threshold",
        "unhealthy_threshold",
    )

    def __init__(
        self, healthy_threshold: int, unhealthy_threshold: int, healthy: bool = True
    ) -> None:
        """
        @param healthy_threshold: consecutive successes to become healthy; >= 1.
        @param unhealthy_threshold: consecutive failures to become unhealthy; >= 1.
        @param healthy: the initial state.
        @raise ValueError: on a threshold below 1.
        """
        if healthy_threshold < 1 or unhealthy_threshold < 1:
            raise ValueError("health thresholds must be >= 1")
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self._healthy = healthy
        self._successes = 0
        self._failures = 0

    @property
    def healthy(self) -> bool:
        """Whether the instance is currently considered healthy."""
        return self._healthy

    @property
    def consecutive_successes(self) -> int:
        """Successes since the last failure."""
        return self._successes

    @property
    def consecutive_failures(self) -> int:
        """Failures since the last success."""
        return self._failures

    def record(self, ok: bool) -> bool | None:
        """
        Record one probe result.

        @param ok: whether the probe passed.
        @return: the new C{healthy} value if this result changed it, else
            L{None}.
        """
        if ok:
            self._failures = 0
            self._successes += 1
            if not self._healthy and self._successes >= self.healthy_threshold:
                self._healthy = True
                return True
        else:
            self._successes = 0
            self._failures += 1
            if self._healthy and self._failures >= self.unhealthy_threshold:
                self._healthy = False
                return False
        return None


class PassiveState:
    """
    Passive health from real traffic, with nginx's C{max_fails}/C{fail_timeout}.

    Failures are counted in a window of C{fail_timeout} seconds that opens at
    the first failure (a failure at or after the window's end opens a new
    one). The C{max_fails}-th failure in a window ejects the instance for
    C{fail_timeout} seconds: ejected during C{[t, t + fail_timeout)}. A
    success resets the count but not an ejection. Failures reported while
    ejected (requests that were already in flight) are ignored. Once the
    ejection ends, counting starts afresh. C{max_fails = 0} disables it.

    Whether the pool may afford the ejection is the caller's decision (see
    L{may_eject}); if not, the caller should L{reset} the state.
    """

    __slots__ = (
        "_clock",
        "_ejected_until",
        "_failures",
        "_window_end",
        "fail_timeout",
        "max_fails",
    )

    def __init__(
        self, max_fails: int, fail_timeout: float, clock: IReactorTime
    ) -> None:
        """
        @param max_fails: failures within C{fail_timeout} that eject; 0 disables.
        @param fail_timeout: seconds of the counting window and of the ejection.
        @param clock: the time source (C{seconds()}).
        @raise ValueError: on a negative C{max_fails} or C{fail_timeout}.
        """
        if max_fails < 0 or fail_timeout < 0:
            raise ValueError("max_fails and fail_timeout must be >= 0")
        self.max_fails = max_fails
        self.fail_timeout = fail_timeout
        self._clock = clock
        self._failures = 0
        self._window_end = 0.0
        self._ejected_until: float | None = None

    @property
    def failures(self) -> int:
        """Failures counted in the current window."""
        self._expire(self._clock.seconds())
        return self._failures

    @property
    def ejected(self) -> bool:
        """Whether the instance is ejected right now."""
        if self._ejected_until is None:
            return False  # the common case, asked for every instance of every request
        return self._expire(self._clock.seconds())

    @property
    def ejected_until(self) -> float | None:
        """When the current ejection ends (clock seconds), or L{None}."""
        self._expire(self._clock.seconds())
        return self._ejected_until

    def record_failure(self) -> bool:
        """
        Count one failed request.

        @return: C{True} if this failure ejected the instance.
        """
        if not self.max_fails:
            return False
        now = self._clock.seconds()
        if self._expire(now):
            return False
        if not self._failures or now >= self._window_end:
            self._failures = 0
            self._window_end = now + self.fail_timeout
        self._failures += 1
        if self._failures >= self.max_fails:
            self._failures = 0
            self._ejected_until = now + self.fail_timeout
            return True
        return False

    def record_success(self) -> None:
        """Count one successful request: the failure count restarts."""
        self._failures = 0

    def reset(self) -> None:
        """Forget failures and end any ejection (e.g. the pool vetoed it)."""
        self._failures = 0
        self._ejected_until = None

    def _expire(self, now: float) -> bool:
        """End an ejection whose time is up; return whether still ejected."""
        until = self._ejected_until
        if until is None:
            return False
        if now >= until:
            self._ejected_until = None
            self._failures = 0
            return False
        return True


class ClientBound:
    """
    How much of a pool's failure counts one client address may add: in a run
    of failed requests from one client with no success in between, at most
    one failure per instance per C{window} seconds (the pool's
    C{fail_timeout}) counts.

    A client whose own requests make instances fail (bytes the backend
    chokes on, a prompt that crashes it, a request built to time out) would
    otherwise eject healthy instances, or open their breakers, just by
    repeating the request. Its failures keep counting normally once it has a
    success in the pool (L{forgive}): a client served by the other instances
    while one keeps failing it is evidence against that instance, so a lone
    client (or everyone behind one proxy address) still gets a genuinely
    failing instance ejected as before. Failures that do not count are still
    failures for the client, the statistics and the retry decision.

    The table holds the clients with a counted failure and no success since;
    past L{MAX_CLIENTS} entries, expired ones are dropped, and if none had
    expired it starts afresh (that many different addresses failing within
    one window eject the instance anyway).
    """

    __slots__ = ("_clock", "marks", "window")

    #: Clients remembered per pool before expired entries are dropped.
    MAX_CLIENTS = 4096

    def __init__(self, window: float, clock: IReactorTime) -> None:
        """
        @param window: seconds during which a client's counted failure on an
            instance keeps its further failures there from counting.
        @param clock: the time source (C{seconds()}).
        """
        self.window = window
        self._clock = clock
        #: Client -> instance id -> until when its failures there do not count.
        self.marks: dict[str, dict[str, float]] = {}

    def counts(self, client: str, instance_id: str) -> bool:
        """
        Whether a failure of C{client}'s request on C{instance_id} may count
        now; if so, its further failures there do not count for C{window}
        seconds or until L{forgive}.
        """
        now = self._clock.seconds()
        table = self.marks
        marks = table.get(client)
        if marks is None:
            if len(table) >= self.MAX_CLIENTS:
                for key in [k for k, m in table.items() if max(m.values()) <= now]:
                    del table[key]
                if len(table) >= self.MAX_CLIENTS:
                    table.clear()
            table[client] = {instance_id: now + self.window}
            return True
        if marks.get(instance_id, 0.0) > now:
            return False
        marks[instance_id] = now + self.window
        return True

    def forgive(self, client: str) -> None:
        """
        C{client} had a success: its failures count again. (Callers on a hot
        path may skip this while C{marks} is empty.)
        """
        self.marks.pop(client, None)

    def __len__(self) -> int:
        return len(self.marks)


@implementer(IAvailabilityPolicy)
class PassiveEjection:
    """
    Passive health as an availability policy: each instance's
    L{PassiveState} (C{instance.passive}) counts the failures of requests
    that reached it (5xx, timeouts, connections closed before an answer) and
    ejects it after C{max_fails}, within the pool's C{max_ejection_percent}.

    Failures before a connection opened (refused, connect errors) are not
    counted here: the registry takes such an instance out at once, whatever
    the cap (see L{clawproxy.backends.registry.Pool.record}). A passing
    active health check ends an ejection at once (as Envoy's
    C{successful_active_health_check_uneject_host}): a restarted instance is
    back as soon as its probe answers, not a whole C{fail_timeout} later.
    """

    log = Logger()

    def excludes(self, instance: Any) -> bool:
        return instance.passive.ejected

    def admit(self, instance: Any) -> bool:
        return True

    def record(self, instance: Any, outcome: str, reached: bool) -> None:
        passive = instance.passive
        if outcome == OK:
            passive.record_success()
            return
        if outcome == CANCELLED or not reached or passive.ejected:
            return
        pool = instance.pool
        ejected = sum(1 for i in pool.instances if i.passive.ejected)
        if not may_eject(len(pool.instances), ejected, pool.config.passive.max_ejection_percent):
            return
        if passive.record_failure():
            self.log.warn(
                "{instance} ejected for {seconds}s after {fails} failures",
                instance=instance.id, seconds=passive.fail_timeout, fails=passive.max_fails,
            )

    def probed(self, instance: Any, ok: bool) -> None:
        if ok and instance.passive.ejected:
            self.log.info("{instance} passed a health check: ejection ended",
                          instance=instance.id)
            instance.passive.reset()


def may_eject(total: int, ejected_now: int, max_ejection_percent: float) -> bool:
    """
    Whether one more instance of a pool may be ejected.

    Allowed when C{(ejected_now + 1) * 100 <= total * max_ejection_percent},
    i.e. the ejected share after this one stays within the limit. So with the
    default 50%, a pool of 1 never ejects its only instance (as nginx ignores
    C{max_fails} for a single server: there is nowhere else to send traffic),
    a pool of 2 or 3 may eject one, a pool of 4 two.

    @param total: instances in the pool.
    @param ejected_now: instances currently ejected.
    @param max_ejection_percent: 0 to 100.
    """
    return (ejected_now + 1) * 100 <= total * max_ejection_percent


def parse_health_body(body: bytes) -> dict[str, Any] | None:
    """
    Decode a health check response body, if it is a JSON object.

    Fields such as C{cpu}, C{mem} and C{gpu_memory_used_percent} are kept
    as sent. Never raises.

    @param body: the raw response body.
    @return: the object, or L{None} if the body is not a JSON object.
    """
    try:
        value = json.loads(body)
    except (ValueError, TypeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
