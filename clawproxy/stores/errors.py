"""The errors a state store fails with."""

from __future__ import annotations


class StoreError(Exception):
    """
    The store refused a command: a value of the wrong type, an error raised
    by a script. The store itself is reachable.
    """


class StoreUnavailable(StoreError):
    """
    The store could not be reached in time: no connection, the connection
    was lost, or no answer within C{store.redis.timeout}. Callers fail open
    or closed by C{store.redis.on_error} (L{clawproxy.stores.onerror}).
    """
