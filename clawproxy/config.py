"""
Configuration: YAML in, frozen attrs classes out (SPEC section 2).

L{load_config} reads a file and L{parse_config} validates the result of C{yaml.safe_load}.
Validation never stops at the first problem: every error is collected, with the path of the
key it concerns (C{pools.main.instances[2].weight: must be >= 0}), and raised at once as one
L{ConfigError}. Nothing outside this module sees the raw dictionaries.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
import yaml

from clawproxy.units import Rate, parse_duration, parse_rate, parse_size

__all__ = [
    "REQUEST_VARIABLES",
    "AdaptiveConfig",
    "AdminConfig",
    "AffinityConfig",
    "AgentConfig",
    "ApiKeyConfig",
    "AuthConfig",
    "BreakerConfig",
    "CacheConfig",
    "Config",
    "ConfigError",
    "FallbackConfig",
    "HeaderTransform",
    "HealthCheckConfig",
    "InstanceConfig",
    "JwtConfig",
    "LoggingConfig",
    "MetricsConfig",
    "ModelPrice",
    "ModelsConfig",
    "PassiveConfig",
    "PoolConfig",
    "QueueConfig",
    "RateLimitsConfig",
    "RedisConfig",
    "RetryConfig",
    "RouteCacheConfig",
    "RouteConfig",
    "ServerConfig",
    "SimulatorConfig",
    "StoreConfig",
    "TLSConfig",
    "TracingConfig",
    "TransformsConfig",
    "expand_request_variables",
    "hash_key",
    "load_config",
    "parse_config",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Per-request variables usable as C{${NAME}} in C{routes[].transforms} values.
REQUEST_VARIABLES = frozenset({"request_id", "agent", "client_ip", "route", "pool", "instance"})

ALGORITHMS = (
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "ip_hash",
    "consistent_hash",
    "random",
)
PROTOCOLS = ("openai", "ollama", "http")
HEALTH_PATHS = {"openai": "/v1/models", "ollama": "/api/tags", "http": "/health"}
AFFINITY_METHODS = ("cookie", "ip_hash", "header")
RETRY_ON = ("5xx", "connect_failure", "refused", "timeout")
BACKOFFS = ("exponential", "linear", "constant")
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")
MATCH_PREFIXES = ("header.", "body.", "agent.")
JWT_ALGORITHMS = (
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512",
    "PS256", "PS384", "PS512", "EdDSA",
)  # fmt: skip
ENDPOINT_TYPES = ("tcp", "tcp6", "ssl", "unix", "systemd")

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@-]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_STORED_KEY = re.compile(r"sha256:[0-9a-fA-F]{64}")
_VARIABLE = re.compile(r"\$\$\{|\$\{([^{}]*)\}|\$\{")
_REFERENCE = re.compile(r"(env:)?([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_REQUEST_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# -- errors --------------------------------------------------------------------------------


class ConfigError(Exception):
    """
    The configuration is invalid.

    @ivar errors: every problem found, each as C{"path.to.key: message"}.
    """

    def __init__(self, errors: list[str]) -> None:
        super().__init__(errors)
        self.errors = list(errors)

    def __str__(self) -> str:
        return "\n".join(self.errors)


# -- configuration classes -----------------------------------------------------------------


@attrs.frozen
class TLSConfig:
    """
    TLS listeners.

    @ivar listen: C{ssl:PORT[:interface=ADDR]} strings; the certificate comes from
        C{cert}/C{key}, not from the string.
    @ivar cert: absolute path of the PEM certificate (chain).
    @ivar key: absolute path of the PEM private key.
    @ivar min_version: C{TLSv1.2} or C{TLSv1.3}.
    @ivar http2: offer C{h2} by ALPN.
    """

    listen: tuple[str, ...]
    cert: str
    key: str
    min_version: str = "TLSv1.2"
    http2: bool = True


@attrs.frozen
class ServerConfig:
    """
    The data-plane listeners and request limits.

    @ivar base_path: C{""} or C{"/x"} without a trailing slash, stripped before routing.
    @ivar head_timeout: deadline in seconds for receiving the request head.
    @ivar max_connections: open client connections beyond which new ones are refused.
    @ivar underscores_in_headers: accept header names containing C{_} (refused by default).
    @ivar min_body_rate: bytes per second a request body must average once it is
        C{client_timeout} seconds under way (slow-body cutoff).
    @ivar max_concurrent_streams: HTTP/2 streams open at once on one connection.
    @ivar max_stream_resets: HTTP/2 stream resets one connection may cause before it is closed.
    """

    listen: tuple[str, ...] = ("tcp:8080",)
    tls: TLSConfig | None = None
    base_path: str = ""
    workers: int = 1
    max_body_size: int = 10 * 1024 * 1024
    max_header_size: int = 16 * 1024
    client_timeout: float = 60.0
    head_timeout: float = 10.0
    trusted_proxies: tuple[IPNetwork, ...] = ()
    max_connections: int | None = None
    underscores_in_headers: bool = False
    min_body_rate: int = 1024
    max_concurrent_streams: int = 100
    max_stream_resets: int = 200


@attrs.frozen
class AdminConfig:
    """The admin listener; C{token} (when not C{None}) is required as a Bearer token."""

    listen: str = "tcp:9901:interface=127.0.0.1"
    token: str | None = None


@attrs.frozen
class RedisConfig:
    """
    Redis connection for shared state.

    @ivar timeout: seconds per command.
    @ivar on_error: C{fail_open} or C{fail_closed} (what rate limits do when Redis is down).
    """

    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "clawproxy:"
    timeout: float = 0.2
    on_error: str = "fail_open"


@attrs.frozen
class StoreConfig:
    """Where shared state lives: C{backend} is C{memory} or C{redis}."""

    backend: str = "memory"
    redis: RedisConfig = RedisConfig()


@attrs.frozen
class ApiKeyConfig:
    """
    API key authentication (C{Authorization: Bearer} is accepted too).

    @ivar keys_store: absolute path of a JSON file C{{"agent": ["sha256:...", ...]}}.
    """

    header: str = "X-API-Key"
    keys_store: str | None = None


@attrs.frozen
class JwtConfig:
    """
    JWT bearer authentication; the C{sub} claim names the agent.

    @ivar public_key: PEM text, or the absolute path of a PEM file, for asymmetric algorithms.
    @ivar leeway: clock skew allowed, in seconds.
    @ivar max_age: maximum token age from C{iat} in seconds, or C{None} for no limit.
    """

    secret: str | None = None
    algorithms: tuple[str, ...] = ("HS256",)
    issuer: str | None = None
    audience: str | None = None
    leeway: float = 30.0
    max_age: float | None = None
    public_key: str | None = None


@attrs.frozen
class AuthConfig:
    """Enabled authentication methods (either may be C{None})."""

    api_key: ApiKeyConfig | None = None
    jwt: JwtConfig | None = None


@attrs.frozen
class AgentConfig:
    """
    One agent (tenant).

    @ivar keys: stored key forms C{sha256:<64 lowercase hex>}.
    @ivar scopes: path globs the agent may call; C{None} means all paths.
    @ivar spend_limit: budget in the currency of C{models.prices}.
    @ivar inject_headers: headers set on requests sent upstream for this agent.
    """

    name: str
    keys: tuple[str, ...] = ()
    scopes: tuple[str, ...] | None = None
    rate_limit: Rate | None = None
    token_limit: Rate | None = None
    spend_limit: Rate | None = None
    tier: str | None = None
    inject_headers: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class QueueConfig:
    """Waiting room used when C{rate_limits.on_limit} is C{queue}."""

    max_size: int = 1000
    max_wait: float = 5.0


@attrs.frozen
class AdaptiveConfig:
    """
    Tighten limits by C{factor} while backends struggle.

    @ivar latency_p95_above: seconds, or C{None}.
    @ivar gpu_memory_above: percent (0..100), or C{None}.
    """

    latency_p95_above: float | None = None
    gpu_memory_above: float | None = None
    factor: float = 0.6


@attrs.frozen
class RateLimitsConfig:
    """
    Gateway-wide rate limiting.

    @ivar global_: limit on the whole gateway (YAML key C{global}).
    @ivar default: per agent, or per client IP when anonymous.
    @ivar burst: token bucket capacity; C{None} means the limit's count.
    @ivar session_min_interval: minimum seconds between requests of one session.
    """

    global_: Rate | None = None
    default: Rate | None = None
    algorithm: str = "token_bucket"
    burst: int | None = None
    session_min_interval: float | None = None
    on_limit: str = "reject"
    queue: QueueConfig = QueueConfig()
    adaptive: AdaptiveConfig | None = None


@attrs.frozen
class ModelPrice:
    """Prices per 1K tokens."""

    prompt: float = 0.0
    completion: float = 0.0


@attrs.frozen
class ModelsConfig:
    """Model aliases, model fallback chains and prices."""

    aliases: dict[str, str] = attrs.field(factory=dict)
    fallbacks: dict[str, tuple[str, ...]] = attrs.field(factory=dict)
    prices: dict[str, ModelPrice] = attrs.field(factory=dict)


@attrs.frozen
class InstanceConfig:
    """One backend instance; C{url} has no trailing slash."""

    id: str
    url: str
    weight: float = 1.0
    max_connections: int | None = None


@attrs.frozen
class HealthCheckConfig:
    """Active health checks; C{path} defaults by protocol (see L{HEALTH_PATHS})."""

    enabled: bool = True
    path: str = "/v1/models"
    interval: float = 5.0
    timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    expected_status: int = 200
    expected_body_contains: str | None = None


@attrs.frozen
class PassiveConfig:
    """Passive health (nginx C{max_fails}/C{fail_timeout}); 0 C{max_fails} disables it."""

    max_fails: int = 3
    fail_timeout: float = 30.0
    max_ejection_percent: int = 50


@attrs.frozen
class AffinityConfig:
    """Session affinity: C{method} is C{cookie}, C{ip_hash} or C{header}."""

    method: str
    cookie_name: str = "CLAWPROXY_SESSION"
    header_name: str = "X-Session-ID"
    ttl: float = 3600.0


@attrs.frozen
class BreakerConfig:
    """Circuit breaker settings, shared by the pool's breaker and its instances'."""

    enabled: bool = True
    failure_threshold: int = 5
    failure_window: float = 60.0
    success_threshold: int = 3
    success_window: float = 30.0
    open_timeout: float = 30.0


@attrs.frozen
class RetryConfig:
    """Retries; C{budget} is the fraction (0..1) of requests that may be retries."""

    max_retries: int = 2
    retry_on: frozenset[str] = frozenset({"connect_failure", "refused"})
    backoff: str = "exponential"
    base_delay: float = 0.025
    max_delay: float = 0.25
    budget: float = 0.2


@attrs.frozen
class PoolConfig:
    """
    A pool of interchangeable instances.

    @ivar models: model name globs the pool serves.
    @ivar slow_start: seconds over which a returning instance's weight ramps up.
    @ivar timeout: seconds per upstream attempt (connect + first byte).
    @ivar fallback: a name in L{Config.fallbacks}.
    """

    name: str
    models: tuple[str, ...] = ()
    algorithm: str = "round_robin"
    protocol: str = "openai"
    instances: tuple[InstanceConfig, ...] = ()
    health_check: HealthCheckConfig = HealthCheckConfig()
    passive: PassiveConfig = PassiveConfig()
    slow_start: float = 0.0
    session_affinity: AffinityConfig | None = None
    circuit_breaker: BreakerConfig = BreakerConfig()
    retry: RetryConfig = RetryConfig()
    timeout: float = 30.0
    first_token_timeout: float | None = None
    stall_timeout: float | None = None
    max_qps: float | None = None
    fallback: str | None = None


@attrs.frozen
class RouteCacheConfig:
    """
    Response caching for one route.

    @ivar key: parts of the request forming the cache key (C{body.model}, C{header.X}, ...);
        empty means the method, the path and the whole body.
    @ivar shared: share entries between agents.
    """

    enabled: bool = True
    ttl: float = 300.0
    semantic: bool = False
    threshold: float = 0.85
    shared: bool = False
    key: tuple[str, ...] = ()


@attrs.frozen
class HeaderTransform:
    """Headers to set (values may hold C{${request variable}}s) and to remove."""

    set: dict[str, str] = attrs.field(factory=dict)
    remove: tuple[str, ...] = ()


@attrs.frozen
class TransformsConfig:
    """Header rewrites for a route; see L{expand_request_variables}."""

    request_headers: HeaderTransform = HeaderTransform()
    response_headers: HeaderTransform = HeaderTransform()


@attrs.frozen
class RouteConfig:
    """
    One route; routes are tried in order and the first match wins.

    @ivar methods: upper-case methods, or C{None} for any method.
    @ivar match: conditions such as C{{"header.X-User-Tier": "vip"}}.
    @ivar pool: the pool to use; with neither C{pool} nor C{split} the pool is chosen by
        the request's model.
    @ivar split: pool name to positive weight.
    @ivar auth_required: also C{True} whenever C{allowed_agents} is set.
    """

    path: str
    methods: tuple[str, ...] | None = None
    match: dict[str, str] = attrs.field(factory=dict)
    pool: str | None = None
    split: dict[str, float] | None = None
    auth_required: bool = False
    allowed_agents: tuple[str, ...] | None = None
    rate_limit: Rate | None = None
    timeout: float | None = None
    cache: RouteCacheConfig | None = None
    fallback: str | None = None
    transforms: TransformsConfig | None = None


@attrs.frozen
class FallbackConfig:
    """
    A canned response: C{static} answers with C{status}/C{body}; C{cache} serves the last
    good cached answer no older than C{max_stale} seconds (C{None}: any age).
    """

    name: str
    type: str = "static"
    status: int = 200
    content_type: str = "application/json"
    body: str = ""
    headers: dict[str, str] = attrs.field(factory=dict)
    max_stale: float | None = None


@attrs.frozen
class CacheConfig:
    """The response cache store shared by routes that enable caching."""

    store: str = "memory"
    max_entries: int = 10000
    max_bytes: int = 256 * 1024 * 1024
    check_model_version: bool = True


@attrs.frozen
class MetricsConfig:
    """Prometheus metrics on the admin listener and, if C{public}, on the data plane."""

    enabled: bool = True
    path: str = "/metrics"
    public: bool = False


@attrs.frozen
class LoggingConfig:
    """Access and event logging; C{output} is C{"-"} (stdout) or an absolute file path."""

    level: str = "info"
    format: str = "json"
    output: str = "-"
    redact: tuple[str, ...] = ("Authorization", "X-API-Key")


@attrs.frozen
class TracingConfig:
    """Distributed tracing."""

    enabled: bool = False
    sample_rate: float = 0.1
    exporter: str = "otlp"
    endpoint: str | None = None


@attrs.frozen
class SimulatorConfig:
    """A simulated LLM backend started in-process (SPEC section 6)."""

    listen: str
    id: str
    model: str = "sim-small"
    ttft: float = 0.05
    tokens_per_second: float = 200.0
    max_tokens: int = 64
    failure_rate: float = 0.0
    hang_rate: float = 0.0


@attrs.frozen
class Config:
    """
    A whole, valid configuration.

    @ivar auth: C{None} when no authentication is configured. When C{agents} hold keys but
        there is no C{auth} section, API key authentication with default settings is on.
    @ivar source: absolute path of the file it was loaded from, if any.
    """

    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()
    store: StoreConfig = StoreConfig()
    auth: AuthConfig | None = None
    agents: dict[str, AgentConfig] = attrs.field(factory=dict)
    rate_limits: RateLimitsConfig | None = None
    models: ModelsConfig = ModelsConfig()
    pools: dict[str, PoolConfig] = attrs.field(factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    fallbacks: dict[str, FallbackConfig] = attrs.field(factory=dict)
    cache: CacheConfig = CacheConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    tracing: TracingConfig = TracingConfig()
    simulators: tuple[SimulatorConfig, ...] = ()
    source: str | None = None

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


# -- helpers for consumers -----------------------------------------------------------------


def hash_key(key: str) -> str:
    """
    The stored form of an API key, as printed by C{clawproxy hash-key}.

    @return: C{"sha256:"} followed by the lowercase hex SHA-256 of the UTF-8 key.
    """
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def expand_request_variables(template: str, variables: Mapping[str, str]) -> str:
    """
    Replace C{${NAME}} in a C{routes[].transforms} value with per-request values
    (C{$${} stands for a literal C{${}).

    @param variables: values for names of L{REQUEST_VARIABLES}; a missing one expands to
        an empty string.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return "${"
        return variables.get(match.group(1)) or ""

    return _REQUEST_REFERENCE.sub(replace, template)


# -- loading -------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """A safe loader that rejects duplicate keys in a mapping."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """
    Read and validate a YAML configuration file.

    Relative file paths inside the configuration are resolved against the file's directory.

    @param environ: variables for C{${VAR}}; defaults to C{os.environ}.
    @raise ConfigError: listing every problem found.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot read: {getattr(e, 'strerror', None) or e}"]) from e
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([f"{path}: YAML syntax error{where}: {problem}"]) from e
    base_dir = os.path.dirname(os.path.abspath(path))
    config = parse_config(data, environ, base_dir)
    return attrs.evolve(config, source=os.path.abspath(path))


def parse_config(
    data: object, environ: Mapping[str, str] | None = None, base_dir: str = "."
) -> Config:
    """
    Validate configuration data (the result of C{yaml.safe_load}).

    @param environ: variables for C{${VAR}}; defaults to C{os.environ}.
    @param base_dir: directory against which relative file paths are resolved.
    @raise ConfigError: listing every problem found.
    """
    ctx = _Context(os.environ if environ is None else environ, base_dir)
    data = _substitute_tree(ctx, data)
    config = _read_config(ctx, _Map(ctx, "", data))
    if ctx.errors:
        raise ConfigError(ctx.errors)
    return config


# -- the reader ----------------------------------------------------------------------------

T = TypeVar("T")

#: What L{_Map.get} returns for an absent or invalid value: L{_build} leaves it out.
_ABSENT: Any = object()


class _EnvStr(str):
    """A string that came from C{${VAR}} substitution: numbers and booleans may be parsed."""


class _Bad(Exception):
    """
    A value is invalid.

    @ivar problems: C{(path suffix, message)} pairs, e.g. C{("[2]", "must be a string")}.
    """

    def __init__(self, *problems: tuple[str, str]) -> None:
        self.problems = problems


def _bad(message: str) -> _Bad:
    return _Bad(("", message))


@attrs.define
class _Context:
    """State shared by the whole validation: the environment and the errors so far."""

    environ: Mapping[str, str]
    base_dir: str
    errors: list[str] = attrs.field(factory=list)

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path or '(top level)'}: {message}")

    def resolve(self, path: str) -> str:
        """Make a file path absolute, relative to the configuration's directory."""
        path = os.path.expanduser(path)
        return os.path.normpath(os.path.join(os.path.abspath(self.base_dir), path))


class _Map:
    """
    A mapping being validated at C{path}.

    The typed getter L{get} records errors and returns a default, so that validation goes
    on; L{done} reports every key that no getter asked for as unknown.
    """

    def __init__(self, ctx: _Context, path: str, data: object) -> None:
        self.ctx = ctx
        self.path = path
        self.present = isinstance(data, dict)
        if data is not None and not self.present:
            ctx.error(path, "must be a mapping")
        if not self.present:
            data = {}
        self.data: dict[Any, Any] = data
        self._seen: set[Any] = set()

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return _value(self.data.get(key)) is not None

    def raw(self, key: str) -> Any:
        """The raw value of C{key} (C{None} when absent or empty from the environment)."""
        self._seen.add(key)
        return _value(self.data.get(key))

    def get(
        self, key: str, conv: Callable[[Any], T], default: Any = _ABSENT, required: bool = False
    ) -> Any:
        """
        Convert the value of C{key} with C{conv}, which raises L{_Bad} for invalid values.

        @return: the converted value, or C{default} when the key is absent or invalid.
        """
        value = self.raw(key)
        if value is None:
            if required:
                self.ctx.error(self.at(key), "required")
            return default
        try:
            return conv(value)
        except _Bad as e:
            for suffix, message in e.problems:
                self.ctx.error(self.at(key) + suffix, message)
            return default

    def section(self, key: str) -> _Map:
        """The mapping under C{key} (empty, with C{present} false, when absent)."""
        return _Map(self.ctx, self.at(key), self.raw(key))

    def entries(
        self, key: str, name: Callable[[object], str] | None = None
    ) -> Iterator[tuple[str, _Map]]:
        """The named mappings under C{key} (each pool of C{pools}); names are checked."""
        section = self.section(key)
        for raw_name, value in section.data.items():
            try:
                checked = (name or _name)(raw_name)
            except _Bad as e:
                self.ctx.error(section.at(str(raw_name)), e.problems[0][1])
                continue
            yield checked, _Map(self.ctx, section.at(checked), value)

    def items(
        self, key: str, shorthand: Callable[[object], object] | None = None
    ) -> Iterator[_Map]:
        """
        The mapping of each item of the list under C{key}.

        @param shorthand: turns an item's short form into a mapping.
        """
        value = self.raw(key)
        if value is None:
            return
        if not isinstance(value, list):
            self.ctx.error(self.at(key), "must be a list")
            return
        for index, item in enumerate(value):
            item = shorthand(item) if shorthand else item
            yield _Map(self.ctx, f"{self.at(key)}[{index}]", item)

    def done(self) -> None:
        """Report keys nobody asked for."""
        for key in self.data:
            if key not in self._seen:
                self.ctx.error(self.at(str(key)), "unknown key")


def _value(value: object) -> object:
    """An empty string from the environment counts as absent."""
    if isinstance(value, _EnvStr) and value == "":
        return None
    return value


# -- converters: value -> result, or raise _Bad --------------------------------------------


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _bad("must be a string")
    return str(value)


def _nonempty(value: object) -> str:
    text = _string(value)
    if not text:
        raise _bad("must not be empty")
    return text


def _boolean(value: object) -> bool:
    if isinstance(value, _EnvStr):
        lowered = value.strip().lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
    if not isinstance(value, bool):
        raise _bad("must be a boolean (true or false)")
    return value


def _env_number(value: object, kind: type) -> object:
    if isinstance(value, _EnvStr):
        try:
            return kind(value.strip())
        except ValueError:
            pass
    return value


def _bounds(number: float, low: float | None, high: float | None, above: float | None) -> None:
    if above is not None and not number > above:
        raise _bad(f"must be > {above:g}")
    if low is not None and number < low:
        raise _bad(f"must be >= {low:g}")
    if high is not None and number > high:
        raise _bad(f"must be <= {high:g}")


def _integer(low: int | None = None, high: int | None = None) -> Callable[[object], int]:
    def conv(value: object) -> int:
        value = _env_number(value, int)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad("must be an integer")
        _bounds(value, low, high, None)
        return value

    return conv


def _number(
    low: float | None = None, high: float | None = None, above: float | None = None
) -> Callable[[object], float]:
    def conv(value: object) -> float:
        value = _env_number(value, float)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad("must be a number")
        if not math.isfinite(value):
            raise _bad("must be a finite number")
        _bounds(value, low, high, above)
        return float(value)

    return conv


def _choice(*choices: str) -> Callable[[object], str]:
    def conv(value: object) -> str:
        text = _string(value)
        if text not in choices:
            raise _bad(f"must be one of {', '.join(choices)}")
        return text

    return conv


def _duration(above: float | None = None) -> Callable[[object], float]:
    def conv(value: object) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            raise _bad(str(e)) from None
        if above is not None and not seconds > above:
            raise _bad(f"must be > {above:g}")
        return seconds

    return conv


def _rate(value: object) -> Rate:
    try:
        return parse_rate(value)
    except ValueError as e:
        raise _bad(str(e)) from None


def _size(value: object) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise _bad(str(e)) from None


def _list_of(conv: Callable[[object], T], allow_empty: bool = True):
    """A converter for a list whose items go through C{conv} (errors carry the index)."""

    def convert(value: object) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise _bad("must be a list")
        if not value and not allow_empty:
            raise _bad("must not be empty")
        result, problems = [], []
        for index, item in enumerate(value):
            try:
                result.append(conv(item))
            except _Bad as e:
                problems.extend((f"[{index}]{suffix}", msg) for suffix, msg in e.problems)
        if problems:
            raise _Bad(*problems)
        return tuple(result)

    return convert


def _one_or_more(conv: Callable[[object], T]) -> Callable[[object], tuple[T, ...]]:
    """A non-empty list of items for C{conv}; a single string counts as a list of one."""

    def convert(value: object) -> tuple[T, ...]:
        return _list_of(conv, allow_empty=False)([value] if isinstance(value, str) else value)

    return convert


def _map_of(
    conv: Callable[[object], T], key: Callable[[object], str] = _string
) -> Callable[[object], dict[str, T]]:
    """A converter for a mapping whose keys go through C{key} and values through C{conv}."""

    def convert(value: object) -> dict[str, T]:
        if not isinstance(value, dict):
            raise _bad("must be a mapping")
        result, problems = {}, []
        for name, item in value.items():
            try:
                name = key(name)
                result[name] = conv(item)
            except _Bad as e:
                problems.extend((f".{name}{suffix}", msg) for suffix, msg in e.problems)
        if problems:
            raise _Bad(*problems)
        return result

    return convert


def _scalar_text(value: object) -> str:
    """A string, with numbers and booleans as YAML would write them (for match values)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return _string(value)


def _header_name(value: object) -> str:
    name = _string(value)
    if not _HEADER_NAME.fullmatch(name):
        raise _bad("invalid header name")
    return name


def _header_value(value: object) -> str:
    text = _scalar_text(value)
    if any(c in text for c in "\r\n\0"):
        raise _bad("header values must not contain CR, LF or NUL")
    return text


_headers = _map_of(_header_value, _header_name)


def _url_path(value: object) -> str:
    path = _string(value)
    if not path.startswith("/"):
        raise _bad("must start with /")
    return path


def _endpoint(value: object) -> str:
    """A Twisted server endpoint string such as C{tcp:8080:interface=127.0.0.1}."""
    text = _nonempty(value)
    kind, _, rest = text.partition(":")
    if kind not in ENDPOINT_TYPES:
        raise _bad(f"must be an endpoint string such as tcp:8080 ({', '.join(ENDPOINT_TYPES)})")
    if kind in ("tcp", "tcp6", "ssl"):
        args = [a for a in re.split(r"(?<!\\):", rest) if a]
        port = next((a for a in args if "=" not in a), None)
        if port is None:
            port = next((a[5:] for a in args if a.startswith("port=")), "")
        if not port.isdigit() or int(port) > 65535:
            raise _bad(f"{kind} endpoint needs a port number 0-65535")
    elif not rest:
        raise _bad(f"{kind} endpoint needs an address")
    return text


def _instance_url(value: object) -> str:
    url = _string(value).strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _bad("must be a valid http:// or https:// URL") from None
    if parts.scheme not in ("http", "https"):
        raise _bad("must be an http:// or https:// URL")
    if not parts.hostname:
        raise _bad("must name a host")
    if parts.query or parts.fragment:
        raise _bad("must not have a query or fragment")
    if port == 0:
        raise _bad("port must not be 0")
    return url.rstrip("/")


def _network(value: object) -> IPNetwork:
    try:
        return ipaddress.ip_network(_string(value), strict=False)
    except ValueError:
        raise _bad("must be an IP address or CIDR such as 10.0.0.0/8") from None


def _stored_key(value: object) -> str:
    if not isinstance(value, str) or not _STORED_KEY.fullmatch(value):
        raise _bad(
            "must be a stored key (sha256:<64 hex digits>); plain keys are not accepted,"
            " use `clawproxy hash-key KEY` to make one"
        )
    return value.lower()


def _method(value: object) -> str:
    method = _string(value).upper()
    if method not in METHODS:
        raise _bad(f"must be one of {', '.join(METHODS)}")
    return method


def _match_key(value: object) -> str:
    key = _string(value)
    prefix = next((p for p in MATCH_PREFIXES if key.startswith(p)), None)
    if prefix is None or len(key) == len(prefix):
        raise _bad(f"match keys must look like {', '.join(p + 'NAME' for p in MATCH_PREFIXES)}")
    return key


def _name(value: object) -> str:
    name = _string(value)
    if not _NAME.fullmatch(name):
        raise _bad("invalid name (letters, digits and _ . : @ - only)")
    return name


# -- environment substitution --------------------------------------------------------------


def _substitute_tree(ctx: _Context, data: object) -> object:
    """Replace C{${VAR}} in every string; in C{routes[].transforms} only C{${env:VAR}}."""
    if not isinstance(data, dict):
        return _substitute(ctx, "", data, False)
    result = {}
    for key, value in data.items():
        if key == "routes" and isinstance(value, list):
            routes = []
            for index, route in enumerate(value):
                path = f"routes[{index}]"
                if isinstance(route, dict):
                    route = {
                        k: _substitute(ctx, f"{path}.{k}", v, k == "transforms")
                        for k, v in route.items()
                    }
                else:
                    route = _substitute(ctx, path, route, False)
                routes.append(route)
            result[key] = routes
        else:
            result[key] = _substitute(ctx, str(key), value, False)
    return result


def _substitute(ctx: _Context, path: str, value: object, transforms: bool) -> object:
    if isinstance(value, dict):
        return {k: _substitute(ctx, f"{path}.{k}", v, transforms) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(ctx, f"{path}[{i}]", v, transforms) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        if text == "$${":
            return text if transforms else "${"
        reference = _REFERENCE.fullmatch(match.group(1) or "") if match.group(1) else None
        if reference is None:
            ctx.error(path, f"invalid variable reference {text!r}")
            return text
        is_env, name, default = reference.groups()
        if transforms and not is_env:
            if default is not None:
                ctx.error(path, f"request variable ${{{name}}} cannot have a default")
            elif name not in REQUEST_VARIABLES:
                ctx.error(
                    path,
                    f"unknown request variable ${{{name}}} (use one of"
                    f" {', '.join(sorted(REQUEST_VARIABLES))}, or ${{env:NAME}})",
                )
            return text
        if name in ctx.environ:
            return ctx.environ[name]
        if default is None:
            ctx.error(path, f"environment variable {name} is not set")
            return ""
        return default

    return _EnvStr(_VARIABLE.sub(replace, value))


# -- sections ------------------------------------------------------------------------------


def _build(cls: Callable[..., T], m: _Map | None = None, **values: Any) -> T:
    """
    Make C{cls} from C{values}, leaving out absent or invalid ones so that the class
    defaults apply; then report C{m}'s unknown keys.
    """
    if m is not None:
        m.done()
    return cls(**{k: v for k, v in values.items() if v is not _ABSENT})


def _read_config(ctx: _Context, top: _Map) -> Config:
    for key, empty in (("pools", {}), ("routes", [])):
        value = top.raw(key)
        if value is None:
            ctx.error(key, f"required (at least one {key[:-1]})")
        elif value == empty:
            ctx.error(key, f"must define at least one {key[:-1]}")
    agents = {name: _read_agent(name, m) for name, m in top.entries("agents")}
    auth = _read_auth(top.section("auth"))
    if auth is None and any(agent.keys for agent in agents.values()):
        auth = AuthConfig(api_key=ApiKeyConfig())
    config = _build(
        Config,
        top,
        server=_read_server(top.section("server")),
        admin=_read_admin(top.section("admin")),
        store=_read_store(top.section("store")),
        auth=auth,
        agents=agents,
        rate_limits=_read_rate_limits(top.section("rate_limits")),
        models=_read_models(top.section("models")),
        pools={name: _read_pool(name, m) for name, m in top.entries("pools")},
        routes=tuple(_read_route(m) for m in top.items("routes")),
        fallbacks={name: _read_fallback(name, m) for name, m in top.entries("fallbacks")},
        cache=_read_cache(top.section("cache")),
        metrics=_read_metrics(top.section("metrics")),
        logging=_read_logging(top.section("logging")),
        tracing=_read_tracing(top.section("tracing")),
        simulators=tuple(
            _read_simulator(index, m) for index, m in enumerate(top.items("simulators"))
        ),
    )
    _check_references(ctx, config)
    return config


def _read_server(m: _Map) -> ServerConfig:
    base_path = m.get("base_path", _string, "")
    if base_path and not base_path.startswith("/"):
        m.ctx.error(m.at("base_path"), "must be empty or start with /")
    max_header_size = m.get("max_header_size", _size)
    if max_header_size is not _ABSENT and max_header_size < 1024:
        m.ctx.error(m.at("max_header_size"), "must be at least 1KB")
    return _build(
        ServerConfig,
        m,
        listen=m.get("listen", _one_or_more(_endpoint)),
        tls=_read_tls(m.section("tls")),
        base_path=base_path.rstrip("/"),
        workers=m.get("workers", _integer(low=1)),
        max_body_size=m.get("max_body_size", _size),
        max_header_size=max_header_size,
        client_timeout=m.get("client_timeout", _duration(above=0)),
        head_timeout=m.get("head_timeout", _duration(above=0)),
        trusted_proxies=m.get("trusted_proxies", _list_of(_network)),
        max_connections=m.get("max_connections", _integer(low=1)),
        underscores_in_headers=m.get("underscores_in_headers", _boolean),
        min_body_rate=m.get("min_body_rate", _size),
        max_concurrent_streams=m.get("max_concurrent_streams", _integer(low=1)),
        max_stream_resets=m.get("max_stream_resets", _integer(low=1)),
    )


def _tls_endpoint(value: object) -> str:
    text = _string(value)
    if not re.fullmatch(r"ssl:\d{1,5}(:.*)?", text) or int(text.split(":")[1]) > 65535:
        raise _bad("must be an endpoint string such as ssl:8443 or ssl:8443:interface=0.0.0.0")
    return text


def _read_tls(m: _Map) -> TLSConfig | None:
    if not m.present:
        return None
    if m.has("port"):
        if m.has("listen"):
            m.ctx.error(m.at("port"), "give either listen or port, not both")
        port = m.get("port", _integer(low=1, high=65535))
        listen = () if port is _ABSENT else (f"ssl:{port}",)
    else:
        listen = m.get("listen", _one_or_more(_tls_endpoint), (), required=True)
    return _build(
        TLSConfig,
        m,
        listen=listen,
        cert=_read_file(m, "cert", required=True),
        key=_read_file(m, "key", required=True),
        min_version=m.get("min_version", _choice("TLSv1.2", "TLSv1.3")),
        http2=m.get("http2", _boolean),
    )


def _read_file(m: _Map, key: str, required: bool = False) -> Any:
    """A file path, made absolute against the config's directory, that must exist."""
    path = m.get(key, _nonempty, "" if required else None, required=required)
    if not path:
        return path
    resolved = m.ctx.resolve(path)
    if not os.path.isfile(resolved):
        m.ctx.error(m.at(key), f"file not found: {resolved}")
    return resolved


def _read_admin(m: _Map) -> AdminConfig:
    return _build(
        AdminConfig,
        m,
        listen=m.get("listen", _endpoint),
        token=m.get("token", _string, None) or None,
    )


def _redis_url(value: object) -> str:
    url = _string(value)
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise _bad("must be a redis://, rediss:// or unix:// URL")
    return url


def _read_store(m: _Map) -> StoreConfig:
    r = m.section("redis")
    redis = _build(
        RedisConfig,
        r,
        url=r.get("url", _redis_url),
        prefix=r.get("prefix", _string),
        timeout=r.get("timeout", _duration(above=0)),
        on_error=r.get("on_error", _choice("fail_open", "fail_closed")),
    )
    return _build(
        StoreConfig, m, backend=m.get("backend", _choice("memory", "redis")), redis=redis
    )


def _read_auth(m: _Map) -> AuthConfig | None:
    if not m.present:
        return None
    api_key = jwt = None
    # "api_key:" with no settings enables API keys with the defaults.
    if "api_key" in m.data:
        k = m.section("api_key")
        api_key = _build(
            ApiKeyConfig,
            k,
            header=k.get("header", _header_name),
            keys_store=_read_file(k, "keys_store"),
        )
    if "jwt" in m.data:
        j = m.section("jwt")
        public_key = j.get("public_key", _nonempty, None)
        if public_key and "-----BEGIN" not in public_key:
            public_key = _read_file(j, "public_key")
        jwt = _build(
            JwtConfig,
            j,
            secret=j.get("secret", _nonempty),
            algorithms=j.get("algorithms", _list_of(_choice(*JWT_ALGORITHMS), allow_empty=False)),
            issuer=j.get("issuer", _string),
            audience=j.get("audience", _string),
            leeway=j.get("leeway", _duration()),
            max_age=j.get("max_age", _duration(above=0)),
            public_key=public_key,
        )
        if any(a.startswith("HS") for a in jwt.algorithms) and not jwt.secret:
            m.ctx.error(j.at("secret"), "required for HS* algorithms")
        if not all(a.startswith("HS") for a in jwt.algorithms) and not jwt.public_key:
            m.ctx.error(j.at("public_key"), "required for RS*, ES*, PS* and EdDSA algorithms")
    return _build(AuthConfig, m, api_key=api_key, jwt=jwt)


def _read_agent(name: str, m: _Map) -> AgentConfig:
    return _build(
        AgentConfig,
        m,
        name=name,
        keys=m.get("keys", _list_of(_stored_key)),
        scopes=m.get("scopes", _list_of(_url_path)),
        rate_limit=m.get("rate_limit", _rate),
        token_limit=m.get("token_limit", _rate),
        spend_limit=m.get("spend_limit", _rate),
        tier=m.get("tier", _scalar_text),
        inject_headers=m.get("inject_headers", _headers),
    )


def _read_rate_limits(m: _Map) -> RateLimitsConfig | None:
    if not m.present:
        return None
    q = m.section("queue")
    queue = _build(
        QueueConfig,
        q,
        max_size=q.get("max_size", _integer(low=1)),
        max_wait=q.get("max_wait", _duration(above=0)),
    )
    a = m.section("adaptive")
    adaptive = None
    if a.present:
        adaptive = _build(
            AdaptiveConfig,
            a,
            latency_p95_above=a.get("latency_p95_above", _duration(above=0)),
            gpu_memory_above=a.get("gpu_memory_above", _number(low=0, high=100)),
            factor=a.get("factor", _number(high=1, above=0)),
        )
    return _build(
        RateLimitsConfig,
        m,
        global_=m.get("global", _rate),
        default=m.get("default", _rate),
        algorithm=m.get("algorithm", _choice("token_bucket", "sliding_window", "fixed_window")),
        burst=m.get("burst", _integer(low=1)),
        session_min_interval=m.get("session_min_interval", _duration(above=0)),
        on_limit=m.get("on_limit", _choice("reject", "queue")),
        queue=queue,
        adaptive=adaptive,
    )


def _read_models(m: _Map) -> ModelsConfig:
    prices = {}
    for model, p in m.entries("prices", _nonempty):
        prices[model] = _build(
            ModelPrice,
            p,
            prompt=p.get("prompt", _number(low=0)),
            completion=p.get("completion", _number(low=0)),
        )
    return _build(
        ModelsConfig,
        m,
        aliases=m.get("aliases", _map_of(_nonempty)),
        fallbacks=m.get("fallbacks", _map_of(_list_of(_nonempty, allow_empty=False))),
        prices=prices,
    )


def _read_pool(name: str, m: _Map) -> PoolConfig:
    protocol = m.get("protocol", _choice(*PROTOCOLS), "openai")
    if not m.has("instances"):
        m.ctx.error(m.at("instances"), "required")
    elif m.raw("instances") == []:
        m.ctx.error(m.at("instances"), "must list at least one instance")
    instances = tuple(
        _read_instance(f"{name}-{index + 1}", item)
        for index, item in enumerate(m.items("instances", _instance_shorthand))
    )

    h = m.section("health_check")
    health = _build(
        HealthCheckConfig,
        h,
        enabled=h.get("enabled", _boolean),
        path=h.get("path", _url_path, HEALTH_PATHS[protocol]),
        interval=h.get("interval", _duration(above=0)),
        timeout=h.get("timeout", _duration(above=0)),
        healthy_threshold=h.get("healthy_threshold", _integer(low=1)),
        unhealthy_threshold=h.get("unhealthy_threshold", _integer(low=1)),
        expected_status=h.get("expected_status", _integer(low=100, high=599)),
        expected_body_contains=h.get("expected_body_contains", _string),
    )

    p = m.section("passive")
    passive = _build(
        PassiveConfig,
        p,
        max_fails=p.get("max_fails", _integer(low=0)),
        fail_timeout=p.get("fail_timeout", _duration(above=0)),
        max_ejection_percent=p.get("max_ejection_percent", _integer(low=0, high=100)),
    )

    s = m.section("session_affinity")
    affinity = None
    if s.present:
        affinity = _build(
            AffinityConfig,
            s,
            method=s.get("method", _choice(*AFFINITY_METHODS), "cookie", required=True),
            cookie_name=s.get("cookie_name", _header_name),
            header_name=s.get("header_name", _header_name),
            ttl=s.get("ttl", _duration(above=0)),
        )

    b = m.section("circuit_breaker")
    breaker = _build(
        BreakerConfig,
        b,
        enabled=b.get("enabled", _boolean),
        failure_threshold=b.get("failure_threshold", _integer(low=1)),
        failure_window=b.get("failure_window", _duration(above=0)),
        success_threshold=b.get("success_threshold", _integer(low=1)),
        success_window=b.get("success_window", _duration(above=0)),
        open_timeout=b.get("open_timeout", _duration(above=0)),
    )

    r = m.section("retry")
    retry_on = r.get("retry_on", _list_of(_choice(*RETRY_ON)))
    retry = _build(
        RetryConfig,
        r,
        max_retries=r.get("max_retries", _integer(low=0)),
        retry_on=_ABSENT if retry_on is _ABSENT else frozenset(retry_on),
        backoff=r.get("backoff", _choice(*BACKOFFS)),
        base_delay=r.get("base_delay", _duration()),
        max_delay=r.get("max_delay", _duration()),
        budget=r.get("budget", _number(low=0, high=1)),
    )
    if retry.max_delay < retry.base_delay:
        m.ctx.error(r.at("max_delay"), "must be >= base_delay")

    return _build(
        PoolConfig,
        m,
        name=name,
        models=m.get("models", _list_of(_nonempty)),
        algorithm=m.get("algorithm", _choice(*ALGORITHMS)),
        protocol=protocol,
        instances=instances,
        health_check=health,
        passive=passive,
        slow_start=m.get("slow_start", _duration()),
        session_affinity=affinity,
        circuit_breaker=breaker,
        retry=retry,
        timeout=m.get("timeout", _duration(above=0)),
        first_token_timeout=m.get("first_token_timeout", _duration(above=0)),
        stall_timeout=m.get("stall_timeout", _duration(above=0)),
        max_qps=m.get("max_qps", _number(above=0)),
        fallback=m.get("fallback", _string),
    )


def _instance_shorthand(value: object) -> object:
    """A bare URL string stands for C{{url: URL}}."""
    return {"url": value} if isinstance(value, str) else value


def _read_instance(default_id: str, m: _Map) -> InstanceConfig:
    return _build(
        InstanceConfig,
        m,
        id=m.get("id", _name, default_id),
        url=m.get("url", _instance_url, "", required=True),
        weight=m.get("weight", _number(low=0)),
        max_connections=m.get("max_connections", _integer(low=1)),
    )


def _read_route(m: _Map) -> RouteConfig:
    if m.has("pool") and m.has("split"):
        m.ctx.error(m.at("split"), "give either pool or split, not both")
    split = m.get("split", _map_of(_number(above=0)))
    if split == {}:
        m.ctx.error(m.at("split"), "must name at least one pool")
        split = _ABSENT
    allowed = m.get("allowed_agents", _list_of(_nonempty), None)

    c = m.section("cache")
    cache = None
    if c.present:
        cache = _build(
            RouteCacheConfig,
            c,
            enabled=c.get("enabled", _boolean),
            ttl=c.get("ttl", _duration(above=0)),
            semantic=c.get("semantic", _boolean),
            threshold=c.get("threshold", _number(low=0, high=1)),
            shared=c.get("shared", _boolean),
            key=c.get("key", _list_of(_nonempty)),
        )

    t = m.section("transforms")
    transforms = None
    if t.present:
        transforms = _build(
            TransformsConfig,
            t,
            request_headers=_read_header_transform(t.section("request_headers")),
            response_headers=_read_header_transform(t.section("response_headers")),
        )

    return _build(
        RouteConfig,
        m,
        path=m.get("path", _url_path, "/", required=True),
        methods=m.get("methods", _list_of(_method, allow_empty=False)),
        match=m.get("match", _map_of(_scalar_text, _match_key)),
        pool=m.get("pool", _string),
        split=split,
        auth_required=m.get("auth_required", _boolean, False) or allowed is not None,
        allowed_agents=allowed,
        rate_limit=m.get("rate_limit", _rate),
        timeout=m.get("timeout", _duration(above=0)),
        cache=cache,
        fallback=m.get("fallback", _string),
        transforms=transforms,
    )


def _read_header_transform(m: _Map) -> HeaderTransform:
    return _build(
        HeaderTransform,
        m,
        set=m.get("set", _headers),
        remove=m.get("remove", _list_of(_header_name)),
    )


def _fallback_body(value: object) -> str:
    """A string, or a mapping or list written out as JSON."""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return _string(value)


def _read_fallback(name: str, m: _Map) -> FallbackConfig:
    return _build(
        FallbackConfig,
        m,
        name=name,
        type=m.get("type", _choice("static", "cache")),
        status=m.get("status", _integer(low=100, high=599)),
        content_type=m.get("content_type", _nonempty),
        body=m.get("body", _fallback_body),
        headers=m.get("headers", _headers),
        max_stale=m.get("max_stale", _duration(above=0)),
    )


def _read_cache(m: _Map) -> CacheConfig:
    return _build(
        CacheConfig,
        m,
        store=m.get("store", _choice("memory", "redis")),
        max_entries=m.get("max_entries", _integer(low=1)),
        max_bytes=m.get("max_bytes", _size),
        check_model_version=m.get("check_model_version", _boolean),
    )


def _read_metrics(m: _Map) -> MetricsConfig:
    return _build(
        MetricsConfig,
        m,
        enabled=m.get("enabled", _boolean),
        path=m.get("path", _url_path),
        public=m.get("public", _boolean),
    )


def _read_logging(m: _Map) -> LoggingConfig:
    level = m.get("level", _choice("debug", "info", "warn", "warning", "error"))
    output = m.get("output", _log_output)
    return _build(
        LoggingConfig,
        m,
        level="warn" if level == "warning" else level,
        format=m.get("format", _choice("json", "text")),
        output=output if output in (_ABSENT, "-", "off") else m.ctx.resolve(output),
        redact=m.get("redact", _list_of(_header_name)),
    )


def _log_output(value: object) -> str:
    """C{-}, C{off} (YAML's unquoted C{off} arrives as false) or a file path."""
    if value is False:
        return "off"
    return _nonempty(value)


def _read_tracing(m: _Map) -> TracingConfig:
    return _build(
        TracingConfig,
        m,
        enabled=m.get("enabled", _boolean),
        sample_rate=m.get("sample_rate", _number(low=0, high=1)),
        exporter=m.get("exporter", _choice("otlp", "console")),
        endpoint=m.get("endpoint", _nonempty),
    )


def _read_simulator(index: int, m: _Map) -> SimulatorConfig:
    return _build(
        SimulatorConfig,
        m,
        listen=m.get("listen", _endpoint, "", required=True),
        id=m.get("id", _name, f"sim-{index + 1}"),
        model=m.get("model", _nonempty),
        ttft=m.get("ttft", _duration()),
        tokens_per_second=m.get("tokens_per_second", _number(above=0)),
        max_tokens=m.get("max_tokens", _integer(low=1)),
        failure_rate=m.get("failure_rate", _number(low=0, high=1)),
        hang_rate=m.get("hang_rate", _number(low=0, high=1)),
    )


# -- cross references ----------------------------------------------------------------------


def _check_references(ctx: _Context, config: Config) -> None:
    """Check names that point elsewhere, and uniqueness across sections."""
    owners: dict[str, str] = {}
    for pool in config.pools.values():
        if pool.fallback is not None and pool.fallback not in config.fallbacks:
            ctx.error(f"pools.{pool.name}.fallback", f"no fallback named {pool.fallback!r}")
        for index, instance in enumerate(pool.instances):
            if instance.id in owners:
                ctx.error(
                    f"pools.{pool.name}.instances[{index}].id",
                    f"duplicate instance id {instance.id!r} (also in pool {owners[instance.id]})",
                )
            owners.setdefault(instance.id, pool.name)

    key_owners: dict[str, str] = {}
    for agent in config.agents.values():
        for index, key in enumerate(agent.keys):
            if key in key_owners and key_owners[key] != agent.name:
                ctx.error(
                    f"agents.{agent.name}.keys[{index}]",
                    f"key already belongs to agent {key_owners[key]!r}",
                )
            key_owners.setdefault(key, agent.name)

    auth = config.auth
    has_auth = auth is not None and (auth.api_key is not None or auth.jwt is not None)
    # Agents may also come from a keys store or from JWT subjects: only check names
    # against the agents section when it is the only source.
    agents_known = has_auth and auth.jwt is None and not (auth.api_key and auth.api_key.keys_store)
    for index, route in enumerate(config.routes):
        path = f"routes[{index}]"
        if route.pool is not None and route.pool not in config.pools:
            ctx.error(f"{path}.pool", f"no pool named {route.pool!r}")
        for name in route.split or ():
            if name not in config.pools:
                ctx.error(f"{path}.split.{name}", f"no pool named {name!r}")
        if route.fallback is not None and route.fallback not in config.fallbacks:
            ctx.error(f"{path}.fallback", f"no fallback named {route.fallback!r}")
        if route.auth_required and not has_auth:
            ctx.error(
                f"{path}.auth_required",
                "needs authentication configured (an auth section or agents with keys)",
            )
        if agents_known:
            for i, name in enumerate(route.allowed_agents or ()):
                if name not in config.agents:
                    ctx.error(f"{path}.allowed_agents[{i}]", f"no agent named {name!r}")

    sim_ids: set[str] = set()
    for index, sim in enumerate(config.simulators):
        if sim.id in sim_ids:
            ctx.error(f"simulators[{index}].id", f"duplicate simulator id {sim.id!r}")
        sim_ids.add(sim.id)
