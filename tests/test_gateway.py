"""
Tests for L{clawproxy.web.gateway} with L{clawproxy.web.relay}: a
L{GatewayResource} driven by L{StubTreq}, relaying through a
L{RequestTraversalAgent} to a fake backend, all on a fake clock.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from clawproxy import __version__
from clawproxy.backends.registry import L4_RETRY_INTERVAL
from clawproxy.config import parse_config
from clawproxy.metrics import Metrics
from clawproxy.web.accesslog import AccessLog
from clawproxy.web.dataplane import build_data_plane
from clawproxy.web.gateway import format_uptime
from tests.test_availability import TrialBreakers


@attrs.define
class Seen:
    """One request as the fake backend received it."""

    instance: str
    method: bytes
    uri: bytes
    headers: Headers
    body: bytes


class Backend(Resource):
    """
    The upstream of every instance. The C{Host} header the relay sends
    (C{a.test:8000} for instance C{a}) says which instance is asked; each
    instance's status, extra headers and hanging can be set.

    Answers are JSON C{{"instance": ID, "uri": URI}} unless C{body} is set.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.status: dict[str, int] = {}
        self.headers: dict[str, list[tuple[bytes, bytes]]] = {}
        self.body: dict[str, bytes] = {}
        self.hang: set[str] = set()
        self.hanging: list[Any] = []

    def render(self, request: Any) -> Any:
        host = request.getHeader(b"host") or b"?"
        inst = host.split(b".")[0].decode()
        self.seen.append(Seen(inst, request.method, request.uri,
                              request.requestHeaders.copy(), request.content.read()))
        if inst in self.hang:
            self.hanging.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.status.get(inst, 200))
        request.setHeader(b"content-type", b"application/json")
        for name, value in self.headers.get(inst, ()):
            request.responseHeaders.addRawHeader(name, value)
        return self.body.get(inst) or json.dumps(
            {"instance": inst, "uri": request.uri.decode()}).encode()

    def instances(self) -> list[str]:
        """The instance asked by each request, in order."""
        return [s.instance for s in self.seen]


