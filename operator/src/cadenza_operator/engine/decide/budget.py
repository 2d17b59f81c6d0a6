"""Model usage and budgets: what agents recorded, and what it stops.

A `usage` event adds to the attempt, its step and the run, once (its id is remembered in
a bounded list, so an engine's redelivery is not counted again). It is counted whether
or not its attempt is still current: the call was made and paid for.

The budget is checked before an attempt is dispatched (`held`), never in between: an
attempt running when the budget is reached finishes, and its usage still counts. A run
whose budget (or a step's) is reached goes to `Paused` (`onExceeded: pause`): the attempt
is held, not sent, and so is every attempt that comes due while paused (retries,
forEach items, steps made ready). Timers keep their meaning: a timeout still fails an
attempt, the deadline still winds the run down. `resume` raises the budget that held it
and sends what was held. `onExceeded: fail` winds the run down instead. onExit is never
held: it runs while the run winds down, whatever was spent.
"""

from __future__ import annotations

from typing import Any

from cadenza.protocol import ResumeEvent, RunPhase, UsageEvent

from ..definition import CompiledBudget
from ..state import MAX_USAGE_IDS, Budget, Usage
from . import attempts, lifecycle
from .context import Decider, whole


def on_usage(d: Decider, ev: UsageEvent) -> None:
    name = ev.step
    exit_step = d.wf.on_exit.name if d.wf.on_exit is not None else None
    if not isinstance(name, str) or (name not in d.wf.steps and name != exit_step):
        return
    if not isinstance(ev.id, str) or not ev.id or len(ev.id) > 64 or ev.id in d.s.usageSeen:
        return
    d.s.usageSeen.append(ev.id)
    del d.s.usageSeen[:-MAX_USAGE_IDS]
    used = Usage(
        inputTokens=ev.inputTokens, outputTokens=ev.outputTokens, cost=ev.cost or 0.0, calls=ev.calls
    )
    d.s.usage = d.s.usage or Usage()
    d.s.usage.add(used)
    st = d.st(name)
    st.usage = st.usage or Usage()
    st.usage.add(used)
    if ev.item is None and whole(ev.attempt, 1):
        for rec in st.attempts:
            if rec.n == ev.attempt:
                rec.usage = rec.usage or Usage()
                rec.usage.add(used)
    model = ev.model if isinstance(ev.model, str) else ""
    d.decision.usage.append((model[:253], used.inputTokens, used.outputTokens, used.cost))
    if ev.requests is not None or ev.waited is not None or ev.latency is not None:
        d.decision.calls.append((model[:253], dict(ev.requests or {}), ev.waited, ev.latency))
    d.changed()


def _limit(override: Budget | None, spec: CompiledBudget | None) -> Budget | None:
    if override is not None:
        return override
    if spec is None:
        return None
    return Budget(tokens=spec.tokens, cost=spec.cost)


def _reached(budget: Budget | None, usage: Usage | None) -> str | None:
    if budget is None or usage is None:
        return None
    if budget.tokens is not None and usage.tokens >= budget.tokens:
        return f"{usage.tokens} tokens used of a budget of {budget.tokens}"
    if budget.cost is not None and usage.cost >= budget.cost:
        return f"cost {usage.cost:g} of a budget of {budget.cost:g}"
    return None


def exceeded(d: Decider, name: str) -> tuple[str, bool] | None:
    """Why an attempt of step `name` may not be dispatched now (and whether the run then
    fails rather than pauses), or None."""
    run_why = _reached(_limit(d.s.budget, d.wf.budget), d.s.usage)
    if run_why is not None:
        return f"run budget reached: {run_why}", bool(d.wf.budget and d.wf.budget.fail)
    cs = d.wf.steps.get(name)
    st = d.s.steps.get(name)
    if cs is not None and st is not None:
        step_why = _reached(_limit(st.budget, cs.budget), st.usage)
        if step_why is not None:
            return f"step {name} budget reached: {step_why}", bool(cs.budget and cs.budget.fail)
    return None


