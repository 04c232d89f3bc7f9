"""
The one generic reader: builds a L{Config} from YAML data by walking the attrs fields of
L{clawproxy.config.model}.

Validation never stops at the first problem: every error is collected with the path of
the key it concerns (C{pools.main.instances[2].weight: must be >= 0}) and raised at once
as one L{ConfigError}. Keys nobody declared are errors; keys declared L{NotYet} are
refused. Nothing outside this package sees the raw dictionaries.

A small walker rather than cattrs: the errors must keep their wording, their order (the
order of the declaration) and their paths, a section of the wrong type must give one
error and not one per key inside it, and some defaults depend on the parent (an
instance's id on its pool's name, the health check path on the pool's protocol); each
of these would be a custom hook in cattrs, around exception groups to re-format.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import attrs
import yaml

from clawproxy.config.fields import Bad, ConfigError, EnvStr, Spec, spec_of
from clawproxy.config.model import Config
from clawproxy.config.variables import substitute_tree

#: What a spec's reader returns for an absent or invalid value: the default applies.
_ABSENT: Any = object()


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
    return read_config(data, environ, base_dir)


def read_config(data: object, environ: Mapping[str, str] | None = None, base_dir: str = ".",
                refuse: bool = True) -> Config:
    """
    L{parse_config}, with the refusal of keys not supported yet optional: C{refuse=False}
    lets tests check how such keys are read before their feature is built.
    """
    reader = Reader(os.environ if environ is None else environ, base_dir, refuse)
    data = substitute_tree(reader.environ, reader.error, data)
    if data is not None and not isinstance(data, dict):
        reader.error("", "must be a mapping")
        data = {}
    config = reader.read(Config, "", data or {}, {})
    check_references(reader.error, config)
    if reader.errors:
        raise ConfigError(reader.errors)
    return config


def _value(value: object) -> object:
    """An empty string from the environment counts as absent."""
    if isinstance(value, EnvStr) and value == "":
        return None
    return value


def _at(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


@functools.cache
def _declared(cls: type) -> tuple[tuple[tuple[attrs.Attribute, Spec, str], ...], frozenset[str]]:
    """
    The fields of C{cls} the reader fills, each with its spec and YAML key, in the order
    of the declaration; and the keys a mapping for C{cls} may hold. Once per class.
    """
    fields = tuple((field, spec, spec.key or field.name) for field in attrs.fields(cls)
                   if (spec := spec_of(field)) is not None and spec.kind != "internal")
    return fields, frozenset(key for _, spec, key in fields if spec.kind != "key")


class Reader:
    """
    Reads mappings into the attrs classes of the declaration, collecting errors.

    @ivar errors: every problem found so far, as C{"path: message"}.
    """

    def __init__(self, environ: Mapping[str, str], base_dir: str, refuse: bool = True) -> None:
        self.environ = environ
        self.base_dir = base_dir
        self.refuse = refuse
        self.errors: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path or '(top level)'}: {message}")

    def resolve(self, path: str) -> str:
        """Make a file path absolute, relative to the configuration's directory."""
        path = os.path.expanduser(path)
        return os.path.normpath(os.path.join(os.path.abspath(self.base_dir), path))

    isfile = staticmethod(os.path.isfile)

    def read(self, cls: type, path: str, data: dict[Any, Any], given: dict[str, Any]) -> Any:
        """
        Build C{cls} from the mapping C{data} at C{path}.

        @param given: values for fields that come from the parent (an entry's name, a
            default that depends on the parent); a key written in C{data} wins.
        """
        values: dict[str, Any] = {}
        present: set[str] = set()
        fields, keys = _declared(cls)
        for field, spec, key in fields:
            if spec.kind == "key":
                values[field.name] = given[field.name]
                continue
            raw = _value(data.get(key))
            written = raw is not None or (spec.null_enables and key in data)
            if written:
                present.add(key)
            where = _at(path, key)
            not_yet = spec.not_yet if self.refuse and written else None
            if not_yet is not None and not_yet.when is None:
                self.error(where, not_yet.message)
            value = self._field(spec, where, raw, written, values)
            if value is _ABSENT:
                if field.name in given:
                    values[field.name] = given[field.name]
                elif field.default is attrs.NOTHING:
                    values[field.name] = spec.placeholder
                continue
            if not_yet is not None and not_yet.when is not None and not_yet.when(value):
                self.error(where, not_yet.message)
            values[field.name] = value
        for key in data:
            if key not in keys:
                self.error(_at(path, key), "unknown key")
        result = cls(**values)
        check = getattr(result, "_check", None)
        if check is not None:
            result = check(present, lambda key, message: self.error(_at(path, key), message))
        return result

    def _field(self, spec: Spec, path: str, raw: Any, written: bool,
               parent: dict[str, Any]) -> Any:
        if spec.kind == "section":
            return self._section(spec, path, raw, written, parent)
        if raw is None:
            if spec.required:
                self.error(path, spec.required)
            return _ABSENT
        if spec.kind == "value":
            return self._scalar(spec, path, raw)
        if spec.kind == "entries":
            return self._entries(spec, path, raw)
        return self._items(spec, path, raw, parent)

    def _scalar(self, spec: Spec, path: str, raw: Any) -> Any:
        try:
            value = spec.conv(raw)
            if spec.resolve is not None and value is not None:
                value = spec.resolve(self, value)
        except Bad as e:
            for suffix, message in e.problems:
                self.error(path + suffix, message)
            return _ABSENT
        return _ABSENT if value is None else value

    def _section(self, spec: Spec, path: str, raw: Any, written: bool,
                 parent: dict[str, Any]) -> Any:
        if raw is None and spec.optional and not written:
            return _ABSENT
        if raw is not None and not isinstance(raw, dict):
            self.error(path, "must be a mapping")
            return _ABSENT
        given = spec.given(parent, None) if spec.given else {}
        return self.read(spec.cls, path, raw or {}, given)

    def _entries(self, spec: Spec, path: str, raw: Any) -> Any:
        if not isinstance(raw, dict):
            self.error(path, "must be a mapping")
            return _ABSENT
        if not raw and spec.empty:
            self.error(path, spec.empty)
        result = {}
        for raw_name, value in raw.items():
            try:
                name = spec.conv(raw_name)
            except Bad as e:
                self.error(_at(path, raw_name), e.problems[0][1])
                continue
            where = _at(path, name)
            value = _value(value)
            if value is not None and not isinstance(value, dict):
                self.error(where, "must be a mapping")
                continue
            # The name fills the class's entry_name field, if it has one.
            result[name] = self.read(spec.cls, where, value or {}, {"name": name})
        return result

    def _items(self, spec: Spec, path: str, raw: Any, parent: dict[str, Any]) -> Any:
        if not isinstance(raw, list):
            self.error(path, "must be a list")
            return _ABSENT
        if not raw and spec.empty:
            self.error(path, spec.empty)
        result = []
        for index, item in enumerate(raw):
            where = f"{path}[{index}]"
            item = spec.shorthand(item) if spec.shorthand else item
            item = _value(item)
            if item is not None and not isinstance(item, dict):
                self.error(where, "must be a mapping")
                continue
            given = spec.given(parent, index) if spec.given else {}
            result.append(self.read(spec.cls, where, item or {}, given))
        return tuple(result)


