"""
The vocabulary of the configuration declaration: converters and field specs.

A converter turns a raw YAML value into a result or raises L{Bad}; each carries a
C{type_doc} for the generated reference. A field spec (L{setting}, L{section},
L{entries}, L{items}) is an C{attrs.field} whose metadata tells the generic reader
(L{clawproxy.config.reader}) how to read the key, and the reference
(L{clawproxy.config.reference}) how to document it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs

from clawproxy.units import parse_duration, parse_rate, parse_size

T = TypeVar("T")
Converter = Callable[[Any], Any]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The metadata key under which a field's L{Spec} is stored.
SPEC = "clawproxy.config"

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")
MATCH_PREFIXES = ("header.", "query.", "body.", "agent.")
ENDPOINT_TYPES = ("tcp", "tcp6", "ssl", "unix", "systemd")

_STORED_KEY = re.compile(r"sha256:[0-9a-fA-F]{64}")


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


class EnvStr(str):
    """A string that came from C{${VAR}} substitution: numbers and booleans may be parsed."""


class Bad(Exception):
    """
    A value is invalid.

    @ivar problems: C{(path suffix, message)} pairs, e.g. C{("[2]", "must be a string")}.
    """

    def __init__(self, *problems: tuple[str, str]) -> None:
        self.problems = problems


def bad(message: str) -> Bad:
    return Bad(("", message))


def hash_key(key: str) -> str:
    """
    The stored form of an API key, as printed by C{clawproxy hash-key}.

    @return: C{"sha256:"} followed by the lowercase hex SHA-256 of the UTF-8 key.
    """
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


# -- field specs ---------------------------------------------------------------------------


@attrs.frozen
class NotYet:
    """
    A key the gateway cannot honour yet: refused at load, so that every key is either
    enforced or refused. The feature issue that builds it removes the flag.

    @ivar issue: the issue that will build it.
    @ivar when: refuse only values for which this is true (C{None}: any value).
    @ivar message: the error shown after the key's path.
    @ivar values: for the reference, which values are refused (with C{when}).
    """

    issue: int
    when: Callable[[Any], bool] | None = None
    message: str = "not supported by this version yet"
    values: str = ""


def _required(required: str | bool) -> str | bool:
    """C{True} means the plain message C{required}; a string is the message itself."""
    return "required" if required is True else required


@attrs.frozen
class Spec:
    """
    How the reader reads one field and the reference documents it.

    @ivar kind: C{value}, C{section}, C{entries}, C{items}, C{key} (the name of an
        entry, from its key) or C{internal} (not read from the file).
    @ivar conv: for values, the converter; for entries, the converter of names.
    @ivar cls: for sections, entries and items, the class of each.
    @ivar required: C{False}, or the message for an absent key (C{True} is made
        C{"required"}).
    @ivar empty: for entries and items, the message for an empty mapping or list.
    @ivar placeholder: the value used to build the object when the key is absent or
        invalid and the field has no default (an error has been reported).
    @ivar resolve: turns a converted value into its final form with the reader's
        context (file paths); raises L{Bad}.
    @ivar given: values for the nested objects' fields that depend on the parent:
        C{given(parent_values, index_or_name) -> dict}.
    @ivar null_enables: a section written with no settings (C{api_key:}) is on, with
        its defaults.
    @ivar shorthand: for items, turns a non-mapping item into a mapping.
    @ivar shown: the default as the reference shows it (else derived from the default).
    """

    kind: str
    doc: str = ""
    key: str | None = None
    conv: Converter | None = None
    cls: type | None = None
    required: str | bool = attrs.field(default=False, converter=_required)
    empty: str | None = None
    placeholder: Any = None
    resolve: Callable[[Any, Any], Any] | None = None
    given: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None
    null_enables: bool = False
    shorthand: Callable[[Any], Any] | None = None
    not_yet: NotYet | None = None
    shown: str | None = None
    optional: bool = False


def _field(spec: Spec, default: Any, factory: Any) -> Any:
    kwargs: dict[str, Any] = {"metadata": {SPEC: spec}}
    if factory is not None:
        kwargs["factory"] = factory
    elif default is not attrs.NOTHING:
        kwargs["default"] = default
    return attrs.field(**kwargs)


def setting(conv: Converter, default: Any = attrs.NOTHING, doc: str = "", *,
            factory: Any = None, key: str | None = None, required: bool = False,
            placeholder: Any = None, resolve: Any = None, not_yet: NotYet | None = None,
            shown: str | None = None) -> Any:
    """A scalar, list or plain mapping, converted by C{conv}."""
    spec = Spec("value", doc, key, conv, required=required,
                placeholder=placeholder, resolve=resolve, not_yet=not_yet, shown=shown)
    return _field(spec, default, factory)


def section(cls: type, doc: str = "", *, optional: bool = False, null_enables: bool = False,
            given: Any = None, not_yet: NotYet | None = None) -> Any:
    """
    A nested mapping read into C{cls}. An optional section is C{None} unless written;
    any other is always read (from an empty mapping when absent), so its defaults apply.
    """
    spec = Spec("section", doc, cls=cls, null_enables=null_enables, given=given,
                not_yet=not_yet, optional=optional)
    return _field(spec, None, None) if optional else _field(spec, attrs.NOTHING, cls)


def entries(cls: type, doc: str = "", *, name: Converter | None = None,
            required: str | bool = False, empty: str | None = None,
            not_yet: NotYet | None = None) -> Any:
    """A mapping of names to C{cls} mappings (each pool of C{pools})."""
    spec = Spec("entries", doc, conv=name or name_text, cls=cls, required=required,
                empty=empty, not_yet=not_yet)
    return _field(spec, attrs.NOTHING, dict)


def items(cls: type, doc: str = "", *, shorthand: Any = None, given: Any = None,
          required: str | bool = False, empty: str | None = None) -> Any:
    """A list of C{cls} mappings (each route of C{routes})."""
    spec = Spec("items", doc, cls=cls, shorthand=shorthand, given=given, required=required,
                empty=empty)
    return _field(spec, (), None)


def entry_name(doc: str = "the entry's name (its key)") -> Any:
    """A field holding the name of an entry of L{entries}: its key, not a setting."""
    return attrs.field(metadata={SPEC: Spec("key", doc)})


def internal(default: Any = None) -> Any:
    """A field that is not read from the file."""
    return attrs.field(default=default, metadata={SPEC: Spec("internal")})


def spec_of(field: attrs.Attribute) -> Spec | None:
    return field.metadata.get(SPEC)


# -- converters: value -> result, or raise Bad ---------------------------------------------


def typed(type_doc: str) -> Callable[[T], T]:
    """Attach the reference's description of the accepted values to a converter."""

    def mark(conv: T) -> T:
        conv.type_doc = type_doc  # type: ignore[attr-defined]
        return conv

    return mark


