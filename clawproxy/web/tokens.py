"""
Token accounting and token/spend budgets (issue 10, points 3 and 4).

One feature, four parts:

  - L{TokenStage} (phase C{pool}): notes each LLM request (a POST to a chat,
    completion or embedding endpoint, OpenAI or Ollama) in C{ctx.notes["tokens"]}, and
    asks an OpenAI backend for C{stream_options.include_usage} on a stream
    whose client did not (the extra usage chunk is dropped on the way back);
  - L{UsageFilter}: reads the usage of the relayed answer (see
    L{clawproxy.policy.usage});
  - L{BudgetStage} (phase C{pool}, after L{TokenStage}): reserves the call's
    worst case against the agent's C{token_limit} and C{spend_limit}
    (L{clawproxy.policy.budgets}), or refuses it with a 429;
  - L{TokenObserver}: when the request is answered, counts the tokens
    (C{clawproxy_tokens_total}, C{clawproxy_spend_total},
    C{clawproxy_instance_tokens_total{pool,instance,kind}} whose C{rate()} is
    tokens/s per instance, the access log, tokens/s per pool in the
    C{tokens} admin section) and settles the
    reservation (a failed call gives it all back).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail
from twisted.logger import Logger
from zope.interface import implementer

from clawproxy.config import Config
from clawproxy.errors import Rejected
from clawproxy.interfaces import (
    IAdminSection,
    IAgentUse,
    IBodyFilter,
    IRequestStage,
    IResponseFilter,
    IResponseObserver,
)
from clawproxy.policy.budgets import RESERVE, SETTLE, SPEND_SCALE, reserve_args, used_in
from clawproxy.policy.usage import (
    JsonUsage,
    NdjsonUsage,
    SseUsage,
    Usage,
    estimate_prompt,
    estimate_text,
    max_completion,
)
from clawproxy.stores.onerror import fails_closed, on_store_failure
from clawproxy.units import Rate

log = Logger()

#: Endpoints whose answers carry token usage (matched at the end of the path,
#: so routes under a prefix count too).
LLM_PATHS = (b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings",
             b"/api/chat", b"/api/generate", b"/api/embed", b"/api/embeddings")
#: OpenAI endpoints that stream with C{stream_options}.
_STREAMING = (b"/v1/chat/completions", b"/v1/completions")

#: Seconds over which C{tokens_per_second} is averaged in the admin section.
RATE_WINDOW = 60.0


@attrs.define(slots=True, eq=False)
class TokenRecord:
    """
    What the feature knows of one LLM request (C{ctx.notes["tokens"]}).

    @ivar body: the request body (as the client sent it).
    @ivar drop_usage: the gateway asked the backend for usage on the
        client's behalf: the usage chunk is not relayed.
    @ivar usage: the final figures, once the request is answered (L{None}
        for a failed call).
    @ivar watcher: what reads the answer's usage (a L{clawproxy.policy.usage}
        watcher, or the Ollama translator).
    @ivar reservation: C{(keys, windows, amounts, budgets)} reserved in the store.
    """

    model: str
    body: dict[str, Any]
    drop_usage: bool = False
    usage: Usage | None = None
    watcher: Any = None
    reservation: Any = None
    _prompt_estimate: int | None = None

    def prompt_estimate(self) -> int:
        if self._prompt_estimate is None:
            self._prompt_estimate = estimate_prompt(self.body)
        return self._prompt_estimate


def record_of(ctx: Any) -> TokenRecord | None:
    """The L{TokenRecord} of an LLM request, L{None} for other requests."""
    notes = ctx.notes
    return notes.get("tokens") if notes else None


@implementer(IRequestStage)
class TokenStage:
    """Notes LLM requests, and asks OpenAI streams for their usage."""

    name = "tokens"
    phase = "pool"

    def __init__(self, router: Any) -> None:
        self.router = router

    def process(self, ctx: Any) -> None:
        if ctx.method != b"POST" or not ctx.path.endswith(LLM_PATHS):
            return None
        try:
            body = ctx.json_body()
        except Rejected:
            return None  # not JSON: the backend answers it, nothing to count
        model = ctx.model
        if model is None:
            named = body.get("model")
            model = self.router.resolve_model(named) if isinstance(named, str) else "-"
        rec = TokenRecord(model, body)
        if ctx.notes is None:
            ctx.notes = {}
        ctx.notes["tokens"] = rec
        if (body.get("stream") is True and ctx.pool.config.protocol == "openai"
                and ctx.path.endswith(_STREAMING)):
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                options = dict(options) if isinstance(options, dict) else {}
                options["include_usage"] = True
                ctx.body = dict(body, stream_options=options)
                ctx.body_changed = True
                rec.drop_usage = True
        return None


@implementer(IResponseFilter)
class UsageFilter:
    """Reads token usage from successful LLM answers."""

    name = "tokens"

    def begin(self, ctx: Any, code: int, headers: list[tuple[bytes, bytes]]) -> Any:
        rec = record_of(ctx)
        if rec is None or not 200 <= code < 300:
            return None
        translator = getattr(ctx.rewrite, "translator", None)
        if translator is not None and hasattr(translator, "usage"):
            rec.watcher = translator  # the Ollama translation knows the counts
            return None
        ctype = b""
        for name, value in headers:
            if name == b"content-type":
                ctype = value.lower()
        if ctype.startswith(b"text/event-stream"):
            watcher: Any = SseUsage(drop=rec.drop_usage)
        elif ctype.startswith(b"application/x-ndjson"):
            watcher = NdjsonUsage()
        elif ctype.startswith(b"application/json"):
            watcher = JsonUsage()
        else:
            return None
        rec.watcher = watcher
        return _Part(watcher)


@implementer(IBodyFilter)
class _Part:
    """A usage watcher as a body filter."""

    __slots__ = ("data", "rewrites", "watcher")

    def __init__(self, watcher: Any) -> None:
        self.watcher = watcher
        self.rewrites = getattr(watcher, "drop", False)
        self.data = watcher.feed  # one call per chunk, no wrapper

    def end(self, outcome: str) -> bytes:
        tail = self.watcher.finish()
        return tail if outcome in ("complete", "stalled") else b""


def final_usage(rec: TokenRecord) -> Usage:
    """The usage reported for C{rec}'s answer, else an estimate."""
    w = rec.watcher
    reported = getattr(w, "usage", None)
    if isinstance(reported, dict):  # the Ollama translator's OpenAI usage object
        reported = Usage(reported.get("prompt_tokens", 0), reported.get("completion_tokens", 0))
    if isinstance(reported, Usage):
        return reported
    if w is None:
        completion = 0
    elif hasattr(w, "events"):
        completion = max(0, w.events - 2)  # minus the role chunk and [DONE]
    else:
        completion = estimate_text(getattr(w, "chars", 0))
    return Usage(rec.prompt_estimate(), completion, estimated=True)


