"""Tests for L{clawproxy.tap}, the twistd plugin and L{clawproxy.service.build_service}."""

from __future__ import annotations

import textwrap

from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from clawproxy import tap
from clawproxy.config import Config, load_config
from clawproxy.service import Gateway, build_service

GOOD = """\
server:
  listen: ["tcp:18080:interface=127.0.0.1", "tcp:18081"]
admin:
  listen: "tcp:19901:interface=127.0.0.1"
logging: {output: "off"}
pools:
  main:
    health_check: {unhealthy_threshold: 1, interval: 5s}
    instances:
      - {id: a, url: "http://127.0.0.1:1", weight: 3}
      - {id: b, url: "http://127.0.0.1:2"}
routes:
  - {path: /v1/*, pool: main}
"""

BAD = """\
server:
  listen: ["tcp:8080"]
  colour: blue
pools:
  main:
    instances:
      - {id: a, url: "http://127.0.0.1:1", weight: -1}
routes:
  - {path: /v1/*, pool: nope}
"""


class PluginTests(SynchronousTestCase):
    """The twistd plugin."""

    def test_plugin_listed(self) -> None:
        """C{getPlugins(IServiceMaker)} includes C{clawproxy}, built from L{clawproxy.tap}."""
        makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("clawproxy", makers)
        maker = makers["clawproxy"]
        self.assertIs(maker.options, tap.Options)
        self.assertTrue(maker.description)


class OptionsTests(SynchronousTestCase):
    """C{twistd clawproxy -c FILE} options."""

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path

    def test_good_config(self) -> None:
        """A valid file is loaded into C{options["loaded"]}."""
        options = tap.Options()
        path = self.write(GOOD)
        options.parseOptions(["-c", path])
        self.assertIsInstance(options["loaded"], Config)
        self.assertEqual(options["loaded"].pools["main"].instances[0].weight, 3.0)

    def test_long_option(self) -> None:
        """C{--config} works too."""
        options = tap.Options()
        options.parseOptions(["--config", self.write(GOOD)])
        self.assertIn("main", options["loaded"].pools)

    def test_bad_config(self) -> None:
        """A bad file is a L{usage.UsageError} listing every problem as C{path: message}."""
        path = self.write(BAD)
        e = self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["-c", path])
        message = str(e)
        self.assertIn(path, message.splitlines()[0])
        lines = message.splitlines()[1:]
        self.assertIn("server.colour: unknown key", "\n".join(lines))
        self.assertTrue(any(line.startswith("pools.main.instances[0].weight:")
                            for line in lines), lines)
        self.assertTrue(any(line.startswith("routes[0].pool:") for line in lines), lines)
        for line in lines:
            self.assertRegex(line, r"^[\w.\[\]-]+: \S")

    def test_missing_file(self) -> None:
        """A file that cannot be read is a L{usage.UsageError} naming it."""
        path = self.mktemp()
        e = self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["-c", path])
        self.assertIn(path, str(e))

    def test_yaml_error(self) -> None:
        """A YAML syntax error is reported with its line."""
        path = self.write("pools: [\n")
        e = self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["-c", path])
        self.assertIn("line", str(e))


