"""Tests for L{clawproxy.policy.auth} and L{clawproxy.web.auth}."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import sys
from typing import Any

import yaml
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from clawproxy import cli
from clawproxy.config import (
    AgentConfig,
    ApiKeyConfig,
    AuthConfig,
    Config,
    RouteConfig,
    hash_key,
)
from clawproxy.config.reader import read_config
from clawproxy.errors import Rejected
from clawproxy.interfaces import IRequestStage
from clawproxy.policy.auth import (
    MAX_KEY_LENGTH,
    Agent,
    KeyStore,
    KeyStoreError,
    authenticate,
    authorize,
    extract_key,
    load_key_store,
    parse_keys_store,
)
from clawproxy.policy.routing import CompiledRoute
from clawproxy.web.auth import Enforce, Identify, auth_stages, early_check
from clawproxy.web.context import RequestContext

SECRET = "s3cret-finance-key"
OTHER = "another-key-for-ops"
STORE_ONLY = "key-from-the-store"
CHALLENGE = ("WWW-Authenticate", 'Bearer realm="clawproxy"')

POOLS = {"main": {"instances": [{"id": "a", "url": "http://127.0.0.1:9000"}]}}


def make_config(data: dict[str, Any], base_dir: str = ".") -> Config:
    """
    A validated L{Config} from C{data} plus one pool and, unless given, one route; agent
    settings not enforced yet (C{inject_headers}, C{rate_limit}) are read, not refused, so
    that their carrying onto the L{Agent} is checked.
    """
    data = {"pools": POOLS, "routes": [{"path": "/v1/*", "pool": "main"}], **data}
    return read_config(data, {}, base_dir, refuse=False)


def agents_config() -> Config:
    return make_config(
        {
            "agents": {
                "finance": {"keys": [hash_key(SECRET)], "tier": "vip",
                            "inject_headers": {"Authorization": "Bearer upstream"}},
                "ops": {"keys": [hash_key(OTHER)]},
            }
        }
    )


def headers(**values: str | list[str]) -> Headers:
    """C{Headers} from keyword arguments (C{X_API_Key} names C{X-API-Key})."""
    h = Headers()
    for name, value in values.items():
        raw = value if isinstance(value, list) else [value]
        h.setRawHeaders(name.replace("_", "-").encode(), [v.encode() for v in raw])
    return h


def make_ctx(**values: str) -> RequestContext:
    request = DummyRequest([b"v1", b"chat"])
    for name, value in values.items():
        request.requestHeaders.setRawHeaders(name.replace("_", "-").encode(), [value.encode()])
    return RequestContext(
        request=request, request_id="rid", client_ip="192.0.2.1", method=b"POST",
        path=b"/v1/chat", query=b"", started=0.0,
    )


class HashFormatTests(SynchronousTestCase):
    """Presented keys are hashed exactly as C{clawproxy hash-key} prints them."""

    def hash_key_cli(self, key: str) -> str:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(cli.main(["hash-key", key]), 0)
        return out.getvalue().strip()

    def test_cli_output_authenticates(self) -> None:
        """A key stored as C{clawproxy hash-key} prints it is found by its plain bytes."""
        printed = self.hash_key_cli(SECRET)
        self.assertEqual(printed, "sha256:" + hashlib.sha256(SECRET.encode()).hexdigest())
        store = KeyStore.build({"a": AgentConfig(name="a", keys=(printed,))})
        self.assertEqual(store.lookup(SECRET.encode()).name, "a")

    def test_non_ascii_key(self) -> None:
        """A non-ASCII key sent as UTF-8 bytes matches its C{hash-key} form."""
        key = "clé-ü-🔑"
        store = KeyStore.build({"a": AgentConfig(name="a", keys=(self.hash_key_cli(key),))})
        self.assertEqual(store.lookup(key.encode("utf-8")).name, "a")

    def test_upper_case_hex(self) -> None:
        """A stored form in upper-case hex is accepted, as the config accepts it."""
        stored = "sha256:" + hashlib.sha256(b"k").hexdigest().upper()
        store = KeyStore.build({}, {"a": [stored]})
        self.assertEqual(store.lookup(b"k").name, "a")

    def test_stored_form_is_not_a_key(self) -> None:
        """Presenting the stored form itself (e.g. copied from a keys store) fails."""
        store = KeyStore.build(agents_config().agents)
        self.assertIsNone(store.lookup(hash_key(SECRET).encode()))

    def test_malformed_stored_key(self) -> None:
        """L{KeyStore} refuses a stored key in another shape."""
        self.assertRaises(ValueError, KeyStore, [Agent("a")], [("a", SECRET)])
        self.assertRaises(ValueError, KeyStore, [Agent("a")], [("a", "sha256:abc")])


class LookupTests(SynchronousTestCase):
    """L{KeyStore.lookup}."""

    def setUp(self) -> None:
        self.store = KeyStore.build(agents_config().agents)

    def test_valid(self) -> None:
        """Each agent's key finds that agent, with its settings."""
        finance = self.store.lookup(SECRET.encode())
        self.assertEqual(finance.name, "finance")
        self.assertEqual(finance.tier, "vip")
        self.assertEqual(finance.inject_headers, {"Authorization": "Bearer upstream"})
        self.assertEqual(self.store.lookup(OTHER.encode()).name, "ops")

    def test_invalid(self) -> None:
        """Unknown keys, near misses and the empty key find nothing."""
        for key in (b"nope", SECRET.encode() + b"x", SECRET.encode()[:-1], b"",
                    SECRET.upper().encode()):
            self.assertIsNone(self.store.lookup(key), key)

    def test_compare_digest_confirms(self) -> None:
        """
        A hit is confirmed with L{hmac.compare_digest} on the two SHA-256 digests, and
        only a true answer from it identifies the agent.
        """
        calls: list[tuple[bytes, bytes]] = []

        def spy(a: bytes, b: bytes) -> bool:
            calls.append((a, b))
            return False

        self.patch(hmac, "compare_digest", spy)
        self.assertIsNone(self.store.lookup(SECRET.encode()))
        digest = hashlib.sha256(SECRET.encode()).digest()
        self.assertEqual(calls, [(digest, digest)])

    def test_no_plain_comparison(self) -> None:
        """The store holds digests only: neither it nor its agents show a key or hash."""
        text = repr(self.store) + repr(self.store.agents) + repr(vars(self.store))
        self.assertNotIn(SECRET, text)
        self.assertNotIn(hash_key(SECRET)[7:], text)
        self.assertNotIn(hash_key(SECRET)[7:], repr(self.store.lookup(SECRET.encode())))


