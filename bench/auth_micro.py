"""
What authentication costs per request, in process (no sockets, so a shared machine
disturbs it far less than wrk): the head check plus the identify stage, as the data
plane runs them for each request, for an API key, a JWT (HS256, RS256, ES256) with the
verified-token cache, and the same JWT with the cache off.

    python3 bench/auth_micro.py [--n 3000]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from clawproxy.config import hash_key, parse_config
from clawproxy.policy.jwt import TokenCache
from clawproxy.policy.routing import Router
from clawproxy.web.auth import auth_parts
from clawproxy.web.context import RequestContext

SECRET = "bench-jwt-secret-0123456789abcdef"
KEY = "sk-bench-0123456789"


def pem(private: Any) -> str:
    return private.public_key().public_bytes(
        ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo).decode()


def plane(auth: dict[str, Any], clock: Clock) -> tuple[Any, Any]:
    config = parse_config({
        "auth": auth,
        "agents": {"bench": {"keys": [hash_key(KEY)], "scopes": ["/v1/*"]}},
        "pools": {"p": {"instances": ["http://127.0.0.1:1"]}},
        "routes": [{"path": "/v1/*", "pool": "p", "auth_required": True}],
    }, environ={})
    parts = auth_parts(config, Router(config), clock=clock)
    return parts[0], next(p for p in parts if hasattr(p, "check_head"))


def per_request(identify: Any, head: Any, value: bytes, n: int) -> float:
    """
    Mean microseconds for one request's head check + identify stage (the time to
    build the request objects, measured alone, is taken off).
    """
    def objects() -> RequestContext:
        h = Headers({b"authorization": [b"Bearer " + value],
                     b"content-type": [b"application/json"]})
        request = DummyRequest([b"v1", b"chat", b"completions"])
        request.requestHeaders = h
        return RequestContext(request=request, request_id="r", client_ip="127.0.0.1",
                              method=b"POST", path=b"/v1/chat/completions", query=b"",
                              started=0.0)

    def one() -> None:
        ctx = objects()
        head.check_head(b"POST", b"/v1/chat/completions", ctx.request.requestHeaders)
        identify.process(ctx)
        assert ctx.agent_name == "bench"

    def timed(f: Any) -> float:
        for _ in range(50):
            f()
        start = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - start) / n * 1e6

    return timed(one) - timed(objects)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=3000)
    n = parser.parse_args().n
    clock = Clock()
    clock.advance(time.time())
    claims = {"sub": "bench", "exp": int(time.time()) + 3600}
    rk, ek = rsa.generate_private_key(public_exponent=65537, key_size=2048), \
        ec.generate_private_key(ec.SECP256R1())
    cases = [
        ("api key", {"api_key": {}}, KEY.encode()),
        ("jwt HS256", {"jwt": {"secret": SECRET}}, jwt.encode(claims, SECRET, "HS256")),
        ("jwt RS256", {"jwt": {"algorithms": ["RS256"], "public_key": pem(rk)}},
         jwt.encode(claims, rk, "RS256")),
        ("jwt ES256", {"jwt": {"algorithms": ["ES256"], "public_key": pem(ek)}},
         jwt.encode(claims, ek, "ES256")),
    ]
    print(f"{'credential':12} {'cached':>10} {'no cache':>10}   (us per request: head check"
          " + identify stage)")
    for name, auth, value in cases:
        value = value if isinstance(value, bytes) else value.encode()
        identify, head = plane(auth, clock)
        cached = per_request(identify, head, value, n)
        if identify.jwt is None:
            print(f"{name:12} {cached:10.1f} {'-':>10}")
            continue
        identify.jwt.cache = TokenCache(size=0)
        uncached = per_request(identify, head, value, n)
        print(f"{name:12} {cached:10.1f} {uncached:10.1f}")


if __name__ == "__main__":
    main()
