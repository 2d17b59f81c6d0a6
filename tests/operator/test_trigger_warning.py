"""In a cluster, a trigger event dead-lettered because its dedupKey fails gives the Workflow a
Warning Event naming the trigger, the expression and the error (the real operator against
the Kubernetes API emulator, a real nats-server)."""

from __future__ import annotations

import pytest
from cadenza._protocol import dumps

from ..kube.emulator import KubeEmulator
from ..kube.fixtures import wait_for
from .harness import NAMESPACE, WORKFLOWS, RunningOperator, events_for, manifest, status_of

pytestmark = pytest.mark.timeout(120)


async def test_a_trigger_event_whose_dedup_key_fails_gives_the_workflow_a_warning_event(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    spec = {
        "steps": [{"name": "gate", "approval": {"message": "go?"}}],
        "triggers": [{"nats": {"subject": "test.operator.paged", "dedupKey": "event.ticket.id"}}],
    }
    kube_emulator.create_object(WORKFLOWS, manifest("Workflow", "paged", spec))

    def valid() -> bool:
        conditions = status_of(kube_emulator, WORKFLOWS, "paged").get("conditions") or []
        return any(c["type"] == "Valid" and c["status"] == "True" for c in conditions)

    await wait_for(valid, timeout=60)
    await operator.call(lambda ctx: ctx.nc.publish("test.operator.paged", dumps({"other": 1})))
    warnings = await wait_for(
        lambda: [e for e in events_for(kube_emulator, "paged") if e["reason"] == "TriggerEventFailed"],
        timeout=60,
    )
    (event,) = warnings
    assert event["type"] == "Warning"
    assert event["involvedObject"]["kind"] == "Workflow"
    assert (
        event["involvedObject"]["uid"]
        == kube_emulator.get_object(WORKFLOWS, NAMESPACE, "paged")["metadata"]["uid"]
    )
    message = event["message"]
    assert "workflow paged" in message
    assert "spec.triggers[0].nats.dedupKey 'event.ticket.id'" in message
    assert "no such key" in message
