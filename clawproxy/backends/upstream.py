"""The one upstream agent of a gateway process and its connection pool."""

from __future__ import annotations

from typing import Any

from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory


class _QuietClientFactory(_HTTP11ClientFactory):
    """Twisted's client factory without a log line per new upstream connection."""

    noisy = False


def make_pool(reactor: Any, max_per_host: int = 256, idle_timeout: float = 60.0
              ) -> HTTPConnectionPool:
    """
    A persistent connection pool with clawproxy's settings.

    Twisted's silent resend of idempotent requests on a stale connection is
    turned off: the relay owns every retry (and counts it).
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = idle_timeout
    pool.retryAutomatically = False
    pool._factory = _QuietClientFactory
    return pool


def make_agent(reactor: Any, pool: HTTPConnectionPool, connect_timeout: float = 10.0) -> Agent:
    return Agent(reactor, pool=pool, connectTimeout=connect_timeout)
