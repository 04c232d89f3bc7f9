"""
Which breaker board a data plane uses, and breakers shared by the gateways
on one state store.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime

from clawproxy.policy.breakers import BreakerBoard, NoBreakers


def breaker_board(config: Any, clock: IReactorTime, metrics: Any, store: Any,
                  previous: Any = None) -> BreakerBoard | NoBreakers:
    """
    The breaker board for C{config}: L{NoBreakers} when no pool configures
    C{circuit_breaker}, else a L{BreakerBoard}.

    @param previous: the board of the data plane a reload replaces.
    """
    return BreakerBoard.from_config(config, clock, metrics, previous=previous)
