"""
Adaptive throttling over loopback: a simulator's health body reports its GPU
memory (SPEC section 6); above C{gpu_memory_above} the gateway tightens the
pool's limits, and relaxes them once the figure falls back.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.trial.unittest import TestCase

from clawproxy.config.fields import hash_key
from clawproxy.policy import adaptive as timings
from tests.integration.helpers import HELLO, Harness, bounded, pool, tick

KEY = "sk-adaptive-agent-0123456789"


class GpuMemoryTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        # The hysteresis in tenths of seconds instead of seconds.
        self.patch(timings, "EVALUATE_EVERY", 0.05)
        self.patch(timings, "ENTER_AFTER", 0.2)
        self.patch(timings, "LEAVE_AFTER", 0.4)

    async def _limit(self, h: Harness, url: str) -> str:
        response = await bounded(h.client().post(
            url + "/v1/chat/completions", json=HELLO, headers={"X-API-Key": KEY}))
        await bounded(response.content())
        self.assertEqual(response.code, 200)
        return response.headers.getRawHeaders("x-ratelimit-limit")[0]

    async def _until_limit(self, h: Harness, url: str, expected: str) -> None:
        seen = []
        for _ in range(100):
            seen.append(await self._limit(h, url))
            if seen[-1] == expected:
                return
            await tick(0.05)
        self.fail(f"X-RateLimit-Limit never became {expected}: {seen[-5:]}")

    async def _get(self, h: Harness, url: str) -> Any:
        response = await bounded(h.client().get(url))
        return await bounded(response.content())

    async def test_gpu_memory_from_health_body(self) -> None:
        """
        A simulator at 95% GPU memory (threshold 85): requests to its pool
        get half the agent's limit (X-RateLimit-Limit 50 of 100), the admin
        status and the gauge say so; at 50% the limit is whole again.
        """
        h = Harness(self)
        sim = h.simulator("gpu-1", gpu_memory_used_percent=95.0)
        health = {"path": "/health", "interval": "50ms", "timeout": "1s"}
        gw = await h.gateway(h.config(
            {"gpu": pool(sim, health=health)},
            agents={"worker": {"keys": [hash_key(KEY)], "rate_limit": "100/minute"}},
            rate_limits={"adaptive": {"gpu_memory_above": 85, "factor": 0.5}}))
        await self._until_limit(h, gw.url, "50")
        status = json.loads(await self._get(h, gw.admin_url + "/admin/status"))
        gpu = status["adaptive"]["pools"]["gpu"]
        self.assertEqual((gpu["state"], gpu["factor"], gpu["reason"], gpu["gpu_memory"]),
                         ("tight", 0.5, ["gpu_memory"], 95.0))
        metrics = (await self._get(h, gw.admin_url + "/metrics")).decode()
        self.assertIn('clawproxy_adaptive_factor{pool="gpu"} 0.5', metrics)

        sim.resource.settings = attrs.evolve(sim.resource.settings,
                                             gpu_memory_used_percent=50.0)
        await self._until_limit(h, gw.url, "100")
        metrics = (await self._get(h, gw.admin_url + "/metrics")).decode()
        self.assertIn('clawproxy_adaptive_factor{pool="gpu"} 1.0', metrics)
