"""
Bounded load generators for bench/run.sh (stdlib asyncio only, loopback only).

    python bench/loadgen.py rate  --port P --rate 500 --duration 20
    python bench/loadgen.py sse   --port P --streams 2000 --ramp 8 --tokens 24
    python bench/loadgen.py idle  --port P --conns 5000 --pid PID
    python bench/loadgen.py burst --port P --streams 400 --events 50 --rounds 3

Each prints one JSON object on stdout.

C{rate} is open loop: request M{i} is due at M{start + i / rate} whatever happened
to the earlier ones, and its latency is measured from that due time (so a
stalled proxy cannot hide its queue: no coordinated omission). A due request
takes an idle keep-alive connection, or opens a new one.

C{sse} opens C{streams} streaming chat requests, evenly spread over C{ramp}
seconds, each asking for C{tokens} tokens; the backend's token rate makes each
stream outlive the ramp, so all of them are open together at the end. TTFB
is the time from writing the request to the first C{data:} byte.

C{burst} opens C{streams} connections, waits until all are connected (and
C{settle} seconds more, so the server has accepted them), then writes every
request in one go: no ramp. Each stream's TTFB runs from its own write to the
first C{data:} byte, its total time to C{data: [DONE]}. It does this
C{rounds} times, C{pause} seconds apart, on new connections each time: the
first round meets a proxy with no pooled upstream connections (cold), the
later ones a warm pool.

C{idle} opens C{conns} keep-alive connections, makes one request on each
(C{concurrency} at a time), leaves them idle and reports the growth of the
server process's VmRSS divided by the number of connections.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import sys
import time
from collections import deque

CHAT = (b'{"model":"bench-model","messages":[{"role":"user","content":"Say hello."}],'
        b'"max_tokens":16}')


def request_bytes(host: str, port: int, path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer sk-bench\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def summary_ms(values: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, p in (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9), ("max", 100)):
        v = percentile(values, p)
        out[name] = None if v is None else round(v * 1000, 3)
    return out


class HTTPConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request in flight."""

    def __init__(self, on_response, on_lost) -> None:
        self.on_response = on_response
        self.on_lost = on_lost
        self.transport = None
        self.buf = bytearray()
        self.busy = False
        self.closed = False
        self.tag = None
        self._head_end = -1
        self._want = -1

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, data: bytes, tag) -> None:
        self.busy = True
        self.tag = tag
        self.buf.clear()
        self._head_end = self._want = -1
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self._head_end < 0:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                return
            self._head_end = i + 4
            head = bytes(buf[:i]).lower()
            self._status = int(head[9:12])
            j = head.find(b"content-length:")
            if j >= 0:
                e = head.find(b"\r\n", j)
                self._want = self._head_end + int(head[j + 15:e if e > 0 else len(head)])
            else:
                self._want = -2  # chunked: ends with the zero chunk
        if self._want >= 0:
            done = len(buf) >= self._want
        else:
            done = buf.endswith(b"0\r\n\r\n")
        if done:
            self.busy = False
            tag, status = self.tag, self._status
            self.tag = None
            self.on_response(self, tag, status)

    def connection_lost(self, exc) -> None:
        self.closed = True
        was_busy, tag = self.busy, self.tag
        self.busy = False
        self.on_lost(self, tag if was_busy else None)


# -- fixed rate ---------------------------------------------------------------


