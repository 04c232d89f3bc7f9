"""
C{${VAR}} substitution from the environment, and the per-request variables of
C{routes[].transforms}.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from clawproxy.config.fields import EnvStr

#: Per-request variables usable as C{${NAME}} in C{routes[].transforms} values.
REQUEST_VARIABLES = frozenset({"request_id", "agent", "client_ip", "route", "pool", "instance"})

_VARIABLE = re.compile(r"\$\$\{|\$\{([^{}]*)\}|\$\{")
_REFERENCE = re.compile(r"(env:)?([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_REQUEST_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

Report = Callable[[str, str], None]


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


def substitute_tree(environ: Mapping[str, str], error: Report, data: object) -> object:
    """
    A copy of C{data} with C{${VAR}} replaced in every string; in C{routes[].transforms}
    only C{${env:VAR}} (the rest are request variables, checked here, expanded later).
    Substituted strings are L{EnvStr}s, so numbers and booleans may be parsed from them.
    """
    if not isinstance(data, dict):
        return _substitute(environ, error, "", data, False)
    result = {}
    for key, value in data.items():
        if key == "routes" and isinstance(value, list):
            routes = []
            for index, route in enumerate(value):
                path = f"routes[{index}]"
                if isinstance(route, dict):
                    route = {
                        k: _substitute(environ, error, f"{path}.{k}", v, k == "transforms")
                        for k, v in route.items()
                    }
                else:
                    route = _substitute(environ, error, path, route, False)
                routes.append(route)
            result[key] = routes
        else:
            result[key] = _substitute(environ, error, str(key), value, False)
    return result


def _substitute(environ: Mapping[str, str], error: Report, path: str, value: object,
                transforms: bool) -> object:
    if isinstance(value, dict):
        return {k: _substitute(environ, error, f"{path}.{k}", v, transforms)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(environ, error, f"{path}[{i}]", v, transforms)
                for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        if text == "$${":
            return text if transforms else "${"
        reference = _REFERENCE.fullmatch(match.group(1) or "") if match.group(1) else None
        if reference is None:
            error(path, f"invalid variable reference {text!r}")
            return text
        is_env, name, default = reference.groups()
        if transforms and not is_env:
            if default is not None:
                error(path, f"request variable ${{{name}}} cannot have a default")
            elif name not in REQUEST_VARIABLES:
                error(
                    path,
                    f"unknown request variable ${{{name}}} (use one of"
                    f" {', '.join(sorted(REQUEST_VARIABLES))}, or ${{env:NAME}})",
                )
            return text
        if name in environ:
            return environ[name]
        if default is None:
            error(path, f"environment variable {name} is not set")
            return ""
        return default

    return EnvStr(_VARIABLE.sub(replace, value))
