"""
State stores (L{clawproxy.interfaces.IStateStore}): C{memory} for one
process, C{redis} for state shared by several gateways.

What the features build on it:
  - rate limits (token bucket, sliding window across gateways): a L{Script}
    that reads the store's own time (C{redis.call('TIME')} / C{keys.time()})
    and updates one key atomically; a fixed window is C{incrby(key, 1, ttl)};
  - token budgets: reserve with C{incrby(key, estimate, ttl=period)} (or a
    script that refuses over the limit), settle with
    C{incrby(key, actual - estimate)};
  - cache entries and session affinity: C{set(key, bytes, ttl)}, C{get},
    C{delete};
  - shared breaker state: a script over the breaker's keys.
Callers catch L{StoreUnavailable} and apply C{store.redis.on_error}
(C{fail_open} / C{fail_closed}) by L{clawproxy.stores.onerror}'s one rule;
L{StoreError} is a bug or bad data.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface.verify import verifyObject

from clawproxy.config import StoreConfig
from clawproxy.interfaces import IStateStore
from clawproxy.stores.errors import StoreError, StoreUnavailable
from clawproxy.stores.script import KeySpace, Script

__all__ = ["KeySpace", "Script", "StoreError", "StoreService", "StoreUnavailable",
           "build_store"]


def build_store(config: StoreConfig, clock: IReactorTime, metrics: Any = None) -> IStateStore:
    """
    The store C{config} (the C{store} section) asks for, not yet connected.

    @param clock: the reactor: the memory store's time, and for Redis the
        reactor its connections use and the clock its timeouts run on.
    @param metrics: a L{clawproxy.metrics.Metrics} to record the store's
        errors and latency on, or L{None}.
    @raise ValueError: naming the key, when C{store.redis.url} is unusable.
    """
    if config.backend == "redis":
        from clawproxy.stores.redis import RedisStore

        store: IStateStore = RedisStore(config.redis, clock, metrics)
    elif config.backend == "memory":
        from clawproxy.stores.memory import MemoryStore

        store = MemoryStore(clock, metrics)
    else:
        raise ValueError(f"store.backend: must be one of memory, redis, not {config.backend!r}")
    verifyObject(IStateStore, store)
    return store


class StoreService(Service):
    """Connects the store when the gateway starts and disconnects it when it stops."""

    name = "store"

    def __init__(self, store: IStateStore) -> None:
        self.store = store

    def startService(self) -> None:
        super().startService()
        self.store.connect()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.store.disconnect()
