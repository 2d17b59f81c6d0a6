"""The graph: which step is ready, which is skipped, when a failure stops the run.

* A step is ready when each dependency is *satisfied*: Succeeded, Skipped, Failed with
  `onFailure: continue`, or Failed and recovered by its fallback step (the fallback
  satisfied in turn; a fallback that was skipped recovers nothing).
* Skip propagation: a step whose dependencies were all Skipped is Skipped too, unless it
  says `ifDependenciesSkipped: run`. A `when` that is false skips the step; a `when`
  that gives no bool, or fails to evaluate, fails it.
* A step whose dependency failed for good never runs: the run fails fast (lifecycle).
* A fallback step (named by some step's `onFailure`) runs only when that step fails.
"""

from __future__ import annotations

from typing import Any, Literal

from cadenza.protocol import RunPhase, StepPhase, TaskFailure
from cadenza.wire import dumps

from ...expressions import ExpressionError
from ..definition import CompiledStep
from ..state import ForEachState, Timer
from . import attempts, foreach, lifecycle
from .context import Decider

DepState = Literal["ok", "skipped", "wait", "blocked"]

MAX_APPROVAL_MESSAGE = 2000
"""Characters of a rendered approval message kept: it is stored in the record and the audit."""


def _clip_message(text: str) -> str:
    return text if len(text) <= MAX_APPROVAL_MESSAGE else text[: MAX_APPROVAL_MESSAGE - 1] + "…"


# ------------------------------------------------------------------ queries
def dep_state(d: Decider, dep: str) -> DepState:
    """What a step's outcome means to the steps that depend on it (reads only)."""
    st = d.st(dep)
    if st.phase == StepPhase.SUCCEEDED:
        return "ok"
    if st.phase == StepPhase.SKIPPED:
        return "skipped"
    if st.phase == StepPhase.FAILED:
        cs = d.step_def(dep)
        if cs.on_failure == "continue":
            return "ok"
        if cs.on_failure == "fail":
            return "blocked"
        fallback = dep_state(d, cs.on_failure)
        # A fallback that was skipped (its `when`) recovered nothing: the failure stands.
        return "blocked" if fallback == "skipped" else fallback
    if st.phase == StepPhase.CANCELLED:
        return "blocked"
    return "wait"


def active(d: Decider) -> bool:
    """Whether any step still runs, waits, or can still start."""
    for name, st in d.s.steps.items():
        if st.phase in (StepPhase.RUNNING, StepPhase.WAITING_APPROVAL):
            return True
        if st.phase == StepPhase.PENDING and not d.s.failing and name in d.wf.steps:
            cs = d.wf.steps[name]
            if name in d.wf.fallbacks and not st.activated:
                continue
            if "blocked" not in [dep_state(d, dep) for dep in cs.deps]:
                return True
    return False


def failure_message(d: Decider, name: str) -> str:
    """Why the run fails: the step, and each fallback in its chain that failed too."""
    message = f"step {name} failed: {d.st(name).message}"
    seen = {name}
    fallback = d.step_def(name).on_failure
    while fallback not in ("fail", "continue") and fallback not in seen:
        seen.add(fallback)
        st = d.st(fallback)
        if st.phase != StepPhase.FAILED:
            break
        message += f"; its fallback {fallback} failed too: {st.message}"
        fallback = d.step_def(fallback).on_failure
    return message


# ------------------------------------------------------------------ advance
def advance(d: Decider) -> None:
    """Start every step that became ready, skip what can no longer run, and stop the run
    when a failure stands; until nothing changes. Then the run may finish."""
    progress = True
    while progress and d.s.phase in (RunPhase.RUNNING, RunPhase.PAUSED):
        progress = False
        if not d.s.failing:
            for name in d.wf.order:
                st = d.st(name)
                if st.phase != StepPhase.PENDING:
                    continue
                cs = d.wf.steps[name]
                if name in d.wf.fallbacks and not st.activated:
                    continue
                states = [dep_state(d, dep) for dep in cs.deps]
                if "wait" in states or "blocked" in states:
                    continue
                if states and all(x == "skipped" for x in states) and cs.skipped_with_deps:
                    d.set_phase(name, StepPhase.SKIPPED, "all dependencies were skipped")
                else:
                    start_step(d, name)
                progress = True
            blocked = []
            for name in d.wf.order:
                if d.st(name).phase != StepPhase.FAILED:
                    continue
                outcome = dep_state(d, name)
                if outcome == "blocked":
                    blocked.append(name)
                elif outcome == "ok" and (fallback := d.step_def(name).on_failure) not in (
                    "fail",
                    "continue",
                ):
                    d.st(name).recoveredBy = fallback  # its fallback (chain) made up for it
            if blocked:
                lifecycle.wind_down(d, "failed", failure_message(d, blocked[0]))
                progress = True
        if not progress:
            lifecycle.maybe_finish(d)


