"""
What a feature does when the state store fails: the one rule of
C{store.redis.on_error}.

  - It applies to a store that can fail: C{store.shared}, i.e. Redis, or a
    worker's channel to its parent's memory store (L{clawproxy.stores.amp}).
    The memory store of one process answers in place and cannot be
    unreachable: it fails open.
  - It applies to L{StoreUnavailable} (no connection, or no answer within
    C{store.redis.timeout}): C{fail_open} lets the request go unchecked,
    C{fail_closed} answers 503 C{store_unavailable} with C{Retry-After}
    (L{store_unavailable}).
  - Any other failure (the store refused a command, or a bug) is logged with
    its traceback and fails open: a broken check must not take the gateway
    down, whatever C{on_error} says.

Features that enforce something on the store follow it: rate limits
(L{clawproxy.web.limits}) and token/spend budgets (L{clawproxy.web.tokens}).
Features that only share state through it always fail open and ignore
C{on_error}: shared circuit breakers go on with this gateway's counts, the
response cache misses, session affinity picks as if unpinned; they only
lose the sharing.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from clawproxy.errors import Rejected
from clawproxy.stores.errors import StoreUnavailable

__all__ = ["STORE_RETRY_AFTER", "fails_closed", "on_store_failure", "store_unavailable"]

#: C{Retry-After} of a C{fail_closed} 503 (seconds).
STORE_RETRY_AFTER = 1

log = Logger()


def fails_closed(config: Any, store: Any) -> bool:
    """
    Whether an unreachable C{store} refuses requests under C{config}:
    C{store.redis.on_error} is C{fail_closed} and the store can fail
    (C{store.shared}).
    """
    return config.store.redis.on_error == "fail_closed" and bool(
        getattr(store, "shared", False))


def store_unavailable(what: str) -> Rejected:
    """The 503 of a C{fail_closed} check: C{what} (e.g. C{rate limits}) cannot be checked."""
    return Rejected(503, f"{what} cannot be checked: the shared store is unreachable",
                    "server_error", "store_unavailable",
                    (("Retry-After", str(STORE_RETRY_AFTER)),))


def on_store_failure(failure: Failure, closed: bool, what: str) -> Rejected | None:
    """
    The outcome of a store call of C{what} that failed with C{failure}.

    @param closed: L{fails_closed} for the feature's config and store.
    @return: the L{Rejected} to answer with, or L{None} to let the request
        go unchecked.
    """
    if not failure.check(StoreUnavailable):
        log.failure("{what} not enforced: the store call failed", failure, what=what)
        return None
    return store_unavailable(what) if closed else None
