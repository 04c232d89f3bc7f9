"""
The HTTP server side: a Site whose requests and channels enforce the
gateway's limits before any resource runs.
"""

from __future__ import annotations

import ipaddress
import resource
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.web import http, server

from clawproxy import compat
from clawproxy.errors import Rejected, bad_request, headers_too_large, too_large
from clawproxy.policy.validation import (
    check_fields,
    check_header_names,
    check_host,
    check_method,
    check_target,
    check_transfer_encoding,
)


class _Discarding:
    """A request-body sink for a body we will refuse: counts, keeps nothing."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args: Any) -> int:
        return 0

    def read(self, *args: Any) -> bytes:
        return b""

    def tell(self) -> int:
        return 0

    def close(self) -> None:
        pass


class _StreamPeer:
    """What L{GatewaySite.refused} reads of a channel, for an HTTP/2 stream."""

    def __init__(self, stream: Any) -> None:
        self.transport = stream


class GatewayRequest(server.Request):
    """
    A request that refuses bodies over C{max_body_size} as they arrive,
    without keeping them.

    HTTP/2 requests never pass through L{GatewayChannel}, so their head is
    checked here (C{Host}/C{:authority}, header names, the site's
    C{early_checks}) as soon as the stream's headers are in: a refused
    stream gets no C{100 Continue}, its body is discarded, and it is answered
    once the client has ended it, before any resource runs.
    """

    too_large = False
    _received = 0
    _h2_checked = False
    _h2_rejection: Rejected | None = None

    def parseCookies(self) -> None:
        # For HTTP/2, Twisted's H2Stream calls this once all of the stream's
        # headers are in, just before it decides on 100 Continue.
        if isinstance(self.channel, compat.H2Stream) and not self._h2_checked:
            self._h2_checked = True
            try:
                self._check_h2_size()
                self._check_h2_head()
            except Rejected as rej:
                self._h2_rejection = rej
                self.requestHeaders.removeHeader(b"expect")
                self.content = _Discarding()
        super().parseCookies()

    def process(self) -> None:
        if self._h2_rejection is not None:
            self._refuse_h2(self._h2_rejection)
            return
        super().process()

    def handleContentChunk(self, data: bytes) -> None:
        if self._h2_rejection is not None:
            return
        self._handle_content_chunk(data)
        if self.too_large and isinstance(self.channel, compat.H2Stream):
            # Answer now, not once the client has sent (and we discarded) it all.
            self._refuse_h2_early(too_large("request body exceeds max_body_size"))

    def _check_h2_size(self) -> None:
        """
        Refuse (431) an HTTP/2 head larger than C{max_header_size}, counted
        as its HTTP/1.1 form would be (request line, then a line per header).
        """
        channel = self.channel
        size = len(channel.command or b"") + len(channel.path or b"") + 12
        for name, values in self.requestHeaders.getAllRawHeaders():
            for value in values:
                size += len(name) + len(value) + 4
        if size > channel.site.max_header_size:
            raise headers_too_large()

    def _refuse_h2_early(self, rej: Rejected) -> None:
        """
        Answer an HTTP/2 request with the SPEC's JSON error while its body
        is still arriving, and stop the stream: it is never processed.
        """
        self._h2_rejection = rej
        stream = self.channel
        fields, body = self._h2_error(rej, stream.command or b"-", stream.path or b"-")
        conn = compat.h2_connection_of(stream)
        refuse = getattr(conn, "refuse_stream", None)
        if refuse is not None:
            refuse(stream.streamID, rej.status, [(k.lower(), v) for k, v in fields], body)
        else:
            stream.abortConnection()

    def _h2_error(self, rej: Rejected, method: bytes,
                  path: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """Log a refused HTTP/2 request; the fields and body of its answer."""
        stream = self.channel
        return error_fields(rej, stream.site.refused(_StreamPeer(stream), method, path, rej))

    def _check_h2_head(self) -> None:
        site = self.channel.site
        headers = self.requestHeaders
        check_method(self.channel.command)
        hosts = headers.getRawHeaders(b"host")
        if hosts and len(set(hosts)) == 1:
            # :authority and a Host header that agrees with it (h2 refuses
            # a disagreeing pair itself): one Host.
            hosts = hosts[:1]
        check_host(hosts, b"HTTP/2")
        check_fields(self.channel.path, headers.getAllRawHeaders())
        if not site.underscores_in_headers:
            check_header_names((n for n, _ in headers.getAllRawHeaders()), False)
        for check in site.early_checks:
            check(self.channel.command, self.channel.path, headers)

    def _refuse_h2(self, rej: Rejected) -> None:
        """Answer a refused HTTP/2 request with the SPEC's JSON error (the stream ends)."""
        fields, body = self._h2_error(rej, self.method, self.uri)
        self.setResponseCode(rej.status)
        for name, value in fields:
            self.setHeader(name, value)
        self.write(body)
        self.finish()

    def gotLength(self, length: int | None) -> None:
        limit = self.channel.site.max_body_size
        if length is not None and length > limit:
            self.too_large = True
            self.content = _Discarding()
            return
        super().gotLength(length)

    def _handle_content_chunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body_size:
            self.too_large = True
            self.content.close()
            self.content = _Discarding()
            refuse = getattr(self.channel, "refuse", None)
            if refuse is not None:
                refuse(too_large("request body exceeds max_body_size"))
            return
        self.content.write(data)


