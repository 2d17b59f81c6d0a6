"""What agents may know of a run: a small status the engine writes when it changes.

Agents no longer read run records (the runs bucket holds every run's inputs, outputs and
outbox; an agent credential cannot read it). Two checks of theirs need a little of the
record: whether a redelivered or long-queued task's run has ended (`cadenza._agent.
abandoned`; whether its attempt finished or was given up is its claim's to say,
`cadenza._claims`), and whether a model call is within the run's budget
(`cadenza._budget`). This is that little, in the record's own shape so both read it as
they read the record: the phase, why the run is ending, a pause's reason, the usage
totals and the budgets a resume raised, with per step only what a budget needs.

The engine writes it to `cadenza_run_status` under `<namespace>.<run>` (an agent's
credential reads its namespace's) after the record commits and before the decision's
tasks go out, so a task never finds a status older than its dispatch. Only runs with a
budget have one (`has_budget`): for the others there is nothing a model call must be
refused for, and whether an attempt may start is its claim's to say.
"""

from __future__ import annotations

from typing import Any

from .definition import CompiledWorkflow
from .state import RunState


def has_budget(wf: CompiledWorkflow) -> bool:
    """Whether the workflow caps usage (the run, a step, or onExit): its runs have a status."""
    steps = [*wf.steps.values(), *([wf.on_exit] if wf.on_exit is not None else [])]
    return wf.budget is not None or any(step.budget is not None for step in steps)


def run_status(state: RunState) -> dict[str, Any]:
    """The status of the run `state` (see the module docstring)."""
    status: dict[str, Any] = {"phase": str(state.phase)}
    if state.failing:
        status["failing"] = state.failing
    if str(state.phase) == "Paused" and state.message:
        status["message"] = state.message
    if state.usage is not None:
        status["usage"] = state.usage.model_dump(exclude_none=True)
    if state.budget is not None:
        status["budget"] = state.budget.model_dump(exclude_none=True)
    steps: dict[str, Any] = {}
    for name, st in state.steps.items():
        if st.usage is None and st.budget is None:
            continue
        entry: dict[str, Any] = {}
        if st.usage is not None:
            entry["usage"] = st.usage.model_dump(exclude_none=True)
        if st.budget is not None:
            entry["budget"] = st.budget.model_dump(exclude_none=True)
        last = st.attempts[-1] if st.attempts else None
        if last is not None and last.usage is not None:  # what the attempt's own check has counted
            entry["attempts"] = [{"n": last.n, "usage": last.usage.model_dump(exclude_none=True)}]
        steps[name] = entry
    if steps:
        status["steps"] = steps
    return status
