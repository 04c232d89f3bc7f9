"""
Tests for L{clawproxy.policy.jwt}: the attack matrix (C{alg: none}, key confusion,
expired, not yet valid, wrong C{iss}/C{aud}, unknown C{kid}, a key one byte off), key
files that rotate, and the cache of verified tokens, all on a fake clock.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import os
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from clawproxy.config import Config
from clawproxy.config.reader import read_config
from clawproxy.errors import Rejected
from clawproxy.policy import jwt as cjwt
from clawproxy.policy.auth import KeyStoreError, load_key_store
from clawproxy.policy.jwt import (
    JwtKeyError,
    JwtVerifier,
    KeySet,
    TokenCache,
    load_key_set,
    looks_like_jwt,
    make_key,
    parse_jwks,
)

NOW = 1_800_000_000
SECRET = "hs-secret-of-at-least-32-bytes!!"
ISSUER = "https://idp.test"
AUDIENCE = "clawproxy"
POOLS = {"main": {"instances": [{"id": "a", "url": "http://127.0.0.1:9000"}]}}


@functools.cache
def rsa_key(n: int = 0) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def ec_key(n: int = 0) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem(private: Any) -> str:
    return private.public_key().public_bytes(
        ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo).decode()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims at L{NOW}; C{None} values are left out."""
    base: dict[str, Any] = {"sub": "finance-agent", "iss": ISSUER, "aud": AUDIENCE,
                            "iat": NOW - 60, "nbf": NOW - 60, "exp": NOW + 600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(alg: str = "HS256", key: Any = SECRET, kid: str | None = None,
         **overrides: Any) -> bytes:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(**overrides), key, alg, headers=headers).encode()


def forge(header: dict[str, Any], payload: dict[str, Any], mac_key: bytes | None = None,
          signature: bytes = b"") -> bytes:
    """
    A token built by hand, as an attacker would: PyJWT refuses to sign some of these
    (C{alg: none} with a key, HMAC with a PEM key).
    """
    signing_input = (b64(json.dumps(header).encode()) + "." +
                     b64(json.dumps(payload).encode())).encode()
    if mac_key is not None:
        signature = hmac.new(mac_key, signing_input, hashlib.sha256).digest()
    return signing_input + b"." + b64(signature).encode()


def make_config(jwt_section: dict[str, Any], base_dir: str = ".") -> Config:
    data = {"auth": {"jwt": jwt_section}, "pools": POOLS,
            "routes": [{"path": "/", "pool": "main"}]}
    return read_config(data, {}, base_dir, refuse=True)


def matrix_config() -> dict[str, Any]:
    """HS256 by default secret, RS256 and ES256 by kid; iss, aud, max_age set."""
    return {
        "secret": SECRET, "algorithms": ["HS256", "RS256", "ES256"],
        "issuer": ISSUER, "audience": AUDIENCE, "leeway": "30s", "max_age": "1h",
        "keys": {"rsa-1": {"public_key": pem(rsa_key())},
                 "ec-1": {"public_key": pem(ec_key())}},
    }


class Base(SynchronousTestCase):
    def verifier(self, section: dict[str, Any] | None = None,
                 base_dir: str = ".") -> JwtVerifier:
        self.clock = Clock()
        self.clock.advance(NOW)
        config = make_config(section if section is not None else matrix_config(), base_dir)
        return JwtVerifier(config.auth.jwt, self.clock)

    def refused(self, v: JwtVerifier, token: bytes, message: str | None = None) -> Rejected:
        """Assert C{token} is refused with the SPEC's 401; return the rejection."""
        e = self.assertRaises(Rejected, v.verify, token)
        self.assertEqual((e.status, e.type, e.code), (401, "authentication_error",
                                                      "invalid_token"))
        self.assertEqual(dict(e.headers)["WWW-Authenticate"],
                         'Bearer realm="clawproxy", error="invalid_token"')
        body = json.loads(e.body())
        self.assertEqual(set(body["error"]), {"message", "type", "code"})
        self.assertNotIn(token.decode("latin-1"), e.message)
        if message is not None:
            self.assertIn(message, e.message)
        return e


