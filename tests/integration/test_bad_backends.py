"""
Misbehaving backends (issue 7): a backend written here, over real loopback
sockets, that answers with an endless response head, an interim C{103}
before its answer, a chunked body that breaks before its first byte, or a
head Twisted's client cannot parse.

Each test checks what the client sees, how long it took, what the gateway
logged (one warning line, never a traceback) and, for the header bomb, how
much the gateway's memory grew.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tests.integration.helpers import (
    Harness,
    RunningGateway,
    bounded,
    error_of,
    parse_response,
    peak_rss,
    response_complete,
    rss,
    wait_for,
)

#: The pool's per-attempt timeout: the header bomb must be refused well before it.
POOL_TIMEOUT = 3.0

GET = b"GET /v1/x HTTP/1.1\r\nHost: gateway.test\r\n\r\n"
POST = (b"POST /v1/x HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: application/json\r\n"
        b"Content-Length: 11\r\n\r\n{\"ok\":true}")


def reset_peak_rss() -> bool:
    """
    Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0);
    False where that is not allowed.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@implementer(IPullProducer)
class _HeaderFlood:
    """Write header lines, 64 KiB at a time, whenever the transport wants more."""

    BLOCK = b"".join(b"X-Bomb-%05d: %s\r\n" % (i, b"a" * 80) for i in range(640))

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.sent = 0
        self.stopped = False

    def resumeProducing(self) -> None:
        if not self.stopped:
            self.sent += len(self.BLOCK)
            self.transport.write(self.BLOCK)

    def stopProducing(self) -> None:
        self.stopped = True


class _Scripted(Protocol):
    """
    Read one request (head, then a C{Content-Length} body), then hand the
    connection to the factory's script, which writes whatever it likes.
    """

    def connectionMade(self) -> None:
        self.buffer = b""
        self.factory.connections += 1

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.lower().split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if len(body) < length:
            return
        self.buffer = body[length:]
        self.factory.requests.append(head.split(b"\r\n", 1)[0])
        self.factory.script(self)

    def connectionLost(self, reason: Any) -> None:
        self.factory.lost += 1


class BadBackend(Factory):
    """A raw TCP backend that answers every request by running C{script(protocol)}."""

    noisy = False
    protocol = _Scripted

    def __init__(self, script: Callable[[_Scripted], None]) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections = 0
        self.lost = 0


def canned(response: bytes, close: bool = False) -> Callable[[_Scripted], None]:
    """A script writing C{response}, then closing the connection (FIN) if C{close}."""

    def script(proto: _Scripted) -> None:
        proto.transport.write(response)
        if close:
            proto.transport.loseConnection()

    return script


