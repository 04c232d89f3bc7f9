"""Tests for L{clawproxy.policy.affinity}."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from clawproxy.policy.affinity import AffinityTable, conversation_key


class AffinityTableTests(SynchronousTestCase):
    """L{AffinityTable}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.table = AffinityTable(self.clock, ttl=60)

    def tearDown(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_absent(self) -> None:
        """An unknown key has no instance."""
        self.assertIsNone(self.table.get("session-1"))
        self.assertEqual(len(self.table), 0)

    def test_sticky(self) -> None:
        """A key set to an instance gets that instance back, as long as it is used."""
        self.table.set("session-1", "gpu-1")
        self.table.set("session-2", "gpu-2")
        for _ in range(10):
            self.clock.advance(30)
            self.assertEqual(self.table.get("session-1"), "gpu-1")
            self.assertEqual(self.table.get("session-2"), "gpu-2")
        self.assertEqual(len(self.table), 2)

    def test_overwrite(self) -> None:
        """Setting a key again points it at the new instance."""
        self.table.set("s", "gpu-1")
        self.table.set("s", "gpu-2")
        self.assertEqual(self.table.get("s"), "gpu-2")
        self.assertEqual(len(self.table), 1)

    def test_expiry(self) -> None:
        """An entry not used for ttl seconds is gone: live just before, absent at ttl."""
        self.table.set("s", "gpu-1")
        self.clock.advance(59.9)
        self.assertEqual(len(self.table), 1)
        other = AffinityTable(self.clock, ttl=60)
        other.set("s", "gpu-1")
        self.clock.advance(60)
        self.assertIsNone(self.table.get("s"))
        self.assertEqual(len(self.table), 0)
        self.assertIsNone(other.get("s"))

    def test_expired_not_returned_before_purge(self) -> None:
        """get() never returns an expired entry, even one not yet purged."""
        self.table.set("s", "gpu-1")
        self.clock.advance(61)
        self.assertIsNone(self.table.get("s"))

    def test_hit_refreshes(self) -> None:
        """A hit restarts the ttl (sliding), so a key used every 50s never expires."""
        self.table.set("s", "gpu-1")
        self.clock.advance(50)
        self.assertEqual(self.table.get("s"), "gpu-1")
        self.clock.advance(50)
        self.assertEqual(self.table.get("s"), "gpu-1")
        self.clock.advance(59)
        self.assertEqual(self.table.get("s"), "gpu-1")
        self.clock.advance(60)
        self.assertIsNone(self.table.get("s"))

    def test_miss_does_not_refresh(self) -> None:
        """Looking up other keys does not keep an idle entry alive."""
        self.table.set("s", "gpu-1")
        for _ in range(6):
            self.clock.advance(10)
            self.table.get("other")
        self.assertIsNone(self.table.get("s"))

    def test_set_refreshes(self) -> None:
        """Setting an existing key restarts its ttl."""
        self.table.set("s", "gpu-1")
        self.clock.advance(40)
        self.table.set("s", "gpu-1")
        self.clock.advance(40)
        self.assertEqual(self.table.get("s"), "gpu-1")

    def test_lazy_purge(self) -> None:
        """Expired entries are dropped by later calls, without a timer."""
        for n in range(100):
            self.table.set(f"old-{n}", "gpu-1")
        self.clock.advance(60)
        self.table.set("new", "gpu-2")
        self.assertEqual(len(self.table._entries), 1)
        self.assertEqual(len(self.table), 1)

    def test_bounded(self) -> None:
        """A full table drops its least recently used entry to make room."""
        table = AffinityTable(self.clock, ttl=60, max_entries=3)
        for key in "abc":
            table.set(key, f"gpu-{key}")
            self.clock.advance(1)
        self.assertEqual(table.get("a"), "gpu-a")  # now b is the oldest
        table.set("d", "gpu-d")
        self.assertEqual(len(table), 3)
        self.assertIsNone(table.get("b"))
        self.assertEqual([table.get(k) for k in "acd"], ["gpu-a", "gpu-c", "gpu-d"])
        for n in range(1000):
            table.set(f"k{n}", "gpu-1")
        self.assertEqual(len(table), 3)

    def test_expired_make_room_first(self) -> None:
        """When the table is full, expired entries are dropped before live ones."""
        table = AffinityTable(self.clock, ttl=60, max_entries=2)
        table.set("old", "gpu-1")
        self.clock.advance(30)
        table.set("live", "gpu-2")
        self.clock.advance(30)
        table.set("new", "gpu-3")
        self.assertEqual(table.get("live"), "gpu-2")
        self.assertEqual(table.get("new"), "gpu-3")

    def test_forget_instance(self) -> None:
        """forget_instance drops every entry pointing at that instance, only those."""
        self.table.set("a", "gpu-1")
        self.table.set("b", "gpu-2")
        self.table.set("c", "gpu-1")
        self.assertEqual(self.table.forget_instance("gpu-1"), 2)
        self.assertIsNone(self.table.get("a"))
        self.assertIsNone(self.table.get("c"))
        self.assertEqual(self.table.get("b"), "gpu-2")
        self.assertEqual(self.table.forget_instance("gpu-9"), 0)
        self.assertEqual(len(self.table), 1)

    def test_invalid(self) -> None:
        """A ttl or max_entries that is not positive raises ValueError."""
        self.assertRaises(ValueError, AffinityTable, self.clock, 0)
        self.assertRaises(ValueError, AffinityTable, self.clock, -1)
        self.assertRaises(ValueError, AffinityTable, self.clock, 10, 0)


def chat(*messages: tuple[str, object], **extra: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": r, "content": c} for r, c in messages],
            **extra}


class ConversationKeyTests(SynchronousTestCase):
    """L{conversation_key} names a conversation the same way at every turn."""

    def test_session_id(self) -> None:
        """A session id wins over the body; a long one is hashed to a short key."""
        self.assertEqual(conversation_key("abc", chat(("user", "hi"))), "s:abc")
        long = conversation_key("x" * 1000, None)
        self.assertTrue(long.startswith("s#"))
        self.assertLess(len(long), 40)
        self.assertNotEqual(long, conversation_key("x" * 999, None))

    def test_fingerprint_stable_across_turns(self) -> None:
        """
        Later turns repeat the system prompt and first user message: same key;
        the model, sampling settings and later messages do not matter.
        """
        first = chat(("system", "You are terse."), ("user", "Plan a trip"))
        later = chat(("system", "You are terse."), ("user", "Plan a trip"),
                     ("assistant", "Where to?"), ("user", "Lisbon"), temperature=0.2)
        self.assertEqual(conversation_key(None, first), conversation_key(None, later))
        self.assertTrue(conversation_key(None, first).startswith("f:"))

    def test_fingerprint_distinguishes(self) -> None:
        """Another system prompt or another first question is another conversation."""
        keys = {
            conversation_key(None, chat(("system", "A"), ("user", "q"))),
            conversation_key(None, chat(("system", "B"), ("user", "q"))),
            conversation_key(None, chat(("system", "A"), ("user", "r"))),
            conversation_key(None, chat(("user", "q"))),
            conversation_key(None, chat(("developer", "A"), ("user", [{"type": "text",
                                                                    "text": "q"}]))),
        }
        self.assertEqual(len(keys), 5)

    def test_ollama_generate(self) -> None:
        """An Ollama C{/api/generate} body: its C{system} and C{prompt}."""
        a = conversation_key(None, {"model": "m", "system": "S", "prompt": "p"})
        self.assertEqual(a, conversation_key(None, {"model": "x", "system": "S", "prompt": "p"}))
        self.assertNotEqual(a, conversation_key(None, {"model": "m", "prompt": "p"}))

    def test_none(self) -> None:
        """No session id and no user message: no conversation (the balancer decides)."""
        for body in (None, [], {}, {"messages": "x"}, chat(("system", "only")),
                     {"messages": [1, None]}):
            self.assertIsNone(conversation_key(None, body))
        self.assertIsNone(conversation_key("", None))