class AttackMatrixTests(Base):
    """Every token below is refused with a 401 in the SPEC's error shape."""

    def setUp(self) -> None:
        self.v = self.verifier()

    def test_valid_tokens(self) -> None:
        """The control: valid HS256, RS256 (by kid) and ES256 (by kid) tokens pass."""
        self.assertEqual(self.v.verify(sign()), "finance-agent")
        self.assertEqual(self.v.verify(sign("RS256", rsa_key(), "rsa-1")), "finance-agent")
        self.assertEqual(self.v.verify(sign("ES256", ec_key(), "ec-1")), "finance-agent")
        self.assertEqual(self.v.verify(sign(aud=["other", AUDIENCE])), "finance-agent")

    def test_alg_none(self) -> None:
        """C{alg: none} in any spelling, signed or not, with or without a kid."""
        for alg in ("none", "None", "NONE", "nOnE"):
            self.refused(self.v, forge({"alg": alg, "typ": "JWT"}, claims()), "not accepted")
            self.refused(self.v, forge({"alg": alg, "kid": "rsa-1"}, claims()))
            self.refused(self.v, forge({"alg": alg}, claims(),
                                       mac_key=SECRET.encode()))

    def test_alg_not_configured(self) -> None:
        """An algorithm PyJWT knows but the config does not list (HS512, PS256)."""
        self.refused(self.v, sign("HS512", SECRET * 2), "not accepted")
        self.refused(self.v, sign("PS256", rsa_key(), "rsa-1"), "not accepted")
        for alg in (123, ["HS256"], None, ""):
            self.refused(self.v, forge({"alg": alg}, claims(), mac_key=SECRET.encode()))

    def test_hs_token_signed_with_rsa_public_key(self) -> None:
        """
        Key confusion: an HS256 token MACed with the RSA public key's PEM (public
        knowledge) is refused, naming the RSA key's kid or not.
        """
        public = pem(rsa_key()).encode()
        self.refused(self.v, forge({"alg": "HS256", "kid": "rsa-1"}, claims(), public),
                     "not accepted for this key")
        self.refused(self.v, forge({"alg": "HS256"}, claims(), public), "signature")
        der = rsa_key().public_key().public_bytes(ser.Encoding.DER,
                                                  ser.PublicFormat.SubjectPublicKeyInfo)
        self.refused(self.v, forge({"alg": "HS256", "kid": "rsa-1"}, claims(), der))

    def test_key_confusion_rs_only(self) -> None:
        """With only RS256 configured, an HS256 token MACed with the public key is refused."""
        v = self.verifier({"algorithms": ["RS256"], "public_key": pem(rsa_key())})
        self.assertEqual(v.verify(sign("RS256", rsa_key(), iss=None, aud=None)),
                         "finance-agent")
        self.refused(v, forge({"alg": "HS256"}, claims(aud=None), pem(rsa_key()).encode()),
                     "not accepted")

    def test_algorithm_must_fit_key(self) -> None:
        """An RS256 token naming the EC key, an ES256 token naming the RSA key."""
        self.refused(self.v, sign("RS256", rsa_key(), "ec-1"), "not accepted for this key")
        self.refused(self.v, sign("ES256", ec_key(), "rsa-1"), "not accepted for this key")

    def test_expired(self) -> None:
        """C{exp} in the past beyond the leeway is refused; within the leeway it passes."""
        self.refused(self.v, sign(exp=NOW - 31), "expired")
        self.refused(self.v, sign(exp=NOW - 30), "expired")
        self.assertEqual(self.v.verify(sign(exp=NOW - 29)), "finance-agent")

    def test_not_yet_valid(self) -> None:
        """C{nbf} or C{iat} in the future beyond the leeway."""
        self.refused(self.v, sign(nbf=NOW + 31), "not yet valid")
        self.refused(self.v, sign(iat=NOW + 31, nbf=None), "not yet valid")
        self.assertEqual(self.v.verify(sign(nbf=NOW + 29, iat=NOW)), "finance-agent")

    def test_wrong_issuer(self) -> None:
        self.refused(self.v, sign(iss="https://evil.test"), "issuer")
        self.refused(self.v, sign(iss=None), "'iss'")

    def test_wrong_audience(self) -> None:
        self.refused(self.v, sign(aud="someone-else"), "audience")
        self.refused(self.v, sign(aud=["a", "b"]), "audience")
        self.refused(self.v, sign(aud=None), "'aud'")

    def test_audience_not_configured(self) -> None:
        """Without C{audience}, a token meant for some audience is not taken for us."""
        v = self.verifier({"secret": SECRET})
        self.assertEqual(v.verify(sign(aud=None, iss=None)), "finance-agent")
        self.refused(v, sign(iss=None), "audience")

    def test_unknown_kid(self) -> None:
        self.refused(self.v, sign("RS256", rsa_key(), "rsa-2"), "unknown key")
        self.refused(self.v, sign(kid="nope"), "unknown key")

    def test_kid_ignored_without_named_keys(self) -> None:
        """With no key named by kid at all, a token's kid is ignored (default key)."""
        v = self.verifier({"secret": SECRET})
        self.assertEqual(v.verify(sign(kid="whatever", aud=None, iss=None)), "finance-agent")
        self.refused(v, sign(key=SECRET[::-1], kid="whatever", aud=None, iss=None),
                     "signature")

    def test_kid_required_for_keyed_algorithms(self) -> None:
        """An RS256 token without kid: RSA keys are only known by kid here."""
        self.refused(self.v, sign("RS256", rsa_key()), "no kid")

    def test_key_differing_in_last_byte(self) -> None:
        """A secret one byte off, and a signature one byte off (decoded, not base64)."""
        self.refused(self.v, sign(key=SECRET[:-1] + "?"), "signature")
        for token in (sign(), sign("RS256", rsa_key(), "rsa-1"),
                      sign("ES256", ec_key(), "ec-1")):
            head, payload, sig = token.split(b".")
            raw = bytearray(base64.urlsafe_b64decode(sig + b"=" * (-len(sig) % 4)))
            raw[-1] ^= 0x01
            self.refused(self.v, head + b"." + payload + b"." + b64(bytes(raw)).encode())

    def test_other_rsa_key(self) -> None:
        """A token signed by another RSA key under the right kid."""
        self.refused(self.v, sign("RS256", rsa_key(1), "rsa-1"), "signature")

    def test_max_age(self) -> None:
        """With C{max_age}: no C{exp}, no C{iat}, or an C{iat} too old are refused."""
        self.refused(self.v, sign(exp=None), "'exp'")
        self.refused(self.v, sign(iat=None), "'iat'")
        self.refused(self.v, sign(iat=NOW - 3600 - 31), "too old")
        self.assertEqual(self.v.verify(sign(iat=NOW - 3600)), "finance-agent")

    def test_exp_required_without_max_age(self) -> None:
        """A token without C{exp} never expires: refused even without C{max_age}."""
        v = self.verifier({"secret": SECRET})
        self.refused(v, sign(exp=None, aud=None), "'exp'")

    def test_bad_time_claims(self) -> None:
        """Time claims that are not finite numbers (JSON NaN, Infinity, strings, bools)."""
        for bad in (float("nan"), float("inf"), "9999999999", True, 10**30, [1]):
            self.refused(self.v, sign(exp=bad))
            self.refused(self.v, sign(nbf=bad))

    def test_agent_claim(self) -> None:
        """The C{sub} must be an agent name; another claim can be configured."""
        for sub in (None, "", 42, "a b", "x" * 129, "../admin"):
            self.refused(self.v, sign(sub=sub))
        section = {**matrix_config(), "agent_claim": "client_id"}
        v = self.verifier(section)
        self.assertEqual(v.verify(sign(client_id="ops-bot")), "ops-bot")
        self.refused(v, sign(), "'client_id'")

    def test_malformed(self) -> None:
        """Garbage, two segments, bad base64, bad JSON, an over-long token."""
        for token in (b"x", b"a.b", b"a.b.c", b"!!!.e30.", b"e30.e30.", b"..",
                      sign() + b".x", b"eyJ" + b"A" * 9000):
            self.refused(self.v, token)
        self.refused(self.v, forge({"alg": "HS256", "kid": 7}, claims(), SECRET.encode()))


