"""Allow-lists of Agent images and ServiceAccounts per namespace (kube/agent_policy.py):
an Agent that would run an image or a ServiceAccount its namespace does not allow gets an
InvalidSpec condition naming the field, and no Deployment. (Unit tests, then the real
operator on the emulator.)"""

from __future__ import annotations

from typing import Any

import pytest
from cadenza_operator.kube import builders
from cadenza_operator.kube.agent_policy import parse_patterns, violations
from cadenza_operator.kube.settings import OperatorSettings, SettingsError
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import Agent

from ..kube.emulator import KubeEmulator
from ..kube.fixtures import wait_for
from .harness import AGENTS, DEPLOYMENTS, NAMESPACE, get, manifest, running_operator, status_of

IMAGES = {NAMESPACE: ("ghcr.io/acme/*",), "*": ("ghcr.io/base/*",)}
ACCOUNTS = {"*": ("agents-*",)}


def _deployment(**spec: Any) -> tuple[dict[str, Any], str]:
    agent = Agent.model_validate({"metadata": {"name": "a", "namespace": NAMESPACE}, "spec": spec})
    built = builders.build_deployment(agent, nats_url="nats://nats:4222", replicas=1)
    return built, builders.resource_name(agent)


def _found(namespace: str = NAMESPACE, **spec: Any) -> list[str]:
    deployment, own = _deployment(**spec)
    return [where for where, _ in violations(deployment, namespace, IMAGES, ACCOUNTS, own)]


def test_images_and_accounts_are_checked_per_namespace_with_a_default() -> None:
    assert _found(image="ghcr.io/acme/triage:1") == []
    assert _found(image="ghcr.io/base/triage:1") == ["spec.image"]  # the namespace's own list wins
    assert _found("other", image="ghcr.io/base/triage:1") == []  # '*' for namespaces not named
    assert _found("other", image="docker.io/evil:1") == ["spec.image"]
    assert _found(image="ghcr.io/acme/t:1", serviceAccountName="agents-triage") == []
    assert _found(image="ghcr.io/acme/t:1", serviceAccountName="cluster-admin-sa") == [
        "spec.serviceAccountName"
    ]
    assert _found(image="ghcr.io/acme/t:1") == []  # the account the operator makes, with no rights


def test_no_lists_allow_anything_and_a_bad_list_is_a_settings_error() -> None:
    deployment, own = _deployment(image="anything:1", serviceAccountName="any")
    assert violations(deployment, NAMESPACE, {}, {}, own) == []
    assert parse_patterns("X", "") == {}
    settings = OperatorSettings.from_env({"CADENZA_AGENT_IMAGES": '{"team-a": ["ghcr.io/a/*"]}'})
    assert settings.agent_images == {"team-a": ("ghcr.io/a/*",)}
    for raw in ("not json", '["a"]', '{"team-a": "ghcr.io/a/*"}', '{"team-a": [1]}'):
        with pytest.raises(SettingsError, match="CADENZA_AGENT_IMAGES"):
            OperatorSettings.from_env({"CADENZA_AGENT_IMAGES": raw})


@pytest.mark.timeout(120)
async def test_the_operator_applies_no_deployment_for_an_agent_the_policy_refuses(
    kube_emulator: KubeEmulator, cadenza_crds: Any, fresh_nats: NatsServer
) -> None:
    async with running_operator(
        kube_emulator, fresh_nats.url, agent_images=IMAGES, agent_service_accounts=ACCOUNTS
    ):
        kube_emulator.create_object(AGENTS, manifest("Agent", "miner", {"image": "docker.io/miner:1"}))
        kube_emulator.create_object(AGENTS, manifest("Agent", "triage", {"image": "ghcr.io/acme/triage:1"}))
        await wait_for(lambda: get(kube_emulator, DEPLOYMENTS, "triage-agent"), timeout=30)

        def refused() -> dict[str, Any] | None:
            for c in status_of(kube_emulator, AGENTS, "miner").get("conditions", []):
                if c.get("type") == "Ready" and c.get("reason") == "InvalidSpec":
                    return dict(c)
            return None

        condition = await wait_for(refused, timeout=30)
        assert "spec.image" in condition["message"] and "docker.io/miner:1" in condition["message"]
        assert get(kube_emulator, DEPLOYMENTS, "miner-agent") is None


def test_the_chart_passes_the_allow_lists_to_the_operator() -> None:
    from ..chart.render import render
    from ..chart.test_chart import operator_container

    policy = {"allowedImages": {"team-a": ["ghcr.io/acme/*"]}, "allowedServiceAccounts": {"*": ["agents-*"]}}
    env = {e["name"]: e.get("value") for e in operator_container(render({"agentPolicy": policy}))["env"]}
    settings = OperatorSettings.from_env({k: v for k, v in env.items() if isinstance(v, str)})
    assert settings.agent_images == {"team-a": ("ghcr.io/acme/*",)}
    assert settings.agent_service_accounts == {"*": ("agents-*",)}
    unset = {e["name"] for e in operator_container(render())["env"]}
    assert not unset & {"CADENZA_AGENT_IMAGES", "CADENZA_AGENT_SERVICE_ACCOUNTS"}
