"""
The parent's memory store served to workers over AMP (L{clawproxy.stores.amp}):
the store contract, held through the wire; values past AMP's 64 KiB limit;
scripts atomic across workers; a parent that is gone or hangs.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from clawproxy.metrics import Metrics
from clawproxy.stores import Script, StoreError, StoreUnavailable
from clawproxy.stores import script as script_module
from clawproxy.stores.amp import AmpStore, BigBytes, StoreResponder
from clawproxy.stores.memory import MemoryStore
from tests.test_store_contract import TOKEN_BUCKET, StoreContract, contract

#: Echoes its one argument back (a reply as long as the argument).
ECHO = Script("echo", "return ARGV[1]", lambda keys, k, argv: argv[0])


class Parent(StoreResponder, amp.AMP):
    """The parent's end of one worker's channel (store calls only)."""

    def __init__(self, store: MemoryStore) -> None:
        super().__init__()
        self.store = store


class _Wire(StringTransport):
    """A transport whose writes wait for L{pump} to reach the peer protocol."""

    peer: Any = None

    def write(self, data: bytes) -> None:
        if not self.disconnecting:
            super().write(data)

    def loseConnection(self) -> None:
        self.disconnecting = True


def wire(a: amp.AMP, b: amp.AMP) -> Callable[[], None]:
    """Connect two protocols back to back; the returned pump delivers what was written."""
    ta, tb = _Wire(), _Wire()
    ta.peer, tb.peer = b, a
    a.makeConnection(ta)
    b.makeConnection(tb)

    def pump() -> None:
        while ta.value() or tb.value():
            for t in (ta, tb):
                data = t.value()
                t.clear()
                if data:
                    t.peer.dataReceived(data)

    return pump


def worker_of(parent_store: MemoryStore, clock: Any, metrics: Any = None
              ) -> tuple[AmpStore, Callable[[], None]]:
    channel = amp.AMP()
    pump = wire(channel, Parent(parent_store))
    store = AmpStore(clock, metrics)
    store.attach(channel)
    return store, pump


class SocketPair:
    """A worker's channel to its parent over a real UNIX socket pair, on the reactor."""

    def __init__(self, parent: amp.AMP, child: amp.AMP) -> None:
        a, b = socket.socketpair()
        self.protocols = [parent, child]
        self.lost = [Deferred(), Deferred()]
        for sock, proto, lost in zip((a, b), self.protocols, self.lost):
            proto.connectionLost = _also(proto.connectionLost, lost)
            reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, _Factory(proto))
            sock.close()

    def close(self) -> Deferred[Any]:
        for proto in self.protocols:
            proto.transport.loseConnection()
        return DeferredList(self.lost)


def _also(original: Callable[[Any], None], lost: Deferred[Any]) -> Callable[[Any], None]:
    def connectionLost(reason: Any) -> None:
        original(reason)
        lost.callback(None)
    return connectionLost


class _Factory(Factory):
    def __init__(self, proto: amp.AMP) -> None:
        self.proto = proto

    def buildProtocol(self, addr: Any) -> amp.AMP:
        return self.proto


class AmpStoreTests(StoreContract, TestCase):
    """
    The contract, held by a worker's L{AmpStore} over its parent's
    L{MemoryStore}, through a real socket pair on the reactor.
    """

    def setUp(self) -> None:
        self.metrics = Metrics()
        self.parent_store = MemoryStore(reactor)
        channel = amp.AMP()
        self.pair = SocketPair(Parent(self.parent_store), channel)
        self.addCleanup(self.pair.close)
        self.store = AmpStore(reactor, self.metrics)
        self.store.attach(channel)

    def drive(self, coroutine: Coroutine[Any, Any, None]) -> Deferred[None]:
        return Deferred.fromCoroutine(coroutine).addTimeout(10, reactor)

    async def advance(self, seconds: float) -> None:
        await deferLater(reactor, seconds, lambda: None)

    def wall(self) -> float:
        return time.time()

    @contract
    async def test_big_values(self) -> None:
        """Values far past AMP's 64 KiB limit go both ways, through set/get and scripts."""
        value = bytes(range(256)) * 1200  # 300 KiB
        await self.store.set("big", value)
        self.assertEqual(await self.store.get("big"), value)
        self.assertEqual(self.parent_store.keys.get("big"), value)
        self.assertEqual(await self.store.run(ECHO, [], [value]), value)

    @contract
    async def test_empty_value(self) -> None:
        """An empty value is a value, not an absent key."""
        await self.store.set("empty", b"")
        self.assertEqual(await self.store.get("empty"), b"")

    @contract
    async def test_unknown_script(self) -> None:
        """A script the parent never made is a store error naming it, not a hang."""
        made_here_only = Script("elsewhere", "return 'x'", lambda keys, k, argv: b"x")
        del script_module._BY_SHA[made_here_only.sha]
        with self.assertRaises(StoreError) as caught:
            await self.store.run(made_here_only, [], [])
        self.assertIn("elsewhere", str(caught.exception))
        self.assertEqual(self.errors("elsewhere"), 1)


