"""The engine's check of a command (`engine.control.refusal`) agrees with `decide`: a
command it accepts changes the run, one it refuses would have been dropped as a no-op
(or, for a decider who is not an approver, only audited as ignored). So the CLI says
"applied" exactly when the run moves, in every state a run of this workflow goes through.
"""

from __future__ import annotations

from typing import Any

import pytest
from cadenza_operator.engine.control import refusal
from cadenza_operator.engine.decide import decide
from cadenza_operator.engine.state import RunState

from .helpers import Driver, agent_step, compile_spec

WF = compile_spec(
    {
        "steps": [
            {"name": "gate", "approval": {"approvers": ["ada"]}},
            {"name": "hold", "dependsOn": ["gate"], "waitFor": {"signal": "go"}},
            agent_step("work", dependsOn=["hold"]),
            {"name": "final", "dependsOn": ["work"], "approval": {}},
        ]
    }
)

COMMANDS: list[dict[str, Any]] = [
    *(
        {"op": "approve", "step": step, "by": by, "approved": approved}
        for step in ("gate", "hold", "work", "final", "nope")
        for by in ("ada", "bob")
        for approved in (True, False)
    ),
    {"op": "signal", "name": "go", "payload": {"x": 1}},
    {"op": "signal", "name": "stop"},
    {"op": "cancel", "reason": "test"},
]


def as_event(command: dict[str, Any], at: float) -> dict[str, Any]:
    """The event the engine publishes for an accepted command (engine/client.py)."""
    kind = {"approve": "approval"}.get(command["op"], command["op"])
    return {**command, "type": kind, "run": "r1", "by": command.get("by", "cli"), "at": at}


def states() -> list[tuple[str, RunState]]:
    """The run at each point a person may act on it: waiting for the gate, with the
    signal remembered early, waiting for the agent, for the final approval, finished,
    cancelled, and winding down after a failure."""
    seen: list[tuple[str, RunState]] = []
    d = Driver(WF)
    d.start()
    seen.append(("gate waits", d.state.model_copy(deep=True)))
    d.send({"type": "signal", "name": "go", "payload": 1})
    seen.append(("signal remembered", d.state.model_copy(deep=True)))
    d.send({"type": "approval", "step": "gate", "by": "ada", "approved": True})
    seen.append(("work running", d.state.model_copy(deep=True)))
    d.succeed("work")
    seen.append(("final waits", d.state.model_copy(deep=True)))
    d.send({"type": "approval", "step": "final", "by": "bob", "approved": True})
    seen.append(("succeeded", d.state.model_copy(deep=True)))

    c = Driver(WF, run="r1")
    c.start()
    c.send({"type": "cancel", "by": "ops"})
    seen.append(("cancelled", c.state.model_copy(deep=True)))
    return seen


@pytest.mark.parametrize(("label", "state"), states(), ids=lambda v: v if isinstance(v, str) else "")
def test_refusal_agrees_with_decide(label: str, state: RunState) -> None:
    at = (state.finishedAt or state.startedAt or 0.0) + 1
    for command in COMMANDS:
        request = {**command, "run": "r1", "namespace": "default"}
        error = refusal(request, state, WF)
        decision = decide(state, as_event(command, at), WF, {})
        ignored_denial = all("ignored: not an approver" in r["reason"] for r in decision.audit)
        if error is None:
            assert decision.changed, (label, command, "accepted, but decide does nothing")
        elif command.get("by") == "bob" and "not an approver" in error:
            assert ignored_denial, (label, command, error, decision.audit)
            assert decision.state.steps["gate"].phase == state.steps["gate"].phase
        else:
            assert not decision.changed, (label, command, error, decision.audit)


def test_unknown_run_and_other_namespace_are_refused() -> None:
    d = Driver(WF)
    d.start()
    request = {"op": "cancel", "run": "r1", "namespace": "other"}
    assert refusal(request, None, None) == "no run r1 in namespace other"
    assert refusal(request, d.state, WF) == "no run r1 in namespace other"
    assert refusal({**request, "namespace": "default"}, d.state, WF) is None


def test_messages_name_the_run_the_step_and_what_it_is() -> None:
    d = Driver(WF)
    d.start()
    ask = {"run": "r1", "namespace": "default"}
    assert refusal({**ask, "op": "approve", "step": "gate", "by": "bob"}, d.state, WF) == (
        "refused: bob is not an approver of gate (approvers: ada)"
    )
    assert refusal({**ask, "op": "approve", "step": "final", "by": "ada"}, d.state, WF) == (
        "step final of run r1 is not waiting for approval (it is Pending)"
    )
    assert refusal({**ask, "op": "approve", "step": "work"}, d.state, WF) == (
        "step work of run r1 is not an approval step"
    )
    assert refusal({**ask, "op": "signal", "name": "stop"}, d.state, WF) == (
        "no step of workflow wf waits for signal stop (signals: go)"
    )
