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
    """An HTTP/1.1 channel that answers an oversized head with 431."""

    def lineReceived(self, line: bytes) -> None:
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._refuse_head()
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse_head()

    def _refuse_head(self) -> None:
        body = error_body("request headers too large", "invalid_request_error",
                          "headers_too_large")
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
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
                 timeout: float, reactor: Any = None) -> None:
        super().__init__(resource, timeout=timeout, reactor=reactor)
        self.max_body_size = max_body_size
        self.max_header_size = max_header_size

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