#: The largest chunk size accepted (nginx's: a signed 64-bit size).
MAX_CHUNK_SIZE = 2**63 - 1


class GatewayChannel(compat.HTTPChannel):
    """
    An HTTP/1.1 channel that checks each request head before any body is
    read or C{100 Continue} sent, and refuses bad ones at once with the SPEC's
    JSON error and C{Connection: close}:

      - a head over C{max_header_size} (block or single line) → 431;
      - a head not complete C{head_timeout} after its first byte → 408 (the
        idle timeout alone resets on every byte, so a trickle never ends);
      - obs-fold lines, a missing/duplicate/malformed C{Host}, foreign
        absolute-form targets, header names with C{_}, a target with bytes
        outside C{0x21-0x7e}, a header value with control characters, a
        malformed method → 400; C{Transfer-Encoding} other than chunked →
        501; an C{Expect} other than C{100-continue} → 417;
      - a declared body over C{max_body_size} → 413, and the site's
        C{early_checks} (e.g. an invalid API key → 401);
      - a chunk size over 63 bits → 400, a chunk that would take the body
        over C{max_body_size} → 413, both at the chunk-size line;
      - a body arriving slower than C{min_body_rate} → 408.

    While the transport's write buffer is full (a client pipelining
    requests without reading the answers), the connection is not read.
    """

    _awaiting_head = True
    _head_call: Any = None
    _body_call: Any = None
    _body_started = 0.0
    _body_received = 0
    _refused = False
    #: A request line has been read and the request not yet handed on (or
    #: refused): if the client leaves now, it is still logged, as a 499.
    _pending = False
    #: The protocol the connection was handed to (L{take_over}), if any.
    _taken: Any = None

    def take_over(self, protocol: Any) -> bytes:
        """
        Hand this connection to C{protocol} (a WebSocket tunnel after its
        101): from now on the bytes read go to its C{dataReceived}, the
        transport's flow control to its C{pauseProducing}/C{resumeProducing},
        and the end of the connection to its C{connectionLost} (then to this
        channel's, which ends the request it was handling: logged, counted).

        @return: bytes already read past the request, for C{protocol}.
        """
        self._taken = protocol
        self._cancel_head_timer()
        self._cancel_body_timer()
        self.setTimeout(None)
        buffered = compat.take_request_buffer(self)
        self.network_producer.resumeProducing()
        return buffered

    def dataReceived(self, data: bytes) -> None:
        if self._taken is not None:
            self._taken.dataReceived(data)
            return
        if self._awaiting_head and self._head_call is None:
            self._head_call = self.site.reactor.callLater(
                self.site.head_timeout, self._head_timed_out
            )
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        # The head's size is Twisted's own check, answered in parser_refused.
        starting = self.reading_request_line
        if line[:1] in (b" ", b"\t") and not starting:
            if self.head_size + len(line) > self.totalHeadersSize:
                self._refuse_head()  # as Twisted's size check, which runs first
            else:
                self.refuse(bad_request("obsolete line folding in headers", "invalid_header"))
            return
        super().lineReceived(line)
        if starting and not self.reading_request_line and not self._refused:
            self._pending = True

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse_head()

    def allHeadersReceived(self) -> None:
        self._awaiting_head = False
        self._cancel_head_timer()
        try:
            self._check_head()
        except Rejected as rej:
            self.refuse(rej)
            return
        super().allHeadersReceived()
        if self.length != 0 and not self._refused:
            self._body_started = self.site.reactor.seconds()
            self._body_received = 0
            self._body_call = self.site.reactor.callLater(1.0, self._check_body_rate)

    def _check_head(self) -> None:
        site = self.site
        req = self.requests[-1]
        headers = req.requestHeaders
        method = self.request_method
        version = self.request_version
        check_method(method)
        host = check_host(headers.getRawHeaders(b"host"), version)
        check_fields(self.request_target, headers.getAllRawHeaders())
        path = self.request_target = check_target(self.request_target, method, host)
        te = headers.getRawHeaders(b"transfer-encoding")
        if te and version == b"HTTP/1.0":
            # RFC 9112 6.1: faulty framing (Twisted would decode it as chunked).
            raise bad_request("Transfer-Encoding in an HTTP/1.0 request", "invalid_framing")
        check_transfer_encoding(te)
        if not site.underscores_in_headers:
            check_header_names((n for n, _ in headers.getAllRawHeaders()), False)
        if self.length is not None and self.length > site.max_body_size:
            raise too_large("request body exceeds max_body_size")
        for check in site.early_checks:
            check(method, path, headers)

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_received += len(data)
        super().rawDataReceived(data)
        due = self.chunk_remaining
        if due is not None and not self._refused:
            self._check_chunk_size(due)

    def _check_chunk_size(self, due: int) -> None:
        """
        Refuse a chunked body at its chunk-size line, not when its data fails
        to come: a size past what nginx takes (over 63 bits) → 400, a chunk
        that would take the body over C{max_body_size} → 413.
        """
        if due > MAX_CHUNK_SIZE:
            self.refuse(bad_request("chunk size out of range", "malformed_request"))
            return
        req = self.requests[-1] if self.requests else None
        received = getattr(req, "_received", 0)
        if received + due > self.site.max_body_size:
            self.refuse(too_large("request body exceeds max_body_size"))

    def pauseProducing(self) -> None:
        """
        The transport's write buffer is full: stop reading the connection
        until it drains, also while a request is being handled.

        Twisted pauses reading here only between requests; pipelined
        requests answered at once then kept being read, and their answers
        piled up in the write buffer without bound. Twisted resumes reading
        in C{resumeProducing} (between requests) or in C{requestDone} (once
        the transport is no longer full).
        """
        if self._taken is not None:
            self._taken.pauseProducing()
            return
        super().pauseProducing()
        self.network_producer.pauseProducing()

    def resumeProducing(self) -> None:
        if self._taken is not None:
            self._taken.resumeProducing()
            return
        super().resumeProducing()

    def allContentReceived(self) -> None:
        self._cancel_body_timer()
        self._pending = False
        if self._refused:
            return
        super().allContentReceived()

    def _check_body_rate(self) -> None:
        """Refuse a body that trickles in slower than C{min_body_rate}."""
        self._body_call = None
        site = self.site
        elapsed = site.reactor.seconds() - self._body_started
        grace = site.head_timeout
        if elapsed > grace and self._body_received < site.min_body_rate * (elapsed - grace):
            self.refuse(Rejected(408, "request body arrived too slowly",
                                 "invalid_request_error", "request_timeout"))
            return
        self._body_call = site.reactor.callLater(1.0, self._check_body_rate)

    def requestDone(self, request: Any) -> None:
        self._awaiting_head = True
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        if self._taken is not None:
            self._taken.connectionLost(reason)
        self._cancel_head_timer()
        self._cancel_body_timer()
        if self._pending and not self._refused:
            self._pending = False
            self.site.refused(self, self.request_method or b"-", self.request_target or b"-",
                              Rejected(499, "client closed the connection mid-request",
                                       "invalid_request_error", "client_disconnected"))
        super().connectionLost(reason)

    def _cancel_head_timer(self) -> None:
        if self._head_call is not None:
            if self._head_call.active():
                self._head_call.cancel()
            self._head_call = None

    def _cancel_body_timer(self) -> None:
        if self._body_call is not None:
            if self._body_call.active():
                self._body_call.cancel()
            self._body_call = None

    def _head_timed_out(self) -> None:
        self._head_call = None
        self.refuse(Rejected(408, "request head not received in time", "invalid_request_error",
                             "request_timeout"))

    def parser_refused(self) -> None:
        """
        Twisted's parser refused the request: answer in our shape, and log
        it. Over C{totalHeadersSize} (Twisted counts each head line before
        anything else) it is a 431.
        """
        if self.head_size > self.totalHeadersSize:
            self._refuse_head()
        else:
            self.refuse(bad_request("malformed request", "malformed_request"))

    def _refuse_head(self) -> None:
        self.refuse(headers_too_large())

    def refuse(self, rej: Rejected) -> None:
        """
        Answer a request we will not read any further, then close.

        Used before a response has started; the site logs it like any request.
        """
        if self._refused:
            return
        self._refused = True
        self._cancel_head_timer()
        self._cancel_body_timer()
        command = self.request_method or b"-"
        path = self.request_target or b"-"
        request_id = self.site.refused(self, command, path, rej)
        self.transport.write(raw_error_response(rej, request_id))
        self.transport.loseConnection()
        self.dataReceived = self.lineReceived = lambda *a: None  # type: ignore[method-assign]


