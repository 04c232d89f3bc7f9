"""
Checks on a request head that Twisted's parser lets through (pure).

See TWISTED-FACTS.md: the server accepts a missing, repeated or malformed
C{Host}, absolute-form targets, C{Transfer-Encoding: identity} and header names
with C{_}. Each check here returns nothing or raises L{Rejected}.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from clawproxy.errors import Rejected, bad_request

# reg-name / IPv4 (RFC 3986), or an IPv6 literal in brackets; optional port.
_HOST = re.compile(
    rb"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::([0-9]{1,5}))?$"
)
_SCHEMES = (b"http://", b"https://")


def parse_host(value: bytes) -> tuple[bytes, int | None]:
    """
    Split a C{Host} value into (lower-cased host, port or None).

    @raise Rejected: 400 for userinfo, an empty host, a bad port or characters
        a host may not have.
    """
    if b"@" in value:
        raise bad_request("Host must not carry userinfo", "invalid_host")
    m = _HOST.match(value)
    if m is None:
        raise bad_request("malformed Host header", "invalid_host")
    port = None
    if m.group(1) is not None:
        port = int(m.group(1))
        if not 0 < port <= 65535:
            raise bad_request("Host port out of range", "invalid_host")
        value = value[: -len(m.group(1)) - 1]
    return value.lower(), port


def check_host(values: list[bytes] | None, version: bytes) -> bytes | None:
    """
    Exactly one valid C{Host} (HTTP/1.1 must send one; HTTP/1.0 may not).

    @return: the Host value, or None for an HTTP/1.0 request without one.
    """
    if not values:
        if version == b"HTTP/1.0":
            return None
        raise bad_request("missing Host header", "invalid_host")
    if len(values) > 1:
        raise bad_request("more than one Host header", "invalid_host")
    parse_host(values[0])
    return values[0]


def check_target(target: bytes, method: bytes, host: bytes | None) -> bytes:
    """
    The origin-form path of a request target.

    An absolute-form target (C{http://authority/path}) is accepted only when
    its authority is the request's own C{Host}: clawproxy is no forward proxy.
    C{*} is accepted for C{OPTIONS} only.

    @raise Rejected: 400 otherwise.
    """
    if target.startswith(b"/"):
        return target
    if target == b"*":
        if method == b"OPTIONS":
            return target
        raise bad_request("'*' target is only valid for OPTIONS", "invalid_target")
    lowered = target[:8].lower()
    for scheme in _SCHEMES:
        if lowered.startswith(scheme):
            rest = target[len(scheme):]
            authority, slash, path = rest.partition(b"/")
            authority = authority.partition(b"?")[0]
            if host is None or authority.lower() != host.lower():
                raise bad_request("absolute-form target for another host", "invalid_target")
            parse_host(authority)
            return b"/" + path if slash else b"/"
    raise bad_request("malformed request target", "invalid_target")


def check_header_names(names: Iterable[bytes], allow_underscores: bool) -> None:
    """Refuse header names with C{_} (they alias C{-} in CGI-style backends)."""
    if allow_underscores:
        return
    for name in names:
        if b"_" in name:
            raise bad_request("header names with '_' are not accepted", "invalid_header")


def check_transfer_encoding(values: list[bytes] | None) -> None:
    """C{Transfer-Encoding} may only be C{chunked} (Twisted also lets C{identity} by)."""
    if not values:
        return
    for v in values:
        for coding in v.split(b","):
            if coding.strip().lower() != b"chunked":
                raise Rejected(501, "unsupported Transfer-Encoding", "invalid_request_error",
                               "unsupported_transfer_encoding")


#: Methods a gateway has no business relaying: TRACE echoes the request (and
#: any injected backend credentials) back; CONNECT would make us a tunnel.
REFUSED_METHODS = frozenset((b"TRACE", b"CONNECT"))


def check_method(method: bytes) -> None:
    """Refuse TRACE and CONNECT (405), as nginx does for TRACE."""
    if method.upper() in REFUSED_METHODS:
        raise Rejected(405, f"{method.decode('latin-1')} is not allowed",
                       "invalid_request_error", "method_not_allowed")
