"""
A seeded mutator of HTTP/1.1 request heads, and a strict reader of the
responses a server sends back (issue 7, the fuzzing harness).

L{generate} starts from valid requests to the gateway's routes
(C{GET /health}, C{GET /v1/models}, C{POST /v1/chat/completions} with JSON)
and applies one mutation class per case (a few cases combine two): byte
flips with control and high bytes in every part of the head, duplicated
framing headers, CL/TE conflicts, odd chunk sizes, obs-fold, bare CR/LF,
truncation, very long lines, odd C{Expect} values, odd methods,
absolute-form targets, percent-encodings, pipelined pairs, fragmented
writes. The same seed gives the same cases, byte for byte.

L{read_responses} parses what came back as a sequence of HTTP/1.1
responses and says what, if anything, is malformed. Nothing here does I/O.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

import attrs

#: The Host every base request names (absolute-form targets use it too).
HOST = b"gateway.test"
#: The API key the fuzzed gateway accepts (agent C{fuzzer}).
API_KEY = b"sk-fuzz-3b7e19c2a40d"

CONTROL = bytes(range(0x00, 0x20)) + b"\x7f"
HIGH = bytes(range(0x80, 0x100))
SPECIAL = b" \t:;,\"'\\/?#%@[]{}<>=&+()*!$^`|~"


@attrs.define
class Head:
    """One request as parts, serialised by L{wire} (mutations edit the parts)."""

    method: bytes
    target: bytes
    version: bytes
    #: C{[name, value]} pairs; a value of None sends the name as a raw line.
    headers: list[list[Any]]
    body: bytes = b""
    #: The bytes between request-line parts, and after each line.
    sep: bytes = b" "
    eol: bytes = b"\r\n"
    #: Bytes sent before the request line.
    prefix: bytes = b""

    def copy(self) -> Head:
        return attrs.evolve(self, headers=[list(h) for h in self.headers])

    def find(self, name: bytes) -> int | None:
        """Index of the first header named C{name} (any case), or None."""
        for i, (n, _) in enumerate(self.headers):
            if n.lower() == name.lower():
                return i
        return None

    def set(self, name: bytes, value: bytes) -> None:
        i = self.find(name)
        if i is None:
            self.headers.append([name, value])
        else:
            self.headers[i][1] = value

    def remove(self, name: bytes) -> None:
        self.headers = [h for h in self.headers if h[0].lower() != name.lower()]

    def wire(self) -> bytes:
        line = self.method + self.sep + self.target
        if self.version:
            line += self.sep + self.version
        out = [self.prefix, line, self.eol]
        for name, value in self.headers:
            out += [name, self.eol] if value is None else [name, b": ", value, self.eol]
        out += [self.eol, self.body]
        return b"".join(out)


def _chat_body(rng: random.Random) -> bytes:
    body: dict[str, Any] = {"model": "sim-small",
                            "messages": [{"role": "user", "content": "hello fuzz"}]}
    if rng.random() < 0.3:
        body["stream"] = True
    if rng.random() < 0.3:
        body["max_tokens"] = 4
    return json.dumps(body).encode()


def base_heads(rng: random.Random) -> list[Head]:
    """The valid requests every case starts from (the gateway answers each with 200)."""
    auth = [b"Authorization", b"Bearer " + API_KEY]
    chat = _chat_body(rng)
    return [
        Head(b"GET", b"/health", b"HTTP/1.1",
             [[b"Host", HOST], [b"User-Agent", b"fuzz/1.0"], [b"Accept", b"*/*"]]),
        Head(b"HEAD", b"/health", b"HTTP/1.1", [[b"Host", HOST]]),
        Head(b"GET", b"/v1/models", b"HTTP/1.1",
             [[b"Host", HOST], [b"Accept", b"application/json"], auth]),
        Head(b"GET", b"/v1/models?limit=5&after=a", b"HTTP/1.1",
             [[b"Host", HOST], [b"X-Request-ID", b"fuzz-req-1"]]),
        Head(b"POST", b"/v1/chat/completions", b"HTTP/1.1",
             [[b"Host", HOST], [b"Content-Type", b"application/json"],
              [b"Content-Length", b"%d" % len(chat)], [b"X-Request-ID", b"fuzz-req-2"],
              [b"X-Session-ID", b"sess-1"], auth], chat),
        Head(b"POST", b"/v1/chat/completions", b"HTTP/1.1",
             [[b"Host", HOST], [b"Content-Type", b"application/json; charset=utf-8"],
              [b"Transfer-Encoding", b"chunked"], [b"Accept", b"text/event-stream"]],
             _chunk(chat, [len(chat)])),
    ]


def _chunk(body: bytes, sizes: Sequence[int]) -> bytes:
    """C{body} as chunks of the given sizes (the rest in one more), then the last chunk."""
    out, pos = [], 0
    for n in sizes:
        piece = body[pos:pos + n]
        pos += n
        if piece:
            out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
    if pos < len(body):
        out.append(b"%x\r\n%s\r\n" % (len(body) - pos, body[pos:]))
    return b"".join(out) + b"0\r\n\r\n"


def _nasty(rng: random.Random) -> bytes:
    r = rng.random()
    pool = CONTROL if r < 0.45 else HIGH if r < 0.75 else SPECIAL
    return bytes([rng.choice(pool)])


def flip(rng: random.Random, data: bytes) -> bytes:
    """Replace, insert or (rarely) delete one byte of C{data}, with a hostile byte."""
    if not data:
        return _nasty(rng)
    i = rng.randrange(len(data) + 1)
    op = rng.random()
    if op < 0.5 and i < len(data):
        return data[:i] + _nasty(rng) + data[i + 1:]
    if op < 0.9:
        return data[:i] + _nasty(rng) + data[i:]
    i = min(i, len(data) - 1)
    return data[:i] + data[i + 1:]


def _flips(rng: random.Random, data: bytes) -> bytes:
    for _ in range(1 if rng.random() < 0.7 else rng.randint(2, 4)):
        data = flip(rng, data)
    return data


# -- structural mutations (Head -> Head) ----------------------------------------------

Mutation = Callable[[random.Random, Head], Head]


def m_flip_method(rng: random.Random, h: Head) -> Head:
    h.method = _flips(rng, h.method)
    return h


def m_flip_target(rng: random.Random, h: Head) -> Head:
    h.target = _flips(rng, h.target)
    return h


def m_flip_version(rng: random.Random, h: Head) -> Head:
    h.version = _flips(rng, h.version)
    return h


def _pick(rng: random.Random, h: Head) -> int:
    """A random header line (not an obs-fold line) of C{h}; one is added if none."""
    real = [i for i, (_, v) in enumerate(h.headers) if v is not None]
    if not real:
        h.headers.append([b"X-Added", b"1"])
        return len(h.headers) - 1
    return rng.choice(real)


def m_flip_header_name(rng: random.Random, h: Head) -> Head:
    i = _pick(rng, h)
    h.headers[i][0] = _flips(rng, h.headers[i][0])
    return h


def m_flip_header_value(rng: random.Random, h: Head) -> Head:
    i = _pick(rng, h)
    h.headers[i][1] = _flips(rng, h.headers[i][1])
    return h


def m_ctl_in_value(rng: random.Random, h: Head) -> Head:
    """A control or high byte inside a header the gateway reads or forwards."""
    name = rng.choice([b"Content-Type", b"Authorization", b"X-Request-ID", b"X-Session-ID",
                       b"Accept", b"User-Agent", b"X-Forwarded-For", b"Cookie", b"Host",
                       b"X-Custom"])
    i = h.find(name)
    value = h.headers[i][1] if i is not None else b"value"
    pos = rng.randrange(len(value) + 1)
    byte = bytes([rng.choice(CONTROL.replace(b"\r", b"").replace(b"\n", b"") + HIGH)])
    h.set(name, value[:pos] + byte + value[pos:])
    return h


def m_duplicate_header(rng: random.Random, h: Head) -> Head:
    name = rng.choice([b"Host", b"Content-Length", b"Transfer-Encoding", b"Content-Type",
                       b"Authorization", b"X-Request-ID", b"Expect", b"Connection"])
    i = h.find(name)
    value = h.headers[i][1] if i is not None else {
        b"Host": HOST, b"Content-Length": b"%d" % len(h.body), b"Transfer-Encoding": b"chunked",
        b"Expect": b"100-continue", b"Connection": b"keep-alive",
    }.get(name, b"x")
    other = rng.choice([value, value + b"0", b"evil.example", b"0", b"chunked", b"", value.upper()])
    spelled = rng.choice([name, name.lower(), name.upper()])
    if i is None:
        h.headers.append([name, value])
    h.headers.insert(rng.randrange(len(h.headers) + 1), [spelled, other])
    return h


_TE_VALUES = [b"chunked", b"Chunked", b"CHUNKED", b" chunked", b"chunked ", b"\tchunked",
              b"chunked, identity", b"identity, chunked", b"identity", b"gzip, chunked",
              b"xchunked", b"chunked;q=1", b"chunk", b"\x0bchunked", b"chunked\x00", b""]


def m_cl_te(rng: random.Random, h: Head) -> Head:
    """Content-Length and Transfer-Encoding together, in either order, spelled oddly."""
    h.remove(b"Content-Length")
    h.remove(b"Transfer-Encoding")
    body = _chunk(b'{"model": "sim-small", "messages": []}', [5])
    cl = [b"Content-Length", rng.choice([b"%d" % len(body), b"4", b"0", b"%d" % (len(body) + 7)])]
    te = [rng.choice([b"Transfer-Encoding", b"transfer-encoding", b"Transfer-Encoding "]),
          rng.choice(_TE_VALUES)]
    pair = [cl, te] if rng.random() < 0.5 else [te, cl]
    h.headers[1:1] = pair
    h.body = body + rng.choice([b"", b"GET /smuggled HTTP/1.1\r\nHost: gateway.test\r\n\r\n"])
    return h


_CHUNK_SIZES = [b"ffffffffffffffff1", b"fffffffffffffffff", b"-1", b"0x10", b" 10", b"10 ",
                b"10;ext=1", b"10;" + b"e" * 300, b"1" * 40, b"0" * 40 + b"10", b"+10",
                b"1_0", b"1 0", b"G", b"", b"10\x00", b"7fffffffffffffff", b"8000000000000000",
                b"10\t", b"10;a=\"b\"", b"\x80", b"1e"]


def m_chunk_size(rng: random.Random, h: Head) -> Head:
    """A chunked body whose chunk-size line is odd, huge or malformed."""
    h.method = b"POST"
    h.target = b"/v1/chat/completions"
    h.remove(b"Content-Length")
    h.set(b"Transfer-Encoding", b"chunked")
    h.set(b"Content-Type", b"application/json")
    payload = b'{"model": "sim-small", "messages": []}'
    size = rng.choice(_CHUNK_SIZES)
    tail = rng.choice([b"\r\n" + payload[:16] + b"\r\n0\r\n\r\n", b"\r\n" + payload + b"\r\n",
                       b"\r\n", b"\r\n0\r\n\r\n", b"\n" + payload[:16] + b"\n0\n\n"])
    prefix = _chunk(payload, [3])[:-5] if rng.random() < 0.5 else b""
    h.body = prefix + size + tail
    if rng.random() < 0.2:
        # A valid chunked body with odd trailers instead.
        h.body = _chunk(payload, [4])[:-2] + rng.choice(
            [b"X-T: 1\r\n\r\n", b"Content-Length: 5\r\n\r\n", b"X-T: \x01\r\n\r\n",
             b" fold\r\n\r\n", b"Transfer-Encoding: chunked\r\n\r\n"])
    return h


def m_obs_fold(rng: random.Random, h: Head) -> Head:
    i = rng.randrange(len(h.headers))
    cont = rng.choice([b" ", b"\t", b"  \t"]) + rng.choice([b"x", b"chunked", b"", b"a: b"])
    h.headers.insert(i + 1, [cont, None])
    return h


def m_long_line(rng: random.Random, h: Head) -> Head:
    n = rng.choice([1000, 8000, 16000, 16383, 16384, 16385, 20000, 70000])
    where = rng.randrange(5)
    if where == 0:
        h.target = h.target + (b"?" if b"?" not in h.target else b"&") + b"q=" + b"a" * n
    elif where == 1:
        h.headers.append([b"X-Long", b"v" * n])
    elif where == 2:
        h.headers.append([b"X-" + b"n" * n, b"1"])
    elif where == 3:
        h.method = b"G" * n
    else:
        h.target = b"/" + b"a/" * (n // 2)
    return h


def m_many_headers(rng: random.Random, h: Head) -> Head:
    n = rng.choice([50, 99, 100, 101, 200, 499, 500, 501, 1000])
    h.headers += [[b"X-H%d" % i, b"v"] for i in range(n)]
    return h


_EXPECT = [b"100-continue", b"100-Continue", b"100-CONTINUE", b" 100-continue",
           b"100-continue, foo", b"200-ok", b"foo", b"", b"100", b"100-continue;x=1",
           b"100-continue\x0b", b"\x80", b"100-continue 100-continue", b"*"]


def m_expect(rng: random.Random, h: Head) -> Head:
    h.set(b"Expect", rng.choice(_EXPECT))
    if rng.random() < 0.3:
        # The body does not follow (the client waits for 100 Continue).
        h.body = b""
    return h


_METHODS = [b"get", b"Get", b"post", b"gEt", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"TRACE",
            b"CONNECT", b"PROPFIND", b"M-SEARCH", b"BREW", b"GET!", b"G.E.T", b"HEAD", b"PRI",
            b"GETGET", b"X" * 64, b"POST" * 300, b"Q" * 10000, b"1", b"-", b"~GET"]


def m_method(rng: random.Random, h: Head) -> Head:
    h.method = rng.choice(_METHODS)
    return h


def m_absolute_form(rng: random.Random, h: Head) -> Head:
    path = h.target
    h.target = rng.choice([
        b"http://" + HOST + path, b"HTTP://" + HOST + path, b"https://" + HOST + path,
        b"http://" + HOST.upper() + path, b"http://" + HOST + b":80" + path,
        b"http://evil.example" + path, b"http://" + HOST, b"http://" + HOST + b"?x=1",
        b"http://u:p@" + HOST + path, b"http://" + HOST + b"\x00" + path,
        b"http://" + HOST + b"%2F" + path, b"http:///" + path, b"http:" + path,
        b"//" + HOST + path, b"ftp://" + HOST + path, b"http://[::1]" + path,
        b"http://" + HOST + b":99999" + path, b"*", b"" + HOST + b":443",
        b"http://\x80" + path, b"http://" + HOST + path + b"#frag",
    ])
    return h


_ESCAPES = [b"%2F", b"%2f", b"%2e", b"%2E%2E", b"%00", b"%zz", b"%", b"%4", b"%u002f",
            b"%c0%af", b"%ff", b"%7f", b"%0d%0a", b"%20", b"%25", b"%5C", b"%3B", b"%23",
            b"%3F", b"%e2%80%ae", b"%80", b"%41", b"%%32%66"]


def m_percent(rng: random.Random, h: Head) -> Head:
    path, q, query = h.target.partition(b"?")
    esc = rng.choice(_ESCAPES)
    if rng.random() < 0.6:
        i = rng.randrange(1, len(path) + 1)
        path = path[:i] + esc + path[i:]
    else:
        query = (query + b"&" if query else b"") + b"x=" + esc
        q = b"?"
    h.target = path + q + query
    return h


def m_query_bytes(rng: random.Random, h: Head) -> Head:
    """Raw control or high bytes in the query string (or a bare C{?}/C{#})."""
    path, _, query = h.target.partition(b"?")
    byte = bytes([rng.choice(CONTROL.replace(b" ", b"") + HIGH)])
    h.target = path + b"?" + (query or b"a=b") + rng.choice([byte, b"&c=" + byte, byte * 3])
    return h


_VERSIONS = [b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/2", b"HTTP/3", b"http/1.1",
             b"HTTP/1.1 ", b"HTTP/01.1", b"HTTP/1.10", b"HTTP/1", b"HTTP/", b"HTTPS/1.1",
             b"HTTP/1.1\x00", b"HTTP/9.9", b"", b"HTTP/1.1x", b"HTTP/0.9", b"HTTP\\1.1"]


def m_version(rng: random.Random, h: Head) -> Head:
    h.version = rng.choice(_VERSIONS)
    return h


def m_whitespace(rng: random.Random, h: Head) -> Head:
    r = rng.randrange(7)
    if r == 0:
        h.sep = rng.choice([b"  ", b"\t", b" \t", b"\x0b", b"\x0c", b"\xa0"])
    elif r == 1:
        h.prefix = rng.choice([b"\r\n", b"\r\n\r\n", b"\n", b" ", b"\r\n" * 50])
    elif r == 2:
        i = _pick(rng, h)
        h.headers[i][0] = h.headers[i][0] + rng.choice([b" ", b"\t"])
    elif r == 3:
        i = _pick(rng, h)
        h.headers[i][1] = rng.choice([b" ", b"\t", b"   "]) + h.headers[i][1] + rng.choice(
            [b" ", b"\t", b""])
    elif r == 4:
        h.headers.insert(rng.randrange(len(h.headers) + 1), [b"", rng.choice([b"x", b""])])
    elif r == 5:
        h.target = h.target + rng.choice([b" ", b" x", b"\t"])
    else:
        h.method = b" " + h.method
    return h


_HOSTS = [None, b"", b" ", b"evil.example", b"gateway.test:0", b"gateway.test:65536",
          b"gateway.test:", b"[::1]", b"[::1]:80", b"[zz]", b"u@gateway.test", b"a b",
          b"gateway.test/x", b"\x80", b"gateway.test\x0b", b"g" * 300, b"127.0.0.1",
          b"GATEWAY.TEST", b"gateway.test.", b"*", b"%00"]


def m_host(rng: random.Random, h: Head) -> Head:
    value = rng.choice(_HOSTS)
    if value is None:
        h.remove(b"Host")
    else:
        h.set(b"Host", value)
    return h


_CLS = [b"-1", b"+5", b" 5", b"5 ", b"0x5", b"99999999999999999999", b"5,5", b"5, 6", b"",
        b"1e3", b"\xd9\xa3", b"5\x00", b"05", b"0" * 30 + b"5", b"1_0", b"18446744073709551617",
        b"4294967297", b"10485761", b"abc"]


def m_content_length(rng: random.Random, h: Head) -> Head:
    h.remove(b"Transfer-Encoding")
    if not h.body:
        h.body = b'{"model": "sim-small"}'
    if h.body.endswith(b"0\r\n\r\n"):
        h.body = b'{"model": "sim-small", "messages": []}'
    r = rng.random()
    if r < 0.6:
        value = rng.choice(_CLS)
    elif r < 0.8:
        value = b"%d" % (len(h.body) + rng.randint(1, 50))  # the body falls short
    else:
        value = b"%d" % rng.randint(0, max(0, len(h.body) - 1))  # leftover bytes
    h.set(b"Content-Length", value)
    return h


_JSON_BODIES = [
    b"", b"{", b"null", b"[]", b"1", b'"x"', b'{"model": 5}', b'{"model": null, "messages": 5}',
    b'{"model": "sim-small", "messages": "hi"}', b'{"model": "sim-small", "messages": [5]}',
    b'{"model": "sim-small", "messages": [{"role": 1, "content": {}}]}',
    b'{"model": "sim-small", "messages": [], "stream": "yes"}',
    b'{"model": "sim-small", "messages": [], "max_tokens": -1}',
    b'{"model": "sim-small", "messages": [], "max_tokens": 1e309}',
    b'{"model": "sim-small", "messages": [], "max_tokens": 99999999999999999999999}',
    b'{"model": "\xff\xfe", "messages": []}', b'{"model": "sim\x00small", "messages": []}',
    b'{"model": "sim-small", "messages": [], "user": {"a": 1}}',
    b'{"model": "sim-small", "model": "other", "messages": []}',
    b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000,
    b'{"model": "sim-small", "messages": [{"role": "user", "content": "' + b"x" * 5000 + b'"}]}',
    b'\xef\xbb\xbf{"model": "sim-small", "messages": []}', b'{"model": NaN}',
    b'{"model": "sim-small", "messages": [], "n": 100000}', b"\x00\x01\x02",
    b'{"model": ["sim-small"], "messages": []}', b'{"model": "*", "messages": []}',
    b'{"model": "../../x", "messages": []}', b'{"model": "' + b"m" * 2000 + b'"}',
]


def m_json_body(rng: random.Random, h: Head) -> Head:
    body = rng.choice(_JSON_BODIES)
    h.method = b"POST"
    h.target = b"/v1/chat/completions"
    h.remove(b"Transfer-Encoding")
    h.set(b"Content-Type", rng.choice([b"application/json", b"text/plain", b"application/jso",
                                       b"application/json; charset=latin-1"]))
    h.set(b"Content-Length", b"%d" % len(body))
    h.body = body
    return h


MUTATIONS: dict[str, Mutation] = {
    "flip_method": m_flip_method,
    "flip_target": m_flip_target,
    "flip_version": m_flip_version,
    "flip_header_name": m_flip_header_name,
    "flip_header_value": m_flip_header_value,
    "ctl_in_value": m_ctl_in_value,
    "duplicate_header": m_duplicate_header,
    "cl_te": m_cl_te,
    "chunk_size": m_chunk_size,
    "obs_fold": m_obs_fold,
    "long_line": m_long_line,
    "many_headers": m_many_headers,
    "expect": m_expect,
    "method": m_method,
    "absolute_form": m_absolute_form,
    "percent": m_percent,
    "query_bytes": m_query_bytes,
    "version": m_version,
    "whitespace": m_whitespace,
    "host": m_host,
    "content_length": m_content_length,
    "json_body": m_json_body,
}


# -- wire mutations (bytes -> bytes) --------------------------------------------------


def w_truncate(rng: random.Random, data: bytes) -> bytes:
    return data[:rng.randrange(1, len(data))] if len(data) > 1 else data


def w_bare_crlf(rng: random.Random, data: bytes) -> bytes:
    head_end = data.find(b"\r\n\r\n")
    head_end = len(data) if head_end < 0 else head_end + 2
    ends = [m.start() for m in re.finditer(rb"\r\n", data[:head_end])]
    r = rng.random()
    if ends and r < 0.6:
        i = rng.choice(ends)
        return data[:i] + rng.choice([b"\r", b"\n", b"\n\r", b"\r\r\n"]) + data[i + 2:]
    i = rng.randrange(head_end)
    return data[:i] + rng.choice([b"\r", b"\n"]) + data[i:]


# -- cases ----------------------------------------------------------------------------


@attrs.frozen
class Case:
    """
    One fuzz case: the bytes to send, how to send them, what to expect back.

    @ivar mutation: the mutation class (C{a+b} for a combination).
    @ivar writes: the request split into these pieces, written one reactor
        turn apart (one piece for most cases).
    @ivar methods: the method of each request in C{data}, in order (a
        C{HEAD}'s answer has no body).
    """

    index: int
    mutation: str
    writes: tuple[bytes, ...]
    methods: tuple[bytes, ...]

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)

    @property
    def expected(self) -> int:
        """Final responses to wait for before closing (fewer if the server closes)."""
        return len(self.methods)

    @property
    def expects_continue(self) -> bool:
        """Whether any request in C{data} has an C{Expect} naming 100-continue."""
        return _EXPECT_CONTINUE.search(self.data) is not None


_EXPECT_CONTINUE = re.compile(rb"(?im)^expect[ \t]*:[^\r\n]*100-continue")

CLASSES: tuple[str, ...] = (*MUTATIONS, "truncate", "bare_crlf", "pipeline", "fragmented",
                            "combo")


def _mutate(rng: random.Random, name: str, base: Head) -> tuple[bytes, bytes]:
    """(wire bytes, method) of C{base} after the mutation class C{name}."""
    if name in MUTATIONS:
        h = MUTATIONS[name](rng, base.copy())
        return h.wire(), h.method
    if name == "truncate":
        return w_truncate(rng, base.wire()), base.method
    if name == "bare_crlf":
        return w_bare_crlf(rng, base.wire()), base.method
    raise ValueError(name)


def generate(seed: int, count: int) -> list[Case]:
    """
    C{count} cases from C{seed}: the classes of L{CLASSES} in turn (so each
    gets an equal share), the details drawn from a C{random.Random(seed)}.
    """
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        cls = CLASSES[index % len(CLASSES)]
        base = rng.choice(base_heads(rng))
        writes: tuple[bytes, ...]
        if cls == "pipeline":
            first_cls = rng.choice([*MUTATIONS, None, None])
            if first_cls is None:
                first, m1 = base.wire(), base.method
            else:
                first, m1 = _mutate(rng, first_cls, base)
            second_base = rng.choice(base_heads(rng))
            if rng.random() < 0.5:
                second, m2 = _mutate(rng, rng.choice(list(MUTATIONS)), second_base)
            else:
                second, m2 = second_base.wire(), second_base.method
            label = f"pipeline:{first_cls or 'valid'}"
            writes, methods = (first + second,), (m1, m2)
        elif cls == "fragmented":
            inner = rng.choice([*MUTATIONS, None])
            data, m = _mutate(rng, inner, base) if inner else (base.wire(), base.method)
            cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 3))))
            # Cut between CR and LF now and then, the hardest place for a line parser.
            crs = [i + 1 for i in range(len(data) - 1) if data[i:i + 2] == b"\r\n"]
            if crs and rng.random() < 0.5:
                cuts = sorted({*cuts, rng.choice(crs)})
            bounds = [0, *cuts, len(data)]
            writes = tuple(data[a:b] for a, b in itertools.pairwise(bounds) if b > a)
            label, methods = f"fragmented:{inner or 'valid'}", (m,)
        elif cls == "combo":
            a, b = rng.sample(list(MUTATIONS), 2)
            h = MUTATIONS[b](rng, MUTATIONS[a](rng, base.copy()))
            data = h.wire()
            wire = rng.choice([None, "truncate", "bare_crlf"])
            if wire == "truncate":
                data = w_truncate(rng, data)
            elif wire == "bare_crlf":
                data = w_bare_crlf(rng, data)
            label = f"combo:{a}+{b}" + (f"+{wire}" if wire else "")
            writes, methods = (data,), (h.method,)
        else:
            data, m = _mutate(rng, cls, base)
            label, writes, methods = cls, (data,), (m,)
        cases.append(Case(index, label, writes, methods))
    return cases


