"""
Run a Twisted proxy with a timeline of what its reactor does during a burst.

    python bench/burst_trace.py OUT.json -- twistd -n --pidfile= clawproxy -c CONFIG
    python bench/burst_trace.py OUT.json -- bench/bare_relay.py PORT BACKEND
    python bench/burst_trace.py --summary OUT.json

Patches only generic Twisted points, so both proxies are traced the same way:
C{accept} (connections accepted per listening-port read), C{request} (a client
request's body complete: the resource runs next), C{upstream} (a request
written to a backend connection), C{connect} (a new backend connection made),
C{head} (a backend response head parsed), C{first} (the first body write to a
client), C{gc0}/C{gc1}/C{gc2} (collections of each generation, with their length in
microseconds), C{poll} (one reactor poll: how many events it returned). The events
are written to OUT.json when the reactor stops (SIGTERM). C{--summary} prints,
for the last burst, when each phase started and ended and its mean cost per
event: where the time before the first byte goes.
"""

from __future__ import annotations

import cProfile
import gc
import json
import os
import runpy
import sys
import time


def install(out: str) -> None:
    from twisted.internet import epollreactor, tcp
    from twisted.web import _newclient, http

    profile_out = os.environ.get("BURST_CPROFILE")
    profiler = cProfile.Profile() if profile_out else None
    ev: list[tuple[str, float, int]] = (
        _Window(int(os.environ.get("BURST_STREAMS", "400")), profiler) if profiler else [])
    clock = time.perf_counter

    def wrap(cls, name, kind, count=None, once=None):
        orig = getattr(cls, name)

        def patched(self, *a, **kw):
            if once is not None:
                if getattr(self, once, False):
                    return orig(self, *a, **kw)
                setattr(self, once, True)
            before = count(self) if count else 0
            result = orig(self, *a, **kw)
            ev.append((kind, clock(), (count(self) - before) if count else 1))
            return result

        setattr(cls, name, patched)

    wrap(tcp.Port, "doRead", "accept", count=lambda p: p.sessionno)
    wrap(http.HTTPChannel, "allContentReceived", "request")
    wrap(_newclient.HTTP11ClientProtocol, "request", "upstream")
    wrap(_newclient.HTTP11ClientProtocol, "connectionMade", "connect")
    wrap(_newclient.HTTPClientParser, "allHeadersReceived", "head")
    wrap(http.Request, "write", "first", once="_trace_wrote")
    poll = epollreactor.EPollReactor.doPoll

    def do_poll(self, timeout):
        n = len(ev)
        poll(self, timeout)
        if len(ev) > n:  # only polls that did some traced work
            ev.insert(n, ("poll", clock(), len(ev) - n))

    epollreactor.EPollReactor.doPoll = epollreactor.EPollReactor.doIteration = do_poll

    gc_start = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_start[0] = clock()
        else:
            ev.append((f"gc{info['generation']}", clock(), round((clock() - gc_start[0]) * 1e6)))

    gc.callbacks.append(on_gc)

    from twisted.internet import reactor

    def dump() -> None:
        with open(out, "w") as f:
            json.dump(ev, f)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile_out)

    reactor.addSystemEventTrigger("before", "shutdown", dump)


class _Window(list):
    """The event list, also switching a profiler on at a burst's first accept
    and off at its last first byte (warm bursts only: the first is skipped)."""

    def __init__(self, streams: int, profiler: cProfile.Profile) -> None:
        super().__init__()
        self.streams = streams
        self.profiler = profiler
        self.last = 0.0
        self.bursts = 0
        self.on = False
        self.firsts = 0

    def append(self, e: tuple) -> None:  # type: ignore[override]
        kind, t, _ = e
        if kind == "accept" and not self.on and t - self.last > 0.5:
            self.bursts += 1
            if self.bursts > 1:
                self.on, self.firsts = True, 0
                self.profiler.enable()
        self.last = t
        super().append(e)
        if kind == "first" and self.on:
            self.firsts += 1
            if self.firsts >= self.streams:
                self.profiler.disable()
                self.on = False


def summary(path: str) -> None:
    with open(path) as f:
        ev = sorted(json.load(f), key=lambda e: e[1])
    bursts: list[list] = [[]]
    for e in ev:
        if bursts[-1] and e[1] - bursts[-1][-1][1] > 0.5:
            bursts.append([])
        bursts[-1].append(e)
    def requests(b: list) -> int:
        return sum(1 for e in b if e[0] == "request")

    most = max(map(requests, bursts))
    burst = [b for b in bursts if requests(b) >= most / 2][-1]  # not a health check
    t0 = burst[0][1]
    print(f"{len(bursts)} bursts; the last one, times in ms from its first event:")
    print(f"{'phase':9s} {'events':>7s} {'start':>8s} {'end':>8s} {'ms/event':>9s}")
    for kind in ("accept", "request", "upstream", "connect", "head", "first"):
        xs = [e for e in burst if e[0] == kind]
        if not xs:
            continue
        n = sum(e[2] for e in xs)
        start, end = (xs[0][1] - t0) * 1000, (xs[-1][1] - t0) * 1000
        print(f"{kind:9s} {n:7d} {start:8.1f} {end:8.1f} {(end - start) / max(1, n - 1):9.3f}")
    for g in ("gc0", "gc1", "gc2"):
        xs = [e[2] for e in burst if e[0] == g]
        if xs:
            print(f"{g}: {len(xs)} collections, {sum(xs) / 1000:.1f} ms in all, "
                  f"longest {max(xs) / 1000:.1f} ms")
    polls = [e[2] for e in burst if e[0] == "poll"]
    print(f"polls with work: {len(polls)}; largest: {sorted(polls)[-5:]}")
    firsts = [(e[1] - t0) * 1000 for e in burst if e[0] == "first"]
    if firsts:
        print(f"first bytes: mean {sum(firsts) / len(firsts):.1f} ms after the burst's first event")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--summary"]:
        summary(argv[1])
        return
    out, sep, *cmd = argv
    assert sep == "--", __doc__
    install(out)
    sys.argv = cmd
    if cmd[0].endswith(".py"):
        runpy.run_path(cmd[0], run_name="__main__")
    else:
        from twisted.scripts.twistd import run
        sys.argv[0] = "twistd"
        run()


if __name__ == "__main__":
    main(sys.argv[1:])
