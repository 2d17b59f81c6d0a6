"""The chart's `tracing` values: off by default (no OTEL_* variable), the collector's
endpoint on the operator when set, its headers only as a reference to a Secret, and what
the chart renders is what the operator reads (OperatorSettings.from_env) to pass the
collector on to Agents' pods."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
from cadenza_operator.kube.settings import OperatorSettings

from .render import CHART, of_kind, render
from .test_chart import env_of, operator_container, operator_deployment

COLLECTOR = "http://otel-collector.observability:4318"
TRACING = {"tracing": {"otlpEndpoint": COLLECTOR}}
WITH_HEADERS = {"tracing": {"otlpEndpoint": COLLECTOR, "headersSecret": {"name": "otel-auth"}}}


def operator_env(values: dict[str, Any]) -> dict[str, Any]:
    return env_of(operator_container(render(values)))


def literal_env(values: dict[str, Any]) -> dict[str, str]:
    """The variables the operator process sees, Secrets left out (their values are not in the chart)."""
    return {k: v for k, v in operator_env(values).items() if isinstance(v, str)}


def test_off_by_default_no_otel_variable() -> None:
    env = operator_env({})
    assert [k for k in env if k.startswith(("OTEL_", "CADENZA_AGENT_OTEL_"))] == []
    assert OperatorSettings.from_env(literal_env({})).agent_otel_env == {}


def test_the_endpoint_reaches_the_operator_and_through_it_the_agents() -> None:
    env = operator_env(TRACING)
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == COLLECTOR
    assert "OTEL_EXPORTER_OTLP_HEADERS" not in env and "CADENZA_AGENT_OTEL_HEADERS_SECRET" not in env
    settings = OperatorSettings.from_env(literal_env(TRACING))
    assert settings.agent_otel_env == {"OTEL_EXPORTER_OTLP_ENDPOINT": COLLECTOR}
    assert settings.agents_otel_headers is None


def test_the_headers_are_a_secret_reference_never_a_value() -> None:
    values = {"tracing": {**WITH_HEADERS["tracing"], "headersSecret": {"name": "otel-auth", "key": "hdrs"}}}
    container = operator_container(render(values))
    (headers,) = [e for e in container["env"] if e["name"] == "OTEL_EXPORTER_OTLP_HEADERS"]
    assert headers == {
        "name": "OTEL_EXPORTER_OTLP_HEADERS",
        "valueFrom": {"secretKeyRef": {"name": "otel-auth", "key": "hdrs"}},
    }
    settings = OperatorSettings.from_env(literal_env(values))
    assert settings.agents_otel_headers == ("otel-auth", "hdrs")


def test_the_headers_key_defaults_to_headers() -> None:
    settings = OperatorSettings.from_env(literal_env(WITH_HEADERS))
    assert settings.agents_otel_headers == ("otel-auth", "headers")


def test_a_headers_secret_without_an_endpoint_is_refused_by_name() -> None:
    with pytest.raises(helm.HelmRenderError, match=r"tracing\.headersSecret\.name .*tracing\.otlpEndpoint"):
        render({"tracing": {"headersSecret": {"name": "otel-auth"}}})


@pytest.mark.parametrize(
    "bad",
    [
        {"otlpEndpoint": "otel-collector:4318"},  # no scheme: the exporter would not parse it
        {"otlpEndpoint": "http://collector:4318 "},
        {"headers": "authorization=Bearer x"},  # a literal token has no place in values
        {"headersSecret": {"name": "otel-auth", "key": ""}},
    ],
)
def test_the_schema_refuses_bad_tracing_values(bad: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema({"tracing": bad})


def test_the_operator_deployment_with_tracing_is_valid_kubernetes() -> None:
    deployment = operator_deployment(render(WITH_HEADERS))
    kubernetes_validate.validate(deployment, "1.30", strict=True)


def test_no_network_policy_blocks_egress_to_the_collector() -> None:
    # The chart's policies restrict ingress only; were one to restrict egress, the
    # operator (and agents) could no longer reach the collector and traces would vanish
    # silently. This fails then, so the collector's port is added with it.
    policies = of_kind(render({**TRACING, "networkPolicy": {"enabled": True}}), "NetworkPolicy")
    assert policies
    for policy in policies:
        assert "Egress" not in policy["spec"].get("policyTypes", []), policy["metadata"]["name"]
