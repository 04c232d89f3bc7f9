"""A store's health and latency, for C{/admin/status} and the metrics."""

from __future__ import annotations

from typing import Any


class StoreStats:
    """
    Counts a store's failed calls (C{clawproxy_store_errors_total{op}}) and
    times the ones that went to a server (C{clawproxy_store_latency_seconds}).

    @ivar healthy: whether the last call reached the store.
    @ivar latency: seconds taken by the last call that reached the store.
    @ivar errors: failed calls so far.
    """

    def __init__(self, backend: str, metrics: Any = None) -> None:
        self.backend = backend
        self.healthy = True
        self.latency = 0.0
        self.errors = 0
        self._errors = metrics.store_errors_total if metrics is not None else None
        self._latency = metrics.store_latency if metrics is not None else None

    def succeeded(self, seconds: float) -> None:
        """A call was answered after C{seconds}."""
        self.healthy = True
        self.latency = seconds
        if self._latency is not None:
            self._latency.observe(seconds)

    def failed(self, op: str, reachable: bool, seconds: float | None = None) -> None:
        """
        A call C{op} failed; C{reachable} when the store answered with an
        error (C{seconds} after the call), not when it could not be reached.
        """
        self.errors += 1
        if self._errors is not None:
            self._errors.labels(op).inc()
        if not reachable:
            self.healthy = False
        elif seconds is not None:
            self.succeeded(seconds)

    def health(self) -> dict[str, Any]:
        return {"backend": self.backend, "healthy": self.healthy,
                "latency_ms": round(self.latency * 1000, 3), "errors": self.errors}