class RefusingAgent:
    """Wrap an agent: requests to the hosts in C{refuse} fail to connect."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.refuse: set[bytes] = set()

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> Deferred[Any]:
        host = uri.split(b"/")[2]
        if host in self.refuse:
            return fail(ConnectionRefusedError("refused"))
        return self.agent.request(method, uri, headers, bodyProducer)


@attrs.define
class Answer:
    """What a client saw."""

    code: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode())
        return values[-1].decode("latin-1") if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def two_instance_pool(**extra: Any) -> dict[str, Any]:
    """Pool settings with instances C{a} and C{b}."""
    pool: dict[str, Any] = {
        "instances": [{"id": "a", "url": "http://a.test:8000"},
                      {"id": "b", "url": "http://b.test:8000"}],
        "health_check": {"enabled": False},
    }
    pool.update(extra)
    return pool


class Harness:
    """
    A data plane built as L{clawproxy.service.Gateway} builds it
    (L{build_data_plane}), over a fake backend and a fake clock.

    @param extra: more data-plane parts (stages, filters, observers).
    """

    def __init__(self, testcase: SynchronousTestCase, config: dict[str, Any],
                 wrap_agent: Callable[[Any], Any] | None = None,
                 wrap_root: Callable[[Resource], Resource] | None = None,
                 backend: Resource | None = None, breakers: Any = None,
                 extra: Sequence[Any] = (), store: Any = None) -> None:
        self.testcase = testcase
        self.config = parse_config(config, environ={})
        self.clock = Clock()
        self.backend = Backend() if backend is None else backend
        self.upstream = RequestTraversalAgent(self.backend)
        self.agent = wrap_agent(self.upstream) if wrap_agent else self.upstream
        self.metrics = Metrics()
        self.log = io.StringIO()
        self.access_log = AccessLog(self.log, self.clock)
        self.plane = build_data_plane(
            self.config, self.clock, self.agent, self.metrics, self.access_log,
            breakers=breakers, extra=extra, store=store,
        )
        self.registry = self.plane.registry
        self.relay = self.plane.relay
        self.resource = self.plane.resource
        self.root = wrap_root(self.resource) if wrap_root else self.resource
        self.clients: list[StubTreq] = []

    def flush(self) -> None:
        for _ in range(4):
            for client in self.clients:
                client.flush()
            self.upstream.flush()

    def start(self, method: str, path: str | bytes, body: Any = None,
              headers: dict[str, Any] | None = None, **kw: Any) -> Deferred[Any]:
        """Send a request; the Deferred fires with the response (or not yet)."""
        url = (b"http://gw.test" + path) if isinstance(path, bytes) else "http://gw.test" + path
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        # A new client each time: no cookie jar carries state between requests.
        client = StubTreq(self.root)
        self.clients.append(client)
        d = client.request(method, url, data=body, headers=headers, **kw)
        self.flush()
        return d

    def finish(self, d: Deferred[Any]) -> Answer:
        """The answer of a started request, read in full."""
        self.flush()
        response = self.testcase.successResultOf(d)
        body = response.content()
        self.flush()
        return Answer(response.code, response.headers, self.testcase.successResultOf(body))

    def request(self, method: str, path: str | bytes, body: Any = None,
                headers: dict[str, Any] | None = None, **kw: Any) -> Answer:
        return self.finish(self.start(method, path, body, headers, **kw))

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines()]

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value("clawproxy_" + name, labels)


def basic(**pool: Any) -> dict[str, Any]:
    """Pool C{main} (instances a, b) behind a catch-all route."""
    return {"pools": {"main": two_instance_pool(**pool)},
            "routes": [{"path": "/v1/*", "pool": "main"}]}


class ForwardingTests(SynchronousTestCase):
    """What the upstream receives."""

    def test_method_path_query_body(self) -> None:
        """Method, path, query and body reach the instance; its answer reaches the client."""
        gw = Harness(self, basic())
        answer = gw.request("POST", "/v1/chat/completions?stream=false&x=%20y",
                            {"model": "m", "messages": []})
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json(), {"instance": "a",
                                         "uri": "/v1/chat/completions?stream=false&x=%20y"})
        (seen,) = gw.backend.seen
        self.assertEqual((seen.method, seen.uri),
                         (b"POST", b"/v1/chat/completions?stream=false&x=%20y"))
        self.assertEqual(json.loads(seen.body), {"model": "m", "messages": []})
        self.assertEqual(seen.headers.getRawHeaders(b"host"), [b"a.test:8000"])
        self.assertEqual(seen.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(gw.clock.getDelayedCalls(), [])

    def test_other_methods(self) -> None:
        """GET, PUT and DELETE are relayed as such, without a body when there is none."""
        gw = Harness(self, basic())
        for method in ("GET", "PUT", "DELETE"):
            self.assertEqual(gw.request(method, "/v1/things/1").code, 200)
        self.assertEqual([(s.method, s.body) for s in gw.backend.seen],
                         [(b"GET", b""), (b"PUT", b""), (b"DELETE", b"")])

    def test_instance_url_path(self) -> None:
        """The forwarded path is appended to the instance URL's own path."""
        config = basic()
        config["pools"]["main"]["instances"] = [{"id": "a", "url": "http://a.test:8000/llm"}]
        gw = Harness(self, config)
        gw.request("GET", "/v1/models/x")
        self.assertEqual(gw.backend.seen[0].uri, b"/llm/v1/models/x")

    def test_canonical_path_forwarded(self) -> None:
        """Dot segments and double slashes are resolved before matching and forwarding."""
        gw = Harness(self, basic())
        answer = gw.request("GET", b"/v1/a//b/./../c/%7Ed")
        self.assertEqual(answer.code, 200)
        self.assertEqual(gw.backend.seen[0].uri, b"/v1/a/c/~d")

    def test_dot_segments_cannot_escape_route(self) -> None:
        """C{/v1/../admin} is C{/admin}: no route, nothing forwarded."""
        gw = Harness(self, basic())
        answer = gw.request("GET", b"/v1/%2e%2e/admin")
        self.assertEqual(answer.code, 404)
        self.assertEqual(gw.backend.seen, [])

    def test_malformed_path(self) -> None:
        """An encoded slash or NUL is a 400 JSON error, never forwarded."""
        gw = Harness(self, basic())
        for path in (b"/v1/a%2Fb", b"/v1/a%00", b"/v1/%zz"):
            answer = gw.request("GET", path)
            self.assertEqual(answer.code, 400, path)
            self.assertEqual(answer.json()["error"]["code"], "invalid_path")
        self.assertEqual(gw.backend.seen, [])

    def test_base_path(self) -> None:
        """C{server.base_path} is stripped before matching and forwarding."""
        config = basic()
        config["server"] = {"base_path": "/api"}
        gw = Harness(self, config)
        self.assertEqual(gw.request("GET", "/api/v1/chat?x=1").code, 200)
        self.assertEqual(gw.backend.seen[0].uri, b"/v1/chat?x=1")
        self.assertEqual(gw.request("GET", "/v1/chat").code, 404)
        self.assertEqual(gw.request("GET", "/apiv1/chat").code, 404)
        self.assertEqual(len(gw.backend.seen), 1)
        self.assertEqual(gw.request("GET", "/api/health").code, 200)

    def test_forwarded_headers(self) -> None:
        """X-Forwarded-For/-Proto/-Host and X-Request-ID are set on the upstream request."""
        gw = Harness(self, basic())
        answer = gw.request("GET", "/v1/x", headers={"X-Forwarded-For": "6.6.6.6"})
        headers = gw.backend.seen[0].headers
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-host"), [b"gw.test"])
        rid = answer.header("X-Request-ID")
        self.assertTrue(rid)
        self.assertEqual(headers.getRawHeaders(b"x-request-id"), [rid.encode()])

    def test_trusted_proxy_chain(self) -> None:
        """From a trusted proxy, the client's X-Forwarded-For is extended, not replaced."""
        config = basic()
        config["server"] = {"trusted_proxies": ["127.0.0.0/8"]}
        gw = Harness(self, config)
        gw.request("GET", "/v1/x", headers={"X-Forwarded-For": "203.0.113.9"})
        self.assertEqual(gw.backend.seen[0].headers.getRawHeaders(b"x-forwarded-for"),
                         [b"203.0.113.9, 127.0.0.1"])

    def test_request_id_kept_when_safe(self) -> None:
        """A plain client X-Request-ID is kept, upstream and in the response."""
        gw = Harness(self, basic())
        answer = gw.request("GET", "/v1/x", headers={"X-Request-ID": "trace-42.a:b_c"})
        self.assertEqual(answer.header("X-Request-ID"), "trace-42.a:b_c")
        self.assertEqual(gw.backend.seen[0].headers.getRawHeaders(b"x-request-id"),
                         [b"trace-42.a:b_c"])

    def test_request_id_replaced_when_unsafe(self) -> None:
        """An X-Request-ID with odd characters or over 128 bytes is replaced."""
        gw = Harness(self, basic())
        for bad in ("has space", "<script>", "x" * 129):
            answer = gw.request("GET", "/v1/x", headers={"X-Request-ID": bad})
            rid = answer.header("X-Request-ID")
            self.assertNotEqual(rid, bad)
            self.assertRegex(rid, r"^[0-9a-f]{24}$")
            self.assertEqual(gw.backend.seen[-1].headers.getRawHeaders(b"x-request-id"),
                             [rid.encode()])

    def test_request_id_not_doubled(self) -> None:
        """A backend's own X-Request-ID does not add a second value: the client sees ours."""
        gw = Harness(self, basic())
        gw.backend.headers["a"] = [(b"X-Request-ID", b"from-backend")]
        answer = gw.request("GET", "/v1/x", headers={"X-Request-ID": "mine"})
        self.assertEqual(answer.headers.getRawHeaders(b"x-request-id"), [b"mine"])

    def test_request_ids_unique(self) -> None:
        """Generated request ids differ between requests."""
        gw = Harness(self, basic())
        ids = {gw.request("GET", "/v1/x").header("X-Request-ID") for _ in range(5)}
        self.assertEqual(len(ids), 5)

    def test_hop_by_hop_request_headers(self) -> None:
        """Hop-by-hop headers and those named in C{Connection} are not forwarded."""
        gw = Harness(self, basic())
        gw.request("GET", "/v1/x", headers={
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "s3",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic eA==",
            "TE": "trailers",
            "Upgrade": "h2c",
            "X-Kept": "yes",
        })
        headers = gw.backend.seen[0].headers
        for name in (b"x-secret", b"keep-alive", b"proxy-authorization", b"te", b"upgrade"):
            self.assertFalse(headers.hasHeader(name), name)
        self.assertEqual(headers.getRawHeaders(b"x-kept"), [b"yes"])
        self.assertNotIn(b"keep-alive", b",".join(headers.getRawHeaders(b"connection") or []))

    def test_hop_by_hop_response_headers(self) -> None:
        """The backend's hop-by-hop headers do not reach the client."""
        gw = Harness(self, basic())
        gw.backend.headers["a"] = [
            (b"Proxy-Authenticate", b"Basic"), (b"Keep-Alive", b"timeout=5"),
            (b"Trailer", b"X-Checksum"), (b"X-Public", b"2"),
        ]
        answer = gw.request("GET", "/v1/x")
        for name in ("Proxy-Authenticate", "Keep-Alive", "Trailer"):
            self.assertIsNone(answer.header(name), name)
        self.assertEqual(answer.header("X-Public"), "2")

    def test_repeated_headers_kept(self) -> None:
        """Repeated headers keep every value, both ways."""
        gw = Harness(self, basic())
        gw.backend.headers["a"] = [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")]
        answer = gw.request("GET", "/v1/x", headers={"X-Multi": ["1", "2"]})
        self.assertEqual(gw.backend.seen[0].headers.getRawHeaders(b"x-multi"), [b"1", b"2"])
        self.assertEqual(answer.headers.getRawHeaders(b"set-cookie"), [b"a=1", b"b=2"])

    def test_server_timing(self) -> None:
        """A relayed answer carries C{Server-Timing} with the upstream duration."""
        gw = Harness(self, basic())
        self.assertRegex(gw.request("GET", "/v1/x").header("Server-Timing") or "",
                         r"upstream;dur=\d+\.\d")


class RouteChoiceTests(SynchronousTestCase):
    """Route conditions pick the pool, end to end."""

    def config(self, match: dict[str, str]) -> dict[str, Any]:
        return {
            "pools": {"p1": {"instances": [{"id": "a", "url": "http://a.test:8000"}],
                             "health_check": {"enabled": False}},
                      "p2": {"instances": [{"id": "b", "url": "http://b.test:8000"}],
                             "health_check": {"enabled": False}}},
            "routes": [{"path": "/v1/*", "match": match, "pool": "p1"},
                       {"path": "/v1/*", "pool": "p2"}],
        }

    def test_header_condition(self) -> None:
        """A C{header.NAME} condition sends matching requests to its route's pool."""
        gw = Harness(self, self.config({"header.X-Tier": "vip"}))
        self.assertEqual(gw.request("GET", "/v1/x", headers={"x-tier": "vip"}).json()["instance"],
                         "a")
        self.assertEqual(gw.request("GET", "/v1/x", headers={"X-Tier": "free"}).json()["instance"],
                         "b")
        self.assertEqual(gw.request("GET", "/v1/x").json()["instance"], "b")

    def test_body_condition(self) -> None:
        """A C{body.FIELD} glob condition reads the JSON body, which is still forwarded whole."""
        gw = Harness(self, self.config({"body.model": "qwen3:*"}))
        self.assertEqual(gw.request("POST", "/v1/chat", {"model": "qwen3:8b"}).json()["instance"],
                         "a")
        self.assertEqual(gw.request("POST", "/v1/chat", {"model": "llama"}).json()["instance"],
                         "b")
        self.assertEqual(json.loads(gw.backend.seen[0].body), {"model": "qwen3:8b"})


class DiscoveredRoutingTests(SynchronousTestCase):
    """Routes without a pool pick it by model among declared and discovered models."""

    def config(self) -> dict[str, Any]:
        return {
            "pools": {
                "main": two_instance_pool(models=["qwen3:*"]),
                "litellm": {"instances": [{"id": "c", "url": "http://c.test:8000"}],
                            "health_check": {"enabled": False}},
            },
            "routes": [{"path": "/v1/chat/completions"}],
        }

    def chat(self, gw: Harness, model: str) -> Answer:
        return gw.request("POST", "/v1/chat/completions", {"model": model, "messages": []})

    def test_discovered_model(self) -> None:
        """A model a pool's instance reported goes to that pool."""
        gw = Harness(self, self.config())
        gw.registry.models_reported(gw.registry.instance("c"), ["gpt-4"])
        self.assertEqual(self.chat(gw, "gpt-4").json()["instance"], "c")
        self.assertEqual(self.chat(gw, "qwen3:8b").json()["instance"], "a")

    def test_unknown_pool_gets_it(self) -> None:
        """A pool whose models are unknown (nothing declared or reported) gets the request."""
        gw = Harness(self, self.config())
        self.assertEqual(self.chat(gw, "gpt-4").json()["instance"], "c")

    def test_not_found(self) -> None:
        """
        Once every pool's models are known, a model none serves is 404
        C{model_not_found} in the SDK's error shape, and nothing is sent upstream.
        """
        gw = Harness(self, self.config())
        gw.registry.models_reported(gw.registry.instance("c"), ["gpt-4"])
        answer = self.chat(gw, "gpt-5")
        self.assertEqual(answer.code, 404)
        error = answer.json()["error"]
        self.assertEqual((error["type"], error["code"]),
                         ("invalid_request_error", "model_not_found"))
        self.assertIn("gpt-5", error["message"])
        self.assertEqual(gw.backend.seen, [])


class BuiltinTests(SynchronousTestCase):
    """C{/health} and C{/v1/models} are answered by the gateway itself."""

    def config(self) -> dict[str, Any]:
        return {
            "pools": {
                "main": two_instance_pool(models=["qwen3:*", "sim-small"]),
                "other": {"instances": [{"id": "c", "url": "http://c.test:8000"}],
                          "models": ["llama3"], "health_check": {"unhealthy_threshold": 1}},
            },
            "models": {"aliases": {"fast": "qwen3:8b"}},
            "routes": [{"path": "/*", "pool": "main"}],
        }

    def test_health_healthy(self) -> None:
        """With every instance up, C{/health} is 200 C{healthy} with the version and uptime."""
        gw = Harness(self, self.config())
        gw.clock.advance(2 * 3600 + 15 * 60 + 3)
        answer = gw.request("GET", "/health")
        self.assertEqual(answer.code, 200)
        body = answer.json()
        self.assertEqual(body["status"], "healthy")
        self.assertEqual(body["version"], __version__)
        self.assertEqual(body["uptime"], "2h 15m")
        self.assertEqual(body["pools"]["main"], {"healthy": 2, "total": 2, "status": "healthy"})
        self.assertEqual(gw.backend.seen, [])

    def test_health_degraded(self) -> None:
        """With a pool entirely down but another up, C{/health} is 200 C{degraded}."""
        gw = Harness(self, self.config())
        gw.registry.probe_result(gw.registry.instance("c"), False)
        answer = gw.request("GET", "/health")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json()["status"], "degraded")
        self.assertEqual(answer.json()["pools"]["other"]["status"], "unhealthy")

    def test_health_unhealthy(self) -> None:
        """With no healthy instance anywhere, C{/health} is 503 C{unhealthy}."""
        config = self.config()
        config["pools"]["main"]["health_check"] = {"unhealthy_threshold": 1}
        gw = Harness(self, config)
        for inst in gw.registry:
            gw.registry.probe_result(inst, False)
        answer = gw.request("GET", "/health")
        self.assertEqual(answer.code, 503)
        self.assertEqual(answer.json()["status"], "unhealthy")

    def test_health_head(self) -> None:
        """C{HEAD /health} answers the status without a body."""
        gw = Harness(self, self.config())
        answer = gw.request("HEAD", "/health")
        self.assertEqual((answer.code, answer.body), (200, b""))

    def test_models(self) -> None:
        """C{/v1/models} lists declared models, aliases and models the backends report."""
        gw = Harness(self, self.config())
        gw.registry.probe_result(gw.registry.instance("a"), True,
                                 {"data": [{"id": "qwen3:8b"}, {"id": "sim-small"}]})
        gw.registry.models_reported(gw.registry.instance("c"), ["llama3", "mistral"])
        answer = gw.request("GET", "/v1/models")
        self.assertEqual(answer.code, 200)
        body = answer.json()
        self.assertEqual(body["object"], "list")
        self.assertEqual([(m["id"], m["owned_by"]) for m in body["data"]], [
            ("sim-small", "main"), ("llama3", "other"), ("fast", "main"),
            ("qwen3:8b", "main"), ("mistral", "other")])
        self.assertEqual({m["object"] for m in body["data"]}, {"model"})
        self.assertEqual({m["created"] for m in body["data"]}, {0})
        self.assertEqual(gw.backend.seen, [])

    def test_format_uptime(self) -> None:
        """Uptime reads like C{2h 15m}, C{3d 1h 0m}, C{5m 2s} or C{7s}."""
        self.assertEqual(format_uptime(7.9), "7s")
        self.assertEqual(format_uptime(302), "5m 2s")
        self.assertEqual(format_uptime(8100), "2h 15m")
        self.assertEqual(format_uptime(3 * 86400 + 3600), "3d 1h 0m")


