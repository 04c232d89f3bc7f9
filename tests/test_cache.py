"""
Tests for the response cache in the data plane (L{clawproxy.web.cache},
L{clawproxy.web.coalesce}): hits, isolation between agents, bypass, SSE
assembly and replay, model versions, the admin section, the cache fallback
and request coalescing, on a fake clock over a fake LLM backend.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import fail
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from clawproxy.cache.store import SharedCache
from clawproxy.config import ConfigError, hash_key, parse_config
from clawproxy.policy.breakers import NoBreakers
from clawproxy.stores import StoreUnavailable
from clawproxy.web.admin import AdminResource
from clawproxy.web.dataplane import build_data_plane
from tests.test_gateway import Harness, RefusingAgent

KEY_A, KEY_B = "key-of-agent-a", "key-of-agent-b"
CHAT = "/v1/chat/completions"


class LLM(Resource):
    """
    A chat backend: answers JSON, or an SSE stream of C{tokens} chunks for
    C{stream: true}, naming C{model}. With C{hold}, requests wait in
    C{held} until the test answers them.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.model = "m-v1"
        self.tokens = 5
        self.status = 200
        self.hold = False
        self.held: list[Any] = []

    def render(self, request: Any) -> Any:
        self.calls += 1
        body = json.loads(request.content.read() or b"{}")
        request.setResponseCode(self.status)
        if body.get("stream"):
            request.setHeader(b"content-type", b"text/event-stream")
        else:
            request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"set-cookie", b"backend=secret")
        if self.hold:
            self.held.append((request, body))
            return NOT_DONE_YET
        for chunk in self.chunks(body):
            request.write(chunk)
        request.finish()
        return NOT_DONE_YET

    def chunks(self, body: dict[str, Any]) -> list[bytes]:
        text = json.dumps(body.get("messages"))
        if not body.get("stream"):
            return [json.dumps({"model": self.model, "call": self.calls, "echo": text}).encode()]
        out = [b"data: " + json.dumps({"model": self.model, "i": i, "call": self.calls})
               .encode() + b"\n\n" for i in range(self.tokens)]
        return [*out, b"data: [DONE]\n\n"]


def config(route_cache: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    cache = {"ttl": "1m"} if route_cache is None else route_cache
    return {
        "agents": {"a": {"keys": [hash_key(KEY_A)]}, "b": {"keys": [hash_key(KEY_B)]}},
        "pools": {"main": {"instances": [{"id": "a", "url": "http://a.test:8000"}],
                           "health_check": {"enabled": False}}},
        "routes": [{"path": "/v1/*", "pool": "main", "cache": cache}],
        **top,
    }


def chat(content: str = "hello", stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}],
            "stream": stream, **extra}


class CacheHarness(Harness):
    def __init__(self, testcase: SynchronousTestCase, cfg: dict[str, Any], **kw: Any) -> None:
        self.llm = LLM()
        super().__init__(testcase, cfg, backend=self.llm, **kw)

    def ask(self, body: Any = None, key: str | None = KEY_A, **headers: str) -> Any:
        h = {k.replace("_", "-"): v for k, v in headers.items()}
        if key is not None:
            h["X-API-Key"] = key
        return self.request("POST", CHAT, chat() if body is None else body, headers=h)

    def answer_held(self, upto: int | None = None) -> None:
        """Write the held requests' chunks (the first C{upto} only, leaving them open)."""
        for request, body in self.llm.held:
            chunks = self.llm.chunks(body)
            sent = getattr(request, "_sent", 0)
            stop = len(chunks) if upto is None else upto
            for chunk in chunks[sent:stop]:
                request.write(chunk)
            request._sent = stop
            if upto is None:
                request.finish()
        if upto is None:
            self.llm.held = []
        self.flush()


