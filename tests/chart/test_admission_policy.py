"""The chart's ValidatingAdmissionPolicy binding decision annotations to the requesting user
(issue 13). The Kubernetes API emulator has no admission, so its CEL expressions, read from
the rendered chart, are evaluated here with the `cel` library (the CEL spec the API server
implements) against admission requests: `variables` first, then each validation."""

from __future__ import annotations

from typing import Any

import cel
import pytest

from .render import of_kind, one, render

USER = {"username": "alice", "groups": ["system:authenticated", "finance"]}


def _policy() -> dict[str, Any]:
    return one(render(), "ValidatingAdmissionPolicy")


def admit(old: dict[str, str] | None, new: dict[str, str] | None, user: dict[str, Any] = USER) -> list[str]:
    """The messages of the validations a request fails (empty: admitted). `old` None is a
    CREATE; a None annotation map is an object without `metadata.annotations`."""

    def wfr(annotations: dict[str, str] | None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": "payout", "namespace": "team-a"}
        if annotations is not None:
            meta["annotations"] = annotations
        return {"apiVersion": "cadenza.dev/v1alpha1", "kind": "WorkflowRun", "metadata": meta}

    spec = _policy()["spec"]
    context: dict[str, Any] = {
        "object": wfr(new),
        "oldObject": None if old is None else wfr(old),
        "request": {"operation": "CREATE" if old is None else "UPDATE", "userInfo": user},
    }
    variables: dict[str, Any] = {}
    for variable in spec["variables"]:
        variables[variable["name"]] = cel.evaluate(
            variable["expression"], {**context, "variables": variables}
        )
    context["variables"] = variables
    failed = []
    for validation in spec["validations"]:
        if cel.evaluate(validation["expression"], context) is not True:
            failed.append(str(cel.evaluate(validation["messageExpression"], context)))
    return failed


def test_the_policy_is_bound_and_denies() -> None:
    objects = render()
    policy = _policy()
    binding = one(objects, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    assert policy["spec"]["failurePolicy"] == "Fail"
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["workflowruns"] and rule["operations"] == ["CREATE", "UPDATE"]
    off = render({"admissionPolicy": {"enabled": False}})
    assert not of_kind(off, "ValidatingAdmissionPolicy") and not of_kind(
        off, "ValidatingAdmissionPolicyBinding"
    )


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ({}, {"cadenza.dev/approve": "gate", "cadenza.dev/approved-by": "alice"}),
        (None, {"cadenza.dev/reject": "gate", "cadenza.dev/approved-by": "alice"}),  # created with it
        (
            {"cadenza.dev/approved-by": "alice"},
            {"cadenza.dev/approved-by": "alice", "cadenza.dev/resume": "tokens=9"},
        ),
        (
            {},
            {
                "cadenza.dev/approve": "gate",
                "cadenza.dev/approved-by": "alice",
                "cadenza.dev/approved-by-group": "finance",
            },
        ),
        # Unrelated annotations, the operator's run-id among them, are none of its business.
        (None, None),
        ({}, {"cadenza.dev/run-id": "payout-1a2b3c4d5e", "note": "x"}),
        (
            {"cadenza.dev/approve": "gate", "cadenza.dev/approved-by": "bob"},
            {"cadenza.dev/approve": "gate", "cadenza.dev/approved-by": "bob", "cadenza.dev/comment": "later"},
        ),
    ],
)
def test_a_decision_in_ones_own_name_or_no_decision_is_admitted(
    old: dict[str, str] | None, new: dict[str, str] | None
) -> None:
    assert admit(old, new) == []


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        # Someone else's name.
        ({}, {"cadenza.dev/approve": "gate", "cadenza.dev/approved-by": "bob"}, "your own user name, alice"),
        (
            None,
            {"cadenza.dev/approve": "gate", "cadenza.dev/approved-by": "bob"},
            "your own user name, alice",
        ),
        # No name: the decision would go out as someone's, unverified.
        ({}, {"cadenza.dev/approve": "gate"}, "your own user name"),
        # Riding on bob's earlier approved-by: a new decision needs one's own.
        (
            {"cadenza.dev/approve": "a", "cadenza.dev/approved-by": "bob"},
            {"cadenza.dev/approve": "a,b", "cadenza.dev/approved-by": "bob"},
            "your own user name",
        ),
        # Taking back someone else's decision is a change too.
        (
            {"cadenza.dev/reject": "gate", "cadenza.dev/approved-by": "bob"},
            {"cadenza.dev/approved-by": "bob"},
            "own",
        ),
        # A group one is not in.
        (
            {},
            {
                "cadenza.dev/approve": "gate",
                "cadenza.dev/approved-by": "alice",
                "cadenza.dev/approved-by-group": "admins",
            },
            "admins is not one of your groups",
        ),
    ],
)
def test_a_decision_in_another_name_or_group_is_refused(
    old: dict[str, str] | None, new: dict[str, str], message: str
) -> None:
    failed = admit(old, new)
    assert failed and message in " ".join(failed), failed


def test_a_user_without_groups_cannot_claim_one() -> None:
    new = {
        "cadenza.dev/approve": "gate",
        "cadenza.dev/approved-by": "alice",
        "cadenza.dev/approved-by-group": "finance",
    }
    assert admit({}, new, {"username": "alice"}) == [
        "metadata.annotations[cadenza.dev/approved-by-group]: finance is not one of your groups"
    ]