class BuildServiceTests(SynchronousTestCase):
    """L{build_service} on a L{MemoryReactorClock}: no sockets."""

    def setUp(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(GOOD)
        self.path = path
        self.config = load_config(path, environ={})
        self.reactor = MemoryReactorClock()
        self.gateway = build_service(self.config, self.reactor)

    def start(self) -> Gateway:
        self.gateway.startService()
        self.addCleanup(self.stop)
        return self.gateway

    def stop(self) -> None:
        if self.gateway.running:
            self.successResultOf(self.gateway.stopService())

    def test_listeners(self) -> None:
        """Starting listens on each C{server.listen} endpoint and on the admin endpoint."""
        self.assertIsInstance(self.gateway, Gateway)
        self.assertEqual(self.reactor.tcpServers, [])
        self.start()
        servers = [(port, interface) for port, _, _, interface in self.reactor.tcpServers]
        self.assertEqual(sorted(servers), [(18080, "127.0.0.1"), (18081, ""),
                                           (19901, "127.0.0.1")])
        factories = {port: factory for port, factory, _, _ in self.reactor.tcpServers}
        self.assertIs(factories[18080], self.gateway.site)
        self.assertIs(factories[18081], self.gateway.site)
        self.assertIs(factories[19901], self.gateway.admin_site)

    def test_parts(self) -> None:
        """The gateway exposes its live parts, wired to each other."""
        gw = self.gateway
        self.assertEqual([i.id for i in gw.registry], ["a", "b"])
        self.assertIs(gw.site.resource, gw.resource)
        self.assertIs(gw.admin.registry, gw.registry)
        self.assertIs(gw.registry.breakers, gw.admin.breakers)
        self.assertEqual(gw.metrics.registry.get_sample_value(
            "clawproxy_backend_weight", {"pool": "main", "instance": "a"}), 3.0)

    def test_prober_started(self) -> None:
        """Starting probes the instances at once, through the upstream agent."""
        self.start()
        self.assertEqual(sorted((h, p) for h, p, *_ in self.reactor.tcpClients),
                         [("127.0.0.1", 1), ("127.0.0.1", 2)])

    def test_stop(self) -> None:
        """Stopping fires once done, stops listening and leaves no timers behind."""
        self.start()
        d = self.gateway.stopService()
        self.successResultOf(d)
        self.assertFalse(self.gateway.running)
        self.reactor.advance(0)
        self.assertEqual([c for c in self.reactor.getDelayedCalls() if c.active()], [])

    def test_reload_keeps_runtime_state(self) -> None:
        """
        A reload from the same file keeps drain state, health and runtime
        weights of instances that keep their id and URL, and metrics show them.
        """
        gw = self.gateway
        gw.registry.set_drained("a", True)
        gw.registry.set_weight("b", 0)
        gw.registry.probe_result(gw.registry.instance("b"), False, {"gpu": 1})
        self.assertEqual(self.successResultOf(gw.reload()), [])
        a, b = gw.registry.instance("a"), gw.registry.instance("b")
        self.assertTrue(a.drained)
        self.assertEqual(a.base_weight, 3.0)
        self.assertEqual((b.healthy, b.health, b.base_weight), (False, {"gpu": 1}, 0.0))
        get = gw.metrics.registry.get_sample_value
        self.assertEqual(get("clawproxy_backend_up", {"pool": "main", "instance": "b"}), 0.0)
        self.assertEqual(get("clawproxy_backend_weight", {"pool": "main", "instance": "b"}),
                         0.0)
        self.assertIs(gw.site.resource, gw.resource)
        self.assertIs(gw.admin.registry, gw.registry)

    def test_reload_new_weight(self) -> None:
        """A weight changed in the file takes effect on reload when not changed at runtime."""
        with open(self.path, "w") as f:
            f.write(GOOD.replace("weight: 3", "weight: 7"))
        self.assertEqual(self.successResultOf(self.gateway.reload()), [])
        self.assertEqual(self.gateway.registry.instance("a").base_weight, 7.0)

    def test_reload_bad_file(self) -> None:
        """A bad file on reload is refused with its errors; the old config stays."""
        registry = self.gateway.registry
        with open(self.path, "w") as f:
            f.write(BAD)
        errors = self.successResultOf(self.gateway.reload())
        self.assertTrue(any(e.startswith("pools.main.instances[0].weight:") for e in errors))
        self.assertIs(self.gateway.registry, registry)


class FakeRlimit:
    """The part of the C{resource} module L{tap.raise_fd_limit} uses."""

    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.limits = (soft, hard)
        self.refuse = refuse

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == self.RLIMIT_NOFILE
        if self.refuse:
            raise ValueError("not allowed")
        self.limits = limits


class FdLimitTests(SynchronousTestCase):
    """L{tap.raise_fd_limit}: the soft open-file limit goes up to the hard one."""

    def test_raised_to_hard(self) -> None:
        """A soft limit under the hard one is raised to it."""
        fake = FakeRlimit(1024, 20000)
        self.assertEqual(tap.raise_fd_limit(fake), 20000)
        self.assertEqual(fake.limits, (20000, 20000))

    def test_already_at_hard(self) -> None:
        """A soft limit at the hard one is left alone."""
        fake = FakeRlimit(20000, 20000, refuse=True)
        self.assertEqual(tap.raise_fd_limit(fake), 20000)

    def test_unlimited_hard(self) -> None:
        """An unlimited hard limit: the soft one goes to the kernel's ceiling."""
        fake = FakeRlimit(1024, FakeRlimit.RLIM_INFINITY)
        raised = tap.raise_fd_limit(fake)
        self.assertGreater(raised, 1024)
        self.assertEqual(fake.limits, (raised, FakeRlimit.RLIM_INFINITY))

    def test_refused(self) -> None:
        """When the system refuses, the old soft limit stays in force (and is returned)."""
        fake = FakeRlimit(1024, 4096, refuse=True)
        self.assertEqual(tap.raise_fd_limit(fake), 1024)
        self.assertEqual(fake.limits, (1024, 4096))