class LookupTests(SynchronousTestCase):
    def test_miss_then_hit(self) -> None:
        """The first answer is relayed (MISS) and stored; the same request then HITs."""
        gw = CacheHarness(self, config())
        first = gw.ask()
        self.assertEqual((first.code, first.header("X-Cache")), (200, "MISS"))
        second = gw.ask()
        self.assertEqual((second.code, second.header("X-Cache")), (200, "HIT"))
        self.assertEqual(second.body, first.body)
        self.assertEqual(second.header("Content-Type"), "application/json")
        self.assertIsNone(second.header("Set-Cookie"))  # only chosen headers are kept
        self.assertEqual(gw.llm.calls, 1)
        self.assertEqual(gw.sample("cache_requests_total", route="/v1/*", result="hit"), 1)
        self.assertEqual(gw.sample("cache_requests_total", route="/v1/*", result="miss"), 1)

    def test_canonical_body(self) -> None:
        """Key order and whitespace of the JSON body do not make a new entry."""
        gw = CacheHarness(self, config())
        gw.request("POST", CHAT, b'{"model":"m","messages":[{"role":"user","content":"x"}]}',
                   headers={"X-API-Key": KEY_A})
        again = gw.request("POST", CHAT,
                           b'{ "messages" : [ {"content": "x", "role": "user"} ],\n"model":"m"}',
                           headers={"X-API-Key": KEY_A})
        self.assertEqual(again.header("X-Cache"), "HIT")

    def test_ttl(self) -> None:
        """An entry older than the route's ttl is a miss."""
        gw = CacheHarness(self, config({"ttl": "10s"}))
        gw.ask()
        gw.clock.advance(9)
        hit = gw.ask()
        self.assertEqual((hit.header("X-Cache"), hit.header("Age")), ("HIT", "9"))
        gw.clock.advance(2)
        self.assertEqual(gw.ask().header("X-Cache"), "MISS")
        self.assertEqual(gw.llm.calls, 2)

    def test_isolation(self) -> None:
        """Agent A's answer is never served to agent B (or to anonymous clients)."""
        gw = CacheHarness(self, config())
        a = gw.ask(key=KEY_A)
        b = gw.ask(key=KEY_B)
        anon = gw.ask(key=None)
        self.assertEqual([r.header("X-Cache") for r in (a, b, anon)], ["MISS"] * 3)
        self.assertEqual(gw.llm.calls, 3)
        self.assertEqual([json.loads(r.body)["call"] for r in (a, b, anon)], [1, 2, 3])
        self.assertEqual(json.loads(gw.ask(key=KEY_B).body)["call"], 2)
        self.assertEqual(json.loads(gw.ask(key=KEY_A).body)["call"], 1)

    def test_shared(self) -> None:
        """On a shared route every agent gets the one entry."""
        gw = CacheHarness(self, config({"ttl": "1m", "shared": True}))
        gw.ask(key=KEY_A)
        self.assertEqual(gw.ask(key=KEY_B).header("X-Cache"), "HIT")
        self.assertEqual(gw.llm.calls, 1)

    def test_key_fields(self) -> None:
        """With key fields, only they (and the scope) tell requests apart."""
        gw = CacheHarness(self, config({"ttl": "1m", "key": ["body.model", "body.messages"]}))
        gw.ask(chat(temperature=0.1))
        self.assertEqual(gw.ask(chat(temperature=0.9)).header("X-Cache"), "HIT")
        self.assertEqual(gw.ask(chat("other")).header("X-Cache"), "MISS")

    def test_bypass(self) -> None:
        """Cache-Control no-cache / no-store bypass the cache: relayed, not stored."""
        gw = CacheHarness(self, config())
        for value in ("no-cache", "no-store", "max-age=0, No-Store"):
            answer = gw.ask(Cache_Control=value)
            self.assertEqual(answer.header("X-Cache"), "BYPASS")
        self.assertEqual(gw.llm.calls, 3)
        self.assertEqual(gw.ask().header("X-Cache"), "MISS")
        self.assertEqual(gw.sample("cache_requests_total", route="/v1/*", result="bypass"), 3)

    def test_only_complete_successes(self) -> None:
        """Error answers are relayed but never stored."""
        gw = CacheHarness(self, config())
        gw.llm.status = 500
        self.assertEqual(gw.ask().code, 500)
        gw.llm.status = 200
        self.assertEqual(gw.ask().header("X-Cache"), "MISS")
        self.assertEqual(gw.ask().header("X-Cache"), "HIT")

    def test_disabled_route_untouched(self) -> None:
        """A route whose cache is disabled gets no X-Cache and stores nothing."""
        gw = CacheHarness(self, config({"enabled": False}))
        self.assertIsNone(gw.ask().header("X-Cache"))
        self.assertFalse([f for f in gw.plane.parts.filters if f.name == "cache"])

    def test_model_version(self) -> None:
        """An entry made by another model version than the backend now reports is dropped."""
        gw = CacheHarness(self, config())
        gw.ask(chat("one"))
        gw.llm.model = "m-v2"
        gw.ask(chat("two"))  # the gateway learns the backend now answers as m-v2
        again = gw.ask(chat("one"))
        self.assertEqual(again.header("X-Cache"), "MISS")
        self.assertEqual(json.loads(again.body)["model"], "m-v2")
        self.assertEqual(gw.ask(chat("one")).header("X-Cache"), "HIT")

    def test_model_version_off(self) -> None:
        """With check_model_version false, older entries are still served."""
        gw = CacheHarness(self, config(cache={"check_model_version": False}))
        gw.ask(chat("one"))
        gw.llm.model = "m-v2"
        gw.ask(chat("two"))
        self.assertEqual(gw.ask(chat("one")).header("X-Cache"), "HIT")


