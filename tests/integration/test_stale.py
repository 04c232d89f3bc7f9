"""
A keep-alive connection that the backend closes as the gateway sends on it:
the gateway, not Twisted's pool, resends (and counts it), to the same instance
when it is the only one.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tests.integration.helpers import Harness, bounded


class _CloseSecondRequest(Protocol):
    """Answer the first request on a connection; drop the connection on the second."""

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.buffer = b""
        self.answered = 0

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            if self.answered:
                self.transport.loseConnection()
                return
            self.answered += 1
            self.factory.answered += 1
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                 b"Content-Length: 2\r\n\r\nok")


class StaleConnectionTests(TestCase):
    timeout = 30

    async def test_stale_keepalive_resent_and_counted(self) -> None:
        """
        Two GETs in a row through a one-instance pool whose backend drops each
        kept-alive connection when a second request arrives on it: both
        clients get 200, the backend answered on two connections, and the
        resend shows in C{clawproxy_upstream_retries_total}; Twisted's own
        silent resend is off, so it is the gateway's retry that did it.
        """
        h = Harness(self)
        factory = Factory.forProtocol(_CloseSecondRequest)
        factory.connections = factory.answered = 0
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}"
        gw = await h.gateway(h.config({"p": {
            "protocol": "http", "instances": [{"id": "only", "url": url}],
            "health_check": {"enabled": False},
        }}))
        self.assertFalse(gw.gateway.upstream_pool.retryAutomatically)
        client = h.client()
        for _ in range(2):
            response = await bounded(client.get(gw.url + "/x"))
            self.assertEqual(response.code, 200)
            self.assertEqual(await bounded(response.content()), b"ok")
        self.assertEqual((factory.connections, factory.answered), (2, 2))
        retries = gw.gateway.metrics.registry.get_sample_value(
            "clawproxy_upstream_retries_total", {"pool": "p"})
        self.assertEqual(retries, 1.0)
