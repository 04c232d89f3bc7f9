"""
Token accounting and budgets through the data plane (clawproxy.web.tokens):
a L{Harness} over simulated backends on a fake clock.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from clawproxy.config.fields import hash_key
from clawproxy.simulator import SimSettings, SimulatorResource
from clawproxy.stores.errors import StoreUnavailable
from clawproxy.stores.memory import MemoryStore
from tests.test_gateway import Answer, Harness

KEY = "sk-finance-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = {"model": "sim-small", "messages": [{"role": "user", "content": "hello there"}]}


def sse_data(body: bytes) -> list[bytes]:
    return [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]


def config(protocol: str = "openai", agent: dict[str, Any] | None = None,
           **top: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "pools": {"main": {"instances": [{"id": "a", "url": "http://a.test:8000"}],
                           "protocol": protocol, "health_check": {"enabled": False}}},
        "routes": [{"path": "/*", "pool": "main"}],
        **top,
    }
    if agent is not None:
        cfg["agents"] = {"finance": {"keys": [hash_key(KEY)], **agent}}
    return cfg


class TokenHarness(Harness):
    """A Harness whose backend is a simulator on the Harness clock."""

    def __init__(self, testcase: SynchronousTestCase, cfg: dict[str, Any],
                 max_tokens: int = 5, **kw: Any) -> None:
        self.sim_settings = SimSettings(ttft=0.0, tokens_per_second=1000.0,
                                        max_tokens=max_tokens)
        super().__init__(testcase, cfg, backend=_Late(), **kw)
        self.sim = SimulatorResource(self.sim_settings, self.clock)
        self.backend.target = self.sim

    def call(self, path: str, body: Any, headers: dict[str, str] | None = None) -> Answer:
        d = self.start("POST", path, body, headers)
        for _ in range(50):
            self.clock.advance(0.01)
            self.flush()
            if d.called:
                break
        return self.finish(d)

    def sim_seen(self) -> list[bytes]:
        return self.backend.bodies

    def tokens(self, kind: str, agent: str = "-", model: str = "sim-small") -> float | None:
        return self.sample("tokens_total", agent=agent, model=model, kind=kind)


class _Late(Resource):
    """
    Forwards to C{target} (a simulator made once the Harness clock exists),
    remembering the request bodies.
    """

    isLeaf = True
    target: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def render(self, request: Any) -> Any:
        self.bodies.append(request.content.read())
        request.content.seek(0)
        return self.target.render(request)


class AccountingTests(SynchronousTestCase):
    """Tokens counted from what backends report."""

    def test_json_usage(self) -> None:
        """A non-streamed answer's C{usage} goes to the metric and the access log."""
        gw = TokenHarness(self, config())
        answer = gw.call("/v1/chat/completions", HELLO)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json()["usage"]["completion_tokens"], 5)
        self.assertEqual(gw.tokens("prompt"), 2.0)
        self.assertEqual(gw.tokens("completion"), 5.0)
        (line,) = gw.log_lines()
        self.assertEqual((line["prompt_tokens"], line["completion_tokens"],
                          line["tokens_estimated"]), (2, 5, False))

    def test_stream_usage_asked_for_and_dropped(self) -> None:
        """
        A stream whose client did not ask for usage: the backend is asked, the
        client sees no usage chunk, and the tokens are counted.
        """
        gw = TokenHarness(self, config())
        answer = gw.call("/v1/chat/completions", dict(HELLO, stream=True))
        self.assertEqual(json.loads(gw.backend.bodies[-1])["stream_options"],
                         {"include_usage": True})
        events = sse_data(answer.body)
        self.assertEqual(events[-1], b"[DONE]")
        for e in events[:-1]:
            obj = json.loads(e)
            self.assertNotIn("usage", obj)
            self.assertEqual(len(obj["choices"]), 1)
        self.assertEqual(len(events), 1 + 5 + 1 + 1)  # role, 5 tokens, finish, [DONE]
        self.assertEqual((gw.tokens("prompt"), gw.tokens("completion")), (2.0, 5.0))
        self.assertFalse(gw.log_lines()[0]["tokens_estimated"])

    def test_stream_usage_client_asked(self) -> None:
        """A client that asked for usage gets its usage chunk, unchanged."""
        gw = TokenHarness(self, config())
        answer = gw.call("/v1/chat/completions",
                         dict(HELLO, stream=True, stream_options={"include_usage": True}))
        events = sse_data(answer.body)
        usage = json.loads(events[-2])
        self.assertEqual(usage["choices"], [])
        self.assertEqual(usage["usage"]["completion_tokens"], 5)
        self.assertEqual(gw.tokens("completion"), 5.0)

    def test_ollama_translation(self) -> None:
        """Through the OpenAI -> Ollama translation, Ollama's counts are used."""
        gw = TokenHarness(self, config("ollama"))
        gw.call("/v1/chat/completions", dict(HELLO, stream=True))
        gw.call("/v1/chat/completions", HELLO)
        self.assertEqual((gw.tokens("prompt"), gw.tokens("completion")), (4.0, 10.0))
        self.assertEqual([line["tokens_estimated"] for line in gw.log_lines()], [False, False])

    def test_ollama_pass_through(self) -> None:
        """Ollama's own API through the gateway: NDJSON stream and single answer."""
        gw = TokenHarness(self, config("ollama"))
        streamed = gw.call("/api/chat", HELLO)  # Ollama streams by default
        self.assertEqual(streamed.header("content-type"), "application/x-ndjson")
        gw.call("/api/chat", dict(HELLO, stream=False))
        self.assertEqual((gw.tokens("prompt"), gw.tokens("completion")), (4.0, 10.0))

    def test_estimated_when_not_reported(self) -> None:
        """A backend that reports no usage: figures estimated from text and labelled so."""
        gw = Harness(self, config())
        gw.backend.body["a"] = json.dumps(
            {"choices": [{"message": {"role": "assistant", "content": "x" * 40}}]}).encode()
        gw.request("POST", "/v1/chat/completions", HELLO)
        line = gw.log_lines()[0]
        self.assertEqual((line["prompt_tokens"], line["completion_tokens"],
                          line["tokens_estimated"]), (4 + 3, 10, True))
        self.assertEqual(gw.sample("tokens_total", agent="-", model="sim-small",
                                   kind="completion"), 10.0)

    def test_failed_call_not_counted(self) -> None:
        gw = Harness(self, config())
        gw.backend.status["a"] = 400
        gw.request("POST", "/v1/chat/completions", HELLO)
        self.assertIsNone(gw.sample("tokens_total", agent="-", model="sim-small",
                                    kind="prompt"))
        self.assertNotIn("prompt_tokens", gw.log_lines()[0])

    def test_other_paths_untouched(self) -> None:
        """Non-LLM requests are not parsed, counted or logged with tokens."""
        gw = Harness(self, config())
        gw.request("POST", "/v1/other", b"not json")
        self.assertNotIn("prompt_tokens", gw.log_lines()[0])

    def test_spend(self) -> None:
        gw = TokenHarness(self, config(agent={}, models={"prices": {
            "sim-small": {"prompt": 1.0, "completion": 2.0}}}))
        gw.call("/v1/chat/completions", HELLO, AUTH)
        self.assertAlmostEqual(gw.sample("spend_total", agent="finance", model="sim-small"),
                               (2 * 1.0 + 5 * 2.0) / 1000)
        self.assertEqual(gw.tokens("completion", agent="finance"), 5.0)

    def test_cached_stream_has_no_usage_chunk(self) -> None:
        """
        A stream the gateway asked usage for is cached as the client saw it: a
        hit replays no usage chunk, and counts no tokens (no backend call).
        """
        cfg = config()
        cfg["routes"][0]["cache"] = {"ttl": "1m"}
        gw = TokenHarness(self, cfg)
        first = gw.call("/v1/chat/completions", dict(HELLO, stream=True))
        again = gw.call("/v1/chat/completions", dict(HELLO, stream=True))
        self.assertEqual((first.header("x-cache"), again.header("x-cache")), ("MISS", "HIT"))
        for answer in (first, again):
            self.assertNotIn(b'"usage"', answer.body)
        self.assertEqual(sse_data(again.body), sse_data(first.body))
        self.assertEqual(len(gw.sim_seen()), 1)
        self.assertEqual(gw.tokens("completion"), 5.0)

    def test_tokens_per_instance(self) -> None:
        """
        C{clawproxy_instance_tokens_total{pool,instance,kind}} counts the
        tokens of the answers each instance made (its rate() is tokens/s per
        instance); a cache hit, made by no instance, adds nothing there.
        """
        cfg = config()
        cfg["pools"]["main"]["instances"].append({"id": "b", "url": "http://b.test:8000"})
        cfg["routes"][0]["cache"] = {"ttl": "1m"}
        gw = TokenHarness(self, cfg)
        for n in range(3):
            gw.call("/v1/chat/completions", dict(HELLO, seed=n))
        hit = gw.call("/v1/chat/completions", dict(HELLO, seed=0))
        self.assertEqual(hit.header("x-cache"), "HIT")
        by = {i: gw.sample("instance_tokens_total", pool="main", instance=i,
                           kind="completion") for i in ("a", "b")}
        self.assertEqual(sorted(by.values()), [5.0, 10.0])
        self.assertEqual(sum(gw.sample("instance_tokens_total", pool="main", instance=i,
                                       kind="prompt") for i in ("a", "b")), 6.0)
        self.assertEqual(gw.tokens("completion"), 15.0)

    def test_admin_section(self) -> None:
        """Tokens per second per pool in the C{tokens} admin section."""
        gw = TokenHarness(self, config())
        for _ in range(3):
            gw.call("/v1/chat/completions", HELLO)
        (section,) = [s for s in gw.plane.parts.admin_sections if s.name == "tokens"]
        status = section.status()["pools"]["main"]
        self.assertEqual(status["completion_tokens"], 15)
        self.assertEqual(status["tokens_per_second"], 0.25)
        gw.clock.advance(61)
        status = section.status()["pools"]["main"]
        self.assertEqual((status["tokens_per_second"], status["completion_tokens"]), (0, 15))


