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


#: The longest method accepted (the longest registered one, C{UPDATEREDIRECTREF},
#: has 17 characters).
MAX_METHOD_LENGTH = 32

#: What nginx accepts in a method: upper-case letters, C{_} and C{-}.
_METHOD = re.compile(rb"[A-Z_-]+")


def check_method(method: bytes) -> None:
    """
    Refuse TRACE and CONNECT (405), as nginx does for TRACE; refuse (400) a
    method longer than L{MAX_METHOD_LENGTH} or with characters other than
    C{A-Z}, C{_} and C{-} (nginx refuses C{get}, C{Get} and C{FOO1} with 400
    too). A well-formed method no route knows (C{FOO}) is left to routing,
    as nginx relays it.
    """
    if len(method) > MAX_METHOD_LENGTH or _METHOD.fullmatch(method) is None:
        raise bad_request("malformed request method", "invalid_method")
    if method in REFUSED_METHODS:
        raise Rejected(405, f"{method.decode('latin-1')} is not allowed",
                       "invalid_request_error", "method_not_allowed")


#: A byte a request target may not carry: anything outside visible ASCII
#: (RFC 9112 3.2: no controls, spaces, DEL or bytes over 0x7e).
_BAD_TARGET_BYTE = re.compile(rb"[^\x21-\x7e]")
#: A control character other than HTAB (RFC 9110 5.5: not in a field value).
#: Bytes over 0x7f (obs-text) stay allowed.
_BAD_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def check_fields(target: bytes, headers: Iterable[tuple[bytes, Iterable[bytes]]]) -> None:
    """
    Refuse (400) a request target with bytes outside C{0x21-0x7e}, and a
    header value with a control character other than HTAB: the upstream
    client refuses the first (a 500 once routed) and a backend may choke
    on the second. Refuse (417) an C{Expect} other than C{100-continue},
    the only expectation the gateway understands.

    @param headers: C{(name, values)} pairs, as C{Headers.getAllRawHeaders()}
        gives them.
    """
    if _BAD_TARGET_BYTE.search(target) is not None:
        raise bad_request("request target has bytes outside visible ASCII", "invalid_target")
    for name, values in headers:
        for value in values:
            if _BAD_VALUE_BYTE.search(value) is not None:
                raise bad_request("control character in a header value", "invalid_header")
        if name.lower() == b"expect":
            for value in values:
                if value.strip().lower() != b"100-continue":
                    raise Rejected(417, "only 'Expect: 100-continue' is understood",
                                   "invalid_request_error", "expectation_failed")
