"""
The configuration, declared once (SPEC section 2).

Each section is one frozen attrs class; each field says, in one place, its YAML key,
converter, default, documentation and whether the gateway refuses it until a later
issue builds it (L{NotYet}). L{clawproxy.config.reader} builds the tree from these
declarations and L{clawproxy.config.reference} documents them.

A C{_check(present, error)} method, where a class has one, checks what involves
several fields once they are read: C{present} is the set of keys written, C{error(key,
message)} reports a problem, and it returns the (possibly amended) object.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from urllib.parse import urlsplit

import attrs

from clawproxy.config import fields as f
from clawproxy.config.fields import IPNetwork
from clawproxy.pem import PemError, check_pair, read_certificates
from clawproxy.units import Rate

ALGORITHMS = (
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "ip_hash",
    "consistent_hash",
    "random",
    "least_latency",
)
PROTOCOLS = ("openai", "ollama", "http")
HEALTH_PATHS = {"openai": "/v1/models", "ollama": "/api/tags", "http": "/health"}
AFFINITY_METHODS = ("cookie", "ip_hash", "header", "conversation")
RETRY_ON = ("5xx", "connect_failure", "refused", "timeout")
BACKOFFS = ("exponential", "linear", "constant")
JWT_ALGORITHMS = (
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512",
    "PS256", "PS384", "PS512", "EdDSA",
)  # fmt: skip

Error = Callable[[str, str], None]

#: The feature issues that will build what is refused today.
PROTECTION, RESILIENCE, LLM, OPERATIONS = 8, 9, 10, 11


# -- server --------------------------------------------------------------------------------


@attrs.frozen
class TLSConfig:
    """TLS listeners (pyOpenSSL); the certificate comes from C{cert}/C{key}."""

    listen: tuple[str, ...] = f.setting(
        f.one_or_more(f.tls_endpoint), doc="TLS listeners; required unless ``port`` is given.",
        placeholder=())
    cert: str = f.setting(f.nonempty, doc="PEM certificate (chain) file, relative to the"
                          " config file's directory.", required=True, placeholder="",
                          resolve=f.existing_file)
    key: str = f.setting(f.nonempty, doc="PEM private key file.", required=True,
                         placeholder="", resolve=f.existing_file)
    min_version: str = f.setting(f.choice("TLSv1.2", "TLSv1.3"), "TLSv1.2",
                                 "Oldest TLS version accepted.")
    http2: bool = f.setting(f.boolean, True, "Offer HTTP/2 (``h2``) by ALPN when the h2"
                            " package is installed.")
    port: int | None = f.setting(f.integer(low=1, high=65535), None,
                                 "Shorthand for ``listen: [ssl:PORT]`` (give one of the two).")

    def _check(self, present: set[str], error: Error) -> TLSConfig:
        if self.cert and self.key:
            problem = check_pair(self.cert, self.key)
            if problem is not None:
                error(*problem)
        if "port" in present:
            if "listen" in present:
                error("port", "give either listen or port, not both")
            return attrs.evolve(self, listen=(f"ssl:{self.port}",) if self.port else ())
        if "listen" not in present:
            error("listen", "required")
        return self


@attrs.frozen
class ServerConfig:
    """The data-plane listeners and request limits."""

    listen: tuple[str, ...] = f.setting(f.one_or_more(f.endpoint), ("tcp:8080",),
                                        "Plain HTTP listeners (HTTP/1.1 and h2c).")
    tls: TLSConfig | None = f.section(TLSConfig, "TLS listeners.", optional=True)
    base_path: str = f.setting(f.base_path, "", "Prefix stripped before route matching"
                               " (``/api/v1``); ``/`` means none.")
    workers: int = f.setting(
        f.process_count, 1, "Gateway processes sharing the listening sockets: the parent"
        " binds them, runs the admin listener, health checks and simulators, and serves a"
        " memory store to the workers; ``auto`` is the number of cores.")
    max_body_size: int = f.setting(f.size, 10 * 1024 * 1024, "Largest request body (413"
                                   " beyond).", shown="10MB")
    max_header_size: int = f.setting(f.at_least_size(1024, "must be at least 1KB"), 16 * 1024,
                                     "Largest request head (431 beyond).", shown="16KB")
    client_timeout: float = f.setting(f.duration(above=0), 60.0,
                                      "Idle / slow client cutoff.", shown="60s")
    head_timeout: float = f.setting(f.duration(above=0), 10.0,
                                    "Deadline for receiving a request's head.", shown="10s")
    trusted_proxies: tuple[IPNetwork, ...] = f.setting(
        f.list_of(f.network), (), "Addresses whose ``X-Forwarded-For`` is believed.")
    max_connections: int | None = f.setting(
        f.integer(low=1), None, "Open client connections beyond which new ones get 503."
        " By default ``(open-file limit - 64) / 2``: the process raises its soft open-file"
        " limit to the hard one at start, and half of what is left after 64 descriptors"
        " (listeners, logs, admin, Redis, probes) goes to client connections, half to"
        " upstream ones. One client address may hold three quarters of it (503 beyond),"
        " except addresses in ``trusted_proxies``.", shown="by the open-file limit")
    underscores_in_headers: bool = f.setting(
        f.boolean, False, "Accept header names containing ``_`` (refused by default).")
    min_body_rate: int = f.setting(
        f.size, 1024, "Bytes per second a request body must average once it is"
        " ``client_timeout`` under way (slow-body cutoff).", shown="1KB")
    max_concurrent_streams: int = f.setting(f.integer(low=1), 100,
                                            "HTTP/2 streams open at once on one connection.")
    max_stream_resets: int = f.setting(
        f.integer(low=1), 200, "HTTP/2 stream resets one connection may cause before it is"
        " closed.")


@attrs.frozen
class AdminConfig:
    """The admin listener (status, drain, reload, metrics)."""

    listen: str = f.setting(f.endpoint, "tcp:9901:interface=127.0.0.1",
                            "Admin listener: a loopback address or a unix socket, unless"
                            " ``token`` is set.")
    token: str | None = f.setting(f.optional_text, None,
                                  "When set, admin calls need ``Authorization: Bearer TOKEN``;"
                                  " without it only loopback ``Host`` names are served, and"
                                  " never to web pages.")

    def _check(self, present: set[str], error: Error) -> AdminConfig:
        if not self.token and not _local_endpoint(self.listen):
            error("listen", "listens beyond loopback without admin.token: bind it to"
                  " 127.0.0.1 or ::1 (interface=...), or set admin.token")
        return self


def _local_endpoint(description: str) -> bool:
    """
    Whether a server endpoint string only accepts connections from this
    machine: a unix socket, or tcp/tcp6/ssl with a loopback C{interface}
    (none means every interface).
    """
    kind, _, rest = description.partition(":")
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    for arg in re.split(r"(?<!\\):", rest):
        if arg.startswith("interface="):
            interface = arg[len("interface="):].replace("\\:", ":")
            if interface.lower() == "localhost":
                return True
            try:
                return ipaddress.ip_address(interface).is_loopback
            except ValueError:
                return False
    return False


# -- shared state --------------------------------------------------------------------------


@attrs.frozen
class RedisConfig:
    """Redis connection for shared state."""

    url: str = f.setting(f.redis_url, "redis://127.0.0.1:6379/0", "Redis server.")
    prefix: str = f.setting(f.text, "clawproxy:", "Prefix of every key the gateway writes.")
    timeout: float = f.setting(f.duration(above=0), 0.2, "Bound on each Redis command.",
                               shown="200ms")
    on_error: str = f.setting(f.choice("fail_open", "fail_closed"), "fail_open",
                              "What rate limits and budgets do while the shared store"
                              " (Redis, or with ``server.workers`` the parent's memory"
                              " store) is unreachable or slower than ``timeout``:"
                              " ``fail_open`` lets requests through, ``fail_closed``"
                              " answers 503 ``store_unavailable`` with ``Retry-After``."
                              " Any other store failure is logged and fails open; shared"
                              " breakers, the cache and affinity always fail open.")


@attrs.frozen
class StoreConfig:
    """Where state shared between gateways lives."""

    backend: str = f.setting(f.choice("memory", "redis"), "memory",
                             "``memory`` (this process only) or ``redis``.")
    redis: RedisConfig = f.section(RedisConfig, "Used when ``backend`` is ``redis``.")


# -- identity ------------------------------------------------------------------------------


@attrs.frozen
class ApiKeyConfig:
    """API key authentication (C{Authorization: Bearer KEY} is accepted too)."""

    header: str = f.setting(f.header_name, "X-API-Key", "Header carrying the key.")
    keys_store: str | None = f.setting(
        f.nonempty, None, 'JSON file ``{"agent": ["sha256:...", ...]}`` of stored keys;'
        " agents it names may also be configured under ``agents``.", resolve=f.existing_file)


#: The shortest HMAC secret accepted for each C{HS*} algorithm, in bytes (RFC 7518 3.2:
#: at least the hash's output size).
HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}


@attrs.frozen
class JwtKeyConfig:
    """One verification key of C{auth.jwt.keys}, chosen by a token's C{kid}."""

    name: str = f.entry_name("The key id (``kid``) tokens signed with this key carry.")
    secret: str | None = f.setting(f.nonempty, None, "Shared secret for ``HS*`` tokens.")
    public_key: str | None = f.setting(
        f.nonempty, None, "PEM text, or a PEM file (re-read when it changes), for ``RS*``,"
        " ``ES*``, ``PS*`` and ``EdDSA`` tokens.", resolve=f.pem_or_file)

    def _check(self, present: set[str], error: Error) -> JwtKeyConfig:
        if (self.secret is None) == (self.public_key is None):
            error("secret", "give exactly one of secret and public_key")
        return self


