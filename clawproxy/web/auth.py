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
from clawproxy.interfaces import IHeadCheck, IRequestStage
from clawproxy.policy.auth import (
    KeyStore,
    authenticate,
    authorize,
    extract_key,
    load_key_store,
    missing_api_key,
    strip_credentials,
)
from clawproxy.policy.routing import Router, canonical_path, strip_base
from clawproxy.web.context import RequestContext

__all__ = ["Enforce", "HeadKeyCheck", "Identify", "auth_parts", "auth_stages", "early_check"]


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
    phase = "identify"

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
    phase = "route"

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


@implementer(IHeadCheck)
class HeadKeyCheck:
    """
    The API-key check run when a request's head is in, before its body is read
    or C{100 Continue} sent: a key that is presented but invalid is refused, and
    so is a request without one when every route its path can reach needs one.
    """

    def __init__(self, identify: Identify, router: Router, base_path: bytes) -> None:
        self.identify = identify
        self.router = router
        self.base = base_path

    def check_head(self, method: bytes, path: bytes, headers: Any) -> None:
        stage = self.identify
        rej = stage.check_headers(headers)
        if rej is not None:
            raise rej
        if extract_key(headers, stage.header_name) is not None:
            return
        local = strip_base(canonical_path(path.partition(b"?")[0]), self.base)
        if local is None:
            return
        routes = _reachable(
            self.router.candidates(local.decode("utf-8", "replace"), method), headers)
        if routes and all(
            r.config.auth_required or r.config.allowed_agents is not None for r in routes
        ):
            raise missing_api_key(stage.header_name)


def _reachable(routes: list[Any], headers: Any) -> list[Any]:
    """
    The candidate routes a request without credentials can still end up on,
    in first-match order: up to and including the first one whose conditions
    are all decided by the head alone and match (later ones can never win).
    Routes with C{body.*} conditions stay in as undecided.
    """

    def header(name: str) -> str | None:
        v = headers.getRawHeaders(name.encode("latin-1"))
        return v[-1].decode("latin-1") if v else None

    out = []
    for route in routes:
        if any(key.startswith("body.") for key in route.config.match or {}):
            out.append(route)
        elif route.matches_conditions(header, None, None):
            out.append(route)
            break
    return out


def auth_parts(config: Config, router: Router, **_: Any) -> list[Any]:
    """
    Everything auth plugs into the data plane for C{config}: its stages
    (L{auth_stages}) and, when API keys are checked, the L{HeadKeyCheck}.
    """
    identify, stages = auth_stages(config)
    parts: list[Any] = [*identify, *stages]
    if identify:
        parts.append(HeadKeyCheck(identify[0], router, config.server.base_path.encode()))
    return parts
