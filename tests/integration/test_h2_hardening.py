"""
HTTP/2 hardening, round two (issue 7): a client that stops reading, header
blocks never finished, heads and bodies over the limits, Rapid Reset
across reconnects and control-frame floods. Over TLS with ALPN h2 and the
C{h2} package as the client; the gateway runs in this process, so its CPU
and memory are read from C{/proc/self}.
"""

from __future__ import annotations

import gc
from typing import Any

import h2.errors
import h2.events
from hyperframe.frame import ContinuationFrame, HeadersFrame, SettingsFrame
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from tests.integration.edge import (
    H2Client,
    Recorder,
    access_lines,
    h2_connect,
    h2_headers,
    open_connections,
    tls_section,
    write_cert,
)
from tests.integration.helpers import (
    Harness,
    RunningGateway,
    bounded,
    cpu_seconds,
    pool,
    rss,
    tick,
    wait_for,
)

#: The large response body a stalled client is sent.
BIG = b"x" * (4 * 1024 * 1024)


class Big(Resource):
    """A backend answering every request with L{BIG}."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/octet-stream")
        return BIG


def unfinished_header_block(continuations: int, size: int) -> bytes:
    """A HEADERS frame and C{continuations} CONTINUATION frames of C{size} bytes, no END_HEADERS."""
    first = HeadersFrame(1)
    first.data = b"\x00" * size
    out = [first.serialize()]
    for _ in range(continuations):
        frame = ContinuationFrame(1)
        frame.data = b"\x00" * size
        out.append(frame.serialize())
    return b"".join(out)


class H2HardeningTests(TestCase):
    timeout = 60

    async def start(self, backend: Resource | None = None, **server: Any
                    ) -> tuple[Harness, RunningGateway, bytes]:
        h = Harness(self)
        served = h.serve(backend if backend is not None else Recorder(), "backend")
        cert = write_cert(h)
        gw = await h.gateway(h.config({"p": pool(served)},
                                      server={"tls": tls_section(), **server}))
        return h, gw, cert

    async def test_stalled_reader_costs_no_cpu_and_times_out(self) -> None:
        """
        A client that asks for a large response and never reads it (its
        flow-control window runs out): the gateway uses < 5 % of a core over
        the next 10 s (it used to spin a core re-scheduling the stream), and
        the idle timeout (C{client_timeout}) still closes the connection.
        """
        h, gw, cert = await self.start(Big(), client_timeout="11s")
        client = await h2_connect(h, gw.tls_port, cert)
        client.request(h2_headers(b"GET", b"/v1/big"))
        client.transport.pauseProducing()  # never read another byte
        await tick(0.5)
        stalled = reactor.seconds()
        before = cpu_seconds()
        await tick(10.0)
        used = (cpu_seconds() - before) / (reactor.seconds() - stalled)
        print(f"\n    stalled h2 reader: CPU {used * 100:.1f} % of a core over 10 s", end="")
        self.assertEqual(open_connections(gw, "client"), 1)
        await wait_for(lambda: open_connections(gw, "client") == 0,
                       "the idle timeout to close the connection", 6.0, 0.05)
        closed = reactor.seconds() - stalled + 0.5
        print(f"; closed {closed:.1f} s after the stall (client_timeout 11 s)")
        self.assertLess(used, 0.05)
        client.transport.resumeProducing()

    async def test_slow_reader_gets_whole_response(self) -> None:
        """
        A client whose window keeps running out but which reads (and opens
        the window again) receives the whole large response.
        """
        h, gw, cert = await self.start(Big())
        client = await h2_connect(h, gw.tls_port, cert)
        result = client.request(h2_headers(b"GET", b"/v1/big"))
        await bounded(result.done, 20)
        self.assertEqual((result.status, len(result.body)), (200, len(BIG)))

    async def test_unfinished_header_blocks_bounded(self) -> None:
        """
        300 connections each sending a HEADERS frame and 63 CONTINUATION
        frames of 16 KB without END_HEADERS (1 MB each) are closed with
        GOAWAY ENHANCE_YOUR_CALM once the block passes 4 x max_header_size
        (64 KB): RSS grows < 50 MB (it grew ~1.2 MB per connection).
        """
        h, gw, cert = await self.start()
        block = unfinished_header_block(63, 16384)
        piece = len(block) // 16  # four frames at a time, as fast as the server reads them
        gc.collect()
        baseline = rss() / 2**20
        start = reactor.seconds()
        peak = baseline
        clients: list[H2Client] = []
        for _ in range(12):
            batch = [await h2_connect(h, gw.tls_port, cert) for _ in range(25)]
            await tick(0.01)  # let the last one acknowledge the SETTINGS first
            for offset in range(0, len(block), piece):
                for client in batch:
                    if not client.lost:
                        client.transport.write(block[offset:offset + piece])
                await tick(0.001)
                peak = max(peak, rss() / 2**20)
            clients.extend(batch)
            await wait_for(lambda b=batch: all(c.lost for c in b), "the batch to be closed", 10.0)
            peak = max(peak, rss() / 2**20)
        elapsed = reactor.seconds() - start
        gc.collect()
        print(f"\n    300 unfinished header blocks: RSS {baseline:.0f} -> peak {peak:.0f} MB "
              f"(+{peak - baseline:.1f} MB), all closed in {elapsed:.1f} s")
        self.assertLess(peak - baseline, 50)
        for client in clients:
            self.assertIsNotNone(client.goaway)
            self.assertEqual(client.goaway.error_code, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        await wait_for(lambda: open_connections(gw, "client") == 0, "the gauge at 0")

    async def test_unfinished_header_block_head_deadline(self) -> None:
        """
        A connection that starts a header block (small, under the size cap)
        and never finishes it is closed at C{head_timeout} (1 s here) with
        GOAWAY, not left to the idle timeout (60 s).
        """
        h, gw, cert = await self.start(head_timeout="1s")
        clients = [await h2_connect(h, gw.tls_port, cert) for _ in range(5)]
        await tick(0.01)  # let the last one acknowledge the SETTINGS first
        start = reactor.seconds()
        for client in clients:
            client.transport.write(unfinished_header_block(3, 1024))
        await wait_for(lambda: all(c.lost for c in clients), "the head deadline", 5.0)
        elapsed = reactor.seconds() - start
        print(f"\n    unfinished header block closed after {elapsed:.2f} s (head_timeout 1 s)")
        self.assertLess(elapsed, 2.5)
        for client in clients:
            self.assertIsNotNone(client.goaway)

    async def test_head_over_max_header_size_is_431(self) -> None:
        """
        An HTTP/2 request with 60 KB of headers (max_header_size 16 KB) is
        answered 431 in the SPEC's JSON shape and never reaches the backend;
        the connection carries on.
        """
        h, gw, cert = await self.start()
        backend = h.backends[0].resource
        client = await h2_connect(h, gw.tls_port, cert)
        extra = [(b"x-big-%02d" % i, b"v" * 1000) for i in range(60)]
        result = client.request(h2_headers(b"GET", b"/v1/big-head", extra=extra))
        await bounded(result.done)
        self.assertEqual(result.status, 431)
        self.assertEqual(result.error()["code"], "headers_too_large")
        ok = client.request(h2_headers(b"GET", b"/v1/small-head"))
        await bounded(ok.done)
        self.assertEqual(ok.status, 200)
        self.assertEqual([s.uri for s in backend.seen], [b"/v1/small-head"])

    async def test_body_over_limit_refused_at_once(self) -> None:
        """
        An HTTP/2 body without content-length is refused (413, SPEC JSON)
        as soon as it passes C{max_body_size} (1 MB here), with the stream
        then reset NO_ERROR: the client has not had to send 3 MB first.
        """
        h, gw, cert = await self.start(max_body_size="1MB")
        client = await h2_connect(h, gw.tls_port, cert)
        result = client.request(h2_headers(b"POST", b"/v1/chat/completions"), end=False)
        chunk = b"y" * 16384
        sent = 0
        start = reactor.seconds()
        while result.status is None and sent < 3 * 2**20 and not client.lost:
            if client.conn.local_flow_control_window(result.stream_id) >= len(chunk):
                client.send_data(result.stream_id, chunk, end=False)
                sent += len(chunk)
            await tick(0.001)
        await bounded(result.done)
        elapsed = reactor.seconds() - start
        print(f"\n    h2 body over 1 MB refused after {sent / 2**20:.2f} MB sent, "
              f"{elapsed:.2f} s")
        self.assertEqual(result.status, 413)
        self.assertEqual(result.error()["code"], "request_too_large")
        self.assertLess(sent, 2**20 + 256 * 1024)
        self.assertEqual(h.backends[0].resource.seen, [])
        self.assertFalse(client.lost)

    async def test_rapid_reset_across_reconnects(self) -> None:
        """
        With C{max_stream_resets: 20}, connections that each open and reset
        10 streams in one write: none of those requests reaches the backend
        (not logged, no upstream connection used or opened); once the
        address has reset more than 20 streams (over its connections, within
        10 s) its connection gets GOAWAY ENHANCE_YOUR_CALM and its next
        connection is refused the same way at once.
        """
        h, gw, cert = await self.start(max_stream_resets=20)
        backend = h.backends[0].resource
        warm = await h2_connect(h, gw.tls_port, cert)
        for _ in range(2):
            ok = warm.request(h2_headers(b"GET", b"/v1/warm"))
            await bounded(ok.done)
            self.assertEqual(ok.status, 200)
        warm.transport.loseConnection()
        warmed = len(backend.seen)
        upstream = len(h.backends[0].connections)
        goaways = []
        for n in range(3):
            client = await h2_connect(h, gw.tls_port, cert)
            for _ in range(10):
                stream_id = client.conn.get_next_available_stream_id()
                client.conn.send_headers(stream_id, h2_headers(b"GET", b"/v1/reset"),
                                         end_stream=True)
                client.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            client.flush()
            if n == 1:
                # Twenty requests reset in their own read: none was started
                # (no access-log line, no upstream connection touched).
                await client.ping(b"settled!")
                await tick(0.1)
                self.assertEqual([line for line in access_lines(gw) if "/v1/reset" in line], [])
                self.assertEqual(len(h.backends[0].connections), upstream)
                self.assertEqual(len(backend.seen), warmed)
            if n < 2:
                await client.ping(b"%08d" % n)  # still served
            else:
                await bounded(client.closed)
            goaways.append(client.goaway)
        refused = await h2_connect(h, gw.tls_port, cert)
        await bounded(refused.closed)
        goaways.append(refused.goaway)
        self.assertEqual(goaways[:2], [None, None])
        for goaway in goaways[2:]:
            self.assertIsNotNone(goaway)
            self.assertEqual(goaway.error_code, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        await tick(0.2)
        self.assertEqual(len(backend.seen) - warmed, 0)

    async def test_settings_flood_closed(self) -> None:
        """
        A connection sending SETTINGS frames without pause gets GOAWAY
        ENHANCE_YOUR_CALM after a bounded number and is closed within a
        second (it used to be served for ~6 s at 87 % CPU).
        """
        h, gw, cert = await self.start()
        client = await h2_connect(h, gw.tls_port, cert)
        frame = SettingsFrame(0).serialize()
        start = reactor.seconds()
        for _ in range(20):
            if client.lost:
                break
            client.transport.write(frame * 2000)
            await tick(0.01)
        await bounded(client.closed, 3.0)
        elapsed = reactor.seconds() - start
        print(f"\n    SETTINGS flood closed after {elapsed:.2f} s")
        self.assertIsNotNone(client.goaway)
        self.assertEqual(client.goaway.error_code, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertLess(elapsed, 1.0)
