"""Tests for L{clawproxy.policy.retry}."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from clawproxy.backends.registry import Pool, Registry
from clawproxy.config import parse_config
from clawproxy.interfaces import IRetryPolicy
from clawproxy.policy.retry import RetryPolicy, backoff_delay


def pool(name: str = "main", **retry: Any) -> Pool:
    """A pool of two instances whose C{retry} section is C{retry}."""
    cfg = parse_config({
        "pools": {name: {"instances": [{"id": f"{name}-1", "url": "http://a.test:1"},
                                       {"id": f"{name}-2", "url": "http://b.test:1"}],
                         "retry": retry}},
        "routes": [{"path": "/*", "pool": name}],
    }, environ={})
    return Registry(cfg, Clock()).pools[name]


class RetryOnTests(SynchronousTestCase):
    """Only the outcomes listed in C{retry_on} are retried."""

    def test_interface(self) -> None:
        """L{RetryPolicy} provides L{IRetryPolicy}."""
        self.assertTrue(verifyObject(IRetryPolicy, RetryPolicy()))

    def test_defaults(self) -> None:
        """By default connect failures and refusals are retried, 5xx and timeouts not."""
        p = pool()
        policy = RetryPolicy()
        policy.record_request(p)
        self.assertIsNotNone(policy.should_retry(p, "connect_failure", 1))
        self.assertIsNotNone(policy.should_retry(p, "refused", 1))
        self.assertIsNone(policy.should_retry(p, "5xx", 1))
        self.assertIsNone(policy.should_retry(p, "timeout", 1))
        self.assertIsNone(policy.should_retry(p, "error", 1))

    def test_configured(self) -> None:
        """With C{retry_on: [5xx]} only 5xx answers are retried."""
        p = pool(retry_on=["5xx"])
        policy = RetryPolicy()
        policy.record_request(p)
        self.assertIsNotNone(policy.should_retry(p, "5xx", 1))
        self.assertIsNone(policy.should_retry(p, "connect_failure", 1))
        self.assertIsNone(policy.should_retry(p, "refused", 1))


class MaxRetriesTests(SynchronousTestCase):
    """C{max_retries} bounds the retries of one request."""

    def test_max_retries(self) -> None:
        """With C{max_retries: 2}, attempts 1 and 2 may be retried, attempt 3 not."""
        p = pool(max_retries=2)
        policy = RetryPolicy()
        policy.record_request(p)
        self.assertIsNotNone(policy.should_retry(p, "refused", 1))
        self.assertIsNotNone(policy.should_retry(p, "refused", 2))
        self.assertIsNone(policy.should_retry(p, "refused", 3))

    def test_zero(self) -> None:
        """C{max_retries: 0} never retries."""
        p = pool(max_retries=0)
        policy = RetryPolicy()
        policy.record_request(p)
        self.assertIsNone(policy.should_retry(p, "refused", 1))


class BackoffTests(SynchronousTestCase):
    """The delay before each retry follows C{backoff}, capped by C{max_delay}."""

    def test_exponential(self) -> None:
        """Exponential backoff doubles from C{base_delay} up to C{max_delay}."""
        self.assertEqual([backoff_delay("exponential", 0.5, 2.0, n) for n in range(1, 6)],
                         [0.5, 1.0, 2.0, 2.0, 2.0])

    def test_linear(self) -> None:
        """Linear backoff adds C{base_delay} per attempt up to C{max_delay}."""
        self.assertEqual([backoff_delay("linear", 0.5, 1.2, n) for n in range(1, 5)],
                         [0.5, 1.0, 1.2, 1.2])

    def test_constant(self) -> None:
        """Constant backoff always waits C{base_delay} (still capped)."""
        self.assertEqual([backoff_delay("constant", 0.3, 1.0, n) for n in range(1, 4)],
                         [0.3, 0.3, 0.3])
        self.assertEqual(backoff_delay("constant", 3.0, 1.0, 1), 1.0)

    def test_policy_uses_pool_backoff(self) -> None:
        """L{RetryPolicy.should_retry} returns the pool's backoff delay for the attempt."""
        p = pool(backoff="linear", base_delay="100ms", max_delay="1s", max_retries=5)
        policy = RetryPolicy()
        for _ in range(10):
            policy.record_request(p)
        delays = [policy.should_retry(p, "refused", n) for n in (1, 2, 3)]
        self.assertEqual([round(d, 6) for d in delays], [0.1, 0.2, 0.3])

    def test_default_delays(self) -> None:
        """The default backoff is exponential from 25ms, capped at 250ms."""
        p = pool(max_retries=6)
        policy = RetryPolicy()
        for _ in range(20):
            policy.record_request(p)
        delays = [policy.should_retry(p, "refused", n) for n in range(1, 6)]
        self.assertEqual(delays, [0.025, 0.05, 0.1, 0.2, 0.25])


