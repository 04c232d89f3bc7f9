"""Certificates made by the tests: self-signed ones, and a CA issuing server and client certs."""

from __future__ import annotations

import datetime
import ipaddress

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject: str, issuer: x509.Name, public_key: object) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _names(hostname: str) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName([
        x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ])


def self_signed(hostname: str = "localhost") -> tuple[bytes, bytes]:
    """A fresh self-signed certificate for C{hostname} and 127.0.0.1: (cert PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    cert = (
        _builder(hostname, name, key.public_key())
        .add_extension(_names(hostname), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


@attrs.frozen
class CA:
    """A certificate authority made for one test."""

    name: x509.Name
    key: ec.EllipticCurvePrivateKey
    cert_pem: bytes

    @classmethod
    def make(cls, common_name: str = "clawproxy test CA") -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            _builder(common_name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, hostname: str = "localhost", client: bool = False) -> tuple[bytes, bytes]:
        """A server (or client) certificate for C{hostname} and 127.0.0.1: (cert PEM, key PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        cert = (
            _builder(hostname, self.name, key.public_key())
            .add_extension(_names(hostname), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)