@attrs.frozen
class JwtConfig:
    """
    JWT bearer authentication (C{Authorization: Bearer TOKEN}); the C{sub} claim (or
    C{agent_claim}) names the agent. Only the configured algorithms are accepted, each
    only with a key of its kind; C{exp} is required.
    """

    secret: str | None = f.setting(f.nonempty, None, "Shared secret for ``HS*`` tokens"
                                   " without ``kid``.")
    algorithms: tuple[str, ...] = f.setting(f.list_of(f.choice(*JWT_ALGORITHMS), False),
                                            ("HS256",), "Accepted algorithms.")
    issuer: str | None = f.setting(f.text, None, "Required ``iss``.")
    audience: str | None = f.setting(f.text, None, "Required ``aud`` (when unset, tokens"
                                     " that carry an ``aud`` are refused).")
    leeway: float = f.setting(f.duration(), 30.0, "Clock skew allowed.", shown="30s")
    max_age: float | None = f.setting(f.duration(above=0), None,
                                      "Maximum token age from ``iat`` (then ``iat`` is"
                                      " required).")
    public_key: str | None = f.setting(
        f.nonempty, None, "PEM text, or a PEM file (re-read when it changes), for ``RS*``,"
        " ``ES*``, ``PS*`` and ``EdDSA`` tokens without ``kid``.", resolve=f.pem_or_file)
    keys: dict[str, JwtKeyConfig] = f.entries(
        JwtKeyConfig, "Keys by ``kid``: a token with a ``kid`` is verified with that key"
        " only.", name=f.nonempty)
    jwks_file: str | None = f.setting(
        f.nonempty, None, "JSON Web Key Set file (``{\"keys\": [...]}``), re-read when it"
        " changes; keys are chosen by ``kid``.", resolve=f.existing_file)
    agent_claim: str = f.setting(f.nonempty, "sub", "The claim that names the agent.")

    def _check(self, present: set[str], error: Error) -> JwtConfig:
        hmac = [a for a in self.algorithms if a.startswith("HS")]
        other = [a for a in self.algorithms if not a.startswith("HS")]
        secrets = [("secret", self.secret)] if self.secret else []
        secrets += [(f"keys.{k.name}.secret", k.secret) for k in self.keys.values() if k.secret]
        publics = bool(self.public_key) or any(k.public_key for k in self.keys.values())
        if hmac and not secrets and not self.jwks_file:
            error("secret", "required for HS* algorithms (or keys, or jwks_file)")
        if other and not publics and not self.jwks_file:
            error("public_key", "required for RS*, ES*, PS* and EdDSA algorithms (or keys,"
                  " or jwks_file)")
        if secrets and not hmac:
            error("algorithms", "a secret is configured but no HS* algorithm is accepted")
        for where, secret in secrets:
            need = max((HMAC_MIN_BYTES[a] for a in hmac), default=0)
            if len(secret.encode()) < need:
                error(where, f"must be at least {need} bytes for"
                      f" {', '.join(a for a in hmac if HMAC_MIN_BYTES[a] == need)}"
                      " (RFC 7518 3.2)")
        return self


