"""Kubernetes RBAC's decision for one request, from the Roles and bindings given: what the
API emulator answers a SubjectAccessReview with (emulator.py `KubeEmulator`).

Modelled as the RBAC authorizer does it (k8s.io/kubernetes plugin/pkg/auth/authorizer/rbac):
a ClusterRoleBinding grants its ClusterRole's rules everywhere; a RoleBinding grants its
Role's (or a ClusterRole's) rules in its own namespace only; a subject is a User (by
name), a Group (among the request's groups) or a ServiceAccount (the user
`system:serviceaccount:NS:NAME`); a rule matches when its apiGroups, resources
(`*`, `res`, `res/sub`, `res/*`, `*/sub`) and verbs (`*` too) do, and, if it names
resourceNames, the request names one of them. Nothing is allowed unless a rule says so.

Not modelled (the emulator is not a cluster): ClusterRole aggregation (an aggregated
role's rules are what its object holds), the groups the authenticator adds
(`system:authenticated`: a review carries only the groups it names, as with a real SAR),
`system:masters`, non-resource URLs, and the `escalate`/`bind`/`impersonate` checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Json = Mapping[str, Any]


@dataclass(frozen=True)
class Request:
    """A review's subject and resourceAttributes."""

    user: str
    verb: str
    resource: str
    group: str = ""
    namespace: str = ""  # "": cluster-scoped, or across all namespaces
    subresource: str = ""
    name: str = ""
    groups: tuple[str, ...] = ()

    @classmethod
    def of_review(cls, spec: Json) -> Request:
        attrs = spec.get("resourceAttributes")
        if not isinstance(attrs, Mapping):
            raise ValueError("spec.resourceAttributes: required (non-resource reviews are not modelled)")
        return cls(
            user=str(spec.get("user") or ""),
            groups=tuple(str(g) for g in spec.get("groups") or ()),
            verb=str(attrs.get("verb") or ""),
            resource=str(attrs.get("resource") or ""),
            group=str(attrs.get("group") or ""),
            namespace=str(attrs.get("namespace") or ""),
            subresource=str(attrs.get("subresource") or ""),
            name=str(attrs.get("name") or ""),
        )


@dataclass
class Policy:
    """The RBAC objects a decision is made from (as stored: plain dicts)."""

    roles: list[Json] = field(default_factory=list)
    cluster_roles: list[Json] = field(default_factory=list)
    role_bindings: list[Json] = field(default_factory=list)
    cluster_role_bindings: list[Json] = field(default_factory=list)

    def decide(self, request: Request) -> tuple[bool, str]:
        """(allowed, reason): the first binding whose role has a matching rule, as RBAC says it."""
        for binding in self.cluster_role_bindings:
            role = self._role(binding, None)
            if role is not None and _binds(binding, request) and _any_rule(role, request):
                return True, f'RBAC: allowed by ClusterRoleBinding "{_name(binding)}" to {request.user}'
        for binding in self.role_bindings:
            where = _meta(binding).get("namespace")
            if not request.namespace or where != request.namespace:
                continue
            role = self._role(binding, where)
            if role is not None and _binds(binding, request) and _any_rule(role, request):
                return True, f'RBAC: allowed by RoleBinding "{_name(binding)}/{where}" to {request.user}'
        return False, ""

    def _role(self, binding: Json, namespace: str | None) -> Json | None:
        ref = binding.get("roleRef") or {}
        if ref.get("kind") == "ClusterRole":
            candidates: Iterable[Json] = self.cluster_roles
        elif ref.get("kind") == "Role" and namespace is not None:
            candidates = (r for r in self.roles if _meta(r).get("namespace") == namespace)
        else:
            return None
        return next((r for r in candidates if _name(r) == ref.get("name")), None)


def _meta(obj: Json) -> Json:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _name(obj: Json) -> str:
    return str(_meta(obj).get("name", ""))


def _binds(binding: Json, request: Request) -> bool:
    for subject in binding.get("subjects") or ():
        kind, name = subject.get("kind"), subject.get("name")
        if kind == "User" and name == request.user:
            return True
        if kind == "Group" and name in request.groups:
            return True
        namespace = subject.get("namespace") or _meta(binding).get("namespace")
        if kind == "ServiceAccount" and request.user == f"system:serviceaccount:{namespace}:{name}":
            return True
    return False


def _any_rule(role: Json, request: Request) -> bool:
    return any(rule_matches(rule, request) for rule in role.get("rules") or ())


def rule_matches(rule: Json, request: Request) -> bool:
    """Whether one PolicyRule allows the request."""
    verbs, groups = rule.get("verbs") or (), rule.get("apiGroups") or ()
    resources, names = rule.get("resources") or (), rule.get("resourceNames") or ()
    return (
        ("*" in verbs or request.verb in verbs)
        and ("*" in groups or request.group in groups)
        and any(_resource_matches(r, request.resource, request.subresource) for r in resources)
        and (not names or request.name in names)
    )


def _resource_matches(rule_resource: str, resource: str, subresource: str) -> bool:
    if rule_resource == "*":
        return True
    if not subresource:
        return rule_resource == resource
    return rule_resource in {f"{resource}/{subresource}", f"{resource}/*", f"*/{subresource}"}
