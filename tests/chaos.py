"""
A chaos TCP proxy for tests: put it between the gateway and a backend on
loopback, then make the network misbehave on demand.

There is no C{tc netem} or toxiproxy here, so this is a small Twisted proxy
that runs on the reactor the test gives it (the real one, for trial
C{TestCase}s)::

    proxy = ChaosProxy(reactor, "127.0.0.1", backend_port)
    port = await proxy.start()
    self.addCleanup(proxy.stop)
    proxy.cut_after(512)        # the next responses stop after 512 bytes

Each client connection gets its own upstream connection to the target.
Bytes flow through two one-way I{flows}: C{upstream} (client to backend)
and C{downstream} (backend to client). A mode set on the proxy applies to new
connections at once and to live ones from their next byte:

  - L{ChaosProxy.pass_through}: relay everything (and clear the latency).
  - L{ChaosProxy.latency}: hold every chunk, and every close, for that long
    in both directions, in order. Latency combines with the faults below.
  - L{ChaosProxy.cut_after}: after exactly C{n_bytes} forwarded in the
    direction, close both sides in an orderly way (FIN). The receiver sees a
    truncated stream that ends cleanly (C{ConnectionDone}; C{_DataLoss} for an
    HTTP client in the middle of a body).
  - L{ChaosProxy.reset_after}: after exactly C{n_bytes} forwarded, send those
    bytes to the kernel and then reset both sides (RST). The client's next
    C{recv} fails with C{ECONNRESET} (C{ConnectionLost} in Twisted).
  - L{ChaosProxy.stall}: after C{after_bytes}, forward nothing more in the
    direction (not even a close) while both connections stay open; the
    proxy stops reading from the sender, so TCP pushes back on it. Choosing
    another mode releases the held bytes, in order.
  - L{ChaosProxy.blackhole}: new connections are accepted, read and discarded;
    no upstream connection is made and nothing is ever answered. Live
    connections have their data dropped in both directions.
  - L{ChaosProxy.refuse} / L{ChaosProxy.reopen}: stop listening (connects get
    C{ConnectionRefusedError}), and listen again on the same port.

Byte counts for C{cut_after}, C{reset_after} and C{stall} start at zero on
each connection when the mode is set, so on a live (pooled) connection
C{cut_after(10)} means "10 more bytes".

Why C{cut_after} is not C{abortConnection}: on Twisted's TCP transport
C{abortConnection} already closes with C{SO_LINGER} 0, so it I{is} a reset,
and it drops whatever the transport still buffers, so the client would get
fewer than C{n_bytes}. C{cut_after} therefore ends with FIN, and
C{reset_after} first waits for the buffer to reach the kernel (see
L{_reset_after_flush}), so the two faults stay distinct and exact.

L{ChaosProxy.stop} closes the listener, aborts every connection in both
directions, cancels every timer and fires once every socket has closed.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectingCancelledError, ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IPullProducer, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

UPSTREAM = "upstream"
DOWNSTREAM = "downstream"
BOTH = "both"

_DIRECTIONS = {
    UPSTREAM: frozenset({UPSTREAM}),
    DOWNSTREAM: frozenset({DOWNSTREAM}),
    BOTH: frozenset({UPSTREAM, DOWNSTREAM}),
}

#: How long the proxy tries to reach the target before it gives up.
CONNECT_TIMEOUT = 5.0


@attrs.frozen
class _Fault:
    """
    The fault currently injected: C{"cut"}, C{"reset"}, C{"stall"} or
    C{"blackhole"}, the directions it applies to and its byte threshold.
    """

    kind: str
    directions: frozenset[str]
    n_bytes: int = 0


@attrs.frozen
class _End:
    """A close travelling through a flow, behind the data sent before it."""

    reason: Failure


def _directions(direction: str) -> frozenset[str]:
    try:
        return _DIRECTIONS[direction]
    except KeyError:
        raise ValueError(
            f"direction must be {UPSTREAM!r}, {DOWNSTREAM!r} or {BOTH!r}, not {direction!r}"
        ) from None


def _count(n: int, what: str) -> int:
    if n < 0:
        raise ValueError(f"{what} must be >= 0, not {n!r}")
    return n


@implementer(IPullProducer)
class _ResetWhenFlushed:
    """
    A pull producer that answers "send more" with a reset.

    A transport asks its pull producer for more data only once its buffer
    has been handed to the kernel, so this aborts right after the last
    byte was sent.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.armed = False

    def resumeProducing(self) -> None:
        if self.armed:
            self._transport.abortConnection()

    def stopProducing(self) -> None:
        self._transport.abortConnection()