@attrs.frozen
class AuthConfig:
    """Enabled authentication methods (either may be C{None})."""

    api_key: ApiKeyConfig | None = f.section(
        ApiKeyConfig, "API keys; ``api_key:`` with no settings enables them with the"
        " defaults.", optional=True, null_enables=True)
    jwt: JwtConfig | None = f.section(JwtConfig, "JWT bearer tokens.", optional=True,
                                      null_enables=True)


@attrs.frozen
class AgentConfig:
    """One agent (tenant)."""

    name: str = f.entry_name("The agent's name (its key under ``agents``).")
    keys: tuple[str, ...] = f.setting(f.list_of(f.stored_key), (),
                                      "Stored key forms (``clawproxy hash-key KEY``);"
                                      " plain keys are refused.")
    scopes: tuple[str, ...] | None = f.setting(
        f.list_of(f.url_path), None, "Path globs the agent may call (default: all), written"
        " like route paths and matched on the same canonical path (without"
        " ``server.base_path``) that routes match and the upstream receives; ``/x/*`` is"
        " ``/x`` and everything under it.")
    rate_limit: Rate | None = f.setting(f.rate, None, "Requests per period for this agent"
                                        " (instead of ``rate_limits.default``).")
    token_limit: Rate | None = f.setting(
        f.rate, None, "Prompt + completion tokens per period (a fixed window of the store's"
        " time): each LLM call reserves its prompt estimate + ``max_tokens`` before it is"
        " sent and settles at what it used; over budget: 429.")
    spend_limit: Rate | None = f.setting(
        f.rate, None, "Spend per period in the currency of ``models.prices``, reserved and"
        " settled like ``token_limit``.")
    tier: str | None = f.setting(f.scalar_text, None,
                                 "Free attribute for routes' ``match: {agent.tier: ...}``.")
    inject_headers: dict[str, str] = f.setting(
        f.headers, factory=dict, doc="Headers set on requests sent upstream for this agent"
        " (the client's ``Authorization`` and API key header are removed first).")


# -- rate limits ---------------------------------------------------------------------------


@attrs.frozen
class QueueConfig:
    """Waiting room used when C{rate_limits.on_limit} is C{queue}."""

    max_size: int = f.setting(f.integer(low=1), 1000, "Requests waiting at most.")
    max_wait: float = f.setting(f.duration(above=0), 5.0, "Longest wait.", shown="5s")


@attrs.frozen
class AdaptiveConfig:
    """Tighten limits by C{factor} while backends struggle."""

    latency_p95_above: float | None = f.setting(
        f.duration(above=0), None, "The pool's p95 upstream attempt latency (as"
        " ``upstream_latency_seconds`` observes it) over its last 512 attempts of the last"
        " 60 s (at least 20 of them) above which its limits tighten.")
    gpu_memory_above: float | None = f.setting(
        f.number(low=0, high=100), None, "GPU memory percent above which a pool's limits"
        " tighten: the highest ``gpu_memory_used_percent`` in the last health-check bodies of"
        " its healthy instances.")
    factor: float = f.setting(f.number(high=1, above=0), 0.6, "Multiplier applied to limits.")

    def _check(self, present: set[str], error: Error) -> AdaptiveConfig:
        if self.latency_p95_above is None and self.gpu_memory_above is None:
            error("latency_p95_above", "give latency_p95_above, gpu_memory_above or both")
        return self


@attrs.frozen
class RateLimitsConfig:
    """Gateway-wide rate limiting."""

    global_: Rate | None = f.setting(f.rate, None, "Limit on the whole gateway.", key="global")
    default: Rate | None = f.setting(f.rate, None, "Per agent, or per client IP when"
                                     " anonymous.")
    algorithm: str = f.setting(f.choice("token_bucket", "sliding_window", "fixed_window"),
                               "token_bucket", "Limiting algorithm.")
    burst: int | None = f.setting(f.integer(low=1), None, "Token bucket capacity (default:"
                                  " the limit's count).")
    session_min_interval: float | None = f.setting(
        f.duration(above=0), None, "Minimum time between requests of one session (its"
        " ``X-Session-ID`` header, else the JSON body's ``user``).")
    on_limit: str = f.setting(f.choice("reject", "queue"), "reject",
                              "``reject`` (429) or ``queue``.")
    queue: QueueConfig = f.section(QueueConfig, "Used when ``on_limit`` is ``queue``.")
    adaptive: AdaptiveConfig | None = f.section(
        AdaptiveConfig, "Adaptive throttling: while a pool's p95 upstream latency or its"
        " instances' GPU memory is above its threshold, the limits checked for requests bound"
        " to the pool (its ``max_qps``; for routes naming it, the agent, session and route"
        " limits too, not ``global``) are multiplied by ``factor``; of the requests no"
        " tightened limit looks at, a ``1 - factor`` share is shed to the pool's fallback"
        " (503 without one). Tightens after 3 s above, relaxes after 15 s below 90% of every"
        " threshold.", optional=True)


