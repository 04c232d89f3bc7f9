"""
The parent's view of the data plane's admin sections: the parent of
C{server.workers > 1} serves C{/admin/status} but no traffic, so a section
built from in-process counters (tokens per second, cache hits, breakers...)
would show only the parent's own, idle, view. Each worker sends its
sections' C{status()} with its figures (L{clawproxy.workers.child.worker_status});
the parent shows, under each section's name, the merge of its workers'.

A section merges its workers' statuses with its own C{merge(statuses)} when
it has one (see L{clawproxy.interfaces.IAdminSection}), else with
L{merge_statuses}: numbers summed, equal values kept, other values listed
per worker. A section no worker reported yet shows the parent's status.
The section's endpoints stay the parent's own (they act on the shared store).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from zope.interface import implementer

from clawproxy.interfaces import IAdminSection


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def merge_statuses(statuses: Sequence[Any]) -> Any:
    """
    The default merge of the workers' statuses of one section (in worker
    order): mappings merged key by key (a key some workers lack is merged
    over those that have it), numbers summed, values equal in every worker
    kept, anything else a list of each worker's value.
    """
    if not statuses:
        return None
    if all(isinstance(s, dict) for s in statuses):
        keys: dict[str, None] = {}
        for s in statuses:
            keys.update(dict.fromkeys(s))
        return {k: merge_statuses([s[k] for s in statuses if k in s]) for k in keys}
    if all(_number(s) for s in statuses):
        total = sum(statuses)
        return round(total, 6) if isinstance(total, float) else total
    first = statuses[0]
    if all(s == first for s in statuses[1:]):
        return first
    return list(statuses)


@implementer(IAdminSection)
class MergedSection:
    """
    A data-plane section as the parent shows it: its workers' statuses,
    merged (the section's C{merge}, else L{merge_statuses}).

    @param statuses: returns the workers' latest statuses of a section, by name.
    """

    def __init__(self, section: Any, statuses: Any) -> None:
        self.section = section
        self.name = section.name
        self._statuses = statuses

    def reported(self) -> list[Any]:
        """The workers' latest statuses of this section (none before they report)."""
        return self._statuses(self.name)

    def status(self) -> Any:
        statuses = self.reported()
        if not statuses:
            return self.section.status()
        merge = getattr(self.section, "merge", None)
        return merge(statuses) if merge is not None else merge_statuses(statuses)

    def endpoints(self) -> dict[Any, Any]:
        return self.section.endpoints()


class MergedBreakers:
    """
    The parent's breakers as the admin API reads them (C{state}, C{describe}):
    the workers' merged C{circuit_breakers} section, where it names the
    breaker; else the parent's own board (which sees no traffic).
    """

    def __init__(self, board: Any, section: MergedSection) -> None:
        self.board = board
        self.section = section

    def _merged(self, name: str) -> dict[str, Any] | None:
        if not self.section.reported():
            return None
        found = self.section.status().get(name)
        return found if isinstance(found, dict) else None

    def state(self, name: str) -> str:
        merged = self._merged(name)
        return merged["state"] if merged is not None else self.board.state(name)

    def describe(self, name: str) -> dict[str, Any] | None:
        merged = self._merged(name)
        if merged is not None:
            return merged
        describe = getattr(self.board, "describe", None)
        return describe(name) if describe is not None else None


__all__ = ["MergedBreakers", "MergedSection", "merge_statuses"]
