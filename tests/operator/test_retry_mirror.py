"""A retry asked of the operator's engine (`cadenza retry`, the console's Retry button: both
go through the control responder) appears as a WorkflowRun, as a triggered run does, and
that WorkflowRun follows the new run to its end. The real operator, the Kubernetes API
emulator and a real nats-server (see test_operator.py)."""

from __future__ import annotations

from typing import Any

import pytest
from cadenza_operator.kube.runs import mirrored_run_name

from ..kube.emulator import KubeEmulator
from ..kube.fixtures import wait_for
from .harness import (
    NAMESPACE,
    WORKFLOWRUNS,
    RunningOperator,
    ask_control,
    gate_workflow,
    get,
    reasons_for,
    rejected_workflowrun,
    status_of,
    step_phase,
)

pytestmark = pytest.mark.timeout(120)


async def test_a_retry_of_a_failed_workflowrun_appears_as_a_workflowrun_that_follows_it(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    await gate_workflow(kube_emulator, "gated-retry")
    first_run = await rejected_workflowrun(kube_emulator, "gated-retry", "first")

    # Asked twice (a client asking again after a lost reply): one new run, one WorkflowRun.
    request = {"op": "retry", "run": first_run, "from": "gate", "by": "ada", "key": "retry-1"}
    replies = [await ask_control(operator, dict(request)) for _ in range(2)]
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
    await wait_for(lambda: step_phase(kube_emulator, name, "gate") == "WaitingApproval", timeout=30)
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