# -- models --------------------------------------------------------------------------------


@attrs.frozen
class ModelPrice:
    """Prices per 1K tokens."""

    prompt: float = f.setting(f.number(low=0), 0.0, "Per 1K prompt tokens.")
    completion: float = f.setting(f.number(low=0), 0.0, "Per 1K completion tokens.")


@attrs.frozen
class ModelsConfig:
    """Model aliases, model fallback chains and prices."""

    aliases: dict[str, str] = f.setting(f.map_of(f.nonempty), factory=dict,
                                        doc="A request for the key is served as the value.")
    fallbacks: dict[str, tuple[str, ...]] = f.setting(
        f.map_of(f.list_of(f.nonempty, allow_empty=False)), factory=dict,
        doc="Models tried in order when a model's pool fails (open, no instance available,"
        " retries spent, a 5xx it does not retry, no first chunk in time) before anything"
        " reached the client; the answer carries ``X-Clawproxy-Fallback-Model``.")
    prices: dict[str, ModelPrice] = f.entries(ModelPrice, "Prices per model (after"
                                              " aliases), for spend.", name=f.nonempty)
    reserve_completion_tokens: int = f.setting(
        f.integer(low=1), 1024, "Completion tokens a call that sets no ``max_tokens``"
        " reserves against ``token_limit`` and ``spend_limit``.")


# -- pools ---------------------------------------------------------------------------------


@attrs.frozen
class InstanceConfig:
    """One backend instance; a bare URL string stands for C{{url: URL}}."""

    id: str = f.setting(f.name_text, doc="Unique across pools.", shown="POOL-N (by position)")
    url: str = f.setting(f.instance_url, doc="Base URL of the backend.", required=True,
                         placeholder="")
    weight: float = f.setting(f.number(low=0), 1.0, "Relative share of traffic; 0 takes none.")
    max_connections: int | None = f.setting(f.integer(low=1), None,
                                            "Requests in flight at most.")


@attrs.frozen
class HealthCheckConfig:
    """Active health checks."""

    enabled: bool = f.setting(f.boolean, True, "Probe the instances.")
    path: str = f.setting(f.url_path, "/v1/models", "Probed path; by protocol: ``/v1/models``"
                          " (openai), ``/api/tags`` (ollama), ``/health`` (http).",
                          shown="by protocol")
    interval: float = f.setting(f.duration(above=0), 5.0, "Time between probes.", shown="5s")
    timeout: float = f.setting(f.duration(above=0), 2.0, "Bound on each probe.", shown="2s")
    healthy_threshold: int = f.setting(f.integer(low=1), 2, "Passing probes in a row that"
                                       " mark an instance healthy.")
    unhealthy_threshold: int = f.setting(f.integer(low=1), 3, "Failing probes in a row that"
                                         " mark it unhealthy.")
    expected_status: int = f.setting(f.integer(low=100, high=599), 200, "Status of a pass.")
    expected_body_contains: str | None = f.setting(f.text, None,
                                                   "Text a passing body must contain.")
    headers: dict[str, str] = f.setting(
        f.headers, factory=dict, doc="Headers sent with every probe, for backends that need a"
        " key: ``{Authorization: \"Bearer ${LITELLM_MASTER_KEY}\"}``. A backend's own"
        " liveness path (vLLM and LiteLLM ``/health``) is often a lighter probe than"
        " ``/v1/models``: set ``path``.")


@attrs.frozen
class PassiveConfig:
    """Passive health (nginx C{max_fails}/C{fail_timeout})."""

    max_fails: int = f.setting(f.integer(low=0), 3, "Failures within ``fail_timeout`` that"
                               " eject an instance; 0 disables passive checks.")
    fail_timeout: float = f.setting(f.duration(above=0), 30.0, "Failure window and ejection"
                                    " time.", shown="30s")
    max_ejection_percent: int = f.setting(f.integer(low=0, high=100), 50,
                                          "Most of a pool that may be ejected at once.")


@attrs.frozen
class AffinityConfig:
    """Session affinity."""

    method: str = f.setting(f.choice(*AFFINITY_METHODS), doc="How a session is recognised:"
                            " ``conversation`` is the header ``header_name`` if sent, else a"
                            " fingerprint of the system prompt and first user message (an"
                            " LLM backend's prompt cache stays warm).",
                            required=True, placeholder="cookie")
    cookie_name: str = f.setting(f.header_name, "CLAWPROXY_SESSION", "Cookie for ``cookie``.")
    header_name: str = f.setting(f.header_name, "X-Session-ID", "Header for ``header`` and"
                                 " ``conversation``.")
    ttl: float = f.setting(f.duration(above=0), 3600.0, "How long a session is remembered"
                           " after its last request.", shown="1h")
    max_entries: int = f.setting(f.integer(low=1), 100_000, "Sessions remembered at most per"
                                 " pool (the least recently used are forgotten first).")


