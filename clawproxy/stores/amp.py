"""
The memory store of a parent process, served to its workers over AMP.

With C{server.workers > 1} and C{store.backend: memory}, limits, budgets,
breakers and the cache must not be split N ways: the parent keeps the one
L{MemoryStore} and each worker reaches it through L{AmpStore}, over the
socket pair the parent already holds to the worker. A worker's call is one
AMP round trip on a local socket; the parent runs it (scripts included)
synchronously, so every script stays atomic across workers.

Scripts travel by name and SHA1: the parent runs the Python twin of the
script with the same SHA1 (L{clawproxy.stores.script.script_by_sha}), so a
script must be defined at module level, where importing the module (as the
parent does when it imports the features) registers it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IReactorTime
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from clawproxy.interfaces import IStateStore
from clawproxy.stores.errors import StoreError, StoreUnavailable
from clawproxy.stores.script import INCRBY, Script, encode_arg, script_by_sha, ttl_ms
from clawproxy.stores.stats import StoreStats

#: AMP's limit on one value (the length prefix is two bytes).
_CHUNK = 0xFFFF


class BigBytes(amp.Argument):
    """
    Bytes of any length (AMP caps one value at 64 KiB): a long value is sent
    as C{name}, C{name.2}, C{name.3}... and joined again on arrival.
    """

    def toBox(self, name: bytes, strings: dict[bytes, bytes], objects: dict[str, Any],
              proto: Any) -> None:
        value = objects[name.decode("ascii")]
        if value is None:
            return
        chunks = [value[i:i + _CHUNK] for i in range(0, len(value), _CHUNK)] or [b""]
        strings[name] = chunks[0]
        for n, chunk in enumerate(chunks[1:], 2):
            strings[b"%s.%d" % (name, n)] = chunk

    def fromBox(self, name: bytes, strings: dict[bytes, bytes], objects: dict[str, Any],
                proto: Any) -> None:
        first = strings.get(name)
        if first is None:
            objects[name.decode("ascii")] = None
            return
        parts, n = [first], 2
        while (more := strings.get(b"%s.%d" % (name, n))) is not None:
            parts.append(more)
            n += 1
        objects[name.decode("ascii")] = b"".join(parts)


_ERRORS = {StoreError: b"STORE_ERROR"}


class StoreGet(amp.Command):
    arguments = [(b"key", amp.Unicode())]
    response = [(b"value", BigBytes(optional=True))]
    errors = _ERRORS


class StoreSet(amp.Command):
    arguments = [(b"key", amp.Unicode()), (b"value", BigBytes()),
                 (b"ttl_ms", amp.Integer())]
    response: list[Any] = []
    errors = _ERRORS


class StoreDelete(amp.Command):
    arguments = [(b"key", amp.Unicode())]
    response = [(b"existed", amp.Boolean())]
    errors = _ERRORS


class StoreNow(amp.Command):
    arguments: list[Any] = []
    response = [(b"now", amp.Float())]


class StoreRun(amp.Command):
    """Run a script; C{call} and C{reply} are L{encode_reply} JSON."""

    arguments = [(b"sha", amp.Unicode()), (b"name", amp.Unicode()), (b"call", BigBytes())]
    response = [(b"reply", BigBytes())]
    errors = _ERRORS


def encode_reply(value: Any) -> Any:
    """A script reply (int, bytes, None, lists of these) as JSON-able data."""
    if isinstance(value, bytes):
        return {"b": base64.b64encode(value).decode("ascii")}
    if isinstance(value, list):
        return [encode_reply(v) for v in value]
    return value


def decode_reply(value: Any) -> Any:
    """The inverse of L{encode_reply}."""
    if isinstance(value, dict):
        return base64.b64decode(value["b"])
    if isinstance(value, list):
        return [decode_reply(v) for v in value]
    return value


class StoreResponder(amp.CommandLocator):
    """
    The parent's side: answers workers' store calls from C{self.store} (a
    L{MemoryStore<clawproxy.stores.memory.MemoryStore>}). Mixed into the
    parent's AMP protocol for each worker.
    """

    store: Any

    @StoreGet.responder
    def get(self, key: str) -> Deferred[dict[str, Any]]:
        return self.store.get(key).addCallback(lambda v: {"value": v})

    @StoreSet.responder
    def set(self, key: str, value: bytes, ttl_ms: int) -> Deferred[dict[str, Any]]:
        ttl = ttl_ms / 1000 if ttl_ms else None
        return self.store.set(key, value, ttl).addCallback(lambda _: {})

    @StoreDelete.responder
    def delete(self, key: str) -> Deferred[dict[str, Any]]:
        return self.store.delete(key).addCallback(lambda e: {"existed": e})

    @StoreNow.responder
    def now(self) -> Deferred[dict[str, Any]]:
        return self.store.now().addCallback(lambda t: {"now": t})

    @StoreRun.responder
    def run(self, sha: str, name: str, call: bytes) -> Deferred[dict[str, Any]]:
        script = script_by_sha(sha)
        if script is None:
            return fail(StoreError(f"script {name} ({sha}) is not known to the parent"))
        data = json.loads(call)
        args = [base64.b64decode(a) for a in data["args"]]
        d = self.store.run(script, data["keys"], args)
        return d.addCallback(lambda r: {"reply": json.dumps(encode_reply(r)).encode()})


def within(call: Deferred[Any], seconds: float, clock: IReactorTime) -> Deferred[Any]:
    """
    The result of the AMP call C{call}, or a C{TimeoutError} after C{seconds}.

    Unlike C{addTimeout}, the call itself is left to finish: AMP cannot
    cancel a call, and an answer arriving for a Deferred already failed by
    a timeout would make it drop the whole connection.
    """
    out: Deferred[Any] = Deferred(lambda _: timer.cancel() if timer.active() else None)

    def expire() -> None:
        if not out.called:
            out.errback(TimeoutError(seconds, "AMP call"))

    def done(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if not out.called:
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)

    timer = clock.callLater(seconds, expire)
    call.addBoth(done)
    return out


@implementer(IStateStore)
class AmpStore:
    """
    L{IStateStore} of a worker: its parent's memory store, over AMP.

    The worker attaches its AMP connection to the parent with L{attach};
    until then, and after the connection is lost, calls fail at once with
    L{StoreUnavailable}. Each call is bounded by C{timeout} seconds.
    """

    backend = "memory"
    #: The parent's memory store, seen by every worker of the gateway.
    shared = True

    #: Seconds a call may take: the parent answers from memory, so only a
    #: parent stuck or gone gets near it.
    timeout = 1.0

    def __init__(self, clock: IReactorTime, metrics: Any = None) -> None:
        self._clock = clock
        self._amp: amp.AMP | None = None
        self.stats = StoreStats(self.backend, metrics)

    def attach(self, protocol: amp.AMP | None) -> None:
        """Use C{protocol} (connected to the parent), or none (L{None}: it was lost)."""
        self._amp = protocol

    def connect(self) -> Deferred[None]:
        return succeed(None)

    def disconnect(self) -> Deferred[None]:
        return succeed(None)

    def health(self) -> dict[str, Any]:
        health = self.stats.health()
        health["healthy"] = bool(health["healthy"] and self._amp is not None)
        return health

    def now(self) -> Deferred[float]:
        return self._call("now", StoreNow).addCallback(lambda r: r["now"])

    def get(self, key: str) -> Deferred[bytes | None]:
        return self._call("get", StoreGet, key=key).addCallback(lambda r: r["value"])

    def set(self, key: str, value: bytes, ttl: float | None = None) -> Deferred[None]:
        if not isinstance(value, bytes):
            raise TypeError(f"values are bytes, not {type(value).__name__}")
        d = self._call("set", StoreSet, key=key, value=value, ttl_ms=ttl_ms(ttl))
        return d.addCallback(lambda _: None)

    def incrby(self, key: str, amount: int, ttl: float | None = None) -> Deferred[int]:
        return self.run(INCRBY, [key], [int(amount), ttl_ms(ttl)])

    def delete(self, key: str) -> Deferred[bool]:
        return self._call("delete", StoreDelete, key=key).addCallback(lambda r: r["existed"])

    def run(self, script: Script, keys: Sequence[str],
            args: Sequence[bytes | str | int | float]) -> Deferred[Any]:
        call = json.dumps({
            "keys": list(keys),
            "args": [base64.b64encode(encode_arg(a)).decode("ascii") for a in args],
        }).encode()
        d = self._call(script.name, StoreRun, sha=script.sha, name=script.name, call=call)
        return d.addCallback(lambda r: decode_reply(json.loads(r["reply"])))

    def _call(self, op: str, command: type[amp.Command], **kw: Any) -> Deferred[Any]:
        protocol = self._amp
        if protocol is None:
            self.stats.failed(op, reachable=False)
            return fail(StoreUnavailable(f"store {op}: not connected to the parent process"))
        started = self._clock.seconds()
        d = within(protocol.callRemote(command, **kw), self.timeout, self._clock)
        d.addCallbacks(self._answered, self._failed, (started,), None, (op, started))
        return d

    def _answered(self, result: Any, started: float) -> Any:
        self.stats.succeeded(self._clock.seconds() - started)
        return result

    def _failed(self, failure: Failure, op: str, started: float) -> Failure:
        if failure.check(StoreError):
            self.stats.failed(op, reachable=True, seconds=self._clock.seconds() - started)
            return failure
        if failure.check(TimeoutError):
            self.stats.failed(op, reachable=False)
            return Failure(StoreUnavailable(
                f"store {op}: the parent process did not answer within {self.timeout}s"))
        if failure.check(ConnectionClosed):
            self.stats.failed(op, reachable=False)
            return Failure(StoreUnavailable(f"store {op}: the connection to the parent "
                                            f"process was lost"))
        if failure.check(amp.RemoteAmpError):
            # The parent failed in a way it did not name: a bug there.
            self.stats.failed(op, reachable=True, seconds=self._clock.seconds() - started)
            return Failure(StoreError(f"store {op}: {failure.getErrorMessage()}"))
        return failure  # CancelledError (the caller gave up), or a bug