class ErrorTests(SynchronousTestCase):
    """Refusals the gateway makes, in the OpenAI error shape."""

    def assertError(self, answer: Answer, status: int, code: str) -> dict[str, Any]:
        self.assertEqual(answer.code, status)
        self.assertEqual(answer.header("Content-Type"), "application/json")
        error = answer.json()["error"]
        self.assertEqual(error["code"], code)
        self.assertIsInstance(error["message"], str)
        self.assertIsInstance(error["type"], str)
        return error

    def model_routed(self, **extra: Any) -> dict[str, Any]:
        config = {"pools": {"main": two_instance_pool(models=["qwen3:*"])},
                  "routes": [{"path": "/v1/chat/completions", "methods": ["POST"]}]}
        config.update(extra)
        return config

    def test_no_route(self) -> None:
        """A path no route matches is a 404 C{route_not_found}."""
        gw = Harness(self, basic())
        self.assertError(gw.request("GET", "/nope"), 404, "route_not_found")

    def test_method_not_routed(self) -> None:
        """A route limited to POST does not match a GET."""
        gw = Harness(self, self.model_routed())
        self.assertError(gw.request("GET", "/v1/chat/completions"), 404, "route_not_found")

    def test_model_routing(self) -> None:
        """A route without a pool sends the request to the pool serving its model."""
        gw = Harness(self, self.model_routed())
        answer = gw.request("POST", "/v1/chat/completions", {"model": "qwen3:8b"})
        self.assertEqual(answer.code, 200)

    def test_model_not_found(self) -> None:
        """A model no pool serves is a 404 C{model_not_found}."""
        gw = Harness(self, self.model_routed())
        error = self.assertError(
            gw.request("POST", "/v1/chat/completions", {"model": "gpt-5"}),
            404, "model_not_found")
        self.assertIn("gpt-5", error["message"])
        self.assertEqual(gw.backend.seen, [])

    def test_bad_json(self) -> None:
        """A body the gateway must parse that is not JSON is a 400 C{invalid_json}."""
        gw = Harness(self, self.model_routed())
        self.assertError(gw.request("POST", "/v1/chat/completions", b"{not json"),
                         400, "invalid_json")
        self.assertError(gw.request("POST", "/v1/chat/completions", b"[1, 2]"),
                         400, "invalid_json")
        self.assertEqual(gw.backend.seen, [])

    def test_too_large(self) -> None:
        """A request flagged C{too_large} by the site is a 413, never forwarded."""

        class Flagging(Resource):
            isLeaf = True

            def __init__(self, inner: Resource) -> None:
                super().__init__()
                self.inner = inner

            def render(self, request: Any) -> Any:
                request.too_large = True
                return self.inner.render(request)

        gw = Harness(self, basic(), wrap_root=Flagging)
        self.assertError(gw.request("POST", "/v1/x", b"x" * 100), 413, "request_too_large")
        self.assertEqual(gw.backend.seen, [])

    def test_no_instance(self) -> None:
        """With every instance drained and no fallback: 503 with C{Retry-After}."""
        gw = Harness(self, basic())
        gw.registry.set_drained("a", True)
        gw.registry.set_drained("b", True)
        answer = gw.request("GET", "/v1/x")
        self.assertError(answer, 503, "no_healthy_upstream")
        self.assertTrue(answer.header("Retry-After").isdigit())
        self.assertEqual(gw.backend.seen, [])

    def test_errors_carry_request_id(self) -> None:
        """Error answers carry C{X-Request-ID} too."""
        gw = Harness(self, basic())
        answer = gw.request("GET", "/nope", headers={"X-Request-ID": "abc"})
        self.assertEqual(answer.header("X-Request-ID"), "abc")


