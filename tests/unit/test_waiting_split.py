"""Where an attempt's time goes: ready -> queued -> started -> finished.

Waiting happens in two places the agent's own clock cannot see: before the engine queues
an attempt (behind maxParallel, maxActiveRuns, or an engine busy with other events) and in
the agent's queue. Each test puts time in exactly one of those places and checks that the
split puts it there, in the record, in the per-attempt history and in what the metrics get.
"""

from __future__ import annotations

import pytest
from cadenza_operator.engine.state import Timing, attempt_stages, run_timing

from .helpers import T0, Driver, agent_step, compile_spec


def finish(d: Driver, step: str, *, started: float, finished: float, item: int | None = None, **ev: object):
    """The agent's result, with the agent's own start and finish times, stored at `finished`."""
    t = d.task(step, item)
    d.tasks.pop(t.msg_id)
    return d.send(
        {
            "type": "result",
            "step": step,
            "item": item,
            "attempt": t.attempt,
            "startedAt": started,
            "finishedAt": finished,
            **ev,
        },
        at=finished,
    )


def test_time_behind_maxParallel_is_scheduling_not_queue_or_execution() -> None:
    wf = compile_spec(
        {"steps": [agent_step("each", forEach="input.xs", maxParallel=1, input={"x": "${{ item }}"})]}
    )
    d = Driver(wf, input={"xs": [1, 2, 3]})
    d.start()
    # Item 0 goes out at once; items 1 and 2 are ready from the step's start but wait for
    # the window. Each runs 10 s and is started the moment it is queued.
    t = T0
    for i in range(3):
        queued = d.task("each", i).body["queuedAt"]
        d.now = t + 10
        decision = finish(d, "each", item=i, started=queued, finished=t + 10)
        assert decision.timings == [("each", pytest.approx(queued - T0), 0.0, pytest.approx(10.0))]
        t += 10
    timing = d.step("each").timing
    assert timing is not None
    assert timing.attempts == 3
    assert timing.scheduling == pytest.approx(0 + 10 + 20)  # item 1 waited 10 s, item 2 20 s
    assert timing.queued == 0.0
    assert timing.executing == pytest.approx(30.0)
    assert d.phase == "Succeeded"


def test_a_busy_engine_shows_as_scheduling_time() -> None:
    wf = compile_spec({"steps": [agent_step("a"), agent_step("b", dependsOn=["a"])]})
    d = Driver(wf)
    d.start()
    d.now = T0 + 5
    # a's result is stored at T0+5, but the engine gets to it only at T0+8: b was ready at
    # T0+5 and queued at T0+8.
    finish(d, "a", started=T0, finished=T0 + 5, handledAt=T0 + 8)
    body = d.task("b").body
    assert body["queuedAt"] == T0 + 8
    history = d.step("b").attempts[-1]
    assert (history.readyAt, history.queuedAt) == (T0 + 5, T0 + 8)
    d.now = T0 + 12
    decision = finish(d, "b", started=T0 + 9, finished=T0 + 12)
    assert decision.timings == [("b", 3.0, 1.0, 3.0)]


def test_a_run_held_back_by_maxActiveRuns_counts_from_when_it_was_asked_for() -> None:
    wf = compile_spec({"steps": [agent_step("a")]})
    d = Driver(wf)
    d.now = T0 + 60
    d.send({"type": "start", "requestedAt": T0})  # a trigger event stored at T0, admitted at T0+60
    assert d.step("a").attempts[-1].readyAt == T0
    d.now = T0 + 61
    decision = finish(d, "a", started=T0 + 60, finished=T0 + 61)
    assert decision.timings == [("a", 60.0, 0.0, 1.0)]


def test_a_requestedAt_from_the_future_is_not_believed() -> None:
    wf = compile_spec({"steps": [agent_step("a")]})
    d = Driver(wf)
    d.send({"type": "start", "requestedAt": T0 + 1_000})
    assert d.step("a").attempts[-1].readyAt == T0


