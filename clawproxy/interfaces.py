"""
The seams between the gateway core and the features that plug into it.

A request meets them in this order (README, "How a request flows"):

  1. L{IHeadCheck}s, when the request head is in (before the body is read
     or C{100 Continue} is sent);
  2. the L{IRequestStage}s of phase C{identify} (before routing), then of
     phase C{route} (after routing), then of phase C{pool} (once the pool
     and model are resolved);
  3. the relay step, wrapped by any L{IRelayWrapper} (request coalescing):
     the registry's one availability decision (health, drain, weight,
     C{max_connections}, and every L{IAvailabilityPolicy}: passive ejection,
     the L{IBreakerBoard}), the balancer, the chosen instance's admission,
     and upstream attempts governed by an L{IRetryPolicy}, each told to the
     L{IAttemptObserver}s; when it cannot answer, the route's fallback
     (static, or an L{IFallbackProvider}'s);
  4. L{IResponseFilter}s over the relayed response head, body and end;
  5. every L{IResponseObserver}, once the request is answered.

Features also show themselves to operators through L{IAdminSection}s.

Stages refuse a request by raising L{clawproxy.errors.Rejected}, or answer it
themselves by returning a L{clawproxy.web.context.LocalResponse}.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

#: The request phases, in the order a request meets them.
PHASES = ("identify", "route", "pool")


class IRequestStage(Interface):
    """
    One step of a request phase (auth, scopes, rate limits, cache lookup,
    budgets...).

    A stage may go on (L{None}), answer (a C{LocalResponse}), refuse (raise
    L{clawproxy.errors.Rejected}) or hold the request (return a Deferred that
    fires later, e.g. from a queue). A held request whose client leaves has
    that Deferred cancelled: give the Deferreds you create a canceller.
    """

    name = Attribute("Short name used in logs, e.g. 'auth'.")
    phase = Attribute(
        "When the stage runs: C{identify} (before routing; C{ctx.route} is None), "
        "C{route} (after routing: C{ctx.route} is set) or C{pool} (after the pool "
        "and model are resolved: C{ctx.pool} and C{ctx.model} are set)."
    )

    def process(ctx):
        """
        Look at (and possibly annotate) the request context C{ctx}.

        @return: L{None} to go on, a C{LocalResponse} to answer now, or a
            Deferred firing with either.
        @raise clawproxy.errors.Rejected: to refuse the request.
        """


class IHeadCheck(Interface):
    """A check run when a request's head is in, before its body is read."""

    def check_head(method, path, headers):
        """
        @param method: the request method (bytes).
        @param path: the request target as received (bytes, with any query).
        @param headers: the request's L{twisted.web.http_headers.Headers}.
        @raise clawproxy.errors.Rejected: to refuse the request now (no
            C{100 Continue}, body never read).
        """


class IResponseFilter(Interface):
    """
    Sees relayed responses: asked once per upstream response that is relayed
    to the client, it may take part in that response with an L{IBodyFilter}.
    """

    name = Attribute("Short name used in logs, e.g. 'cache'.")

    def begin(ctx, code, headers):
        """
        An upstream response is about to be relayed.

        @param code: its status code.
        @param headers: its head as it will be relayed, a mutable list of
            C{(name, value)} bytes pairs whose names are lower-case (the
            relay lower-cases the upstream's once, so a filter compares
            names as they are): the filter may change it, adding names in
            lower case too.
        @return: an L{IBodyFilter} for this response, or L{None} to stay out
            of it (then it costs nothing more).
        """


