"""
Forwarding hygiene, upstream response validation and the access log under
attack (issue 3), on real sockets.

A recording backend shows exactly what crosses the gateway towards the
backend; a raw TCP backend sends response bytes no well-behaved server
would, and the client shows what the gateway made of them.
"""

from __future__ import annotations

import json
import re
from typing import Any

import h2.errors
from twisted.internet import reactor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from clawproxy.config import hash_key
from tests.integration.edge import (
    API_KEY,
    Recorder,
    Seen,
    access_lines,
    h2_connect,
    h2_headers,
    parsed_access_lines,
    tls_section,
    write_cert,
)
from tests.integration.helpers import (
    Harness,
    RunningGateway,
    bounded,
    error_of,
    parse_response,
    pool,
    response_complete,
    tick,
    wait_for,
)

#: Hop-by-hop headers the backend answers with (and C{X-Secret}, which its
#: C{Connection} names); none may reach the client.
BACKEND_HOP = {
    b"connection": b"Keep-Alive, X-Secret",
    b"x-secret": b"backend-internal",
    b"keep-alive": b"timeout=5, max=100",
    b"proxy-authenticate": b'Basic realm="backend"',
    b"upgrade": b"h2c",
    b"trailer": b"X-Checksum",
}


class HopRecorder(Recorder):
    """A recording backend that answers with hop-by-hop headers and C{X-Visible}."""

    def render(self, request: Any) -> bytes:
        body = super().render(request)
        for name, value in BACKEND_HOP.items():
            request.setHeader(name, value)
        request.setHeader(b"x-visible", b"end-to-end")
        return body


