"""Tests for L{clawproxy.policy.routing}."""

from __future__ import annotations

from collections import Counter
from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

from clawproxy.config import Config, parse_config
from clawproxy.errors import Rejected
from clawproxy.policy.routing import Router, canonical_path, sticky_split, strip_base


def config(routes: list[dict[str, Any]], **extra: Any) -> Config:
    """A config with pools C{a} (qwen3 models) and C{b} (llama), plus C{routes}."""
    data: dict[str, Any] = {
        "pools": {
            "a": {"models": ["qwen3:*", "sim-small"],
                  "instances": [{"id": "a1", "url": "http://a.test:1"}]},
            "b": {"models": ["llama*"],
                  "instances": [{"id": "b1", "url": "http://b.test:1"}]},
        },
        "routes": routes,
    }
    data.update(extra)
    return parse_config(data, environ={})


def route_for(router: Router, path: str, method: bytes = b"GET",
              headers: dict[str, str] | None = None, body: Any = None,
              agent: Any = None) -> str | None:
    """The path pattern and pool of the first route matching, or None."""
    lower = {k.lower(): v for k, v in (headers or {}).items()}
    for route in router.candidates(path, method):
        if route.matches_conditions(lambda n: lower.get(n.lower()), body, agent):
            return f"{route.name} -> {route.config.pool}"
    return None


@attrs.frozen
class Agent:
    """An agent as route conditions see it."""

    name: str
    tier: str | None = None


class CanonicalPathTests(SynchronousTestCase):
    """L{canonical_path} gives one form for matching and forwarding, or a 400."""

    def assertRejected(self, raw: bytes) -> Rejected:
        """C{raw} is refused with a 400 C{invalid_path}."""
        try:
            result = canonical_path(raw)
        except Rejected as e:
            self.assertEqual((e.status, e.code), (400, "invalid_path"))
            return e
        self.fail(f"{raw!r} was accepted as {result!r}")

    def test_plain_path_unchanged(self) -> None:
        """An already canonical path comes back as it is."""
        self.assertEqual(canonical_path(b"/v1/chat/completions"), b"/v1/chat/completions")
        self.assertEqual(canonical_path(b"/"), b"/")
        self.assertEqual(canonical_path(b"/a/b/"), b"/a/b/")

    def test_dot_segments_resolved(self) -> None:
        """C{.} and C{..} segments are resolved, never climbing above the root."""
        self.assertEqual(canonical_path(b"/a/./b/../c"), b"/a/c")
        self.assertEqual(canonical_path(b"/../../etc/passwd"), b"/etc/passwd")
        self.assertEqual(canonical_path(b"/.."), b"/")
        self.assertEqual(canonical_path(b"/a/b/.."), b"/a/")
        self.assertEqual(canonical_path(b"/a/."), b"/a/")

    def test_double_slashes_merged(self) -> None:
        """Runs of C{/} collapse into one, including at the start."""
        self.assertEqual(canonical_path(b"//x//y///z"), b"/x/y/z")

    def test_unreserved_escapes_decoded(self) -> None:
        """Percent-encoded unreserved characters are decoded; others are upper-cased."""
        self.assertEqual(canonical_path(b"/%7euser/%41%2D"), b"/~user/A-")
        self.assertEqual(canonical_path(b"/a%20b/%c3%a9"), b"/a%20b/%C3%A9")

    def test_encoded_dots_resolved(self) -> None:
        """C{%2e%2e} is a C{..} segment once decoded, so it cannot escape a prefix."""
        self.assertEqual(canonical_path(b"/v1/%2e%2e/admin"), b"/admin")
        self.assertEqual(canonical_path(b"/v1/%2E"), b"/v1/")

    def test_encoded_slash_rejected(self) -> None:
        """An encoded C{/} (either case) is refused rather than guessed at."""
        self.assertRejected(b"/a%2Fb")
        self.assertRejected(b"/a%2fb")

    def test_backslash_rejected(self) -> None:
        """A C{\\}, raw or encoded, is refused."""
        self.assertRejected(b"/a\\b")
        self.assertRejected(b"/a%5Cb")
        self.assertRejected(b"/a%5cb")

    def test_nul_rejected(self) -> None:
        """A NUL byte, raw or encoded, is refused."""
        self.assertRejected(b"/a\x00b")
        self.assertRejected(b"/a%00b")

    def test_bad_escape_rejected(self) -> None:
        """A C{%} not followed by two hex digits is refused."""
        for raw in (b"/a%zz", b"/a%2", b"/a%", b"/%g0"):
            self.assertRejected(raw)

    def test_relative_target_rejected(self) -> None:
        """A target that does not start with C{/} is refused."""
        self.assertRejected(b"v1/models")
        self.assertRejected(b"http://evil.test/v1")