def check_references(error: Any, config: Config) -> None:
    """Check names that point elsewhere, and uniqueness across sections."""
    owners: dict[str, str] = {}
    for pool in config.pools.values():
        if pool.fallback is not None and pool.fallback not in config.fallbacks:
            error(f"pools.{pool.name}.fallback", f"no fallback named {pool.fallback!r}")
        for index, instance in enumerate(pool.instances):
            if instance.id in owners:
                error(
                    f"pools.{pool.name}.instances[{index}].id",
                    f"duplicate instance id {instance.id!r} (also in pool {owners[instance.id]})",
                )
            owners.setdefault(instance.id, pool.name)

    key_owners: dict[str, str] = {}
    for agent in config.agents.values():
        for index, key in enumerate(agent.keys):
            if key in key_owners and key_owners[key] != agent.name:
                error(
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
            error(f"{path}.pool", f"no pool named {route.pool!r}")
        for name in route.split or ():
            if name not in config.pools:
                error(f"{path}.split.{name}", f"no pool named {name!r}")
        if route.fallback is not None and route.fallback not in config.fallbacks:
            error(f"{path}.fallback", f"no fallback named {route.fallback!r}")
        if route.auth_required and not has_auth:
            error(
                f"{path}.auth_required",
                "needs authentication configured (an auth section or agents with keys)",
            )
        if agents_known:
            for i, name in enumerate(route.allowed_agents or ()):
                if name not in config.agents:
                    error(f"{path}.allowed_agents[{i}]", f"no agent named {name!r}")

    sim_ids: set[str] = set()
    for index, sim in enumerate(config.simulators):
        if sim.id in sim_ids:
            error(f"simulators[{index}].id", f"duplicate simulator id {sim.id!r}")
        sim_ids.add(sim.id)
