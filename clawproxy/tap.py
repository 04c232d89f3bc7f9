"""twistd integration: C{twistd clawproxy -c FILE}."""

from __future__ import annotations

import gc
from typing import Any

from twisted.python import usage

from clawproxy.config import ConfigError, load_config
from clawproxy.policy.auth import KeyStoreError, load_key_store


class Options(usage.Options):
    optParameters = [["config", "c", "etc/gateway.yaml", "Path to the gateway's YAML config."]]

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

    gateway = build_service(options["loaded"], reactor)
    _install_sighup(reactor, gateway)
    tune_gc()
    return gateway


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