def _sweep_heads(b: bytes) -> dict[str, Head]:
    """The requests of L{sweep} for one byte C{b}, by place."""
    chat = b'{"model": "sim-small", "messages": [{"role": "user", "content": "hi"}]}'

    def post(target: bytes = b"/v1/chat/completions", ctype: bytes = b"application/json",
             extra: list[list[Any]] | None = None) -> Head:
        return Head(b"POST", target, b"HTTP/1.1",
                    [[b"Host", HOST], [b"Content-Type", ctype], *(extra or []),
                     [b"Content-Length", b"%d" % len(chat)]], chat)

    return {
        "sweep_path": Head(b"GET", b"/v1/mo" + b + b"dels", b"HTTP/1.1", [[b"Host", HOST]]),
        "sweep_query": post(b"/v1/chat/completions?a=" + b),
        "sweep_content_type": post(ctype=b"application/" + b + b"json"),
        "sweep_header_value": post(extra=[[b"X-Fuzz", b"a" + b + b"b"]]),
        "sweep_header_name": post(extra=[[b"X-Fu" + b + b"zz", b"1"]]),
        "sweep_method": Head(b"GE" + b + b"T", b"/v1/chat/completions", b"HTTP/1.1",
                             [[b"Host", HOST]]),
    }


SWEEPS: tuple[str, ...] = tuple(_sweep_heads(b"x"))


