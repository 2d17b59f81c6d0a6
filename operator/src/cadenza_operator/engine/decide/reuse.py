"""A retry's start (`cadenza retry`): the steps the retried run finished well are taken as
they are, the others run again.

The start event names the retried run (`retryOf`) and carries, per reused step, its
output or the reference to where the retried run stored it (a forEach's items, a large
output): nothing large is copied, the new run reads the same keys. Each reused step is
Succeeded from the start, with one audit record saying where it came from, so the graph
starts exactly the steps downstream of what is re-run.
"""

from __future__ import annotations

from typing import Any

from cadenza.protocol import StartEvent, StepPhase

from ..definition import CompiledWorkflow
from ..state import ForEachState, RunState
from .context import Decider, whole


def reused_steps(state: RunState, wf: CompiledWorkflow, from_step: str | None = None) -> list[str]:
    """The steps of a finished run a retry takes as they are: those that Succeeded, unless
    they depend (directly or not) on one that did not, or on `from_step`. A step's fallback
    counts as depending on it: it is called in by its failure, which may not happen again."""
    downstream: dict[str, set[str]] = {name: set() for name in wf.order}
    for name in wf.order:
        cs = wf.steps[name]
        for dep in cs.deps:
            downstream.setdefault(dep, set()).add(name)
        if cs.on_failure not in ("fail", "continue"):
            downstream.setdefault(name, set()).add(cs.on_failure)
    again = {
        name
        for name in wf.order
        if (st := state.steps.get(name)) is None or st.phase != StepPhase.SUCCEEDED or name == from_step
    }
    todo = list(again)
    while todo:
        for later in downstream.get(todo.pop(), ()):
            if later not in again:
                again.add(later)
                todo.append(later)
    return [name for name in wf.order if name not in again]


def reuse_steps(d: Decider, ev: StartEvent) -> None:
    if not ev.retryOf:
        return
    d.s.retryOf = ev.retryOf
    d.audit(None, None, None, f"retry of run {ev.retryOf}", retryOf=ev.retryOf)
    for name, reused in (ev.reuse or {}).items():
        if name not in d.wf.steps or not isinstance(reused, dict):
            continue  # not a step of this definition: nothing to take
        take(d, name, reused, ev.retryOf)


def take(d: Decider, name: str, reused: dict[str, Any], source: str) -> None:
    st = d.st(name)
    ref = reused.get("outputRef")
    if isinstance(ref, str) and ref:
        st.outputRef = ref
        items = reused.get("items")
        if whole(items, 0):
            # A forEach's output is its items' outputs under `<ref>.<i>`: the count says how many.
            st.forEach = ForEachState(total=items, next=items, counts={"Succeeded": items} if items else {})
    else:
        st.output = reused.get("output")
    st.startedAt = d.now
    message = f"reused from {source}"
    st.message = message
    d.set_phase(name, StepPhase.SUCCEEDED, message, reusedFrom=source)
