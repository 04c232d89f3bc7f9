"""Tests for L{clawproxy.listener}: no sockets, a L{MemoryReactor} or stub endpoints."""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from clawproxy.config import parse_config
from clawproxy.listener import Listener, ListenFailed, format_address
from clawproxy.service import Gateway


def in_use(port: int, interface: str = "127.0.0.1") -> CannotListenError:
    return CannotListenError(interface, port,
                             OSError(errno.EADDRINUSE, "Address already in use"))


class FakePort:
    """A listening port at a given address."""

    def __init__(self, address: Any) -> None:
        self.address = address
        self.stopped = False

    def getHost(self) -> Any:
        return self.address

    def stopListening(self) -> None:
        self.stopped = True


class LaterEndpoint:
    """An endpoint whose C{listen} answers when the test says."""

    def __init__(self) -> None:
        self.pending: Deferred[Any] = Deferred()
        self.factories: list[Any] = []

    def listen(self, factory: Any) -> Deferred[Any]:
        self.factories.append(factory)
        return self.pending


class FailingEndpoint:
    """An endpoint whose C{listen} fails at once, as TCP's does on a taken port."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def listen(self, factory: Any) -> Deferred[Any]:
        return fail(self.error)


class ListenerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.patch(Listener, "log", Logger(observer=self.events.append))

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def test_logs_real_address(self) -> None:
        """
        Once listening it logs one line with the address the port really
        has (the one the system chose for port 0), and L{Listener.port} is it.
        """
        endpoint = LaterEndpoint()
        factory = Factory()
        listener = Listener(endpoint, factory, "clawproxy admin", "admin.listen: tcp:0")
        listener.privilegedStartService()
        listener.startService()
        self.assertEqual(endpoint.factories, [factory])
        waiting = listener.when_listening()
        self.assertNoResult(waiting)
        port = FakePort(IPv4Address("TCP", "127.0.0.1", 43121))
        endpoint.pending.callback(port)
        self.assertIs(self.successResultOf(waiting), port)
        self.assertIs(self.successResultOf(listener.when_listening()), port)
        self.assertEqual(self.lines(), ["clawproxy admin listening on 127.0.0.1:43121"])
        self.successResultOf(listener.stopService())
        self.assertTrue(port.stopped)
        self.assertIsNone(listener.port)

    def test_listens_on_its_endpoint(self) -> None:
        """A TCP endpoint string's port and interface are what the reactor is asked for."""
        reactor = MemoryReactor()
        factory = Factory()
        listener = Listener(TCP4ServerEndpoint(reactor, 8080, interface="127.0.0.1"), factory,
                            "clawproxy data plane", "server.listen[0]: tcp:8080")
        listener.startService()
        [(port, got, _, interface)] = reactor.tcpServers
        self.assertEqual((port, got, interface), (8080, factory, "127.0.0.1"))
        self.successResultOf(listener.stopService())

    def test_in_use_is_one_line(self) -> None:
        """
        An address already taken stops the start with L{ListenFailed}: one
        line naming the listener, its key and the address. twistd removes
        its pid file for it (an C{Exception}) and exits 1 printing only that
        line (a C{SystemExit} whose code is the line).
        """
        listener = Listener(FailingEndpoint(in_use(8080)), Factory(), "clawproxy data plane",
                            "server.listen[1]: tcp:8080:interface=127.0.0.1")
        e = self.assertRaises(ListenFailed, listener.privilegedStartService)
        line = ("clawproxy data plane cannot listen on 127.0.0.1:8080 "
                "(server.listen[1]: tcp:8080:interface=127.0.0.1): Address already in use")
        self.assertEqual(str(e), line)
        self.assertEqual(e.code, line)
        self.assertIsInstance(e, Exception)
        self.assertIsInstance(e, SystemExit)
        self.assertEqual(self.lines(), [])

    def test_any_interface_and_ipv6_named(self) -> None:
        """The address in the error is C{0.0.0.0:PORT} for all interfaces, C{[::1]:PORT}."""
        for interface, address in (("", "0.0.0.0:80"), ("::1", "[::1]:80")):
            listener = Listener(FailingEndpoint(in_use(80, interface)), Factory(), "x", "k: v")
            e = self.assertRaises(ListenFailed, listener.startService)
            self.assertIn(f"x cannot listen on {address} (k: v): ", str(e))

    def test_other_error(self) -> None:
        """Another listen error is named by its message."""
        listener = Listener(FailingEndpoint(ValueError("no such key file")), Factory(),
                            "clawproxy data plane (TLS)", "server.tls.listen[0]: ssl:8443")
        e = self.assertRaises(ListenFailed, listener.startService)
        self.assertEqual(str(e), "clawproxy data plane (TLS) cannot listen "
                                 "(server.tls.listen[0]: ssl:8443): no such key file")

    def test_later_failure_logged(self) -> None:
        """An endpoint that fails after the start is logged in one line; waiters fail."""
        endpoint = LaterEndpoint()
        listener = Listener(endpoint, Factory(), "simulator s", "simulators[0].listen: x")
        listener.startService()
        waiting = listener.when_listening()
        endpoint.pending.errback(in_use(1))
        self.failureResultOf(waiting, CannotListenError)
        self.assertEqual(self.lines(), ["simulator s cannot listen on 127.0.0.1:1 "
                                        "(simulators[0].listen: x): Address already in use"])
        self.successResultOf(listener.stopService())

    def test_stop_before_listening(self) -> None:
        """Stopping while the endpoint has not answered gives up on it, silently."""
        endpoint = LaterEndpoint()
        listener = Listener(endpoint, Factory(), "x", "k: v")
        listener.startService()
        self.successResultOf(listener.stopService())
        self.assertTrue(endpoint.pending.called)
        self.assertEqual(self.lines(), [])

    def test_format_address(self) -> None:
        """Addresses print as C{host:port}, C{[v6]:port}, or a UNIX socket's path."""
        self.assertEqual(format_address(IPv4Address("TCP", "127.0.0.1", 8080)),
                         "127.0.0.1:8080")
        self.assertEqual(format_address(IPv6Address("TCP", "::1", 8080)), "[::1]:8080")
        self.assertEqual(format_address(UNIXAddress(b"/run/gw.sock")), "/run/gw.sock")


class GatewayListenerTests(SynchronousTestCase):
    """The gateway names each listener after its role and config key."""

    def test_roles_and_keys(self) -> None:
        config = parse_config({
            "server": {"listen": ["tcp:18080:interface=127.0.0.1", "tcp:18081"]},
            "admin": {"listen": "tcp:19901:interface=127.0.0.1"},
            "simulators": [{"listen": "tcp:11777:interface=127.0.0.1", "id": "sim-1"}],
            "logging": {"output": "off"},
            "pools": {"main": {"instances": [{"id": "a", "url": "http://127.0.0.1:1"}],
                               "health_check": {"enabled": False}}},
            "routes": [{"path": "/v1/*", "pool": "main"}],
        }, environ={})
        gateway = Gateway(config, MemoryReactorClock())
        self.assertEqual([(x.role, x.source) for x in gateway.listeners], [
            ("clawproxy data plane", "server.listen[0]: tcp:18080:interface=127.0.0.1"),
            ("clawproxy data plane", "server.listen[1]: tcp:18081"),
            ("clawproxy admin", "admin.listen: tcp:19901:interface=127.0.0.1"),
        ])
        sim = gateway.getServiceNamed("sim-1")
        self.assertEqual((sim.role, sim.source),
                         ("simulator sim-1", "simulators[0].listen: tcp:11777:interface=127.0.0.1"))