class _CountedProtocol(compat.GenericHTTPChannelProtocol):
    """
    Twisted's HTTP/1.1-or-h2 switch, counting open connections on the site
    and using L{GatewayH2Connection} when ALPN chooses h2.
    """

    def make_h2_channel(self) -> Any:
        """Our HTTP/2 connection class and limits; the HTTP/1.1 head timer stops."""
        from clawproxy.web.h2 import GatewayH2Connection

        self.channel._cancel_head_timer()
        site = self.site
        return GatewayH2Connection(
            site.reactor, site.max_concurrent_streams, site.max_stream_resets,
            max_header_size=site.max_header_size, head_timeout=site.head_timeout,
            reset_budget=site.h2_reset_budget(),
        )

    #: The client's address, as counted in the site's C{per_address}.
    client_host: str | None = None

    def makeConnection(self, transport: Any) -> None:
        site = self.site
        site.open_connections += 1
        host = self.client_host = getattr(transport.getPeer(), "host", None)
        site.per_address[host] = site.per_address.get(host, 0) + 1
        super().makeConnection(transport)

    def connectionLost(self, reason: Any) -> None:
        site = self.site
        site.open_connections -= 1
        host = self.client_host
        left = site.per_address.get(host, 1) - 1
        if left > 0:
            site.per_address[host] = left
        else:
            site.per_address.pop(host, None)
        super().connectionLost(reason)


