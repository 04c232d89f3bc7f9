"""
Tests for L{clawproxy.web.limits}: rate limits as the client sees them,
through a data plane over a fake backend on a fake clock (the memory store).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from clawproxy.config import hash_key
from clawproxy.interfaces import IStateStore
from clawproxy.policy.fairqueue import FairQueue, QueueExpired, QueueFull
from clawproxy.stores.errors import StoreUnavailable
from clawproxy.stores.memory import MemoryStore
from clawproxy.web.limits import LimitsSection, PoolLimits, RouteLimits
from tests.test_gateway import Answer, Harness, two_instance_pool

KEYS = {"alpha": "key-alpha-0123456789", "beta": "key-beta-0123456789",
        "gamma": "key-gamma-0123456789"}


def config(rate_limits: dict[str, Any] | None = None, agents: dict[str, Any] | None = None,
           routes: list[dict[str, Any]] | None = None, **pool: Any) -> dict[str, Any]:
    """Pool C{main} (instances a, b); agents alpha, beta and gamma with API keys."""
    cfg: dict[str, Any] = {
        "pools": {"main": two_instance_pool(**pool)},
        "routes": routes or [{"path": "/v1/*", "pool": "main"}],
        "agents": {name: {"keys": [hash_key(key)]} for name, key in KEYS.items()},
    }
    for name, extra in (agents or {}).items():
        cfg["agents"][name].update(extra)
    if rate_limits is not None:
        cfg["rate_limits"] = rate_limits
    return cfg


def send(gw: Harness, agent: str | None = None, path: str = "/v1/x",
         headers: dict[str, str] | None = None, body: Any = None) -> Answer:
    h = dict(headers or {})
    if agent is not None:
        h["X-API-Key"] = KEYS[agent]
    return gw.request("POST" if body is not None else "GET", path, body, headers=h)


def codes(gw: Harness, n: int, agent: str | None = None, **kw: Any) -> list[int]:
    return [send(gw, agent, **kw).code for _ in range(n)]


class NoLimitsTests(SynchronousTestCase):
    """A configuration without limits."""

    def test_nothing_added(self) -> None:
        """No stage, no admin section, no X-RateLimit headers."""
        gw = Harness(self, config())
        parts = gw.plane.parts
        self.assertFalse([s for s in parts.stages if isinstance(s, (RouteLimits, PoolLimits))])
        self.assertFalse([s for s in parts.admin_sections if isinstance(s, LimitsSection)])
        answer = send(gw, "alpha")
        self.assertEqual(answer.code, 200)
        self.assertIsNone(answer.header("X-RateLimit-Limit"))

    def test_section_without_limits(self) -> None:
        """A C{rate_limits} section that sets no limit adds nothing either."""
        gw = Harness(self, config({"algorithm": "fixed_window"}))
        self.assertFalse([s for s in gw.plane.parts.stages if isinstance(s, RouteLimits)])


class AgentLimitTests(SynchronousTestCase):
    """C{rate_limits.default} and C{agents.NAME.rate_limit}."""

    def test_default_per_agent(self) -> None:
        """
        Each agent has its own C{default}: the fourth request of one agent in a
        minute is refused 429 in the SPEC shape, with C{Retry-After} equal to the
        real wait and the headers; the other agent is unaffected; it is counted;
        the backend never sees it; after the wait it goes through.
        """
        gw = Harness(self, config({"default": "3/minute"}))
        answers = [send(gw, "alpha") for _ in range(3)]
        self.assertEqual([a.code for a in answers], [200, 200, 200])
        self.assertEqual([a.header("X-RateLimit-Remaining") for a in answers], ["2", "1", "0"])
        self.assertEqual(answers[0].header("X-RateLimit-Limit"), "3")
        self.assertEqual(answers[2].header("X-RateLimit-Reset"), "60")
        gw.clock.advance(5)
        refused = send(gw, "alpha")
        self.assertEqual(refused.code, 429)
        self.assertEqual(refused.header("Retry-After"), "15")
        self.assertEqual(refused.header("X-RateLimit-Remaining"), "0")
        self.assertEqual(refused.header("X-RateLimit-Limit"), "3")
        error = refused.json()["error"]
        self.assertEqual((error["type"], error["code"]), ("rate_limit_error",
                                                          "rate_limit_exceeded"))
        self.assertEqual(len(gw.backend.seen), 3)
        self.assertEqual(gw.sample("rate_limited_total", agent="alpha", limit="agent"), 1.0)
        self.assertEqual(send(gw, "beta").code, 200)
        gw.clock.advance(14.999)
        self.assertEqual(send(gw, "alpha").code, 429)
        gw.clock.advance(0.001)
        self.assertEqual(send(gw, "alpha").code, 200)
        self.assertEqual(gw.log_lines()[3]["status"], 429)

    def test_agent_own_limit(self) -> None:
        """An agent's C{rate_limit} replaces the default for it."""
        gw = Harness(self, config({"default": "2/minute"}, {"alpha": {"rate_limit": "4/minute"}}))
        self.assertEqual(codes(gw, 5, "alpha"), [200] * 4 + [429])
        self.assertEqual(codes(gw, 3, "beta"), [200, 200, 429])

    def test_agent_limit_without_section(self) -> None:
        """C{agents.NAME.rate_limit} works without a C{rate_limits} section."""
        gw = Harness(self, config(None, {"alpha": {"rate_limit": "1/s"}}))
        self.assertEqual(codes(gw, 2, "alpha"), [200, 429])
        self.assertEqual(codes(gw, 3, "beta"), [200] * 3)

    def test_burst(self) -> None:
        """A token bucket's C{burst} sets how many go at once; the rate refills it."""
        gw = Harness(self, config({"default": "60/minute", "burst": 2}))
        self.assertEqual(codes(gw, 3, "alpha"), [200, 200, 429])
        gw.clock.advance(1)
        self.assertEqual(codes(gw, 2, "alpha"), [200, 429])

    def test_algorithms(self) -> None:
        """Each algorithm limits the same way at the gateway."""
        for algorithm in ("token_bucket", "fixed_window", "sliding_window"):
            gw = Harness(self, config({"default": "2/minute", "algorithm": algorithm}))
            gw.clock.advance(120)
            self.assertEqual(codes(gw, 3, "alpha"), [200, 200, 429], algorithm)


