"""Errors the gateway answers with, in the OpenAI shape (SPEC section 4)."""

from __future__ import annotations

import json

import attrs


@attrs.frozen
class Rejected(Exception):
    """
    A request stage refuses the request: the gateway answers C{status} itself.

    @ivar status: HTTP status code.
    @ivar message: human-readable text for C{error.message}.
    @ivar type: C{error.type} (e.g. C{invalid_request_error}).
    @ivar code: C{error.code} (e.g. C{model_not_found}).
    @ivar headers: extra response headers, e.g. C{Retry-After}.
    """

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def body(self) -> bytes:
        """The JSON error body."""
        return error_body(self.message, self.type, self.code)


def error_body(message: str, type: str, code: str | None) -> bytes:
    """Serialise C{{"error": {"message", "type", "code"}}}."""
    return json.dumps({"error": {"message": message, "type": type, "code": code}}).encode()


def sse_error_event(message: str, type: str, code: str | None) -> bytes:
    """One SSE event carrying an error in the OpenAI shape: C{data: {"error": ...}}."""
    return b"data: " + error_body(message, type, code) + b"\n\n"


def bad_request(message: str, code: str = "bad_request") -> Rejected:
    return Rejected(400, message, "invalid_request_error", code)


def not_found(message: str, code: str = "not_found") -> Rejected:
    return Rejected(404, message, "invalid_request_error", code)


def too_large(message: str = "request body too large") -> Rejected:
    return Rejected(413, message, "invalid_request_error", "request_too_large")


def headers_too_large(message: str = "request headers too large") -> Rejected:
    return Rejected(431, message, "invalid_request_error", "headers_too_large")


def bad_gateway(message: str = "upstream sent an invalid response") -> Rejected:
    return Rejected(502, message, "upstream_error", "bad_gateway")


def unavailable(message: str, retry_after: int = 5, code: str = "service_unavailable") -> Rejected:
    return Rejected(503, message, "upstream_error", code, (("Retry-After", str(retry_after)),))


def gateway_timeout(message: str = "upstream timed out") -> Rejected:
    return Rejected(504, message, "upstream_error", "gateway_timeout")
