"""
The TLS listener's certificate replaced on reload (issue 8 point 6), with
real TLS clients over loopback: HTTP/1.1 and HTTP/2 connections opened
before the reload keep being served, new ones get the new certificate, and
a certificate or key that cannot be used refuses the reload.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import TestCase

from tests.certs import self_signed
from tests.integration.edge import h2_connect, h2_headers
from tests.integration.helpers import (
    Harness,
    RawClient,
    RunningGateway,
    bounded,
    error_of,
    parse_response,
    pool,
    response_complete,
    wait_for,
)
from tests.integration.test_process import TWISTD, listening
from tests.integration.tls_helpers import (
    AnyServer,
    capture_log,
    config_file,
    served_certificate,
    write,
)

GET = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"


async def http11(client: RawClient) -> int:
    """One keep-alive C{GET /health} on C{client}'s connection; its status."""
    del client.data[:]
    client.transport.write(GET)
    return parse_response(await client.when(response_complete)).status


class TlsReloadTests(TestCase):
    timeout = 60

    async def start(self) -> tuple[Harness, RunningGateway, bytes]:
        h = Harness(self)
        cert, key = self_signed()
        write(h, "gateway.pem", cert)
        write(h, "gateway.key", key)
        sim = h.simulator("sim-1")
        config = config_file(h, {"sim": pool(sim)},
                             tls={"listen": ["ssl:0:interface=127.0.0.1"], "cert": "gateway.pem",
                                  "key": "gateway.key", "http2": True})
        gw = await h.gateway(config)
        assert gw.tls_port is not None
        return h, gw, cert

    async def reload(self, h: Harness, gw: RunningGateway) -> tuple[int, Any]:
        response = await bounded(h.client().post(gw.admin_url + "/admin/reload"))
        return response.code, await bounded(response.content())

    async def http11(self, client: RawClient) -> int:
        return await http11(client)

    async def h2_get(self, client: Any) -> int | None:
        result = await bounded(client.request(h2_headers(b"GET", b"/health")).done)
        return result.status

    async def new_connection_cert(self, h: Harness, gw: RunningGateway) -> bytes:
        """Open a new TLS connection, make one request on it; the certificate it was served."""
        client = await h.raw(gw.tls_port, tls=AnyServer())
        self.assertEqual(await self.http11(client), 200)
        cert = served_certificate(client.transport)
        client.transport.loseConnection()
        return cert

    async def test_certificate_replaced_without_dropping_connections(self) -> None:
        """
        With an HTTP/1.1 and an HTTP/2 connection open, the certificate files
        are replaced and C{POST /admin/reload} answers 200: both connections
        (served the old certificate) still answer requests, and new
        connections, HTTP/1.1 and HTTP/2 (verified against the new
        certificate only), are served the new one.
        """
        h, gw, old_cert = await self.start()
        log = capture_log(self)
        old11 = await h.raw(gw.tls_port, tls=AnyServer())
        self.assertEqual(await self.http11(old11), 200)
        self.assertEqual(served_certificate(old11.transport), old_cert)
        old2 = await h2_connect(h, gw.tls_port, old_cert)
        self.assertEqual(await self.h2_get(old2), 200)

        new_cert, new_key = self_signed()
        write(h, "gateway.pem", new_cert)
        write(h, "gateway.key", new_key)
        self.assertEqual(await self.reload(h, gw), (200, b'{"reloaded": true}'))
        self.assertTrue(any("TLS listeners now serve" in line and "CN=localhost" in line
                            for line in log), log)

        # The connections opened before go on, on the same TLS sessions.
        self.assertEqual(await self.http11(old11), 200)
        self.assertEqual(await self.http11(old11), 200)
        self.assertEqual(served_certificate(old11.transport), old_cert)
        self.assertEqual(await self.h2_get(old2), 200)
        self.assertFalse(old2.lost)

        # New connections see the new certificate.
        self.assertEqual(await self.new_connection_cert(h, gw), new_cert)
        new2 = await h2_connect(h, gw.tls_port, new_cert)
        self.assertEqual(await self.h2_get(new2), 200)
        self.assertEqual(served_certificate(new2.transport), new_cert)

    async def test_unusable_key_refuses_reload(self) -> None:
        """
        A key that is not PEM, or not the new certificate's, refuses the
        reload (400 naming C{server.tls.key}); the old certificate stays in
        force for new connections.
        """
        h, gw, old_cert = await self.start()
        new_cert, _ = self_signed()
        _, other_key = self_signed()
        write(h, "gateway.pem", new_cert)
        for key, why in ((b"garbage\n", "no PEM private key found"),
                         (other_key, "is not the private key of the certificate")):
            write(h, "gateway.key", key)
            code, body = await self.reload(h, gw)
            self.assertEqual(code, 400)
            err = error_of(body)
            self.assertEqual(err["code"], "invalid_config")
            self.assertIn(f"server.tls.key: {h.path('gateway.key')}", err["message"])
            self.assertIn(why, err["message"])
            self.assertEqual(await self.new_connection_cert(h, gw), old_cert)
        write(h, "gateway.pem", b"not a certificate\n")
        code, body = await self.reload(h, gw)
        self.assertEqual(code, 400)
        self.assertIn("server.tls.cert: ", error_of(body)["message"])
        self.assertEqual(await self.new_connection_cert(h, gw), old_cert)
        # A later good pair is taken.
        good_cert, good_key = self_signed()
        write(h, "gateway.pem", good_cert)
        write(h, "gateway.key", good_key)
        self.assertEqual((await self.reload(h, gw))[0], 200)
        self.assertEqual(await self.new_connection_cert(h, gw), good_cert)


SIGHUP_CONFIG = """\
server:
  listen: ["tcp:0:interface=127.0.0.1"]
  tls: {listen: ["ssl:0:interface=127.0.0.1"], cert: gateway.pem, key: gateway.key}
admin:
  listen: "tcp:0:interface=127.0.0.1"
pools:
  p:
    instances: ["http://127.0.0.1:1"]
    health_check: {enabled: false}
routes:
  - path: /v1/*
logging:
  output: "-"
"""


class SighupTests(TestCase):
    timeout = 60

    async def test_sighup_reloads_certificate(self) -> None:
        """
        C{twistd -n clawproxy}: after the certificate files are replaced and
        the process gets SIGHUP, a connection opened before is still served
        and a new one is served the new certificate.
        """
        h = Harness(self)
        old_cert, old_key = self_signed()
        write(h, "gateway.pem", old_cert)
        write(h, "gateway.key", old_key)
        write(h, "gateway.yaml", SIGHUP_CONFIG.encode())
        proc = h.spawn(*TWISTD, "-n", "--pidfile=", "clawproxy", "-c", "gateway.yaml")
        port = await listening(proc, "clawproxy data plane (TLS)")
        old = await h.raw(port, tls=AnyServer())
        self.assertEqual(await http11(old), 200)
        self.assertEqual(served_certificate(old.transport), old_cert)

        new_cert, new_key = self_signed()
        write(h, "gateway.pem", new_cert)
        write(h, "gateway.key", new_key)
        proc.signal("HUP")
        await wait_for(lambda: "TLS listeners now serve" in proc.output, "the reload log line")
        self.assertEqual(await http11(old), 200)
        fresh = await h.raw(port, tls=AnyServer())
        self.assertEqual(await http11(fresh), 200)
        self.assertEqual(served_certificate(fresh.transport), new_cert)
        self.assertNotIn("Traceback", proc.output)
