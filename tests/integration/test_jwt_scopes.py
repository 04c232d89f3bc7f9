"""
JWT authentication, scopes and injected headers over real loopback sockets: a real
gateway in front of a simulator, clients speaking raw HTTP/1.1 (so no client library
tidies the paths up first).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from tests.integration.helpers import (
    HELLO,
    Harness,
    bounded,
    error_of,
    parse_response,
    pool,
    tick,
)

SECRET = "integration-secret-0123456789abcdef"


class Recording(Resource):
    """In front of a simulator: remembers each request's path and headers."""

    isLeaf = True

    def __init__(self, sim: Any) -> None:
        super().__init__()
        self.sim = sim
        self.seen: list[tuple[bytes, dict[bytes, list[bytes]]]] = []

    def render(self, request: Any) -> Any:
        if request.path != b"/health":
            self.seen.append((request.uri, dict(request.requestHeaders.getAllRawHeaders())))
        return self.sim.render(request)


def token(sub: str, key: Any = SECRET, alg: str = "HS256", **headers: Any) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 300, "iss": "idp"}, key, alg,
                      headers=headers or None)


def request(method: str, path: str, bearer: str, body: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: gw.test\r\n"
            f"Authorization: Bearer {bearer}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class JwtScopeTests(TestCase):
    timeout = 60

    async def start(self, **jwt_extra: Any) -> tuple[Harness, Any, Recording]:
        h = Harness(self)
        backend = h.simulator("sim-1", model="sim-small")
        recorder = Recording(backend.site.resource)
        backend.site.resource = recorder
        config = h.config(
            {"llm": pool(backend)},
            [{"path": "/v1/*", "pool": "llm", "auth_required": True}],
            auth={"jwt": {"secret": SECRET, "algorithms": ["HS256"],
                          "issuer": "idp", "max_age": "1h", **jwt_extra}},
            agents={"finance-agent": {
                "scopes": ["/v1/chat/*"],
                "inject_headers": {"Authorization": "Bearer backend-key-finance",
                                   "X-Tenant": "finance"},
            }},
        )
        return h, await h.gateway(config), recorder

    async def test_token_reaches_backend_with_injected_headers(self) -> None:
        """
        A chat completion with a valid JWT is answered by the simulator, which sees the
        agent's injected credentials and never the client's token; an out-of-scope path
        (written with an encoded dot-dot) is refused 403 and never reaches it; an
        expired token is a 401 in the SPEC's shape.
        """
        h, gw, recorder = await self.start()
        t = token("finance-agent")
        body = json.dumps(HELLO).encode()
        response = await h.exchange(gw.port, request("POST", "/v1/chat/completions", t, body))
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(response.header(b"x-sim-instance"), b"sim-1")
        self.assertIn("choices", json.loads(response.body))
        uri, headers = recorder.seen[-1]
        self.assertEqual(uri, b"/v1/chat/completions")
        self.assertEqual(headers[b"Authorization"], [b"Bearer backend-key-finance"])
        self.assertEqual(headers[b"X-Tenant"], [b"finance"])
        self.assertNotIn(t.encode(), json.dumps(
            {k.decode(): [v.decode() for v in vs] for k, vs in headers.items()}).encode())

        count = len(recorder.seen)
        for path in ("/v1/chat/%2e%2e/models", "/v1/chat/../models", "//v1/models",
                     "/v1/models"):
            response = await h.exchange(gw.port, request("GET", path, t))
            self.assertEqual(response.status, 403, path)
            self.assertEqual(error_of(response.body)["code"], "permission_denied")
        response = await h.exchange(gw.port, request("GET", "/v1/chat%2F..%2Fmodels", t))
        self.assertEqual(response.status, 400)
        self.assertEqual(len(recorder.seen), count)

        expired = jwt.encode({"sub": "finance-agent", "iss": "idp", "iat": 1, "exp": 2},
                             SECRET, "HS256")
        response = await h.exchange(
            gw.port, request("POST", "/v1/chat/completions", expired, body))
        self.assertEqual(response.status, 401)
        self.assertEqual(error_of(response.body)["code"], "invalid_token")
        self.assertIn(b"Bearer", response.header(b"www-authenticate"))
        none = jwt.encode({"sub": "finance-agent", "iss": "idp"}, None, "none")
        response = await h.exchange(gw.port, request("GET", "/v1/chat/x", none))
        self.assertEqual(response.status, 401)
        self.assertEqual(len(recorder.seen), count)

    async def test_refused_before_the_body(self) -> None:
        """
        With C{Expect: 100-continue}, an expired token (401) and a valid token on an
        out-of-scope path (403) are answered from the head alone: no C{100 Continue},
        the body never sent, the backend never asked.
        """
        h, gw, recorder = await self.start()
        expired = jwt.encode({"sub": "finance-agent", "iss": "idp", "iat": 1, "exp": 2},
                             SECRET, "HS256")
        for bearer, path, status in ((expired, "/v1/chat/completions", 401),
                                     (token("finance-agent"), "/v1/chat/%2e%2e/models", 403)):
            proto = await h.raw(gw.port, (
                f"POST {path} HTTP/1.1\r\nHost: gw.test\r\n"
                f"Authorization: Bearer {bearer}\r\nContent-Length: 20\r\n"
                "Expect: 100-continue\r\n\r\n").encode())
            raw = await bounded(proto.closed)
            self.assertNotIn(b"100 Continue", raw)
            response = parse_response(raw)
            self.assertEqual(response.status, status, raw)
            error_of(response.body)
        self.assertEqual(recorder.seen, [])

    async def test_jwks_rotation_without_restart(self) -> None:
        """
        Keys rotate by rewriting the JWKS file: within about a second the new key's
        tokens are accepted and the old one's refused, with no reload and no request
        failing in between for the key still listed.
        """
        h = Harness(self)
        old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
            ec.SECP256R1())
        jwks = h.path("jwks.json")

        def write(*pairs: tuple[str, Any]) -> None:
            keys = [{**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(k.public_key())),
                     "kid": kid} for kid, k in pairs]
            with open(jwks + ".tmp", "w") as f:
                json.dump({"keys": keys}, f)
            os.replace(jwks + ".tmp", jwks)

        write(("old", old))
        backend = h.simulator("sim-1")
        gw = await h.gateway(h.config(
            {"llm": pool(backend)}, [{"path": "/v1/*", "pool": "llm", "auth_required": True}],
            auth={"jwt": {"algorithms": ["ES256"], "jwks_file": jwks}}))
        old_token = token("bot", old, "ES256", kid="old")
        new_token = token("bot", new, "ES256", kid="new")

        async def status(t: str) -> int:
            return (await h.exchange(gw.port, request("GET", "/v1/models", t))).status

        self.assertEqual(await status(old_token), 200)
        self.assertEqual(await status(new_token), 401)
        write(("old", old), ("new", new))  # publish the new key first
        started = reactor.seconds()
        while await status(new_token) != 200:
            self.assertEqual(await status(old_token), 200)
            self.assertLess(reactor.seconds() - started, 3.0, "new key not taken")
            await tick(0.05)
        write(("new", new))  # then retire the old one
        started = reactor.seconds()
        while await status(old_token) != 401:
            self.assertEqual(await status(new_token), 200)
            self.assertLess(reactor.seconds() - started, 3.0, "old key not retired")
            await tick(0.05)
