"""
Turn the raw outputs of bench/burst.sh into a Markdown table.

    python bench/burst_report.py bench/out/burst

Figures are pooled over the warm bursts (every burst but a fresh proxy's first
one) of every repetition. Overhead = mean TTFB of a target - mean TTFB of
direct; it is also given per repetition (the spread on a shared machine).
The first burst of each target, on fresh processes, is shown apart as "cold".
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import statistics
import sys

LABELS = {
    "direct": "direct (backend)",
    "bare": "bare Twisted relay",
    "before": "clawproxy, before tree",
    "claw": "clawproxy",
}


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def load(out_dir: str) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = {}
    for path in glob.glob(f"{out_dir}/burst-*-*.json"):
        m = re.fullmatch(r"burst-(.+)-(\d+)\.json", os.path.basename(path))
        if m and os.path.getsize(path):
            with open(path) as f:
                runs.setdefault(m.group(1), {})[int(m.group(2))] = json.load(f)
    return runs


def main(out_dir: str) -> int:
    runs = load(out_dir)
    if "direct" not in runs:
        print("no burst results in", out_dir)
        return 1
    reps = sorted(runs["direct"])
    labels = [k for k in LABELS if k in runs]
    warm: dict[str, dict[str, list[float]]] = {}
    per_rep: dict[str, list[float]] = {}
    cold: dict[str, dict] = {}
    for label in labels:
        ttfb: list[float] = []
        total: list[float] = []
        ok = expected = 0
        per_rep[label] = []
        for rep in reps:
            rounds = runs[label].get(rep, {}).get("rounds", [])
            if rep == reps[0] and rounds:
                cold[label] = rounds[0]
                rounds = rounds[1:]
            rep_ttfb = [x for r in rounds for x in r["ttfb_raw_ms"]]
            per_rep[label].append(mean(rep_ttfb))
            ttfb += rep_ttfb
            total += [x for r in rounds for x in r["total_raw_ms"]]
            ok += sum(r["completed_ok"] for r in rounds)
            expected += sum(r["streams"] for r in rounds)
        cpu_ms = bursts = 0
        for rep in reps:
            path = f"{out_dir}/burst-{label}-{rep}.json.cpu"
            if os.path.exists(path):
                ms, n = map(int, open(path).read().split())
                cpu_ms += ms
                bursts += n
        warm[label] = {"ttfb": ttfb, "total": total, "ok": [ok, expected],
                       "cpu": cpu_ms / bursts if bursts else None}

    machine = open(f"{out_dir}/machine.txt").read().strip() if os.path.exists(
        f"{out_dir}/machine.txt") else ""
    out: list[str] = ["```", machine, "```", ""]
    add = out.append
    d = warm["direct"]
    d_mean, d_p99 = mean(d["ttfb"]), pct(d["ttfb"], 99) if d["ttfb"] else float("nan")
    add("| target | TTFB mean ms | **mean overhead** | per repetition "
        "| TTFB p99 ms | p99 overhead | total mean ms | total p99 ms | completed "
        "| cold burst: TTFB mean / p99 ms | server CPU ms per burst |")
    add("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    overhead: dict[str, float] = {}
    for label in labels:
        w = warm[label]
        if not w["ttfb"]:
            add(f"| {LABELS[label]} | no data |")
            continue
        m, p99 = mean(w["ttfb"]), pct(w["ttfb"], 99)
        reps_over = [t - dd for t, dd in zip(per_rep[label], per_rep["direct"])]
        c = cold.get(label)
        cold_s = f"{c['ttfb_mean_ms']:.1f} / {c['ttfb_ms']['p99']:.1f}" if c and c[
            "ttfb_mean_ms"] is not None else "-"
        if label == "direct":
            over_s = p99_s = rep_s = ""
        else:
            overhead[label] = m - d_mean
            over_s = f"**{m - d_mean:+.1f} ms**"
            p99_s = f"{p99 - d_p99:+.1f} ms"
            rep_s = ", ".join(f"{x:+.1f}" for x in reps_over)
        add(f"| {LABELS[label]} | {m:.1f} | {over_s} | {rep_s} | {p99:.1f} | {p99_s} "
            f"| {mean(w['total']):.0f} | {pct(w['total'], 99):.0f} "
            f"| {w['ok'][0]}/{w['ok'][1]} | {cold_s} "
            f"| {'-' if w['cpu'] is None else round(w['cpu'])} |")
    add("")
    if "claw" in overhead and "bare" in overhead:
        c, b = overhead["claw"], overhead["bare"]
        reps_ok = sum(
            1 for cl, ba, di in zip(per_rep["claw"], per_rep["bare"], per_rep["direct"])
            if cl - di <= ba - di)
        med = {k: statistics.median(x - y for x, y in zip(per_rep[k], per_rep["direct"]))
               for k in ("claw", "bare")}
        add(f"Target (clawproxy's mean TTFB overhead ≤ the bare relay's, same run): "
            f"{c:+.1f} ms vs {b:+.1f} ms → **{'met' if c <= b else 'not met'}** "
            f"(met in {reps_ok} of {len(reps)} repetitions; median per repetition: "
            f"clawproxy {med['claw']:+.1f}, bare {med['bare']:+.1f} ms)")
    if "before" in overhead and "claw" in overhead:
        add(f"Before → after: mean TTFB overhead {overhead['before']:+.1f} → "
            f"{overhead['claw']:+.1f} ms")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench/out/burst"))
