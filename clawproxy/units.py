"""
Parsers for the units used in configuration: durations, rates and sizes (SPEC section 2).

All parsers are pure and raise C{ValueError} with a message fit to show a user after the
key's path (C{"pools.main.timeout: " + str(error)}).
"""

from __future__ import annotations

import math
import re

import attrs

__all__ = ["Rate", "parse_duration", "parse_rate", "parse_size"]

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_TERM = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)", re.IGNORECASE)
_NUMBER = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*")

_PERIODS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_PERIODS.update({name + "s": seconds for name, seconds in _PERIODS.items() if len(name) > 1})
_PERIOD_NAMES = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day"}

# nginx semantics: K and KB both mean 1024 bytes; KiB is accepted as a synonym.
_SIZE_UNITS = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgt", start=1):
    for _suffix in (_letter, _letter + "b", _letter + "ib"):
        _SIZE_UNITS[_suffix] = 1024**_power
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def _plain_number(value: object) -> float | None:
    """
    Return C{value} as a float when it is a real number (not a bool), else C{None}.

    @raise ValueError: for NaN and infinities.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


def parse_duration(value: object) -> float:
    """
    Parse a duration into seconds.

    Accepts C{500ms}, C{10s}, C{5m}, C{2h}, C{1d}, compounds such as C{1h30m}, and a bare
    number of seconds (as a number or a string).

    @param value: the configured value.
    @return: seconds, never negative.
    @raise ValueError: when C{value} is not a duration or is negative.
    """
    number = _plain_number(value)
    if number is not None:
        if number < 0:
            raise ValueError("must not be negative")
        return number
    if not isinstance(value, str):
        raise ValueError("must be a duration such as 500ms, 10s, 5m, 2h, 1d or seconds")
    text = value.strip()
    if text.startswith("-"):
        raise ValueError("must not be negative")
    match = _NUMBER.fullmatch(text)
    if match:
        return float(match.group(1))
    total, pos = 0.0, 0
    while pos < len(text):
        term = _DURATION_TERM.match(text, pos)
        if term is None:
            break
        total += float(term.group(1)) * _DURATION_UNITS[term.group(2).lower()]
        pos = term.end()
    if pos == 0 or pos != len(text):
        raise ValueError(
            f"invalid duration {value!r}: use e.g. 500ms, 10s, 5m, 2h, 1d or a number of seconds"
        )
    return total


@attrs.frozen
class Rate:
    """
    A number of events (requests, tokens, currency units) allowed per period.

    @ivar count: how many per period; a float so that spend budgets such as C{0.5/day} work.
    @ivar period: the period in seconds.
    """

    count: float
    period: float

    @property
    def per_second(self) -> float:
        """The sustained rate in events per second."""
        return self.count / self.period

    def __str__(self) -> str:
        count = int(self.count) if self.count.is_integer() else self.count
        name = _PERIOD_NAMES.get(self.period)
        if name is None:
            return f"{count}/{self.period:g}s"
        return f"{count}/{name}"


def parse_rate(value: object) -> Rate:
    """
    Parse a rate such as C{100/minute}, C{15/min}, C{10/s}, C{5000/second}, C{1000/hour},
    C{50/day} or C{0.5/day}.

    Periods: C{s}, C{sec}, C{second}, C{m}, C{min}, C{minute}, C{h}, C{hour}, C{d}, C{day}
    (plurals too), or any duration (C{100/10s}).

    @param value: the configured value.
    @raise ValueError: when C{value} is not a rate, or its count or period is not positive.
    """
    if not isinstance(value, str) or "/" not in value:
        raise ValueError("must be a rate such as 100/minute, 10/s or 1000/hour")
    count_text, _, period_text = value.partition("/")
    match = _NUMBER.fullmatch(count_text)
    if match is None:
        raise ValueError(f"invalid rate {value!r}: the count must be a number")
    count = float(match.group(1))
    if count <= 0:
        raise ValueError(f"invalid rate {value!r}: the count must be > 0")
    unit = period_text.strip().lower()
    period = _PERIODS.get(unit)
    if period is None:
        try:
            period = parse_duration(unit)
        except ValueError:
            raise ValueError(
                f"invalid rate {value!r}: the period must be second, minute, hour, day"
                " or a duration"
            ) from None
        if period <= 0:
            raise ValueError(f"invalid rate {value!r}: the period must be > 0")
    return Rate(count=count, period=period)


def parse_size(value: object) -> int:
    """
    Parse a size in bytes: C{10MB}, C{512KB}, C{1GB}, C{100B}, C{16KiB}, C{16k}, or a bare
    number of bytes.

    As in nginx, units are binary: C{K}, C{KB} and C{KiB} all mean 1024 bytes, C{MB} means
    1024 * 1024 bytes, and so on up to C{T}. Units are case-insensitive.

    @param value: the configured value.
    @return: the size in whole bytes (fractions are truncated).
    @raise ValueError: when C{value} is not a size or is negative.
    """
    number = _plain_number(value)
    if number is not None:
        if number < 0:
            raise ValueError("must not be negative")
        return int(number)
    if not isinstance(value, str):
        raise ValueError("must be a size such as 10MB, 512KB or a number of bytes")
    if value.strip().startswith("-"):
        raise ValueError("must not be negative")
    match = _SIZE.fullmatch(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"invalid size {value!r}: use e.g. 10MB, 512KB, 1GB or a number of bytes")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])
