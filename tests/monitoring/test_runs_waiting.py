"""Which runs count in cadenza_runs_waiting (engine.runtime.waits_on_someone, asked of the
record before and after each decision): active runs with nothing to do until someone
acts. CadenzaRunsStuck subtracts them, so a run with an attempt queued, running or backing
off next to its approval must not count (its agent may be what is stuck)."""

from __future__ import annotations

from typing import Any

from cadenza_operator.engine.runtime import waits_on_someone

from ..unit.helpers import Driver, agent_step, compile_spec


def driver(spec: dict[str, Any]) -> Driver:
    d = Driver(compile_spec(spec))
    d.start()
    return d


def waiting(d: Driver) -> bool:
    return waits_on_someone(d.state, d.wf)


def test_a_run_waiting_only_for_its_approval_waits_until_decided() -> None:
    d = driver({"steps": [agent_step("a"), {"name": "gate", "dependsOn": ["a"], "approval": {}}]})
    assert not waiting(d)  # a's attempt is queued
    d.succeed("a")
    assert d.step("gate").phase == "WaitingApproval" and waiting(d)
    d.send({"type": "approval", "step": "gate", "approved": True, "by": "ada"})
    assert d.phase == "Succeeded" and not waiting(d)


def test_an_approval_next_to_work_in_progress_does_not_count() -> None:
    retry = {"limit": 2, "backoff": {"initial": "10s"}}
    d = driver({"steps": [agent_step("a", retry=retry), {"name": "gate", "approval": {}}]})
    assert d.step("gate").phase == "WaitingApproval"
    assert not waiting(d)  # a is still to run: if its agent is gone, the run is stuck
    d.fail("a", retryable=True)  # backing off before its retry: still work to do
    assert d.step("a").phase == "Running" and not d.open_tasks("a")
    assert not waiting(d)


def test_a_signal_wait_counts_and_its_arrival_ends_it() -> None:
    d = driver({"steps": [{"name": "go", "waitFor": {"signal": "go"}}, agent_step("b", dependsOn=["go"])]})
    assert waiting(d)
    d.send({"type": "signal", "name": "go", "payload": 1})
    assert not waiting(d)  # b was dispatched


def test_a_run_paused_by_its_budget_counts() -> None:
    d = driver({"budget": {"tokens": 10}, "steps": [agent_step("a"), agent_step("b", dependsOn=["a"])]})
    t = d.task("a")
    body = {"type": "usage", "step": "a", "item": None, "attempt": t.attempt, "id": "u1", "model": "m"}
    d.send({**body, "inputTokens": 20, "outputTokens": 0})
    d.succeed("a")
    assert d.phase == "Paused" and waiting(d)
    d.send({"type": "resume", "tokens": 1000, "by": "ops"})
    assert d.phase == "Running" and not waiting(d)


def test_a_run_not_started_or_finished_does_not_count() -> None:
    d = Driver(compile_spec({"steps": [{"name": "gate", "approval": {}}]}))
    assert not waiting(d)  # Pending: never counted as active either
    d.start()
    assert waiting(d)
    d.send({"type": "cancel", "by": "ops"})
    assert d.phase == "Cancelled" and not waiting(d)