def type_doc(conv: Converter | None) -> str:
    return getattr(conv, "type_doc", "")


@typed("string")
def text(value: object) -> str:
    if not isinstance(value, str):
        raise bad("must be a string")
    return str(value)


@typed("non-empty string")
def nonempty(value: object) -> str:
    result = text(value)
    if not result:
        raise bad("must not be empty")
    return result


@typed("string (empty means none)")
def optional_text(value: object) -> str | None:
    return text(value) or None


@typed("boolean")
def boolean(value: object) -> bool:
    if isinstance(value, EnvStr):
        lowered = value.strip().lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
    if not isinstance(value, bool):
        raise bad("must be a boolean (true or false)")
    return value


def _env_number(value: object, kind: type) -> object:
    if isinstance(value, EnvStr):
        try:
            return kind(value.strip())
        except ValueError:
            pass
    return value


def _bounds(number: float, low: float | None, high: float | None, above: float | None) -> None:
    if above is not None and not number > above:
        raise bad(f"must be > {above:g}")
    if low is not None and number < low:
        raise bad(f"must be >= {low:g}")
    if high is not None and number > high:
        raise bad(f"must be <= {high:g}")


def _range_doc(kind: str, low: Any, high: Any, above: Any) -> str:
    parts = [kind]
    if above is not None:
        parts.append(f"> {above:g}")
    if low is not None:
        parts.append(f">= {low:g}")
    if high is not None:
        parts.append(f"<= {high:g}")
    return " ".join(parts[:1]) + (" " + ", ".join(parts[1:]) if parts[1:] else "")


def integer(low: int | None = None, high: int | None = None) -> Converter:
    @typed(_range_doc("integer", low, high, None))
    def conv(value: object) -> int:
        value = _env_number(value, int)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("must be an integer")
        _bounds(value, low, high, None)
        return value

    return conv


@typed("integer >= 1, or ``auto`` (the number of cores)")
def process_count(value: object) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    return integer(low=1)(value)


def number(low: float | None = None, high: float | None = None,
           above: float | None = None) -> Converter:
    @typed(_range_doc("number", low, high, above))
    def conv(value: object) -> float:
        value = _env_number(value, float)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("must be a number")
        if not math.isfinite(value):
            raise bad("must be a finite number")
        _bounds(value, low, high, above)
        return float(value)

    return conv


def choice(*choices: str) -> Converter:
    @typed("one of " + ", ".join(f"``{c}``" for c in choices))
    def conv(value: object) -> str:
        result = text(value)
        if result not in choices:
            raise bad(f"must be one of {', '.join(choices)}")
        return result

    return conv


