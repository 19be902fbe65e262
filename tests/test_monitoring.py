"""Monitoring in deploy/ (docs/operations.md): the alert rules, proven by ``promtool test rules``, and the
Grafana dashboard (what is scraped, the ServiceMonitors, is checked with the other manifests in
tests/test_deploy.py).

The rules are the PrometheusRule's groups (rendered like ``kustomize build``), checked by Debian's promtool
(``prometheus`` package, installed by .ci/run): ``promtool check rules``, then every alert fired by a unit test
of tests/prometheus/*_test.yaml. Every metric a rule or a panel reads is one the code exposes (with the
labels the query uses) or one RabbitMQ's Prometheus endpoint does.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from authnotify.observability import metrics
from tests.test_deploy import K8S, by_kind, render

TESTS = Path(__file__).resolve().parent
ALERT_TESTS = sorted((TESTS / "prometheus").glob("*_test.yaml"))
DASHBOARD = K8S / "base" / "dashboards" / "authnotify.json"
RULES_FILE = "authnotify-rules.yaml"  # the name alerts_test.yaml reads the rules from

# RabbitMQ's Prometheus endpoint with per-object metrics (rabbitmq.yaml): the series the rules and panels use.
RABBITMQ_METRICS = {name: {"queue", "vhost"} for name in (
    "rabbitmq_queue_messages", "rabbitmq_queue_messages_ready", "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_consumers")}
# What Prometheus adds to every scraped series (target labels, the ServiceMonitors' relabelings).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container", "component"}
# The alerts the issue asks for, by what they watch.
REQUIRED_ALERTS = {
    "AuthnotifyDeadLettersGrowing", "AuthnotifyUnroutedNotEmpty", "AuthnotifyIngressUnknownAnswers",
    "AuthnotifyConsumerAbsent", "AuthnotifySchedulerLagging", "AuthnotifyMerchantCircuitOpen",
    "AuthnotifyTokensExpiringWithoutRefresh",
}


def exposed_metrics() -> dict[str, set[str]]:
    """Every series name authnotify's /metrics can show, with its label names."""
    series: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        name, labels, kind = value._name, set(value._labelnames), value._type
        if kind == "counter":
            series[f"{name}_total"] = labels
        elif kind == "histogram":
            series.update({f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels, f"{name}_count": labels})
        else:
            series[name] = labels
    return series


KNOWN = {**exposed_metrics(), **RABBITMQ_METRICS}
_SERIES = re.compile(r"\b((?:authnotify|rabbitmq)_[A-Za-z0-9_]+)\b(?:\s*\{([^}]*)\})?")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def check_query(expr: str, where: str) -> None:
    """Every metric of ``expr`` exists, and so does every label it matches or groups by."""
    used = _SERIES.findall(expr)
    assert used, f"{where}: reads no authnotify or RabbitMQ metric: {expr}"
    available = set(TARGET_LABELS)
    for name, matchers in used:
        assert name in KNOWN, f"{where}: {name} is not a metric authnotify or RabbitMQ exposes"
        available |= KNOWN[name]
        for label in _MATCHER.findall(matchers):
            assert label in KNOWN[name] | TARGET_LABELS, f"{where}: {name} has no label {label!r}"
    for grouping in _GROUPING.findall(expr):
        for label in filter(None, (part.strip() for part in grouping.split(","))):
            assert label in available, f"{where}: no metric of the query has the label {label!r}"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: `apt-get install prometheus` (.ci/run does it)", pytrace=False)
    return path


def run_promtool(*args: str, cwd: Path) -> str:
    done = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def rule() -> dict[str, Any]:
    (prometheus_rule,) = by_kind(render(K8S / "base"), "PrometheusRule").values()
    return prometheus_rule


def alert_rules(rule: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rules = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), f"an alert is defined twice: {sorted(names)}"
    return {r["alert"]: r for r in rules}


# --- the alerts --------------------------------------------------------------------------------------------


def test_one_rule_holds_every_alert_the_issue_asks_for_each_reading_real_metrics(rule: dict[str, Any]) -> None:
    alerts = alert_rules(rule)
    assert REQUIRED_ALERTS <= set(alerts), sorted(REQUIRED_ALERTS - set(alerts))
    for name, alert in alerts.items():
        check_query(alert["expr"], name)
        assert alert["labels"]["severity"] in ("warning", "critical"), name
        assert alert["annotations"]["summary"], name


