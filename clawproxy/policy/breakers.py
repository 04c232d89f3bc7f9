"""Breaker boards: circuit breakers as one availability policy of the registry."""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from clawproxy.interfaces import IBreakerBoard


@implementer(IBreakerBoard)
class NoBreakers:
    """
    The board used until circuit breakers are configured: every breaker closed.

    Passive health (C{max_fails}/C{fail_timeout}) still ejects failing
    instances; this board excludes nothing, admits everything and keeps no
    state.
    """

    def excludes(self, instance: Any) -> bool:
        return False

    def admit(self, instance: Any) -> bool:
        return True

    def record(self, instance: Any, outcome: str, reached: bool) -> None:
        pass

    def probed(self, instance: Any, ok: bool) -> None:
        pass

    def state(self, name: str) -> str:
        return "CLOSED"