def task_limits(d: Decider, name: str) -> dict[str, dict[str, Any]] | None:
    """The limits an attempt of step `name` carries to its agent, which refuses model calls
    past them (`cadenza._budget`); None when there is no budget (the task then has no key)."""
    st, cs = d.s.steps.get(name), d.wf.steps.get(name)
    limits: dict[str, dict[str, Any]] = {}
    for scope, limit in (
        ("run", _limit(d.s.budget, d.wf.budget)),
        ("step", _limit(st.budget if st else None, cs.budget if cs else None)),
    ):
        if limit is not None and (limit.tokens is not None or limit.cost is not None):
            limits[scope] = limit.model_dump(exclude_none=True)
    return limits or None


def refused_call(d: Decider, name: str, error: dict[str, Any]) -> bool:
    """Whether a failed attempt is a model call the agent refused for the budget: its
    BudgetExceeded, and the run paused or over budget by the engine's own count (a
    handler's exception of that name cannot spare a retry otherwise)."""
    if error.get("type") != "BudgetExceeded":
        return False
    return d.s.phase == RunPhase.PAUSED or exceeded(d, name) is not None


def held(d: Decider, name: str, item: int | None, retry: bool) -> bool:
    """Whether this attempt is held back by the budget (the run pauses or fails); called by
    `attempts.dispatch` before it sends anything."""
    if d.wf.on_exit is not None and name == d.wf.on_exit.name:
        return False  # onExit always runs, whatever was spent
    if d.s.failing:
        return True  # winding down (a budget that fails the run, mid-forEach window): nothing new
    if d.s.phase == RunPhase.PAUSED:
        _hold(d, name, item, retry)
        return True
    why = exceeded(d, name)
    if why is None:
        return False
    message, fail = why
    if fail:
        lifecycle.wind_down(d, "failed", f"BudgetExceeded: {message}")
        return True
    d.s.phase = RunPhase.PAUSED
    d.s.message = f"BudgetExceeded: {message}"
    d.audit(None, RunPhase.RUNNING, RunPhase.PAUSED, d.s.message)
    _hold(d, name, item, retry)
    return True


def _hold(d: Decider, name: str, item: int | None, retry: bool) -> None:
    entry = (name, item, retry)
    if entry not in d.s.held:
        d.s.held.append(entry)
    d.changed()


def unpause(d: Decider) -> list[tuple[str, int | None, bool]]:
    """Back to Running; what the pause held, to dispatch (or drop, for a cancel)."""
    d.s.phase = RunPhase.RUNNING
    d.s.message = ""
    held_back, d.s.held = d.s.held, []
    d.changed()
    return held_back


def on_resume(d: Decider, ev: ResumeEvent) -> None:
    if d.s.phase != RunPhase.PAUSED:
        return
    tokens = ev.tokens if isinstance(ev.tokens, int) and ev.tokens > 0 else None
    cost = float(ev.cost) if isinstance(ev.cost, int | float) and ev.cost > 0 else None
    # The new limits go to whatever held the run: its own budget, else the steps' that held.
    run_limit = _limit(d.s.budget, d.wf.budget)
    raised = []
    if _reached(run_limit, d.s.usage) is not None or not d.s.held:
        base = run_limit or Budget()
        d.s.budget = Budget(
            tokens=tokens if tokens is not None else base.tokens,
            cost=cost if cost is not None else base.cost,
        )
        raised.append(f"run budget tokens={d.s.budget.tokens} cost={d.s.budget.cost}")
    for name in dict.fromkeys(n for n, _, _ in d.s.held):
        st, cs = d.s.steps.get(name), d.wf.steps.get(name)
        limit = _limit(st.budget if st else None, cs.budget if cs else None)
        if st is not None and _reached(limit, st.usage) is not None and limit is not None:
            st.budget = Budget(
                tokens=tokens if tokens is not None else limit.tokens,
                cost=cost if cost is not None else limit.cost,
            )
            raised.append(f"step {name} budget tokens={st.budget.tokens} cost={st.budget.cost}")
    held_back = unpause(d)
    d.audit(
        None,
        RunPhase.PAUSED,
        RunPhase.RUNNING,
        f"resumed by {d.actor}: " + ("; ".join(raised) or "budget unchanged"),
        tokens=tokens,
        cost=cost,
    )
    for name, item, retry in held_back:
        attempts.dispatch(d, name, item, retry=retry)