class ExtractKeyTests(SynchronousTestCase):
    """L{extract_key} and L{authenticate}."""

    def setUp(self) -> None:
        self.store = KeyStore.build(agents_config().agents)

    def assert_invalid(self, h: Headers, header_name: str = "X-API-Key") -> Rejected:
        e = self.assertRaises(Rejected, authenticate, self.store, h, header_name)
        self.assertEqual((e.status, e.type, e.code), (401, "authentication_error",
                                                      "invalid_api_key"))
        self.assertIn(CHALLENGE, e.headers)
        return e

    def test_x_api_key(self) -> None:
        """The key is read from C{X-API-Key} by default."""
        self.assertEqual(extract_key(headers(X_API_Key=SECRET)), SECRET.encode())
        self.assertEqual(authenticate(self.store, headers(X_API_Key=SECRET)).name, "finance")

    def test_bearer(self) -> None:
        """C{Authorization: Bearer KEY} works, with the scheme in any case."""
        for value in (f"Bearer {SECRET}", f"bearer {SECRET}", f"BEARER\t {SECRET}"):
            h = headers(Authorization=value)
            self.assertEqual(extract_key(h), SECRET.encode(), value)
            self.assertEqual(authenticate(self.store, h).name, "finance")

    def test_other_schemes_ignored(self) -> None:
        """C{Authorization} in another scheme is not an API key."""
        self.assertIsNone(extract_key(headers(Authorization="Basic dXNlcjpwYXNz")))
        self.assertIsNone(authenticate(self.store, headers(Authorization="Basic dXNlcjpw")))

    def test_none(self) -> None:
        """Without a key, the request is anonymous."""
        self.assertIsNone(extract_key(Headers()))
        self.assertIsNone(authenticate(self.store, Headers()))

    def test_custom_header(self) -> None:
        """A configured header name replaces C{X-API-Key}; Bearer is still accepted."""
        self.assertEqual(
            authenticate(self.store, headers(X_Key=SECRET), "X-Key").name, "finance")
        self.assertEqual(
            authenticate(self.store, headers(Authorization=f"Bearer {OTHER}"), "X-Key").name,
            "ops")
        self.assertIsNone(authenticate(self.store, headers(X_API_Key=SECRET), "X-Key"))

    def test_authorization_as_header(self) -> None:
        """C{header: Authorization} means the Bearer form only."""
        h = headers(Authorization=f"Bearer {SECRET}")
        self.assertEqual(authenticate(self.store, h, "Authorization").name, "finance")
        self.assertIsNone(authenticate(self.store, headers(Authorization=SECRET),
                                       "Authorization"))

    def test_same_key_twice(self) -> None:
        """The same key in both places is fine."""
        h = headers(X_API_Key=SECRET, Authorization=f"Bearer {SECRET}")
        self.assertEqual(authenticate(self.store, h).name, "finance")

    def test_conflicting_keys(self) -> None:
        """Two different keys are refused, even when both are valid."""
        self.assert_invalid(headers(X_API_Key=SECRET, Authorization=f"Bearer {OTHER}"))
        self.assert_invalid(headers(X_API_Key=[SECRET, OTHER]))
        self.assert_invalid(headers(Authorization=[f"Bearer {SECRET}", f"Bearer {OTHER}"]))

    def test_unknown(self) -> None:
        """An unknown key is a 401 with C{WWW-Authenticate} in the SPEC's error shape."""
        e = self.assert_invalid(headers(X_API_Key="wrong-key"))
        self.assertEqual(
            json.loads(e.body()),
            {"error": {"message": "invalid API key", "type": "authentication_error",
                       "code": "invalid_api_key"}},
        )

    def test_empty(self) -> None:
        """An empty key, or a Bearer scheme without a token, is invalid, not anonymous."""
        self.assert_invalid(headers(X_API_Key=""))
        self.assert_invalid(headers(Authorization="Bearer"))
        self.assert_invalid(headers(Authorization="Bearer   "))

    def test_too_long(self) -> None:
        """Keys longer than L{MAX_KEY_LENGTH} bytes are refused without being looked up."""
        looked: list[bytes] = []
        self.patch(self.store, "lookup", looked.append)
        self.assert_invalid(headers(X_API_Key="k" * (MAX_KEY_LENGTH + 1)))
        self.assertEqual(looked, [])
        self.assertEqual(extract_key(headers(X_API_Key="k" * MAX_KEY_LENGTH)),
                         b"k" * MAX_KEY_LENGTH)

    def test_no_secret_in_errors(self) -> None:
        """No refusal repeats the key that was sent."""
        cases = [
            headers(X_API_Key=SECRET + "x"),
            headers(X_API_Key=SECRET, Authorization=f"Bearer {OTHER}"),
            headers(Authorization=f"Bearer {SECRET}x"),
            headers(X_API_Key=SECRET * 40),
        ]
        for h in cases:
            e = self.assert_invalid(h)
            text = e.body().decode() + repr(e) + str(e.headers)
            self.assertNotIn(SECRET, text)
            self.assertNotIn(OTHER, text)