class LogWatch:
    """Every log event emitted while a test runs."""

    def __init__(self, case: TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def tracebacks(self) -> list[str]:
        """The events that carry a failure (each would print a traceback)."""
        return [formatEvent(e) for e in self.events if "log_failure" in e]

    def at(self, level: LogLevel) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_level") == level]

    def critical(self) -> list[str]:
        return self.at(LogLevel.critical) + self.at(LogLevel.error)


class BadBackendTests(TestCase):
    """What a client gets, and what the gateway spends, when the backend misbehaves."""

    timeout = 30

    async def start(self, script: Callable[[_Scripted], None], instances: int = 1,
                    **pool: Any) -> tuple[Harness, RunningGateway, list[BadBackend]]:
        """A gateway before C{instances} L{BadBackend}s running C{script}."""
        h = Harness(self)
        self.logs = LogWatch(self)
        backends = []
        for i in range(instances):
            factory = BadBackend(script)
            h.tracker.watch_factory(factory)
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            factory.url = f"http://127.0.0.1:{port.getHost().port}"
            factory.id = f"bad-{i + 1}"
            backends.append(factory)
        settings = {
            "instances": [{"id": b.id, "url": b.url} for b in backends],
            "health_check": {"enabled": False},
            "timeout": f"{POOL_TIMEOUT:g}s",
            "passive": {"max_fails": 100},
            **pool,
        }
        gw = await h.gateway(h.config({"bad": settings}))
        return h, gw, backends

    def assert_bad_gateway(self, raw: bytes) -> Any:
        """C{raw} is the gateway's own 502 JSON error, with a request id."""
        response = parse_response(raw)
        self.assertEqual(response.status, 502, raw[:300])
        self.assertEqual(response.header(b"content-type"), b"application/json")
        error = error_of(response.body)
        self.assertEqual(error["type"], "upstream_error")
        self.assertTrue(response.header(b"x-request-id"))
        return response

    def assert_one_warning(self, *words: str) -> None:
        """The gateway logged no traceback and no error, and one warning naming C{words}."""
        self.assertEqual(self.logs.tracebacks(), [])
        self.assertEqual(self.logs.critical(), [])
        warnings = [w for w in self.logs.at(LogLevel.warn) if all(x in w for x in words)]
        self.assertEqual(len(warnings), 1, self.logs.at(LogLevel.warn))

    # -- failure 4: an endless response head -------------------------------------------

    def header_bomb(self, proto: _Scripted) -> None:
        proto.transport.write(b"HTTP/1.1 200 OK\r\n")
        flood = proto.flood = _HeaderFlood(proto.transport)
        proto.transport.registerProducer(flood, False)

    async def bombed(self, request: bytes, instances: int = 1, **pool: Any
                     ) -> tuple[bytes, float, int, list[BadBackend]]:
        """
        Send C{request} to a gateway before header-bombing backends.
        Returns what the client got, the time to its answer, the gateway
        process's peak RSS growth, and the backends.
        """
        h, gw, backends = await self.start(self.header_bomb, instances, **pool)
        baseline = rss()
        peak_kept = reset_peak_rss()
        samples = [baseline]
        sampler = LoopingCall(lambda: samples.append(rss()))
        sampler.start(0.005)
        started = time.monotonic()
        try:
            client = await h.raw(gw.port, request)
            raw = await client.when(response_complete)
            elapsed = time.monotonic() - started
        finally:
            sampler.stop()
        peak = max(max(samples), peak_rss() if peak_kept else 0)
        growth = peak - baseline
        # The bombing connections were dropped by the gateway.
        await wait_for(lambda: all(b.lost == b.connections for b in backends),
                       "the gateway to drop the bombing connections")
        return raw, elapsed, growth, backends

    async def test_header_bomb_is_502_at_once(self) -> None:
        """
        A backend that sends an endless response head (64 KiB of header
        lines whenever the socket takes more): the client gets a 502
        C{bad_gateway} JSON well before the pool's 3 s timeout, the
        gateway's peak RSS grows by less than 50 MB, the bombing connection
        is dropped, and the gateway logs one warning naming the instance.
        """
        raw, elapsed, growth, (backend,) = await self.bombed(GET)
        print(f"\n    header bomb: 502 after {elapsed * 1000:.1f} ms, peak RSS growth "
              f"{growth / 2**20:.1f} MB", end="")
        response = self.assert_bad_gateway(raw)
        self.assertEqual(error_of(response.body)["code"], "bad_gateway")
        self.assertLess(elapsed, POOL_TIMEOUT / 3)
        self.assertLess(growth, 50 * 2**20)
        self.assertEqual(len(backend.requests), 1)
        self.assert_one_warning("bad-1", "head")

    async def test_header_bomb_post_not_resent(self) -> None:
        """
        A POST whose backend header-bombs is not resent to the other
        instance (the first one received it), though the pool retries on
        5xx and connection failures: one backend saw the request, the
        client gets the 502.
        """
        raw, elapsed, growth, backends = await self.bombed(
            POST, instances=2, retry={"max_retries": 2,
                                      "retry_on": ["5xx", "connect_failure", "refused"]})
        self.assert_bad_gateway(raw)
        self.assertEqual(sum(len(b.requests) for b in backends), 1)
        self.assertLess(elapsed, POOL_TIMEOUT / 3)
        self.assertLess(growth, 50 * 2**20)

    # -- degraded: interim responses ---------------------------------------------------

    async def test_early_hints_then_200_relayed(self) -> None:
        """
        A backend that sends C{103 Early Hints} (one, two, or one before it
        has read the POST body) then its C{200}: the client gets the 200 and
        its body (interim responses are dropped, not passed through), each
        POST reached the backend once, and the instance has no failure.
        """
        hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        final = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n"
                 b"\r\n{\"ok\":true}")
        h, gw, (backend,) = await self.start(canned(hints + final))
        big = b"x" * 300_000
        big_post = (b"POST /v1/x HTTP/1.1\r\nHost: gateway.test\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(big)) + big

        class HintsFirst(_Scripted):
            """Sends the 103 as soon as the request head is in, before the body."""

            def dataReceived(self, data: bytes) -> None:
                if b"\r\n\r\n" in self.buffer + data and b"\r\n\r\n" not in self.buffer:
                    self.transport.write(hints)
                super().dataReceived(data)

        for script, protocol, request in [
                (canned(hints + final), _Scripted, POST),
                (canned(hints + hints + final), _Scripted, POST),
                (canned(final), HintsFirst, big_post)]:
            backend.script, backend.protocol = script, protocol
            await gw.gateway.upstream_pool.closeCachedConnections()
            response = await h.exchange(gw.port, request)
            self.assertEqual(response.status, 200)
            self.assertEqual(response.body, b'{"ok":true}')
            self.assertEqual(response.all(b"link"), [])
        self.assertEqual(len(backend.requests), 3)
        self.assertEqual(gw.instance("bad-1").failures, 0)
        self.assertEqual(self.logs.tracebacks(), [])

    async def test_interim_flood_is_502_at_once(self) -> None:
        """
        A backend that sends C{103} heads without end: they count towards
        the head's size cap, so the client gets a 502 at once instead of a
        504 at the pool's timeout; one warning, no traceback.
        """

        def script(proto: _Scripted) -> None:
            flood = proto.flood = _HeaderFlood(proto.transport)
            flood.BLOCK = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" * 1000
            proto.transport.registerProducer(flood, False)

        h, gw, (backend,) = await self.start(script)
        started = time.monotonic()
        client = await h.raw(gw.port, GET)
        raw = await client.when(response_complete)
        self.assertLess(time.monotonic() - started, POOL_TIMEOUT / 3)
        self.assertEqual(error_of(self.assert_bad_gateway(raw).body)["code"], "bad_gateway")
        await wait_for(lambda: backend.lost == backend.connections, "the connection dropped")
        self.assert_one_warning("bad-1", "head")

    # -- degraded: a chunked body broken before any byte was relayed -------------------

    async def broken_before_body(self, response: bytes, close: bool) -> None:
        h, gw, (backend,) = await self.start(canned(response, close))
        client = await h.raw(gw.port, GET)
        raw = await client.when(response_complete)
        response_ = self.assert_bad_gateway(raw)
        self.assertEqual(error_of(response_.body)["code"], "bad_gateway")
        self.assertEqual(len(backend.requests), 1)
        return client

    async def test_close_before_first_chunk_is_502(self) -> None:
        """
        A chunked response whose backend closes right after the head (no
        chunk at all): nothing reached the client yet, so it gets a 502
        JSON instead of a reset connection; one warning, no traceback.
        """
        await self.broken_before_body(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", close=True)
        self.assert_one_warning("bad-1")

    async def test_close_mid_chunk_size_is_502(self) -> None:
        """A chunked response cut inside its first chunk-size line is a 502 JSON."""
        await self.broken_before_body(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1", close=True)
        self.assert_one_warning("bad-1")

    async def test_bad_chunk_size_is_502(self) -> None:
        """
        A chunked response whose first chunk size is not hex: a 502 JSON,
        the backend's connection is dropped (it was left open by the
        backend), one warning naming the instance, no traceback.
        """
        h, gw, (backend,) = await self.start(canned(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"))
        client = await h.raw(gw.port, GET)
        raw = await client.when(response_complete)
        self.assertEqual(error_of(self.assert_bad_gateway(raw).body)["code"], "bad_gateway")
        await wait_for(lambda: backend.lost == backend.connections, "the connection dropped")
        self.assert_one_warning("bad-1")

    async def test_bad_chunk_after_first_byte_aborts(self) -> None:
        """
        Once body bytes reached the client, a bad chunk size still aborts
        the client's connection (never a clean end, never a 502 after a 200),
        with one warning line and no traceback.
        """

        def script(proto: _Scripted) -> None:
            proto.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"5\r\nhello\r\n")
            self.later = reactor.callLater(0.2, proto.transport.write, b"zz\r\n")

        h, gw, _ = await self.start(script)
        client = await h.raw(gw.port, GET)
        await client.when(lambda raw: raw.endswith(b"hello\r\n"))
        raw = await bounded(client.closed)
        self.assertTrue(client.reason.check(ConnectionLost), client.reason)
        self.assertFalse(client.reason.check(ConnectionDone), client.reason)
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), raw[:100])
        self.assertNotIn(b"0\r\n\r\n", raw)
        self.assert_one_warning("bad-1")

    # -- degraded: a malformed head logs one warning ----------------------------------

    async def test_malformed_status_line_warns_once(self) -> None:
        """
        A status line Twisted's client cannot parse: a 502 JSON and one
        warning line naming the instance, no traceback.
        """
        h, gw, _ = await self.start(canned(b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n"))
        response = await h.exchange(gw.port, GET)
        self.assertEqual(response.status, 502)
        self.assert_one_warning("bad-1")

    async def test_conflicting_content_length_warns_once(self) -> None:
        """Two different C{Content-Length}s: a 502 JSON, one warning, no traceback."""
        h, gw, _ = await self.start(canned(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"))
        response = await h.exchange(gw.port, GET)
        self.assertEqual(response.status, 502)
        self.assert_one_warning("bad-1")