@attrs.define
class _Rates:
    """
    Completion tokens per pool over the last L{RATE_WINDOW} seconds, in
    one-second buckets (at most C{RATE_WINDOW} per pool, whatever the rate).
    """

    clock: Any
    buckets: dict[str, deque[list[int]]] = attrs.Factory(dict)
    totals: dict[str, list[int]] = attrs.Factory(dict)

    def add(self, pool: str, usage: Usage) -> None:
        second = int(self.clock.seconds())
        q = self.buckets.setdefault(pool, deque())
        if q and q[-1][0] == second:
            q[-1][1] += usage.completion
        else:
            q.append([second, usage.completion])
            self._expire(q, second)
        t = self.totals.setdefault(pool, [0, 0])
        t[0] += usage.prompt
        t[1] += usage.completion

    @staticmethod
    def _expire(q: deque[list[int]], second: int) -> None:
        while q and q[0][0] <= second - RATE_WINDOW:
            q.popleft()

    def status(self) -> dict[str, Any]:
        second = int(self.clock.seconds())
        out = {}
        for pool, q in self.buckets.items():
            self._expire(q, second)
            p, c = self.totals[pool]
            out[pool] = {"tokens_per_second": round(sum(n for _, n in q) / RATE_WINDOW, 2),
                         "prompt_tokens": p, "completion_tokens": c}
        return out


@attrs.frozen
class _Budget:
    kind: str  # "token_limit" or "spend_limit"
    count: float
    period: float

    @property
    def limit(self) -> int:
        """The limit in counter units."""
        scale = SPEND_SCALE if self.kind == "spend_limit" else 1
        return int(self.count * scale)


