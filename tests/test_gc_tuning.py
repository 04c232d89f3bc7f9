"""Tests for L{clawproxy.tap.tune_gc}."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from clawproxy import tap


class FakeGC:
    """Records what L{tune_gc} asks of the C{gc} module."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.threshold = (700, 10, 10)

    def collect(self) -> int:
        self.calls.append(("collect",))
        return 0

    def freeze(self) -> None:
        self.calls.append(("freeze",))

    def get_threshold(self) -> tuple[int, int, int]:
        return self.threshold

    def set_threshold(self, *t: int) -> None:
        self.calls.append(("set_threshold", *t))
        self.threshold = t


class TuneGCTests(SynchronousTestCase):
    """L{tune_gc} freezes the startup objects and makes full collections rarer."""

    def test_tune(self) -> None:
        """Collect, then freeze what is left, then raise only the third threshold."""
        fake = FakeGC()
        self.patch(tap, "gc", fake)
        tap.tune_gc()
        self.assertEqual(fake.calls, [
            ("collect",), ("freeze",), ("set_threshold", 700, 10, tap.FULL_COLLECTION_EVERY),
        ])

    def test_keeps_young_thresholds(self) -> None:
        """The first two thresholds are left as they were."""
        fake = FakeGC()
        fake.threshold = (1000, 20, 10)
        self.patch(tap, "gc", fake)
        tap.tune_gc()
        self.assertEqual(fake.threshold, (1000, 20, tap.FULL_COLLECTION_EVERY))
