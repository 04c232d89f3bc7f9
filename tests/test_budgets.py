"""
The budget scripts (clawproxy.policy.budgets): reserve and settle, held to
the same results by the memory store (on a Clock) and a real redis-server.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from clawproxy.config.model import StoreConfig
from clawproxy.metrics import Metrics
from clawproxy.policy.budgets import RESERVE, SETTLE, reserve_args, used_in
from clawproxy.stores import build_store
from tests.test_store_contract import WAIT, RedisStoreCase, contract


class BudgetContract:
    """What L{RESERVE} and L{SETTLE} do, on either store."""

    store: Any

    async def reserve(self, *budgets: tuple[float, int, int], keys: tuple[str, ...] = ("t",)
                      ) -> list[Any]:
        return await self.store.run(RESERVE, list(keys), reserve_args(budgets))

    async def used(self, key: str, period: float) -> int:
        return used_in(await self.store.get(key), period, await self.store.now())

    async def start_of_window(self, period: float) -> None:
        """Wait (at most 3s) until a window of C{period} has a few seconds (or half) left."""
        now = await self.store.now()
        if now % period > period - min(period / 2, 3):
            await self.advance(period - now % period + 0.01)

    @contract
    async def test_reserve_until_full(self) -> None:
        """Reservations are admitted while they fit; the first that does not is refused."""
        await self.start_of_window(60)
        for _ in range(3):
            result = await self.reserve((60, 1000, 300))
            self.assertEqual(result[0], 1)
        refused = await self.reserve((60, 1000, 300))
        self.assertEqual(refused[:2], [0, 1])
        self.assertTrue(0 < refused[2] <= 60_000, refused)
        self.assertEqual(refused[3], 900)
        self.assertEqual((await self.reserve((60, 1000, 100)))[0], 1)
        self.assertEqual(await self.used("t", 60), 1000)

    @contract
    async def test_first_of_window_always_admitted(self) -> None:
        """A reservation larger than the whole budget gets through when the window is untouched."""
        await self.start_of_window(60)
        self.assertEqual((await self.reserve((60, 100, 500)))[0], 1)
        self.assertEqual((await self.reserve((60, 100, 1)))[0], 0)

    @contract
    async def test_all_or_nothing(self) -> None:
        """With two budgets, a refusal by the second reserves nothing in the first."""
        await self.start_of_window(60)
        await self.reserve((60, 10, 10), keys=("b",))
        refused = await self.reserve((60, 1000, 5), (60, 10, 5), keys=("a", "b"))
        self.assertEqual(refused[:2], [0, 2])
        self.assertEqual(await self.used("a", 60), 0)

    @contract
    async def test_settle(self) -> None:
        """Settling adds the difference; giving back more than was used floors at 0."""
        await self.start_of_window(60)
        result = await self.reserve((60, 1000, 400))
        window = result[1]
        await self.store.run(SETTLE, ["t"], [window, -150])
        self.assertEqual(await self.used("t", 60), 250)
        await self.store.run(SETTLE, ["t"], [window, -1000])
        self.assertEqual(await self.used("t", 60), 0)

    @contract
    async def test_settle_other_window_ignored(self) -> None:
        """A settle for a window that has ended leaves the new window alone."""
        await self.start_of_window(1)
        old = (await self.reserve((1, 1000, 400)))[1]
        await self.advance(1.0)
        await self.reserve((1, 1000, 50))
        await self.store.run(SETTLE, ["t"], [old, -400])
        self.assertEqual(await self.used("t", 1), 50)

    @contract
    async def test_new_window_starts_empty(self) -> None:
        await self.start_of_window(1)
        await self.reserve((1, 100, 100))
        self.assertEqual((await self.reserve((1, 100, 1)))[0], 0)
        await self.advance(1.0)
        self.assertEqual((await self.reserve((1, 100, 100)))[0], 1)


class MemoryBudgetTests(BudgetContract, SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000.25)
        self.store = build_store(StoreConfig(backend="memory"), self.clock, Metrics())

    def drive(self, coroutine: Coroutine[Any, Any, None]) -> None:
        self.successResultOf(Deferred.fromCoroutine(coroutine))

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def test_keys_expire_with_window(self) -> None:
        """A budget counter does not outlive its window by more than the grace."""
        self.successResultOf(self.store.run(RESERVE, ["t"], reserve_args([(1, 10, 1)])))
        self.clock.advance(62)
        self.store.keys.sweep()
        self.assertEqual(len(self.store.keys), 0)


class RedisBudgetTests(RedisStoreCase, BudgetContract, TestCase):
    def drive(self, coroutine: Coroutine[Any, Any, None]) -> Deferred[None]:
        return Deferred.fromCoroutine(coroutine).addTimeout(WAIT + 3, reactor)
