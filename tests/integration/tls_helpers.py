"""
TLS pieces for the integration tests: HTTPS backends with certificates the
tests make, gateway configs written to a file (so C{POST /admin/reload}
re-reads them), and a TLS client that shows which certificate it was served.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import Certificate, CertificateOptions, KeyPair
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from clawproxy.config import Config, load_config
from tests.integration.helpers import Backend, Harness


class Whoami(Resource):
    """A backend answering C{200 {"ok": true, "client": CN}} (its client certificate's CN)."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        cert = request.transport.getPeerCertificate() if request.isSecure() else None
        client = cert.get_subject().CN if cert is not None else None
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"ok": True, "client": client}).encode()


def write(h: Harness, name: str, data: bytes) -> str:
    """Write C{data} to C{name} in the test's directory; its path."""
    path = h.path(name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def serve_tls(h: Harness, cert_pem: bytes, key_pem: bytes, id: str = "secure",
              client_ca: bytes | None = None) -> Backend:
    """
    Serve L{Whoami} over TLS on a fresh loopback port (C{backend.url} is
    then C{https://127.0.0.1:PORT}, see L{https_instance}).

    @param client_ca: require a client certificate issued by this CA (PEM).
    """
    extra: dict[str, Any] = {}
    if client_ca is not None:
        extra["trustRoot"] = Certificate.loadPEM(client_ca)
    options = CertificateOptions(privateKey=KeyPair.load(key_pem, 1).original,
                                 certificate=Certificate.loadPEM(cert_pem).original, **extra)
    site = Site(Whoami())
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    backend = Backend(id=id, site=site, port=None)
    build = site.buildProtocol

    def tracked(addr: Any) -> Any:
        proto = build(addr)
        backend.connections.append(proto)
        h.tracker.protocols.append(proto)
        return proto

    site.buildProtocol = tracked  # type: ignore[method-assign]
    backend.port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
    h.backends.append(backend)
    return backend


def https_instance(backend: Backend, host: str = "127.0.0.1") -> dict[str, Any]:
    """C{backend} as an C{https://} instance entry reached as C{host}."""
    return {"id": backend.id, "url": f"https://{host}:{backend.number}"}


def config_file(h: Harness, pools: Mapping[str, Any],
                routes: Iterable[Mapping[str, Any]] | None = None, **server: Any) -> Config:
    """
    Like C{Harness.config}, but written to C{gateway.yaml} in the test's
    directory and loaded from there, so the gateway can reload it.
    Rewrite it with the same arguments (changed) before a reload.
    """
    data: dict[str, Any] = {
        "server": {"listen": ["tcp:0:interface=127.0.0.1"], **server},
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
        "logging": {"output": h.path("access.log")},
        "pools": dict(pools),
        "routes": list(routes) if routes is not None
        else [{"path": "/*", "pool": next(iter(pools))}],
    }
    path = write(h, "gateway.yaml", json.dumps(data).encode())
    return load_config(path, {})


def capture_log(case: Any) -> list[str]:
    """The text of every log event from now to the end of the test."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        fmt = event.get("log_format")
        if fmt:
            try:
                lines.append(fmt.format(**event))
            except (KeyError, IndexError, ValueError):
                lines.append(fmt)

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


@implementer(IOpenSSLClientConnectionCreator)
class AnyServer:
    """A TLS client that accepts any certificate (to look at the one it is served)."""

    def __init__(self, alpn: list[bytes] | None = None) -> None:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
        if alpn:
            ctx.set_alpn_protos(alpn)
        self.ctx = ctx

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self.ctx, None)
        conn.set_app_data(tlsProtocol)
        conn.set_tlsext_host_name(b"localhost")
        return conn


def served_certificate(transport: Any) -> bytes:
    """The PEM of the certificate the server presented on this TLS C{transport}."""
    from cryptography.hazmat.primitives.serialization import Encoding

    return transport.getPeerCertificate().to_cryptography().public_bytes(Encoding.PEM)
