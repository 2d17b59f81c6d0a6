"""The run page's pictures, pure: the DAG's columns and rows, and the timeline's split of
each attempt into waiting and executing."""

from __future__ import annotations

from typing import Any

from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.engine.state import Attempt, ForEachState, RunState, StepState
from cadenza_operator.engine.view import run_view
from cadenza_operator.models import WorkflowSpec
from cadenza_operator.observe.web import layout


def workflow(steps: list[dict[str, Any]], on_exit: dict[str, Any] | None = None) -> Any:
    spec: dict[str, Any] = {"steps": steps}
    if on_exit:
        spec["onExit"] = on_exit
    return compile_workflow("w", WorkflowSpec.model_validate(spec), "ns")


def state(steps: dict[str, StepState], created: float = 100.0) -> RunState:
    return RunState(run="r", namespace="ns", workflow="w", definition="k", createdAt=created, steps=steps)


def test_columns_follow_the_longest_chain_fallbacks_and_on_exit_come_after() -> None:
    wf = workflow(
        [
            {"name": "a", "agent": "x"},
            {"name": "b", "agent": "x", "dependsOn": ["a"], "onFailure": "rescue"},
            {"name": "c", "agent": "x", "dependsOn": ["a", "b"]},
            {"name": "d", "agent": "x"},
            {"name": "rescue", "agent": "x"},
            {"name": "ok", "approval": {}},
        ],
        on_exit={"name": "bye", "agent": "x"},
    )
    g = layout.dag(wf, None)
    by = {n.name: n for n in g.nodes}
    col = {name: round((n.x - layout.PAD) / (layout.NODE_W + layout.COL_GAP)) for name, n in by.items()}
    assert col == {"a": 0, "d": 0, "ok": 0, "b": 1, "c": 2, "rescue": 2, "bye": 3}
    assert by["rescue"].role == "fallback" and by["bye"].role == "exit" and by["a"].role == "step"
    assert by["ok"].kind == "approval" and by["a"].kind == "agent"
    roles = {(e.source, e.target): e.role for e in g.edges}
    assert roles[("a", "b")] == roles[("b", "c")] == roles[("a", "c")] == "dep"
    assert roles[("b", "rescue")] == "fallback"
    # onExit follows the steps nothing depends on (the fallback stands apart).
    assert {s for (s, t), r in roles.items() if r == "exit"} == {"c", "d", "ok"}
    # No two nodes overlap.
    boxes = {(n.x, n.y) for n in g.nodes}
    assert len(boxes) == len(g.nodes)
    assert all(n.x + layout.NODE_W <= g.width and n.y + layout.NODE_H <= g.height for n in g.nodes)


def test_a_node_shows_its_phase_foreach_counts_and_retries() -> None:
    wf = workflow(
        [{"name": "each", "agent": "x", "forEach": "[1, 2, 3]"}, {"name": "flaky", "agent": "x"}],
    )
    st = state(
        {
            "each": StepState(phase="Running", forEach=ForEachState(total=100, counts={"Succeeded": 37})),
            "flaky": StepState(phase="Running", attempt=2),
        }
    )
    by = {n.name: n for n in layout.dag(wf, run_view(st)).nodes}
    assert (by["each"].phase, by["each"].detail) == ("Running", "37/100")
    assert by["flaky"].detail == "try 2"
    long = workflow([{"name": "x" * 40, "agent": "x"}])
    (node,) = layout.dag(long, None).nodes
    assert node.label.endswith("…") and len(node.label) == layout.MAX_LABEL and node.phase == "Pending"


def test_each_attempt_is_split_into_waiting_and_executing() -> None:
    st = state(
        {
            "s": StepState(
                phase="Succeeded",
                attempts=[
                    Attempt(n=1, readyAt=100, queuedAt=101, startedAt=104, finishedAt=105, outcome="Failed"),
                    Attempt(
                        n=2, readyAt=106, queuedAt=106, startedAt=106, finishedAt=110, outcome="Succeeded"
                    ),
                ],
            ),
            "never": StepState(
                phase="Failed", attempts=[Attempt(n=1, queuedAt=102, finishedAt=108, outcome="TimedOut")]
            ),
        }
    )
    view = run_view(st.model_copy(update={"phase": "Succeeded", "finishedAt": 110.0}))
    t = layout.timeline(view, now=500.0)  # a finished run's axis ends with it, not now
    scale = layout.CHART_W / 10.0
    first, never, second = t.bars
    assert (first.step, first.attempt, never.step, second.attempt) == ("s", 1, "never", 2)
    assert first.wait_w == 4 * scale and first.exec_w == 1 * scale
    assert first.exec_x == first.wait_x + first.wait_w
    assert never.exec_w == 0 and never.wait_w == 6 * scale  # never started: it only waited
    assert second.wait_w == 0 and second.exec_w == 4 * scale
    assert "waiting 4.0s, executing 1.0s" in first.title


def test_the_timeline_is_bounded() -> None:
    many = {
        f"s{i}": StepState(
            phase="Succeeded",
            attempts=[
                Attempt(n=n, queuedAt=100 + i, startedAt=101 + i, finishedAt=102 + i) for n in range(1, 21)
            ],
        )
        for i in range(50)
    }
    t = layout.timeline(run_view(state(many)), now=200.0)
    assert len(t.bars) == layout.MAX_BARS and t.omitted == 50 * 20 - layout.MAX_BARS
