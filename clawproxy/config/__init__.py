"""
Configuration: YAML in, frozen attrs classes out (SPEC section 2).

Every setting is declared once, in L{clawproxy.config.model}; L{load_config} reads a
file and L{parse_config} validates the result of C{yaml.safe_load} with the one generic
reader (L{clawproxy.config.reader}); C{python3 -m clawproxy.config.reference} writes
the reference (C{docs/configuration.rst}) from the same declaration.
"""

from clawproxy.config.fields import ConfigError, hash_key
from clawproxy.config.model import (
    AdaptiveConfig,
    AdminConfig,
    AffinityConfig,
    AgentConfig,
    ApiKeyConfig,
    AuthConfig,
    BreakerConfig,
    CacheConfig,
    Config,
    FallbackConfig,
    HeaderTransform,
    HealthCheckConfig,
    InstanceConfig,
    JwtConfig,
    LoggingConfig,
    MetricsConfig,
    ModelPrice,
    ModelsConfig,
    PassiveConfig,
    PoolConfig,
    QueueConfig,
    RateLimitsConfig,
    RedisConfig,
    RetryConfig,
    RouteCacheConfig,
    RouteConfig,
    ServerConfig,
    SimulatorConfig,
    StoreConfig,
    TLSConfig,
    TracingConfig,
    TransformsConfig,
    UpstreamTLSConfig,
)
from clawproxy.config.reader import load_config, parse_config
from clawproxy.config.variables import REQUEST_VARIABLES, expand_request_variables

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
    "UpstreamTLSConfig",
    "expand_request_variables",
    "hash_key",
    "load_config",
    "parse_config",
]