class BudgetTests(SynchronousTestCase):
    """The retry budget caps retries at a share of requests, plus a small floor."""

    def test_floor_when_quiet(self) -> None:
        """With one request seen, a few retries (the floor) are still allowed, then none."""
        p = pool(budget=0.2, max_retries=10)
        policy = RetryPolicy()
        policy.record_request(p)
        allowed = 0
        while policy.should_retry(p, "refused", 1) is not None:
            allowed += 1
            self.assertLess(allowed, 100)
        self.assertEqual(allowed, 3)

    def test_budget_share(self) -> None:
        """After many requests, retries stop at about C{budget} times the requests."""
        p = pool(budget=0.2, max_retries=10)
        policy = RetryPolicy()
        for _ in range(100):
            policy.record_request(p)
        allowed = 0
        while policy.should_retry(p, "refused", 1) is not None:
            allowed += 1
            self.assertLess(allowed, 1000)
        # 0.2 * ~95 (decayed) + floor of 3
        self.assertTrue(19 <= allowed <= 23, allowed)

    def test_budget_refills(self) -> None:
        """Once exhausted, new requests earn new retries."""
        p = pool(budget=0.5, max_retries=10)
        policy = RetryPolicy()
        policy.record_request(p)
        while policy.should_retry(p, "refused", 1) is not None:
            pass
        for _ in range(10):
            policy.record_request(p)
        self.assertIsNotNone(policy.should_retry(p, "refused", 1))

    def test_budget_per_pool(self) -> None:
        """Each pool has its own budget."""
        a, b = pool("a", max_retries=10), pool("b", max_retries=10)
        policy = RetryPolicy()
        policy.record_request(a)
        while policy.should_retry(a, "refused", 1) is not None:
            pass
        policy.record_request(b)
        self.assertIsNotNone(policy.should_retry(b, "refused", 1))
        self.assertIsNone(policy.should_retry(a, "refused", 1))

    def test_refused_outcomes_do_not_spend(self) -> None:
        """An outcome that is not retried does not use up the budget."""
        p = pool(max_retries=10)
        policy = RetryPolicy()
        policy.record_request(p)
        for _ in range(50):
            self.assertIsNone(policy.should_retry(p, "5xx", 1))
            self.assertIsNone(policy.should_retry(p, "refused", 11))
        self.assertIsNotNone(policy.should_retry(p, "refused", 1))


class UnreachedTests(SynchronousTestCase):
    """(c) A retry after a connection that never opened resends nothing: it is free."""

    def test_spends_no_budget(self) -> None:
        """
        Retries of refused connections go on past the budget (only
        C{max_retries} bounds them), and leave the budget for resends intact.
        """
        p = pool(budget=0.0, max_retries=10)
        policy = RetryPolicy()
        policy.record_request(p)
        for _ in range(50):
            self.assertEqual(policy.should_retry(p, "refused", 1, reached=False), 0.025)
            self.assertIsNotNone(policy.should_retry(p, "connect_failure", 2, reached=False))
        resends = 0
        while policy.should_retry(p, "connect_failure", 1) is not None:
            resends += 1
            self.assertLess(resends, 100)
        self.assertEqual(resends, 3)  # the floor, untouched
        self.assertIsNotNone(policy.should_retry(p, "refused", 1, reached=False))

    def test_still_bounded(self) -> None:
        """Free retries still follow C{max_retries} and C{retry_on}."""
        p = pool(max_retries=1, retry_on=["refused"])
        policy = RetryPolicy()
        self.assertIsNotNone(policy.should_retry(p, "refused", 1, reached=False))
        self.assertIsNone(policy.should_retry(p, "refused", 2, reached=False))
        self.assertIsNone(policy.should_retry(p, "connect_failure", 1, reached=False))
