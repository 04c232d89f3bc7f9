"""
The operations files users deploy with (issue 11 points 6 and 7): the Grafana
dashboard, the Prometheus alert rules, the Dockerfile, the systemd unit and
the Kubernetes manifests. Each is parsed and checked for what an operator
relies on; every metric they name must exist on a running gateway's
C{/metrics}; the alert rules pass C{promtool check rules} and their unit tests
(C{promtool test rules}).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
from typing import Any

import yaml
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from clawproxy.config import parse_config
from tests.integration.helpers import Harness, bounded, pool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(ROOT, "etc", "grafana", "clawproxy.json")
ALERTS = os.path.join(ROOT, "etc", "prometheus", "alerts.yml")
ALERT_TESTS = os.path.join(ROOT, "etc", "prometheus", "alerts_test.yml")
KUBERNETES = os.path.join(ROOT, "etc", "deploy", "kubernetes")
DOCKERFILE = os.path.join(ROOT, "Dockerfile")
SYSTEMD = os.path.join(ROOT, "etc", "deploy", "systemd", "clawproxy.service")

#: A metric name in a PromQL expression.
_METRIC = re.compile(r"\bclawproxy_[a-z_]+\b")
#: The alerts the issue asks for, by what they watch.
ALERT_NAMES = {
    "ClawproxyInstanceDown", "ClawproxyPoolDown", "ClawproxyCircuitBreakerOpen",
    "ClawproxyHighErrorRatio", "ClawproxyHighLatencyP99", "ClawproxyRateLimitSurge",
    "ClawproxyStoreErrors", "ClawproxyWorkerCrashLoop",
}


def load(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f) if path.endswith(".json") else yaml.safe_load(f)


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in load(DASHBOARD)["panels"] for t in p["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load(ALERTS)["groups"] for r in g["rules"]]


def manifests() -> list[dict[str, Any]]:
    docs = []
    for name in sorted(os.listdir(KUBERNETES)):
        if name.endswith(".yaml"):
            with open(os.path.join(KUBERNETES, name), encoding="utf-8") as f:
                docs += [d for d in yaml.safe_load_all(f) if d]
    return docs


def promtool() -> str:
    """The promtool binary; in CI (which installs it) its absence is a failure."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            raise AssertionError("promtool is missing: .ci/run installs Debian's prometheus")
        raise SkipTest("promtool not installed (apt-get install prometheus)")
    return path


class DashboardTests(SynchronousTestCase):
    """C{etc/grafana/clawproxy.json}."""

    def test_panels(self) -> None:
        """The dashboard has a panel for each view the issue lists, each with a query."""
        dash = load(DASHBOARD)
        titles = " | ".join(p["title"] for p in dash["panels"]).lower()
        for view in ("requests by route", "requests by agent", "errors", "p50 / p95 / p99",
                     "first byte", "tokens/s", "rate limited", "cache hit ratio",
                     "circuit breakers", "instance health", "queue depth",
                     "worker restarts"):
            self.assertIn(view, titles)
        self.assertEqual(len({p["id"] for p in dash["panels"]}), len(dash["panels"]))
        for panel in dash["panels"]:
            self.assertTrue(panel["targets"], panel["title"])
            self.assertEqual(panel["datasource"]["uid"], "${datasource}")

    def test_queries_use_the_job_variable(self) -> None:
        """Every query is scoped to the C{$job} picked at the top of the dashboard."""
        for expr in dashboard_exprs():
            for selector in re.findall(r"clawproxy_[a-z_]+(\{[^}]*\})?", expr):
                self.assertIn('job=~"$job"', selector, expr)


