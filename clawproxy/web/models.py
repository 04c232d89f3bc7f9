"""
The models section of C{/admin/status} (and of C{clawproxy status}): what
each pool serves (declared and discovered), its conversations remembered
and, for C{least_latency} pools, each instance's recent time to first byte.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from zope.interface import implementer

from clawproxy.interfaces import IAdminSection


@implementer(IAdminSection)
class ModelsSection:
    """What the gateway knows about models, pool by pool."""

    name = "models"

    def __init__(self, registry: Any, router: Any) -> None:
        self.registry = registry
        self.router = router

    def status(self) -> dict[str, Any]:
        pools: dict[str, Any] = {}
        for name, pool in self.registry.pools.items():
            entry: dict[str, Any] = {"declared": list(pool.config.models),
                                     "discovered": sorted(pool.discovered)}
            if pool.affinity is not None:
                entry["sessions"] = len(pool.affinity)
            ttfb = getattr(pool.balancer, "ttfb", None)
            if ttfb is not None:
                averages = {}
                for inst in pool.instances:
                    seconds = ttfb(inst.id)
                    if seconds is not None:
                        averages[inst.id] = round(seconds * 1000, 1)
                entry["ttfb_ms"] = averages
            pools[name] = entry
        return {
            "pools": pools,
            "aliases": dict(self.router.aliases),
            "fallbacks": {m: list(chain) for m, chain in self.router.fallbacks.items()},
        }

    @staticmethod
    def merge(statuses: list[dict[str, Any]]) -> dict[str, Any]:
        """
        The workers' sections as one (C{server.workers > 1}): time to first
        byte averaged over the workers that measured it, sessions summed,
        the models any worker discovered, the last worker's declarations.
        """
        from clawproxy.workers.sections import merge_statuses

        out = merge_statuses(statuses)
        for name, pool in out.get("pools", {}).items():
            mine = [s["pools"][name] for s in statuses if name in s.get("pools", {})]
            pool["declared"] = mine[-1].get("declared", [])
            pool["discovered"] = sorted({m for p in mine for m in p.get("discovered", ())})
            seen = [p.get("ttfb_ms") or {} for p in mine]
            ttfb: dict[str, float] = {}
            for inst in {i for t in seen for i in t}:
                values = [t[inst] for t in seen if inst in t]
                ttfb[inst] = round(sum(values) / len(values), 1)
            if "ttfb_ms" in pool:
                pool["ttfb_ms"] = ttfb
        for key in ("aliases", "fallbacks"):
            out[key] = statuses[-1].get(key, {})
        return out

    def endpoints(self) -> dict[Any, Any]:
        return {}


def models_parts(registry: Any, router: Any, **_: Any) -> Iterable[Any]:
    """The feature (L{clawproxy.web.dataplane.FEATURES}): the models section."""
    return (ModelsSection(registry, router),)
