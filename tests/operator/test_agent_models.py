"""An Agent's Models reach its Deployment: CADENZA_MODELS with their specs and each API
key as a secretKeyRef in the variable the SDK reads, never a value; a Model that does not
exist is an InvalidSpec condition naming spec.models[i]. (Kubernetes API emulator, real
nats-server, the real operator in-process.)"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cadenza.models import ModelSpec as SdkModelSpec
from cadenza.models import secret_env_var
from cadenza_operator.kube.builders import secret_variable
from cadenza_operator.local.secrets import secret_variable as local_secret_variable

from ..kube.emulator import KubeEmulator
from ..kube.fixtures import wait_for
from .harness import AGENTS, DEPLOYMENTS, RunningOperator, events_for, get, manifest, status_of

pytestmark = pytest.mark.timeout(120)

MODELS = "cadenza.dev/v1alpha1/models"
SECRETS = "v1/secrets"
MODEL = {
    "provider": "openai",
    "baseURL": "https://llm.example/v1",
    "model": "tiny",
    "apiKey": {"secretKeyRef": {"name": "llm-keys", "key": "openai"}},
    "limits": {"requests": 600, "tokens": 200000, "per": "1m", "concurrency": 20},
    "pricing": {"input": 0.15, "output": 0.6, "per": "1M"},
}


def test_every_side_names_the_secret_variable_alike() -> None:
    for name, key in [("llm-keys", "openai"), ("a.b", "c-d"), ("x", "y.z")]:
        assert secret_variable(name, key) == secret_env_var(name, key) == local_secret_variable(name, key)


async def test_the_deployment_carries_the_models_and_references_their_keys(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    kube_emulator.create_object(MODELS, manifest("Model", "fast", MODEL))
    spec = {"image": "registry.example/agents:1", "models": ["fast"]}
    kube_emulator.create_object(AGENTS, manifest("Agent", "writer", spec))
    deployment = await wait_for(lambda: get(kube_emulator, DEPLOYMENTS, "writer-agent"), timeout=60)

    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["CADENZA_SECRET_LLM_KEYS_OPENAI"] == {
        "name": "CADENZA_SECRET_LLM_KEYS_OPENAI",
        "valueFrom": {"secretKeyRef": {"name": "llm-keys", "key": "openai"}},
    }
    specs = json.loads(env["CADENZA_MODELS"]["value"])
    assert specs == {"fast": MODEL}
    parsed = SdkModelSpec.from_spec("fast", specs["fast"])  # what the SDK makes of it
    assert (parsed.requests, parsed.per, parsed.concurrency) == (600, 60.0, 20)
    assert not [call for call in kube_emulator.request_log if call.resource == "secrets"]


async def test_an_unknown_model_is_an_invalid_spec(
    kube_emulator: KubeEmulator, operator: RunningOperator
) -> None:
    spec = {"image": "registry.example/agents:1", "models": ["missing"]}
    kube_emulator.create_object(AGENTS, manifest("Agent", "lost", spec))

    def condition() -> dict[str, Any] | None:
        for c in status_of(kube_emulator, AGENTS, "lost").get("conditions", []):
            if c.get("reason") == "InvalidSpec":
                return dict(c)
        return None

    found = await wait_for(condition, timeout=60)
    assert "spec.models[0]" in found["message"] and "'missing'" in found["message"]
    assert get(kube_emulator, DEPLOYMENTS, "lost-agent") is None


async def test_env_envfrom_and_a_models_key_stay_references_and_no_value_is_written(
    kube_emulator: KubeEmulator, operator: RunningOperator, capfd: pytest.CaptureFixture[str]
) -> None:
    """All three ways an Agent gets a secret at once, with real Secrets in the API: an env
    secretKeyRef, an envFrom secretRef and its Model's apiKey. The Deployment references
    them; no value reaches anything the operator writes (Deployment, statuses, Events) or
    logs, and it reads no Secret."""
    values = {"openai": "sk-model-key-never-written", "token": "crm-token-never-written"}
    for name, key in [("llm-keys", "openai"), ("crm", "token")]:
        kube_emulator.create_object(
            SECRETS,
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "namespace": "default"},
                "data": {key: base64.b64encode(values[key].encode()).decode()},
            },
        )
    kube_emulator.create_object(MODELS, manifest("Model", "fast", MODEL))
    spec = {
        "image": "registry.example/agents:1",
        "models": ["fast"],
        "env": [{"name": "CRM_TOKEN", "valueFrom": {"secretKeyRef": {"name": "crm", "key": "token"}}}],
        "envFrom": [{"secretRef": {"name": "crm"}, "prefix": "CRM_"}],
    }
    kube_emulator.create_object(AGENTS, manifest("Agent", "triage", spec))
    deployment = await wait_for(lambda: get(kube_emulator, DEPLOYMENTS, "triage-agent"), timeout=60)
    await wait_for(lambda: status_of(kube_emulator, AGENTS, "triage").get("conditions"), timeout=60)

    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["CRM_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "crm", "key": "token"}}
    assert env["CADENZA_SECRET_LLM_KEYS_OPENAI"]["valueFrom"] == {
        "secretKeyRef": {"name": "llm-keys", "key": "openai"}
    }
    assert {"secretRef": {"name": "crm"}, "prefix": "CRM_"} in container["envFrom"]
    written = [
        deployment,
        status_of(kube_emulator, AGENTS, "triage"),
        status_of(kube_emulator, MODELS, "fast"),
        *events_for(kube_emulator, "triage"),
        *events_for(kube_emulator, "triage-agent"),
    ]
    logged = "".join(capfd.readouterr())
    for value in values.values():
        encoded = base64.b64encode(value.encode()).decode()
        assert value not in json.dumps(written) and encoded not in json.dumps(written)
        assert value not in logged and encoded not in logged
    assert not [call for call in kube_emulator.request_log if call.resource == "secrets"]
