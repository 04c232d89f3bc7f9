"""Tests for L{clawproxy.config}."""

from __future__ import annotations

import ipaddress
import os
import textwrap
from typing import Any

import yaml
from twisted.trial.unittest import SynchronousTestCase

from clawproxy.config import (
    AdminConfig,
    ApiKeyConfig,
    AuthConfig,
    BreakerConfig,
    CacheConfig,
    Config,
    ConfigError,
    HeaderTransform,
    LoggingConfig,
    MetricsConfig,
    ModelPrice,
    PassiveConfig,
    RedisConfig,
    RetryConfig,
    ServerConfig,
    StoreConfig,
    TracingConfig,
    expand_request_variables,
    hash_key,
    load_config,
    parse_config,
)
from clawproxy.config.reader import read_config
from clawproxy.units import Rate
from tests.certs import self_signed

ETC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "etc")
EXAMPLES = os.path.join(ETC, "examples")
KEY = hash_key("secret-key")

MINIMAL = """\
pools:
  main:
    instances:
      - {id: a, url: "http://127.0.0.1:9000"}
routes:
  - {path: /v1/*, pool: main}
"""


def parse(text: str, environ: dict[str, str] | None = None, base_dir: str = ".") -> Config:
    """Parse YAML C{text} (dedented) with an empty environment unless given one."""
    return parse_config(yaml.safe_load(textwrap.dedent(text)), environ or {}, base_dir)


def parse_unbuilt(text: str, environ: dict[str, str] | None = None,
                  base_dir: str = ".") -> Config:
    """
    L{parse} without refusing the keys this version does not support yet: how they are
    read is checked now, so the issue that builds each feature finds them converted.
    """
    data = yaml.safe_load(textwrap.dedent(text))
    return read_config(data, environ or {}, base_dir, refuse=False)


def with_minimal(text: str) -> str:
    """C{text} (dedented) followed by the minimal pools and routes."""
    return textwrap.dedent(text).rstrip("\n") + "\n" + MINIMAL


class ConfigTestCase(SynchronousTestCase):
    """Helpers for configuration tests."""

    def errors(self, text: str, environ: dict[str, str] | None = None) -> list[str]:
        """Parse C{text}, assert that it fails and return the errors."""
        error = self.assertRaises(ConfigError, parse, text, environ)
        return error.errors

    def assertError(self, text: str, expected: str, environ: dict[str, str] | None = None):
        """Parse C{text} and assert that C{expected} is among the errors."""
        errors = self.errors(text, environ)
        self.assertIn(expected, errors)
        return errors

    def write(self, name: str, content: str, directory: str | None = None) -> str:
        """Write C{content} (dedented) to a file in C{directory} (a fresh one by default)."""
        if directory is None:
            directory = self.mktemp()
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(textwrap.dedent(content))
        return path


class DefaultsTests(ConfigTestCase):
    """What applies when keys are absent (SPEC section 2, "Defaults")."""

    def test_minimal(self) -> None:
        """A config with one pool and one route gets the default sections."""
        config = parse(MINIMAL)
        self.assertEqual(config.server, ServerConfig())
        self.assertEqual(config.admin, AdminConfig())
        self.assertEqual(config.store, StoreConfig())
        self.assertIsNone(config.auth)
        self.assertEqual(config.agents, {})
        self.assertIsNone(config.rate_limits)
        self.assertEqual(config.fallbacks, {})
        self.assertEqual(config.cache, CacheConfig())
        self.assertEqual(config.metrics, MetricsConfig())
        self.assertEqual(config.logging, LoggingConfig())
        self.assertEqual(config.tracing, TracingConfig())
        self.assertEqual(config.simulators, ())
        self.assertIsNone(config.source)

    def test_server_defaults(self) -> None:
        """Server limits default to 10MB body, 16KB headers, 60s client and 10s head timeouts."""
        server = parse(MINIMAL).server
        self.assertEqual(server.listen, ("tcp:8080",))
        self.assertIsNone(server.tls)
        self.assertEqual(server.base_path, "")
        self.assertEqual(server.workers, 1)
        self.assertEqual(server.max_body_size, 10 * 1024 * 1024)
        self.assertEqual(server.max_header_size, 16 * 1024)
        self.assertEqual(server.client_timeout, 60.0)
        self.assertEqual(server.head_timeout, 10.0)
        self.assertEqual(server.trusted_proxies, ())

    def test_other_section_defaults(self) -> None:
        """Admin, store, metrics and logging defaults match the SPEC."""
        config = parse(MINIMAL)
        self.assertEqual(config.admin.listen, "tcp:9901:interface=127.0.0.1")
        self.assertIsNone(config.admin.token)
        self.assertEqual(config.store.backend, "memory")
        self.assertEqual(
            config.store.redis,
            RedisConfig("redis://127.0.0.1:6379/0", "clawproxy:", 0.2, "fail_open"),
        )
        self.assertEqual(config.metrics.path, "/metrics")
        self.assertFalse(config.metrics.public)
        self.assertEqual(config.logging.redact, ("Authorization", "X-API-Key"))
        self.assertEqual(config.cache.max_bytes, 256 * 1024 * 1024)

    def test_algorithms_are_balancers(self) -> None:
        """
        The C{algorithm} names the config accepts are the ones L{make_balancer} builds.
        The config keeps its own ordered list (error messages and the reference name them
        in that order, and C{clawproxy.config} does not import C{clawproxy.policy}).
        """
        from clawproxy.config.model import ALGORITHMS
        from clawproxy.policy import balancers

        self.assertEqual(frozenset(ALGORITHMS), balancers.ALGORITHMS)

    def test_pool_defaults(self) -> None:
        """A pool gets round_robin, openai, nginx-like passive checks and retries; no breakers."""
        pool = parse(MINIMAL).pools["main"]
        self.assertEqual(pool.algorithm, "round_robin")
        self.assertEqual(pool.protocol, "openai")
        self.assertEqual(pool.models, ())
        self.assertEqual(pool.passive, PassiveConfig(3, 30.0, 50))
        # SPEC "Defaults": breakers on, with the values of SPEC section 2.
        self.assertEqual(pool.circuit_breaker, BreakerConfig(True, 5, 60.0, 3, 30.0, 30.0, 1, 0.1))
        breakers = parse(MINIMAL.replace("main:", "main:\n    circuit_breaker:", 1))
        self.assertEqual(breakers.pools["main"].circuit_breaker, pool.circuit_breaker)
        off = parse(MINIMAL.replace("main:", "main:\n    circuit_breaker: {enabled: false}", 1))
        self.assertFalse(off.pools["main"].circuit_breaker.enabled)
        self.assertEqual(
            pool.retry,
            RetryConfig(
                2, frozenset({"connect_failure", "refused"}), "exponential", 0.025, 0.25, 0.2
            ),
        )
        self.assertEqual(pool.timeout, 30.0)
        self.assertEqual(pool.slow_start, 0.0)
        self.assertIsNone(pool.session_affinity)
        self.assertIsNone(pool.first_token_timeout)
        self.assertIsNone(pool.stall_timeout)
        self.assertIsNone(pool.max_qps)
        self.assertIsNone(pool.fallback)

    def test_health_check_defaults(self) -> None:
        """Health checks are on, every 5s with a 2s timeout and thresholds 2 and 3."""
        health = parse(MINIMAL).pools["main"].health_check
        self.assertTrue(health.enabled)
        self.assertEqual(health.path, "/v1/models")
        self.assertEqual((health.interval, health.timeout), (5.0, 2.0))
        self.assertEqual((health.healthy_threshold, health.unhealthy_threshold), (2, 3))
        self.assertEqual(health.expected_status, 200)
        self.assertIsNone(health.expected_body_contains)

    def test_health_check_headers(self) -> None:
        """Probe headers are read with C{${VAR}} from the environment; names are checked."""
        text = """
            pools:
              p:
                instances: ["http://h:1"]
                health_check: {headers: {Authorization: "Bearer ${KEY}", %s: x}}
            routes: [{path: /}]
            """
        config = parse(text % "X-Probe", {"KEY": "sk-1"})
        self.assertEqual(config.pools["p"].health_check.headers,
                         {"Authorization": "Bearer sk-1", "X-Probe": "x"})
        self.assertEqual(parse(MINIMAL).pools["main"].health_check.headers, {})
        self.assertEqual(
            self.errors(text % '"Bad Name"'),
            ["pools.p.health_check.headers.Authorization: environment variable KEY is not set",
             "pools.p.health_check.headers.Bad Name: invalid header name"],
        )

    def test_health_path_by_protocol(self) -> None:
        """The default health path is /v1/models, /api/tags or /health by protocol."""
        config = parse(
            """
            pools:
              o: {protocol: openai, instances: ["http://h:1"]}
              l: {protocol: ollama, instances: ["http://h:2"]}
              h: {protocol: http, instances: ["http://h:3"]}
              x: {protocol: ollama, instances: ["http://h:4"], health_check: {path: /ready}}
            routes: [{path: /}]
            """
        )
        paths = {name: pool.health_check.path for name, pool in config.pools.items()}
        self.assertEqual(
            paths, {"o": "/v1/models", "l": "/api/tags", "h": "/health", "x": "/ready"}
        )

    def test_instance_defaults(self) -> None:
        """Instances default to weight 1 and no connection cap."""
        instance = parse(MINIMAL).pools["main"].instances[0]
        self.assertEqual(instance.weight, 1.0)
        self.assertIsNone(instance.max_connections)

    def test_route_defaults(self) -> None:
        """A route matches any method, needs no auth and has no cache or transforms."""
        route = parse(MINIMAL).routes[0]
        self.assertIsNone(route.methods)
        self.assertEqual(route.match, {})
        self.assertFalse(route.auth_required)
        self.assertIsNone(route.split)
        self.assertIsNone(route.cache)
        self.assertIsNone(route.transforms)
        self.assertIsNone(route.rate_limit)

    def test_empty_sections(self) -> None:
        """Empty (null) sections count as absent."""
        config = parse(with_minimal("server:\nadmin:\nrate_limits:\nauth:\n"))
        self.assertEqual(config.server, ServerConfig())
        self.assertIsNone(config.rate_limits)
        self.assertIsNone(config.auth)


