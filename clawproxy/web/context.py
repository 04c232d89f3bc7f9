"""Per-request state carried through the stages of the data plane."""

from __future__ import annotations

from typing import Any

import attrs


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
    C{pool}; the relay sets C{instance}, C{attempts}, C{status}, C{bytes_sent}.
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
    response_headers: list[tuple[bytes, bytes]] = attrs.Factory(list)

    @property
    def route_name(self) -> str:
        return self.route.name if self.route is not None else "-"

    @property
    def pool_name(self) -> str:
        return self.pool.name if self.pool is not None else "-"

    @property
    def instance_id(self) -> str:
        return self.instance.id if self.instance is not None else "-"