class StreamTests(SynchronousTestCase):
    def test_sse_replay(self) -> None:
        """A streamed answer is assembled and replayed as the same SSE events, ending [DONE]."""
        gw = CacheHarness(self, config())
        first = gw.ask(chat(stream=True))
        self.assertEqual(first.header("X-Cache"), "MISS")
        replay = gw.ask(chat(stream=True))
        self.assertEqual(replay.header("X-Cache"), "HIT")
        self.assertEqual(replay.header("Content-Type"), "text/event-stream")
        self.assertEqual(replay.body, first.body)
        self.assertTrue(replay.body.endswith(b"data: [DONE]\n\n"))
        events = [e for e in replay.body.split(b"\n\n") if e]
        self.assertEqual(len(events), 6)
        self.assertEqual(gw.llm.calls, 1)

    def test_stream_and_plain_apart(self) -> None:
        """A stream request never gets a stored JSON answer, nor the reverse."""
        gw = CacheHarness(self, config())
        gw.ask(chat())
        self.assertEqual(gw.ask(chat(stream=True)).header("X-Cache"), "MISS")

    def test_broken_stream_not_stored(self) -> None:
        """A stream cut short upstream is not stored."""
        gw = CacheHarness(self, config())
        gw.llm.hold = True
        gw.start("POST", CHAT, chat(stream=True), headers={"X-API-Key": KEY_A})
        gw.answer_held(upto=2)
        request, _ = gw.llm.held.pop()
        request.channel.transport.loseConnection()
        gw.flush()
        self.assertEqual(gw.log_lines()[0]["error"], "truncated")
        gw.llm.hold = False
        self.assertEqual(gw.ask(chat(stream=True)).header("X-Cache"), "MISS")


