"""examples/incident-remediation: approval with who/when, audit, onExit, timeouts, the NATS trigger."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import nats
import pytest
from cadenza import FatalError
from cadenza.testing import MemoryContext, call_handler, run_handler
from cadenza_operator.engine.client import RunClient
from cadenza_operator.engine.state import TERMINAL_RUN
from cadenza_operator.local.dev import DevServer
from cadenza_operator.manifests import load

from ..conftest import EXAMPLES, cadenza
from .helpers import assert_succeeded, load_agents, phases, run_example

EXAMPLE = "incident-remediation"
agents = load_agents(EXAMPLE)
ALERT = json.loads((EXAMPLES / EXAMPLE / "input.json").read_text())
T = TypeVar("T")


def alert(**changes: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(ALERT))
    for key, value in changes.items():
        if key in ("service", "alertname"):
            doc["labels"][key] = value
        else:
            doc[key] = value
    return doc


# --------------------------------------------------------------------------- end to end


def test_validate() -> None:
    result = cadenza("validate", f"examples/{EXAMPLE}")
    assert result.returncode == 0, result.stderr


def test_readme_command_remediates_after_approval() -> None:
    doc = run_example(EXAMPLE, "--approve", "approve_fix")
    assert_succeeded(doc)
    assert phases(doc) == {
        "diagnose": "Succeeded",
        "propose_fix": "Succeeded",
        "approve_fix": "Succeeded",
        "apply_fix": "Succeeded",
        "audit": "Succeeded",
        "notify": "Succeeded",  # the onExit step
    }
    out = doc["outputs"]
    assert out["incident"] == "HighErrorRate/c4f1e2a9d07b3e58"
    assert out["rootCause"].startswith("deploy v2.14.0 of checkout introduced errors: NullPointerException")
    assert out["fix"] == "Roll back deployment/checkout from v2.14.0 to v2.13.2"
    assert out["verified"] is True and out["outcome"] == "remediated"

    # Who approved and when: recorded by the engine, carried into the audit record.
    steps = doc["steps"]
    approval = steps["approve_fix"]["approval"]
    assert approval["decision"] == "approved" and approval["by"] == "cli"
    assert steps["approve_fix"]["startedAt"] <= approval["at"] <= steps["apply_fix"]["queuedAt"]
    assert out["approval"] == approval
    audit = out["audit"]
    assert audit["approval"]["by"] == "cli"
    assert audit["approval"]["at"] == dt.datetime.fromtimestamp(approval["at"], dt.UTC).isoformat(
        timespec="seconds"
    ).replace("+00:00", "Z")
    assert [c["command"] for c in audit["executed"]] == [
        "kubectl -n shop rollout undo deployment/checkout",
        "kubectl -n shop rollout status deployment/checkout --timeout=5m",
    ]
    assert audit["plan"]["action"] == "rollback" and audit["diagnosis"]["category"] == "bad_deploy"

    # onExit ran last and reported the outcome.
    notify = steps["notify"]
    assert notify["queuedAt"] >= steps["audit"]["finishedAt"]
    assert notify["output"]["text"].startswith("[resolved] HighErrorRate on checkout: remediation run ")
    assert (
        "remediated (Roll back deployment/checkout from v2.14.0 to v2.13.2, approved by cli)"
        in notify["output"]["text"]
    )


def test_rejected_fix_is_audited_and_not_applied() -> None:
    doc = run_example(EXAMPLE, "--reject", "approve_fix", "--by", "sre-lead")
    assert_succeeded(doc)
    assert phases(doc)["approve_fix"] == "Failed" and phases(doc)["apply_fix"] == "Skipped"
    assert doc["steps"]["approve_fix"]["approval"]["by"] == "sre-lead"
    audit = doc["outputs"]["audit"]
    assert audit["outcome"] == "rejected" and audit["executed"] == []
    assert audit["approval"] == {"decision": "rejected", "detail": "rejected by sre-lead"}
    assert "rejected" in doc["steps"]["notify"]["output"]["text"]


def test_unknown_service_is_escalated_without_approval() -> None:
    doc = run_example(
        EXAMPLE, "--input", json.dumps(alert(service="inventory", fingerprint="0001")), input_file=False
    )
    assert_succeeded(doc)
    assert phases(doc)["approve_fix"] == "Skipped" and phases(doc)["apply_fix"] == "Skipped"
    assert phases(doc)["audit"] == "Succeeded"  # ifDependenciesSkipped: run
    assert doc["outputs"]["outcome"] == "escalated"
    assert doc["outputs"]["fix"] == "Page the owning team (the service owner) - no automatic remediation"


def test_no_decision_in_time_cancels_and_on_exit_still_notifies() -> None:
    doc = run_example(EXAMPLE, "--timeout", "4")  # nobody approves; the CLI cancels the run
    assert doc["_exit"] == 1 and doc["phase"] == "Cancelled"
    # Normally the run waits at approve_fix by then; on a very slow machine it may still be
    # diagnosing. Either way nothing was applied and onExit ran.
    assert phases(doc)["approve_fix"] in ("Cancelled", "Skipped")
    assert phases(doc)["apply_fix"] == "Skipped" and phases(doc)["audit"] == "Skipped"
    assert phases(doc)["notify"] == "Succeeded"
    assert doc["steps"]["notify"]["output"]["text"].startswith("[cancelled] HighErrorRate on checkout")


def test_a_hanging_executor_hits_the_step_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example with apply_fix's timeout cut to 1s and commands that take 3s each."""
    project = tmp_path / EXAMPLE
    shutil.copytree(EXAMPLES / EXAMPLE, project, ignore=shutil.ignore_patterns("__pycache__"))
    workflow = (project / "workflow.yaml").read_text()
    assert "timeout: 2m" in workflow
    (project / "workflow.yaml").write_text(
        workflow.replace("timeout: 2m", "timeout: 1s").replace("initial: 1s}", "initial: 100ms}")
    )
    monkeypatch.setenv("EXECUTOR_COMMAND_SECONDS", "3")  # the agents inherit the CLI's environment
    result = cadenza(
        "run",
        str(project),
        "--input",
        f"@{project / 'input.json'}",
        "--approve",
        "approve_fix",
        "--output",
        "json",
    )
    doc = json.loads(result.stdout)
    assert result.returncode == 1 and doc["phase"] == "Failed"
    apply = doc["steps"]["apply_fix"]
    assert apply["phase"] == "Failed" and apply["attempts"] == 2  # retry.limit 1
    assert [a["outcome"] for a in apply["history"]] == ["TimedOut", "TimedOut"]
    assert apply["error"]["type"] == "Timeout"
    assert phases(doc)["audit"] == "Skipped" and phases(doc)["notify"] == "Succeeded"
    assert doc["steps"]["notify"]["output"]["text"].startswith("[FAILED] HighErrorRate on checkout")