class IBodyFilter(Interface):
    """One filter's part in one relayed response, in chain order."""

    rewrites = Attribute(
        "True if L{data} may change the body (the upstream's Content-Length "
        "is then not relayed)."
    )

    def data(chunk):
        """
        A body chunk on its way to the client.

        @return: the bytes to pass on (C{chunk} itself to observe, other bytes
            to rewrite, C{b""} to hold back).
        @raise ValueError: the body cannot be relayed; the response is aborted.
        """

    def end(outcome):
        """
        The response ended.

        @param outcome: C{"complete"} (the upstream body ended), C{"stalled"}
            (C{stall_timeout}; an SSE client was sent an error event),
            C{"broken"} (the upstream failed mid-body; the response is
            aborted) or C{"client_gone"}.
        @return: bytes to append to the body (passed through the filters after
            this one); C{b""} for none. Appended bytes are written at
            C{complete} and C{stalled}; at C{broken}, bytes from any filter
            end the response in-band instead of aborting it (an SSE error
            event, say), so return some only for a body whose format lets the
            client tell it failed. Ignored at C{client_gone}.
        """


class IResponseObserver(Interface):
    """Told about every finished request (access accounting, audit)."""

    def completed(ctx):
        """
        C{ctx} has been answered; C{ctx.status}, C{ctx.instance} and
        C{ctx.bytes_sent} are final. Must not raise.
        """


class IAttemptObserver(Interface):
    """
    Told about every upstream attempt of the relay (tracing): when it starts,
    with the chance to add request headers, and when it ends.

    The relay keeps a list of them; with none, an attempt costs one
    truthiness check more. Both methods run on the reactor thread, must be
    cheap and must not raise (an error is logged and ignored).
    """

    def attempt_started(ctx, attempt):
        """
        An attempt is about to be sent.

        @param attempt: its L{clawproxy.web.relay.Attempt} (C{pool},
            C{instance}, C{number}: 1 for the first); the observer may append
            C{(name, value)} bytes pairs to C{attempt.headers}, which are
            set on the upstream request (after the client's, replacing
            same-named ones).
        @return: a token handed back to L{attempt_ended} (anything).
        """

    def attempt_ended(ctx, attempt, token):
        """
        The attempt is over: its response relayed in full, or it failed.

        @param attempt: the same L{clawproxy.web.relay.Attempt}, now with its
            C{outcome} (L{OK}, L{CANCELLED} or a failure name: C{"5xx"},
            C{"connect_failure"}, C{"refused"}, C{"timeout"},
            C{"first_token_timeout"}, C{"truncated"}, C{"stall_timeout"},
            C{"error"}...) and C{status} (the upstream's status code, 0 if
            none came).
        @param token: what L{attempt_started} returned.
        """


class IAdminSection(Interface):
    """
    A feature's part of the admin API: a section of C{/admin/status} (and so
    of C{clawproxy status}) and, optionally, endpoints of its own
    (C{GET /admin/limits}, C{DELETE /admin/cache}...). Sections follow the
    data plane: a reload replaces them.

    With C{server.workers > 1} the parent serves C{/admin/status} but no
    traffic: it shows, under the section's name, the merge of the statuses
    its workers' sections report (about once a second; see
    L{clawproxy.workers.sections}). A section may define
    C{merge(statuses)} (a list of JSON-decoded statuses, one per worker) to
    say how; without it numbers are summed, values equal in every worker
    kept, and other values listed per worker, so a section whose numbers
    are not amounts (averages, limits, states) should define it. The
    section's C{endpoints()} stay the parent's own.
    """

    name = Attribute("Key of the section in C{/admin/status}, e.g. C{'limits'}.")

    def status():
        """
        @return: the section's JSON-able summary (synchronous and cheap: the
            admin status call asks every section).
        """

    def endpoints():
        """
        @return: a mapping of C{(method, path)} (bytes, path without query or
            trailing slash, e.g. C{(b"GET", b"/admin/limits")}) to a callable
            taking the C{twisted.web} request and returning a JSON-able result
            or a Deferred firing with one; it may raise (or fail with)
            L{clawproxy.errors.Rejected}.
        """


