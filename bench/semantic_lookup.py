"""
The semantic index's lookup cost and memory per entry at 1,000, 10,000 and
100,000 entries (issue 9: "lookup cost stays flat", "semantic lookup µs at
100,000 entries").

    PYTHONPATH=. python3 bench/semantic_lookup.py [--sizes 1000,10000,100000]
                                                  [--lookups 20000] [--json]

Synthetic prompts, half English-like (5 to 20 words of a 20,000-word
vocabulary, a number in one of three), half Chinese-like (8 to 30
characters of 3,000), all in one scope (the worst case: one agent, one
model). Every size's index is filled, then their lookups of precomputed
fingerprints are timed interleaved, ten rounds over all sizes, for three
kinds of query: a stored prompt upper-cased and punctuated (the same
normalised text: same SimHash), a stored prompt with its halves swapped
(same content words, a SimHash a few bits away) and a new prompt (a miss);
each figure
the median of the rounds' medians over batches of 500 lookups, so a busy
moment of a shared machine falls on every size alike. Memory per entry is the
C{tracemalloc} growth while the index is filled divided by the entries
(the fingerprints and the index's dicts and buckets; the entry ids belong to
the cache and are made beforehand). A linear scan over the same entries is
timed for comparison, and so is the index without the guard's namespace
(C{--ablation}: band keys from the SimHash alone, as if every prompt had
the same content words), which shows what keeps the buckets small.

The last column times one C{dict.get} of an absent key in a dict as big as
the index's buckets: the cost of the memory a bigger dict touches, which a
lookup's C{dict} probes pay too (CPU caches), apart from any work that grows
with the entries.

With C{--store redis} the same prompts go into a
L{clawproxy.cache.semantic_store.StoredSemanticIndex} on a redis-server the
script starts (loopback, C{tests/redis_server.py}); lookups are awaited one
after another (round-trip time), and memory is Redis C{used_memory} growth.

Prints a Markdown table (or JSON with C{--json}).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
import tracemalloc

from twisted.internet.defer import Deferred

from clawproxy.cache.semantic import (
    BANDS,
    DEFAULT_THRESHOLD,
    Fingerprint,
    SemanticIndex,
    fingerprint,
    max_distance,
)


def vocabulary(rng: random.Random, size: int) -> list[str]:
    """C{size} distinct pronounceable words."""
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def prompts(rng: random.Random, count: int, words: list[str], chars: list[str]) -> list[str]:
    """C{count} distinct synthetic prompts."""
    out: set[str] = set()
    while len(out) < count:
        if rng.random() < 0.5:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 20)))
            if rng.random() < 0.33:
                text += f" {rng.randint(1, 5000)}"
        else:
            text = "".join(rng.choice(chars) for _ in range(rng.randint(8, 30)))
        out.add(text)
    return sorted(out)


def restyle(text: str) -> str:
    """The same prompt upper-cased and punctuated: the same normalised text."""
    return "  " + text.upper() + "?\uff01"


def reorder(text: str) -> str:
    """The same prompt with its two halves swapped: same content, near SimHash."""
    if " " in text:
        parts = text.split(" ")
        half = len(parts) // 2
        return " ".join(parts[half:] + parts[:half])
    half = len(text) // 3
    return text[half:] + text[:half]


def timed(fn, items, batch: int = 500) -> float:
    """
    µs per C{fn(item)}: the median over batches of C{batch} items, so that
    a burst of other work on a shared machine does not skew the figure.
    """
    gc.collect()
    per_item = []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        t0 = time.perf_counter_ns()
        for item in chunk:
            fn(item)
        per_item.append((time.perf_counter_ns() - t0) / len(chunk) / 1000)
    return statistics.median(per_item)


def scan(entries: dict, fp: Fingerprint) -> object:
    """What the index avoids: compare with every entry."""
    limit = max_distance(DEFAULT_THRESHOLD)
    best, best_distance = None, limit + 1
    for entry_id, other in entries.items():
        if other.signature == fp.signature:
            distance = (other.simhash ^ fp.simhash).bit_count()
            if distance < best_distance:
                best, best_distance = entry_id, distance
    return best


def build(size: int, lookups: int, ablation: bool, seed: int = 1) -> dict:
    """An index of C{size} prompts, its queries, and what building it cost."""
    rng = random.Random(seed)
    words = vocabulary(rng, 20000)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    texts = prompts(rng, size + lookups // 3, words, chars)
    stored, fresh = texts[:size], texts[size:]
    ids = [f"entry-{n:08d}" for n in range(size)]
    fingerprint_us = timed(fingerprint, stored[:2000])

    def make(text: str) -> Fingerprint:
        fp = fingerprint(text)
        return Fingerprint(fp.simhash, 1) if ablation else fp

    fps = [make(t) for t in stored]
    third = lookups // 3
    same_queries = [make(restyle(rng.choice(stored))) for _ in range(third)]
    near_queries = [make(reorder(rng.choice(stored))) for _ in range(third)]
    miss_queries = [make(t) for t in fresh[:third]]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = SemanticIndex()
    for entry_id, fp in zip(ids, fps):
        index.add(entry_id, Fingerprint(_copy(fp.simhash), _copy(fp.signature)))
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    found = sum(1 for q in near_queries if index.lookup(q) is not None)
    candidates = statistics.mean(len(index.candidates(q)) for q in miss_queries[:2000])
    entries = index._entries
    scan_queries = miss_queries[:max(20, 2_000_000 // size)]
    scan_us = timed(lambda q: scan(entries, q), scan_queries, batch=5)
    return {"index": index, "same": same_queries, "near": near_queries, "miss": miss_queries,
            "row": {"entries": size, "near_found": round(found / len(near_queries), 4),
                    "candidates_per_miss": round(candidates, 2),
                    "bytes_per_entry": round((after - before) / size),
                    "scan_us": round(scan_us, 1), "fingerprint_us": round(fingerprint_us, 1)}}


def measure(sizes: list[int], lookups: int, ablation: bool, rounds: int = 10) -> list[dict]:
    """
    Build every size, then time their lookups interleaved (round after
    round over every size), so a slow moment of a shared machine falls on
    all sizes alike; each figure is the median over rounds.
    """
    built = [build(size, lookups, ablation) for size in sizes]
    kinds = ("same", "near", "miss")
    samples: list[dict[str, list[float]]] = [{k: [] for k in kinds} for _ in built]
    for r in range(rounds):
        for b, sample in zip(built, samples):
            lookup = b["index"].lookup
            for kind in kinds:
                step = len(b[kind]) // rounds
                sample[kind].append(timed(lookup, b[kind][r * step:(r + 1) * step]))
    for b, sample in zip(built, samples):
        sample["dict_get"] = []
        table = {rng_key: None for rng_key in random.Random(5).sample(
            range(1 << 60), BANDS * b["row"]["entries"])}
        b["table"] = table
        probe = random.Random(6).sample(range(1 << 60), 5000)
    for _ in range(rounds):
        for b, sample in zip(built, samples):
            get = b["table"].get
            sample["dict_get"].append(_gets_ns(get, probe))
    return [{**b["row"], **{f"{k}_us": round(statistics.median(sample[k]), 2) for k in kinds},
             "dict_get_ns": round(statistics.median(sample["dict_get"]))}
            for b, sample in zip(built, samples)]


def _gets_ns(get, keys: list[int]) -> float:
    """ns per C{get(key)} over C{keys}, the loop's own cost included."""
    t0 = time.perf_counter_ns()
    for key in keys:
        get(key)
    return (time.perf_counter_ns() - t0) / len(keys)


