"""The chart's NetworkPolicies (issue 13): every pod it renders is selected by one, NATS
admits clients only from the release's pods and agent pods (the labels the operator puts
on them), metrics only from the monitoring namespace."""

from __future__ import annotations

from typing import Any

import pytest
from cadenza_operator.kube.builders import agent_labels

from .render import CI_SCENARIOS, NAMESPACE, of_kind, one, render, scenario_values

POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "Pod"}


def _pods(objects: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, str]]]:
    """(what, namespace, labels) of every pod the objects make."""
    pods = []
    for obj in objects:
        if obj["kind"] not in POD_KINDS:
            continue
        labels = (
            obj["metadata"].get("labels", {})
            if obj["kind"] == "Pod"
            else obj["spec"]["template"]["metadata"]["labels"]
        )
        pods.append((f"{obj['kind']} {obj['metadata']['name']}", obj["metadata"]["namespace"], labels))
    return pods


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the chart uses matchLabels only
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _ingress(policy: dict[str, Any], port: int | str) -> list[dict[str, Any]]:
    return [
        peer
        for rule in policy["spec"]["ingress"]
        if any(p["port"] == port for p in rule["ports"])
        for peer in rule["from"]
    ]


@pytest.mark.parametrize("scenario", CI_SCENARIOS)
def test_every_pod_the_chart_renders_is_covered(scenario: str) -> None:
    objects = render(scenario_values(scenario))
    policies = of_kind(objects, "NetworkPolicy")
    pods = _pods(objects)
    assert pods
    for what, namespace, labels in pods:
        covering = [
            p
            for p in policies
            if p["metadata"]["namespace"] == namespace and _selects(p["spec"]["podSelector"], labels)
        ]
        assert covering, f"{what} is selected by no NetworkPolicy"
        assert all(p["spec"]["policyTypes"] == ["Ingress"] for p in covering)


def test_nats_admits_the_release_and_agent_pods_only() -> None:
    objects = render()
    nats = one(objects, "NetworkPolicy", "cadenza-nats")
    release, agents = _ingress(nats, 4222)
    operator = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    test_pod = one(objects, "Pod")["metadata"]["labels"]
    assert _selects(release["podSelector"], operator) and _selects(release["podSelector"], test_pod)
    assert "namespaceSelector" not in release  # the release's namespace only
    assert _selects(agents["podSelector"], agent_labels("greeter"))
    assert not _selects(agents["podSelector"], {"app": "anything-else"})
    assert agents["namespaceSelector"] == {}  # Agents anywhere the operator watches: everywhere
    (routes,) = _ingress(nats, 6222)
    nats_pod = one(objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert _selects(routes["podSelector"], nats_pod) and not _selects(routes["podSelector"], operator)
    (monitor,) = _ingress(nats, 8222)
    assert monitor == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def test_agents_are_admitted_from_the_watched_namespaces_only() -> None:
    nats = one(render({"watchNamespaces": ["team-a", "team-b"]}), "NetworkPolicy", "cadenza-nats")
    _, agents = _ingress(nats, 4222)
    assert agents["namespaceSelector"] == {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}
        ]
    }


def test_metrics_only_from_the_monitoring_namespace() -> None:
    operator = one(render({"networkPolicy": {"monitoringNamespace": "prom"}}), "NetworkPolicy", "cadenza")
    (rule,) = operator["spec"]["ingress"]
    assert rule == {
        "ports": [{"port": "metrics", "protocol": "TCP"}],
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "prom"}}}],
    }
    closed = render({"networkPolicy": {"monitoringNamespace": ""}})
    assert one(closed, "NetworkPolicy", "cadenza")["spec"]["ingress"] == []
    assert _ingress(one(closed, "NetworkPolicy", "cadenza-nats"), 8222) == []


def test_network_policies_can_be_switched_off() -> None:
    assert of_kind(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy") == []
    external = render({"nats": {"enabled": False, "url": "nats://nats.example:4222"}})
    assert {p["metadata"]["name"] for p in of_kind(external, "NetworkPolicy")} == {"cadenza", "cadenza-test"}
    assert all(p["metadata"]["namespace"] == NAMESPACE for p in of_kind(external, "NetworkPolicy"))
