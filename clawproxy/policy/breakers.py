"""Breaker boards: who decides whether an instance may be tried."""

from __future__ import annotations

from zope.interface import implementer

from clawproxy.interfaces import IBreakerBoard


@implementer(IBreakerBoard)
class NoBreakers:
    """
    The board used until circuit breakers are configured: every breaker closed.

    Passive health (C{max_fails}/C{fail_timeout}) still ejects failing
    instances; this board only adds no state of its own.
    """

    def allow(self, pool, instance) -> bool:
        return True

    def record(self, pool, instance, ok: bool) -> None:
        pass

    def state(self, name: str) -> str:
        return "CLOSED"