class KeysStoreFileTests(SynchronousTestCase):
    """L{load_key_store} with C{auth.api_key.keys_store}."""

    def write(self, content: str | object) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "keys.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(content if isinstance(content, str) else json.dumps(content))
        return path

    def config_with(self, path: str, **extra: Any) -> Config:
        return make_config({"auth": {"api_key": {"keys_store": path}}, **extra})

    def test_merge(self) -> None:
        """
        An agent in both C{agents} and the store gets the keys of both and its other
        settings from C{agents}; one only in the store gets default settings.
        """
        path = self.write({"finance": [hash_key("second-finance-key")],
                           "store-only": [hash_key(STORE_ONLY)]})
        config = self.config_with(path, agents={
            "finance": {"keys": [hash_key(SECRET)], "tier": "vip", "rate_limit": "5/minute"}})
        store = load_key_store(config)
        for key in (SECRET, "second-finance-key"):
            agent = store.lookup(key.encode())
            self.assertEqual(agent.name, "finance")
            self.assertEqual(agent.tier, "vip")
            self.assertEqual(agent.rate_limit, config.agents["finance"].rate_limit)
            self.assertIs(agent.config, config.agents["finance"])
        only = store.lookup(STORE_ONLY.encode())
        self.assertEqual(only, Agent(name="store-only"))
        self.assertIsNone(only.config)
        self.assertEqual(sorted(store.agents), ["finance", "store-only"])
        self.assertEqual(len(store), 3)

    def test_no_file(self) -> None:
        """Without a keys store, the keys come from C{agents} alone."""
        store = load_key_store(agents_config())
        self.assertEqual(len(store), 2)

    def assert_error(self, content: str | object, *fragments: str) -> str:
        path = self.write(content)
        e = self.assertRaises(KeyStoreError, load_key_store, self.config_with(path))
        self.assertIsInstance(e, ValueError)
        self.assertIn(path, str(e))
        for fragment in fragments:
            self.assertIn(fragment, str(e))
        return str(e)

    def test_bad_json(self) -> None:
        """Malformed JSON is reported with the file and the position."""
        self.assert_error('{"a": ["sha256:', "not valid JSON at line 1")

    def test_bad_shape(self) -> None:
        """The top level must be an object of lists."""
        self.assert_error(["x"], "must be a JSON object")
        self.assert_error({"a": hash_key("k")}, "a: must be a list of stored keys")
        self.assert_error({"": []}, "not a valid agent name")

    def test_plain_key(self) -> None:
        """A plain key is refused, every bad entry is listed, and none is echoed."""
        message = self.assert_error(
            {"a": [hash_key("k"), SECRET], "b": ["sha256:1234", 42]},
            "a[1]: must be a stored key", "b[0]", "b[1]", "clawproxy hash-key",
        )
        self.assertNotIn(SECRET, message)

    def test_duplicate_agent(self) -> None:
        """An agent listed twice in the file is an error, not a silent overwrite."""
        self.assert_error('{"a": [], "a": []}', "'a' is listed twice")

    def test_key_of_two_agents(self) -> None:
        """A key given to two agents (across the config and the file) is an error."""
        path = self.write({"intruder": [hash_key(SECRET)]})
        config = self.config_with(path, agents={"finance": {"keys": [hash_key(SECRET)]}})
        e = self.assertRaises(KeyStoreError, load_key_store, config)
        self.assertIn("already belongs to agent 'finance'", str(e))
        self.assertIn(path, str(e))

    def test_unreadable(self) -> None:
        """A missing file is reported with its name."""
        path = os.path.abspath(self.mktemp())
        config = Config(auth=AuthConfig(api_key=ApiKeyConfig(keys_store=path)))
        e = self.assertRaises(KeyStoreError, load_key_store, config)
        self.assertIn(path, str(e))

    def test_parse_lower_cases(self) -> None:
        """L{parse_keys_store} gives stored forms in lower case."""
        upper = hash_key("k").upper().replace("SHA256", "sha256")
        self.assertEqual(parse_keys_store({"a": [upper]}, "f"), {"a": [hash_key("k")]})