# ------------------------------------------------------------------ the NATS trigger


async def eventually(probe: Callable[[], T | None], timeout: float = 30.0) -> T:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_same_alert_twice_on_nats_starts_one_run_that_oncall_approves() -> None:
    bundle = load([EXAMPLES / EXAMPLE])
    states: dict[str, Any] = {}
    dev = await DevServer(bundle).start()
    nc = None
    try:
        dev.engine.on_state(lambda state: states.__setitem__(state.run, state))
        nc = await nats.connect(dev.url)
        js = nc.jetstream()
        body = json.dumps(ALERT).encode()
        # Alertmanager re-sends a firing alert (repeat_interval), and a bridge may deliver twice.
        await js.publish("alerts.prod.checkout", body)
        await js.publish("alerts.prod.checkout", body)

        def waiting() -> Any:
            return next(
                (
                    s
                    for s in states.values()
                    if s.steps.get("approve_fix") and s.steps["approve_fix"].phase == "WaitingApproval"
                ),
                None,
            )

        run = (await eventually(waiting)).run
        await RunClient(nc).approve("default", run, "approve_fix", True, by="oncall")
        final = await eventually(lambda: states[run] if states[run].phase in TERMINAL_RUN else None)
        assert final.phase == "Succeeded", final.message
        approval = final.steps["approve_fix"].approval
        assert approval["by"] == "oncall" and approval["decision"] == "approved"
        assert final.steps["approve_fix"].startedAt <= approval["at"] <= final.finishedAt
        assert final.outputs["audit"]["approval"]["by"] == "oncall"
        assert final.outputs["outcome"] == "remediated"
        assert final.steps["notify"].phase == "Succeeded"

        # The resolved notification of the same alert (same fingerprint and start): no new run.
        # Another alert (a new fingerprint, for a service with no runbook): a run of its own,
        # escalated without waiting for anyone.
        await js.publish("alerts.prod.checkout", json.dumps(alert(status="resolved")).encode())
        other = alert(service="inventory", fingerprint="77aa01b2c3d4e5f6")
        await js.publish("alerts.prod.inventory", json.dumps(other).encode())

        async def consumed() -> bool:
            info = await js.consumer_info("CADENZA_TRIGGERS", "trigger_default_incident-remediation")
            return info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.stream_seq >= 4

        for _ in range(400):
            if await consumed():
                break
            await asyncio.sleep(0.05)
        assert await consumed(), "the trigger consumer did not take all four alerts"
        second = await eventually(
            lambda: next((s for s in states.values() if s.run != run and s.phase in TERMINAL_RUN), None)
        )
        assert second.phase == "Succeeded" and second.outputs["outcome"] == "escalated"
        runs = sorted(key for key in await dev.engine.kv.keys() if key.startswith("incident-remediation"))
        assert runs == sorted([run, second.run])  # four alerts, two distinct: two runs
    finally:
        if nc is not None:
            await nc.close()
        await dev.stop()


