"""
Header hygiene for relayed requests and responses: hop-by-hop and
C{Connection}-named headers dropped both ways, the proxy's own forwarding
headers set after stripping, upstream response heads validated.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from twisted.web.http_headers import Headers

from clawproxy.errors import bad_gateway
from clawproxy.web.context import RequestContext

#: Headers that describe one connection and are never forwarded (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        b"Connection", b"Keep-Alive", b"Proxy-Authenticate", b"Proxy-Authorization",
        b"Proxy-Connection", b"TE", b"Trailer", b"Transfer-Encoding", b"Upgrade",
        # RFC 7540 3.2.1: "a hop-by-hop header field" of the h2c upgrade.
        b"HTTP2-Settings",
    )
)
#: Request headers the gateway sets itself.
_OWN_REQUEST = frozenset(
    (b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto",
     b"x-forwarded-host", b"x-request-id")
)
#: Forwarding claims believed only from C{trusted_proxies}; from anyone else
#: they are dropped (the proxy's own X-Forwarded-* replace them).
_UNTRUSTED_FORWARDING = frozenset((b"forwarded", b"x-real-ip"))
#: Response headers Twisted's server (or the gateway, X-Request-ID) sets itself.
_OWN_RESPONSE = frozenset((b"date", b"server", b"content-length", b"x-request-id"))


def connection_named(headers: Headers) -> frozenset[bytes]:
    """Lower-cased names listed in the C{Connection} header(s)."""
    values = headers.getRawHeaders(b"connection")
    if not values:
        return frozenset()
    return frozenset(
        tok.strip().lower() for v in values for tok in v.split(b",") if tok.strip()
    )


def forwarded_headers(
    request: Any, ctx: RequestContext, upstream_host: bytes, trusted: Sequence[Any],
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> Headers:
    """
    The headers sent upstream: the client's, less hop-by-hop and
    C{Connection}-named ones, then the proxy's own (which a client cannot strip).

    @param extra: headers an L{IAttemptObserver} adds to this attempt (a
        trace context), each replacing the client's of that name.
    """
    incoming: Headers = request.requestHeaders
    peer = ctx.client_ip
    from_trusted = bool(trusted) and _is_trusted(peer, trusted)
    drop = HOP_BY_HOP | _OWN_REQUEST | connection_named(incoming)
    if not from_trusted:
        drop = drop | _UNTRUSTED_FORWARDING
    out = Headers()
    for name, values in incoming.getAllRawHeaders():
        if name.lower() not in drop:
            out.setRawHeaders(name, values)
    xff = incoming.getRawHeaders(b"x-forwarded-for")
    if xff and from_trusted:
        chain = b", ".join(xff) + b", " + peer.encode()
    else:
        chain = peer.encode()
    out.setRawHeaders(b"x-forwarded-for", [chain])
    out.setRawHeaders(b"x-forwarded-proto", [b"https" if request.isSecure() else b"http"])
    host = incoming.getRawHeaders(b"host")
    if host:
        out.setRawHeaders(b"x-forwarded-host", [host[-1]])
    out.setRawHeaders(b"x-request-id", [ctx.request_id.encode()])
    for name, value in extra:
        out.setRawHeaders(name, [value])
    out.setRawHeaders(b"host", [upstream_host])
    return out


def _is_trusted(peer: str, trusted: Sequence[Any]) -> bool:
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(addr in net for net in trusted)


def response_headers(response: Any) -> list[tuple[bytes, bytes]]:
    """
    The upstream response's headers fit to relay: hop-by-hop and framing
    removed, names lower-cased (as the L{IResponseFilter} seam promises its
    filters; clients see Twisted's usual capitalisation on HTTP/1.1 and
    lower case on HTTP/2 either way).
    """
    drop = HOP_BY_HOP | _OWN_RESPONSE | connection_named(response.headers)
    # Twisted's client keeps Connection out of response.headers; the upstream
    # agent (backends.upstream) saves it here.
    for value in getattr(response, "connection_header", ()):
        drop |= {tok.strip().lower() for tok in value.split(b",") if tok.strip()}
    out = [
        (low, value)
        for name, values in response.headers.getAllRawHeaders()
        if (low := name.lower()) not in drop
        for value in values
    ]
    for _, value in out:
        if b"\x00" in value or b"\n" in value or b"\r" in value:
            raise bad_gateway("upstream sent a header value with NUL, CR or LF")
    if getattr(response, "bare_lf", False):
        raise bad_gateway("upstream ended a header line with a bare LF")
    return out

