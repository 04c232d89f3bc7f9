"""Per-request state carried through the stages of the data plane."""

from __future__ import annotations

import json
from typing import Any

import attrs

from clawproxy.errors import bad_request

#: The metrics' C{agent} label of a JWT agent not listed under C{agents}.
UNLISTED_AGENT = "-jwt"


@attrs.define(slots=True)
class LocalResponse:
    """A response the gateway makes itself (cache hit, fallback, builtin endpoint)."""

    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: tuple[tuple[bytes, bytes], ...] = ()


@attrs.define(slots=True, eq=False)
class RequestContext:
    """
    What the data plane knows about one request.

    Stages read and annotate it: auth sets C{agent}; routing sets C{route},
    C{pool} and C{model}; the relay sets C{instance}, C{attempts}, C{status},
    C{bytes_sent}.

    @ivar body: the request body parsed as JSON, once something asked for it
        with L{json_body}; L{None} before.
    @ivar model: the model the request is served as (after aliases), once the
        pool is resolved; L{None} when the request names none.
    @ivar path: the path as received, then (once handling starts) its canonical form
        (L{clawproxy.policy.routing.canonical_path}), computed once.
    """

    request: Any
    request_id: str
    client_ip: str
    method: bytes
    path: bytes
    query: bytes
    started: float
    agent: Any = None
    agent_name: str = "-"
    #: The C{agent} label of metrics: C{agent_name} for agents the gateway
    #: knows (C{agents}, C{keys_store}), L{UNLISTED_AGENT} for other JWT
    #: subjects, so what an issuer signs adds no series.
    agent_label: str = "-"
    route: Any = None
    pool: Any = None
    instance: Any = None
    body: Any = None
    attempts: int = 0
    status: int = 0
    bytes_sent: int = 0
    error: str | None = None
    upstream_started: float = 0.0
    rewrite: Any = None
    #: The gateway itself cut the response short (upstream broke mid-body).
    aborted: bool = False
    #: The connection was handed to a WebSocket tunnel after its 101: the
    #: request ends when the tunnel closes, and is logged as a 101.
    upgraded: bool = False
    response_headers: list[tuple[bytes, bytes]] = attrs.Factory(list)
    model: str | None = None
    #: A stage changed C{body}: it is sent upstream re-serialised.
    body_changed: bool = False
    #: Per-request state of features, under the feature's name (L{None}
    #: until one keeps some: most requests carry none).
    notes: dict[str, Any] | None = None
    #: The canonical path with C{server.base_path} removed, once the request is past
    #: its builtin endpoints: what routes match, scopes check and the upstream is sent.
    local_path: bytes | None = None
    #: The gateway has another attempt for this request should the pool fail
    #: (a model fallback): the relay then raises a 5xx it does not retry
    #: (as a 502) instead of relaying it.
    alternative: bool = False

    def json_body(self) -> dict[str, Any]:
        """
        The request body parsed as JSON, parsed at most once and shared by
        routing, rewrites, cache keys and token estimates.

        @raise clawproxy.errors.Rejected: 400 C{invalid_json} when the body is
            missing, not JSON, or not a JSON object.
        """
        body = self.body
        if body is None:
            content = self.request.content
            if content is None:
                raise bad_request("request body must be JSON", "invalid_json")
            content.seek(0)
            try:
                body = json.loads(content.read())
            except (ValueError, RecursionError):
                # RecursionError: nested deeper than the parser's stack allows.
                raise bad_request("request body is not valid JSON", "invalid_json") from None
            finally:
                content.seek(0)
            if not isinstance(body, dict):
                raise bad_request("request body must be a JSON object", "invalid_json")
            self.body = body
        return body

    @property
    def route_name(self) -> str:
        return self.route.name if self.route is not None else "-"

    @property
    def pool_name(self) -> str:
        return self.pool.name if self.pool is not None else "-"

    @property
    def instance_id(self) -> str:
        return self.instance.id if self.instance is not None else "-"