class HygieneTests(TestCase):
    """What crosses the gateway, in each direction, whatever the client sends."""

    timeout = 30

    async def start(self, **server: Any) -> tuple[Harness, RunningGateway, HopRecorder]:
        self.h = h = Harness(self)
        recorder = HopRecorder()
        backend = h.serve(recorder, "recorder")
        self.backend = backend
        gw = await h.gateway(h.config({"p": pool(backend)}, server=server))
        return h, gw, recorder

    def seen(self, recorder: Recorder) -> Seen:
        self.assertEqual(len(recorder.seen), 1)
        return recorder.seen[0]

    async def test_hop_by_hop_stripped_both_ways(self) -> None:
        """
        The backend gets none of the client's hop-by-hop headers (nor the
        ones its C{Connection} names) but does get end-to-end ones; the client
        gets none of the backend's hop-by-hop headers (C{Proxy-Authenticate},
        C{Upgrade}, C{Trailer}, C{Keep-Alive}, C{X-Secret} named by the
        backend's C{Connection}) but does get the rest.
        """
        h, gw, recorder = await self.start()
        response = await h.exchange(gw.port, (
            b"GET /v1/echo HTTP/1.1\r\nHost: gateway.test\r\n"
            b"Connection: keep-alive, X-Hop, X-Other-Hop\r\n"
            b"X-Hop: 1\r\nX-Other-Hop: 2\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"TE: trailers\r\nTrailer: X-Checksum\r\nUpgrade: websocket\r\n"
            b"X-End-To-End: kept\r\n\r\n"))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b'{"ok": true}')
        headers = self.seen(recorder).headers
        for name in (b"connection", b"x-hop", b"x-other-hop", b"keep-alive",
                     b"proxy-authorization", b"proxy-connection", b"te", b"trailer",
                     b"upgrade"):
            self.assertIsNone(headers.getRawHeaders(name), name)
        self.assertEqual(headers.getRawHeaders(b"x-end-to-end"), [b"kept"])
        for name in (b"x-secret", b"keep-alive", b"proxy-authenticate", b"upgrade",
                     b"trailer"):
            self.assertEqual(response.all(name), [], name)
        for value in response.all(b"connection"):
            self.assertNotIn(b"x-secret", value.lower())
        self.assertEqual(response.header(b"x-visible"), b"end-to-end")

    async def test_connection_cannot_remove_proxy_headers(self) -> None:
        """
        A client naming the proxy's own headers in C{Connection}
        (C{X-Forwarded-For}, C{X-Request-ID}, C{X-Forwarded-Proto},
        C{X-Forwarded-Host}, even C{Host}) does not remove them: the backend
        still gets the real client address, the request id the client is
        told, the scheme, the client's host and its own C{Host}.
        """
        h, gw, recorder = await self.start()
        response = await h.exchange(gw.port, (
            b"GET /v1/echo HTTP/1.1\r\nHost: gateway.test\r\n"
            b"Connection: X-Forwarded-For, X-Request-ID, X-Forwarded-Proto, "
            b"X-Forwarded-Host, Host\r\n"
            b"X-Forwarded-For: 6.6.6.6\r\nX-Request-ID: client-id-1\r\n\r\n"))
        self.assertEqual(response.status, 200)
        headers = self.seen(recorder).headers
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-host"), [b"gateway.test"])
        rid = response.header(b"x-request-id")
        self.assertTrue(rid)
        self.assertEqual(headers.getRawHeaders(b"x-request-id"), [rid])
        self.assertEqual(headers.getRawHeaders(b"host"),
                         [b"127.0.0.1:%d" % self.backend.number])

    async def test_untrusted_forwarding_claims_replaced(self) -> None:
        """
        From a peer outside C{trusted_proxies} (here 10.0.0.0/8, the client
        being 127.0.0.1), C{X-Forwarded-For}/C{-Proto}/C{-Host} are replaced
        by the proxy's own values, not appended to, and C{Forwarded} and
        C{X-Real-IP} are dropped.
        """
        h, gw, recorder = await self.start(trusted_proxies=["10.0.0.0/8"])
        response = await h.exchange(gw.port, (
            b"GET /v1/echo HTTP/1.1\r\nHost: gateway.test\r\n"
            b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7\r\n"
            b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n"
            b"Forwarded: for=6.6.6.6;proto=https;host=evil.example\r\n"
            b"X-Real-IP: 6.6.6.6\r\n\r\n"))
        self.assertEqual(response.status, 200)
        headers = self.seen(recorder).headers
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-host"), [b"gateway.test"])
        self.assertIsNone(headers.getRawHeaders(b"forwarded"))
        self.assertIsNone(headers.getRawHeaders(b"x-real-ip"))

    async def test_trusted_forwarding_chain_appended(self) -> None:
        """
        From a peer inside C{trusted_proxies}, the client's C{X-Forwarded-For}
        chain is kept with the peer appended, and C{Forwarded} passes through.
        """
        h, gw, recorder = await self.start(trusted_proxies=["127.0.0.0/8"])
        response = await h.exchange(gw.port, (
            b"GET /v1/echo HTTP/1.1\r\nHost: gateway.test\r\n"
            b"X-Forwarded-For: 6.6.6.6, 10.1.1.1\r\n"
            b"Forwarded: for=6.6.6.6\r\n\r\n"))
        self.assertEqual(response.status, 200)
        headers = self.seen(recorder).headers
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-for"),
                         [b"6.6.6.6, 10.1.1.1, 127.0.0.1"])
        self.assertEqual(headers.getRawHeaders(b"forwarded"), [b"for=6.6.6.6"])

    async def test_client_framing_headers_not_forwarded(self) -> None:
        """
        The client's framing never reaches the backend: a chunked request
        arrives with the gateway's own C{Content-Length} and no
        C{Transfer-Encoding}, and the body is intact.
        """
        h, gw, recorder = await self.start()
        response = await h.exchange(gw.port, (
            b"POST /v1/echo HTTP/1.1\r\nHost: gateway.test\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"))
        self.assertEqual(response.status, 200)
        seen = self.seen(recorder)
        self.assertEqual(seen.body, b"abcdefg")
        self.assertIsNone(seen.headers.getRawHeaders(b"transfer-encoding"))
        self.assertEqual(seen.headers.getRawHeaders(b"content-length"), [b"7"])

    async def h2c_upgrade(self, connection: bytes) -> Seen:
        """Send an HTTP/1.1 C{Upgrade: h2c} request; what the backend received."""
        h, gw, recorder = await self.start()
        response = await h.exchange(gw.port, (
            b"GET /v1/echo HTTP/1.1\r\nHost: gateway.test\r\n" + connection
            + b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
            b"X-End-To-End: kept\r\n\r\n"))
        self.assertEqual(response.status, 200)
        seen = self.seen(recorder)
        self.assertEqual(seen.headers.getRawHeaders(b"x-end-to-end"), [b"kept"])
        return seen

    async def test_h2c_upgrade_headers_not_forwarded(self) -> None:
        """
        An C{Upgrade: h2c} request (C{HTTP2-Settings} named in C{Connection},
        as RFC 7540 3.2 has it) is served over HTTP/1.1, and the backend gets
        neither C{Upgrade} nor C{HTTP2-Settings}.
        """
        seen = await self.h2c_upgrade(b"Connection: Upgrade, HTTP2-Settings\r\n")
        for name in (b"http2-settings", b"upgrade", b"connection"):
            self.assertIsNone(seen.headers.getRawHeaders(name), name)

    async def test_http2_settings_not_forwarded_unless_named(self) -> None:
        """
        C{HTTP2-Settings} is hop-by-hop (RFC 7540 3.2.1) even when the client
        does not name it in C{Connection}: the backend never gets it.
        """
        seen = await self.h2c_upgrade(b"Connection: Upgrade\r\n")
        for name in (b"http2-settings", b"upgrade", b"connection"):
            self.assertIsNone(seen.headers.getRawHeaders(name), name)

    async def test_backend_address_never_from_request(self) -> None:
        """
        An absolute-form target and C{Host} naming another server (here a
        second live backend) do not change where the request goes: it
        reaches the configured instance, with the instance's C{Host}; the
        other server receives nothing.
        """
        h, gw, recorder = await self.start()
        other = Recorder()
        elsewhere = h.serve(other, "elsewhere")
        authority = b"127.0.0.1:%d" % elsewhere.number
        response = await h.exchange(gw.port, (
            b"GET http://" + authority + b"/v1/echo HTTP/1.1\r\n"
            b"Host: " + authority + b"\r\n\r\n"))
        self.assertEqual(response.status, 200)
        seen = self.seen(recorder)
        self.assertEqual(seen.uri, b"/v1/echo")
        self.assertEqual(seen.headers.getRawHeaders(b"host"),
                         [b"127.0.0.1:%d" % self.backend.number])
        self.assertEqual(seen.headers.getRawHeaders(b"x-forwarded-host"), [authority])
        self.assertEqual(other.seen, [])
        self.assertEqual(elsewhere.connections, [])


