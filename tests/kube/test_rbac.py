"""The emulator's RBAC evaluation (rbac.py): each rule field and binding kind decides, and
nothing is allowed that no rule grants; SubjectAccessReviews over HTTP get that answer."""

from __future__ import annotations

from typing import Any

import kmock
import pytest
from cadenza_operator.kube.api import ApiError, KubeApi

from .emulator import KubeEmulator
from .rbac import Policy, Request, rule_matches

RUNS = {"apiGroups": ["cadenza.dev"], "resources": ["workflowruns"], "verbs": ["get", "list"]}


def runs(verb: str = "get", **kw: Any) -> Request:
    return Request(
        **{"user": "alice", "verb": verb, "group": "cadenza.dev", "resource": "workflowruns", **kw}
    )


def role(name: str, namespace: str | None, *rules: dict[str, Any]) -> dict[str, Any]:
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    kind = "Role" if namespace else "ClusterRole"
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": meta,
        "rules": list(rules),
    }


def binding(
    name: str, namespace: str | None, ref_kind: str, ref: str, *subjects: dict[str, Any]
) -> dict[str, Any]:
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding" if namespace else "ClusterRoleBinding",
        "metadata": meta,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": ref_kind, "name": ref},
        "subjects": list(subjects),
    }


def user(name: str) -> dict[str, str]:
    return {"kind": "User", "name": name, "apiGroup": "rbac.authorization.k8s.io"}


def group(name: str) -> dict[str, str]:
    return {"kind": "Group", "name": name, "apiGroup": "rbac.authorization.k8s.io"}


@pytest.mark.parametrize(
    ("rule", "request_", "allowed"),
    [
        (RUNS, runs("get"), True),
        (RUNS, runs("update"), False),  # verb
        (RUNS, runs("get", group="apps"), False),  # apiGroup
        (RUNS, runs("get", resource="workflows"), False),  # resource
        (RUNS, runs("get", subresource="status"), False),  # a subresource is not the resource
        ({**RUNS, "verbs": ["*"]}, runs("delete"), True),
        ({**RUNS, "apiGroups": ["*"]}, runs("get", group="apps"), True),
        ({**RUNS, "resources": ["*"]}, runs("get", resource="agents"), True),
        ({**RUNS, "resources": ["workflowruns/status"]}, runs("get", subresource="status"), True),
        ({**RUNS, "resources": ["workflowruns/*"]}, runs("get", subresource="status"), True),
        ({**RUNS, "resources": ["*/status"]}, runs("get", resource="agents", subresource="status"), True),
        ({**RUNS, "resources": ["workflowruns/status"]}, runs("get"), False),
        ({**RUNS, "resourceNames": ["r1"]}, runs("get", name="r1"), True),
        ({**RUNS, "resourceNames": ["r1"]}, runs("get", name="r2"), False),
        ({**RUNS, "resourceNames": ["r1"]}, runs("list"), False),  # a named rule never allows a list
        ({"nonResourceURLs": ["/healthz"], "verbs": ["get"]}, runs("get"), False),
    ],
)
def test_a_rule_matches_on_every_field(rule: dict[str, Any], request_: Request, allowed: bool) -> None:
    assert rule_matches(rule, request_) is allowed


def team_policy() -> Policy:
    viewer = role("viewer", None, RUNS)
    return Policy(
        roles=[role("runs", "team-a", {**RUNS, "verbs": ["update"]}), role("runs", "team-b", RUNS)],
        cluster_roles=[viewer, role("admin", None, {**RUNS, "verbs": ["*"]})],
        role_bindings=[
            binding("alice-runs", "team-a", "Role", "runs", user("alice")),
            binding("alice-view", "team-a", "ClusterRole", "viewer", user("alice")),
            binding("ops-view", "team-b", "ClusterRole", "viewer", group("ops")),
            binding(
                "bot", "team-b", "Role", "runs", {"kind": "ServiceAccount", "name": "bot", "namespace": "ci"}
            ),
            binding("dangling", "team-c", "Role", "missing", user("alice")),
        ],
        cluster_role_bindings=[binding("root", None, "ClusterRole", "admin", group("admins"))],
    )


@pytest.mark.parametrize(
    ("request_", "allowed"),
    [
        (runs("get", namespace="team-a"), True),  # a RoleBinding to a ClusterRole, in its namespace
        (runs("update", namespace="team-a"), True),  # a RoleBinding to a Role of its namespace
        (runs("get", namespace="team-b"), False),  # alice has nothing in team-b
        (runs("get", namespace=""), False),  # a RoleBinding grants nothing across namespaces
        (runs("get", namespace="team-c"), False),  # a binding to a missing Role grants nothing
        (runs("get", namespace="team-b", user="bob", groups=("ops",)), True),  # by group
        (runs("update", namespace="team-b", user="bob", groups=("ops",)), False),
        (runs("get", namespace="team-b", user="bob", groups=("devs",)), False),
        (runs("get", namespace="team-b", user="system:serviceaccount:ci:bot"), True),
        (runs("get", namespace="team-b", user="system:serviceaccount:other:bot"), False),
        (runs("delete", namespace="anywhere", user="carol", groups=("admins",)), True),  # cluster-wide
        (runs("list", namespace="", user="carol", groups=("admins",)), True),
        (runs("get", namespace="team-a", user="admins"), False),  # a user named like a group is not in it
    ],
)
def test_bindings_grant_their_roles_where_they_apply(request_: Request, allowed: bool) -> None:
    assert team_policy().decide(request_)[0] is allowed


async def test_the_emulator_answers_subject_access_reviews_from_the_rbac_objects_it_holds(
    kube_emulator: KubeEmulator,
) -> None:
    for obj in (role("runs", "team-a", RUNS), binding("alice", "team-a", "Role", "runs", user("alice"))):
        resource = "roles" if obj["kind"] == "Role" else "rolebindings"
        kube_emulator.create_object(kmock.resource("rbac.authorization.k8s.io", "v1", resource), obj)
    api = KubeApi.for_server(str(kube_emulator.url).rstrip("/"))
    try:

        async def review(namespace: str, **spec: Any) -> Any:
            attrs = {
                "group": "cadenza.dev",
                "resource": "workflowruns",
                "verb": "get",
                "namespace": namespace,
            }
            body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview"}
            return await api.create(
                "/apis/authorization.k8s.io/v1/subjectaccessreviews",
                {**body, "spec": {"resourceAttributes": attrs, **spec}},
            )

        allowed = await review("team-a", user="alice", groups=["g"])
        assert allowed["status"]["allowed"] is True
        assert "RoleBinding" in allowed["status"]["reason"]
        assert (await review("team-b", user="alice"))["status"]["allowed"] is False
        assert (await review("team-a", user="bob"))["status"]["allowed"] is False
        assert [(r["user"], r.get("groups")) for r in kube_emulator.access_reviews] == [
            ("alice", ["g"]),
            ("alice", None),
            ("bob", None),
        ]
        with pytest.raises(ApiError) as bad:
            await api.create(
                "/apis/authorization.k8s.io/v1/subjectaccessreviews",
                {
                    "apiVersion": "authorization.k8s.io/v1",
                    "kind": "SubjectAccessReview",
                    "spec": {"user": "x"},
                },
            )
        assert bad.value.status == 400
    finally:
        await api.close()
