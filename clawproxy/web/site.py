"""
The HTTP server side: a Site whose requests and channels enforce the
gateway's limits before any resource runs.
"""

from __future__ import annotations

from typing import Any

from twisted.web import http, server

from clawproxy.errors import error_body


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


class GatewayRequest(server.Request):
    """
    A request that refuses bodies over C{max_body_size} as they arrive,
    without keeping them.
    """

    too_large = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        limit = self.channel.site.max_body_size
        if length is not None and length > limit:
            self.too_large = True
            self.content = _Discarding()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body_size:
            self.too_large = True
            self.content.close()
            self.content = _Discarding()
            return
        self.content.write(data)


class GatewayChannel(http.HTTPChannel):
    """
    An HTTP/1.1 channel that answers an oversized head with 431 and a head
    that takes longer than the site's C{head_timeout} to arrive with 408.

    The head deadline runs from the first byte of each request to the end of
    its headers, however slowly the bytes trickle in (Twisted's idle timeout
    alone resets on every byte).
    """

    _awaiting_head = True
    _head_call: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self._awaiting_head and self._head_call is None:
            self._head_call = self.site.reactor.callLater(
                self.site.head_timeout, self._head_timed_out
            )
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._awaiting_head = False
        self._cancel_head_timer()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        self._awaiting_head = True
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        self._cancel_head_timer()
        super().connectionLost(reason)

    def _cancel_head_timer(self) -> None:
        if self._head_call is not None:
            if self._head_call.active():
                self._head_call.cancel()
            self._head_call = None

    def _head_timed_out(self) -> None:
        self._head_call = None
        self._refuse(408, b"Request Timeout", "request head not received in time",
                     "request_timeout")

    def lineReceived(self, line: bytes) -> None:
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._refuse_head()
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse_head()

    def _refuse_head(self) -> None:
        self._refuse(431, b"Request Header Fields Too Large", "request headers too large",
                     "headers_too_large")

    def _refuse(self, status: int, phrase: bytes, message: str, code: str) -> None:
        """Answer a request whose head we will not read, then close."""
        self._cancel_head_timer()
        body = error_body(message, "invalid_request_error", code)
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (status, phrase, len(body), body)
        )
        self.transport.loseConnection()
        self.dataReceived = self.lineReceived = lambda *a: None  # type: ignore[method-assign]


class GatewaySite(server.Site):
    """
    The data-plane Site: our request and channel types, the limits they
    read, and no access log of Twisted's (the gateway writes its own).
    """

    requestFactory = GatewayRequest
    noisy = False

    def protocol(self) -> Any:  # type: ignore[override]
        """Our channel, wrapped so TLS connections can still switch to HTTP/2."""
        return http._GenericHTTPChannelProtocol(GatewayChannel())

    def __init__(self, resource: Any, max_body_size: int, max_header_size: int,
                 timeout: float, head_timeout: float = 10.0, reactor: Any = None) -> None:
        super().__init__(resource, timeout=timeout, reactor=reactor)
        self.max_body_size = max_body_size
        self.max_header_size = max_header_size
        self.head_timeout = head_timeout

    def buildProtocol(self, addr: Any) -> Any:
        proto = super().buildProtocol(addr)
        channel = getattr(proto, "_channel", proto)
        if isinstance(channel, GatewayChannel):
            channel.totalHeadersSize = self.max_header_size
            channel.MAX_LENGTH = self.max_header_size
        return proto

    def log(self, request: Any) -> None:
        pass


class QuietSite(server.Site):
    """A Site for the admin listener and simulators: no per-request log lines."""

    noisy = False

    def log(self, request: Any) -> None:
        pass
