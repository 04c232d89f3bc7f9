"""The C{clawproxy} console script (SPEC section 1)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from clawproxy.config import ConfigError, hash_key, load_config
from clawproxy.policy.auth import KeyStoreError, load_key_store

DEFAULT_ADMIN = "http://127.0.0.1:9901"


class AdminError(Exception):
    """The admin listener could not be reached or refused the call."""


def admin_call(base: str, token: str | None, method: str, path: str,
               body: Any = None, timeout: float = 5.0) -> Any:
    """Call the admin API and return its decoded JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base.rstrip("/") + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except Exception:
            message = e.reason
        raise AdminError(f"{base} refused: {e.code} {message}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise AdminError(f"cannot reach the gateway's admin listener at {base}: {reason}") from None
    except ValueError:
        raise AdminError(f"{base} did not answer JSON") from None


def format_status(status: dict[str, Any]) -> str:
    """A readable table of pools and instances."""
    header = ("POOL", "INSTANCE", "STATE", "WEIGHT", "ACTIVE", "REQUESTS", "SUCCESS", "BREAKER",
              "GPU%")
    rows = [header]
    for pool_name, pool in status.get("pools", {}).items():
        for inst in pool.get("instances", []):
            gpu = inst.get("health", {}).get("gpu_memory_used_percent")
            rows.append((
                pool_name, inst["id"], inst["state"], f"{inst['weight']:g}", str(inst["active"]),
                str(inst["requests"]), f"{inst['success_rate'] * 100:.1f}%", inst["breaker"],
                "-" if gpu is None else f"{gpu:g}",
            ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        f"clawproxy {status.get('version', '?')}  up {status.get('uptime', '?')}  "
        f"workers {status.get('workers', 1)}"
    ]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for name, section in status.items():
        if name not in _CORE_KEYS:
            lines.append("")
            lines.extend(SECTION_FORMATS.get(name, _format_section)(name, section))
    return "\n".join(lines)


#: Keys of C{/admin/status} the table above shows.
_CORE_KEYS = frozenset(("version", "uptime", "workers", "pools"))

#: How C{clawproxy status} prints a feature's section of C{/admin/status}
#: (its L{IAdminSection<clawproxy.interfaces.IAdminSection>}): name and
#: section in, lines out. Sections without an entry print as C{key: value}.
SECTION_FORMATS: dict[str, Callable[[str, Any], list[str]]] = {}


def _format_store(name: str, store: dict[str, Any]) -> list[str]:
    latency = store.get("latency_ms")
    return [
        f"store {store.get('backend', '?')}  "
        f"{'healthy' if store.get('healthy') else 'UNREACHABLE'}  "
        f"latency {'-' if latency is None else f'{latency:g} ms'}  "
        f"errors {store.get('errors', 0)}"
    ]


SECTION_FORMATS["store"] = _format_store


def _format_processes(name: str, section: dict[str, Any]) -> list[str]:
    rows = [("WORKER", "PID", "STATE", "UPTIME", "IN-FLIGHT", "REQUESTS", "RESTARTS")]
    for w in section.get("workers", []):
        rows.append((str(w["index"]), str(w["pid"] or "-"), w["state"],
                     f"{w['uptime_seconds']:g}s", str(w["in_flight"]), str(w["requests"]),
                     str(w["restarts"])))
    t = section.get("totals", {})
    rows.append(("all", "", "", "", str(t.get("in_flight", 0)), str(t.get("requests", 0)),
                 str(t.get("restarts", 0))))
    return _table(rows)


SECTION_FORMATS["processes"] = _format_processes


def _format_breakers(name: str, breakers: dict[str, Any]) -> list[str]:
    rows = [("BREAKER", "STATE", "FAILURES", "SUCCESSES", "LAST CHANGE", "RETRY IN")]
    for b in breakers.values():
        last = b.get("last_transition")
        retry = b.get("retry_after")
        rows.append((
            b["name"], b["state"], str(b["failure_count"]), str(b["success_count"]),
            "-" if not last else f"{last['to']} at {_clock_time(last['at'])}",
            "-" if retry is None else f"{retry}s",
        ))
    return _table(rows)


SECTION_FORMATS["circuit_breakers"] = _format_breakers


def _clock_time(at: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(at))


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _format_tokens(name: str, section: dict[str, Any]) -> list[str]:
    """Token accounting per pool (L{clawproxy.web.tokens.TokenObserver})."""
    pools = section.get("pools") or {}
    lines = [f"{'TOKENS POOL':<24} {'TOK/S (1m)':>10} {'PROMPT':>12} {'COMPLETION':>12}"]
    for pool, p in sorted(pools.items()):
        lines.append(f"{pool:<24} {p.get('tokens_per_second', 0):>10g} "
                     f"{p.get('prompt_tokens', 0):>12} {p.get('completion_tokens', 0):>12}")
    if not pools:
        lines.append("(no LLM calls yet)")
    return lines


SECTION_FORMATS["tokens"] = _format_tokens


def _format_limits(name: str, limits: dict[str, Any]) -> list[str]:
    """The C{limits} section: use of each limit by the busiest agents, queues."""
    store = limits.get("store", {})
    lines = [f"limits  store {store.get('backend', '?')} "
             f"{'healthy' if store.get('healthy') else 'UNREACHABLE'}  "
             f"on_error {limits.get('on_error', '?')}"]
    rows = [("AGENT", "REQUESTS", "REFUSED", "LIMIT", "RATE", "ALGORITHM", "REMAINING",
             "RESET")]
    for agent, use in limits.get("agents", {}).items():
        for kind, limit in use.get("limits", {}).items():
            rows.append((agent, str(use.get("requests", 0)), str(use.get("refused", 0)), kind,
                         limit.get("limit", "?"),
                         limit.get("algorithm", "?"), str(limit.get("remaining", "?")),
                         f"{limit.get('reset', '?')}s"))
    if len(rows) > 1:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for stage, queue in limits.get("queues", {}).items():
        lanes = ", ".join(f"{lane} {n}" for lane, n in queue.get("lanes", {}).items())
        lines.append(f"queue {stage}: {queue.get('depth', 0)} waiting"
                     + (f" ({lanes})" if lanes else ""))
    return lines


SECTION_FORMATS["limits"] = _format_limits


def _format_section(name: str, section: Any) -> list[str]:
    if not isinstance(section, dict):
        return [f"{name}: {json.dumps(section)}"]
    return [f"{name}:"] + [f"  {k}: {json.dumps(v)}" for k, v in section.items()]


def _format_models(name: str, section: dict[str, Any]) -> list[str]:
    """Per pool: models declared and discovered, sessions, least_latency's TTFBs."""
    lines = ["models:"]
    for pool, p in (section.get("pools") or {}).items():
        words = [f"  {pool}", f"declared {', '.join(p.get('declared') or []) or '-'}"]
        found = p.get("discovered") or []
        shown = ", ".join(found[:8]) + (f" (+{len(found) - 8})" if len(found) > 8 else "")
        words.append(f"discovered {shown or '-'}")
        if "sessions" in p:
            words.append(f"sessions {p['sessions']}")
        if p.get("ttfb_ms"):
            words.append("ttfb " + ", ".join(f"{i} {ms:g}ms" for i, ms in p["ttfb_ms"].items()))
        lines.append("  ".join(words))
    for model, chain in (section.get("fallbacks") or {}).items():
        lines.append(f"  fallback {' -> '.join([model, *chain])}")
    return lines


SECTION_FORMATS["models"] = _format_models


def _format_adaptive(name: str, section: dict[str, Any]) -> list[str]:
    """Adaptive throttling per pool (L{clawproxy.web.adaptive.Adaptive})."""
    rows = [("ADAPTIVE POOL", "STATE", "FACTOR", "REASON", "P95", "GPU%", "FOR", "SHED")]
    for pool, p in (section.get("pools") or {}).items():
        p95, gpu = p.get("latency_p95"), p.get("gpu_memory")
        rows.append((pool, p.get("state", "?"), f"{p.get('factor', 1):g}",
                     ",".join(p.get("reason") or []) or "-",
                     "-" if p95 is None else f"{p95 * 1000:g}ms",
                     "-" if gpu is None else f"{gpu:g}", f"{p.get('since', 0):g}s",
                     str(p.get("shed", 0))))
    return _table(rows)


SECTION_FORMATS["adaptive"] = _format_adaptive


def _admin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin", default=os.environ.get("CLAWPROXY_ADMIN", DEFAULT_ADMIN),
                   help="admin listener URL (default $CLAWPROXY_ADMIN or %(default)s)")
    p.add_argument("--token", default=os.environ.get("CLAWPROXY_ADMIN_TOKEN"),
                   help="admin bearer token (default $CLAWPROXY_ADMIN_TOKEN)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clawproxy", description="clawproxy gateway tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("file")
    p = sub.add_parser("status", help="pools and instances of a running gateway")
    _admin_args(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p = sub.add_parser("set-weight", help="change an instance's weight")
    p.add_argument("instance")
    p.add_argument("weight", type=float)
    _admin_args(p)
    for name, text in (("drain", "stop new traffic to an instance"),
                       ("undrain", "resume traffic to an instance")):
        p = sub.add_parser(name, help=text)
        p.add_argument("instance")
        _admin_args(p)
    p = sub.add_parser("hash-key", help="print the stored form of an API key")
    p.add_argument("key")
    sub.add_parser("sim", help="run a simulated LLM backend", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sim":
        from clawproxy.simulator import sim_main

        return sim_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except AdminError as e:
        print(f"clawproxy {args.command}: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "check-config":
        try:
            config = load_config(args.file)
            load_key_store(config)
        except (ConfigError, KeyStoreError) as e:
            print(str(e), file=sys.stderr)
            return 1
        except OSError as e:
            print(f"{args.file}: {e.strerror}", file=sys.stderr)
            return 1
        print(f"{args.file}: OK")
        print(config.summary())
        return 0
    if args.command == "hash-key":
        print(hash_key(args.key))
        return 0
    if args.command == "status":
        status = admin_call(args.admin, args.token, "GET", "/admin/status")
        print(json.dumps(status, indent=2) if args.json else format_status(status))
        return 0
    if args.command == "set-weight":
        if args.weight < 0:
            print("clawproxy set-weight: weight must be >= 0", file=sys.stderr)
            return 2
        inst = admin_call(args.admin, args.token, "POST",
                          f"/admin/instances/{_quote(args.instance)}/weight",
                          {"weight": args.weight})
        print(f"{inst['id']}: weight {inst['weight']:g}")
        return 0
    if args.command in ("drain", "undrain"):
        inst = admin_call(args.admin, args.token, "POST",
                          f"/admin/instances/{_quote(args.instance)}/{args.command}", {})
        print(f"{inst['id']}: {inst['state']}")
        return 0
    raise AssertionError(args.command)


def _quote(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="")


if __name__ == "__main__":
    sys.exit(main())
