"""Which steps a retry takes as they are (`reused_steps`, pure), what decide makes of a
retry's start, and the run tree's text (user data never read as markup)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from cadenza_operator.engine.decide import decide
from cadenza_operator.engine.decide.reuse import reused_steps
from cadenza_operator.engine.state import RunState
from cadenza_operator.engine.view import run_view
from cadenza_operator.observe.listing import parse_since
from cadenza_operator.observe.terminal import show
from cadenza_operator.observe.tree import run_tree
from hypothesis import given, settings
from hypothesis import strategies as st

from .helpers import agent_step, compile_spec

PHASES = ["Succeeded", "Failed", "Cancelled", "Skipped", "Pending"]


def finished(wf: Any, phases: dict[str, str]) -> RunState:
    return RunState.model_validate(
        {
            "run": "old",
            "workflow": wf.name,
            "definition": wf.key,
            "phase": "Failed",
            "createdAt": 1.0,
            "steps": {n: {"phase": p, "output": {"n": n}} for n, p in phases.items()},
        }
    )


@st.composite
def graphs(draw: Any) -> tuple[Any, dict[str, str], str | None]:
    n = draw(st.integers(1, 8))
    steps = []
    for i in range(n):
        deps = draw(st.lists(st.integers(0, i - 1), unique=True, max_size=3)) if i else []
        steps.append(agent_step(f"s{i}", dependsOn=[f"s{d}" for d in deps]))
    wf = compile_spec({"steps": steps})
    phases = {f"s{i}": draw(st.sampled_from(PHASES)) for i in range(n)}
    start = draw(st.none() | st.sampled_from([f"s{i}" for i in range(n)]))
    return wf, phases, start


@settings(max_examples=300, deadline=None)
@given(graphs())
def test_a_retry_reuses_exactly_the_succeeded_steps_upstream_of_nothing_rerun(
    case: tuple[Any, dict[str, str], str | None],
) -> None:
    wf, phases, start = case
    reused = set(reused_steps(finished(wf, phases), wf, start))
    for name in wf.order:
        deps = wf.steps[name].deps
        should = phases[name] == "Succeeded" and name != start and all(d in reused for d in deps)
        assert (name in reused) == should, (name, phases, start, reused)


def test_a_fallback_runs_again_with_the_step_it_stands_in_for() -> None:
    wf = compile_spec(
        {
            "steps": [
                agent_step("a", onFailure="planB"),
                agent_step("planB"),
                agent_step("after", dependsOn=["a"]),
            ]
        }
    )
    state = finished(wf, {"a": "Failed", "planB": "Succeeded", "after": "Succeeded"})
    assert reused_steps(state, wf) == []


def test_decide_marks_reused_steps_and_starts_only_the_rest() -> None:
    wf = compile_spec(
        {
            "steps": [
                agent_step("fan", forEach="input.items"),
                agent_step("join", dependsOn=["fan"], input={"n": "${{ size(steps.fan.output) }}"}),
            ]
        }
    )
    fresh = RunState(run="new", workflow=wf.name, definition=wf.key, createdAt=5.0)
    start = {
        "type": "start",
        "run": "new",
        "at": 5.0,
        "by": "ada",
        "retryOf": "old",
        "reuse": {"fan": {"outputRef": "old.fan.*", "items": 3}},
    }
    outputs = {f"old.fan.{i}": {"i": i} for i in range(3)}
    d = decide(fresh, start, wf, outputs)
    fan, join = d.state.steps["fan"], d.state.steps["join"]
    assert d.state.retryOf == "old"
    assert fan.phase == "Succeeded" and fan.message == "reused from old" and fan.outputRef == "old.fan.*"
    assert join.phase == "Running"
    dispatched = [c.wire() for c in d.commands if c.wire().get("op") == "dispatch"]
    assert [c["body"]["step"] for c in dispatched] == ["join"]  # no item of fan again
    assert dispatched[0]["body"]["input"] == {"n": 3}
    records = [(r["step"], r["to"], r["actor"], r.get("reusedFrom")) for r in d.audit]
    assert ("fan", "Succeeded", "ada", "old") in records


def test_the_tree_prints_user_text_as_written_and_unwrapped() -> None:
    loud = "[red]boom[/red] [bold]" + "x" * 300
    state = RunState.model_validate(
        {
            "run": "r-1",
            "workflow": "w",
            "definition": "w-1",
            "phase": "Failed",
            "createdAt": 1.0,
            "message": loud,
            "steps": {"a": {"phase": "Failed", "message": loud, "error": {"type": "Boom", "message": loud}}},
        }
    )
    out = io.StringIO()
    show(run_tree(run_view(state), now=2.0), file=out)
    lines = out.getvalue().splitlines()
    shown = [line for line in lines if "boom" in line]
    assert len(shown) == 3 and all(loud in line for line in shown), lines  # run, step, error
    assert all(line == line.rstrip() for line in lines)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("1h", 3600), ("2d", 172800), ("30", 30)]
)
def test_since_durations(text: str, seconds: float) -> None:
    assert parse_since(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-1h", "0", "h", "nan", "inf"])
def test_since_refuses_what_is_no_duration(text: str) -> None:
    with pytest.raises(ValueError, match="--since"):
        parse_since(text)
