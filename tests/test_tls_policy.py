"""The upstream HTTPS policy (L{clawproxy.backends.tls}) and its failure descriptions."""

from __future__ import annotations

import os

from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, DNSMismatch
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived

from clawproxy.backends.tls import UpstreamTLS, tls_failure
from clawproxy.config import parse_config
from clawproxy.config.model import https_netloc
from tests.certs import CA


class TlsFailureTests(SynchronousTestCase):
    def test_described(self) -> None:
        """A handshake failure is named in a few words; other failures are not TLS ones."""
        verify = SSL.Error([("SSL routines", "", "certificate verify failed")])
        self.assertEqual(tls_failure(Failure(ResponseNeverReceived([Failure(verify)]))),
                         "certificate verify failed")
        mismatch = VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID("localhost"))])
        self.assertEqual(tls_failure(Failure(ResponseNeverReceived([Failure(mismatch)]))),
                         "certificate does not name localhost")
        self.assertIsNone(tls_failure(Failure(ResponseNeverReceived([Failure(OSError())]))))
        self.assertIsNone(tls_failure(Failure(ValueError("x"))))


class PolicyTests(SynchronousTestCase):
    def config(self, tls: dict[str, object] | None) -> object:
        pool: dict[str, object] = {"instances": ["https://127.0.0.1:8443", "http://h:1"]}
        if tls is not None:
            pool["tls"] = tls
        return parse_config({"pools": {"p": pool}, "routes": [{"path": "/*", "pool": "p"}]},
                            environ={}, base_dir=self.dir)

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "ca.pem"), "wb") as f:
            f.write(CA.make().cert_pem)

    def test_per_netloc(self) -> None:
        """
        A pool's settings apply to its https instances' host:port; others get
        the verified default; L{UpstreamTLS.configure} says whether they changed.
        """
        policy = UpstreamTLS()
        default = policy.creator((b"127.0.0.1", 8443))
        config = self.config({"ca_file": "ca.pem"})
        self.assertTrue(policy.configure(policy.prepare(config.pools)))
        configured = policy.creator((b"127.0.0.1", 8443))
        self.assertIsNot(configured, default)
        self.assertIs(policy.creator((b"127.0.0.1", 8443)), configured)
        self.assertFalse(policy.configure(policy.prepare(config.pools)))
        # The CA file replaced in place: a change, new creators.
        with open(os.path.join(self.dir, "ca.pem"), "wb") as f:
            f.write(CA.make().cert_pem)
        self.assertTrue(policy.configure(policy.prepare(config.pools)))
        self.assertIsNot(policy.creator((b"127.0.0.1", 8443)), configured)
        self.assertTrue(policy.configure(policy.prepare(self.config(None).pools)))
        self.assertIs(policy.creator((b"127.0.0.1", 8443)), default)

    def test_https_netloc(self) -> None:
        self.assertEqual(https_netloc("https://H.example/v1"), ("h.example", 443))
        self.assertEqual(https_netloc("https://[::1]:8443"), ("::1", 8443))
        self.assertIsNone(https_netloc("http://h.example"))