async def run_rate(a: argparse.Namespace) -> dict:
    loop = asyncio.get_running_loop()
    req = request_bytes(a.host, a.port, a.path, CHAT)
    idle: deque[HTTPConn] = deque()
    backlog: deque[float] = deque()
    latencies: list[float] = []
    service: list[float] = []
    errors = {"status": 0, "lost": 0, "connect": 0}
    state = {"outstanding": 0, "conns": 0}
    all_done = asyncio.Event()
    total = int(a.rate * a.duration)

    def dispatch(conn: HTTPConn, due: float) -> None:
        conn.send(req, (due, loop.time()))

    def on_response(conn: HTTPConn, tag, status: int) -> None:
        now = loop.time()
        due, sent = tag
        latencies.append(now - due)
        service.append(now - sent)
        if status != 200:
            errors["status"] += 1
        finished()
        if backlog:
            dispatch(conn, backlog.popleft())
        else:
            idle.append(conn)

    def on_lost(conn: HTTPConn, tag) -> None:
        state["conns"] -= 1
        if conn in idle:
            idle.remove(conn)
        if tag is not None:
            errors["lost"] += 1
            finished()

    def finished() -> None:
        state["outstanding"] -= 1
        if state["outstanding"] == 0 and sent_all[0]:
            all_done.set()

    async def new_conn(due: float | None) -> None:
        state["conns"] += 1
        try:
            _, conn = await loop.create_connection(
                lambda: HTTPConn(on_response, on_lost), a.host, a.port)
        except OSError:
            state["conns"] -= 1
            errors["connect"] += 1
            if due is not None:
                finished()
            return
        if due is not None:
            dispatch(conn, due)
        elif backlog:
            dispatch(conn, backlog.popleft())
        else:
            idle.append(conn)

    sent_all = [False]
    opening: set[asyncio.Task] = set()
    await asyncio.gather(*(new_conn(None) for _ in range(a.connections)))
    start = loop.time() + 0.2
    i = 0
    while i < total:
        now = loop.time()
        due = start + i / a.rate
        if due > now:
            await asyncio.sleep(due - now)
            continue
        while i < total and start + i / a.rate <= now:
            due = start + i / a.rate
            i += 1
            state["outstanding"] += 1
            if idle:
                dispatch(idle.popleft(), due)
            elif state["conns"] < a.max_connections:
                opening.add(task := loop.create_task(new_conn(due)))
                task.add_done_callback(opening.discard)
            else:
                backlog.append(due)
    sent_all[0] = True
    if state["outstanding"]:
        try:
            await asyncio.wait_for(all_done.wait(), a.drain_timeout)
        except asyncio.TimeoutError:
            errors["timeout"] = state["outstanding"]
    elapsed = loop.time() - start
    return {
        "test": "rate", "target_rate": a.rate, "requests": total, "completed": len(latencies),
        "achieved_rate": round(len(latencies) / elapsed, 1), "connections_used": state["conns"],
        "latency_ms": summary_ms(latencies), "service_ms": summary_ms(service), "errors": errors,
    }


# -- SSE streams ----------------------------------------------------------------


class SSEStream(asyncio.Protocol):
    def __init__(self, test: dict, req: bytes) -> None:
        self.test = test
        self.req = req
        self.sent = 0.0
        self.ttfb: float | None = None
        self.tail = b""
        self.events = 0
        self.done = False
        self.status = 0
        self.open = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.sent = time.perf_counter()
        transport.write(self.req)

    def data_received(self, data: bytes) -> None:
        t = self.test
        if self.ttfb is None:
            self.tail += data
            if not self.status and len(self.tail) >= 12:
                self.status = int(self.tail[9:12])
            if b"data:" in self.tail:
                self.ttfb = time.perf_counter() - self.sent
                self.open = True
                t["open"] += 1
                t["peak_open"] = max(t["peak_open"], t["open"])
                if t["open"] == t["streams"]:
                    t["all_open_at"] = time.perf_counter()
                data = self.tail
                self.tail = b""
            else:
                return
        window = self.tail + data
        self.events += window.count(b"data:") - self.tail.count(b"data:")
        self.tail = window[-16:]
        if b"data: [DONE]" in window:
            self.done = True
            self.transport.close()

    def connection_lost(self, exc) -> None:
        t = self.test
        if self.open:
            t["open"] -= 1
            self.open = False
        t["finished"] += 1
        if t["finished"] == t["streams"]:
            t["all_finished"].set()


async def run_sse(a: argparse.Namespace) -> dict:
    loop = asyncio.get_running_loop()
    body = (b'{"model":"sim-stream","stream":true,"max_tokens":%d,'
            b'"messages":[{"role":"user","content":"stream please"}]}' % a.tokens)
    req = request_bytes(a.host, a.port, a.path, body, "Accept: text/event-stream\r\n")
    test = {"streams": a.streams, "open": 0, "peak_open": 0, "finished": 0,
            "all_finished": asyncio.Event(), "all_open_at": None}
    streams: list[SSEStream] = []
    connect_errors = 0
    start = loop.time() + 0.2

    async def one(i: int) -> None:
        nonlocal connect_errors
        await asyncio.sleep(max(0.0, start + i * a.ramp / a.streams - loop.time()))
        s = SSEStream(test, req)
        streams.append(s)
        try:
            await loop.create_connection(lambda: s, a.host, a.port)
        except OSError:
            connect_errors += 1
            test["finished"] += 1
            if test["finished"] == a.streams:
                test["all_finished"].set()

    t0 = time.perf_counter()
    tasks = [loop.create_task(one(i)) for i in range(a.streams)]
    timeout = a.ramp + a.tokens / a.token_rate + a.drain_timeout
    try:
        await asyncio.wait_for(test["all_finished"].wait(), timeout)
    except asyncio.TimeoutError:
        pass
    for t in tasks:
        t.cancel()
    for s in streams:
        if not s.done and getattr(s, "transport", None) is not None:
            s.transport.abort()
    ttfbs = [s.ttfb for s in streams if s.ttfb is not None]
    expected = a.tokens + 3  # role chunk, tokens, finish chunk, [DONE]
    complete = sum(1 for s in streams if s.done and s.status == 200 and s.events == expected)
    all_open = test["all_open_at"]
    return {
        "test": "sse", "streams": a.streams, "ramp_s": a.ramp, "tokens": a.tokens,
        "started": len(streams), "got_first_byte": len(ttfbs), "peak_open": test["peak_open"],
        "all_open_after_s": None if all_open is None else round(all_open - t0, 2),
        "completed_ok": complete, "connect_errors": connect_errors,
        "bad_status": sum(1 for s in streams if s.status and s.status != 200),
        "ttfb_ms": summary_ms(ttfbs),
    }


