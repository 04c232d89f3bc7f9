"""
API key authentication and per-route authorization (SPEC sections 2 and 4).

Keys reach the gateway in the configured header (C{X-API-Key} by default) or as
C{Authorization: Bearer KEY}. They are stored only in the form C{clawproxy hash-key}
prints (C{sha256:<hex>}, see L{clawproxy.config.hash_key}), in C{agents.NAME.keys} and in
the JSON file C{auth.api_key.keys_store}; plain keys are never stored, logged or echoed
in an error message.

When C{auth.jwt} is set, C{Authorization: Bearer} may carry a JWT instead:
L{extract_credential} tells the two apart, L{clawproxy.policy.jwt} verifies tokens.

Everything here is pure (no reactor, no I/O) except L{load_key_store}, which reads the
keys store file (and checks the JWT key files load) when the gateway is built or
reloaded.

Comparison and timing
=====================

L{KeyStore.lookup} hashes the presented key with SHA-256 first and only then looks the
digest up in a dict keyed by digest, confirming the hit with L{hmac.compare_digest}.
Nothing ever compares a presented key with a stored one byte by byte, so response
times can only depend on the I{digest} of what the client sent, a value the client
already knows. Learning from timing that a stored digest starts with some bytes (or
shares a dict bucket, whose position also depends on the per-process random hash seed)
would not help an attacker: turning a stored digest into a working key needs a SHA-256
preimage. The final C{compare_digest} makes the confirming comparison constant-time as
well, so the code does not depend on dict equality for the security argument.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from clawproxy.config import AgentConfig, Config, RouteConfig
from clawproxy.errors import Rejected
from clawproxy.policy.jwt import (
    MAX_TOKEN_LENGTH,
    JwtKeyError,
    invalid_token,
    load_key_set,
    looks_like_jwt,
)
from clawproxy.units import Rate

__all__ = [
    "MAX_KEY_LENGTH",
    "WWW_AUTHENTICATE",
    "Agent",
    "KeyStore",
    "KeyStoreError",
    "authenticate",
    "authorize",
    "extract_credential",
    "extract_key",
    "invalid_api_key",
    "load_key_store",
    "missing_api_key",
    "missing_credentials",
    "parse_keys_store",
    "permission_denied",
    "stored_digest",
    "strip_credentials",
]

#: Presented keys longer than this (in bytes) are refused without being hashed.
MAX_KEY_LENGTH = 512

#: The challenge sent with every 401 (RFC 9110 11.6.1; the scheme of RFC 6750).
WWW_AUTHENTICATE = (("WWW-Authenticate", 'Bearer realm="clawproxy"'),)

_STORED_KEY = re.compile(r"sha256:([0-9a-fA-F]{64})")
_AGENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@-]*")
_AUTHORIZATION = b"authorization"
_BEARER = b"bearer"
_OWS = b" \t"


# -- errors --------------------------------------------------------------------------------


def invalid_api_key(message: str = "invalid API key") -> Rejected:
    """
    The 401 for a presented key that is unknown or malformed.

    @param message: must never contain the key itself.
    """
    return Rejected(401, message, "authentication_error", "invalid_api_key", WWW_AUTHENTICATE)


def missing_api_key(header_name: str = "X-API-Key") -> Rejected:
    """The 401 for a route that needs credentials when none were sent."""
    return Rejected(
        401,
        f"this route requires an API key: send it in {header_name} or as"
        " Authorization: Bearer",
        "authentication_error",
        "missing_api_key",
        WWW_AUTHENTICATE,
    )


def missing_credentials(header_name: str = "X-API-Key", api_keys: bool = True,
                        tokens: bool = False) -> Rejected:
    """
    The 401 for a route that needs credentials when none were sent, naming the ways
    this gateway accepts them (API keys, JWTs or both).
    """
    if not tokens:
        return missing_api_key(header_name)
    if not api_keys:
        return Rejected(401, "this route requires a token: send it as Authorization: Bearer",
                        "authentication_error", "missing_token", WWW_AUTHENTICATE)
    return Rejected(
        401, f"this route requires credentials: an API key in {header_name}, or an API key"
        " or a token as Authorization: Bearer", "authentication_error",
        "missing_credentials", WWW_AUTHENTICATE)


def permission_denied(message: str = "this agent may not use this route") -> Rejected:
    """The 403 for valid credentials that a route does not accept."""
    return Rejected(403, message, "permission_error", "permission_denied")


class KeyStoreError(ValueError):
    """
    The keys store file cannot be used.

    @ivar errors: every problem found, each naming the file, e.g.
        C{"/etc/api-keys.json: finance-agent[1]: must be a stored key ..."}.
    """

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


# -- agents and the key store --------------------------------------------------------------


@attrs.frozen
class Agent:
    """
    An identified caller, as set on C{RequestContext.agent}.

    Its attributes are what route conditions C{agent.NAME} read (C{agent.tier},
    C{agent.name}). It never holds keys, hashed or not.

    @ivar config: the agent's entry under C{agents}, or C{None} for an agent that only
        the keys store names.
    """

    name: str
    tier: str | None = None
    scopes: tuple[str, ...] | None = None
    inject_headers: Mapping[str, str] = attrs.field(factory=dict, eq=False)
    rate_limit: Rate | None = None
    token_limit: Rate | None = None
    spend_limit: Rate | None = None
    config: AgentConfig | None = attrs.field(default=None, eq=False, repr=False)

    @classmethod
    def from_config(cls, config: AgentConfig) -> Agent:
        return cls(
            name=config.name,
            tier=config.tier,
            scopes=config.scopes,
            inject_headers=dict(config.inject_headers),
            rate_limit=config.rate_limit,
            token_limit=config.token_limit,
            spend_limit=config.spend_limit,
            config=config,
        )


def stored_digest(stored: str) -> bytes | None:
    """
    The raw SHA-256 digest inside a stored key form C{sha256:<64 hex>} (either case, as
    the config accepts), or C{None} when C{stored} has another shape.
    """
    match = _STORED_KEY.fullmatch(stored) if isinstance(stored, str) else None
    return bytes.fromhex(match.group(1)) if match else None


class KeyStore:
    """
    Hashed API keys and the agents they belong to.

    @ivar agents: every known agent by name: those under C{agents} and those only the
        keys store names.
    """

    def __init__(self, agents: Iterable[Agent] = (), keys: Iterable[tuple[str, str]] = ()):
        """
        @param agents: the known agents.
        @param keys: C{(agent name, stored key form)} pairs; each name must be in
            C{agents}.
        @raise ValueError: for a malformed stored key, an unknown agent, or a key given
            to two agents.
        """
        self.agents: dict[str, Agent] = {a.name: a for a in agents}
        self._by_digest: dict[bytes, tuple[bytes, str]] = {}
        for name, stored in keys:
            digest = stored_digest(stored)
            if digest is None:
                raise ValueError(f"agent {name!r}: not a stored key (sha256:<64 hex digits>)")
            if name not in self.agents:
                raise ValueError(f"key for unknown agent {name!r}")
            owner = self._by_digest.setdefault(digest, (digest, name))[1]
            if owner != name:
                raise ValueError(f"agent {name!r}: key already belongs to agent {owner!r}")

    def __len__(self) -> int:
        """The number of distinct keys."""
        return len(self._by_digest)

    def __repr__(self) -> str:
        return f"<KeyStore: {len(self.agents)} agents, {len(self)} keys>"

    @classmethod
    def build(
        cls,
        agents: Mapping[str, AgentConfig],
        stored: Mapping[str, Sequence[str]] | None = None,
    ) -> KeyStore:
        """
        Merge the C{agents} section with keys store entries: an agent named in both gets
        the keys of both and its settings from C{agents}; one only the store names gets
        default settings.
        """
        known = {name: Agent.from_config(cfg) for name, cfg in agents.items()}
        pairs = [(cfg.name, key) for cfg in agents.values() for key in cfg.keys]
        for name, keys in (stored or {}).items():
            known.setdefault(name, Agent(name=name))
            pairs.extend((name, key) for key in keys)
        return cls(known.values(), pairs)

    def lookup(self, presented: bytes) -> Agent | None:
        """
        The agent whose key C{presented} is, or C{None}.

        The key is hashed exactly as L{clawproxy.config.hash_key} does (SHA-256 of the
        key's bytes; a header's bytes are the UTF-8 of the key the operator hashed) and
        only the digest is looked up (see the module docstring for why this is
        constant-time where it matters).
        """
        digest = hashlib.sha256(presented).digest()
        entry = self._by_digest.get(digest)
        if entry is None:
            return None
        expected, name = entry
        if not hmac.compare_digest(expected, digest):
            return None
        return self.agents[name]


def parse_keys_store(data: object, source: str) -> dict[str, list[str]]:
    """
    Validate the decoded JSON of a keys store: C{{"agent-name": ["sha256:...", ...]}}.

    Error messages never repeat an entry's value: a plain key put there by mistake must
    not end up in logs.

    @param source: the file name, put in front of every error.
    @return: agent name to stored key forms (lower-case hex).
    @raise KeyStoreError: listing every problem.
    """
    errors: list[str] = []
    out: dict[str, list[str]] = {}
    if not isinstance(data, dict):
        raise KeyStoreError(
            [f"{source}: must be a JSON object mapping agent names to lists of stored keys"]
        )
    for name, keys in data.items():
        if not _AGENT_NAME.fullmatch(name):
            errors.append(f"{source}: {name!r}: not a valid agent name")
            continue
        if not isinstance(keys, list):
            errors.append(f"{source}: {name}: must be a list of stored keys")
            continue
        good = []
        for index, key in enumerate(keys):
            if stored_digest(key) is None:
                errors.append(
                    f"{source}: {name}[{index}]: must be a stored key (sha256:<64 hex digits>);"
                    " plain keys are not accepted, use `clawproxy hash-key KEY` to make one"
                )
            else:
                good.append(key.lower())
        out[name] = good
    if errors:
        raise KeyStoreError(errors)
    return out


def _no_duplicates(source: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise KeyStoreError([f"{source}: {key!r} is listed twice"])
            seen[key] = value
        return seen

    return hook


def load_key_store(config: Config) -> KeyStore:
    """
    Build the L{KeyStore} for C{config}, reading C{auth.api_key.keys_store} if set, and
    check that the JWT keys of C{auth.jwt} (key files, JWKS file) can be loaded.

    @raise KeyStoreError: (a L{ValueError}) naming the file, when it cannot be read, is
        not JSON of the right shape, holds something other than stored keys, or gives a
        key to two agents; or naming the JWT key that cannot be used.
    """
    api_key = config.auth.api_key if config.auth is not None else None
    path = api_key.keys_store if api_key is not None else None
    stored: dict[str, list[str]] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise KeyStoreError([f"{path}: cannot read keys store: {reason}"]) from e
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicates(path))
        except json.JSONDecodeError as e:
            raise KeyStoreError(
                [f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"]
            ) from None
        stored = parse_keys_store(data, path)
    jwt = config.auth.jwt if config.auth is not None else None
    if jwt is not None:
        try:
            load_key_set(jwt)
        except JwtKeyError as e:
            raise KeyStoreError(e.errors) from None
    try:
        return KeyStore.build(config.agents, stored)
    except ValueError as e:
        raise KeyStoreError([f"{path or 'agents'}: {e}"]) from None


# -- requests ------------------------------------------------------------------------------


def _values(headers: Any, name: bytes) -> list[bytes]:
    return [v.strip(_OWS) for v in headers.getRawHeaders(name) or ()]


def _presented(headers: Any, header_name: str, api_keys: bool = True
               ) -> tuple[list[bytes], bool]:
    """
    Every credential value a request presents: those of C{header_name} (when API keys
    are on), then those of C{Authorization: Bearer}; and whether any came as Bearer.
    """
    found: list[bytes] = []
    bearer = False
    name = header_name.encode("latin-1")
    if api_keys and name.lower() != _AUTHORIZATION:
        found.extend(_values(headers, name))
    for value in _values(headers, _AUTHORIZATION):
        if _is_bearer(value):
            parts = value.split(None, 1)
            found.append(parts[1].strip(_OWS) if len(parts) == 2 else b"")
            bearer = True
    return found, bearer


def extract_key(headers: Any, header_name: str = "X-API-Key") -> bytes | None:
    """
    The API key a request presents, from C{header_name} or C{Authorization: Bearer KEY}
    (the scheme is case-insensitive; other C{Authorization} schemes are not ours and are
    ignored).

    Ambiguity is refused rather than resolved: when the request carries two different
    keys (in both headers, or a header repeated with different values) it is answered
    401 like a wrong key, since picking one could authenticate a request as an agent
    its sender did not mean. The same key sent in both places is fine. An empty key or
    one longer than L{MAX_KEY_LENGTH} bytes is invalid too.

    @param headers: the request's L{twisted.web.http_headers.Headers}.
    @return: the key's bytes, or C{None} when the request presents no key.
    @raise Rejected: 401 C{invalid_api_key} as above (the message never holds the key).
    """
    found, _ = _presented(headers, header_name)
    if not found:
        return None
    key = found[0]
    if any(other != key for other in found[1:]):
        raise invalid_api_key(
            f"conflicting API keys: send one key, in {header_name} or as Authorization: Bearer"
        )
    if not key or len(key) > MAX_KEY_LENGTH:
        raise invalid_api_key()
    return key


def _is_bearer(value: bytes) -> bool:
    parts = value.split(None, 1)
    return bool(parts) and parts[0].lower() == _BEARER


def extract_credential(
    headers: Any, header_name: str = "X-API-Key", api_keys: bool = True
) -> tuple[str, bytes] | None:
    """
    The one credential a request presents when JWTs are accepted: C{("jwt", token)} or
    C{("key", api_key)}.

    With API keys on, C{header_name} carries an API key, and C{Authorization: Bearer}
    a JWT when the value has the JWT shape (L{looks_like_jwt}), else an API key. With
    API keys off, only C{Authorization: Bearer} is read, and always as a JWT. As in
    L{extract_key}, two different credentials (an API key and a token, say) are refused
    rather than one of them chosen; an empty or over-long one is invalid.

    @return: C{(kind, value)}, or C{None} when the request presents no credential.
    @raise Rejected: 401 (C{invalid_api_key} or C{invalid_token}).
    """
    found, bearer = _presented(headers, header_name, api_keys)
    if not found:
        return None
    value = found[0]
    if any(other != value for other in found[1:]):
        message = (f"conflicting credentials: send one, in {header_name} or as"
                   " Authorization: Bearer") if api_keys else (
            "conflicting credentials: send one Authorization: Bearer token")
        raise invalid_api_key(message) if api_keys else invalid_token(message)
    if bearer and (not api_keys or looks_like_jwt(value)):
        if not value or len(value) > MAX_TOKEN_LENGTH:
            raise invalid_token("malformed token")
        return "jwt", value
    if not value or len(value) > MAX_KEY_LENGTH:
        raise invalid_api_key()
    return "key", value


def strip_credentials(headers: Any, header_name: str = "X-API-Key") -> None:
    """
    Remove the gateway's credentials from a request's headers so they are not relayed
    to backends: C{header_name}, and C{Authorization} values of the C{Bearer} scheme
    (other schemes are left alone). Backends get their own credentials from the agent's
    C{inject_headers}.
    """
    name = header_name.encode("latin-1")
    if name.lower() != _AUTHORIZATION:
        headers.removeHeader(name)
    values = headers.getRawHeaders(_AUTHORIZATION)
    if values:
        rest = [v for v in values if not _is_bearer(v.strip(_OWS))]
        if rest:
            headers.setRawHeaders(_AUTHORIZATION, rest)
        else:
            headers.removeHeader(_AUTHORIZATION)


def authenticate(store: KeyStore, headers: Any, header_name: str = "X-API-Key") -> Agent | None:
    """
    Identify the agent a request's API key belongs to.

    A presented key that is not valid is refused even where the route would allow
    anonymous callers: a client that sends credentials means to use them.

    @return: the L{Agent}, or C{None} when the request presents no key.
    @raise Rejected: 401 C{invalid_api_key} with C{WWW-Authenticate} for an unknown,
        malformed or ambiguous key.
    """
    key = extract_key(headers, header_name)
    if key is None:
        return None
    agent = store.lookup(key)
    if agent is None:
        raise invalid_api_key()
    return agent


def authorize(route: RouteConfig, agent: Agent | None, header_name: str = "X-API-Key",
              missing: Callable[[], Rejected] | None = None) -> None:
    """
    Apply a route's C{auth_required} and C{allowed_agents}.

    @param route: the matched route's configuration.
    @param agent: the identified agent, or C{None} for an anonymous request.
    @param missing: makes the 401 for a missing credential (L{missing_credentials});
        L{missing_api_key} by default. A factory, not an instance: an exception
        instance raised again and again keeps every traceback (and its frames).
    @raise Rejected: 401 C{missing_api_key} (or C{missing()}'s C{missing_token} /
        C{missing_credentials}, with C{WWW-Authenticate}) when the route needs an agent
        and there is none; 403 C{permission_denied} when C{allowed_agents}
        is set and does not name the agent.
    """
    needs_agent = route.auth_required or route.allowed_agents is not None
    if agent is None:
        if needs_agent:
            raise missing() if missing is not None else missing_api_key(header_name)
        return
    if route.allowed_agents is not None and agent.name not in route.allowed_agents:
        raise permission_denied()
