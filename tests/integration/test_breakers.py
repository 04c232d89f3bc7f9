"""
Circuit breakers on real sockets: simulated backends that fail, hang and
recover, one or two gateways, and a real redis-server shared by two.
"""

from __future__ import annotations

import json
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from clawproxy.backends.shared_breakers import READ_INTERVAL
from tests.integration.helpers import HELLO, Harness, RunningGateway, bounded, pool, wait_for

BUSY = {"busy": {"status": 200, "body": '{"message": "busy", "is_fallback": true}'}}


async def chat(client: HTTPClient, gw: RunningGateway) -> tuple[int, Any, dict[str, Any]]:
    """One chat completion: (status, headers, JSON body)."""
    response = await bounded(client.post(gw.url + "/v1/chat/completions", json=HELLO))
    body = json.loads(await bounded(response.content()))
    return response.code, response.headers, body


async def admin_get(client: HTTPClient, gw: RunningGateway, path: str) -> Any:
    response = await bounded(client.get(gw.admin_url + path))
    return json.loads(await bounded(response.content()))


def clients(h: Harness, n: int) -> list[HTTPClient]:
    """
    Clients from different loopback addresses: the failures of one client's
    requests count at most once per instance and fail_timeout (ClientBound),
    so several clients are what opens a breaker.
    """
    return [h.client(bindAddress=(f"127.0.0.{10 + i}", 0)) for i in range(n)]


class BreakerTests(TestCase):
    timeout = 60

    async def test_open_pool_serves_fallback_then_closes_after_recovery(self) -> None:
        """
        A pool whose backend fails opens its breaker after failure_threshold
        failures; then its fallback answers at once without reaching the
        backend; once the backend recovers, after open_timeout the probes
        close the breaker and answers come from the backend again.
        """
        h = Harness(self)
        sim = h.simulator("sim-1")
        sim.resource.set_failure_rate(1.0)
        breaker = {"failure_threshold": 3, "success_threshold": 2, "open_timeout": "2s",
                   "jitter": 0}
        gw = await h.gateway(h.config(
            {"llm": pool(sim, circuit_breaker=breaker, fallback="busy")}, fallbacks=BUSY))
        admin = h.client()
        cs = clients(h, 3)
        for c in cs:
            self.assertEqual((await chat(c, gw))[0], 500)
        info = await admin_get(admin, gw, "/health/circuit-breaker/llm")
        self.assertEqual(info["state"], "OPEN")
        self.assertEqual(info["last_transition"]["to"], "OPEN")
        failed = sim.resource.requests_failed
        opened = info["last_transition"]["at"]
        started = reactor.seconds()
        code, headers, body = await chat(cs[0], gw)
        self.assertLess(reactor.seconds() - started, 1.0)
        self.assertEqual((code, body["is_fallback"]), (200, True))
        self.assertEqual(headers.getRawHeaders("x-clawproxy-fallback"), ["busy"])
        self.assertEqual(sim.resource.requests_failed, failed)  # never reached the backend

        sim.resource.set_failure_rate(0.0)
        await deferLater(reactor, max(0.0, opened + 2.0 - reactor.seconds()) + 0.05,
                         lambda: None)
        self.assertEqual((await admin_get(admin, gw, "/health/circuit-breaker/llm"))["state"],
                         "HALF_OPEN")
        for c in cs[:2]:
            code, headers, body = await chat(c, gw)
            self.assertEqual(code, 200)
            self.assertIsNone(headers.getRawHeaders("x-clawproxy-fallback"))
            self.assertEqual(body["object"], "chat.completion")
        info = await admin_get(admin, gw, "/health/circuit-breaker/llm")
        self.assertEqual((info["state"], info["failure_count"]), ("CLOSED", 0))
        status = await admin_get(admin, gw, "/admin/status")
        self.assertEqual(status["pools"]["llm"]["breaker"], "CLOSED")
        self.assertEqual(status["circuit_breakers"]["llm"]["transitions"], 3)
        metrics = (await bounded((await bounded(admin.get(gw.admin_url + "/metrics")))
                                 .content())).decode()
        self.assertIn('clawproxy_circuit_breaker_transitions_total{name="llm",to="OPEN"} 1.0',
                      metrics)
        self.assertIn('clawproxy_circuit_breaker_state{name="llm"} 0.0', metrics)

    async def test_hung_backend_times_out_and_is_counted(self) -> None:
        """
        A backend that never answers: 504 at the pool's timeout, counted by
        its breaker; once open, 503 circuit_open with Retry-After, at once.
        """
        h = Harness(self)
        sim = h.simulator("sim-1")
        sim.resource.set_hang_rate(1.0)
        gw = await h.gateway(h.config({"llm": pool(
            sim, timeout="300ms",
            circuit_breaker={"failure_threshold": 2, "open_timeout": "30s", "jitter": 0})}))
        admin = h.client()
        cs = clients(h, 2)
        started = reactor.seconds()
        code, _, body = await chat(cs[0], gw)
        self.assertEqual((code, body["error"]["code"]), (504, "gateway_timeout"))
        self.assertTrue(0.29 <= reactor.seconds() - started < 2.0)
        info = await admin_get(admin, gw, "/health/circuit-breaker/llm/sim-1")
        self.assertEqual((info["state"], info["failure_count"]), ("CLOSED", 1))
        self.assertIsNotNone(info["last_failure_time"])
        self.assertEqual((await chat(cs[1], gw))[0], 504)
        self.assertEqual(gw.gateway.breakers.state("llm/sim-1"), "OPEN")
        started = reactor.seconds()
        response = await bounded(cs[0].post(gw.url + "/v1/chat/completions", json=HELLO))
        body = json.loads(await bounded(response.content()))
        self.assertLess(reactor.seconds() - started, 1.0)
        self.assertEqual(response.code, 503)
        self.assertEqual(body["error"]["code"], "circuit_open")
        self.assertIn(response.headers.getRawHeaders("retry-after")[0], ("29", "30"))