class StripBaseTests(SynchronousTestCase):
    """L{strip_base} removes C{server.base_path} on a segment boundary."""

    def test_no_base(self) -> None:
        """Without a base path every path is kept."""
        self.assertEqual(strip_base(b"/v1/x", b""), b"/v1/x")

    def test_under_base(self) -> None:
        """A path under the base loses the base; the base itself becomes C{/}."""
        self.assertEqual(strip_base(b"/api/v1/chat", b"/api/v1"), b"/chat")
        self.assertEqual(strip_base(b"/api/v1", b"/api/v1"), b"/")
        self.assertEqual(strip_base(b"/api/v1/", b"/api/v1"), b"/")

    def test_not_under_base(self) -> None:
        """A path that only shares a prefix string, or is elsewhere, is not under it."""
        self.assertIsNone(strip_base(b"/api/v1x/chat", b"/api/v1"))
        self.assertIsNone(strip_base(b"/other", b"/api/v1"))
        self.assertIsNone(strip_base(b"/api", b"/api/v1"))


class RouteMatchingTests(SynchronousTestCase):
    """Route paths, methods and C{match} conditions; the first match wins."""

    def test_exact_path(self) -> None:
        """An exact route matches only that path."""
        router = Router(config([{"path": "/v1/chat/completions", "pool": "a"}]))
        self.assertEqual(route_for(router, "/v1/chat/completions"), "/v1/chat/completions -> a")
        self.assertIsNone(route_for(router, "/v1/chat/completions/x"))
        self.assertIsNone(route_for(router, "/v1/chat"))

    def test_prefix_path(self) -> None:
        """C{/x/*} matches C{/x} and everything below it, but not C{/xy}."""
        router = Router(config([{"path": "/tools/*", "pool": "a"}]))
        for path in ("/tools", "/tools/", "/tools/a", "/tools/a/b/c"):
            self.assertEqual(route_for(router, path), "/tools/* -> a", path)
        self.assertIsNone(route_for(router, "/toolsy"))
        self.assertIsNone(route_for(router, "/"))

    def test_glob_path(self) -> None:
        """A pattern with glob characters elsewhere is matched as a glob."""
        router = Router(config([{"path": "/files/*.json", "pool": "a"},
                                {"path": "/v?/models", "pool": "b"}]))
        self.assertEqual(route_for(router, "/files/x.json"), "/files/*.json -> a")
        self.assertIsNone(route_for(router, "/files/x.yaml"))
        self.assertEqual(route_for(router, "/v2/models"), "/v?/models -> b")
        self.assertIsNone(route_for(router, "/v10/models"))

    def test_methods(self) -> None:
        """A route with C{methods} only matches those methods."""
        router = Router(config([{"path": "/v1/chat", "methods": ["POST"], "pool": "a"},
                                {"path": "/v1/*", "pool": "b"}]))
        self.assertEqual(route_for(router, "/v1/chat", b"POST"), "/v1/chat -> a")
        self.assertEqual(route_for(router, "/v1/chat", b"GET"), "/v1/* -> b")

    def test_first_match_wins(self) -> None:
        """When several routes match, the one listed first is used."""
        router = Router(config([{"path": "/v1/*", "pool": "a"},
                                {"path": "/v1/chat", "pool": "b"}]))
        self.assertEqual(route_for(router, "/v1/chat"), "/v1/* -> a")
        self.assertEqual([r.config.pool for r in router.candidates("/v1/chat", b"GET")],
                         ["a", "b"])

    def test_header_condition(self) -> None:
        """C{header.NAME} compares a request header; failing it falls to the next route."""
        router = Router(config([
            {"path": "/v1/*", "match": {"header.X-User-Tier": "vip"}, "pool": "a"},
            {"path": "/v1/*", "pool": "b"},
        ]))
        self.assertEqual(route_for(router, "/v1/x", headers={"x-user-tier": "vip"}),
                         "/v1/* -> a")
        self.assertEqual(route_for(router, "/v1/x", headers={"X-User-Tier": "free"}),
                         "/v1/* -> b")
        self.assertEqual(route_for(router, "/v1/x"), "/v1/* -> b")

    def test_body_condition_glob(self) -> None:
        """C{body.FIELD} matches the JSON body's field, with globs; a missing field fails."""
        router = Router(config([
            {"path": "/v1/*", "match": {"body.model": "qwen3:*"}, "pool": "a"},
        ]))
        (route,) = router.candidates("/v1/chat", b"POST")
        self.assertTrue(route.needs_body)
        self.assertTrue(route.matches_conditions(lambda n: None, {"model": "qwen3:8b"}, None))
        self.assertFalse(route.matches_conditions(lambda n: None, {"model": "llama3"}, None))
        self.assertFalse(route.matches_conditions(lambda n: None, {}, None))
        self.assertFalse(route.matches_conditions(lambda n: None, None, None))

    def test_agent_condition(self) -> None:
        """C{agent.ATTR} reads the identified agent; anonymous requests never match."""
        router = Router(config([
            {"path": "/v1/*", "match": {"agent.tier": "vip"}, "pool": "a"},
        ]))
        (route,) = router.candidates("/v1/chat", b"POST")
        self.assertFalse(route.needs_body)
        self.assertTrue(route.matches_conditions(lambda n: None, None, Agent("x", "vip")))
        self.assertFalse(route.matches_conditions(lambda n: None, None, Agent("x", "free")))
        self.assertFalse(route.matches_conditions(lambda n: None, None, Agent("x")))
        self.assertFalse(route.matches_conditions(lambda n: None, None, None))

    def test_all_conditions_required(self) -> None:
        """Every condition of a route must hold for it to match."""
        router = Router(config([
            {"path": "/v1/*", "pool": "a",
             "match": {"header.X-Tier": "vip", "body.model": "qwen3:*"}},
        ]))
        (route,) = router.candidates("/v1/chat", b"POST")
        vip = lambda n: "vip"  # noqa: E731
        self.assertTrue(route.matches_conditions(vip, {"model": "qwen3:8b"}, None))
        self.assertFalse(route.matches_conditions(vip, {"model": "llama3"}, None))
        self.assertFalse(route.matches_conditions(lambda n: None, {"model": "qwen3:8b"}, None))

    def test_needs_body(self) -> None:
        """A route that picks its pool by model needs the body; a fixed pool does not."""
        router = Router(config([{"path": "/a"}, {"path": "/b", "pool": "a"},
                                {"path": "/c", "split": {"a": 1, "b": 1}}]))
        self.assertEqual([r.needs_body for r in router.routes], [True, False, False])


