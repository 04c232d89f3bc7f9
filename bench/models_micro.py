"""
Per-request costs of issue 10's model features, in process (no sockets):
a balancer pick (least_latency against least_connections) and the
conversation key of a chat request.

    PYTHONPATH=. python3 bench/models_micro.py
"""

from __future__ import annotations

import timeit

import attrs
from twisted.internet.task import Clock

from clawproxy.policy.affinity import conversation_key
from clawproxy.policy.balancers import make_balancer

N = 100_000


@attrs.define
class Inst:
    id: str
    weight: float = 1.0
    active: int = 0


def per_call(f: object) -> float:
    """Microseconds per call, best of 5 runs of N calls."""
    return min(timeit.repeat(f, number=N, repeat=5)) / N * 1e6  # type: ignore[arg-type]


def main() -> None:
    for n in (3, 16):
        candidates = [Inst(f"i{k}", 1.0, k % 3) for k in range(n)]
        for name in ("least_connections", "least_latency"):
            balancer = make_balancer(name, clock=Clock())
            if name == "least_latency":
                for k, c in enumerate(candidates):
                    balancer.observe(c.id, 0.05 + 0.01 * k)  # type: ignore[attr-defined]
            us = per_call(lambda b=balancer, c=candidates: b.pick(c))
            print(f"{name:18s} {n:2d} instances: {us:6.2f} us/pick")
    body = {"model": "m", "messages": [
        {"role": "system", "content": "You are a helpful assistant. " * 20},
        {"role": "user", "content": "Summarise this document. " * 50},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]}
    fingerprint = per_call(lambda: conversation_key(None, body))
    session = per_call(lambda: conversation_key("abc-123", None))
    print(f"conversation_key, fingerprint of 1.8 KB: {fingerprint:6.2f} us")
    print(f"conversation_key, X-Session-ID:          {session:6.2f} us")


if __name__ == "__main__":
    main()