class SharedBreakerTests(TestCase):
    timeout = 60

    async def test_two_gateways_on_one_redis_share_a_breaker(self) -> None:
        """
        Two gateways on one Redis: failures seen by either count together,
        and once the breaker opens on one, the other stops sending requests
        to the sick backend too (it is not discovered twice).
        """
        from tests.test_store_contract import RedisHarness

        redis = RedisHarness()
        redis.mktemp = self.mktemp  # type: ignore[attr-defined]
        redis.addCleanup = self.addCleanup  # type: ignore[attr-defined]
        server = await redis.start_redis()
        h = Harness(self)
        sim = h.simulator("sim-1")
        sim.resource.set_failure_rate(1.0)
        config = h.config(
            {"llm": pool(sim, fallback="busy", circuit_breaker={
                "failure_threshold": 4, "open_timeout": "30s", "jitter": 0})},
            fallbacks=BUSY, store={"backend": "redis", "redis": {"url": server.url}})
        one = await h.gateway(config)
        two = await h.gateway(config)
        await redis.until_works(one.gateway.store)
        await redis.until_works(two.gateway.store)
        cs = clients(h, 4)
        for c in cs[:2]:
            self.assertEqual((await chat(c, one))[0], 500)
        for c in cs[2:]:
            self.assertEqual((await chat(c, two))[0], 500)
        self.assertEqual(sim.resource.requests_failed, 4)
        # Neither gateway saw 4 failures itself; the shared count did.
        await wait_for(lambda: two.gateway.breakers.state("llm") == "OPEN",
                       "the breaker to open on the gateway that saw the 4th failure")
        self.assertEqual(one.gateway.breakers.state("llm"), "CLOSED")
        await deferLater(reactor, READ_INTERVAL + 0.05, lambda: None)
        for gw in (one, two):
            code, _, body = await chat(cs[0], gw)
            self.assertEqual((code, body.get("is_fallback")), (200, True))
        self.assertEqual(sim.resource.requests_failed, 4)
        self.assertEqual(one.gateway.breakers.state("llm"), "OPEN")
        info = one.gateway.breakers.describe("llm")
        self.assertGreater(info["retry_after"], 25)

        # Redis dies: requests are still answered at once from local state.
        await server.kill()
        started = reactor.seconds()
        await deferLater(reactor, READ_INTERVAL, lambda: None)
        for gw in (one, two):
            self.assertEqual((await chat(cs[1], gw))[0], 200)
        self.assertLess(reactor.seconds() - started, READ_INTERVAL + 3.0)