class FallbackTests(SynchronousTestCase):
    """A static fallback answers when no instance can."""

    def config(self, on: str) -> dict[str, Any]:
        fallback = {"status": 200, "content_type": "application/json",
                    "body": '{"message": "busy", "is_fallback": true}'}
        config: dict[str, Any] = {
            "pools": {"main": two_instance_pool()},
            "routes": [{"path": "/v1/*", "pool": "main"}],
            "fallbacks": {"busy": fallback},
        }
        if on == "pool":
            config["pools"]["main"]["fallback"] = "busy"
        else:
            config["routes"][0]["fallback"] = "busy"
        return config

    def check(self, gw: Harness) -> None:
        for inst in ("a", "b"):
            gw.registry.set_drained(inst, True)
        answer = gw.request("POST", "/v1/chat", {"model": "m"})
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json(), {"message": "busy", "is_fallback": True})
        self.assertEqual(answer.header("X-Clawproxy-Fallback"), "busy")
        self.assertEqual(answer.header("Content-Type"), "application/json")
        self.assertEqual(gw.sample("fallback_responses_total", fallback="busy"), 1.0)
        self.assertEqual(gw.backend.seen, [])

    def test_pool_fallback(self) -> None:
        """A pool's C{fallback} answers when none of its instances is available."""
        self.check(Harness(self, self.config("pool")))

    def test_route_fallback(self) -> None:
        """A route's C{fallback} does the same."""
        self.check(Harness(self, self.config("route")))

    def test_not_used_when_available(self) -> None:
        """The fallback is not used while an instance can answer."""
        gw = Harness(self, self.config("pool"))
        answer = gw.request("GET", "/v1/x")
        self.assertIsNone(answer.header("X-Clawproxy-Fallback"))
        self.assertEqual(answer.json()["instance"], "a")


class FailoverTests(SynchronousTestCase):
    """Retries to another instance, and when they do not happen."""

    def test_failover_on_5xx(self) -> None:
        """With C{5xx} in C{retry_on}, a 503 from one instance is retried on the other."""
        gw = Harness(self, basic(retry={"retry_on": ["5xx"], "base_delay": "10ms"}))
        gw.backend.status["a"] = 503
        d = gw.start("POST", "/v1/chat", {"model": "m"})
        self.assertNoResult(d)
        gw.clock.advance(0.01)
        answer = gw.finish(d)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json()["instance"], "b")
        self.assertEqual(gw.backend.instances(), ["a", "b"])
        self.assertEqual([json.loads(s.body) for s in gw.backend.seen], [{"model": "m"}] * 2)
        self.assertEqual(gw.sample("upstream_retries_total", pool="main"), 1.0)
        self.assertEqual(gw.sample("upstream_requests_total", pool="main", instance="a",
                                   status="503"), 1.0)
        self.assertEqual(gw.sample("upstream_requests_total", pool="main", instance="b",
                                   status="200"), 1.0)
        self.assertEqual(gw.clock.getDelayedCalls(), [])

    def test_no_failover_on_5xx_by_default(self) -> None:
        """By default a 5xx is relayed to the client as the backend sent it."""
        gw = Harness(self, basic())
        gw.backend.status["a"] = 500
        gw.backend.body["a"] = b'{"error": "boom"}'
        answer = gw.request("POST", "/v1/chat", {"model": "m"})
        self.assertEqual(answer.code, 500)
        self.assertEqual(answer.json(), {"error": "boom"})
        self.assertEqual(gw.backend.instances(), ["a"])
        self.assertIsNone(gw.sample("upstream_retries_total", pool="main"))

    def test_every_instance_5xx(self) -> None:
        """When the last instance tried also fails, its answer is relayed."""
        gw = Harness(self, basic(retry={"retry_on": ["5xx"], "base_delay": 0}))
        gw.backend.status.update(a=502, b=503)
        answer = gw.request("GET", "/v1/x")
        self.assertEqual(answer.code, 503)
        self.assertEqual(gw.backend.instances(), ["a", "b"])

    def test_no_retry_on_4xx(self) -> None:
        """A 4xx (or 429) is never retried."""
        gw = Harness(self, basic(retry={"retry_on": ["5xx", "connect_failure"]}))
        for status in (400, 429):
            gw.backend.status["a"] = gw.backend.status["b"] = status
            self.assertEqual(gw.request("GET", "/v1/x").code, status)
        self.assertEqual(len(gw.backend.seen), 2)

    def test_failover_on_refused(self) -> None:
        """A refused connection is retried on another instance by default."""
        gw = Harness(self, basic(retry={"base_delay": 0}), wrap_agent=RefusingAgent)
        gw.agent.refuse.add(b"a.test:8000")
        answer = gw.request("GET", "/v1/x")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json()["instance"], "b")
        self.assertEqual(gw.sample("upstream_requests_total", pool="main", instance="a",
                                   status="refused"), 1.0)
        self.assertEqual(gw.sample("upstream_retries_total", pool="main"), 1.0)

    def test_all_refused(self) -> None:
        """When no instance can be reached: 502 C{upstream_unreachable}."""
        gw = Harness(self, basic(retry={"base_delay": 0}), wrap_agent=RefusingAgent)
        gw.agent.refuse.update({b"a.test:8000", b"b.test:8000"})
        answer = gw.request("GET", "/v1/x")
        self.assertEqual(answer.code, 502)
        self.assertEqual(answer.json()["error"]["code"], "upstream_unreachable")
        self.assertEqual(gw.clock.getDelayedCalls(), [])

    def test_timeout(self) -> None:
        """An instance that does not answer within C{timeout} gives a 504, not retried."""
        gw = Harness(self, basic(timeout="5s", retry={"retry_on": ["5xx", "connect_failure"]}))
        gw.backend.hang.add("a")
        d = gw.start("GET", "/v1/x")
        gw.clock.advance(4.9)
        gw.flush()
        self.assertNoResult(d)
        gw.clock.advance(0.1)
        answer = gw.finish(d)
        self.assertEqual(answer.code, 504)
        self.assertEqual(answer.json()["error"]["code"], "gateway_timeout")
        self.assertEqual(gw.backend.instances(), ["a"])
        self.assertEqual(gw.clock.getDelayedCalls(), [])

    def test_route_timeout(self) -> None:
        """A route's C{timeout} overrides the pool's."""
        config = basic(timeout="30s")
        config["routes"][0]["timeout"] = "1s"
        gw = Harness(self, config)
        gw.backend.hang.add("a")
        d = gw.start("GET", "/v1/x")
        gw.clock.advance(1)
        self.assertEqual(gw.finish(d).code, 504)

    def test_passive_ejection(self) -> None:
        """After C{max_fails} failed answers an instance is left alone for C{fail_timeout}."""
        gw = Harness(self, basic(passive={"max_fails": 2, "fail_timeout": "30s"}))
        gw.backend.status["a"] = 500
        for _ in range(4):
            gw.request("GET", "/v1/x")
        self.assertEqual(gw.backend.instances(), ["a", "b", "a", "b"])
        self.assertEqual(gw.registry.instance("a").state, "ejected")
        for _ in range(3):
            gw.request("GET", "/v1/x")
        self.assertEqual(gw.backend.instances()[4:], ["b", "b", "b"])
        gw.clock.advance(30)
        gw.request("GET", "/v1/x")
        gw.request("GET", "/v1/x")
        self.assertIn("a", gw.backend.instances()[7:])


    def test_client_gone_during_backoff(self) -> None:
        """A client that leaves while a retry waits its backoff gets no further attempt."""
        gw = Harness(self, basic(retry={"retry_on": ["5xx"], "base_delay": "1s",
                                             "max_delay": "1s"}))
        gw.backend.status["a"] = 503
        d = gw.start("GET", "/v1/x")
        self.assertEqual(gw.backend.instances(), ["a"])
        self.assertEqual(len(gw.clock.getDelayedCalls()), 1)
        d.cancel()
        gw.flush()
        self.failureResultOf(d)
        self.assertEqual(gw.clock.getDelayedCalls(), [])
        gw.clock.advance(5)
        gw.flush()
        self.assertEqual(gw.backend.instances(), ["a"])
        self.assertEqual(len(gw.log_lines()), 1)


