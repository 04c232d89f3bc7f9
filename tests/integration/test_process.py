"""
End to end: C{twistd -n clawproxy -c FILE} and C{clawproxy check-config}
as separate processes, the way an operator runs them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket

from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import TestCase

from tests.integration.helpers import HELLO, Harness, Process, bounded, until_refused, wait_for

#: Run twistd with the interpreter running the tests (no PATH lookup).
TWISTD = ("-c", "from twisted.scripts.twistd import run; run()")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GOOD = """\
server:
  listen: ["tcp:0:interface=127.0.0.1"]
admin:
  listen: "tcp:0:interface=127.0.0.1"
simulators:
  - {{listen: "tcp:0:interface=127.0.0.1", id: sim-local}}
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

#: C{clawproxy sim} options for the backend C{sim-1}.
SIM = ("--ttft", "10ms", "--tokens-per-second", "500", "--max-tokens", "8")

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


async def listening(proc: Process, role: str, timeout: float = 20.0) -> int:
    """
    The port C{role} listens on, from the line the process logs once it
    does (C{ROLE listening on 127.0.0.1:PORT}); fails early if the process died.
    """
    pattern = re.compile(re.escape(role) + r" listening on 127\.0\.0\.1:(\d+)")

    def found() -> re.Match[str] | None:
        if proc.protocol.exited:
            raise AssertionError(f"exited early ({proc.protocol.code}):\n{proc.output}")
        return pattern.search(proc.output)

    return int((await wait_for(found, f"'{role} listening on'", timeout)).group(1))


async def start_sim(h: Harness, *options: str) -> int:
    """Run C{clawproxy sim} (id C{sim-1}) on a port of its choosing; its port."""
    proc = h.spawn("-m", "clawproxy.cli", "sim", "--listen", "tcp:0:interface=127.0.0.1",
                   "--id", "sim-1", *options)
    return await listening(proc, "simulator sim-1")


def occupied_port(case: TestCase) -> int:
    """A loopback port another socket listens on for the whole test."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    case.addCleanup(s.close)
    return s.getsockname()[1]


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
        sim = await start_sim(h, *SIM)
        with open(h.path("gateway.yaml"), "w") as f:
            f.write(GOOD.format(sim=sim))
        proc = h.spawn(*TWISTD, "-n", "--pidfile=", "clawproxy", "-c", "gateway.yaml")
        local = await listening(proc, "simulator sim-local")
        port = await listening(proc, "clawproxy data plane")
        admin = await listening(proc, "clawproxy admin")
        client = h.client()
        url = f"http://127.0.0.1:{port}"
        response = await bounded(client.get(url + "/health"))
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

        # The simulator the config starts in the gateway process answers too.
        response = await bounded(client.get(f"http://127.0.0.1:{local}/health"))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("x-sim-instance"), ["sim-local"])
        await bounded(response.content())

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
        sim = await start_sim(h, "--ttft", "10ms", "--tokens-per-second", "20",
                              "--max-tokens", "20")
        with open(h.path("gateway.yaml"), "w") as f:
            f.write(GOOD.format(sim=sim))
        proc = h.spawn(*TWISTD, "-n", "--pidfile=", "clawproxy", "-c", "gateway.yaml")
        url = f"http://127.0.0.1:{await listening(proc, 'clawproxy data plane')}"
        response = await bounded(h.client().post(url + "/v1/chat/completions",
                                                 json={**HELLO, "stream": True}))
        self.assertEqual(response.code, 200)
        chunks: list[bytes] = []
        done = response.collect(chunks.append)
        proc.signal("TERM")
        refused = await until_refused(h.client(), url)
        self.assertTrue(refused, "new connections still accepted after SIGTERM")
        self.assertFalse(proc.protocol.exited)
        await bounded(done, 10)
        body = b"".join(chunks)
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"), body[-80:])
        self.assertEqual(body.count(b"data: "), 20 + 3)
        code = await proc.wait(15)
        self.assertIn(code, (0, -signal.SIGTERM), proc.output)
        self.assertNotIn("Traceback", proc.output)

    async def test_port_in_use(self) -> None:
        """
        When a listener's address is taken, twistd exits 1 with one line
        naming the listener, its config key and the address (no traceback),
        and leaves no pid file behind.
        """
        h = Harness(self)
        busy = occupied_port(self)
        with open(h.path("gateway.yaml"), "w") as f:
            f.write(GOOD.format(sim=1).replace('listen: ["tcp:0:', f'listen: ["tcp:{busy}:'))
        proc = h.spawn(*TWISTD, "-n", "clawproxy", "-c", "gateway.yaml")
        code = await proc.wait(20)
        self.assertEqual(code, 1, proc.output)
        self.assertNotIn("Traceback", proc.output)
        (line,) = [x for x in proc.output.splitlines() if "cannot listen" in x]
        self.assertIn(
            f"clawproxy data plane cannot listen on 127.0.0.1:{busy} "
            f"(server.listen[0]: tcp:{busy}:interface=127.0.0.1): Address already in use",
            line)
        # twistd's two start-up lines, the simulator started before it, and this one.
        self.assertLessEqual(len(proc.output.strip().splitlines()), 5, proc.output)
        self.assertFalse(os.path.exists(h.path("twistd.pid")))

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


class SimTests(TestCase):
    timeout = 60

    async def test_port_zero_reported(self) -> None:
        """
        C{clawproxy sim --listen tcp:0:...} prints the address it really
        listens on, and answers there.
        """
        h = Harness(self)
        port = await start_sim(h)
        response = await bounded(h.client().get(f"http://127.0.0.1:{port}/health"))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("x-sim-instance"), ["sim-1"])
        await bounded(response.content())

    async def test_port_in_use(self) -> None:
        """C{clawproxy sim} on a taken port exits 1 with one line naming it."""
        h = Harness(self)
        busy = occupied_port(self)
        code, out, err = await h.run("-m", "clawproxy.cli", "sim", "--listen",
                                     f"tcp:{busy}:interface=127.0.0.1")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err.splitlines(), [
            f"simulator sim-1 cannot listen on 127.0.0.1:{busy} "
            f"(--listen tcp:{busy}:interface=127.0.0.1): Address already in use"])


class CheckConfigTests(TestCase):
    timeout = 60

    async def test_valid_config(self) -> None:
        """
        C{clawproxy check-config} exits 0 and prints a summary for a valid
        file, the shipped C{etc/gateway.yaml} included.
        """
        h = Harness(self)
        with open(h.path("gateway.yaml"), "w") as f:
            f.write(GOOD.format(sim=11501))
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