class AnonymousTests(SynchronousTestCase):
    """Anonymous requests are limited per client address."""

    def test_forwarded_for_untrusted_ignored(self) -> None:
        """An X-Forwarded-For from a peer that is not a trusted proxy changes nothing."""
        gw = Harness(self, config({"default": "2/minute"}))
        got = [send(gw, headers={"X-Forwarded-For": f"198.51.100.{i}"}).code for i in range(3)]
        self.assertEqual(got, [200, 200, 429])
        self.assertEqual(gw.sample("rate_limited_total", agent="-", limit="ip"), 1.0)

    def test_forwarded_for_trusted(self) -> None:
        """From a trusted proxy, the client is the last untrusted address of the chain."""
        cfg = config({"default": "1/minute"})
        cfg["server"] = {"trusted_proxies": ["127.0.0.0/8", "10.0.0.0/8"]}
        gw = Harness(self, cfg)
        self.assertEqual(send(gw, headers={"X-Forwarded-For": "198.51.100.1"}).code, 200)
        self.assertEqual(send(gw, headers={"X-Forwarded-For": "198.51.100.2"}).code, 200)
        # A spoofed first entry before the real client is not believed.
        chain = "203.0.113.7, 198.51.100.1, 10.1.1.1"
        self.assertEqual(send(gw, headers={"X-Forwarded-For": chain}).code, 429)


