"""
Authentication (API keys, JWTs), scopes and injected headers as parts of the data plane.

The gateway runs L{Identify} before routing, so C{agent.*} route conditions see the
agent (it also applies the agent's C{scopes}), L{Enforce} once the route is known, for
its C{auth_required} and C{allowed_agents}, and L{InjectHeaders} once the pool is known,
for the agent's C{inject_headers}. L{HeadAuthCheck} refuses what it can as soon as the
headers are in, before the body is read. L{auth_parts} builds them all from a L{Config}.
The decisions themselves live in L{clawproxy.policy.auth}, L{clawproxy.policy.jwt} and
L{clawproxy.policy.scopes}.

When both API keys and JWTs are configured, the API key header carries an API key and
C{Authorization: Bearer} carries a JWT when the value has the JWT shape (else an API
key); a request presenting two different credentials is refused (401). Agents are the
same registry either way: a token's agent gets the settings (C{scopes},
C{inject_headers}, limits) of the agent of that name under C{agents}, or defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zope.interface import implementer

from clawproxy.config import ApiKeyConfig, Config
from clawproxy.errors import Rejected
from clawproxy.interfaces import IAdminSection, IHeadCheck, IRequestStage
from clawproxy.policy.auth import (
    Agent,
    KeyStore,
    authenticate,
    authorize,
    extract_credential,
    invalid_api_key,
    load_key_store,
    missing_credentials,
    strip_credentials,
)
from clawproxy.policy.jwt import JwtVerifier
from clawproxy.policy.routing import Router, canonical_path, query_parameters, strip_base
from clawproxy.policy.scopes import check_scopes
from clawproxy.web.context import UNLISTED_AGENT, RequestContext

__all__ = [
    "AuthSection",
    "Enforce",
    "HeadAuthCheck",
    "Identify",
    "InjectHeaders",
    "auth_parts",
    "auth_stages",
    "early_check",
]


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
    Before routing: find the agent the request's credential (API key or JWT) names,
    set C{ctx.agent} and C{ctx.agent_name} (left as C{None} and C{"-"} when none is
    sent), and refuse (403) a path outside that agent's C{scopes}.

    @ivar strip: remove the gateway's credentials (C{header_name}, C{Authorization:
        Bearer}) from the request once they are checked, so they are never relayed to a
        backend.
    @ivar jwt: the token verifier, when JWTs are accepted.
    @ivar api_keys: whether API keys are accepted.
    """

    name = "identify"
    phase = "identify"

    def __init__(self, store: KeyStore, header_name: str = "X-API-Key", strip: bool = True,
                 jwt: JwtVerifier | None = None, api_keys: bool = True) -> None:
        self.store = store
        self.header_name = header_name
        self.strip = strip
        self.jwt = jwt
        self.api_keys = api_keys
        self._strip_header = header_name if api_keys else "Authorization"

    def __repr__(self) -> str:
        methods = [f"api_key {self.header_name}"] if self.api_keys else []
        methods += ["jwt"] if self.jwt is not None else []
        return f"<Identify {', '.join(methods)} {self.store!r}>"

    def missing(self) -> Rejected:
        """A new 401 for a request without credentials, naming the accepted kinds."""
        return missing_credentials(self.header_name, self.api_keys, self.jwt is not None)

    def authenticate(self, headers: Any) -> Agent | None:
        """
        The agent the request's credential names.

        @return: the L{Agent}, or C{None} when the request presents no credential.
        @raise Rejected: 401 for a credential that is presented but not valid.
        """
        if self.jwt is None:
            return authenticate(self.store, headers, self.header_name)
        found = extract_credential(headers, self.header_name, self.api_keys)
        if found is None:
            return None
        kind, value = found
        if kind == "jwt":
            name = self.jwt.verify(value)
            agent = self.store.agents.get(name)
            return agent if agent is not None else Agent(name=name)
        agent = self.store.lookup(value)
        if agent is None:
            raise invalid_api_key()
        return agent

    def check_headers(self, headers: Any) -> Rejected | None:
        """The 401 for an invalid credential in C{headers}, or C{None} to go on."""
        try:
            self.authenticate(headers)
        except Rejected as e:
            return e
        return None

    def process(self, ctx: RequestContext) -> None:
        """
        @raise Rejected: 401 C{invalid_api_key} / C{invalid_token} for a credential that
            is presented but invalid; 403 C{permission_denied} for a path (the canonical
            C{ctx.local_path}, the one routed and forwarded) outside the agent's scopes.
        """
        headers = ctx.request.requestHeaders
        agent = self.authenticate(headers)
        if agent is None:
            return
        ctx.agent = agent
        ctx.agent_name = agent.name
        ctx.agent_label = agent.name if agent.name in self.store.agents else UNLISTED_AGENT
        if self.strip:
            strip_credentials(headers, self._strip_header)
        if agent.scopes is not None:
            check_scopes(agent.scopes, ctx.local_path if ctx.local_path is not None
                         else ctx.path)


@implementer(IRequestStage)
class Enforce:
    """After routing: apply the route's C{auth_required} and C{allowed_agents}."""

    name = "authorize"
    phase = "route"

    def __init__(self, header_name: str = "X-API-Key",
                 missing: Callable[[], Rejected] | None = None):
        self.header_name = header_name
        self.missing = missing

    def __repr__(self) -> str:
        return "<Enforce>"

    def process(self, ctx: RequestContext) -> None:
        """
        @raise Rejected: 401 C{missing_api_key} (or C{missing_token},
            C{missing_credentials}) or 403 C{permission_denied}.
        """
        authorize(ctx.route.config, ctx.agent, self.header_name, self.missing)


