"""forEach: items run up to `maxParallel` at once; the output is the ordered list of item
outputs; a failed item fails the step and cancels the items in flight. With
`onFailure: continue` every item runs, the step still ends Failed (its output holds null
for the failed items) and dependents go on.
"""

from __future__ import annotations

from typing import Any, cast

from cadenza.protocol import StepPhase

from ...expressions import ExpressionError
from ..state import MAX_FAILED_ITEMS, Slot
from . import attempts, graph
from .context import Decider, timer_id


def foreach_items(d: Decider, name: str) -> list[Any]:
    # What a forEach reads is final once the step starts, so its list is computed once
    # per engine and run, not once per item dispatched.
    key = f"{d.s.run}/{name}/items"
    if key in d.memo:
        return cast("list[Any]", d.memo[key])
    cs = d.step_def(name)
    assert cs.for_each is not None
    value = cs.for_each.evaluate(d.resolve_lazy(d.env(), cs.for_each.steps))
    if not isinstance(value, list):
        raise ExpressionError(f"forEach {cs.for_each.source!r} gave {type(value).__name__}, not a list")
    d.memo[key] = value
    return value


def fill_window(d: Decider, name: str) -> None:
    cs = d.step_def(name)
    fe = d.st(name).forEach
    assert fe is not None
    if d.s.failing:
        return
    while len(fe.running) < cs.window and fe.next < fe.total:
        index = fe.next
        fe.next += 1
        fe.running[str(index)] = Slot()
        attempts.dispatch(d, name, index)


def item_done(
    d: Decider, name: str, item: int, output: Any, *, failed: bool, error: dict[str, Any] | None = None
) -> None:
    st = d.st(name)
    fe = st.forEach
    assert fe is not None
    fe.running.pop(str(item), None)
    outcome = "Failed" if failed else "Succeeded"
    fe.counts[outcome] = fe.counts.get(outcome, 0) + 1
    d.decision.stores[f"{d.s.run}.{name}.{item}"] = output
    d.changed()
    if failed:
        if len(fe.failed) < MAX_FAILED_ITEMS:
            fe.failed.append(item)
        st.error = {**(error or {}), "item": item}
        d.audit(
            name,
            StepPhase.RUNNING,
            StepPhase.RUNNING,
            f"item {item} failed: {(error or {}).get('message')}",
            item=item,
        )
        if d.step_def(name).on_failure != "continue":
            message = f"item {item} failed: {(error or {}).get('type')}: {(error or {}).get('message')}"
            cancel_items(d, name, message)
            graph.fail_step(d, name, message, exhausted=bool((error or {}).get("retriesExhausted")))
            return
    fill_window(d, name)
    if not fe.running and fe.next >= fe.total:
        st.outputRef = f"{d.s.run}.{name}.*"
        n_failed = fe.counts.get("Failed", 0)
        if n_failed:
            st.message = f"{n_failed} of {fe.total} items failed"
            d.set_phase(name, StepPhase.FAILED, st.message)
        else:
            d.set_phase(name, StepPhase.SUCCEEDED, f"{fe.total} items succeeded")


def cancel_items(d: Decider, name: str, reason: str) -> None:
    """Stop a forEach step's items in flight (tasks, or child runs) and their timers."""
    st = d.st(name)
    if st.forEach is None:
        return
    is_workflow = d.step_def(name).kind == "workflow"
    for key, slot in list(st.forEach.running.items()):
        if is_workflow and slot.running:  # items of a sub-workflow step are child runs
            d.cancel_child(d.child_id(name, int(key), slot.attempt), reason)
        if slot.running:
            attempts.item_attempt_ended(
                d, name, int(key), slot, "Cancelled", started=slot.startedAt, finished=d.now
            )
        d.disarm_slot(name, int(key), slot.attempt)
        d.disarm(timer_id("retry", name, int(key), slot.attempt + 1))
    st.forEach.running.clear()
    d.cancel_tasks(step=name)
