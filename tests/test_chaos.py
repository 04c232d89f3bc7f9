"""
Tests for L{tests.chaos.ChaosProxy}, on the real reactor over loopback.

Each test starts a tiny backend (echo, or a fixed reply) and the proxy on
port 0, talks through the proxy with a Twisted client (or a raw socket where
the exact errno matters), bounds every wait, and cleans everything up.
"""

from __future__ import annotations

import errno
import select
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.chaos import ChaosProxy

#: The bound on any wait that is expected to succeed, in seconds.
TIMEOUT = 5.0

#: 10,000 bytes that are not all alike, so truncation points are visible.
PAYLOAD = bytes(range(256)) * 39 + bytes(range(16))


def bounded(d: Deferred, seconds: float = TIMEOUT) -> Deferred:
    """C{d}, failing with C{TimeoutError} unless it fires within C{seconds}."""
    return d.addTimeout(seconds, reactor)


def pause(seconds: float) -> Deferred:
    """Fire after C{seconds} of reactor time."""
    return deferLater(reactor, seconds, lambda: None)


async def wait_until(predicate, what: str) -> None:
    """Wait, a reactor tick at a time, until C{predicate()} is true (bounded)."""
    deadline = reactor.seconds() + TIMEOUT
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await pause(0.01)


class _Peer(Protocol):
    """
    A connection end that records what it receives and when it is lost.

    @ivar data: everything received so far.
    @ivar reason: the C{connectionLost} reason, once lost.
    """

    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None
        self._byte_waiters: list[tuple[int, Deferred]] = []
        self._lost_waiters: list[Deferred] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        ready = [(n, d) for n, d in self._byte_waiters if len(self.data) >= n]
        for item in ready:
            self._byte_waiters.remove(item)
            item[1].callback(None)

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)

    def received(self, n: int, seconds: float = TIMEOUT) -> Deferred:
        """Fire once C{n} bytes have arrived (bounded by C{seconds})."""
        if len(self.data) >= n:
            return succeed(None)
        d: Deferred = Deferred(lambda d: self._byte_waiters.remove((n, d)))
        self._byte_waiters.append((n, d))
        return bounded(d, seconds)

    def lost(self, seconds: float = TIMEOUT) -> Deferred:
        """Fire once the connection is lost (bounded by C{seconds})."""
        if self.reason is not None:
            return succeed(None)
        d: Deferred = Deferred(self._lost_waiters.remove)
        self._lost_waiters.append(d)
        return bounded(d, seconds)

    def close(self) -> Deferred:
        """Abort the connection unless it is already gone; fire once lost."""
        if self.reason is None:
            self.transport.abortConnection()
        return self.lost()


class _BackendPeer(_Peer):
    """A backend connection: echoes, or answers the first bytes with a reply."""

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self._backend = backend
        self._replied = False

    def connectionMade(self) -> None:
        self._backend.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self._backend.reply is None:
            self.transport.write(data)
        elif not self._replied:
            self._replied = True
            self.transport.write(self._backend.reply)
            if self._backend.close_after_reply:
                self.transport.loseConnection()


class Backend:
    """
    A loopback TCP backend on port 0.

    @ivar reply: L{None} to echo; else bytes sent once, on the first data.
    @ivar close_after_reply: close (FIN) after sending C{reply}.
    @ivar connections: every connection accepted, in order.
    """

    def __init__(self, reply: bytes | None = None, close_after_reply: bool = False) -> None:
        self.reply = reply
        self.close_after_reply = close_after_reply
        self.connections: list[_BackendPeer] = []
        self.port = 0
        self._listening = None

    def start(self) -> int:
        self._listening = reactor.listenTCP(
            0, Factory.forProtocol(lambda: _BackendPeer(self)), interface="127.0.0.1"
        )
        self.port = self._listening.getHost().port
        return self.port

    async def stop(self) -> None:
        await self._listening.stopListening()
        for peer in self.connections:
            await peer.close()


