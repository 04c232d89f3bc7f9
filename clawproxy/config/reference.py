"""
The configuration reference, generated from the one declaration.

C{python3 -m clawproxy.config.reference > docs/configuration.rst} writes it; a test
regenerates it and compares it with the committed file, so the two cannot drift.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator

import attrs

from clawproxy.config.fields import (
    NotYet,
    Spec,
    existing_file,
    pem_or_file,
    spec_of,
    type_doc,
)
from clawproxy.config.model import Config

#: C{C{text}} in a docstring (one level of nested braces, as in C{C{${agent}}}).
_EPYTEXT_CODE = re.compile(r"C\{((?:[^{}]|\{[^{}]*\})*)\}")

ISSUES = {8: "protection", 9: "resilience and caching", 10: "LLM-native",
          11: "operations and scale-out"}

INTRO = """\
=======================
Configuration reference
=======================

.. This file is generated from clawproxy/config/model.py by
   ``python3 -m clawproxy.config.reference > docs/configuration.rst``; do not edit it.
   A test fails when it differs from what the declaration generates.

clawproxy reads one YAML file (``twistd clawproxy -c FILE``; check one with
``clawproxy check-config FILE``). Only ``pools`` and ``routes`` are required.

Values
======

* Durations: ``500ms``, ``10s``, ``5m``, ``2h``, ``1d``, or a number of seconds.
* Rates: ``100/minute``, ``15/min``, ``10/s``, ``5000/second``, ``1000/hour``.
* Sizes: ``10MB``, ``512KB``, ``1GB``, or a number of bytes (K = 1024).
* ``${VAR}`` and ``${VAR:-default}`` are replaced from the environment in every string
  (``$${`` writes a literal ``${``); a missing ``VAR`` without a default is an error. A value
  that comes out empty counts as absent, so the default applies. Numbers and booleans may
  come from the environment.
* Inside ``routes[].transforms`` values, ``${NAME}`` is a per-request variable
  (``request_id``, ``agent``, ``client_ip``, ``route``, ``pool``, ``instance``) and
  ``${env:NAME}`` reads the environment at load.
* Relative file paths are resolved against the configuration file's directory.

Errors
======

Unknown keys, wrong types and impossible values are errors reported together, each with
its path (``pools.main.instances[2].weight: must be >= 0``); the gateway refuses to start
on any error. Every key is either enforced or refused: a key this version cannot honour
yet is refused at load (``rate_limits: not supported by this version yet``) rather than
accepted and ignored. Such keys are marked **refused** below, with the issue that will
build them.

TLS
===

TLS listeners are ``server.tls`` (certificate and key files, minimum version, HTTP/2 by
ALPN); ``server.listen`` serves plain HTTP/1.1 and h2c. Towards backends, an
``https://`` instance URL is verified against the system's trust store, with its URL's
host name; ``pools.NAME.tls`` (a private CA, no verification, client certificates) is
refused until it is built. Both sections are listed in full below.
"""


Fields = list[tuple[str, attrs.Attribute, Spec]]


def walk(cls: type = Config, path: str = "") -> Iterator[tuple[str, type, Fields]]:
    """Each section, depth first: its path, its class and its documented fields."""
    fields: Fields = []
    nested: list[tuple[str, type]] = []
    for field in attrs.fields(cls):
        spec = spec_of(field)
        if spec is None or spec.kind in ("internal", "key"):
            continue
        key = spec.key or field.name
        fields.append((key, field, spec))
        suffix = {"section": "", "entries": ".NAME", "items": "[]"}.get(spec.kind)
        if suffix is not None:
            nested.append((_join(path, key) + suffix, spec.cls))
    yield path, cls, fields
    for sub_path, sub_cls in nested:
        yield from walk(sub_cls, sub_path)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def refused_keys() -> Iterator[tuple[str, NotYet]]:
    """Every key refused by this version, with its flag."""
    for path, _, fields in walk():
        for key, _, spec in fields:
            if spec.not_yet is not None:
                yield _join(path, key), spec.not_yet


def _default(field: attrs.Attribute, spec: Spec) -> str:
    if spec.shown is not None:
        return spec.shown
    default = field.default
    if spec.required:
        return "required"
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        if spec.kind == "section":
            return ""
        default = default.factory()
    if default is attrs.NOTHING:
        return ""
    return _yaml(default)


def _yaml(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list, frozenset)):
        items = sorted(value) if isinstance(value, frozenset) else value
        return "[" + ", ".join(_yaml(v) for v in items) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if value == "":
        return '""'
    return str(value)


def _kind(path: str, key: str, spec: Spec) -> str:
    if spec.kind == "section":
        return f"section, see `{_join(path, key)}`_"
    if spec.kind == "entries":
        return f"mapping of names to sections, see `{_join(path, key)}.NAME`_"
    if spec.kind == "items":
        return f"list of sections, see `{_join(path, key)}[]`_"
    if spec.resolve is existing_file:
        return "path of an existing file"
    if spec.resolve is pem_or_file:
        return "PEM text, or the path of an existing PEM file"
    return type_doc(spec.conv)


def _refusal(flag: NotYet) -> str:
    what = f"issue {flag.issue} ({ISSUES.get(flag.issue, '')})"
    if flag.when is None:
        return f"**Refused** by this version: {what} builds it."
    return f"**Refused** when {flag.values} by this version: {what} builds it."


def render() -> str:
    """The whole reference, as reStructuredText."""
    out = [INTRO]
    for path, cls, fields in walk():
        title = path or "Top level"
        doc = _EPYTEXT_CODE.sub(r"``\1``", " ".join((cls.__doc__ or "").split()))
        if cls is Config:
            doc = "The sections of the file."
        out += ["", title, "=" * len(title), ""]
        if doc:
            out += [doc, ""]
        for key, field, spec in fields:
            out.append(f"``{_join(path, key)}``")
            facts = _kind(path, key, spec)
            default = _default(field, spec)
            if default:
                facts += f". Default: ``{default}``" if default != "required" else ". Required"
            out.append(f"    {facts}.")
            out.append("")
            if spec.doc:
                out += [f"    {spec.doc}", ""]
            if spec.not_yet is not None:
                out += [f"    {_refusal(spec.not_yet)}", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
