"""One view of a run (engine/view.py), read by WorkflowRun status, `--output json`, the
CLI table and `cadenza dev`'s transition log: over every state random runs go through
(the Driver and the random world of test_decide_properties), the status is what the
WorkflowRunStatus model and the CRD schema accept, and the JSON document and the status
agree on what they both say."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml
from cadenza_operator.engine.decide import Decision
from cadenza_operator.engine.state import TERMINAL_STEP, ForEachState, RunState, Slot, StepState
from cadenza_operator.engine.view import run_view, transitions
from cadenza_operator.kube.status import MAX_STEPS_LISTED, run_status
from cadenza_operator.local.runner import summarize
from cadenza_operator.models import WorkflowRunStatus
from hypothesis import given, settings
from hypothesis import strategies as st

from .helpers import compile_spec
from .test_decide_properties import PROFILE, CheckedDriver, World, workflows

CRD = Path(__file__).parents[2] / "crds" / "cadenza.dev_workflowruns.yaml"


def _json_schema(node: Any) -> Any:
    """The CRD's OpenAPI schema as JSON Schema (`nullable` becomes a null type)."""
    if isinstance(node, list):
        return [_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


STATUS_SCHEMA = jsonschema.Draft7Validator(
    _json_schema(
        yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
            "status"
        ]
    )
)


def check_view(state: RunState) -> None:
    status = run_status(state)
    # What the model makes of it is what was written: nothing coerced, nothing dropped.
    model = WorkflowRunStatus.model_validate(status)
    assert model.model_dump(exclude_unset=True) == status
    STATUS_SCHEMA.validate(status)

    doc = summarize(state)
    assert doc["phase"] == status["phase"] == state.phase
    assert doc["run"] == status["runId"]
    assert list(doc["steps"]) == list(state.steps)
    for name, summary in status["steps"].items():
        entry = doc["steps"][name]
        assert entry["phase"] == summary["phase"], name
        assert entry["attempts"] == summary["attempts"], name
        if "items" in entry:
            for outcome in ("Succeeded", "Failed"):
                assert entry["items"].get(outcome, 0) == summary["items"].get(outcome, 0), name
            assert entry["items"]["total"] == summary["items"]["total"], name
            assert entry.get("failedItems") == summary.get("failedItems"), name
        else:
            assert "items" not in summary, name
        assert ("timing" in entry) == ("waiting" in summary), name
    if len(state.steps) <= MAX_STEPS_LISTED:
        assert list(status["steps"]) == list(state.steps)
    finished = sum(1 for s in doc["steps"].values() if s["phase"] in TERMINAL_STEP)
    assert status["progress"] == (f"{finished}/{len(state.steps)}" if state.steps else "")


class ViewedDriver(CheckedDriver):
    """Checks the view of every state a decision writes."""

    def send(self, event: dict[str, Any], at: float | None = None) -> Decision:
        decision = super().send(event, at)
        if decision.changed:
            check_view(decision.state)
        return decision


@settings(PROFILE, max_examples=max(1, PROFILE.max_examples // 3))
@given(workflows(), st.data())
def test_status_validates_and_agrees_with_the_json_document_in_every_state(
    case: tuple[dict[str, Any], dict[str, Any]], data: st.DataObject
) -> None:
    spec, run_input = case
    d = ViewedDriver(compile_spec(spec), input=run_input)
    check_view(d.state)
    d.start()
    World(d, data).play()
    check_view(d.state)


def _run(**kw: Any) -> RunState:
    return RunState(**{"run": "r-1", "workflow": "w", "definition": "d", "createdAt": 1.0, **kw})


def test_queued_is_dispatched_and_not_started_by_an_agent() -> None:
    fe = ForEachState(
        total=5,
        counts={"Succeeded": 1},
        running={
            "1": Slot(attempt=1, running=True, queuedAt=2.0),  # in the agent's queue
            "2": Slot(attempt=1, running=True, queuedAt=2.0, startedAt=3.0),  # executing
            "3": Slot(attempt=1, running=False, retryAt=9.0),  # waiting for its retry
        },
        retries=1,
    )
    view = run_view(
        _run(
            phase="Running",
            steps={
                "fan": StepState(phase="Running", forEach=fe),
                "one": StepState(phase="Running", attempt=1, running=True, queuedAt=2.0),
                "two": StepState(phase="Running", attempt=2, running=True, queuedAt=2.0, startedAt=4.0),
            },
        )
    )
    fan = view.steps["fan"]
    assert (fan.dispatched, fan.queued, fan.attempts) == (2, 1, 2)
    assert fan.items is not None and (fan.items.in_flight, fan.items.done, fan.items.pending) == (3, 1, 1)
    assert (view.steps["one"].dispatched, view.steps["one"].queued) == (1, 1)
    assert (view.steps["two"].dispatched, view.steps["two"].queued) == (1, 0)


def test_transitions_between_two_views() -> None:
    first = run_view(_run(phase="Running", steps={"a": StepState(phase="Running"), "b": StepState()}))
    assert [(t.step, t.before, t.after) for t in transitions({}, first)] == [
        ("", None, "Running"),
        ("a", None, "Running"),
        ("b", None, "Pending"),
    ]
    second = run_view(
        _run(phase="Failed", steps={"a": StepState(phase="Failed"), "b": StepState(phase="Pending")})
    )
    assert [(t.step, t.before, t.after) for t in transitions(first.phases(), second)] == [
        ("", "Running", "Failed"),
        ("a", "Running", "Failed"),
    ]
    assert transitions(second.phases(), second) == []
