"""
The admin listener and the C{clawproxy} admin commands against a running
gateway (SPEC sections 1, 2 "Names", 5 and 7).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from treq.client import HTTPClient
from twisted.trial.unittest import TestCase

from tests.integration.helpers import (
    HELLO,
    Harness,
    RunningGateway,
    bounded,
    child_env,
    error_of,
    pool,
    refusing_port,
)

#: SPEC section 7: family name -> type.
FAMILIES = {
    "requests_total": "counter",
    "request_duration_seconds": "histogram",
    "upstream_requests_total": "counter",
    "upstream_latency_seconds": "histogram",
    "upstream_ttfb_seconds": "histogram",
    "active_connections": "gauge",
    "backend_up": "gauge",
    "backend_weight": "gauge",
    "circuit_breaker_state": "gauge",
    "circuit_breaker_open_total": "counter",
    "upstream_retries_total": "counter",
    "fallback_responses_total": "counter",
    "rate_limited_total": "counter",
    "cache_requests_total": "counter",
    "coalesced_requests_total": "counter",
    "tokens_total": "counter",
    "spend_total": "counter",
}

INSTANCE_KEYS = {"id", "url", "state", "healthy", "weight", "active", "requests", "failures",
                 "success_rate", "breaker", "health"}


async def get_json(client: HTTPClient, url: str, **kw: Any) -> tuple[int, Any]:
    response = await bounded(client.get(url, **kw))
    return response.code, json.loads(await bounded(response.content()))


async def post_json(client: HTTPClient, url: str, body: Any = None, **kw: Any
                    ) -> tuple[Any, Any]:
    response = await bounded(client.post(url, json=body, **kw))
    return response, json.loads(await bounded(response.content()))


async def served_by(client: HTTPClient, gw: RunningGateway, n: int) -> Counter[str]:
    """Send C{n} chat requests; count the instances that answered."""
    seen: Counter[str] = Counter()
    for _ in range(n):
        response = await bounded(client.post(gw.url + "/v1/chat/completions", json=HELLO))
        await bounded(response.content())
        assert response.code == 200, response.code
        seen[response.headers.getRawHeaders("x-sim-instance")[0]] += 1
    return seen


class AdminApiTests(TestCase):
    timeout = 60

    async def start(self, **admin: Any) -> RunningGateway:
        self.h = h = Harness(self)
        self.sims = [h.simulator("sim-1"), h.simulator("sim-2")]
        config = h.config({"sim": pool(*self.sims)}, admin=admin) if admin else h.config(
            {"sim": pool(*self.sims)})
        self.client = h.client()
        return await h.gateway(config)

    async def test_status_shape(self) -> None:
        """
        C{GET /admin/status} answers the documented JSON: version, uptime,
        workers, and per pool its algorithm and instances with health,
        weight, counters, success rate and breaker state.
        """
        gw = await self.start()
        await served_by(self.client, gw, 2)
        code, status = await get_json(self.client, gw.admin_url + "/admin/status")
        self.assertEqual(code, 200)
        self.assertGreaterEqual(set(status), {"version", "uptime", "workers", "pools"})
        self.assertIsInstance(status["version"], str)
        self.assertIsInstance(status["uptime"], str)
        self.assertEqual(status["workers"], 1)
        self.assertEqual(list(status["pools"]), ["sim"])
        sim = status["pools"]["sim"]
        self.assertEqual(sim["algorithm"], "round_robin")
        self.assertEqual([i["id"] for i in sim["instances"]], ["sim-1", "sim-2"])
        for inst, backend in zip(sim["instances"], self.sims):
            self.assertGreaterEqual(set(inst), INSTANCE_KEYS)
            self.assertEqual(inst["url"], backend.url)
            self.assertEqual(inst["state"], "healthy")
            self.assertIs(inst["healthy"], True)
            self.assertEqual(inst["weight"], 1)
            self.assertEqual(inst["active"], 0)
            self.assertEqual(inst["requests"], 1)
            self.assertEqual(inst["failures"], 0)
            self.assertEqual(inst["success_rate"], 1)
            self.assertEqual(inst["breaker"], "CLOSED")
            self.assertIsInstance(inst["health"], dict)

    async def test_drain_and_undrain(self) -> None:
        """
        A drained instance gets no new requests and shows C{draining}; once
        undrained it gets traffic again.
        """
        gw = await self.start()
        response, inst = await post_json(self.client,
                                         gw.admin_url + "/admin/instances/sim-2/drain")
        self.assertEqual(response.code, 200)
        self.assertEqual((inst["id"], inst["state"]), ("sim-2", "draining"))
        self.assertEqual(await served_by(self.client, gw, 4), {"sim-1": 4})
        response, inst = await post_json(self.client,
                                         gw.admin_url + "/admin/instances/sim-2/undrain")
        self.assertEqual((inst["id"], inst["state"]), ("sim-2", "healthy"))
        self.assertEqual(await served_by(self.client, gw, 4), {"sim-1": 2, "sim-2": 2})

    async def test_set_weight(self) -> None:
        """
        Weight 0 takes an instance out of rotation, a positive weight puts it
        back; invalid weights and unknown instances are refused with JSON errors.
        """
        gw = await self.start()
        url = gw.admin_url + "/admin/instances/sim-1/weight"
        response, inst = await post_json(self.client, url, {"weight": 0})
        self.assertEqual((response.code, inst["weight"]), (200, 0))
        self.assertEqual(await served_by(self.client, gw, 3), {"sim-2": 3})
        response, inst = await post_json(self.client, url, {"weight": 0.5})
        self.assertEqual(inst["weight"], 0.5)
        self.assertEqual(set(await served_by(self.client, gw, 4)), {"sim-1", "sim-2"})
        for bad in ({"weight": -1}, {"weight": "heavy"}, {}):
            response, body = await post_json(self.client, url, bad)
            self.assertEqual(response.code, 400, bad)
            self.assertEqual(error_of(json.dumps(body).encode())["code"], "invalid_weight")
        response, body = await post_json(self.client,
                                         gw.admin_url + "/admin/instances/nope/drain")
        self.assertEqual(response.code, 404)
        self.assertEqual(error_of(json.dumps(body).encode())["code"], "instance_not_found")

    async def test_token_required_when_configured(self) -> None:
        """
        With an admin token configured, admin calls without it (or with a
        wrong one) get 401 with C{WWW-Authenticate}; with it they work.
        """
        gw = await self.start(token="s3cret")
        for headers in ({}, {"Authorization": ["Bearer wrong"]}, {"Authorization": ["s3cret"]}):
            for method, path in (("GET", "/admin/status"), ("GET", "/metrics"),
                                 ("POST", "/admin/instances/sim-1/drain")):
                response = await bounded(self.client.request(
                    method, gw.admin_url + path, headers=headers))
                body = await bounded(response.content())
                self.assertEqual(response.code, 401, (headers, path))
                self.assertTrue(response.headers.getRawHeaders("www-authenticate"))
                self.assertEqual(error_of(body)["code"], "invalid_admin_token")
        self.assertFalse(gw.instance("sim-1").drained)
        code, status = await get_json(self.client, gw.admin_url + "/admin/status",
                                      headers={"Authorization": ["Bearer s3cret"]})
        self.assertEqual(code, 200)
        self.assertIn("sim", status["pools"])

    async def test_web_pages_refused_without_token(self) -> None:
        """
        Without a token (the default), a DNS-rebound page (C{Host:
        evil.example}) and a cross-origin C{text/plain} form POST both get a
        403 JSON error from the real listener, and the instance is not
        drained; the same call with a loopback Host and no Origin drains it.
        """
        gw = await self.start()
        drain = b"POST /admin/instances/sim-1/drain HTTP/1.1\r\nHost: %s\r\n%s" \
                b"Content-Type: text/plain\r\nContent-Length: 3\r\n\r\nx=1"
        for host, extra in ((b"evil.example:%d" % gw.admin_port, b""),
                            (b"127.0.0.1:%d" % gw.admin_port, b"Origin: http://evil.example\r\n"),
                            (b"localhost:%d" % gw.admin_port, b"Sec-Fetch-Site: cross-site\r\n")):
            answer = await self.h.exchange(gw.admin_port, drain % (host, extra))
            self.assertEqual(answer.status, 403, answer.body)
            self.assertEqual(answer.header(b"content-type"), b"application/json")
            self.assertEqual(error_of(answer.body)["type"], "permission_error")
            self.assertFalse(gw.instance("sim-1").drained)
        rebound = b"GET /admin/status HTTP/1.1\r\nHost: evil.example\r\n\r\n"
        self.assertEqual((await self.h.exchange(gw.admin_port, rebound)).status, 403)
        answer = await self.h.exchange(gw.admin_port, drain % (b"127.0.0.1", b""))
        self.assertEqual(answer.status, 200)
        self.assertTrue(gw.instance("sim-1").drained)

    async def test_page_cannot_change_state_with_token(self) -> None:
        """
        With a token, any Host is served to a caller that has it, but a
        state-changing call a browser marks as sent by a page is refused.
        """
        gw = await self.start(token="s3cret")
        auth = b"Authorization: Bearer s3cret\r\n"
        answer = await self.h.exchange(gw.admin_port, (
            b"POST /admin/instances/sim-1/drain HTTP/1.1\r\nHost: gw.example\r\n" + auth
            + b"Origin: http://evil.example\r\nContent-Length: 0\r\n\r\n"))
        self.assertEqual(answer.status, 403)
        self.assertFalse(gw.instance("sim-1").drained)
        answer = await self.h.exchange(gw.admin_port, (
            b"GET /admin/status HTTP/1.1\r\nHost: gw.example\r\n" + auth + b"\r\n"))
        self.assertEqual(answer.status, 200)

    async def test_metrics_lists_every_family(self) -> None:
        """
        C{GET /metrics} on the admin listener is Prometheus text listing
        every SPEC section 7 family with its type, even before any traffic.
        """
        gw = await self.start()
        response = await bounded(self.client.get(gw.admin_url + "/metrics"))
        self.assertEqual(response.code, 200)
        ctype = response.headers.getRawHeaders("content-type")[0]
        self.assertTrue(ctype.startswith("text/plain"), ctype)
        text = (await bounded(response.content())).decode()
        types = dict(
            line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE ")
        )
        for name, kind in FAMILIES.items():
            self.assertEqual(types.get("clawproxy_" + name), kind, name)
        self.assertIn('clawproxy_backend_up{instance="sim-1",pool="sim"} 1.0', text)


class AdminCliTests(TestCase):
    """The admin commands, run as separate processes against a live gateway."""

    timeout = 90

    async def start(self, token: str | None = None) -> RunningGateway:
        self.h = h = Harness(self)
        sims = [h.simulator("sim-1"), h.simulator("sim-2")]
        admin = {"token": token} if token else {}
        return await h.gateway(h.config({"sim": pool(*sims)}, admin=admin))

    async def cli(self, *args: str, **env: str) -> tuple[int, str, str]:
        return await self.h.run("-m", "clawproxy.cli", *args, env=child_env(**env))

    async def test_status_and_changes(self) -> None:
        """
        C{clawproxy status} prints a table of the pools' instances;
        C{set-weight}, C{drain} and C{undrain} change the running gateway
        and say what they did.
        """
        gw = await self.start()
        code, out, err = await self.cli("status", "--admin", gw.admin_url)
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertIn("POOL", lines[1])
        self.assertIn("STATE", lines[1])
        table = lines[2:lines.index("")]
        rows = {line.split()[1]: line.split() for line in table}
        self.assertEqual(set(rows), {"sim-1", "sim-2"})
        self.assertEqual(lines[lines.index("") + 1].split()[:3], ["store", "memory", "healthy"])
        self.assertEqual(rows["sim-1"][:3], ["sim", "sim-1", "healthy"])

        code, out, err = await self.cli("set-weight", "sim-1", "0.25", "--admin", gw.admin_url)
        self.assertEqual((code, out.strip(), err), (0, "sim-1: weight 0.25", ""))
        self.assertEqual(gw.instance("sim-1").base_weight, 0.25)

        code, out, err = await self.cli("drain", "sim-2", CLAWPROXY_ADMIN=gw.admin_url)
        self.assertEqual((code, out.strip(), err), (0, "sim-2: draining", ""))
        self.assertTrue(gw.instance("sim-2").drained)
        code, out, _ = await self.cli("status", "--json", "--admin", gw.admin_url)
        states = {i["id"]: i["state"] for i in json.loads(out)["pools"]["sim"]["instances"]}
        self.assertEqual(states, {"sim-1": "healthy", "sim-2": "draining"})

        code, out, err = await self.cli("undrain", "sim-2", "--admin", gw.admin_url)
        self.assertEqual((code, out.strip(), err), (0, "sim-2: healthy", ""))
        self.assertFalse(gw.instance("sim-2").drained)

    async def test_token(self) -> None:
        """
        Against a gateway with an admin token the commands work with
        C{--token} (or C{$CLAWPROXY_ADMIN_TOKEN}) and, without it, exit
        non-zero with a one-line reason.
        """
        gw = await self.start(token="s3cret")
        code, out, err = await self.cli("drain", "sim-1", "--admin", gw.admin_url)
        self.assertNotEqual(code, 0)
        self.assertEqual(out, "")
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("401", err)
        self.assertFalse(gw.instance("sim-1").drained)
        code, out, err = await self.cli("drain", "sim-1", "--admin", gw.admin_url,
                                        "--token", "s3cret")
        self.assertEqual((code, out.strip()), (0, "sim-1: draining"))
        code, out, err = await self.cli("status", "--admin", gw.admin_url,
                                        CLAWPROXY_ADMIN_TOKEN="s3cret")
        self.assertEqual(code, 0, err)
        self.assertIn("draining", out)

    async def test_open_admin_listener_refused(self) -> None:
        """
        C{clawproxy check-config} refuses an admin listener on every
        interface without a token, naming the key; with a token it is fine.
        """
        self.h = Harness(self)
        base = ("pools: {p: {instances: [{id: a, url: 'http://127.0.0.1:9'}]}}\n"
                "routes: [{path: /*, pool: p}]\n")
        with open(self.h.path("open.yaml"), "w") as f:
            f.write(base + "admin: {listen: 'tcp:9901'}\n")
        with open(self.h.path("token.yaml"), "w") as f:
            f.write(base + "admin: {listen: 'tcp:9901', token: s3cret}\n")
        code, _, err = await self.cli("check-config", "open.yaml")
        self.assertEqual(code, 1)
        self.assertEqual(err.strip().splitlines(), [
            "admin.listen: listens beyond loopback without admin.token: bind it to 127.0.0.1"
            " or ::1 (interface=...), or set admin.token"])
        code, _, err = await self.cli("check-config", "token.yaml")
        self.assertEqual(code, 0, err)

    async def test_unreachable_gateway(self) -> None:
        """
        Every admin command exits non-zero with a one-line reason (no
        traceback) when nothing listens at the admin URL.
        """
        self.h = Harness(self)
        url = f"http://127.0.0.1:{refusing_port(self)}"
        for args in (("status",), ("set-weight", "sim-1", "2"), ("drain", "sim-1"),
                     ("undrain", "sim-1")):
            code, out, err = await self.cli(*args, "--admin", url)
            self.assertNotEqual(code, 0, args)
            self.assertEqual(out, "")
            lines = err.strip().splitlines()
            self.assertEqual(len(lines), 1, err)
            self.assertIn("cannot reach", lines[0])
            self.assertIn(url, lines[0])
