"""twistd integration: C{twistd clawproxy -c FILE}."""

from __future__ import annotations

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
    return gateway


def _install_sighup(reactor: Any, gateway: Any) -> None:
    import signal

    def on_hup(signum: int, frame: Any) -> None:
        reactor.callFromThread(gateway.reload)

    try:
        signal.signal(signal.SIGHUP, on_hup)
    except (ValueError, AttributeError):  # not the main thread, or no SIGHUP here
        pass
