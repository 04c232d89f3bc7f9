"""Tests for L{clawproxy.web.accesslog}."""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any

import attrs
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from clawproxy.config import parse_config
from clawproxy.service import Gateway
from clawproxy.web.accesslog import AccessLog
from clawproxy.web.context import RequestContext


@attrs.define
class FakeRequest:
    """What the access log reads from a request: its code (and nothing else)."""

    code: int = 200
    requestHeaders: Headers = attrs.Factory(
        lambda: Headers({b"Authorization": [b"Bearer sk-secret"], b"X-API-Key": [b"k-1"]}))


@attrs.define
class Named:
    name: str = ""
    id: str = ""


def context(**kw: Any) -> RequestContext:
    values: dict[str, Any] = {
        "request": FakeRequest(), "request_id": "rid-1", "client_ip": "192.0.2.7",
        "method": b"POST", "path": b"/v1/chat/completions", "query": b"api_key=zzz",
        "started": 10.0,
    }
    values.update(kw)
    return RequestContext(**values)


class RecordTests(SynchronousTestCase):
    """L{AccessLog.record} writes one JSON line per request."""

    def setUp(self) -> None:
        self.out = io.StringIO()
        self.log = AccessLog(self.out, Clock())

    def lines(self) -> list[dict[str, Any]]:
        text = self.out.getvalue()
        self.assertTrue(text.endswith("\n"))
        return [json.loads(line) for line in text.splitlines()]

    def test_fields(self) -> None:
        """A relayed request's line has every field, in a fixed set."""
        ctx = context(route=Named(name="/v1/*"), pool=Named(name="main"),
                      instance=Named(id="gpu-1"), agent_name="finance-agent", status=201,
                      bytes_sent=512, attempts=2, error=None, model="qwen3:8b")
        self.log.record(ctx, 10.25, 1_700_000_000.12345)
        (line,) = self.lines()
        self.assertEqual(line, {
            "ts": 1_700_000_000.123, "request_id": "rid-1", "client": "192.0.2.7",
            "method": "POST", "path": "/v1/chat/completions", "route": "/v1/*",
            "agent": "finance-agent", "pool": "main", "instance": "gpu-1",
            "model": "qwen3:8b", "status": 201,
            "duration_ms": 250.0, "bytes": 512, "attempts": 2, "error": None,
        })

    def test_defaults(self) -> None:
        """Before routing: C{-} for route, pool, instance and agent; the request's code."""
        ctx = context(request=FakeRequest(code=404), error="route_not_found")
        self.log.record(ctx, 10.0, 0.0)
        (line,) = self.lines()
        self.assertEqual((line["route"], line["pool"], line["instance"], line["agent"],
                          line["status"], line["error"], line["attempts"]),
                         ("-", "-", "-", "-", 404, "route_not_found", 0))

    def test_no_secrets(self) -> None:
        """Headers, the query string and bodies are never logged."""
        self.log.record(context(body={"messages": ["hush"]}), 11.0, 0.0)
        text = self.out.getvalue()
        for secret in ("sk-secret", "k-1", "api_key", "zzz", "hush", "Authorization"):
            self.assertNotIn(secret, text)

    def test_one_line_each(self) -> None:
        """Each record is one line, even with odd characters in the path."""
        self.log.record(context(path=b"/a\nb"), 10.0, 0.0)
        self.log.record(context(path=b"/caf\xc3\xa9"), 10.0, 0.0)
        lines = self.lines()
        self.assertEqual([x["path"] for x in lines], ["/a\nb", "/caf\xc3\xa9"])

    def test_off(self) -> None:
        """
        With C{logging.output: off} a gateway still answers requests, and no
        access-log line appears anywhere: not on standard output, not in a
        file (named C{off} or otherwise) in the config's or the working
        directory.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(directory)
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        config = parse_config({
            "pools": {"main": {"instances": [{"id": "a", "url": "http://127.0.0.1:9"}],
                               "health_check": {"enabled": False}}},
            "routes": [{"path": "/v1/*", "pool": "main"}],
            "logging": {"output": "off"},
        }, environ={}, base_dir=directory)
        gateway = Gateway(config, MemoryReactorClock())
        client = StubTreq(gateway.resource)
        for path in ("/health", "/nope"):
            response = self.successResultOf(client.get("http://gw.test" + path))
            self.successResultOf(response.content())
            self.assertEqual(response.code, 200 if path == "/health" else 404)
        gateway.access_log.close()
        self.assertEqual(stdout.getvalue(), "")
        self.assertEqual(os.listdir(directory), [])


class OpenTests(SynchronousTestCase):
    """L{AccessLog.open} picks the output."""

    def test_file(self) -> None:
        """A path is appended to, a line at a time, and closed by L{AccessLog.close}."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('{"old": 1}\n')
        log = AccessLog.open(path, Clock())
        log.record(context(), 10.0, 0.0)
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertEqual(json.loads(lines[1])["request_id"], "rid-1")
        log.close()
        self.assertTrue(log._out.closed)
        self.assertTrue(os.path.exists(path))

    def test_stdout(self) -> None:
        """C{-} is standard output, which L{AccessLog.close} leaves open."""
        log = AccessLog.open("-", Clock())
        self.assertIs(log._out, sys.stdout)
        log.close()
        self.assertFalse(sys.stdout.closed)


class TextTests(SynchronousTestCase):
    """C{logging.format: text}: one plain line per request."""

    def setUp(self) -> None:
        self.out = io.StringIO()
        self.log = AccessLog(self.out, Clock(), text=True)

    def test_fields(self) -> None:
        """The line has the time (UTC), client, method, path, status, duration, bytes and
        the rest as C{name=value} words."""
        ctx = context(route=Named(name="/v1/*"), pool=Named(name="main"),
                      instance=Named(id="gpu-1"), agent_name="finance-agent", status=201,
                      bytes_sent=512, attempts=2)
        self.log.record(ctx, 10.25, 1_700_000_000.12345)
        self.assertEqual(
            self.out.getvalue(),
            "2023-11-14T22:13:20.123Z 192.0.2.7 POST /v1/chat/completions 201 250.0ms 512B"
            " route=/v1/* agent=finance-agent pool=main instance=gpu-1 model=- attempts=2"
            " error=-"
            " request_id=rid-1\n",
        )

    def test_one_line_each(self) -> None:
        """Spaces and control characters in the path are escaped: one request, one line
        of words; headers and the query are not logged."""
        self.log.record(context(path=b"/a b\nc", request=FakeRequest(code=404),
                                error="route_not_found"), 10.0, 0.0)
        (line,) = self.out.getvalue().splitlines()
        self.assertEqual(line.split(" ")[2:5], ["POST", "/a%20b%0Ac", "404"])
        self.assertIn(" route=- agent=- ", line)
        for secret in ("sk-secret", "k-1", "zzz"):
            self.assertNotIn(secret, line)

    def test_open(self) -> None:
        """L{AccessLog.open} with C{format="text"} writes text lines to the file."""
        path = self.mktemp()
        log = AccessLog.open(path, Clock(), "text")
        log.record(context(), 10.0, 0.0)
        log.close()
        with open(path) as f:
            self.assertTrue(f.read().startswith("1970-01-01T00:00:00.000Z 192.0.2.7 POST "))