class AuthorizeTests(SynchronousTestCase):
    """L{authorize}: C{auth_required} and C{allowed_agents}."""

    finance = Agent(name="finance")

    def test_anonymous_on_open_route(self) -> None:
        """A route without requirements lets anonymous requests through."""
        self.assertIsNone(authorize(RouteConfig(path="/"), None))
        self.assertIsNone(authorize(RouteConfig(path="/"), self.finance))

    def test_auth_required(self) -> None:
        """C{auth_required} without an agent is a 401 C{missing_api_key}."""
        e = self.assertRaises(Rejected, authorize, RouteConfig(path="/", auth_required=True),
                              None)
        self.assertEqual((e.status, e.type, e.code), (401, "authentication_error",
                                                      "missing_api_key"))
        self.assertIn(CHALLENGE, e.headers)
        self.assertIsNone(authorize(RouteConfig(path="/", auth_required=True), self.finance))

    def test_allowed_agents(self) -> None:
        """An agent not in C{allowed_agents} is a 403; anonymous is a 401."""
        route = RouteConfig(path="/", auth_required=True, allowed_agents=("ops",))
        e = self.assertRaises(Rejected, authorize, route, self.finance)
        self.assertEqual((e.status, e.type, e.code), (403, "permission_error",
                                                      "permission_denied"))
        self.assertEqual(e.headers, ())
        self.assertIsNone(authorize(route, Agent(name="ops")))
        e = self.assertRaises(Rejected, authorize, route, None)
        self.assertEqual(e.status, 401)

    def test_allowed_agents_implies_auth(self) -> None:
        """C{allowed_agents} alone (hand-built config) still refuses anonymous requests."""
        route = RouteConfig(path="/", allowed_agents=("ops",))
        self.assertEqual(self.assertRaises(Rejected, authorize, route, None).status, 401)