class AmpStoreFailureTests(SynchronousTestCase):
    """A parent that is not there, is gone, or hangs: calls fail unavailable, bounded."""

    def setUp(self) -> None:
        self.clock = Clock()

    def test_not_attached(self) -> None:
        """Before the channel is up a call fails at once, unavailable, and health says so."""
        store = AmpStore(self.clock, Metrics())
        self.failureResultOf(store.get("k"), StoreUnavailable)
        self.assertFalse(store.health()["healthy"])

    def test_parent_gone(self) -> None:
        """Calls in flight when the channel closes, and calls after, fail unavailable."""
        silent = amp.AMP()
        wire(silent, amp.AMP())  # never pumped: the parent never hears it
        store = AmpStore(self.clock, Metrics())
        store.attach(silent)
        pending = store.get("k")
        self.assertNoResult(pending)
        silent.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(pending, StoreUnavailable)
        store.attach(None)
        self.failureResultOf(store.get("k"), StoreUnavailable)

    def test_parent_hangs(self) -> None:
        """A parent that does not answer fails the call unavailable within the timeout."""
        silent = amp.AMP()
        wire(silent, amp.AMP())
        store = AmpStore(self.clock, Metrics())
        store.attach(silent)
        d = store.incrby("k", 1)
        self.clock.advance(store.timeout - 0.01)
        self.assertNoResult(d)
        self.clock.advance(0.02)
        failure = self.failureResultOf(d, StoreUnavailable)
        self.assertIn("did not answer", str(failure.value))
        self.assertFalse(store.health()["healthy"])


class SharedAcrossWorkersTests(SynchronousTestCase):
    """Two workers on one parent share one state, scripts atomic across them."""

    def test_token_bucket_shared(self) -> None:
        """A 3-token bucket gives 3 takes in all, whichever worker asks."""
        clock = Clock()
        clock.advance(1_000)
        parent = MemoryStore(clock)
        one, pump_one = worker_of(parent, clock)
        two, pump_two = worker_of(parent, clock)
        pending = [store.run(TOKEN_BUCKET, ["b"], [3, 1.0, 1, 60000])
                   for store in (one, two, one, two, one)]
        pump_two()
        pump_one()
        # Worker two's calls reach the parent first, then worker one's: three
        # takes in all, in the order the parent ran them.
        self.assertEqual([self.successResultOf(d)[0] for d in pending], [1, 1, 0, 1, 0])
        written = two.set("written-by-two", b"v")
        pump_two()
        self.successResultOf(written)
        read = one.get("written-by-two")
        pump_one()
        self.assertEqual(self.successResultOf(read), b"v")


class BigBytesTests(SynchronousTestCase):
    """The argument type for values of any length."""

    def test_round_trip(self) -> None:
        arg = BigBytes()
        for value in (b"", b"x", b"y" * 0xFFFF, b"z" * 0x10000, bytes(200_000)):
            strings: dict[bytes, bytes] = {}
            arg.toBox(b"v", strings, {"v": value}, None)
            self.assertTrue(all(len(s) <= 0xFFFF for s in strings.values()))
            out: dict[str, Any] = {}
            arg.fromBox(b"v", strings, out, None)
            self.assertEqual(out["v"], value)

