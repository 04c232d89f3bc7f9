"""Tests for L{clawproxy.web.admin}: the admin API of SPEC section 5."""

from __future__ import annotations

import json
from typing import Any

import attrs
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from zope.interface import implementer

from clawproxy import __version__
from clawproxy.backends.registry import Registry
from clawproxy.config import ConfigError, StoreConfig, load_config, parse_config
from clawproxy.errors import Rejected
from clawproxy.interfaces import IAdminSection
from clawproxy.metrics import Metrics
from clawproxy.policy.breakers import NoBreakers
from clawproxy.service import build_service
from clawproxy.stores import StoreError, StoreService, StoreUnavailable, build_store
from clawproxy.stores.memory import MemoryStore
from clawproxy.web.admin import AdminResource
from tests.test_metrics import SPEC_FAMILIES

CONFIG = {
    "pools": {
        "main": {"algorithm": "least_connections",
                 "instances": [{"id": "gpu-1", "url": "http://10.0.0.10:11434", "weight": 5},
                               {"id": "gpu-2", "url": "http://10.0.0.11:11434"}],
                 "health_check": {"unhealthy_threshold": 1}},
        "small": {"instances": [{"id": "cpu-1", "url": "http://10.0.0.20:8000"}]},
        "edge": {"instances": [{"id": "edge:1@rack-a", "url": "http://10.0.0.30:8000"}],
                 "health_check": {"enabled": False}},
    },
    "routes": [{"path": "/*", "pool": "main"}],
}


@attrs.define
class Answer:
    code: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None


class AdminHarness:
    """An L{AdminResource} over a registry, behind L{StubTreq}."""

    def __init__(self, testcase: SynchronousTestCase, token: str | None = None,
                 reload: Any = None, sections: Any = ()) -> None:
        self.testcase = testcase
        self.clock = Clock()
        self.clock.advance(1000)
        self.config = parse_config(CONFIG, environ={})
        self.registry = Registry(self.config, self.clock)
        self.metrics = Metrics()
        self.registry.subscribe(self.metrics.instance_changed)
        self.resource = AdminResource(self.registry, self.metrics, NoBreakers(), self.clock,
                                      token, reload=reload, workers=1, sections=sections)
        self.client = StubTreq(self.resource)

    def request(self, method: str, path: str, body: Any = None,
                token: str | None = None, raw: bytes | None = None,
                base: str = "http://127.0.0.1:9901", **extra: str) -> Answer:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers.update({k.replace("_", "-"): v for k, v in extra.items()})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        d = self.client.request(method, base + path, data=data, headers=headers)
        self.client.flush()
        response = self.testcase.successResultOf(d)
        content = response.content()
        self.client.flush()
        return Answer(response.code, response.headers, self.testcase.successResultOf(content))