class AdminTests(SynchronousTestCase):
    def admin(self, gw: CacheHarness) -> Any:
        from treq.testing import StubTreq
        resource = AdminResource(gw.registry, gw.metrics, NoBreakers(), gw.clock, None,
                                 sections=gw.plane.parts.admin_sections)
        return StubTreq(resource)

    def call(self, client: Any, method: str, url: str) -> Any:
        d = client.request(method, "http://127.0.0.1" + url)
        client.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(response.json())
        return response.code, body

    def test_status_and_delete(self) -> None:
        """/admin/status shows the cache; DELETE /admin/cache drops by agent, route or all."""
        gw = CacheHarness(self, config())
        gw.ask(key=KEY_A)
        gw.ask(key=KEY_B)
        gw.ask(key=KEY_A)
        client = self.admin(gw)
        code, status = self.call(client, "GET", "/admin/status")
        cache = status["cache"]
        self.assertEqual((cache["entries"], cache["hit"], cache["miss"]), (2, 1, 2))
        self.assertEqual(cache["hit_ratio"], round(1 / 3, 4))
        self.assertGreater(cache["bytes"], 0)
        code, body = self.call(client, "DELETE", "/admin/cache?agent=a")
        self.assertEqual((code, body["dropped"]), (200, 1))
        self.assertEqual(gw.ask(key=KEY_A).header("X-Cache"), "MISS")
        self.assertEqual(gw.ask(key=KEY_B).header("X-Cache"), "HIT")
        code, body = self.call(client, "DELETE", "/admin/cache?route=/other")
        self.assertEqual(body["dropped"], 0)
        code, body = self.call(client, "DELETE", "/admin/cache")
        self.assertEqual(body["dropped"], 2)
        self.assertEqual(gw.ask(key=KEY_B).header("X-Cache"), "MISS")


class FallbackTests(SynchronousTestCase):
    def cfg(self, **route: Any) -> dict[str, Any]:
        cfg = config({"ttl": "10s"}, fallbacks={"stale": {"type": "cache", "max_stale": "5m"}})
        cfg["routes"][0]["fallback"] = "stale"
        cfg["routes"][0].update(route)
        return cfg

    def test_stale_when_unreachable(self) -> None:
        """With the pool's instances unreachable, the last good answer is served STALE."""
        gw = CacheHarness(self, self.cfg(), wrap_agent=RefusingAgent)
        fresh = gw.ask()
        gw.clock.advance(60)  # past the ttl
        gw.agent.refuse.add(b"a.test:8000")
        stale = gw.ask()
        self.assertEqual(stale.code, 200)
        self.assertEqual(stale.header("X-Cache"), "STALE")
        self.assertEqual(stale.header("X-Clawproxy-Fallback"), "stale")
        self.assertEqual(stale.header("Age"), "60")
        self.assertEqual(stale.body, fresh.body)
        self.assertEqual(gw.sample("fallback_responses_total", fallback="stale"), 1)
        self.assertEqual(gw.sample("cache_requests_total", route="/v1/*", result="stale"), 1)

    def test_stale_when_drained(self) -> None:
        """With no instance available at all, the stale answer is served too."""
        gw = CacheHarness(self, self.cfg())
        gw.ask()
        gw.clock.advance(30)
        gw.registry.set_drained("a", True)
        self.assertEqual(gw.ask().header("X-Cache"), "STALE")

    def test_too_old(self) -> None:
        """Past ttl + max_stale there is nothing to serve: the error stands."""
        gw = CacheHarness(self, self.cfg(), wrap_agent=RefusingAgent)
        gw.ask()
        gw.clock.advance(10 + 300 + 1)
        gw.agent.refuse.add(b"a.test:8000")
        answer = gw.ask()
        self.assertEqual(answer.code, 502)
        self.assertEqual(answer.header("X-Cache"), "MISS")

    def test_other_agent_gets_nothing(self) -> None:
        """The stale answer of agent A is not agent B's fallback."""
        gw = CacheHarness(self, self.cfg())
        gw.ask(key=KEY_A)
        gw.registry.set_drained("a", True)
        self.assertEqual(gw.ask(key=KEY_B).code, 503)


