"""
A real C{redis-server} for integration tests: loopback only, no
persistence, stopped by PID.

The port is picked by redis-server's own answer, not by asking the OS for a
free one first (another process could take it in between): a random high
port is tried and the server is ready once it logs C{Ready to accept
connections}; when it cannot bind, it exits and another port is tried.

    server = RedisServer(reactor, self.mktemp())
    await server.start()
    self.addCleanup(server.stop)
    ... server.url, server.kill(), server.restart(), server.pause() ...
"""

from __future__ import annotations

import os
import random
import shutil
import signal
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest

#: The redis-server executable, or None when it is not installed.
REDIS_SERVER = shutil.which("redis-server")

#: Ports tried: above the registered range, below Linux's ephemeral ports.
PORTS = (20000, 32000)


def require_redis_server() -> None:
    """
    Skip the calling test when redis-server is missing, or fail it when the
    environment says C{CI=true} (CI installs redis-server, so its absence
    there is a broken pipeline, not a reason to skip).
    """
    if REDIS_SERVER is not None:
        return
    message = "redis-server is not installed (apt install redis-server); Redis store tests need it"
    if os.environ.get("CI", "").lower() == "true":
        raise AssertionError(message)
    raise SkipTest(message)


class RedisExited(Exception):
    """redis-server exited before it was ready; C{output} holds what it logged."""

    def __init__(self, output: bytes) -> None:
        super().__init__(output.decode("utf-8", "replace")[-2000:])
        self.output = output

    @property
    def port_taken(self) -> bool:
        return b"Address already in use" in self.output


class _Watch(ProcessProtocol):
    """Reads the server's log for readiness, and tells when it has exited."""

    def __init__(self) -> None:
        self.output = b""
        self.ready: Deferred[None] = Deferred()
        self.exited = False
        self._waiters: list[Deferred[None]] = []

    def wait_exit(self) -> Deferred[None]:
        """A Deferred (cancellable) that fires once the process has exited."""
        if self.exited:
            return succeed(None)
        d: Deferred[None] = Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(d)
        return d

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if not self.ready.called and b"Ready to accept connections" in self.output:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.exited = True
        if not self.ready.called:
            self.ready.errback(RedisExited(self.output))
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


class RedisServer:
    """
    One redis-server subprocess, on 127.0.0.1.

    @ivar port: the port it listens on, once started (kept across restarts).
    """

    def __init__(self, reactor: Any, directory: str, args: Sequence[str] = ()) -> None:
        self.reactor = reactor
        self.directory = os.path.abspath(directory)
        self.args = list(args)
        self.port: int | None = None
        self._process: Any = None
        self._watch: _Watch | None = None
        os.makedirs(self.directory, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self, timeout: float = 10.0) -> None:
        """Start on a random free port (retrying on another when it is taken)."""
        for _ in range(20):
            port = random.randint(*PORTS)
            try:
                await self._spawn(port, timeout)
            except RedisExited as e:
                if not e.port_taken:
                    raise
                continue
            self.port = port
            return
        raise RuntimeError("redis-server found no free port in 20 tries")

    async def restart(self, timeout: float = 10.0) -> None:
        """Start again on the same port (after L{kill} or L{stop})."""
        assert self.port is not None and self._process is None, "start() and kill() first"
        for _ in range(20):
            try:
                await self._spawn(self.port, timeout)
                return
            except RedisExited as e:
                if not e.port_taken:
                    raise
            await deferLater(self.reactor, 0.1, lambda: None)
        raise RuntimeError(f"port {self.port} stayed taken; cannot restart redis-server")

    async def _spawn(self, port: int, timeout: float) -> None:
        watch = _Watch()
        argv = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self.directory,
                "--logfile", "", "--daemonize", "no", *self.args]
        process = self.reactor.spawnProcess(watch, REDIS_SERVER, argv,
                                            env={"PATH": os.environ.get("PATH", "")},
                                            path=self.directory)
        self._process, self._watch = process, watch
        ready = watch.ready
        ready.addTimeout(timeout, self.reactor)
        try:
            await ready
        except BaseException:
            if process.pid is not None:
                await self._signal_and_wait(signal.SIGKILL, timeout)
            self._process = self._watch = None
            raise

    async def _signal_and_wait(self, sig: int, timeout: float) -> None:
        assert self._watch is not None
        pid = self._process.pid
        if pid is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        await self._watch.wait_exit().addTimeout(timeout, self.reactor)

    async def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL: the kernel closes its sockets, nothing is saved."""
        await self._signal_and_wait(signal.SIGKILL, timeout)
        self._process = self._watch = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered."""
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self._process.pid, signal.SIGCONT)

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (SIGKILL if it takes longer than C{timeout}), if running."""
        if self._process is None:
            return
        try:
            if self._process.pid is not None:
                os.kill(self._process.pid, signal.SIGCONT)
            await self._signal_and_wait(signal.SIGTERM, timeout)
        except (TimeoutError, ProcessLookupError):
            await self._signal_and_wait(signal.SIGKILL, timeout)
        self._process = self._watch = None

