"""
Cache keys: which request parts name a cached answer, as one hash.

Pure: no reactor, no I/O. A key is the SHA-256 of canonical JSON (sorted
object keys, no whitespace, so neither key order nor spacing in the request
changes it) over the route, the method, the path, whether the answer is a
stream, the agent scope, and the route's C{key} fields.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

#: What a C{key} field may name: C{body.A.B} (a member of the JSON body,
#: dotted for nesting), C{header.NAME}, C{query.NAME}; or C{body} (the
#: whole body).
KEY_PREFIXES = ("body.", "header.", "query.")

_MISSING = None


def check_key_field(field: str) -> str | None:
    """
    @return: what is wrong with one C{routes[].cache.key} entry, or L{None}.
    """
    if field == "body":
        return None
    prefix = next((p for p in KEY_PREFIXES if field.startswith(p)), None)
    if prefix is None or len(field) == len(prefix):
        return "cache key fields look like body, body.NAME, header.NAME or query.NAME"
    return None


def canonical(value: Any) -> str:
    """C{value} as canonical JSON: sorted keys, no whitespace, UTF-8 kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _body_member(body: Mapping[str, Any] | None, dotted: str) -> Any:
    value: Any = body
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return _MISSING
        value = value.get(part, _MISSING)
    return value


def key_parts(fields: Sequence[str], body: Mapping[str, Any] | None,
              header: Callable[[str], str | None],
              query: Callable[[str], str | None]) -> list[Any]:
    """
    The values the C{key} fields name, in order (absent ones as L{None}).
    With no fields, the whole body.

    @param header: a request header's last value by name (case-insensitive).
    @param query: a query argument's last value by name.
    """
    if not fields:
        return [body]
    out: list[Any] = []
    for field in fields:
        if field == "body":
            out.append(body)
        elif field.startswith("body."):
            out.append(_body_member(body, field[5:]))
        elif field.startswith("header."):
            out.append(header(field[7:]))
        else:
            out.append(query(field[6:]))
    return out


def scope_of(agent: str | None, client_ip: str, shared: bool) -> str:
    """
    Whose answers a key may return: everyone's on a C{shared} route, else
    the agent's own (C{agent:NAME}), or an anonymous client's own
    (C{ip:ADDRESS}).
    """
    if shared:
        return "*"
    if agent is not None:
        return "agent:" + agent
    return "ip:" + client_ip


def cache_key(route: str, method: str, path: str, stream: bool, scope: str,
              parts: Sequence[Any]) -> str:
    """The key (hex SHA-256) of one request's cached answer."""
    doc = canonical([route, method, path, stream, scope, list(parts)])
    return hashlib.sha256(doc.encode("utf-8")).hexdigest()
