"""The operator's engine answers `diagnose` (what `cadenza diagnose` asks under a client
credential in a cluster), over the namespace the request came on."""

from __future__ import annotations

import pytest
from cadenza_operator.observe.diagnose import report_from_answer

from ..kube.emulator import KubeEmulator
from .harness import NAMESPACE, RunningOperator, ask_control, gate_workflow, rejected_workflowrun

pytestmark = pytest.mark.timeout(120)


async def test_the_operators_engine_makes_the_report(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    await gate_workflow(kube_emulator, "gated-diagnosed")
    run = await rejected_workflowrun(kube_emulator, "gated-diagnosed", "diagnosed")
    reply = await ask_control(operator, {"op": "diagnose", "workflow": "gated-diagnosed", "since": 3600})
    assert reply["ok"], reply
    report = report_from_answer(reply["report"])
    assert (report.namespace, report.workflow, report.runs, report.phases) == (
        NAMESPACE,
        "gated-diagnosed",
        1,
        {"Failed": 1},
    )
    assert [r.run for r in report.topRuns] == [run]
    unknown = await ask_control(operator, {"op": "diagnose", "workflow": "nosuch", "since": 3600})
    assert unknown["ok"] is False and unknown["unknownWorkflow"] is True, unknown