@attrs.frozen
class BreakerConfig:
    """
    Circuit breakers of a pool: the pool's own (named C{POOL}) and one per
    instance (C{POOL/INSTANCE}), with the same settings.
    """

    enabled: bool = f.setting(f.boolean, True, "Use circuit breakers.")
    failure_threshold: int = f.setting(f.integer(low=1), 5, "Failures (connect errors,"
                                       " resets, 5xx, timeouts; not 4xx, 429 or refused"
                                       " connections, which take an instance out for a"
                                       " second by themselves) within"
                                       " ``failure_window`` that open a breaker. The pool's"
                                       " breaker counts only failures with no success of the"
                                       " pool in between.")
    failure_window: float = f.setting(f.duration(above=0), 60.0, "Window of those failures.",
                                      shown="60s")
    success_threshold: int = f.setting(f.integer(low=1), 3, "Probe successes within"
                                       " ``success_window`` that close a half-open breaker.")
    success_window: float = f.setting(f.duration(above=0), 30.0, "Window of those successes.",
                                      shown="30s")
    open_timeout: float = f.setting(f.duration(above=0), 30.0, "Time an open breaker waits"
                                    " before half-open (plus ``jitter``).", shown="30s")
    half_open_requests: int = f.setting(f.integer(low=1), 1, "Probe requests a half-open"
                                        " breaker lets through at a time; the others are"
                                        " refused as when open.")
    jitter: float = f.setting(f.number(low=0, high=1), 0.1, "Up to this fraction of"
                              " ``open_timeout`` is added at random to each open period, so"
                              " breakers opened together do not probe together.")


@attrs.frozen
class RetryConfig:
    """Retries of failed upstream attempts."""

    max_retries: int = f.setting(f.integer(low=0), 2, "Retries after the first attempt.")
    retry_on: frozenset[str] = f.setting(f.set_of(f.choice(*RETRY_ON)),
                                         frozenset({"connect_failure", "refused"}),
                                         "Failures that are retried (``timeout`` is"
                                         " refused: timeouts are never retried).",
                                         shown="[connect_failure, refused]")
    backoff: str = f.setting(f.choice(*BACKOFFS), "exponential", "Delay growth.")
    base_delay: float = f.setting(f.duration(), 0.025, "First delay.", shown="25ms")
    max_delay: float = f.setting(f.duration(), 0.25, "Largest delay (>= ``base_delay``).",
                                 shown="250ms")
    budget: float = f.setting(f.number(low=0, high=1), 0.2,
                              "Fraction of requests that may be retries.")

    def _check(self, present: set[str], error: Error) -> RetryConfig:
        if self.max_delay < self.base_delay:
            error("max_delay", "must be >= base_delay")
        if "timeout" in self.retry_on:
            error("retry_on", "timeout is never retried: a request that timed out may"
                  " have reached the backend (a pool's first_token_timeout is the retried"
                  " kind)")
        return self


@attrs.frozen
class UpstreamTLSConfig:
    """TLS towards C{https://} instances."""

    verify: bool = f.setting(f.boolean, True, "Verify the instance's certificate.")
    ca_file: str | None = f.setting(f.nonempty, None, "PEM CA bundle for a private CA.",
                                    resolve=f.existing_file)
    client_cert: str | None = f.setting(f.nonempty, None, "PEM client certificate (mutual"
                                        " TLS).", resolve=f.existing_file)
    client_key: str | None = f.setting(f.nonempty, None, "PEM client key.",
                                       resolve=f.existing_file)
    server_name: str | None = f.setting(f.nonempty, None, "SNI and verified name, if not the"
                                        " URL's host.")

    def _check(self, present: set[str], error: Error) -> UpstreamTLSConfig:
        if "ca_file" in present and not self.verify:
            error("ca_file", "has no effect with verify: false")
        if self.ca_file is not None:
            try:
                read_certificates(self.ca_file)
            except PemError as e:
                error("ca_file", str(e))
        for one, other in (("client_cert", "client_key"), ("client_key", "client_cert")):
            if one in present and other not in present:
                error(other, f"required with {one}")
        if self.client_cert is not None and self.client_key is not None:
            problem = check_pair(self.client_cert, self.client_key)
            if problem is not None:
                error("client_" + problem[0], problem[1])
        return self

    def settings(self) -> tuple[object, ...]:
        """What the connections made with these settings depend on (to compare two pools)."""
        return (self.verify, self.ca_file, self.client_cert, self.client_key, self.server_name)


def _check_shared_tls(pools: dict[str, PoolConfig], error: Error) -> None:
    """
    Refuse an C{https} host:port that two pools reach with different C{tls}
    settings: upstream connections are pooled by host:port, so one
    connection could otherwise serve a pool with the other's trust or
    client certificate.
    """
    seen: dict[tuple[str, int], tuple[str, tuple[object, ...] | None]] = {}
    for pool in pools.values():
        settings = pool.tls.settings() if pool.tls is not None else None
        for instance in pool.instances:
            netloc = https_netloc(instance.url)
            if netloc is None:
                continue
            first = seen.setdefault(netloc, (pool.name, settings))
            if first[1] != settings:
                error(f"pools.{pool.name}.tls", f"{netloc[0]}:{netloc[1]} is also an instance"
                      f" of pool {first[0]}, with other tls settings; give both the same")