class IAgentUse(Interface):
    """
    An L{IAdminSection} that limits or counts something per agent (rate
    limits, token budgets) and says so in C{GET /admin/limits?agent=NAME}:
    the admin API merges the answers of every section that provides this.
    """

    def agent_use(name):
        """
        What this feature limits and has counted for agent C{name} (known
        to the configuration or not).

        @return: a JSON-able dict whose keys are merged into the answer
            (choose keys that name the feature, e.g. C{"budgets"}), or a
            Deferred firing with one; an empty dict when nothing applies.
        """


class IRelayWrapper(Interface):
    """
    Wraps the relay step: the call that sends a request upstream once its
    pool, transforms and rewrite are settled. A wrapper may serve a request
    some other way than its own upstream call (request coalescing serves
    identical concurrent requests from one call).
    """

    def wrap(forward):
        """
        @param forward: the step it wraps, called as C{forward(ctx, pool,
            key, sticky_key, timeout, upstream_path)} and returning an
            awaitable that completes once C{ctx.request} has been answered
            (see L{clawproxy.web.relay.Relay.forward}, its errors included).
        @return: a callable with the same signature and contract.
        """


class IFallbackProvider(Interface):
    """
    Serves the C{fallbacks} of one C{type} other than C{static} (C{cache}:
    the last good answer). The gateway asks it when a pool has no instance
    to take a request, or when the upstream attempts failed with nothing
    sent to the client (a 502/503/504 of the gateway's own).
    """

    type = Attribute("The C{fallbacks[].type} it serves, e.g. C{'cache'}.")

    def answer(ctx, fallback):
        """
        @param fallback: the L{clawproxy.config.FallbackConfig}.
        @return: a C{LocalResponse}, L{None} when it has nothing to serve
            (the gateway answers its error), or a Deferred firing with either.
        """


class IRetryPolicy(Interface):
    """Decides whether a failed upstream attempt is tried again elsewhere."""

    def should_retry(pool, outcome, attempt, reached=True):
        """
        @param pool: the L{clawproxy.backends.registry.Pool}.
        @param outcome: C{"connect_failure"}, C{"refused"}, C{"5xx"} or C{"timeout"}.
        @param attempt: how many attempts were made so far (1 after the first).
        @param reached: whether the failed attempt reached the instance. A
            retry after a connection that never opened (refused, connect
            error) resends nothing and spends no retry budget.
        @return: the delay in seconds before the next attempt, or L{None} for no retry.
        """

    def record_request(pool):
        """A new client request is about to use C{pool} (feeds the retry budget)."""


#: Outcomes of an upstream attempt as told to L{IAvailabilityPolicy.record}:
#: C{OK} (the instance answered, status < 500), C{CANCELLED} (the admitted
#: attempt did not complete: the client left; counts neither way, frees any
#: admission slot), or a failure named as in C{retry.retry_on}:
#: C{"refused"}, C{"connect_failure"}, C{"timeout"}, C{"5xx"},
#: C{"first_token_timeout"}, C{"error"}.
OK = "ok"
CANCELLED = "cancelled"


class IAvailabilityPolicy(Interface):
    """
    One rule that can keep an instance of a pool from taking a request
    (passive ejection, circuit breakers), behind the registry's one
    availability decision.

    For each request the registry (1) drops every instance some policy
    L{excludes} (along with unhealthy, drained, weight-0 and full ones),
    (2) lets the pool's balancer choose among the rest, then (3) asks each
    policy once to L{admit} the chosen instance. A refused instance is set
    aside and another one chosen. Every admitted attempt ends in exactly one
    L{record}.
    """

    def excludes(instance):
        """
        Is C{instance} out for now? Synchronous and cheap (asked for every
        instance of every request); takes nothing (no half-open slot).

        @rtype: L{bool}
        """

    def admit(instance):
        """
        May the chosen C{instance} take this request? Asked once per attempt,
        for the chosen instance only: a half-open breaker takes its trial slot
        here, atomically.

        @return: L{True}/L{False}, or a Deferred firing with one (so a shared
            store can answer). L{True} itself is the fast path.
        """

    def record(instance, outcome, reached):
        """
        The outcome of an attempt to C{instance}. Must not raise.

        @param outcome: L{OK}, L{CANCELLED} or a failure name (see L{OK}).
        @param reached: L{False} when the connection never opened (nothing
            was sent to the instance).
        """

    def probed(instance, ok):
        """An active health check of C{instance} passed (C{ok}) or failed."""


