"""
A corpus of hostile and malformed requests sent over real sockets (issue 3).

Every case goes, byte for byte, to a gateway whose only pool points at a
L{Recorder} backend. Each case checks what the client sees (the exact
status, the SPEC's JSON error and its C{code}, never a C{100 Continue}
first), that the access log got exactly one JSON line for it, and that the
backend received nothing: no request and not even a TCP connection.

The same corpus runs over HTTP/2 (TLS, ALPN h2, the C{h2} package as a
raw client) where it applies; HTTP/2 framing errors are answered by the
h2 library with a GOAWAY (PROTOCOL_ERROR), which is what a client sees.

One test method per case, generated from the tables, so every case shows
up by name in trial's output.
"""

from __future__ import annotations

from typing import Any

import attrs
import h2.errors
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from clawproxy.config import hash_key
from tests.integration.edge import (
    API_KEY,
    H2Result,
    Recorder,
    access_lines,
    h2_connect,
    h2_headers,
    open_connections,
    parsed_access_lines,
    tls_section,
    write_cert,
)
from tests.integration.helpers import (
    Backend,
    Harness,
    RawClient,
    RunningGateway,
    bounded,
    error_of,
    parse_response,
    pool,
    response_complete,
    tick,
    wait_for,
)

#: The request-head deadline of the corpus gateway (small, so slow cases run fast).
HEAD_TIMEOUT = 1.0

HOST = b"Host: gateway.test\r\n"
#: A request a backend would see as a second, smuggled one.
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: gateway.test\r\n\r\n"


def corpus_config(h: Harness, backend: Backend, **server: Any) -> Any:
    """
    The corpus gateway: C{/secure/*} needs an API key, everything else goes to
    the recorder for GET, POST, HEAD and OPTIONS only; 1 KB bodies, 4 KB heads,
    a 1 s head deadline and a 1 KB/s minimum body rate.
    """
    return h.config(
        {"p": pool(backend)},
        [{"path": "/secure/*", "pool": "p", "auth_required": True},
         {"path": "/*", "pool": "p", "methods": ["GET", "POST", "HEAD", "OPTIONS"]}],
        server={"max_body_size": "1KB", "max_header_size": "4KB",
                "head_timeout": f"{HEAD_TIMEOUT}s", "min_body_rate": "1KB", **server},
        agents={"tester": {"keys": [hash_key(API_KEY)]}},
    )


@attrs.frozen
class Case:
    """
    One raw HTTP/1.x request and the answer a client must get.

    @ivar code: the C{error.code} of the gateway's JSON answer.
    @ivar trickle: send the request one byte every this many seconds.
    @ivar body_trickle: send the head at once, then the rest one byte
        every this many seconds (from C{split} on).
    """

    name: str
    request: bytes
    status: int
    code: str
    why: str
    trickle: float | None = None
    body_trickle: float | None = None
    split: int = 0


def _post(headers: bytes, body: bytes = b"", version: bytes = b"HTTP/1.1",
          path: bytes = b"/v1/echo", host: bytes = HOST) -> bytes:
    return b"POST " + path + b" " + version + b"\r\n" + host + headers + b"\r\n" + body


def _get(path: bytes = b"/v1/echo", headers: bytes = b"", host: bytes = HOST,
         method: bytes = b"GET", version: bytes = b"HTTP/1.1") -> bytes:
    return method + b" " + path + b" " + version + b"\r\n" + host + headers + b"\r\n"


_CHUNKED_SMUGGLE = b"0\r\n\r\n" + SMUGGLED
_MALFORMED = "malformed_request"

