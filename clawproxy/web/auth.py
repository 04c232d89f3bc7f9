"""
API key authentication as request stages of the data plane.

The gateway runs L{Identify} before routing, so C{agent.*} route conditions see the
agent, and L{Enforce} once the route is known, for its C{auth_required} and
C{allowed_agents}. L{auth_stages} builds both from a L{Config}; L{early_check} lets the
HTTP channel refuse a wrong key as soon as the headers are in, before the body is read.
The decisions themselves live in L{clawproxy.policy.auth}.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from clawproxy.config import ApiKeyConfig, Config
from clawproxy.errors import Rejected
from clawproxy.interfaces import IRequestStage
from clawproxy.policy.auth import (
    KeyStore,
    authenticate,
    authorize,
    load_key_store,
    strip_credentials,
)
from clawproxy.web.context import RequestContext

__all__ = ["Enforce", "Identify", "auth_stages", "early_check"]


def early_check(store: KeyStore, header_name: str, headers: Any) -> Rejected | None:
    """
    Check the credentials in a request's headers alone (no route, no body).

    Meant for header time: a request that presents a wrong, malformed or ambiguous key
    can be answered 401 before its body is read (and, with C{Expect: 100-continue},
    without a C{100 Continue}). A missing key is not refused here: whether the route
    needs one is only known after routing.

    @param headers: the request's L{twisted.web.http_headers.Headers}.
    @return: the 401 to answer with, or C{None} to go on.
    """
    try:
        authenticate(store, headers, header_name)
    except Rejected as e:
        return e
    return None


@implementer(IRequestStage)
class Identify:
    """
    Before routing: find the agent whose API key the request presents and set
    C{ctx.agent} and C{ctx.agent_name} (left as C{None} and C{"-"} when no key is sent).

    @ivar strip: remove the gateway's credentials (C{header_name}, C{Authorization:
        Bearer}) from the request once they are checked, so they are never relayed to a
        backend.
    """

    name = "identify"

    def __init__(self, store: KeyStore, header_name: str = "X-API-Key", strip: bool = True):
        self.store = store
        self.header_name = header_name
        self.strip = strip

    def __repr__(self) -> str:
        return f"<Identify {self.header_name} {self.store!r}>"

    def check_headers(self, headers: Any) -> Rejected | None:
        """L{early_check} with this stage's store and header."""
        return early_check(self.store, self.header_name, headers)

    def process(self, ctx: RequestContext) -> None:
        """
        @raise Rejected: 401 C{invalid_api_key} for a key that is presented but invalid.
        """
        headers = ctx.request.requestHeaders
        agent = authenticate(self.store, headers, self.header_name)
        if agent is None:
            return
        ctx.agent = agent
        ctx.agent_name = agent.name
        if self.strip:
            strip_credentials(headers, self.header_name)


@implementer(IRequestStage)
class Enforce:
    """After routing: apply the route's C{auth_required} and C{allowed_agents}."""

    name = "authorize"

    def __init__(self, header_name: str = "X-API-Key"):
        self.header_name = header_name

    def __repr__(self) -> str:
        return "<Enforce>"

    def process(self, ctx: RequestContext) -> None:
        """
        @raise Rejected: 401 C{missing_api_key} or 403 C{permission_denied}.
        """
        authorize(ctx.route.config, ctx.agent, self.header_name)


def auth_stages(config: Config) -> tuple[list[Any], list[Any]]:
    """
    The authentication stages C{config} asks for.

    With no C{auth} section, no agent keys and no route requiring auth (the default:
    no auth) both lists are empty. Otherwise L{Enforce} is always among the post-route
    stages, so that a route requiring auth fails closed (401) even when no method able
    to identify an agent is configured yet (JWT comes later).

    Reads C{auth.api_key.keys_store}: call again on reload to pick up changes.

    @return: C{(identify stages, post-route stages)} for L{GatewayResource}'s
        C{identify=} and C{stages=}.
    @raise clawproxy.policy.auth.KeyStoreError: (a L{ValueError}) when the keys store
        file is unusable.
    """
    auth = config.auth
    api_key = auth.api_key if auth is not None else None
    has_keys = any(agent.keys for agent in config.agents.values())
    if api_key is None and auth is None and has_keys:
        # Config does this itself; a hand-built Config may not have.
        api_key = ApiKeyConfig()
    routes_need = any(r.auth_required or r.allowed_agents is not None for r in config.routes)
    if api_key is None and auth is None and not routes_need:
        return [], []
    header = api_key.header if api_key is not None else "X-API-Key"
    identify: list[Any] = []
    if api_key is not None:
        identify.append(Identify(load_key_store(config), header))
    return identify, [Enforce(header)]
