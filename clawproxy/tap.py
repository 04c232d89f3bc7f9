"""twistd integration: C{twistd clawproxy -c FILE}."""

from __future__ import annotations

import gc
import os
import resource
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.protocol import Factory
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
    globalLogPublisher,
)
from twisted.python import usage

from clawproxy.compat import log_observers
from clawproxy.config import ConfigError, load_config
from clawproxy.policy.auth import KeyStoreError, load_key_store


class Options(usage.Options):
    optParameters = [
        ["config", "c", "etc/gateway.yaml", "Path to the gateway's YAML config."],
        # Set by the parent of several workers on each worker's command line.
        ["worker-index", None, None, "(internal) this process is worker N."],
        ["worker-listen", None, None, "(internal) inherited sockets: FD:FAMILY:TLS,..."],
        ["worker-channel", None, None, "(internal) the inherited channel to the parent."],
    ]

    def postOptions(self) -> None:
        try:
            self["loaded"] = load_config(self["config"])
            load_key_store(self["loaded"])
        except (ConfigError, KeyStoreError) as e:
            raise usage.UsageError(f"invalid configuration {self['config']}:\n{e}") from None
        except OSError as e:
            raise usage.UsageError(f"cannot read {self['config']}: {e.strerror}") from None


def makeService(options: Options) -> Any:
    from twisted.internet import reactor

    from clawproxy.service import build_service

    config = options["loaded"]
    raise_fd_limit()  # before the site derives its default max_connections from it
    if options["worker-index"] is not None:
        gateway = _worker(options, config, reactor)
    else:
        gateway = build_service(config, reactor)
    _install_sighup(reactor, gateway)
    tune_gc()
    # The level filter starts first (before the listeners log), stops last.
    root = MultiService()
    LogLevelFilter(config.logging.level).setServiceParent(root)
    gateway.setServiceParent(root)
    return root


def _worker(options: Options, config: Any, reactor: Any) -> Any:
    """A worker process: the data plane on inherited sockets, following its parent."""
    import socket

    from clawproxy.service import WorkerSetup, build_service
    from clawproxy.workers.child import WorkerChannel

    listen = []
    for item in options["worker-listen"].split(","):
        fd, family, tls = item.split(":")
        listen.append((int(fd), int(family), tls == "1"))
    setup = WorkerSetup(int(options["worker-index"]), tuple(listen),
                        int(options["worker-channel"]))
    gateway = build_service(config, reactor, worker=setup)
    stopping: list[bool] = []
    reactor.addSystemEventTrigger("before", "shutdown", stopping.append, True)

    def parent_gone() -> None:
        if hasattr(gateway.store, "attach"):
            gateway.store.attach(None)
        if not stopping:
            log.warn("worker {index}: the parent process is gone; stopping", index=setup.index)
            reactor.stop()

    channel = WorkerChannel(gateway, parent_gone)
    factory = Factory.forProtocol(lambda: channel)
    reactor.adoptStreamConnection(setup.channel, socket.AF_UNIX, factory)
    os.close(setup.channel)
    if hasattr(gateway.store, "attach"):
        gateway.store.attach(channel)
    return gateway


#: C{logging.level} names.
LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "error": LogLevel.error}


class LogLevelFilter(Service):
    """
    Keep events of the process log (twistd's: Twisted's and clawproxy's
    C{twisted.logger} events, not the access log) at C{level} or above.

    twistd creates its log observers (C{--logfile}, C{--syslog}, standard
    output) before it starts the services, and offers no public way to wrap
    them: while running, each observer of C{publisher} is replaced by a
    C{FilteringLogObserver} around it, and put back on stop. Reading the
    observers goes through L{clawproxy.compat.log_observers}.
    """

    name = "log-level"

    def __init__(self, level: str, publisher: LogPublisher = globalLogPublisher) -> None:
        self._predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
        self._publisher = publisher
        self._wrapped: list[tuple[Any, Any]] = []

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._wrap()

    def startService(self) -> None:
        super().startService()
        self._wrap()

    def stopService(self) -> None:
        super().stopService()
        for original, wrapper in reversed(self._wrapped):
            self._publisher.removeObserver(wrapper)
            self._publisher.addObserver(original)
        self._wrapped = []

    def _wrap(self) -> None:
        if self._wrapped:
            return
        for original in log_observers(self._publisher):
            wrapper = FilteringLogObserver(original, [self._predicate])
            self._publisher.removeObserver(original)
            self._publisher.addObserver(wrapper)
            self._wrapped.append((original, wrapper))


log = Logger()


def raise_fd_limit(rlimit: Any = resource) -> int:
    """
    Raise the process's soft limit on open files (C{RLIMIT_NOFILE}) to its
    hard limit, as nginx's C{worker_rlimit_nofile} or a systemd unit's
    C{LimitNOFILE} would: the soft default (often 1024) is far below what a
    gateway holding thousands of idle connections needs. An unlimited hard
    limit is read as C{/proc/sys/fs/nr_open} (or 2**20). Failing to raise it
    is logged and left at that.

    @param rlimit: the C{resource} module (tests pass a fake).
    @return: the soft limit now in force.
    """
    soft, hard = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)
    target = hard if hard != rlimit.RLIM_INFINITY else _nr_open()
    if soft != rlimit.RLIM_INFINITY and soft >= target:
        return soft
    try:
        rlimit.setrlimit(rlimit.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.warn("could not raise the open-file limit from {soft} to {target}: {error}",
                 soft=soft, target=target, error=e)
        return soft
    log.info("open-file limit raised from {soft} to {target}", soft=soft, target=target)
    return target


def _nr_open() -> int:
    """The kernel's ceiling on a process's open files (Linux), or 2**20."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2**20


#: Full collections after this many second-generation ones (CPython's default is 10).
FULL_COLLECTION_EVERY = 100


def tune_gc() -> None:
    """
    Keep the cyclic garbage collector's pauses short in a gateway process.

    Everything built until now (modules, the config, registry, routes and
    metrics: about 60,000 objects) lives as long as the process.
    C{gc.freeze()} moves it to the permanent generation, out of every full
    collection: under load those walked it about twice a second and paused
    the reactor for 20-40 ms each time.

    A full collection still walks every object of every request in flight:
    with 2,000 open streams that is a 60-130 ms pause. Requests leave no
    cyclic garbage of their own, so full collections are made ten times
    rarer (every L{FULL_COLLECTION_EVERY} second-generation collections); the
    first two generations keep CPython's thresholds.
    """
    gc.collect()
    gc.freeze()
    first, second, _ = gc.get_threshold()
    gc.set_threshold(first, second, FULL_COLLECTION_EVERY)


def _install_sighup(reactor: Any, gateway: Any) -> None:
    import signal

    def on_hup(signum: int, frame: Any) -> None:
        reactor.callFromThread(gateway.reload)

    try:
        signal.signal(signal.SIGHUP, on_hup)
    except (ValueError, AttributeError):  # not the main thread, or no SIGHUP here
        pass
