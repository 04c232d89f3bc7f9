"""
Tests for L{clawproxy.web.h2}: the HTTP/2 connection's caps and its fix of
Twisted's sending loop, on memory transports with a L{Clock}.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
from hyperframe.frame import ContinuationFrame, HeadersFrame, SettingsFrame
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server

from clawproxy.web.h2 import (
    ADDRESS_RESET_WINDOW,
    CONTROL_FRAME_BURST,
    CONTROL_FRAME_RATE,
    GatewayH2Connection,
    ResetBudget,
)
from tests.test_compat import Held

GET = [(":method", "GET"), (":path", "/x"), (":scheme", "https"), (":authority", "gw")]


def run_due(clock: Clock, limit: int = 50) -> int:
    """
    Run the calls due now, and those they schedule for now, at most C{limit}
    of them (C{Clock.advance(0)} would never return from a loop that
    reschedules itself at once); return how many ran.
    """
    ran = 0
    while ran < limit:
        due = [c for c in clock.calls if c.getTime() <= clock.seconds()]
        if not due:
            break
        clock.calls.remove(due[0])
        due[0].func(*due[0].args, **due[0].kw)
        ran += 1
    return ran


class Server:
    """A L{GatewayH2Connection} on a memory transport and an h2 client talking to it."""

    def __init__(self, clock: Clock | None = None, timeout: float | None = None,
                 budget: ResetBudget | None = None, max_resets: int = 200) -> None:
        self.clock = clock or Clock()
        self.held = Held()
        site = server.Site(self.held)
        self.conn = GatewayH2Connection(self.clock, 100, max_resets, max_header_size=1024,
                                        head_timeout=5.0, reset_budget=budget)
        self.conn.requestFactory = site.requestFactory
        self.conn.site = site
        self.conn.factory = site
        self.conn.timeOut = timeout
        self.conn.callLater = self.clock.callLater
        self.transport = StringTransport()
        self.conn.makeConnection(self.transport)
        self.transport.registerProducer(self.conn, True)
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.client.initiate_connection()
        self.send()

    def send(self, data: bytes | None = None) -> None:
        self.conn.dataReceived(self.client.data_to_send() if data is None else data)

    def events(self) -> list[Any]:
        out = self.client.receive_data(self.transport.value())
        self.transport.clear()
        return out

    def goaway(self) -> Any:
        found = [e for e in self.events() if isinstance(e, h2.events.ConnectionTerminated)]
        return found[0] if found else None


class FlowControlTests(SynchronousTestCase):
    """A stream with data queued and no window waits instead of spinning."""

    def test_stalled_stream_waits_and_times_out(self) -> None:
        """
        Once the client's window is used up, the sending loop stops (no
        call rescheduled at once, forever) and the idle timeout fires.
        """
        s = Server(timeout=30)
        s.client.send_headers(1, GET, end_stream=True)
        s.send()
        request = s.held.requests[0]
        request.write(b"x" * 200_000)
        self.assertLess(run_due(s.clock), 50)
        received = sum(len(e.data) for e in s.events() if isinstance(e, h2.events.DataReceived))
        self.assertEqual(received, 65535)
        s.clock.advance(30)
        self.assertTrue(s.transport.disconnecting)

    def test_window_update_resumes(self) -> None:
        """
        A WINDOW_UPDATE smaller than what is queued still restarts the loop;
        the client gets the whole response as it opens its window.
        """
        s = Server()
        s.client.send_headers(1, GET, end_stream=True)
        s.send()
        request = s.held.requests[0]
        request.write(b"x" * 200_000)
        request.finish()
        received = 0
        ended = False
        for _ in range(100):
            run_due(s.clock)
            for e in s.events():
                if isinstance(e, h2.events.DataReceived):
                    received += len(e.data)
                    s.client.acknowledge_received_data(e.flow_controlled_length, 1)
                ended = ended or isinstance(e, h2.events.StreamEnded)
            s.send()
            if ended:
                break
        self.assertEqual((received, ended), (200_000, True))


class ResetTests(SynchronousTestCase):
    """Resets: never dispatched when in the request's read, budgeted per address."""

    def test_reset_in_same_read_never_dispatched(self) -> None:
        """A request and its reset in one read: the site never sees the request."""
        s = Server()
        s.client.send_headers(1, GET, end_stream=True)
        s.client.reset_stream(1)
        s.client.send_headers(3, GET, end_stream=True)
        s.send()
        self.assertEqual([r.channel.streamID for r in s.held.requests], [3])
        self.assertEqual(s.conn.resets, 1)
        self.assertEqual(list(s.conn.streams), [3])

    def test_budget_decays(self) -> None:
        """C{capacity} resets are fine; one more is refused; the budget refills over time."""
        clock = Clock()
        budget = ResetBudget(clock, 3, window=3.0)
        self.assertEqual([budget.spend("a") for _ in range(4)], [True, True, True, False])
        self.assertTrue(budget.exhausted("a"))
        self.assertFalse(budget.exhausted("b"))
        clock.advance(1.5)
        self.assertFalse(budget.exhausted("a"))
        clock.advance(10)
        self.assertFalse(budget.exhausted("a"))
        self.assertNotIn("a", budget.levels)

    def test_address_budget_across_connections(self) -> None:
        """
        Resets spread over connections from one address: past the budget the
        connection gets GOAWAY ENHANCE_YOUR_CALM, and the address's next
        connection too, at once; after the window it is served again.
        """
        clock = Clock()
        budget = ResetBudget(clock, 4)
        first = Server(clock, budget=budget)
        for stream_id in (1, 3, 5):
            first.client.send_headers(stream_id, GET, end_stream=True)
            first.client.reset_stream(stream_id)
        first.send()
        self.assertIsNone(first.goaway())
        second = Server(clock, budget=budget)
        for stream_id in (1, 3):
            second.client.send_headers(stream_id, GET, end_stream=True)
            second.client.reset_stream(stream_id)
        second.send()
        self.assertEqual(second.goaway().error_code, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(second.transport.disconnecting)
        third = Server(clock, budget=budget)
        self.assertEqual(third.goaway().error_code, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertEqual(first.held.requests + second.held.requests + third.held.requests, [])
        clock.advance(ADDRESS_RESET_WINDOW)
        fourth = Server(clock, budget=budget)
        fourth.client.send_headers(1, GET, end_stream=True)
        fourth.send()
        self.assertIsNone(fourth.goaway())
        self.assertEqual(len(fourth.held.requests), 1)


class ControlFrameTests(SynchronousTestCase):
    """SETTINGS, PING and PRIORITY frames are rate-limited per connection."""

    def test_settings_flood(self) -> None:
        """A burst of SETTINGS is fine; past it, GOAWAY ENHANCE_YOUR_CALM."""
        s = Server()
        frame = SettingsFrame(0).serialize()
        s.send(frame * (CONTROL_FRAME_BURST - 2))
        self.assertIsNone(s.goaway())
        s.clock.advance(1.0)
        s.send(frame * CONTROL_FRAME_RATE)
        self.assertIsNone(s.goaway())
        s.send(frame * 10)
        self.assertEqual(s.goaway().error_code, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(s.transport.disconnecting)


class HeaderBlockTests(SynchronousTestCase):
    """Unfinished header blocks: a size cap and a deadline."""

    def test_block_over_cap(self) -> None:
        """A block over 4 x max_header_size closes the connection (ENHANCE_YOUR_CALM)."""
        s = Server()
        s.send(HeadersFrame(1, data=b"\0" * 3000).serialize())
        self.assertFalse(s.transport.disconnecting)
        s.send(ContinuationFrame(1, data=b"\0" * 3000).serialize())
        self.assertEqual(s.goaway().error_code, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(s.transport.disconnecting)

    def test_head_deadline(self) -> None:
        """A block not finished within C{head_timeout} closes the connection."""
        s = Server(timeout=60)
        s.send(HeadersFrame(1, data=b"\0" * 100).serialize())
        s.clock.advance(4.9)
        s.send(ContinuationFrame(1, data=b"\0" * 100).serialize())  # bytes don't extend it
        self.assertFalse(s.transport.disconnecting)
        s.clock.advance(0.1)
        self.assertEqual(s.goaway().error_code, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        self.assertTrue(s.transport.disconnecting)

    def test_finished_blocks_no_deadline(self) -> None:
        """Complete requests leave no head timer behind."""
        s = Server()
        s.client.send_headers(1, GET, end_stream=True)
        s.send()
        self.assertEqual(len(s.held.requests), 1)
        self.assertEqual([c for c in s.clock.getDelayedCalls() if c.getTime() == 5.0], [])
