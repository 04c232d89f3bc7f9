"""
Bounded soak: mixed normal, streaming and hostile traffic through a real
gateway for N minutes while one backend is killed and restarted every minute.

    python3 bench/soak.py --minutes 10 [--concurrency 32] [--out bench/out/soak.json]

Starts three ``clawproxy sim`` processes and ``twistd -n clawproxy`` on
loopback ports below the ephemeral range, drives load with asyncio (stdlib
only), samples the gateway's RSS and open file descriptors every 10 s, and
prints a summary. Pass criteria (issue 3): zero unexpected 5xx for healthy
backends, RSS growth under 10 % (from the first sample after warm-up to the
end), no file-descriptor growth.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GW_PORT, ADMIN_PORT, SIM_PORTS = 24080, 24901, (24501, 24502, 24503)
CHAT = {"model": "sim-small", "max_tokens": 16,
        "messages": [{"role": "user", "content": "soak test"}]}

INSTANCES = "\n".join(
    f'      - {{id: s{i + 1}, url: "http://127.0.0.1:{p}"}}' for i, p in enumerate(SIM_PORTS)
)
CONFIG = f"""
server: {{listen: ["tcp:{GW_PORT}:interface=127.0.0.1"], max_body_size: 64KB, head_timeout: 5s}}
admin: {{listen: "tcp:{ADMIN_PORT}:interface=127.0.0.1"}}
pools:
  sim:
    models: ["sim-*"]
    algorithm: least_connections
    instances:
{{instances}}
    health_check: {{path: /health, interval: 1s, timeout: 1s, healthy_threshold: 2,
                   unhealthy_threshold: 1}}
    retry: {{max_retries: 2, retry_on: [5xx, connect_failure, refused], base_delay: 10ms}}
    timeout: 10s
routes:
  - {{path: /v1/chat/completions, methods: [POST]}}
  - {{path: /v1/*, pool: sim}}
logging: {{output: "{{log}}"}}
"""

HOSTILE = [
    b"GET /v1/models HTTP/1.1\r\n\r\n",  # no Host
    b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /v1/%2e%2e%2Fsecret HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET http://evil.example/v1/models HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 999999\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX_Evil: 1\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n folded\r\n\r\n",
]


def start_sim(port: int, idx: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "clawproxy.cli", "sim", "--listen",
         f"tcp:{port}:interface=127.0.0.1", "--id", f"s{idx}", "--ttft", "20ms",
         "--tokens-per-second", "400", "--max-tokens", "16"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def proc_stats(pid: int) -> tuple[int, int]:
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def http(body: bytes, stream: bool) -> tuple[int, bool]:
    """POST a chat request; (status, complete?)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", GW_PORT)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\n"
                     b"Content-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        rest = await reader.read()
        if stream and status == 200:
            return status, rest.rstrip().endswith(b"0") and b"[DONE]" in rest
        return status, True
    finally:
        writer.close()


async def hostile(data: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", GW_PORT)
    try:
        writer.write(data)
        head = await reader.readuntil(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1])
    finally:
        writer.close()


async def worker(deadline: float, stats: dict, rng: random.Random) -> None:
    while time.monotonic() < deadline:
        roll = rng.random()
        try:
            if roll < 0.7:
                status, ok = await asyncio.wait_for(http(json.dumps(CHAT).encode(), False), 30)
                kind = "normal"
            elif roll < 0.9:
                body = json.dumps(dict(CHAT, stream=True)).encode()
                status, ok = await asyncio.wait_for(http(body, True), 30)
                kind = "stream"
                if status == 200 and not ok:
                    stats["stream_cut"] += 1
            else:
                status = await asyncio.wait_for(hostile(rng.choice(HOSTILE)), 30)
                kind = "hostile"
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
            stats["client_errors"][type(e).__name__] = stats["client_errors"].get(
                type(e).__name__, 0) + 1
            continue
        stats["requests"] += 1
        key = f"{kind}:{status}"
        stats["status"][key] = stats["status"].get(key, 0) + 1
        if kind != "hostile" and status >= 500:
            stats["unexpected_5xx"] += 1
        if kind == "hostile" and not 400 <= status < 500 and status != 501:
            stats["hostile_not_refused"] += 1


async def wait_port(port: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"port {port} did not open")


async def main(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="clawsoak-"))
    access = tmp / "access.log"
    cfg = tmp / "gateway.yaml"
    cfg.write_text(CONFIG.replace("{log}", str(access)).replace("{instances}", INSTANCES))
    sims = [start_sim(p, i + 1) for i, p in enumerate(SIM_PORTS)]
    gw = subprocess.Popen(["twistd", "-n", "--pidfile=", "clawproxy", "-c", str(cfg)],
                          stdout=open(tmp / "twistd.log", "w"), stderr=subprocess.STDOUT)
    stats = {"requests": 0, "status": {}, "unexpected_5xx": 0, "stream_cut": 0,
             "hostile_not_refused": 0, "client_errors": {}, "restarts": 0, "samples": []}
    try:
        for p in (*SIM_PORTS, GW_PORT):
            await wait_port(p, 15)
        rng = random.Random(42)
        duration = args.minutes * 60
        start = time.monotonic()
        deadline = start + duration
        workers = [asyncio.create_task(worker(deadline, stats, random.Random(i)))
                   for i in range(args.concurrency)]
        next_restart = start + 60
        next_sample = start + 10
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if now >= next_sample:
                rss, fds = proc_stats(gw.pid)
                stats["samples"].append({"t": round(now - start), "rss_kb": rss, "fds": fds})
                next_sample += 10
            if now >= next_restart and now < deadline - 15:
                i = rng.randrange(len(sims))
                sims[i].send_signal(signal.SIGKILL)
                sims[i].wait(10)
                await asyncio.sleep(2)
                sims[i] = start_sim(SIM_PORTS[i], i + 1)
                stats["restarts"] += 1
                next_restart += 60
        await asyncio.wait_for(asyncio.gather(*workers), 60)
        await asyncio.sleep(2)
        rss, fds = proc_stats(gw.pid)
        stats["samples"].append({"t": round(time.monotonic() - start), "rss_kb": rss,
                                 "fds": fds})
    finally:
        gw.send_signal(signal.SIGTERM)
        try:
            gw.wait(30)
        except subprocess.TimeoutExpired:
            gw.kill()
        for s in sims:
            s.kill()
            s.wait(10)
    samples = stats["samples"]
    base = samples[min(1, len(samples) - 1)]  # first sample after ~20 s of warm-up
    end = samples[-1]
    stats["rss_growth_percent"] = round((end["rss_kb"] - base["rss_kb"]) * 100 / base["rss_kb"], 2)
    stats["fd_growth"] = end["fds"] - base["fds"]
    lines = access.read_text().splitlines() if access.exists() else []
    stats["access_log_lines"] = len(lines)
    stats["access_log_invalid"] = sum(1 for line in lines if not _is_json(line))
    stats["pass"] = (stats["unexpected_5xx"] == 0 and stats["rss_growth_percent"] < 10
                     and stats["fd_growth"] <= 0 and stats["hostile_not_refused"] == 0)
    out = json.dumps(stats, indent=2)
    print(out)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(out)
    return 0 if stats["pass"] else 1


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", default="bench/out/soak.json")
    sys.exit(asyncio.run(main(parser.parse_args())))