def test_a_retry_is_ready_when_its_backoff_ends_not_when_the_timer_is_handled() -> None:
    wf = compile_spec(
        {"steps": [agent_step("a", retry={"limit": 1, "backoff": {"initial": "10s", "jitter": 0}})]}
    )
    d = Driver(wf)
    d.start()
    d.fail("a", retryable=True)
    due = d.step("a").retryAt
    assert due == T0 + 10
    timer_id = d.next_timer()[0]  # type: ignore[index]
    d.now = due + 4  # the timer message is stored late and handled later still
    d.send({"type": "timer", "timer": timer_id, "due": due, "handledAt": due + 6})
    rec = d.step("a").attempts[-1]
    assert (rec.n, rec.readyAt, rec.queuedAt) == (2, due, due + 6)


def test_time_in_the_agents_queue_is_queued() -> None:
    wf = compile_spec({"steps": [agent_step("a")]})
    d = Driver(wf)
    d.start()
    d.now = T0 + 7
    d.started("a")  # stored when the agent began: 7 s in the queue
    d.now = T0 + 9
    t = d.task("a")
    d.tasks.pop(t.msg_id)
    decision = d.send({"type": "result", "step": "a", "item": None, "attempt": 1, "finishedAt": T0 + 9})
    assert decision.timings == [("a", 0.0, 7.0, 2.0)]


def test_an_attempt_that_never_started_waited_all_its_time() -> None:
    wf = compile_spec({"steps": [agent_step("a", queueTimeout="30s")]})
    d = Driver(wf)
    d.start()
    decision = d.fire_next_timer()
    assert decision is not None
    assert decision.timings == [("a", 0.0, 30.0, None)]
    assert d.step("a").timing == Timing(queued=30.0, attempts=1)


def test_every_attempt_reports_its_start() -> None:
    """Without a start report the engine cannot tell queued from running: at once when a
    timer counts from the start, after a moment otherwise (a quick attempt's result has it)."""
    wf = compile_spec(
        {"steps": [agent_step("a"), agent_step("b", queueTimeout="1m"), agent_step("c", timeout="1m")]}
    )
    d = Driver(wf)
    d.start()
    assert d.task("a").body["notifyStart"] is False
    assert d.task("a").body["reportStartAfter"] > 0
    assert d.task("b").body["notifyStart"] is True  # a queueTimeout must see the start
    assert d.task("c").body["notifyStart"] is True


def test_a_late_start_report_counts_from_the_agents_start() -> None:
    wf = compile_spec({"steps": [agent_step("a")]})
    d = Driver(wf)
    d.start()
    t = d.task("a")
    d.now = T0 + 3
    d.send({"type": "started", "step": "a", "item": None, "attempt": t.attempt, "startedAt": T0 + 2})
    assert d.step("a").startedAt == T0 + 2
    d.send({"type": "started", "step": "a", "item": None, "attempt": t.attempt, "startedAt": T0 + 99})
    assert d.step("a").startedAt == T0 + 2  # the first report stands
    d2 = Driver(wf)
    d2.start()
    d2.now = T0 + 3  # an agent clock ahead of the server's: never after the report was stored
    d2.send({"type": "started", "step": "a", "item": None, "attempt": 1, "startedAt": T0 + 60})
    assert d2.step("a").startedAt == T0 + 3


@pytest.mark.parametrize(
    ("ready", "queued", "started", "finished", "expected"),
    [
        (0.0, 1.0, 3.0, 6.0, (1.0, 2.0, 3.0)),
        (None, 1.0, 3.0, 6.0, (0.0, 2.0, 3.0)),
        # an agent host whose clock runs 5 s behind the engine's: no negative stage
        (0.0, 10.0, 6.0, 8.0, (10.0, 0.0, 2.0)),
        (0.0, 10.0, None, 12.0, (10.0, 2.0, None)),
    ],
)
def test_attempt_stages(ready, queued, started, finished, expected) -> None:  # type: ignore[no-untyped-def]
    assert attempt_stages(ready, queued, started, finished) == expected


def test_the_run_total_sums_its_steps() -> None:
    wf = compile_spec({"steps": [agent_step("a"), agent_step("b")]})
    d = Driver(wf)
    d.start()
    d.now = T0 + 4
    finish(d, "a", started=T0 + 1, finished=T0 + 4)
    finish(d, "b", started=T0 + 2, finished=T0 + 4)
    total = run_timing(d.state)
    assert (total.queued, total.executing, total.attempts) == (3.0, 5.0, 2)
    assert total.waiting == 3.0