class LooksLikeJwtTests(SynchronousTestCase):
    """How a bearer value is told to be a JWT rather than an API key."""

    def test_shapes(self) -> None:
        self.assertTrue(looks_like_jwt(sign()))
        self.assertTrue(looks_like_jwt(forge({"alg": "none"}, {})))
        for value in (b"sk-live-abc", b"a.b.c", b"key.with.dots", b"e30", b"!.e30.x"):
            self.assertFalse(looks_like_jwt(value), value)


class KeyLoadingTests(SynchronousTestCase):
    """Configured keys are checked when the gateway is built (and on reload)."""

    def write(self, name: str, data: str | bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        return path

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def errors(self, section: dict[str, Any]) -> list[str]:
        config = make_config(section, self.dir)
        return self.assertRaises(KeyStoreError, load_key_store, config).errors

    def test_private_key_refused(self) -> None:
        private = rsa_key().private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                          ser.NoEncryption()).decode()
        self.write("k.pem", private)
        [error] = self.errors({"algorithms": ["RS256"], "public_key": "k.pem"})
        self.assertIn("auth.jwt.public_key: is a private key", error)

    def test_short_rsa_key_refused(self) -> None:
        small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        [error] = self.errors({"algorithms": ["RS256"], "public_key": pem(small)})
        self.assertIn("at least 2048", error)

    def test_wrong_kind(self) -> None:
        """An EC key where only RS256 is accepted, garbage PEM."""
        [error] = self.errors({"algorithms": ["RS256"], "public_key": pem(ec_key())})
        self.assertIn("no accepted algorithm uses a key of type P-256", error)
        self.write("bad.pem", "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
        [error] = self.errors({"algorithms": ["RS256"], "public_key": "bad.pem"})
        self.assertIn("auth.jwt.public_key: not a PEM public key", error)

    def test_certificate_accepted(self) -> None:
        """An X.509 certificate's public key can verify tokens."""
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import NameOID

        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
        start = datetime.datetime(2020, 1, 1)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(rsa_key().public_key()).serial_number(1)
                .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=1))
                .sign(rsa_key(), hashes.SHA256()))
        path = self.write("cert.pem", cert.public_bytes(ser.Encoding.PEM))
        keys = load_key_set(make_config({"algorithms": ["RS256"],
                                         "public_key": path}).auth.jwt)
        self.assertEqual(keys.defaults["RSA"].algorithms, frozenset({"RS256"}))

    def test_jwks(self) -> None:
        """A JWKS: usable keys by kid; encryption keys and unused kinds skipped."""
        rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key().public_key()))
        ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key().public_key()))
        ed_jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(
            ed25519.Ed25519PrivateKey.generate().public_key()))
        doc = {"keys": [{**rsa_jwk, "kid": "r1", "alg": "RS256"},
                        {**rsa_jwk, "kid": "r-enc", "use": "enc"},
                        {**ec_jwk, "kid": "e1"},
                        {**ed_jwk, "kid": "ed"}]}
        keys = parse_jwks(json.dumps(doc).encode(), ["RS256", "ES256"])
        self.assertEqual(sorted(k.kid for k in keys), ["e1", "r1"])
        oct_jwk = {"kty": "oct", "kid": "h1", "k": b64(SECRET.encode())}
        [key] = parse_jwks(json.dumps({"keys": [oct_jwk]}).encode(), ["HS256", "RS256"])
        self.assertEqual((key.kind, key.key, key.algorithms),
                         ("oct", SECRET.encode(), frozenset({"HS256"})))
        short = {"kty": "oct", "kid": "h2", "k": b64(b"short")}
        self.assertRaises(ValueError, parse_jwks, json.dumps({"keys": [short]}).encode(),
                          ["HS256"])
        dup = {"keys": [{**rsa_jwk, "kid": "r1"}, {**rsa_jwk, "kid": "r1"}]}
        self.assertRaises(ValueError, parse_jwks, json.dumps(dup).encode(), ["RS256"])
        for bad in (b"[]", b"{", b'{"keys": [1]}', b'{"keys": [{"kty": "RSA", "n": "x"}]}'):
            self.assertRaises(ValueError, parse_jwks, bad, ["RS256"])
        path = self.write("bad.jwks", "{")
        [error] = self.errors({"algorithms": ["RS256"], "jwks_file": path})
        self.assertIn(f"auth.jwt.jwks_file: {path}: not valid JSON", error)

    def test_jwk_alg_binds(self) -> None:
        """A JWK with C{alg: RS256} does not verify PS256 tokens, though both are RSA."""
        rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key().public_key()))
        [key] = parse_jwks(json.dumps({"keys": [{**rsa_jwk, "kid": "r", "alg": "RS256"}]})
                           .encode(), ["RS256", "PS256"])
        self.assertEqual(key.algorithms, frozenset({"RS256"}))
        e = self.assertRaises(Rejected, KeySet([key]).select, "PS256", "r")
        self.assertEqual(e.status, 401)

    def test_key_set_conflicts(self) -> None:
        a = make_key("k", SECRET.encode(), ["HS256"])
        self.assertRaises(ValueError, KeySet, [a, make_key("k", b"y" * 32, ["HS256"])])
        d = make_key(None, SECRET.encode(), ["HS256"])
        self.assertRaises(ValueError, KeySet, [d, make_key(None, b"y" * 32, ["HS256"])])

    def test_error_type(self) -> None:
        """L{JwtKeyError} lists every problem."""
        e = JwtKeyError(["a: x", "b: y"])
        self.assertEqual((str(e), e.errors), ("a: x\nb: y", ["a: x", "b: y"]))


