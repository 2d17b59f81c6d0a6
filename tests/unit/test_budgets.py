"""Model usage and budgets in the pure decide: usage adds up per attempt, step and run;
a run that reached its budget pauses before its next dispatch, and a resume with a
higher budget sends what the pause held."""

from __future__ import annotations

from typing import Any

import pytest
from cadenza_operator.engine.definition import DefinitionError

from .helpers import Driver, agent_step, compile_spec


def run(spec: dict[str, Any]) -> Driver:
    d = Driver(compile_spec(spec))
    d.start()
    return d


def usage(d: Driver, step: str, call: str, inp: int, out: int, cost: float | None = None) -> None:
    t = d.task(step)
    d.send(
        {
            "type": "usage",
            "step": step,
            "item": None,
            "attempt": t.attempt,
            "worker": "w1",
            "id": call,
            "model": "fast",
            "inputTokens": inp,
            "outputTokens": out,
            "cost": cost,
        }
    )


CHAIN = {
    "budget": {"tokens": 100},
    "steps": [agent_step("a"), agent_step("b", dependsOn=["a"]), agent_step("c", dependsOn=["b"])],
}


def test_usage_adds_up_per_attempt_step_and_run() -> None:
    d = run({"steps": [agent_step("a"), agent_step("b")]})
    usage(d, "a", "u1", 10, 5, 0.5)
    usage(d, "a", "u2", 1, 2)
    usage(d, "b", "u3", 7, 0, 0.25)
    a = d.step("a")
    assert a.usage is not None and a.attempts[0].usage is not None
    assert (a.usage.inputTokens, a.usage.outputTokens, a.usage.cost, a.usage.calls) == (11, 7, 0.5, 2)
    assert a.attempts[0].usage == a.usage
    total = d.state.usage
    assert total is not None
    assert (total.inputTokens, total.outputTokens, total.cost, total.calls) == (18, 7, 0.75, 3)


def test_a_duplicate_usage_event_is_counted_once() -> None:
    d = run({"steps": [agent_step("a")]})
    usage(d, "a", "u1", 10, 5)
    ev = d.applied[-1]
    d.replay(ev)
    usage(d, "a", "u1", 10, 5)
    assert d.state.usage is not None and d.state.usage.calls == 1 and d.state.usage.inputTokens == 10


def test_a_run_that_reached_its_budget_pauses_before_the_next_dispatch() -> None:
    d = run(CHAIN)
    usage(d, "a", "u1", 80, 30)
    assert d.phase == "Running"  # what runs finishes: nothing is stopped
    d.succeed("a")
    assert d.phase == "Paused"
    assert not d.open_tasks()  # b was not sent
    assert d.step("b").phase == "Running" and d.step("b").attempt == 0
    assert "BudgetExceeded" in d.state.message
    paused = [r for r in d.audit if r["to"] == "Paused"]
    assert len(paused) == 1 and "BudgetExceeded" in paused[0]["reason"]


def test_attempts_in_flight_finish_while_paused() -> None:
    d = run(
        {
            "budget": {"tokens": 10},
            "steps": [agent_step("a"), agent_step("b"), agent_step("c", dependsOn=["a"])],
        }
    )
    usage(d, "a", "u1", 20, 0)
    d.succeed("a")
    assert d.phase == "Paused"
    usage(d, "b", "u2", 5, 0)  # b was in flight: its usage still counts
    d.succeed("b")
    assert d.step("b").phase == "Succeeded"
    assert d.phase == "Paused" and not d.open_tasks()
    assert d.state.usage is not None and d.state.usage.tokens == 25


def test_a_resume_with_a_higher_budget_sends_what_was_held_and_the_run_succeeds() -> None:
    d = run(CHAIN)
    usage(d, "a", "u1", 80, 30)
    d.succeed("a")
    assert d.phase == "Paused"
    d.send({"type": "resume", "by": "alice", "tokens": 1000})
    assert d.phase == "Running"
    assert [t.step for t in d.open_tasks()] == ["b"]
    resumed = [r for r in d.audit if r["from"] == "Paused" and r["to"] == "Running"]
    assert len(resumed) == 1 and resumed[0]["actor"] == "alice" and resumed[0]["tokens"] == 1000
    assert "1000" in resumed[0]["reason"]
    d.run_agents()
    assert d.phase == "Succeeded"


def test_a_resume_of_a_run_that_is_not_paused_changes_nothing() -> None:
    d = run(CHAIN)
    decision = d.send({"type": "resume", "by": "alice", "tokens": 1000})
    assert not decision.changed