def _reset_after_flush(transport: Any) -> None:
    """
    Send what C{transport} still buffers, then reset the connection (RST).

    C{abortConnection} alone sends a RST (Twisted closes with C{SO_LINGER}
    0) but drops the buffered bytes. C{registerProducer} asks a pull
    producer for data at once (ignored: not armed yet) and again when a
    write pass empties the buffer. C{startWriting} forces that write pass
    even when the buffer is already empty.
    """
    transport.unregisterProducer()
    producer = _ResetWhenFlushed(transport)
    transport.registerProducer(producer, False)
    producer.armed = True
    transport.startWriting()


class _Side(Protocol):
    """One end of a relayed connection: the client's or the backend's."""

    def __init__(self, pipe: _Pipe, role: str) -> None:
        self.pipe = pipe
        self.role = role
        self.lost = False

    def connectionMade(self) -> None:
        self.pipe.side_made(self)

    def dataReceived(self, data: bytes) -> None:
        self.pipe.side_data(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.pipe.side_lost(self, reason)


@implementer(IPushProducer)
class _Flow:
    """
    One direction of a relayed connection.

    Chunks (and the sender's close, as an L{_End}) wait in a queue until
    they are due (latency); the current fault then decides what is written
    to the receiving side. The flow is also the push producer registered on
    the receiving transport, so a slow receiver pauses the sender.

    @ivar forwarded: bytes written to the receiver since the fault was set.
    """

    def __init__(self, pipe: _Pipe, direction: str) -> None:
        self._pipe = pipe
        self.direction = direction
        self._queue: deque[tuple[float, bytes | _End]] = deque()
        self._timer: IDelayedCall | None = None
        self.forwarded = 0
        self._held = False
        self._receiver_paused = False
        self._sender_paused = False
        self.dead = False

    def _sender(self) -> _Side | None:
        return self._pipe.client if self.direction == UPSTREAM else self._pipe.backend

    def _receiver(self) -> _Side | None:
        return self._pipe.backend if self.direction == UPSTREAM else self._pipe.client

    def push(self, item: bytes | _End) -> None:
        """Queue data or a close from the sender, due after the latency."""
        if self.dead:
            return
        proxy = self._pipe.proxy
        self._queue.append((proxy._clock.seconds() + proxy._latency, item))
        self.pump()

    def pump(self) -> None:
        """Deliver every due item, until one is held or the flow dies."""
        clock = self._pipe.proxy._clock
        while self._queue and not self.dead and not self._held:
            receiver = self._receiver()
            if receiver is None:
                return  # still connecting upstream; side_made pumps again
            due, item = self._queue[0]
            wait = due - clock.seconds()
            if wait > 0:
                if self._timer is None:
                    self._timer = clock.callLater(wait, self._due)
                return
            self._queue.popleft()
            self._deliver(due, item, receiver)

    def _due(self) -> None:
        self._timer = None
        self.pump()

    def _deliver(self, due: float, item: bytes | _End, receiver: _Side) -> None:
        fault = self._pipe.proxy._fault
        kind = fault.kind if fault and self.direction in fault.directions else None
        if kind == "stall":
            allowance = fault.n_bytes - self.forwarded
            if allowance <= 0:
                self._hold(due, item)
                return
            if isinstance(item, bytes) and len(item) > allowance:
                self._write(receiver, item[:allowance])
                self._hold(due, item[allowance:])
                return
        if isinstance(item, _End):
            self._pipe.end(receiver, item.reason)
        elif kind == "blackhole":
            pass
        elif kind in ("cut", "reset"):
            self._write(receiver, item[: max(fault.n_bytes - self.forwarded, 0)])
            if self.forwarded >= fault.n_bytes:
                if kind == "cut":
                    self._pipe.cut()
                else:
                    self._pipe.reset()
        else:
            self._write(receiver, item)

    def _write(self, receiver: _Side, data: bytes) -> None:
        if not data:
            return
        self.forwarded += len(data)
        if self.direction == UPSTREAM:
            self._pipe.proxy.bytes_up += len(data)
        else:
            self._pipe.proxy.bytes_down += len(data)
        receiver.transport.write(data)

    @property
    def held(self) -> bool:
        """Whether this flow holds data back (a stall reached its limit)."""
        return self._held

    def _hold(self, due: float, item: bytes | _End) -> None:
        self._queue.appendleft((due, item))
        self._held = True
        self.update_sender()

    def fault_changed(self) -> None:
        """A new mode: count from zero again and release held items."""
        self.forwarded = 0
        if self._held:
            self._held = False
            self.update_sender()
        self.pump()

    def update_sender(self) -> None:
        """Pause the sender while held or while the receiver is full."""
        sender = self._sender()
        if sender is None or sender.lost:
            return
        want = (self._held or self._receiver_paused) and not self.dead
        if want and not self._sender_paused:
            sender.transport.pauseProducing()
        elif self._sender_paused and not want:
            sender.transport.resumeProducing()
        self._sender_paused = want

    def kill(self) -> None:
        """Drop everything queued and cancel the timer: the flow is over."""
        self.dead = True
        self._queue.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.update_sender()

    # IPushProducer, registered on the receiver's transport.

    def pauseProducing(self) -> None:
        self._receiver_paused = True
        self.update_sender()

    def resumeProducing(self) -> None:
        self._receiver_paused = False
        self.update_sender()

    def stopProducing(self) -> None:
        """The receiver's transport is gone; L{_Pipe.side_lost} handles it."""


class _Pipe:
    """One accepted client connection and, unless blackholed, its upstream."""

    log = Logger()

    def __init__(self, proxy: ChaosProxy, blackholed: bool) -> None:
        self.proxy = proxy
        self.blackholed = blackholed
        self.client: _Side | None = None
        self.backend: _Side | None = None
        self._connecting: Deferred | None = None
        self.up = _Flow(self, UPSTREAM)
        self.down = _Flow(self, DOWNSTREAM)
        self.closing = False
        self.done: Deferred[None] = Deferred()
        self._client_lost = False

    def flows(self) -> tuple[_Flow, _Flow]:
        return (self.up, self.down)

    def sides(self) -> list[_Side]:
        return [s for s in (self.client, self.backend) if s is not None and not s.lost]

    def side_made(self, side: _Side) -> None:
        if side.role == "client":
            self.client = side
            side.transport.registerProducer(self.down, True)
            self.proxy._client_made()
            if not self.blackholed:
                self._connect()
        else:
            self.backend = side
            side.transport.registerProducer(self.up, True)
            self.down.update_sender()
            self.up.pump()

    def _connect(self) -> None:
        proxy = self.proxy
        endpoint = TCP4ClientEndpoint(
            proxy._reactor, proxy.target_host, proxy.target_port, timeout=CONNECT_TIMEOUT
        )
        self._connecting = connectProtocol(endpoint, _Side(self, "backend"))
        self._connecting.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, _: object) -> None:
        self._connecting = None

    def _connect_failed(self, reason: Failure) -> None:
        self._connecting = None
        if not reason.check(ConnectingCancelledError, CancelledError):
            self.log.info(
                "chaos proxy: upstream connect failed ({why}); aborting the client",
                why=reason.getErrorMessage(),
            )
            self.abort()
        self._check_done()

    def side_data(self, side: _Side, data: bytes) -> None:
        if side.role == "client":
            self.proxy.received_up += len(data)
        else:
            self.proxy.received_down += len(data)
        if self.closing:
            return
        if side.role == "client":
            if not self.blackholed:
                self.up.push(data)
        else:
            self.down.push(data)

    def side_lost(self, side: _Side, reason: Failure) -> None:
        if side.role == "client":
            self._client_lost = True
            self.down.kill()
            if self._connecting is not None:
                self._connecting.cancel()
            elif self.backend is not None and not self.closing:
                self.up.push(_End(reason))
            self.proxy._client_lost()
        else:
            self.up.kill()
            if not self.closing:
                self.down.push(_End(reason))
        self._check_done()

    def end(self, receiver: _Side, reason: Failure) -> None:
        """The sender closed: close the receiver the same way (FIN or RST)."""
        if receiver.lost:
            return
        if reason.check(ConnectionDone):
            receiver.transport.unregisterProducer()
            receiver.transport.loseConnection()
        else:
            _reset_after_flush(receiver.transport)

    def cut(self) -> None:
        """Close both sides with FIN once their buffers are sent."""
        self._close()
        for side in self.sides():
            side.transport.unregisterProducer()
            side.transport.loseConnection()

    def reset(self) -> None:
        """Reset both sides (RST) once their buffers are sent."""
        self._close()
        for side in self.sides():
            _reset_after_flush(side.transport)

    def abort(self) -> Deferred[None]:
        """Reset both sides now, dropping buffers; fires when both are closed."""
        self._close()
        for side in self.sides():
            side.transport.abortConnection()
        return self.done

    def _close(self) -> None:
        self.closing = True
        for flow in self.flows():
            flow.kill()
        if self._connecting is not None:
            self._connecting.cancel()

    def _check_done(self) -> None:
        if self.done.called or not self._client_lost or self._connecting is not None:
            return
        if self.backend is not None and not self.backend.lost:
            return
        self.proxy._pipes.discard(self)
        self.done.callback(None)


