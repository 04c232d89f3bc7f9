"""
C{server.workers: 2}, run as an operator runs it (C{twistd -n clawproxy}):
both workers accept on the parent's sockets, a killed worker is replaced,
SIGHUP reloads every process, SIGTERM drains open streams and refuses new
connections, and the admin listener shows the whole gateway.
"""

from __future__ import annotations

import json
import os
import re
import signal
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from clawproxy.config.fields import hash_key
from tests.integration.helpers import (
    HELLO,
    Harness,
    Process,
    bounded,
    tick,
    until_refused,
    wait_for,
)
from tests.integration.test_budgets import outside_window_end
from tests.integration.test_process import TWISTD, listening

CONFIG = """\
server:
  listen: ["tcp:0:interface=127.0.0.1"]
  workers: 2
admin:
  listen: "tcp:0:interface=127.0.0.1"
pools:
  sim:
    models: ["sim-*"]
    instances:
      - {{id: sim-1, url: "{sim}"}}
    health_check: {{path: /health, interval: 1s}}
{pool}routes:
  - path: /v1/chat/completions
    methods: [POST]
{extra}
logging:
  output: "off"
"""


class Workers:
    """A gateway with two workers, started as a separate process."""

    def __init__(self, case: TestCase, **sim: Any) -> None:
        self.h = Harness(case)
        self.sim = self.h.simulator("sim-1", **sim)
        self.client = self.h.client()
        # A new connection per request: the workers share connections as
        # they are accepted, so the load test makes many.
        self.fresh = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor,
                                                                       persistent=False)))

    def write(self, extra: str = "", pool: str = "") -> None:
        with open(self.h.path("gateway.yaml"), "w") as f:
            f.write(CONFIG.format(sim=self.sim.url, extra=extra, pool=pool))

    async def start(self, extra: str = "", pool: str = "") -> Process:
        self.write(extra, pool)
        self.proc = self.h.spawn(*TWISTD, "-n", "--pidfile=", "clawproxy", "-c", "gateway.yaml")
        self.url = f"http://127.0.0.1:{await listening(self.proc, 'clawproxy data plane')}"
        self.admin = f"http://127.0.0.1:{await listening(self.proc, 'clawproxy admin')}"
        await wait_for(lambda: self.workers_running() == 2, "both workers running", 30,
                       step=0.2)
        return self.proc

    def workers_running(self) -> int:
        return len(set(re.findall(r"clawproxy data plane \(worker (\d)\) listening",
                                  self.proc.output)))

    async def status(self) -> dict[str, Any]:
        response = await bounded(self.client.get(self.admin + "/admin/status"))
        return json.loads(await bounded(response.content()))

    async def metrics(self) -> str:
        response = await bounded(self.client.get(self.admin + "/metrics"))
        self.last_metrics_code = response.code
        return (await bounded(response.content())).decode()

    async def chat(self, path: str = "/v1/chat/completions", fresh: bool = False,
                   **body: Any) -> tuple[int, bytes]:
        client = self.fresh if fresh else self.client
        response = await bounded(client.post(self.url + path, json={**HELLO, **body}), 10)
        return response.code, await bounded(response.content(), 10)

    async def load(self, clients: int, each: int) -> list[Any]:
        """C{clients} concurrent loops of C{each} requests; every outcome (code or failure)."""
        outcomes: list[Any] = []

        async def loop() -> None:
            for _ in range(each):
                try:
                    outcomes.append((await self.chat(fresh=True))[0])
                except Exception as e:
                    outcomes.append(e)

        await DeferredList([Deferred.fromCoroutine(loop()) for _ in range(clients)])
        return outcomes

BUDGET_KEY = "sk-budget-agent-0123456789"