class RotationTests(Base):
    """Key files are re-read when they change, at most once a second."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.jwks = os.path.join(self.dir, "jwks.json")
        self.stats = 0
        real = cjwt._stat

        def counting(path: str) -> Any:
            self.stats += 1
            return real(path)

        self.patch(cjwt, "_stat", counting)

    def write_jwks(self, *kids_keys: tuple[str, Any]) -> None:
        keys = [{**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(k.public_key())), "kid": kid}
                for kid, k in kids_keys]
        tmp = self.jwks + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"keys": keys}, f)
        os.replace(tmp, self.jwks)  # a new inode: a change even within one mtime tick

    def test_jwks_rotation(self) -> None:
        """
        A new key is taken and a removed one refused once the file changed and a
        second passed, without rebuilding anything; a cached token of the removed key
        is refused too.
        """
        self.write_jwks(("old", rsa_key(0)))
        v = self.verifier({"algorithms": ["RS256"], "jwks_file": self.jwks}, self.dir)
        old = sign("RS256", rsa_key(0), "old", iss=None, aud=None)
        new = sign("RS256", rsa_key(1), "new", iss=None, aud=None)
        self.assertEqual(v.verify(old), "finance-agent")
        self.refused(v, new, "unknown key")
        self.write_jwks(("new", rsa_key(1)))
        self.clock.advance(0.5)
        self.assertEqual(v.verify(old), "finance-agent")  # not looked at yet
        self.clock.advance(0.5)
        self.assertEqual(v.verify(new), "finance-agent")
        self.refused(v, old, "unknown key")
        self.assertEqual(v.source.generation, 1)

    def test_stat_at_most_once_a_second(self) -> None:
        """A thousand requests within a second look at the file once."""
        self.write_jwks(("k", rsa_key(0)))
        v = self.verifier({"algorithms": ["RS256"], "jwks_file": self.jwks}, self.dir)
        token = sign("RS256", rsa_key(0), "k", iss=None, aud=None)
        before = self.stats
        for _ in range(1000):
            v.verify(token)
            self.clock.advance(0.0005)
        self.assertEqual(self.stats - before, 0)
        self.clock.advance(0.6)
        v.verify(token)
        self.assertEqual(self.stats - before, 1)

    def test_broken_file_keeps_keys(self) -> None:
        """A half-written or broken file keeps the keys in force until it is fixed."""
        self.write_jwks(("k", rsa_key(0)))
        v = self.verifier({"algorithms": ["RS256"], "jwks_file": self.jwks}, self.dir)
        token = sign("RS256", rsa_key(0), "k", iss=None, aud=None)
        with open(self.jwks, "w") as f:
            f.write('{"keys": [')
        self.clock.advance(1)
        self.assertEqual(v.verify(token), "finance-agent")
        self.assertEqual(v.source.generation, 0)
        self.write_jwks(("k2", rsa_key(1)))
        self.clock.advance(1)
        self.refused(v, token, "unknown key")

    def test_public_key_file(self) -> None:
        """A C{public_key} file replaced by another key: old tokens refused, new accepted."""
        path = os.path.join(self.dir, "pub.pem")
        with open(path, "w") as f:
            f.write(pem(ec_key(0)))
        v = self.verifier({"algorithms": ["ES256"], "public_key": path}, self.dir)
        old = sign("ES256", ec_key(0), iss=None, aud=None)
        self.assertEqual(v.verify(old), "finance-agent")
        with open(path + ".tmp", "w") as f:
            f.write(pem(ec_key(1)))
        os.replace(path + ".tmp", path)
        self.clock.advance(1)
        self.refused(v, old, "signature")
        self.assertEqual(v.verify(sign("ES256", ec_key(1), iss=None, aud=None)),
                         "finance-agent")

    def test_inline_keys_never_stat(self) -> None:
        """Inline keys: no file to look at, ever."""
        v = self.verifier()
        self.clock.advance(10)
        v.verify(sign(iat=NOW, nbf=None))
        self.assertEqual(self.stats, 0)


class CacheTests(Base):
    """Verified tokens are remembered: bounded, never past their validity."""

    def test_cache_hit_skips_verification(self) -> None:
        v = self.verifier()
        calls = []
        real = jwt.decode
        self.patch(cjwt.jwt, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
        token = sign()
        for _ in range(5):
            self.assertEqual(v.verify(token), "finance-agent")
        self.assertEqual(len(calls), 1)

    def test_never_past_exp(self) -> None:
        """A cached token expires exactly when it would have stopped verifying."""
        v = self.verifier()
        token = sign(exp=NOW + 10)
        v.verify(token)
        self.clock.advance(10 + 30 - 0.001)
        self.assertEqual(v.verify(token), "finance-agent")
        self.clock.advance(0.001)
        self.refused(v, token, "expired")

    def test_never_past_max_age(self) -> None:
        v = self.verifier()
        token = sign(iat=NOW - 3600, exp=NOW + 7200)
        v.verify(token)
        self.clock.advance(30)
        self.refused(v, token, "too old")

    def test_ttl(self) -> None:
        """An entry lives at most C{ttl} seconds, even for a long-lived token."""
        cache = TokenCache(size=10, ttl=60)
        cache.put(b"d", "a", until=NOW + 3600, now=NOW, generation=0)
        self.assertEqual(cache.get(b"d", NOW + 59, 0), "a")
        self.assertIsNone(cache.get(b"d", NOW + 60, 0))
        self.assertEqual(len(cache), 0)

    def test_bounded(self) -> None:
        """When full, the oldest entry goes."""
        cache = TokenCache(size=3)
        for i in range(5):
            cache.put(bytes([i]), str(i), until=NOW + 10, now=NOW, generation=0)
        self.assertEqual(len(cache), 3)
        self.assertIsNone(cache.get(bytes([0]), NOW, 0))
        self.assertEqual(cache.get(bytes([4]), NOW, 0), "4")

    def test_generation(self) -> None:
        """An entry from before a key change is not served."""
        cache = TokenCache()
        cache.put(b"d", "a", until=NOW + 10, now=NOW, generation=0)
        self.assertIsNone(cache.get(b"d", NOW, 1))

    def test_refusals_not_cached(self) -> None:
        """A refused token is checked again each time (and refused each time)."""
        v = self.verifier()
        token = sign(iss="https://evil.test")
        for _ in range(3):
            self.refused(v, token)
        self.assertEqual(len(v.cache), 0)