class BudgetTests(SynchronousTestCase):
    """Reserve before the call, settle after, refuse when over."""

    def used(self, gw: Harness) -> int:
        value = gw.plane.store.keys.get("budget:tokens:finance")
        return int(value.split(b" ")[1]) if value else 0

    def test_reserve_and_settle(self) -> None:
        """The reservation (prompt estimate + max_tokens) is replaced by the usage."""
        gw = TokenHarness(self, config(agent={"token_limit": "1000/minute"}))
        d = gw.start("POST", "/v1/chat/completions", dict(HELLO, max_tokens=100), AUTH)
        self.assertEqual(self.used(gw), 4 + 3 + 100)  # reserved while in flight
        for _ in range(20):
            gw.clock.advance(0.01)
            gw.flush()
        self.assertEqual(gw.finish(d).code, 200)
        self.assertEqual(self.used(gw), 2 + 5)

    def test_refused_over_budget(self) -> None:
        """Over budget: 429 in the SPEC's shape, with Retry-After, naming the budget."""
        gw = TokenHarness(self, config(agent={"token_limit": "100/minute"}))
        gw.clock.advance(30)  # half way through a minute
        self.assertEqual(gw.call("/v1/chat/completions", dict(HELLO, max_tokens=50),
                                 AUTH).code, 200)
        answer = gw.call("/v1/chat/completions", dict(HELLO, max_tokens=95), AUTH)
        self.assertEqual(answer.code, 429)
        error = answer.json()["error"]
        self.assertEqual((error["type"], error["code"]), ("rate_limit_error",
                                                          "token_budget_exceeded"))
        self.assertIn("'finance'", error["message"])
        self.assertIn("token_limit 100/minute", error["message"])
        self.assertEqual(answer.header("retry-after"), "30")
        self.assertEqual(len(gw.sim_seen()), 1)
        self.assertEqual(gw.sample("rate_limited_total", agent="finance",
                                   limit="token_limit"), 1.0)
        gw.clock.advance(30)
        self.assertEqual(gw.call("/v1/chat/completions", dict(HELLO, max_tokens=95),
                                 AUTH).code, 200)

    def test_default_reservation(self) -> None:
        """Without max_tokens, models.reserve_completion_tokens is reserved."""
        gw = TokenHarness(self, config(agent={"token_limit": "1000/minute"},
                                       models={"reserve_completion_tokens": 200}))
        gw.start("POST", "/v1/chat/completions", HELLO, AUTH)
        self.assertEqual(self.used(gw), 7 + 200)

    def test_failed_call_releases(self) -> None:
        gw = Harness(self, config(agent={"token_limit": "1000/minute"}))
        gw.backend.status["a"] = 500
        self.assertEqual(gw.request("POST", "/v1/chat/completions", HELLO, AUTH).code, 500)
        self.assertEqual(self.used(gw), 0)

    def test_cancelled_call_releases(self) -> None:
        gw = Harness(self, config(agent={"token_limit": "1000/minute"}))
        gw.backend.hang.add("a")
        d = gw.start("POST", "/v1/chat/completions", HELLO, AUTH)
        self.assertEqual(self.used(gw), 7 + 1024)
        d.cancel()
        gw.flush()
        self.failureResultOf(d)
        self.assertEqual(self.used(gw), 0)

    def test_spend_limit(self) -> None:
        """spend_limit reserves in currency: the price of the worst case."""
        gw = TokenHarness(self, config(agent={"spend_limit": "0.01/day"}, models={
            "prices": {"sim-small": {"prompt": 1.0, "completion": 1.0}}}))
        self.assertEqual(gw.call("/v1/chat/completions", dict(HELLO, max_tokens=5),
                                 AUTH).code, 200)
        # 7 tokens used (0.007); the next reserves 7 + 5 = 0.012 > what is left.
        answer = gw.call("/v1/chat/completions", dict(HELLO, max_tokens=5), AUTH)
        self.assertEqual(answer.code, 429)
        self.assertEqual(answer.json()["error"]["code"], "spend_budget_exceeded")

    def test_anonymous_and_unlimited_untouched(self) -> None:
        gw = TokenHarness(self, config(agent={}))
        self.assertEqual(gw.call("/v1/chat/completions", HELLO, AUTH).code, 200)
        self.assertEqual(len(gw.plane.store.keys), 0)

    def down(self, on_error: str, shared: bool = True, error: Exception | None = None
             ) -> TokenHarness:
        """
        A gateway with budgets whose store fails every call with C{error}
        (L{StoreUnavailable}); C{shared}: a store that can fail (Redis, or a
        worker's channel to its parent), else this process's memory store.
        """
        store = MemoryStore(Clock())
        store.shared = shared
        store.run = lambda *a: fail(error or StoreUnavailable("down"))
        return TokenHarness(self, config(agent={"token_limit": "10/minute"}, store={
            "redis": {"on_error": on_error}}), store=store)

    def test_store_down_fail_open(self) -> None:
        """C{fail_open}: calls go through unbudgeted while the store is down."""
        gw = self.down("fail_open")
        for _ in range(3):
            self.assertEqual(gw.call("/v1/chat/completions", HELLO, AUTH).code, 200)

    def test_store_down_fail_closed(self) -> None:
        """
        C{fail_closed}, a shared store down (a worker's channel to its
        parent's memory store, as Redis): 503 C{store_unavailable} with
        C{Retry-After}, nothing relayed.
        """
        gw = self.down("fail_closed")
        answer = gw.call("/v1/chat/completions", HELLO, AUTH)
        self.assertEqual(answer.code, 503)
        self.assertEqual(answer.json()["error"]["code"], "store_unavailable")
        self.assertEqual(answer.header("retry-after"), "1")
        self.assertEqual(gw.sim_seen(), [])

    def test_unshared_store_fails_open(self) -> None:
        """C{on_error} does not apply to this process's own memory store."""
        gw = self.down("fail_closed", shared=False)
        self.assertEqual(gw.call("/v1/chat/completions", HELLO, AUTH).code, 200)

    def test_store_bug_fails_open(self) -> None:
        """A failure other than an unreachable store is logged and fails open."""
        gw = self.down("fail_closed", error=ZeroDivisionError())
        self.assertEqual(gw.call("/v1/chat/completions", HELLO, AUTH).code, 200)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_admin_budgets(self) -> None:
        gw = TokenHarness(self, config(agent={"token_limit": "1000/minute"}))
        gw.call("/v1/chat/completions", HELLO, AUTH)
        (section,) = [s for s in gw.plane.parts.admin_sections if s.name == "tokens"]
        endpoint = section.endpoints()[(b"GET", b"/admin/budgets")]
        self.assertEqual(self.successResultOf(endpoint(None)), {
            "agents": {"finance": {"token_limit": {"limit": "1000/minute", "used": 7.0,
                                                   "reserved": 0.0, "remaining": 993.0,
                                                   "reset": 60}}}})