class StatusTests(SynchronousTestCase):
    """C{GET /admin/status}."""

    def test_shape(self) -> None:
        """The status has the names of SPEC section 2 for the gateway, pools and instances."""
        admin = AdminHarness(self)
        admin.clock.advance(3725)
        answer = admin.request("GET", "/admin/status")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header(b"content-type"), b"application/json")
        status = answer.json()
        self.assertEqual(status["version"], __version__)
        self.assertEqual(status["uptime"], "1h 2m")
        self.assertEqual(status["workers"], 1)
        self.assertEqual(list(status["pools"]), ["main", "small", "edge"])
        main = status["pools"]["main"]
        self.assertEqual(main["algorithm"], "least_connections")
        self.assertEqual([i["id"] for i in main["instances"]], ["gpu-1", "gpu-2"])
        gpu1 = main["instances"][0]
        for key in ("id", "url", "state", "healthy", "weight", "active", "requests",
                    "failures", "success_rate", "breaker", "health"):
            self.assertIn(key, gpu1)
        self.assertEqual(
            {k: gpu1[k] for k in ("id", "url", "state", "healthy", "weight", "active",
                                  "requests", "failures", "success_rate", "breaker",
                                  "health", "drained")},
            {"id": "gpu-1", "url": "http://10.0.0.10:11434", "state": "healthy",
             "healthy": True, "weight": 5.0, "active": 0, "requests": 0, "failures": 0,
             "success_rate": 1.0, "breaker": "CLOSED", "health": {}, "drained": False})

    def test_live_values(self) -> None:
        """The status shows the registry as it is: states, counters and the last health body."""
        admin = AdminHarness(self)
        reg = admin.registry
        gpu1, gpu2 = reg.instance("gpu-1"), reg.instance("gpu-2")
        reg.probe_result(gpu1, True, {"gpu_memory_used_percent": 71})
        gpu1.requests, gpu1.failures, gpu1.active = 8, 2, 3
        reg.probe_result(gpu2, False)
        reg.set_drained("cpu-1", True)
        status = admin.request("GET", "/admin/status").json()
        main = status["pools"]["main"]["instances"]
        self.assertEqual((main[0]["state"], main[0]["requests"], main[0]["failures"],
                          main[0]["active"], main[0]["success_rate"], main[0]["health"]),
                         ("healthy", 8, 2, 3, 0.75, {"gpu_memory_used_percent": 71}))
        self.assertEqual((main[1]["state"], main[1]["healthy"]), ("unhealthy", False))
        cpu = status["pools"]["small"]["instances"][0]
        self.assertEqual((cpu["state"], cpu["drained"]), ("draining", True))


@implementer(IAdminSection)
class CountingSection:
    """A feature's admin section: a counter in the status, endpoints to read and reset it."""

    name = "counting"

    def __init__(self) -> None:
        self.count = 7

    def status(self) -> dict[str, Any]:
        return {"count": self.count}

    def endpoints(self) -> dict[tuple[bytes, bytes], Any]:
        return {(b"GET", b"/admin/counting"): self._get,
                (b"DELETE", b"/admin/counting"): self._reset}

    def _get(self, request: Any) -> Any:
        if request.args.get(b"fail"):
            raise Rejected(400, "asked to fail", "invalid_request_error", "bad_counting")
        return succeed({"count": self.count})

    def _reset(self, request: Any) -> dict[str, Any]:
        self.count = 0
        return {"reset": True}


class SectionTests(SynchronousTestCase):
    """Features show a section in C{/admin/status} and serve endpoints of their own."""

    def test_status_section(self) -> None:
        """A section's status is under its name, next to the core keys."""
        admin = AdminHarness(self, sections=[CountingSection()])
        status = admin.request("GET", "/admin/status").json()
        self.assertEqual(status["counting"], {"count": 7})
        self.assertIn("pools", status)

    def test_endpoints(self) -> None:
        """A section's endpoints answer JSON (sync or Deferred) and refuse in the error shape."""
        section = CountingSection()
        admin = AdminHarness(self, sections=[section])
        self.assertEqual(admin.request("GET", "/admin/counting").json(), {"count": 7})
        answer = admin.request("DELETE", "/admin/counting/")
        self.assertEqual((answer.code, answer.json()), (200, {"reset": True}))
        self.assertEqual(section.count, 0)
        refused = admin.request("GET", "/admin/counting?fail=1")
        self.assertEqual(refused.code, 400)
        self.assertEqual(refused.json()["error"]["code"], "bad_counting")
        self.assertEqual(admin.request("POST", "/admin/counting").code, 404)

    def test_data_plane_files_sections(self) -> None:
        """The data plane files a feature's section under admin_sections, once per name."""
        from clawproxy.web.dataplane import Parts

        parts = Parts()
        section = CountingSection()
        parts.add(section)
        self.assertEqual(parts.admin_sections, [section])
        self.assertRaises(TypeError, parts.add, CountingSection())

    def test_endpoints_need_the_token(self) -> None:
        """A section's endpoints are behind the admin token like the core's."""
        admin = AdminHarness(self, token="s3cret", sections=[CountingSection()])
        self.assertEqual(admin.request("GET", "/admin/counting").code, 401)
        self.assertEqual(admin.request("GET", "/admin/counting", token="s3cret").code, 200)


