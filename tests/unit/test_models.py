"""The resource schema: durations, strict fields, unique step names."""

from __future__ import annotations

import pytest
from cadenza_operator.models import Agent, Step, Workflow, WorkflowSpec, parse_duration
from pydantic import ValidationError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("0s", 0.0),
        ("2m30s500ms", 150.5),
    ],
)
def test_durations_parse_to_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "30", "s", "-1s", "1 s", "1sec", "1.s", "5sm", "1w", "1h 30m"])
def test_malformed_durations_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_a_malformed_duration_in_a_spec_names_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        Step.model_validate({"name": "a", "agent": "x", "timeout": "ten seconds"})
    assert info.value.errors()[0]["loc"] == ("timeout",)


def test_unknown_fields_are_rejected_at_every_level() -> None:
    with pytest.raises(ValidationError) as info:
        WorkflowSpec.model_validate({"steps": [{"name": "a", "agent": "x", "dependson": []}]})
    err = info.value.errors()[0]
    assert err["type"] == "extra_forbidden"
    assert err["loc"] == ("steps", 0, "dependson")
    with pytest.raises(ValidationError):
        WorkflowSpec.model_validate(
            {"steps": [{"name": "a", "agent": "x", "retry": {"limit": 1, "tries": 2}}]}
        )
    with pytest.raises(ValidationError):
        WorkflowSpec.model_validate({"steps": [{"name": "a", "agent": "x"}], "outputs": {}})
    with pytest.raises(ValidationError):
        Agent.model_validate({"metadata": {"name": "a"}, "spec": {"image": "x", "replica": 2}})


def test_duplicate_step_names_are_rejected_with_their_index() -> None:
    spec = {"steps": [{"name": "a", "agent": "x"}, {"name": "b", "agent": "x"}, {"name": "a", "agent": "y"}]}
    with pytest.raises(ValidationError, match=r"duplicate step name 'a' at steps\[2\]"):
        WorkflowSpec.model_validate(spec)


@pytest.mark.parametrize("name", ["Upper", "1st", "with-dash", "", "_x"])
def test_step_names_must_be_usable_in_expressions(name: str) -> None:
    with pytest.raises(ValidationError):
        Step.model_validate({"name": name, "agent": "x"})


def test_a_workflow_needs_at_least_one_step() -> None:
    with pytest.raises(ValidationError):
        WorkflowSpec.model_validate({"steps": []})


def test_step_kinds_and_defaults() -> None:
    spec = WorkflowSpec.model_validate(
        {
            "steps": [
                {"name": "a", "agent": "x"},
                {"name": "b", "workflow": "child"},
                {"name": "c", "approval": {"timeout": "1h"}},
                {"name": "d", "waitFor": {"signal": "go"}},
            ]
        }
    )
    assert [s.kind for s in spec.steps] == ["agent", "workflow", "approval", "signal"]
    a = spec.steps[0]
    assert (a.onFailure, a.ifDependenciesSkipped, a.dependsOn) == ("fail", "skip", [])
    approval = spec.steps[2].approval
    assert approval is not None
    assert (approval.onTimeout, approval.approvers) == ("reject", [])


@pytest.mark.parametrize(
    "retry",
    [
        {"limit": -1},
        {"limit": 1, "backoff": {"factor": 0.5}},
        {"limit": 1, "backoff": {"jitter": 1.5}},
        {"limit": 1, "backoff": {"initial": "soon"}},
    ],
)
def test_retry_policies_are_bounded(retry: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Step.model_validate({"name": "a", "agent": "x", "retry": retry})


def test_a_full_workflow_resource_round_trips() -> None:
    doc = {
        "apiVersion": "cadenza.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "triage"},
        "spec": {
            "steps": [{"name": "a", "agent": "x", "retry": {"limit": 3, "backoff": {"initial": "1s"}}}],
            "deadline": "1h",
            "onExit": {"agent": "notify"},
        },
    }
    wf = Workflow.model_validate(doc)
    assert wf.spec.onExit is not None and wf.spec.onExit.name == "onExit"
    assert Workflow.model_validate(wf.model_dump(mode="json")) == wf
    with pytest.raises(ValidationError):
        Workflow.model_validate({**doc, "kind": "Agent"})
