"""TLS listeners: pyOpenSSL context with a minimum version and ALPN (h2, http/1.1)."""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.ssl import Certificate, CertificateOptions, KeyPair, TLSVersion
from twisted.web.http import H2_ENABLED

from clawproxy.config import TLSConfig

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*", re.S)
_VERSIONS = {"TLSv1.2": TLSVersion.TLSv1_2, "TLSv1.3": TLSVersion.TLSv1_3}


def context_factory(cfg: TLSConfig) -> CertificateOptions:
    """Server TLS options from the configured PEM files."""
    with open(cfg.cert, "rb") as f:
        pems = _PEM_CERT.findall(f.read())
    if not pems:
        raise ValueError(f"{cfg.cert}: no PEM certificate found")
    with open(cfg.key, "rb") as f:
        key = KeyPair.load(f.read(), 1)  # 1 = FILETYPE_PEM
    certs = [Certificate.loadPEM(p).original for p in pems]
    protocols = [b"h2", b"http/1.1"] if cfg.http2 and H2_ENABLED else [b"http/1.1"]
    return CertificateOptions(
        privateKey=key.original,
        certificate=certs[0],
        extraCertChain=certs[1:] or None,
        raiseMinimumTo=_VERSIONS[cfg.min_version],
        acceptableProtocols=protocols,
    )


def parse_ssl_listen(desc: str) -> tuple[int, str, int]:
    """C{ssl:PORT[:interface=ADDR][:backlog=N]} -> (port, interface, backlog)."""
    parts = desc.split(":")
    if parts[0] not in ("ssl", "tls") or len(parts) < 2:
        raise ValueError(f"{desc!r}: expected ssl:PORT[:interface=ADDR]")
    port, interface, backlog = int(parts[1]), "", 50
    for opt in parts[2:]:
        name, _, value = opt.partition("=")
        if name == "interface":
            interface = value
        elif name == "backlog":
            backlog = int(value)
    return port, interface, backlog


def tls_endpoints(cfg: TLSConfig, reactor: Any) -> list[tuple[str, SSL4ServerEndpoint]]:
    """Each of C{cfg.listen} with its TLS server endpoint (one context for all)."""
    opts = context_factory(cfg)
    endpoints = []
    for desc in cfg.listen:
        port, interface, backlog = parse_ssl_listen(desc)
        endpoints.append((desc, SSL4ServerEndpoint(reactor, port, opts, backlog=backlog,
                                                   interface=interface)))
    return endpoints
