"""
Shared pieces for the HTTP-edge hardening tests (issue 3): a recording
backend, a raw HTTP/2 client over TLS, and readers for the gateway's
open-connection gauge and access log.

Everything runs on the real reactor over loopback with port-0 listeners
(see L{tests.integration.helpers}); every wait is bounded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from tests.certs import self_signed
from tests.integration.helpers import Harness, RunningGateway, bounded, error_of, wait_for

#: An API key the test gateways accept (agent C{tester}), and its stored form.
API_KEY = "sk-edge-test-7f3a9c0d5e1b"


@attrs.frozen
class Seen:
    """One request as the recording backend received it."""

    method: bytes
    uri: bytes
    headers: Headers
    body: bytes


class Recorder(Resource):
    """
    A backend that records every request it receives and answers
    C{200 {"ok": true}}.

    Use it behind a gateway to prove what did (or did not) get through.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []

    def render(self, request: Any) -> bytes:
        request.content.seek(0)
        self.seen.append(Seen(request.method, request.uri, request.requestHeaders.copy(),
                              request.content.read()))
        request.setHeader(b"content-type", b"application/json")
        return b'{"ok": true}'


def write_cert(h: Harness) -> bytes:
    """A fresh self-signed certificate for localhost in the test's directory; its PEM."""
    cert_pem, key_pem = self_signed()
    with open(h.path("gateway.pem"), "wb") as f:
        f.write(cert_pem)
    with open(h.path("gateway.key"), "wb") as f:
        f.write(key_pem)
    return cert_pem


def tls_section() -> dict[str, Any]:
    """The C{server.tls} config for the certificate L{write_cert} wrote."""
    return {"listen": ["ssl:0:interface=127.0.0.1"], "cert": "gateway.pem",
            "key": "gateway.key", "http2": True}


# -- the open-connection gauge -----------------------------------------------------------


def open_connections(gw: RunningGateway, side: str) -> float:
    """C{clawproxy_open_connections{side=...}} as the gateway's registry reports it now."""
    value = gw.gateway.metrics.registry.get_sample_value(
        "clawproxy_open_connections", {"side": side})
    assert value is not None, f"no clawproxy_open_connections{{side={side!r}}} sample"
    return value


async def gauge_returns(gw: RunningGateway, side: str, baseline: float,
                        timeout: float = 5.0) -> None:
    """Wait (bounded) until the open-connection gauge for C{side} is back to C{baseline}."""
    await wait_for(lambda: open_connections(gw, side) == baseline,
                   f"open_connections{{side={side}}} to return to {baseline} "
                   f"(now {open_connections(gw, side)})", timeout)


# -- access log ----------------------------------------------------------------------------


def access_lines(gw: RunningGateway) -> list[str]:
    """The access-log file's lines so far (the gateway writes it line-buffered)."""
    if not os.path.exists(gw.access_log):
        return []
    with open(gw.access_log, encoding="utf-8") as f:
        return f.read().splitlines()


def parsed_access_lines(gw: RunningGateway) -> list[dict[str, Any]]:
    """Every access-log line, each parsed as one JSON object (asserting it is one)."""
    out = []
    for line in access_lines(gw):
        record = json.loads(line)
        assert isinstance(record, dict), line
        out.append(record)
    return out


# -- raw HTTP/2 ----------------------------------------------------------------------------


@attrs.define(eq=False)
class H2Result:
    """What a client saw on one HTTP/2 stream."""

    stream_id: int
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = attrs.Factory(list)
    informational: list[int] = attrs.Factory(list)
    body: bytes = b""
    ended: bool = False
    reset: int | None = None
    done: Deferred = attrs.Factory(Deferred)

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k == name.lower()]
        return values[-1] if values else None

    def error(self) -> dict[str, Any]:
        """The C{error} object of the JSON body (asserting the SPEC's shape)."""
        return error_of(self.body)


