"""The operator's trace collector reaches Agents' pods (kube/builders.py `tracing_env`,
kube/settings.py `agent_otel_env`): only when the operator itself exports traces, only the
endpoints (never its service name or a header value), the headers as an optional
reference to a Secret, and an Agent that names its own collector keeps it whole."""

from __future__ import annotations

from typing import Any

import pytest
from cadenza.tracing import enabled
from cadenza_operator.kube import builders
from cadenza_operator.kube.settings import OperatorSettings
from cadenza_operator.models import Agent

COLLECTOR = "http://otel-collector.observability:4318"
SPEC = {"image": "registry.example/agents:1"}


def agent(env: list[dict[str, Any]] | None = None) -> Agent:
    spec = {**SPEC, "env": env or []}
    return Agent.model_validate({"metadata": {"name": "alpha", "namespace": "team-a"}, "spec": spec})


def container_env(a: Agent, settings: OperatorSettings) -> list[dict[str, Any]]:
    deployment = builders.build_deployment(
        a,
        nats_url="nats://nats:4222",
        replicas=1,
        otel_env=settings.agent_otel_env,
        otel_headers=settings.agents_otel_headers,
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env: list[dict[str, Any]] = container["env"]
    return env


def by_name(env: list[dict[str, Any]]) -> dict[str, Any]:
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), f"a variable twice: {names}"
    return {e["name"]: e for e in env}


def otel(env: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: v for k, v in by_name(env).items() if k.startswith("OTEL_")}


OPERATOR_ENV = {
    "OTEL_EXPORTER_OTLP_ENDPOINT": COLLECTOR,
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{COLLECTOR}/v1/traces",
    "OTEL_SERVICE_NAME": "cadenza-operator",
    "OTEL_RESOURCE_ATTRIBUTES": "service.name=cadenza-operator,deployment.environment=prod",
    "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20s3cret",
    "CADENZA_AGENT_OTEL_HEADERS_SECRET": "otel-headers",
    "CADENZA_AGENT_OTEL_HEADERS_KEY": "token-headers",
}


# ------------------------------------------------------------------ settings


def test_the_operator_passes_on_its_endpoints_only() -> None:
    settings = OperatorSettings.from_env(OPERATOR_ENV)
    assert settings.agent_otel_env == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": COLLECTOR,
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{COLLECTOR}/v1/traces",
    }
    assert settings.agents_otel_headers == ("otel-headers", "token-headers")


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"CADENZA_AGENT_OTEL_HEADERS_SECRET": "otel-headers"},  # a secret but no collector
        {"OTEL_EXPORTER_OTLP_ENDPOINT": COLLECTOR, "OTEL_SDK_DISABLED": "true"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": COLLECTOR, "OTEL_TRACES_EXPORTER": "none"},
    ],
    ids=["unset", "secret-alone", "sdk-disabled", "exporter-none"],
)
def test_an_operator_that_exports_no_traces_passes_nothing_on(environ: dict[str, str]) -> None:
    settings = OperatorSettings.from_env(environ)
    assert settings.agent_otel_env == {}
    assert settings.agents_otel_headers is None


# ------------------------------------------------------------------ builder


@pytest.mark.parametrize(
    "environ",
    [{}, {"CADENZA_AGENT_OTEL_HEADERS_SECRET": "otel-headers"}],
    ids=["unset", "secret-alone"],
)
def test_without_tracing_agents_get_no_otel_variable_at_all(environ: dict[str, str]) -> None:
    # "No cost when off": not a variable the SDK would look at, not even an empty one.
    env = container_env(agent(), OperatorSettings.from_env(environ))
    assert otel(env) == {}
    assert not enabled({e["name"]: e.get("value", "") for e in env})


def test_an_agent_gets_the_collector_and_a_reference_to_the_headers() -> None:
    env = otel(container_env(agent(), OperatorSettings.from_env(OPERATOR_ENV)))
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == COLLECTOR
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]["value"] == f"{COLLECTOR}/v1/traces"
    headers = env["OTEL_EXPORTER_OTLP_HEADERS"]
    assert "value" not in headers  # the token itself never lands in the Deployment
    assert headers["valueFrom"] == {
        "secretKeyRef": {"name": "otel-headers", "key": "token-headers", "optional": True}
    }
    # The operator's own names stay its own: the SDK names the agent's service after it.
    assert "OTEL_SERVICE_NAME" not in env and "OTEL_RESOURCE_ATTRIBUTES" not in env
    assert enabled({k: v.get("value", "") for k, v in env.items()})


def test_headers_are_passed_on_only_when_a_secret_is_named() -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": COLLECTOR, "OTEL_EXPORTER_OTLP_HEADERS": "x=y"}
    env = otel(container_env(agent(), OperatorSettings.from_env(environ)))
    assert set(env) == {"OTEL_EXPORTER_OTLP_ENDPOINT"}


def test_an_agent_naming_its_own_collector_keeps_it_and_gets_none_of_ours() -> None:
    # The hard case: were the operator's traces endpoint passed on, it would beat the
    # Agent's general endpoint for traces; were its headers, the token would go to a
    # collector the Agent chose.
    own = [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://team-a-collector:4318"}]
    env = otel(container_env(agent(own), OperatorSettings.from_env(OPERATOR_ENV)))
    assert env == {"OTEL_EXPORTER_OTLP_ENDPOINT": own[0]}


def test_the_agents_own_otel_variables_win() -> None:
    own = [
        {"name": "OTEL_SDK_DISABLED", "value": "true"},
        {
            "name": "OTEL_EXPORTER_OTLP_HEADERS",
            "valueFrom": {"secretKeyRef": {"name": "team-a-otel", "key": "headers"}},
        },
    ]
    env = otel(container_env(agent(own), OperatorSettings.from_env(OPERATOR_ENV)))
    assert env["OTEL_SDK_DISABLED"]["value"] == "true"
    assert env["OTEL_EXPORTER_OTLP_HEADERS"]["valueFrom"] == {
        "secretKeyRef": {"name": "team-a-otel", "key": "headers"}
    }
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == COLLECTOR


def test_turning_tracing_on_changes_the_deployments_spec_hash() -> None:
    # The hash decides whether a live Deployment is patched: an operator restarted with a
    # collector must roll the agents it already made, or they would never export.
    off = builders.build_deployment(agent(), nats_url="nats://nats:4222", replicas=1)
    on = builders.build_deployment(
        agent(),
        nats_url="nats://nats:4222",
        replicas=1,
        otel_env=OperatorSettings.from_env(OPERATOR_ENV).agent_otel_env,
    )
    annotation = builders.SPEC_HASH_ANNOTATION
    assert off["metadata"]["annotations"][annotation] != on["metadata"]["annotations"][annotation]
