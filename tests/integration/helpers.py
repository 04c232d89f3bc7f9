"""
A loopback harness for the integration tests.

Everything runs on the real reactor with real sockets on 127.0.0.1, port 0:
simulators (and small hand-written backends) are started with C{listenTCP},
the gateway is a real L{Gateway} whose listeners are C{tcp:0} strports.
Every wait is bounded, and L{Harness.shutdown} (registered as a cleanup)
stops every listener, connection and process the test started, so trial
finds a clean reactor after each test.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from clawproxy.compat import http_channel_of, observe_client_protocols
from clawproxy.config import Config, parse_config
from clawproxy.service import Gateway
from clawproxy.simulator import SimSettings, SimulatorResource, simulator_site

#: The bound on any single wait, in seconds.
TIMEOUT = 5.0

#: A small chat request body.
HELLO = {"model": "sim-small", "messages": [{"role": "user", "content": "hello there"}]}


def bounded(d: Deferred, seconds: float = TIMEOUT) -> Deferred:
    """C{d}, failing with C{TimeoutError} unless it fires within C{seconds}."""
    d.addTimeout(seconds, reactor)
    return d


def tick(seconds: float = 0.01) -> Deferred:
    """Fire after C{seconds} of reactor time (one step of a bounded wait)."""
    return deferLater(reactor, seconds, lambda: None)


async def wait_for(predicate: Callable[[], Any], what: str, timeout: float = TIMEOUT,
                   step: float = 0.01) -> Any:
    """
    Wait, one reactor tick at a time, until C{predicate()} is true.

    @return: the true value.
    @raise AssertionError: when C{timeout} passes first.
    """
    deadline = reactor.seconds() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"gave up after {timeout}s waiting for {what}")
        await tick(step)


async def until_refused(client: Any, url: str, tries: int = 100, step: float = 0.02) -> bool:
    """
    Ask C{url + "/health"} until the connection is refused (a listener that
    closed); C{True} once refused, C{False} if it never was within C{tries}.
    A request queued in the listen backlog as the listener closed is reset
    (C{ResponseNeverReceived}) and tried again.
    """
    from twisted.internet.error import ConnectionRefusedError
    from twisted.web.client import ResponseNeverReceived

    for _ in range(tries):
        try:
            probe = await bounded(client.get(url + "/health"), 2)
            await bounded(probe.content())
        except ConnectionRefusedError:
            return True
        except ResponseNeverReceived:
            pass
        await tick(step)
    return False


def refusing_port(case: Any) -> int:
    """
    A loopback port that refuses connections for the whole test: bound but
    never listening, so no other listener (port 0 included) can take it.
    """
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    case.addCleanup(s.close)
    return s.getsockname()[1]


def error_of(body: bytes) -> dict[str, Any]:
    """The C{error} object of an OpenAI-shaped error body (asserting its shape)."""
    data = json.loads(body)
    assert set(data) >= {"error"}, data
    err = data["error"]
    assert set(err) == {"message", "type", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    return err


# -- process figures (Linux /proc) --------------------------------------------------------


def _status_bytes(field: str, pid: int | str) -> int:
    """A C{kB} field of C{/proc/PID/status} (C{VmRSS}, C{VmHWM}), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def rss(pid: int | str = "self") -> int:
    """The resident set size of process C{pid} (this one by default), in bytes."""
    return _status_bytes("VmRSS", pid)


def peak_rss(pid: int | str = "self") -> int:
    """The peak resident set size of process C{pid} (this one by default), in bytes."""
    return _status_bytes("VmHWM", pid)


def cpu_seconds(pid: int | str = "self") -> float:
    """CPU time (user + system) process C{pid} (this one by default) has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int | str = "self") -> int:
    """File descriptors process C{pid} (this one by default) has open now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- connection tracking -----------------------------------------------------------------


def _transport_of(proto: Any) -> Any:
    """The reactor transport under C{proto} (through HTTP channel and TLS wrappers)."""
    t = getattr(http_channel_of(proto), "transport", None) or getattr(
        proto, "transport", None
    )
    while t is not None and not hasattr(t, "disconnected") and hasattr(t, "transport"):
        t = t.transport
    return t


def open_transport(proto: Any) -> Any:
    """The reactor transport under C{proto} if it is still connected, else None."""
    t = _transport_of(proto)
    return t if t is not None and not getattr(t, "disconnected", True) else None


def buffered(transport: Any) -> int:
    """Bytes a reactor transport holds in memory, written but not yet sent."""
    data = getattr(transport, "dataBuffer", b"")
    return len(data) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)


