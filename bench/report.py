"""
Turn the raw outputs of bench/run.sh into Markdown tables with the targets.

    python bench/report.py bench/out
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

LABELS = {
    "direct": "direct (nginx / simulator)",
    "bare": "bare Twisted relay",
    "bare-nofp": "bare relay, form parsing off (info)",
    "claw": "clawproxy (access log to file)",
    "claw-nolog": "clawproxy (access log off)",
    "before": "clawproxy, before tree (access log to file)",
}
TARGETS = ("direct", "bare", "claw", "before")


def ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)$", text)
    if not m:
        raise ValueError(text)
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def parse_wrk(path: str) -> dict:
    text = open(path).read()
    out = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))}
    for p in ("50", "99"):
        out["p" + p] = ms(re.search(rf"^\s+{p}%\s+(\S+)", text, re.M).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: (.*)", text)
    out["errors"] = (int(bad.group(1)) if bad else 0)
    n = re.search(r"(\d+) requests in", text)
    cpu = re.search(r"cpu_ticks: (\d+) hz: (\d+)", text)
    out["cpu_us"] = (int(cpu.group(1)) / int(cpu.group(2)) * 1e6 / int(n.group(1))
                     if cpu and n and int(n.group(1)) else None)
    out["socket_errors"] = sock.group(1) if sock else ""
    return out


def wrk_results(out_dir: str) -> dict[str, dict]:
    res: dict[str, dict] = {}
    for label in LABELS:
        paths = sorted(p for p in glob.glob(f"{out_dir}/wrk-{label}-*.txt")
                       if re.fullmatch(rf"wrk-{re.escape(label)}-\d+\.txt", os.path.basename(p)))
        runs = [parse_wrk(p) for p in paths]
        if not runs:
            continue
        n = len(runs)
        res[label] = {
            "rps": sum(r["rps"] for r in runs) / n,
            "p50": sum(r["p50"] for r in runs) / n,
            "p99": sum(r["p99"] for r in runs) / n,
            "errors": sum(r["errors"] for r in runs),
            "socket_errors": "; ".join(r["socket_errors"] for r in runs if r["socket_errors"]),
            "rounds": [round(r["rps"]) for r in runs],
            "cpu_us": (sum(r["cpu_us"] for r in runs) / n
                       if all(r["cpu_us"] is not None for r in runs) else None),
        }
    return res


def load(out_dir: str, kind: str, label: str) -> dict | None:
    path = f"{out_dir}/{kind}-{label}.json"
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def main(out_dir: str) -> int:
    lines: list[str] = []
    add = lines.append
    machine = open(f"{out_dir}/machine.txt").read().strip() if os.path.exists(
        f"{out_dir}/machine.txt") else ""
    add("```")
    add(machine)
    add("```")
    verdicts: list[str] = []

    w = wrk_results(out_dir)
    add("")
    add("### 1. Throughput: small non-streaming chat, 50 connections (wrk)")
    add("")
    add("| target | req/s | p50 ms | p99 ms | vs bare relay | server CPU µs/req | errors "
        "| req/s per round |")
    add("|---|---:|---:|---:|---:|---:|---:|---|")
    bare = w.get("bare", {}).get("rps")
    for label, r in w.items():
        ratio = f"{100 * r['rps'] / bare:.0f}%" if bare and label != "direct" else ""
        errs = str(r["errors"]) + (f" ({r['socket_errors']})" if r["socket_errors"] else "")
        add(f"| {LABELS[label]} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {ratio} "
            f"| {fmt(r['cpu_us'], 0)} | {errs} | {', '.join(map(str, r['rounds']))} |")
    if bare and "claw" in w:
        ratio = w["claw"]["rps"] / bare
        verdicts.append(f"- clawproxy req/s ≥ 75% of the bare relay: {100 * ratio:.0f}% "
                        f"(access log on) → {verdict(ratio >= 0.75)}")
        if w["claw"]["cpu_us"] and w["bare"]["cpu_us"]:
            verdicts.append(f"  (by server CPU per request, less sensitive to other load on "
                            f"the machine: {100 * w['bare']['cpu_us'] / w['claw']['cpu_us']:.0f}%)")
        if "claw-nolog" in w:
            verdicts.append(f"  (access log off: {100 * w['claw-nolog']['rps'] / bare:.0f}%)")
        if "bare-nofp" in w:
            verdicts.append(f"  (vs the bare relay with form parsing off, as clawproxy has it: "
                            f"{100 * w['claw']['rps'] / w['bare-nofp']['rps']:.0f}%)")

    rates = {k: load(out_dir, "rate", k) for k in TARGETS}
    if any(rates.values()):
        add("")
        add("### 2. Added latency at a fixed 500 req/s (open loop, latency from the due time)")
        add("")
        add("| target | achieved req/s | p50 ms | p99 ms | p99.9 ms | max ms "
            "| p99 added vs direct | errors |")
        add("|---|---:|---:|---:|---:|---:|---:|---|")
        base = (rates.get("direct") or {}).get("latency_ms", {}).get("p99")
        for label, r in rates.items():
            if r is None:
                continue
            lat = r["latency_ms"]
            added = "" if label == "direct" or base is None else f"{lat['p99'] - base:+.2f} ms"
            errs = {k: v for k, v in r["errors"].items() if v}
            add(f"| {LABELS[label]} | {r['achieved_rate']:.0f} | {fmt(lat['p50'])} "
                f"| {fmt(lat['p99'])} | {fmt(lat['p999'])} | {fmt(lat['max'])} | {added} "
                f"| {errs or 0} |")
        if base is not None and rates.get("claw"):
            added = rates["claw"]["latency_ms"]["p99"] - base
            verdicts.append(f"- p99 added latency ≤ 3 ms at 500 req/s: {added:.2f} ms → "
                            f"{verdict(added <= 3.0)}")

    sse = {k: load(out_dir, "sse", k) for k in TARGETS}
    if any(sse.values()):
        add("")
        add("### 3. Concurrent SSE streams (TTFB = request written → first `data:` byte)")
        add("")
        add("| target | streams | open together (peak) | completed in full | TTFB p50 ms "
            "| TTFB p99 ms | TTFB max ms | p99 TTFB overhead |")
        add("|---|---:|---:|---:|---:|---:|---:|---:|")
        base = (sse.get("direct") or {}).get("ttfb_ms", {}).get("p99")
        for label, r in sse.items():
            if r is None:
                continue
            t = r["ttfb_ms"]
            over = "" if label == "direct" or base is None else f"{t['p99'] - base:+.2f} ms"
            add(f"| {LABELS[label]} | {r['streams']} | {r['peak_open']} | {r['completed_ok']} "
                f"| {fmt(t['p50'])} | {fmt(t['p99'])} | {fmt(t['max'])} | {over} |")
        c = sse.get("claw")
        if c is not None and base is not None:
            over = c["ttfb_ms"]["p99"] - base
            held = c["peak_open"] == c["streams"] and c["completed_ok"] == c["streams"]
            verdicts.append(f"- {c['streams']} streams held: peak {c['peak_open']} open, "
                            f"{c['completed_ok']} completed → {verdict(held)}")
            verdicts.append(f"- p99 TTFB overhead < 5 ms: {over:.2f} ms → {verdict(over < 5.0)}")

    idle = {k: load(out_dir, "idle", k) for k in TARGETS}
    if any(idle.values()):
        add("")
        add("### 4. Memory per idle keep-alive connection (VmRSS growth / connections)")
        add("")
        add("| target | connections alive | VmRSS before KiB | after KiB | KiB per connection |")
        add("|---|---:|---:|---:|---:|")
        for label, r in idle.items():
            if r is None:
                continue
            add(f"| {LABELS[label]} | {r['alive']} of {r['conns']} | {r['rss_before_kib']} "
                f"| {r['rss_after_kib']} | {r['kib_per_conn']:.2f} |")
        c = idle.get("claw")
        if c is not None:
            ok = c["kib_per_conn"] <= 10 and c["alive"] == c["conns"]
            verdicts.append(f"- ≤ 10 KiB per idle connection: {c['kib_per_conn']:.2f} KiB "
                            f"→ {verdict(ok)}")

    burst = f"{out_dir}/burst/summary.md"
    if os.path.exists(burst):
        add("")
        add("### 5. Burst: 400 SSE streams at the same instant, 50 events 20 ms apart "
            "(bench/burst.sh)")
        add("")
        text = open(burst).read()
        add(text.split("```", 2)[-1].strip() if text.count("```") >= 2 else text.strip())
        for line in text.splitlines():
            if line.startswith("Target"):
                verdicts.append("- burst: " + line)

    if "before" in w or rates.get("before") or sse.get("before"):
        add("")
        add("### Before and after, same run (after / before; target: within 5 %)")
        add("")
        add("| figure | before | after | change | within 5 % |")
        add("|---|---:|---:|---:|---|")

        def row(name: str, b: float | None, a: float | None, higher_better: bool,
                unit: str = "", digits: int = 2) -> None:
            if b is None or a is None:
                return
            change = (a / b - 1) * 100 if b else float("nan")
            ok = change >= -5 if higher_better else change <= 5
            add(f"| {name} | {b:.{digits}f}{unit} | {a:.{digits}f}{unit} | {change:+.1f} % "
                f"| {'yes' if ok else '**no**'} |")

        if "before" in w and "claw" in w:
            row("req/s (wrk, access log to file)", w["before"]["rps"], w["claw"]["rps"], True,
                digits=0)
            row("server CPU µs per request", w["before"]["cpu_us"], w["claw"]["cpu_us"], False,
                digits=0)
        base = (rates.get("direct") or {}).get("latency_ms", {}).get("p99")
        if base is not None and rates.get("before") and rates.get("claw"):
            row("p99 added at 500 req/s", rates["before"]["latency_ms"]["p99"] - base,
                rates["claw"]["latency_ms"]["p99"] - base, False, " ms")
        if sse.get("before") and sse.get("claw"):
            for p in ("p50", "p99"):
                row(f"SSE TTFB {p}, 2,000 streams", sse["before"]["ttfb_ms"][p],
                    sse["claw"]["ttfb_ms"][p], False, " ms")
        if idle.get("before") and idle.get("claw"):
            row("KiB per idle connection", idle["before"]["kib_per_conn"],
                idle["claw"]["kib_per_conn"], False)
        add("")
        add("Latency changes under 5 % of a millisecond-scale figure are within this "
            "machine's run-to-run noise; compare the direct and bare rows of the same run.")

    add("")
    add("### Targets")
    add("")
    lines.extend(verdicts)
    prof = f"{out_dir}/profile-summary.txt"
    if os.path.exists(prof):
        add("")
        add("### Profile of clawproxy under wrk (py-spy, top frames)")
        add("")
        add("```")
        add("\n".join(open(prof).read().splitlines()[:40]))
        add("```")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench/out"))