class CoalescingTests(SynchronousTestCase):
    def start(self, gw: CacheHarness, body: Any, key: str = KEY_A) -> Any:
        return gw.start("POST", CHAT, body, headers={"X-API-Key": key})

    def fan_out(self, stream: bool) -> None:
        gw = CacheHarness(self, config())
        gw.llm.hold = True
        ds = [self.start(gw, chat(stream=stream)) for _ in range(50)]
        self.assertEqual(gw.llm.calls, 1)
        gw.answer_held()
        answers = [gw.finish(d) for d in ds]
        self.assertEqual({a.code for a in answers}, {200})
        self.assertEqual(len({a.body for a in answers}), 1)
        self.assertIn(b"m-v1", answers[0].body)
        self.assertEqual(gw.llm.calls, 1)
        self.assertEqual(gw.sample("coalesced_requests_total", route="/v1/*"), 49)
        self.assertEqual(gw.ask(chat(stream=stream)).header("X-Cache"), "HIT")
        self.assertEqual(gw.llm.calls, 1)
        self.assertEqual(gw.plane.parts.wrappers[0].flights, {})
        self.assertEqual(len(gw.log_lines()), 51)

    def test_fifty_plain(self) -> None:
        """50 identical concurrent requests: one upstream call, 50 identical answers."""
        self.fan_out(stream=False)

    def test_fifty_streamed(self) -> None:
        """The same for streamed requests."""
        self.fan_out(stream=True)

    def test_late_joiner(self) -> None:
        """A request joining a stream late gets the chunks so far, then the live ones, in order."""
        gw = CacheHarness(self, config())
        gw.llm.hold = True
        gw.llm.tokens = 8
        first = self.start(gw, chat(stream=True))
        gw.answer_held(upto=3)
        late = self.start(gw, chat(stream=True))
        gw.answer_held(upto=6)
        later = self.start(gw, chat(stream=True))
        gw.answer_held()
        bodies = [gw.finish(d).body for d in (first, late, later)]
        self.assertEqual(bodies[0], bodies[1])
        self.assertEqual(bodies[0], bodies[2])
        events = [json.loads(e[6:])["i"] for e in bodies[1].split(b"\n\n")
                  if e.startswith(b"data: {")]
        self.assertEqual(events, list(range(8)))
        self.assertEqual(gw.llm.calls, 1)

    def test_different_agents_not_coalesced(self) -> None:
        """Requests of different agents (non-shared route) are separate calls."""
        gw = CacheHarness(self, config())
        gw.llm.hold = True
        self.start(gw, chat(), KEY_A)
        self.start(gw, chat(), KEY_B)
        self.assertEqual(gw.llm.calls, 2)

    def test_leaving_waiter(self) -> None:
        """A waiter that leaves does not cancel the call others wait on; the last one does."""
        gw = CacheHarness(self, config())
        gw.llm.hold = True
        first = self.start(gw, chat(stream=True))
        second = self.start(gw, chat(stream=True))
        third = self.start(gw, chat(stream=True))
        (flight,) = gw.plane.parts.wrappers[0].flights.values()
        upstream, _ = gw.llm.held[0]
        lost: list[Any] = []
        upstream.notifyFinish().addErrback(lost.append)
        first.cancel()  # the one whose request started the call, before any byte
        gw.flush()
        self.failureResultOf(first)
        self.assertEqual((lost, len(flight.waiters)), ([], 2))
        gw.answer_held(upto=2)
        for waiter in list(flight.waiters):  # both clients drop their connections mid-stream
            waiter.ctx.request.channel.transport.loseConnection()
            gw.flush()
            if flight.waiters:
                self.assertEqual(lost, [])
        self.assertEqual(len(lost), 1)
        self.assertEqual(gw.registry.instance("a").active, 0)
        self.assertEqual(gw.plane.parts.wrappers[0].flights, {})
        self.assertEqual([line["status"] for line in gw.log_lines()], [499] * 3)
        self.assertEqual(gw.clock.getDelayedCalls(), [])
        del second, third

    def test_broken_mid_body(self) -> None:
        """A shared call that breaks after bytes were sent aborts every waiter; nothing stored."""
        gw = CacheHarness(self, config())
        gw.llm.hold = True
        ds = [self.start(gw, chat(stream=True)) for _ in range(3)]
        gw.answer_held(upto=2)
        request, _ = gw.llm.held.pop()
        request.channel.transport.loseConnection()
        gw.flush()
        lines = gw.log_lines()
        self.assertEqual(len(lines), 3)
        self.assertEqual({line["error"] for line in lines}, {"truncated"})
        gw.llm.hold = False
        self.assertEqual(gw.ask(chat(stream=True)).header("X-Cache"), "MISS")
        del ds

    def test_failure_fans_out(self) -> None:
        """A call that fails before any byte fails every waiter the same way."""
        gw = CacheHarness(self, config(), wrap_agent=RefusingAgent)
        gw.agent.refuse.add(b"a.test:8000")
        answers = [gw.finish(self.start(gw, chat())) for _ in range(3)]
        self.assertEqual({a.code for a in answers}, {502})



