"""
JWT bearer tokens: key sets, key files that rotate, and verification (SPEC C{auth.jwt}).

The cryptography is PyJWT's (signatures) and C{cryptography}'s (key parsing); this module
decides I{which} key and algorithm may verify a token, and checks the claims.

How a token is verified
=======================

 1. Its header is read (unverified) for C{alg} and C{kid}. C{alg} must be one of
    C{auth.jwt.algorithms}, compared exactly: C{none} (any case) is never among them.
 2. The key: a token with a C{kid} is verified with the key of that id (C{keys}, the JWKS
    file) and nothing else; an unknown C{kid} is refused. A token without C{kid} uses the
    default key of its algorithm's kind (C{secret} for C{HS*}, C{public_key} otherwise).
    When no key has an id at all, a C{kid} is ignored and the default key is used.
 3. The algorithm must fit the key: C{HS*} only with a secret, C{RS*}/C{PS*} only with
    an RSA key, C{ES256}/C{ES384}/C{ES512} only with a P-256/P-384/P-521 key,
    C{EdDSA} only with an Ed25519/Ed448 key, and a JWK's own C{alg} when it has one.
    So a token signed C{HS256} with an RSA public key as its "secret" (key confusion)
    never meets that public key as an HMAC secret. PyJWT then checks the signature
    with exactly that algorithm (C{algorithms=[alg]}), and C{iss} and C{aud}.
 4. The time claims are checked here on the injected clock: C{exp} is required (a
    number), C{nbf} and C{iat} must not be in the future, and with C{max_age}, C{iat}
    is required and no older than that. Each allows C{leeway} of skew.
 5. The agent is the C{agent_claim} (C{sub}): a non-empty name of letters, digits and
    C{_ . : @ -}, at most 128 characters.

Key files (C{public_key} given as a file, a key's C{public_key} file, C{jwks_file}) are
re-read when they change, checked at most once per L{KeySource.interval} seconds: keys
rotate without a restart or reload. A file that cannot be read or parsed keeps the keys
in force (and is logged); the next change is tried again.

Verified tokens are remembered briefly (L{TokenCache}): bounded, never past a token's
C{exp} (or C{max_age}), forgotten whenever the keys change.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.exceptions import (
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    MissingRequiredClaimError,
    PyJWKError,
    PyJWTError,
)
from twisted.logger import Logger

from clawproxy.config import JwtConfig
from clawproxy.config.model import HMAC_MIN_BYTES
from clawproxy.errors import Rejected

__all__ = [
    "MAX_TOKEN_LENGTH",
    "JwtKeyError",
    "JwtVerifier",
    "KeySet",
    "KeySource",
    "TokenCache",
    "VerifyKey",
    "invalid_token",
    "load_key_set",
    "looks_like_jwt",
]

#: Tokens longer than this (in bytes) are refused unread.
MAX_TOKEN_LENGTH = 8192

#: The 401 challenge for a refused token (RFC 6750 3.1).
_CHALLENGE = (("WWW-Authenticate", 'Bearer realm="clawproxy", error="invalid_token"'),)

_AGENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,127}")
_B64URL = re.compile(rb"[A-Za-z0-9_-]*")
#: RSA keys shorter than this are refused (NIST SP 800-131A).
_MIN_RSA_BITS = 2048

#: The kind of key each algorithm needs.
_KIND = {
    **{f"HS{n}": "oct" for n in (256, 384, 512)},
    **{f"{p}{n}": "RSA" for p in ("RS", "PS") for n in (256, 384, 512)},
    "ES256": "P-256", "ES384": "P-384", "ES512": "P-521",
    "EdDSA": "OKP",
}  # fmt: skip
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def invalid_token(message: str) -> Rejected:
    """The 401 for a bearer token that is not accepted (never holds the token)."""
    return Rejected(401, message, "authentication_error", "invalid_token", _CHALLENGE)


class JwtKeyError(ValueError):
    """
    A configured key cannot be used.

    @ivar errors: every problem, each as C{"auth.jwt.KEY: message"}.
    """

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


# -- keys --------------------------------------------------------------------------------


@attrs.frozen
class VerifyKey:
    """
    One key able to verify tokens.

    @ivar kid: its id, or C{None} for a default key (C{secret}, C{public_key}).
    @ivar kind: C{oct}, C{RSA}, C{P-256}, C{P-384}, C{P-521} or C{OKP}.
    @ivar key: the secret's bytes, or a C{cryptography} public key.
    @ivar algorithms: the configured algorithms this key may verify.
    """

    kid: str | None
    kind: str
    key: Any = attrs.field(repr=False)
    algorithms: frozenset[str]


def key_kind(key: Any) -> str:
    """The kind of a secret (bytes) or C{cryptography} public key."""
    if isinstance(key, bytes):
        return "oct"
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _CURVES.get(key.curve.name, key.curve.name)
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return "OKP"
    raise ValueError(f"unsupported key type {type(key).__name__}")


def make_key(kid: str | None, key: Any, accepted: Iterable[str],
             only: str | None = None) -> VerifyKey:
    """
    A L{VerifyKey} for C{key}, able to verify the C{accepted} algorithms of its kind
    (and only C{only} when given, a JWK's C{alg}).

    @raise ValueError: an RSA key under 2048 bits, a secret too short for an C{HS*}
        algorithm it would verify, or a key of a kind no accepted algorithm uses.
    """
    kind = key_kind(key)
    algorithms = frozenset(a for a in accepted if _KIND.get(a) == kind
                           and (only is None or a == only))
    if not algorithms:
        raise ValueError(f"no accepted algorithm uses a key of type {kind}")
    if kind == "RSA" and key.key_size < _MIN_RSA_BITS:
        raise ValueError(f"RSA key of {key.key_size} bits: at least {_MIN_RSA_BITS} needed")
    if kind == "oct":
        need = max(HMAC_MIN_BYTES[a] for a in algorithms)
        if len(key) < need:
            raise ValueError(f"secret of {len(key)} bytes: at least {need} needed")
    return VerifyKey(kid, kind, key, algorithms)


def parse_public_pem(data: bytes) -> Any:
    """
    A public key from PEM text: a public key or an X.509 certificate's.

    @raise ValueError: for anything else (a private key is refused: give its public half).
    """
    if b"PRIVATE KEY-----" in data:
        raise ValueError("is a private key: give the public key (or certificate) instead")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificate(data).public_key()
        return load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a PEM public key or certificate ({e})") from None


def parse_jwks(data: bytes, accepted: Iterable[str]) -> list[VerifyKey]:
    """
    The usable keys of a JSON Web Key Set.

    Keys no accepted algorithm uses, and keys marked C{"use": "enc"}, are skipped (a set
    often holds more keys than one service uses); private JWKs give their public half.

    @raise ValueError: the set is not JSON of the right shape, a key is malformed or
        too weak, or two keys share a C{kid}.
    """
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise ValueError("not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('must be a JSON object {"keys": [...]}')
    accepted = tuple(accepted)
    out: list[VerifyKey] = []
    seen: set[str | None] = set()
    for i, jwk in enumerate(doc["keys"]):
        where = f"keys[{i}]"
        if not isinstance(jwk, dict):
            raise ValueError(f"{where}: must be an object")
        if jwk.get("use", "sig") != "sig":
            continue
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise ValueError(f"{where}: kid must be a string")
        alg = jwk.get("alg")
        if alg is not None and alg not in accepted:
            continue
        try:
            key = jwt.PyJWK(jwk).key
        except (PyJWKError, PyJWTError, ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{where}: {e}") from None
        if hasattr(key, "public_key"):
            key = key.public_key()
        try:
            kind = key_kind(key)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if not any(_KIND.get(a) == kind for a in accepted):
            continue
        try:
            made = make_key(kid, key, accepted, alg)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if kid in seen:
            raise ValueError(f"{where}: a second key with kid {kid!r}")
        seen.add(kid)
        out.append(made)
    return out


class KeySet:
    """
    The keys in force: by C{kid}, and one default key per kind for tokens without one.
    """

    def __init__(self, keys: Iterable[VerifyKey]) -> None:
        """@raise ValueError: two keys with the same C{kid}, or two defaults of one kind."""
        self.by_kid: dict[str, VerifyKey] = {}
        self.defaults: dict[str, VerifyKey] = {}
        for key in keys:
            if key.kid is None:
                if key.kind in self.defaults:
                    raise ValueError(f"two keys of type {key.kind} without a kid")
                self.defaults[key.kind] = key
            elif self.by_kid.setdefault(key.kid, key) is not key:
                raise ValueError(f"two keys with kid {key.kid!r}")

    def __len__(self) -> int:
        return len(self.by_kid) + len(self.defaults)

    def __repr__(self) -> str:
        return f"<KeySet kids={sorted(self.by_kid)} defaults={sorted(self.defaults)}>"

    def select(self, alg: str, kid: Any) -> VerifyKey:
        """
        The key that verifies a token with header C{alg} and C{kid}.

        @raise Rejected: 401 for an unknown C{kid}, no key for C{alg}, or an algorithm
            that does not fit the key.
        """
        kind = _KIND.get(alg)
        if kid is not None and self.by_kid:
            key = self.by_kid.get(kid)
            if key is None:
                raise invalid_token("token signed with an unknown key (kid)")
        else:
            key = self.defaults.get(kind) if kind is not None else None
            if key is None:
                raise invalid_token(
                    "token has no kid" if self.by_kid else f"no key for {alg} tokens")
        if alg not in key.algorithms:
            raise invalid_token(f"algorithm {alg} is not accepted for this key")
        return key


# -- loading and reloading ---------------------------------------------------------------


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _is_file(value: str | None) -> bool:
    return value is not None and "-----BEGIN" not in value


def key_files(config: JwtConfig) -> list[str]:
    """The files the key set of C{config} is read from (to watch for changes)."""
    files = [config.public_key] if _is_file(config.public_key) else []
    files += [k.public_key for k in config.keys.values() if _is_file(k.public_key)]
    if config.jwks_file:
        files.append(config.jwks_file)
    return files  # type: ignore[return-value]


def load_key_set(config: JwtConfig) -> KeySet:
    """
    Read every key C{config} names (inline, key files, JWKS file).

    @raise JwtKeyError: listing every problem, each naming its key.
    """
    errors: list[str] = []
    keys: list[VerifyKey] = []
    accepted = config.algorithms

    def add(where: str, kid: str | None, secret: str | None, public: str | None) -> None:
        try:
            if secret is not None:
                keys.append(make_key(kid, secret.encode(), accepted))
            elif public is not None:
                data = public.encode() if "-----BEGIN" in public else _read(public)
                keys.append(make_key(kid, parse_public_pem(data), accepted))
        except OSError as e:
            errors.append(f"auth.jwt.{where}: cannot read {public}: {e.strerror}")
        except ValueError as e:
            errors.append(f"auth.jwt.{where}: {e}")

    add("secret", None, config.secret, None)
    add("public_key", None, None, config.public_key)
    for kid, entry in config.keys.items():
        add(f"keys.{kid}", kid, entry.secret, entry.public_key)
    if config.jwks_file:
        try:
            keys.extend(parse_jwks(_read(config.jwks_file), accepted))
        except OSError as e:
            errors.append(f"auth.jwt.jwks_file: cannot read {config.jwks_file}: {e.strerror}")
        except ValueError as e:
            errors.append(f"auth.jwt.jwks_file: {config.jwks_file}: {e}")
    if not errors:
        try:
            key_set = KeySet(keys)
        except ValueError as e:
            errors.append(f"auth.jwt.keys: {e}")
        else:
            if len(key_set):
                return key_set
            errors.append("auth.jwt: no usable key for the accepted algorithms")
    raise JwtKeyError(errors)


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class KeySource:
    """
    The key set of a L{JwtConfig}, re-read when one of its files changes.

    @ivar interval: seconds between two looks at the files (C{os.stat} each).
    @ivar generation: counts key set changes (caches of verified tokens key on it).
    """

    log = Logger()
    interval = 1.0

    def __init__(self, config: JwtConfig, clock: Any) -> None:
        """@raise JwtKeyError: the keys cannot be loaded now."""
        self.config = config
        self.clock = clock
        self.files = key_files(config)
        self._seen = self._stats()
        self.keys = load_key_set(config)
        self.generation = 0
        self._checked = clock.seconds()

    def _stats(self) -> tuple[Any, ...]:
        return tuple(_stat(p) for p in self.files)

    def current(self) -> KeySet:
        """The keys in force, after looking at the files if L{interval} has passed."""
        if self.files:
            now = self.clock.seconds()
            if now - self._checked >= self.interval:
                self._checked = now
                self._refresh()
        return self.keys

    def _refresh(self) -> None:
        stats = self._stats()
        if stats == self._seen:
            return
        self._seen = stats
        try:
            keys = load_key_set(self.config)
        except JwtKeyError as e:
            self.log.error("JWT keys not reloaded, the previous ones stay: {errors}",
                           errors="; ".join(e.errors))
            return
        self.keys = keys
        self.generation += 1
        self.log.info("JWT keys reloaded: {keys!r}", keys=keys)


# -- tokens ------------------------------------------------------------------------------


def looks_like_jwt(value: bytes) -> bool:
    """
    Whether a bearer credential has the JWS compact shape (C{header.payload.signature},
    base64url, with a header that decodes to a JSON object): how a JWT is told from an
    API key when both are accepted.
    """
    if value.count(b".") != 2:
        return False
    head = value.partition(b".")[0]
    if not head or _B64URL.fullmatch(head) is None:
        return False
    try:
        decoded = json.loads(base64.urlsafe_b64decode(head + b"=" * (-len(head) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        return False
    return isinstance(decoded, dict)


def _number(value: Any) -> bool:
    """
    A JSON number a time claim can be: finite (Python's JSON reads C{NaN} and
    C{Infinity}) and within float precision (no huge integers).
    """
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) < 2**53
    return isinstance(value, float) and math.isfinite(value)


class TokenCache:
    """
    Recently verified tokens (by SHA-256 digest) and the agent each names, until a
    deadline that never passes the token's own validity.

    Bounded: when full, the oldest entry goes. Lookups compare digests with
    L{hmac.compare_digest}, as the API key store does.
    """

    def __init__(self, size: int = 4096, ttl: float = 60.0) -> None:
        self.size = size
        self.ttl = ttl
        self._entries: dict[bytes, tuple[bytes, str, float, int]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes, now: float, generation: int) -> str | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        stored, agent, until, gen = entry
        if now >= until or gen != generation or not hmac.compare_digest(stored, digest):
            del self._entries[digest]
            return None
        return agent

    def put(self, digest: bytes, agent: str, until: float, now: float,
            generation: int) -> None:
        until = min(until, now + self.ttl)
        if until <= now or self.size <= 0:
            return
        if len(self._entries) >= self.size and digest not in self._entries:
            del self._entries[next(iter(self._entries))]
        self._entries[digest] = (digest, agent, until, generation)

    def clear(self) -> None:
        self._entries.clear()


class JwtVerifier:
    """
    Verifies bearer tokens for one L{JwtConfig}; L{verify} answers the agent's name.
    """

    def __init__(self, config: JwtConfig, clock: Any, source: KeySource | None = None,
                 cache: TokenCache | None = None) -> None:
        """@raise JwtKeyError: the keys cannot be loaded."""
        self.config = config
        self.clock = clock
        self.source = source if source is not None else KeySource(config, clock)
        self.cache = cache if cache is not None else TokenCache()
        self._generation = self.source.generation
        self._options: dict[str, Any] = {
            "verify_signature": True,
            # Time claims are checked in _check_times, on the injected clock.
            "verify_exp": False, "verify_nbf": False, "verify_iat": False,
            "verify_iss": config.issuer is not None,
            # With no audience configured, PyJWT refuses tokens that carry one.
            "verify_aud": True,
            "require": (["iss"] if config.issuer is not None else [])
            + (["aud"] if config.audience is not None else []),
            "enforce_minimum_key_length": True,
        }

    def __repr__(self) -> str:
        return f"<JwtVerifier {list(self.config.algorithms)} {self.source.keys!r}>"

    def verify(self, token: bytes) -> str:
        """
        The agent a bearer token names, if it is valid now.

        @raise Rejected: 401 C{invalid_token} (the message says why, never the token).
        """
        if len(token) > MAX_TOKEN_LENGTH:
            raise invalid_token("token too long")
        keys = self.source.current()
        generation = self.source.generation
        if generation != self._generation:
            self._generation = generation
            self.cache.clear()
        now = self.clock.seconds()
        digest = hashlib.sha256(token).digest()
        agent = self.cache.get(digest, now, generation)
        if agent is not None:
            return agent
        agent, until = self._verify(token, keys, now)
        self.cache.put(digest, agent, until, now, generation)
        return agent

    def _verify(self, token: bytes, keys: KeySet, now: float) -> tuple[str, float]:
        config = self.config
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            raise invalid_token("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in config.algorithms:
            shown = alg if isinstance(alg, str) and len(alg) <= 16 else "?"
            raise invalid_token(f"token algorithm {shown!r} is not accepted")
        key = keys.select(alg, header.get("kid"))
        try:
            claims = jwt.decode(
                token, key.key, algorithms=[alg], options=self._options,
                audience=config.audience, issuer=config.issuer,
            )
        except InvalidSignatureError:
            raise invalid_token("token signature is not valid") from None
        except InvalidIssuerError:
            raise invalid_token("token issuer (iss) is not accepted") from None
        except InvalidAudienceError:
            raise invalid_token("token audience (aud) is not accepted") from None
        except MissingRequiredClaimError as e:
            raise invalid_token(f"token has no {e.claim!r} claim") from None
        except PyJWTError:
            raise invalid_token("malformed token") from None
        until = self._check_times(claims, now)
        agent = claims.get(config.agent_claim)
        if not isinstance(agent, str) or _AGENT_NAME.fullmatch(agent) is None:
            raise invalid_token(f"token's {config.agent_claim!r} claim is not an agent name")
        return agent, until

    def _check_times(self, claims: Mapping[str, Any], now: float) -> float:
        """
        Check C{exp}, C{nbf}, C{iat} and C{max_age} at C{now}.

        @return: the time the token stops being valid.
        """
        config = self.config
        leeway = config.leeway
        exp = claims.get("exp")
        if exp is None:
            raise invalid_token("token has no 'exp' claim")
        if not _number(exp):
            raise invalid_token("token 'exp' is not a number")
        until = exp + leeway
        if now >= until:
            raise invalid_token("token expired")
        for name in ("nbf", "iat"):
            value = claims.get(name)
            if value is None:
                continue
            if not _number(value):
                raise invalid_token(f"token {name!r} is not a number")
            if value > now + leeway:
                raise invalid_token("token not yet valid")
        if config.max_age is not None:
            iat = claims.get("iat")
            if iat is None:
                raise invalid_token("token has no 'iat' claim (auth.jwt.max_age is set)")
            oldest = iat + config.max_age + leeway
            if now >= oldest:
                raise invalid_token("token too old (auth.jwt.max_age)")
            until = min(until, oldest)
        return until
