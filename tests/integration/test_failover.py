"""
Resilience on real sockets: instances that die, fail health checks or answer
5xx, and what clients see meanwhile.
"""

from __future__ import annotations

import json
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.trial.unittest import TestCase

from tests.integration.helpers import (
    HELLO,
    TIMEOUT,
    Harness,
    RunningGateway,
    bounded,
    pool,
    tick,
    wait_for,
)

RETRY_5XX = {"retry_on": ["5xx", "connect_failure", "refused"]}


async def chat(client: HTTPClient, gw: RunningGateway, body: dict[str, Any] = HELLO
               ) -> tuple[int, str, bytes]:
    """One non-streamed chat completion: (status, X-Sim-Instance, body)."""
    response = await bounded(client.post(gw.url + "/v1/chat/completions", json=body))
    content = await bounded(response.content())
    served = response.headers.getRawHeaders("x-sim-instance") or ["-"]
    return response.code, served[0], content


async def instance_status(client: HTTPClient, gw: RunningGateway, instance_id: str
                          ) -> dict[str, Any]:
    response = await bounded(client.get(gw.admin_url + "/admin/status"))
    status = json.loads(await bounded(response.content()))
    for p in status["pools"].values():
        for inst in p["instances"]:
            if inst["id"] == instance_id:
                return inst
    raise AssertionError(f"{instance_id} not in /admin/status")


async def wait_status(client: HTTPClient, gw: RunningGateway, instance_id: str,
                      state: str) -> dict[str, Any]:
    """Ask /admin/status, one tick apart (bounded), until the instance shows C{state}."""
    deadline = reactor.seconds() + TIMEOUT
    while True:
        inst = await instance_status(client, gw, instance_id)
        if inst["state"] == state:
            return inst
        if reactor.seconds() > deadline:
            raise AssertionError(f"{instance_id} never became {state}: {inst}")
        await tick(0.03)


class FailoverTests(TestCase):
    timeout = 60

    async def test_killed_instance_mid_run_fails_no_request(self) -> None:
        """
        60 chat requests, 4 at a time, over a pool of three simulators; after
        20 answers one simulator dies (listener closed, connections reset).
        Every client still gets a 200, and the requests sent after the death
        were all served by the two survivors.
        """
        h = Harness(self)
        sims = [h.simulator(f"sim-{n}", ttft=0.01, max_tokens=4) for n in (1, 2, 3)]
        gw = await h.gateway(h.config({"sim": pool(*sims, retry=RETRY_5XX)}))
        victim = sims[1]
        client = h.client()
        results: list[tuple[bool, int, str]] = []
        sent = iter(range(60))
        killed = False

        async def worker() -> None:
            nonlocal killed
            for _ in sent:
                after_kill = killed
                code, served, _ = await chat(client, gw)
                results.append((after_kill, code, served))
                if len(results) == 20 and not killed:
                    await victim.kill()
                    killed = True

        await bounded(DeferredList([_start(worker()) for _ in range(4)],
                                   fireOnOneErrback=True, consumeErrors=True), 30)
        self.assertEqual(len(results), 60)
        self.assertEqual([code for _, code, _ in results], [200] * 60)
        before = {served for after, _, served in results if not after}
        later = [served for after, _, served in results if after]
        self.assertEqual(before, {"sim-1", "sim-2", "sim-3"})
        self.assertGreater(len(later), 30)
        self.assertEqual(set(later), {"sim-1", "sim-3"})
        # The dead instance was tried and failed over (visible on /metrics).
        retries = gw.gateway.metrics.registry.get_sample_value(
            "clawproxy_upstream_retries_total", {"pool": "sim"})
        self.assertGreaterEqual(retries, 1)

    async def test_unhealthy_instance_leaves_and_returns(self) -> None:
        """
        When an instance's health check starts failing, /admin/status shows it
        unhealthy, /health says degraded and no request is sent to it; when
        its health check passes again it is shown healthy and gets traffic.
        """
        h = Harness(self)
        sims = [h.simulator(f"sim-{n}", front=True) for n in (1, 2, 3)]
        health = {"path": "/health", "interval": "100ms", "timeout": "1s",
                  "healthy_threshold": 2, "unhealthy_threshold": 1}
        gw = await h.gateway(h.config({"sim": pool(*sims, health=health)}))
        client = h.client()
        sick = sims[2]
        await wait_for(lambda: sick.resource.health_calls >= 1, "a first health probe")
        self.assertEqual((await instance_status(client, gw, "sim-3"))["state"], "healthy")

        sick.resource.failing = True
        shown = await wait_status(client, gw, "sim-3", "unhealthy")
        self.assertFalse(shown["healthy"])
        response = await bounded(client.get(gw.url + "/health"))
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(await bounded(response.content()))["status"], "degraded")
        served = [(await chat(client, gw))[:2] for _ in range(9)]
        self.assertEqual({code for code, _ in served}, {200})
        self.assertEqual({inst for _, inst in served}, {"sim-1", "sim-2"})
        self.assertEqual(sick.resource.sim.requests_served, 0)

        sick.resource.failing = False
        shown = await wait_status(client, gw, "sim-3", "healthy")
        self.assertTrue(shown["healthy"])
        served = [(await chat(client, gw))[:2] for _ in range(6)]
        self.assertEqual({code for code, _ in served}, {200})
        self.assertIn("sim-3", {inst for _, inst in served})
        response = await bounded(client.get(gw.url + "/health"))
        self.assertEqual(json.loads(await bounded(response.content()))["status"], "healthy")

    async def test_5xx_fails_over_to_a_healthy_instance(self) -> None:
        """
        With C{5xx} in C{retry_on}, a backend answering 500 is invisible to
        clients while another instance is healthy: every request gets a 200
        from the healthy one, although the failing one was tried.
        """
        h = Harness(self)
        bad = h.simulator("bad", failure_rate=1.0)
        good = h.simulator("good")
        gw = await h.gateway(h.config({"sim": pool(bad, good, retry=RETRY_5XX)}))
        client = h.client()
        served = [await chat(client, gw) for _ in range(4)]
        self.assertEqual([(code, inst) for code, inst, _ in served], [(200, "good")] * 4)
        self.assertGreaterEqual(bad.resource.requests_failed, 1)
        for _, _, body in served:
            self.assertEqual(json.loads(body)["object"], "chat.completion")

    async def test_5xx_relayed_as_is_without_5xx_retry(self) -> None:
        """
        Without C{5xx} in C{retry_on} (the default), a backend's 500 reaches
        the client as it was sent: status, body and headers.
        """
        h = Harness(self)
        bad = h.simulator("bad", failure_rate=1.0)
        good = h.simulator("good")
        gw = await h.gateway(h.config({"sim": pool(bad, good)}))
        client = h.client()
        served = sorted([await chat(client, gw) for _ in range(2)])
        (ok, ok_from, _), (failed, failed_from, body) = served
        self.assertEqual((ok, ok_from), (200, "good"))
        self.assertEqual((failed, failed_from), (500, "bad"))
        self.assertEqual(json.loads(body)["error"]["code"], "sim_failure")
        self.assertEqual(bad.resource.requests_failed, 1)


def _start(coro: Any) -> Deferred:
    return Deferred.fromCoroutine(coro)