def error_fields(rej: Rejected,
                 request_id: str | None = None) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """
    The header fields and the body of the SPEC's JSON error for C{rej}:
    C{Content-Type}, C{X-Request-ID} (when known), C{rej}'s own headers,
    C{Content-Length}. Shared by the HTTP/1.1 and HTTP/2 refusals.
    """
    body = rej.body()
    fields = [(b"Content-Type", b"application/json")]
    if request_id is not None:
        fields.append((b"X-Request-ID", request_id.encode()))
    fields.extend((k.encode(), v.encode()) for k, v in rej.headers)
    fields.append((b"Content-Length", b"%d" % len(body)))
    return fields, body


def raw_error_response(rej: Rejected, request_id: str | None = None) -> bytes:
    """A whole HTTP/1.1 error response, closing the connection, for C{rej}."""
    fields, body = error_fields(rej, request_id)
    fields.insert(1, (b"Connection", b"close"))
    head = b"".join(b"%s: %s\r\n" % h for h in fields)
    phrase = http.RESPONSES.get(rej.status, b"Error")
    return b"HTTP/1.1 %d %s\r\n%s\r\n%s" % (rej.status, phrase, head, body)


class _RefuseConnection(Protocol):
    """Answer 503 to a connection over a connection cap and close it."""

    def __init__(self, message: str = "too many open connections") -> None:
        self.message = message

    def connectionMade(self) -> None:
        rej = Rejected(503, self.message, "server_error", "too_many_connections",
                       (("Retry-After", "1"),))
        self.transport.write(raw_error_response(rej))
        self.transport.loseConnection()


#: File descriptors the default C{max_connections} leaves for everything but
#: client and upstream connections: listeners, log files, admin connections,
#: Redis, health probes, DNS.
FD_RESERVE = 64