class IBreakerBoard(IAvailabilityPolicy):
    """
    Circuit breakers for pools and instances (named C{POOL} and
    C{POOL/INSTANCE}), as one availability policy: an open breaker
    L{excludes}, a half-open one L{admit}s its trial requests.
    """

    def state(name):
        """C{"CLOSED"}, C{"OPEN"} or C{"HALF_OPEN"} for the breaker C{name}."""

    def retry_after(pool):
        """
        Seconds until pool C{pool} may take requests again when its breakers
        are why it takes none now (the C{Retry-After} of its 503), else
        L{None}.
        """


# --- The state store (issue 6 point 4) -------------------------------------
#
# Shared state for rate limits, token budgets, cache entries, affinity and
# breakers lives behind IStateStore: memory (one process) or Redis (shared by
# gateways). Implementations are in clawproxy.stores; errors are
# clawproxy.stores.StoreError and its subclass StoreUnavailable.


class IStateStore(Interface):
    """
    Keys with byte-string values and optional TTLs, atomic scripts and a
    clock, shared by every gateway that uses the same store.

    Every method but L{health} returns a Deferred, even in memory, so a
    caller works unchanged on either backend. A call that cannot reach the
    store fails with C{StoreUnavailable} within the configured timeout; a
    command the store refuses (wrong type, script error) fails with
    C{StoreError}. Keys are text; the Redis store prefixes them with
    C{store.redis.prefix}. TTLs are seconds (floats allowed, rounded up to
    whole milliseconds).
    """

    backend = Attribute("C{'memory'} or C{'redis'}.")
    shared = Attribute(
        "Whether other processes see this store's state: C{False} for a"
        " process's own memory store, C{True} for Redis and for a worker's view"
        " of its parent's memory store (C{server.workers > 1}). A feature that"
        " keeps state in-process when the store is not shared must take its"
        " shared path (state in the store) whenever this is true, or it would"
        " be split between processes silently.")

    def connect():
        """
        Start using the store (Redis: open the connection in the background).
        Does not wait for the server: calls made while it is unreachable fail
        with C{StoreUnavailable}. @return: a Deferred firing with L{None}.
        """

    def disconnect():
        """Stop using the store. @return: a Deferred firing once closed."""

    def now():
        """
        The store's own time in seconds since the epoch (Redis C{TIME}), so
        that gateways with skewed clocks agree. @return: Deferred[float].
        """

    def get(key):
        """@return: Deferred firing with the value (bytes), or L{None} when absent."""

    def set(key, value, ttl=None):
        """
        Store C{value} (bytes) under C{key}, replacing any value and TTL; with
        C{ttl} the key expires after that many seconds.
        @return: Deferred firing with L{None}.
        """

    def incrby(key, amount, ttl=None):
        """
        Add the integer C{amount} (may be negative) to the counter C{key}
        (absent counts as 0). With C{ttl}, a key that has no TTL after the
        addition (it was just created) gets one: a fixed window.
        @return: Deferred firing with the new value (int).
        """

    def delete(key):
        """@return: Deferred firing with C{True} if C{key} existed."""

    def run(script, keys, args):
        """
        Run C{script} (a C{clawproxy.stores.Script}) atomically over C{keys}
        with C{args} (bytes, str, int or float; each passed as a string).
        @return: Deferred firing with the script's result: an int, bytes,
            L{None} or a list of these.
        """

    def health():
        """
        @return: C{{"backend", "healthy", "latency_ms", "errors"}}: the last
            call's latency and whether it reached the store, and the number
            of failed calls so far (synchronous).
        """