class BalancingTests(SynchronousTestCase):
    """Which instance gets the request."""

    def test_round_robin(self) -> None:
        """The default round robin alternates."""
        gw = Harness(self, basic())
        for _ in range(4):
            gw.request("GET", "/v1/x")
        self.assertEqual(gw.backend.instances(), ["a", "b", "a", "b"])

    def test_weight_zero(self) -> None:
        """An instance set to weight 0 takes no new requests."""
        gw = Harness(self, basic())
        gw.registry.set_weight("a", 0)
        for _ in range(4):
            gw.request("GET", "/v1/x")
        self.assertEqual(gw.backend.instances(), ["b"] * 4)
        self.assertEqual(gw.sample("backend_weight", pool="main", instance="a"), 0.0)

    def test_drain(self) -> None:
        """A drained instance takes no new requests; undrained, it does again."""
        gw = Harness(self, basic())
        gw.registry.set_drained("b", True)
        for _ in range(3):
            gw.request("GET", "/v1/x")
        self.assertEqual(gw.backend.instances(), ["a"] * 3)
        gw.registry.set_drained("b", False)
        gw.request("GET", "/v1/x")
        gw.request("GET", "/v1/x")
        self.assertIn("b", gw.backend.instances()[3:])

    def test_drain_lets_in_flight_finish(self) -> None:
        """Draining an instance with a request in flight lets that request finish."""
        gw = Harness(self, basic())
        gw.backend.hang.add("a")
        d = gw.start("GET", "/v1/x")
        self.assertEqual(gw.registry.instance("a").active, 1)
        gw.registry.set_drained("a", True)
        request = gw.backend.hanging.pop()
        request.write(b'{"late": true}')
        request.finish()
        answer = gw.finish(d)
        self.assertEqual((answer.code, answer.json()), (200, {"late": True}))
        self.assertEqual(gw.registry.instance("a").active, 0)

    def test_unhealthy_skipped(self) -> None:
        """An instance marked down by probes takes no requests."""
        gw = Harness(self, basic(health_check={"unhealthy_threshold": 1}))
        gw.registry.probe_result(gw.registry.instance("a"), False)
        for _ in range(3):
            gw.request("GET", "/v1/x")
        self.assertEqual(gw.backend.instances(), ["b"] * 3)

    def test_split(self) -> None:
        """A C{split} route sends each session to one pool, the same every time."""
        config = {
            "pools": {"p1": {"instances": [{"id": "a", "url": "http://a.test:8000"}],
                             "health_check": {"enabled": False}},
                      "p2": {"instances": [{"id": "b", "url": "http://b.test:8000"}],
                             "health_check": {"enabled": False}}},
            "routes": [{"path": "/v1/*", "split": {"p1": 50, "p2": 50}}],
        }
        gw = Harness(self, config)
        chosen = {}
        for n in range(20):
            sid = f"session-{n}"
            first = gw.request("GET", "/v1/x", headers={"X-Session-ID": sid}).json()["instance"]
            again = gw.request("GET", "/v1/x", headers={"X-Session-ID": sid}).json()["instance"]
            self.assertEqual(first, again)
            chosen[sid] = first
        self.assertEqual(set(chosen.values()), {"a", "b"})


class AffinityTests(SynchronousTestCase):
    """Session affinity keeps a session on one instance."""

    def test_cookie(self) -> None:
        """
        Without the cookie the gateway sets one; requests sending it back stay on
        the instance that served the first.
        """
        gw = Harness(self, basic(session_affinity={"method": "cookie", "ttl": "1h"}))
        first = gw.request("GET", "/v1/x")
        cookie = first.header("Set-Cookie")
        self.assertIsNotNone(cookie)
        name_value = cookie.split(";")[0]
        name, _, value = name_value.partition("=")
        self.assertEqual(name, "CLAWPROXY_SESSION")
        self.assertRegex(value, r"^[0-9a-f]{32}$")
        attrs_ = cookie.lower()
        self.assertIn("max-age=3600", attrs_)
        self.assertIn("httponly", attrs_)
        self.assertIn("path=/", attrs_)
        owner = first.json()["instance"]
        for _ in range(5):
            answer = gw.request("GET", "/v1/x", headers={"Cookie": name_value})
            self.assertEqual(answer.json()["instance"], owner)
            self.assertIsNone(answer.header("Set-Cookie"))
        # A fresh client gets a new cookie and the other instance.
        other = gw.request("GET", "/v1/x")
        self.assertNotEqual(other.header("Set-Cookie"), cookie)
        self.assertNotEqual(other.json()["instance"], owner)

    def test_cookie_owner_drained(self) -> None:
        """When the session's instance is drained the session moves, and then stays."""
        gw = Harness(self, basic(session_affinity={"method": "cookie"}))
        first = gw.request("GET", "/v1/x")
        cookie = first.header("Set-Cookie").split(";")[0]
        gw.registry.set_drained(first.json()["instance"], True)
        moved = {gw.request("GET", "/v1/x", headers={"Cookie": cookie}).json()["instance"]
                 for _ in range(3)}
        self.assertEqual(len(moved), 1)
        self.assertNotIn(first.json()["instance"], moved)

    def test_header(self) -> None:
        """With C{method: header}, the named header is the session key."""
        gw = Harness(self, basic(session_affinity={"method": "header",
                                                   "header_name": "X-Conversation"}))
        s1 = [gw.request("GET", "/v1/x", headers={"X-Conversation": "one"}).json()["instance"]
              for _ in range(4)]
        s2 = [gw.request("GET", "/v1/x", headers={"X-Conversation": "two"}).json()["instance"]
              for _ in range(4)]
        self.assertEqual(len(set(s1)), 1)
        self.assertEqual(len(set(s2)), 1)
        self.assertNotEqual(s1[0], s2[0])


