"""
The semantic cache's matching: text normalisation, a 64-bit SimHash over
character and word shingles, a guard against near-misses, and a banded index
that finds the most similar cached prompt without scanning every entry.

How a prompt becomes a L{Fingerprint}
=====================================
1. I{Normalise} (L{normalise}): NFKC (full-width letters, digits and
   punctuation become their ASCII forms), case folding, curly quotes made
   straight, English contractions expanded (C{what's} -> C{what is},
   C{don't} -> C{do not}), punctuation dropped, whitespace collapsed.
2. I{Tokenise} (L{analyse}): English words are lightly stemmed (plurals,
   C{-ing}, C{-ed}, British C{-our}/C{-ise}); runs of CJK characters, written
   without spaces, become one token per character, except a few multi-
   character words that are folded to one canonical token (C{如何}, C{怎样},
   C{怎么样} -> C{怎么}). Number words (C{five}, C{二十五}) and digits
   become one number token each, so C{5} and C{five} are the same.
3. I{Drop fillers}: politeness and question framing that do not change what
   is asked (C{please}, C{could you tell me}, C{the}, C{请问}, C{麻烦}, C{一下},
   C{吗}, C{的}). What remains are the I{content tokens}.
   Direction survives: the content word after C{from}, and after a C{to}
   that follows a content word, is marked (C{usd to eur} -> C{usd},
   C{>eur}), so "USD to EUR" and "EUR to USD" differ.
4. I{SimHash} (L{simhash}) over the content tokens' shingles (L{shingles}):
   each token, each pair of neighbouring tokens and the character 3-grams
   of each token, hashed with 8-byte BLAKE2b. Similarity is
   C{1 - hamming / 64}.
5. I{Guard signature}: an 8-byte hash of the I{scope} (what must match
   exactly: model, agent, route), the I{set} of content tokens, the
   multiset of numbers and the count of negations (C{not}, C{no}, C{never},
   C{不}, C{没}, C{别}, C{非}, ...).

When two prompts hit
====================
A hit needs both: SimHash similarity >= the threshold I{and} equal guard
signatures. SimHash alone scores "the weather in Paris" and "the weather in
Rome" as near twins, and "is it safe" and "is it not safe" as closer still;
the guard refuses a hit when a number, a negation or any content word
differs. So a paraphrase may change case, punctuation, spacing, full-width
forms, politeness fillers, contractions, number spelling and word order (as
long as the SimHash stays within the threshold); it may not change what is
asked about. Synonyms outside the small canonical tables miss: a miss costs
one upstream call, a wrong hit serves a wrong answer, and the cache is built
for the second to be rare (precision >= 0.97 on C{tests/data/
semantic_pairs.jsonl}, see C{bench/semantic_quality.py}).

A prompt with no content token at all ("hi", "thanks!") never hits: there
is nothing to compare.

What it does not see: who does what to whom when no direction word says
so ("man bites dog", "100美元等于多少人民币" / "100人民币等于多少美元" share
their words, and their SimHashes are close); synonyms outside the tables.
On the labelled set, precision is the guard's work: SimHash alone at 0.85
scores 0.88, with the guard 0.997 (C{bench/semantic_quality.py
--no-guard}); the threshold then decides how much word order may change.

The index
=========
L{SemanticIndex} splits the 64 bits into L{BANDS} bands (13, 13, 13, 13 and
12 bits). An entry sits in one bucket per band, keyed by the band's number,
its bits and the entry's signature. A lookup reads each band's own bucket
and the buckets one bit away (multi-probe, L{probe_keys}): two fingerprints
at most 9 bits apart (the default threshold) have, by pigeonhole, a band at
most one bit apart, so every entry within the default threshold is found,
and only entries with the same signature can be (they are the only ones the
guard lets through anyway). Farther thresholds find farther entries often,
not always. It never scans the entries: a lookup whose signature no entry
has stops after one dict probe (most misses); one whose SimHash is identical
to an entry's stops after the C{BANDS} own buckets; otherwise it reads
C{sum(width + 1) = 69} buckets, nearly all empty. Each entry costs its
fingerprint (two ints) and C{BANDS} dict slots, whatever the prompt's length.

L{clawproxy.cache.semantic_store.StoredSemanticIndex} keeps the same
buckets in the state store, for gateways sharing a Redis.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
import struct
import unicodedata
from collections.abc import Hashable, Iterable, Iterator
from typing import NamedTuple

#: The default C{routes[].cache.threshold} (SPEC): a hit needs at least this
#: SimHash similarity, i.e. at most 9 of 64 bits differ.
DEFAULT_THRESHOLD = 0.85

#: The bands of the index: bits in each (they cover the 64 bits).
BAND_WIDTHS = (13, 13, 13, 13, 12)
BANDS = len(BAND_WIDTHS)
_BAND_LAYOUT = [(i, sum(BAND_WIDTHS[:i]), (1 << w) - 1) for i, w in enumerate(BAND_WIDTHS)]
_BAND_BITS_OF = [[1 << b for b in range(w)] for w in BAND_WIDTHS]

_MASK64 = (1 << 64) - 1


class Fingerprint(NamedTuple):
    """
    What the index keeps of a prompt.

    @ivar simhash: the 64-bit SimHash of the content shingles.
    @ivar signature: the 64-bit guard signature (scope, content set,
        numbers, negations), or C{0} when the prompt has nothing to compare
        (it never hits).
    """

    simhash: int
    signature: int


class Analysis(NamedTuple):
    """
    A prompt taken apart (L{analyse}).

    @ivar tokens: the content tokens in order (fillers dropped, numbers as
        C{#N}, negations as C{~not}).
    @ivar numbers: the number values, sorted.
    @ivar negations: how many negation words.
    @ivar content: the content words and symbols (the tokens that are not
        numbers or negations), sorted, each once.
    """

    tokens: tuple[str, ...]
    numbers: tuple[str, ...]
    negations: int
    content: tuple[str, ...] = ()


# --- normalisation -----------------------------------------------------------

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201b": "'", "\u2032": "'",
                         "\u201c": '"', "\u201d": '"', "\u3000": " "})

_CONTRACTIONS = [
    (re.compile(r"\bwon't\b"), "will not"),
    (re.compile(r"\bcan't\b"), "can not"),
    (re.compile(r"\bcannot\b"), "can not"),
    (re.compile(r"\bain't\b"), "is not"),
    (re.compile(r"\bshan't\b"), "shall not"),
    (re.compile(r"n't\b"), " not"),
    (re.compile(r"'re\b"), " are"),
    (re.compile(r"'m\b"), " am"),
    (re.compile(r"'ll\b"), " will"),
    (re.compile(r"'ve\b"), " have"),
    (re.compile(r"'d\b"), " would"),
    (re.compile(r"\b(what|where|who|how|when|why|which|there|here|that|it|he|she)'s\b"),
     r"\1 is"),
    (re.compile(r"'s\b"), ""),  # possessive: "france's capital" -> "france capital"
    (re.compile(r"s'(?=\s|$)"), "s"),
]

_CJK = (r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
        r"\u3005\u3006\u3007")
# numbers (digits with , or . groups), CJK runs, words (letters, inner ' or -):
# "iphone15" and "6pm" are two tokens each, as "iphone 15" and "6 pm" are
_TOKEN = re.compile(
    r"(?P<num>\d+(?:[.,]\d+)*)"
    rf"|(?P<cjk>[{_CJK}]+)"
    rf"|(?P<word>[^\W\d_{_CJK}]+(?:['\-][^\W\d_{_CJK}]+)*)"
    r"|(?P<other>\S)"
)
#: Punctuation that changes what is asked (C{15%}), kept like a symbol.
_KEPT_PUNCTUATION = frozenset("%#@&")


def normalise(text: str) -> str:
    """
    The comparable form of C{text}: NFKC, case folded, contractions
    expanded, punctuation dropped, words, numbers and symbols separated by
    one space, CJK without spaces. Used for display and tests; matching uses
    L{analyse}.
    """
    out: list[str] = []
    previous = ""
    for kind, value in _raw_tokens(text):
        if kind == "cjk" and previous == "cjk":
            out[-1] += value  # "北京 今天" is "北京今天": CJK is written without spaces
        else:
            out.append(value)
        previous = kind
    return " ".join(out)


def _raw_tokens(text: str) -> Iterator[tuple[str, str]]:
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES).casefold()
    if "'" in text or "cannot" in text:
        for pattern, replacement in _CONTRACTIONS:
            text = pattern.sub(replacement, text)
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        value = match.group()
        if kind == "other":
            if unicodedata.category(value)[0] != "S" and value not in _KEPT_PUNCTUATION:
                continue  # punctuation (and anything not a symbol) is dropped
        elif kind == "word":
            value = value.strip("'-")
        yield kind, value


# --- English ----------------------------------------------------------------

#: Politeness, framing and function words that do not change what is asked.
EN_FILLERS = frozenset("""
a an the please pls plz kindly could would can you me i i'd we us my our your
tell know like want wanna need help let give show just hey hi hello thanks thank
is are am be been being do does did to of for in on at about what which
this that these those it its there here so um uh well actually really
some any and also exactly quick quickly briefly maybe possible way
""".split())

_DIRECTIONS = {"from": "<", "to": ">", "into": ">"}
_WH = frozenset("how why when where who whom whose".split())

#: Words that negate (after contractions are expanded).
EN_NEGATIONS = frozenset("not no never none nothing nobody neither nor without".split())

#: A few canonical forms (after stemming).
EN_SYNONYMS = {
    "whats": "what", "hows": "how", "u": "you", "ur": "your", "r": "are",
    "colour": "color", "favourite": "favorite", "centre": "center", "metre": "meter",
    "litre": "liter", "theatre": "theater", "programme": "program",
    "cheapest": "cheap", "biggest": "big", "largest": "large", "smallest": "small",
    "fastest": "fast", "tallest": "tall", "longest": "long", "best": "good",
    "better": "good", "worse": "bad", "worst": "bad",
}

_EN_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen"
    " fourteen fifteen sixteen seventeen eighteen nineteen".split())}
_EN_TENS = {w: 10 * i for i, w in enumerate(
    "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if w != "_"}
_ONE_PRONOUN = frozenset("which this that each every any no another the one".split())
_EN_SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9}


def _stem(word: str) -> str:
    """A light English stemmer: enough to fold plurals and common suffixes."""
    if not word.isalpha() or len(word) <= 3:
        return word
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith(("sses", "shes", "ches", "xes")):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    if word.endswith("ing") and len(word) > 5:
        word = word[:-3]
    elif word.endswith("ed") and len(word) > 4:
        word = word[:-2]
    if word.endswith("our") and len(word) > 4:
        word = word[:-3] + "or"
    if word.endswith(("ise", "ize")) and len(word) > 5:
        word = word[:-3] + "iz"
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiouls":
        word = word[:-1]  # "running" -> "runn" -> "run"
    if word.endswith("e") and len(word) > 3:
        word = word[:-1]  # "make"/"making" -> "mak"/"mak"
    return word


def _canonical_number(text: str) -> str:
    """C{"1,000"} -> C{"1000"}, C{"3.50"} -> C{"3.5"}, C{"007"} -> C{"7"}."""
    if re.fullmatch(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):
        text = text.replace(",", "")
    text = text.replace(",", ".") if text.count(",") == 1 and "." not in text else text
    if "." in text:
        whole, _, frac = text.partition(".")
        frac = frac.rstrip("0")
        whole = whole.lstrip("0") or "0"
        return f"{whole}.{frac}" if frac else whole
    return text.lstrip("0") or "0"


def _english_numbers(words: list[str]) -> list[tuple[str, str]]:
    """Fold runs of number words (C{twenty five}) into one C{num} token."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w == "one" and (i + 1 == len(words) or words[i + 1] not in _EN_SCALES) and (
                i and words[i - 1] in _ONE_PRONOUN):
            i += 1  # "which one", "this one": a pronoun, not a number
            continue
        if w in _EN_UNITS or w in _EN_TENS:
            total, current, j = 0, 0, i
            while j < len(words):
                v = words[j]
                if v in _EN_UNITS:
                    current += _EN_UNITS[v]
                elif v in _EN_TENS:
                    current += _EN_TENS[v]
                elif v in _EN_SCALES and j > i:
                    scale = _EN_SCALES[v]
                    if scale == 100:
                        current *= 100
                    else:
                        total += current * scale
                        current = 0
                elif v == "and" and j + 1 < len(words) and (
                        words[j + 1] in _EN_UNITS or words[j + 1] in _EN_TENS):
                    pass
                else:
                    break
                j += 1
            out.append(("num", str(total + current)))
            i = j
        else:
            out.append(("word", w))
            i += 1
    return out


# --- Chinese (and other CJK) ------------------------------------------------

#: Multi-character words folded to one canonical token; C{""} drops them.
CJK_PHRASES = {
    # politeness and framing
    "请问": "", "请": "", "麻烦你": "", "麻烦您": "", "麻烦": "", "能不能": "",
    "能否": "", "可不可以": "", "可以": "", "帮我": "", "帮忙": "", "一下": "",
    "告诉我": "", "告诉": "", "知道": "", "我想": "", "想问": "", "谢谢": "",
    "你好": "", "您好": "", "是否": "", "到底": "", "呢": "", "吗": "", "吧": "",
    "啊": "", "呀": "", "嘛": "", "的": "", "了": "", "是": "", "你": "", "您": "",
    "我": "", "们": "", "什么": "", "啥": "", "哪个": "", "给我": "", "给": "",
    "能": "", "需要": "", "要": "", "会": "", "都": "", "在": "",
    # question words with several spellings
    "怎么": "怎么", "怎么样": "怎么", "怎样": "怎么", "如何": "怎么", "咋样": "怎么", "咋": "怎么",
    "为什么": "为什么", "为啥": "为什么", "为何": "为什么",
    "哪儿": "哪里", "哪里": "哪里", "哪一": "哪里", "哪": "哪里",
    # not negations, not numbers
    "非常": "非常", "无论": "无论", "千万": "千万", "万一": "万一", "十分": "十分",
    "一些": "一些", "一样": "一样", "一起": "一起", "一直": "一直", "一定": "一定",
    "一般": "一般", "统一": "统一", "唯一": "唯一", "一切": "一切", "一点": "一点",
    "不过": "不过",
    # not directions
    "收到": "收到", "看到": "看到", "找到": "找到", "得到": "得到", "遇到": "遇到",
    "达到": "达到", "听到": "听到", "想到": "想到", "感到": "感到", "做到": "做到",
    "用到": "用到", "迟到": "迟到", "直到": "直到", "从来": "从来", "从前": "从前",
    "从事": "从事", "自从": "自从",
}
#: Words marking where from (C{<}) and where to (C{>}) the next content is.
CJK_DIRECTIONS = {"从": "<", "到": ">"}
#: Characters and words that negate.
CJK_NEGATIONS = frozenset("不 没 没有 别 非 无 未 莫 勿 否 甭 并非".split())

_CJK_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4,  # noqa: RUF001
               "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_CJK_SCALES = {"十": 10, "百": 100, "千": 1000, "万": 10**4, "亿": 10**8}
_CJK_NUMERAL = "".join(_CJK_DIGITS) + "".join(_CJK_SCALES)
_CJK_SPLIT = re.compile(
    "(" + "|".join(sorted((re.escape(p) for p in CJK_PHRASES), key=len, reverse=True))
    + "|没有|并非|[" + _CJK_NUMERAL + "]+|.)")


def _cjk_number(run: str) -> str:
    """C{三十五} -> C{35}, C{两千零八} -> C{2008}, C{二〇二四} -> C{2024}."""
    if all(ch in _CJK_DIGITS for ch in run):
        return str(int("".join(str(_CJK_DIGITS[ch]) for ch in run)))
    total, section, digit = 0, 0, 0
    for ch in run:
        if ch in _CJK_DIGITS:
            digit = _CJK_DIGITS[ch]
        else:
            scale = _CJK_SCALES[ch]
            if scale >= 10**4:
                total += ((section + digit) or 1) * scale
                section = 0
            else:
                section += (digit or 1) * scale
            digit = 0
    return str(total + section + digit)


def _cjk_tokens(run: str) -> Iterator[tuple[str, str]]:
    for piece in _CJK_SPLIT.findall(run):
        if piece in CJK_PHRASES:
            if CJK_PHRASES[piece]:
                yield "word", CJK_PHRASES[piece]
        elif piece in CJK_NEGATIONS:
            yield "neg", piece
        elif piece in CJK_DIRECTIONS:
            yield "dir", CJK_DIRECTIONS[piece]
        elif piece[0] in _CJK_NUMERAL:
            yield "num", _cjk_number(piece)
        else:
            yield "word", piece


# --- analysis ------------------------------------------------------------------

def analyse(text: str) -> Analysis:
    """
    Take C{text} apart into content tokens, numbers and negations (see the
    module docstring).
    """
    raw: list[tuple[str, str]] = []
    words: list[str] = []

    def flush() -> None:
        if words:
            raw.extend(_english_numbers(words))
            words.clear()

    for kind, value in _raw_tokens(text):
        if kind == "word":
            words.append(value)
            continue
        flush()
        if kind == "cjk":
            raw.extend(_cjk_tokens(value))
        else:
            raw.append((kind, value))
    flush()

    tokens: list[str] = []
    numbers: list[str] = []
    content: set[str] = set()
    negations = 0
    mark = ""  # "<" after "from", ">" after a "to" that follows content
    previous_content = False
    for kind, value in raw:
        if kind == "word" and value in _DIRECTIONS:
            if value == "from" or previous_content:
                mark = _DIRECTIONS[value]
            continue
        if kind == "dir":
            mark = value
            continue
        if kind == "num":
            value = _canonical_number(value)
            numbers.append(value)
            tokens.append("#" + value)
        elif kind == "neg":
            negations += 1
            tokens.append("~not")
        elif kind == "other":
            tokens.append(value)
            content.add(value)
        elif value in EN_NEGATIONS:
            negations += 1
            tokens.append("~not")
        elif (value := EN_SYNONYMS.get(value, value)) in EN_FILLERS:
            continue
        else:
            stem = _stem(value)
            value = EN_SYNONYMS.get(stem, stem)
            previous_content = value not in _WH
            tokens.append(mark + value)
            content.add(mark + value)
            mark = ""
            continue
        previous_content = False
        mark = ""
    return Analysis(tuple(tokens), tuple(sorted(numbers)), negations, tuple(sorted(content)))


# --- SimHash -------------------------------------------------------------------

# Bit-sliced accumulation: a feature's 64 hash bits are spread into 64 fields
# of 32 bits of one big int (field i holds bit i), so adding a feature to
# every bit's counter is one big-int addition, done in C by sum().
_FIELD = 32
_BYTE_SPREAD = [
    b"".join((b >> i & 1).to_bytes(_FIELD // 8, "little") for i in range(8)) for b in range(256)]


_COUNTS = struct.Struct("<64I")


@functools.lru_cache(maxsize=4096)  # about 300 bytes each: the common words
def _spread(feature: str) -> int:
    digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(b"".join([_BYTE_SPREAD[b] for b in digest]), "little")


def shingles(tokens: Iterable[str]) -> Iterator[tuple[str, int]]:
    """
    The weighted features of a token sequence. Word shingles: each token
    (weight 3) and each pair of neighbouring tokens (weight 1, the only
    features that see word order). Character shingles: the 3-grams of each
    token padded with spaces (weight 1; they make spelling variants close),
    and for CJK, where tokens are single characters, each pair of
    neighbouring characters is the pair feature above.
    """
    tokens = list(tokens)
    for token in tokens:
        yield "w:" + token, 3
        if len(token) > 2:
            padded = " " + token + " "
            for i in range(len(padded) - 2):
                yield "c:" + padded[i:i + 3], 1
    for first, second in itertools.pairwise(tokens):
        yield "b:" + first + " " + second, 1


def simhash(features: Iterable[tuple[str, int]]) -> int:
    """
    The 64-bit SimHash of weighted features: bit C{i} is set when the
    features whose hash has bit C{i} set outweigh those where it is clear.
    Stable across processes and machines (BLAKE2b, not C{hash()}).
    """
    by_weight: dict[int, list[str]] = {}
    for feature, weight in features:
        by_weight.setdefault(weight, []).append(feature)
    total = 0
    acc = 0
    for weight, names in by_weight.items():
        total += weight * len(names)
        acc += weight * sum(map(_spread, names))
    if not total:
        return 0
    counts = _COUNTS.unpack(acc.to_bytes(64 * _FIELD // 8, "little"))
    return int("".join(["1" if 2 * count > total else "0" for count in reversed(counts)]), 2)


def similarity(a: int, b: int) -> float:
    """C{1 - hamming(a, b) / 64}."""
    return 1.0 - ((a ^ b) & _MASK64).bit_count() / 64


def _hash64(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode("utf-8"), digest_size=8).digest(), "big")


def fingerprint(text: str, scope: str = "") -> Fingerprint:
    """
    The L{Fingerprint} of a prompt.

    @param text: the prompt (for a chat: the messages' text, joined).
    @param scope: what must be equal for a hit besides the text (the model,
        the agent unless the route is shared, the route); two fingerprints of
        different scopes never match.
    """
    analysis = analyse(text)
    signature = 0
    if analysis.content or analysis.numbers:
        signature = _hash64("\x1f".join([
            scope, " ".join(analysis.content), " ".join(analysis.numbers),
            str(analysis.negations)])) or 1
    return Fingerprint(simhash(shingles(analysis.tokens)), signature)


def guard(a: Fingerprint, b: Fingerprint) -> bool:
    """
    Whether C{a} and C{b} may match at all: same scope, content words,
    numbers and negations (the signature), and something to compare.
    """
    return a.signature != 0 and a.signature == b.signature


def max_distance(threshold: float) -> int:
    """The most differing bits a similarity of C{threshold} allows."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within 0..1, not {threshold!r}")
    return int(64 * (1.0 - threshold) + 1e-9)


def band_keys(fp: Fingerprint) -> list[int]:
    """
    The keys of C{fp}'s buckets, one per band: the signature, the band's
    number and its bits, folded into one int.
    """
    base = fp.signature << 20
    h = fp.simhash
    return [base | (i << 16) | ((h >> shift) & mask) for i, shift, mask in _BAND_LAYOUT]


def probe_keys(fp: Fingerprint) -> list[int]:
    """
    The buckets a lookup reads: each band's own and the ones a single bit
    away (multi-probe), C{sum(width + 1)} keys. Two fingerprints at most
    C{2 * BANDS - 1} bits apart have a band at most one bit apart, so this
    finds every entry within the default threshold.
    """
    base = fp.signature << 20
    h = fp.simhash
    keys = []
    for i, shift, mask in _BAND_LAYOUT:
        key = base | (i << 16) | ((h >> shift) & mask)
        keys.append(key)
        keys += map(key.__xor__, _BAND_BITS_OF[i])
    return keys


# --- the index -------------------------------------------------------------------

class SemanticIndex:
    """
    A banded SimHash index in memory (see the module docstring).

    A bucket holds a single entry id as it is, or a list of ids once it has
    several, so a typical entry costs one dict slot per band. A count of the
    entries of each signature lets a lookup whose content words no entry
    has (most misses) stop after one dict probe instead of C{BANDS * 14}.
    """

    def __init__(self) -> None:
        self._entries: dict[Hashable, Fingerprint] = {}
        self._buckets: dict[int, object] = {}
        self._signatures: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: Hashable) -> bool:
        return entry_id in self._entries

    def add(self, entry_id: Hashable, fp: Fingerprint) -> bool:
        """
        Index C{fp} under C{entry_id} (replacing what that id had).

        @return: whether it was indexed: a fingerprint with nothing to
            compare (signature C{0}) is not.
        """
        if entry_id in self._entries:
            self.remove(entry_id)
        if not fp.signature:
            return False
        self._entries[entry_id] = fp
        self._signatures[fp.signature] = self._signatures.get(fp.signature, 0) + 1
        buckets = self._buckets
        for key in band_keys(fp):
            held = buckets.get(key)
            if held is None:
                buckets[key] = entry_id
            elif type(held) is list:
                held.append(entry_id)
            else:
                buckets[key] = [held, entry_id]
        return True

    def remove(self, entry_id: Hashable) -> bool:
        """Forget C{entry_id}. @return: whether it was indexed."""
        fp = self._entries.pop(entry_id, None)
        if fp is None:
            return False
        left = self._signatures.pop(fp.signature) - 1
        if left:
            self._signatures[fp.signature] = left
        buckets = self._buckets
        for key in band_keys(fp):
            held = buckets.get(key)
            if type(held) is list:
                held.remove(entry_id)
                if len(held) == 1:
                    buckets[key] = held[0]
            elif held == entry_id:
                del buckets[key]
        return True

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
        self._buckets.clear()
        self._signatures.clear()

    def _read(self, keys: Iterable[int]) -> set[Hashable]:
        found: set[Hashable] = set()
        for held in map(self._buckets.get, keys):
            if held is None:
                continue
            if type(held) is list:
                found.update(held)
            else:
                found.add(held)
        return found

    def candidates(self, fp: Fingerprint) -> set[Hashable]:
        """The ids in the buckets a lookup of C{fp} reads (L{probe_keys})."""
        return self._read(probe_keys(fp))

    def _best(self, fp: Fingerprint, ids: Iterable[Hashable],
              best: Hashable, best_distance: int) -> tuple[Hashable, int]:
        entries = self._entries
        for entry_id in ids:
            other = entries[entry_id]
            if other.signature != fp.signature:
                continue
            distance = (other.simhash ^ fp.simhash).bit_count()
            if distance < best_distance:
                best, best_distance = entry_id, distance
        return best, best_distance

    def lookup(self, fp: Fingerprint,
               threshold: float = DEFAULT_THRESHOLD) -> tuple[Hashable, float] | None:
        """
        The most similar entry that passes the guard with a similarity of at
        least C{threshold}, among the candidates (never a scan of every
        entry). Of equally similar entries, any one.

        Reads the C{BANDS} own buckets first: an identical SimHash there
        cannot be beaten, which spares the 1-bit neighbours (the common hit:
        a paraphrase that normalises to the same text).

        @return: C{(entry_id, similarity)}, or L{None}.
        """
        if fp.signature not in self._signatures:
            return None  # no entry has these content words: nothing can pass the guard
        limit = max_distance(threshold)
        best, best_distance = self._best(fp, self._read(band_keys(fp)), None, limit + 1)
        if best_distance:
            best, best_distance = self._best(fp, self.candidates(fp), best, best_distance)
        if best is None:
            return None
        return best, 1.0 - best_distance / 64