def _unit(parse: Callable[[object], T]) -> Callable[[object], T]:
    """A converter from a parser of L{clawproxy.units}: its C{ValueError} becomes L{Bad}."""

    def conv(value: object) -> T:
        try:
            return parse(value)
        except ValueError as e:
            raise bad(str(e)) from None

    return conv


_seconds = _unit(parse_duration)
rate = typed("rate (``100/minute``, ``10/s``, ``1000/hour``)")(_unit(parse_rate))
size = typed("size (``10MB``, ``512KB``, ``1GB`` or bytes)")(_unit(parse_size))


def duration(above: float | None = None) -> Converter:
    @typed("duration (``500ms``, ``10s``, ``5m``, ``2h``, ``1d`` or seconds)"
           + (f", > {above:g}" if above is not None else ""))
    def conv(value: object) -> float:
        seconds = _seconds(value)
        if above is not None and not seconds > above:
            raise bad(f"must be > {above:g}")
        return seconds

    return conv


def at_least_size(low: int, message: str) -> Converter:
    @typed(f"size (``10MB``, ``512KB`` or bytes), {message}")
    def conv(value: object) -> int:
        result = size(value)
        if result < low:
            raise bad(message)
        return result

    return conv


def list_of(conv: Converter, allow_empty: bool = True) -> Converter:
    """A converter for a list whose items go through C{conv} (errors carry the index)."""

    @typed(("non-empty " if not allow_empty else "") + f"list of {type_doc(conv)}")
    def convert(value: object) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise bad("must be a list")
        if not value and not allow_empty:
            raise bad("must not be empty")
        result, problems = [], []
        for index, item in enumerate(value):
            try:
                result.append(conv(item))
            except Bad as e:
                problems.extend((f"[{index}]{suffix}", msg) for suffix, msg in e.problems)
        if problems:
            raise Bad(*problems)
        return tuple(result)

    return convert


def one_or_more(conv: Converter) -> Converter:
    """A non-empty list of items for C{conv}; a single string counts as a list of one."""
    listed = list_of(conv, allow_empty=False)

    @typed(f"{type_doc(conv)}, or a non-empty list of them")
    def convert(value: object) -> tuple[Any, ...]:
        return listed([value] if isinstance(value, str) else value)

    return convert


def set_of(conv: Converter) -> Converter:
    listed = list_of(conv)

    @typed(type_doc(listed))
    def convert(value: object) -> frozenset[Any]:
        return frozenset(listed(value))

    return convert