def test_on_exceeded_fail_fails_the_run() -> None:
    d = run({**CHAIN, "budget": {"tokens": 100, "onExceeded": "fail"}})
    usage(d, "a", "u1", 100, 0)
    d.succeed("a")
    assert d.phase == "Failed"
    assert "BudgetExceeded" in d.state.message
    assert not d.open_tasks()


def test_a_retry_due_while_paused_is_held_and_sent_on_resume() -> None:
    d = run(
        {
            "budget": {"cost": 1.0},
            "steps": [agent_step("a", retry={"limit": 2, "backoff": {"initial": "1s", "jitter": 0}})],
        }
    )
    usage(d, "a", "u1", 1, 1, 2.0)
    d.fail("a", retryable=True)
    d.advance(5)
    assert d.phase == "Paused" and not d.open_tasks()
    d.send({"type": "resume", "by": "bob", "cost": 10.0})
    assert d.task("a").attempt == 2
    d.succeed("a")
    assert d.phase == "Succeeded"


def test_a_step_budget_pauses_the_run_and_a_resume_raises_it() -> None:
    d = run(
        {
            "steps": [
                agent_step("a", budget={"tokens": 5}, retry={"limit": 1, "backoff": {"initial": "1s"}}),
            ]
        }
    )
    usage(d, "a", "u1", 5, 0)
    d.fail("a", retryable=True)
    d.advance(5)
    assert d.phase == "Paused" and "step a budget" in d.state.message
    d.send({"type": "resume", "by": "bob", "tokens": 50})
    assert d.step("a").budget is not None and d.step("a").budget.tokens == 50
    d.succeed("a")
    assert d.phase == "Succeeded"


def test_the_deadline_still_fires_while_paused() -> None:
    d = run({**CHAIN, "deadline": "1m"})
    usage(d, "a", "u1", 200, 0)
    d.succeed("a")
    assert d.phase == "Paused"
    d.advance(120)
    assert d.phase == "Failed"
    assert "deadline" in d.state.message
    assert d.step("b").phase == "Cancelled"


def test_a_paused_run_can_be_cancelled() -> None:
    d = run(CHAIN)
    usage(d, "a", "u1", 200, 0)
    d.succeed("a")
    d.send({"type": "cancel", "by": "carol"})
    assert d.phase == "Cancelled"


def test_on_exit_runs_whatever_was_spent() -> None:
    d = run({**CHAIN, "budget": {"tokens": 10, "onExceeded": "fail"}, "onExit": {"agent": "worker"}})
    usage(d, "a", "u1", 200, 0)
    d.succeed("a")
    assert [t.step for t in d.open_tasks()] == ["onExit"]
    d.succeed("onExit")
    assert d.phase == "Failed"


@pytest.mark.parametrize(
    ("budget", "path"),
    [({"onExceeded": "pause"}, "spec.budget"), ({"tokens": 0}, None), ({"cost": -1}, None)],
)
def test_a_budget_needs_a_positive_limit(budget: dict[str, Any], path: str | None) -> None:
    from pydantic import ValidationError

    with pytest.raises((DefinitionError, ValidationError)) as info:
        compile_spec({**CHAIN, "budget": budget})
    if path is not None:
        assert isinstance(info.value, DefinitionError) and info.value.path == path


def test_the_engine_refuses_a_resume_of_a_run_that_is_not_paused() -> None:
    from cadenza_operator.engine.control import refusal

    d = run(CHAIN)
    request = {"op": "resume", "run": "r1", "namespace": "default", "tokens": 1000}
    assert refusal(request, d.state, d.wf) == "run r1 is not Paused (it is Running)"
    usage(d, "a", "u1", 200, 0)
    d.succeed("a")
    assert refusal(request, d.state, d.wf) is None


def test_usage_is_shown_in_the_json_document_and_the_workflow_run_status() -> None:
    from cadenza_operator.engine.view import document, run_view
    from cadenza_operator.kube.status import run_status
    from cadenza_operator.models import WorkflowRunStatus

    d = run(CHAIN)
    assert run_status(d.state).get("usage") is None  # nothing recorded: no usage shown
    usage(d, "a", "u1", 80, 30, 0.5)
    d.succeed("a")
    doc = document(run_view(d.state))
    expected = {"inputTokens": 80, "outputTokens": 30, "cost": 0.5, "calls": 1}
    assert doc["usage"] == expected
    assert doc["steps"]["a"]["usage"] == expected
    assert doc["steps"]["a"]["history"][0]["usage"] == expected
    assert "usage" not in doc["steps"]["b"]
    status = run_status(d.state)
    assert status["phase"] == "Paused" and "BudgetExceeded" in status["message"]
    assert status["usage"] == {**expected, "tokens": 110}
    WorkflowRunStatus.model_validate(status)  # what the CRD schema is generated from
