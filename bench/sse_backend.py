"""
A fixed-interval SSE backend for the burst benchmark (stdlib asyncio, loopback only).

    python bench/sse_backend.py PORT [--events 50] [--interval 0.02]

Every C{POST} is answered at once with C{200 text/event-stream} (chunked) and
its first event; event M{k} (0-based) is written M{k * interval} seconds after
the request arrived, and the last of the C{events} events is C{data: [DONE]}.
C{GET /v1/models} answers a small JSON list (for the gateway's health checks).
Connections are kept alive, so a proxy's pool can reuse them.

The events are built once; a stream costs one timer per event. Its own
collector is off so a GC pause never shows up as proxy TTFB.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys

_CHUNK = (b'{"id":"chatcmpl-burst","object":"chat.completion.chunk","created":0,'
          b'"model":"sim-stream","choices":[{"index":0,"delta":{"content":"tok "},'
          b'"finish_reason":null}]}')
_MODELS = b'{"object":"list","data":[{"id":"sim-stream","object":"model"}]}'


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class SSEServer(asyncio.Protocol):
    def __init__(self, events: int, interval: float) -> None:
        self.events = events
        self.interval = interval
        self.buf = bytearray()
        self.busy = False
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while not self.busy:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            length = 0
            i = head.find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                length = int(head[i + 17:j if j > 0 else len(head)])
            if len(self.buf) < end + 4 + length:
                return
            del self.buf[:end + 4 + length]
            if head.startswith(b"get"):
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(_MODELS), _MODELS))
                continue
            self.busy = True
            loop = asyncio.get_running_loop()
            start = loop.time()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
                + _chunk(b"data: " + _CHUNK + b"\n\n"))
            self._schedule(loop, start, 1)

    def _schedule(self, loop: asyncio.AbstractEventLoop, start: float, k: int) -> None:
        self.timer = loop.call_at(start + k * self.interval, self._tick, loop, start, k)

    def _tick(self, loop: asyncio.AbstractEventLoop, start: float, k: int) -> None:
        self.timer = None
        if self.transport is None:
            return
        if k == self.events - 1:
            self.transport.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            self.busy = False
            if self.buf:
                self.data_received(b"")
            return
        self.transport.write(_chunk(b"data: " + _CHUNK + b"\n\n"))
        self._schedule(loop, start, k + 1)


async def serve(port: int, events: int, interval: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SSEServer(events, interval), "127.0.0.1", port,
                                      backlog=4096)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("port", type=int)
    p.add_argument("--events", type=int, default=50, help="events per stream, [DONE] included")
    p.add_argument("--interval", type=float, default=0.02, help="seconds between events")
    a = p.parse_args(argv)
    if a.events < 2:
        p.error("--events must be at least 2 (a first event and [DONE])")
    gc.disable()
    try:
        asyncio.run(serve(a.port, a.events, a.interval))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
