"""The operator renders an Agent's secret references into its Deployment as references:
the Deployment carries secretKeyRef/configMapKeyRef/envFrom and the podTemplate, never a
value, and the operator never reads a Secret. A podTemplate overriding what Cadenza owns
is an InvalidSpec condition naming the field, not a Deployment. (Kubernetes API emulator,
real nats-server, the real operator in-process.)"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from ..kube.emulator import KubeEmulator
from ..kube.fixtures import wait_for
from .harness import AGENTS, DEPLOYMENTS, RunningOperator, get, manifest, status_of

pytestmark = pytest.mark.timeout(120)

SECRETS = "v1/secrets"
VALUE = "sk-live-never-in-a-manifest"


async def test_the_deployment_references_secrets_and_never_holds_a_value(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "llm-keys", "namespace": "default"}}
    kube_emulator.create_object(
        SECRETS, {**secret, "data": {"openai": base64.b64encode(VALUE.encode()).decode()}}
    )
    spec = {
        "image": "registry.example/agents:1",
        "command": ["python", "agents.py"],
        "env": [
            {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "llm-keys", "key": "openai"}}}
        ],
        "envFrom": [{"configMapRef": {"name": "tuning"}}],
        "podTemplate": {
            "metadata": {"labels": {"team": "a"}},
            "spec": {"imagePullSecrets": [{"name": "registry"}], "nodeSelector": {"pool": "agents"}},
        },
    }
    kube_emulator.create_object(AGENTS, manifest("Agent", "keyed", spec))
    deployment = await wait_for(lambda: get(kube_emulator, DEPLOYMENTS, "keyed-agent"), timeout=60)

    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["OPENAI_API_KEY"] == {
        "name": "OPENAI_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "llm-keys", "key": "openai"}},
    }
    assert container["envFrom"] == [{"configMapRef": {"name": "tuning"}}]
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["nodeSelector"] == {"pool": "agents"}
    assert deployment["spec"]["template"]["metadata"]["labels"]["team"] == "a"
    assert VALUE not in json.dumps(deployment)
    assert VALUE not in json.dumps(status_of(kube_emulator, AGENTS, "keyed"))
    # The operator asked the API for no Secret at all (it holds no permission to).
    assert not [call for call in kube_emulator.request_log if call.resource == "secrets"]


async def test_a_pod_template_overriding_the_command_is_an_invalid_spec(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    spec = {
        "image": "registry.example/agents:1",
        "podTemplate": {"spec": {"containers": [{"command": ["sh"]}]}},
    }
    kube_emulator.create_object(AGENTS, manifest("Agent", "greedy", spec))

    def reported() -> dict[str, Any] | None:
        conditions = status_of(kube_emulator, AGENTS, "greedy").get("conditions") or []
        return next((c for c in conditions if c["reason"] == "InvalidSpec"), None)

    condition = await wait_for(reported, timeout=60)
    assert "podTemplate.spec.containers[0].command" in condition["message"]
    assert get(kube_emulator, DEPLOYMENTS, "greedy-agent") is None