#: Streams a chat completion with the official openai SDK; prints one JSON
#: line per chunk, then how the stream ended.
SDK_CLIENT = r"""
import json, sys
import openai

client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="test", max_retries=0,
                       timeout=20)
prompt = " ".join(f"w{i}" for i in range(int(sys.argv[2])))
try:
    stream = client.chat.completions.create(
        model="sim-small", messages=[{"role": "user", "content": prompt}], stream=True,
        max_tokens=int(sys.argv[2]))
    for chunk in stream:
        content = chunk.choices[0].delta.content if chunk.choices else None
        print(json.dumps({"chunk": content}), flush=True)
    print(json.dumps({"end": "complete"}), flush=True)
except openai.APIError as e:
    print(json.dumps({"end": "APIError", "class": type(e).__name__, "message": e.message,
                      "body": e.body}), flush=True)
except Exception as e:
    print(json.dumps({"end": "other", "class": type(e).__name__, "message": str(e)}),
          flush=True)
"""


class MidStreamTests(TestCase):
    timeout = 60

    async def sdk_stream(self, h: Harness, gw: RunningGateway, tokens: int,
                         kill: Any = None) -> tuple[list[str | None], dict[str, Any]]:
        """
        Run the SDK client, asking for C{tokens} tokens (the simulator echoes
        the prompt C{w0 w1 ...}); with C{kill}, call it once 5 chunks have
        arrived. Returns the chunks' contents and how the stream ended.
        """
        proc = h.spawn("-c", SDK_CLIENT, gw.url, str(tokens))
        if kill is not None:
            await wait_for(lambda: proc.stdout.count("\n") >= 5 or proc.protocol.exited,
                           "the SDK to get 5 chunks", timeout=15)
            await kill()
        self.assertEqual(await proc.wait(), 0, proc.output)
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        return [line["chunk"] for line in lines[:-1]], lines[-1]

    async def test_killed_backend_mid_stream_raises_api_error(self) -> None:
        """
        A simulator killed mid-stream: the openai SDK gets the chunks sent so
        far, in order and once each, then raises APIError from the gateway's
        SSE error event; the access log and the metric record it.
        """
        h = Harness(self)
        sim = h.simulator("sim-1", tokens_per_second=50.0, max_tokens=400)
        gw = await h.gateway(h.config({"llm": pool(sim)}))
        full, end = await self.sdk_stream(h, gw, 8)
        self.assertEqual(end, {"end": "complete"})
        self.assertEqual([c for c in full if c], ["w0"] + [f" w{i}" for i in range(1, 8)])

        chunks, end = await self.sdk_stream(h, gw, 400, kill=sim.kill)
        self.assertEqual(end["end"], "APIError", end)
        self.assertEqual(end["body"]["code"], "upstream_disconnected")
        self.assertIn("failed mid-stream", end["message"])
        # What came before the error is the start of the answer: nothing
        # duplicated, reordered or cut in half.
        tokens = [c for c in chunks if c]
        self.assertGreaterEqual(len(tokens), 3)
        self.assertLess(len(tokens), 400)
        self.assertEqual(tokens, ["w0"] + [f" w{i}" for i in range(1, len(tokens))])
        with open(gw.access_log) as f:
            last = json.loads(f.read().splitlines()[-1])
        self.assertEqual((last["status"], last["error"]), (200, "truncated"))
        self.assertEqual(gw.gateway.metrics.registry.get_sample_value(
            "clawproxy_upstream_errors_total",
            {"pool": "llm", "instance": "sim-1", "error": "truncated"}), 1)
