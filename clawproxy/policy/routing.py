"""
Route matching, canonical paths, model-to-pool choice and sticky splits (pure).
"""

from __future__ import annotations

import fnmatch
import re
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

from clawproxy.config import Config, PoolConfig, RouteConfig
from clawproxy.errors import Rejected, bad_request

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = b"0123456789abcdefABCDEF"
#: Pools of these protocols serve models (an C{http} pool is a plain proxy).
_MODEL_PROTOCOLS = frozenset(("openai", "ollama"))


def canonical_path(raw: bytes) -> bytes:
    """
    The one canonical form of a request path, used for matching and forwarding.

    The query string is kept apart by the caller. Percent-encoded unreserved
    characters are decoded, C{//} runs merged and C{.}/C{..} segments
    resolved (never above the root). C{\\}, NUL, C{;} and C{#} (raw or
    encoded), an encoded C{/} and malformed escapes are refused: backends
    disagree on what they mean (C{..;/}, path parameters, fragments that an
    HTTP client drops), so the path matched would not be the path served.

    @raise Rejected: 400 for a path that cannot be made canonical.
    """
    if not raw.startswith(b"/"):
        raise bad_request("request target must be an absolute path", "invalid_path")
    if b"\x00" in raw or b"\\" in raw or b";" in raw or b"#" in raw:
        raise bad_request("malformed path", "invalid_path")
    if b"%" in raw:
        raw = _decode_unreserved(raw)
    if b"//" not in raw and b"/." not in raw:
        return raw
    out: list[bytes] = []
    for seg in raw.split(b"/")[1:]:
        if seg == b"" or seg == b".":
            continue
        if seg == b"..":
            if out:
                out.pop()
            continue
        out.append(seg)
    path = b"/" + b"/".join(out)
    if raw.endswith((b"/", b"/.", b"/..")) and path != b"/":
        path += b"/"
    return path


def _decode_unreserved(raw: bytes) -> bytes:
    parts = raw.split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
            raise bad_request("malformed percent-encoding in path", "invalid_path")
        code = int(part[:2], 16)
        if code in _UNRESERVED:
            out.append(bytes((code,)) + part[2:])
        elif code in (0x2F, 0x5C, 0x00, 0x3B, 0x23):
            raise bad_request("encoded '/', '\\', NUL, ';' or '#' in path", "invalid_path")
        else:
            out.append(b"%" + part[:2].upper() + part[2:])
    return b"".join(out)


def strip_base(path: bytes, base: bytes) -> bytes | None:
    """C{path} without C{base}, or None when it is not under C{base}."""
    if not base:
        return path
    if path == base:
        return b"/"
    if path.startswith(base) and path[len(base)] == 0x2F:
        return path[len(base):]
    return None


def path_matcher(pattern: str) -> Callable[[str], bool]:
    """
    A matcher for a route path or scope glob: C{/x/*} is C{/x} and anything under it,
    other patterns with C{*?[} are shell globs, the rest exact paths.
    """
    if pattern.endswith("/*") and not any(c in pattern[:-2] for c in "*?["):
        prefix = pattern[:-2]
        slash = prefix + "/"
        return lambda p: p == prefix or p.startswith(slash)
    if any(c in pattern for c in "*?["):
        rx = re.compile(fnmatch.translate(pattern))
        return lambda p: rx.match(p) is not None
    return pattern.__eq__


def _value_matcher(pattern: str) -> Callable[[Any], bool]:
    if any(c in pattern for c in "*?["):
        rx = re.compile(fnmatch.translate(pattern))
        return lambda v: v is not None and rx.match(str(v)) is not None
    return lambda v: v is not None and str(v) == pattern


class CompiledRoute:
    """A route with its matchers built once."""

    __slots__ = ("_conds", "_methods", "_path", "config", "name", "needs_body")

    def __init__(self, cfg: RouteConfig, index: int) -> None:
        self.config = cfg
        self.name = cfg.path
        self._path = path_matcher(cfg.path)
        self._methods = frozenset(m.encode() for m in cfg.methods) if cfg.methods else None
        self._conds: list[tuple[str, str, Callable[[Any], bool]]] = []
        for key, want in (cfg.match or {}).items():
            kind, _, name = key.partition(".")
            self._conds.append((kind, name, _value_matcher(str(want))))
        self.needs_body = (cfg.pool is None and cfg.split is None) or any(
            kind == "body" for kind, _, _ in self._conds
        )

    def matches_path(self, path: str, method: bytes) -> bool:
        return self._path(path) and (self._methods is None or method in self._methods)

    def matches_conditions(
        self,
        headers: Callable[[str], str | None],
        body: Mapping[str, Any] | None,
        agent: Any,
        query: Callable[[str], str | None] | None = None,
    ) -> bool:
        """
        @param query: the request's query parameters by name (L{query_parameters});
            C{None} for none.
        """
        for kind, name, check in self._conds:
            if kind == "header":
                value = headers(name)
            elif kind == "query":
                value = query(name) if query is not None else None
            elif kind == "body":
                value = body.get(name) if isinstance(body, Mapping) else None
            elif kind == "agent":
                value = getattr(agent, name, None) if agent is not None else None
            else:
                value = None
            if not check(value):
                return False
        return True


