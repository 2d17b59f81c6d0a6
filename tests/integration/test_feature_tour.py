"""examples/feature-tour through the CLI: every control-layer feature in one Succeeded run."""

from __future__ import annotations

import json

from ..conftest import EXAMPLES, cadenza

TOUR = str(EXAMPLES / "feature-tour")


def test_feature_tour_succeeds_and_shows_every_feature() -> None:
    result = cadenza(
        "run",
        TOUR,
        "--input",
        f"@{TOUR}/input.json",
        "--approve",
        "publish",
        "--by",
        "ada",
        "--signal",
        'release={"version": "1.2"}',
        "--output",
        "json",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    out, steps = doc["outputs"], doc["steps"]
    assert doc["phase"] == "Succeeded"
    assert out["topics"] == ["retries", "fan-out", "approvals"]
    assert out["researchAttempts"] == [1, 2, 1]
    assert steps["research"]["items"] == {"total": 3, "Succeeded": 3, "retries": 1}
    assert steps["check"]["attempts"] == 2
    assert [a["outcome"] for a in steps["check"]["history"]] == ["TimedOut", "Succeeded"]
    assert steps["strict_review"]["phase"] == "Failed"
    assert steps["strict_review"]["error"]["type"] == "FatalError"
    assert steps["strict_review"]["recoveredBy"] == "lenient_review"
    assert out["review"] == "ok for platform engineers"
    assert out["skipped"] == ["Skipped", "Skipped", "Succeeded"]
    approval = steps["publish"]["approval"]
    assert approval["decision"] == "approved"
    assert approval["by"] == "ada"
    assert approval["at"] >= doc["startedAt"]
    assert out["approvedBy"] == "ada"
    assert out["release"] == {"version": "1.2"}
    assert out["summary"] == "3 topics archived"
    assert steps["summary"]["childRun"]
    assert out["bulkBytes"] == 600 * 1024
    assert steps["notify"]["phase"] == "Succeeded"
    for name in ("plan", "check"):
        timing = steps[name]
        assert timing["queuedAt"] <= timing["startedAt"] <= timing["finishedAt"]


def test_feature_tour_without_signal_or_input_still_succeeds() -> None:
    result = cadenza("run", TOUR, "--approve", "publish", "--output", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["outputs"]["release"] is None
    assert doc["steps"]["go_live"]["phase"] == "Failed"
    assert doc["steps"]["go_live"]["error"]["type"] == "Timeout"


def test_feature_tour_rejected_approval_fails_and_on_exit_still_runs() -> None:
    result = cadenza("run", TOUR, "--reject", "publish", "--by", "bob", "--output", "json")
    assert result.returncode == 1
    doc = json.loads(result.stdout)
    assert doc["phase"] == "Failed"
    assert doc["steps"]["publish"]["approval"]["decision"] == "rejected"
    assert doc["steps"]["publish"]["approval"]["by"] == "bob"
    assert doc["steps"]["notify"]["phase"] == "Succeeded"


def test_feature_tour_cancelled_by_timeout() -> None:
    # The approval is never given, so the run is still going when --timeout cancels it.
    result = cadenza("run", TOUR, "--timeout", "3", "--output", "json")
    assert result.returncode == 1
    doc = json.loads(result.stdout)
    assert doc["phase"] == "Cancelled"
    assert "--timeout 3s exceeded" in doc["message"]
    phases = {name: step["phase"] for name, step in doc["steps"].items()}
    assert "Cancelled" in phases.values()
    assert not {"Running", "WaitingApproval", "Pending"} & set(phases.values()), phases
    assert phases["notify"] == "Succeeded"


def test_feature_tour_bad_input_rejected_before_start() -> None:
    result = cadenza("run", TOUR, "--input", '{"topics": 3}', "--approve", "publish")
    assert result.returncode == 2
    assert "Workflow/tour: input.topics: 3 is not of type 'array'" in result.stderr
