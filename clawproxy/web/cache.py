"""
The response cache in the data plane (issue 9): a lookup stage (phase
C{route}), a response filter that stores complete, successful answers, the
C{cache} fallback, request coalescing and the C{cache} admin section.

A request on a route with C{cache} gets a key (L{clawproxy.cache.keys}) and
one of C{X-Cache: HIT} (answered from the cache), C{MISS} (relayed; stored
if it completes with 200 and no model fallback answered it), C{BYPASS} (the
client sent C{Cache-Control: no-cache} or C{no-store}, or a body that is not
JSON), C{SEMANTIC-HIT} or
C{STALE} (a cache fallback). Identical concurrent misses share one upstream
call (L{clawproxy.web.coalesce}).

Semantic lookup plugs in at L{ResponseCache.semantic}: an index asked after
the exact key missed, on routes whose cache is C{semantic}.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs
from weakref import WeakKeyDictionary

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from clawproxy.cache.keys import cache_key, key_parts, scope_of
from clawproxy.cache.store import Entry, MemoryCache, SharedCache
from clawproxy.config import Config
from clawproxy.errors import Rejected
from clawproxy.interfaces import (
    IAdminSection,
    IBodyFilter,
    IFallbackProvider,
    IRequestStage,
    IResponseFilter,
)
from clawproxy.metrics import Metrics
from clawproxy.web.coalesce import Coalescer
from clawproxy.web.context import LocalResponse, RequestContext
from clawproxy.workers.sections import merge_statuses

log = Logger()

#: Response headers kept with an entry (the rest are the backend's own business).
KEPT_HEADERS = frozenset((b"content-type", b"content-encoding", b"content-language"))
_DONE = b"data: [DONE]"
#: Set by the gateway on the answer of a model fallback (never stored).
FALLBACK_MODEL = b"x-clawproxy-fallback-model"

#: Each gateway's memory cache, by its state store (kept across reloads).
_MEMORY_CACHES: WeakKeyDictionary[Any, MemoryCache] = WeakKeyDictionary()


@attrs.define(slots=True, eq=False)
class CacheNote:
    """What the lookup learnt about a cacheable request (C{ctx.notes["cache"]})."""

    key: str
    route: str
    scope: str
    ttl: float
    stream: bool
    model: str | None
    semantic: bool = False
    threshold: float = 0.85
    #: The semantic index's fingerprint of the request (semantic routes only).
    fingerprint: Any = None


def _bypass(headers: Any) -> bool:
    for name in (b"cache-control", b"pragma"):
        for value in headers.getRawHeaders(name) or ():
            low = value.lower()
            if b"no-cache" in low or b"no-store" in low:
                return True
    return False


def _reported_model(body: bytes, stream: bool) -> str | None:
    """The model the backend says answered (C{model} of the JSON, or of the first SSE event)."""
    try:
        if stream:
            start = body.find(b"data: {")
            if start < 0:
                return None
            end = body.find(b"\n", start)
            doc = json.loads(body[start + 6:end if end > 0 else None])
        else:
            if not body.lstrip().startswith(b"{"):
                return None
            doc = json.loads(body)
    except ValueError:
        return None
    model = doc.get("model") if isinstance(doc, dict) else None
    return model if isinstance(model, str) else None


class ResponseCache:
    """
    The cache of one data plane: its store, what it has learnt of model
    versions, and the counts shown in C{/admin/status}.

    @ivar stale: how long entries are kept past their C{ttl} (the longest
        C{max_stale} of the C{cache} fallbacks).
    @ivar semantic: where semantic lookup plugs in (L{None}: none): an
        object with C{lookup(note, ctx) -> exact key or None} (asked after
        the exact key missed, on a C{semantic} route), C{add(note, entry)}
        (an answer was stored under C{note.key}), C{forget(key)} (that
        key's entry is gone) and C{drop(route, scope)} (an admin drop; each
        L{None} for any). L{clawproxy.web.semantic_cache.SemanticLookup}.
    """

    def __init__(self, config: Config, store: Any, clock: IReactorTime,
                 metrics: Metrics) -> None:
        cc = config.cache
        self.clock = clock
        self.metrics = metrics
        self.stale = max((fb.max_stale or 0.0 for fb in config.fallbacks.values()
                          if fb.type == "cache"), default=0.0)
        # A worker's memory store is its parent's (C{store.shared}): entries
        # go there, through the same scripts as in Redis, for every worker.
        if cc.store == "redis" or (store.shared and store.backend == "memory"):
            longest = max((r.cache.ttl for r in config.routes if r.cache is not None),
                          default=0.0) + self.stale
            self.backend: Any = SharedCache(store, clock, cc.max_entries, cc.max_bytes,
                                            longest)
        else:
            # The memory cache outlives a reload: it is kept per gateway (per
            # state store, which a reload keeps), with the new bounds.
            kept = _MEMORY_CACHES.get(store)
            if kept is None:
                kept = _MEMORY_CACHES[store] = MemoryCache(clock, cc.max_entries, cc.max_bytes)
            else:
                kept.resize(cc.max_entries, cc.max_bytes)
            self.backend = kept
        self.check_versions = cc.check_model_version
        #: requested model -> the model the backends last reported answering as.
        self.versions: dict[str, str] = {}
        self.semantic: Any = None
        self.counts = {"hit": 0, "miss": 0, "semantic_hit": 0, "stale": 0, "bypass": 0}

    def _count(self, route: str, result: str) -> None:
        self.counts[result] += 1
        self.metrics.cache_requests_total.labels(route, result).inc()

    # -- lookup

    def note_for(self, ctx: RequestContext, cfg: Any) -> CacheNote | None:
        """The request's key and settings, or L{None} when it bypasses the cache."""
        request = ctx.request
        route = ctx.route_name
        if _bypass(request.requestHeaders):
            self._count(route, "bypass")
            ctx.response_headers.append((b"x-cache", b"BYPASS"))
            return None
        content = request.content
        body: Any = None
        if content is not None:
            content.seek(0, 2)
            size = content.tell()
            content.seek(0)
            if size:
                try:
                    body = ctx.json_body()
                except Rejected:
                    self._count(route, "bypass")
                    ctx.response_headers.append((b"x-cache", b"BYPASS"))
                    return None
        headers = request.requestHeaders
        query: dict[str, list[str]] | None = None

        def header(name: str) -> str | None:
            v = headers.getRawHeaders(name.encode("latin-1"))
            return v[-1].decode("latin-1") if v else None

        def arg(name: str) -> str | None:
            nonlocal query
            if query is None:
                query = parse_qs(ctx.query.decode("latin-1"), keep_blank_values=True)
            v = query.get(name)
            return v[-1] if v else None

        stream = isinstance(body, dict) and body.get("stream") is True
        agent = ctx.agent_name if ctx.agent is not None else None
        scope = scope_of(agent, ctx.client_ip, cfg.shared)
        parts = key_parts(cfg.key, body, header, arg)
        key = cache_key(route, ctx.method.decode("latin-1"), ctx.path.decode("latin-1"),
                        stream, scope, parts)
        model = body.get("model") if isinstance(body, dict) else None
        note = CacheNote(key, route, scope, cfg.ttl, stream,
                         model if isinstance(model, str) else None, cfg.semantic,
                         cfg.threshold)
        if ctx.notes is None:
            ctx.notes = {}
        ctx.notes["cache"] = note
        return note

    def lookup(self, ctx: RequestContext, cfg: Any) -> Any:
        """The stage's work: a hit's C{LocalResponse}, or L{None} (maybe in a Deferred)."""
        note = self.note_for(ctx, cfg)
        if note is None:
            return None
        backend = self.backend
        if isinstance(backend, MemoryCache):
            return self._decide(ctx, note, backend.lookup(note.key))
        d = backend.get(note.key)
        d.addErrback(self._store_failed, "lookup")
        d.addCallback(lambda entry: self._decide(ctx, note, entry))
        return d

    def _store_failed(self, failure: Failure, op: str) -> None:
        log.warn("cache {op} failed: {why}", op=op, why=failure.getErrorMessage())
        return None

    def _current(self, note: CacheNote, entry: Entry) -> bool:
        """Whether C{entry} was made by the model version the backends answer with now."""
        if not self.check_versions or not entry.model or note.model is None:
            return True
        now = self.versions.get(note.model)
        return now is None or now == entry.model

    def _decide(self, ctx: RequestContext, note: CacheNote, entry: Entry | None) -> Any:
        if entry is not None and self._current(note, entry):
            age = self.clock.seconds() - entry.stored
            if age <= note.ttl:
                self._count(note.route, "hit")
                return self.answer(entry, b"HIT", age)
        if note.semantic and self.semantic is not None:
            return self._semantic(ctx, note)
        return self._miss(ctx, note)

    def _miss(self, ctx: RequestContext, note: CacheNote) -> None:
        self._count(note.route, "miss")
        ctx.response_headers.append((b"x-cache", b"MISS"))
        return None

    def _semantic(self, ctx: RequestContext, note: CacheNote) -> Any:
        """After an exact miss on a semantic route: ask the semantic index for a near key."""
        d = maybeDeferred(self.semantic.lookup, note, ctx)

        async def fetch(key: str | None) -> Any:
            entry = await self.backend.get(key) if key else None
            if key and entry is None:
                self.semantic.forget(key)
            if entry is not None and self._current(note, entry):
                age = self.clock.seconds() - entry.stored
                if age <= note.ttl:
                    self._count(note.route, "semantic_hit")
                    return self.answer(entry, b"SEMANTIC-HIT", age)
            return self._miss(ctx, note)

        d.addCallback(lambda key: Deferred.fromCoroutine(fetch(key)))
        d.addErrback(lambda f: (self._store_failed(f, "semantic lookup"),
                                self._miss(ctx, note))[1])
        return d

    def answer(self, entry: Entry, how: bytes, age: float,
               extra: Iterable[tuple[bytes, bytes]] = ()) -> LocalResponse:
        ctype = b"application/json"
        headers = [(b"x-cache", how), (b"age", b"%d" % max(0, int(age)))]
        for name, value in entry.headers:
            if name == b"content-type":
                ctype = value
            else:
                headers.append((name, value))
        headers.extend(extra)
        return LocalResponse(entry.status, entry.body, ctype, tuple(headers))

    # -- store

    def store(self, note: CacheNote, status: int, headers: tuple[tuple[bytes, bytes], ...],
              body: bytes, stream: bool) -> None:
        """Keep a complete, successful answer (errors are logged, never raised)."""
        model = _reported_model(body, stream)
        if stream and _DONE not in body[-64:]:
            body += _DONE + b"\n\n"
        if model is not None and note.model is not None:
            self.versions[note.model] = model
        entry = Entry(status, headers, body, model, self.clock.seconds(), note.route,
                      note.scope, stream)
        d = self.backend.put(note.key, entry, note.ttl + self.stale)
        d.addErrback(self._store_failed, "store")
        if note.semantic and self.semantic is not None:
            try:
                self.semantic.add(note, entry)
            except Exception:
                log.failure("semantic index add failed")

    def drop(self, route: str | None, agent: str | None) -> Deferred[int]:
        scope = None if agent is None else "agent:" + agent
        d = self.backend.drop(route, scope)
        if self.semantic is not None:
            d.addCallback(lambda n: (self.semantic.drop(route, scope), n)[1])
        return d

    def status(self) -> dict[str, Any]:
        c = self.counts
        lookups = c["hit"] + c["semantic_hit"] + c["miss"]
        return {
            "backend": self.backend.backend if isinstance(self.backend, SharedCache)
            else "memory",
            **self.backend.stats(),
            "max_entries": self.backend.max_entries,
            "max_bytes": self.backend.max_bytes,
            **c,
            "hit_ratio": round((c["hit"] + c["semantic_hit"]) / lookups, 4) if lookups else 0.0,
        }