CORPUS: list[Case] = [
    # -- request smuggling: CL.TE, TE.CL, TE.TE obfuscations -----------------------------
    Case("cl_te", _post(b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n"
                        % len(_CHUNKED_SMUGGLE), _CHUNKED_SMUGGLE),
         400, _MALFORMED, "CL.TE: Content-Length and chunked together are refused"),
    Case("te_cl", _post(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
                        _CHUNKED_SMUGGLE),
         400, _MALFORMED, "TE.CL: chunked then Content-Length is refused"),
    Case("te_xchunked", _post(b"Transfer-Encoding: xchunked\r\n", _CHUNKED_SMUGGLE),
         400, _MALFORMED, "an unknown transfer coding (xchunked) is refused"),
    Case("te_xchunked_with_cl", _post(b"Content-Length: 5\r\nTransfer-Encoding: xchunked\r\n",
                                      _CHUNKED_SMUGGLE),
         400, _MALFORMED, "TE.TE: xchunked beside Content-Length is refused"),
    Case("te_space_before_colon", _post(b"Transfer-Encoding : chunked\r\n", _CHUNKED_SMUGGLE),
         400, _MALFORMED, "a space before the colon of Transfer-Encoding is refused"),
    Case("te_leading_space_value_with_cl",
         _post(b"Content-Length: 5\r\nTransfer-Encoding:  chunked\r\n", _CHUNKED_SMUGGLE),
         400, _MALFORMED, "TE.TE: ' chunked' beside Content-Length is refused"),
    Case("te_tab_value_with_cl",
         _post(b"Content-Length: 5\r\nTransfer-Encoding:\tchunked\r\n", _CHUNKED_SMUGGLE),
         400, _MALFORMED, "TE.TE: 'Transfer-Encoding:<TAB>chunked' beside Content-Length "
         "is refused"),
    Case("te_chunked_identity", _post(b"Transfer-Encoding: chunked, identity\r\n",
                                      _CHUNKED_SMUGGLE),
         400, _MALFORMED, "'chunked, identity' (chunked not last) is refused"),
    Case("te_identity_chunked", _post(b"Transfer-Encoding: identity, chunked\r\n",
                                      _CHUNKED_SMUGGLE),
         400, _MALFORMED, "'identity, chunked' is refused"),
    Case("te_chunked_chunked", _post(b"Transfer-Encoding: chunked, chunked\r\n",
                                     _CHUNKED_SMUGGLE),
         400, _MALFORMED, "chunked applied twice is refused"),
    Case("te_duplicate_lines", _post(b"Transfer-Encoding: chunked\r\n"
                                     b"Transfer-Encoding: chunked\r\n", _CHUNKED_SMUGGLE),
         400, _MALFORMED, "two Transfer-Encoding: chunked lines are refused"),
    Case("te_duplicate_conflicting", _post(b"Transfer-Encoding: chunked\r\n"
                                           b"Transfer-Encoding: x\r\n", _CHUNKED_SMUGGLE),
         400, _MALFORMED, "TE.TE: chunked plus a bogus second Transfer-Encoding is refused"),
    Case("te_vertical_tab", _post(b"Transfer-Encoding:\x0bchunked\r\n", _CHUNKED_SMUGGLE),
         400, _MALFORMED, "a vertical tab before chunked is refused"),
    Case("te_obs_fold_value", _post(b"Transfer-Encoding:\r\n chunked\r\n", _CHUNKED_SMUGGLE),
         400, "invalid_header", "chunked folded onto an obs-fold line is refused"),
    Case("te_leading_space_line", _post(b" Transfer-Encoding: chunked\r\n", _CHUNKED_SMUGGLE),
         400, "invalid_header", "a header line starting with a space (obs-fold) is refused"),
    Case("te_after_bare_lf", _post(b"X-A: 1\nTransfer-Encoding: chunked\r\n", _CHUNKED_SMUGGLE),
         400, _MALFORMED, "Transfer-Encoding hidden behind a bare LF is refused"),
    Case("te_identity", _post(b"Transfer-Encoding: identity\r\n", b"abc"),
         501, "unsupported_transfer_encoding", "Transfer-Encoding: identity is refused (501)"),
    Case("te_identity_with_cl", _post(b"Content-Length: 3\r\nTransfer-Encoding: identity\r\n",
                                      b"abc"),
         501, "unsupported_transfer_encoding", "identity beside Content-Length is refused"),
    Case("http10_chunked", _post(b"Transfer-Encoding: chunked\r\n", _CHUNKED_SMUGGLE,
                                 version=b"HTTP/1.0"),
         400, "invalid_framing", "HTTP/1.0 with Transfer-Encoding is refused (RFC 9112 6.1)"),
    Case("http10_chunked_no_host", _post(b"Transfer-Encoding: chunked\r\n", _CHUNKED_SMUGGLE,
                                         version=b"HTTP/1.0", host=b""),
         400, "invalid_framing", "HTTP/1.0 with Transfer-Encoding and no Host is refused"),
    # -- Content-Length ------------------------------------------------------------------
    Case("cl_duplicate_same", _post(b"Content-Length: 3\r\nContent-Length: 3\r\n", b"abc"),
         400, _MALFORMED, "two equal Content-Length lines are refused"),
    Case("cl_duplicate_conflicting", _post(b"Content-Length: 3\r\nContent-Length: 40\r\n",
                                           b"abc" + SMUGGLED),
         400, _MALFORMED, "two different Content-Length lines are refused"),
    Case("cl_list", _post(b"Content-Length: 3, 3\r\n", b"abc"),
         400, _MALFORMED, "a Content-Length list is refused"),
    Case("cl_plus_sign", _post(b"Content-Length: +3\r\n", b"abc"),
         400, _MALFORMED, "a signed (+) Content-Length is refused"),
    Case("cl_minus_sign", _post(b"Content-Length: -3\r\n", b"abc"),
         400, _MALFORMED, "a negative Content-Length is refused"),
    Case("cl_hex", _post(b"Content-Length: 0x3\r\n", b"abc"),
         400, _MALFORMED, "a hex Content-Length is refused"),
    Case("cl_inner_space", _post(b"Content-Length: 1 2\r\n", b"abc"),
         400, _MALFORMED, "a Content-Length with an inner space is refused"),
    Case("cl_digit_underscore", _post(b"Content-Length: 1_0\r\n", b"abc"),
         400, _MALFORMED, "a Content-Length Python would parse ('1_0') is refused"),
    Case("cl_space_before_colon", _post(b"Content-Length : 3\r\n", b"abc"),
         400, _MALFORMED, "a space before the colon of Content-Length is refused"),
    Case("cl_empty", _post(b"Content-Length:\r\n", b"abc"),
         400, _MALFORMED, "an empty Content-Length is refused"),
    Case("cl_underscore_name", _post(b"Content_Length: 40\r\n", b"abc"),
         400, "invalid_header", "Content_Length (underscore alias) is refused"),
    # -- line structure ------------------------------------------------------------------
    Case("obs_fold_space", _get(headers=b"X-A: 1\r\n 2\r\n"),
         400, "invalid_header", "an obs-fold continuation line (space) is refused"),
    Case("obs_fold_tab", _get(headers=b"X-A: 1\r\n\t2\r\n"),
         400, "invalid_header", "an obs-fold continuation line (tab) is refused"),
    Case("bare_lf_in_head", b"GET /v1/echo HTTP/1.1\r\nHost: gateway.test\nX-A: 1\r\n\r\n",
         400, _MALFORMED, "a bare LF inside the head is refused"),
    Case("bare_lf_only_head", b"GET /v1/echo HTTP/1.1\nHost: gateway.test\n\n",
         408, "request_timeout", "a head using bare LFs only never completes: 408 at the "
         "head deadline"),
    Case("bare_cr_in_head", b"GET /v1/echo HTTP/1.1\r\nHost: gateway.test\rX-A: 1\r\n\r\n",
         400, _MALFORMED, "a bare CR inside the head is refused"),
    Case("nul_in_header_value", _get(headers=b"X-A: a\x00b\r\n"),
         400, _MALFORMED, "a NUL in a header value is refused"),
    Case("space_in_header_name", _get(headers=b"X A: 1\r\n"),
         400, _MALFORMED, "a space inside a header name is refused"),
    Case("header_without_colon", _get(headers=b"XA\r\n"),
         400, _MALFORMED, "a header line without a colon is refused"),
    Case("underscore_header_name", _get(headers=b"X_Forwarded_For: 10.0.0.1\r\n"),
         400, "invalid_header", "a header name with '_' is refused by default"),
    # -- Host ----------------------------------------------------------------------------
    Case("host_missing", _get(host=b""), 400, "invalid_host", "HTTP/1.1 without Host"),
    Case("host_duplicate", _get(host=HOST + b"Host: evil.example\r\n"),
         400, "invalid_host", "two Host headers"),
    Case("host_duplicate_http10", _get(host=HOST + HOST, version=b"HTTP/1.0"),
         400, "invalid_host", "two Host headers in HTTP/1.0"),
    Case("host_userinfo", _get(host=b"Host: user:pw@gateway.test\r\n"),
         400, "invalid_host", "a Host with userinfo"),
    Case("host_port_out_of_range", _get(host=b"Host: gateway.test:99999\r\n"),
         400, "invalid_host", "a Host port above 65535"),
    Case("host_port_zero", _get(host=b"Host: gateway.test:0\r\n"),
         400, "invalid_host", "a Host port of 0"),
    Case("host_port_not_numeric", _get(host=b"Host: gateway.test:http\r\n"),
         400, "invalid_host", "a non-numeric Host port"),
    Case("host_empty", _get(host=b"Host:\r\n"), 400, "invalid_host", "an empty Host"),
    Case("host_inner_space", _get(host=b"Host: gateway test\r\n"),
         400, "invalid_host", "a Host with a space in it"),
    Case("host_with_path", _get(host=b"Host: gateway.test/evil\r\n"),
         400, "invalid_host", "a Host with a path in it"),
    # -- request targets -----------------------------------------------------------------
    Case("absolute_form_other_host", _get(b"http://evil.example/v1/echo"),
         400, "invalid_target", "an absolute-form target for another host (no forward proxy)"),
    Case("absolute_form_userinfo", _get(b"http://u@gateway.test/v1/echo"),
         400, "invalid_target", "an absolute-form target with userinfo"),
    Case("absolute_form_other_port", _get(b"http://gateway.test:9/v1/echo"),
         400, "invalid_target", "an absolute-form target for another port"),
    Case("absolute_form_ftp", _get(b"ftp://gateway.test/v1/echo"),
         400, "invalid_target", "a non-HTTP absolute-form target"),
    Case("asterisk_form_get", _get(b"*"),
         400, "invalid_target", "'*' as the target of a GET"),
    Case("authority_form_connect", _get(b"gateway.test:443", method=b"CONNECT"),
         405, "method_not_allowed", "CONNECT host:port (no tunnels)"),
    # -- paths ---------------------------------------------------------------------------
    Case("path_encoded_slash", _get(b"/v1/a%2Fb"), 400, "invalid_path", "%2F in the path"),
    Case("path_encoded_slash_lower", _get(b"/v1/a%2fb"), 400, "invalid_path",
         "%2f in the path"),
    Case("path_encoded_backslash", _get(b"/v1/a%5Cb"), 400, "invalid_path",
         "%5C in the path"),
    Case("path_backslash", _get(b"/v1/a\\b"), 400, "invalid_path", "a raw backslash"),
    Case("path_encoded_nul", _get(b"/v1/a%00b"), 400, "invalid_path", "%00 in the path"),
    Case("path_bad_escape", _get(b"/v1/a%zz"), 400, "invalid_path", "a %zz escape"),
    Case("path_truncated_escape", _get(b"/v1/a%4"), 400, "invalid_path",
         "a truncated escape"),
    Case("path_dotdot_semicolon", _get(b"/v1/..;/secure/x"), 400, "invalid_path",
         "'..;/' (a Tomcat-style traversal)"),
    Case("path_encoded_semicolon", _get(b"/v1/a%3Bb"), 400, "invalid_path",
         "%3B in the path"),
    Case("path_fragment", _get(b"/v1/a#/../../secure/x"), 400, "invalid_path",
         "a '#' in the target (an HTTP client would drop the rest)"),
    Case("path_encoded_hash", _get(b"/v1/a%23b"), 400, "invalid_path", "%23 in the path"),
    Case("path_dotdot_resolved_into_secure", _get(b"/v1/../secure/x"),
         401, "missing_api_key", "'..' is resolved first, so /v1/../secure/x needs a key"),
    Case("path_dotdot_beyond_root", _get(b"/../../../secure/x"),
         401, "missing_api_key", "'..' never climbs above the root: /secure/x needs a key"),
    Case("path_encoded_dots_into_secure", _get(b"/v1/%2e%2E/secure/x"),
         401, "missing_api_key", "encoded dots are resolved too"),
    Case("path_encoded_letters_into_secure", _get(b"/%73%65cure/x"),
         401, "missing_api_key", "encoded unreserved letters are decoded before matching"),
    Case("path_double_slash_into_secure", _get(b"//secure//x"),
         401, "missing_api_key", "'//' runs are merged before matching"),
    # -- sizes ---------------------------------------------------------------------------
    Case("head_block_too_large",
         _get(headers=b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(60))),
         431, "headers_too_large", "a head over max_header_size"),
    Case("request_line_too_long", _get(b"/v1/" + b"a" * 20000),
         431, "headers_too_large", "a request line over 16 KiB (Twisted would just close)"),
    Case("header_line_too_long", _get(headers=b"X-A: " + b"a" * 20000 + b"\r\n"),
         431, "headers_too_large", "one header line over 16 KiB"),
    Case("body_content_length_too_large", _post(b"Content-Length: 2048\r\n", b"a" * 2048),
         413, "request_too_large", "a declared body over max_body_size"),
    Case("body_chunked_too_large",
         _post(b"Transfer-Encoding: chunked\r\n",
               (b"400\r\n" + b"a" * 1024 + b"\r\n") * 2 + b"0\r\n\r\n"),
         413, "request_too_large", "a chunked body growing over max_body_size"),
    Case("chunk_size_line_too_long",
         _post(b"Transfer-Encoding: chunked\r\n", b"3;" + b"e" * 20000 + b"\r\nabc\r\n0\r\n\r\n"),
         400, _MALFORMED, "a 20 KB chunk extension"),
    Case("chunk_size_not_hex", _post(b"Transfer-Encoding: chunked\r\n", b"zz\r\nabc\r\n0\r\n\r\n"),
         400, _MALFORMED, "a chunk size that is not hex"),
    Case("chunk_size_overflow",
         _post(b"Transfer-Encoding: chunked\r\n", b"ffffffffffffffff1\r\nabc"),
         400, _MALFORMED, "a chunk size over 64 bits, at once (it waited for the 408)"),
    Case("chunk_size_over_limit",
         _post(b"Transfer-Encoding: chunked\r\n", b"100000\r\nabc"),
         413, "request_too_large", "a chunk larger than max_body_size, at its size line"),
    # -- control bytes -------------------------------------------------------------------
    Case("target_del", _get(b"/v1/mo\x7fdels"), 400, "invalid_target",
         "a DEL in the path (it was a 500 and a critical traceback)"),
    Case("target_high_byte_in_query", _get(b"/v1/echo?q=\x80"), 400, "invalid_target",
         "a 0x80 byte in the query"),
    Case("target_byte_0xb0", _get(b"/v1/a\xb0"), 400, "invalid_target",
         "0xb0 in the path (Twisted's parser lets 0x7f-0xb0 through: it tests c > 176)"),
    Case("target_high_byte_in_path", _get(b"/v1/\xc3\xa9"), 400, _MALFORMED,
         "raw UTF-8 in the path (Twisted's parser refuses bytes over 0xb0)"),
    Case("target_control_byte", _get(b"/v1/a\x01b"), 400, _MALFORMED,
         "a control byte in the path"),
    Case("target_tab", _get(b"/v1/a\tb"), 400, _MALFORMED, "a TAB in the path"),
    Case("header_value_vertical_tab", _get(headers=b"Content-Type: a\x0bb\r\n"),
         400, "invalid_header", "a vertical tab in Content-Type (it reached the backend)"),
    Case("header_value_escape", _get(headers=b"X-A: \x1b[31m\r\n"),
         400, "invalid_header", "an ESC in a header value"),
    Case("header_value_del", _get(headers=b"X-A: a\x7f\r\n"),
         400, "invalid_header", "a DEL in a header value"),
    # -- Expect: 100-continue and credentials -------------------------------------------
    Case("expect_without_key",
         _post(b"Content-Length: 20\r\nExpect: 100-continue\r\n", path=b"/secure/upload"),
         401, "missing_api_key", "Expect: 100-continue without a key: 401, no 100 Continue"),
    Case("expect_with_wrong_key",
         _post(b"X-API-Key: sk-wrong\r\nContent-Length: 20\r\nExpect: 100-continue\r\n"),
         401, "invalid_api_key", "Expect: 100-continue with a wrong key: 401, no 100"),
    Case("expect_oversize",
         _post(b"Content-Length: 4096\r\nExpect: 100-continue\r\n"),
         413, "request_too_large", "Expect: 100-continue with a body over the limit: 413, "
         "no 100"),
    Case("no_key_for_secure_route", _get(b"/secure/x"),
         401, "missing_api_key", "a route that needs a key, without one"),
    Case("wrong_bearer_token", _get(headers=b"Authorization: Bearer sk-wrong\r\n"),
         401, "invalid_api_key", "a wrong Bearer token (even where no key is required)"),
    Case("expect_unknown", _post(b"Content-Length: 3\r\nExpect: 200-ok\r\n", b"abc"),
         417, "expectation_failed", "an Expect other than 100-continue (it was forwarded)"),
    Case("expect_unknown_get", _get(headers=b"Expect: foo\r\n"),
         417, "expectation_failed", "an unknown Expect on a GET"),
    Case("expect_second_value", _post(b"Content-Length: 3\r\nExpect: 100-continue\r\n"
                                      b"Expect: x\r\n", b"abc"),
         417, "expectation_failed", "100-continue plus an unknown second Expect"),
    # -- methods and versions -----------------------------------------------------------
    Case("method_unknown", _get(method=b"FOO"), 404, "route_not_found",
         "a method no route allows"),
    Case("method_lowercase", _get(method=b"get"), 400, "invalid_method",
         "a lower-case method (nginx: 400; it was relayed as sent)"),
    Case("method_mixed_case", _get(method=b"Get"), 400, "invalid_method",
         "a mixed-case method"),
    Case("method_with_digit", _get(method=b"FOO1"), 400, "invalid_method",
         "a method with a digit (nginx takes A-Z, '_' and '-' only)"),
    Case("method_too_long", _get(method=b"A" * 33), 400, "invalid_method",
         "a method over 32 characters"),
    Case("method_3kb", _get(method=b"A" * 3000), 400, "invalid_method",
         "a 3 KB method (a 10 KB one was relayed as sent)"),
    Case("method_trace", _get(method=b"TRACE"), 405, "method_not_allowed",
         "TRACE is refused at the head (no reflection of injected headers)"),
    Case("method_bad_characters", _get(method=b"G@T"), 400, _MALFORMED,
         "a method that is not a token"),
    Case("method_control_character", _get(method=b"GE\x01T"), 400, _MALFORMED,
         "a control character in the method"),
    Case("version_unknown", _get(version=b"HTTP/9.9"), 400, _MALFORMED,
         "an unknown HTTP version"),
    Case("version_http09", b"GET /v1/echo\r\n\r\n", 400, _MALFORMED,
         "an HTTP/0.9 request line"),
    Case("request_line_extra_token", _get(b"/v1/echo x"), 400, _MALFORMED,
         "a request line with four tokens"),
    # -- slow clients --------------------------------------------------------------------
    Case("slowloris_1_byte_per_2s", _get(), 408, "request_timeout",
         "a head at 1 byte / 2 s gets 408 at the head deadline", trickle=2.0),
    Case("slowloris_steady_trickle", _get(), 408, "request_timeout",
         "a head trickling 1 byte / 0.2 s (never idle) still gets 408 at the deadline",
         trickle=0.2),
    Case("slow_body", _post(b"Content-Length: 1000\r\n", b"x" * 1000), 408, "request_timeout",
         "a body slower than min_body_rate gets 408", body_trickle=0.25,
         split=len(_post(b"Content-Length: 1000\r\n"))),
]