class AlertRuleTests(SynchronousTestCase):
    """C{etc/prometheus/alerts.yml}."""

    def test_alerts(self) -> None:
        """Each alert the issue asks for is there, with a severity and a summary."""
        rules = alert_rules()
        self.assertEqual({r["alert"] for r in rules}, ALERT_NAMES)
        for rule in rules:
            self.assertIn(rule["labels"]["severity"], ("warning", "critical"))
            self.assertTrue(rule["annotations"]["summary"])

    def test_promtool_check(self) -> None:
        """C{promtool check rules} accepts the file."""
        done = subprocess.run([promtool(), "check", "rules", ALERTS], capture_output=True,
                              text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn(f"SUCCESS: {len(ALERT_NAMES)} rules found", done.stdout)

    def test_promtool_unit_tests(self) -> None:
        """The rules' unit tests (firing and quiet cases of every alert) pass."""
        tested = {t["alertname"] for case in load(ALERT_TESTS)["tests"]
                  for t in case["alert_rule_test"]}
        self.assertEqual(tested, ALERT_NAMES)
        done = subprocess.run([promtool(), "test", "rules", ALERT_TESTS], capture_output=True,
                              text=True, timeout=60, cwd=os.path.dirname(ALERT_TESTS))
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)


class MetricNamesTests(TestCase):
    """Every metric the dashboard and the alerts name exists on a running gateway."""

    timeout = 60

    async def test_named_metrics_exist(self) -> None:
        h = Harness(self)
        config = h.config({"sim": pool(h.simulator("sim-1"))})
        gw = await h.gateway(config)
        response = await bounded(h.client().get(gw.admin_url + "/metrics"))
        text = (await bounded(response.content())).decode()
        exposed = set()
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                name, kind = line.split()[2:4]
                exposed.add(name)
                if kind == "histogram":
                    exposed.update(name + s for s in ("_bucket", "_sum", "_count"))
        named = set()
        for expr in dashboard_exprs() + [r["expr"] for r in alert_rules()]:
            named.update(_METRIC.findall(expr))
        self.assertGreater(len(named), 15)
        self.assertEqual(named - exposed, set())


class DockerfileTests(SynchronousTestCase):
    """C{Dockerfile}: small, non-root, health-checked, runs the gateway."""

    def instructions(self) -> list[tuple[str, str]]:
        with open(DOCKERFILE, encoding="utf-8") as f:
            text = f.read().replace("\\\n", " ")
        return [tuple(line.split(None, 1)) for line in text.splitlines()  # type: ignore[misc]
                if line.strip() and not line.lstrip().startswith("#")]

    def test_shape(self) -> None:
        steps = self.instructions()
        ops = [op for op, _ in steps]
        self.assertTrue(all(op.isupper() for op in ops), ops)
        froms = [arg for op, arg in steps if op == "FROM"]
        self.assertTrue(all("slim" in f for f in froms), froms)
        final = steps[ops.index("FROM", ops.index("FROM") + 1):]
        user = [arg for op, arg in final if op == "USER"]
        self.assertEqual(len(user), 1)
        self.assertNotIn(user[0].strip(), ("root", "0"))
        health = [arg for op, arg in final if op == "HEALTHCHECK"]
        self.assertEqual(len(health), 1)
        self.assertIn("/health", health[0])
        entry = json.loads(dict(final)["ENTRYPOINT"])
        cmd = json.loads(dict(final)["CMD"])
        self.assertEqual(entry[0], "twistd")
        self.assertIn("clawproxy", entry)
        config = cmd[cmd.index("-c") + 1]
        copied = [arg.split() for op, arg in final if op == "COPY"]
        sources = {dest: src for src, dest in (c[-2:] for c in copied)}
        self.assertIn(config, sources)
        with open(os.path.join(ROOT, sources[config]), encoding="utf-8") as f:
            parsed = parse_config(yaml.safe_load(f), environ={})
        self.assertIn("tcp:8080:interface=0.0.0.0", parsed.server.listen)
        self.assertIn("127.0.0.1", parsed.admin.listen)


