"""
Read and check the PEM files of the TLS settings (C{server.tls}, C{pools.NAME.tls}).

Pure: the files are parsed with C{cryptography}, nothing is loaded into
OpenSSL here, so the config reader can refuse a bad file (naming the key)
before anything starts, and a reload can refuse it before anything changes.
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

__all__ = ["PemError", "certificate_pems", "check_pair", "read_certificates",
           "read_private_key"]

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*", re.S)


class PemError(ValueError):
    """A PEM file that cannot be used; the message says why (the caller names the key)."""


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise PemError(f"cannot read {path}: {e.strerror}") from None


def read_certificates(path: str) -> list[x509.Certificate]:
    """Every certificate in the PEM file C{path}, in order (at least one)."""
    data = _read(path)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise PemError(f"{path}: no PEM certificate found")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise PemError(f"{path}: not a valid PEM certificate ({e})") from None


def certificate_pems(path: str) -> list[bytes]:
    """
    The PEM block of each certificate in the file C{path}, in order, for
    OpenSSL's loaders (C{Certificate.loadPEM}) when a TLS context is built.

    @raise OSError: the file cannot be read.
    @raise PemError: it holds no PEM certificate.
    """
    with open(path, "rb") as f:
        pems = _PEM_CERT.findall(f.read())
    if not pems:
        raise PemError(f"{path}: no PEM certificate found")
    return pems


def read_private_key(path: str) -> PrivateKeyTypes:
    """The (unencrypted) private key in the PEM file C{path}."""
    data = _read(path)
    if b"PRIVATE KEY-----" not in data:
        raise PemError(f"{path}: no PEM private key found")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PemError(f"{path}: the private key is encrypted (give it unencrypted)") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise PemError(f"{path}: not a valid PEM private key ({e})") from None


def _public_bytes(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_pair(cert_path: str, key_path: str) -> tuple[str, str] | None:
    """
    Check that C{cert_path} holds a certificate (chain) and C{key_path} the
    private key of its first certificate.

    @return: C{None} when they are usable, else C{(which, message)} where
        C{which} is C{"cert"} or C{"key"}: the file at fault.
    """
    try:
        certs = read_certificates(cert_path)
    except PemError as e:
        return "cert", str(e)
    try:
        key = read_private_key(key_path)
    except PemError as e:
        return "key", str(e)
    if _public_bytes(key.public_key()) != _public_bytes(certs[0].public_key()):
        return "key", f"{key_path} is not the private key of the certificate in {cert_path}"
    return None
