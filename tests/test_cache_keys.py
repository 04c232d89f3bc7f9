"""Tests for L{clawproxy.cache.keys}: canonical keys, scopes, fields."""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from clawproxy.cache.keys import cache_key, canonical, check_key_field, key_parts, scope_of


def no_header(name: str) -> str | None:
    return None


def key_of(body: Any, fields: tuple[str, ...] = (), scope: str = "agent:a",
           header: Any = no_header, query: Any = no_header, stream: bool = False) -> str:
    return cache_key("/v1/*", "POST", "/v1/chat", stream, scope,
                     key_parts(fields, body, header, query))


class CanonicalTests(SynchronousTestCase):
    def test_order_and_whitespace(self) -> None:
        """Key order and whitespace in the request body do not change the key."""
        a = json.loads('{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
        b = json.loads('{"messages":[{"content":"hi","role":"user"}],\n  "model":"m"}')
        self.assertEqual(key_of(a), key_of(b))
        self.assertEqual(canonical(a), canonical(b))

    def test_content_matters(self) -> None:
        """A different message, model, path, method or stream flag is a different key."""
        base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        other = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
        self.assertNotEqual(key_of(base), key_of(other))
        self.assertNotEqual(key_of(base), key_of(base, stream=True))
        parts = key_parts((), base, no_header, no_header)
        self.assertNotEqual(cache_key("r", "POST", "/a", False, "*", parts),
                            cache_key("r", "POST", "/b", False, "*", parts))
        self.assertNotEqual(cache_key("r", "POST", "/a", False, "*", parts),
                            cache_key("r", "PUT", "/a", False, "*", parts))
        self.assertNotEqual(cache_key("r1", "POST", "/a", False, "*", parts),
                            cache_key("r2", "POST", "/a", False, "*", parts))

    def test_fields(self) -> None:
        """Only the named fields count; others in the body are ignored."""
        fields = ("body.model", "body.messages")
        a = {"model": "m", "messages": ["x"], "user": "u1", "temperature": 0}
        b = {"model": "m", "messages": ["x"], "user": "u2"}
        self.assertEqual(key_of(a, fields), key_of(b, fields))
        self.assertNotEqual(key_of(a, fields), key_of({**a, "model": "n"}, fields))

    def test_nested_header_query(self) -> None:
        """Dotted body members, headers and query arguments are read."""
        parts = key_parts(("body.a.b", "header.X-Tenant", "query.lane", "body.missing.x"),
                          {"a": {"b": [1, 2]}},
                          lambda n: "t1" if n == "X-Tenant" else None,
                          lambda n: "blue" if n == "lane" else None)
        self.assertEqual(parts, [[1, 2], "t1", "blue", None])

    def test_scope(self) -> None:
        """Entries belong to the agent (or anonymous client) unless the route is shared."""
        self.assertEqual(scope_of("a", "1.2.3.4", False), "agent:a")
        self.assertEqual(scope_of(None, "1.2.3.4", False), "ip:1.2.3.4")
        self.assertEqual(scope_of("a", "1.2.3.4", True), "*")
        body = {"model": "m"}
        self.assertNotEqual(key_of(body, scope="agent:a"), key_of(body, scope="agent:b"))

    def test_check_field(self) -> None:
        """Key fields must name the body, a body member, a header or a query argument."""
        for good in ("body", "body.model", "header.X-A", "query.q"):
            self.assertIsNone(check_key_field(good))
        for bad in ("model", "body.", "header.", "cookie.x"):
            self.assertIsNotNone(check_key_field(bad))
