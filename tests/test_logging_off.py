"""
C{logging.output: "off"} turns the access log off (it is not a file named C{off}).

(Unquoted, YAML reads C{off} as false, which the loader takes as C{off} too.)
"""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from clawproxy.config import load_config
from clawproxy.web.accesslog import AccessLog

CONFIG = """
pools:
  main:
    models: ["*"]
    instances: [{id: a, url: "http://127.0.0.1:9"}]
routes:
  - {path: /v1/*, pool: main}
logging: {output: %s}
"""


class LoggingOffTests(SynchronousTestCase):
    """The config keeps C{off} as is, so the access log writes nothing anywhere."""

    def load(self, output: str):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "gw.yaml")
        with open(path, "w") as f:
            f.write(CONFIG % output)
        return directory, load_config(path, {})

    def test_off(self) -> None:
        """C{off} is not resolved against the config's directory, and no file appears."""
        directory, config = self.load('"off"')
        self.assertEqual(config.logging.output, "off")
        log = AccessLog.open(config.logging.output, Clock())
        self.assertIsNone(log._out)
        log.close()
        self.assertEqual(os.listdir(directory), ["gw.yaml"])

    def test_unquoted_off(self) -> None:
        """Unquoted C{off} (a YAML false) also means no access log."""
        _, config = self.load("off")
        self.assertEqual(config.logging.output, "off")

    def test_path_still_resolved(self) -> None:
        """Other relative outputs still resolve against the config's directory."""
        directory, config = self.load('"offline.log"')
        self.assertEqual(config.logging.output, os.path.join(directory, "offline.log"))
