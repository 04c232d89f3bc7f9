"""
Per-request cost of adaptive throttling (C{rate_limits.adaptive}), in process.

    PYTHONPATH=. python3 bench/adaptive_cost.py

Times what a request to a pool pays: one latency sample per upstream attempt
(L{Pool.latency} into the pool's ring), the pool's factor between
evaluations, a tightened limit (cached), and one evaluation (the p95 of a
full ring of 512 and the GPU figure of the pool's instances), which runs at
most once a second per pool.
"""

from __future__ import annotations

import timeit

from twisted.internet.task import Clock

from clawproxy.backends.registry import Registry
from clawproxy.config import parse_config
from clawproxy.metrics import Metrics
from clawproxy.policy.limits import Limit, tightened
from clawproxy.units import Rate
from clawproxy.web.adaptive import Adaptive

N = 1_000_000


def main() -> None:
    cfg = parse_config({
        "pools": {"p": {"instances": [f"http://i{n}.test:1" for n in range(4)],
                        "health_check": {"enabled": False}}},
        "routes": [{"path": "/*", "pool": "p"}],
        "rate_limits": {"adaptive": {"latency_p95_above": "1s", "gpu_memory_above": 85}},
    }, environ={})
    clock = Clock()
    registry = Registry(cfg, clock)
    adaptive = Adaptive(cfg, registry, clock, Metrics())
    pool = registry.pools["p"]
    inst = pool.instances[0]
    for i in pool.instances:
        registry.probe_result(i, True, {"gpu_memory_used_percent": 50.0})
    t = timeit.timeit(lambda: pool.latency(inst, 0.5), number=N)
    print(f"latency sample per attempt:        {t / N * 1e9:6.0f} ns")
    t = timeit.timeit(lambda: adaptive.factor("p"), number=N)
    print(f"factor between evaluations:        {t / N * 1e9:6.0f} ns")
    limit = Limit.of("agent", "k", Rate(100, 60))
    t = timeit.timeit(lambda: tightened(limit, 0.6), number=N)
    print(f"tightened limit (cached):          {t / N * 1e9:6.0f} ns")
    state = adaptive.pools["p"]

    def evaluate() -> None:
        state.checked = -1e300
        adaptive.factor("p")

    n = 20_000
    t = timeit.timeit(evaluate, number=n)
    print(f"one evaluation (512 samples, 4 instances): {t / n * 1e6:.1f} us")


if __name__ == "__main__":
    main()
