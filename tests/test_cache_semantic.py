"""
Semantic lookup in the data plane (L{clawproxy.web.semantic_cache}): a
paraphrase of the last user message, in the same context, is a
C{SEMANTIC-HIT}; another agent's, another city's or another context's is not.

Runs once both the index (L{clawproxy.cache.semantic}, built beside this
branch) and C{routes[].cache.semantic} are in.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from clawproxy.config import ConfigError
from clawproxy.web.semantic_cache import last_user_text
from tests.test_cache import KEY_A, KEY_B, CacheHarness, config


def ask_about(content: str, system: str = "You are terse.") -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "system", "content": system},
                                       {"role": "user", "content": content}]}


class TextTests(SynchronousTestCase):
    def test_last_user_text(self) -> None:
        """The last user message is the text; the rest of the body is kept apart."""
        body = {"model": "m", "messages": [{"role": "user", "content": "first"},
                                           {"role": "assistant", "content": "ok"},
                                           {"role": "user", "content": [
                                               {"type": "text", "text": "second"}]}]}
        text, rest = last_user_text(body)
        self.assertEqual(text, "second")
        self.assertEqual(rest["messages"][2]["content"], None)
        self.assertEqual(rest["messages"][0]["content"], "first")
        self.assertEqual(last_user_text({"prompt": "p"}), ("p", {"prompt": None}))
        self.assertIsNone(last_user_text({"messages": [{"role": "system", "content": "s"}]}))


class SemanticTests(SynchronousTestCase):
    def setUp(self) -> None:
        try:
            import clawproxy.cache.semantic  # noqa: F401
        except ImportError:
            raise SkipTest("clawproxy.cache.semantic is not in this tree yet") from None
        try:
            self.gw = CacheHarness(self, config({"ttl": "1m", "semantic": True}))
        except ConfigError:
            raise SkipTest("routes[].cache.semantic is still refused") from None

    def test_paraphrase_hits(self) -> None:
        """A paraphrase hits (SEMANTIC-HIT, the stored answer); a near-miss does not."""
        gw = self.gw
        first = gw.ask(ask_about("What is the weather in Paris today?"))
        self.assertEqual(first.header("X-Cache"), "MISS")
        again = gw.ask(ask_about("what's the weather in paris today"))
        self.assertEqual(again.header("X-Cache"), "SEMANTIC-HIT")
        self.assertEqual(again.body, first.body)
        self.assertEqual(gw.ask(ask_about("What is the weather in Rome today?"))
                         .header("X-Cache"), "MISS")
        self.assertEqual(gw.sample("cache_requests_total", route="/v1/*",
                                   result="semantic_hit"), 1)

    def test_isolation(self) -> None:
        """Agent A's answer is not agent B's, however close the question."""
        gw = self.gw
        gw.ask(ask_about("What is the weather in Paris today?"), key=KEY_A)
        other = gw.ask(ask_about("what's the weather in paris today"), key=KEY_B)
        self.assertEqual(other.header("X-Cache"), "MISS")
        self.assertEqual(gw.llm.calls, 2)

    def test_context_counts(self) -> None:
        """The same question under another system prompt is another request."""
        gw = self.gw
        gw.ask(ask_about("What is the weather in Paris today?"))
        other = gw.ask(ask_about("what's the weather in paris today", system="Be verbose."))
        self.assertEqual(other.header("X-Cache"), "MISS")

    def test_dropped(self) -> None:
        """An admin drop forgets the semantic index's entries too."""
        gw = self.gw
        gw.ask(ask_about("What is the weather in Paris today?"))
        cache = gw.plane.parts.stages[-1].cache
        self.successResultOf(cache.drop(None, "a"))
        self.assertEqual(len(cache.semantic.index), 0)
        self.assertEqual(gw.ask(ask_about("what's the weather in paris today"))
                         .header("X-Cache"), "MISS")


class SharedSemanticTests(SynchronousTestCase):
    """
    With a shared cache (Redis, or the parent's memory store that workers
    share), the semantic index is in the store too: a paraphrase finds what
    another gateway or worker stored.
    """

    def test_paraphrase_hits_across_planes(self) -> None:
        from twisted.internet.task import Clock

        from clawproxy.stores.memory import MemoryStore
        from clawproxy.web.semantic_cache import StoredSemanticLookup

        store = MemoryStore(Clock())
        store.shared = True  # as the parent's, which its workers see
        one = CacheHarness(self, config({"ttl": "1m", "semantic": True}), store=store)
        two = CacheHarness(self, config({"ttl": "1m", "semantic": True}), store=store)
        cache = two.plane.parts.stages[-1].cache
        self.assertIsInstance(cache.semantic, StoredSemanticLookup)
        first = one.ask(ask_about("What is the weather in Paris today?"))
        self.assertEqual(first.header("X-Cache"), "MISS")
        again = two.ask(ask_about("what's the weather in paris today"))
        self.assertEqual(again.header("X-Cache"), "SEMANTIC-HIT")
        self.assertEqual(again.body, first.body)
        self.assertEqual(two.ask(ask_about("What is the weather in Rome today?"))
                         .header("X-Cache"), "MISS")
        self.assertEqual(one.llm.calls + two.llm.calls, 2)

    def test_dropped_entry_is_forgotten(self) -> None:
        """After an admin drop, a paraphrase misses, and the index forgets the dropped id."""
        from twisted.internet.task import Clock

        from clawproxy.stores.memory import MemoryStore

        store = MemoryStore(Clock())
        store.shared = True

        def indexed() -> set[bytes]:
            return {line.split(b" ")[1] for key, (value, _) in store.keys._data.items()
                    if key.startswith("cache:semantic:") for line in value.split(b"\n")
                    if line}

        gw = CacheHarness(self, config({"ttl": "1m", "semantic": True}), store=store)
        gw.ask(ask_about("What is the weather in Paris today?"))
        (dropped,) = indexed()
        cache = gw.plane.parts.stages[-1].cache
        self.assertEqual(self.successResultOf(cache.drop(None, None)), 1)
        self.assertEqual(gw.ask(ask_about("what's the weather in paris today"))
                         .header("X-Cache"), "MISS")
        self.assertNotIn(dropped, indexed())
        self.assertEqual(len(indexed()), 1)  # the paraphrase's own answer