class _ListenFactory(Factory):
    noisy = False

    def __init__(self, proxy: ChaosProxy) -> None:
        self._proxy = proxy

    def buildProtocol(self, addr: Any) -> Protocol | None:
        return self._proxy._accept()


class ChaosProxy:
    """
    A TCP proxy on 127.0.0.1 that forwards to C{(target_host, target_port)}
    and injects latency, cuts, stalls, resets and blackholes on demand.

    @ivar port: the listening port once L{start} has fired, else L{None}.
    @ivar connections_open: client connections accepted and not yet closed.
    @ivar connections_total: client connections accepted so far.
    @ivar bytes_up: bytes written to the target (client to backend).
    @ivar bytes_down: bytes written to clients (backend to client).
    @ivar received_up: bytes read from clients (forwarded or not).
    @ivar received_down: bytes read from the target (forwarded or not).
    """

    log = Logger()

    def __init__(self, reactor: Any, target_host: str, target_port: int,
                 clock: IReactorTime | None = None) -> None:
        """
        @param reactor: provides C{IReactorTCP} (and C{IReactorTime} for the
            connect timeout).
        @param target_host: the backend's IP address (an address, not a
            name: resolving would use the reactor's thread pool).
        @param target_port: the backend's port.
        @param clock: every latency timer and L{wait_idle} timeout is a
            C{callLater} on it; C{reactor} by default (tests of the proxy
            itself pass a L{twisted.internet.task.Clock}).
        """
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self.target_host = target_host
        self.target_port = target_port
        self.port: int | None = None
        self.connections_open = 0
        self.connections_total = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.received_up = 0
        self.received_down = 0
        self._listening: Any = None
        self._factory = _ListenFactory(self)
        self._pipes: set[_Pipe] = set()
        self._latency = 0.0
        self._fault: _Fault | None = None
        self._stopping = False
        self._idle_waiters: list[Deferred[None]] = []

    # Listening

    def start(self) -> Deferred[int]:
        """Listen on 127.0.0.1, port 0; fire with the port."""
        self._stopping = False
        return self._listen(0)

    def refuse(self) -> Deferred[None]:
        """
        Stop listening, so new connects get C{ConnectionRefusedError}.
        Connections already accepted keep going. Fires once the port is closed.
        """
        port, self._listening = self._listening, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)

    def reopen(self) -> Deferred[int]:
        """After L{refuse}: listen on the same port again; fire with it."""
        if self._listening is not None:
            return succeed(self.port)
        self._stopping = False
        return self._listen(self.port)

    def _listen(self, port: int) -> Deferred[int]:
        endpoint = TCP4ServerEndpoint(self._reactor, port, interface="127.0.0.1")

        def listening(listening_port: Any) -> int:
            self._listening = listening_port
            self.port = listening_port.getHost().port
            return self.port

        return endpoint.listen(self._factory).addCallback(listening)

    def stop(self) -> Deferred[None]:
        """
        Stop listening, abort every connection (both sides) and cancel every
        timer. Fires once the port and all sockets are closed.
        """
        self._stopping = True
        waits = [self.refuse()]
        waits.extend(pipe.abort() for pipe in list(self._pipes))
        return gatherResults(waits).addCallback(lambda _: None)

    # Modes

    def pass_through(self) -> None:
        """Forward everything as it comes: no latency, no fault."""
        self._latency = 0.0
        self._set_fault(None)

    def latency(self, seconds: float) -> None:
        """
        Delay every chunk, and every close, by C{seconds} in both
        directions, keeping their order. Combines with the current fault;
        C{latency(0)} or L{pass_through} removes it. Chunks already
        waiting keep their time.
        """
        if seconds < 0:
            raise ValueError(f"latency must be >= 0, not {seconds!r}")
        self._latency = float(seconds)

    def cut_after(self, n_bytes: int, direction: str = DOWNSTREAM) -> None:
        """
        After C{n_bytes} have been forwarded in C{direction}, close both
        sides with FIN (after sending those bytes). With C{n_bytes=0} the
        first chunk closes the connection and nothing of it is sent.

        @param direction: C{"downstream"} (the backend's response),
            C{"upstream"} (the client's request) or C{"both"} (whichever
            direction reaches C{n_bytes} first).
        """
        self._set_fault(_Fault("cut", _directions(direction), _count(n_bytes, "n_bytes")))

    def reset_after(self, n_bytes: int, direction: str = DOWNSTREAM) -> None:
        """
        Like L{cut_after} but both sides get a TCP reset once the
        C{n_bytes} are in the kernel: C{abortConnection} on Twisted's TCP
        transport closes with C{SO_LINGER} 0, so the client reads the bytes
        and then C{ECONNRESET}.
        """
        self._set_fault(_Fault("reset", _directions(direction), _count(n_bytes, "n_bytes")))

    def stall(self, direction: str = DOWNSTREAM, after_bytes: int = 0) -> None:
        """
        After C{after_bytes} in C{direction}, forward nothing more (data or
        close) and keep both connections open. The proxy stops reading from
        the sender, so its writes back up. Any other mode releases the held
        data in order.
        """
        self._set_fault(_Fault("stall", _directions(direction), _count(after_bytes, "after_bytes")))

    def blackhole(self) -> None:
        """
        Accept new connections, read and discard what they send, never
        connect upstream and never answer (until L{stop} or the client
        gives up). Such connections stay blackholed for life; live relayed
        connections drop their data in both directions while this mode is on.
        """
        self._set_fault(_Fault("blackhole", _DIRECTIONS[BOTH]))

    def _set_fault(self, fault: _Fault | None) -> None:
        self._fault = fault
        for pipe in list(self._pipes):
            for flow in pipe.flows():
                flow.fault_changed()

    # Observability

    def wait_idle(self, timeout: float) -> Deferred[None]:
        """
        Fire once no client connection is open; fail with
        C{twisted.internet.defer.TimeoutError} after C{timeout} seconds.
        """
        if self.connections_open == 0:
            return succeed(None)
        d: Deferred[None] = Deferred(self._idle_waiters.remove)
        self._idle_waiters.append(d)
        d.addTimeout(timeout, self._clock)
        return d

    @property
    def holding(self) -> int:
        """How many flows hold data back now (a stall that reached its limit)."""
        return sum(flow.held for pipe in self._pipes for flow in pipe.flows())

    # Called by pipes

    def _accept(self) -> _Side | None:
        if self._stopping:
            return None
        blackholed = self._fault is not None and self._fault.kind == "blackhole"
        pipe = _Pipe(self, blackholed)
        self._pipes.add(pipe)
        return _Side(pipe, "client")

    def _client_made(self) -> None:
        self.connections_open += 1
        self.connections_total += 1

    def _client_lost(self) -> None:
        self.connections_open -= 1
        if self.connections_open == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)
