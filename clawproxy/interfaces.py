"""
The seams between the gateway core and the features that plug into it.

The data plane runs, for every request: L{IRequestStage}s in order (auth,
rate limits, cache lookup...), then route and pool choice, then upstream
attempts governed by an L{IRetryPolicy} and an L{IBreakerBoard}, then every
L{IResponseObserver}. Stages refuse a request by raising
L{clawproxy.errors.Rejected}, or answer it themselves by returning a
L{clawproxy.web.context.LocalResponse}.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IRequestStage(Interface):
    """One step of the request flow before routing (auth, rate limit, cache)."""

    name = Attribute("Short name used in logs, e.g. 'auth'.")

    def process(ctx):
        """
        Look at (and possibly annotate) the request context C{ctx}.

        @return: L{None} to go on, a C{LocalResponse} to answer now, or a
            Deferred firing with either.
        @raise clawproxy.errors.Rejected: to refuse the request.
        """


class IResponseObserver(Interface):
    """Told about every finished request (cache store, token accounting)."""

    def completed(ctx):
        """
        C{ctx} has been answered; C{ctx.status}, C{ctx.instance} and
        C{ctx.bytes_sent} are final. Must not raise.
        """


class IRetryPolicy(Interface):
    """Decides whether a failed upstream attempt is tried again elsewhere."""

    def should_retry(pool, outcome, attempt):
        """
        @param pool: the L{clawproxy.backends.registry.Pool}.
        @param outcome: C{"connect_failure"}, C{"refused"}, C{"5xx"} or C{"timeout"}.
        @param attempt: how many attempts were made so far (1 after the first).
        @return: the delay in seconds before the next attempt, or L{None} for no retry.
        """

    def record_request(pool):
        """A new client request is about to use C{pool} (feeds the retry budget)."""


class IBreakerBoard(Interface):
    """Circuit breakers for pools and instances (named C{POOL} and C{POOL/INSTANCE})."""

    def allow(pool, instance):
        """May a request go to C{instance} of C{pool} now?"""

    def record(pool, instance, ok):
        """Report the outcome of an attempt."""

    def state(name):
        """C{"CLOSED"}, C{"OPEN"} or C{"HALF_OPEN"} for the breaker C{name}."""


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