@pytest.mark.slow  # runs promtool
def test_promtool_checks_the_rules_and_every_alert_fires_in_a_unit_test(rule: dict[str, Any], tmp_path: Path) -> None:
    alerts = alert_rules(rule)
    (tmp_path / RULES_FILE).write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    assert "SUCCESS" in run_promtool("check", "rules", RULES_FILE, cwd=tmp_path)

    fired: set[str] = set()
    for test_file in ALERT_TESTS:
        tests = yaml.safe_load(test_file.read_text())
        assert tests["rule_files"] == [RULES_FILE], test_file.name
        for group in tests["tests"]:
            for case in group.get("alert_rule_test", []):
                name = case["alertname"]
                assert name in alerts, f"{test_file.name}: {name} is not an alert of the rule"
                if case["exp_alerts"]:
                    fired.add(name)
                # The annotations without a template are the rule's own, as they are: only the templated ones
                # are written out in the test files.
                static = {key: value for key, value in alerts[name].get("annotations", {}).items() if "{{" not in value}
                for expected in case["exp_alerts"]:
                    expected["exp_annotations"] = {**static, **expected.get("exp_annotations", {})}
        (tmp_path / test_file.name).write_text(yaml.safe_dump(tests, sort_keys=False))
    assert fired == set(alerts), f"alerts no unit test fires: {sorted(set(alerts) - fired)}"
    output = run_promtool("test", "rules", *(test_file.name for test_file in ALERT_TESTS), cwd=tmp_path)
    assert output.count("SUCCESS") == len(ALERT_TESTS)


@pytest.mark.slow  # runs promtool
def test_a_unit_test_that_expects_the_wrong_thing_fails(rule: dict[str, Any], tmp_path: Path) -> None:
    """promtool really compares: the same rules, an alert expected where none fires, is a failure."""
    (tmp_path / RULES_FILE).write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    (tmp_path / "wrong_test.yaml").write_text(yaml.safe_dump({
        "rule_files": [RULES_FILE], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": [
            {"series": 'authnotify_merchant_circuit_open{merchant="M-1"}', "values": "0x30"}],
            "alert_rule_test": [{"eval_time": "20m", "alertname": "AuthnotifyMerchantCircuitOpen",
                                 "exp_alerts": [{"exp_labels": {"severity": "warning", "merchant": "M-1"}}]}]}]}))
    done = subprocess.run([promtool(), "test", "rules", "wrong_test.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "AuthnotifyMerchantCircuitOpen" in done.stdout + done.stderr


# --- the dashboard -----------------------------------------------------------------------------------------


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def test_the_dashboard_shows_what_an_operator_watches_from_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "authnotify" and dashboard["title"] == "authnotify"
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "namespace"}
    panels = dashboard_panels()
    titles = {panel["title"] for panel in panels}
    assert {"Ingress answers by outcome", "Publish-confirm latency", "Queue depths (ready)", "Processing outcomes",
            "Dead letters", "Merchant deliveries by merchant", "Tokens expiring", "Scheduler lag",
            "Merchant circuits open"} <= titles
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            check_query(target["expr"], f"panel {panel['title']!r}")


@pytest.mark.slow  # runs promtool
def test_every_panel_query_is_valid_promql(tmp_path: Path) -> None:
    records = []
    for panel in dashboard_panels():
        for target in panel["targets"]:
            # Grafana's variables as Grafana fills them in, so promtool can parse the query (as a recording rule).
            expr = target["expr"].replace("$__rate_interval", "5m").replace("$namespace", "authnotify")
            records.append({"record": f"dashboard:panel_{panel['id']}_{target['refId'].lower()}", "expr": expr})
    (tmp_path / "panels.yaml").write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": records}]}))
    assert "SUCCESS" in run_promtool("check", "rules", "panels.yaml", cwd=tmp_path)


def test_a_panel_reading_a_metric_that_does_not_exist_is_caught() -> None:
    with pytest.raises(AssertionError, match="authnotify_merchant_deliveries is not a metric"):
        check_query("sum(rate(authnotify_merchant_deliveries[5m]))", "panel")
    with pytest.raises(AssertionError, match="has no label 'merchant'"):
        check_query('sum(rate(authnotify_messages_processed_total{merchant="x"}[5m]))', "panel")
    with pytest.raises(AssertionError, match="no metric of the query has the label 'merchant'"):
        check_query("sum by (merchant) (rate(authnotify_messages_processed_total[5m]))", "panel")


def test_the_dashboard_ships_as_a_configmap_grafana_loads() -> None:
    (configmap,) = (c for c in by_kind(render(K8S / "base"), "ConfigMap").values()
                    if c["metadata"]["name"] == "authnotify-grafana-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["authnotify.json"]) == json.loads(DASHBOARD.read_text())