@implementer(IRequestStage)
class CacheLookup:
    """Phase C{route}: answer from the cache, or note the key for the filter."""

    name = "cache"
    phase = "route"

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    def process(self, ctx: RequestContext) -> Any:
        cfg = ctx.route.config.cache
        if cfg is None or not cfg.enabled:
            return None
        return self.cache.lookup(ctx, cfg)


@implementer(IBodyFilter)
class _Assembler:
    """Collects one relayed answer; stores it if it completes."""

    rewrites = False

    def __init__(self, cache: ResponseCache, note: CacheNote, status: int,
                 headers: tuple[tuple[bytes, bytes], ...], stream: bool, limit: int) -> None:
        self.cache = cache
        self.note = note
        self.status = status
        self.headers = headers
        self.stream = stream
        self.limit = limit
        self.size = 0
        self.chunks: list[bytes] | None = []

    def data(self, chunk: bytes) -> bytes:
        if self.chunks is not None:
            self.size += len(chunk)
            if self.size > self.limit:
                self.chunks = None  # too big to keep: relay it, store nothing
            else:
                self.chunks.append(chunk)
        return chunk

    def end(self, outcome: str) -> bytes:
        if outcome == "complete" and self.chunks is not None:
            self.cache.store(self.note, self.status, self.headers, b"".join(self.chunks),
                             self.stream)
        self.chunks = None
        return b""