def https_netloc(url: str) -> tuple[str, int] | None:
    """C{(host, port)} of an C{https://} URL (port 443 by default), else C{None}."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        return None
    return parts.hostname, parts.port or 443


def _health_defaults(pool: dict[str, object], _: object) -> dict[str, object]:
    return {"path": HEALTH_PATHS.get(str(pool.get("protocol", "openai")), "/v1/models")}


def _instance_defaults(pool: dict[str, object], index: int) -> dict[str, object]:
    return {"id": f"{pool.get('name')}-{index + 1}"}


def _instance_shorthand(value: object) -> object:
    return {"url": value} if isinstance(value, str) else value


@attrs.frozen
class PoolConfig:
    """A pool of interchangeable instances."""

    name: str = f.entry_name("The pool's name (its key under ``pools``).")
    protocol: str = f.setting(f.choice(*PROTOCOLS), "openai", "What the backends speak.")
    instances: tuple[InstanceConfig, ...] = f.items(
        InstanceConfig, "The backends.", shorthand=_instance_shorthand, given=_instance_defaults,
        required=True, empty="must list at least one instance")
    health_check: HealthCheckConfig = f.section(HealthCheckConfig, "Active health checks.",
                                                given=_health_defaults)
    passive: PassiveConfig = f.section(PassiveConfig, "Passive health checks.")
    session_affinity: AffinityConfig | None = f.section(AffinityConfig, "Session affinity.",
                                                        optional=True)
    circuit_breaker: BreakerConfig = f.section(
        BreakerConfig, "Circuit breakers, on by default with these settings;"
        " ``circuit_breaker: {enabled: false}`` turns them off.")
    retry: RetryConfig = f.section(RetryConfig, "Retries.")
    models: tuple[str, ...] = f.setting(f.list_of(f.nonempty), (), "Model name globs the"
                                        " pool serves; routes without a pool pick it by the"
                                        " request's model.")
    algorithm: str = f.setting(f.choice(*ALGORITHMS), "round_robin", "Load balancing.")
    slow_start: float = f.setting(f.duration(), 0.0, "Time over which a returning instance's"
                                  " weight ramps up.", shown="0s")
    timeout: float = f.setting(f.duration(above=0), 30.0, "Per upstream attempt (connect +"
                               " first byte).", shown="30s")
    first_token_timeout: float | None = f.setting(
        f.duration(above=0), None, "Streams: no first chunk by then, try another instance.")
    stall_timeout: float | None = f.setting(
        f.duration(above=0), None, "Streams: no chunk for this long ends the stream with an"
        " SSE error event.")
    max_qps: float | None = f.setting(f.number(above=0), None, "Pool-wide request rate cap"
                                      " (requests per second, across gateways sharing a"
                                      " store).")
    fallback: str | None = f.setting(f.text, None, "A name in ``fallbacks``.")
    tls: UpstreamTLSConfig | None = f.section(
        UpstreamTLSConfig, "TLS towards ``https://`` instances (default: verified against the"
        " system's CAs). Pools sharing an ``https`` host:port must give it the same settings.",
        optional=True)


# -- routes --------------------------------------------------------------------------------


@attrs.frozen
class RouteCacheConfig:
    """Response caching for one route."""

    enabled: bool = f.setting(f.boolean, True, "Cache this route.")
    ttl: float = f.setting(f.duration(above=0), 300.0, "Entry lifetime.", shown="5m")
    semantic: bool = f.setting(f.boolean, False, "Also match similar prompts (SimHash of the"
                               " last user message, with a guard on numbers, negations and"
                               " content words; ``X-Cache: SEMANTIC-HIT``).")
    threshold: float = f.setting(f.number(low=0, high=1), 0.85, "Semantic similarity of a hit.")
    shared: bool = f.setting(f.boolean, False, "Share entries between agents (else each"
                             " agent, or each anonymous client address, has its own).")
    key: tuple[str, ...] = f.setting(f.list_of(f.nonempty), (), "Request parts forming the"
                                     " key (``body``, ``body.NAME`` (dotted for nested"
                                     " members), ``header.NAME``, ``query.NAME``); empty: the"
                                     " whole body. The route, method, path, whether the"
                                     " request streams and the agent scope always count.")

    def _check(self, present: set[str], error: Error) -> RouteCacheConfig:
        from clawproxy.cache.keys import check_key_field

        for i, field in enumerate(self.key):
            problem = check_key_field(field)
            if problem is not None:
                error(f"key[{i}]", problem)
        return self


@attrs.frozen
class HeaderTransform:
    """Headers to set and to remove."""

    set: dict[str, str] = f.setting(f.headers, factory=dict, doc="Headers to set; values may"
                                    " hold request variables.")
    remove: tuple[str, ...] = f.setting(f.list_of(f.header_name), (), "Headers to remove.")


@attrs.frozen
class TransformsConfig:
    """
    Header rewrites for a route: values may use C{${request_id}}, C{${agent}},
    C{${client_ip}}, C{${route}}, C{${pool}}, C{${instance}} and C{${env:NAME}}.
    """

    request_headers: HeaderTransform = f.section(HeaderTransform, "On the way upstream.")
    response_headers: HeaderTransform = f.section(HeaderTransform, "On the way back.")


@attrs.frozen
class WebSocketConfig:
    """WebSocket pass-through on a route (HTTP/1.1 ``Upgrade: websocket``)."""

    enabled: bool = f.setting(f.boolean, True, "Join a client's WebSocket to the instance"
                              " that answers its handshake with 101; off: the request is"
                              " relayed as a plain request (no upgrade).")
    idle_timeout: float = f.setting(f.duration(above=0), 300.0, "A tunnel with no byte either"
                                    " way for this long is closed.", shown="5m")
    max_tunnels: int = f.setting(f.integer(low=1), 1000, "Tunnels open at once on this route"
                                 " (beyond: 503).")


@attrs.frozen
class RouteConfig:
    """One route; routes are tried in order and the first match wins."""

    path: str = f.setting(f.url_path, doc="Exact path, prefix ``/tools/*``, or glob.",
                          required=True, placeholder="/")
    methods: tuple[str, ...] | None = f.setting(f.list_of(f.method, allow_empty=False), None,
                                                "Methods matched (default: any).")
    match: dict[str, str] = f.setting(f.map_of(f.scalar_text, f.match_key), factory=dict,
                                      doc="Conditions, all of which must hold.")
    pool: str | None = f.setting(f.text, None, "The pool; with neither ``pool`` nor ``split``"
                                 " the pool is chosen by the request's model.")
    split: dict[str, float] | None = f.setting(
        f.map_of(f.number(above=0), allow_empty=False, empty="must name at least one pool"),
        None, "Pool name to positive weight (instead of ``pool``).")
    auth_required: bool = f.setting(f.boolean, False, "Only identified agents (also implied"
                                    " by ``allowed_agents``).")
    allowed_agents: tuple[str, ...] | None = f.setting(f.list_of(f.nonempty), None,
                                                       "Agents allowed on this route.")
    rate_limit: Rate | None = f.setting(f.rate, None, "Requests per period on this route"
                                        " (all agents together).")
    timeout: float | None = f.setting(f.duration(above=0), None,
                                      "Per upstream attempt (default: the pool's).")
    cache: RouteCacheConfig | None = f.section(
        RouteCacheConfig, "Response caching (``X-Cache`` on every answer of the route).",
        optional=True)
    fallback: str | None = f.setting(f.text, None, "A name in ``fallbacks``.")
    transforms: TransformsConfig | None = f.section(TransformsConfig, "Header rewrites.",
                                                    optional=True)
    websocket: WebSocketConfig = f.section(WebSocketConfig, "WebSocket pass-through.")

    def _check(self, present: set[str], error: Error) -> RouteConfig:
        if "pool" in present and "split" in present:
            error("split", "give either pool or split, not both")
        if self.allowed_agents is not None and not self.auth_required:
            return attrs.evolve(self, auth_required=True)
        return self


# -- fallbacks, cache, observability -------------------------------------------------------


@attrs.frozen
class FallbackConfig:
    """A canned response used when a pool cannot answer."""

    name: str = f.entry_name("The fallback's name (its key under ``fallbacks``).")
    type: str = f.setting(
        f.choice("static", "cache"), "static", "``static`` answers with ``status``/``body``"
        " when no instance can take a request; ``cache`` serves the last good cached answer"
        " for the same key (``X-Cache: STALE``) when no instance can take it or the attempts"
        " failed, and nothing when there is none.")
    status: int = f.setting(f.integer(low=100, high=599), 200, "Status of the answer.")
    content_type: str = f.setting(f.nonempty, "application/json", "Its content type.")
    body: str = f.setting(f.fallback_body, "", "Its body.")
    headers: dict[str, str] = f.setting(f.headers, factory=dict, doc="Extra headers.")
    max_stale: float | None = f.setting(f.duration(above=0), None, "``cache``: how long past"
                                        " its route's ``ttl`` an answer may still be served"
                                        " (required); entries are kept that long.")

    def _check(self, present: set[str], error: Error) -> FallbackConfig:
        if self.type == "cache" and self.max_stale is None:
            error("max_stale", "required for type cache")
        return self


@attrs.frozen
class CacheConfig:
    """The response cache store shared by routes that enable caching."""

    store: str = f.setting(f.choice("memory", "redis"), "memory", "Where entries live:"
                           " ``memory`` (this gateway's memory; with ``server.workers`` > 1,"
                           " the parent's memory store, shared by its workers, which needs"
                           " ``store.backend: memory``) or ``redis`` (the ``store`` section's"
                           " Redis, shared by every gateway on it; needs ``store.backend:"
                           " redis``).")
    max_entries: int = f.setting(f.integer(low=1), 10000, "Entries at most.")
    max_bytes: int = f.setting(f.size, 256 * 1024 * 1024, "Stored bytes at most.",
                               shown="256MB")
    check_model_version: bool = f.setting(f.boolean, True, "Drop entries made by another"
                                          " model version.")


@attrs.frozen
class MetricsConfig:
    """Prometheus metrics."""

    enabled: bool = f.setting(f.boolean, True, "Serve ``/metrics``; when false no listener"
                              " serves it.")
    path: str = f.setting(f.url_path, "/metrics", "Path of the metrics page.")
    public: bool = f.setting(f.boolean, False, "Also serve it on the data plane (it is always"
                             " on the admin listener).")


@attrs.frozen
class LoggingConfig:
    """The access log and the process's own log."""

    level: str = f.setting(f.log_level, "info", "Least severe event of the process log that"
                           " is written (twistd's log).")
    format: str = f.setting(f.choice("json", "text"), "json", "Access log lines: one JSON"
                            " object, or plain text.")
    output: str = f.setting(f.log_output, "-", "Where the access log goes.",
                            resolve=f.output_path)
    redact: tuple[str, ...] = f.setting(
        f.list_of(f.header_name), ("Authorization", "X-API-Key"), "Headers whose values never"
        " appear in a log. The access log records no header values; any log line that"
        " shows headers replaces these ones' values with ``[redacted]``.")


