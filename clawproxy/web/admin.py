"""
The admin listener (SPEC section 5): status, weights, drain, breakers, one
agent's limits and budgets (merged from the L{IAgentUse} sections),
reload and Prometheus metrics. Bound to loopback by default; when a token
is configured every call needs C{Authorization: Bearer TOKEN}.

Web pages the operator visits must not drive it (CSRF, DNS rebinding):
without a token, a request is refused (403) unless its C{Host} is a
loopback name or address, and whenever a browser marks it as sent by a
page (C{Origin}, or C{Sec-Fetch-Site} other than C{none}/C{same-origin}).
With a token (which a page cannot send without a CORS preflight this
listener never answers), browser-sent state-changing calls are refused too,
as defence in depth.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from clawproxy import __version__
from clawproxy.backends.registry import Instance, Registry
from clawproxy.compat import client_gone
from clawproxy.errors import Rejected
from clawproxy.interfaces import IAgentUse
from clawproxy.metrics import CONTENT_TYPE, Metrics
from clawproxy.web.gateway import format_uptime


def instance_status(inst: Instance, breakers: Any) -> dict[str, Any]:
    return {
        "id": inst.id,
        "url": inst.url,
        "state": inst.state,
        "healthy": inst.healthy,
        "drained": inst.drained,
        "weight": inst.base_weight,
        "active": inst.active,
        "requests": inst.requests,
        "failures": inst.failures,
        "success_rate": round(inst.success_rate(), 4),
        "breaker": breakers.state(f"{inst.pool.name}/{inst.id}"),
        "health": inst.health or {},
    }


class AdminResource(Resource):
    """
    The admin API. Leaf resource: dispatches on the whole path.

    @param reload: called for C{POST /admin/reload}; returns a Deferred that
        fires with a list of config errors (empty on success), or None when
        reload is not available.
    @param store: the gateway's L{clawproxy.interfaces.IStateStore}, whose
        health C{/admin/status} shows under C{"store"}.
    @param sections: the data plane's L{clawproxy.interfaces.IAdminSection}s
        (replaced on reload): their status under their name, their endpoints.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, registry: Registry, metrics: Metrics, breakers: Any,
                 clock: IReactorTime, token: str | None,
                 metrics_path: str | None = "/metrics",
                 reload: Callable[[], Deferred] | None = None, workers: int = 1,
                 started: float | None = None, store: Any = None,
                 sections: Sequence[Any] = ()) -> None:
        super().__init__()
        self.registry = registry
        self.metrics = metrics
        self.breakers = breakers
        self.clock = clock
        self._token = token.encode() if token else None
        self._metrics_path = metrics_path.encode() if metrics_path else None  # None: off
        self._reload = reload
        self.workers = workers
        self.started = clock.seconds() if started is None else started
        self.store = store
        self.sections = sections
        #: Set by a parent of several workers: a Deferred of the merged
        #: metrics page (its own and its workers').
        self.metrics_text: Callable[[], Deferred[bytes]] | None = None

    def render(self, request: Any) -> Any:
        try:
            self._authorize(request)
            result = self._dispatch(request)
        except Rejected as rej:
            return self._error(request, rej)
        if isinstance(result, Deferred):
            result.addCallback(self._write_json, request)
            result.addErrback(self._failed, request)
            return NOT_DONE_YET
        if isinstance(result, bytes):
            return result
        return self._json(request, 200, result)

    def _authorize(self, request: Any) -> None:
        headers = request.requestHeaders
        if self._token is None:
            for host in headers.getRawHeaders(b"host", ()):
                if not loopback_host(host):
                    raise _forbidden("without admin.token only loopback Host names are served")
            if from_page(headers):
                raise _forbidden("admin calls from web pages are refused")
            return
        auth = request.getHeader(b"authorization") or b""
        scheme, _, given = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self._token):
            raise Rejected(401, "admin token required", "authentication_error",
                           "invalid_admin_token", (("WWW-Authenticate", 'Bearer realm="admin"'),))
        if request.method not in _SAFE_METHODS and from_page(headers):
            raise _forbidden("admin calls from web pages are refused")

    def _dispatch(self, request: Any) -> Any:
        path = request.path.rstrip(b"/") or b"/"
        method = request.method
        parts = path.split(b"/")
        if path == self._metrics_path and method == b"GET":
            request.setHeader(b"content-type", CONTENT_TYPE.encode())
            if self.metrics_text is not None:
                return self.metrics_text()
            return self.metrics.render()
        if path == b"/admin/status" and method == b"GET":
            return self.status()
        if path in (b"/health", b"/admin/health") and method == b"GET":
            return {"status": "ok", "version": __version__}
        if len(parts) == 5 and parts[1:3] == [b"admin", b"instances"]:
            if method != b"POST":
                raise Rejected(405, "use POST", "invalid_request_error", "method_not_allowed",
                               (("Allow", "POST"),))
            # Ids may hold ':' and '@', which clients (and our CLI) percent-encode.
            return self._instance_action(request, unquote(parts[3].decode("utf-8", "replace")),
                                         parts[4])
        if len(parts) == 4 and parts[1:3] == [b"health", b"circuit-breaker"]:
            name = unquote(parts[3].decode("utf-8", "replace"))
            return self._breaker(request, name)
        if len(parts) == 5 and parts[1:3] == [b"health", b"circuit-breaker"]:
            name = unquote((parts[3] + b"/" + parts[4]).decode("utf-8", "replace"))
            return self._breaker(request, name)
        if path == b"/admin/reload" and method == b"POST":
            if self._reload is None:
                raise Rejected(501, "reload is not available", "invalid_request_error",
                               "not_supported")
            return ensureDeferred(self._do_reload())
        if path == b"/admin/limits" and method == b"GET":
            return self._agent_use(request)
        for section in self.sections:
            handler = section.endpoints().get((method, path))
            if handler is not None:
                return handler(request)
        raise Rejected(404, "no such admin endpoint", "invalid_request_error", "not_found")

    def _agent_use(self, request: Any) -> Deferred[dict[str, Any]]:
        """
        C{GET /admin/limits?agent=NAME}: the agent's limits, budgets and
        current use, from every section that provides L{IAgentUse} (in
        section order; a key given twice keeps the first answer's).
        """
        names = parse_qs(request.uri.partition(b"?")[2].decode("latin-1")).get("agent")
        if not names:
            raise Rejected(400, "give ?agent=NAME", "invalid_request_error", "missing_agent")
        name = names[-1]

        async def gather() -> dict[str, Any]:
            out: dict[str, Any] = {"agent": name}
            for section in list(self.sections):
                if not IAgentUse.providedBy(section):
                    continue
                use = section.agent_use(name)
                if isinstance(use, Deferred):
                    use = await use
                for key, value in use.items():
                    out.setdefault(key, value)
            return out

        return ensureDeferred(gather())

    async def _do_reload(self) -> Any:
        errors = await self._reload()
        if errors:
            raise Rejected(400, "; ".join(errors), "invalid_request_error", "invalid_config")
        return {"reloaded": True}

    def status(self) -> dict[str, Any]:
        pools = {}
        for name, pool in self.registry.pools.items():
            pools[name] = {
                "algorithm": pool.config.algorithm,
                "protocol": pool.config.protocol,
                "breaker": self.breakers.state(name),
                "instances": [instance_status(i, self.breakers) for i in pool.instances],
            }
        status = {
            "version": __version__,
            "uptime": format_uptime(self.clock.seconds() - self.started),
            "workers": self.workers,
            "pools": pools,
        }
        if self.store is not None:
            status["store"] = self.store.health()
        for section in self.sections:
            status[section.name] = section.status()
        return status

    def _instance_action(self, request: Any, instance_id: str, action: bytes) -> Any:
        inst = self.registry.instance(instance_id)
        if inst is None:
            raise Rejected(404, f"no instance {instance_id!r}", "invalid_request_error",
                           "instance_not_found")
        if action == b"weight":
            weight = _read_json(request).get("weight")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise Rejected(400, "weight must be a number >= 0", "invalid_request_error",
                               "invalid_weight")
            self.registry.set_weight(instance_id, float(weight))
        elif action == b"drain":
            self.registry.set_drained(instance_id, True)
        elif action == b"undrain":
            self.registry.set_drained(instance_id, False)
        else:
            raise Rejected(404, "no such instance action", "invalid_request_error", "not_found")
        return instance_status(inst, self.breakers)

    def _breaker(self, request: Any, name: str) -> Any:
        describe = getattr(self.breakers, "describe", None)
        if describe is not None:
            info = describe(name)
            if info is not None:
                return info
            # A pool (or instance of one) without breakers: always closed.
        if name not in self.registry.pools and "/" not in name:
            raise Rejected(404, f"no breaker {name!r}", "invalid_request_error", "not_found")
        return {"name": name, "state": self.breakers.state(name), "failure_count": 0,
                "success_count": 0, "last_failure_time": None}

    def _write_json(self, result: Any, request: Any) -> None:
        if not client_gone(request):
            request.write(result if isinstance(result, bytes) else self._json(request, 200, result))
            request.finish()

    def _failed(self, failure: Failure, request: Any) -> None:
        if client_gone(request):
            return
        if failure.check(Rejected):
            body = self._error(request, failure.value)
        else:
            self.log.failure("admin request failed", failure)
            body = self._error(request, Rejected(500, "internal error", "server_error",
                                                 "internal_error"))
        request.write(body)
        request.finish()

    def _json(self, request: Any, code: int, obj: Any) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(obj).encode()

    def _error(self, request: Any, rej: Rejected) -> bytes:
        request.setResponseCode(rej.status)
        request.setHeader(b"content-type", b"application/json")
        for k, v in rej.headers:
            request.setHeader(k.encode(), v.encode())
        return rej.body()