class H2Client(Protocol):
    """
    A byte-honest HTTP/2 client built on the C{h2} package.

    Outbound header validation is off, so tests can send what a hostile
    client would (no C{:authority}, a C{Host} beside it, names with C{_}).
    """

    def __init__(self) -> None:
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False, validate_inbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.streams: dict[int, H2Result] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed: Deferred[None] = Deferred()
        self.lost = False
        self.settings: Deferred[dict[int, int]] = Deferred()
        self.remote_settings: dict[int, int] = {}
        self.pings_acked: list[bytes] = []

    def connectionMade(self) -> None:
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.lost:
            self.transport.write(data)

    @property
    def negotiated(self) -> bytes | None:
        return getattr(self.transport, "negotiatedProtocol", None)

    def request(self, headers: Sequence[tuple[bytes, bytes]], body: bytes = b"",
                end: bool = True) -> H2Result:
        """Open a stream with C{headers} (sent as given) and C{body}; end it if C{end}."""
        stream_id = self.conn.get_next_available_stream_id()
        result = H2Result(stream_id)
        self.streams[stream_id] = result
        self.conn.send_headers(stream_id, list(headers), end_stream=end and not body)
        if body:
            self.send_data(stream_id, body, end)
        self.flush()
        return result

    def send_data(self, stream_id: int, body: bytes, end: bool = True) -> None:
        """Send C{body} on C{stream_id} in frames the peer's window and frame size allow."""
        max_frame = self.conn.max_outbound_frame_size
        view = memoryview(body)
        while view:
            window = self.conn.local_flow_control_window(stream_id)
            n = min(len(view), max_frame, window)
            if n <= 0:
                break  # the server stopped reading: that's its answer
            self.conn.send_data(stream_id, bytes(view[:n]))
            view = view[n:]
        if end and not view:
            self.conn.end_stream(stream_id)
        self.flush()

    async def ping(self, data: bytes) -> None:
        """Send a PING with 8 bytes of C{data}; return once the server has acknowledged it."""
        self.conn.ping(data)
        self.flush()
        await wait_for(lambda: data in self.pings_acked, f"the PING {data!r} ACK")

    def reset(self, stream_id: int) -> None:
        """Cancel C{stream_id} (RST_STREAM CANCEL)."""
        self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        self.flush()

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.loseConnection()
            return
        for ev in events:
            self._event(ev)
        self.flush()

    def _event(self, ev: Any) -> None:
        if isinstance(ev, h2.events.RemoteSettingsChanged):
            for code, change in ev.changed_settings.items():
                self.remote_settings[int(code)] = change.new_value
            if not self.settings.called:
                self.settings.callback(self.remote_settings)
            return
        if isinstance(ev, h2.events.PingAckReceived):
            self.pings_acked.append(ev.ping_data)
            return
        if isinstance(ev, h2.events.ConnectionTerminated):
            # Streams the server will not process (or, after an error, none
            # of them) are over for the client.
            self.goaway = ev
            for result in self.streams.values():
                if ev.error_code or result.stream_id > (ev.last_stream_id or 0):
                    self._finish(result)
            return
        result = self.streams.get(getattr(ev, "stream_id", None) or -1)
        if result is None:
            return
        if isinstance(ev, h2.events.InformationalResponseReceived):
            result.informational.append(int(dict(ev.headers)[b":status"]))
        elif isinstance(ev, h2.events.ResponseReceived):
            result.headers = [(k.lower(), v) for k, v in ev.headers]
            result.status = int(dict(ev.headers)[b":status"])
        elif isinstance(ev, h2.events.DataReceived):
            result.body += ev.data
            self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            result.ended = True
            self._finish(result)
        elif isinstance(ev, h2.events.StreamReset):
            result.reset = ev.error_code
            self._finish(result)

    def _finish(self, result: H2Result) -> None:
        if not result.done.called:
            result.done.callback(result)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = True
        for result in self.streams.values():
            self._finish(result)
        self.closed.callback(None)


async def h2_connect(h: Harness, port: int, cert_pem: bytes) -> H2Client:
    """
    Connect an L{H2Client} over TLS (ALPN h2, trusting only C{cert_pem}) and
    wait for the server's SETTINGS. The connection is reset at cleanup.
    """
    options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(cert_pem),
                                  acceptableProtocols=[b"h2"])
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5))
    client = H2Client()
    await bounded(connectProtocol(endpoint, client))
    h.tracker.protocols.append(client)
    await bounded(client.settings)
    assert client.negotiated == b"h2", client.negotiated
    return client


def h2_headers(method: bytes, path: bytes, authority: bytes | None = b"localhost",
               extra: Iterable[tuple[bytes, bytes]] = ()) -> list[tuple[bytes, bytes]]:
    """Request pseudo-headers (C{authority} None leaves C{:authority} out) plus C{extra}."""
    out = [(b":method", method), (b":scheme", b"https"), (b":path", path)]
    if authority is not None:
        out.append((b":authority", authority))
    out.extend(extra)
    return out