def _copy(value: int) -> int:
    """A new int object of the same value (so its memory is counted)."""
    return int.from_bytes(value.to_bytes(8, "big"), "big")


async def _used_memory(raw) -> int:
    info = await raw.info("memory")
    if isinstance(info, dict):
        return int(info["used_memory"])
    return int(info.split("used_memory:")[1].split()[0])


def prepare(sizes: list[int], lookups: int) -> list[tuple[int, list, dict]]:
    """
    The fingerprints to store and to look up for each size, computed before
    the reactor runs (minutes of CPU at 100,000 entries would stall it).
    """
    prepared = []
    for size in sizes:
        rng = random.Random(1)
        words = vocabulary(rng, 20000)
        chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
        texts = prompts(rng, size + lookups // 3, words, chars)
        stored, fresh = texts[:size], texts[size:]
        third = lookups // 3
        queries = {"same": [fingerprint(restyle(rng.choice(stored))) for _ in range(third)],
                   "near": [fingerprint(reorder(rng.choice(stored))) for _ in range(third)],
                   "miss": [fingerprint(t) for t in fresh[:third]]}
        prepared.append((size, [fingerprint(t) for t in stored], queries))
    return prepared


async def measure_redis(reactor, prepared: list[tuple[int, list, dict]]) -> list[dict]:
    """
    The same prompts in a L{StoredSemanticIndex} on a redis-server of its
    own (loopback): a lookup is one round trip (one script); µs per lookup
    awaited one after another, Redis memory growth per entry.
    """
    import tempfile

    import txredisapi
    from twisted.internet.defer import gatherResults

    from clawproxy.cache.semantic_store import StoredSemanticIndex
    from clawproxy.config import RedisConfig, StoreConfig
    from clawproxy.stores import build_store
    from tests.redis_server import RedisServer

    server = RedisServer(reactor, tempfile.mkdtemp(prefix="semantic-bench-"))
    await server.start()
    rows = []
    try:
        store = build_store(StoreConfig("redis", RedisConfig(url=server.url, prefix="b:",
                                                             timeout=5.0)), reactor)
        store.connect()
        while True:
            try:
                await store.now()
                break
            except Exception:
                from twisted.internet.task import deferLater
                await deferLater(reactor, 0.05, lambda: None)
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        raw = await txredisapi.Connection("127.0.0.1", port, reconnect=False)
        for size, fps, queries in prepared:
            index = StoredSemanticIndex(store, namespace=f"n{size}")
            await raw.execute_command("FLUSHALL")
            used = await _used_memory(raw)
            for start in range(0, len(fps), 64):  # 64 calls in flight at a time
                await gatherResults([index.add(f"entry-{n:08d}", fps[n], 3600)
                                     for n in range(start, min(start + 64, len(fps)))])
            grown = await _used_memory(raw) - used
            row = {"entries": size, "redis_bytes_per_entry": round(grown / size)}
            for kind, items in queries.items():
                t0 = time.perf_counter_ns()
                for q in items:
                    await index.lookup(q)
                row[f"{kind}_us"] = round((time.perf_counter_ns() - t0) / len(items) / 1000, 1)
            rows.append(row)
        raw.disconnect()
        await store.disconnect()
    finally:
        await server.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--lookups", type=int, default=20000)
    parser.add_argument("--ablation", action="store_true",
                        help="band keys from the SimHash alone (no guard namespace)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--store", choices=["memory", "redis"], default="memory",
                        help="redis: the stored index on a redis-server started for the run")
    args = parser.parse_args(argv)
    if args.store == "redis":
        from twisted.internet import task

        prepared = prepare([int(size) for size in args.sizes.split(",")], args.lookups)
        out: list[dict] = []

        async def run(reactor) -> None:
            out.extend(await measure_redis(reactor, prepared))

        try:
            task.react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
        except SystemExit as e:
            if e.code:
                raise
        print("| entries | lookup µs (one round trip): same text | reordered | miss "
              "| Redis bytes/entry |")
        print("|---:|---:|---:|---:|---:|")
        for r in out:
            print(f"| {r['entries']:,} | {r['same_us']} | {r['near_us']} | {r['miss_us']} | "
                  f"{r['redis_bytes_per_entry']} |")
        return 0
    rows = measure([int(size) for size in args.sizes.split(",")], args.lookups, args.ablation)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"python {sys.version.split()[0]}, threshold {DEFAULT_THRESHOLD}"
          + (", ABLATION: no guard namespace" if args.ablation else ""))
    print("| entries | lookup µs: same text | reordered | miss | reordered found "
          "| candidates/miss | bytes/entry | linear scan µs | fingerprint µs "
          "| one dict.get ns (reference) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['entries']:,} | {r['same_us']} | {r['near_us']} | {r['miss_us']} | "
              f"{r['near_found']} | {r['candidates_per_miss']} | {r['bytes_per_entry']} | "
              f"{r['scan_us']:,} | {r['fingerprint_us']} | {r['dict_get_ns']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