# -- burst: N streams at the same instant ----------------------------------------


class BurstStream(asyncio.Protocol):
    def __init__(self, on_end) -> None:
        self.on_end = on_end
        self.transport = None
        self.buf = bytearray()
        self.scan = 0
        self.sent = 0.0
        self.first: float | None = None
        self.end: float | None = None
        self.ok = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.first is None and buf.find(b"data:", max(0, self.scan - 5)) >= 0:
            self.first = time.perf_counter()
        if buf.find(b"data: [DONE]", max(0, self.scan - 12)) >= 0:
            self.end = time.perf_counter()
            self.ok = True
            self.transport.close()
        self.scan = len(buf)

    def connection_lost(self, exc) -> None:
        if self.end is None:
            self.end = time.perf_counter()
        self.on_end()


def _mean_ms(values: list[float]) -> float | None:
    return round(sum(values) / len(values) * 1000, 3) if values else None


async def burst_round(a: argparse.Namespace, req: bytes) -> dict:
    loop = asyncio.get_running_loop()
    left = [a.streams]
    all_ended = asyncio.Event()

    def on_end() -> None:
        left[0] -= 1
        if left[0] == 0:
            all_ended.set()

    streams = [BurstStream(on_end) for _ in range(a.streams)]
    results = await asyncio.gather(
        *(loop.create_connection(lambda s=s: s, a.host, a.port) for s in streams),
        return_exceptions=True)
    connect_errors = sum(1 for r in results if isinstance(r, BaseException))
    left[0] -= connect_errors
    live = [s for s, r in zip(streams, results) if not isinstance(r, BaseException)]
    await asyncio.sleep(a.settle)
    # The burst: every request written in one go, each write timed.
    clock = time.perf_counter
    for s in live:
        s.sent = clock()
        s.transport.write(req)
    sent_spread = (live[-1].sent - live[0].sent) if live else 0.0
    try:
        await asyncio.wait_for(all_ended.wait(), a.events * a.interval + a.drain_timeout)
    except asyncio.TimeoutError:
        pass
    for s in live:
        if s.end is None:
            s.transport.abort()
    events_ok = 0
    for s in live:
        if s.ok and s.buf.startswith(b"HTTP/1.1 200") and s.buf.count(b"data:") == a.events:
            events_ok += 1
    ttfb = [s.first - s.sent for s in live if s.first is not None]
    total = [s.end - s.sent for s in live if s.ok]
    ends = [s.end for s in live if s.ok]
    return {
        "streams": a.streams, "connect_errors": connect_errors, "first_byte": len(ttfb),
        "completed_ok": events_ok, "send_spread_ms": round(sent_spread * 1000, 3),
        "ttfb_mean_ms": _mean_ms(ttfb), "ttfb_ms": summary_ms(ttfb),
        "total_mean_ms": _mean_ms(total), "total_ms": summary_ms(total),
        "wall_ms": round((max(ends) - live[0].sent) * 1000, 3) if ends else None,
        "_ttfb": ttfb, "_total": total,
    }


async def run_burst(a: argparse.Namespace) -> dict:
    body = (b'{"model":"sim-stream","stream":true,'
            b'"messages":[{"role":"user","content":"stream please"}]}')
    req = request_bytes(a.host, a.port, a.path, body, "Accept: text/event-stream\r\n")
    rounds = []
    for i in range(a.rounds):
        if i:
            await asyncio.sleep(a.pause)
        r = await burst_round(a, req)
        # Raw per-stream figures, so runs can be pooled (bench/burst_report.py).
        r["ttfb_raw_ms"] = [round(x * 1000, 3) for x in r.pop("_ttfb")]
        r["total_raw_ms"] = [round(x * 1000, 3) for x in r.pop("_total")]
        rounds.append(r)
    return {"test": "burst", "streams": a.streams, "events": a.events,
            "interval_s": a.interval, "rounds": rounds}


