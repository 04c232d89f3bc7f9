"""Tests for L{clawproxy.units}."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from clawproxy.units import Rate, parse_duration, parse_rate, parse_size


class ParseDurationTests(SynchronousTestCase):
    """L{parse_duration} turns durations into seconds."""

    def test_units(self) -> None:
        """C{ms}, C{s}, C{m}, C{h} and C{d} suffixes scale the number to seconds."""
        self.assertEqual(parse_duration("500ms"), 0.5)
        self.assertEqual(parse_duration("10s"), 10.0)
        self.assertEqual(parse_duration("5m"), 300.0)
        self.assertEqual(parse_duration("2h"), 7200.0)
        self.assertEqual(parse_duration("1d"), 86400.0)

    def test_fractions_and_case(self) -> None:
        """Fractional numbers and upper-case units are accepted."""
        self.assertEqual(parse_duration("1.5s"), 1.5)
        self.assertEqual(parse_duration("0.25H"), 900.0)
        self.assertEqual(parse_duration("1.2s"), 1.2)

    def test_compound(self) -> None:
        """Terms may be chained, as in C{1h30m}."""
        self.assertEqual(parse_duration("1h30m"), 5400.0)
        self.assertEqual(parse_duration("1m500ms"), 60.5)

    def test_bare_numbers(self) -> None:
        """A bare number, as a number or a string, is a number of seconds."""
        self.assertEqual(parse_duration(10), 10.0)
        self.assertEqual(parse_duration(0.5), 0.5)
        self.assertEqual(parse_duration("30"), 30.0)
        self.assertEqual(parse_duration(0), 0.0)
        self.assertIsInstance(parse_duration(10), float)

    def test_whitespace(self) -> None:
        """Surrounding whitespace and a space before the unit are ignored."""
        self.assertEqual(parse_duration(" 10 s "), 10.0)

    def test_negative(self) -> None:
        """Negative durations are rejected, as numbers or strings."""
        for value in (-1, -0.5, "-1s", "-10"):
            with self.assertRaises(ValueError) as ctx:
                parse_duration(value)
            self.assertEqual(str(ctx.exception), "must not be negative")

    def test_garbage(self) -> None:
        """Unknown units, empty strings and stray text raise a ValueError naming the value."""
        for value in ("10x", "", "s", "10s10", "ten seconds", "1e3", "5 parsecs"):
            with self.assertRaises(ValueError) as ctx:
                parse_duration(value)
            self.assertIn("invalid duration", str(ctx.exception))

    def test_wrong_types(self) -> None:
        """Booleans, lists, C{None} and non-finite numbers are not durations."""
        for value in (True, [1], None, {"s": 1}, float("inf"), float("nan")):
            self.assertRaises(ValueError, parse_duration, value)


class ParseRateTests(SynchronousTestCase):
    """L{parse_rate} turns C{COUNT/PERIOD} into a L{Rate}."""

    def test_periods(self) -> None:
        """Every period spelling maps to its length in seconds."""
        cases = {
            "10/s": 1.0,
            "10/sec": 1.0,
            "10/second": 1.0,
            "10/seconds": 1.0,
            "10/m": 60.0,
            "10/min": 60.0,
            "10/minute": 60.0,
            "10/mins": 60.0,
            "10/h": 3600.0,
            "10/hour": 3600.0,
            "10/d": 86400.0,
            "10/day": 86400.0,
            "10/days": 86400.0,
        }
        for text, period in cases.items():
            self.assertEqual(parse_rate(text), Rate(count=10.0, period=period), text)

    def test_spec_examples(self) -> None:
        """The SPEC's examples parse to the expected count and period."""
        self.assertEqual(parse_rate("100/minute"), Rate(100.0, 60.0))
        self.assertEqual(parse_rate("15/min"), Rate(15.0, 60.0))
        self.assertEqual(parse_rate("5000/second"), Rate(5000.0, 1.0))
        self.assertEqual(parse_rate("1000/hour"), Rate(1000.0, 3600.0))
        self.assertEqual(parse_rate("50/day"), Rate(50.0, 86400.0))

    def test_fractional_count(self) -> None:
        """Counts may be fractional, for spend budgets."""
        self.assertEqual(parse_rate("0.5/day"), Rate(0.5, 86400.0))

    def test_duration_period(self) -> None:
        """The period may be any duration, as in C{100/10s}."""
        rate = parse_rate("100/10s")
        self.assertEqual(rate, Rate(100.0, 10.0))
        self.assertEqual(rate.per_second, 10.0)

    def test_case_and_spaces(self) -> None:
        """Periods are case-insensitive and spaces around the parts are ignored."""
        self.assertEqual(parse_rate(" 100 / Minute "), Rate(100.0, 60.0))

    def test_per_second(self) -> None:
        """C{per_second} is the count divided by the period."""
        self.assertEqual(parse_rate("120/minute").per_second, 2.0)
        self.assertEqual(parse_rate("7/s").per_second, 7.0)

    def test_str(self) -> None:
        """A rate prints back in its configured style."""
        self.assertEqual(str(parse_rate("100/min")), "100/minute")
        self.assertEqual(str(parse_rate("0.5/day")), "0.5/day")
        self.assertEqual(str(parse_rate("3/10s")), "3/10s")

    def test_bad_period(self) -> None:
        """Unknown periods, and C{ms} (not a rate period), are rejected."""
        for value in ("10/fortnight", "10/ms", "10/", "10/0s"):
            with self.assertRaises(ValueError) as ctx:
                parse_rate(value)
            self.assertIn("period", str(ctx.exception))

    def test_bad_count(self) -> None:
        """Counts must be positive numbers."""
        for value in ("x/s", "/s", "-1/s", "0/s"):
            with self.assertRaises(ValueError) as ctx:
                parse_rate(value)
            self.assertIn("count", str(ctx.exception))

    def test_not_a_rate(self) -> None:
        """Numbers and strings without a period are not rates."""
        for value in (100, "100", None, True, ["1/s"]):
            with self.assertRaises(ValueError) as ctx:
                parse_rate(value)
            self.assertIn("must be a rate", str(ctx.exception))