class SystemdTests(SynchronousTestCase):
    """C{etc/deploy/systemd/clawproxy.service}."""

    def test_unit(self) -> None:
        unit = configparser.ConfigParser(interpolation=None, strict=False)
        unit.optionxform = str  # type: ignore[assignment,method-assign]
        unit.read(SYSTEMD, encoding="utf-8")
        service = unit["Service"]
        self.assertIn("twistd --nodaemon --pidfile= clawproxy -c", service["ExecStart"])
        self.assertIn("-HUP $MAINPID", service["ExecReload"])
        self.assertEqual(service["KillSignal"], "SIGTERM")
        self.assertGreater(int(service["TimeoutStopSec"]), 30)
        self.assertNotIn(service["User"], ("root", "0"))
        self.assertEqual(unit["Install"]["WantedBy"], "multi-user.target")


class KubernetesTests(SynchronousTestCase):
    """C{etc/deploy/kubernetes/}: parse, and hold what the deployment relies on."""

    def by_kind(self) -> dict[str, list[dict[str, Any]]]:
        kinds: dict[str, list[dict[str, Any]]] = {}
        for doc in manifests():
            self.assertIn("apiVersion", doc)
            kinds.setdefault(doc["kind"], []).append(doc)
        return kinds

    def test_kinds(self) -> None:
        kinds = self.by_kind()
        for kind in ("Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler",
                     "PodDisruptionBudget", "Secret"):
            self.assertIn(kind, kinds)
        with open(os.path.join(KUBERNETES, "kustomization.yaml"), encoding="utf-8") as f:
            listed = set(yaml.safe_load(f)["resources"])
        files = {n for n in os.listdir(KUBERNETES) if n.endswith(".yaml")}
        self.assertEqual(files - listed, {"kustomization.yaml", "secret.example.yaml"})

    def gateway(self) -> dict[str, Any]:
        (deployment,) = [d for d in self.by_kind()["Deployment"]
                         if d["metadata"]["name"] == "clawproxy"]
        return deployment

    def test_probes_and_drain(self) -> None:
        """Readiness on the data plane's /health, liveness alive-only, a draining preStop."""
        spec = self.gateway()["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        self.assertEqual(container["readinessProbe"]["httpGet"]["path"], "/health")
        self.assertIn("/health", " ".join(container["livenessProbe"]["exec"]["command"]))
        self.assertIn("preStop", container["lifecycle"])
        pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
        # preStop, then the 30 s drain on SIGTERM, within the grace period.
        self.assertGreaterEqual(spec["terminationGracePeriodSeconds"], pre_stop + 30)
        self.assertTrue(spec["securityContext"]["runAsNonRoot"])

    def test_selectors_match(self) -> None:
        kinds = self.by_kind()
        labels = self.gateway()["spec"]["template"]["metadata"]["labels"]
        for doc in kinds["Service"] + kinds["PodDisruptionBudget"]:
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            if selector.get("app.kubernetes.io/name") == "clawproxy":
                self.assertLessEqual(selector.items(), labels.items())
        (hpa,) = kinds["HorizontalPodAutoscaler"]
        self.assertEqual(hpa["spec"]["scaleTargetRef"]["name"], "clawproxy")

    def test_config_is_valid(self) -> None:
        """The ConfigMap's gateway.yaml passes the gateway's own validation, on Redis."""
        (cm,) = self.by_kind()["ConfigMap"]
        config = parse_config(yaml.safe_load(cm["data"]["gateway.yaml"]),
                              environ={"CLAWPROXY_ADMIN_TOKEN": "t" * 32})
        self.assertEqual(config.store.backend, "redis")
        self.assertEqual(config.store.redis.url, "redis://clawproxy-redis:6379/0")
        (redis_service,) = [s for s in self.by_kind()["Service"]
                            if s["metadata"]["name"] == "clawproxy-redis"]
        self.assertEqual(redis_service["spec"]["ports"][0]["port"], 6379)
        mount = self.gateway()["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]
        self.assertEqual(mount["mountPath"], "/etc/clawproxy")
