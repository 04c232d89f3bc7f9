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