def sweep(start: int = 0) -> list[Case]:
    """
    Every byte value (0x00-0xff) in each place of L{SWEEPS} (the path and
    query of a routed request, a C{Content-Type}, another header's value and
    name, the method): deterministic, so no byte is left to chance.
    """
    cases = []
    for value in range(256):
        for name, h in _sweep_heads(bytes([value])).items():
            cases.append(Case(start + len(cases), f"{name}:0x{value:02x}", (h.wire(),),
                              (h.method,)))
    return cases


def all_cases(seed: int, count: int) -> list[Case]:
    """The byte sweep, then C{count} seeded random cases (indices run on)."""
    swept = sweep()
    return swept + [attrs.evolve(c, index=c.index + len(swept)) for c in generate(seed, count)]


# -- reading responses ----------------------------------------------------------------

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9]{2}) [\t\x20-\x7e\x80-\xff]*\Z")
_FIELD = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*\Z")
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(;[\t\x20-\x7e]*)?\Z")


class Malformed(Exception):
    """The bytes a server sent are not a well-formed HTTP/1.1 response."""


@attrs.frozen
class Response:
    """One parsed response."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    #: It answers a HEAD request (so its body is normally empty).
    head: bool = False
    #: A body came with the answer to a HEAD request anyway (before a close).
    head_body: bool = False

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k == name]
        return values[-1] if values else None


def read_responses(data: bytes, closed: bool, methods: Sequence[bytes]
                   ) -> tuple[list[Response], bytes]:
    """
    Parse C{data} as HTTP/1.1 responses, strictly.

    @param closed: the server closed the connection after C{data} (so a
        response without length ends here).
    @param methods: the request methods, in order (for bodiless HEAD answers).
    @return: the complete responses and the bytes left over (a response
        still being received, or nothing).
    @raise Malformed: a status line, header, or framing is not HTTP/1.1.
    """
    out: list[Response] = []
    rest = data
    finals = 0
    while rest:
        end = rest.find(b"\r\n\r\n")
        if end < 0:
            _check_partial_head(rest)
            return out, rest
        lines = rest[:end].split(b"\r\n")
        body_start = end + 4
        m = _STATUS_LINE.match(lines[0])
        if m is None:
            raise Malformed(f"bad status line {lines[0][:120]!r}")
        status = int(m.group(1))
        headers = []
        for line in lines[1:]:
            f = _FIELD.match(line)
            if f is None:
                raise Malformed(f"bad header line {line[:120]!r}")
            headers.append((f.group(1).lower(), f.group(2)))
        cls = [v for k, v in headers if k == b"content-length"]
        tes = [v for k, v in headers if k == b"transfer-encoding"]
        if len(cls) > 1 or (cls and tes):
            raise Malformed(f"conflicting framing headers: CL {cls!r}, TE {tes!r}")
        if tes and [t.lower() for t in tes] != [b"chunked"]:
            raise Malformed(f"transfer-encoding {tes!r}")
        if cls and not cls[0].isdigit():
            raise Malformed(f"content-length {cls[0]!r}")
        head_request = finals < len(methods) and methods[finals] == b"HEAD"
        body_rest = rest[body_start:]
        closing = any(k == b"connection" and v.lower() == b"close" for k, v in headers)
        head_body = False
        if (head_request and cls and closing and status >= 200 and body_rest
                and not body_rest.startswith(b"HTTP/")):
            # A refusal of a head the server could not read as a HEAD request
            # (or one that sends a body to HEAD anyway): the close delimits it.
            n = int(cls[0])
            if len(body_rest) < n:
                return out, rest
            body, rest, head_body = body_rest[:n], body_rest[n:], True
        elif status < 200 or status in (204, 304) or head_request:
            body, rest = b"", body_rest
        elif tes:
            parsed = _read_chunked(body_rest)
            if parsed is None:
                return out, rest
            body, rest = parsed
        elif cls:
            n = int(cls[0])
            if len(body_rest) < n:
                return out, rest
            body, rest = body_rest[:n], body_rest[n:]
        else:
            if not closed:
                return out, rest
            body, rest = body_rest, b""
        out.append(Response(status, tuple(headers), body, head_request, head_body))
        if status >= 200:
            finals += 1
    return out, b""


def _check_partial_head(rest: bytes) -> None:
    """A response head cut short must still start like one."""
    first = rest.split(b"\r\n", 1)[0]
    prefix = b"HTTP/1.1 "
    if not (prefix.startswith(first[:len(prefix)]) or first.startswith(prefix)):
        raise Malformed(f"bytes that are no response: {rest[:120]!r}")


def _read_chunked(data: bytes) -> tuple[bytes, bytes] | None:
    """(body, rest) of a complete chunked body at the start of C{data}, or None if cut short."""
    body = bytearray()
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        m = _CHUNK_LINE.match(data[pos:eol])
        if m is None:
            raise Malformed(f"bad chunk-size line {data[pos:eol][:80]!r}")
        size = int(m.group(1), 16)
        pos = eol + 2
        if size == 0:
            while True:  # trailers, then the empty line
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    return None
                line = data[pos:eol]
                pos = eol + 2
                if not line:
                    return bytes(body), data[pos:]
                if _FIELD.match(line) is None:
                    raise Malformed(f"bad trailer {line[:80]!r}")
        if len(data) < pos + size + 2:
            return None
        body += data[pos:pos + size]
        if data[pos + size:pos + size + 2] != b"\r\n":
            raise Malformed("chunk data not followed by CRLF")
        pos += size + 2


def complete(data: bytes, closed: bool, methods: Sequence[bytes], expected: int) -> bool:
    """Whether C{data} holds C{expected} final responses and nothing more (or is malformed)."""
    try:
        responses, rest = read_responses(data, closed, methods)
    except Malformed:
        return True
    return not rest and sum(1 for r in responses if r.status >= 200) >= expected
