"""The TLS listener (C{server.tls}) with a certificate made by the test."""

from __future__ import annotations

import json
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from tests.certs import self_signed
from tests.integration.helpers import HELLO, Harness, RunningGateway, bounded, pool


@implementer(IPolicyForHTTPS)
class TrustOnly:
    """Verify every server as C{hostname}, trusting only C{cert_pem}."""

    def __init__(self, cert_pem: bytes, hostname: str = "localhost") -> None:
        self.options = optionsForClientTLS(hostname, trustRoot=Certificate.loadPEM(cert_pem))

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return self.options


@implementer(IOpenSSLClientConnectionCreator)
class VersionCappedClient:
    """
    A TLS client that offers at most C{max_version} (and, for the test's
    sake, allows old versions at security level 0, so a refusal comes from
    the server, not from this client's own policy).
    """

    def __init__(self, max_version: int) -> None:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_VERSION)
        ctx.set_max_proto_version(max_version)
        ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
        self.ctx = ctx

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self.ctx, None)
        conn.set_app_data(tlsProtocol)
        conn.set_connect_state()
        return conn


class TlsTests(TestCase):
    timeout = 60

    async def start(self) -> tuple[Harness, RunningGateway, bytes]:
        h = Harness(self)
        cert_pem, key_pem = self_signed()
        with open(h.path("gateway.pem"), "wb") as f:
            f.write(cert_pem)
        with open(h.path("gateway.key"), "wb") as f:
            f.write(key_pem)
        sim = h.simulator("sim-1")
        config = h.config(
            {"sim": pool(sim)},
            server={"tls": {"listen": ["ssl:0:interface=127.0.0.1"],
                            "cert": "gateway.pem", "key": "gateway.key"}},
        )
        gw = await h.gateway(config)
        self.assertIsNotNone(gw.tls_port)
        return h, gw, cert_pem

    async def test_https_request_verified(self) -> None:
        """
        The TLS listener serves the gateway over HTTPS with the configured
        certificate: a client trusting that certificate (and checking the
        host name) gets its chat completion, marked C{X-Forwarded-Proto:
        https} upstream; a client trusting only the system CAs refuses it.
        """
        h, gw, cert_pem = await self.start()
        url = f"https://127.0.0.1:{gw.tls_port}"
        client = h.client(contextFactory=TrustOnly(cert_pem))
        response = await bounded(client.post(url + "/v1/chat/completions", json=HELLO))
        self.assertEqual(response.code, 200)
        body = json.loads(await bounded(response.content()))
        self.assertEqual(body["object"], "chat.completion")
        self.assertEqual(response.headers.getRawHeaders("x-sim-instance"), ["sim-1"])
        response = await bounded(client.get(url + "/health"))
        self.assertEqual(response.code, 200)
        await bounded(response.content())

        untrusting = h.client()
        with self.assertRaises(ResponseNeverReceived) as caught:
            await bounded(untrusting.get(url + "/health"))
        self.assertIn("certificate verify failed", str(caught.exception.reasons[0].value))

    async def test_old_tls_versions_refused(self) -> None:
        """
        A client offering at most TLS 1.1 is refused during the handshake
        (min_version defaults to TLSv1.2), while the same client allowed
        TLS 1.2 is served.
        """
        h, gw, _ = await self.start()
        request = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        for version in (SSL.TLS1_VERSION, SSL.TLS1_1_VERSION):
            old = await h.raw(gw.tls_port, request, tls=VersionCappedClient(version))
            data = await bounded(old.closed)
            self.assertEqual(data, b"")
            self.assertIsInstance(old.reason.value, SSL.Error)
            self.assertIn("protocol version", str(old.reason.value))
        ok = await h.raw(gw.tls_port, request, tls=VersionCappedClient(SSL.TLS1_2_VERSION))
        data = await bounded(ok.closed)
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data[:100])