@attrs.frozen
class TracingConfig:
    """
    OpenTelemetry tracing (the extra ``clawproxy[otel]``): a span per request and per
    upstream attempt, the client's W3C ``traceparent`` as parent, propagated upstream.
    """

    enabled: bool = f.setting(
        f.boolean, False, "Trace requests (needs ``pip install 'clawproxy[otel]'``).")
    sample_rate: float = f.setting(f.number(low=0, high=1), 0.1, "Fraction of requests"
                                   " traced when the client sent no sampled trace context"
                                   " (a client's sampling decision is followed).")
    exporter: str = f.setting(f.choice("otlp", "console"), "otlp", "Where spans go:"
                              " ``otlp`` (OTLP over HTTP) or ``console`` (stdout, for"
                              " debugging).")
    endpoint: str | None = f.setting(
        f.nonempty, None, "OTLP/HTTP collector URL (``http://collector:4318``; a URL"
        " without a path gets ``/v1/traces``).",
        shown="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else http://localhost:4318")

    def _check(self, present: set[str], error: Error) -> TracingConfig:
        if self.endpoint is not None:
            if self.exporter != "otlp":
                error("endpoint", "only the otlp exporter has an endpoint")
            elif urlsplit(self.endpoint).scheme not in ("http", "https") or not urlsplit(
                    self.endpoint).hostname:
                error("endpoint", f"must be an http:// or https:// URL, not {self.endpoint!r}")
        if self.enabled:
            from clawproxy.otel import missing

            why = missing()
            if why is not None:
                error("enabled", why)
        return self


