"""
End to end: C{twistd -n clawproxy -c FILE} and C{clawproxy check-config}
as separate processes, the way an operator runs them.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseNeverReceived

from tests.integration.helpers import HELLO, Harness, bounded, free_port, tick

#: Run twistd with the interpreter running the tests (no PATH lookup).
TWISTD = ("-c", "from twisted.scripts.twistd import run; run()")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GOOD = """\
server:
  listen: ["tcp:{port}:interface=127.0.0.1"]
admin:
  listen: "tcp:{admin}:interface=127.0.0.1"
simulators:
  - {{listen: "tcp:{sim}:interface=127.0.0.1", id: sim-1, model: sim-small, ttft: 10ms,
     tokens_per_second: 500, max_tokens: 8}}
pools:
  sim:
    models: ["sim-*"]
    instances:
      - {{id: sim-1, url: "http://127.0.0.1:{sim}"}}
    health_check: {{path: /health, interval: 1s}}
routes:
  - path: /v1/chat/completions
    methods: [POST]
logging:
  output: "-"
"""

BAD = """\
server:
  listen: ["tcp:0:interface=127.0.0.1"]
  colour: blue
pools:
  main:
    instances:
      - {id: a, url: "http://127.0.0.1:1", weight: -1}
routes:
  - path: /v1/*
    pool: missing
"""

BAD_ERRORS = [
    "server.colour: unknown key",
    "pools.main.instances[0].weight: must be >= 0",
    "routes[0].pool: no pool named 'missing'",
]


async def wait_until_up(client: HTTPClient, url: str, proc: Any, timeout: float = 20.0
                        ) -> Any:
    """GET C{url} until it answers (bounded); fail early if the process died."""
    deadline = reactor.seconds() + timeout
    while True:
        if proc.protocol.exited:
            raise AssertionError(f"twistd exited early ({proc.protocol.code}):\n{proc.output}")
        try:
            return await bounded(client.get(url), 2)
        except (ConnectionRefusedError, ResponseNeverReceived):
            pass
        if reactor.seconds() > deadline:
            raise AssertionError(f"{url} never answered:\n{proc.output}")
        await tick(0.05)


class TwistdTests(TestCase):
    timeout = 90

    async def test_serves_then_stops_on_sigterm(self) -> None:
        """
        C{twistd -n clawproxy -c FILE} starts the gateway and its simulator,
        answers C{/health}, a chat completion and a stream (access-logged
        as JSON lines on stdout), and on SIGTERM shuts down cleanly (its
        last log lines included) without a traceback and stops listening.
        """
        h = Harness(self)
        port, admin, sim = free_port(), free_port(), free_port()
        with open(h.path("gateway.yaml"), "w") as f:
            f.write(GOOD.format(port=port, admin=admin, sim=sim))
        proc = h.spawn(*TWISTD, "-n", "--pidfile=", "clawproxy", "-c", "gateway.yaml")
        client = h.client()
        url = f"http://127.0.0.1:{port}"
        response = await wait_until_up(client, url + "/health", proc)
        self.assertEqual(response.code, 200)
        health = json.loads(await bounded(response.content()))
        self.assertIn(health["status"], ("healthy", "degraded"))

        response = await bounded(client.post(url + "/v1/chat/completions", json=HELLO))
        self.assertEqual(response.code, 200)
        request_id = response.headers.getRawHeaders("x-request-id")[0]
        answer = json.loads(await bounded(response.content()))
        self.assertEqual(answer["object"], "chat.completion")
        self.assertTrue(answer["choices"][0]["message"]["content"])

        response = await bounded(client.post(url + "/v1/chat/completions",
                                             json={**HELLO, "stream": True}))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        stream = await bounded(response.content())
        self.assertTrue(stream.startswith(b"data: {"), stream[:80])
        self.assertTrue(stream.endswith(b"data: [DONE]\n\n"), stream[-80:])

        response = await bounded(client.get(f"http://127.0.0.1:{admin}/admin/status"))
        self.assertEqual(response.code, 200)
        status = json.loads(await bounded(response.content()))
        self.assertEqual(status["pools"]["sim"]["instances"][0]["requests"], 2)

        await bounded(h.pools[0].closeCachedConnections())
        proc.signal("TERM")
        code = await proc.wait(15)
        # twistd ends a SIGTERM shutdown by re-raising the signal (the shell
        # sees 143), after stopping the services cleanly.
        self.assertIn(code, (0, -signal.SIGTERM), proc.output)
        self.assertIn("Main loop terminated.", proc.output)
        self.assertIn("Server Shut Down.", proc.output)
        self.assertNotIn("Traceback", proc.output)
        logged = [json.loads(line) for line in proc.stdout.splitlines()
                  if line.startswith("{")]
        chat = [entry for entry in logged if entry.get("request_id") == request_id]
        self.assertEqual(len(chat), 1, proc.stdout)
        self.assertEqual((chat[0]["path"], chat[0]["status"], chat[0]["instance"]),
                         ("/v1/chat/completions", 200, "sim-1"))
        with self.assertRaises(ConnectionRefusedError):
            await bounded(h.client().get(url + "/health"))

    async def test_sigterm_lets_in_flight_stream_finish(self) -> None:
        """
        After SIGTERM the gateway refuses new connections, but a stream
        already in flight is relayed to its end before the process exits.
        """
        h = Harness(self)
        port, admin, sim = free_port(), free_port(), free_port()
        config = GOOD.format(port=port, admin=admin, sim=sim).replace(
            "tokens_per_second: 500, max_tokens: 8", "tokens_per_second: 20, max_tokens: 20")
        with open(h.path("gateway.yaml"), "w") as f:
            f.write(config)
        proc = h.spawn(*TWISTD, "-n", "--pidfile=", "clawproxy", "-c", "gateway.yaml")
        url = f"http://127.0.0.1:{port}"
        response = await wait_until_up(h.client(), url + "/health", proc)
        await bounded(response.content())
        response = await bounded(h.client().post(url + "/v1/chat/completions",
                                                 json={**HELLO, "stream": True}))
        self.assertEqual(response.code, 200)
        chunks: list[bytes] = []
        done = response.collect(chunks.append)
        proc.signal("TERM")
        refused = False
        for _ in range(100):
            try:
                probe = await bounded(h.client().get(url + "/health"), 2)
                await bounded(probe.content())
            except ConnectionRefusedError:
                refused = True
                break
            except ResponseNeverReceived:
                # Queued in the listen backlog as the listener closed: reset.
                pass
            await tick(0.02)
        self.assertTrue(refused, "new connections still accepted after SIGTERM")
        self.assertFalse(proc.protocol.exited)
        await bounded(done, 10)
        body = b"".join(chunks)
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"), body[-80:])
        self.assertEqual(body.count(b"data: "), 20 + 3)
        code = await proc.wait(15)
        self.assertIn(code, (0, -signal.SIGTERM), proc.output)
        self.assertNotIn("Traceback", proc.output)

    async def test_bad_config_refused(self) -> None:
        """
        With an invalid config twistd exits non-zero, listing every error as
        C{path: message}, and prints no Python traceback.
        """
        h = Harness(self)
        with open(h.path("bad.yaml"), "w") as f:
            f.write(BAD)
        proc = h.spawn(*TWISTD, "-n", "--pidfile=", "clawproxy", "-c", "bad.yaml")
        code = await proc.wait(20)
        self.assertNotEqual(code, 0)
        for error in BAD_ERRORS:
            self.assertIn(error, proc.output)
        self.assertNotIn("Traceback", proc.output)


class CheckConfigTests(TestCase):
    timeout = 60

    async def test_valid_config(self) -> None:
        """
        C{clawproxy check-config} exits 0 and prints a summary for a valid
        file, the shipped C{etc/gateway.yaml} included.
        """
        h = Harness(self)
        with open(h.path("gateway.yaml"), "w") as f:
            f.write(GOOD.format(port=8080, admin=9901, sim=11501))
        code, out, err = await h.run("-m", "clawproxy.cli", "check-config", "gateway.yaml")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("gateway.yaml: OK", out)
        self.assertIn("sim: 1 instance", out)
        code, out, err = await h.run("-m", "clawproxy.cli", "check-config",
                                     os.path.join(REPO, "etc", "gateway.yaml"))
        self.assertEqual((code, err), (0, ""), out)

    async def test_invalid_config(self) -> None:
        """
        C{clawproxy check-config} exits 1 and prints every error as
        C{path: message} (no traceback); a missing file is one line too.
        """
        h = Harness(self)
        with open(h.path("bad.yaml"), "w") as f:
            f.write(BAD)
        code, out, err = await h.run("-m", "clawproxy.cli", "check-config", "bad.yaml")
        self.assertEqual(code, 1)
        self.assertEqual(out, "")
        self.assertEqual(sorted(err.strip().splitlines()), sorted(BAD_ERRORS))
        code, out, err = await h.run("-m", "clawproxy.cli", "check-config", "nope.yaml")
        self.assertEqual(code, 1)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("nope.yaml", err)
        self.assertNotIn("Traceback", err)