async def _trickle(proto: RawClient, data: bytes, interval: float) -> None:
    """Write C{data} one byte every C{interval} seconds until done or disconnected."""
    for i in range(len(data)):
        if proto.reason is not None:
            return
        proto.transport.write(data[i:i + 1])
        await bounded(deferLater(reactor, interval), interval + 5)


class CorpusTests(TestCase):
    """
    The raw HTTP/1.x corpus (one generated test per L{CORPUS} case, below),
    plus controls proving the recording backend does see valid requests.
    """

    timeout = 30

    async def start(self) -> tuple[Harness, RunningGateway, Recorder, Backend]:
        h = Harness(self)
        recorder = Recorder()
        backend = h.serve(recorder, "recorder")
        gw = await h.gateway(corpus_config(h, backend))
        return h, gw, recorder, backend

    async def check(self, case: Case) -> None:
        h, gw, recorder, backend = await self.start()
        proto = await h.raw(gw.port)
        writer: Deferred | None = None
        started = reactor.seconds()
        if case.trickle is not None:
            writer = ensureDeferred(_trickle(proto, case.request, case.trickle))
        elif case.body_trickle is not None:
            proto.transport.write(case.request[:case.split])
            writer = ensureDeferred(
                _trickle(proto, case.request[case.split:], case.body_trickle))
        else:
            proto.transport.write(case.request)
        try:
            raw = await proto.when(response_complete)
        finally:
            if writer is not None:
                writer.cancel()
                writer.addErrback(lambda f: f.trap(CancelledError))
        elapsed = reactor.seconds() - started

        # What the client sees: exactly one final response, in the SPEC's shape.
        self.assertFalse(raw.startswith(b"HTTP/1.1 100"), raw[:200])
        response = parse_response(raw)
        self.assertEqual(response.status, case.status, raw[:300])
        self.assertEqual(response.header(b"content-type"), b"application/json")
        self.assertEqual(error_of(response.body)["code"], case.code)
        self.assertTrue(response.header(b"x-request-id"))
        if response.header(b"connection") == b"close":
            await bounded(proto.closed)
        if case.status == 408:
            self.assertGreaterEqual(elapsed, HEAD_TIMEOUT * 0.9)
        # One access-log line, as JSON, with the status the client saw.
        await wait_for(lambda: access_lines(gw), "the access-log line")
        records = parsed_access_lines(gw)
        self.assertEqual([r["status"] for r in records], [case.status])
        # And the backend got nothing at all, not even a connection.
        await tick(0.05)
        self.assertEqual(recorder.seen, [])
        self.assertEqual(backend.connections, [])
        proto.transport.loseConnection()

    async def test_control_valid_requests_reach_the_backend(self) -> None:
        """
        The recording backend does see what the gateway accepts: a GET, a
        chunked POST (also with C{Transfer-Encoding:<TAB>chunked} and
        C{CHUNKED}, which are valid) and a request with the right key on
        C{/secure/*}; so "received nothing" above means refused.
        """
        h, gw, recorder, _ = await self.start()
        requests = [
            _get(),
            _post(b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
            _post(b"Transfer-Encoding:\tchunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
            _post(b"Transfer-Encoding: CHUNKED\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
            _get(b"/secure/x", headers=b"X-API-Key: " + API_KEY.encode() + b"\r\n"),
        ]
        for request in requests:
            response = await h.exchange(gw.port, request)
            self.assertEqual(response.status, 200)
            self.assertEqual(response.body, b'{"ok": true}')
        self.assertEqual([(s.method, s.uri, s.body) for s in recorder.seen], [
            (b"GET", b"/v1/echo", b""),
            (b"POST", b"/v1/echo", b"abc"),
            (b"POST", b"/v1/echo", b"abc"),
            (b"POST", b"/v1/echo", b"abc"),
            (b"GET", b"/secure/x", b""),
        ])

    async def test_control_paths_forwarded_canonical(self) -> None:
        """
        Paths that are resolved rather than refused reach the backend in
        their canonical form, the same one routes matched: C{..} never
        above the root, encoded unreserved characters decoded, C{//} merged.
        """
        h, gw, recorder, _ = await self.start()
        for raw, forwarded in [
            (b"/../../etc/passwd", b"/etc/passwd"),
            (b"/v1/a/%2e%2e/b", b"/v1/b"),
            (b"//v1//echo", b"/v1/echo"),
            (b"/%7Euser/%41", b"/~user/A"),
            (b"/v1/echo?x=%2F", b"/v1/echo?x=%2F"),
        ]:
            response = await h.exchange(gw.port, _get(raw))
            self.assertEqual(response.status, 200, raw)
            self.assertEqual(recorder.seen[-1].uri, forwarded)


def _corpus_test(case: Case) -> Any:
    async def test(self: CorpusTests) -> None:
        await self.check(case)

    test.__name__ = f"test_{case.name}"
    test.__doc__ = (f"{case.why}: the client gets {case.status} ({case.code}) and the "
                    "backend receives nothing.")
    return test


for _case in CORPUS:
    assert not hasattr(CorpusTests, f"test_{_case.name}"), _case.name
    setattr(CorpusTests, f"test_{_case.name}", _corpus_test(_case))


class ConnectionCapTests(TestCase):
    timeout = 30

    async def test_connections_over_max_connections_refused(self) -> None:
        """
        With C{server.max_connections: 2} and two client connections open, a
        third gets a clear 503 C{too_many_connections} with C{Retry-After}
        and is closed, and the backend receives nothing; once one of the two
        leaves, a new connection is served again.
        """
        h = Harness(self)
        recorder = Recorder()
        backend = h.serve(recorder, "recorder")
        gw = await h.gateway(h.config({"p": pool(backend)}, server={"max_connections": 2}))
        first = await h.raw(gw.port)
        second = await h.raw(gw.port)
        await wait_for(lambda: open_connections(gw, "client") == 2, "two client connections")
        third = await h.raw(gw.port, _get())
        raw = await bounded(third.closed)
        response = parse_response(raw)
        self.assertEqual(response.status, 503)
        self.assertEqual(error_of(response.body)["code"], "too_many_connections")
        self.assertEqual(response.header(b"retry-after"), b"1")
        self.assertEqual(recorder.seen, [])
        first.transport.loseConnection()
        await wait_for(lambda: open_connections(gw, "client") == 1, "one client connection")
        response = await h.exchange(gw.port, _get())
        self.assertEqual(response.status, 200)
        self.assertEqual(len(recorder.seen), 1)
        second.transport.loseConnection()


# -- HTTP/2 --------------------------------------------------------------------------------


@attrs.frozen
class H2Case:
    """
    One HTTP/2 request and its answer: a status and C{error.code}, or (when
    C{goaway} is set) a connection error the h2 library raises first.
    """

    name: str
    headers: list[tuple[bytes, bytes]]
    why: str
    status: int | None = None
    code: str | None = None
    body: bytes = b""
    goaway: int | None = None


_PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR
_KEY = (b"x-api-key", API_KEY.encode())

H2_CORPUS: list[H2Case] = [
    H2Case("h2_no_authority_no_host", h2_headers(b"GET", b"/v1/echo", None),
           "no :authority and no Host", goaway=_PROTOCOL_ERROR),
    H2Case("h2_host_disagrees_with_authority",
           h2_headers(b"GET", b"/v1/echo", extra=[(b"host", b"evil.example")]),
           "a Host that disagrees with :authority", goaway=_PROTOCOL_ERROR),
    H2Case("h2_authority_userinfo", h2_headers(b"GET", b"/v1/echo", b"u:p@localhost"),
           ":authority with userinfo", 400, "invalid_host"),
    H2Case("h2_authority_bad_port", h2_headers(b"GET", b"/v1/echo", b"localhost:99999"),
           ":authority with a port above 65535", 400, "invalid_host"),
    H2Case("h2_authority_inner_space", h2_headers(b"GET", b"/v1/echo", b"local host"),
           ":authority with a space", 400, "invalid_host"),
    H2Case("h2_host_header_userinfo",
           h2_headers(b"GET", b"/v1/echo", None, [(b"host", b"u@localhost")]),
           "a Host header (no :authority) with userinfo", 400, "invalid_host"),
    H2Case("h2_path_encoded_slash", h2_headers(b"GET", b"/v1/a%2Fb"),
           "%2F in :path", 400, "invalid_path"),
    H2Case("h2_path_encoded_nul", h2_headers(b"GET", b"/v1/a%00b"),
           "%00 in :path", 400, "invalid_path"),
    H2Case("h2_path_bad_escape", h2_headers(b"GET", b"/v1/a%zz"),
           "%zz in :path", 400, "invalid_path"),
    H2Case("h2_path_dotdot_semicolon", h2_headers(b"GET", b"/v1/..;/secure/x"),
           "'..;/' in :path", 400, "invalid_path"),
    H2Case("h2_path_absolute_url", h2_headers(b"GET", b"http://evil.example/v1/echo"),
           "an absolute URL as :path", 400, "invalid_path"),
    H2Case("h2_path_dotdot_into_secure", h2_headers(b"GET", b"/v1/../../secure/x"),
           "'..' resolved onto a route that needs a key", 401, "missing_api_key"),
    H2Case("h2_underscore_header_name",
           h2_headers(b"GET", b"/v1/echo", extra=[(b"x_forwarded_for", b"10.0.0.1")]),
           "a header name with '_'", 400, "invalid_header"),
    H2Case("h2_body_over_limit_with_length",
           h2_headers(b"POST", b"/v1/echo", extra=[(b"content-length", b"2048")]),
           "a declared body over max_body_size", 413, "request_too_large", b"a" * 2048),
    H2Case("h2_body_over_limit_without_length", h2_headers(b"POST", b"/v1/echo"),
           "an undeclared body growing over max_body_size", 413, "request_too_large",
           b"a" * 3000),
    H2Case("h2_no_key_for_secure_route", h2_headers(b"GET", b"/secure/x"),
           "a route that needs a key, without one", 401, "missing_api_key"),
    H2Case("h2_wrong_key", h2_headers(b"GET", b"/v1/echo", extra=[(b"x-api-key", b"nope")]),
           "a wrong API key", 401, "invalid_api_key"),
    H2Case("h2_wrong_bearer",
           h2_headers(b"GET", b"/v1/echo", extra=[(b"authorization", b"Bearer nope")]),
           "a wrong Bearer token", 401, "invalid_api_key"),
    H2Case("h2_expect_without_key",
           h2_headers(b"POST", b"/secure/x", extra=[(b"expect", b"100-continue"),
                                                    (b"content-length", b"10")]),
           "Expect: 100-continue without a key (no 100 either)", 401, "missing_api_key",
           b"0123456789"),
    H2Case("h2_path_del", h2_headers(b"GET", b"/v1/mo\x7fdels"),
           "a DEL in :path", 400, "invalid_target"),
    H2Case("h2_path_high_byte_in_query", h2_headers(b"GET", b"/v1/echo?q=\x80"),
           "a 0x80 byte in the query of :path", 400, "invalid_target"),
    H2Case("h2_header_value_vertical_tab",
           h2_headers(b"GET", b"/v1/echo", extra=[(b"content-type", b"a\x0bb")]),
           "a vertical tab in content-type", 400, "invalid_header"),
    H2Case("h2_expect_unknown",
           h2_headers(b"GET", b"/v1/echo", extra=[(b"expect", b"foo")]),
           "an Expect other than 100-continue", 417, "expectation_failed"),
    H2Case("h2_method_lowercase", h2_headers(b"get", b"/v1/echo"),
           "a lower-case method", 400, "invalid_method"),
    H2Case("h2_method_unknown", h2_headers(b"FOO", b"/v1/echo"),
           "a method no route allows", 404, "route_not_found"),
    H2Case("h2_transfer_encoding",
           h2_headers(b"POST", b"/v1/echo", extra=[(b"transfer-encoding", b"chunked")]),
           "Transfer-Encoding (forbidden in HTTP/2)", goaway=_PROTOCOL_ERROR, body=b"abc"),
    H2Case("h2_connection_header",
           h2_headers(b"GET", b"/v1/echo", extra=[(b"connection", b"x-forwarded-for")]),
           "a Connection header (forbidden in HTTP/2)", goaway=_PROTOCOL_ERROR),
    H2Case("h2_content_length_mismatch",
           h2_headers(b"POST", b"/v1/echo", extra=[(b"content-length", b"3")]),
           "a body longer than its content-length", goaway=_PROTOCOL_ERROR, body=b"abcdef"),
    H2Case("h2_uppercase_header_name",
           h2_headers(b"GET", b"/v1/echo", extra=[(b"X-Upper", b"1")]),
           "an upper-case header name", goaway=_PROTOCOL_ERROR),
]


class H2CorpusTests(TestCase):
    """The corpus over HTTP/2 (TLS + ALPN h2), one generated test per L{H2_CORPUS} case."""

    timeout = 30

    async def start(self) -> tuple[Harness, RunningGateway, Recorder, Backend, bytes]:
        h = Harness(self)
        recorder = Recorder()
        backend = h.serve(recorder, "recorder")
        cert = write_cert(h)
        gw = await h.gateway(corpus_config(h, backend, tls=tls_section()))
        return h, gw, recorder, backend, cert

    async def check(self, case: H2Case) -> None:
        h, gw, recorder, backend, cert = await self.start()
        client = await h2_connect(h, gw.tls_port, cert)
        result: H2Result = client.request(case.headers, case.body)
        if case.goaway is not None:
            await wait_for(lambda: client.goaway is not None, "a GOAWAY")
            self.assertEqual(client.goaway.error_code, case.goaway)
            self.assertIsNone(result.status)
            await bounded(client.closed)
        else:
            await bounded(result.done)
            self.assertEqual(result.informational, [])
            self.assertEqual(result.status, case.status, result.body[:300])
            self.assertTrue(result.ended)
            self.assertEqual(result.header(b"content-type"), b"application/json")
            self.assertEqual(result.error()["code"], case.code)
            self.assertTrue(result.header(b"x-request-id"))
            await wait_for(lambda: access_lines(gw), "the access-log line")
            self.assertEqual([r["status"] for r in parsed_access_lines(gw)], [case.status])
        await tick(0.05)
        self.assertEqual(recorder.seen, [])
        self.assertEqual(backend.connections, [])

    async def test_control_valid_requests_reach_the_backend(self) -> None:
        """
        Over HTTP/2 the backend does see what the gateway accepts (a GET, a
        POST with a body, a keyed request on C{/secure/*}, a C{Host} header
        instead of C{:authority}), so "received nothing" above means refused.
        """
        h, gw, recorder, _, cert = await self.start()
        client = await h2_connect(h, gw.tls_port, cert)
        for headers, body in [
            (h2_headers(b"GET", b"/v1/echo"), b""),
            (h2_headers(b"POST", b"/v1/echo", extra=[(b"content-length", b"3")]), b"abc"),
            (h2_headers(b"GET", b"/secure/x", extra=[_KEY]), b""),
            (h2_headers(b"GET", b"/v1/echo", None, [(b"host", b"localhost")]), b""),
        ]:
            result = await bounded(client.request(headers, body).done)
            self.assertEqual(result.status, 200)
            self.assertEqual(result.body, b'{"ok": true}')
        self.assertEqual([(s.method, s.uri, s.body) for s in recorder.seen], [
            (b"GET", b"/v1/echo", b""),
            (b"POST", b"/v1/echo", b"abc"),
            (b"GET", b"/secure/x", b""),
            (b"GET", b"/v1/echo", b""),
        ])


def _h2_test(case: H2Case) -> Any:
    async def test(self: H2CorpusTests) -> None:
        await self.check(case)

    test.__name__ = f"test_{case.name}"
    if case.goaway is not None:
        answer = "the client gets GOAWAY PROTOCOL_ERROR and the connection closes"
    else:
        answer = f"the client gets {case.status} ({case.code})"
    test.__doc__ = f"HTTP/2, {case.why}: {answer} and the backend receives nothing."
    return test


for _h2case in H2_CORPUS:
    assert not hasattr(H2CorpusTests, f"test_{_h2case.name}"), _h2case.name
    setattr(H2CorpusTests, f"test_{_h2case.name}", _h2_test(_h2case))