class StageTests(SynchronousTestCase):
    """L{Identify}, L{Enforce}, L{early_check} and L{auth_stages}."""

    def setUp(self) -> None:
        self.config = make_config({
            "agents": {
                "finance": {"keys": [hash_key(SECRET)], "tier": "vip"},
                "ops": {"keys": [hash_key(OTHER)]},
            },
            "routes": [
                {"path": "/v1/*", "pool": "main", "match": {"agent.tier": "vip"},
                 "allowed_agents": ["finance"]},
                {"path": "/v1/*", "pool": "main", "auth_required": True},
            ],
        })
        self.identify, self.stages = auth_stages(self.config)
        self.routes = [CompiledRoute(r, n) for n, r in enumerate(self.config.routes)]

    def test_interface(self) -> None:
        """Both stages provide L{IRequestStage}."""
        self.assertEqual([type(s) for s in self.identify], [Identify])
        self.assertEqual([type(s) for s in self.stages], [Enforce])
        for stage in self.identify + self.stages:
            self.assertTrue(verifyObject(IRequestStage, stage))

    def test_identify(self) -> None:
        """
        L{Identify} sets the agent and its name, so C{agent.tier} route conditions
        match, and removes the gateway's key from the headers relayed upstream.
        """
        ctx = make_ctx(X_API_Key=SECRET, Authorization=f"Bearer {SECRET}")
        ctx.request.requestHeaders.addRawHeader(b"authorization", b"Basic dXNlcg==")
        self.assertIsNone(self.identify[0].process(ctx))
        self.assertEqual(ctx.agent.name, "finance")
        self.assertEqual(ctx.agent_name, "finance")
        self.assertTrue(self.routes[0].matches_conditions(lambda n: None, None, ctx.agent))
        h = ctx.request.requestHeaders
        self.assertIsNone(h.getRawHeaders(b"x-api-key"))
        self.assertEqual(h.getRawHeaders(b"authorization"), [b"Basic dXNlcg=="])

    def test_identify_anonymous(self) -> None:
        """Without a key the request stays anonymous and C{agent.*} conditions fail."""
        ctx = make_ctx()
        self.identify[0].process(ctx)
        self.assertIsNone(ctx.agent)
        self.assertEqual(ctx.agent_name, "-")
        self.assertFalse(self.routes[0].matches_conditions(lambda n: None, None, ctx.agent))

    def test_identify_invalid(self) -> None:
        """A wrong key is refused with a 401 before routing."""
        ctx = make_ctx(Authorization="Bearer wrong")
        e = self.assertRaises(Rejected, self.identify[0].process, ctx)
        self.assertEqual((e.status, e.code), (401, "invalid_api_key"))
        self.assertIsNone(ctx.agent)

    def test_enforce(self) -> None:
        """L{Enforce} applies the matched route's requirements to C{ctx.agent}."""
        ctx = make_ctx(X_API_Key=OTHER)
        self.identify[0].process(ctx)
        ctx.route = self.routes[0]
        self.assertEqual(self.assertRaises(Rejected, self.stages[0].process, ctx).status, 403)
        ctx.route = self.routes[1]
        self.assertIsNone(self.stages[0].process(ctx))
        anonymous = make_ctx()
        anonymous.route = self.routes[1]
        e = self.assertRaises(Rejected, self.stages[0].process, anonymous)
        self.assertEqual((e.status, e.code), (401, "missing_api_key"))
        self.assertIn(CHALLENGE, e.headers)

    def test_early_check(self) -> None:
        """
        L{early_check} answers the 401 for a wrong key from the headers alone, and
        nothing for a good or a missing key.
        """
        store = self.identify[0].store
        rejected = early_check(store, "X-API-Key", headers(X_API_Key="wrong"))
        self.assertEqual((rejected.status, rejected.code), (401, "invalid_api_key"))
        self.assertIsNone(early_check(store, "X-API-Key", headers(X_API_Key=SECRET)))
        self.assertIsNone(early_check(store, "X-API-Key", Headers()))
        again = self.identify[0].check_headers(headers(X_API_Key="x"))
        self.assertEqual((again.status, again.body(), again.headers),
                         (rejected.status, rejected.body(), rejected.headers))

    def test_no_auth(self) -> None:
        """The default, no auth, adds no stage at all."""
        self.assertEqual(auth_stages(make_config({})), ([], []))

    def test_custom_header_and_store(self) -> None:
        """C{auth.api_key.header} and the keys store reach the identify stage."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "keys.json"), "w") as f:
            json.dump({"ops": [hash_key(STORE_ONLY)]}, f)
        config = make_config(
            yaml.safe_load("auth: {api_key: {header: X-Key, keys_store: keys.json}}"),
            directory,
        )
        identify, stages = auth_stages(config)
        ctx = make_ctx(X_Key=STORE_ONLY)
        identify[0].process(ctx)
        self.assertEqual(ctx.agent_name, "ops")
        self.assertEqual([type(s) for s in stages], [Enforce])

    def test_hand_built_fails_closed(self) -> None:
        """A route requiring auth with nothing to identify agents refuses everyone."""
        config = Config(routes=(RouteConfig(path="/", auth_required=True),))
        identify, stages = auth_stages(config)
        self.assertEqual(identify, [])
        ctx = make_ctx(X_API_Key=SECRET)
        ctx.route = CompiledRoute(config.routes[0], 0)
        self.assertEqual(self.assertRaises(Rejected, stages[0].process, ctx).status, 401)