class SharedLimitTests(SynchronousTestCase):
    """Limits that several agents share."""

    def test_global(self) -> None:
        """C{global} caps the whole gateway, whoever asks."""
        gw = Harness(self, config({"global": "3/s"}))
        got = [send(gw, agent).code for agent in ("alpha", "beta", None, "gamma")]
        self.assertEqual(got, [200, 200, 200, 429])
        self.assertEqual(gw.sample("rate_limited_total", agent="gamma", limit="global"), 1.0)

    def test_route(self) -> None:
        """A route's C{rate_limit} applies to that route only, all agents together."""
        routes = [{"path": "/v1/slow", "pool": "main", "rate_limit": "1/minute"},
                  {"path": "/v1/*", "pool": "main"}]
        gw = Harness(self, config(routes=routes))
        self.assertEqual(send(gw, "alpha", "/v1/slow").code, 200)
        self.assertEqual(send(gw, "beta", "/v1/slow").code, 429)
        self.assertEqual(codes(gw, 3, "beta", path="/v1/other"), [200] * 3)

    def test_refused_takes_nothing(self) -> None:
        """A request refused by one limit does not use up the others."""
        routes = [{"path": "/v1/slow", "pool": "main", "rate_limit": "1/minute"},
                  {"path": "/v1/*", "pool": "main"}]
        gw = Harness(self, config({"default": "3/minute"}, routes=routes))
        self.assertEqual([send(gw, "alpha", "/v1/slow").code for _ in range(4)],
                         [200, 429, 429, 429])
        self.assertEqual(codes(gw, 3, "alpha"), [200, 200, 429])

    def test_pool_max_qps_named_pool(self) -> None:
        """C{max_qps} caps a pool named by the route."""
        gw = Harness(self, config(max_qps=2))
        self.assertEqual(codes(gw, 3, "alpha"), [200, 200, 429])
        self.assertEqual(gw.sample("rate_limited_total", agent="alpha", limit="pool"), 1.0)
        gw.clock.advance(0.5)
        self.assertEqual(codes(gw, 2, "alpha"), [200, 429])

    def test_pool_max_qps_by_model(self) -> None:
        """C{max_qps} caps a pool chosen by the request's model (the pool phase)."""
        cfg = config(routes=[{"path": "/v1/*"}], max_qps=1, models=["m*"])
        gw = Harness(self, cfg)
        self.assertTrue([s for s in gw.plane.parts.stages if isinstance(s, PoolLimits)])
        got = [send(gw, "alpha", body={"model": "m1"}).code for _ in range(2)]
        self.assertEqual(got, [200, 429])


class SessionTests(SynchronousTestCase):
    """C{session_min_interval}."""

    def test_header(self) -> None:
        """Requests of one X-Session-ID are spaced by the interval; other sessions are not."""
        gw = Harness(self, config({"session_min_interval": "1.5s"}))
        s1 = {"X-Session-ID": "s1"}
        self.assertEqual(send(gw, "alpha", headers=s1).code, 200)
        refused = send(gw, "alpha", headers=s1)
        self.assertEqual((refused.code, refused.header("Retry-After")), (429, "2"))
        self.assertEqual(send(gw, "alpha", headers={"X-Session-ID": "s2"}).code, 200)
        self.assertEqual(send(gw, "alpha").code, 200)  # no session: not limited
        self.assertEqual(send(gw, "alpha").code, 200)
        gw.clock.advance(1.5)
        self.assertEqual(send(gw, "alpha", headers=s1).code, 200)
        self.assertEqual(gw.sample("rate_limited_total", agent="alpha", limit="session"), 1.0)

    def test_body_user(self) -> None:
        """Without the header, the JSON body's C{user} names the session."""
        gw = Harness(self, config({"session_min_interval": "1s"}))
        body = {"model": "m", "user": "u-1"}
        self.assertEqual(send(gw, "alpha", body=body).code, 200)
        self.assertEqual(send(gw, "alpha", body=body).code, 429)
        self.assertEqual(send(gw, "alpha", body={"model": "m", "user": "u-2"}).code, 200)
        # A body that is not JSON has no session (and is still relayed).
        answer = gw.request("POST", "/v1/x", b"not json", headers={"X-API-Key": KEYS["alpha"]})
        self.assertEqual(answer.code, 200)


