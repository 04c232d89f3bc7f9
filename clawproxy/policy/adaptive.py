"""
Adaptive throttling (SPEC C{rate_limits.adaptive}), the pure part: a
sliding-window p95 of a pool's upstream latencies and the hysteresis state
machine that decides when the pool's limits are tightened.

  - L{LatencyWindow}: a fixed ring of the last L{RING} attempt latencies,
    with the time of each; the p95 is taken over those of the last
    L{WINDOW} seconds (at least L{MIN_SAMPLES} of them, else no figure).
    Adding a sample is two list stores; the sort happens only when the
    throttle is evaluated (at most once per L{EVALUATE_EVERY} seconds).
  - L{Throttle}: C{normal} or C{tight}. It tightens once a signal (p95
    latency, GPU memory) has been above its threshold for L{ENTER_AFTER}
    seconds of evaluations in a row, and relaxes once every signal has been
    below L{RECOVER_RATIO} of its threshold for L{LEAVE_AFTER} seconds in a
    row. A value between the two keeps whatever state holds (and restarts
    the count towards the other one). A signal with no figure (too few
    samples, no health body) counts as below.

The SPEC gives the thresholds and the factor; these timings are constants.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

#: Latencies kept per pool (the window is the last RING attempts of the last WINDOW seconds).
RING = 512
#: Seconds of latencies the p95 is taken over.
WINDOW = 60.0
#: Fewest latencies in the window that make a p95.
MIN_SAMPLES = 20
#: Seconds between two evaluations of a pool's throttle.
EVALUATE_EVERY = 1.0
#: Seconds a signal must stay above its threshold before limits tighten.
ENTER_AFTER = 3.0
#: Seconds every signal must stay below RECOVER_RATIO x its threshold before they relax.
LEAVE_AFTER = 15.0
#: The fraction of a threshold a signal must fall under to count as recovered.
RECOVER_RATIO = 0.9

NORMAL, TIGHT = "normal", "tight"


class LatencyWindow:
    """The recent upstream latencies of one pool, and their p95."""

    def __init__(self, size: int = RING, window: float = WINDOW,
                 min_samples: int = MIN_SAMPLES) -> None:
        self.size = size
        self.window = window
        self.min_samples = min_samples
        self._times = [-1e300] * size
        self._values = [0.0] * size
        self._next = 0

    def add(self, now: float, seconds: float) -> None:
        """One attempt took C{seconds}, ending at C{now}."""
        i = self._next
        self._times[i] = now
        self._values[i] = seconds
        self._next = 0 if i + 1 == self.size else i + 1

    def recent(self, now: float) -> list[float]:
        """The latencies of the last C{window} seconds (at most C{size}), unordered."""
        since = now - self.window
        return [v for t, v in zip(self._times, self._values) if t >= since]

    def p95(self, now: float) -> float | None:
        """The 95th percentile (nearest rank) of L{recent}, or L{None} with too few."""
        values = self.recent(now)
        if len(values) < self.min_samples:
            return None
        values.sort()
        rank = -(-95 * len(values) // 100)  # ceil(0.95 n), 1-based
        return values[rank - 1]


@attrs.frozen
class Signal:
    """
    One reading of one signal.

    @ivar name: e.g. C{latency_p95} or C{gpu_memory}.
    @ivar value: the reading, or L{None} when there is none.
    @ivar threshold: the configured threshold.
    """

    name: str
    value: float | None
    threshold: float

    @property
    def above(self) -> bool:
        return self.value is not None and self.value > self.threshold

    @property
    def recovered(self) -> bool:
        return self.value is None or self.value < self.threshold * RECOVER_RATIO


class Throttle:
    """
    The hysteresis state machine of one pool (see the module docstring).

    @ivar state: L{NORMAL} or L{TIGHT}.
    @ivar since: when the state was entered (clock seconds).
    @ivar reason: the signals above their thresholds when it tightened.
    @ivar transitions: how many times the state changed.
    """

    def __init__(self, factor: float, now: float, enter_after: float = ENTER_AFTER,
                 leave_after: float = LEAVE_AFTER) -> None:
        self.tight_factor = factor
        self.enter_after = enter_after
        self.leave_after = leave_after
        self.state = NORMAL
        self.since = now
        self.reason: tuple[str, ...] = ()
        self.transitions = 0
        self.last: tuple[Signal, ...] = ()
        self._streak: float | None = None  # when the current run towards the other state began

    @property
    def factor(self) -> float:
        """What the pool's limits are multiplied by now."""
        return self.tight_factor if self.state == TIGHT else 1.0

    def evaluate(self, now: float, signals: Sequence[Signal]) -> bool:
        """
        Take one reading of every signal.

        @return: whether the state changed.
        """
        self.last = tuple(signals)
        if self.state == NORMAL:
            going = any(s.above for s in signals)
            after = self.enter_after
        else:
            going = all(s.recovered for s in signals)
            after = self.leave_after
        if not going:
            self._streak = None
            return False
        if self._streak is None:
            self._streak = now
        if now - self._streak < after:
            return False
        self._streak = None
        self.transitions += 1
        self.since = now
        if self.state == NORMAL:
            self.state = TIGHT
            self.reason = tuple(s.name for s in signals if s.above)
        else:
            self.state = NORMAL
            self.reason = ()
        return True