@implementer(IRequestStage)
class InjectHeaders:
    """
    Once the pool is known: set the agent's C{inject_headers} on the request sent
    upstream, after removing the client's own credentials (every C{Authorization} value
    and the API key header). Route C{transforms} apply after it.
    """

    name = "inject_headers"
    phase = "pool"

    def __init__(self, header_name: str = "X-API-Key") -> None:
        self.header_name = header_name.encode("latin-1")

    def __repr__(self) -> str:
        return "<InjectHeaders>"

    def process(self, ctx: RequestContext) -> None:
        agent = ctx.agent
        if agent is None or not agent.inject_headers:
            return
        headers = ctx.request.requestHeaders
        headers.removeHeader(b"authorization")
        headers.removeHeader(self.header_name)
        for name, value in agent.inject_headers.items():
            headers.setRawHeaders(name.encode("latin-1"), [value.encode("utf-8")])


def auth_stages(config: Config, clock: Any = None) -> tuple[list[Any], list[Any]]:
    """
    The authentication stages C{config} asks for.

    With no C{auth} section, no agent keys and no route requiring auth (the default:
    no auth) both lists are empty. Otherwise L{Enforce} is always among the post-route
    stages, so that a route requiring auth fails closed (401) even when no method able
    to identify an agent is configured.

    Reads C{auth.api_key.keys_store} and the JWT key files: call again on reload to
    pick up changes.

    @param clock: the clock tokens are checked on; required when C{auth.jwt} is set.
    @return: C{(identify stages, post-route stages)} for L{GatewayResource}'s
        C{identify=} and C{stages=}.
    @raise clawproxy.policy.auth.KeyStoreError: (a L{ValueError}) when the keys store
        file or a JWT key is unusable.
    """
    auth = config.auth
    api_key = auth.api_key if auth is not None else None
    jwt = auth.jwt if auth is not None else None
    has_keys = any(agent.keys for agent in config.agents.values())
    if api_key is None and auth is None and has_keys:
        # Config does this itself; a hand-built Config may not have.
        api_key = ApiKeyConfig()
    routes_need = any(r.auth_required or r.allowed_agents is not None for r in config.routes)
    if api_key is None and auth is None and not routes_need:
        return [], []
    header = api_key.header if api_key is not None else "X-API-Key"
    if api_key is None and jwt is None:
        return [], [Enforce(header)]
    store = load_key_store(config)
    verifier = None
    if jwt is not None:
        if clock is None:
            raise TypeError("auth.jwt needs a clock to check tokens on")
        verifier = JwtVerifier(jwt, clock)
    identify = Identify(store, header, jwt=verifier, api_keys=api_key is not None)
    return [identify], [Enforce(header, identify.missing)]


@implementer(IHeadCheck)
class HeadAuthCheck:
    """
    The credential check run when a request's head is in, before its body is read
    or C{100 Continue} sent: a credential that is presented but invalid is refused
    (401), so is a malformed path (400), a path outside the agent's scopes (403),
    and a request without a credential when every route its path can reach needs
    one (401).
    """

    def __init__(self, identify: Identify, router: Router, base_path: bytes) -> None:
        self.identify = identify
        self.router = router
        self.base = base_path

    def check_head(self, method: bytes, path: bytes, headers: Any) -> None:
        stage = self.identify
        agent = stage.authenticate(headers)
        raw, _, query = path.partition(b"?")
        canonical = canonical_path(raw)  # a malformed path: 400 now
        local = strip_base(canonical, self.base)
        if local is None:
            return  # 404 once the body is in
        if agent is not None:
            check_scopes(agent.scopes, local)
            return
        routes = _reachable(
            self.router.candidates(local.decode("utf-8", "replace"), method), headers,
            query_parameters(query))
        if routes and all(
            r.config.auth_required or r.config.allowed_agents is not None for r in routes
        ):
            raise stage.missing()


def _reachable(routes: list[Any], headers: Any, query: Any = None) -> list[Any]:
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
        elif route.matches_conditions(header, None, None, query):
            out.append(route)
            break
    return out


@implementer(IAdminSection)
class AuthSection:
    """
    The C{auth} section of C{/admin/status}: which credentials are accepted and, for
    JWTs, the keys in force (by C{kid}, and default keys by type), how often they
    changed since the data plane was built, and how many verified tokens are cached.
    Never a key or a token.
    """

    name = "auth"

    def __init__(self, identify: Identify) -> None:
        self.identify = identify

    def status(self) -> dict[str, Any]:
        stage = self.identify
        out: dict[str, Any] = {"agents": len(stage.store.agents)}
        if stage.api_keys:
            out["api_keys"] = len(stage.store)
        verifier = stage.jwt
        if verifier is not None:
            keys = verifier.source.keys
            out["jwt"] = {
                "algorithms": list(verifier.config.algorithms),
                "kids": sorted(keys.by_kid),
                "default_keys": sorted(keys.defaults),
                "key_changes": verifier.source.generation,
                "cached_tokens": len(verifier.cache),
            }
        return out

    def endpoints(self) -> dict[Any, Any]:
        return {}


def auth_parts(config: Config, router: Router, clock: Any = None, **_: Any) -> list[Any]:
    """
    Everything auth plugs into the data plane for C{config}: its stages
    (L{auth_stages}); when credentials are checked, the L{HeadAuthCheck} and the
    L{AuthSection} of C{/admin/status}; and L{InjectHeaders} when some agent has
    C{inject_headers}.
    """
    identify, stages = auth_stages(config, clock)
    parts: list[Any] = [*identify, *stages]
    if identify:
        parts.append(HeadAuthCheck(identify[0], router, config.server.base_path.encode()))
        parts.append(AuthSection(identify[0]))
        if any(agent.inject_headers for agent in identify[0].store.agents.values()):
            parts.append(InjectHeaders(identify[0].header_name))
    return parts
