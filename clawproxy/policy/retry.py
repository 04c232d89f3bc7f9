"""Retry decisions: which outcomes are retried, how long to wait, and a budget."""

from __future__ import annotations

from zope.interface import implementer

from clawproxy.interfaces import IRetryPolicy

#: Outcomes retried whatever C{retry_on} says: a pool that sets
#: C{first_token_timeout} asks for exactly that failover.
_ALWAYS = frozenset({"first_token_timeout"})


@implementer(IRetryPolicy)
class RetryPolicy:
    """
    The pool's C{retry} settings as a policy.

    The budget caps retries at C{budget} times the requests seen (plus a floor
    of a few retries so a quiet gateway can still fail over), counted over
    the policy's lifetime with exponential decay so old traffic fades. Only
    retries that resend the request spend it: a retry after a connection
    that never opened (refused, connect error) loaded no instance, so it is
    bounded by C{max_retries} alone (and the registry takes the refusing
    instance out at once, so there are few of them).
    """

    _MIN_RETRIES = 3.0
    _DECAY = 0.999

    def __init__(self) -> None:
        self._requests: dict[str, float] = {}
        self._retries: dict[str, float] = {}

    def record_request(self, pool) -> None:
        name = pool.name
        self._requests[name] = self._requests.get(name, 0.0) * self._DECAY + 1.0
        self._retries[name] = self._retries.get(name, 0.0) * self._DECAY

    def should_retry(self, pool, outcome: str, attempt: int,
                     reached: bool = True) -> float | None:
        cfg = pool.config.retry
        if attempt > cfg.max_retries or (outcome not in cfg.retry_on and outcome not in _ALWAYS):
            return None
        if not reached:
            return backoff_delay(cfg.backoff, cfg.base_delay, cfg.max_delay, attempt)
        name = pool.name
        allowed = self._requests.get(name, 0.0) * cfg.budget + self._MIN_RETRIES
        if self._retries.get(name, 0.0) + 1.0 > allowed:
            return None
        self._retries[name] = self._retries.get(name, 0.0) + 1.0
        return backoff_delay(cfg.backoff, cfg.base_delay, cfg.max_delay, attempt)


def backoff_delay(kind: str, base: float, cap: float, attempt: int) -> float:
    """Delay before retry number C{attempt} (1-based)."""
    if kind == "constant":
        delay = base
    elif kind == "linear":
        delay = base * attempt
    else:
        delay = base * (2 ** (attempt - 1))
    return min(delay, cap)
