"""
The parent process of C{server.workers: N}: it binds every data-plane
listener once, spawns N workers that adopt the sockets (C{spawnProcess}
with the descriptors, C{adoptStreamPort} in the child), restarts a worker
that dies (with backoff), forwards reloads and shutdowns, and gathers the
workers' status and metrics for the one admin listener it serves.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

import attrs
from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from clawproxy.listener import Listener
from clawproxy.stores.amp import StoreResponder, within
from clawproxy.workers.child import instance_state
from clawproxy.workers.commands import (
    GetMetrics,
    GetStatus,
    ProbeResult,
    SetDrained,
    SetWeight,
    Snapshot,
)

#: Seconds between two polls of the workers' status (C{/admin/status} shows
#: figures at most this old).
STATUS_INTERVAL = 1.0
#: Restart delays: the first, doubled after each quick death, up to the last.
RESTART_DELAYS = (0.5, 30.0)
#: A worker that lived this long resets the restart delay.
STABLE_AFTER = 30.0
#: Seconds a worker has to drain after SIGTERM (the data plane's own grace
#: is 30 s) before it is killed.
STOP_GRACE = 35.0
#: Seconds the parent waits for a worker's metrics or status.
ASK_TIMEOUT = 2.0


class _Unused(Factory):
    """The parent's factory on the sockets it hands over: it never accepts on them."""

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


@attrs.define(eq=False)
class Worker:
    """One worker slot: the process in it now, and its history."""

    index: int
    pid: int | None = None
    channel: Any = None
    process: Any = None
    started: float = 0.0
    restarts: int = 0
    delay: float = RESTART_DELAYS[0]
    status: dict[str, Any] = attrs.Factory(dict)
    ended: Deferred[None] | None = None
    #: The worker took its snapshot: it is up and answering its channel.
    ready: bool = False

    def row(self, now: float) -> dict[str, Any]:
        return {"index": self.index, "pid": self.pid,
                "state": ("running" if self.ready else
                          "starting" if self.process is not None else "restarting"),
                "uptime_seconds": round(now - self.started, 1) if self.pid else 0,
                "restarts": self.restarts,
                "in_flight": self.status.get("in_flight", 0),
                "requests": self.status.get("requests", 0)}


class ParentChannel(StoreResponder, amp.AMP):
    """The parent's end of one worker's channel: serves its memory store."""

    def __init__(self, store: Any) -> None:
        super().__init__()
        self.store = store


class _ChannelFactory(Factory):
    def __init__(self, proto: amp.AMP) -> None:
        self.proto = proto

    def buildProtocol(self, addr: Any) -> amp.AMP:
        return self.proto


class _WorkerProtocol(ProcessProtocol):
    def __init__(self, supervisor: Supervisor, worker: Worker) -> None:
        self.supervisor = supervisor
        self.worker = worker

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.ended(self.worker, reason)


