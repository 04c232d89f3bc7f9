"""
TLS towards C{https://} instances.

Verified by default: the system's CAs (L{platformTrust}) and the URL's host
name, checked by C{service_identity} through Twisted's L{optionsForClientTLS}.
A pool's C{tls} section changes that for its instances: a private CA
(C{ca_file}), a client certificate (mutual TLS), another name to send and
verify (C{server_name}), or no verification at all (C{verify: false}).

The gateway has one agent and one persistent connection pool, which key
connections by host:port; so do these settings (the config refuses two
pools giving one https host:port different settings). L{UpstreamTLS} is
that agent's L{IPolicyForHTTPS}: the agent caches the TLS endpoint of each
host:port, so what it gets is a L{_Current} creator that looks the settings
up when each new connection starts, and a reload (L{UpstreamTLS.configure})
takes effect for every connection made afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    KeyPair,
    PrivateCertificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from clawproxy.config import PoolConfig, UpstreamTLSConfig
from clawproxy.pem import certificate_pems

__all__ = ["UpstreamTLS", "client_creator", "tls_failure"]

Netloc = tuple[bytes, int]


def _client_identity(cfg: UpstreamTLSConfig) -> tuple[Any, list[Any]] | None:
    """C{(PrivateCertificate, [chain X509s])} for C{client_cert}/C{client_key}, if given."""
    if cfg.client_cert is None or cfg.client_key is None:
        return None
    certs = certificate_pems(cfg.client_cert)
    with open(cfg.client_key, "rb") as f:
        key = KeyPair.load(f.read(), 1)  # 1 = FILETYPE_PEM
    identity = PrivateCertificate.fromCertificateAndKeyPair(Certificate.loadPEM(certs[0]), key)
    return identity, [Certificate.loadPEM(c).original for c in certs[1:]]


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """C{verify: false}: TLS without checking the peer (still sending SNI, and a client cert)."""

    def __init__(self, options: CertificateOptions, server_name: bytes | None) -> None:
        self._options = options
        self._server_name = server_name
        options.getContext()  # fail now, not on the first connection

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        return connection


def client_creator(host: str, cfg: UpstreamTLSConfig | None) -> Any:
    """
    The TLS client connection creator for an instance on C{host} with the
    pool settings C{cfg} (C{None}: the defaults, verified against the system's CAs).
    """
    if cfg is None:
        return optionsForClientTLS(host, trustRoot=platformTrust())
    name = cfg.server_name or host
    identity = _client_identity(cfg)
    if not cfg.verify:
        sni = None if isIPAddress(name) or isIPv6Address(name) else name.encode("idna")
        key = identity[0].privateKey.original if identity else None
        cert = identity[0].original if identity else None
        return _Unverified(CertificateOptions(privateKey=key, certificate=cert,
                                              extraCertChain=identity[1] if identity else None),
                           sni)
    trust = (trustRootFromCertificates([Certificate.loadPEM(p)
                                        for p in certificate_pems(cfg.ca_file)])
             if cfg.ca_file else platformTrust())
    extra = {"extraCertChain": identity[1]} if identity and identity[1] else None
    return optionsForClientTLS(name, trustRoot=trust,
                               clientCertificate=identity[0] if identity else None,
                               extraCertificateOptions=extra)


def _contents(cfg: UpstreamTLSConfig) -> tuple[bytes, ...]:
    """The bytes of the files C{cfg} names."""
    out = []
    for path in (cfg.ca_file, cfg.client_cert, cfg.client_key):
        if path is not None:
            with open(path, "rb") as f:
                out.append(f.read())
    return tuple(out)


@implementer(IOpenSSLClientConnectionCreator)
class _Current:
    """The creator of one host:port, as L{UpstreamTLS} has it when a connection starts."""

    def __init__(self, policy: UpstreamTLS, netloc: Netloc) -> None:
        self._policy = policy
        self._netloc = netloc

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return self._policy.creator(self._netloc).clientConnectionForTLS(tlsProtocol)


@implementer(IPolicyForHTTPS)
class UpstreamTLS:
    """
    The upstream agent's HTTPS policy: per-host:port settings from the
    pools' C{tls} sections, Twisted's verified defaults elsewhere.
    """

    log = Logger()
    _MAX_DEFAULTS = 1024  # default creators cached (instance URLs come from the config)

    def __init__(self) -> None:
        self._settings: dict[Netloc, Any] = {}
        self._creators: dict[Netloc, Any] = {}
        self._defaults: dict[Netloc, Any] = {}

    def prepare(self, pools: Mapping[str, PoolConfig]
                ) -> tuple[dict[Netloc, Any], dict[Netloc, Any]]:
        """
        Build the creators for C{pools}' C{tls} sections, without putting
        them in force (for L{configure}).

        @raise ValueError: a file could not be used (the config reader
            checks them first, so only a file changed since then fails here).
        """
        settings: dict[Netloc, Any] = {}
        configs: dict[Netloc, UpstreamTLSConfig] = {}
        try:
            for pool in pools.values():
                if pool.tls is None:
                    continue
                # The files' contents count: a CA or client certificate
                # replaced in place is a change too.
                fingerprint = (pool.tls, _contents(pool.tls))
                for instance in pool.instances:
                    uri = URI.fromBytes(instance.url.encode("ascii", "replace"))
                    if uri.scheme == b"https":
                        settings[(uri.host, uri.port)] = fingerprint
                        configs[(uri.host, uri.port)] = pool.tls
            if settings == self._settings:
                return settings, self._creators
            creators = {netloc: client_creator(netloc[0].decode("ascii"), cfg)
                        for netloc, cfg in configs.items()}
        except (OSError, ValueError, SSL.Error) as e:
            raise ValueError(str(e)) from None
        return settings, creators

    def configure(self, prepared: tuple[dict[Netloc, Any], dict[Netloc, Any]]) -> bool:
        """
        Put settings from L{prepare} in force for the connections made from
        now on. Returns whether they changed (the caller then closes the idle
        connections made with the old ones).
        """
        settings, creators = prepared
        changed = settings != self._settings
        self._settings, self._creators = settings, creators
        return changed

    def creator(self, netloc: Netloc) -> Any:
        """The creator in force for C{netloc} (host bytes as in the URL, port)."""
        creator = self._creators.get(netloc)
        if creator is None:
            creator = self._defaults.get(netloc)
            if creator is None:
                if len(self._defaults) >= self._MAX_DEFAULTS:
                    self._defaults.clear()
                creator = self._defaults[netloc] = client_creator(netloc[0].decode("ascii"), None)
        return creator

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return _Current(self, (hostname, port))


def tls_failure(failure: Failure) -> str | None:
    """
    Why an upstream request failed in its TLS handshake, in a few words
    (C{certificate verify failed}, C{certificate does not name localhost},
    the peer's alert), or C{None} if that is not how it failed.
    """
    reasons = [failure, *getattr(failure.value, "reasons", ())]
    for reason in reasons:
        value = reason.value
        if isinstance(value, VerificationError):
            names = []
            for error in value.errors:
                ident = getattr(error, "mismatched_id", None)
                name = getattr(ident, "hostname", None) or getattr(ident, "ip", None) or ident
                names.append(name.decode() if isinstance(name, bytes) else str(name))
            return f"certificate does not name {', '.join(names)}"
        if isinstance(value, SSL.Error):
            parts = [part[-1] for part in (value.args[0] if value.args else ())
                     if isinstance(part, tuple) and part]
            return ", ".join(parts) or str(value) or "TLS error"
    return None
