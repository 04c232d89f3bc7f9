"""
HTTP/2 abuse limits on the data plane (issue 3): C{server.max_concurrent_streams}
and C{server.max_stream_resets} (Rapid Reset), over TLS with ALPN h2 and the
C{h2} package as the client.
"""

from __future__ import annotations

from typing import Any

import h2.errors
import h2.settings
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from clawproxy.compat import client_gone
from tests.integration.edge import (
    H2Client,
    gauge_returns,
    h2_connect,
    h2_headers,
    open_connections,
    tls_section,
    write_cert,
)
from tests.integration.helpers import Harness, RunningGateway, bounded, pool, tick, wait_for


class Held(Resource):
    """A backend that holds every request open until L{release}."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Any] = []
        self.received = 0

    def render(self, request: Any) -> Any:
        self.received += 1
        self.pending.append(request)
        request.notifyFinish().addErrback(lambda _: None)
        return NOT_DONE_YET

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for request in pending:
            if not client_gone(request) and not request.finished:
                request.setHeader(b"content-type", b"application/json")
                request.write(b'{"ok": true}')
                request.finish()


def ignore_stream_limit(client: H2Client) -> None:
    """Make the client ignore the server's SETTINGS_MAX_CONCURRENT_STREAMS (as an abuser would)."""
    code = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
    client.conn.remote_settings[code] = 2**31 - 1
    client.conn.remote_settings.acknowledge()


class H2LimitTests(TestCase):
    timeout = 30

    async def start(self, **server: Any) -> tuple[Harness, RunningGateway, Held, bytes]:
        h = Harness(self)
        held = Held()
        backend = h.serve(held, "held")
        self.addCleanup(held.release)
        cert = write_cert(h)
        gw = await h.gateway(h.config({"p": pool(backend)},
                                      server={"tls": tls_section(), **server}))
        return h, gw, held, cert

    async def test_streams_over_the_limit_are_refused(self) -> None:
        """
        With C{max_concurrent_streams: 2}, the server advertises 2; a client
        that opens a third stream while two are in flight has that stream
        refused (RST_STREAM REFUSED_STREAM, so it may safely retry it) and it
        never reaches the backend, while the connection and the two streams
        in flight carry on; once they finish, a new stream is served.
        """
        h, gw, held, cert = await self.start(max_concurrent_streams=2)
        client = await h2_connect(h, gw.tls_port, cert)
        self.assertEqual(
            client.remote_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS), 2)
        ignore_stream_limit(client)
        first = client.request(h2_headers(b"GET", b"/v1/one"))
        second = client.request(h2_headers(b"GET", b"/v1/two"))
        await wait_for(lambda: held.received == 2, "two requests at the backend")
        third = client.request(h2_headers(b"GET", b"/v1/three"))
        await bounded(third.done)
        self.assertEqual(third.reset, h2.errors.ErrorCodes.REFUSED_STREAM)
        self.assertIsNone(third.status)
        self.assertIsNone(client.goaway)
        self.assertFalse(client.lost)
        await tick(0.05)
        self.assertEqual(held.received, 2)
        held.release()
        for result in (first, second):
            await bounded(result.done)
            self.assertEqual((result.status, result.body), (200, b'{"ok": true}'))
        fourth = client.request(h2_headers(b"GET", b"/v1/four"))
        await wait_for(lambda: held.received == 3, "the fourth request at the backend")
        held.release()
        await bounded(fourth.done)
        self.assertEqual(fourth.status, 200)

    async def test_rapid_reset_closes_connection(self) -> None:
        """
        With C{max_stream_resets: 5}, a client that opens streams and resets
        them keeps its connection for 5 resets (it still answers PINGs); the
        6th gets GOAWAY ENHANCE_YOUR_CALM and the connection is closed at
        once (not left to the idle timeout). The requests it had started
        upstream are cancelled: no client or upstream connection is left open.
        """
        h, gw, held, cert = await self.start(max_stream_resets=5)
        baseline = open_connections(gw, "upstream")
        client = await h2_connect(h, gw.tls_port, cert)
        for n in range(1, 7):
            result = client.request(h2_headers(b"GET", b"/v1/reset-%d" % n))
            await wait_for(lambda n=n: held.received == n, f"request {n} at the backend")
            client.reset(result.stream_id)
            if n <= 5:
                # The connection still serves: a PING round trip is answered.
                await client.ping(b"%08d" % n)
                self.assertIsNone(client.goaway, f"GOAWAY after only {n} resets")
                self.assertFalse(client.lost)
        await wait_for(lambda: client.goaway is not None, "the GOAWAY")
        self.assertEqual(client.goaway.error_code, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        await bounded(client.closed)
        await gauge_returns(gw, "upstream", baseline)
        await gauge_returns(gw, "client", 0)