def sample(text: str, name: str) -> float:
    """The sum of the samples of C{name} in an exposition text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class WorkersTests(TestCase):
    timeout = 120

    async def test_both_workers_serve(self) -> None:
        """
        Both workers accept connections on the one listening socket, and the
        parent's status and metrics count every request once.
        """
        w = Workers(self)
        await w.start()
        outcomes = await w.load(clients=16, each=10)
        self.assertEqual(outcomes, [200] * 160)

        async def counted() -> Any:
            status = await w.status()
            rows = status["processes"]["workers"]
            return status if sum(r["requests"] for r in rows) == 160 else None

        status = None
        for _ in range(50):
            status = await counted()
            if status:
                break
            await tick(0.1)
        self.assertIsNotNone(status, "the workers' figures never reached the parent")
        rows = status["processes"]["workers"]
        self.assertEqual([r["state"] for r in rows], ["running", "running"])
        self.assertTrue(all(r["requests"] > 0 for r in rows), rows)
        self.assertEqual(len({r["pid"] for r in rows}), 2)
        self.assertEqual(status["workers"], 2)
        self.assertEqual(status["pools"]["sim"]["instances"][0]["requests"], 160)
        text = await w.metrics()
        self.assertEqual(w.last_metrics_code, 200)
        self.assertEqual(sample(text, "clawproxy_requests_total"), 160)
        self.assertEqual(sample(text, 'clawproxy_backend_up{instance="sim-1",pool="sim"}'), 1)
        self.assertEqual(sample(text, "clawproxy_worker_restarts_total"), 0)
        # The tokens section is the sum of the workers' (the parent serves none).
        completion = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith("clawproxy_tokens_total{")
                         and 'kind="completion"' in line)
        self.assertGreater(completion, 0)
        self.assertEqual(status["tokens"]["pools"]["sim"]["completion_tokens"], completion)

    async def test_killed_worker_replaced(self) -> None:
        """
        A worker killed with SIGKILL is replaced (logged, counted); requests
        keep being answered by the other, and only those the dead one had in
        flight can fail.
        """
        w = Workers(self)
        await w.start()
        victim = (await w.status())["processes"]["workers"][0]["pid"]
        running = Deferred.fromCoroutine(w.load(clients=4, each=60))
        await tick(0.2)
        os.kill(victim, signal.SIGKILL)
        outcomes = await running
        failed = [o for o in outcomes if o != 200]
        self.assertLessEqual(len(failed), 4, failed)
        self.assertGreater(outcomes.count(200), 200)

        async def replaced() -> Any:
            rows = (await w.status())["processes"]["workers"]
            return rows if rows[0]["pid"] != victim and rows[0]["state"] == "running" else None

        rows = None
        for _ in range(150):
            rows = await replaced()
            if rows:
                break
            await tick(0.2)
        self.assertIsNotNone(rows, "the killed worker was not replaced")
        self.assertEqual(rows[0]["restarts"], 1)
        self.assertIn(f"worker 1 (pid {victim}) was killed by signal 9", w.proc.output)
        self.assertEqual(sample(await w.metrics(), "clawproxy_worker_restarts_total"), 1)
        self.assertEqual((await w.chat())[0], 200)

    async def test_sighup_reloads_every_process(self) -> None:
        """SIGHUP makes the parent and both workers take the new file."""
        w = Workers(self)
        await w.start()
        self.assertEqual((await w.chat("/v1/completions"))[0], 404)
        w.write("  - path: /v1/completions\n    methods: [POST]\n")
        w.proc.signal("HUP")
        await wait_for(lambda: w.proc.output.count("configuration reloaded") >= 3,
                       "three reloads logged", 20, step=0.1)
        codes = [(await w.chat("/v1/completions"))[0] for _ in range(30)]
        self.assertEqual(codes, [200] * 30)

    async def test_sigterm_drains_streams(self) -> None:
        """
        SIGTERM during 100 open streams: new connections are refused at once,
        every stream is relayed to its end, then every process exits.
        """
        w = Workers(self, ttft=0.01, tokens_per_second=20.0, max_tokens=30)
        await w.start()
        streams = []
        for _ in range(100):
            streams.append(w.client.post(w.url + "/v1/chat/completions",
                                         json={**HELLO, "stream": True}))
        responses = await bounded(DeferredList(streams, consumeErrors=True), 20)
        self.assertTrue(all(ok and r.code == 200 for ok, r in responses), responses[:3])
        bodies = [r.content() for _, r in responses]
        w.proc.signal("TERM")
        refused = await until_refused(w.client, w.url, tries=200)
        self.assertTrue(refused, "new connections still accepted after SIGTERM")
        done = await bounded(DeferredList(bodies, consumeErrors=True), 30)
        ends = [body[-14:] for ok, body in done if ok]
        self.assertEqual(ends, [b"data: [DONE]\n\n"] * 100)
        code = await w.proc.wait(40)
        self.assertIn(code, (0, -signal.SIGTERM), w.proc.output[-2000:])
        self.assertNotIn("Traceback", w.proc.output)
        self.assertEqual(w.proc.output.count("Server Shut Down."), 3)


class SharedStateTests(TestCase):
    """
    With C{store.backend: memory}, the parent's store is every worker's:
    what one worker learns (a cached answer, an open breaker, tokens spent)
    holds in the other. C{X-Clawproxy-Worker} says which worker answered.
    """

    timeout = 120

    async def pinned(self, w: Workers, only: str | None = None, **agent: Any
                     ) -> dict[str, Any]:
        """
        A client per worker (or for worker C{only}): each keeps one
        connection, accepted by that worker.
        """
        clients: dict[str, Any] = {}
        wanted = 1 if only else 2
        for _ in range(100):
            client = w.h.client(**agent)
            response = await bounded(client.get(w.url + "/health"))
            await bounded(response.content())
            index = response.headers.getRawHeaders("x-clawproxy-worker")[0]
            if only in (None, index):
                clients.setdefault(index, client)
            if len(clients) == wanted:
                return clients
        self.fail(f"only worker(s) {sorted(clients)} accepted 100 connections")

    async def post(self, client: Any, w: Workers, **kw: Any) -> tuple[Any, bytes]:
        response = await bounded(client.post(w.url + "/v1/chat/completions",
                                             json={**HELLO, "max_tokens": 8}, **kw), 10)
        return response, await bounded(response.content(), 10)

    async def test_cache_entry_shared(self) -> None:
        """An answer one worker cached is a HIT in the other; one upstream call."""
        w = Workers(self)
        await w.start("    cache: {ttl: 1m}\n")
        one, two = (await self.pinned(w)).values()
        first, body = await self.post(one, w)
        self.assertEqual((first.code, first.headers.getRawHeaders("x-cache")), (200, ["MISS"]))
        # The answer is stored once relayed, by one more round trip to the
        # parent: wait until the parent's status shows the entry.
        for _ in range(100):
            if (await w.status())["cache"]["entries"] >= 1:
                break
            await tick(0.1)
        second, again = await self.post(two, w)
        self.assertEqual((second.code, second.headers.getRawHeaders("x-cache")),
                         (200, ["HIT"]))
        self.assertNotEqual(first.headers.getRawHeaders("x-clawproxy-worker"),
                            second.headers.getRawHeaders("x-clawproxy-worker"))
        self.assertEqual(again, body)
        self.assertEqual(w.sim.resource.requests_served, 1)
        # The parent's cache section merges both workers' counts.
        cache: dict[str, Any] = {}
        for _ in range(50):
            cache = (await w.status())["cache"]
            if cache["hit"] + cache["miss"] == 2:
                break
            await tick(0.1)
        self.assertEqual((cache["hit"], cache["miss"], cache["hit_ratio"], cache["entries"]),
                         (1, 1, 0.5, 1), cache)

    async def test_breaker_shared(self) -> None:
        """A breaker opened by the failures one worker saw is open in the other."""
        w = Workers(self)
        await w.start(pool="    circuit_breaker: {failure_threshold: 3, open_timeout: 30s,"
                           " jitter: 0}\n")
        # A client's failures count once (ClientBound): three clients, all on worker 1.
        ones = [(await self.pinned(w, "1", bindAddress=(f"127.0.0.{10 + i}", 0)))["1"]
                for i in range(3)]
        two = (await self.pinned(w, "2"))["2"]
        w.sim.resource.set_failure_rate(1.0)
        for one in ones:
            response, body = await self.post(one, w)
            self.assertEqual(response.code, 500, body)
        response, body = await self.post(ones[0], w)
        self.assertEqual((response.code, json.loads(body)["error"]["code"]),
                         (503, "circuit_open"), body)
        failed = w.sim.resource.requests_failed
        self.assertEqual(failed, 3)
        await tick(1.1)  # the other worker reads the shared state at most once a second
        response, body = await self.post(two, w)
        self.assertEqual((response.code, json.loads(body)["error"]["code"]),
                         (503, "circuit_open"), body)
        self.assertEqual(response.headers.getRawHeaders("x-clawproxy-worker"), ["2"])
        self.assertEqual(w.sim.resource.requests_failed, failed)
        # The parent (no traffic of its own) shows the workers' breakers.
        status: dict[str, Any] = {}
        for _ in range(50):
            status = await w.status()
            if status["pools"]["sim"]["breaker"] == "OPEN":
                break
            await tick(0.1)
        self.assertEqual(status["pools"]["sim"]["breaker"], "OPEN")
        self.assertEqual(status["circuit_breakers"]["sim"]["state"], "OPEN")
        response = await bounded(w.client.get(w.admin + "/health/circuit-breaker/sim"))
        self.assertEqual(json.loads(await bounded(response.content()))["state"], "OPEN")

    async def test_rate_limit_across_workers(self) -> None:
        """A limit of 20 holds exactly across both workers, turn by turn."""
        w = Workers(self)
        await w.start("rate_limits: {default: 20/hour, algorithm: token_bucket}\n")
        clients = await self.pinned(w)
        codes: dict[str, list[int]] = {"1": [], "2": []}
        for i in range(40):
            index = "12"[i % 2]
            response, body = await self.post(clients[index], w)
            codes[index].append(response.code)
            if response.code != 200:
                self.assertEqual((response.code, json.loads(body)["error"]["code"]),
                                 (429, "rate_limit_exceeded"), body)
        self.assertEqual(codes["1"].count(200) + codes["2"].count(200), 20, codes)
        self.assertEqual(codes["1"][-1], codes["2"][-1], 429)
        # The parent's limits section: both workers' requests and refusals.
        limits: dict[str, Any] = {}
        use: Any = None
        for _ in range(50):
            limits = (await w.status())["limits"]
            use = next((u for who, u in limits["agents"].items() if "127.0.0.1" in who), None)
            if use is not None and use["requests"] == 40:
                break
            await tick(0.1)
        self.assertIsNotNone(use, limits)
        self.assertEqual((use["requests"], use["refused"]), (40, 20), limits)
        self.assertEqual(use["limits"]["ip"]["remaining"], 0)

    async def test_token_budget_across_workers(self) -> None:
        """One agent's token budget holds across both workers, turn by turn."""
        w = Workers(self)
        await w.start(f"agents:\n  agent: {{keys: ['{hash_key(BUDGET_KEY)}'],"
                      " token_limit: 200/hour}\n")
        clients = await self.pinned(w)
        await outside_window_end(3600.0, 10.0)
        through, refused = 0, set()
        auth = {"Authorization": f"Bearer {BUDGET_KEY}"}
        for i in range(40):
            index = "12"[i % 2]
            response, body = await self.post(clients[index], w, headers=auth)
            if response.code == 200:
                usage = json.loads(body)["usage"]
                through += usage["prompt_tokens"] + usage["completion_tokens"]
            else:
                self.assertEqual((response.code, json.loads(body)["error"]["code"]),
                                 (429, "token_budget_exceeded"), body)
                refused.add(index)
            if refused == {"1", "2"}:
                break
        self.assertEqual(refused, {"1", "2"})
        # One worker alone would let a whole budget through, each.
        self.assertLessEqual(through, 200)
        self.assertGreater(through, 200 - 30)
