"""
Listening endpoints as services that say where they listen, or why they cannot.

Each L{Listener} has a role (C{clawproxy data plane}, C{clawproxy admin},
C{simulator sim-1}) and the config key its endpoint came from. Once it
listens it logs one line with the real address (the port the system chose
for C{tcp:0} included), so operators and tests learn it from the log. An
address it cannot take stops the start with one line naming the listener,
its key and the address, instead of twistd's traceback.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv6Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure


class ListenFailed(SystemExit, Exception):
    """
    A listener could not take its address; the message says which and why.

    An C{Exception}, so that twistd treats it as a failed start (it removes
    its pid file and, when daemonizing, tells the waiting parent) before it
    lets it through; a C{SystemExit}, so that the process then ends with
    status 1 and prints only the message, not a traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def format_address(address: Any) -> str:
    """C{host:port} (C{[host]:port} for IPv6) of a listening address, else its C{str}."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or port is None:
        name = getattr(address, "name", None)
        if isinstance(name, bytes):
            return name.decode("utf-8", "replace")
        return str(name or address)
    if isinstance(address, IPv6Address) or ":" in host:
        return f"[{host}]:{port}"
    return f"{host or '0.0.0.0'}:{port}"


def listen_error(role: str, source: str, reason: Failure) -> str:
    """
    One line saying that C{role} cannot listen, where, and why.

    @param source: where the endpoint came from, e.g. C{server.listen[0]: tcp:8080}.
    """
    err = reason.value
    if isinstance(err, CannotListenError):
        host = err.interface or "0.0.0.0"
        address = f"[{host}]:{err.port}" if ":" in host else f"{host}:{err.port}"
        why = getattr(err.socketError, "strerror", None) or str(err.socketError)
        return f"{role} cannot listen on {address} ({source}): {why}"
    return f"{role} cannot listen ({source}): {reason.getErrorMessage()}"


class Listener(Service):
    """
    Listen on C{endpoint} with C{factory} while running.

    It listens in C{privilegedStartService} (before twistd sheds privileges),
    or in C{startService} when started directly. An endpoint that fails at
    once (TCP, TLS and UNIX endpoints do) raises L{ListenFailed}; one that
    fails later is logged in one line.

    @ivar endpoint: the server endpoint.
    @ivar factory: the protocol factory (a site).
    @ivar port: the listening port while listening, else L{None}.
    """

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Any, role: str,
                 source: str) -> None:
        """
        @param role: who listens, e.g. C{clawproxy admin}, for the log lines.
        @param source: the config key and endpoint string it came from, e.g.
            C{admin.listen: tcp:9901}, for the error.
        """
        self.endpoint = endpoint
        self.factory = factory
        self.role = role
        self.source = source
        self.port: IListeningPort | None = None
        self._listening: Deferred[Any] | None = None
        self._starting = False
        self._failed_now: list[Failure] = []
        self._waiters: list[Deferred[IListeningPort]] = []

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self._listening is None:
            self._listen()

    def when_listening(self) -> Deferred[IListeningPort]:
        """Fires with the listening port once listening (fails if it cannot)."""
        if self.port is not None:
            return succeed(self.port)
        d: Deferred[IListeningPort] = Deferred()
        self._waiters.append(d)
        return d

    def _listen(self) -> None:
        self._starting = True
        try:
            self._listening = self.endpoint.listen(self.factory)
            self._listening.addCallbacks(self._listened, self._failed)
        finally:
            self._starting = False
        if self._failed_now:
            reason = self._failed_now.pop()
            self._listening = None
            raise ListenFailed(listen_error(self.role, self.source, reason))

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        self.log.info("{role} listening on {address}", role=self.role,
                      address=format_address(port.getHost()))
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(port)
        return port

    def _failed(self, reason: Failure) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(reason)
        if reason.check(CancelledError):
            return
        if self._starting:
            self._failed_now.append(reason)
        else:
            self.log.error("{message}", message=listen_error(self.role, self.source, reason))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        d, self._listening = self._listening, None
        port, self.port = self.port, None
        if d is None:
            return succeed(None)
        d.cancel()  # still waiting for the endpoint: give up
        return d.addCallback(lambda _: port.stopListening() if port is not None else None)
