"""
HTTP/1.1 edge hardening, round two (issue 7): a client that pipelines
without reading, and one client address filling the connection cap.

The pipelining test runs the gateway as a real C{twistd clawproxy}
subprocess, so its RSS (read from C{/proc/PID/status}) is the gateway's
alone; every wait is bounded.
"""

from __future__ import annotations

import re
import socket

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tests.integration.edge import Recorder
from tests.integration.helpers import (
    Harness,
    Process,
    RawClient,
    bounded,
    cpu_seconds,
    error_of,
    parse_response,
    response_complete,
    rss,
    tick,
    wait_for,
)
from tests.integration.test_process import TWISTD, listening

#: The pipelining gateway must stop answering within this many seconds.
STOP_WITHIN = 15.0
#: How long it is then watched staying idle, in seconds.
QUIET = 1.0
#: The RSS growth the gateway may show meanwhile (issue 7).
RSS_BOUND = 50 * 1024 * 1024

_ID = re.compile(rb"\r\nX-Request-Id: p(\d+)\r\n", re.IGNORECASE)


@implementer(IPushProducer)
class Pipeliner(Protocol):
    """
    Writes pipelined C{GET /health} requests, each with its own
    C{X-Request-ID} (C{p0}, C{p1}, ...), as fast as its socket takes them,
    and reads nothing until told to.
    """

    BATCH = 200

    def __init__(self) -> None:
        self.sent = 0
        self.paused = False
        self.writing = True
        self.data = bytearray()
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        # Small socket buffers on this side keep the test short: fewer
        # requests and answers wait in the kernel.
        sock = self.transport.getHandle()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.transport.pauseProducing()  # stop reading: never take an answer
        self.transport.registerProducer(self, True)
        self._write()

    def _write(self) -> None:
        while self.writing and not self.paused and self.lost is None:
            batch = b"".join(
                b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Request-ID: p%d\r\n\r\n" % n
                for n in range(self.sent, self.sent + self.BATCH))
            self.sent += self.BATCH
            self.transport.write(batch)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        reactor.callLater(0, self._write)

    def stopProducing(self) -> None:
        self.writing = False

    def read(self) -> None:
        """Stop writing and start reading the answers."""
        self.writing = False
        self.transport.unregisterProducer()
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = reason


GATEWAY = """\
server:
  listen: ["tcp:0:interface=127.0.0.1"]
admin:
  listen: "tcp:0:interface=127.0.0.1"
pools:
  p:
    instances:
      - {{id: b-1, url: "{backend}"}}
    health_check: {{enabled: false}}
routes:
  - path: /v1/*
    pool: p
logging:
  output: access.log
"""


async def twistd_gateway(h: Harness, *python: str) -> tuple[Process, int]:
    """
    A C{twistd clawproxy} subprocess (C{sys.executable PYTHON...}) in front of
    a L{Recorder}, with the L{GATEWAY} config; the process and its data port.
    """
    backend = h.serve(Recorder(), "recorder")
    with open(h.path("gateway.yaml"), "w") as f:
        f.write(GATEWAY.format(backend=backend.url))
    proc = h.spawn(*python, "-n", "--pidfile=", "clawproxy", "-c", "gateway.yaml")
    return proc, await listening(proc, "clawproxy data plane")