class PoolForModelTests(SynchronousTestCase):
    """L{Router.pool_for_model} maps a request's model to a pool."""

    def setUp(self) -> None:
        self.router = Router(config([{"path": "/v1/*"}],
                                    models={"aliases": {"fast": "qwen3:8b"}}))

    def test_glob_and_exact(self) -> None:
        """The first pool whose C{models} match the model serves it."""
        self.assertEqual(self.router.pool_for_model("qwen3:32b"), "a")
        self.assertEqual(self.router.pool_for_model("sim-small"), "a")
        self.assertEqual(self.router.pool_for_model("llama3.1"), "b")

    def test_alias(self) -> None:
        """An alias is resolved before pools are matched."""
        self.assertEqual(self.router.resolve_model("fast"), "qwen3:8b")
        self.assertEqual(self.router.pool_for_model("fast"), "a")

    def test_model_not_found(self) -> None:
        """A model no pool serves is a 404 C{model_not_found}."""
        e = self.assertRaises(Rejected, self.router.pool_for_model, "gpt-4")
        self.assertEqual((e.status, e.code), (404, "model_not_found"))
        self.assertIn("gpt-4", e.message)

    def test_model_missing(self) -> None:
        """A body without a string C{model} is a 400."""
        for model in (None, "", 3, ["qwen3:8b"]):
            e = self.assertRaises(Rejected, self.router.pool_for_model, model)
            self.assertEqual(e.status, 400)

    def test_declared_models(self) -> None:
        """Declared models are the non-glob pool models plus aliases."""
        self.assertEqual(self.router.declared_models(), ["sim-small", "fast"])

    def test_discovered(self) -> None:
        """
        A model no pool declares is served by a pool whose instances reported
        it; a declared match comes first.
        """
        found = {"a": frozenset(), "b": frozenset({"gpt-4", "qwen3:8b"})}
        self.assertEqual(self.router.pool_for_model("gpt-4", found), "b")
        self.assertEqual(self.router.pool_for_model("qwen3:8b", found), "a")
        e = self.assertRaises(Rejected, self.router.pool_for_model, "gpt-5", found)
        self.assertEqual((e.status, e.code), (404, "model_not_found"))

    def test_default(self) -> None:
        """A C{default} pool serves a model nobody names, before 404."""
        self.assertEqual(self.router.pool_for_model("gpt-4", {}, default="b"), "b")

    def test_unknown_pool_gets_the_rest(self) -> None:
        """
        An openai or ollama pool whose models are unknown (none declared, none
        reported) serves models no other pool names; an C{http} pool never does,
        nor one whose instances reported a list.
        """
        router = Router(parse_config({
            "pools": {
                "a": {"models": ["qwen3:*"], "instances": ["http://a.test:1"]},
                "tools": {"protocol": "http", "instances": ["http://t.test:1"]},
                "litellm": {"instances": ["http://l.test:1"]},
            },
            "routes": [{"path": "/*"}],
        }, environ={}))
        self.assertEqual(router.pool_for_model("qwen3:8b"), "a")
        self.assertEqual(router.pool_for_model("gpt-4"), "litellm")
        self.assertEqual(router.pool_for_model("gpt-4", {"litellm": frozenset({"gpt-4"})}),
                         "litellm")
        e = self.assertRaises(Rejected, router.pool_for_model, "gpt-5",
                              {"litellm": frozenset({"gpt-4"})})
        self.assertEqual(e.code, "model_not_found")

    def test_model_owners(self) -> None:
        """Every known model with its pool: declared, aliases, then reported."""
        owners = self.router.model_owners({"a": frozenset({"sim-small"}),
                                           "b": frozenset({"llama3", "llama3.1"})})
        self.assertEqual(list(owners.items()), [
            ("sim-small", "a"), ("fast", "a"), ("llama3", "b"), ("llama3.1", "b")])

    def test_fallbacks_of(self) -> None:
        """A model's chain, aliases resolved, the model itself and repeats left out."""
        router = Router(config([{"path": "/*"}], models={
            "aliases": {"fast": "qwen3:8b", "big": "qwen3:32b"},
            "fallbacks": {"big": ["qwen3:14b", "fast", "qwen3:32b", "qwen3:8b"],
                          "llama3": ["fast"]}}))
        self.assertEqual(router.fallbacks_of("qwen3:32b"), ("qwen3:14b", "qwen3:8b"))
        self.assertEqual(router.fallbacks_of("llama3"), ("qwen3:8b",))
        self.assertEqual(router.fallbacks_of("qwen3:8b"), ())
        self.assertEqual(router.fallbacks_of(None), ())