class ConnectionTracker:
    """Remembers every protocol built by the factories it watches."""

    def __init__(self) -> None:
        self.protocols: list[Any] = []

    def watch_factory(self, factory: Any) -> Any:
        """Record the protocols C{factory} builds from now on; returns C{factory}."""
        build = factory.buildProtocol

        def tracked(addr: Any) -> Any:
            proto = build(addr)
            if proto is not None:
                self.protocols.append(proto)
            return proto

        factory.buildProtocol = tracked
        return factory

    def watch_pool(self, pool: HTTPConnectionPool) -> HTTPConnectionPool:
        """Record the client connections an L{HTTPConnectionPool} opens."""
        observe_client_protocols(pool, self.protocols.append)
        return pool

    def open(self) -> list[Any]:
        """Transports of watched protocols that are still connected."""
        return [t for t in map(open_transport, self.protocols) if t is not None]


# -- backends ----------------------------------------------------------------------------


@attrs.define(eq=False)
class Backend:
    """A backend listening on 127.0.0.1 (a simulator or a test resource)."""

    id: str
    site: Site
    port: Any
    connections: list[Any] = attrs.Factory(list)
    stopped: bool = False

    @property
    def resource(self) -> Any:
        return self.site.resource

    @property
    def number(self) -> int:
        return self.port.getHost().port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.number}"

    def instance(self, **extra: Any) -> dict[str, Any]:
        """This backend as an entry of a pool's C{instances}."""
        return {"id": self.id, "url": self.url, **extra}

    def open_transports(self) -> list[Any]:
        return [t for t in map(open_transport, self.connections) if t is not None]

    async def kill(self) -> None:
        """
        Die like a crashed process: stop listening (new connections are
        refused) and reset every open connection.
        """
        if not self.stopped:
            self.stopped = True
            await bounded(self.port.stopListening())
        for t in self.open_transports():
            t.abortConnection()
        await wait_for(lambda: not self.open_transports(), f"{self.id}'s connections to close")


class SimFront(Resource):
    """
    Put in front of a simulator: counts the requests that reach it and,
    while C{failing}, answers C{GET /health} with 503; everything else is
    the simulator's.
    """

    isLeaf = True

    def __init__(self, sim: SimulatorResource) -> None:
        super().__init__()
        self.sim = sim
        self.failing = False
        self.health_calls = 0
        self.received: list[bytes] = []

    def render(self, request: Any) -> Any:
        if request.path == b"/health":
            self.health_calls += 1
            if self.failing:
                request.setResponseCode(503)
                request.setHeader(b"content-type", b"application/json")
                request.setHeader(b"x-sim-instance", self.sim.settings.id.encode())
                return b'{"status": "down"}'
        else:
            self.received.append(request.path)
        return self.sim.render(request)


# -- raw HTTP client ---------------------------------------------------------------------


class RawClient(Protocol):
    """
    A byte-level HTTP client: sends exactly what it is told and keeps every
    byte it receives, so tests see what a client on the wire would see.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed: Deferred[bytes] = Deferred()
        self._waiters: list[tuple[Callable[[bytes], bool], Deferred]] = []
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._check()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.reason = reason
        waiters, self._waiters = self._waiters, []
        for _, d in waiters:
            d.errback(AssertionError(f"connection closed first; got {bytes(self.data)[:300]!r}"))
        self.closed.callback(bytes(self.data))

    def _check(self) -> None:
        for item in list(self._waiters):
            predicate, d = item
            if predicate(bytes(self.data)):
                self._waiters.remove(item)
                d.callback(bytes(self.data))

    def when(self, predicate: Callable[[bytes], bool]) -> Deferred[bytes]:
        """Fires with all bytes so far once C{predicate(bytes)} is true."""
        d: Deferred[bytes] = Deferred()
        self._waiters.append((predicate, d))
        self._check()
        return bounded(d)


@attrs.frozen
class RawResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = self.all(name)
        return values[-1] if values else None

    def all(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name.lower()]


def parse_response(raw: bytes) -> RawResponse:
    """Parse one HTTP/1.1 response (Content-Length, chunked, or up to close)."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {raw[:300]!r}"
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    response = RawResponse(status, headers, b"")
    te = response.header(b"transfer-encoding")
    if te is not None and te.lower() == b"chunked":
        body = bytearray()
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2:]
        return attrs.evolve(response, body=bytes(body))
    length = response.header(b"content-length")
    if length is not None:
        return attrs.evolve(response, body=rest[: int(length)])
    return attrs.evolve(response, body=rest)


