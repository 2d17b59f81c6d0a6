"""Wire compatibility: the events an agent built on the previous SDK (ead6214's
`cadenza/_agent.py`) sends, byte for byte as it built them, are parsed by the engine
(`runtime.parse_event`) into the typed protocol and applied by `decide`: an agent that is
not upgraded keeps working. Fields the engine does not know are tolerated."""

from __future__ import annotations

from typing import Any

import pytest
from cadenza.protocol import FailedEvent, RunPhase, StartedEvent, StepPhase, TaskFailure
from cadenza.wire import dumps
from cadenza_operator.engine.decide import decide
from cadenza_operator.engine.runtime import PermanentEventError, parse_event
from cadenza_operator.engine.state import RunState

from .helpers import T0, agent_step, compile_spec

WF = compile_spec(
    {
        "steps": [
            agent_step("a", timeout="30s"),
            agent_step("b", dependsOn=["a"], retry={"limit": 1, "backoff": {"initial": "1s"}}),
        ]
    }
)


class Engine:
    """decide fed the way the runtime feeds it: JSON bytes parsed once into an Event."""

    def __init__(self) -> None:
        self.state = RunState(
            run="r1", workflow=WF.name, definition=WF.key, createdAt=T0, scope="r1", namespace="default"
        )
        self.commands: list[dict[str, Any]] = []

    def send(self, body: dict[str, Any], at: float) -> bool:
        event = parse_event(dumps(body))
        event.at = at
        decision = decide(self.state, event, WF)
        self.state = decision.state
        self.commands += [c.wire() for c in decision.commands]
        return decision.changed


def _base(step: str, attempt: int) -> dict[str, Any]:
    # ead6214 _agent.py: the identity of the attempt every event of the old SDK carries
    return {"run": "r1", "step": step, "item": None, "attempt": attempt, "queuedAt": T0}


def test_an_agent_on_the_previous_sdk_still_works() -> None:
    e = Engine()
    assert e.send({"type": "start", "run": "r1"}, T0)
    assert [c["body"]["step"] for c in e.commands if c["op"] == "dispatch"] == ["a"]

    # notifyStart: the old SDK's started event has no startedAt, only `at`
    assert e.send({"type": "started", **_base("a", 1), "at": T0 + 1}, T0 + 1)
    assert e.state.steps["a"].startedAt == T0 + 1
    assert e.send({"type": "heartbeat", **_base("a", 1), "at": T0 + 2}, T0 + 2)
    result = {"type": "result", **_base("a", 1), "output": {"x": 1}}
    result.update(startedAt=T0 + 1, finishedAt=T0 + 3, worker="old-agent-1")
    assert e.send(result, T0 + 3)
    assert e.state.steps["a"].phase == StepPhase.SUCCEEDED == "Succeeded"
    assert e.state.steps["a"].output == {"x": 1}
    assert e.state.steps["a"].attempts[-1].worker == "old-agent-1"

    # b: a timeout as the old SDK reports it, retried ...
    timeout = {
        "type": "failed",
        **_base("b", 1),
        "error": {
            "type": "Timeout",
            "message": "attempt exceeded its timeout of 5s",
            "retryable": True,
            "timeout": True,
        },
    }
    timeout.update(startedAt=T0 + 4, finishedAt=T0 + 9, worker="old-agent-1")
    assert e.send(timeout, T0 + 9)
    b = e.state.steps["b"]
    assert b.phase == "Running" and b.retries == 1
    assert b.attempts[0].outcome == "TimedOut"
    assert b.attempts[0].error == timeout["error"]
    (retry,) = [tid for tid, t in e.state.timers.items() if t.kind == "retry"]
    assert e.send({"type": "timer", "run": "r1", "timer": retry, "due": e.state.timers[retry].at}, T0 + 20)

    # ... then a TaskError (FatalError) in the old shape: details, no `types`; it fails b
    fatal = {
        "type": "failed",
        **_base("b", 2),
        "error": {"type": "FatalError", "message": "bad input", "retryable": False, "details": {"k": 1}},
        "someFieldFromTheFuture": [1, 2],
    }
    fatal.update(startedAt=T0 + 21, finishedAt=T0 + 22, worker="old-agent-1")
    assert e.send(fatal, T0 + 22)
    assert e.state.steps["b"].phase == "Failed"
    assert e.state.steps["b"].error == fatal["error"]
    assert e.state.phase == RunPhase.FAILED == "Failed"


def test_events_are_typed_once_and_the_failure_has_one_shape() -> None:
    event = parse_event(
        dumps({"type": "failed", **_base("b", 1), "error": {"type": "X", "message": "m", "child": "c1"}})
    )
    assert isinstance(event, FailedEvent) and isinstance(event.error, TaskFailure)
    assert event.error.wire() == {"type": "X", "message": "m", "child": "c1"}  # only what was sent
    assert (event.model_extra or {})["queuedAt"] == T0  # unknown fields are kept, not refused
    started = parse_event(b'{"type": "started", "run": "r1", "step": "a", "attempt": 1, "at": 5}')
    assert isinstance(started, StartedEvent) and started.startedAt is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"nope", "malformed event: not JSON"),
        (b"[1]", "malformed event: a JSON list, not an object"),
        (b'{"type": "result"}', "malformed event: 'run' is None, not a run id"),
        (b'{"type": "x", "run": "r1"}', "malformed event: unknown type 'x'"),
        (b'{"type": "failed", "run": "r1", "error": "boom"}', "malformed event: error:"),
    ],
)
def test_what_is_not_an_event_is_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(PermanentEventError) as exc:
        parse_event(data)
    assert str(exc.value).startswith(reason)


def test_phases_say_whether_they_are_terminal() -> None:
    assert [p for p in StepPhase if p.is_terminal] == ["Succeeded", "Failed", "Cancelled", "Skipped"]
    assert [p for p in RunPhase if p.is_terminal] == ["Succeeded", "Failed", "Cancelled"]
    assert dumps({"phase": StepPhase.WAITING_APPROVAL}) == b'{"phase":"WaitingApproval"}'