class StickySplitTests(SynchronousTestCase):
    """L{sticky_split} sends a key to the same pool, in the configured proportions."""

    def test_sticky(self) -> None:
        """The same key always gets the same pool."""
        split = {"v1": 50.0, "v2": 50.0}
        for n in range(200):
            key = f"agent:{n}"
            self.assertEqual({sticky_split(split, key) for _ in range(5)},
                             {sticky_split(split, key)})

    def test_proportions(self) -> None:
        """Over many keys each pool's share follows its weight (within 2%)."""
        split = {"v1": 90.0, "v2": 10.0}
        counts = Counter(sticky_split(split, f"session:{n}") for n in range(10_000))
        self.assertTrue(0.88 <= counts["v1"] / 10_000 <= 0.92, counts)
        split3 = {"a": 1.0, "b": 1.0, "c": 2.0}
        counts = Counter(sticky_split(split3, f"ip:10.0.{n >> 8}.{n & 255}")
                         for n in range(10_000))
        self.assertTrue(0.48 <= counts["c"] / 10_000 <= 0.52, counts)
        self.assertTrue(0.23 <= counts["a"] / 10_000 <= 0.27, counts)

    def test_single_pool(self) -> None:
        """A split of one pool always picks it."""
        self.assertEqual({sticky_split({"only": 3.0}, f"k{n}") for n in range(100)}, {"only"})
