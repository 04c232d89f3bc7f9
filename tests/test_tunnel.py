"""Which requests are WebSocket handshakes (L{clawproxy.web.tunnel.is_websocket})."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from clawproxy.web.tunnel import is_websocket


def request(method: bytes = b"GET", proto: bytes = b"HTTP/1.1",
            **headers: bytes) -> DummyRequest:
    r = DummyRequest([b"ws"])
    r.method = method
    r.clientproto = proto
    for name, value in headers.items():
        r.requestHeaders.addRawHeader(name.replace("_", "-").encode(), value)
    return r


class IsWebSocketTests(SynchronousTestCase):
    def test_handshake(self) -> None:
        """C{Upgrade: websocket} named by C{Connection}, in any case and list position."""
        self.assertTrue(is_websocket(request(upgrade=b"websocket", connection=b"Upgrade")))
        self.assertTrue(is_websocket(request(upgrade=b"foo, WebSocket",
                                             connection=b"keep-alive, upgrade")))

    def test_not_handshakes(self) -> None:
        """Another method, HTTP/1.0, another protocol, or Connection not naming upgrade."""
        for r in (request(b"POST", upgrade=b"websocket", connection=b"upgrade"),
                  request(proto=b"HTTP/1.0", upgrade=b"websocket", connection=b"upgrade"),
                  request(upgrade=b"h2c", connection=b"upgrade"),
                  request(upgrade=b"websocket", connection=b"keep-alive"),
                  request(upgrade=b"websocket"),
                  request(connection=b"upgrade")):
            self.assertFalse(is_websocket(r))
