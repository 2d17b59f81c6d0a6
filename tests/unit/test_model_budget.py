"""A model call in a run over budget: the agent's check (`cadenza._budget.refusal`: the
record's override before the task's limits, step and run, tokens and cost, this attempt's
usage the record has not counted yet) and the engine's side (the limits in the task body,
a refused call holding the step's next attempt without spending a retry)."""

from __future__ import annotations

from typing import Any

import pytest
from cadenza import BudgetExceeded
from cadenza._budget import BudgetGuard, guard_for, refusal
from cadenza.errors import failure_of

from .helpers import Driver, agent_step, compile_spec
from .test_budgets import usage


def body(
    run: dict[str, Any] | None = None, step: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    limits = {k: v for k, v in (("run", run), ("step", step)) if v is not None}
    return {"run": "r1", "step": "s", "item": None, "attempt": 1, "budget": limits, **extra}


def record(
    run_usage: tuple[int, float] = (0, 0.0),
    step_usage: tuple[int, float] = (0, 0.0),
    attempt_usage: tuple[int, float] = (0, 0.0),
    **extra: Any,
) -> dict[str, Any]:
    def used(u: tuple[int, float]) -> dict[str, Any]:
        return {"inputTokens": u[0], "outputTokens": 0, "cost": u[1], "calls": 1}

    step = {"usage": used(step_usage), "attempts": [{"n": 1, "usage": used(attempt_usage)}]}
    return {"phase": "Running", "usage": used(run_usage), "steps": {"s": step}, **extra}


@pytest.mark.parametrize(
    ("rec", "limits", "local", "refused"),
    [
        (record((99, 0.0)), body(run={"tokens": 100}), (0, 0.0), None),
        (record((100, 0.0)), body(run={"tokens": 100}), (0, 0.0), "run budget reached: 100 tokens"),
        (record((0, 1.5)), body(run={"cost": 1.5}), (0, 0.0), "run budget reached: cost 1.5"),
        (record((0, 1.4)), body(run={"tokens": 10, "cost": 1.5}), (0, 0.0), None),
        # the record's override (set by resume) before the task's limits, both ways
        (record((100, 0.0), budget={"tokens": 1000}), body(run={"tokens": 100}), (0, 0.0), None),
        (
            record((100, 0.0), budget={"tokens": 50}),
            body(run={"tokens": 1000}),
            (0, 0.0),
            "of a budget of 50",
        ),
        # the step's budget and its own usage; its override
        (record((0, 0.0), (5, 0.0)), body(step={"tokens": 5}), (0, 0.0), "step s budget reached"),
        (
            record((0, 0.0), (5, 0.0), steps_budget={"tokens": 5}),
            body(step={"tokens": 50}),
            (0, 0.0),
            "step s budget reached",
        ),
        # usage this attempt recorded that the record has not counted yet
        (record((40, 0.0), (40, 0.0), (40, 0.0)), body(run={"tokens": 100}), (90, 0.0), None),
        (record((40, 0.0), (40, 0.0), (40, 0.0)), body(run={"tokens": 100}), (100, 0.0), "100 tokens used"),
        (record((60, 0.0), (60, 0.0), (40, 0.0)), body(step={"tokens": 70}), (50, 0.0), "step s budget"),
        # a forEach item's attempt has no usage of its own in the record: the record alone counts
        (record((40, 0.0)), body(run={"tokens": 100}, item=3), (100, 0.0), None),
    ],
)
def test_the_limit_check(
    rec: dict[str, Any], limits: dict[str, Any], local: tuple[int, float], refused: str | None
) -> None:
    if "steps_budget" in rec:
        rec["steps"]["s"]["budget"] = rec.pop("steps_budget")
    why = refusal(rec, limits, local)
    if refused is None:
        assert why is None
    else:
        assert why is not None and refused in why


def test_a_step_override_takes_precedence_over_the_task() -> None:
    rec = record((0, 0.0), (5, 0.0))
    rec["steps"]["s"]["budget"] = {"tokens": 50}
    assert refusal(rec, body(step={"tokens": 5})) is None


@pytest.mark.parametrize(
    ("rec", "refused"),
    [
        (None, "no longer exists"),
        (record(phase="Succeeded"), "the run is Succeeded"),
        (record(phase="Cancelled"), "the run is Cancelled"),
        (record(failing=True), "ending"),
        (record(phase="Paused", message="BudgetExceeded: run budget reached"), "paused: BudgetExceeded"),
    ],
)
def test_a_paused_ending_or_gone_run_refuses_calls(rec: dict[str, Any] | None, refused: str) -> None:
    why = refusal(rec, body(run={"tokens": 10**9}))
    assert why is not None and refused in why


def test_no_budget_no_guard() -> None:
    async def read(key: str) -> Any:
        raise AssertionError("a run without a budget reads nothing")

    assert guard_for({"run": "r1", "step": "s", "attempt": 1}, read) is None
    assert isinstance(guard_for(body(run={"tokens": 1}), read), BudgetGuard)


async def test_the_guard_counts_what_it_recorded_and_raises_budget_exceeded() -> None:
    reads: list[str] = []

    class Entry:
        value = b'{"phase":"Running","usage":{"inputTokens":10,"outputTokens":0,"cost":0.0}}'

    async def read(key: str) -> Entry:
        reads.append(key)
        return Entry()

    guard = guard_for(body(run={"tokens": 30}), read)
    assert guard is not None
    await guard.check()
    guard.count(10, 5, None)  # 10 + 15 unseen = 25
    await guard.check()
    guard.count(3, 2, 0.1)  # 30
    with pytest.raises(BudgetExceeded, match="30 tokens used of a budget of 30") as caught:
        await guard.check()
    assert reads == ["r1"] * 3
    failure = failure_of(caught.value)
    assert failure["type"] == "BudgetExceeded" and failure["retryable"] is True


# ------------------------------------------------------------------ the engine's side
def test_the_task_carries_the_effective_limits_only_when_there_is_a_budget() -> None:
    d = Driver(compile_spec({"steps": [agent_step("a")]}))
    d.start()
    assert "budget" not in d.task("a").body
    d = Driver(
        compile_spec(
            {"budget": {"tokens": 100, "cost": 2.0}, "steps": [agent_step("a", budget={"cost": 1.0})]}
        )
    )
    d.start()
    assert d.task("a").body["budget"] == {"run": {"tokens": 100, "cost": 2.0}, "step": {"cost": 1.0}}


def test_a_refused_call_holds_the_next_attempt_without_spending_a_retry() -> None:
    d = Driver(compile_spec({"budget": {"tokens": 100}, "steps": [agent_step("a")]}))  # no retries
    d.start()
    usage(d, "a", "u1", 100, 0)
    d.fail("a", retryable=True, kind="BudgetExceeded", message="model call refused")
    assert d.phase == "Paused" and "BudgetExceeded" in d.state.message
    assert d.step("a").phase == "Running" and d.step("a").retries == 0 and not d.open_tasks()
    d.send({"type": "resume", "by": "alice", "tokens": 1000})
    task = d.task("a")
    assert task.attempt == 2 and task.body["budget"] == {"run": {"tokens": 1000}}
    d.succeed("a")
    assert d.phase == "Succeeded"


def test_a_budget_exceeded_of_a_run_within_budget_is_an_ordinary_failure() -> None:
    d = Driver(compile_spec({"budget": {"tokens": 100}, "steps": [agent_step("a")]}))
    d.start()
    d.fail("a", retryable=True, kind="BudgetExceeded", message="a handler's own exception")
    assert d.phase == "Failed"


def test_a_refused_call_with_on_exceeded_fail_fails_the_run() -> None:
    d = Driver(compile_spec({"budget": {"tokens": 100, "onExceeded": "fail"}, "steps": [agent_step("a")]}))
    d.start()
    usage(d, "a", "u1", 100, 0)
    d.fail("a", retryable=True, kind="BudgetExceeded", message="model call refused")
    assert d.phase == "Failed" and "BudgetExceeded" in d.state.message