class Budgets:
    """The agents' budgets, their store keys and their prices."""

    def __init__(self, config: Config, store: Any = None) -> None:
        self.prices = dict(config.models.prices) if config.models else {}
        self.default_completion = config.models.reserve_completion_tokens
        #: C{store.redis.on_error} applies to this store (L{fails_closed}).
        self.fail_closed = fails_closed(config, store)
        self.agents: dict[str, tuple[_Budget, ...]] = {}
        for name, agent in config.agents.items():
            limits = []
            if agent.token_limit is not None:
                limits.append(_Budget("token_limit", agent.token_limit.count,
                                      agent.token_limit.period))
            if agent.spend_limit is not None:
                limits.append(_Budget("spend_limit", agent.spend_limit.count,
                                      agent.spend_limit.period))
            if limits:
                self.agents[name] = tuple(limits)
        #: This gateway's reservations in flight, by store key (counter units).
        self.reserved: dict[str, int] = {}

    def hold(self, keys: list[str], amounts: list[int], sign: int = 1) -> None:
        """Count reservations in flight (C{sign} -1: settled)."""
        reserved = self.reserved
        for key, amount in zip(keys, amounts):
            left = reserved.get(key, 0) + sign * amount
            if left > 0:
                reserved[key] = left
            else:
                reserved.pop(key, None)

    async def use(self, store: Any, agent: str) -> dict[str, Any]:
        """
        Agent C{agent}'s budgets as the store holds them now: for each, the
        limit, what was C{used} (settled) and C{reserved} (this gateway's
        calls in flight; other gateways' count as used) in the current
        window, what C{remaining}, and the seconds until the window C{reset}s.
        """
        out: dict[str, Any] = {}
        limits = self.agents.get(agent, ())
        if not limits:
            return out
        now = await store.now()
        for b in limits:
            key = self.key(agent, b)
            counted = used_in(await store.get(key), b.period, now)
            reserved = min(counted, self.reserved.get(key, 0))
            scale = SPEND_SCALE if b.kind == "spend_limit" else 1
            period_ms = int(b.period * 1000)
            now_ms = int(now * 1000)
            out[b.kind] = {
                "limit": _show(b),
                "used": (counted - reserved) / scale,
                "reserved": reserved / scale,
                "remaining": max(0, b.limit - counted) / scale,
                "reset": math.ceil((period_ms - now_ms % period_ms) / 1000),
            }
        return out

    @staticmethod
    def key(agent: str, b: _Budget) -> str:
        return f"budget:{'tokens' if b.kind == 'token_limit' else 'spend'}:{agent}"

    def spend(self, model: str, prompt: int, completion: int) -> float:
        """The price of C{prompt} + C{completion} tokens of C{model} (0 without a price)."""
        price = self.prices.get(model)
        if price is None:
            return 0.0
        return (prompt * price.prompt + completion * price.completion) / 1000

    def amounts(self, budgets: tuple[_Budget, ...], model: str, usage: Usage) -> list[int]:
        """Counter units C{usage} costs against each of C{budgets}."""
        out = []
        for b in budgets:
            if b.kind == "token_limit":
                out.append(usage.total)
            else:
                out.append(math.ceil(self.spend(model, usage.prompt, usage.completion)
                                     * SPEND_SCALE))
        return out


@implementer(IRequestStage)
class BudgetStage:
    """Reserves an LLM call's worst case against its agent's budgets, or refuses it."""

    name = "budgets"
    phase = "pool"

    def __init__(self, budgets: Budgets, store: Any, metrics: Any) -> None:
        self.budgets = budgets
        self.store = store
        self.metrics = metrics

    def process(self, ctx: Any) -> Deferred[None] | None:
        rec = record_of(ctx)
        if rec is None or ctx.agent is None:
            return None
        limits = self.budgets.agents.get(ctx.agent_name)
        if not limits:
            return None
        cap = max_completion(rec.body)
        worst = Usage(rec.prompt_estimate(),
                      self.budgets.default_completion if cap is None else cap)
        model = ctx.model or rec.model
        amounts = self.budgets.amounts(limits, model, worst)
        keys = [Budgets.key(ctx.agent_name, b) for b in limits]
        args = reserve_args([(b.period, b.limit, a) for b, a in zip(limits, amounts)])
        try:
            d = self.store.run(RESERVE, keys, args)
        except Exception as e:  # a store bug must not become a hung request
            d = fail(e)
        d.addCallbacks(self._reserved, self._store_failed,
                       callbackArgs=(ctx, rec, keys, amounts, limits), errbackArgs=(ctx,))
        return d

    def _reserved(self, result: list[int], ctx: Any, rec: TokenRecord, keys: list[str],
                  amounts: list[int], limits: tuple[_Budget, ...]) -> None:
        if result[0] == 1:
            rec.reservation = (keys, result[1:], amounts, limits)
            self.budgets.hold(keys, amounts)
            return None
        b = limits[result[1] - 1]
        retry = max(1, math.ceil(result[2] / 1000))
        self.metrics.rate_limited_total.labels(ctx.agent_label, b.kind).inc()
        what = "token" if b.kind == "token_limit" else "spend"
        used = result[3] / (SPEND_SCALE if b.kind == "spend_limit" else 1)
        raise Rejected(
            429, f"{what} budget of agent {ctx.agent_name!r} exhausted ({b.kind}"
            f" {_show(b)}, {used:g} used this window); retry in {retry}s",
            "rate_limit_error", f"{what}_budget_exceeded",
            (("Retry-After", str(retry)), ("X-RateLimit-Limit", f"{b.count:g}"),
             ("X-RateLimit-Remaining", f"{max(0.0, b.count - used):g}"),
             ("X-RateLimit-Reset", str(retry))))

    def _store_failed(self, failure: Any, ctx: Any) -> Any:
        if failure.check(CancelledError):  # the client left
            return failure
        rejected = on_store_failure(failure, self.budgets.fail_closed, "token budgets")
        if rejected is not None:
            raise rejected
        log.warn("budgets not enforced for {agent}: store error {why}",
                 agent=ctx.agent_name, why=str(failure.value))
        return None