class ChaosProxyTests(TestCase):
    """The chaos proxy itself, between a real client and a real backend."""

    async def start(self, backend: Backend | None = None, clock: Clock | None = None
                    ) -> tuple[ChaosProxy, Backend]:
        """
        Start C{backend} (default: echo) and a proxy in front of it.

        @param clock: the proxy's clock for latency timers and L{wait_idle}
            (the real reactor by default; sockets are always real).
        """
        backend = backend or Backend()
        backend.start()
        self.addCleanup(backend.stop)
        proxy = ChaosProxy(reactor, "127.0.0.1", backend.port, clock=clock)
        await bounded(proxy.start())
        self.addCleanup(proxy.stop)
        return proxy, backend

    async def connect(self, port: int) -> _Peer:
        """A client connected to C{port}, aborted in cleanup."""
        client = _Peer()
        await bounded(connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client))
        self.addCleanup(client.close)
        return client

    def test_bad_arguments_are_rejected(self) -> None:
        """Unknown directions and negative counts or latencies raise C{ValueError}."""
        proxy = ChaosProxy(reactor, "127.0.0.1", 9)
        self.assertRaises(ValueError, proxy.cut_after, 10, "sideways")
        self.assertRaises(ValueError, proxy.reset_after, -1)
        self.assertRaises(ValueError, proxy.stall, "upstream", -5)
        self.assertRaises(ValueError, proxy.latency, -0.1)

    async def test_pass_through_relays_both_ways(self) -> None:
        """
        In pass-through mode bytes reach the backend and its answer reaches
        the client unchanged; the counters track connections and bytes.
        """
        proxy, backend = await self.start()
        client = await self.connect(proxy.port)
        client.transport.write(b"hello")
        await client.received(5)
        self.assertEqual(client.data, b"hello")
        self.assertEqual(backend.connections[0].data, b"hello")
        self.assertEqual((proxy.connections_open, proxy.connections_total), (1, 1))
        self.assertEqual((proxy.bytes_up, proxy.bytes_down), (5, 5))
        client.transport.loseConnection()
        await proxy.wait_idle(TIMEOUT)
        await backend.connections[0].lost()
        self.assertIsInstance(backend.connections[0].reason.value, ConnectionDone)
        self.assertEqual((proxy.connections_open, proxy.connections_total), (0, 1))

    async def test_pass_through_http(self) -> None:
        """An HTTP request through the proxy gets the backend's response."""
        root = Resource()
        leaf = Resource()
        leaf.render_GET = lambda request: b"hello from backend"
        leaf.isLeaf = True
        root.putChild(b"hi", leaf)
        listening = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        proxy = ChaosProxy(reactor, "127.0.0.1", listening.getHost().port)
        port = await bounded(proxy.start())
        self.addCleanup(proxy.stop)
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        response = await bounded(agent.request(b"GET", f"http://127.0.0.1:{port}/hi".encode()))
        self.assertEqual(response.code, 200)
        self.assertEqual(await bounded(readBody(response)), b"hello from backend")
        await proxy.wait_idle(TIMEOUT)

    async def test_cut_after_mid_http_body_fails_the_response(self) -> None:
        """
        Cutting an HTTP response in its body makes the client's body read
        fail (data loss), after exactly the bytes let through.
        """
        body = PAYLOAD
        root = Resource()
        root.isLeaf = True
        root.render_GET = lambda request: body
        listening = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        proxy = ChaosProxy(reactor, "127.0.0.1", listening.getHost().port)
        port = await bounded(proxy.start())
        self.addCleanup(proxy.stop)
        proxy.cut_after(1000)
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        response = await bounded(agent.request(b"GET", f"http://127.0.0.1:{port}/".encode()))
        self.assertEqual(response.code, 200)
        await self.assertFailure(bounded(readBody(response)), ResponseFailed)
        self.assertEqual(proxy.bytes_down, 1000)
        await proxy.wait_idle(TIMEOUT)

    async def test_latency_delays_each_direction(self) -> None:
        """
        With C{latency(s)} a chunk is held for exactly C{s} of the proxy's
        clock on its way to the backend, and the echo for C{s} more on its
        way back: one delay each way.
        """
        clock = Clock()
        proxy, backend = await self.start(clock=clock)
        client = await self.connect(proxy.port)
        await wait_until(lambda: backend.connections, "the upstream connection")
        proxy.latency(0.2)
        client.transport.write(b"ping")
        await wait_until(lambda: proxy.received_up == 4, "the proxy to read the ping")
        clock.advance(0.199)
        self.assertEqual(proxy.bytes_up, 0)
        clock.advance(0.001)
        self.assertEqual(proxy.bytes_up, 4)
        await backend.connections[0].received(4)
        await wait_until(lambda: proxy.received_down == 4, "the proxy to read the echo")
        clock.advance(0.199)
        self.assertEqual(proxy.bytes_down, 0)
        clock.advance(0.001)
        self.assertEqual(proxy.bytes_down, 4)
        await client.received(4)
        self.assertEqual(client.data, b"ping")
        self.assertEqual(clock.getDelayedCalls(), [])

    async def test_latency_keeps_order_when_lowered(self) -> None:
        """
        Chunks keep their order: one sent after the latency was removed
        still waits behind a delayed one.
        """
        clock = Clock()
        proxy, backend = await self.start(clock=clock)
        client = await self.connect(proxy.port)
        await wait_until(lambda: backend.connections, "the upstream connection")
        proxy.latency(0.3)
        client.transport.write(b"first,")
        await wait_until(lambda: proxy.received_up == 6, "the proxy to read the first chunk")
        proxy.latency(0)
        client.transport.write(b"second")
        await wait_until(lambda: proxy.received_up == 12, "the proxy to read the second")
        # Not due yet, so the second chunk (due at once) waits behind it.
        self.assertEqual(proxy.bytes_up, 0)
        clock.advance(0.3)
        self.assertEqual(proxy.bytes_up, 12)
        await client.received(12)
        self.assertEqual(backend.connections[0].data, b"first,second")
        self.assertEqual(client.data, b"first,second")

    async def test_cut_after_exact_bytes_downstream(self) -> None:
        """
        C{cut_after(n)} lets exactly C{n} bytes of the backend's answer
        through, then closes the client (FIN) and the backend.
        """
        proxy, backend = await self.start(Backend(reply=PAYLOAD))
        proxy.cut_after(1234)
        client = await self.connect(proxy.port)
        client.transport.write(b"go")
        await client.lost()
        self.assertEqual(client.data, PAYLOAD[:1234])
        self.assertIsInstance(client.reason.value, ConnectionDone)
        await backend.connections[0].lost()
        self.assertEqual(proxy.bytes_down, 1234)
        await proxy.wait_idle(TIMEOUT)

    async def test_cut_after_upstream(self) -> None:
        """
        C{cut_after(n, "upstream")} delivers exactly C{n} bytes of the
        request to the backend, then closes both sides.
        """
        proxy, backend = await self.start()
        proxy.cut_after(10, direction="upstream")
        client = await self.connect(proxy.port)
        client.transport.write(b"0123456789abcdefghij")
        await client.lost()
        peer = backend.connections[0]
        await peer.lost()
        self.assertEqual(peer.data, b"0123456789")
        self.assertEqual(proxy.bytes_up, 10)

    async def test_mode_on_live_connection_counts_from_when_set(self) -> None:
        """
        A mode set on a live connection applies to its next bytes and counts
        from zero: C{cut_after(10)} after 50 echoed bytes lets 10 more through.
        """
        proxy, _ = await self.start()
        client = await self.connect(proxy.port)
        client.transport.write(b"x" * 50)
        await client.received(50)
        proxy.cut_after(10)
        client.transport.write(b"y" * 50)
        await client.lost()
        self.assertEqual(client.data, b"x" * 50 + b"y" * 10)

    async def test_stall_holds_data_and_close_until_released(self) -> None:
        """
        C{stall(after_bytes=n)} forwards C{n} bytes and then nothing, not
        even the backend's close, while the client stays connected; going
        back to pass-through delivers the rest and the close, in order.
        """
        proxy, backend = await self.start(Backend(reply=PAYLOAD, close_after_reply=True))
        proxy.stall(after_bytes=100)
        client = await self.connect(proxy.port)
        client.transport.write(b"go")
        await client.received(100)
        await backend.connections[0].lost()
        await wait_until(lambda: proxy.holding, "the proxy to hold the rest back")
        self.assertEqual(proxy.bytes_down, 100)
        self.assertEqual(client.data, PAYLOAD[:100])
        self.assertIsNone(client.reason)
        self.assertEqual(proxy.connections_open, 1)
        proxy.pass_through()
        await client.lost()
        self.assertEqual(client.data, PAYLOAD)
        self.assertIsInstance(client.reason.value, ConnectionDone)

    async def test_reset_after_gives_client_econnreset(self) -> None:
        """
        C{reset_after(n)} delivers exactly C{n} bytes and then a TCP reset:
        a raw socket reads the bytes and then fails with C{ECONNRESET}.
        """
        proxy, _ = await self.start(Backend(reply=PAYLOAD))
        proxy.reset_after(100)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.setblocking(False)
        self.assertIn(sock.connect_ex(("127.0.0.1", proxy.port)), (0, errno.EINPROGRESS))
        deadline = reactor.seconds() + TIMEOUT
        while not select.select([], [sock], [], 0)[1]:
            self.assertLess(reactor.seconds(), deadline, "connect did not complete")
            await pause(0.01)
        sock.send(b"go")
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                self.assertLess(reactor.seconds(), deadline, "no reset arrived")
                await pause(0.01)
                continue
            except ConnectionResetError:
                break
            if not chunk:
                self.fail(f"orderly close after {len(received)} bytes, expected a reset")
            received += chunk
        self.assertEqual(received, PAYLOAD[:100])
        await proxy.wait_idle(TIMEOUT)

    async def test_reset_after_twisted_client_sees_connection_lost(self) -> None:
        """
        A Twisted client behind C{reset_after(n)} gets C{n} bytes and then
        C{ConnectionLost} (non-clean), where a cut gives C{ConnectionDone}.
        """
        proxy, backend = await self.start(Backend(reply=PAYLOAD))
        proxy.reset_after(300)
        client = await self.connect(proxy.port)
        client.transport.write(b"go")
        await client.lost()
        self.assertEqual(client.data, PAYLOAD[:300])
        self.assertIsInstance(client.reason.value, ConnectionLost)
        await backend.connections[0].lost()

    async def test_blackhole_accepts_and_never_answers(self) -> None:
        """
        In blackhole mode the connect succeeds, sent bytes vanish, nothing
        is connected upstream and the client's own bounded wait runs out.
        """
        proxy, backend = await self.start()
        proxy.blackhole()
        client = await self.connect(proxy.port)
        client.transport.write(b"anyone there?")
        await wait_until(lambda: proxy.received_up == 13, "the proxy to read the bytes")
        self.assertEqual(client.data, b"")
        self.assertEqual(backend.connections, [])
        self.assertEqual((proxy.connections_open, proxy.bytes_up, proxy.bytes_down), (1, 0, 0))
        self.assertIsNone(client.reason)

    async def test_refuse_then_reopen(self) -> None:
        """
        C{refuse()} makes connects fail with C{ConnectionRefusedError};
        C{reopen()} listens on the same port and relays again.
        """
        proxy, _ = await self.start()
        port = proxy.port
        await bounded(proxy.refuse())
        connecting = Deferred.fromCoroutine(self.connect(port))
        await self.assertFailure(connecting, ConnectionRefusedError)
        self.assertEqual(await bounded(proxy.reopen()), port)
        client = await self.connect(port)
        client.transport.write(b"back")
        await client.received(4)
        self.assertEqual(client.data, b"back")

    async def test_unreachable_target_drops_the_client(self) -> None:
        """When the target refuses, the proxy drops the client connection."""
        probe = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        dead_port = probe.getHost().port
        await probe.stopListening()
        proxy = ChaosProxy(reactor, "127.0.0.1", dead_port)
        await bounded(proxy.start())
        self.addCleanup(proxy.stop)
        client = await self.connect(proxy.port)
        client.transport.write(b"hello")
        await client.lost()
        self.assertEqual(client.data, b"")
        await proxy.wait_idle(TIMEOUT)

    async def test_wait_idle(self) -> None:
        """
        C{wait_idle} times out while a client is connected and fires once
        the last one has gone.
        """
        clock = Clock()
        proxy, _ = await self.start(clock=clock)
        client = await self.connect(proxy.port)
        await wait_until(lambda: proxy.connections_open, "the proxy to accept")
        timing_out = proxy.wait_idle(0.1)
        clock.advance(0.1)
        self.failureResultOf(timing_out, TimeoutError)
        idle = bounded(proxy.wait_idle(TIMEOUT))
        self.assertNoResult(idle)
        client.transport.loseConnection()
        await idle
        self.assertEqual((proxy.connections_open, proxy.connections_total), (0, 1))

    async def test_stop_closes_everything_and_cancels_timers(self) -> None:
        """
        C{stop()} closes relayed and blackholed connections on both sides
        and cancels pending latency timers: afterwards no connection is
        open and no delayed call of the proxy is pending.
        """
        clock = Clock()
        proxy, backend = await self.start(clock=clock)
        proxy.latency(5.0)
        relayed = await self.connect(proxy.port)
        relayed.transport.write(b"slow")
        await wait_until(clock.getDelayedCalls, "a latency timer")
        proxy.blackhole()
        held = await self.connect(proxy.port)
        held.transport.write(b"void")
        await wait_until(lambda: backend.connections, "the upstream connection")
        self.assertEqual(proxy.connections_open, 2)

        await bounded(proxy.stop())

        self.assertEqual(proxy.connections_open, 0)
        self.assertEqual(clock.getDelayedCalls(), [])
        await relayed.lost()
        await held.lost()
        await backend.connections[0].lost()
        self.assertEqual(proxy.connections_open, 0)
        connecting = Deferred.fromCoroutine(self.connect(proxy.port))
        await self.assertFailure(connecting, ConnectionRefusedError)
