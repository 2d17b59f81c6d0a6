"""In a cluster: a WorkflowRun over its budget shows Paused with its usage, and
`kubectl annotate wfr NAME cadenza.dev/resume=tokens=N` resumes it with that budget.
(Kubernetes API emulator, real nats-server, the real operator in-process; the usage is
published as an agent's `task.record_usage` publishes it.)"""

from __future__ import annotations

from typing import Any

import nats
import pytest
from cadenza.wire import dumps, event_subject
from cadenza_operator.kube.runs import resume_from_annotation
from cadenza_operator.local.nats_server import NatsServer

from ..kube.emulator import KubeEmulator
from ..kube.fixtures import wait_for
from .harness import (
    AGENTS,
    NAMESPACE,
    WORKFLOWRUNS,
    WORKFLOWS,
    RunningOperator,
    events_for,
    manifest,
    reasons_for,
    status_of,
)

pytestmark = pytest.mark.timeout(120)

CAPPED = {
    "budget": {"tokens": 10},
    "steps": [
        {"name": "gate", "approval": {}},
        {"name": "greet", "agent": "greeter", "dependsOn": ["gate"], "input": {"name": "x"}},
    ],
}


def _status(emulator: KubeEmulator, name: str, **wanted: Any) -> Any:
    def probe() -> dict[str, Any] | None:
        status = status_of(emulator, WORKFLOWRUNS, name)
        steps = status.get("steps") or {}
        ok = all(
            (steps.get(k[5:], {}).get("phase") if k.startswith("step_") else status.get(k)) == v
            for k, v in wanted.items()
        )
        return status if ok else None

    return probe


async def test_a_paused_run_is_resumed_by_annotation(
    kube_emulator: KubeEmulator, operator: RunningOperator, fresh_nats: NatsServer
) -> None:
    kube_emulator.create_object(AGENTS, manifest("Agent", "greeter", {"command": ["python", "agents.py"]}))
    kube_emulator.create_object(WORKFLOWS, manifest("Workflow", "capped", CAPPED))
    kube_emulator.create_object(
        WORKFLOWRUNS, manifest("WorkflowRun", "capped-run", {"workflowRef": "capped"})
    )
    status = await wait_for(_status(kube_emulator, "capped-run", step_gate="WaitingApproval"), timeout=30)
    run = status["runId"]

    nc = await nats.connect(fresh_nats.url)
    try:
        usage = {"type": "usage", "run": run, "step": "gate", "attempt": 1, "id": "call-1"}
        usage |= {"model": "fast", "inputTokens": 15, "outputTokens": 5, "cost": 0.25}
        await nc.jetstream().publish(
            event_subject(NAMESPACE, run), dumps(usage), headers={"Nats-Msg-Id": "usage:call-1"}
        )
    finally:
        await nc.close()

    kube_emulator.patch_object(
        WORKFLOWRUNS, NAMESPACE, "capped-run", {"metadata": {"annotations": {"cadenza.dev/approve": "gate"}}}
    )
    status = await wait_for(_status(kube_emulator, "capped-run", phase="Paused"), timeout=30)
    assert "BudgetExceeded" in status["message"]
    assert status["usage"] == {"inputTokens": 15, "outputTokens": 5, "cost": 0.25, "calls": 1, "tokens": 20}
    assert status["steps"]["greet"]["attempts"] == 0  # held: nothing was sent
    paused = await wait_for(
        lambda: [e for e in events_for(kube_emulator, "capped-run") if e["reason"] == "BudgetExceeded"],
        timeout=60,
    )
    assert paused[0]["type"] == "Warning" and "20 tokens used of a budget of 10" in paused[0]["message"]

    kube_emulator.patch_object(
        WORKFLOWRUNS,
        NAMESPACE,
        "capped-run",
        {"metadata": {"annotations": {"cadenza.dev/resume": "tokens=x"}}},
    )
    await wait_for(lambda: "InvalidResume" in reasons_for(kube_emulator, "capped-run"), timeout=60)
    kube_emulator.patch_object(
        WORKFLOWRUNS,
        NAMESPACE,
        "capped-run",
        {"metadata": {"annotations": {"cadenza.dev/resume": "tokens=1000"}}},
    )
    await wait_for(_status(kube_emulator, "capped-run", phase="Running"), timeout=30)
    await wait_for(
        lambda: status_of(kube_emulator, WORKFLOWRUNS, "capped-run")["steps"]["greet"]["attempts"] == 1
    )
    await wait_for(lambda: "ResumeSent" in reasons_for(kube_emulator, "capped-run"), timeout=60)
    resumed = await wait_for(
        lambda: [e for e in events_for(kube_emulator, "capped-run") if e["reason"] == "Resumed"], timeout=20
    )
    assert resumed[0]["type"] == "Normal"
    assert reasons_for(kube_emulator, "capped-run").count("RunStarted") == 1


def test_the_resume_annotation_is_parsed_or_named_in_the_error() -> None:
    assert resume_from_annotation("tokens=500") == (500, None)
    assert resume_from_annotation("tokens=500, cost=2.5") == (500, 2.5)
    for bad in ("", "tokens=0", "cost=-1", "pounds=3"):
        with pytest.raises(ValueError, match=r"cadenza\.dev/resume"):
            resume_from_annotation(bad)