class FailingStore:
    """A shared store that cannot be reached."""

    backend = "redis"
    shared = True

    def run(self, script: Any, keys: Any, args: Any) -> Any:
        return fail(StoreUnavailable("store cache: Redis did not answer within 0.2s"))


class StoreDownTests(SynchronousTestCase):
    def test_store_down_is_a_miss(self) -> None:
        """With the shared store down, requests are relayed (MISS) and nothing fails."""
        gw = CacheHarness(self, config())
        cache = gw.plane.parts.stages[-1].cache
        cache.backend = SharedCache(FailingStore(), gw.clock, 10, 10_000, 60)
        for _ in range(2):
            answer = gw.ask()
            self.assertEqual((answer.code, answer.header("X-Cache")), (200, "MISS"))
        self.assertEqual(gw.llm.calls, 2)


class SeamTests(SynchronousTestCase):
    def test_parts_filed(self) -> None:
        """The cache's parts are filed under their seams; without a cached route, none."""
        gw = CacheHarness(self, config())
        parts = gw.plane.parts
        self.assertEqual([type(w).__name__ for w in parts.wrappers], ["Coalescer"])
        self.assertEqual(list(parts.fallbacks), ["cache"])
        # (auth and models file admin sections of their own.)
        self.assertEqual([s.name for s in parts.admin_sections if s.name == "cache"], ["cache"])
        plain = CacheHarness(self, config({"enabled": False}))
        self.assertEqual((plain.plane.parts.wrappers, plain.plane.parts.fallbacks), ([], {}))
        self.assertEqual(plain.resource.forward, plain.relay.forward)

    def test_one_provider_per_type(self) -> None:
        """A second provider of the same fallback type is refused when the plane is built."""
        gw = CacheHarness(self, config())
        provider = gw.plane.parts.fallbacks["cache"]
        self.assertRaises(TypeError, gw.plane.parts.add, provider)


class ConfigTests(SynchronousTestCase):
    def errors(self, cfg: dict[str, Any]) -> list[str]:
        try:
            parse_config(cfg, environ={})
        except ConfigError as e:
            return list(e.errors)
        return []

    def test_checked(self) -> None:
        """Cache keys, cache fallbacks and the cache store are checked, naming the key."""
        cfg = config({"ttl": "1m", "key": ["body.model", "model"]},
                     fallbacks={"stale": {"type": "cache"}}, cache={"store": "redis"})
        self.assertEqual(self.errors(cfg), [
            "routes[0].cache.key[1]: cache key fields look like body, body.NAME, header.NAME"
            " or query.NAME",
            "fallbacks.stale.max_stale: required for type cache",
            "cache.store: redis needs store.backend: redis",
        ])
        self.assertEqual(self.errors(config(cache={"store": "redis"},
                                            store={"backend": "redis"})), [])


class ReloadTests(SynchronousTestCase):
    def test_memory_cache_survives_reload(self) -> None:
        """A reload (a new data plane on the same store) keeps the entries, with its new bounds."""
        gw = CacheHarness(self, config())
        gw.ask(chat("one"))
        gw.ask(chat("two"))
        new = build_data_plane(parse_config(config(cache={"max_entries": 1}), environ={}),
                               gw.clock, gw.agent, gw.metrics, gw.access_log,
                               store=gw.plane.store, previous=gw.registry)
        gw.plane, gw.resource, gw.root = new, new.resource, new.resource
        self.assertEqual(gw.ask(chat("two")).header("X-Cache"), "HIT")
        self.assertEqual(gw.ask(chat("one")).header("X-Cache"), "MISS")  # over the new bound
        other = CacheHarness(self, config())  # another gateway: its own cache
        self.assertEqual(other.ask(chat("two")).header("X-Cache"), "MISS")