class ParseSizeTests(SynchronousTestCase):
    """L{parse_size} turns sizes into bytes, with binary (nginx) units."""

    def test_units(self) -> None:
        """B, KB, MB and GB are powers of 1024."""
        self.assertEqual(parse_size("100B"), 100)
        self.assertEqual(parse_size("512KB"), 512 * 1024)
        self.assertEqual(parse_size("10MB"), 10 * 1024 * 1024)
        self.assertEqual(parse_size("1GB"), 1024**3)
        self.assertEqual(parse_size("2TB"), 2 * 1024**4)

    def test_iec_and_short_forms(self) -> None:
        """C{KiB}/C{MiB} and nginx's C{k}/C{m} mean the same as C{KB}/C{MB}."""
        self.assertEqual(parse_size("16KiB"), 16384)
        self.assertEqual(parse_size("16k"), 16384)
        self.assertEqual(parse_size("1m"), 1024 * 1024)
        self.assertEqual(parse_size("1MiB"), 1024 * 1024)

    def test_case_spaces_fractions(self) -> None:
        """Units are case-insensitive, may follow a space and fractions are truncated."""
        self.assertEqual(parse_size("10 mb"), 10 * 1024 * 1024)
        self.assertEqual(parse_size("1.5KB"), 1536)
        self.assertEqual(parse_size("0.5B"), 0)

    def test_bare_numbers(self) -> None:
        """A bare number, as a number or a string, is a number of bytes."""
        self.assertEqual(parse_size(4096), 4096)
        self.assertEqual(parse_size("4096"), 4096)
        self.assertEqual(parse_size(0), 0)

    def test_negative(self) -> None:
        """Negative sizes are rejected."""
        for value in (-1, "-1KB"):
            with self.assertRaises(ValueError) as ctx:
                parse_size(value)
            self.assertEqual(str(ctx.exception), "must not be negative")

    def test_garbage(self) -> None:
        """Unknown units and unit-only strings raise a ValueError naming the value."""
        for value in ("10XB", "MB", "", "10 M B", "ten"):
            with self.assertRaises(ValueError) as ctx:
                parse_size(value)
            self.assertIn("invalid size", str(ctx.exception))

    def test_wrong_types(self) -> None:
        """Booleans, lists and C{None} are not sizes."""
        for value in (True, None, [10]):
            self.assertRaises(ValueError, parse_size, value)
