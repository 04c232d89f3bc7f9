"""
Session affinity: the key that names a request's session, and (with a
shared store: Redis, or the parent's memory store with C{server.workers > 1})
the sessions' instances shared by every gateway and worker on the store.

Each pool's L{AffinityTable<clawproxy.policy.affinity.AffinityTable>} stays
the one the registry decides with; L{SharedAffinity} fills it from the store
before the decision (one C{GET}) and writes the instance that answered back
(one C{SET}, which also restarts the session's C{ttl}). When the store is
unreachable, each gateway keeps its own table.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from clawproxy.interfaces import IRequestStage, IResponseObserver
from clawproxy.policy.affinity import conversation_key
from clawproxy.stores.errors import StoreError
from clawproxy.web.context import RequestContext

#: Keys under which the store keeps a session's instance: C{affinity:POOL:KEY}.
_PREFIX = "affinity:"


def session_key(ctx: RequestContext, aff: Any, set_cookie: bool = False) -> str | None:
    """
    The session key of C{ctx} under the pool's C{session_affinity} C{aff}.

    @param set_cookie: for the C{cookie} method, give a request without the
        cookie a new session (and the response its C{Set-Cookie}); otherwise
        such a request has no key.
    @return: the key, or L{None} when the request names no session.
    """
    method = aff.method
    if method == "ip_hash":
        return ctx.client_ip
    headers = ctx.request.requestHeaders
    if method == "header":
        v = headers.getRawHeaders(aff.header_name.encode("latin-1"))
        return v[-1].decode("latin-1") if v else None
    if method == "conversation":
        v = headers.getRawHeaders(aff.header_name.encode("latin-1"))
        if v:
            return conversation_key(v[-1].decode("latin-1"), None)
        if ctx.body is None:
            try:
                ctx.json_body()
            except Exception:  # not JSON: no conversation to name
                return None
        return conversation_key(None, ctx.body)
    cookie = ctx.request.getCookie(aff.cookie_name.encode())
    if cookie and len(cookie) <= 128:
        return cookie.decode("latin-1")
    if not set_cookie:
        return None
    token = os.urandom(16).hex()
    ctx.request.addCookie(
        aff.cookie_name.encode(), token.encode(), max_age=str(int(aff.ttl)), path=b"/",
        httpOnly=True, sameSite="lax",
    )
    return token


@implementer(IRequestStage, IResponseObserver)
class SharedAffinity:
    """
    Share the pools' session affinity through the state store (phase
    C{pool}: look the session up; observer: remember who answered).
    """

    name = "affinity"
    phase = "pool"
    log = Logger()

    def __init__(self, store: Any) -> None:
        self.store = store

    def process(self, ctx: RequestContext) -> Any:
        pool = ctx.pool
        aff = pool.config.session_affinity
        if aff is None or pool.affinity is None:
            return None
        key = session_key(ctx, aff)
        if key is None:
            return None
        d = self.store.get(f"{_PREFIX}{pool.name}:{key}")
        d.addCallbacks(self._found, self._unavailable, (ctx, pool, key), None,
                       (ctx, pool, key))
        return d

    def _found(self, value: bytes | None, ctx: RequestContext, pool: Any, key: str) -> None:
        pinned = value.decode("utf-8", "replace") if value else None
        if pinned is not None and pinned in pool.by_id and pool.affinity.get(key) != pinned:
            pool.affinity.set(key, pinned)
        _note(ctx, pool, key)

    def _unavailable(self, failure: Failure, ctx: RequestContext, pool: Any, key: str) -> None:
        failure.trap(StoreError)  # CancelledError (the client left) goes on
        self.log.debug("affinity lookup failed: {why}", why=failure.getErrorMessage())
        _note(ctx, pool, key)

    def completed(self, ctx: RequestContext) -> None:
        notes = ctx.notes
        entry = notes.get("affinity") if notes else None
        if entry is None:
            return
        pool, key = entry
        inst = ctx.instance
        if inst is None or inst.pool is not pool or not 0 < ctx.status < 500:
            return
        d = self.store.set(f"{_PREFIX}{pool.name}:{key}", inst.id.encode(),
                           ttl=pool.config.session_affinity.ttl)
        d.addErrback(self._not_stored)

    def _not_stored(self, failure: Failure) -> None:
        if failure.check(StoreError):
            self.log.debug("affinity not stored: {why}", why=failure.getErrorMessage())
        else:
            self.log.failure("storing affinity failed", failure)


def _note(ctx: RequestContext, pool: Any, key: str) -> None:
    """Remember, for L{SharedAffinity.completed}, which session C{ctx} belongs to."""
    if ctx.notes is None:
        ctx.notes = {}
    ctx.notes["affinity"] = (pool, key)


def affinity_parts(config: Any, store: Any, **_: Any) -> Iterable[Any]:
    """
    The feature (L{clawproxy.web.dataplane.FEATURES}): with a shared store
    and a pool with session affinity, L{SharedAffinity}; nothing otherwise.
    """
    if not any(p.session_affinity is not None for p in config.pools.values()):
        return ()
    if not store.shared:
        return ()
    return (SharedAffinity(store),)
