"""An operator that exports traces makes Agents' Deployments that export to the same
collector (so agent spans nest under the engine's attempt spans in one backend); an Agent
naming its own collector keeps it; an operator started again without traces takes the
variables back off the Deployments it made. (Kubernetes API emulator, real nats-server,
the real operator in-process; its settings read from an environment as the chart fills it.)"""

from __future__ import annotations

from typing import Any

import pytest
from cadenza_operator.kube.settings import OperatorSettings
from cadenza_operator.local.nats_server import NatsServer

from ..kube.emulator import KubeEmulator
from ..kube.fixtures import wait_for
from .harness import AGENTS, DEPLOYMENTS, get, manifest, running_operator

pytestmark = pytest.mark.timeout(120)

COLLECTOR = "http://otel-collector.observability:4318"
SPEC = {"image": "registry.example/agents:1", "command": ["python", "agents.py"]}
OWN_COLLECTOR = {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://team-collector:4318"}


def otel_env(deployment: dict[str, Any] | None) -> dict[str, Any] | None:
    """The OTEL_* variables of the Deployment's agent container, or None before it exists."""
    if deployment is None:
        return None
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container["env"] if e["name"].startswith("OTEL_")}


def tracing_settings() -> dict[str, Any]:
    """The tracing part of the settings of an operator whose pod has the chart's variables."""
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": COLLECTOR,
        "CADENZA_AGENT_OTEL_HEADERS_SECRET": "otel-auth",
        "CADENZA_AGENT_OTEL_HEADERS_KEY": "headers",
    }
    settings = OperatorSettings.from_env(environ)
    return {
        "agent_otel_env": settings.agent_otel_env,
        "agent_otel_headers_secret": settings.agent_otel_headers_secret,
        "agent_otel_headers_key": settings.agent_otel_headers_key,
    }


async def test_agents_export_where_the_operator_does_and_stop_when_it_stops(
    kube_emulator: KubeEmulator, cadenza_crds: Any, fresh_nats: NatsServer
) -> None:
    async with running_operator(kube_emulator, fresh_nats.url, **tracing_settings()):
        kube_emulator.create_object(AGENTS, manifest("Agent", "alpha", SPEC))
        kube_emulator.create_object(AGENTS, manifest("Agent", "beta", {**SPEC, "env": [OWN_COLLECTOR]}))
        alpha = await wait_for(lambda: otel_env(get(kube_emulator, DEPLOYMENTS, "alpha-agent")), timeout=30)
        beta = await wait_for(lambda: otel_env(get(kube_emulator, DEPLOYMENTS, "beta-agent")), timeout=30)
    assert alpha == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": COLLECTOR},
        "OTEL_EXPORTER_OTLP_HEADERS": {
            "name": "OTEL_EXPORTER_OTLP_HEADERS",
            "valueFrom": {"secretKeyRef": {"name": "otel-auth", "key": "headers", "optional": True}},
        },
    }
    assert beta == {"OTEL_EXPORTER_OTLP_ENDPOINT": OWN_COLLECTOR}

    # Started again without a collector, the operator takes its variables back off the
    # Deployments it made (their spec hash changed), and leaves the Agent's own alone.
    async with running_operator(kube_emulator, fresh_nats.url):
        await wait_for(lambda: otel_env(get(kube_emulator, DEPLOYMENTS, "alpha-agent")) == {}, timeout=30)
        assert otel_env(get(kube_emulator, DEPLOYMENTS, "beta-agent")) == {
            "OTEL_EXPORTER_OTLP_ENDPOINT": OWN_COLLECTOR
        }
