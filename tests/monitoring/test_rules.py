"""The chart's alerts against Prometheus' own rule engine: `promtool check rules` on the
rendered PrometheusRule, and `promtool test rules` (alerts_test.yaml) with series that
must fire each alert and series that must not (a run waiting for an approval is not
stuck; a retry ratio under the threshold does not fire; the event lag is read from the
histogram's buckets). Debian's `prometheus` package provides promtool; CI installs it, so
there a missing promtool fails instead of skipping."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .promql import rule_groups

HERE = Path(__file__).parent


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not installed (apt-get install prometheus): CI must run these")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_rendered_rules(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups({"alertLabels": {"team": "x"}})))
    result = _run("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def _without_annotations(groups: dict[str, object]) -> dict[str, object]:
    """promtool compares an alert's annotations whole; the test is about when alerts fire
    and with which labels (check rules has already parsed the annotation templates)."""
    for group in groups["groups"]:  # type: ignore[attr-defined]
        for rule in group["rules"]:
            rule.pop("annotations", None)
    return groups


def test_promtool_unit_tests_fire_each_alert_only_when_it_should(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(_without_annotations(rule_groups())))
    shutil.copy(HERE / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    result = _run("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_unit_tests_catch_the_old_stuck_rule(tmp_path: Path) -> None:
    """The same tests against the rule as it was (active runs, waiting ones included)
    fail: a run waiting for an approval fired it. Proves the test can fail."""
    groups = _without_annotations(rule_groups())
    for group in groups["groups"]:  # type: ignore[attr-defined]
        for rule in group["rules"]:
            if rule["alert"] == "CadenzaRunsStuck":
                rule["expr"] = (
                    "(sum by (workload_namespace, workflow) (cadenza_active_runs) > 0) unless "
                    "(sum by (workload_namespace, workflow) (increase(cadenza_runs_finished_total[30m])) > 0)"
                )
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups))
    shutil.copy(HERE / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    result = _run("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert "CadenzaRunsStuck" in result.stdout + result.stderr
    assert 'workload_namespace="b"' in result.stdout + result.stderr  # the run waiting for approval
