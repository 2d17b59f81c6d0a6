"""The chart's console: nothing of it unless `console.enabled`; enabled, a Service on the
operator's `console` port, the environment the operator reads (kube/settings.py), and a
NetworkPolicy rule only for the peers named; the operator may ask SubjectAccessReviews
when the console reads a user header, and example Roles for its users."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
from cadenza_operator.kube.settings import OperatorSettings

from ..chart.rbac import allows, rendered_rules
from ..chart.render import CHART, of_kind, one, render
from ..chart.test_chart import KUBERNETES_VERSIONS, env_of, operator_container

PROXY = [{"podSelector": {"matchLabels": {"app": "oauth2-proxy"}}}]


def console_services(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in of_kind(objects, "Service") if o["metadata"]["name"].endswith("-console")]


def operator_policy(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "NetworkPolicy", "cadenza")


def test_the_console_is_off_by_default() -> None:
    objects = render()
    assert console_services(objects) == []
    container = operator_container(objects)
    assert "console" not in {p["name"] for p in container["ports"]}
    assert not any(name.startswith("CADENZA_CONSOLE") for name in env_of(container))
    assert OperatorSettings.from_env(env_of(container) | {"POD_ID": "x"}).console_port == 0
    rules = operator_policy(objects)["spec"]["ingress"]
    assert all(p["port"] != "console" for rule in rules for p in rule["ports"])


def test_enabled_it_has_a_service_a_port_and_its_settings() -> None:
    objects = render(
        {
            "console": {
                "enabled": True,
                "port": 8181,
                "auth": {"userHeader": "X-Forwarded-User", "groupsHeader": "X-Forwarded-Groups"},
                "service": {"annotations": {"a": "b"}},
            }
        }
    )
    (service,) = console_services(objects)
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8181, "targetPort": "console", "protocol": "TCP"}
    ]
    assert service["metadata"]["annotations"] == {"a": "b"}
    container = operator_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["console"] == 8181
    env = env_of(container)
    settings = OperatorSettings.from_env({k: v for k, v in env.items() if isinstance(v, str)})
    assert (settings.console_port, settings.console_user_header) == (8181, "X-Forwarded-User")
    assert settings.console_groups_header == "X-Forwarded-Groups"
    assert settings.console_address == "0.0.0.0"  # reached through the Service
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    # No peers named: the NetworkPolicy lets nobody in to the console.
    rules = operator_policy(objects)["spec"]["ingress"]
    assert all(p["port"] != "console" for rule in rules for p in rule["ports"])


def test_the_network_policy_admits_only_the_peers_named() -> None:
    objects = render({"console": {"enabled": True, "networkPolicyFrom": PROXY}})
    rules = operator_policy(objects)["spec"]["ingress"]
    console = [rule for rule in rules if any(p["port"] == "console" for p in rule["ports"])]
    assert console == [{"ports": [{"port": "console", "protocol": "TCP"}], "from": PROXY}]
    assert any(p["port"] == "metrics" for rule in rules for p in rule["ports"])  # kept
    alone = render(
        {
            "console": {"enabled": True, "networkPolicyFrom": PROXY},
            "networkPolicy": {"monitoringNamespace": ""},
        }
    )
    assert operator_policy(alone)["spec"]["ingress"] == console
    # Peers named while the console is off open nothing.
    off = render({"console": {"networkPolicyFrom": PROXY}})
    assert all(
        p["port"] != "console" for rule in operator_policy(off)["spec"]["ingress"] for p in rule["ports"]
    )


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"console": {"enabled": "yes"}}, id="enabled-not-boolean"),
        pytest.param({"console": {"port": 0}}, id="port-zero"),
        pytest.param({"console": {"auth": {"userHeader": "X Forwarded"}}}, id="header-with-space"),
        pytest.param({"console": {"service": {"type": "Ingress"}}}, id="service-type"),
        pytest.param({"console": {"tls": True}}, id="unknown-key"),
    ],
)
def test_the_schema_refuses_bad_console_values(bad: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(bad)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_console_objects_are_valid_kubernetes(version: str) -> None:
    objects = render({"console": {"enabled": True, "networkPolicyFrom": PROXY}})
    for obj in [*console_services(objects), one(objects, "Deployment"), operator_policy(objects)]:
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_operator_may_ask_subject_access_reviews_only_when_the_console_reads_a_user() -> None:
    review = ("create", "authorization.k8s.io", "subjectaccessreviews")
    on = {"console": {"enabled": True, "auth": {"userHeader": "X-Forwarded-User"}}}
    assert allows(rendered_rules(on), *review)
    # Namespaced: the review is cluster-scoped, granted by the ClusterRole all the same.
    assert allows(rendered_rules({**on, "watchNamespaces": ["team-a"]}), *review)
    assert not allows(rendered_rules({"console": {"enabled": True}}), *review)  # nobody to ask about
    assert not allows(rendered_rules(), *review)


def test_the_example_console_roles_grant_what_the_console_checks_and_are_bound_to_nobody() -> None:
    objects = render({"console": {"enabled": True}})
    roles = {o["metadata"]["name"]: o for o in of_kind(objects, "ClusterRole")}
    viewer, operator = roles["cadenza-console-viewer"], roles["cadenza-console-operator"]

    def verbs(role: dict[str, Any]) -> set[str]:
        (rule,) = role["rules"]
        assert (rule["apiGroups"], rule["resources"]) == (["cadenza.dev"], ["workflowruns"])
        return set(rule["verbs"])

    assert {"get", "list"} <= verbs(viewer) and "update" not in verbs(viewer)
    assert {"get", "list", "update"} <= verbs(operator)
    bound = {b["roleRef"]["name"] for b in objects if b["kind"] in ("RoleBinding", "ClusterRoleBinding")}
    assert not bound & set(roles) - {"cadenza"}
    assert "cadenza-console-viewer" not in {o["metadata"]["name"] for o in of_kind(render(), "ClusterRole")}
    for role in (viewer, operator):
        kubernetes_validate.validate(role, KUBERNETES_VERSIONS[-1], strict=True)
