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
