"""Tests for L{clawproxy.cli}, the C{clawproxy} console script."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import sys
import textwrap
import urllib.error
import urllib.request
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from clawproxy import cli

GOOD = """\
server:
  listen: ["tcp:8080"]
pools:
  main:
    algorithm: least_connections
    instances:
      - {id: a, url: "http://127.0.0.1:9000"}
routes:
  - {path: /v1/*, pool: main}
"""

BAD = """\
pools:
  main:
    instances:
      - {id: a, url: "ftp://x", weight: -2}
routes:
  - {path: /v1/*, pool: elsewhere}
"""

STATUS = {
    "version": "0.1.0", "uptime": "2h 15m", "workers": 1,
    "pools": {
        "main": {"algorithm": "round_robin", "instances": [
            {"id": "gpu-1", "url": "http://10.0.0.10:11434", "state": "healthy",
             "healthy": True, "weight": 5.0, "active": 3, "requests": 1200, "failures": 6,
             "success_rate": 0.995, "breaker": "CLOSED",
             "health": {"gpu_memory_used_percent": 71.5}},
            {"id": "gpu-2", "url": "http://10.0.0.11:11434", "state": "draining",
             "healthy": True, "weight": 0.5, "active": 0, "requests": 0, "failures": 0,
             "success_rate": 1.0, "breaker": "OPEN", "health": {}},
        ]},
    },
}


class FakeResponse(io.BytesIO):
    """What C{urlopen} returns: a readable body usable as a context manager."""


class CLITestCase(SynchronousTestCase):
    """Runs L{cli.main} with captured output and a clean environment."""

    def setUp(self) -> None:
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)
        for name in ("CLAWPROXY_ADMIN", "CLAWPROXY_ADMIN_TOKEN"):
            if name in os.environ:
                self.addCleanup(os.environ.__setitem__, name, os.environ.pop(name))
        self.calls: list[urllib.request.Request] = []

    def run_cli(self, *argv: str) -> int:
        return cli.main(list(argv))

    def answer_with(self, body: Any = None, error: Exception | None = None) -> None:
        """Make C{urlopen} record each request and answer C{body} (or raise C{error})."""

        def urlopen(request: urllib.request.Request, timeout: float = 0) -> FakeResponse:
            self.calls.append(request)
            if error is not None:
                raise error
            return FakeResponse(json.dumps(body).encode())

        self.patch(cli.urllib.request, "urlopen", urlopen)

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path


class HashKeyTests(CLITestCase):
    """C{clawproxy hash-key KEY}."""

    def test_format(self) -> None:
        """It prints C{sha256:} and the lowercase hex SHA-256 of the key, exit 0."""
        self.assertEqual(self.run_cli("hash-key", "s3cret-key"), 0)
        out = self.stdout.getvalue()
        self.assertEqual(out, "sha256:" + hashlib.sha256(b"s3cret-key").hexdigest() + "\n")
        self.assertRegex(out.strip(), r"^sha256:[0-9a-f]{64}$")

    def test_unicode(self) -> None:
        """Keys are hashed as UTF-8."""
        self.run_cli("hash-key", "clé")
        self.assertEqual(self.stdout.getvalue().strip(),
                         "sha256:" + hashlib.sha256("clé".encode()).hexdigest())


class CheckConfigTests(CLITestCase):
    """C{clawproxy check-config FILE}."""

    def test_valid(self) -> None:
        """A valid file: exit 0, C{FILE: OK} and a summary on stdout, nothing on stderr."""
        path = self.write(GOOD)
        self.assertEqual(self.run_cli("check-config", path), 0)
        lines = self.stdout.getvalue().splitlines()
        self.assertEqual(lines[0], f"{path}: OK")
        self.assertIn("  main: 1 instance, least_connections, openai", lines)
        self.assertIn("routes: 1", lines)
        self.assertEqual(self.stderr.getvalue(), "")

    def test_invalid(self) -> None:
        """A bad file: exit 1, every error as C{path.to.key: message} on stderr."""
        path = self.write(BAD)
        self.assertEqual(self.run_cli("check-config", path), 1)
        self.assertEqual(self.stdout.getvalue(), "")
        lines = self.stderr.getvalue().splitlines()
        self.assertGreaterEqual(len(lines), 3, lines)
        for line in lines:
            self.assertRegex(line, r"^[\w.\[\]-]+: \S")
        keys = [line.split(":")[0] for line in lines]
        self.assertIn("pools.main.instances[0].weight", keys)
        self.assertIn("pools.main.instances[0].url", keys)
        self.assertIn("routes[0].pool", keys)

    def test_missing_file(self) -> None:
        """A file that cannot be read: exit 1 with one line naming it."""
        path = self.mktemp()
        self.assertEqual(self.run_cli("check-config", path), 1)
        lines = self.stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 1)
        self.assertIn(path, lines[0])

    def test_shipped_config(self) -> None:
        """The shipped C{etc/gateway.yaml} is valid."""
        path = os.path.join(os.path.dirname(__file__), "..", "etc", "gateway.yaml")
        self.assertEqual(self.run_cli("check-config", path), 0, self.stderr.getvalue())


class FormatStatusTests(SynchronousTestCase):
    """L{cli.format_status} renders C{/admin/status} as a table."""

    def test_table(self) -> None:
        """One line of summary, a header and a row per instance, in aligned columns."""
        lines = cli.format_status(STATUS).splitlines()
        self.assertEqual(lines[0], "clawproxy 0.1.0  up 2h 15m  workers 1")
        self.assertEqual(lines[1].split(), ["POOL", "INSTANCE", "STATE", "WEIGHT", "ACTIVE",
                                            "REQUESTS", "SUCCESS", "BREAKER", "GPU%"])
        self.assertEqual(lines[2].split(), ["main", "gpu-1", "healthy", "5", "3", "1200",
                                            "99.5%", "CLOSED", "71.5"])
        self.assertEqual(lines[3].split(), ["main", "gpu-2", "draining", "0.5", "0", "0",
                                            "100.0%", "OPEN", "-"])
        self.assertEqual(len(lines), 4)
        column = lines[1].index("STATE")
        self.assertEqual(lines[2][column:column + 7], "healthy")
        self.assertEqual(lines[3][column:column + 8], "draining")

    def test_sections(self) -> None:
        """Features' sections print after the table, by their formatter or as key: value."""
        status = dict(STATUS, store={"backend": "memory", "healthy": True}, queue=[1])
        self.patch(cli, "SECTION_FORMATS",
                   {"store": lambda name, s: [f"store {s['backend']}"]})
        lines = cli.format_status(status).splitlines()
        self.assertEqual(lines[4:], ["", "store memory", "", "queue: [1]"])
        self.patch(cli, "SECTION_FORMATS", {})
        lines = cli.format_status(status).splitlines()
        self.assertEqual(lines[4:], ["", "store:", '  backend: "memory"', "  healthy: true",
                                     "", "queue: [1]"])

    def test_models_section(self) -> None:
        """The models section: one line per pool, then the fallback chains."""
        models = {
            "pools": {
                "big": {"declared": ["qwen3:*"], "discovered": [f"m{n}" for n in range(10)],
                        "sessions": 3, "ttfb_ms": {"gpu-1": 12.5, "gpu-2": 40.0}},
                "litellm": {"declared": [], "discovered": []},
            },
            "aliases": {},
            "fallbacks": {"qwen3:32b": ["qwen3:14b", "qwen3:8b"]},
        }
        lines = cli.format_status(dict(STATUS, models=models)).splitlines()
        self.assertEqual(lines[4:], [
            "",
            "models:",
            "  big  declared qwen3:*  discovered m0, m1, m2, m3, m4, m5, m6, m7 (+2)"
            "  sessions 3  ttfb gpu-1 12.5ms, gpu-2 40ms",
            "  litellm  declared -  discovered -",
            "  fallback qwen3:32b -> qwen3:14b -> qwen3:8b",
        ])
    def test_tokens_section(self) -> None:
        """The C{tokens} section prints tokens/s and totals per pool."""
        status = dict(STATUS, tokens={"pools": {"main": {
            "tokens_per_second": 12.5, "prompt_tokens": 300, "completion_tokens": 750}}})
        lines = cli.format_status(status).splitlines()
        self.assertEqual(lines[5].split(), ["TOKENS", "POOL", "TOK/S", "(1m)", "PROMPT",
                                            "COMPLETION"])
        self.assertEqual(lines[6].split(), ["main", "12.5", "300", "750"])

    def test_no_pools(self) -> None:
        """With no pools only the summary and header are shown."""
        lines = cli.format_status({"version": "x", "uptime": "1s", "pools": {}}).splitlines()
        self.assertEqual(len(lines), 2)


class AdminCommandTests(CLITestCase):
    """C{status}, C{set-weight}, C{drain}, C{undrain} against the admin API."""

    def test_status(self) -> None:
        """C{status} prints the table; C{--json} the raw answer."""
        self.answer_with(STATUS)
        self.assertEqual(self.run_cli("status", "--admin", "http://gw:9901"), 0)
        self.assertIn("gpu-2", self.stdout.getvalue())
        self.assertEqual(self.calls[0].full_url, "http://gw:9901/admin/status")
        self.assertEqual(self.calls[0].get_method(), "GET")
        self.stdout.truncate(0)
        self.stdout.seek(0)
        self.assertEqual(self.run_cli("status", "--json"), 0)
        self.assertEqual(json.loads(self.stdout.getvalue()), STATUS)
        self.assertEqual(self.calls[1].full_url, "http://127.0.0.1:9901/admin/status")

    def test_set_weight(self) -> None:
        """C{set-weight} POSTs the weight as JSON, with the token, and prints the result."""
        self.answer_with({"id": "gpu:1", "weight": 0.5, "state": "healthy"})
        code = self.run_cli("set-weight", "gpu:1", "0.5", "--token", "t0k")
        self.assertEqual(code, 0)
        self.assertEqual(self.stdout.getvalue(), "gpu:1: weight 0.5\n")
        (call,) = self.calls
        self.assertEqual(call.get_method(), "POST")
        self.assertEqual(call.full_url, "http://127.0.0.1:9901/admin/instances/gpu%3A1/weight")
        self.assertEqual(json.loads(call.data), {"weight": 0.5})
        self.assertEqual(call.get_header("Authorization"), "Bearer t0k")

    def test_negative_weight(self) -> None:
        """A negative weight is refused locally, exit 2, without calling the gateway."""
        self.answer_with({})
        self.assertEqual(self.run_cli("set-weight", "gpu-1", "-1"), 2)
        self.assertEqual(self.calls, [])
        self.assertIn("weight must be >= 0", self.stderr.getvalue())

    def test_drain_undrain(self) -> None:
        """C{drain} and C{undrain} POST to their endpoints and print the new state."""
        self.answer_with({"id": "gpu-1", "state": "draining"})
        self.assertEqual(self.run_cli("drain", "gpu-1"), 0)
        self.answer_with({"id": "gpu-1", "state": "healthy"})
        self.assertEqual(self.run_cli("undrain", "gpu-1"), 0)
        self.assertEqual(self.stdout.getvalue(), "gpu-1: draining\ngpu-1: healthy\n")
        self.assertEqual([c.full_url.rsplit("/", 1)[1] for c in self.calls],
                         ["drain", "undrain"])

    def test_environment(self) -> None:
        """C{$CLAWPROXY_ADMIN} and C{$CLAWPROXY_ADMIN_TOKEN} are the defaults."""
        os.environ["CLAWPROXY_ADMIN"] = "http://10.1.1.1:7000/"
        os.environ["CLAWPROXY_ADMIN_TOKEN"] = "envtok"
        self.addCleanup(os.environ.pop, "CLAWPROXY_ADMIN")
        self.addCleanup(os.environ.pop, "CLAWPROXY_ADMIN_TOKEN")
        self.answer_with(STATUS)
        self.run_cli("status")
        self.assertEqual(self.calls[0].full_url, "http://10.1.1.1:7000/admin/status")
        self.assertEqual(self.calls[0].get_header("Authorization"), "Bearer envtok")

    def test_refused(self) -> None:
        """An error answer: exit 1 with one line giving the status and the message."""
        body = io.BytesIO(json.dumps({"error": {"message": "admin token required",
                                                "type": "authentication_error",
                                                "code": "invalid_admin_token"}}).encode())
        error = urllib.error.HTTPError("http://x/admin/status", 401, "Unauthorized", {}, body)
        self.answer_with(error=error)
        self.assertEqual(self.run_cli("status"), 1)
        lines = self.stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 1)
        self.assertIn("401", lines[0])
        self.assertIn("admin token required", lines[0])
        self.assertEqual(self.stdout.getvalue(), "")

    def test_not_json(self) -> None:
        """An answer that is not JSON: exit 1 with one line."""

        def urlopen(request: Any, timeout: float = 0) -> FakeResponse:
            return FakeResponse(b"<html>")

        self.patch(cli.urllib.request, "urlopen", urlopen)
        self.assertEqual(self.run_cli("drain", "a"), 1)
        self.assertEqual(len(self.stderr.getvalue().splitlines()), 1)


class UnreachableTests(CLITestCase):
    """Admin commands against an address nobody listens on (a real loopback socket)."""

    def refusing_port(self) -> int:
        """A loopback port bound but never listening, for the whole test: it refuses."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.addCleanup(s.close)
        return s.getsockname()[1]

    def test_unreachable(self) -> None:
        """Each admin command exits 1 with one line saying the gateway cannot be reached."""
        url = f"http://127.0.0.1:{self.refusing_port()}"
        for argv in (["status"], ["set-weight", "a", "1"], ["drain", "a"], ["undrain", "a"]):
            self.stderr.truncate(0)
            self.stderr.seek(0)
            self.assertEqual(self.run_cli(*argv, "--admin", url), 1, argv)
            lines = self.stderr.getvalue().splitlines()
            self.assertEqual(len(lines), 1, lines)
            self.assertIn("cannot reach", lines[0])
            self.assertIn(url, lines[0])
        self.assertEqual(self.stdout.getvalue(), "")