@implementer(IResponseFilter)
class CacheFill:
    """Stores complete 200 answers of requests the lookup noted (streams assembled)."""

    name = "cache"

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    def begin(self, ctx: RequestContext, code: int,
              headers: list[tuple[bytes, bytes]]) -> _Assembler | None:
        notes = ctx.notes
        note = notes.get("cache") if notes else None
        if note is None or code != 200 or ctx.method == b"HEAD":
            return None
        if any(k == FALLBACK_MODEL for k, _ in ctx.response_headers):
            # Another model answered (a model fallback): not the answer the
            # key's model would give, and not that model's version.
            return None
        kept = tuple((k, v) for k, v in headers if k in KEPT_HEADERS and v)
        ctype = next((v for k, v in kept if k == b"content-type"), b"")
        stream = ctype.lower().startswith(b"text/event-stream")
        return _Assembler(self.cache, note, code, kept, stream, self.cache.backend.max_bytes)


@implementer(IFallbackProvider)
class CacheFallback:
    """C{fallbacks.NAME: {type: cache}}: the last good answer, up to C{max_stale} past its ttl."""

    type = "cache"

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    def answer(self, ctx: RequestContext, fallback: Any) -> Deferred[LocalResponse | None] | None:
        notes = ctx.notes
        note = notes.get("cache") if notes else None
        if note is None:
            return None
        d = self.cache.backend.get(note.key)
        d.addErrback(self.cache._store_failed, "fallback lookup")
        d.addCallback(self._serve, ctx, note, fallback)
        return d

    def _serve(self, entry: Entry | None, ctx: RequestContext, note: CacheNote,
               fallback: Any) -> LocalResponse | None:
        if entry is None:
            return None
        cache = self.cache
        age = cache.clock.seconds() - entry.stored
        if age - note.ttl > fallback.max_stale:
            return None
        cache._count(note.route, "stale")
        cache.metrics.fallback_responses_total.labels(fallback.name).inc()
        ctx.response_headers[:] = [h for h in ctx.response_headers if h[0] != b"x-cache"]
        return cache.answer(entry, b"STALE", age,
                            ((b"x-clawproxy-fallback", fallback.name.encode()),))


