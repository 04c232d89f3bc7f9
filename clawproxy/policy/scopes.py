"""
Agent scopes: the paths an agent may call (SPEC C{agents.NAME.scopes}), pure.

A scope is a path glob matched on the request's canonical path
(L{clawproxy.policy.routing.canonical_path}) with C{server.base_path} removed: the one
path the gateway computes once per request, routes with and forwards upstream
(C{RequestContext.local_path}). Scopes are written like route paths. Canonicalisation
has already decoded percent-encoded unreserved characters, merged C{//}, resolved
C{.} and C{..}, and refused (400) an encoded C{/} or C{\\}, NUL, C{;} and C{#}; so
C{/api/v1/finance/../hr/x}, C{/api/v1/finance/%2e%2e/hr/x} and C{//api/v1/hr/x} are all
matched as C{/api/v1/hr/x}, exactly what the backend is sent.

Glob forms, as for route paths: C{/x/*} is C{/x} itself and anything under it;
C{*}, C{?} and C{[...]} elsewhere are shell globs (C{*} also matches C{/}); anything
else is an exact path. Matching is case-sensitive.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from clawproxy.errors import Rejected
from clawproxy.policy.routing import path_matcher

__all__ = ["ScopeSet", "check_scopes", "out_of_scope", "scope_set"]


def out_of_scope() -> Rejected:
    """The 403 for a path outside the agent's scopes."""
    return Rejected(403, "this agent may not call this path (outside its scopes)",
                    "permission_error", "permission_denied")


class ScopeSet:
    """Compiled scope globs; L{allows} a canonical path when any of them matches."""

    __slots__ = ("_matchers", "patterns")

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self._matchers: tuple[Callable[[str], bool], ...] = tuple(
            path_matcher(p) for p in self.patterns)

    def __repr__(self) -> str:
        return f"<ScopeSet {list(self.patterns)}>"

    def allows(self, path: str) -> bool:
        """@param path: a canonical path (no query)."""
        return any(m(path) for m in self._matchers)


@functools.lru_cache(maxsize=1024)
def scope_set(patterns: tuple[str, ...]) -> ScopeSet:
    """The L{ScopeSet} of C{patterns}, compiled once per distinct tuple."""
    return ScopeSet(patterns)


def check_scopes(scopes: tuple[str, ...] | None, path: bytes) -> None:
    """
    Refuse a canonical C{path} outside C{scopes} (C{None}: no scopes, all paths).

    @raise Rejected: 403 L{out_of_scope}.
    """
    if scopes is None:
        return
    if not scope_set(scopes).allows(path.decode("utf-8", "surrogateescape")):
        raise out_of_scope()
