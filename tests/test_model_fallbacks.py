"""
Model fallback chains (C{models.fallbacks}) through the data plane: a
L{Harness} over a fake backend and a fake clock.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.test_gateway import Answer, Harness, RefusingAgent

FALLBACK = {"status": 200, "content_type": "application/json",
            "body": '{"message": "busy", "is_fallback": true}'}


def chain_config(route: dict[str, Any] | None = None, **models: Any) -> dict[str, Any]:
    """
    Pools C{big} (instances a, b: qwen3:32b), C{small} (c: qwen3:8b) and
    C{tiny} (d: qwen3:1b); qwen3:32b falls back to qwen3:8b, then qwen3:1b.
    """
    off = {"enabled": False}
    return {
        "pools": {
            "big": {"instances": [{"id": "a", "url": "http://a.test:8000"},
                                  {"id": "b", "url": "http://b.test:8000"}],
                    "models": ["qwen3:32b"], "health_check": off, "fallback": "busy"},
            "small": {"instances": [{"id": "c", "url": "http://c.test:8000"}],
                      "models": ["qwen3:8b"], "health_check": off},
            "tiny": {"instances": [{"id": "d", "url": "http://d.test:8000"}],
                     "models": ["qwen3:1b"], "health_check": off},
        },
        "models": {"fallbacks": {"qwen3:32b": ["qwen3:8b", "qwen3:1b"]},
                   "aliases": {"large": "qwen3:32b"}, **models},
        "routes": [route or {"path": "/v1/chat/completions", "methods": ["POST"]}],
        "fallbacks": {"busy": FALLBACK},
    }


CHAT = {"model": "qwen3:32b", "messages": [{"role": "user", "content": "hi"}]}


class ModelFallbackTests(SynchronousTestCase):
    """When a model's pool fails, the next model of its chain answers."""

    def harness(self, **kw: Any) -> Harness:
        return Harness(self, chain_config(**kw), wrap_agent=RefusingAgent)

    def chat(self, gw: Harness, body: Any = CHAT) -> Answer:
        d = gw.start("POST", "/v1/chat/completions", body)
        gw.clock.advance(1)  # retry delays
        return gw.finish(d)

    def assertAnsweredBy(self, gw: Harness, answer: Answer, instance: str, model: str,
                         pool: str) -> None:
        """C{instance} answered as C{model}, and the client, log and metrics say so."""
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json()["instance"], instance)
        self.assertEqual(answer.header("X-Clawproxy-Fallback-Model"), model)
        self.assertEqual(json.loads(gw.backend.seen[-1].body)["model"], model)
        line = gw.log_lines()[-1]
        self.assertEqual((line["model"], line["pool"], line["instance"], line["status"]),
                         (model, pool, instance, 200))
        self.assertEqual(gw.sample("fallback_responses_total", fallback="model:" + model), 1.0)

    def test_no_instance(self) -> None:
        """Every instance of the model's pool drained: the next model answers."""
        gw = self.harness()
        gw.registry.set_drained("a", True)
        gw.registry.set_drained("b", True)
        answer = self.chat(gw)
        self.assertAnsweredBy(gw, answer, "c", "qwen3:8b", "small")
        self.assertEqual(gw.backend.instances(), ["c"])

    def test_refused(self) -> None:
        """Every instance refuses (retries spent): the next model answers."""
        gw = self.harness()
        gw.agent.refuse.update({b"a.test:8000", b"b.test:8000"})
        answer = self.chat(gw)
        self.assertAnsweredBy(gw, answer, "c", "qwen3:8b", "small")
        self.assertEqual(gw.log_lines()[-1]["attempts"], 3)
        self.assertEqual(gw.clock.getDelayedCalls(), [])

    def test_5xx(self) -> None:
        """
        A 5xx the pool does not retry is not relayed while another model may
        answer: the next model does.
        """
        gw = self.harness()
        gw.backend.status["a"] = 500
        answer = self.chat(gw)
        self.assertAnsweredBy(gw, answer, "c", "qwen3:8b", "small")
        self.assertEqual(gw.backend.instances(), ["a", "c"])
        self.assertEqual(json.loads(gw.backend.seen[0].body)["model"], "qwen3:32b")
        self.assertEqual(gw.sample("upstream_requests_total", pool="big", instance="a",
                                   status="500"), 1.0)

    def test_whole_chain(self) -> None:
        """The chain is tried in order: the third model answers when two pools fail."""
        gw = self.harness()
        gw.backend.status.update({"a": 503, "b": 503, "c": 500})
        answer = self.chat(gw)
        self.assertAnsweredBy(gw, answer, "d", "qwen3:1b", "tiny")
        self.assertEqual(gw.backend.instances(), ["a", "c", "d"])

    def test_last_5xx_relayed(self) -> None:
        """When the last model fails too, its answer is relayed as a pool without a chain would."""
        gw = self.harness()
        gw.backend.status.update({"a": 500, "c": 500, "d": 502})
        answer = self.chat(gw)
        self.assertEqual(answer.code, 502)
        self.assertEqual(answer.json()["instance"], "d")
        self.assertEqual(answer.header("X-Clawproxy-Fallback-Model"), "qwen3:1b")

    def test_static_fallback_last(self) -> None:
        """
        With every pool of the chain out, the primary pool's static fallback
        answers (model chain first, then the pool's fallback), without the
        model header.
        """
        gw = self.harness()
        for inst in "abcd":
            gw.registry.set_drained(inst, True)
        answer = self.chat(gw)
        self.assertEqual(answer.json(), {"message": "busy", "is_fallback": True})
        self.assertEqual(answer.header("X-Clawproxy-Fallback"), "busy")
        self.assertIsNone(answer.header("X-Clawproxy-Fallback-Model"))
        self.assertEqual(gw.backend.seen, [])

    def test_error_after_chain_has_no_header(self) -> None:
        """A gateway error after the whole chain failed carries no fallback-model header."""
        gw = self.harness()
        gw.agent.refuse.update({b"a.test:8000", b"b.test:8000", b"c.test:8000",
                                b"d.test:8000"})
        answer = self.chat(gw)
        self.assertEqual(answer.code, 502)
        self.assertEqual(answer.json()["error"]["code"], "upstream_unreachable")
        self.assertIsNone(answer.header("X-Clawproxy-Fallback-Model"))
        self.assertEqual(gw.log_lines()[-1]["model"], "qwen3:1b")

    def test_timeout_not_a_failover(self) -> None:
        """A timeout is never retried elsewhere, nor with another model: 504."""
        gw = self.harness()
        gw.backend.hang.add("a")
        d = gw.start("POST", "/v1/chat/completions", CHAT)
        gw.clock.advance(30)
        answer = gw.finish(d)
        self.assertEqual(answer.code, 504)
        self.assertEqual(gw.backend.instances(), ["a"])
        self.assertIsNone(answer.header("X-Clawproxy-Fallback-Model"))

    def test_healthy_pool_no_header(self) -> None:
        """While the model's pool answers, no fallback and no header."""
        gw = self.harness()
        answer = self.chat(gw)
        self.assertEqual(answer.json()["instance"], "a")
        self.assertIsNone(answer.header("X-Clawproxy-Fallback-Model"))
        self.assertEqual(gw.log_lines()[-1]["model"], "qwen3:32b")

    def test_alias(self) -> None:
        """A request for an alias of the model follows the model's chain."""
        gw = self.harness()
        gw.registry.set_drained("a", True)
        gw.registry.set_drained("b", True)
        answer = self.chat(gw, {**CHAT, "model": "large"})
        self.assertAnsweredBy(gw, answer, "c", "qwen3:8b", "small")

    def test_no_chain(self) -> None:
        """A model without a chain fails as before (its 5xx relayed as is)."""
        gw = self.harness()
        gw.backend.status["c"] = 500
        answer = self.chat(gw, {**CHAT, "model": "qwen3:8b"})
        self.assertEqual((answer.code, answer.json()["instance"]), (500, "c"))
        self.assertIsNone(answer.header("X-Clawproxy-Fallback-Model"))

    def test_fixed_pool_route(self) -> None:
        """
        A route that names its pool still follows the chain: a model another
        pool declares goes there, one nobody declares stays in the route's pool.
        """
        config = chain_config(route={"path": "/v1/chat/completions", "pool": "big"},
                              fallbacks={"qwen3:32b": ["qwen3:8b"], "other": ["qwen3:other"]})
        gw = Harness(self, config)
        gw.backend.status["a"] = 500
        answer = gw.request("POST", "/v1/chat/completions", CHAT)
        self.assertEqual(answer.json()["instance"], "c")
        self.assertEqual(answer.header("X-Clawproxy-Fallback-Model"), "qwen3:8b")
        gw = Harness(self, config)
        gw.backend.status["a"] = 500
        answer = gw.request("POST", "/v1/chat/completions", {**CHAT, "model": "other"})
        self.assertEqual(answer.json()["instance"], "b")
        self.assertEqual(answer.header("X-Clawproxy-Fallback-Model"), "qwen3:other")
        self.assertEqual(json.loads(gw.backend.seen[-1].body)["model"], "qwen3:other")

    def test_not_json_body(self) -> None:
        """With a chain configured, a fixed-pool route still relays a body that is not JSON."""
        gw = Harness(self, chain_config(route={"path": "/v1/*", "pool": "big"}))
        answer = gw.request("POST", "/v1/upload", b"\x00binary")
        self.assertEqual(answer.code, 200)
        self.assertEqual(gw.backend.seen[-1].body, b"\x00binary")

    def test_unserved_models_skipped(self) -> None:
        """A model of the chain that no pool serves is skipped."""
        gw = self.harness(fallbacks={"qwen3:32b": ["nowhere", "qwen3:1b"]})
        gw.registry.set_drained("a", True)
        gw.registry.set_drained("b", True)
        answer = self.chat(gw)
        self.assertAnsweredBy(gw, answer, "d", "qwen3:1b", "tiny")

    def test_fallback_answer_not_cached(self) -> None:
        """
        On a cached route, the fallback model's answer is not stored under
        the key of the model asked for: once that model's pool is back, it
        answers (a MISS), and its own answer is then cached as usual.
        """
        gw = Harness(self, chain_config(route={"path": "/v1/chat/completions",
                                               "methods": ["POST"], "cache": {"ttl": "1h"}}))
        gw.registry.set_drained("a", True)
        gw.registry.set_drained("b", True)
        for _ in range(2):
            answer = self.chat(gw)
            self.assertEqual((answer.json()["instance"], answer.header("X-Cache"),
                              answer.header("X-Clawproxy-Fallback-Model")),
                             ("c", "MISS", "qwen3:8b"))
        gw.registry.set_drained("a", False)
        gw.registry.set_drained("b", False)
        answer = self.chat(gw)
        self.assertEqual((answer.json()["instance"], answer.header("X-Cache")), ("a", "MISS"))
        self.assertIsNone(answer.header("X-Clawproxy-Fallback-Model"))
        again = self.chat(gw)
        self.assertEqual((again.json()["instance"], again.header("X-Cache")), ("a", "HIT"))
        self.assertEqual(gw.backend.instances(), ["c", "c", "a"])