_SAFE_METHODS = frozenset((b"GET", b"HEAD"))
#: C{Sec-Fetch-Site} values of requests a page did not make.
_NOT_FROM_PAGE = frozenset((b"none", b"same-origin"))


def loopback_host(host: bytes) -> bool:
    """
    Whether a C{Host} value names this machine's loopback: C{localhost},
    an address in 127.0.0.0/8 or C{[::1]}, with or without a port.
    """
    host = host.strip().lower()
    if host.startswith(b"["):
        name, sep, port = host[1:].partition(b"]")
        if not sep or (port and not (port[:1] == b":" and port[1:].isdigit())):
            return False
        return _is_loopback_ip(name, ipaddress.IPv6Address)
    name, sep, port = host.partition(b":")
    if sep and not port.isdigit():
        return False
    return name == b"localhost" or _is_loopback_ip(name, ipaddress.IPv4Address)


def _is_loopback_ip(name: bytes, kind: Any) -> bool:
    try:
        return kind(name.decode("ascii")).is_loopback
    except (ValueError, UnicodeDecodeError):
        return False


def from_page(headers: Any) -> bool:
    """
    Whether a browser says a web page made this request: it carries
    C{Origin}, or C{Sec-Fetch-Site} other than C{none} (typed by the user)
    and C{same-origin}. The CLI, curl and scrapers send neither.
    """
    if headers.hasHeader(b"origin"):
        return True
    site = headers.getRawHeaders(b"sec-fetch-site")
    return site is not None and any(v.strip().lower() not in _NOT_FROM_PAGE for v in site)


def _forbidden(message: str) -> Rejected:
    return Rejected(403, message, "permission_error", "admin_forbidden")


def _read_json(request: Any) -> dict[str, Any]:
    try:
        request.content.seek(0)
        data = json.loads(request.content.read() or b"{}")
    except (ValueError, RecursionError):
        raise Rejected(400, "body must be JSON", "invalid_request_error", "invalid_json") from None
    if not isinstance(data, dict):
        raise Rejected(400, "body must be a JSON object", "invalid_request_error", "invalid_json")
    return data
