"""
HTTP/2 on the data plane: Twisted's H2Connection with clawproxy's caps.

Twisted refills a token bucket of stream resets per connection; on top of
that clawproxy caps the total resets one connection may cause
(C{server.max_stream_resets}) and the streams open at once
(C{server.max_concurrent_streams}, advertised in SETTINGS and enforced by h2).
"""

from __future__ import annotations

from typing import Any

import h2.errors
import h2.settings
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.web._http2 import H2Connection


class GatewayH2Connection(H2Connection):
    """An H2Connection that closes connections abusing stream resets."""

    resets = 0

    def __init__(self, reactor: Any, max_concurrent_streams: int, max_resets: int) -> None:
        super().__init__(reactor)
        self.max_resets = max_resets
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS:
                            max_concurrent_streams},
        )

    def _requestAborted(self, event: Any) -> None:
        self.resets += 1
        if self.resets > self.max_resets:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.connectionLost(Failure(ConnectionLost("stream reset")))
                self._requestDone(event.stream_id)
            self.conn.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            self._terminate(Failure(ConnectionLost("too many stream resets")))
            return
        super()._requestAborted(event)