def fd_limit() -> int:
    """The process's soft limit on open files (C{RLIMIT_NOFILE})."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 2**20


def default_max_connections(limit: int) -> int:
    """
    C{server.max_connections} when not set: C{(limit - FD_RESERVE) // 2} for
    an open-file limit C{limit}, so that each client connection can have an
    upstream connection of its own and L{FD_RESERVE} descriptors stay free.
    Over it a connection is accepted, answered 503 and closed at once, so the
    process never runs out of descriptors (C{EMFILE} on accept).
    """
    return max(1, (limit - FD_RESERVE) // 2)


def per_address_cap(max_connections: int) -> int:
    """
    Open connections one client address may hold: three quarters of
    C{max_connections} (all of it for a cap under 4), so one address filling
    its share leaves the last quarter to everyone else.
    """
    return max_connections - max_connections // 4


class GatewaySite(server.Site):
    """
    The data-plane Site: our request and channel types, the limits they
    read, and no access log of Twisted's (the gateway writes its own).

    Connections over C{max_connections} (by default
    L{default_max_connections} of the open-file limit), or over
    L{per_address_cap} from one client address (other than a trusted
    proxy), are answered 503 and closed.
    """

    requestFactory = GatewayRequest
    noisy = False

    def protocol(self) -> Any:  # type: ignore[override]
        """Our channel, wrapped so TLS connections can still switch to HTTP/2."""
        channel = GatewayChannel()
        channel.totalHeadersSize = self.max_header_size
        channel.MAX_LENGTH = self.max_header_size
        return _CountedProtocol(channel)

    def __init__(self, resource: Any, max_body_size: int, max_header_size: int,
                 timeout: float, head_timeout: float = 10.0, reactor: Any = None,
                 max_connections: int | None = None, underscores_in_headers: bool = False,
                 min_body_rate: int = 1024, max_concurrent_streams: int = 100,
                 max_stream_resets: int = 200, trusted_proxies: Sequence[Any] = ()) -> None:
        # The gateway reads JSON bodies itself and never looks at request.args:
        # Twisted's form parsing of POST bodies (an email-package Content-Type
        # parse on every POST, multipart decoding into memory) is only cost.
        super().__init__(resource, timeout=timeout, reactor=reactor,
                         parsePOSTFormSubmission=False)
        self.max_body_size = max_body_size
        self.max_header_size = max_header_size
        self.head_timeout = head_timeout
        if max_connections is None:
            max_connections = default_max_connections(fd_limit())
        self.max_connections = max_connections
        self.max_per_address = per_address_cap(max_connections)
        #: Networks exempt from the per-address cap (a load balancer in front).
        self.trusted_proxies = tuple(trusted_proxies)
        self.underscores_in_headers = underscores_in_headers
        self.min_body_rate = min_body_rate
        self.max_concurrent_streams = max_concurrent_streams
        self.max_stream_resets = max_stream_resets
        #: Callables C{(method, path, headers)} run when a request head is in;
        #: they raise L{Rejected} to refuse it before its body is read.
        self.early_checks: list[Callable[[bytes, bytes, Any], None]] = []
        #: Told of every request refused before it reached the resource;
        #: returns the request id used in the answer.
        self.on_refused: Callable[[Any, bytes, bytes, Rejected], str] | None = None
        self.open_connections = 0
        #: Open connections per client address (C{None} for addresses without a host).
        self.per_address: dict[str | None, int] = {}

    _reset_budget: Any = None

    def h2_reset_budget(self) -> Any:
        """The HTTP/2 stream resets each client address may still cause (one per site)."""
        if self._reset_budget is None:
            from clawproxy.web.h2 import ResetBudget

            self._reset_budget = ResetBudget(self.reactor, self.max_stream_resets)
        return self._reset_budget

    def buildProtocol(self, addr: Any) -> Any:
        if self.open_connections >= self.max_connections:
            return _RefuseConnection()
        host = getattr(addr, "host", None)
        if self.per_address.get(host, 0) >= self.max_per_address and not self._trusted(host):
            return _RefuseConnection("too many open connections from this address")
        return super().buildProtocol(addr)

    def _trusted(self, host: str | None) -> bool:
        """Whether C{host} is in C{trusted_proxies} (read only at the per-address cap)."""
        if host is None or not self.trusted_proxies:
            return False
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted_proxies)

    def refused(self, channel: Any, method: bytes, path: bytes, rej: Rejected) -> str:
        if self.on_refused is None:
            return "-"
        return self.on_refused(channel, method, path, rej)

    def log(self, request: Any) -> None:
        pass


class QuietSite(server.Site):
    """A Site for the admin listener and simulators: no per-request log lines."""

    noisy = False

    def log(self, request: Any) -> None:
        pass
