"""
Every error a client can get from the gateway itself, on the wire: status,
OpenAI-shaped JSON body, and extra headers (SPEC section 4).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.integration.helpers import (
    HELLO,
    Harness,
    RawResponse,
    RunningGateway,
    bounded,
    error_of,
    refusing_port,
    wait_for,
)

FALLBACK_BODY = '{"message":"AI service is busy, please retry","is_fallback":true}'


def chat_bytes(port: int, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
        % (port, len(body), extra, body)
    )


class ErrorShapeTests(TestCase):
    timeout = 60

    async def start(self) -> RunningGateway:
        """
        A gateway whose chat route picks a pool by the C{X-Pool} header
        (C{dead}, C{drained}, C{fallback}, C{hang}) or, without it, by model.
        """
        self.h = h = Harness(self)
        self.sim = sim = h.simulator("sim-1")
        self.hanging = hanging = h.simulator("hang-1", hang_rate=1.0)
        off = {"enabled": False}
        pools = {
            "sim": {"models": ["sim-*"], "instances": [sim.instance()], "health_check": off},
            "dead": {"instances": [{"id": "dead-1", "url": f"http://127.0.0.1:{refusing_port(self)}"}],
                     "health_check": off},
            "drained": {"instances": [{"id": "drained-1", "url": sim.url}], "health_check": off},
            "fallback": {"instances": [{"id": "fb-1", "url": sim.url}], "health_check": off,
                         "fallback": "busy"},
            "hang": {"instances": [hanging.instance()], "health_check": off, "timeout": "300ms"},
        }
        for name in ("dead", "drained", "fallback", "hang"):
            # Declared, so that no pool's models are unknown (an unknown
            # pool would take the requests for models nobody serves).
            pools[name]["models"] = ["sim-small"]
        chat = "/v1/chat/completions"
        routes = [
            {"path": chat, "match": {"header.X-Pool": name}, "pool": name}
            for name in ("dead", "drained", "fallback", "hang")
        ] + [{"path": chat, "methods": ["POST"]}]
        config = h.config(
            pools, routes,
            server={"max_body_size": "1KB", "max_header_size": "2KB"},
            fallbacks={"busy": {"status": 200, "content_type": "application/json",
                                "body": FALLBACK_BODY}},
        )
        gw = await h.gateway(config)
        self.client = client = h.client()
        for inst in ("drained-1", "fb-1"):
            r = await bounded(client.post(f"{gw.admin_url}/admin/instances/{inst}/drain"))
            self.assertEqual(r.code, 200)
            await bounded(r.content())
        return gw

    async def post(self, gw: RunningGateway, pool: str | None = None,
                   body: Any = HELLO) -> tuple[Any, bytes]:
        headers = {"X-Pool": [pool]} if pool else {}
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await bounded(self.client.post(gw.url + "/v1/chat/completions", data=data,
                                             headers=headers))
        return response, await bounded(response.content())

    def assertError(self, response: Any, body: bytes, status: int, code: str) -> dict:
        """The response is C{status} with a JSON error whose code is C{code}."""
        if isinstance(response, RawResponse):
            got_status, ctype = response.status, response.header(b"content-type")
        else:
            got_status = response.code
            ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        self.assertEqual(got_status, status, body)
        self.assertTrue(ctype.startswith(b"application/json"), ctype)
        err = error_of(body)
        self.assertEqual(err["code"], code)
        return err

    async def test_no_route_is_404(self) -> None:
        """A path no route matches answers 404 with a JSON error."""
        gw = await self.start()
        response = await bounded(self.client.get(gw.url + "/nowhere/at/all"))
        self.assertError(response, await bounded(response.content()), 404, "route_not_found")
        # The chat route is POST only.
        response = await bounded(self.client.get(gw.url + "/v1/chat/completions"))
        self.assertError(response, await bounded(response.content()), 404, "route_not_found")

    async def test_unknown_model_is_404_model_not_found(self) -> None:
        """A route picking the pool by model answers 404 model_not_found for an unknown model."""
        gw = await self.start()
        response, body = await self.post(gw, body={**HELLO, "model": "gpt-nope"})
        err = self.assertError(response, body, 404, "model_not_found")
        self.assertIn("gpt-nope", err["message"])

    async def test_bad_json_is_400(self) -> None:
        """A route that must read the model answers 400 to a body that is not JSON."""
        gw = await self.start()
        response, body = await self.post(gw, body=b'{"model": "sim-small",')
        self.assertError(response, body, 400, "invalid_json")

    async def test_encoded_slash_in_path_is_400(self) -> None:
        """A path with an encoded slash (C{%2F}) is refused with 400, not routed."""
        gw = await self.start()
        response = await self.h.exchange(
            gw.port, b"GET /v1%2Fchat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertError(response, response.body, 400, "invalid_path")
        self.assertEqual(self.sim.resource.requests_served, 0)

    async def test_body_over_max_body_size_is_413(self) -> None:
        """
        A body over C{max_body_size} answers 413, whether announced with
        Content-Length or sent chunked.
        """
        gw = await self.start()
        big = json.dumps({**HELLO, "pad": "x" * 2000}).encode()
        response, body = await self.post(gw, body=big)
        self.assertError(response, body, 413, "request_too_large")
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 500]), big[i:i + 500])
                          for i in range(0, len(big), 500))
        response = await self.h.exchange(
            gw.port,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
        self.assertError(response, response.body, 413, "request_too_large")
        self.assertEqual(self.sim.resource.requests_served, 0)
        # A body under the limit still goes through.
        response, body = await self.post(gw)
        self.assertEqual(response.code, 200, body)

    async def test_header_block_over_max_header_size_is_431(self) -> None:
        """
        A request head over C{max_header_size} (one huge header, or many
        small ones) answers 431 with a JSON error.
        """
        gw = await self.start()
        response = await self.h.exchange(
            gw.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n")
        self.assertError(response, response.body, 431, "headers_too_large")
        many = b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 90) for i in range(40))
        response = await self.h.exchange(gw.port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many
                                    + b"\r\n")
        self.assertError(response, response.body, 431, "headers_too_large")

    async def test_refused_only_instance_is_502(self) -> None:
        """When the pool's only instance refuses connections, retries end in a 502."""
        gw = await self.start()
        response, body = await self.post(gw, "dead")
        self.assertError(response, body, 502, "upstream_unreachable")

    async def test_no_available_instance_is_503_with_retry_after(self) -> None:
        """When every instance is drained and there is no fallback: 503 with Retry-After."""
        gw = await self.start()
        response, body = await self.post(gw, "drained")
        self.assertError(response, body, 503, "no_healthy_upstream")
        retry_after = response.headers.getRawHeaders(b"retry-after")
        self.assertEqual(len(retry_after), 1)
        self.assertGreater(int(retry_after[0]), 0)

    async def test_fallback_answers_when_configured(self) -> None:
        """A pool with a fallback answers with it, marked C{X-Clawproxy-Fallback}."""
        gw = await self.start()
        response, body = await self.post(gw, "fallback")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"x-clawproxy-fallback"), [b"busy"])
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(json.loads(body), json.loads(FALLBACK_BODY))
        self.assertEqual(self.sim.resource.requests_served, 0)

    async def test_hanging_backend_is_504_after_pool_timeout(self) -> None:
        """
        A backend that never answers gets a 504 after the pool's C{timeout}
        (300ms), and the gateway hangs up on it.
        """
        gw = await self.start()
        started = reactor.seconds()
        response, body = await self.post(gw, "hang")
        took = reactor.seconds() - started
        self.assertError(response, body, 504, "gateway_timeout")
        # Real time, on purpose: this checks the pool's timer fired. A timer
        # never fires early, so the lower bound is firm; the upper one only
        # tells the 300 ms pool timeout from any longer timer (none fires
        # within 4 s) and leaves a loaded machine ample room.
        self.assertGreaterEqual(took, 0.29)  # 0.3, less float rounding
        self.assertLess(took, 0.3 + 4.0)
        await wait_for(lambda: self.hanging.resource.active == 0,
                       "the gateway to drop the hung upstream request")