class LeastLatencyTests(SynchronousTestCase):
    """C{algorithm: least_latency} learns each instance's time to first byte from the relay."""

    def test_slow_instance_avoided(self) -> None:
        """After a slow answer from C{a}, requests go to C{b}, which answers at once."""
        gw = Harness(self, basic(algorithm="least_latency"))
        gw.backend.hang.add("a")
        d = gw.start("GET", "/v1/x")  # a: never judged, tried first
        gw.clock.advance(2)
        request = gw.backend.hanging.pop()
        request.write(b"{}")
        request.finish()
        gw.finish(d)
        gw.backend.hang.clear()
        for _ in range(5):
            gw.request("GET", "/v1/x")
        self.assertEqual(gw.backend.instances(), ["a"] + ["b"] * 5)
        self.assertEqual(gw.sample("upstream_ttfb_seconds_sum", pool="main", instance="a"),
                         2.0)

    def test_5xx_counts_as_slow(self) -> None:
        """A quick 5xx counts as slow as the timeout: the instance is avoided."""
        gw = Harness(self, basic(algorithm="least_latency"))
        gw.backend.status["a"] = 500
        gw.request("GET", "/v1/x")
        gw.backend.status["a"] = 200
        for _ in range(3):
            gw.request("GET", "/v1/x")
        self.assertEqual(gw.backend.instances(), ["a", "b", "b", "b"])


class ModelsSectionTests(SynchronousTestCase):
    """The C{models} section of C{/admin/status}."""

    def test_status(self) -> None:
        """
        Per pool: declared and discovered models, sessions remembered, and for
        C{least_latency} each instance's recent time to first byte.
        """
        config = basic(algorithm="least_latency", models=["qwen3:*"],
                       session_affinity={"method": "conversation"})
        config["models"] = {"aliases": {"fast": "qwen3:8b"},
                            "fallbacks": {"qwen3:32b": ["qwen3:8b"]}}
        gw = Harness(self, config)
        (section,) = [s for s in gw.plane.parts.admin_sections if s.name == "models"]
        gw.registry.models_reported(gw.registry.instance("b"), ["qwen3:8b", "llama3"])
        gw.backend.hang.add("a")
        d = gw.start("POST", "/v1/chat", {"model": "m", "messages": [
            {"role": "user", "content": "hi"}]})
        gw.clock.advance(0.25)
        request = gw.backend.hanging.pop()
        request.write(b"{}")
        request.finish()
        gw.finish(d)
        self.assertEqual(section.status(), {
            "pools": {"main": {"declared": ["qwen3:*"], "discovered": ["llama3", "qwen3:8b"],
                               "sessions": 1, "ttfb_ms": {"a": 250.0}}},
            "aliases": {"fast": "qwen3:8b"},
            "fallbacks": {"qwen3:32b": ["qwen3:8b"]},
        })
        self.assertEqual(section.endpoints(), {})


class ConversationAffinityTests(SynchronousTestCase):
    """C{session_affinity: {method: conversation}} keeps a conversation on one instance."""

    def harness(self, **aff: Any) -> Harness:
        pool = two_instance_pool(session_affinity={"method": "conversation", **aff})
        pool["instances"].append({"id": "c", "url": "http://c.test:8000"})
        return Harness(self, {"pools": {"main": pool},
                              "routes": [{"path": "/v1/*", "pool": "main"}]})

    def turn(self, gw: Harness, n: int, turns: int = 1, **headers: str) -> str:
        messages = [{"role": "system", "content": f"persona {n}"},
                    {"role": "user", "content": "hello"}]
        messages += [{"role": "user", "content": f"turn {t}"} for t in range(turns)]
        answer = gw.request("POST", "/v1/chat/completions",
                            {"model": "m", "messages": messages}, headers=headers)
        return answer.json()["instance"]

    def test_fingerprint(self) -> None:
        """Every turn of a conversation goes where its first went; conversations spread."""
        gw = self.harness()
        first = {n: self.turn(gw, n) for n in range(30)}
        self.assertEqual(set(first.values()), {"a", "b", "c"})
        for turns in (2, 5):
            self.assertEqual({n: self.turn(gw, n, turns) for n in range(30)}, first)

    def test_session_header(self) -> None:
        """With C{X-Session-ID}, the header names the conversation, whatever the body."""
        gw = self.harness()
        where = {self.turn(gw, n, **{"X-Session-ID": "s1"}) for n in range(10)}
        self.assertEqual(len(where), 1)

    def test_instance_down_moves_only_its_conversations(self) -> None:
        """When an instance is unavailable its conversations move; the others stay."""
        gw = self.harness()
        first = {n: self.turn(gw, n) for n in range(30)}
        gw.registry.set_drained("b", True)
        after = {n: self.turn(gw, n, 3) for n in range(30)}
        for n in range(30):
            if first[n] == "b":
                self.assertIn(after[n], ("a", "c"))
            else:
                self.assertEqual(after[n], first[n])
        # Moved conversations stay where they went, even once b is back.
        gw.registry.set_drained("b", False)
        self.assertEqual({n: self.turn(gw, n, 4) for n in range(30)}, after)

    def test_ttl(self) -> None:
        """A conversation idle for longer than C{ttl} is forgotten (the balancer decides)."""
        gw = self.harness(ttl="10s")
        where = self.turn(gw, 1)
        pool = gw.registry.pools["main"]
        self.assertEqual(len(pool.affinity), 1)
        gw.clock.advance(9)
        self.assertEqual(self.turn(gw, 1), where)
        gw.clock.advance(10)
        self.assertEqual(len(pool.affinity), 0)

    def test_max_entries(self) -> None:
        """At most C{max_entries} conversations are remembered, the least recent dropped."""
        gw = self.harness(max_entries=5)
        for n in range(12):
            self.turn(gw, n)
        self.assertEqual(len(gw.registry.pools["main"].affinity), 5)

    def test_not_json(self) -> None:
        """A body that is not JSON has no conversation: it is relayed, balanced as usual."""
        gw = self.harness()
        answer = gw.request("POST", "/v1/upload", b"\x00raw")
        self.assertEqual(answer.code, 200)
        self.assertEqual(len(gw.registry.pools["main"].affinity), 0)