def response_complete(raw: bytes) -> bool:
    """Whether C{raw} holds one whole response (for L{RawClient.when})."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        return rest.endswith(b"0\r\n\r\n")
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(rest) >= int(line.split(b":")[1])
    return False


# -- processes ---------------------------------------------------------------------------


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.code: int | None = None
        self._waiters: list[Deferred[int]] = []

    @property
    def exited(self) -> bool:
        return self.code is not None

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:  # type: ignore[override]
        code = getattr(reason.value, "exitCode", None)
        signo = getattr(reason.value, "signal", None)
        self.code = code if code is not None else -(signo or 1)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self.code)

    def ended(self) -> Deferred[int]:
        if self.code is not None:
            return succeed(self.code)
        d: Deferred[int] = Deferred()
        self._waiters.append(d)
        return d


@attrs.define(eq=False)
class Process:
    """A child process started by L{Harness.spawn}."""

    args: list[str]
    protocol: _Collect
    transport: Any

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def stdout(self) -> str:
        return bytes(self.protocol.out).decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return bytes(self.protocol.err).decode("utf-8", "replace")

    @property
    def pid(self) -> int | None:
        return self.transport.pid

    def signal(self, name: str) -> None:
        """Send signal C{name} (C{"TERM"}, C{"KILL"}) to this process, if it still runs."""
        if not self.protocol.exited:
            self.transport.signalProcess(name)

    async def wait(self, timeout: float = 20.0) -> int:
        """The exit code (negative signal number if killed by a signal)."""
        return await bounded(self.protocol.ended(), timeout)


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment, less anything that would steer the CLI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAWPROXY_")}
    env.update(extra)
    return env


# -- the gateway -------------------------------------------------------------------------


@attrs.define(eq=False)
class RunningGateway:
    gateway: Gateway
    port: int
    admin_port: int | None
    tls_port: int | None
    access_log: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def registry(self) -> Any:
        return self.gateway.registry

    def instance(self, instance_id: str) -> Any:
        return self.gateway.registry.instance(instance_id)


def pool(*backends: Backend, health: Mapping[str, Any] | None = None, **extra: Any
         ) -> dict[str, Any]:
    """A pool config over C{backends}; active health checks off unless C{health} is given."""
    return {
        "instances": [b.instance() for b in backends],
        "health_check": dict(health) if health is not None else {"enabled": False},
        **extra,
    }


class Harness:
    """
    Starts backends, gateways, clients and processes for one test, and stops
    them all in a cleanup, in an order that leaves the reactor clean.
    """

    def __init__(self, case: TestCase) -> None:
        self.case = case
        self.dir = os.path.abspath(case.mktemp())
        os.makedirs(self.dir)
        self.tracker = ConnectionTracker()
        self.backends: list[Backend] = []
        self.gateways: list[RunningGateway] = []
        self.pools: list[HTTPConnectionPool] = []
        self.processes: list[Process] = []
        self.raw_clients: list[RawClient] = []
        case.addCleanup(self.shutdown)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    # backends

    def serve(self, resource: Any, id: str = "backend") -> Backend:
        """Serve C{resource} on a fresh loopback port."""
        site = Site(resource)
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]
        return self._listen(site, id)

    def simulator(self, id: str, front: bool = False, clock: IReactorTime | None = None,
                  **settings: Any) -> Backend:
        """
        A simulator (fast by default) on a fresh loopback port.

        @param front: put a L{SimFront} in front of it (then
            C{backend.resource} is the front, C{backend.resource.sim} the simulator).
        @param clock: the simulator's clock (time to first token, token
            rate): a L{twisted.internet.task.Clock} lets the test release each
            chunk. Its HTTP server keeps the real reactor.
        """
        settings.setdefault("ttft", 0.005)
        settings.setdefault("tokens_per_second", 2000.0)
        settings.setdefault("max_tokens", 8)
        sim_settings = SimSettings(id=id, **settings)
        site = simulator_site(sim_settings, reactor)
        if clock is not None:
            site.resource = SimulatorResource(sim_settings, clock)
        if front:
            site.resource = SimFront(site.resource)
        return self._listen(site, id)

    def _listen(self, site: Site, id: str) -> Backend:
        backend = Backend(id=id, site=site, port=None)
        build = site.buildProtocol

        def tracked(addr: Any) -> Any:
            proto = build(addr)
            if proto is not None:
                backend.connections.append(proto)
                self.tracker.protocols.append(proto)
            return proto

        site.buildProtocol = tracked  # type: ignore[method-assign]
        backend.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.backends.append(backend)
        return backend

    # gateway

    def config(self, pools: Mapping[str, Any], routes: Iterable[Mapping[str, Any]] | None = None,
               **sections: Any) -> Config:
        """
        A validated config: loopback port-0 listeners (data and admin), access
        log in the test's directory, and the given pools, routes and sections.
        """
        data: dict[str, Any] = {
            "server": {"listen": ["tcp:0:interface=127.0.0.1"]},
            "admin": {"listen": "tcp:0:interface=127.0.0.1"},
            "logging": {"output": self.path("access.log")},
            "pools": dict(pools),
            "routes": list(routes) if routes is not None
            else [{"path": "/*", "pool": next(iter(pools))}],
        }
        for name, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(name), dict):
                data[name] = {**data[name], **value}
            else:
                data[name] = value
        return parse_config(data, environ={}, base_dir=self.dir)

    async def gateway(self, config: Config) -> RunningGateway:
        """Start a L{Gateway} for C{config} on the real reactor; wait until it listens."""
        gw = Gateway(config, reactor)
        self.tracker.watch_factory(gw.site)
        self.tracker.watch_factory(gw.admin_site)
        self.tracker.watch_pool(gw.upstream_pool)
        gw.startService()
        running = RunningGateway(gw, 0, None, None, config.logging.output)
        self.gateways.append(running)
        for svc in gw.listeners:
            port = (await bounded(svc.when_listening())).getHost().port
            if svc.factory is gw.admin_site:
                running.admin_port = port
            elif isinstance(svc.endpoint, SSL4ServerEndpoint):
                running.tls_port = port
            elif not running.port:
                running.port = port
        return running

    # clients

    def client(self, **agent_args: Any) -> HTTPClient:
        """A treq client with a connection pool of its own (closed at cleanup)."""
        p = HTTPConnectionPool(reactor, persistent=True)
        p.retryAutomatically = False
        self.tracker.watch_pool(p)
        self.pools.append(p)
        return HTTPClient(Agent(reactor, pool=p, **agent_args))

    async def raw(self, port: int, request: bytes | None = None, tls: Any = None,
                  source: str | None = None) -> RawClient:
        """
        Connect a L{RawClient} to C{port} and send C{request}.

        @param tls: an C{IOpenSSLClientConnectionCreator} to speak TLS with.
        @param source: the loopback address to connect from (C{127.0.0.2}, ...).
        """
        proto = RawClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5,
                                      bindAddress=(source, 0) if source else None)
        if tls is not None:
            endpoint = wrapClientTLS(tls, endpoint)
        await bounded(connectProtocol(endpoint, proto))
        self.raw_clients.append(proto)
        self.tracker.protocols.append(proto)
        if request is not None:
            proto.transport.write(request)
        return proto

    async def exchange(self, port: int, request: bytes) -> RawResponse:
        """Send one raw request, read one response."""
        proto = await self.raw(port, request)
        data = await proto.when(response_complete)
        proto.transport.loseConnection()
        return parse_response(data)

    # processes

    def spawn(self, *args: str, env: Mapping[str, str] | None = None) -> Process:
        """Start C{sys.executable ARGS...}; it is killed at cleanup if still running."""
        argv = [sys.executable, *args]
        proto = _Collect()
        transport = reactor.spawnProcess(proto, sys.executable, argv,
                                         env=dict(env if env is not None else child_env()),
                                         path=self.dir)
        proc = Process(argv, proto, transport)
        self.processes.append(proc)
        return proc

    async def run(self, *args: str, env: Mapping[str, str] | None = None,
                  timeout: float = 20.0) -> tuple[int, str, str]:
        """Run C{sys.executable ARGS...} to the end: (exit code, stdout, stderr)."""
        proc = self.spawn(*args, env=env)
        code = await proc.wait(timeout)
        return code, proc.stdout, proc.stderr

    # cleanup

    async def shutdown(self) -> None:
        """
        Stop everything this test started: processes, clients, gateways,
        backends, and every connection still open between them.
        """
        for proc in self.processes:
            proc.signal("KILL")
        for proc in self.processes:
            await proc.wait(10)
        await _all(p.closeCachedConnections() for p in self.pools)
        # Requests a failed test left in flight would hold up the gateway's
        # graceful stop: reset every connection first.
        await self._reset_connections()
        await _all(g.gateway.stopService() for g in self.gateways if g.gateway.running)
        await _all(b.port.stopListening() for b in self.backends if not b.stopped)
        for b in self.backends:
            b.stopped = True
        # Anything opened meanwhile (a last health probe) goes too.
        for _ in range(10):
            await self._reset_connections()
            if not self.tracker.open():
                break
        # Give the other ends one more turn to see their connections end.
        await tick(0)

    async def _reset_connections(self) -> None:
        """Reset every open connection; wait for those (not newer ones) to close."""
        reset = self.tracker.open()
        for t in reset:
            t.abortConnection()
        await wait_for(lambda: all(t.disconnected for t in reset),
                       "every test connection to close")


async def _all(ds: Iterable[Deferred | None]) -> None:
    ds = [d for d in ds if d is not None]
    if ds:
        await bounded(DeferredList(ds, consumeErrors=True))