def map_of(conv: Converter, key: Converter = text, allow_empty: bool = True,
           empty: str = "must not be empty") -> Converter:
    """A converter for a mapping whose keys go through C{key} and values through C{conv}."""

    @typed(f"mapping of {type_doc(key) or 'string'} to {type_doc(conv)}")
    def convert(value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise bad("must be a mapping")
        if not value and not allow_empty:
            raise bad(empty)
        result, problems = {}, []
        for name, item in value.items():
            try:
                name = key(name)
                result[name] = conv(item)
            except Bad as e:
                problems.extend((f".{name}{suffix}", msg) for suffix, msg in e.problems)
        if problems:
            raise Bad(*problems)
        return result

    return convert


@typed("string (numbers and booleans as YAML writes them)")
def scalar_text(value: object) -> str:
    """A string, with numbers and booleans as YAML would write them (for match values)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return text(value)


def _matching(pattern: str, message: str) -> Callable[[object], str]:
    """A converter for a string that must match C{pattern} (else C{message})."""
    regex = re.compile(pattern)

    def conv(value: object) -> str:
        result = text(value)
        if not regex.fullmatch(result):
            raise bad(message)
        return result

    return conv


header_name = typed("header name")(
    _matching(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", "invalid header name"))


@typed("header value")
def header_value(value: object) -> str:
    result = scalar_text(value)
    if any(c in result for c in "\r\n\0"):
        raise bad("header values must not contain CR, LF or NUL")
    return result


headers = map_of(header_value, header_name)


@typed("URL path starting with ``/``")
def url_path(value: object) -> str:
    path = text(value)
    if not path.startswith("/"):
        raise bad("must start with /")
    return path


@typed("``\"\"`` or a path starting with ``/`` (a trailing ``/`` is dropped)")
def base_path(value: object) -> str:
    path = text(value)
    if path and not path.startswith("/"):
        raise bad("must be empty or start with /")
    return path.rstrip("/")


@typed("Twisted endpoint string (``tcp:8080:interface=127.0.0.1``, ``unix:/path``)")
def endpoint(value: object) -> str:
    """A Twisted server endpoint string such as C{tcp:8080:interface=127.0.0.1}."""
    result = nonempty(value)
    kind, _, rest = result.partition(":")
    if kind not in ENDPOINT_TYPES:
        raise bad(f"must be an endpoint string such as tcp:8080 ({', '.join(ENDPOINT_TYPES)})")
    if kind in ("tcp", "tcp6", "ssl"):
        args = [a for a in re.split(r"(?<!\\):", rest) if a]
        port = next((a for a in args if "=" not in a), None)
        if port is None:
            port = next((a[5:] for a in args if a.startswith("port=")), "")
        if not port.isdigit() or int(port) > 65535:
            raise bad(f"{kind} endpoint needs a port number 0-65535")
    elif not rest:
        raise bad(f"{kind} endpoint needs an address")
    return result


@typed("``ssl:PORT[:interface=ADDR]``")
def tls_endpoint(value: object) -> str:
    result = text(value)
    if not re.fullmatch(r"ssl:\d{1,5}(:.*)?", result) or int(result.split(":")[1]) > 65535:
        raise bad("must be an endpoint string such as ssl:8443 or ssl:8443:interface=0.0.0.0")
    return result


@typed("``http://`` or ``https://`` URL (a trailing ``/`` is dropped)")
def instance_url(value: object) -> str:
    url = text(value).strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise bad("must be a valid http:// or https:// URL") from None
    if parts.scheme not in ("http", "https"):
        raise bad("must be an http:// or https:// URL")
    if not parts.hostname:
        raise bad("must name a host")
    if parts.query or parts.fragment:
        raise bad("must not have a query or fragment")
    if port == 0:
        raise bad("port must not be 0")
    return url.rstrip("/")


@typed("``redis://``, ``rediss://`` or ``unix://`` URL")
def redis_url(value: object) -> str:
    url = text(value)
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise bad("must be a redis://, rediss:// or unix:// URL")
    return url


@typed("IP address or CIDR")
def network(value: object) -> IPNetwork:
    try:
        return ipaddress.ip_network(text(value), strict=False)
    except ValueError:
        raise bad("must be an IP address or CIDR such as 10.0.0.0/8") from None


@typed("stored key ``sha256:<64 hex digits>`` (``clawproxy hash-key KEY``)")
def stored_key(value: object) -> str:
    if not isinstance(value, str) or not _STORED_KEY.fullmatch(value):
        raise bad(
            "must be a stored key (sha256:<64 hex digits>); plain keys are not accepted,"
            " use `clawproxy hash-key KEY` to make one"
        )
    return value.lower()


@typed("HTTP method (upper-cased)")
def method(value: object) -> str:
    result = text(value).upper()
    if result not in METHODS:
        raise bad(f"must be one of {', '.join(METHODS)}")
    return result


@typed("``header.NAME``, ``query.NAME``, ``body.NAME`` or ``agent.NAME``")
def match_key(value: object) -> str:
    key = text(value)
    prefix = next((p for p in MATCH_PREFIXES if key.startswith(p)), None)
    if prefix is None or len(key) == len(prefix):
        raise bad(f"match keys must look like {', '.join(p + 'NAME' for p in MATCH_PREFIXES)}")
    return key


name_text = typed("name (letters, digits and ``_ . : @ -``)")(
    _matching(r"[A-Za-z0-9_][A-Za-z0-9_.:@-]*",
              "invalid name (letters, digits and _ . : @ - only)"))


@typed("string, or a mapping or list (written out as JSON)")
def fallback_body(value: object) -> str:
    """A string, or a mapping or list written out as JSON."""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return text(value)


@typed("``-`` (standard output), ``off``, or a file path")
def log_output(value: object) -> str:
    """C{-}, C{off} (YAML's unquoted C{off} arrives as false) or a file path."""
    if value is False:
        return "off"
    return nonempty(value)


@typed("one of ``debug``, ``info``, ``warn`` (or ``warning``), ``error``")
def log_level(value: object) -> str:
    level = choice("debug", "info", "warn", "warning", "error")(value)
    return "warn" if level == "warning" else level


# -- resolvers: need the reader's context --------------------------------------------------


def existing_file(ctx: Any, path: str) -> str:
    """A file path, made absolute against the config's directory, that must exist."""
    resolved = ctx.resolve(path)
    if not ctx.isfile(resolved):
        raise bad(f"file not found: {resolved}")
    return resolved


def pem_or_file(ctx: Any, value: str) -> str:
    """Inline PEM text is kept; anything else is a file that must exist."""
    return value if "-----BEGIN" in value else existing_file(ctx, value)


def output_path(ctx: Any, value: str) -> str:
    return value if value in ("-", "off") else ctx.resolve(value)
