"""An Agent's Deployment follows the Models it names: a Model created after its Agent, a
changed Model and a deleted one re-reconcile the Agents naming it; the Model's status
says which Agents use it. A podTemplate the Kubernetes schema rejects is an InvalidSpec
condition naming the field, with no Deployment applied. (Kubernetes API emulator, real
nats-server, the real operator in-process.)"""

from __future__ import annotations

import json
from typing import Any

import pytest

from ..kube.emulator import KubeEmulator
from ..kube.fixtures import wait_for
from .harness import AGENTS, DEPLOYMENTS, NAMESPACE, RunningOperator, get, manifest, reasons_for, status_of

pytestmark = pytest.mark.timeout(120)

MODELS = "cadenza.dev/v1alpha1/models"
MODEL = {"provider": "openai", "baseURL": "http://llm-a.example/v1", "model": "tiny"}
AGENT = {"image": "registry.example/agents:1", "models": ["fast"]}


def _ready(emulator: KubeEmulator, agent: str) -> dict[str, Any] | None:
    for c in status_of(emulator, AGENTS, agent).get("conditions", []):
        if c.get("type") == "Ready":
            return dict(c)
    return None


def _models_env(emulator: KubeEmulator, deployment: str) -> dict[str, Any] | None:
    found = get(emulator, DEPLOYMENTS, deployment)
    if found is None:
        return None
    (container,) = found["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    return dict(json.loads(env["CADENZA_MODELS"]["value"]))


async def test_an_agent_created_before_its_model_becomes_ready_when_the_model_appears(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    kube_emulator.create_object(AGENTS, manifest("Agent", "early", AGENT))
    await wait_for(lambda: (_ready(kube_emulator, "early") or {}).get("reason") == "InvalidSpec", timeout=60)
    assert get(kube_emulator, DEPLOYMENTS, "early-agent") is None

    kube_emulator.create_object(MODELS, manifest("Model", "fast", MODEL))
    assert await wait_for(lambda: _models_env(kube_emulator, "early-agent"), timeout=60) == {"fast": MODEL}
    kube_emulator.patch_object(
        DEPLOYMENTS, NAMESPACE, "early-agent", {"status": {"readyReplicas": 1}}, subresource="status"
    )
    ready = await wait_for(
        lambda: (c := _ready(kube_emulator, "early")) and c["status"] == "True" and c, timeout=20
    )
    assert ready["reason"] == "ReplicasReady"
    model = await wait_for(lambda: status_of(kube_emulator, MODELS, "fast").get("agents"), timeout=60)
    assert model == ["early"]


async def test_a_changed_model_reaches_the_deployment_and_a_deleted_one_is_named(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    kube_emulator.create_object(MODELS, manifest("Model", "fast", MODEL))
    kube_emulator.create_object(AGENTS, manifest("Agent", "writer", AGENT))
    assert await wait_for(lambda: _models_env(kube_emulator, "writer-agent"), timeout=60) == {"fast": MODEL}

    moved = {**MODEL, "baseURL": "http://llm-b.example/v1"}
    kube_emulator.patch_object(MODELS, NAMESPACE, "fast", {"spec": {"baseURL": moved["baseURL"]}})
    await wait_for(lambda: _models_env(kube_emulator, "writer-agent") == {"fast": moved}, timeout=60)

    kube_emulator.delete_object(MODELS, NAMESPACE, "fast")
    # A bound, not a speed: kopf handles the Model's events one at a time and may wait up
    # to its consistency timeout (5 s) after each of its own patches; on a machine running
    # two test workers that backlog once took longer than 20 s.
    missing = await wait_for(
        lambda: (c := _ready(kube_emulator, "writer")) and c["reason"] == "InvalidSpec" and c, timeout=60
    )
    assert missing["status"] == "False"
    assert "spec.models[0]" in missing["message"] and "'fast'" in missing["message"]
    await wait_for(lambda: "InvalidSpec" in reasons_for(kube_emulator, "writer"), timeout=60)  # posted async
    # The Deployment stays as it was: its agents keep the Model's last spec.
    assert _models_env(kube_emulator, "writer-agent") == {"fast": moved}


async def test_a_pod_template_the_kubernetes_schema_rejects_is_an_invalid_spec(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    template = {"spec": {"containers": [{"name": "agent", "readinessProbe": {"periodSeconds": "ten"}}]}}
    spec = {"image": "registry.example/agents:1", "podTemplate": template}
    kube_emulator.create_object(AGENTS, manifest("Agent", "typo", spec))

    found = await wait_for(
        lambda: (c := _ready(kube_emulator, "typo")) and c["reason"] == "InvalidSpec" and c, timeout=20
    )
    assert found["status"] == "False"
    assert "spec.podTemplate.spec.containers[0].readinessProbe.periodSeconds" in found["message"]
    await wait_for(lambda: "InvalidSpec" in reasons_for(kube_emulator, "typo"), timeout=60)  # posted async
    assert get(kube_emulator, DEPLOYMENTS, "typo-agent") is None