@implementer(IAdminSection)
class CacheAdmin:
    """C{cache} in C{/admin/status}; C{DELETE /admin/cache[?route=R&agent=A]}."""

    name = "cache"

    def __init__(self, cache: ResponseCache, coalescer: Coalescer) -> None:
        self.cache = cache
        self.coalescer = coalescer

    def status(self) -> dict[str, Any]:
        return {**self.cache.status(), "coalesced": self.coalescer.coalesced,
                "in_flight": len(self.coalescer.flights)}

    def endpoints(self) -> dict[tuple[bytes, bytes], Any]:
        return {(b"DELETE", b"/admin/cache"): self._delete}

    @staticmethod
    def merge(statuses: list[dict[str, Any]]) -> dict[str, Any]:
        """
        The workers' sections as one (C{server.workers > 1}): lookups and
        coalescing summed, the hit ratio of the sums; the workers share one
        store, so C{entries} and C{bytes} are the largest any worker saw at
        its last store (each worker's figure is as of its own last store).
        """
        out = merge_statuses(statuses)
        for key in ("entries", "bytes"):
            out[key] = max(s.get(key, 0) for s in statuses)
        for key in ("backend", "max_entries", "max_bytes"):
            out[key] = statuses[-1].get(key)
        found = out.get("hit", 0) + out.get("semantic_hit", 0)
        lookups = found + out.get("miss", 0)
        out["hit_ratio"] = round(found / lookups, 4) if lookups else 0.0
        return out

    def _delete(self, request: Any) -> Deferred[dict[str, Any]]:
        args = request.args or {}

        def one(name: bytes) -> str | None:
            v = args.get(name)
            return v[-1].decode("utf-8", "replace") if v else None

        route, agent = one(b"route"), one(b"agent")
        d = self.cache.drop(route, agent)
        d.addCallback(lambda n: {"dropped": n, "route": route, "agent": agent})
        return d


def cache_parts(*, config: Config, store: Any, clock: IReactorTime, metrics: Metrics,
                **_: Any) -> list[Any]:
    """The cache's parts, when a route caches (else none: nothing to pay for)."""
    if not any(r.cache is not None and r.cache.enabled for r in config.routes):
        return []
    cache = ResponseCache(config, store, clock, metrics)
    if any(r.cache is not None and r.cache.enabled and r.cache.semantic for r in config.routes):
        from clawproxy.web.semantic_cache import SemanticLookup, StoredSemanticLookup

        if isinstance(cache.backend, SharedCache):
            cache.semantic = StoredSemanticLookup(store, cache.backend.longest_life)
        else:
            cache.semantic = SemanticLookup(config.cache.max_entries)
    coalescer = Coalescer(metrics)
    return [CacheLookup(cache), CacheFill(cache), CacheFallback(cache), coalescer,
            CacheAdmin(cache, coalescer)]