class ValuesTests(ConfigTestCase):
    """Values are converted and normalised."""

    def test_units(self) -> None:
        """Durations, sizes and rates are converted to seconds, bytes and L{Rate}s."""
        config = parse_unbuilt(
            with_minimal(
                """
                server: {max_body_size: 1MB, max_header_size: 8KB, client_timeout: 2m,
                         head_timeout: 500ms}
                rate_limits: {global: 5000/second, default: 100/minute,
                              session_min_interval: 1.2s, queue: {max_wait: 5s}}
                """
            )
        )
        self.assertEqual(config.server.max_body_size, 1024 * 1024)
        self.assertEqual(config.server.max_header_size, 8192)
        self.assertEqual(config.server.client_timeout, 120.0)
        self.assertEqual(config.server.head_timeout, 0.5)
        self.assertEqual(config.rate_limits.global_, Rate(5000.0, 1.0))
        self.assertEqual(config.rate_limits.default, Rate(100.0, 60.0))
        self.assertEqual(config.rate_limits.session_min_interval, 1.2)
        self.assertEqual(config.rate_limits.queue.max_wait, 5.0)

    def test_base_path(self) -> None:
        """The base path loses its trailing slash; C{/} means no base path."""
        self.assertEqual(parse(with_minimal("server: {base_path: /api/v1/}")).server.base_path,
                         "/api/v1")
        self.assertEqual(parse(with_minimal("server: {base_path: /}")).server.base_path, "")

    def test_listen_string(self) -> None:
        """A single endpoint string is accepted where a list is expected."""
        config = parse(with_minimal('server: {listen: "tcp:8000:interface=127.0.0.1"}'))
        self.assertEqual(config.server.listen, ("tcp:8000:interface=127.0.0.1",))

    def test_trusted_proxies(self) -> None:
        """Trusted proxies become networks; a bare address is a single-host network."""
        config = parse(with_minimal("server: {trusted_proxies: [10.0.0.0/8, '::1', 192.168.1.5]}"))
        self.assertEqual(
            config.server.trusted_proxies,
            (
                ipaddress.ip_network("10.0.0.0/8"),
                ipaddress.ip_network("::1/128"),
                ipaddress.ip_network("192.168.1.5/32"),
            ),
        )

    def test_instances(self) -> None:
        """Trailing slashes are dropped, a bare URL is an instance, ids default to POOL-N."""
        config = parse(
            """
            pools:
              p:
                instances: ["http://h:1/", {url: "https://h:2/base/", weight: 2.5,
                             max_connections: 10}]
            routes: [{path: /, pool: p}]
            """
        )
        first, second = config.pools["p"].instances
        self.assertEqual((first.id, first.url), ("p-1", "http://h:1"))
        self.assertEqual((second.id, second.url), ("p-2", "https://h:2/base"))
        self.assertEqual((second.weight, second.max_connections), (2.5, 10))

    def test_methods_uppercased(self) -> None:
        """Route methods are upper-cased."""
        config = parse(
            """
            pools: {p: {instances: ["http://h:1"]}}
            routes: [{path: /, pool: p, methods: [post, Get]}]
            """
        )
        self.assertEqual(config.routes[0].methods, ("POST", "GET"))

    def test_route_fields(self) -> None:
        """Route match, split, limits, cache and transforms are read."""
        config = parse_unbuilt(
            """
            pools:
              a: {instances: ["http://h:1"]}
              b: {instances: ["http://h:2"]}
            routes:
              - path: /v1/chat/completions
                match: {header.X-User-Tier: vip, body.model: "qwen3:*", agent.tier: 1}
                split: {a: 90, b: 10}
                rate_limit: 200/minute
                timeout: 30s
                cache: {ttl: 2h, semantic: true, threshold: 0.9, key: [body.model]}
                transforms:
                  request_headers: {set: {X-Request-ID: "${request_id}"}, remove: [Cookie]}
            """
        )
        route = config.routes[0]
        self.assertEqual(
            route.match, {"header.X-User-Tier": "vip", "body.model": "qwen3:*", "agent.tier": "1"}
        )
        self.assertEqual(route.split, {"a": 90.0, "b": 10.0})
        self.assertIsNone(route.pool)
        self.assertEqual(route.rate_limit, Rate(200.0, 60.0))
        self.assertEqual(route.timeout, 30.0)
        self.assertEqual(route.cache.ttl, 7200.0)
        self.assertTrue(route.cache.enabled)
        self.assertTrue(route.cache.semantic)
        self.assertEqual(route.cache.key, ("body.model",))
        self.assertEqual(
            route.transforms.request_headers,
            HeaderTransform(set={"X-Request-ID": "${request_id}"}, remove=("Cookie",)),
        )
        self.assertEqual(route.transforms.response_headers, HeaderTransform())

    def test_pool_fields(self) -> None:
        """Pool sections are read, with units converted."""
        pool = parse_unbuilt(
            """
            pools:
              p:
                models: ["qwen3:*"]
                algorithm: least_connections
                protocol: ollama
                instances: ["http://h:1"]
                passive: {max_fails: 0, fail_timeout: 10s, max_ejection_percent: 100}
                slow_start: 1m
                session_affinity: {method: header, header_name: X-Conversation}
                circuit_breaker: {enabled: false, open_timeout: 1m}
                retry: {max_retries: 0, retry_on: [5xx, refused], backoff: constant,
                        base_delay: 500ms, max_delay: 2s, budget: 0}
                timeout: 1m
                first_token_timeout: 10s
                stall_timeout: 30s
                max_qps: 500
            routes: [{path: /}]
            """
        ).pools["p"]
        self.assertEqual(pool.models, ("qwen3:*",))
        self.assertEqual(pool.passive, PassiveConfig(0, 10.0, 100))
        self.assertEqual(pool.slow_start, 60.0)
        self.assertEqual(pool.session_affinity.method, "header")
        self.assertEqual(pool.session_affinity.header_name, "X-Conversation")
        self.assertEqual(pool.session_affinity.cookie_name, "CLAWPROXY_SESSION")
        self.assertEqual(pool.session_affinity.ttl, 3600.0)
        self.assertFalse(pool.circuit_breaker.enabled)
        self.assertEqual(pool.circuit_breaker.open_timeout, 60.0)
        self.assertEqual(pool.retry, RetryConfig(0, frozenset({"5xx", "refused"}), "constant",
                                                 0.5, 2.0, 0.0))
        self.assertEqual((pool.timeout, pool.first_token_timeout, pool.stall_timeout),
                         (60.0, 10.0, 30.0))
        self.assertEqual(pool.max_qps, 500.0)

    def test_pools_ordered(self) -> None:
        """Pools keep the order of the file."""
        config = parse(
            """
            pools:
              z: {instances: ["http://h:1"]}
              a: {instances: ["http://h:2"]}
              m: {instances: ["http://h:3"]}
            routes: [{path: /}]
            """
        )
        self.assertEqual(list(config.pools), ["z", "a", "m"])

    def test_agents(self) -> None:
        """Agents are read; stored keys are lower-cased; keys imply API key auth."""
        config = parse_unbuilt(
            with_minimal(
                f"""
                agents:
                  finance:
                    keys: ["{KEY.upper().replace("SHA256", "sha256")}"]
                    scopes: ["/v1/*"]
                    rate_limit: 500/minute
                    token_limit: 100000/minute
                    spend_limit: 0.5/day
                    tier: vip
                    inject_headers: {{Authorization: "Bearer x"}}
                models: {{prices: {{m: {{prompt: 1}}}}}}
                """
            )
        )
        agent = config.agents["finance"]
        self.assertEqual(agent.name, "finance")
        self.assertEqual(agent.keys, (KEY,))
        self.assertEqual(agent.scopes, ("/v1/*",))
        self.assertEqual(agent.spend_limit, Rate(0.5, 86400.0))
        self.assertEqual(agent.token_limit, Rate(100000.0, 60.0))
        self.assertEqual(agent.tier, "vip")
        self.assertEqual(agent.inject_headers, {"Authorization": "Bearer x"})
        self.assertEqual(config.auth, AuthConfig(api_key=ApiKeyConfig()))

    def test_allowed_agents_implies_auth(self) -> None:
        """A route with C{allowed_agents} requires authentication."""
        config = parse(
            f"""
            agents: {{bot: {{keys: ["{KEY}"]}}}}
            pools: {{p: {{instances: ["http://h:1"]}}}}
            routes: [{{path: /, pool: p, allowed_agents: [bot]}}]
            """
        )
        self.assertTrue(config.routes[0].auth_required)
        self.assertEqual(config.routes[0].allowed_agents, ("bot",))

    def test_auth(self) -> None:
        """API key and JWT settings are read; relative key store paths are resolved."""
        directory = self.mktemp()
        self.write("keys.json", "{}", directory)
        config = parse_unbuilt(
            with_minimal(
                """
                auth:
                  api_key: {header: X-Key, keys_store: keys.json}
                  jwt: {secret: SECRET, algorithms: [HS256, HS512], issuer: me, leeway: 10s,
                        max_age: 24h}
                """
            ).replace("keys.json", os.path.join(directory, "keys.json")).replace(
                "SECRET", "s" * 64)
        )
        self.assertEqual(config.auth.api_key.header, "X-Key")
        self.assertEqual(config.auth.api_key.keys_store, os.path.abspath(
            os.path.join(directory, "keys.json")))
        self.assertEqual(config.auth.jwt.algorithms, ("HS256", "HS512"))
        self.assertEqual((config.auth.jwt.leeway, config.auth.jwt.max_age), (10.0, 86400.0))
        self.assertEqual(config.auth.jwt.issuer, "me")

    def test_models(self) -> None:
        """Model aliases, fallback chains and prices are read."""
        models = parse_unbuilt(
            with_minimal(
                """
                models:
                  aliases: {fast: "qwen3:8b"}
                  fallbacks: {"qwen3:32b": ["qwen3:14b", "qwen3:8b"]}
                  prices: {"qwen3:32b": {prompt: 0.5, completion: 1}}
                """
            )
        ).models
        self.assertEqual(models.aliases, {"fast": "qwen3:8b"})
        self.assertEqual(models.fallbacks, {"qwen3:32b": ("qwen3:14b", "qwen3:8b")})
        self.assertEqual(models.prices, {"qwen3:32b": ModelPrice(0.5, 1.0)})

    def test_fallbacks(self) -> None:
        """Fallbacks are read; a mapping body is serialised as JSON."""
        config = parse_unbuilt(
            with_minimal(
                """
                fallbacks:
                  busy: {status: 503, body: {message: busy}, headers: {Retry-After: 5}}
                  cached: {type: cache, max_stale: 10m}
                """
            )
        )
        busy, cached = config.fallbacks["busy"], config.fallbacks["cached"]
        self.assertEqual((busy.name, busy.type, busy.status), ("busy", "static", 503))
        self.assertEqual(busy.body, '{"message": "busy"}')
        self.assertEqual(busy.headers, {"Retry-After": "5"})
        self.assertEqual(busy.content_type, "application/json")
        self.assertEqual((cached.type, cached.max_stale), ("cache", 600.0))

    def test_simulators(self) -> None:
        """Simulators get ids C{sim-N} by position unless given one."""
        config = parse(
            with_minimal(
                """
                simulators:
                  - {listen: "tcp:11501", ttft: 50ms, tokens_per_second: 100}
                  - {listen: "tcp:11502", id: custom, failure_rate: 0.5, hang_rate: 0.1}
                  - {listen: "tcp:11503", max_tokens: 8, model: tiny}
                """
            )
        )
        first, second, third = config.simulators
        self.assertEqual((first.id, first.ttft, first.tokens_per_second), ("sim-1", 0.05, 100.0))
        self.assertEqual((first.model, first.max_tokens), ("sim-small", 64))
        self.assertEqual((second.id, second.failure_rate, second.hang_rate), ("custom", 0.5, 0.1))
        self.assertEqual((third.id, third.max_tokens, third.model), ("sim-3", 8, "tiny"))

    def test_logging_and_tracing(self) -> None:
        """C{warning} means C{warn}; tracing settings are read."""
        config = parse_unbuilt(
            with_minimal(
                """
                logging: {level: warning, format: text}
                tracing: {enabled: true, sample_rate: 1, endpoint: "http://otel:4318"}
                """
            )
        )
        self.assertEqual((config.logging.level, config.logging.format), ("warn", "text"))
        self.assertEqual(config.tracing, TracingConfig(True, 1.0, "otlp", "http://otel:4318"))

    def test_admin_token_empty(self) -> None:
        """An empty admin token means no token."""
        self.assertIsNone(parse(with_minimal('admin: {token: ""}')).admin.token)
        self.assertEqual(parse(with_minimal("admin: {token: t}")).admin.token, "t")

    def test_instance_lookup(self) -> None:
        """L{Config.instance} finds an instance and its pool by id, or returns C{None}."""
        config = parse(
            """
            pools:
              a: {instances: [{id: a1, url: "http://h:1"}]}
              b: {instances: [{id: b1, url: "http://h:2"}, {id: b2, url: "http://h:3"}]}
            routes: [{path: /}]
            """
        )
        pool, instance = config.instance("b2")
        self.assertEqual((pool.name, instance.url), ("b", "http://h:3"))
        self.assertIsNone(config.instance("nope"))

    def test_summary(self) -> None:
        """The summary lists listeners, pools with instance counts and algorithms, counts of
        routes and the simulators."""
        config = parse(
            """
            server: {listen: ["tcp:8080", "tcp:8081"]}
            pools:
              main: {algorithm: least_connections, instances: ["http://h:1", "http://h:2"]}
              solo: {protocol: ollama, instances: ["http://h:3"]}
            routes: [{path: /a}, {path: /b}, {path: /c}]
            simulators: [{listen: "tcp:11501"}]
            """
        )
        summary = config.summary()
        self.assertIn("listeners: tcp:8080, tcp:8081", summary)
        self.assertIn("main: 2 instances, least_connections, openai", summary)
        self.assertIn("solo: 1 instance, round_robin, ollama", summary)
        self.assertIn("routes: 3", summary)
        self.assertIn("simulators: 1", summary)
        self.assertIn("sim-1: tcp:11501 (sim-small)", summary)

    def test_input_untouched(self) -> None:
        """Parsing does not change the data it is given."""
        data = yaml.safe_load(with_minimal('admin: {token: "${T}"}'))
        parse_config(data, {"T": "x"})
        self.assertEqual(data["admin"], {"token": "${T}"})

    def test_plain_strings(self) -> None:
        """Substituted values come out as plain C{str}, not a subclass."""
        config = parse(with_minimal('admin: {token: "${T}"}'), {"T": "x"})
        self.assertIs(type(config.admin.token), str)

    def test_hash_key(self) -> None:
        """L{hash_key} gives C{sha256:} and the hex SHA-256 of the key."""
        self.assertEqual(
            hash_key("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        )


class EnvironmentTests(ConfigTestCase):
    """C{${VAR}} substitution."""

    def test_substitution(self) -> None:
        """C{${VAR}} is replaced anywhere in a string value."""
        config = parse(with_minimal('admin: {token: "tok-${TOKEN}-end"}'), {"TOKEN": "abc"})
        self.assertEqual(config.admin.token, "tok-abc-end")

    def test_default(self) -> None:
        """C{${VAR:-default}} uses the default only when VAR is unset."""
        text = with_minimal('store: {redis: {url: "${REDIS:-redis://cache:6379/1}"}}')
        self.assertEqual(parse(text).store.redis.url, "redis://cache:6379/1")
        self.assertEqual(
            parse(text, {"REDIS": "redis://other/0"}).store.redis.url, "redis://other/0"
        )

    def test_missing(self) -> None:
        """A missing VAR without default is an error at the key's path."""
        self.assertError(
            with_minimal("agents: {a: {inject_headers: {Authorization: 'Bearer ${BACKEND_KEY}'}}}"),
            "agents.a.inject_headers.Authorization: environment variable BACKEND_KEY is not set",
        )

    def test_missing_in_list(self) -> None:
        """Paths of substitution errors include list indexes."""
        self.assertError(
            with_minimal("server: {listen: ['tcp:8080', 'tcp:${PORT}']}"),
            "server.listen[1]: environment variable PORT is not set",
        )

    def test_os_environ(self) -> None:
        """Without an explicit environment, C{os.environ} is used."""
        os.environ["CLAWPROXY_TEST_TOKEN"] = "from-os"
        self.addCleanup(os.environ.pop, "CLAWPROXY_TEST_TOKEN")
        data = yaml.safe_load(with_minimal('admin: {token: "${CLAWPROXY_TEST_TOKEN}"}'))
        self.assertEqual(parse_config(data).admin.token, "from-os")

    def test_typed_values(self) -> None:
        """Numbers and booleans may come from the environment."""
        config = parse(
            """
            pools:
              p:
                instances: [{url: "http://h:1", weight: "${W}", max_connections: "${MC}"}]
                health_check: {enabled: "${HC}"}
            routes: [{path: /}]
            """,
            {"W": "0.5", "MC": "10", "HC": "false"},
        )
        pool = config.pools["p"]
        self.assertEqual((pool.instances[0].weight, pool.instances[0].max_connections), (0.5, 10))
        self.assertFalse(pool.health_check.enabled)

    def test_empty_is_absent(self) -> None:
        """A value that substitutes to an empty string counts as absent (the default applies)."""
        config = parse(
            """
            admin: {token: "${CLAWPROXY_ADMIN_TOKEN:-}"}
            pools: {p: {instances: ["http://h:1"], max_qps: "${QPS:-}", timeout: "${T:-}"}}
            routes: [{path: /}]
            """
        )
        self.assertIsNone(config.admin.token)
        self.assertIsNone(config.pools["p"].max_qps)
        self.assertEqual(config.pools["p"].timeout, 30.0)

    def test_literal_string_not_a_number(self) -> None:
        """A quoted number written in the file is still a string, not a number."""
        self.assertError(
            "pools: {p: {instances: [{url: 'http://h:1', weight: '2'}]}}\nroutes: [{path: /}]",
            "pools.p.instances[0].weight: must be a number",
        )

    def test_escape(self) -> None:
        """C{$${} writes a literal C{${}."""
        config = parse(with_minimal('admin: {token: "a$${B}c"}'))
        self.assertEqual(config.admin.token, "a${B}c")

    def test_bad_reference(self) -> None:
        """A malformed reference is an error at its path."""
        errors = self.errors(with_minimal('admin: {token: "${no good}"}\nlogging: {output: "${X"}'))
        self.assertIn("admin.token: invalid variable reference '${no good}'", errors)
        self.assertIn("logging.output: invalid variable reference '${'", errors)

    def test_transforms(self) -> None:
        """In transforms, C{${request_id}} stays for per-request expansion; C{${env:X}} is
        replaced at load."""
        config = parse(
            """
            pools: {p: {instances: ["http://h:1"]}}
            routes:
              - path: /
                transforms:
                  request_headers: {set: {X-Request-ID: "${request_id}", X-Key: "${env:KEY}",
                                          X-Who: "${agent}@${client_ip}"}}
                  response_headers: {set: {X-Served-By: "${instance} in ${pool} ${route}"}}
            """,
            {"KEY": "k1", "request_id": "not this"},
        )
        transforms = config.routes[0].transforms
        self.assertEqual(
            transforms.request_headers.set,
            {"X-Request-ID": "${request_id}", "X-Key": "k1", "X-Who": "${agent}@${client_ip}"},
        )
        self.assertEqual(
            transforms.response_headers.set, {"X-Served-By": "${instance} in ${pool} ${route}"}
        )

    def test_env_prefix_outside_transforms(self) -> None:
        """C{${env:X}} also reads the environment outside transforms."""
        config = parse(with_minimal('admin: {token: "${env:TOKEN}"}'), {"TOKEN": "t"})
        self.assertEqual(config.admin.token, "t")

    def test_transforms_errors(self) -> None:
        """Unknown request variables and missing C{${env:X}} in transforms are errors."""
        errors = self.errors(
            """
            pools: {p: {instances: ["http://h:1"]}}
            routes:
              - path: /
                transforms:
                  request_headers: {set: {A: "${requestid}", B: "${env:NOPE}"}}
            """
        )
        self.assertIn(
            "routes[0].transforms.request_headers.set.A: unknown request variable ${requestid}"
            " (use one of agent, client_ip, instance, pool, request_id, route, or ${env:NAME})",
            errors,
        )
        self.assertIn(
            "routes[0].transforms.request_headers.set.B: environment variable NOPE is not set",
            errors,
        )

    def test_expand_request_variables(self) -> None:
        """L{expand_request_variables} fills in per-request values, empty when unknown, and
        turns C{$${} into a literal C{${}."""
        variables = {"request_id": "r1", "agent": "bob"}
        self.assertEqual(
            expand_request_variables("${request_id}/${agent}/${pool}", variables), "r1/bob/"
        )
        self.assertEqual(expand_request_variables("$${agent}=${agent}", variables), "${agent}=bob")

    def test_transforms_escape(self) -> None:
        """C{$${} in transforms is kept at load, for L{expand_request_variables}."""
        config = parse(
            """
            pools: {p: {instances: ["http://h:1"]}}
            routes: [{path: /, transforms: {request_headers: {set: {X-A: "$${agent}"}}}}]
            """
        )
        value = config.routes[0].transforms.request_headers.set["X-A"]
        self.assertEqual(value, "$${agent}")
        self.assertEqual(expand_request_variables(value, {"agent": "bob"}), "${agent}")

    def test_transforms_no_defaults(self) -> None:
        """Request variables in transforms cannot have a default."""
        self.assertError(
            """
            pools: {p: {instances: ["http://h:1"]}}
            routes: [{path: /, transforms: {request_headers: {set: {X-A: "${agent:-anon}"}}}}]
            """,
            "routes[0].transforms.request_headers.set.X-A: request variable ${agent} cannot"
            " have a default",
        )


class ErrorTests(ConfigTestCase):
    """Invalid configurations are rejected with every error and its path."""

    def test_config_error(self) -> None:
        """L{ConfigError} keeps the list and prints one error per line."""
        error = ConfigError(["a: x", "b.c: y"])
        self.assertEqual(error.errors, ["a: x", "b.c: y"])
        self.assertEqual(str(error), "a: x\nb.c: y")

    def test_missing_pools_and_routes(self) -> None:
        """C{pools} and C{routes} are required."""
        self.assertEqual(
            self.errors("server: {workers: 1}"),
            ["pools: required (at least one pool)", "routes: required (at least one route)"],
        )

    def test_empty_document(self) -> None:
        """An empty document reports the missing sections."""
        errors = self.assertRaises(ConfigError, parse_config, None, {}).errors
        self.assertEqual(len(errors), 2)

    def test_not_a_mapping(self) -> None:
        """A document that is not a mapping is an error."""
        errors = self.assertRaises(ConfigError, parse_config, [1, 2], {}).errors
        self.assertIn("(top level): must be a mapping", errors)

    def test_empty_pools_and_routes(self) -> None:
        """At least one pool and one route are needed."""
        errors = self.errors("pools: {}\nroutes: []")
        self.assertIn("pools: must define at least one pool", errors)
        self.assertIn("routes: must define at least one route", errors)

    def test_unknown_keys(self) -> None:
        """Unknown keys are reported at every depth."""
        errors = self.errors(
            """
            colour: blue
            server: {listen: ["tcp:8080"], port: 80}
            pools:
              main:
                instances:
                  - {id: a, url: "http://h:1", wieght: 2}
                health_check: {intervall: 5s}
            routes:
              - path: /
                pool: main
                transforms: {request_headers: {add: {X: y}}}
            """
        )
        self.assertEqual(
            sorted(errors),
            sorted(
                [
                    "colour: unknown key",
                    "server.port: unknown key",
                    "pools.main.instances[0].wieght: unknown key",
                    "pools.main.health_check.intervall: unknown key",
                    "routes[0].transforms.request_headers.add: unknown key",
                ]
            ),
        )

    def test_wrong_types(self) -> None:
        """Values of the wrong type are reported with the expected type."""
        errors = self.errors(
            """
            server: {workers: two, listen: 8080}
            store: memory
            admin: {listen: 9901}
            metrics: {public: maybe}
            pools: {main: {instances: "http://h:1", max_qps: fast}}
            routes: [{path: /, methods: POST, allowed_agents: bob}, 7]
            """
        )
        for expected in [
            "server.workers: must be an integer",
            "server.listen: must be a list",
            "store: must be a mapping",
            "admin.listen: must be a string",
            "metrics.public: must be a boolean (true or false)",
            "pools.main.instances: must be a list",
            "pools.main.max_qps: must be a number",
            "routes[0].methods: must be a list",
            "routes[0].allowed_agents: must be a list",
            "routes[1]: must be a mapping",
        ]:
            self.assertIn(expected, errors)

    def test_booleans_are_not_numbers(self) -> None:
        """C{true} is not accepted as an integer."""
        self.assertError(with_minimal("server: {workers: true}"),
                         "server.workers: must be an integer")

    def test_impossible_values(self) -> None:
        """Out-of-range values are reported with the bound."""
        errors = self.errors(
            """
            server: {workers: 0}
            pools:
              main:
                instances:
                  - {id: a, url: "http://h:1"}
                  - {id: b, url: "http://h:2", max_connections: 0}
                  - {id: c, url: "http://h:3", weight: -1}
                passive: {max_ejection_percent: 101}
                retry: {budget: 1.5, max_retries: -1}
                timeout: 0
                health_check: {expected_status: 99}
            routes: [{path: /, pool: main}]
            simulators: [{listen: "tcp:1", failure_rate: 2, hang_rate: -0.1}]
            rate_limits: {adaptive: {factor: 0}}
            """
        )
        for expected in [
            "server.workers: must be >= 1",
            "pools.main.instances[1].max_connections: must be >= 1",
            "pools.main.instances[2].weight: must be >= 0",
            "pools.main.passive.max_ejection_percent: must be <= 100",
            "pools.main.retry.budget: must be <= 1",
            "pools.main.retry.max_retries: must be >= 0",
            "pools.main.timeout: must be > 0",
            "pools.main.health_check.expected_status: must be >= 100",
            "simulators[0].failure_rate: must be <= 1",
            "simulators[0].hang_rate: must be >= 0",
            "rate_limits.adaptive.factor: must be > 0",
        ]:
            self.assertIn(expected, errors)

    def test_choices(self) -> None:
        """Enumerated settings accept only their listed values."""
        errors = self.errors(
            """
            store: {backend: etcd, redis: {on_error: explode}}
            rate_limits: {algorithm: leaky_bucket, on_limit: drop}
            server: {tls: {port: 8443, cert: c, key: k, min_version: TLSv1.0}}
            logging: {level: loud, format: xml}
            pools:
              main:
                algorithm: fastest
                protocol: grpc
                instances: ["http://h:1"]
                session_affinity: {method: magic}
                retry: {retry_on: [5xx, 4xx], backoff: random}
            routes: [{path: /, pool: main, methods: [GET, FETCH]}]
            """
        )
        for expected in [
            "store.backend: must be one of memory, redis",
            "store.redis.on_error: must be one of fail_open, fail_closed",
            "rate_limits.algorithm: must be one of token_bucket, sliding_window, fixed_window",
            "rate_limits.on_limit: must be one of reject, queue",
            "server.tls.min_version: must be one of TLSv1.2, TLSv1.3",
            "logging.level: must be one of debug, info, warn, warning, error",
            "logging.format: must be one of json, text",
            "pools.main.algorithm: must be one of round_robin, weighted_round_robin,"
            " least_connections, ip_hash, consistent_hash, random, least_latency",
            "pools.main.protocol: must be one of openai, ollama, http",
            "pools.main.session_affinity.method: must be one of cookie, ip_hash, header,"
            " conversation",
            "pools.main.retry.retry_on[1]: must be one of 5xx, connect_failure, refused, timeout",
            "pools.main.retry.backoff: must be one of exponential, linear, constant",
            "routes[0].methods[1]: must be one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS,"
            " TRACE",
        ]:
            self.assertIn(expected, errors)

    def test_bad_units(self) -> None:
        """Bad durations, rates and sizes are reported at their path."""
        errors = self.errors(
            """
            server: {max_body_size: 10XB, client_timeout: soon}
            rate_limits: {default: 100/fortnight, global: lots}
            pools: {main: {instances: ["http://h:1"], timeout: -5s}}
            routes: [{path: /, pool: main, rate_limit: "0/minute"}]
            """
        )
        for expected in [
            "server.max_body_size: invalid size '10XB': use e.g. 10MB, 512KB, 1GB or a number"
            " of bytes",
            "server.client_timeout: invalid duration 'soon': use e.g. 500ms, 10s, 5m, 2h, 1d or"
            " a number of seconds",
            "rate_limits.default: invalid rate '100/fortnight': the period must be second,"
            " minute, hour, day or a duration",
            "rate_limits.global: must be a rate such as 100/minute, 10/s or 1000/hour",
            "pools.main.timeout: must not be negative",
            "routes[0].rate_limit: invalid rate '0/minute': the count must be > 0",
        ]:
            self.assertIn(expected, errors)

    def test_instance_urls(self) -> None:
        """Instance URLs must be http(s) with a host; the url is required."""
        errors = self.errors(
            """
            pools:
              main:
                instances:
                  - {id: a, url: "ftp://h:1"}
                  - {id: b, url: "http://"}
                  - {id: c}
                  - {id: d, url: "http://h:99999"}
                  - {id: e, url: "http://h:1/?x=1"}
            routes: [{path: /, pool: main}]
            """
        )
        self.assertEqual(
            errors,
            [
                "pools.main.instances[0].url: must be an http:// or https:// URL",
                "pools.main.instances[1].url: must name a host",
                "pools.main.instances[2].url: required",
                "pools.main.instances[3].url: must be a valid http:// or https:// URL",
                "pools.main.instances[4].url: must not have a query or fragment",
            ],
        )

    def test_pool_needs_instances(self) -> None:
        """A pool without instances is an error."""
        errors = self.errors("pools: {a: {}, b: {instances: []}}\nroutes: [{path: /}]")
        self.assertIn("pools.a.instances: required", errors)
        self.assertIn("pools.b.instances: must list at least one instance", errors)

    def test_names(self) -> None:
        """Pool names and instance ids may not contain C{/} or spaces."""
        errors = self.errors(
            "pools: {'a/b': {instances: [{id: 'x y', url: 'http://h:1'}]}, "
            "c: {instances: [{id: 'x y', url: 'http://h:1'}]}}\nroutes: [{path: /}]"
        )
        self.assertIn("pools.a/b: invalid name (letters, digits and _ . : @ - only)", errors)
        self.assertIn(
            "pools.c.instances[0].id: invalid name (letters, digits and _ . : @ - only)", errors
        )

    def test_routes(self) -> None:
        """Route paths start with C{/}; pool and split exclude each other; split weights are
        positive."""
        errors = self.errors(
            """
            pools: {a: {instances: ["http://h:1"]}, b: {instances: ["http://h:2"]}}
            routes:
              - {path: v1/chat}
              - {path: /x, pool: a, split: {a: 1}}
              - {path: /y, split: {a: 0, b: -1}}
              - {path: /z, split: {}}
              - {pool: a}
              - {path: /m, match: {tier: vip}}
            """
        )
        self.assertEqual(
            errors,
            [
                "routes[0].path: must start with /",
                "routes[1].split: give either pool or split, not both",
                "routes[2].split.a: must be > 0",
                "routes[2].split.b: must be > 0",
                "routes[3].split: must name at least one pool",
                "routes[4].path: required",
                "routes[5].match.tier: match keys must look like header.NAME, query.NAME,"
                " body.NAME, agent.NAME",
            ],
        )

    def test_references(self) -> None:
        """Routes and pools must name existing pools and fallbacks."""
        errors = self.errors(
            """
            pools:
              main: {instances: ["http://h:1"], fallback: nope}
            routes:
              - {path: /a, pool: missing}
              - {path: /b, split: {main: 1, gone: 1}, fallback: absent}
            fallbacks: {busy: {body: x}}
            """
        )
        self.assertEqual(
            errors,
            [
                "pools.main.fallback: no fallback named 'nope'",
                "routes[0].pool: no pool named 'missing'",
                "routes[1].split.gone: no pool named 'gone'",
                "routes[1].fallback: no fallback named 'absent'",
            ],
        )

    def test_duplicate_instance_ids(self) -> None:
        """Instance ids are unique across all pools."""
        errors = self.errors(
            """
            pools:
              a: {instances: [{id: gpu-1, url: "http://h:1"}]}
              b: {instances: [{id: gpu-2, url: "http://h:2"}, {id: gpu-1, url: "http://h:3"}]}
            routes: [{path: /}]
            """
        )
        self.assertEqual(
            errors, ["pools.b.instances[1].id: duplicate instance id 'gpu-1' (also in pool a)"]
        )

    def test_plain_agent_key(self) -> None:
        """Plain agent keys are rejected with advice to use C{clawproxy hash-key}, and the
        key is not echoed."""
        errors = self.errors(with_minimal("agents: {bob: {keys: [hunter2secret]}}"))
        self.assertEqual(len(errors), 1)
        self.assertTrue(errors[0].startswith("agents.bob.keys[0]: must be a stored key"))
        self.assertIn("clawproxy hash-key", errors[0])
        self.assertNotIn("hunter2secret", errors[0])

    def test_shared_agent_key(self) -> None:
        """One key cannot belong to two agents."""
        self.assertError(
            with_minimal(f"agents: {{a: {{keys: ['{KEY}']}}, b: {{keys: ['{KEY}']}}}}"),
            "agents.b.keys[0]: key already belongs to agent 'a'",
        )

    def test_spend_limit_needs_prices(self) -> None:
        """A spend budget without any price could never be spent: refused."""
        errors = self.errors(with_minimal("""
            agents:
              a: {spend_limit: 5/day}
            """))
        self.assertEqual(errors, ["agents.a.spend_limit: needs models.prices (spend is priced"
                                  " per model)"])

    def test_agent_fields(self) -> None:
        """Agent scopes must be paths; limits must be rates; header names must be valid."""
        errors = self.errors(
            with_minimal(
                """
                agents:
                  a: {scopes: [finance], spend_limit: 50, inject_headers: {"Bad Header": x},
                      colour: red}
                """
            )
        )
        self.assertEqual(
            errors,
            [
                "agents.a.scopes[0]: must start with /",
                "agents.a.spend_limit: must be a rate such as 100/minute, 10/s or 1000/hour",
                "agents.a.inject_headers.Bad Header: invalid header name",
                "agents.a.colour: unknown key",
            ],
        )

    def test_agent_settings_need_auth(self) -> None:
        """Scopes or injected headers on agents nobody can authenticate as: refused."""
        errors = self.errors(with_minimal(
            "agents: {a: {scopes: [/x/*], inject_headers: {X-K: v}}, b: {tier: t}}"))
        self.assertEqual(errors, [
            "agents.a.scopes: no authentication is configured (auth, or keys on an"
            " agent), so no request is this agent",
            "agents.a.inject_headers: no authentication is configured (auth, or keys on an"
            " agent), so no request is this agent",
        ])
        parse(with_minimal(f"auth: {{jwt: {{secret: {'s' * 32}}}}}\n"
                           "agents: {a: {scopes: [/x/*]}}"))

    def test_header_values(self) -> None:
        """Header values set by transforms may not contain line breaks."""
        self.assertError(
            """
            pools: {p: {instances: ["http://h:1"]}}
            routes: [{path: /, transforms: {response_headers: {set: {X-A: "a\\r\\nB: c"}}}}]
            """,
            "routes[0].transforms.response_headers.set.X-A: header values must not contain CR,"
            " LF or NUL",
        )

    def test_auth_required_without_auth(self) -> None:
        """A route requiring auth needs an auth section or agents with keys."""
        self.assertError(
            "pools: {p: {instances: ['http://h:1']}}\nroutes: [{path: /, auth_required: true}]",
            "routes[0].auth_required: needs authentication configured (an auth section or"
            " agents with keys)",
        )

    def test_allowed_agents_unknown(self) -> None:
        """C{allowed_agents} must name configured agents when they are the only source."""
        self.assertError(
            f"""
            agents: {{a: {{keys: ["{KEY}"]}}}}
            pools: {{p: {{instances: ["http://h:1"]}}}}
            routes: [{{path: /, allowed_agents: [a, b]}}]
            """,
            "routes[0].allowed_agents[1]: no agent named 'b'",
        )

    def test_allowed_agents_with_keys_store(self) -> None:
        """With a key store, C{allowed_agents} may name agents the store defines."""
        directory = self.mktemp()
        store = self.write("keys.json", '{"b": []}', directory)
        config = parse(
            f"""
            auth: {{api_key: {{keys_store: "{store}"}}}}
            pools: {{p: {{instances: ["http://h:1"]}}}}
            routes: [{{path: /, allowed_agents: [b]}}]
            """
        )
        self.assertEqual(config.routes[0].allowed_agents, ("b",))

    def test_files_must_exist(self) -> None:
        """Key store, TLS certificate and key files must exist."""
        errors = self.errors(
            with_minimal(
                """
                auth: {api_key: {keys_store: /nonexistent/keys.json}}
                server: {tls: {listen: ["ssl:8443"], cert: /nonexistent/c.pem,
                               key: /nonexistent/k.pem}}
                """
            )
        )
        self.assertIn("auth.api_key.keys_store: file not found: /nonexistent/keys.json", errors)
        self.assertIn("server.tls.cert: file not found: /nonexistent/c.pem", errors)
        self.assertIn("server.tls.key: file not found: /nonexistent/k.pem", errors)

    def test_tls_shape(self) -> None:
        """TLS needs a listener (C{listen} or C{port}, not both), a cert and a key."""
        errors = self.errors(with_minimal("server: {tls: {port: 8443, listen: [x]}}"))
        self.assertIn("server.tls.port: give either listen or port, not both", errors)
        self.assertIn("server.tls.cert: required", errors)
        self.assertIn("server.tls.key: required", errors)
        errors = self.errors(with_minimal("server: {tls: {listen: ['tcp:8443']}}"))
        self.assertIn(
            "server.tls.listen[0]: must be an endpoint string such as ssl:8443 or"
            " ssl:8443:interface=0.0.0.0",
            errors,
        )

    def test_jwt(self) -> None:
        """HS* algorithms need a secret; asymmetric ones need a public key."""
        errors = self.errors(with_minimal("auth: {jwt: {algorithms: [HS256, RS256]}}"))
        self.assertEqual(
            errors,
            [
                "auth.jwt.secret: required for HS* algorithms (or keys, or jwks_file)",
                "auth.jwt.public_key: required for RS*, ES*, PS* and EdDSA algorithms (or"
                " keys, or jwks_file)",
            ],
        )
        self.assertError(
            with_minimal("auth: {jwt: {secret: short, algorithms: [HS256]}}"),
            "auth.jwt.secret: must be at least 32 bytes for HS256 (RFC 7518 3.2)",
        )
        self.assertError(
            with_minimal(f"auth: {{jwt: {{secret: {'x' * 32}, algorithms: [HS256, HS512]}}}}"),
            "auth.jwt.secret: must be at least 64 bytes for HS512 (RFC 7518 3.2)",
        )
        self.assertError(
            with_minimal(f"auth: {{jwt: {{secret: {'x' * 32}, algorithms: [RS256],"
                         " public_key: /dev/null}}"),
            "auth.jwt.algorithms: a secret is configured but no HS* algorithm is accepted",
        )
        self.assertError(
            with_minimal("auth: {jwt: {keys: {k1: {}, k2: {secret: x, public_key: y}}}}"),
            "auth.jwt.keys.k1.secret: give exactly one of secret and public_key",
        )
        self.assertError(
            with_minimal("auth: {jwt: {secret: s, algorithms: [HS256, none]}}"),
            "auth.jwt.algorithms[1]: must be one of HS256, HS384, HS512, RS256, RS384,"
            " RS512, ES256, ES384, ES512, PS256, PS384, PS512, EdDSA",
        )

    def test_jwt_public_key(self) -> None:
        """An inline PEM public key is kept; otherwise it is a file that must exist."""
        pem = "-----BEGIN PUBLIC KEY-----\\nabc\\n-----END PUBLIC KEY-----"
        config = parse_unbuilt(
            with_minimal(f'auth: {{jwt: {{algorithms: [RS256], public_key: "{pem}"}}}}')
        )
        self.assertTrue(config.auth.jwt.public_key.startswith("-----BEGIN PUBLIC KEY-----"))
        self.assertError(
            with_minimal("auth: {jwt: {algorithms: [ES256], public_key: /nonexistent/k.pem}}"),
            "auth.jwt.public_key: file not found: /nonexistent/k.pem",
        )

    def test_endpoints(self) -> None:
        """Listen strings must be endpoint descriptions with a valid port."""
        errors = self.errors(
            with_minimal(
                """
                server: {listen: ["tcp:http", "quic:443", "tcp:70000"]}
                admin: {listen: "unix:"}
                simulators: [{model: m}]
                """
            )
        )
        self.assertEqual(
            errors,
            [
                "server.listen[0]: tcp endpoint needs a port number 0-65535",
                "server.listen[1]: must be an endpoint string such as tcp:8080 (tcp, tcp6,"
                " ssl, unix, systemd)",
                "server.listen[2]: tcp endpoint needs a port number 0-65535",
                "admin.listen: unix endpoint needs an address",
                "simulators[0].listen: required",
            ],
        )

    def test_misc_values(self) -> None:
        """Base path, proxies, retry delays, affinity method and simulator ids are checked."""
        errors = self.errors(
            """
            server: {base_path: api, trusted_proxies: [10.0.0.0/33]}
            pools:
              p:
                instances: ["http://h:1"]
                retry: {base_delay: 1s, max_delay: 100ms}
                session_affinity: {ttl: 1h}
            routes: [{path: /}]
            simulators: [{listen: "tcp:1", id: s}, {listen: "tcp:2", id: s}]
            """
        )
        self.assertEqual(
            errors,
            [
                "server.base_path: must be empty or start with /",
                "server.trusted_proxies[0]: must be an IP address or CIDR such as 10.0.0.0/8",
                "pools.p.session_affinity.method: required",
                "pools.p.retry.max_delay: must be >= base_delay",
                "simulators[1].id: duplicate simulator id 's'",
            ],
        )

    def test_timeout_never_retried(self) -> None:
        """C{retry_on: [timeout]} is refused, not accepted and ignored (never retried)."""
        errors = self.errors(
            """
            pools:
              p:
                instances: ["http://h:1"]
                retry: {retry_on: [connect_failure, timeout]}
            routes: [{path: /}]
            """
        )
        self.assertEqual(len(errors), 1)
        self.assertTrue(errors[0].startswith("pools.p.retry.retry_on: timeout is never retried"),
                        errors)

    def test_no_cascade(self) -> None:
        """A section of the wrong type is one error, not one per missing key inside it."""
        self.assertEqual(
            self.errors(with_minimal("server: {tls: yes}")), ["server.tls: must be a mapping"]
        )
        self.assertEqual(
            self.errors("pools: [a]\nroutes: [{path: /}]"), ["pools: must be a mapping"]
        )

    def test_sections(self) -> None:
        """Store, cache, metrics, tracing and model settings are checked."""
        errors = self.errors(
            with_minimal(
                """
                store: {redis: {url: "http://redis", timeout: 0}}
                cache: {store: disk, max_entries: 0, check_model_version: 1}
                metrics: {path: metrics}
                tracing: {sample_rate: 2, exporter: zipkin}
                models: {aliases: {fast: 8}, prices: {m: {prompt: -1, extra: 0}}}
                """
            )
        )
        self.assertEqual(
            errors,
            [
                "store.redis.url: must be a redis://, rediss:// or unix:// URL",
                "store.redis.timeout: must be > 0",
                "models.aliases.fast: must be a string",
                "models.prices.m.prompt: must be >= 0",
                "models.prices.m.extra: unknown key",
                "cache.store: must be one of memory, redis",
                "cache.max_entries: must be >= 1",
                "cache.check_model_version: must be a boolean (true or false)",
                "metrics.path: must start with /",
                "tracing.sample_rate: must be <= 1",
                "tracing.exporter: must be one of otlp, console",
            ],
        )

    def test_several_errors_at_once(self) -> None:
        """Every problem is reported in one L{ConfigError}, not just the first."""
        errors = self.errors(
            """
            server: {workers: -2, max_body_size: big}
            pools:
              main:
                algorithm: fastest
                instances: [{id: a, url: "http://h:1", weight: -1}]
            routes:
              - {path: /, pool: nope}
            extra: 1
            """
        )
        self.assertEqual(
            errors,
            [
                "server.workers: must be >= 1",
                "server.max_body_size: invalid size 'big': use e.g. 10MB, 512KB, 1GB or a number"
                " of bytes",
                "pools.main.instances[0].weight: must be >= 0",
                "pools.main.algorithm: must be one of round_robin, weighted_round_robin,"
                " least_connections, ip_hash, consistent_hash, random, least_latency",
                "extra: unknown key",
                "routes[0].pool: no pool named 'nope'",
            ],
        )


class RefusalTests(ConfigTestCase):
    """
    Every key is either enforced or refused: a key this version cannot honour yet is an
    error at load that says so, not a setting that silently does nothing.
    """

    NOT_YET = "not supported by this version yet"

    def test_feature_keys_built(self) -> None:
        """
        The keys of the feature issues are built: none of them is refused any
        more (C{rate_limits.adaptive} was the last section).
        """
        config = parse(
            f"""
            auth: {{jwt: {{secret: 0123456789abcdef0123456789abcdef}}}}
            agents:
              a:
                keys: ["{KEY}"]
                scopes: ["/v1/*"]
                rate_limit: 10/minute
                token_limit: 1000/minute
                spend_limit: 1/day
                inject_headers: {{X-Key: k}}
            rate_limits: {{default: 10/minute,
                           adaptive: {{latency_p95_above: 3500ms, factor: 0.5}}}}
            models: {{fallbacks: {{big: [small]}}, prices: {{big: {{prompt: 1}}}}}}
            pools:
              p:
                instances: ["http://h:1"]
                max_qps: 5
            routes: [{{path: /, pool: p, rate_limit: 5/s, cache: {{ttl: 1m, semantic: true}}}}]
            fallbacks: {{stale: {{type: cache, max_stale: 10m}}}}
            cache: {{max_entries: 10}}
            """
        )
        self.assertEqual(config.rate_limits.adaptive.latency_p95_above, 3.5)

    def test_tracing_enabled(self) -> None:
        """C{tracing.enabled: true} is accepted (the OpenTelemetry extra is installed)."""
        self.assertTrue(parse(with_minimal("tracing: {enabled: true}")).tracing.enabled)

    def test_workers(self) -> None:
        """C{server.workers} is a count of at least 1, or C{auto} for the number of cores."""
        self.assertEqual(parse(with_minimal("server: {workers: 2}")).server.workers, 2)
        self.assertEqual(parse(with_minimal("server: {workers: auto}")).server.workers,
                         os.cpu_count())

    def test_honoured_values_accepted(self) -> None:
        """The values that match what the gateway does are accepted."""
        config = parse(
            """
            server: {workers: 1}
            tracing: {enabled: false, sample_rate: 0.5}
            pools:
              p: {instances: ["http://h:1"], circuit_breaker: {enabled: false}}
            routes: [{path: /, pool: p, cache: {enabled: false}, fallback: busy}]
            fallbacks: {busy: {type: static, body: busy}}
            store: {backend: redis}
            """
        )
        self.assertFalse(config.pools["p"].circuit_breaker.enabled)
        self.assertFalse(config.routes[0].cache.enabled)
        self.assertEqual(config.store.backend, "redis")

    def test_empty_from_environment(self) -> None:
        """A refused key whose value substitutes to nothing is absent, so not refused."""
        config = parse(with_minimal('rate_limits: "${LIMITS:-}"'))
        self.assertIsNone(config.rate_limits)


class ReferenceTests(SynchronousTestCase):
    """C{docs/configuration.rst} is generated from the declaration."""

    def test_every_flag_has_an_issue(self) -> None:
        """Each refused key names the issue that will build it (none is left today)."""
        from clawproxy.config.reference import refused_keys

        refused = dict(refused_keys())
        self.assertEqual(refused, {})

    def test_up_to_date(self) -> None:
        """
        The committed reference is what the declaration generates (run
        C{python3 -m clawproxy.config.reference > docs/configuration.rst} after changing
        a setting).
        """
        from clawproxy.config.reference import render

        with open(os.path.join(ETC, "..", "docs", "configuration.rst"), encoding="utf-8") as f:
            self.assertEqual(f.read(), render())

    def test_every_key(self) -> None:
        """Every key of every section is documented, with its type, and the TLS sections
        and refusals are there."""
        from clawproxy.config.reference import render, walk

        text = render()
        for path, _, fields in walk():
            for key, _, spec in fields:
                full = f"{path}.{key}" if path else key
                self.assertIn(f"``{full}``\n", text)
                self.assertTrue(spec.doc, full)
        for expected in ("``server.tls.cert``", "``pools.NAME.tls.ca_file``",
                         "``pools.NAME.health_check.headers``",
                         "``tracing.sample_rate``"):
            self.assertIn(expected, text)


class LoadConfigTests(ConfigTestCase):
    """L{load_config} reads files."""

    def test_load(self) -> None:
        """A file is parsed and C{source} is its absolute path."""
        path = self.write("gw.yaml", MINIMAL)
        config = load_config(path, {})
        self.assertEqual(config.source, os.path.abspath(path))
        self.assertEqual(list(config.pools), ["main"])

    def test_relative_paths(self) -> None:
        """Relative TLS, key store and log paths resolve against the config's directory."""
        directory = os.path.abspath(self.mktemp())
        cert, key = self_signed()
        self.write("gw.pem", cert.decode(), os.path.join(directory, "tls"))
        self.write("gw.key", key.decode(), os.path.join(directory, "tls"))
        self.write("keys.json", "{}", directory)
        path = self.write(
            "gw.yaml",
            with_minimal(
                """
                server: {tls: {port: 8443, cert: tls/gw.pem, key: ./tls/gw.key}}
                auth: {api_key: {keys_store: keys.json}}
                logging: {output: logs/access.log}
                """
            ),
            directory,
        )
        config = load_config(path, {})
        self.assertEqual(config.server.tls.listen, ("ssl:8443",))
        self.assertEqual(config.server.tls.cert, os.path.join(directory, "tls", "gw.pem"))
        self.assertEqual(config.server.tls.key, os.path.join(directory, "tls", "gw.key"))
        self.assertEqual(config.auth.api_key.keys_store, os.path.join(directory, "keys.json"))
        self.assertEqual(config.logging.output, os.path.join(directory, "logs", "access.log"))
        self.assertTrue(config.server.tls.http2)
        self.assertEqual(config.server.tls.min_version, "TLSv1.2")

    def test_relative_missing(self) -> None:
        """A missing relative file is reported with its resolved path."""
        directory = os.path.abspath(self.mktemp())
        path = self.write(
            "gw.yaml", with_minimal("auth: {api_key: {keys_store: keys.json}}"), directory
        )
        error = self.assertRaises(ConfigError, load_config, path, {})
        self.assertEqual(
            error.errors,
            [f"auth.api_key.keys_store: file not found: {os.path.join(directory, 'keys.json')}"],
        )

    def test_syntax_error(self) -> None:
        """A YAML syntax error is a single error naming the line and column."""
        path = self.write("gw.yaml", "pools:\n  a: {instances: [x\nroutes: []\n")
        error = self.assertRaises(ConfigError, load_config, path, {})
        self.assertEqual(
            error.errors,
            [f"{path}: YAML syntax error at line 3, column 7: expected ',' or ']', but got ':'"],
        )

    def test_duplicate_keys(self) -> None:
        """A key given twice in one mapping is reported with its line."""
        path = self.write("gw.yaml", MINIMAL + "pools: {}\n")
        error = self.assertRaises(ConfigError, load_config, path, {})
        self.assertEqual(
            error.errors, [f"{path}: YAML syntax error at line 7, column 1: duplicate key 'pools'"]
        )

    def test_missing_file(self) -> None:
        """An unreadable file is a config error naming the file."""
        path = os.path.abspath(self.mktemp())
        error = self.assertRaises(ConfigError, load_config, path, {})
        self.assertEqual(error.errors, [f"{path}: cannot read: No such file or directory"])

    def test_environ(self) -> None:
        """The environment given to L{load_config} is used for substitution."""
        path = self.write("gw.yaml", with_minimal('admin: {token: "${T}"}'))
        self.assertEqual(load_config(path, {"T": "x"}).admin.token, "x")
        error = self.assertRaises(ConfigError, load_config, path, {})
        self.assertEqual(error.errors, ["admin.token: environment variable T is not set"])

    def test_summary_source(self) -> None:
        """The summary names the file it was loaded from."""
        path = self.write("gw.yaml", MINIMAL)
        self.assertIn(os.path.abspath(path), load_config(path, {}).summary())


class ExampleTests(SynchronousTestCase):
    """The example configurations in C{etc/examples} are valid."""

    def load(self, name: str, environ: dict[str, Any]) -> Config:
        return load_config(os.path.join(EXAMPLES, name), environ)

    def test_ollama(self) -> None:
        """
        C{ollama.yaml} loads: three Ollama nodes, least connections, conversation
        affinity, a model fallback chain.
        """
        config = self.load("ollama.yaml", {})
        pool = config.pools["ollama"]
        self.assertEqual(len(pool.instances), 3)
        self.assertEqual((pool.protocol, pool.algorithm), ("ollama", "least_connections"))
        self.assertEqual(pool.health_check.path, "/api/tags")
        self.assertEqual(pool.session_affinity.method, "conversation")
        self.assertEqual(pool.models, ("qwen3:*",))
        self.assertEqual(config.models.fallbacks, {"qwen3:32b": ("qwen3:14b", "qwen3:8b")})

    def test_multi_tenant(self) -> None:
        """
        C{multi-tenant.yaml} loads without any environment variable (bash does not export
        C{HOSTNAME}): two pools, a split route and hashed agent keys.
        """
        config = self.load("multi-tenant.yaml", {})
        self.assertEqual(len(config.pools), 2)
        self.assertTrue(any(route.split for route in config.routes))
        self.assertEqual(
            config.agents["finance-agent"].keys, (hash_key("demo-finance-key"),)
        )
        self.assertEqual(set(config.fallbacks), {"busy"})
        served_by = config.routes[0].transforms.response_headers.set["X-Served-By"]
        self.assertEqual(served_by, "clawproxy-gateway")
        config = self.load("multi-tenant.yaml", {"HOSTNAME": "gw1"})
        served_by = config.routes[0].transforms.response_headers.set["X-Served-By"]
        self.assertEqual(served_by, "clawproxy-gw1")

    def test_every_file_loads(self) -> None:
        """Every configuration shipped in C{etc/} loads with an empty environment."""
        paths = [os.path.join(ETC, "gateway.yaml")]
        paths += [os.path.join(EXAMPLES, n) for n in sorted(os.listdir(EXAMPLES))]
        self.assertGreaterEqual(len(paths), 3)
        for path in paths:
            if path.endswith((".yaml", ".yml")):
                self.assertIsInstance(load_config(path, {}), Config, path)
