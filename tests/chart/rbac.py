"""What the chart's RBAC lets the operator do, computed from the rendered objects.

`rendered_rules(values)` flattens every (Cluster)Role bound to the operator's
ServiceAccount into `Rule(api_group, resource, verb, namespace)` tuples; namespace is
None for rules granted cluster-wide (a ClusterRoleBinding). `allows()` answers one API
request the way the Kubernetes RBAC authorizer does, wildcards and subresources
included. Meant for comparing the chart against the API requests the operator really
makes (e.g. the Kubernetes API emulator's request log).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from .render import NAMESPACE, RELEASE, render

_ROLE_KINDS = {"Role", "ClusterRole"}


class Rule(NamedTuple):
    api_group: str  # "" is the core group; "*" any group
    resource: str  # "deployments", "workflowruns/status", "*", "agents/*", "*/status"
    verb: str  # "get", ..., or "*"
    namespace: str | None  # None: granted in every namespace and for cluster-scoped resources


def operator_service_account(objects: list[dict[str, Any]]) -> tuple[str, str]:
    """(namespace, name) of the ServiceAccount the operator Deployment runs as."""
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    assert len(deployments) == 1, "expected exactly one Deployment (the operator)"
    deployment = deployments[0]
    name = deployment["spec"]["template"]["spec"].get("serviceAccountName", "default")
    return deployment["metadata"]["namespace"], name


def rules_of(objects: list[dict[str, Any]]) -> list[Rule]:
    """Rules granted to the operator's ServiceAccount by the given rendered objects."""
    sa_namespace, sa_name = operator_service_account(objects)
    roles = {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
        for o in objects
        if o["kind"] in _ROLE_KINDS
    }
    rules: list[Rule] = []
    for binding in objects:
        if binding["kind"] not in {"RoleBinding", "ClusterRoleBinding"}:
            continue
        if not any(
            s.get("kind") == "ServiceAccount"
            and s.get("name") == sa_name
            and s.get("namespace") == sa_namespace
            for s in binding.get("subjects", [])
        ):
            continue
        # A RoleBinding grants in its own namespace, even when it refers to a ClusterRole.
        namespace = binding["metadata"]["namespace"] if binding["kind"] == "RoleBinding" else None
        ref = binding["roleRef"]
        role_namespace = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        role = roles.get((ref["kind"], role_namespace, ref["name"]))
        assert role is not None, f"{binding['kind']} {binding['metadata']['name']} refers to a missing {ref}"
        for rule in role.get("rules") or []:
            if rule.get("resourceNames") or rule.get("nonResourceURLs"):
                raise NotImplementedError(f"rules narrowed by name or URL are not modelled: {rule}")
            rules.extend(
                Rule(group, resource, verb, namespace)
                for group in rule.get("apiGroups", [])
                for resource in rule.get("resources", [])
                for verb in rule.get("verbs", [])
            )
    return rules


def rendered_rules(
    values: dict[str, Any] | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE
) -> list[Rule]:
    """The operator's RBAC rules for these chart values."""
    return rules_of(render(values, release=release, namespace=namespace))


def _resource_matches(rule_resource: str, resource: str, subresource: str | None) -> bool:
    if rule_resource == "*":
        return True
    if subresource is None:
        return rule_resource == resource
    return rule_resource in {f"{resource}/{subresource}", f"{resource}/*", f"*/{subresource}"}


def allows(
    rules: Iterable[Rule],
    verb: str,
    group: str,
    resource: str,
    subresource: str | None = None,
    namespace: str | None = None,
) -> bool:
    """Would these rules authorize the request?

    `group` is "" for the core API group. `namespace` is the request's namespace: None for
    a cluster-scoped resource or a request across all namespaces (e.g. a cluster-wide
    watch), which only cluster-wide rules allow. `resource` may also be given as
    "resource/subresource".
    """
    if subresource is None and "/" in resource:
        resource, subresource = resource.split("/", 1)
    return any(
        rule.verb in {verb, "*"}
        and rule.api_group in {group, "*"}
        and _resource_matches(rule.resource, resource, subresource)
        and (rule.namespace is None or rule.namespace == namespace)
        for rule in rules
    )