@implementer(IStateStore)
class DownStore:
    """
    A store that cannot be reached: Redis, or (C{backend} C{memory}) a
    worker's channel to its parent's memory store.
    """

    shared = True

    def __init__(self, backend: str = "redis") -> None:
        self.backend = backend

    def connect(self) -> Any:
        return None

    def disconnect(self) -> Any:
        return None

    def now(self) -> Any:
        return fail(StoreUnavailable("down"))

    def get(self, key: str) -> Any:
        return fail(StoreUnavailable("down"))

    def set(self, key: str, value: bytes, ttl: float | None = None) -> Any:
        return fail(StoreUnavailable("down"))

    def incrby(self, key: str, amount: int, ttl: float | None = None) -> Any:
        return fail(StoreUnavailable("down"))

    def delete(self, key: str) -> Any:
        return fail(StoreUnavailable("down"))

    def run(self, script: Any, keys: Any, args: Any) -> Any:
        return fail(StoreUnavailable("down"))

    def health(self) -> dict[str, Any]:
        return {"backend": "redis", "healthy": False, "latency_ms": 0.0, "errors": 1}


class OnErrorTests(SynchronousTestCase):
    """C{store.redis.on_error} while the store cannot be reached."""

    def send(self, gw: Harness) -> Answer:
        d = gw.start("GET", "/v1/x", headers={"X-API-Key": KEYS["alpha"]})
        gw.clock.advance(0)  # the limits of one reactor turn go to the store together
        return gw.finish(d)

    def test_fail_open(self) -> None:
        """C{fail_open}: requests go through (without rate limit headers)."""
        gw = Harness(self, config({"default": "1/minute"}), store=DownStore())
        answers = [self.send(gw) for _ in range(3)]
        self.assertEqual([a.code for a in answers], [200] * 3)
        self.assertIsNone(answers[0].header("X-RateLimit-Limit"))

    def test_fail_closed(self) -> None:
        """C{fail_closed}: 503 with C{Retry-After}, nothing relayed."""
        for backend in "redis", "memory":  # Redis, or a worker's channel to its parent
            cfg = config({"default": "1/minute"})
            cfg["store"] = {"redis": {"on_error": "fail_closed"}}
            gw = Harness(self, cfg, store=DownStore(backend))
            answer = self.send(gw)
            self.assertEqual(answer.code, 503)
            self.assertEqual(answer.header("Retry-After"), "1")
            self.assertEqual(answer.json()["error"]["code"], "store_unavailable")
            self.assertEqual(gw.backend.seen, [])
            limits = gw.plane.parts.admin_sections
            (section,) = [s for s in limits if s.name == "limits"]
            self.assertEqual(section.status()["on_error"], "fail_closed")

    def test_unshared_store_fails_open(self) -> None:
        """C{on_error} does not apply to a store that is not shared (it cannot be unreachable)."""
        cfg = config({"default": "1/minute"})
        cfg["store"] = {"redis": {"on_error": "fail_closed"}}
        store = DownStore()
        store.shared = False
        gw = Harness(self, cfg, store=store)
        self.assertEqual(self.send(gw).code, 200)

    def test_store_bug_fails_open(self) -> None:
        """A failure other than an unreachable store is logged and fails open."""
        cfg = config({"default": "1/minute"})
        cfg["store"] = {"redis": {"on_error": "fail_closed"}}
        store = DownStore()
        store.run = lambda *a: fail(ZeroDivisionError())
        gw = Harness(self, cfg, store=store)
        self.assertEqual(self.send(gw).code, 200)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class QueueTests(SynchronousTestCase):
    """C{on_limit: queue} at the gateway."""

    def queued(self, **queue: Any) -> Harness:
        return Harness(self, config({"global": "10/s", "burst": 1, "on_limit": "queue",
                                     "queue": {"max_size": 5, "max_wait": "2s", **queue}}))

    def test_waits_then_goes(self) -> None:
        """A refused request waits for capacity and is then relayed; depth and wait are metered."""
        gw = self.queued()
        self.assertEqual(send(gw, "alpha").code, 200)
        d = gw.start("GET", "/v1/x", headers={"X-API-Key": KEYS["alpha"]})
        self.assertNoResult(d)
        self.assertEqual(gw.sample("queue_depth", limit="route"), 1.0)
        self.assertEqual(len(gw.backend.seen), 1)
        gw.clock.advance(0.1)
        answer = gw.finish(d)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header("X-RateLimit-Remaining"), "0")
        self.assertEqual(gw.sample("queue_depth", limit="route"), 0.0)
        self.assertEqual(gw.sample("queue_wait_seconds_count"), 1.0)
        self.assertEqual(len(gw.backend.seen), 2)

    def test_max_wait(self) -> None:
        """A request still waiting after C{max_wait} is answered 429."""
        gw = Harness(self, config({"default": "1/minute", "on_limit": "queue",
                                   "queue": {"max_wait": "2s"}}))
        self.assertEqual(send(gw, "alpha").code, 200)
        d = gw.start("GET", "/v1/x", headers={"X-API-Key": KEYS["alpha"]})
        gw.clock.advance(1.9)
        self.assertNoResult(d)
        gw.clock.advance(0.1)
        answer = gw.finish(d)
        self.assertEqual(answer.code, 429)
        self.assertEqual(answer.json()["error"]["code"], "queue_timeout")
        self.assertEqual(len(gw.backend.seen), 1)
        self.assertEqual(gw.sample("rate_limited_total", agent="alpha", limit="agent"), 1.0)
        self.assertEqual(gw.clock.getDelayedCalls(), [])

    def test_full(self) -> None:
        """Past C{max_size} waiting, a request is refused at once."""
        gw = self.queued(max_size=2)
        send(gw, "alpha")
        waiting = [gw.start("GET", "/v1/x", headers={"X-API-Key": KEYS["alpha"]})
                   for _ in range(2)]
        answer = send(gw, "beta")
        self.assertEqual(answer.code, 429)
        self.assertEqual(answer.json()["error"]["code"], "queue_full")
        gw.clock.advance(0.1)
        gw.clock.advance(0.1)
        self.assertEqual([gw.finish(d).code for d in waiting], [200, 200])

    def test_client_leaves(self) -> None:
        """A client that leaves frees its place and never reaches the backend."""
        gw = self.queued()
        send(gw, "alpha")
        d = gw.start("GET", "/v1/x", headers={"X-API-Key": KEYS["alpha"]})
        self.assertEqual(gw.sample("queue_depth", limit="route"), 1.0)
        d.cancel()
        self.failureResultOf(d)
        gw.flush()
        self.assertEqual(gw.sample("queue_depth", limit="route"), 0.0)
        gw.clock.advance(5)
        self.assertEqual(len(gw.backend.seen), 1)
        self.assertEqual(gw.clock.getDelayedCalls(), [])

    def test_fair_across_agents(self) -> None:
        """One agent flooding the queue does not starve another: they take turns."""
        gw = Harness(self, config({"global": "10/s", "burst": 1, "on_limit": "queue",
                                   "queue": {"max_size": 100, "max_wait": "10s"}}))
        send(gw, "alpha")
        flood = [gw.start("GET", "/v1/a", headers={"X-API-Key": KEYS["alpha"]})
                 for _ in range(20)]
        others = [gw.start("GET", "/v1/b", headers={"X-API-Key": KEYS["beta"]})
                  for _ in range(3)]
        for _ in range(8):
            gw.clock.advance(0.1)
            gw.flush()
        order = [s.uri for s in gw.backend.seen[1:]]
        self.assertEqual(order[:6], [b"/v1/a", b"/v1/b"] * 3)
        self.assertEqual([gw.finish(d).code for d in others], [200] * 3)
        gw.clock.advance(10)
        for d in flood:
            gw.finish(d)