def query_parameters(raw: bytes) -> Callable[[str], str | None]:
    """
    The query string C{raw} (without C{?}) as a lookup by name for C{query.NAME}
    conditions, parsed on first use: names and values are percent-decoded (C{+} is a
    space). A name given several times with different values has no value (matches
    nothing): a backend may read either one, so neither is believed.
    """
    parsed: dict[str, str | None] | None = None

    def lookup(name: str) -> str | None:
        nonlocal parsed
        if parsed is None:
            parsed = {}
            text = raw.decode("utf-8", "replace")
            for key, value in parse_qsl(text, keep_blank_values=True):
                if key in parsed and parsed[key] != value:
                    parsed[key] = None
                else:
                    parsed[key] = value
        return parsed.get(name)

    return lookup


class Router:
    """First-match route table, plus the model-to-pool index."""

    def __init__(self, config: Config) -> None:
        self.routes = [CompiledRoute(r, n) for n, r in enumerate(config.routes)]
        self.aliases = dict(config.models.aliases or {})
        self.fallbacks = dict(config.models.fallbacks or {})
        # Each model's chain for fallbacks_of, worked out once: its own, else
        # the first declared under an alias of it; aliases resolved, the
        # model itself and repeats left out.
        self._chains: dict[str, tuple[str, ...]] = {}
        for model, chain in self.fallbacks.items():
            self._chains[model] = self._resolved(model, chain)
        for alias, target in self.aliases.items():
            if alias in self.fallbacks and target not in self._chains:
                self._chains[target] = self._resolved(target, self.fallbacks[alias])
        self._pool_models = [
            (name, [_value_matcher(m) for m in p.models]) for name, p in config.pools.items()
        ]
        self.pools: Mapping[str, PoolConfig] = config.pools

    def candidates(self, path: str, method: bytes) -> list[CompiledRoute]:
        """Routes whose path and method match, in order (conditions still to check)."""
        return [r for r in self.routes if r.matches_path(path, method)]

    def resolve_model(self, model: str) -> str:
        return self.aliases.get(model, model)

    def pool_for_model(self, model: Any,
                       discovered: Mapping[str, Collection[str]] | None = None,
                       default: str | None = None) -> str:
        """
        The pool that serves C{model} (after aliases): the first pool whose
        C{models} globs match it, else the first whose instances reported it
        (C{discovered}), else C{default}, else the first C{openai} or
        C{ollama} pool whose models are unknown (none declared, none
        discovered): a backend such as LiteLLM that lists nothing may
        still serve it.

        @param discovered: the models each pool's instances reported, by pool.
        @param default: the pool to use when no pool names the model.
        @raise Rejected: 404 C{model_not_found}.
        """
        if not isinstance(model, str) or not model:
            raise bad_request("request body must name a 'model'", "model_required")
        model = self.resolve_model(model)
        for name, matchers in self._pool_models:
            if any(m(model) for m in matchers):
                return name
        discovered = discovered or {}
        for name, models in discovered.items():
            if model in models:
                return name
        if default is not None:
            return default
        for name, matchers in self._pool_models:
            if (not matchers and not discovered.get(name)
                    and self.pools[name].protocol in _MODEL_PROTOCOLS):
                return name
        raise Rejected(404, f"model {model!r} is not served here", "invalid_request_error",
                       "model_not_found")

    def fallbacks_of(self, model: str | None) -> tuple[str, ...]:
        """The models to try, in order, when C{model}'s pool fails (aliases resolved)."""
        return self._chains.get(model, ()) if model is not None else ()

    def _resolved(self, model: str, chain: Sequence[str]) -> tuple[str, ...]:
        out: dict[str, None] = {}
        for m in chain:
            m = self.resolve_model(m)
            if m != model:
                out[m] = None
        return tuple(out)

    def declared_models(self) -> list[str]:
        return list(self.model_owners())

    def model_owners(self, discovered: Mapping[str, Collection[str]] | None = None
                     ) -> dict[str, str]:
        """
        Every model name the gateway knows, with the pool that serves it:
        declared (the pools' C{models} that are not globs), aliases (owned by
        their target's pool, or C{clawproxy} when none is known), then the
        models the pools' instances reported (C{discovered}). The first
        owner of a name wins.
        """
        seen: dict[str, str] = {}
        for name, p in self.pools.items():
            for m in p.models:
                if not any(c in m for c in "*?[") and m not in seen:
                    seen[m] = name
        for alias, target in self.aliases.items():
            if alias not in seen:
                try:
                    seen[alias] = self.pool_for_model(target, discovered)
                except Rejected:
                    seen[alias] = "clawproxy"
        for name, models in (discovered or {}).items():
            for m in sorted(models):
                seen.setdefault(m, name)
        return seen


def sticky_split(split: Mapping[str, float], key: str) -> str:
    """Choose a pool of C{split} by weight, the same one for the same key."""
    items: Sequence[tuple[str, float]] = list(split.items())
    total = sum(w for _, w in items)
    point = (zlib.crc32(key.encode("utf-8", "surrogateescape")) / 0xFFFFFFFF) * total
    acc = 0.0
    for name, weight in items:
        acc += weight
        if point < acc:
            return name
    return items[-1][0]
