"""
TLS listeners: pyOpenSSL context with a minimum version and ALPN (h2, http/1.1),
whose certificate and key can be replaced while the listeners keep running.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import Certificate, CertificateOptions, KeyPair, TLSVersion
from twisted.logger import Logger
from twisted.web.http import H2_ENABLED
from zope.interface import implementer

from clawproxy.config import ConfigError, TLSConfig
from clawproxy.pem import PemError, certificate_pems, check_pair, read_certificates

_VERSIONS = {"TLSv1.2": TLSVersion.TLSv1_2, "TLSv1.3": TLSVersion.TLSv1_3}


def context_factory(cfg: TLSConfig) -> CertificateOptions:
    """
    Server TLS options from the configured PEM files, with their context
    already made (so a key that does not fit its certificate fails here).
    """
    pems = certificate_pems(cfg.cert)
    with open(cfg.key, "rb") as f:
        key = KeyPair.load(f.read(), 1)  # 1 = FILETYPE_PEM
    certs = [Certificate.loadPEM(p).original for p in pems]
    protocols = [b"h2", b"http/1.1"] if cfg.http2 and H2_ENABLED else [b"http/1.1"]
    options = CertificateOptions(
        privateKey=key.original,
        certificate=certs[0],
        extraCertChain=certs[1:] or None,
        raiseMinimumTo=_VERSIONS[cfg.min_version],
        acceptableProtocols=protocols,
    )
    options.getContext()
    return options


def load_server_tls(cfg: TLSConfig) -> CertificateOptions:
    """
    L{context_factory}, with any problem reported as a L{ConfigError} naming
    C{server.tls.cert} or C{server.tls.key}.
    """
    problem = check_pair(cfg.cert, cfg.key)
    if problem is not None:
        raise ConfigError([f"server.tls.{problem[0]}: {problem[1]}"])
    try:
        return context_factory(cfg)
    except (OSError, ValueError, SSL.Error) as e:
        raise ConfigError([f"server.tls.key: {cfg.key} cannot be used with {cfg.cert}: {e}"]
                          ) from None


def describe_certificate(path: str) -> str:
    """The subject and expiry of the first certificate in C{path}, for a log line."""
    try:
        cert = read_certificates(path)[0]
    except PemError as e:
        return str(e)
    return f"{cert.subject.rfc4514_string()}, expires {cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z"


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    The TLS settings every TLS listener of a gateway shares, replaceable.

    Each new connection takes the options in force when it is accepted;
    L{replace} changes them for the connections accepted afterwards, while
    those already open keep the context they were made with (pyOpenSSL
    connections hold their own reference), so none is dropped.
    """

    log = Logger()

    def __init__(self, cfg: TLSConfig) -> None:
        self.options = load_server_tls(cfg)
        self.cert = cfg.cert

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return self.options.serverConnectionForTLS(tlsProtocol)

    def prepare(self, cfg: TLSConfig) -> CertificateOptions:
        """
        Load C{cfg}'s certificate and key without putting them in force.

        @raise ConfigError: naming the key at fault.
        """
        return load_server_tls(cfg)

    def replace(self, options: CertificateOptions, cfg: TLSConfig) -> None:
        """Serve new connections with C{options} (from L{prepare})."""
        self.options = options
        self.cert = cfg.cert
        self.log.info("TLS listeners now serve {cert} ({what})", cert=cfg.cert,
                      what=describe_certificate(cfg.cert))


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


def tls_endpoints(cfg: TLSConfig, reactor: Any, opts: ServerTLS | None = None
                  ) -> list[tuple[str, SSL4ServerEndpoint]]:
    """Each of C{cfg.listen} with its TLS server endpoint (one L{ServerTLS} for all)."""
    if opts is None:
        opts = ServerTLS(cfg)
    endpoints = []
    for desc in cfg.listen:
        port, interface, backlog = parse_ssl_listen(desc)
        endpoints.append((desc, SSL4ServerEndpoint(reactor, port, opts, backlog=backlog,
                                                   interface=interface)))
    return endpoints