@attrs.frozen
class SimulatorConfig:
    """A simulated LLM backend started in-process (SPEC section 6)."""

    listen: str = f.setting(f.endpoint, doc="Its listener.", required=True, placeholder="")
    id: str = f.setting(f.name_text, doc="Its name.", shown="sim-N (by position)")
    model: str = f.setting(f.nonempty, "sim-small", "Model it reports.")
    ttft: float = f.setting(f.duration(), 0.05, "Time to first token.", shown="50ms")
    tokens_per_second: float = f.setting(f.number(above=0), 200.0, "Streaming speed.")
    max_tokens: int = f.setting(f.integer(low=1), 64, "Tokens per answer at most.")
    failure_rate: float = f.setting(f.number(low=0, high=1), 0.0, "Fraction answered 500.")
    hang_rate: float = f.setting(f.number(low=0, high=1), 0.0, "Fraction never answered.")


def _simulator_defaults(_: dict[str, object], index: int) -> dict[str, object]:
    return {"id": f"sim-{index + 1}"}


# -- the whole ---------------------------------------------------------------------------


@attrs.frozen
class Config:
    """
    A whole, valid configuration.

    @ivar auth: C{None} when no authentication is configured. When C{agents} hold keys but
        there is no C{auth} section, API key authentication with default settings is on.
    @ivar source: absolute path of the file it was loaded from, if any.
    """

    server: ServerConfig = f.section(ServerConfig, "Data-plane listeners and limits.")
    admin: AdminConfig = f.section(AdminConfig, "The admin listener.")
    store: StoreConfig = f.section(StoreConfig, "Shared state.")
    auth: AuthConfig | None = f.section(AuthConfig, "Authentication; agents with keys and no"
                                        " ``auth`` section enable API keys.", optional=True)
    agents: dict[str, AgentConfig] = f.entries(AgentConfig, "The agents (tenants).")
    rate_limits: RateLimitsConfig | None = f.section(RateLimitsConfig, "Rate limiting.",
                                                     optional=True)
    models: ModelsConfig = f.section(ModelsConfig, "Model routing.")
    pools: dict[str, PoolConfig] = f.entries(PoolConfig, "Pools of backends.",
                                             required="required (at least one pool)",
                                             empty="must define at least one pool")
    routes: tuple[RouteConfig, ...] = f.items(RouteConfig, "Routes, first match wins.",
                                              required="required (at least one route)",
                                              empty="must define at least one route")
    fallbacks: dict[str, FallbackConfig] = f.entries(FallbackConfig, "Canned responses.")
    cache: CacheConfig = f.section(CacheConfig, "The response cache.")
    metrics: MetricsConfig = f.section(MetricsConfig, "Prometheus metrics.")
    logging: LoggingConfig = f.section(LoggingConfig, "Logging.")
    tracing: TracingConfig = f.section(TracingConfig, "Tracing.")
    simulators: tuple[SimulatorConfig, ...] = f.items(SimulatorConfig, "Simulated backends"
                                                      " started in-process.",
                                                      given=_simulator_defaults)
    source: str | None = f.internal()

    def _check(self, present: set[str], error: Error) -> Config:
        if not self.models.prices:
            for agent in self.agents.values():
                if agent.spend_limit is not None:
                    error(f"agents.{agent.name}.spend_limit",
                          "needs models.prices (spend is priced per model)")
        if self.cache.store == "redis" and self.store.backend != "redis":
            error("cache.store", "redis needs store.backend: redis")
        if (self.cache.store == "memory" and self.store.backend == "redis"
                and self.server.workers > 1
                and any(r.cache is not None for r in self.routes)):
            error("cache.store", "memory with store.backend: redis and server.workers > 1"
                  " would give each worker a cache of its own: use cache.store: redis (or"
                  " store.backend: memory, whose store the parent shares with its workers)")
        _check_shared_tls(self.pools, error)
        if self.auth is None and any(agent.keys for agent in self.agents.values()):
            return attrs.evolve(self, auth=AuthConfig(api_key=ApiKeyConfig()))
        if self.auth is None:
            # No request can be these agents: their scopes would restrict nobody.
            for agent in self.agents.values():
                for key in ("scopes", "inject_headers"):
                    if getattr(agent, key):
                        error(f"agents.{agent.name}.{key}", "no authentication is configured"
                              " (auth, or keys on an agent), so no request is this agent")
        return self

    def instance(self, id: str) -> tuple[PoolConfig, InstanceConfig] | None:
        """
        Find an instance by id (ids are unique across pools).

        @return: the pool and the instance, or C{None}.
        """
        for pool in self.pools.values():
            for instance in pool.instances:
                if instance.id == id:
                    return pool, instance
        return None

    def summary(self) -> str:
        """A few human-readable lines describing this configuration."""
        server = self.server
        listeners = list(server.listen)
        if server.tls is not None:
            listeners += [f"{listen} (TLS)" for listen in server.tls.listen]
        lines = [f"config: {self.source or '(inline)'}"]
        lines.append(f"listeners: {', '.join(listeners) or '(none)'}")
        if server.base_path:
            lines.append(f"base path: {server.base_path}")
        lines.append(f"admin: {self.admin.listen}")
        lines.append(f"store: {self.store.backend}")
        lines.append(f"pools: {len(self.pools)}")
        for pool in self.pools.values():
            count = len(pool.instances)
            plural = "instance" if count == 1 else "instances"
            models = f", models {', '.join(pool.models)}" if pool.models else ""
            lines.append(
                f"  {pool.name}: {count} {plural}, {pool.algorithm}, {pool.protocol}{models}"
            )
        lines.append(f"routes: {len(self.routes)}")
        lines.append(f"agents: {len(self.agents)}")
        lines.append(f"fallbacks: {len(self.fallbacks)}")
        lines.append(f"simulators: {len(self.simulators)}")
        for sim in self.simulators:
            lines.append(f"  {sim.id}: {sim.listen} ({sim.model})")
        return "\n".join(lines)