# ---------------------------------------------------------------------------- the agents


def test_diagnosis_of_a_bad_deploy() -> None:
    out = run_handler(agents.diagnostician, {"alert": ALERT})
    assert out["category"] == "bad_deploy" and out["confidence"] == 0.9
    assert out["suspect_deploy"]["version"] == "v2.14.0" and out["previous_version"] == "v2.13.2"
    assert out["onset"] == "2025-11-04T14:00:00Z"
    assert any("1 min before the onset" in e for e in out["evidence"])
    with pytest.raises(FatalError):
        run_handler(agents.diagnostician, {"alert": {"labels": {}}})


def test_diagnosis_of_saturation_plans_a_scale_out() -> None:
    diagnosis = agents.diagnose(alert(service="search"), agents.load_json("telemetry.json"))
    assert diagnosis["category"] == "saturation" and diagnosis["suspect_deploy"] is None
    plan = agents.plan_fix(diagnosis, agents.load_json("telemetry.json"))
    assert plan["action"] == "scale_out"
    assert plan["commands"][0] == "kubectl -n shop scale deployment/search --replicas=7"  # ceil(4 * .94 / .6)


async def test_plan_goes_through_the_context_to_the_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agents, "COMMAND_SECONDS", 0.0)
    ctx = MemoryContext()
    diagnosis = await call_handler(agents.diagnostician, {"alert": ALERT})
    plan = await call_handler(agents.remediator, {"diagnosis": diagnosis}, context=ctx)
    assert ctx.data["plan"] == plan
    applied = await call_handler(agents.executor, {"approved_by": "oncall"}, context=ctx)
    assert applied["verified"] is True and applied["mode"] == "simulated" and len(applied["executed"]) == 2
    with pytest.raises(FatalError, match="no plan"):
        await call_handler(agents.executor, {}, context=MemoryContext())


def test_audit_record_and_audit_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv("AUDIT_LOG", str(log))
    ctx = MemoryContext({"plan": {"service": "checkout", "action": "rollback", "title": "Roll back"}})
    approval = {"decision": "approved", "by": "oncall", "at": 1762265400.0, "comment": "go"}
    record = run_handler(
        agents.auditor,
        {
            "alert": ALERT,
            "approval": approval,
            "approval_phase": "Succeeded",
            "applied": {"verified": True, "executed": [{"command": "x", "status": "ok"}]},
        },
        context=ctx,
    )
    assert record["outcome"] == "remediated"
    assert record["approval"] == {
        "decision": "approved",
        "by": "oncall",
        "at": "2025-11-04T14:10:00Z",
        "comment": "go",
    }
    assert json.loads(log.read_text().splitlines()[0]) == record


def test_notifier_text() -> None:
    out = run_handler(
        agents.notifier,
        {"run": "r1", "phase": "Failed", "alert": "HighErrorRate", "service": "checkout", "message": "boom"},
    )
    assert out == {
        "channel": "#incidents",
        "text": "[FAILED] HighErrorRate on checkout: remediation run r1 Failed. boom",
        "posted": False,
    }