class Supervisor(MultiService):
    """
    Runs the workers of a gateway whose C{server.workers} is more than one.

    Its children are the data-plane L{Listener}s (bound here, never accepted
    on here): they start before the workers and, on stop, close before the
    workers are told to drain, so new connections are refused at once.

    @param gateway: the parent's L{clawproxy.service.Gateway} (registry,
        metrics, store).
    @param argv: the worker command line less the worker options (tests
        pass their own).
    """

    log = Logger()

    def __init__(self, gateway: Any, count: int, argv: Sequence[str],
                 listeners: Sequence[tuple[Any, str, str, bool]]) -> None:
        super().__init__()
        self.gateway = gateway
        self.reactor = gateway.reactor
        self.count = count
        self.argv = list(argv)
        self.listeners = []
        for endpoint, role, source, tls in listeners:
            svc = Listener(endpoint, _Unused(), role, source)
            svc.tls = tls  # type: ignore[attr-defined]
            svc.setServiceParent(self)
            self.listeners.append(svc)
        self.workers = [Worker(i) for i in range(1, count + 1)]
        self._handed: list[tuple[int, int, bool]] = []
        self._poll = LoopingCall(self.poll_status)
        self._poll.clock = self.reactor
        self._stopping = False
        self._pending: dict[int, Any] = {}

    # -- life cycle

    def startService(self) -> None:
        super().startService()
        self._handed = []
        for svc in self.listeners:
            port = svc.port
            if port is None:  # not listening: the start has already failed
                return
            port.stopReading()  # the workers accept; the parent never does
            family = socket.AF_INET6 if ":" in port.getHost().host else socket.AF_INET
            self._handed.append((port.fileno(), family, svc.tls))
        for worker in self.workers:
            self.spawn(worker)
        self._poll.start(STATUS_INTERVAL, now=False).addErrback(
            lambda f: self.log.failure("worker status poll stopped", f))

    def stopService(self) -> Deferred[None]:
        self._stopping = True
        if self._poll.running:
            self._poll.stop()
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        # Close the parent's copies of the listening sockets first: once the
        # workers close theirs, new connections are refused, not queued.
        closed = super().stopService()
        ends = []
        for worker in self.workers:
            if worker.process is not None and worker.ended is not None:
                ends.append(worker.ended)
                self._signal(worker, "TERM")
                kill = self.reactor.callLater(STOP_GRACE, self._signal, worker, "KILL")
                worker.ended.addBoth(lambda r, k=kill: k.cancel() if k.active() else None)
        return DeferredList([closed or succeed(None), *ends]).addCallback(lambda _: None)

    def spawn(self, worker: Worker) -> None:
        """Start the worker process of slot C{worker}, with the sockets and a channel."""
        self._pending.pop(worker.index, None)
        parent_end, child_end = socket.socketpair()
        channel = ParentChannel(self.gateway.store)
        self.reactor.adoptStreamConnection(parent_end.fileno(), socket.AF_UNIX,
                                           _ChannelFactory(channel))
        parent_end.close()
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        listen = []
        for n, (fd, family, tls) in enumerate(self._handed, start=3):
            child_fds[n] = fd
            listen.append(f"{n}:{int(family)}:{int(tls)}")
        channel_fd = 3 + len(self._handed)
        child_fds[channel_fd] = child_end.fileno()
        args = [*self.argv, "--worker-index", str(worker.index),
                "--worker-listen", ",".join(listen), "--worker-channel", str(channel_fd)]
        worker.ended = Deferred()
        worker.process = self.reactor.spawnProcess(
            _WorkerProtocol(self, worker), args[0], args, env=os.environ.copy(),
            childFDs=child_fds)
        child_end.close()
        worker.pid = worker.process.pid
        worker.channel = channel
        worker.started = self.reactor.seconds()
        self.log.info("worker {index} started (pid {pid})", index=worker.index, pid=worker.pid)
        snapshot = json.dumps([instance_state(i) for i in self.gateway.registry]).encode()
        worker.channel.callRemote(Snapshot, instances=snapshot).addCallbacks(
            self._took_snapshot, self._lost_call, (worker, channel), None, (worker, Snapshot))

    def _took_snapshot(self, _: Any, worker: Worker, channel: Any) -> None:
        if worker.channel is channel:
            worker.ready = True

    def ended(self, worker: Worker, reason: Failure) -> None:
        """A worker process ended: replace it unless the gateway is stopping."""
        pid, ended = worker.pid, worker.ended
        worker.process = worker.channel = worker.ended = None
        worker.status = {}
        worker.ready = False
        if self._stopping:
            self.log.info("worker {index} (pid {pid}) stopped", index=worker.index, pid=pid)
        else:
            lived = self.reactor.seconds() - worker.started
            if lived >= STABLE_AFTER:
                worker.delay = RESTART_DELAYS[0]
            why = _why_ended(reason)
            self.log.warn("worker {index} (pid {pid}) {why} after {lived:.1f}s; "
                          "restarting in {delay:g}s", index=worker.index, pid=pid, why=why,
                          lived=lived, delay=worker.delay)
            worker.restarts += 1
            self.gateway.metrics.worker_restarts_total.inc()
            self._pending[worker.index] = self.reactor.callLater(worker.delay, self.spawn,
                                                                 worker)
            worker.delay = min(RESTART_DELAYS[1], worker.delay * 2)
        if ended is not None:
            ended.callback(None)

    def _signal(self, worker: Worker, name: str) -> None:
        if worker.process is not None:
            try:
                worker.process.signalProcess(name)
            except (OSError, ProcessLookupError):
                pass
            except Exception as e:  # ProcessExitedAlready
                self.log.debug("worker {index}: {e}", index=worker.index, e=e)

    # -- what the parent decides, told to every worker

    def reload(self) -> None:
        """The parent reloaded its configuration: so does every worker (SIGHUP)."""
        for worker in self.workers:
            self._signal(worker, "HUP")

    def probe_result(self, inst: Any, ok: bool, health: dict | None) -> None:
        body = json.dumps(health).encode() if health is not None else None
        self._broadcast(ProbeResult, instance=inst.id, ok=ok, health=body)

    def weight_set(self, instance_id: str, weight: float) -> None:
        self._broadcast(SetWeight, instance=instance_id, weight=weight)

    def drained_set(self, instance_id: str, drained: bool) -> None:
        self._broadcast(SetDrained, instance=instance_id, drained=drained)

    def _broadcast(self, command: type[amp.Command], **kw: Any) -> None:
        for worker in self.workers:
            self._send(worker, command, **kw)

    def _send(self, worker: Worker, command: type[amp.Command], **kw: Any) -> None:
        if worker.channel is None:
            return
        d = worker.channel.callRemote(command, **kw)
        if d is not None:
            d.addErrback(self._lost_call, worker, command)

    def _lost_call(self, failure: Failure, worker: Worker, command: Any) -> None:
        self.log.debug("worker {index} did not take {command}: {why}", index=worker.index,
                       command=command.__name__, why=failure.getErrorMessage())

    # -- what the workers know, gathered for the admin listener

    def poll_status(self) -> Deferred[None]:
        """Ask every worker for its figures; fold them into the parent's registry."""
        asks = [self._ask(w, GetStatus).addCallbacks(self._got_status, self._no_status,
                                                     (w,), None, (w,))
                for w in self.workers if w.ready]
        return DeferredList(asks).addCallback(lambda _: self._fold())

    def _ask(self, worker: Worker, command: type[amp.Command]) -> Deferred[Any]:
        return within(worker.channel.callRemote(command), ASK_TIMEOUT, self.reactor)

    def _got_status(self, result: dict[str, Any], worker: Worker) -> None:
        worker.status = json.loads(result["status"])

    def _no_status(self, failure: Failure, worker: Worker) -> None:
        self.log.debug("worker {index} gave no status: {why}", index=worker.index,
                       why=failure.getErrorMessage())

    def _fold(self) -> None:
        """The parent's instance counters are the sums of its workers'."""
        totals: dict[str, list[int]] = {}
        for worker in self.workers:
            for iid, row in worker.status.get("instances", {}).items():
                t = totals.setdefault(iid, [0, 0, 0])
                t[0] += row["active"]
                t[1] += row["requests"]
                t[2] += row["failures"]
        for inst in self.gateway.registry:
            inst.active, inst.requests, inst.failures = totals.get(inst.id, (0, 0, 0))

    def status(self) -> dict[str, Any]:
        """The C{processes} section of C{/admin/status}: a row per worker and totals."""
        now = self.reactor.seconds()
        rows = [w.row(now) for w in self.workers]
        return {"workers": rows,
                "totals": {"in_flight": sum(r["in_flight"] for r in rows),
                           "requests": sum(r["requests"] for r in rows),
                           "restarts": sum(r["restarts"] for r in rows)}}

    def section_statuses(self, name: str) -> list[Any]:
        """The latest status of section C{name} from each worker that reported one."""
        return [w.status["sections"][name] for w in self.workers
                if name in w.status.get("sections", ())]

    def in_flight(self) -> int:
        return sum(w.status.get("in_flight", 0) for w in self.workers)

    def metrics_text(self) -> Deferred[bytes]:
        """The parent's metrics and every worker's, merged into one page."""
        asks = [self._ask(w, GetMetrics) for w in self.workers if w.ready]
        d = DeferredList(asks, consumeErrors=True)
        return d.addCallback(self._merge)

    def _merge(self, results: list[tuple[bool, Any]]) -> bytes:
        texts = [r["text"].decode() for ok, r in results if ok]
        own = self.gateway.metrics.render().decode()
        return generate_latest(_Families(merge_metrics(own, texts)))