class StoreStatusTests(SynchronousTestCase):
    """C{GET /admin/status} shows the state store's health under C{"store"}."""

    def test_memory(self) -> None:
        """A memory store is healthy; the other keys of the status stay as they were."""
        admin = AdminHarness(self)
        before = admin.request("GET", "/admin/status").json()
        self.assertNotIn("store", before)
        admin.resource.store = MemoryStore(admin.clock, admin.metrics)
        status = admin.request("GET", "/admin/status").json()
        self.assertEqual(status.pop("store"), {"backend": "memory", "healthy": True,
                                               "latency_ms": 0.0, "errors": 0})
        self.assertEqual(status, before)

    def test_errors_counted(self) -> None:
        """Failed store calls show in C{errors}."""
        admin = AdminHarness(self)
        store = admin.resource.store = MemoryStore(admin.clock, admin.metrics)
        store.set("k", b"text")
        self.failureResultOf(store.incrby("k", 1), StoreError)
        self.assertEqual(admin.request("GET", "/admin/status").json()["store"]["errors"], 1)

    def test_unreachable(self) -> None:
        """A Redis store that cannot be reached shows as unhealthy."""
        admin = AdminHarness(self)
        store = build_store(StoreConfig(backend="redis"), admin.clock, admin.metrics)
        admin.resource.store = store
        self.failureResultOf(store.get("k"), StoreUnavailable)
        self.assertEqual(admin.request("GET", "/admin/status").json()["store"],
                         {"backend": "redis", "healthy": False, "latency_ms": 0.0,
                          "errors": 1})

    def test_gateway(self) -> None:
        """
        The gateway builds its store from C{store}, shows it on its admin status,
        and connects it first and disconnects it last.
        """
        reactor = MemoryReactorClock()
        gateway = build_service(parse_config(CONFIG, environ={}), reactor)
        self.assertIsInstance(gateway.store, MemoryStore)
        self.assertEqual(gateway.admin.status()["store"]["backend"], "memory")
        first = next(iter(gateway))
        self.assertIsInstance(first, StoreService)
        self.assertIs(first.store, gateway.store)
        gateway.startService()
        self.assertTrue(first.running)
        self.successResultOf(gateway.stopService())
        self.assertFalse(first.running)

    def test_reload_keeps_store(self) -> None:
        """
        A reload keeps the store object; changed store settings are logged as
        taking effect at the next restart.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('pools: {main: {instances: [{id: a, url: "http://127.0.0.1:1"}]}}\n'
                    'routes: [{path: /*}]\nlogging: {output: "off"}\n')
        gateway = build_service(load_config(path, environ={}), MemoryReactorClock())
        store = gateway.store
        with open(path, "a") as f:
            f.write('store: {redis: {prefix: "other:"}}\n')
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertEqual(self.successResultOf(gateway.reload()), [])
        self.assertIs(gateway.store, store)
        self.assertIs(gateway.admin.store, store)
        self.assertIn("store settings changed: they take effect when the gateway restarts",
                      [formatEvent(e) for e in events])


class InstanceActionTests(SynchronousTestCase):
    """C{POST /admin/instances/{id}/weight|drain|undrain}."""

    def test_set_weight(self) -> None:
        """A weight is set, answered with the instance, and shown in metrics."""
        admin = AdminHarness(self)
        answer = admin.request("POST", "/admin/instances/gpu-2/weight", {"weight": 0.5})
        self.assertEqual(answer.code, 200)
        self.assertEqual((answer.json()["id"], answer.json()["weight"]), ("gpu-2", 0.5))
        self.assertEqual(admin.registry.instance("gpu-2").base_weight, 0.5)
        self.assertEqual(admin.metrics.registry.get_sample_value(
            "clawproxy_backend_weight", {"pool": "main", "instance": "gpu-2"}), 0.5)

    def test_weight_zero(self) -> None:
        """Weight 0 is allowed: the instance takes no new traffic."""
        admin = AdminHarness(self)
        answer = admin.request("POST", "/admin/instances/gpu-1/weight", {"weight": 0})
        self.assertEqual(answer.code, 200)
        self.assertFalse(admin.registry.instance("gpu-1").available())

    def test_bad_weight(self) -> None:
        """Negative, non-numeric, boolean or missing weights are a 400 and change nothing."""
        admin = AdminHarness(self)
        for body in ({"weight": -1}, {"weight": "2"}, {"weight": True}, {}, {"weight": None}):
            answer = admin.request("POST", "/admin/instances/gpu-1/weight", body)
            self.assertEqual(answer.code, 400, body)
            self.assertEqual(answer.json()["error"]["code"], "invalid_weight")
        self.assertEqual(admin.registry.instance("gpu-1").base_weight, 5.0)

    def test_bad_json(self) -> None:
        """A body that is not a JSON object is a 400 C{invalid_json}."""
        admin = AdminHarness(self)
        for raw in (b"{weight", b"[1]"):
            answer = admin.request("POST", "/admin/instances/gpu-1/weight", raw=raw)
            self.assertEqual(answer.code, 400)
            self.assertEqual(answer.json()["error"]["code"], "invalid_json")

    def test_unknown_instance(self) -> None:
        """An unknown instance id is a 404 for every action."""
        admin = AdminHarness(self)
        for action, body in (("weight", {"weight": 1}), ("drain", None), ("undrain", None)):
            answer = admin.request("POST", f"/admin/instances/nope/{action}", body)
            self.assertEqual(answer.code, 404, action)
            self.assertEqual(answer.json()["error"]["code"], "instance_not_found")

    def test_unknown_action(self) -> None:
        """An unknown action is a 404."""
        admin = AdminHarness(self)
        self.assertEqual(admin.request("POST", "/admin/instances/gpu-1/reboot").code, 404)

    def test_method_not_allowed(self) -> None:
        """Instance actions need POST: other methods are a 405 naming the allowed one."""
        admin = AdminHarness(self)
        for method in ("GET", "PUT", "DELETE"):
            answer = admin.request(method, "/admin/instances/gpu-1/drain")
            self.assertEqual(answer.code, 405, method)
            self.assertEqual(answer.json()["error"]["code"], "method_not_allowed")
            self.assertEqual(answer.header(b"allow"), b"POST")
        self.assertFalse(admin.registry.instance("gpu-1").drained)

    def test_drain_undrain(self) -> None:
        """Drain stops new traffic (state C{draining}); undrain resumes it."""
        admin = AdminHarness(self)
        answer = admin.request("POST", "/admin/instances/gpu-1/drain")
        self.assertEqual((answer.code, answer.json()["state"], answer.json()["drained"]),
                         (200, "draining", True))
        self.assertFalse(admin.registry.instance("gpu-1").available())
        answer = admin.request("POST", "/admin/instances/gpu-1/undrain")
        self.assertEqual((answer.code, answer.json()["state"]), (200, "healthy"))
        self.assertTrue(admin.registry.instance("gpu-1").available())

    def test_quoted_id(self) -> None:
        """
        An id with C{:} or C{@} (allowed in ids) is found when percent-encoded,
        as C{clawproxy drain} sends it.
        """
        admin = AdminHarness(self)
        answer = admin.request("POST", "/admin/instances/edge%3A1%40rack-a/drain")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json()["id"], "edge:1@rack-a")
        self.assertTrue(admin.registry.instance("edge:1@rack-a").drained)


class TokenTests(SynchronousTestCase):
    """With C{admin.token} set every call needs C{Authorization: Bearer TOKEN}."""

    def test_missing(self) -> None:
        """No token: 401 with C{WWW-Authenticate: Bearer}, and nothing done."""
        admin = AdminHarness(self, token="s3cret")
        for method, path in (("GET", "/admin/status"), ("GET", "/metrics"),
                             ("POST", "/admin/instances/gpu-1/drain")):
            answer = admin.request(method, path)
            self.assertEqual(answer.code, 401, path)
            self.assertTrue(answer.header(b"www-authenticate").startswith(b"Bearer"))
            self.assertEqual(answer.json()["error"]["code"], "invalid_admin_token")
        self.assertFalse(admin.registry.instance("gpu-1").drained)

    def test_wrong(self) -> None:
        """A wrong token, or the right one in another scheme, is a 401."""
        admin = AdminHarness(self, token="s3cret")
        self.assertEqual(admin.request("GET", "/admin/status", token="guess").code, 401)
        d = admin.client.get("http://127.0.0.1:9901/admin/status",
                             headers={"Authorization": "Basic s3cret"})
        admin.client.flush()
        self.assertEqual(self.successResultOf(d).code, 401)

    def test_right(self) -> None:
        """The right token is accepted everywhere."""
        admin = AdminHarness(self, token="s3cret")
        self.assertEqual(admin.request("GET", "/admin/status", token="s3cret").code, 200)
        self.assertEqual(admin.request("POST", "/admin/instances/gpu-1/drain",
                                       token="s3cret").code, 200)
        self.assertEqual(admin.request("GET", "/metrics", token="s3cret").code, 200)

    def test_no_token_configured(self) -> None:
        """Without a token configured no credentials are needed."""
        admin = AdminHarness(self, token=None)
        self.assertEqual(admin.request("GET", "/admin/status").code, 200)


class BrowserTests(SynchronousTestCase):
    """
    Web pages cannot drive the admin API (CSRF, DNS rebinding: issue 7,
    failure 7). Without a token, a request whose C{Host} is not a loopback
    name or address, or that carries C{Origin} or C{Sec-Fetch-Site:
    cross-site}/C{same-site}, is refused (403, nothing done); with a token,
    state-changing calls from a browser page are refused too.
    """

    def assertRefused(self, answer: Answer) -> None:
        self.assertEqual(answer.code, 403)
        self.assertEqual(answer.header(b"content-type"), b"application/json")
        self.assertEqual(answer.json()["error"]["type"], "permission_error")

    def test_foreign_host(self) -> None:
        """A DNS-rebound page (C{Host: evil.example}) can neither drain nor read."""
        admin = AdminHarness(self)
        for host in ("evil.example:9901", "evil.example", "127.0.0.1.evil.example:9901",
                     "10.0.0.1:9901", "localhost.evil:9901", "[::2]:9901", "[::1]x",
                     "127.0.0.1:x", "127.1", ""):
            self.assertRefused(admin.request("POST", "/admin/instances/gpu-1/drain",
                                             Host=host))
            self.assertRefused(admin.request("GET", "/admin/status", Host=host))
        self.assertRefused(admin.request("GET", "/admin/status", base="http://evil.example"))
        self.assertFalse(admin.registry.instance("gpu-1").drained)

    def test_loopback_hosts(self) -> None:
        """C{localhost}, 127.0.0.0/8 and C{[::1]}, with or without a port, are served."""
        admin = AdminHarness(self)
        for host in ("localhost:9901", "LOCALHOST", "127.0.0.1", "127.3.2.1:80",
                     "[::1]:9901", "[::1]"):
            self.assertEqual(admin.request("GET", "/admin/status", Host=host).code, 200, host)
        self.assertEqual(admin.request("GET", "/admin/status", base="http://localhost").code,
                         200)

    def test_origin(self) -> None:
        """
        A cross-origin C{text/plain} form POST carries C{Origin}: refused, and
        the instance is not drained; any C{Origin} (a loopback one too) is.
        """
        admin = AdminHarness(self)
        for origin in ("http://evil.example", "null", "http://127.0.0.1:9901"):
            answer = admin.request("POST", "/admin/instances/gpu-1/drain", raw=b"x=1",
                                   Origin=origin, Content_Type="text/plain")
            self.assertRefused(answer)
        self.assertRefused(admin.request("POST", "/admin/instances/gpu-1/weight",
                                         {"weight": 0}, Origin="http://evil.example"))
        self.assertRefused(admin.request("POST", "/admin/reload", Origin="http://evil.example"))
        self.assertFalse(admin.registry.instance("gpu-1").drained)
        self.assertEqual(admin.registry.instance("gpu-1").base_weight, 5)

    def test_fetch_metadata(self) -> None:
        """
        C{Sec-Fetch-Site: cross-site} or C{same-site} is refused; C{none} (the
        operator typing the URL) and C{same-origin} are served.
        """
        admin = AdminHarness(self)
        for site in ("cross-site", "same-site"):
            self.assertRefused(admin.request("POST", "/admin/instances/gpu-1/drain",
                                             Sec_Fetch_Site=site))
        self.assertFalse(admin.registry.instance("gpu-1").drained)
        for site in ("none", "same-origin"):
            self.assertEqual(admin.request("GET", "/admin/status", Sec_Fetch_Site=site).code,
                             200)

    def test_with_token(self) -> None:
        """
        With a token any Host is served (the listener may be remote), but a
        browser-sent state-changing call is refused even with the token;
        reads from a browser are served.
        """
        admin = AdminHarness(self, token="s3cret")
        answer = admin.request("GET", "/admin/status", token="s3cret", base="http://gw.example")
        self.assertEqual(answer.code, 200)
        self.assertRefused(admin.request("POST", "/admin/instances/gpu-1/drain", token="s3cret",
                                         Origin="http://evil.example"))
        self.assertRefused(admin.request("POST", "/admin/instances/gpu-1/drain", token="s3cret",
                                         Sec_Fetch_Site="cross-site"))
        self.assertFalse(admin.registry.instance("gpu-1").drained)
        self.assertEqual(admin.request("GET", "/admin/status", token="s3cret",
                                       Origin="http://evil.example").code, 200)
        self.assertEqual(admin.request("POST", "/admin/instances/gpu-1/drain",
                                       base="http://evil.example").code, 401)


class AdminListenConfigTests(SynchronousTestCase):
    """C{admin.listen} beyond loopback needs C{admin.token}."""

    def errors(self, admin: dict[str, Any]) -> list[str]:
        try:
            parse_config({**CONFIG, "admin": admin}, environ={})
        except ConfigError as e:
            return e.errors
        return []

    def test_all_interfaces_without_token(self) -> None:
        """C{tcp:9901} (every interface) without a token is a config error naming the key."""
        for listen in ("tcp:9901", "tcp:9901:interface=0.0.0.0", "tcp6:9901",
                       "tcp:9901:interface=10.0.0.5", "tcp6:9901:interface=\\:\\:",
                       "ssl:9901:privateKey=k.pem", "systemd:domain=INET:index=0"):
            [error] = self.errors({"listen": listen})
            self.assertTrue(error.startswith("admin.listen: "), error)
            self.assertIn("admin.token", error)

    def test_loopback_or_token(self) -> None:
        """Loopback addresses, unix sockets, or any address with a token, are fine."""
        for listen in ("tcp:9901:interface=127.0.0.1", "tcp:0:interface=127.0.0.2",
                       "tcp:9901:interface=localhost", "tcp6:9901:interface=\\:\\:1",
                       "tcp6:port=9901:interface=\\:\\:1", "unix:/run/clawproxy-admin.sock"):
            self.assertEqual(self.errors({"listen": listen}), [], listen)
        self.assertEqual(self.errors({"listen": "tcp:9901", "token": "s3cret"}), [])


class MetricsEndpointTests(SynchronousTestCase):
    """C{GET /metrics} on the admin listener."""

    def test_every_family_listed(self) -> None:
        """Every SPEC section 7 family is listed with its type, even at zero."""
        admin = AdminHarness(self)
        answer = admin.request("GET", "/metrics")
        self.assertEqual(answer.code, 200)
        self.assertTrue(answer.header(b"content-type").startswith(b"text/plain"))
        text = answer.body.decode()
        for name, kind in SPEC_FAMILIES:
            self.assertIn(f"# TYPE clawproxy_{name} {kind}\n", text)

    def test_instance_gauges(self) -> None:
        """Instances appear in C{backend_up} and C{backend_weight} from the start."""
        admin = AdminHarness(self)
        text = admin.request("GET", "/metrics").body.decode()
        self.assertIn('clawproxy_backend_up{instance="gpu-1",pool="main"} 1.0', text)
        self.assertIn('clawproxy_backend_weight{instance="gpu-1",pool="main"} 5.0', text)
        self.assertIn('clawproxy_backend_up{instance="cpu-1",pool="small"} 1.0', text)


class OtherEndpointTests(SynchronousTestCase):
    """Breakers, reload, health and unknown paths."""

    def test_breaker(self) -> None:
        """C{/health/circuit-breaker/NAME} describes a pool's or an instance's breaker."""
        admin = AdminHarness(self)
        for name in ("main", "main/gpu-1"):
            answer = admin.request("GET", f"/health/circuit-breaker/{name}")
            self.assertEqual(answer.code, 200)
            self.assertEqual(answer.json(), {"name": name, "state": "CLOSED",
                                             "failure_count": 0, "success_count": 0,
                                             "last_failure_time": None})

    def test_unknown_breaker(self) -> None:
        """An unknown breaker name is a 404."""
        admin = AdminHarness(self)
        self.assertEqual(admin.request("GET", "/health/circuit-breaker/nope").code, 404)

    def test_reload_not_available(self) -> None:
        """Without a config file to reload, C{POST /admin/reload} is a 501."""
        admin = AdminHarness(self)
        self.assertEqual(admin.request("POST", "/admin/reload").code, 501)

    def test_reload(self) -> None:
        """A successful reload answers C{{"reloaded": true}} once it is done."""
        pending: list[Deferred[list[str]]] = []

        def reload() -> Deferred[list[str]]:
            pending.append(Deferred())
            return pending[-1]

        admin = AdminHarness(self, reload=reload)
        d = admin.client.post("http://127.0.0.1:9901/admin/reload")
        admin.client.flush()
        self.assertNoResult(d)
        pending[0].callback([])
        admin.client.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.successResultOf(response.json()), {"reloaded": True})

    def test_reload_errors(self) -> None:
        """A bad config on reload answers 400 with the errors."""
        admin = AdminHarness(
            self, reload=lambda: succeed(["pools.main.instances[0].weight: must be >= 0"]))
        answer = admin.request("POST", "/admin/reload")
        self.assertEqual(answer.code, 400)
        error = answer.json()["error"]
        self.assertEqual(error["code"], "invalid_config")
        self.assertIn("pools.main.instances[0].weight: must be >= 0", error["message"])

    def test_health(self) -> None:
        """C{/admin/health} says the admin listener is up."""
        admin = AdminHarness(self)
        answer = admin.request("GET", "/admin/health")
        self.assertEqual(answer.json(), {"status": "ok", "version": __version__})

    def test_unknown_path(self) -> None:
        """Anything else is a JSON 404."""
        admin = AdminHarness(self)
        answer = admin.request("GET", "/admin/nothing")
        self.assertEqual(answer.code, 404)
        self.assertEqual(answer.json()["error"]["code"], "not_found")
