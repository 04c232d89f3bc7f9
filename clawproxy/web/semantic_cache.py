"""
Semantic lookup for the response cache: the glue between
L{clawproxy.web.cache.ResponseCache} and the SimHash index of
L{clawproxy.cache.semantic}.

On a C{semantic} route, a request whose exact key missed is looked up by
its last user message: its fingerprint is taken with a I{scope} that holds
everything else exactly (route, method, path, stream or not, the agent
scope, the model, the other messages and parameters), so only a paraphrase
of the final question, in the same context, can hit. A hit names the exact
key of the entry it matched, which is then read from the cache store.

With a cache in this process's memory, the index lives there too
(L{SemanticLookup}), bounded by C{cache.max_entries} (oldest first). With a
shared cache (C{cache.store: redis}, or the workers of one gateway on the
parent's memory store), the index is in the same store
(L{StoredSemanticLookup}, over
L{StoredSemanticIndex<clawproxy.cache.semantic_store.StoredSemanticIndex>}),
so a paraphrase finds an answer any gateway or worker stored. Either way,
ids whose entry has left the store are forgotten when a lookup finds them
gone.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from clawproxy.cache.keys import cache_key

log = Logger()


def last_user_text(body: Any) -> tuple[str, Any] | None:
    """
    The text of the last user message of a chat body (or its C{prompt}), and
    the body with that text taken out; L{None} when it has none.
    """
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if isinstance(messages, list):
        for i in range(len(messages) - 1, -1, -1):
            m = messages[i]
            if isinstance(m, dict) and m.get("role") == "user":
                text = _text_of(m.get("content"))
                if text is None:
                    return None
                rest = {**body, "messages": [*messages[:i], {**m, "content": None},
                                             *messages[i + 1:]]}
                return text, rest
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt, {**body, "prompt": None}
    return None


def _text_of(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)
                 and p.get("type") == "text" and isinstance(p.get("text"), str)]
        if len(parts) == len(content) and parts:
            return "\n".join(parts)
    return None


class SemanticLookup:
    """The plug of L{ResponseCache.semantic<clawproxy.web.cache.ResponseCache>}."""

    def __init__(self, max_entries: int) -> None:
        from clawproxy.cache import semantic

        self._fingerprint = semantic.fingerprint
        self.index = semantic.SemanticIndex()
        self.max_entries = max_entries
        #: id -> (route, scope), oldest first.
        self._ids: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def fingerprint(self, note: Any, ctx: Any) -> Any:
        """Set and return C{note.fingerprint}: the request's last user message, in its scope."""
        found = last_user_text(ctx.body)
        if found is None:
            return None
        text, rest = found
        scope = cache_key(note.route, ctx.method.decode("latin-1"),
                          ctx.path.decode("latin-1"), note.stream, note.scope, [rest])
        note.fingerprint = self._fingerprint(text, scope)
        return note.fingerprint

    def lookup(self, note: Any, ctx: Any) -> str | None:
        """The exact key of the closest cached request, or L{None}."""
        if self.fingerprint(note, ctx) is None:
            return None
        hit = self.index.lookup(note.fingerprint, note.threshold)
        return None if hit is None else hit[0]

    def add(self, note: Any, entry: Any) -> None:
        """Index the entry just stored under C{note.key}."""
        if note.fingerprint is None:
            return
        if self.index.add(note.key, note.fingerprint):
            self._ids[note.key] = (note.route, note.scope)
            self._ids.move_to_end(note.key)
            while len(self._ids) > self.max_entries:
                old, _ = self._ids.popitem(last=False)
                self.index.remove(old)

    def forget(self, key: str) -> None:
        """C{key}'s entry is gone from the store."""
        if self._ids.pop(key, None) is not None:
            self.index.remove(key)

    def drop(self, route: str | None, scope: str | None) -> None:
        """Forget the ids of a C{DELETE /admin/cache}."""
        for key, (r, s) in list(self._ids.items()):
            if (route is None or r == route) and (scope is None or s == scope):
                self.forget(key)


class StoredSemanticLookup(SemanticLookup):
    """
    The plug of a shared cache: the index is kept in the cache's state
    store, so every gateway and worker on it finds what the others stored.
    Buckets are bounded per bucket and live as long as their longest-lived
    entry (C{life}); an admin drop needs no index work (a lookup that names
    a dropped entry finds it gone and removes it).
    """

    #: Fingerprints of the entries lookups named lately, for L{forget}.
    REMEMBERED = 1024

    def __init__(self, store: Any, life: float) -> None:
        super().__init__(0)
        from clawproxy.cache.semantic_store import StoredSemanticIndex

        self.stored = StoredSemanticIndex(store, namespace="cache:semantic")
        self.life = life
        self._named: OrderedDict[str, Any] = OrderedDict()

    def lookup(self, note: Any, ctx: Any) -> Any:  # Deferred[str | None] or None
        if self.fingerprint(note, ctx) is None:
            return None
        return self.stored.lookup(note.fingerprint, note.threshold).addCallback(self._found)

    def _found(self, hit: Any) -> str | None:
        if hit is None:
            return None
        key, _, fp = hit
        self._named[key] = fp
        while len(self._named) > self.REMEMBERED:
            self._named.popitem(last=False)
        return key

    def add(self, note: Any, entry: Any) -> None:
        if note.fingerprint is None:
            return
        self._quiet(self.stored.add(note.key, note.fingerprint, self.life), "add")

    def forget(self, key: str) -> None:
        fp = self._named.pop(key, None)
        if fp is not None:
            self._quiet(self.stored.remove(key, fp), "remove")

    def drop(self, route: str | None, scope: str | None) -> None:
        """Nothing to do: lookups remove the dropped entries they name."""

    @staticmethod
    def _quiet(d: Deferred[Any], what: str) -> None:
        def failed(f: Failure) -> None:
            log.warn("semantic index {what} failed: {why}", what=what,
                     why=f.getErrorMessage())

        d.addErrback(failed)