def start_step(d: Decider, name: str) -> None:
    cs = d.wf.steps[name]
    st = d.st(name)
    env: dict[str, Any] | None = None
    if cs.when is not None:
        try:
            env = d.resolve_lazy(d.env(), cs.when.steps)
            go = cs.when.evaluate(env)
            if not isinstance(go, bool):
                raise ExpressionError(f"{cs.when.source!r} gave {type(go).__name__}, not a bool")
        except ExpressionError as exc:
            st.error = TaskFailure(type="ExpressionError", message=str(exc)).wire()
            fail_step(d, name, f"when: {exc}")
            return
        if not go:
            d.set_phase(name, StepPhase.SKIPPED, f"when {cs.when.source!r} is {str(go).lower()}")
            return
    st.phase = StepPhase.RUNNING
    st.startedAt = d.now
    if cs.kind == "approval":
        st.phase = StepPhase.WAITING_APPROVAL
        st.message = approval_message(d, cs)
        d.audit(name, StepPhase.PENDING, StepPhase.WAITING_APPROVAL, st.message)
        if cs.approval_timeout is not None:
            d.arm(f"approval:{name}", Timer(at=d.now + cs.approval_timeout, kind="approval", step=name))
        return
    d.audit(name, StepPhase.PENDING, StepPhase.RUNNING, "dependencies satisfied")
    if cs.kind == "signal":
        signal = cs.signal or ""
        if signal in d.s.signals:
            succeed_step(d, name, d.s.signals[signal], f"signal {signal} already received")
            return
        st.message = f"waiting for signal {signal}"
        if cs.signal_timeout is not None:
            d.arm(f"signal:{name}", Timer(at=d.now + cs.signal_timeout, kind="signal", step=name))
        return
    if cs.for_each is not None:
        try:
            items = foreach.foreach_items(d, name)
        except ExpressionError as exc:
            st.error = TaskFailure(type="ExpressionError", message=str(exc)).wire()
            fail_step(d, name, f"forEach: {exc}")
            return
        st.forEach = ForEachState(total=len(items))
        if not items:
            st.outputRef = f"{d.s.run}.{name}.*"
            d.set_phase(name, StepPhase.SUCCEEDED, "forEach over an empty list")
            return
        foreach.fill_window(d, name)
        return
    attempts.dispatch(d, name, None)


def approval_message(d: Decider, cs: CompiledStep) -> str:
    """What the approver is asked, its `${{ }}` rendered once, when the step starts waiting.

    A message that cannot be rendered (a key missing from this run's input) must not
    fail the run over a prompt: the approver sees the raw text and the error instead.
    """
    raw = (cs.approval.message if cs.approval else None) or "waiting for approval"
    template = cs.approval_message
    if template is None:
        return raw
    try:
        value = template.render(d.resolve_lazy(d.env(), template.steps))
    except ExpressionError as exc:
        return _clip_message(f"{raw} (message not rendered: {exc})")
    return _clip_message(value if isinstance(value, str) else dumps(value).decode())


# ------------------------------------------------------------- step outcomes
def fail_step(
    d: Decider,
    name: str,
    message: str,
    exhausted: bool = False,
    attempt: int | None = None,
    outcome: str | None = None,
) -> None:
    """A step failed for good; its fallback, if it names one, is called in. `attempt` and
    `outcome`: the attempt the engine ended (TimedOut), for the audit record."""
    st = d.st(name)
    st.message = message
    d.set_phase(
        name, StepPhase.FAILED, message, retriesExhausted=exhausted or None, attempt=attempt, outcome=outcome
    )
    cs = d.step_def(name)
    if cs.on_failure not in ("fail", "continue") and not d.s.failing:
        fallback = d.st(cs.on_failure)
        if not fallback.activated:
            fallback.activated = True
            d.audit(cs.on_failure, fallback.phase, fallback.phase, f"fallback for failed step {name}")


def succeed_step(d: Decider, name: str, output: Any, reason: str) -> None:
    st = d.st(name)
    st.output, st.outputRef = d.stored_apart(f"{d.s.run}.{name}", output)
    st.message = ""
    d.set_phase(name, StepPhase.SUCCEEDED, reason)
