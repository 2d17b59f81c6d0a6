"""A tenant's WorkflowRun cannot reach another namespace's run (issue 13): an annotation
naming that run is ignored, so it neither mirrors, approves nor cancels it, and the run
goes on untouched. Real operator against the emulator and a real nats-server."""

from __future__ import annotations

from typing import Any

import pytest
from cadenza_operator.engine.audit import read_audit
from cadenza_operator.kube.runs import mirrored_run_name

from ..kube.emulator import KubeEmulator
from ..kube.fixtures import wait_for
from .harness import EVENTS, NAMESPACE, WORKFLOWRUNS, WORKFLOWS, RunningOperator, get, manifest, status_of

pytestmark = pytest.mark.timeout(120)

TENANT = "tenant-b"
GATED = {"steps": [{"name": "gate", "approval": {"approvers": ["bob"]}}]}


def _reasons(emulator: KubeEmulator, namespace: str, name: str) -> list[str]:
    return [
        str(e.get("reason"))
        for e in emulator.list_objects(EVENTS, namespace)
        if e.get("involvedObject", {}).get("name") == name
    ]


async def waiting_at_gate(emulator: KubeEmulator, name: str) -> str:
    """The run id of WorkflowRun `name`, once its step `gate` waits for an approval."""
    status = await wait_for(
        lambda: (
            (s := status_of(emulator, WORKFLOWRUNS, name)).get("steps", {}).get("gate", {}).get("phase")
            == "WaitingApproval"
            and s
        ),
        timeout=30,
    )
    return str(status["runId"])


async def test_a_run_id_annotation_from_another_namespace_neither_mirrors_approves_nor_cancels(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    kube_emulator.create_object(WORKFLOWS, manifest("Workflow", "gated", GATED))
    kube_emulator.create_object(WORKFLOWRUNS, manifest("WorkflowRun", "victim", {"workflowRef": "gated"}))
    victim = await waiting_at_gate(kube_emulator, "victim")

    attack = {
        "cadenza.dev/run-id": victim,
        "cadenza.dev/approve": "gate",
        "cadenza.dev/approved-by": "bob",
        "cadenza.dev/comment": "stolen",
    }
    # A plain WorkflowRun, and one shaped like the mirror of a triggered run.
    plain = manifest("WorkflowRun", "thief", {"workflowRef": "gated"}, namespace=TENANT, annotations=attack)
    mirror_labels = {"cadenza.dev/workflow": "gated", "cadenza.dev/trigger": "nats"}
    shaped = manifest(
        "WorkflowRun",
        mirrored_run_name(victim),
        {"workflowRef": "gated"},
        namespace=TENANT,
        annotations=attack,
        labels=mirror_labels,
    )
    for obj in (plain, shaped):
        kube_emulator.create_object(WORKFLOWRUNS, obj)
    for obj in (plain, shaped):
        name = obj["metadata"]["name"]
        await wait_for(lambda name=name: "RunIdIgnored" in _reasons(kube_emulator, TENANT, name), timeout=30)

        def own_run(name: str = name) -> dict[str, Any] | None:
            live = kube_emulator.get_object(WORKFLOWRUNS, TENANT, name) or {}
            annotations = live.get("metadata", {}).get("annotations") or {}
            return live if annotations.get("cadenza.dev/run-id") not in (None, victim) else None

        live = await wait_for(own_run, timeout=30)  # the operator overwrote it with its own run's id
        # No Workflow "gated" in tenant-b: its own run waits, it shows nothing of the victim's.
        assert (live.get("status") or {}).get("runId") != victim
        assert "steps" not in (live.get("status") or {})
        kube_emulator.delete_object(WORKFLOWRUNS, TENANT, name)
        await wait_for(
            lambda name=name: kube_emulator.get_object(WORKFLOWRUNS, TENANT, name) is None, timeout=30
        )

    state = await operator.call(lambda ctx: ctx.engine.client.get(victim))
    assert state is not None and state.steps["gate"].phase == "WaitingApproval"
    assert state.cancelledBy is None

    # The victim's own approval comes after the attack on the run's ordered events: had the
    # attack cancelled or approved it, the run would not end approved by this one.
    kube_emulator.patch_object(
        WORKFLOWRUNS,
        NAMESPACE,
        "victim",
        {
            "metadata": {
                "annotations": {
                    "cadenza.dev/approve": "gate",
                    "cadenza.dev/approved-by": "bob",
                    "cadenza.dev/comment": "mine",
                }
            }
        },
    )
    await wait_for(
        lambda: status_of(kube_emulator, WORKFLOWRUNS, "victim").get("phase") == "Succeeded", timeout=30
    )
    state = await operator.call(lambda ctx: ctx.engine.client.get(victim))
    assert state is not None and state.cancelledBy is None
    assert state.steps["gate"].approval is not None and state.steps["gate"].approval["comment"] == "mine"
    assert (
        get(kube_emulator, WORKFLOWRUNS, "victim")["metadata"]["annotations"]["cadenza.dev/run-id"] == victim
    )


async def test_approvers_are_checked_against_the_admitted_identity_users_and_groups(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    """approved-by(-group) are what admission bound to the requesting user (the emulator has
    no admission: tests/chart/test_admission_policy.py tests that part); `group:NAME`
    approvers match the group, anyone else is refused, and the audit says who."""
    spec = {"steps": [{"name": "gate", "approval": {"approvers": ["group:finance"]}}]}
    kube_emulator.create_object(WORKFLOWS, manifest("Workflow", "payout", spec))
    kube_emulator.create_object(WORKFLOWRUNS, manifest("WorkflowRun", "payout-1", {"workflowRef": "payout"}))
    run = await waiting_at_gate(kube_emulator, "payout-1")

    def decide(**annotations: str) -> None:
        kube_emulator.patch_object(
            WORKFLOWRUNS, NAMESPACE, "payout-1", {"metadata": {"annotations": annotations}}
        )

    decide(**{"cadenza.dev/approve": "gate", "cadenza.dev/approved-by": "eve"})
    await wait_for(lambda: "NotAnApprover" in _reasons(kube_emulator, NAMESPACE, "payout-1"), timeout=30)
    decide(
        **{
            "cadenza.dev/approved-by": "bob",
            "cadenza.dev/approved-by-group": "finance",
            "cadenza.dev/approve": "gate,",  # a new value: the approve handler fires again
        }
    )
    status = await wait_for(
        lambda: (s := status_of(kube_emulator, WORKFLOWRUNS, "payout-1")).get("phase") == "Succeeded" and s,
        timeout=30,
    )
    assert status["steps"]["gate"]["approval"]["by"] == "bob [group:finance]"
    audit = await operator.call(lambda ctx: read_audit(ctx.engine.client.js, NAMESPACE, run))
    decisions = [(r["actor"], r["reason"]) for r in audit if r["step"] == "gate" and r["event"] == "approval"]
    assert decisions == [
        ("eve", "decision by 'eve' ignored: not an approver"),
        ("bob [group:finance]", "approved by bob [group:finance]"),
    ]