def _show(b: _Budget) -> str:
    """The budget as configured, e.g. C{100000/minute}."""
    return str(Rate(b.count, b.period))


@implementer(IResponseObserver, IAdminSection, IAgentUse)
class TokenObserver:
    """
    Counts each answered LLM request's tokens and settles its reservation;
    shows the budgets in C{GET /admin/budgets} (every agent's) and C{GET
    /admin/limits?agent=NAME} (one agent's, under C{budgets}).
    """

    name = "tokens"

    def __init__(self, budgets: Budgets, store: Any, metrics: Any, clock: Any) -> None:
        self.budgets = budgets
        self.store = store
        self.metrics = metrics
        self.rates = _Rates(clock)

    def completed(self, ctx: Any) -> None:
        rec = record_of(ctx)
        if rec is None:
            return
        ok = 200 <= ctx.status < 300 and rec.watcher is not None
        usage = final_usage(rec) if ok else Usage(0, 0)  # a failed call used nothing
        model = ctx.model or rec.model
        if ok:
            rec.usage = usage
            agent = ctx.agent_label
            m = self.metrics
            inst = ctx.instance  # None for an answer no instance made (the cache)
            if usage.prompt:
                m.tokens_total.labels(agent, model, "prompt").inc(usage.prompt)
                if inst is not None:
                    m.instance_tokens_total.labels(ctx.pool_name, inst.id, "prompt").inc(
                        usage.prompt)
            if usage.completion:
                m.tokens_total.labels(agent, model, "completion").inc(usage.completion)
                if inst is not None:
                    m.instance_tokens_total.labels(ctx.pool_name, inst.id, "completion").inc(
                        usage.completion)
            spend = self.budgets.spend(model, usage.prompt, usage.completion)
            if spend:
                m.spend_total.labels(agent, model).inc(spend)
            self.rates.add(ctx.pool_name, usage)
        if rec.reservation is not None:
            keys, windows, reserved, limits = rec.reservation
            rec.reservation = None
            self.budgets.hold(keys, reserved, -1)
            used = self.budgets.amounts(limits, model, usage)
            args: list[Any] = []
            for w, r, u in zip(windows, reserved, used):
                args += [w, u - r]
            d = self.store.run(SETTLE, keys, args)
            d.addErrback(lambda f: log.warn("budget settle failed: {why}", why=str(f.value)))

    def status(self) -> dict[str, Any]:
        return {"pools": self.rates.status()}

    def endpoints(self) -> dict[Any, Any]:
        return {(b"GET", b"/admin/budgets"): self._budgets}

    def _budgets(self, request: Any) -> Deferred[Any]:
        """Every agent's budgets and their use in the current window (L{Budgets.use})."""

        async def read() -> dict[str, Any]:
            return {"agents": {name: await self.budgets.use(self.store, name)
                               for name in sorted(self.budgets.agents)}}

        return ensureDeferred(read())

    def agent_use(self, name: str) -> Deferred[dict[str, Any]]:
        """Agent C{name}'s budgets (L{Budgets.use}) under C{budgets}, if it has any."""

        async def read() -> dict[str, Any]:
            use = await self.budgets.use(self.store, name)
            return {"budgets": use} if use else {}

        return ensureDeferred(read())


def token_parts(config: Config, router: Any, store: Any, metrics: Any, clock: Any,
                **_: Any) -> list[Any]:
    """The parts of token accounting and budgets for C{config}."""
    budgets = Budgets(config, store)
    parts: list[Any] = [TokenStage(router)]
    if budgets.agents:
        parts.append(BudgetStage(budgets, store, metrics))
    parts += [UsageFilter(), TokenObserver(budgets, store, metrics, clock)]
    return parts