# -- upstream response validation -----------------------------------------------------


class _Canned(Protocol):
    """Read a request head, answer with fixed bytes, then close (FIN)."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            self.transport.write(self.response)
            self.transport.loseConnection()


class CannedBackend(Factory):
    """A raw TCP backend that answers every request with C{response}."""

    noisy = False

    def __init__(self, response: bytes) -> None:
        self.response = response

    def buildProtocol(self, addr: Any) -> Protocol:
        return _Canned(self.response)


class UpstreamValidationTests(TestCase):
    """What a client gets when the backend sends a response it should not."""

    timeout = 30

    async def start(self, response: bytes, tls: bool = False) -> tuple[Harness, RunningGateway]:
        """A gateway (with an h2 TLS listener if C{tls}) before a L{CannedBackend}."""
        h = Harness(self)
        server = {}
        if tls:
            self.cert = write_cert(h)
            server["tls"] = tls_section()
        factory = CannedBackend(response)
        h.tracker.watch_factory(factory)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}"
        config = h.config({"raw": {"instances": [{"id": "raw-1", "url": url}],
                                   "health_check": {"enabled": False},
                                   "retry": {"max_retries": 0}}}, server=server)
        return h, await h.gateway(config)

    async def get(self, response: bytes) -> Any:
        """What a client's GET gets when the backend answers with C{response}."""
        h, gw = await self.start(response)
        return await h.exchange(gw.port, b"GET /v1/x HTTP/1.1\r\nHost: gateway.test\r\n\r\n")

    async def assert_502(self, response: bytes) -> Any:
        """The client gets the gateway's 502 C{bad_gateway}, not the backend's answer."""
        got = await self.get(response)
        self.assertEqual(got.status, 502)
        self.assertEqual(error_of(got.body)["code"], "bad_gateway")
        self.assertTrue(got.header(b"x-request-id"))
        return got

    async def test_status_below_100_is_502(self) -> None:
        """An upstream status of 99 reaches the client as a 502 C{bad_gateway}."""
        await self.assert_502(b"HTTP/1.1 99 Odd\r\nContent-Length: 2\r\n\r\nok")

    async def test_status_600_is_502(self) -> None:
        """An upstream status of 600 reaches the client as a 502."""
        await self.assert_502(b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok")

    async def test_status_999_is_502(self) -> None:
        """An upstream status of 999 reaches the client as a 502."""
        await self.assert_502(b"HTTP/1.1 999 Odd\r\nContent-Length: 2\r\n\r\nok")

    async def test_nul_in_header_value_is_502(self) -> None:
        """A NUL byte in an upstream header value reaches the client as a 502."""
        got = await self.assert_502(
            b"HTTP/1.1 200 OK\r\nX-Evil: a\x00b\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(got.all(b"x-evil"), [])

    async def test_bare_lf_header_is_502(self) -> None:
        """
        An upstream header line ended by a bare LF (which would smuggle a
        C{Set-Cookie} past a stricter parser) reaches the client as a 502.
        """
        got = await self.assert_502(
            b"HTTP/1.1 200 OK\r\nX-A: 1\nSet-Cookie: evil=1\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(got.all(b"set-cookie"), [])

    async def test_bare_lf_only_head_is_502(self) -> None:
        """An upstream response head using bare LFs throughout reaches the client as a 502."""
        await self.assert_502(b"HTTP/1.1 200 OK\nX-A: 1\nContent-Length: 2\n\nok")

    async def test_hop_by_hop_response_headers_stripped(self) -> None:
        """
        C{Proxy-Authenticate}, C{Keep-Alive}, C{Upgrade} and every header the
        backend's C{Connection} names are not relayed; the body and other
        headers are.
        """
        got = await self.get(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Internal, X-Also\r\n"
            b"X-Internal: secret\r\nX-Also: secret\r\nKeep-Alive: timeout=5\r\n"
            b"Proxy-Authenticate: Basic realm=\"up\"\r\nUpgrade: h2c\r\n"
            b"X-Visible: yes\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(got.status, 200)
        self.assertEqual(got.body, b"ok")
        for name in (b"x-internal", b"x-also", b"keep-alive", b"proxy-authenticate",
                     b"upgrade"):
            self.assertEqual(got.all(name), [], name)
        self.assertEqual(got.header(b"x-visible"), b"yes")

    async def truncated(self, response: bytes) -> tuple[bytes, Any]:
        h, gw = await self.start(response)
        proto = await h.raw(gw.port, b"GET /v1/x HTTP/1.1\r\nHost: gateway.test\r\n\r\n")
        raw = await bounded(proto.closed)
        return raw, proto.reason

    async def test_short_content_length_aborts_client(self) -> None:
        """
        An upstream body shorter than its C{Content-Length} is not passed
        off as complete: the client's connection is aborted (reset, not a
        clean close) before the declared length arrives.
        """
        raw, reason = await self.truncated(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        self.assertTrue(reason.check(ConnectionLost), reason)
        self.assertFalse(reason.check(ConnectionDone), reason)
        self.assertFalse(response_complete(raw), raw)

    async def test_missing_last_chunk_aborts_client(self) -> None:
        """
        An upstream chunked body that ends without its last (zero) chunk
        aborts the client's connection: the client never sees a terminating
        chunk.
        """
        raw, reason = await self.truncated(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        self.assertTrue(reason.check(ConnectionLost), reason)
        self.assertFalse(reason.check(ConnectionDone), reason)
        self.assertNotIn(b"0\r\n\r\n", raw)


    async def test_truncated_body_resets_http2_stream(self) -> None:
        """
        Over HTTP/2, an upstream body shorter than its C{Content-Length}
        resets the client's stream (RST_STREAM INTERNAL_ERROR) instead of
        ending it cleanly, the connection carries on (a PING is still
        answered), and the request is logged once, as truncated.
        """
        h, gw = await self.start(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10,
                                 tls=True)
        client = await h2_connect(h, gw.tls_port, self.cert)
        result = await bounded(client.request(h2_headers(b"GET", b"/v1/x")).done)
        self.assertEqual(result.reset, h2.errors.ErrorCodes.INTERNAL_ERROR)
        self.assertFalse(result.ended)
        self.assertLess(len(result.body), 100)
        await client.ping(b"stillok!")
        self.assertIsNone(client.goaway)
        # The request is finished on the gateway's side too: logged once.
        await wait_for(lambda: access_lines(gw), "the access-log line")
        self.assertEqual([r["error"] for r in parsed_access_lines(gw)], ["truncated"])
        self.assertEqual(gw.gateway.in_flight(), 0)


# -- the access log and secrets under attack ------------------------------------------------


SECRETS = [API_KEY, "sk-wrong-SECRET-1111", "sk-bearer-SECRET-2222", "sk-underscore-SECRET-3333",
           "sk-basic-SECRET-4444"]


def _hostile(key: str) -> list[bytes]:
    """Hostile and normal requests, one per connection (C{key} is the valid API key)."""
    host = b"Host: gateway.test\r\n"
    k = key.encode()
    return [
        b"GET /v1/echo HTTP/1.1\r\n" + host + b"X-API-Key: " + k + b"\r\n\r\n",
        b"GET /secure/x HTTP/1.1\r\n" + host + b"Authorization: Bearer " + k + b"\r\n\r\n",
        b"GET /secure/x HTTP/1.1\r\n" + host + b"X-API-Key: sk-wrong-SECRET-1111\r\n\r\n",
        b"GET /v1/echo HTTP/1.1\r\n" + host
        + b"Authorization: Bearer sk-bearer-SECRET-2222\r\n\r\n",
        b"GET /v1/echo HTTP/1.1\r\n" + host + b"X_API_KEY: sk-underscore-SECRET-3333\r\n\r\n",
        b"GET /secure/x HTTP/1.1\r\n" + host
        + b"Authorization: Basic sk-basic-SECRET-4444\r\n\r\n",
        b"POST /v1/echo HTTP/1.1\r\n" + host + b"Content-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\nX-API-Key: " + k + b"\r\n\r\n0\r\n\r\n",
        b"GET /v1/a%2Fb HTTP/1.1\r\n" + host + b"X-API-Key: " + k + b"\r\n\r\n",
        b"GET /v1/\xff\xfe%zz HTTP/1.1\r\n" + host + b"\r\n",
        b"GET /v1/\"quoted\"\\x HTTP/1.1\r\n" + host + b"\r\n",
        b"GET /v1/echo HTTP/1.1\r\nHost: a@b\r\n\r\n",
        b"GET http://evil.example/ HTTP/1.1\r\n" + host + b"\r\n",
        b"GET /v1/echo HTTP/1.1\r\n" + host + b"X-A: 1\r\n 2\r\n\r\n",
        b"POST /v1/echo HTTP/1.1\r\n" + host + b"Content-Length: 99999\r\n\r\n",
        b"G@T /v1/echo HTTP/1.1\r\n" + host + b"\r\n",
        b"GET /v1/" + b"a" * 20000 + b" HTTP/1.1\r\n" + host + b"\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage-tls-hello\r\n\r\n",
        b"GET /v1/echo?q=\x01\x7f HTTP/1.1\r\n" + host + b"\r\n",
        b"FOO /v1/echo HTTP/1.1\r\n" + host + b"\r\n",
        b"GET /v1/echo HTTP/1.1\r\n" + host + b"X-Request-ID: {\"injected\": \"json\"}\r\n\r\n",
    ]


class AccessLogTests(TestCase):
    """One access-log line per request and no secrets anywhere, under hostile input."""

    timeout = 30

    async def start(self) -> tuple[Harness, RunningGateway, Recorder]:
        h = Harness(self)
        recorder = Recorder()
        backend = h.serve(recorder, "recorder")
        config = h.config(
            {"p": pool(backend)},
            [{"path": "/secure/*", "pool": "p", "auth_required": True},
             {"path": "/*", "pool": "p", "methods": ["GET", "POST"]}],
            server={"max_body_size": "1KB", "max_header_size": "4KB"},
            agents={"tester": {"keys": [hash_key(API_KEY)]}},
        )
        return h, await h.gateway(config), recorder

    async def send_all(self, h: Harness, gw: RunningGateway) -> list[tuple[bytes, Any]]:
        """Send every hostile request on its own connection; (raw answer, parsed) each."""
        answers = []
        for request in _hostile(API_KEY):
            proto = await h.raw(gw.port, request)
            raw = await proto.when(response_complete)
            proto.transport.loseConnection()
            answers.append((raw, parse_response(raw)))
        return answers

    async def test_one_json_line_per_request(self) -> None:
        """
        Whatever bytes each client sends, the access log gets exactly one
        line per request, each a JSON object carrying the request id and
        status the client was given.
        """
        h, gw = (await self.start())[:2]
        answers = await self.send_all(h, gw)
        n = len(answers)
        await wait_for(lambda: len(access_lines(gw)) >= n, f"{n} access-log lines")
        records = parsed_access_lines(gw)
        self.assertEqual(len(records), n)
        got = sorted((r["request_id"], r["status"]) for r in records)
        want = sorted((p.header(b"x-request-id").decode(), p.status) for _, p in answers)
        self.assertEqual(got, want)
        for record in records:
            json.dumps(record)  # round-trips: plain JSON types only

    async def test_pipelined_requests_each_logged(self) -> None:
        """
        Three requests pipelined on one connection, the last refused at
        header time, get their three answers in order (200, 200, 400, then
        the connection closes) and three access-log lines with the same
        request ids.
        """
        h, gw, recorder = await self.start()
        host = b"Host: gateway.test\r\n"
        proto = await h.raw(gw.port, (
            b"GET /v1/one HTTP/1.1\r\n" + host + b"\r\n"
            b"GET /v1/two HTTP/1.1\r\n" + host + b"\r\n"
            b"GET /v1/%2F HTTP/1.1\r\n" + host + b"\r\n"))
        raw = await bounded(proto.closed)
        statuses = [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]
        self.assertEqual(statuses, [200, 200, 400])
        ids = re.findall(rb"\r\nx-request-id: ([^\r]+)", raw, re.I)
        await wait_for(lambda: len(access_lines(gw)) >= 3, "3 access-log lines")
        records = parsed_access_lines(gw)
        self.assertEqual(len(records), 3)
        self.assertEqual({(r["request_id"].encode(), r["status"]) for r in records},
                         set(zip(ids, statuses)))
        self.assertEqual([s.uri for s in recorder.seen], [b"/v1/one", b"/v1/two"])

    async def test_client_leaving_mid_request_logged_once(self) -> None:
        """
        A client that leaves after part of a request (a request line only,
        a complete head but half its body, an unfinished chunked body) still
        leaves exactly one access-log line per request, status 499; the
        backend receives none of them.
        """
        h, gw, recorder = await self.start()
        host = b"Host: gateway.test\r\n"
        partial = [
            b"GET /v1/echo HTTP/1.1\r\n" + host,
            b"POST /v1/echo HTTP/1.1\r\n" + host + b"Content-Length: 100\r\n\r\n0123456789",
            b"POST /v1/echo HTTP/1.1\r\n" + host + b"Transfer-Encoding: chunked\r\n\r\n5\r\nab",
        ]
        for n, request in enumerate(partial, 1):
            proto = await h.raw(gw.port, request)
            # No pause needed: TCP delivers the bytes before the close.
            proto.transport.loseConnection()
            await bounded(proto.closed)
            await wait_for(lambda n=n: len(access_lines(gw)) >= n, f"access-log line {n}")
        await tick(0.05)
        records = parsed_access_lines(gw)
        self.assertEqual([(r["method"], r["status"], r["error"]) for r in records],
                         [("GET", 499, "client_disconnected"),
                          ("POST", 499, "client_disconnected"),
                          ("POST", 499, "client_disconnected")])
        self.assertEqual(recorder.seen, [])

    async def test_no_secrets_in_log_metrics_or_errors(self) -> None:
        """
        API keys (valid or not, in C{X-API-Key}, C{Authorization: Bearer} or
        C{Basic}, or in a refused header) appear nowhere a user could read
        them: not in the access log, not in C{/metrics}, not in any error
        body or response header; and the gateway's own key is never relayed
        to the backend.
        """
        h, gw, recorder = await self.start()
        answers = await self.send_all(h, gw)
        await wait_for(lambda: len(access_lines(gw)) >= len(answers), "the access-log lines")
        client = h.client()
        metrics = await bounded(client.get(gw.admin_url + "/metrics"))
        metrics_text = await bounded(metrics.content())
        self.assertEqual(metrics.code, 200)
        with open(gw.access_log, "rb") as f:
            log = f.read()
        for secret in SECRETS:
            s = secret.encode()
            self.assertNotIn(s, log, secret)
            self.assertNotIn(s, metrics_text, secret)
            for raw, _ in answers:
                self.assertNotIn(s, raw, secret)
        for seen in recorder.seen:
            self.assertIsNone(seen.headers.getRawHeaders(b"x-api-key"))
            for value in seen.headers.getRawHeaders(b"authorization") or []:
                self.assertNotIn(API_KEY.encode(), value)
