"""
Per-request cost of circuit breakers and of the SSE event framer, in process.

    PYTHONPATH=. python3 bench/breaker_cost.py

Times L{Pool.take} + L{Pool.record} (the availability decision and one
outcome) over a pool of 4 instances without and with a ``circuit_breaker``
section, and L{EventFramer.data} per SSE event (whole, and split over two
chunks).
"""

from __future__ import annotations

import timeit
from typing import Any

from twisted.internet.task import Clock

from clawproxy.backends.registry import Registry
from clawproxy.config import parse_config
from clawproxy.interfaces import OK
from clawproxy.policy.breakers import BreakerBoard
from clawproxy.web.stream_errors import EventFramer

CHUNK = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":'
         b'[{"index":0,"delta":{"content":" hello"}}]}\n\n')


def config(breakers: bool) -> Any:
    pool: dict[str, Any] = {"instances": [{"id": f"i{n}", "url": f"http://i{n}.test"}
                                          for n in range(4)]}
    if breakers:
        pool["circuit_breaker"] = {}
    return parse_config({"pools": {"p": pool}, "routes": [{"path": "/*", "pool": "p"}]},
                        environ={})


def per_call(fn: Any, n: int) -> float:
    return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6


def main() -> None:
    for label, breakers in (("no circuit_breaker", False), ("circuit_breaker", True)):
        clock = Clock()
        cfg = config(breakers)
        board = BreakerBoard.from_config(cfg, clock)
        pool = Registry(cfg, clock, breakers=board).pools["p"]

        def one(pool: Any = pool) -> None:
            pool.record(pool.take(), OK)

        print(f"take + record, {label}: {per_call(one, 100_000):.2f} us")

    class Ctx:
        instance_id = "i"

    framer = EventFramer(Ctx())
    print(f"EventFramer.data, whole event: {per_call(lambda: framer.data(CHUNK), 500_000):.2f} us")
    a, b = CHUNK[:60], CHUNK[60:]
    print("EventFramer.data, event in two chunks: "
          f"{per_call(lambda: (framer.data(a), framer.data(b)), 200_000):.2f} us")


if __name__ == "__main__":
    main()