class TransformTests(SynchronousTestCase):
    """Route C{transforms} change the upstream request and the response."""

    def test_request_and_response_headers(self) -> None:
        """Request headers are set and removed; response headers set, with variables."""
        config = basic()
        config["routes"][0]["transforms"] = {
            "request_headers": {"set": {"X-Route": "${route}", "X-Rid": "${request_id}",
                                        "X-Client": "${client_ip}"},
                                "remove": ["Cookie"]},
            "response_headers": {"set": {"X-Served-By": "clawproxy", "X-Pool": "${pool}"}},
        }
        gw = Harness(self, config)
        answer = gw.request("GET", "/v1/x", headers={"Cookie": "secret=1",
                                                     "X-Request-ID": "rid-1"})
        headers = gw.backend.seen[0].headers
        self.assertFalse(headers.hasHeader(b"cookie"))
        self.assertEqual(headers.getRawHeaders(b"x-route"), [b"/v1/*"])
        self.assertEqual(headers.getRawHeaders(b"x-rid"), [b"rid-1"])
        self.assertEqual(headers.getRawHeaders(b"x-client"), [b"127.0.0.1"])
        self.assertEqual(answer.header("X-Served-By"), "clawproxy")
        self.assertEqual(answer.header("X-Pool"), "main")

    def test_response_header_instance(self) -> None:
        """C{${instance}} in a response header names the instance that answered."""
        config = basic()
        config["routes"][0]["transforms"] = {
            "response_headers": {"set": {"X-Instance": "${instance}"}}}
        gw = Harness(self, config)
        self.assertEqual(gw.request("GET", "/v1/x").header("X-Instance"), "a")
        self.assertEqual(gw.request("GET", "/v1/x").header("X-Instance"), "b")

    def test_response_header_instance_on_fallback(self) -> None:
        """On a fallback answer no instance answered: C{${instance}} is C{-}."""
        config = basic(fallback="busy")
        config["fallbacks"] = {"busy": {"status": 503, "body": "{}"}}
        config["routes"][0]["transforms"] = {
            "response_headers": {"set": {"X-Instance": "${instance}", "X-Pool": "${pool}"}}}
        gw = Harness(self, config)
        gw.registry.set_drained("a", True)
        gw.registry.set_drained("b", True)
        answer = gw.request("GET", "/v1/x")
        self.assertEqual(answer.code, 503)
        self.assertEqual((answer.header("X-Instance"), answer.header("X-Pool")), ("-", "main"))

    def test_response_header_overrides_backend(self) -> None:
        """A response header set by a transform replaces the backend's value."""
        config = basic()
        config["routes"][0]["transforms"] = {"response_headers": {"set": {"X-Served-By": "gw"}}}
        gw = Harness(self, config)
        gw.backend.headers["a"] = [(b"X-Served-By", b"backend")]
        self.assertEqual(gw.request("GET", "/v1/x").headers.getRawHeaders(b"x-served-by"),
                         [b"gw"])


class AccessLogTests(SynchronousTestCase):
    """One JSON line per request, with what was done."""

    def test_relayed(self) -> None:
        """A relayed request logs its route, pool, instance, status, size and attempts."""
        gw = Harness(self, basic())
        gw.clock.advance(100)
        answer = gw.request("POST", "/v1/chat?x=1", {"model": "m"},
                            headers={"X-Request-ID": "req-1", "Authorization": "Bearer sk"})
        (line,) = gw.log_lines()
        self.assertEqual(answer.header("X-Request-ID"), "req-1")
        self.assertEqual({k: line[k] for k in line if k not in ("ts", "duration_ms")}, {
            "request_id": "req-1", "client": "127.0.0.1", "method": "POST",
            "path": "/v1/chat", "route": "/v1/*", "agent": "-", "pool": "main",
            "instance": "a", "model": None, "status": 200, "bytes": len(answer.body),
            "attempts": 1, "error": None,
        })
        self.assertIsInstance(line["ts"], float)
        self.assertEqual(line["duration_ms"], 0.0)
        self.assertNotIn("Bearer", gw.log.getvalue())

    def test_local_answers_logged(self) -> None:
        """Requests the gateway answers itself are logged too, one line each."""
        gw = Harness(self, basic())
        gw.request("GET", "/health")
        gw.request("GET", "/nope")
        gw.request("GET", b"/v1/%00")
        lines = gw.log_lines()
        self.assertEqual([(x["path"], x["status"], x["error"]) for x in lines], [
            ("/health", 200, None),
            ("/nope", 404, "route_not_found"),
            ("/v1/%00", 400, "invalid_path"),
        ])
        self.assertEqual({x["route"] for x in lines}, {"-"})

    def test_failover_logged(self) -> None:
        """A failed-over request logs the instance that answered and two attempts."""
        gw = Harness(self, basic(retry={"retry_on": ["5xx"], "base_delay": 0}))
        gw.backend.status["a"] = 503
        gw.request("GET", "/v1/x")
        (line,) = gw.log_lines()
        self.assertEqual((line["instance"], line["attempts"], line["status"]), ("b", 2, 200))

    def test_timeout_logged(self) -> None:
        """A timed-out request logs 504 and the error."""
        gw = Harness(self, basic(timeout="1s"))
        gw.backend.hang.add("a")
        d = gw.start("GET", "/v1/x")
        gw.clock.advance(1)
        gw.finish(d)
        (line,) = gw.log_lines()
        self.assertEqual((line["status"], line["error"], line["duration_ms"]),
                         (504, "timeout", 1000.0))


class MetricsTests(SynchronousTestCase):
    """Counters a request moves."""

    def test_requests_total(self) -> None:
        """C{requests_total} counts answers by route, method, status and agent."""
        gw = Harness(self, basic())
        gw.request("GET", "/v1/x")
        gw.request("GET", "/v1/x")
        gw.request("POST", "/nope")
        self.assertEqual(gw.sample("requests_total", route="/v1/*", method="GET",
                                   status="200", agent="-"), 2.0)
        self.assertEqual(gw.sample("requests_total", route="-", method="POST",
                                   status="404", agent="-"), 1.0)
        self.assertEqual(gw.sample("request_duration_seconds_count", route="/v1/*"), 2.0)

    def test_upstream_requests_total(self) -> None:
        """C{upstream_requests_total} counts attempts by instance and status."""
        gw = Harness(self, basic())
        gw.backend.status["b"] = 404
        for _ in range(3):
            gw.request("GET", "/v1/x")
        self.assertEqual(gw.sample("upstream_requests_total", pool="main", instance="a",
                                   status="200"), 2.0)
        self.assertEqual(gw.sample("upstream_requests_total", pool="main", instance="b",
                                   status="404"), 1.0)
        self.assertEqual(gw.sample("upstream_latency_seconds_count", pool="main",
                                   instance="a"), 2.0)
        self.assertEqual(gw.sample("upstream_ttfb_seconds_count", pool="main", instance="a"),
                         2.0)
        self.assertEqual(gw.sample("upstream_ttfb_seconds_count", pool="main", instance="b"),
                         1.0)

    def test_active_connections(self) -> None:
        """C{active_connections} counts requests in flight to each instance."""
        gw = Harness(self, basic())
        gw.backend.hang.add("a")
        d = gw.start("GET", "/v1/x")
        self.assertEqual(gw.sample("active_connections", pool="main", instance="a"), 1.0)
        request = gw.backend.hanging.pop()
        request.finish()
        gw.finish(d)
        self.assertEqual(gw.sample("active_connections", pool="main", instance="a"), 0.0)

    def test_backend_gauges(self) -> None:
        """C{backend_up} and C{backend_weight} follow the registry."""
        gw = Harness(self, basic(health_check={"unhealthy_threshold": 1}))
        self.assertEqual(gw.sample("backend_up", pool="main", instance="a"), 1.0)
        gw.registry.probe_result(gw.registry.instance("a"), False)
        self.assertEqual(gw.sample("backend_up", pool="main", instance="a"), 0.0)
        gw.registry.set_weight("b", 2.5)
        self.assertEqual(gw.sample("backend_weight", pool="main", instance="b"), 2.5)


