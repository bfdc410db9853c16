"""The Prometheus alerting rules in deploy/prometheus/.

promtool checks the rules and runs their unit tests (tcptrace-alerts.test.yml);
the tests here also hold the rules to the project's conventions and make sure
every alert has a unit test where it fires and one where it does not.

Needs promtool (Debian package ``prometheus``).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_dashboards import lint_expr, require_tool

PROMETHEUS_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "tcptrace-alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "tcptrace-alerts.test.yml"

EXPECTED_ALERTS = {
    "TCPCloseWaitLeak",
    "TCPTimeWaitPortPressure",
    "TCPConnectRefusalsSurge",
    "TCPConnectTimeoutsSurge",
    "TCPTraceLostEvents",
    "TCPTraceExporterDown",
}
SEVERITIES = {"critical", "warning", "info"}
# Words in capitals (TCP) are fine; separators are not.
CAMEL_CASE = re.compile(r"[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*")


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = require_tool("promtool", "prometheus")
    return subprocess.run(
        [promtool, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROMETHEUS_DIR,
    )


def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = _promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_expected_alerts_exist() -> None:
    names = [rule["alert"] for rule in _alert_rules()]
    assert len(names) == len(set(names)), names
    assert set(names) == EXPECTED_ALERTS


@pytest.mark.parametrize("rule", _alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_conventions(rule: dict[str, Any]) -> None:
    assert CAMEL_CASE.fullmatch(rule["alert"]), rule["alert"]
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert set(annotations) >= {"summary", "description"}
    # Templated with the alert's own labels or value, not a fixed sentence.
    assert "{{" in annotations["summary"]
    assert "{{" in annotations["description"]
    assert len(annotations["description"]) > len(annotations["summary"])


@pytest.mark.parametrize("rule", _alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_queries_use_exported_metrics(rule: dict[str, Any]) -> None:
    # Metric, label names and label values as the exporter documents them
    # (a typo there would make an alert that can never fire).
    assert lint_expr(rule["expr"], dashboard=False) == []


def test_every_alert_has_firing_and_quiet_cases() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]:
        for check in case.get("alert_rule_test", []):
            expected = check.get("exp_alerts") or []
            if not expected:
                quiet.add(check["alertname"])
                continue
            firing.add(check["alertname"])
            for alert in expected:
                # promtool compares all labels and annotations when given.
                assert "severity" in alert["exp_labels"], check
                assert set(alert["exp_annotations"]) >= {"summary", "description"}, check
    assert firing == EXPECTED_ALERTS
    assert quiet == EXPECTED_ALERTS


def test_rule_tests_catch_a_wrong_expectation(tmp_path: Path) -> None:
    """The unit tests really compare annotations: a changed one must fail."""
    text = RULE_TESTS.read_text(encoding="utf-8")
    assert "holds 20 sockets" in text
    (tmp_path / RULES.name).write_text(RULES.read_text(encoding="utf-8"), encoding="utf-8")
    broken = tmp_path / RULE_TESTS.name
    broken.write_text(text.replace("holds 20 sockets", "holds 21 sockets"), encoding="utf-8")
    promtool = require_tool("promtool", "prometheus")
    result = subprocess.run(
        [promtool, "test", "rules", broken.name],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "TCPCloseWaitLeak" in result.stdout + result.stderr
