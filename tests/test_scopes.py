"""
Tests for agent scopes (L{clawproxy.policy.scopes}), JWT and API keys together in the
data plane (L{clawproxy.web.auth}), C{inject_headers} and C{query.NAME} route
conditions: the scope-escape part of the attack matrix, through a whole data plane over
a fake backend on a fake clock.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import jwt
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from clawproxy.config import RouteConfig, hash_key
from clawproxy.config.reader import read_config
from clawproxy.errors import Rejected
from clawproxy.policy.auth import extract_credential, missing_credentials
from clawproxy.policy.routing import canonical_path, query_parameters
from clawproxy.policy.scopes import ScopeSet, check_scopes
from clawproxy.web.auth import HeadAuthCheck, Identify, InjectHeaders, auth_stages
from tests.test_gateway import Harness, two_instance_pool

SECRET = "hs-secret-of-at-least-32-bytes!!"
FINANCE_KEY = "sk-finance-0123456789"
HR_KEY = "sk-hr-0123456789"
SCOPE = "/api/v1/finance/*"

#: (path as sent, status, path the backend receives when allowed): every way of
#: writing a path outside C{/api/v1/finance/*} that a backend might still resolve to
#: somewhere else.
ESCAPES = [
    (b"/api/v1/finance/report", 200, b"/api/v1/finance/report"),
    (b"/api/v1/finance", 200, b"/api/v1/finance"),
    (b"/api/v1/fin%61nce/x", 200, b"/api/v1/finance/x"),
    (b"/api/v1/finance/a/../b", 200, b"/api/v1/finance/b"),
    (b"/api/v1/finance/%252e%252e/hr/x", 200, b"/api/v1/finance/%252e%252e/hr/x"),
    (b"/api/v1/finance/../hr/x", 403, None),
    (b"/api/v1/finance/%2e%2e/hr/x", 403, None),
    (b"/api/v1/finance/%2E%2e/hr/x", 403, None),
    (b"/api/v1/finance/.%2e/hr/x", 403, None),
    (b"/api/v1/finance/./../hr/x", 403, None),
    (b"/api/v1/finance//../../hr/x", 403, None),
    (b"//api/v1/hr/x", 403, None),
    (b"/api/v1/./hr/x", 403, None),
    (b"/api/v1/finance-secret/x", 403, None),
    (b"/API/V1/FINANCE/x", 403, None),
    (b"/api/v1/hr/x", 403, None),
    (b"/api/v1/finance%2F..%2Fhr/x", 400, None),
    (b"/api/v1/finance/%2e%2e%2fhr/x", 400, None),
    (b"/api/v1/finance/..;/hr/x", 400, None),
    (b"/api/v1/finance;x=1/../hr/x", 400, None),
    (b"/api/v1/finance/%3B/../../hr/x", 400, None),
    (b"/api/v1/finance/x%00/../../hr", 400, None),
    (b"/api/v1/finance/..%5Chr", 400, None),
    (b"/api/v1/finance/%zz", 400, None),
]


def token(sub: str = "finance-agent", **extra: Any) -> str:
    claims = {"sub": sub, "exp": 600, "iat": 0, **extra}
    return jwt.encode(claims, SECRET, "HS256")


def config(**auth: Any) -> dict[str, Any]:
    return {
        "auth": auth or {"api_key": {}, "jwt": {"secret": SECRET}},
        "agents": {
            "finance-agent": {
                "keys": [hash_key(FINANCE_KEY)], "scopes": [SCOPE],
                "inject_headers": {"Authorization": "Bearer backend-finance",
                                   "X-Tenant": "finance"},
            },
            "hr-agent": {"keys": [hash_key(HR_KEY)], "scopes": ["/api/v1/hr/*", "/admin/*"]},
        },
        "pools": {"main": two_instance_pool()},
        "routes": [
            {"path": "/admin/*", "pool": "main", "allowed_agents": ["hr-agent"]},
            {"path": "/open/*", "pool": "main"},
            {"path": "/*", "pool": "main", "auth_required": True},
        ],
    }


class ScopeSetTests(SynchronousTestCase):
    """The glob forms, on canonical paths."""

    def test_forms(self) -> None:
        s = ScopeSet(["/api/v1/finance/*", "/tools/*/run", "/exact"])
        for path in ("/api/v1/finance", "/api/v1/finance/", "/api/v1/finance/a/b",
                     "/tools/x/run", "/tools/x/y/run", "/exact"):
            self.assertTrue(s.allows(path), path)
        for path in ("/api/v1/financex", "/api/v1", "/tools/x/run/more", "/exact/",
                     "/Exact", "/"):
            self.assertFalse(s.allows(path), path)

    def test_none_is_everything(self) -> None:
        """No C{scopes}: every path; an empty list: none."""
        check_scopes(None, b"/anything")
        self.assertEqual(self.assertRaises(Rejected, check_scopes, (), b"/x").status, 403)

    def test_escapes_on_canonical_path(self) -> None:
        """Each escape, canonicalised, is refused (403) or malformed (400)."""
        for raw, status, forwarded in ESCAPES:
            try:
                path = canonical_path(raw)
                check_scopes((SCOPE,), path)
            except Rejected as e:
                self.assertEqual(e.status, status, raw)
                continue
            self.assertEqual((status, path), (200, forwarded), raw)


class CredentialTests(SynchronousTestCase):
    """L{extract_credential}: how API keys and JWTs coexist."""

    def headers(self, **values: str | list[str]) -> Headers:
        h = Headers()
        for name, value in values.items():
            raw = value if isinstance(value, list) else [value]
            h.setRawHeaders(name.replace("_", "-").encode(), [v.encode() for v in raw])
        return h

    def test_kinds(self) -> None:
        t = token()
        self.assertEqual(extract_credential(self.headers(Authorization=f"Bearer {t}")),
                         ("jwt", t.encode()))
        self.assertEqual(extract_credential(self.headers(Authorization="Bearer sk-1")),
                         ("key", b"sk-1"))
        self.assertEqual(extract_credential(self.headers(X_API_Key="sk-1")), ("key", b"sk-1"))
        self.assertIsNone(extract_credential(self.headers(Authorization="Basic eA==")))

    def test_jwt_only(self) -> None:
        """With API keys off, every bearer value is a token; the key header is not read."""
        self.assertEqual(
            extract_credential(self.headers(Authorization="Bearer sk-1"), api_keys=False),
            ("jwt", b"sk-1"))
        self.assertIsNone(extract_credential(self.headers(X_API_Key="sk-1"), api_keys=False))

    def test_conflicts(self) -> None:
        """An API key and a token, or two tokens: refused, not chosen between."""
        t = token()
        for h, code in ((self.headers(X_API_Key="sk-1", Authorization=f"Bearer {t}"),
                         "invalid_api_key"),
                        (self.headers(Authorization=[f"Bearer {t}", f"Bearer {token('x')}"]),
                         "invalid_api_key")):
            e = self.assertRaises(Rejected, extract_credential, h)
            self.assertEqual((e.status, e.code), (401, code))
            self.assertIn("conflicting", e.message)
        h = self.headers(Authorization=[f"Bearer {t}", "Bearer other"])
        e = self.assertRaises(Rejected, extract_credential, h, api_keys=False)
        self.assertEqual((e.status, e.code), (401, "invalid_token"))

    def test_missing_messages(self) -> None:
        self.assertEqual(missing_credentials().code, "missing_api_key")
        self.assertEqual(missing_credentials(tokens=True, api_keys=False).code, "missing_token")
        self.assertEqual(missing_credentials(tokens=True).code, "missing_credentials")

    def test_missing_is_new_each_time(self) -> None:
        """
        L{Enforce} raises a new 401 for each anonymous request: one instance raised
        again and again would keep every refusal's traceback (and its frames).
        """
        cfg = read_config(config(), {}, ".", refuse=True)
        _, (enforce,) = auth_stages(cfg, Clock())
        route = SimpleNamespace(config=RouteConfig(path="/", auth_required=True))
        refused = [self.assertRaises(Rejected, enforce.process,
                                     SimpleNamespace(route=route, agent=None))
                   for _ in range(2)]
        self.assertEqual([e.code for e in refused], ["missing_credentials"] * 2)
        self.assertIsNot(refused[0], refused[1])


class QueryTests(SynchronousTestCase):
    """L{query_parameters}: what C{query.NAME} conditions see."""

    def test_lookup(self) -> None:
        q = query_parameters(b"lane=can%61ry&x=a+b&empty=&dup=1&dup=1&two=1&two=2")
        self.assertEqual(q("lane"), "canary")
        self.assertEqual(q("x"), "a b")
        self.assertEqual(q("empty"), "")
        self.assertEqual(q("dup"), "1")
        self.assertIsNone(q("two"))
        self.assertIsNone(q("missing"))


class DataPlaneTests(SynchronousTestCase):
    """JWT and API key requests through a whole data plane."""

    def setUp(self) -> None:
        self.gw = Harness(self, config())

    def request(self, path: bytes | str, key: str | None = None, bearer: str | None = None,
                method: str = "GET", **headers: str) -> Any:
        h = {name.replace("_", "-"): value for name, value in headers.items()}
        if key is not None:
            h["X-API-Key"] = key
        if bearer is not None:
            h["Authorization"] = f"Bearer {bearer}"
        return self.gw.request(method, path, headers=h)

    def test_jwt_reaches_backend_with_injected_headers(self) -> None:
        """
        A JWT's C{sub} is the agent: its C{inject_headers} go upstream in place of the
        client's credentials, and the access log and metrics name it.
        """
        answer = self.request("/api/v1/finance/report", bearer=token(), X_Other="kept")
        self.assertEqual(answer.code, 200)
        seen = self.gw.backend.seen[-1]
        self.assertEqual(seen.uri, b"/api/v1/finance/report")
        self.assertEqual(seen.headers.getRawHeaders(b"authorization"),
                         [b"Bearer backend-finance"])
        self.assertEqual(seen.headers.getRawHeaders(b"x-tenant"), [b"finance"])
        self.assertEqual(seen.headers.getRawHeaders(b"x-other"), [b"kept"])
        self.assertEqual(self.gw.log_lines()[-1]["agent"], "finance-agent")
        self.assertEqual(self.gw.sample("requests_total", route="/*", method="GET",
                                        status="200", agent="finance-agent"), 1.0)

    def test_injected_headers_replace_every_client_credential(self) -> None:
        """Basic credentials and the API key header never reach the backend either."""
        self.request("/api/v1/finance/x", key=FINANCE_KEY, Authorization="Basic dTpw")
        seen = self.gw.backend.seen[-1]
        self.assertEqual(seen.headers.getRawHeaders(b"authorization"),
                         [b"Bearer backend-finance"])
        self.assertIsNone(seen.headers.getRawHeaders(b"x-api-key"))

    def test_no_injection_strips_credentials(self) -> None:
        """An agent without C{inject_headers}: its bearer token is removed, nothing added."""
        self.request("/api/v1/hr/x", bearer=token("hr-agent"))
        seen = self.gw.backend.seen[-1]
        self.assertIsNone(seen.headers.getRawHeaders(b"authorization"))
        self.assertIsNone(seen.headers.getRawHeaders(b"x-tenant"))

    def test_scope_escapes(self) -> None:
        """
        The attack matrix's scope escapes, with a JWT and with an API key: outside the
        scope 403, malformed 400, inside 200 with the backend sent exactly the path
        that was matched; nothing refused reaches the backend.
        """
        for credential in ({"bearer": token()}, {"key": FINANCE_KEY}):
            for raw, status, forwarded in ESCAPES:
                before = len(self.gw.backend.seen)
                answer = self.request(raw, **credential)
                self.assertEqual(answer.code, status, (raw, answer.body))
                if status == 200:
                    self.assertEqual(self.gw.backend.seen[-1].uri, forwarded, raw)
                    continue
                self.assertEqual(len(self.gw.backend.seen), before, raw)
                error = answer.json()["error"]
                self.assertEqual(set(error), {"message", "type", "code"})
                self.assertEqual(error["code"],
                                 "permission_denied" if status == 403 else "invalid_path")

    def test_scope_refused_at_head(self) -> None:
        """The head check refuses an out-of-scope path before the body is read."""
        h = Headers({b"x-api-key": [FINANCE_KEY.encode()]})
        e = self.assertRaises(Rejected, self.gw.plane.check_head, b"POST",
                              b"/api/v1/finance/%2e%2e/hr/x?a=1", h)
        self.assertEqual((e.status, e.code), (403, "permission_denied"))
        self.gw.plane.check_head(b"POST", b"/api/v1/finance/x?a=1", h)
        e = self.assertRaises(Rejected, self.gw.plane.check_head, b"POST",
                              b"/api/v1/finance%2F..%2Fhr", h)
        self.assertEqual((e.status, e.code), (400, "invalid_path"))

    def test_token_refused_at_head(self) -> None:
        """An invalid token is a 401 at the head; so is no credential where all need one."""
        bad = Headers({b"authorization": [f"Bearer {token(exp=-100)}".encode()]})
        e = self.assertRaises(Rejected, self.gw.plane.check_head, b"GET", b"/x", bad)
        self.assertEqual((e.status, e.code), (401, "invalid_token"))
        e = self.assertRaises(Rejected, self.gw.plane.check_head, b"GET", b"/x", Headers())
        self.assertEqual((e.status, e.code), (401, "missing_credentials"))
        self.gw.plane.check_head(b"GET", b"/open/x", Headers())

    def test_allowed_agents_by_token(self) -> None:
        """
        C{allowed_agents} applies to a token's agent as to a key's: C{ops} (no scopes)
        is refused by it, C{finance-agent} already by its scopes.
        """
        self.assertEqual(self.request("/admin/x", bearer=token("hr-agent")).code, 200)
        self.assertEqual(self.request("/admin/x", key=HR_KEY).code, 200)
        for sub in ("ops", "finance-agent"):
            answer = self.request("/admin/x", bearer=token(sub))
            self.assertEqual(answer.code, 403)
            self.assertEqual(answer.json()["error"]["code"], "permission_denied")

    def test_unknown_agent_gets_defaults(self) -> None:
        """A token for an agent not under C{agents}: identified, no scopes, no injection."""
        answer = self.request("/anything/x", bearer=token("new-bot"))
        self.assertEqual(answer.code, 200)
        self.assertEqual(self.gw.log_lines()[-1]["agent"], "new-bot")
        self.assertIsNone(self.gw.backend.seen[-1].headers.getRawHeaders(b"authorization"))

    def test_coexistence(self) -> None:
        """A bearer API key works; an invalid JWT never falls back; two credentials: 401."""
        self.assertEqual(self.request("/api/v1/hr/x", bearer=HR_KEY).code, 200)
        answer = self.request("/api/v1/hr/x", bearer=token("hr-agent", exp=-100))
        self.assertEqual((answer.code, answer.json()["error"]["code"]),
                         (401, "invalid_token"))
        self.assertIn('error="invalid_token"', answer.header("WWW-Authenticate"))
        answer = self.request("/api/v1/hr/x", key=HR_KEY, bearer=token("hr-agent"))
        self.assertEqual(answer.code, 401)
        answer = self.request("/api/v1/hr/x")
        self.assertEqual((answer.code, answer.json()["error"]["code"]),
                         (401, "missing_credentials"))

    def test_jwt_only(self) -> None:
        """With only JWTs on, a bearer API key is an invalid token."""
        gw = Harness(self, config(jwt={"secret": SECRET}))
        answer = gw.request("GET", "/api/v1/hr/x", headers={"Authorization": f"Bearer {HR_KEY}"})
        self.assertEqual((answer.code, answer.json()["error"]["code"]), (401, "invalid_token"))
        answer = gw.request("GET", "/api/v1/hr/x", headers={"X-API-Key": HR_KEY})
        self.assertEqual((answer.code, answer.json()["error"]["code"]), (401, "missing_token"))
        answer = gw.request("GET", "/api/v1/hr/x",
                            headers={"Authorization": f"Bearer {token('hr-agent')}",
                                     "X-API-Key": "not-ours"})
        self.assertEqual(answer.code, 200)
        self.assertEqual(gw.backend.seen[-1].headers.getRawHeaders(b"x-api-key"),
                         [b"not-ours"])

    def test_parts(self) -> None:
        """Identify (with JWT), HeadAuthCheck and InjectHeaders are plugged in."""
        parts = self.gw.plane.parts
        [identify] = [s for s in parts.stages if isinstance(s, Identify)]
        self.assertIsNotNone(identify.jwt)
        self.assertTrue(any(isinstance(c, HeadAuthCheck) for c in parts.head_checks))
        self.assertTrue(any(isinstance(s, InjectHeaders) for s in parts.stages))

    def test_no_injection_stage_when_unused(self) -> None:
        """No agent with C{inject_headers}: no stage runs for it."""
        cfg = config()
        del cfg["agents"]["finance-agent"]["inject_headers"]
        gw = Harness(self, cfg)
        self.assertFalse(any(isinstance(s, InjectHeaders) for s in gw.plane.parts.stages))


class BasePathTests(SynchronousTestCase):
    """
    Scopes are written like route paths, without C{server.base_path}: they match the
    path the upstream receives.
    """

    def test_base_path(self) -> None:
        cfg = config()
        cfg["server"] = {"base_path": "/api"}
        cfg["agents"]["finance-agent"]["scopes"] = ["/v1/finance/*"]
        cfg["routes"] = [{"path": "/v1/*", "pool": "main"}]
        gw = Harness(self, cfg)
        headers = {"Authorization": f"Bearer {token()}"}
        self.assertEqual(gw.request("GET", "/api/v1/finance/x", headers=headers).code, 200)
        self.assertEqual(gw.backend.seen[-1].uri, b"/v1/finance/x")
        for path in (b"/api/v1/finance/%2e%2e/hr", b"/api/v1/hr/x", b"/api/api/v1/finance/x"):
            answer = gw.request("GET", path, headers=headers)
            self.assertEqual(answer.code, 403, path)
        self.assertEqual(len(gw.backend.seen), 1)
        h = Headers({b"authorization": [f"Bearer {token()}".encode()]})
        gw.plane.check_head(b"GET", b"/api/v1/finance/x", h)
        e = self.assertRaises(Rejected, gw.plane.check_head, b"GET", b"/api/v1/hr", h)
        self.assertEqual(e.status, 403)
        gw.plane.check_head(b"GET", b"/elsewhere/v1/hr", h)  # 404 later, not 403


class QueryRouteTests(SynchronousTestCase):
    """Routes C{match} on C{query.NAME}."""

    def test_query_match(self) -> None:
        pools = {"main": two_instance_pool(),
                 "canary": {"instances": [{"id": "c", "url": "http://c.test:8000"}],
                            "health_check": {"enabled": False}}}
        gw = Harness(self, {"pools": pools, "routes": [
            {"path": "/v1/*", "pool": "canary", "match": {"query.lane": "canary"}},
            {"path": "/v1/*", "pool": "main"},
        ]})
        for query, instance in ((b"?lane=canary", "c"), (b"?lane=can%61ry&x=1", "c"),
                                (b"?lane=prod", "a"), (b"", "b"),
                                (b"?lane=canary&lane=prod", "a"), (b"?Lane=canary", "b")):
            gw.request("GET", b"/v1/x" + query)
            self.assertEqual(gw.backend.seen[-1].instance, instance, query)
            self.assertEqual(gw.backend.seen[-1].uri, b"/v1/x" + query)


class AdminSectionTests(SynchronousTestCase):
    """The C{auth} section of C{/admin/status}."""

    def test_status(self) -> None:
        """Accepted credentials and the JWT keys in force; never a key or token."""
        gw = Harness(self, config())
        [section] = [s for s in gw.plane.parts.admin_sections if s.name == "auth"]
        gw.request("GET", "/api/v1/hr/x", headers={"Authorization": f"Bearer {token('hr-agent')}"})
        status = section.status()
        self.assertEqual(status, {
            "agents": 2, "api_keys": 2,
            "jwt": {"algorithms": ["HS256"], "kids": [], "default_keys": ["oct"],
                    "key_changes": 0, "cached_tokens": 1},
        })
        self.assertNotIn(SECRET, repr(status))
        self.assertEqual(section.endpoints(), {})