class DisconnectTests(SynchronousTestCase):
    """A client that leaves cancels the work done for it."""

    def test_client_gone_cancels_upstream(self) -> None:
        """Cancelling the client request aborts the upstream request and is logged."""
        gw = Harness(self, basic())
        gw.backend.hang.add("a")
        d = gw.start("GET", "/v1/x")
        upstream = gw.backend.hanging[0]
        lost: list[Any] = []
        upstream.notifyFinish().addErrback(lost.append)
        d.cancel()
        gw.flush()
        self.failureResultOf(d)
        self.assertEqual(len(lost), 1)
        self.assertEqual(gw.registry.instance("a").active, 0)
        (line,) = gw.log_lines()
        self.assertEqual(line["error"], "client_disconnected")
        self.assertEqual(gw.clock.getDelayedCalls(), [])


class AvailabilityTests(SynchronousTestCase):
    """
    The registry's one availability decision seen through the relay: the
    breaker is asked once, for the chosen instance (a test-only breaker
    board plays the breakers), and a refusing instance leaves at once.
    """

    def answer_later(self, gw: Harness) -> None:
        """Answer every request the backend holds with a 200."""
        while gw.backend.hanging:
            request = gw.backend.hanging.pop(0)
            request.write(b'{"late": true}')
            request.finish()
        gw.flush()

    def test_open_breaker_skips_instance(self) -> None:
        """An instance whose breaker is open is skipped (and not asked): the other answers."""
        breakers = TrialBreakers()
        breakers.open("main/a")
        gw = Harness(self, basic(), breakers=breakers)
        answers = [gw.request("GET", "/v1/x") for _ in range(3)]
        self.assertEqual([(a.code, a.json()["instance"]) for a in answers], [(200, "b")] * 3)
        self.assertEqual(gw.backend.instances(), ["b"] * 3)
        self.assertEqual(breakers.asked, ["b"] * 3)
        self.assertEqual(breakers.outcomes, [("b", "ok")] * 3)

    def test_half_open_admits_exactly_its_probes(self) -> None:
        """
        Six concurrent requests while C{main/a} is half-open with two probes:
        exactly two reach a, the other four go to b; every admitted attempt
        reports exactly one outcome, and two successes close the breaker.
        """
        breakers = TrialBreakers()
        breakers.half_open("main/a", 2)
        gw = Harness(self, basic(), breakers=breakers)
        gw.backend.hang.update({"a", "b"})
        ds = [gw.start("GET", "/v1/x") for _ in range(6)]
        self.assertEqual(sorted(gw.backend.instances()), ["a", "a", "b", "b", "b", "b"])
        self.assertEqual(breakers.outcomes, [])
        self.answer_later(gw)
        self.assertEqual([gw.finish(d).code for d in ds], [200] * 6)
        self.assertEqual(sorted(breakers.outcomes), [("a", "ok")] * 2 + [("b", "ok")] * 4)
        self.assertEqual(breakers.state("main/a"), "CLOSED")

    def test_half_open_nowhere_else(self) -> None:
        """With one instance, requests beyond the probe count get 503 at once."""
        breakers = TrialBreakers()
        breakers.half_open("main/a", 1)
        config = basic()
        config["pools"]["main"]["instances"] = config["pools"]["main"]["instances"][:1]
        gw = Harness(self, config, breakers=breakers)
        gw.backend.hang.add("a")
        first = gw.start("GET", "/v1/x")
        refused = [gw.request("GET", "/v1/x") for _ in range(2)]
        self.assertEqual([(a.code, a.json()["error"]["code"]) for a in refused],
                         [(503, "no_healthy_upstream")] * 2)
        self.assertEqual(gw.backend.instances(), ["a"])
        self.answer_later(gw)
        self.assertEqual(gw.finish(first).code, 200)

    def test_admission_answered_later(self) -> None:
        """A breaker may answer through a Deferred: the request waits for it, then goes on."""
        breakers = TrialBreakers(deferred=True)
        gw = Harness(self, basic(), breakers=breakers)
        d = gw.start("GET", "/v1/x")
        self.assertNoResult(d)
        self.assertEqual(gw.backend.seen, [])
        breakers.flush()
        answer = gw.finish(d)
        self.assertEqual((answer.code, answer.json()["instance"]), (200, "a"))
        self.assertEqual(breakers.outcomes, [("a", "ok")])

    def test_client_leaves_frees_the_trial(self) -> None:
        """A client that leaves during a trial attempt gives its slot back to the breaker."""
        breakers = TrialBreakers()
        breakers.half_open("main/a", 1)
        gw = Harness(self, basic(), breakers=breakers)
        gw.backend.hang.add("a")
        d = gw.start("GET", "/v1/x")
        d.cancel()
        gw.flush()
        self.failureResultOf(d)
        self.assertEqual(breakers.outcomes, [("a", "cancelled")])
        gw.backend.hang.clear()
        breakers.open("main/b")
        self.assertEqual(gw.request("GET", "/v1/x").json()["instance"], "a")
        self.assertEqual(breakers.state("main/a"), "CLOSED")

    def test_refusing_instance_out_at_once(self) -> None:
        """
        (b) After one refused connection, requests stop trying that instance
        until L{L4_RETRY_INTERVAL} has passed; then one tries it again.
        """
        gw = Harness(self, basic(retry={"base_delay": 0}), wrap_agent=RefusingAgent)
        gw.agent.refuse.add(b"a.test:8000")
        answers = [gw.request("GET", "/v1/x") for _ in range(4)]
        self.assertEqual([a.json()["instance"] for a in answers], ["b"] * 4)
        self.assertEqual(gw.sample("upstream_requests_total", pool="main", instance="a",
                                   status="refused"), 1.0)
        self.assertEqual(gw.registry.instance("a").state, "ejected")
        gw.clock.advance(L4_RETRY_INTERVAL)
        gw.agent.refuse.clear()
        gw.request("GET", "/v1/x")
        self.assertEqual(gw.backend.instances()[-1], "a")
        self.assertEqual(gw.registry.instance("a").state, "healthy")

    def test_refused_retries_spend_no_budget(self) -> None:
        """
        (c) With a retry budget of 0 (a floor of 3 retries), ten requests
        that each meet a refused connection are all retried and answered;
        resends of 5xx answers stop at the floor.
        """
        gw = Harness(self, basic(retry={"base_delay": 0, "budget": 0.0}),
                     wrap_agent=RefusingAgent)
        gw.agent.refuse.add(b"a.test:8000")
        for _ in range(10):
            gw.clock.advance(L4_RETRY_INTERVAL)  # a is tried first again each time
            self.assertEqual(gw.request("GET", "/v1/x").code, 200)
        self.assertEqual(gw.sample("upstream_requests_total", pool="main", instance="a",
                                   status="refused"), 10.0)
        self.assertEqual(gw.sample("upstream_retries_total", pool="main"), 10.0)

        gw = Harness(self, basic(retry={"base_delay": 0, "budget": 0.0, "retry_on": ["5xx"]},
                                 passive={"max_fails": 0}))
        gw.backend.status["a"] = 503
        codes = [gw.request("GET", "/v1/x").code for _ in range(10)]
        self.assertEqual(gw.sample("upstream_retries_total", pool="main"), 3.0)
        self.assertIn(503, codes)

    def test_unreachable_names_instances(self) -> None:
        """(d) When no instance can be connected to, the 502 names the instances tried."""
        gw = Harness(self, basic(retry={"base_delay": 0}), wrap_agent=RefusingAgent)
        gw.agent.refuse.update({b"a.test:8000", b"b.test:8000"})
        answer = gw.request("GET", "/v1/x")
        self.assertEqual(answer.code, 502)
        self.assertEqual(answer.json()["error"], {
            "message": "could not connect to any upstream instance (tried a, b)",
            "type": "upstream_error", "code": "upstream_unreachable"})
        # Both are out now, but still tried (nothing else is left): the same answer.
        self.assertEqual(gw.request("GET", "/v1/x").json()["error"]["message"],
                         "could not connect to any upstream instance (tried a, b)")
