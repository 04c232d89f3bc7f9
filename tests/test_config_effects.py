"""
The C{metrics} and C{logging} settings take effect: C{metrics.enabled},
C{logging.format}, C{logging.level} and C{logging.redact}.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from clawproxy.config import parse_config
from clawproxy.service import Gateway, build_service
from clawproxy.tap import LogLevelFilter


def gateway(testcase: SynchronousTestCase, **sections: Any) -> Gateway:
    """A gateway on a memory reactor with one pool and a route under C{/v1/}."""
    data = {
        "pools": {"main": {"instances": ["http://127.0.0.1:1"],
                           "health_check": {"enabled": False}}},
        "routes": [{"path": "/v1/*", "pool": "main"}],
        "logging": {"output": "off"},
        **sections,
    }
    gw = build_service(parse_config(data, environ={}), MemoryReactorClock())
    testcase.addCleanup(gw.access_log.close)
    return gw


def get(testcase: SynchronousTestCase, resource: Any, path: str,
        headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    client = StubTreq(resource)
    d = client.request("GET", "http://localhost" + path, headers=headers)
    client.flush()
    response = testcase.successResultOf(d)
    body = response.content()
    client.flush()
    return response.code, testcase.successResultOf(body)


class MetricsEnabledTests(SynchronousTestCase):
    """C{metrics.enabled}."""

    def test_on_by_default(self) -> None:
        """By default the admin listener serves C{/metrics}; with C{public} the data plane
        does too."""
        gw = gateway(self, metrics={"public": True})
        code, body = get(self, gw.admin, "/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b"clawproxy_requests_total", body)
        self.assertEqual(get(self, gw.resource, "/metrics")[0], 200)

    def test_off(self) -> None:
        """With C{enabled: false} neither listener serves the metrics page (even with
        C{public}, even at another path); the families still exist inside."""
        for metrics in ({"enabled": False, "public": True},
                        {"enabled": False, "path": "/stats", "public": True}):
            gw = gateway(self, metrics=metrics)
            for resource in (gw.admin, gw.resource):
                code, body = get(self, resource, metrics.get("path", "/metrics"))
                self.assertEqual(code, 404)
                self.assertNotIn(b"clawproxy_requests_total", body)
            self.assertIn(b"clawproxy_requests_total", gw.metrics.render())


class AccessLogTests(SynchronousTestCase):
    """C{logging.format} and C{logging.redact} on the gateway's access log."""

    SECRETS = {"Authorization": "Bearer sk-live-secret", "X-API-Key": "key-secret-1",
               "X-Private": "private-secret"}

    def logged(self, logging: dict[str, Any]) -> str:
        """The access log text after one request carrying credentials."""
        path = self.mktemp()
        gw = gateway(self, logging={"output": path, **logging})
        code, _ = get(self, gw.resource, "/nowhere?api_key=zzz", headers=self.SECRETS)
        self.assertEqual(code, 404)
        gw.access_log.close()
        with open(path) as f:
            return f.read()

    def test_json(self) -> None:
        """The default format is one JSON object per line."""
        (line,) = self.logged({}).splitlines()
        record = json.loads(line)
        self.assertEqual((record["path"], record["status"]), ("/nowhere", 404))

    def test_text(self) -> None:
        """C{format: text} writes a plain line: time, client, method, path, status, ..."""
        (line,) = self.logged({"format": "text"}).splitlines()
        words = line.split(" ")
        self.assertRegex(words[0], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual(words[2:5], ["GET", "/nowhere", "404"])
        self.assertIn("error=route_not_found", words)
        self.assertRaises(ValueError, json.loads, line)

    def test_redact(self) -> None:
        """No header value named by C{redact} (nor any other) appears in the log, in either
        format: the access log records no header values at all."""
        for fmt in ("json", "text"):
            text = self.logged({"format": fmt, "redact": ["Authorization", "X-Private"]})
            self.assertTrue(text)
            for value in [*self.SECRETS.values(), "zzz"]:
                self.assertNotIn(value, text)


class LogLevelTests(SynchronousTestCase):
    """C{logging.level} filters the process's C{twisted.logger} events."""

    def setUp(self) -> None:
        self.publisher = LogPublisher()
        self.events: list[dict[str, Any]] = []
        self.publisher.addObserver(self.events.append)
        self.log = Logger(namespace="clawproxy.test", observer=self.publisher)

    def emit_all(self) -> list[str]:
        del self.events[:]
        for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error):
            self.log.emit(level, level.name)
        return [e["log_format"] for e in self.events]

    def test_levels(self) -> None:
        """While the filter runs, events below the level are dropped; stopped, all pass."""
        self.assertEqual(self.emit_all(), ["debug", "info", "warn", "error"])
        for level, kept in (("debug", ["debug", "info", "warn", "error"]),
                            ("info", ["info", "warn", "error"]),
                            ("warn", ["warn", "error"]), ("error", ["error"])):
            service = LogLevelFilter(level, self.publisher)
            service.privilegedStartService()
            service.startService()
            self.assertEqual(self.emit_all(), kept, level)
            service.stopService()
            self.assertEqual(self.emit_all(), ["debug", "info", "warn", "error"])

    def test_config_level(self) -> None:
        """The level comes from C{logging.level} (C{warning} means C{warn})."""
        config = parse_config({"pools": {"p": {"instances": ["http://h:1"]}},
                               "routes": [{"path": "/"}], "logging": {"level": "warning"}},
                              environ={})
        service = LogLevelFilter(config.logging.level, self.publisher)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(self.emit_all(), ["warn", "error"])

