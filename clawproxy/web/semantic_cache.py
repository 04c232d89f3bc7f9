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

The index lives in this gateway's memory, bounded by C{cache.max_entries}
(oldest first); ids whose entry has left the store are forgotten when a
lookup finds them gone. With C{cache.store: redis} each gateway indexes the
answers it stored itself.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from clawproxy.cache.keys import cache_key


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

    def lookup(self, note: Any, ctx: Any) -> str | None:
        """The exact key of the closest cached request, or L{None}."""
        found = last_user_text(ctx.body)
        if found is None:
            return None
        text, rest = found
        scope = cache_key(note.route, ctx.method.decode("latin-1"),
                          ctx.path.decode("latin-1"), note.stream, note.scope, [rest])
        note.fingerprint = self._fingerprint(text, scope)
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
