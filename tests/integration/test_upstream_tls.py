"""
TLS towards C{https://} instances (issue 8 point 6): verified by default,
a pool's C{tls} section for a private CA, another server name, mutual TLS,
or no verification; over real loopback TLS with certificates the tests make.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import TestCase

from clawproxy.config import ConfigError
from tests.certs import CA, self_signed
from tests.integration.helpers import Harness, RunningGateway, bounded, error_of
from tests.integration.tls_helpers import (
    capture_log,
    config_file,
    https_instance,
    serve_tls,
    write,
)


class UpstreamTlsTests(TestCase):
    timeout = 30

    async def gateway(self, h: Harness, backend: Any, host: str = "127.0.0.1",
                      **tls: Any) -> RunningGateway:
        pool: dict[str, Any] = {"instances": [https_instance(backend, host)],
                                "health_check": {"enabled": False},
                                "retry": {"max_retries": 0}}
        if tls:
            pool["tls"] = tls
        return await h.gateway(config_file(h, {"secure": pool}))

    async def get(self, h: Harness, gw: RunningGateway) -> tuple[int, dict[str, Any]]:
        response = await bounded(h.client().get(gw.url + "/whoami"))
        return response.code, json.loads(await bounded(response.content()))

    async def assertRefused(self, h: Harness, gw: RunningGateway, log: list[str],
                            why: str) -> None:
        """The gateway answers 502 in the SPEC's shape and logs the TLS failure with C{why}."""
        code, body = await self.get(h, gw)
        self.assertEqual(code, 502)
        self.assertEqual(error_of(json.dumps(body).encode())["code"], "upstream_unreachable")
        tls_lines = [line for line in log if "TLS" in line and "secure" in line]
        self.assertTrue(tls_lines, log)
        self.assertIn(why, tls_lines[-1])

    async def test_untrusted_refused_then_trusted_with_ca_file(self) -> None:
        """
        An instance whose certificate comes from a private CA is refused by
        default (502, and a log line saying the certificate did not verify);
        with the pool's C{tls.ca_file} naming that CA it is served.
        """
        h = Harness(self)
        ca = CA.make()
        backend = serve_tls(h, *ca.issue("localhost"))
        log = capture_log(self)
        gw = await self.gateway(h, backend)
        await self.assertRefused(h, gw, log, "certificate verify failed")

        h2 = Harness(self)
        ca_file = write(h2, "ca.pem", ca.cert_pem)
        gw = await self.gateway(h2, backend, ca_file=ca_file)
        self.assertEqual(await self.get(h2, gw), (200, {"ok": True, "client": None}))

    async def test_reload_changes_trust(self) -> None:
        """
        A reload that adds the pool's C{ca_file} makes the instance acceptable
        without a restart; one that takes it away again refuses it at once,
        even though an idle connection made with the old settings was open.
        """
        h = Harness(self)
        ca = CA.make()
        backend = serve_tls(h, *ca.issue("localhost"))
        ca_file = write(h, "ca.pem", ca.cert_pem)
        gw = await self.gateway(h, backend)
        self.assertEqual((await self.get(h, gw))[0], 502)

        def rewrite(**tls: Any) -> None:
            pool: dict[str, Any] = {"instances": [https_instance(backend)],
                                    "health_check": {"enabled": False},
                                    "retry": {"max_retries": 0}}
            if tls:
                pool["tls"] = tls
            config_file(h, {"secure": pool})

        async def reload() -> None:
            response = await bounded(h.client().post(gw.admin_url + "/admin/reload"))
            self.assertEqual(response.code, 200, await bounded(response.content()))

        rewrite(ca_file=ca_file)
        await reload()
        self.assertEqual(await self.get(h, gw), (200, {"ok": True, "client": None}))
        self.assertEqual(len(backend.open_transports()), 1)  # kept for reuse
        rewrite()
        await reload()
        self.assertEqual((await self.get(h, gw))[0], 502)

    async def test_self_signed_refused(self) -> None:
        """A self-signed instance certificate is refused by default."""
        h = Harness(self)
        backend = serve_tls(h, *self_signed("localhost"))
        log = capture_log(self)
        gw = await self.gateway(h, backend)
        await self.assertRefused(h, gw, log, "certificate verify failed")

    async def test_wrong_host_refused(self) -> None:
        """
        A certificate from the trusted CA but for another host is refused
        (502, logged as a name mismatch); C{server_name} set to the name it
        was issued for makes it acceptable.
        """
        h = Harness(self)
        ca = CA.make()
        backend = serve_tls(h, *ca.issue("backend.internal"))
        ca_file = write(h, "ca.pem", ca.cert_pem)
        log = capture_log(self)
        # Reached as "localhost": the certificate names backend.internal (and 127.0.0.1).
        gw = await self.gateway(h, backend, host="localhost", ca_file=ca_file)
        await self.assertRefused(h, gw, log, "localhost")

        h2 = Harness(self)
        gw = await self.gateway(h2, backend, host="localhost", ca_file=ca_file,
                                server_name="backend.internal")
        self.assertEqual(await self.get(h2, gw), (200, {"ok": True, "client": None}))

    async def test_verify_false(self) -> None:
        """C{verify: false} accepts a certificate nothing vouches for."""
        h = Harness(self)
        backend = serve_tls(h, *self_signed("elsewhere"))
        gw = await self.gateway(h, backend, host="localhost", verify=False)
        self.assertEqual(await self.get(h, gw), (200, {"ok": True, "client": None}))

    async def test_mutual_tls(self) -> None:
        """
        An instance that requires a client certificate from its CA refuses
        the gateway without one (502, logged); with C{client_cert} and
        C{client_key} the gateway is served, and the instance sees its name.
        """
        h = Harness(self)
        ca = CA.make()
        backend = serve_tls(h, *ca.issue("localhost"), client_ca=ca.cert_pem)
        ca_file = write(h, "ca.pem", ca.cert_pem)
        log = capture_log(self)
        gw = await self.gateway(h, backend, ca_file=ca_file)
        code, body = await self.get(h, gw)
        self.assertEqual(code, 502, body)
        self.assertTrue([line for line in log if "TLS" in line and "secure" in line], log)

        h2 = Harness(self)
        cert, key = ca.issue("gateway-7", client=True)
        gw = await self.gateway(h2, backend, ca_file=write(h2, "ca.pem", ca.cert_pem),
                                client_cert=write(h2, "client.pem", cert),
                                client_key=write(h2, "client.key", key))
        self.assertEqual(await self.get(h2, gw), (200, {"ok": True, "client": "gateway-7"}))

    async def test_bad_files_refused_at_config_time(self) -> None:
        """
        A CA file with no certificate, a client key that is not the client
        certificate's, a client_cert without client_key and a CA file with
        verify: false are refused when the config is read, each error naming
        its key.
        """
        h = Harness(self)
        ca = CA.make()
        cert, _ = ca.issue("gw", client=True)
        _, other_key = ca.issue("gw", client=True)
        pools = {"p": {"instances": ["https://127.0.0.1:1"],
                       "tls": {"ca_file": write(h, "ca.pem", b"not a certificate\n"),
                               "client_cert": write(h, "c.pem", cert),
                               "client_key": write(h, "c.key", other_key)}},
                 "q": {"instances": ["https://127.0.0.1:2"],
                       "tls": {"client_cert": h.path("c.pem")}},
                 "r": {"instances": ["https://127.0.0.1:3"],
                       "tls": {"verify": False, "ca_file": h.path("c.pem")}}}
        with self.assertRaises(ConfigError) as caught:
            config_file(h, pools)
        errors = caught.exception.errors
        self.assertIn(f"pools.p.tls.ca_file: {h.path('ca.pem')}: no PEM certificate found",
                      errors)
        self.assertIn(f"pools.p.tls.client_key: {h.path('c.key')} is not the private key of"
                      f" the certificate in {h.path('c.pem')}", errors)
        self.assertIn("pools.q.tls.client_key: required with client_cert", errors)
        self.assertIn("pools.r.tls.ca_file: has no effect with verify: false", errors)

    async def test_shared_host_needs_same_settings(self) -> None:
        """Two pools giving one https host:port different tls settings are refused."""
        h = Harness(self)
        pools = {"a": {"instances": ["https://h.example:8443"], "tls": {"verify": False}},
                 "b": {"instances": ["https://h.example:8443/v2"]}}
        with self.assertRaises(ConfigError) as caught:
            config_file(h, pools)
        self.assertEqual(caught.exception.errors, [
            "pools.b.tls: h.example:8443 is also an instance of pool a, with other tls"
            " settings; give both the same"])