def _why_ended(reason: Failure) -> str:
    e = reason.value
    if getattr(e, "signal", None):
        return f"was killed by signal {e.signal}"
    if reason.check(ProcessDone):
        return "exited"
    return f"exited with status {getattr(e, 'exitCode', '?')}"


#: Families the parent alone knows (it runs the prober and the supervisor).
PARENT_ONLY = frozenset(("clawproxy_backend_up", "clawproxy_backend_weight",
                         "clawproxy_worker_restarts"))
#: Families merged by maximum, not sum (a state, not an amount).
BY_MAX = frozenset(("clawproxy_circuit_breaker_state",))
#: Families merged by minimum (a factor: the tightest process's).
BY_MIN = frozenset(("clawproxy_adaptive_factor",))


def merge_metrics(parent: str, workers: Sequence[str]) -> list[Metric]:
    """
    One set of families from the parent's and the workers' exposition texts:
    samples with the same name and labels are summed (counters, histograms,
    gauges of amounts), except the families only the parent knows (taken
    from the parent), states (the maximum) and factors (the minimum).
    C{_created} samples are dropped.
    """
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for source, text in [("parent", parent)] + [("worker", t) for t in workers]:
        for family in text_string_to_metric_families(text):
            if family.name.endswith("_created") or (
                    family.name in PARENT_ONLY and source != "parent"):
                continue
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            acc = values[family.name]
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in acc:
                    acc[key] = s.value
                elif family.name in BY_MAX:
                    acc[key] = max(acc[key], s.value)
                elif family.name in BY_MIN:
                    acc[key] = min(acc[key], s.value)
                else:
                    acc[key] += s.value
    for name, family in merged.items():
        for (sample, labels), value in values[name].items():
            family.add_sample(sample, dict(labels), value)
    return list(merged.values())


class _Families:
    """A fixed set of families, in the shape C{generate_latest} collects from."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def worker_argv(config_path: str) -> list[str]:
    """The command line of a worker of the gateway configured by C{config_path}."""
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", "clawproxy", "-c", os.path.abspath(config_path)]


__all__ = ["Supervisor", "merge_metrics", "worker_argv"]
