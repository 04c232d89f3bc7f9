"""
Precision and recall of the semantic cache's matching on the labelled pairs
of C{tests/data/semantic_pairs.jsonl} (issue 9, "semantic cache quality").

    PYTHONPATH=. python3 bench/semantic_quality.py [--threshold 0.85] [--by kind]
                                                   [--show-errors] [--no-guard]

Every pair's cached prompt (C{a}) goes into one L{SemanticIndex} holding the
cached prompts of the whole set, as a cache would; then each C{b} is looked
up. A lookup that returns C{a} is a predicted hit; one that returns nothing
is a predicted miss; one that returns some other cached prompt is a wrong
hit (counted as a false positive whatever the label). Precision =
TP / (TP + FP), recall = TP / (labelled hits). Prints the figures per split
(dev: looked at while tuning; heldout: not), per language and in total;
exits 1 when the total misses precision >= 0.97 or recall >= 0.6.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

from clawproxy.cache.semantic import DEFAULT_THRESHOLD, Fingerprint, SemanticIndex, fingerprint

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "data",
                    "semantic_pairs.jsonl")


def load(path: str = DATA) -> list[dict]:
    """The labelled pairs."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _unguarded(text: str) -> Fingerprint:
    fp = fingerprint(text)
    return Fingerprint(fp.simhash, 1 if fp.signature else 0)


def evaluate(pairs: list[dict], threshold: float = DEFAULT_THRESHOLD,
             guard: bool = True) -> list[dict]:
    """
    Each pair with C{predicted} (bool) and C{wrong} (hit another entry)
    added. Without C{guard}, every fingerprint gets the same signature: the
    SimHash alone decides (to show what the guard is for).
    """
    make = fingerprint if guard else _unguarded
    index = SemanticIndex()
    for pair in pairs:
        index.add(pair["a"], make(pair["a"]))
    out = []
    for pair in pairs:
        found = index.lookup(make(pair["b"]), threshold)
        out.append({**pair, "predicted": found is not None and found[0] == pair["a"],
                    "wrong": found is not None and found[0] != pair["a"],
                    "similarity": found[1] if found else None})
    return out


def score(results: list[dict]) -> dict:
    """Counts, precision and recall of some evaluated pairs."""
    tp = sum(1 for r in results if r["hit"] and r["predicted"])
    fp = sum(1 for r in results if (not r["hit"] and r["predicted"]) or r["wrong"])
    positives = sum(1 for r in results if r["hit"])
    return {"pairs": len(results), "hits": positives, "misses": len(results) - positives,
            "tp": tp, "fp": fp, "fn": positives - tp,
            "precision": round(tp / (tp + fp), 4) if tp + fp else 1.0,
            "recall": round(tp / positives, 4) if positives else 1.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--by", choices=["kind", "lang", "split"], default=None,
                        help="also break the figures down by this field")
    parser.add_argument("--show-errors", action="store_true")
    parser.add_argument("--no-guard", action="store_true",
                        help="SimHash alone, without the guard (for comparison)")
    args = parser.parse_args(argv)
    results = evaluate(load(), args.threshold, guard=not args.no_guard)
    print(f"threshold {args.threshold} (similarity >= {args.threshold}: at most "
          f"{int(64 * (1 - args.threshold) + 1e-9)} of 64 bits differ)")
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        groups[f"split={r['split']}"].append(r)
        groups[f"lang={r['lang']}"].append(r)
        if args.by:
            groups[f"{args.by}={r[args.by]}/{'hit' if r['hit'] else 'miss'}"].append(r)
    groups["all"] = results
    for name in sorted(groups, key=lambda n: (n == "all", n)):
        print(f"{name:28} " + json.dumps(score(groups[name])))
    if args.show_errors:
        for r in results:
            if r["predicted"] != r["hit"] or r["wrong"]:
                label = "FN" if r["hit"] else "FP"
                print(f"{label} [{r['kind']}] {r['a']!r} ~ {r['b']!r} sim={r['similarity']}")
    total = score(results)
    return 0 if total["precision"] >= 0.97 and total["recall"] >= 0.6 else 1


if __name__ == "__main__":
    sys.exit(main())