def answered(h: Harness) -> int:
    """Lines in the subprocess gateway's access log so far (one per answered request)."""
    try:
        with open(h.path("access.log"), "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


class PipeliningTests(TestCase):
    timeout = 60

    async def test_pipelining_without_reading_is_bounded(self) -> None:
        """
        A client that writes pipelined C{GET /health} requests and reads
        nothing: the gateway stops reading the connection once its answers
        back up (within a few seconds it answers no more and uses no CPU;
        it answers only about as many requests as the socket buffers hold)
        and its RSS grows by less than 50 MB; when the client then reads,
        it gets a 200 for every request it wrote, in order.
        """
        h = Harness(self)
        proc, port = await twistd_gateway(h, *TWISTD)
        pid = proc.pid
        assert pid is not None
        # Warm up (first request's imports and allocations), then the baseline.
        warm = await h.exchange(port, b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
        self.assertEqual(warm.status, 200)
        await tick(0.2)
        rss_before = rss(pid)
        cpu_before = cpu_seconds(pid)

        client = Pipeliner()
        await bounded(connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client))
        self.addCleanup(lambda: client.transport.abortConnection())
        peak = rss_before
        started = last_change = reactor.seconds()
        last = answered(h)
        # Wait (bounded) until the gateway stops answering: a second without
        # a new answer while the client keeps writing whenever it can.
        while True:
            await tick(0.25)
            now = reactor.seconds()
            peak = max(peak, rss(pid))
            n = answered(h)
            if n != last:
                last, last_change = n, now
            elif now - last_change >= 1.0:
                break
            if now - started > STOP_WITHIN:
                self.fail(f"the gateway was still answering after {STOP_WITHIN}s"
                          f" ({n - 1} answers, RSS +{(peak - rss_before) / 2**20:.1f} MB)")
        stopped_after = last_change - started
        # Then it stays idle: no answer, (almost) no CPU.
        cpu_quiet, n_quiet = cpu_seconds(pid), answered(h)
        await tick(QUIET)
        peak = max(peak, rss(pid))
        quiet_cpu = cpu_seconds(pid) - cpu_quiet
        self.assertEqual(answered(h), n_quiet)
        cpu = cpu_seconds(pid) - cpu_before
        growth = peak - rss_before
        sent = client.sent
        print(f"\npipelining: {sent} requests written without reading; the gateway"
              f" answered {n_quiet - 1} and stopped after {stopped_after:.1f}s;"
              f" RSS {rss_before / 2**20:.1f} -> {peak / 2**20:.1f} MB"
              f" (+{growth / 2**20:.1f} MB); CPU {cpu:.2f}s in all,"
              f" {quiet_cpu:.2f}s in the {QUIET}s after it stopped")
        self.assertIsNone(client.lost)
        self.assertLess(growth, RSS_BOUND)
        self.assertLess(quiet_cpu, 0.1 * QUIET)

        # Now read: every answer the gateway wrote arrives, in order, all 200.
        client.read()

        last = b"p%d" % (sent - 1)

        def all_in() -> bool:
            tail = bytes(client.data[-4096:])
            return last in tail.lower() and tail.endswith(b"}")

        await wait_for(all_in, f"{sent} answers", timeout=30, step=0.1)
        await tick(0.2)
        got = [int(m) for m in _ID.findall(bytes(client.data))]
        self.assertEqual(got, list(range(sent)))
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", bytes(client.data))
        self.assertEqual(set(statuses), {b"200"})
        self.assertEqual(len(statuses), sent)


#: twistd with a soft open-file limit of 200 and a hard one of 300.
TWISTD_300_FDS = ("-c", "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (200, 300));"
                  " from twisted.scripts.twistd import run; run()")
HEALTH = b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n"


class FdLimitTests(TestCase):
    timeout = 60

    async def test_connection_caps_keep_fds_and_other_addresses(self) -> None:
        """
        A gateway started with a soft open-file limit of 200 and a hard one of
        300 raises the soft one to 300 and, with no C{max_connections} set,
        caps client connections at (300 - 64) / 2 = 118, 118 - 118 // 4 = 89
        of them per address. One address holding 89 connections gets the
        503 C{too_many_connections} JSON for its 90th while another address
        is still served; once the global cap is full a third address gets the
        503 too; no accept ever fails for lack of descriptors (no C{EMFILE}).
        """
        h = Harness(self)
        proc, port = await twistd_gateway(h, *TWISTD_300_FDS)
        self.assertIn("open-file limit raised from 200 to 300", proc.output)
        clients: list[RawClient] = []

        async def served(source: str) -> RawClient:
            proto = await h.raw(port, HEALTH, source=source)
            clients.append(proto)
            raw = await proto.when(response_complete)
            self.assertEqual(parse_response(raw).status, 200, raw[:300])
            return proto

        async def refused(source: str, message: str) -> None:
            proto = await h.raw(port, source=source)
            raw = await bounded(proto.closed)
            response = parse_response(raw)
            self.assertEqual(response.status, 503)
            self.assertEqual(response.header(b"retry-after"), b"1")
            self.assertEqual(error_of(response.body),
                             {"message": message, "type": "server_error",
                              "code": "too_many_connections"})

        for _ in range(89):
            await served("127.0.0.1")
        await refused("127.0.0.1", "too many open connections from this address")
        # Another address is served, up to the global cap.
        for _ in range(118 - 89):
            await served("127.0.0.2")
        await refused("127.0.0.3", "too many open connections")
        await refused("127.0.0.2", "too many open connections")
        # A freed connection is available again.
        clients.pop().transport.loseConnection()
        await tick(0.2)
        await served("127.0.0.3")
        self.assertNotIn("EMFILE", proc.output)
        self.assertNotIn("Too many open files", proc.output)
