"""
Session affinity: the key that names a conversation (L{conversation_key}),
and which instance served each key (L{AffinityTable}).

Pure policy: no reactor, no I/O; time comes from an injected
L{IReactorTime<twisted.internet.interfaces.IReactorTime>}.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from hashlib import blake2b
from typing import Any

from twisted.internet.interfaces import IReactorTime

__all__ = ["AffinityTable", "conversation_key"]

#: Session ids longer than this are hashed (the table's keys stay small).
_MAX_SESSION_ID = 128


def conversation_key(session_id: str | None, body: Any) -> str | None:
    """
    The key that identifies a conversation: the client's session id when it
    sends one, else a fingerprint of the conversation's start (its system
    prompt and first user message, which every later request of it repeats).

    @param session_id: the session header's value, if any.
    @param body: the request's parsed JSON body (OpenAI C{messages}, or an
        Ollama C{/api/generate} C{system} and C{prompt}), or L{None}.
    @return: the key, or L{None} when the request names no conversation.
    """
    if session_id:
        if len(session_id) > _MAX_SESSION_ID:
            return "s#" + blake2b(session_id.encode("utf-8", "surrogatepass"),
                                  digest_size=16).hexdigest()
        return "s:" + session_id
    if not isinstance(body, Mapping):
        return None
    system = user = None
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, Mapping):
                continue
            role = message.get("role")
            if role in ("system", "developer") and system is None:
                system = message.get("content")
            elif role == "user":
                user = message.get("content")
                break
    elif isinstance(body.get("prompt"), str):
        system, user = body.get("system"), body["prompt"]
    if user is None:
        return None
    if isinstance(user, str) and (system is None or isinstance(system, str)):
        # The common case, without a JSON encoding (a prompt may be long).
        start = ("-" if system is None else f"{len(system)}:{system}") + user
    else:  # content-part arrays
        start = json.dumps([system, user], separators=(",", ":"), sort_keys=True)
    return "f:" + blake2b(start.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


class AffinityTable:
    """
    A bounded map from session key to instance id with a sliding TTL.

    An entry set or hit at time C{t} expires at C{t + ttl} (it is gone from
    that instant on). Entries are kept in expiry order, which with one TTL
    is also least-recently-used order, so expired entries are purged lazily
    from the front and, when the table is full, the oldest entry is dropped.

    @ivar ttl: seconds an entry lives after its last use.
    @ivar max_entries: the bound on the number of entries.
    """

    __slots__ = ("_clock", "_entries", "max_entries", "ttl")

    def __init__(
        self, clock: IReactorTime, ttl: float, max_entries: int = 100_000
    ) -> None:
        """
        @param clock: the time source (C{seconds()}).
        @param ttl: seconds an entry lives after its last use; > 0.
        @param max_entries: at most this many entries are kept; >= 1.
        @raise ValueError: on a non-positive C{ttl} or C{max_entries}.
        """
        if not ttl > 0:
            raise ValueError(f"ttl must be > 0, not {ttl!r}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, not {max_entries!r}")
        self._clock = clock
        self.ttl = ttl
        self.max_entries = max_entries
        # key -> (instance id, expiry time); ordered by expiry (oldest first)
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, key: str) -> str | None:
        """
        The instance id remembered for C{key}; a hit restarts its TTL.

        @return: the id, or L{None} if absent or expired.
        """
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            return None
        now = self._clock.seconds()
        if entry[1] <= now:
            del entries[key]
            return None
        entries[key] = (entry[0], now + self.ttl)
        entries.move_to_end(key)
        return entry[0]

    def set(self, key: str, instance_id: str) -> None:
        """
        Remember that C{key} goes to C{instance_id} for the next C{ttl} seconds.

        Purges expired entries, then drops the oldest while the table is full.
        """
        entries = self._entries
        now = self._clock.seconds()
        if key in entries:
            entries[key] = (instance_id, now + self.ttl)
            entries.move_to_end(key)
            return
        self._purge(now)
        while len(entries) >= self.max_entries:
            entries.popitem(last=False)
        entries[key] = (instance_id, now + self.ttl)

    def forget_instance(self, instance_id: str) -> int:
        """
        Drop every entry pointing at C{instance_id} (it left or went down).

        @return: how many entries were dropped.
        """
        entries = self._entries
        stale = [k for k, (iid, _) in entries.items() if iid == instance_id]
        for k in stale:
            del entries[k]
        return len(stale)

    def __len__(self) -> int:
        """The number of live (unexpired) entries."""
        self._purge(self._clock.seconds())
        return len(self._entries)

    def _purge(self, now: float) -> None:
        """Drop expired entries; they are all at the front."""
        entries = self._entries
        while entries:
            key = next(iter(entries))
            if entries[key][1] > now:
                return
            del entries[key]