class FairQueueTests(SynchronousTestCase):
    """L{FairQueue} alone, on a clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.open: list[bool] = []
        self.tried: list[Any] = []

    def attempt(self, item: Any) -> Any:
        from twisted.internet.defer import succeed

        self.tried.append(item)
        allowed = bool(self.open) and self.open.pop()
        return succeed((allowed, 1.0, item))

    def test_order_within_lane(self) -> None:
        """A lane is served first in, first out."""
        q = FairQueue(self.clock, 10, 5.0, self.attempt)
        got: list[Any] = []
        for i in range(3):
            q.wait("a", i, 1.0).addCallback(got.append)
        self.assertEqual((q.depth, self.tried), (3, []))
        for _ in range(3):
            self.open.append(True)
            self.clock.advance(1.0)
        self.assertEqual(got, [0, 1, 2])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_full_and_expired(self) -> None:
        """C{max_size} is a hard bound; C{max_wait} fails the waiter with QueueExpired."""
        q = FairQueue(self.clock, 1, 2.0, self.attempt)
        d = q.wait("a", 1, 1.0)
        self.assertRaises(QueueFull, q.wait, "b", 2, 1.0)
        self.clock.advance(2.0)
        self.failureResultOf(d, QueueExpired)
        self.assertEqual(q.depth, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class AdminTests(SynchronousTestCase):
    """What operators see: C{/admin/status}, C{clawproxy status}, C{GET /admin/limits}."""

    def test_status_and_agent(self) -> None:
        """
        The C{limits} section shows the store's health and each busy agent's
        use of its limits; C{/admin/limits?agent=NAME} one agent's limits and
        counters; C{clawproxy status} prints them as a table.
        """
        from clawproxy.cli import format_status
        from tests.test_admin import AdminHarness

        gw = Harness(self, config({"default": "3/minute", "global": "100/s"},
                                  {"beta": {"rate_limit": "5/minute"}}))
        codes(gw, 4, "alpha")
        send(gw, "beta")
        admin = AdminHarness(self, sections=gw.plane.parts.admin_sections)
        status = admin.request("GET", "/admin/status").json()
        limits = status["limits"]
        self.assertEqual(limits["store"]["backend"], "memory")
        self.assertEqual(limits["on_error"], "fail_open")
        self.assertEqual(list(limits["agents"]), ["alpha", "beta"])
        alpha = limits["agents"]["alpha"]
        self.assertEqual((alpha["requests"], alpha["refused"]), (4, 1))
        self.assertEqual(alpha["limits"]["agent"],
                         {"limit": "3/minute", "algorithm": "token_bucket", "remaining": 0,
                          "reset": 60})
        self.assertEqual(limits["agents"]["beta"]["limits"]["agent"]["remaining"], 4)
        table = format_status(status)
        self.assertIn("limits  store memory healthy  on_error fail_open", table)
        self.assertRegex(table, r"alpha\s+4\s+1\s+agent\s+3/minute\s+token_bucket\s+0\s+60s")

        one = admin.request("GET", "/admin/limits?agent=beta").json()
        self.assertEqual(one["configured"], {"rate_limit": "5/minute", "global": "100/second"})
        self.assertEqual(one["limits"]["agent"]["remaining"], 4)
        self.assertEqual(one["current"]["key"], "rl:token_bucket:agent:beta")
        self.assertTrue(one["current"]["state"])
        self.assertEqual(admin.request("GET", "/admin/limits").code, 400)

    def test_queue_in_status(self) -> None:
        """Requests waiting in a queue show per lane."""
        gw = Harness(self, config({"global": "1/s", "on_limit": "queue"}))
        send(gw, "alpha")
        d = gw.start("GET", "/v1/x", headers={"X-API-Key": KEYS["alpha"]})
        (section,) = [s for s in gw.plane.parts.admin_sections if s.name == "limits"]
        self.assertEqual(section.status()["queues"], {"route": {"depth": 1,
                                                                "lanes": {"alpha": 1}}})
        gw.clock.advance(1)
        self.assertEqual(gw.finish(d).code, 200)


class AnonymousSessionTests(SynchronousTestCase):
    """Sessions of anonymous clients."""

    def test_scoped_to_address(self) -> None:
        """Two anonymous clients naming the same session id do not share its interval."""
        cfg = config({"session_min_interval": "1s"})
        cfg["server"] = {"trusted_proxies": ["127.0.0.0/8"]}
        gw = Harness(self, cfg)

        def as_client(address: str) -> int:
            return send(gw, headers={"X-Session-ID": "s", "X-Forwarded-For": address}).code

        self.assertEqual(as_client("198.51.100.1"), 200)
        self.assertEqual(as_client("198.51.100.2"), 200)
        self.assertEqual(as_client("198.51.100.1"), 429)


class SessionOwnerTests(SynchronousTestCase):
    """Session keys of agents whose names contain C{:}."""

    def test_no_collision_across_colons(self) -> None:
        """
        Agent C{alice} with session C{bob:x} and agent C{alice:bob} with session C{x}
        are two sessions: the second is not refused by the first's interval.
        """
        import jwt

        secret = "hs-secret-of-at-least-32-bytes!!"
        cfg = config({"session_min_interval": "1s"})
        cfg["auth"] = {"api_key": {}, "jwt": {"secret": secret}}
        gw = Harness(self, cfg)

        def as_agent(sub: str, sid: str) -> int:
            bearer = jwt.encode({"sub": sub, "exp": 600, "iat": 0}, secret, "HS256")
            return send(gw, headers={"Authorization": f"Bearer {bearer}",
                                     "X-Session-ID": sid}).code

        self.assertEqual(as_agent("alice", "bob:x"), 200)
        self.assertEqual(as_agent("alice:bob", "x"), 200)
        self.assertEqual(as_agent("alice", "bob:x"), 429)


class FairQueueSleepTests(SynchronousTestCase):
    """A refusal that names no wait does not spin."""

    def test_zero_wait_refusal(self) -> None:
        """A head refused with a zero wait is tried again after a pause, not in a loop."""
        from twisted.internet.defer import succeed

        clock = Clock()
        tries: list[float] = []

        def attempt(item: Any) -> Any:
            tries.append(clock.seconds())
            return succeed((len(tries) > 3, 0.0, item))

        q = FairQueue(clock, 10, 5.0, attempt)
        d = q.wait("a", "x")
        self.assertEqual(len(tries), 1)
        for _ in range(3):
            clock.advance(0.001)
        self.assertEqual(self.successResultOf(d), "x")
        self.assertEqual(len(tries), 4)


class BatchingTests(SynchronousTestCase):
    """On a shared store, the checks of one reactor turn share one store call."""

    def test_one_call_per_turn(self) -> None:
        """Three requests arriving in one turn cost one script call, decided in order."""
        calls: list[Any] = []

        class Counting(DownStore):
            def __init__(self) -> None:
                self.memory = MemoryStore(Clock())

            def run(self, script: Any, keys: Any, args: Any) -> Any:
                if script.name == "rate_limits":  # (the shared breakers read too)
                    calls.append(len(keys))
                return self.memory.run(script, keys, args)

        gw = Harness(self, config({"default": "2/minute"}), store=Counting())
        started = [gw.start("GET", "/v1/x", headers={"X-API-Key": KEYS["alpha"]})
                   for _ in range(3)]
        self.assertEqual(calls, [])
        gw.clock.advance(0)
        self.assertEqual(calls, [3])
        self.assertEqual([gw.finish(d).code for d in started], [200, 200, 429])