class TextLogTests(SynchronousTestCase):
    def test_text_line(self) -> None:
        """The text access log shows C{tokens=PROMPT+COMPLETION}, C{~} when estimated."""
        from clawproxy.web.accesslog import text_line
        base = {"ts": 0.0, "client": "c", "method": "POST", "path": "/p", "status": 200,
                "duration_ms": 1, "bytes": 2, "route": "r", "agent": "a", "pool": "p",
                "instance": "i", "model": "m", "attempts": 1, "error": None, "request_id": "x"}
        self.assertNotIn("tokens=", text_line(base))
        line = text_line(dict(base, prompt_tokens=3, completion_tokens=4,
                              tokens_estimated=False))
        self.assertTrue(line.endswith(" tokens=3+4"), line)
        line = text_line(dict(base, prompt_tokens=3, completion_tokens=4,
                              tokens_estimated=True))
        self.assertTrue(line.endswith(" tokens=3+4~"), line)


class UnlistedAgentLabelTests(SynchronousTestCase):
    """Metric labels of JWT agents not listed under C{agents}."""

    def test_unlisted_jwt_agents_share_one_label(self) -> None:
        """
        Tokens for agents not under C{agents} are counted under C{agent="-jwt"}
        in requests, tokens, spend and rate-limit metrics (whatever C{sub} the
        issuer signs adds no series), while the access log names the agent; a
        listed agent keeps its own label with a token too.
        """
        import jwt

        secret = "hs-secret-of-at-least-32-bytes!!"
        cfg = config(agent={}, auth={"api_key": {}, "jwt": {"secret": secret}},
                     rate_limits={"default": "1/minute"},
                     models={"prices": {"sim-small": {"prompt": 1.0, "completion": 2.0}}})
        gw = TokenHarness(self, cfg)

        def call(sub: str) -> int:
            bearer = jwt.encode({"sub": sub, "exp": 600, "iat": 0}, secret, "HS256")
            return gw.call("/v1/chat/completions", HELLO,
                           {"Authorization": f"Bearer {bearer}"}).code

        self.assertEqual([call(s) for s in ("bot-1", "bot-2", "bot-2", "finance")],
                         [200, 200, 429, 200])
        self.assertEqual([line["agent"] for line in gw.log_lines()],
                         ["bot-1", "bot-2", "bot-2", "finance"])
        for agent, ok, refused in (("-jwt", 2.0, 1.0), ("finance", 1.0, None)):
            self.assertEqual(gw.sample("requests_total", route="/*", method="POST",
                                       status="200", agent=agent), ok)
            self.assertEqual(gw.tokens("completion", agent=agent), 5.0 * ok)
            self.assertAlmostEqual(gw.sample("spend_total", agent=agent, model="sim-small"),
                                   ok * (2 * 1.0 + 5 * 2.0) / 1000)
            self.assertEqual(gw.sample("rate_limited_total", agent=agent, limit="agent"),
                             refused)
        for sub in ("bot-1", "bot-2"):
            self.assertIsNone(gw.sample("requests_total", route="/*", method="POST",
                                        status="200", agent=sub))
