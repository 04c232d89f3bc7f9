# ruff: noqa: RUF001  (full-width and CJK text is what these tests are about)
"""
Tests for L{clawproxy.cache.semantic}: normalisation, the SimHash, the guard,
the banded index, and the quality on the labelled pairs of
C{tests/data/semantic_pairs.jsonl}.
"""

from __future__ import annotations

import os
import random
import sys

from twisted.trial.unittest import SynchronousTestCase

from clawproxy.cache import semantic
from clawproxy.cache.semantic import (
    BANDS,
    DEFAULT_THRESHOLD,
    Fingerprint,
    SemanticIndex,
    analyse,
    band_keys,
    fingerprint,
    guard,
    max_distance,
    normalise,
    probe_keys,
    shingles,
    simhash,
    similarity,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flip(value: int, *bits: int) -> int:
    """C{value} with the given bits inverted."""
    for bit in bits:
        value ^= 1 << bit
    return value


class NormaliseTests(SynchronousTestCase):
    """L{normalise} and L{analyse} erase what does not change the question."""

    def test_case_whitespace_punctuation(self) -> None:
        """Case, runs of spaces and punctuation do not matter."""
        self.assertEqual(normalise("  What IS the   weather,\tin Paris?! "),
                         "what is the weather in paris")

    def test_full_width(self) -> None:
        """Full-width letters, digits, spaces and punctuation are their ASCII forms."""
        self.assertEqual(normalise("Ｗｈａｔ’ｓ\u3000１５％ ｏｆ ８０？"), "what is 15 % of 80")

    def test_cjk_without_spaces(self) -> None:
        """CJK text is compared without spaces, and tokenised per character."""
        self.assertEqual(normalise("北京 今天 天气"), "北京今天天气")
        self.assertEqual(analyse("北京 今天 天气").tokens, analyse("北京今天天气").tokens)
        self.assertEqual(analyse("北京今天天气").tokens, ("北", "京", "今", "天", "天", "气"))

    def test_contractions(self) -> None:
        """Contractions are spelled out; a possessive is dropped."""
        self.assertEqual(normalise("What's France's capital? I don't know, can't say"),
                         "what is france capital i do not know can not say")

    def test_fillers_dropped(self) -> None:
        """Politeness and framing leave only the content tokens."""
        self.assertEqual(analyse("Could you please tell me the capital of Spain?").tokens,
                         ("capital", "spain"))
        self.assertEqual(analyse("whats the capital of spain").tokens, ("capital", "spain"))
        self.assertEqual(analyse("请问北京今天的天气如何？").tokens,
                         ("北", "京", "今", "天", "天", "气", "怎么"))

    def test_numbers(self) -> None:
        """Digits, number words and Chinese numerals give the same numbers."""
        self.assertEqual(analyse("convert 1,000 usd").numbers, ("1000",))
        self.assertEqual(analyse("twenty five apples").numbers, ("25",))
        self.assertEqual(analyse("三十五个苹果").numbers, ("35",))
        self.assertEqual(analyse("二〇二四年").numbers, ("2024",))
        self.assertEqual(analyse("两千零八年").numbers, ("2008",))
        self.assertEqual(analyse("三万五千").numbers, ("35000",))
        self.assertEqual(analyse("一百零五").numbers, ("105",))
        self.assertEqual(analyse("3.50 dollars").numbers, ("3.5",))
        self.assertEqual(analyse("iPhone15").numbers, analyse("iPhone 15").numbers)
        self.assertEqual(analyse("which one is better").numbers, ())

    def test_negations(self) -> None:
        """Negations count in English and Chinese; C{非常} is not one."""
        self.assertEqual(analyse("is it not safe").negations, 1)
        self.assertEqual(analyse("isn't it safe").negations, 1)
        self.assertEqual(analyse("I never eat no meat").negations, 2)
        self.assertEqual(analyse("不要播放").negations, 1)
        self.assertEqual(analyse("我没有钱").negations, 1)
        self.assertEqual(analyse("别走").negations, 1)
        self.assertEqual(analyse("非常好").negations, 0)
        self.assertEqual(analyse("这并非事实").negations, 1)
        self.assertEqual(analyse("非法").negations, 1)

    def test_directions(self) -> None:
        """Where from and where to are marked, so a swap changes the content."""
        self.assertEqual(analyse("convert USD to EUR").tokens, ("convert", "usd", ">eur"))
        self.assertEqual(analyse("flights from Paris to London").tokens,
                         ("flight", "<paris", ">london"))
        self.assertEqual(set(analyse("flights to London from Paris").tokens),
                         {"flight", "<paris", ">london"})
        self.assertNotEqual(set(analyse("从北京到上海").tokens),
                            set(analyse("从上海到北京").tokens))


class SimHashTests(SynchronousTestCase):
    """L{simhash} is a stable 64-bit locality-sensitive hash."""

    def test_stable(self) -> None:
        """
        The same text has the same SimHash in every process (BLAKE2b, not the
        salted C{hash()}): these values were computed once and pinned.
        """
        self.assertEqual(fingerprint("What is the capital of France?").simhash,
                         0x416D44AD2662A749)
        self.assertEqual(fingerprint("北京今天天气怎么样").simhash, 0xCDE81C454A4BE575)

    def test_64_bits(self) -> None:
        """Every SimHash fits in 64 bits, whatever the length of the text."""
        long_text = " ".join(f"word{i} token{i * 7}" for i in range(5000))
        fp = fingerprint(long_text)
        self.assertLess(fp.simhash, 1 << 64)
        self.assertLess(fp.signature, 1 << 64)

    def test_majority(self) -> None:
        """A feature that outweighs the others decides every bit."""
        heavy = simhash([("x", 100), ("y", 1), ("z", 1)])
        self.assertEqual(heavy, simhash([("x", 1)]))

    def test_shingles(self) -> None:
        """Tokens, neighbour pairs and each token's character 3-grams are features."""
        features = dict(shingles(["ab", "cde"]))
        self.assertEqual(features, {"w:ab": 3, "w:cde": 3, "c: cd": 1, "c:cde": 1,
                                    "c:de ": 1, "b:ab cde": 1})

    def test_similarity(self) -> None:
        """C{1 - hamming / 64}."""
        self.assertEqual(similarity(0, 0), 1.0)
        self.assertEqual(similarity(0, (1 << 64) - 1), 0.0)
        self.assertEqual(similarity(0b1011, 0b0001), 1 - 2 / 64)

    def test_near_texts_are_near(self) -> None:
        """A reordered question stays within the default threshold."""
        a = fingerprint("Explain the difference between TCP and UDP")
        b = fingerprint("Explain the difference between UDP and TCP")
        self.assertGreaterEqual(similarity(a.simhash, b.simhash), DEFAULT_THRESHOLD)

    def test_max_distance(self) -> None:
        """The default threshold allows 9 differing bits; out of range is refused."""
        self.assertEqual(max_distance(0.85), 9)
        self.assertEqual(max_distance(1.0), 0)
        self.assertEqual(max_distance(0.0), 64)
        self.assertRaises(ValueError, max_distance, 1.5)


class GuardTests(SynchronousTestCase):
    """L{guard} refuses near-misses that SimHash alone would take."""

    LONG = ("I am planning a trip next spring with my family and we would like to see "
            "museums, parks and old neighbourhoods, eat local food, and avoid crowds. "
            "We have {n} days in {city} and a moderate budget. Please suggest a daily "
            "itinerary, {neg}including the cost of public transport.")

    def long(self, n: str = "5", city: str = "Vienna", neg: str = "") -> Fingerprint:
        return fingerprint(self.LONG.format(n=n, city=city, neg=neg))

    def test_paraphrase_passes(self) -> None:
        """Case, fillers and punctuation pass the guard."""
        self.assertTrue(guard(fingerprint("What's the capital of France?"),
                              fingerprint("could you tell me the capital of france")))

    def test_long_prompt_near_misses(self) -> None:
        """
        In a long prompt one changed city, number or negation leaves the
        SimHash within the threshold, and the guard refuses the hit.
        """
        base = self.long()
        for other in (self.long(city="Prague"), self.long(n="7"), self.long(neg="not ")):
            self.assertGreaterEqual(similarity(base.simhash, other.simhash), DEFAULT_THRESHOLD)
            self.assertFalse(guard(base, other))
        self.assertTrue(guard(base, self.long()))

    def test_short_near_misses(self) -> None:
        """City, number, negation and entity changes, English and Chinese."""
        pairs = [
            ("What's the weather in Paris today?", "What's the weather in Lyon today?"),
            ("Convert 100 USD to EUR", "Convert 200 USD to EUR"),
            ("Convert 100 USD to EUR", "Convert 100 EUR to USD"),
            ("Is it safe to eat raw eggs?", "Is it not safe to eat raw eggs?"),
            ("北京今天天气怎么样", "南京今天天气怎么样"),
            ("生鸡蛋可以吃吗", "生鸡蛋不可以吃吗"),
            ("一根香蕉有多少卡路里", "三根香蕉有多少卡路里"),
        ]
        for a, b in pairs:
            self.assertFalse(guard(fingerprint(a), fingerprint(b)), (a, b))

    def test_symbols(self) -> None:
        """Symbols are content: C{C#} and C{C++} are not C{C}."""
        for a, b in [("How do I learn C#?", "How do I learn C?"), ("learn c++", "learn c"),
                     ("what is 15% of 80", "what is 15 of 80")]:
            self.assertFalse(guard(fingerprint(a), fingerprint(b)), (a, b))
        self.assertTrue(guard(fingerprint("learn C#"), fingerprint("LEARN c# please")))

    def test_scope(self) -> None:
        """The same prompt in another scope (agent, model) never passes."""
        self.assertTrue(guard(fingerprint("hello world", "agent-a"),
                              fingerprint("Hello, world!", "agent-a")))
        self.assertFalse(guard(fingerprint("hello world", "agent-a"),
                               fingerprint("hello world", "agent-b")))

    def test_nothing_to_compare(self) -> None:
        """Greetings and thanks have no content and never match each other."""
        self.assertEqual(fingerprint("Hi!").signature, 0)
        self.assertFalse(guard(fingerprint("Hi!"), fingerprint("thanks")))
        self.assertFalse(guard(fingerprint("你好"), fingerprint("谢谢")))


class IndexTests(SynchronousTestCase):
    """L{SemanticIndex}: banded candidates, the best match, add and remove."""

    def test_add_lookup_remove(self) -> None:
        """An added prompt is found by a paraphrase, and no more once removed."""
        index = SemanticIndex()
        self.assertTrue(index.add("e1", fingerprint("What's the weather in Paris today?")))
        self.assertEqual(len(index), 1)
        query = fingerprint("could you tell me the weather in paris today")
        self.assertEqual(index.lookup(query), ("e1", 1.0))
        self.assertIsNone(index.lookup(fingerprint("What's the weather in Rome today?")))
        self.assertTrue(index.remove("e1"))
        self.assertFalse(index.remove("e1"))
        self.assertIsNone(index.lookup(query))
        self.assertEqual(index._buckets, {})
        self.assertEqual(index._signatures, {})

    def test_replace(self) -> None:
        """Adding an id again replaces its fingerprint."""
        index = SemanticIndex()
        index.add("e1", fingerprint("capital of France"))
        index.add("e1", fingerprint("capital of Spain"))
        self.assertEqual(len(index), 1)
        self.assertIsNone(index.lookup(fingerprint("capital of France")))
        self.assertEqual(index.lookup(fingerprint("capital of Spain")), ("e1", 1.0))
        self.assertEqual(len(index._buckets), BANDS)

    def test_not_indexed_without_content(self) -> None:
        """A prompt with nothing to compare is neither indexed nor looked up."""
        index = SemanticIndex()
        self.assertFalse(index.add("e1", fingerprint("thanks!")))
        self.assertEqual(len(index), 0)
        self.assertIsNone(index.lookup(fingerprint("thanks!")))

    def test_best_match(self) -> None:
        """Of several candidates within the threshold, the closest wins."""
        index = SemanticIndex()
        base = 0x0123456789ABCDEF
        index.add("far", Fingerprint(flip(base, 0, 20, 40, 50, 60), 7))
        index.add("near", Fingerprint(flip(base, 33, 63), 7))
        index.add("other-guard", Fingerprint(base, 8))
        self.assertEqual(index.lookup(Fingerprint(base, 7)), ("near", 1 - 2 / 64))
        index.remove("near")
        self.assertEqual(index.lookup(Fingerprint(base, 7)), ("far", 1 - 5 / 64))

    def test_threshold(self) -> None:
        """Nine bits apart hit at 0.85 and miss at 0.9."""
        index = SemanticIndex()
        base = 0xFEDCBA9876543210
        index.add("e", Fingerprint(flip(base, *range(0, 64, 7)), 3))  # 10 bits
        index.add("e9", Fingerprint(flip(base, *range(0, 63, 7)), 3))  # 9 bits
        self.assertEqual(index.lookup(Fingerprint(base, 3), 0.85), ("e9", 1 - 9 / 64))
        self.assertIsNone(index.lookup(Fingerprint(base, 3), 0.9))

    def test_band_candidates_only(self) -> None:
        """
        An entry two bits away in every band is not a candidate, so even a
        threshold of 0 does not find it: lookups never scan every entry.
        """
        index = SemanticIndex()
        base = 0
        bits = []
        start = 0
        for width in semantic.BAND_WIDTHS:
            bits += [start, start + 1]
            start += width
        index.add("apart", Fingerprint(flip(base, *bits), 5))
        index.add("close", Fingerprint(flip(base, 1, 14, 27, 40, 52, 60, 61), 5))
        query = Fingerprint(base, 5)
        self.assertEqual(index.candidates(query), {"close"})
        self.assertEqual(index.lookup(query, 0.0), ("close", 1 - 7 / 64))
        index.remove("close")
        self.assertIsNone(index.lookup(query, 0.0))

    def test_buckets_read(self) -> None:
        """
        A lookup whose signature no entry has reads no bucket; an identical
        SimHash is found in the bands' own buckets; anything else also reads
        their 1-bit neighbours.
        """
        index = SemanticIndex()
        index.add("e", Fingerprint(0, 5))
        read: list[int] = []
        real = index._read

        def counting(keys):
            keys = list(keys)
            read.append(len(keys))
            return real(keys)

        index._read = counting  # type: ignore[method-assign]
        self.assertIsNone(index.lookup(Fingerprint(0, 6), 0.0))
        self.assertEqual(read, [])
        self.assertEqual(index.lookup(Fingerprint(0, 5)), ("e", 1.0))
        self.assertEqual(read, [BANDS])
        del read[:]
        self.assertEqual(index.lookup(Fingerprint(1, 5)), ("e", 1 - 1 / 64))
        self.assertEqual(read, [BANDS, len(probe_keys(Fingerprint(1, 5)))])

    def test_probe_guarantee(self) -> None:
        """
        Every entry within 9 bits (the default threshold) is a candidate:
        1,000 random fingerprints, each at a random distance up to 9.
        """
        rng = random.Random(9)
        index = SemanticIndex()
        for n in range(1000):
            base = rng.getrandbits(64)
            distance = rng.randint(0, 9)
            stored = flip(base, *rng.sample(range(64), distance))
            index.add(n, Fingerprint(stored, 1 + n))
            self.assertEqual(index.lookup(Fingerprint(base, 1 + n)),
                             (n, 1 - distance / 64))

    def test_keys(self) -> None:
        """One bucket per band; a lookup reads each band's and its 1-bit neighbours."""
        fp = Fingerprint(0xDEADBEEF, 42)
        self.assertEqual(len(set(band_keys(fp))), BANDS)
        probes = probe_keys(fp)
        self.assertEqual(len(set(probes)), sum(w + 1 for w in semantic.BAND_WIDTHS))
        self.assertTrue(set(band_keys(fp)) <= set(probes))
        other = Fingerprint(0xDEADBEEF, 43)
        self.assertFalse(set(band_keys(other)) & set(probes))

    def test_clear(self) -> None:
        """L{SemanticIndex.clear} forgets everything."""
        index = SemanticIndex()
        index.add(1, fingerprint("capital of France"))
        index.clear()
        self.assertEqual(len(index), 0)
        self.assertNotIn(1, index)
        self.assertIsNone(index.lookup(fingerprint("capital of France")))


class QualityTests(SynchronousTestCase):
    """The labelled pairs, as C{bench/semantic_quality.py} scores them."""

    def setUp(self) -> None:
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        self.addCleanup(sys.path.remove, os.path.join(ROOT, "bench"))
        import semantic_quality

        self.quality = semantic_quality

    def test_the_set(self) -> None:
        """At least 300 pairs, English and Chinese, hits and near-misses."""
        pairs = self.quality.load()
        self.assertGreaterEqual(len(pairs), 300)
        for lang in ("en", "zh"):
            for hit in (True, False):
                self.assertGreaterEqual(
                    sum(1 for p in pairs if p["lang"] == lang and p["hit"] is hit), 100)
        kinds = {p["kind"] for p in pairs if not p["hit"]}
        self.assertTrue({"city", "number", "negation", "entity"} <= kinds)

    def test_precision_recall(self) -> None:
        """
        At the default threshold: precision >= 0.97 and recall >= 0.6, on the
        whole set and on its held-out part.
        """
        results = self.quality.evaluate(self.quality.load(), DEFAULT_THRESHOLD)
        for part in (results, [r for r in results if r["split"] == "heldout"]):
            figures = self.quality.score(part)
            self.assertGreaterEqual(figures["precision"], 0.97, figures)
            self.assertGreaterEqual(figures["recall"], 0.6, figures)