# -- idle keep-alive memory -----------------------------------------------------


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


async def open_with_request(a, loop, req, sem, conns, bad) -> None:
    async with sem:
        done = loop.create_future()

        def on_response(conn, tag, status):
            if status != 200:
                bad["status"] += 1
            if not done.done():
                done.set_result(True)

        def on_lost(conn, tag):
            if not done.done():
                done.set_result(False)

        try:
            _, conn = await loop.create_connection(
                lambda: HTTPConn(on_response, on_lost), a.host, a.port)
        except OSError:
            bad["connect"] += 1
            return
        conn.send(req, None)
        try:
            await asyncio.wait_for(done, 10)
        except asyncio.TimeoutError:
            bad["timeout"] += 1
        conns.append(conn)


async def run_idle(a: argparse.Namespace) -> dict:
    loop = asyncio.get_running_loop()
    req = request_bytes(a.host, a.port, a.path, CHAT)
    bad = {"status": 0, "connect": 0, "timeout": 0}
    sem = asyncio.Semaphore(a.concurrency)
    # Warm up: the same concurrency, so the proxy's upstream pool and its
    # allocator have grown to their steady size before the baseline.
    for _ in range(3):
        warm: list[HTTPConn] = []
        await asyncio.gather(*(open_with_request(a, loop, req, sem, warm, bad)
                               for _ in range(a.concurrency * 4)))
        for c in warm:
            c.transport.close()
        await asyncio.sleep(0.3)
    await asyncio.sleep(1.0)
    before = vm_rss_kib(a.pid)
    conns: list[HTTPConn] = []
    await asyncio.gather(*(open_with_request(a, loop, req, sem, conns, bad)
                           for _ in range(a.conns)))
    await asyncio.sleep(a.settle)
    after = vm_rss_kib(a.pid)
    alive = sum(1 for c in conns if not c.closed)
    for c in conns:
        c.transport.close()
    await asyncio.sleep(0.5)
    return {
        "test": "idle", "conns": a.conns, "alive": alive, "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_conn": round((after - before) / max(1, alive), 2), "errors": bad,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="test", required=True)
    for name in ("rate", "sse", "idle", "burst"):
        s = sub.add_parser(name)
        s.add_argument("--host", default="127.0.0.1")
        s.add_argument("--port", type=int, required=True)
        s.add_argument("--path", default="/v1/chat/completions")
        s.add_argument("--drain-timeout", type=float, default=10.0)
        s.add_argument("--label", default="")
        if name == "rate":
            s.add_argument("--rate", type=float, default=500.0)
            s.add_argument("--duration", type=float, default=20.0)
            s.add_argument("--connections", type=int, default=16, help="opened up front")
            s.add_argument("--max-connections", type=int, default=256)
        elif name == "sse":
            s.add_argument("--streams", type=int, default=2000)
            s.add_argument("--ramp", type=float, default=8.0)
            s.add_argument("--tokens", type=int, default=24)
            s.add_argument("--token-rate", type=float, default=2.0,
                           help="the backend's tokens per second (for the time bound)")
        elif name == "burst":
            s.add_argument("--streams", type=int, default=400)
            s.add_argument("--events", type=int, default=50,
                           help="the backend's events per stream, [DONE] included")
            s.add_argument("--interval", type=float, default=0.02,
                           help="the backend's seconds between events (for the time bound)")
            s.add_argument("--rounds", type=int, default=3, help="bursts, on new connections")
            s.add_argument("--pause", type=float, default=1.0, help="seconds between bursts")
            s.add_argument("--settle", type=float, default=0.5,
                           help="seconds between the last connect and the burst")
        else:
            s.add_argument("--conns", type=int, default=5000)
            s.add_argument("--concurrency", type=int, default=50)
            s.add_argument("--pid", type=int, required=True)
            s.add_argument("--settle", type=float, default=2.0)
    a = p.parse_args(argv)
    # The load generator must not pause for its own collector; what it keeps
    # is bounded by one run.
    gc.disable()
    run = {"rate": run_rate, "sse": run_sse, "idle": run_idle, "burst": run_burst}[a.test]
    result = asyncio.run(run(a))
    result["label"] = a.label
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
