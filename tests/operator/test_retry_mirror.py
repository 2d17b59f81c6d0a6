"""A retry asked of the operator's engine (`cadenza retry`, the console's Retry button: both
go through the control responder) appears as a WorkflowRun, as a triggered run does, and
that WorkflowRun follows the new run to its end. The real operator, the Kubernetes API
emulator and a real nats-server (see test_operator.py)."""

from __future__ import annotations

from typing import Any

import pytest
from cadenza.wire import dumps, loads
from cadenza_operator.engine.control import control_subject
from cadenza_operator.kube.runs import mirrored_run_name

from ..kube.emulator import KubeEmulator
from ..kube.fixtures import wait_for
from .harness import (
    NAMESPACE,
    WORKFLOWRUNS,
    WORKFLOWS,
    RunningOperator,
    get,
    manifest,
    reasons_for,
    status_of,
)

pytestmark = pytest.mark.timeout(120)

GATE = {"steps": [{"name": "gate", "approval": {}}]}


def _valid(emulator: KubeEmulator, workflow: str) -> bool:
    conditions = status_of(emulator, WORKFLOWS, workflow).get("conditions") or []
    return any(c["type"] == "Valid" and c["status"] == "True" for c in conditions)


def _step_phase(emulator: KubeEmulator, name: str, step: str) -> str:
    return str(((status_of(emulator, WORKFLOWRUNS, name).get("steps") or {}).get(step) or {}).get("phase"))


async def _ask(operator: RunningOperator, request: dict[str, Any]) -> dict[str, Any]:
    """A control request on the subject `cadenza retry` uses, answered by the operator's engine."""

    async def send(ctx: Any) -> dict[str, Any]:
        msg = await ctx.nc.request(control_subject(NAMESPACE), dumps(request), timeout=10)
        reply: dict[str, Any] = loads(msg.data)
        return reply

    return await operator.call(send)


async def test_a_retry_of_a_failed_workflowrun_appears_as_a_workflowrun_that_follows_it(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    kube_emulator.create_object(WORKFLOWS, manifest("Workflow", "gated-retry", GATE))
    await wait_for(lambda: _valid(kube_emulator, "gated-retry"), timeout=20)
    kube_emulator.create_object(
        WORKFLOWRUNS, manifest("WorkflowRun", "first", {"workflowRef": "gated-retry"})
    )
    await wait_for(lambda: _step_phase(kube_emulator, "first", "gate") == "WaitingApproval", timeout=30)
    kube_emulator.patch_object(
        WORKFLOWRUNS, NAMESPACE, "first", {"metadata": {"annotations": {"cadenza.dev/reject": "gate"}}}
    )
    await wait_for(
        lambda: status_of(kube_emulator, WORKFLOWRUNS, "first").get("phase") == "Failed", timeout=30
    )
    first_run = status_of(kube_emulator, WORKFLOWRUNS, "first")["runId"]

    # Asked twice (a client asking again after a lost reply): one new run, one WorkflowRun.
    request = {"op": "retry", "run": first_run, "from": "gate", "by": "ada", "key": "retry-1"}
    replies = [await _ask(operator, dict(request)) for _ in range(2)]
    assert all(r["ok"] for r in replies), replies
    (new_run,) = {r["newRun"] for r in replies}

    def retries() -> list[dict[str, Any]]:
        return [
            r
            for r in kube_emulator.list_objects(WORKFLOWRUNS, NAMESPACE)
            if (r["metadata"].get("labels") or {}).get("cadenza.dev/retry-of") == "first"
        ]

    # The hook runs before the engine replies: the WorkflowRun is there once it has.
    (mirror,) = retries()
    name = mirror["metadata"]["name"]
    assert name == mirrored_run_name(new_run)
    assert mirror["metadata"]["labels"]["cadenza.dev/workflow"] == "gated-retry"
    assert mirror["metadata"]["annotations"]["cadenza.dev/retry-of-run"] == first_run
    assert mirror["metadata"]["annotations"]["cadenza.dev/retry-from"] == "gate"
    assert mirror["spec"] == {"workflowRef": "gated-retry"}

    # It follows the retry (not a run of its own): the step waits, is approved through it, succeeds.
    await wait_for(lambda: _step_phase(kube_emulator, name, "gate") == "WaitingApproval", timeout=30)
    assert status_of(kube_emulator, WORKFLOWRUNS, name)["runId"] == new_run
    kube_emulator.patch_object(
        WORKFLOWRUNS, NAMESPACE, name, {"metadata": {"annotations": {"cadenza.dev/approve": "gate"}}}
    )
    await wait_for(
        lambda: status_of(kube_emulator, WORKFLOWRUNS, name).get("phase") == "Succeeded", timeout=30
    )
    status = status_of(kube_emulator, WORKFLOWRUNS, name)
    assert status["runId"] == new_run
    assert "RunIdIgnored" not in reasons_for(kube_emulator, name)
    assert len(retries()) == 1
    assert (
        status_of(kube_emulator, WORKFLOWRUNS, "first")["phase"] == "Failed"
    )  # the retried run stays as it was
    assert get(kube_emulator, WORKFLOWRUNS, "first") is not None

    # Exactly the two runs in the engine: the first and its retry (the mirror started none).
    async def runs(ctx: Any) -> list[str]:
        return sorted(s.run for s in await ctx.client.list(NAMESPACE))

    assert await operator.call(runs) == sorted([first_run, new_run])
