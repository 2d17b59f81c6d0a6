"""Example-based tests of the pure `decide`: one behaviour of the control layer each."""

from __future__ import annotations

from typing import Any

import pytest
from cadenza._protocol import task_id
from cadenza_operator.engine.decide import INLINE_OUTPUT_BYTES, decide
from cadenza_operator.engine.state import MAX_ATTEMPT_RECORDS, RunState

from .helpers import T0, Driver, agent_step, compile_spec


def run(spec: dict[str, Any], input: Any = None, **kwargs: Any) -> Driver:
    d = Driver(compile_spec(spec), input=input, **kwargs)
    d.start()
    return d


def transitions(d: Driver, step: str | None) -> list[tuple[str | None, str | None]]:
    return [(a["from"], a["to"]) for a in d.audit if a["step"] == step and a["from"] != a["to"]]


# --------------------------------------------------------------------------- start and order


def test_start_dispatches_every_root_step_at_once() -> None:
    d = run(
        {"steps": [agent_step("a"), agent_step("b", agent="other"), agent_step("c", dependsOn=["a", "b"])]}
    )
    assert d.phase == "Running"
    assert d.state.startedAt == T0
    dispatches = d.ops("dispatch")
    assert [(c["body"]["step"], c["agent"], c["subject"]) for c in dispatches] == [
        ("a", "worker", "cadenza.task.default.worker"),
        ("b", "other", "cadenza.task.default.other"),
    ]
    assert dispatches[0]["msgId"] == task_id("r1", "a", None, 1) == "r1.a.1"
    body = dispatches[0]["body"]
    assert (body["run"], body["workflow"], body["attempt"], body["item"], body["scope"]) == (
        "r1",
        "wf",
        1,
        None,
        "r1",
    )
    assert d.phases() == {"a": "Running", "b": "Running", "c": "Pending"}
    assert d.step("a").attempts[0].queuedAt == T0


def test_a_step_waits_for_all_its_dependencies() -> None:
    d = run({"steps": [agent_step("a"), agent_step("b"), agent_step("c", dependsOn=["a", "b"])]})
    d.now += 1
    d.succeed("a", {"x": 1})
    assert not d.open_tasks("c")
    assert d.step("c").phase == "Pending"
    d.now += 1
    d.succeed("b")
    assert d.open_tasks("c")
    assert d.step("c").firstQueuedAt == T0 + 2
    d.succeed("c")
    assert d.phase == "Succeeded"
    assert d.state.finishedAt == T0 + 2
    assert [t.step for t in d.dispatched] == ["a", "b", "c"]


def test_a_chain_runs_in_order_and_the_output_is_rendered() -> None:
    d = run(
        {
            "steps": [agent_step("a"), agent_step("b", dependsOn=["a"]), agent_step("c", dependsOn=["b"])],
            "output": {"last": "${{ steps.c.output.n }}", "text": "a said ${{ steps.a.output.n }}"},
        }
    )
    for i, name in enumerate("abc"):
        assert [t.step for t in d.open_tasks()] == [name]
        d.succeed(name, {"n": i})
    assert d.phase == "Succeeded"
    assert d.state.outputs == {"last": 2, "text": "a said 0"}


def test_inputs_are_rendered_from_the_run_input_and_step_outputs() -> None:
    d = run(
        {
            "steps": [
                agent_step("classify", input={"ticket": "${{ input.ticket }}", "n": "${{ input.n }}"}),
                agent_step(
                    "lookup",
                    dependsOn=["classify"],
                    input={
                        "q": "${{ steps.classify.output.category }}",
                        "msg": "id=${{ input.ticket.id }}",
                        "run": "${{ run.id }}",
                        "const": [1, "two"],
                    },
                ),
            ]
        },
        input={"ticket": {"id": 7, "text": "refund"}, "n": 2},
    )
    assert d.task("classify").body["input"] == {"ticket": {"id": 7, "text": "refund"}, "n": 2}
    d.succeed("classify", {"category": "billing"})
    assert d.task("lookup").body["input"] == {"q": "billing", "msg": "id=7", "run": "r1", "const": [1, "two"]}


def test_an_input_that_fails_to_evaluate_fails_the_step() -> None:
    d = run({"steps": [agent_step("a", input={"x": "${{ input.missing }}"})]}, input={})
    assert d.step("a").phase == "Failed"
    assert d.step("a").error == {
        "type": "ExpressionError",
        "message": "'input.missing': no such key 'missing'",
    }
    assert d.phase == "Failed"
    assert not d.dispatched


# --------------------------------------------------------------------------- conditions


def test_a_false_when_skips_the_step_and_the_skip_propagates() -> None:
    d = run(
        {
            "steps": [
                agent_step("classify"),
                agent_step("lookup", dependsOn=["classify"], when="steps.classify.output.category != 'spam'"),
                agent_step("refund", dependsOn=["lookup"]),
                agent_step("notify", dependsOn=["refund"], ifDependenciesSkipped="run"),
                agent_step("log", dependsOn=["classify", "refund"]),
            ]
        }
    )
    d.succeed("classify", {"category": "spam"})
    assert d.step("lookup").phase == "Skipped"
    assert d.step("refund").phase == "Skipped"
    assert d.step("refund").message == ""
    assert [a["reason"] for a in d.audit if a["step"] == "refund"] == ["all dependencies were skipped"]
    assert [a["reason"] for a in d.audit if a["step"] == "lookup"] == [
        "when \"steps.classify.output.category != 'spam'\" is false"
    ]
    # ifDependenciesSkipped: run, and a step with one dependency not skipped, both run.
    assert {t.step for t in d.open_tasks()} == {"notify", "log"}
    d.succeed("notify")
    d.succeed("log")
    assert d.phase == "Succeeded"


def test_a_true_when_runs_the_step() -> None:
    d = run({"steps": [agent_step("a", when="input.go")]}, input={"go": True})
    assert d.open_tasks("a")


def test_a_when_that_does_not_give_a_bool_fails_the_step() -> None:
    d = run({"steps": [agent_step("a", when="input.flag")]}, input={"flag": "yes"})
    assert d.step("a").phase == "Failed"
    assert d.step("a").error is not None and d.step("a").error["type"] == "ExpressionError"
    assert "not a bool" in d.step("a").error["message"]
    assert d.phase == "Failed"


def test_a_when_that_fails_to_evaluate_fails_the_step_and_the_run() -> None:
    d = run({"steps": [agent_step("a", when="input.nope == 1")]}, input={})
    assert d.step("a").phase == "Failed"
    assert d.phase == "Failed"
    assert "when:" in d.state.message


def test_steps_read_the_phase_of_their_dependencies() -> None:
    d = run(
        {
            "steps": [
                agent_step("a", onFailure="continue"),
                agent_step("ok", dependsOn=["a"], when="steps.a.phase == 'Succeeded'"),
                agent_step("repair", dependsOn=["a"], when="steps.a.phase == 'Failed'"),
            ]
        }
    )
    d.fail("a")
    assert d.step("ok").phase == "Skipped"
    assert d.open_tasks("repair")


# --------------------------------------------------------------------------- forEach


def foreach_spec(n: int, max_parallel: int, **fields: Any) -> dict[str, Any]:
    return {
        "steps": [
            agent_step(
                "research",
                forEach="input.sources",
                maxParallel=max_parallel,
                input={"source": "${{ item }}", "i": "${{ index }}"},
                **fields,
            ),
            agent_step("summarize", dependsOn=["research"], input={"all": "${{ steps.research.output }}"}),
        ],
        "output": {"n": "${{ size(steps.research.output) }}"},
    }


def test_for_each_keeps_max_parallel_items_in_flight_and_outputs_the_ordered_list() -> None:
    d = run(foreach_spec(10, 3), input={"sources": [f"s{i}" for i in range(10)]})
    assert [t.item for t in d.open_tasks("research")] == [0, 1, 2]
    assert d.task("research", 1).body["input"] == {"source": "s1", "i": 1}
    assert d.task("research", 1).msg_id == "r1.research.1.1"
    answered = []
    # answer out of order: the newest first
    while d.open_tasks("research"):
        assert len(d.open_tasks("research")) <= 3
        t = max(d.open_tasks("research"), key=lambda t: t.item or 0)
        d.succeed("research", {"from": t.body["input"]["source"]}, item=t.item)
        answered.append(t.item)
    assert answered != sorted(answered)
    fe = d.step("research").forEach
    assert fe is not None and fe.counts == {"Succeeded": 10} and fe.total == 10
    assert d.step("research").phase == "Succeeded"
    assert d.task("summarize").body["input"]["all"] == [{"from": f"s{i}"} for i in range(10)]
    d.succeed("summarize")
    assert d.phase == "Succeeded"
    assert d.state.outputs == {"n": 10}


def test_for_each_over_an_empty_list_succeeds_with_an_empty_list() -> None:
    d = run(foreach_spec(0, 3), input={"sources": []})
    assert d.step("research").phase == "Succeeded"
    assert d.task("summarize").body["input"]["all"] == []


def test_for_each_over_something_else_than_a_list_fails_the_step() -> None:
    d = run(foreach_spec(0, 3), input={"sources": "abc"})
    assert d.step("research").phase == "Failed"
    assert "not a list" in d.step("research").message


def test_a_failed_item_fails_the_step_and_cancels_the_others() -> None:
    d = run(foreach_spec(10, 3), input={"sources": list(range(10))})
    d.succeed("research", "ok", item=0)
    d.fail("research", item=2, message="bad source")
    st = d.step("research")
    assert st.phase == "Failed"
    assert st.error is not None and st.error["item"] == 2
    assert st.message == "item 2 failed: FatalError: bad source"
    assert st.forEach is not None and st.forEach.failed == [2] and not st.forEach.running
    assert any(c["op"] == "cancelTasks" and c["body"].get("step") == "research" for c in d.commands)
    assert d.phase == "Failed"
    assert d.step("summarize").phase == "Skipped"
    # a late result of a cancelled item changes nothing
    assert not d.succeed("research", "late", item=1).changed
    assert len(d.dispatched) == 4  # items 0-2, then 3 after item 0 finished


def test_with_on_failure_continue_every_item_runs_and_dependents_go_on() -> None:
    d = run(foreach_spec(5, 2, onFailure="continue"), input={"sources": list(range(5))})
    for i in range(5):
        if i == 1:
            d.fail("research", item=i)
        else:
            d.succeed("research", i * 10, item=i)
    st = d.step("research")
    assert st.phase == "Failed"
    assert st.message == "1 of 5 items failed"
    assert st.forEach is not None and st.forEach.counts == {"Succeeded": 4, "Failed": 1}
    assert d.task("summarize").body["input"]["all"] == [0, None, 20, 30, 40]
    d.succeed("summarize")
    assert d.phase == "Succeeded"


def test_items_are_retried_on_their_own() -> None:
    d = run(
        foreach_spec(3, 3, retry={"limit": 1, "backoff": {"initial": "1s", "jitter": 0}}),
        input={"sources": list(range(3))},
    )
    d.fail("research", item=1, retryable=True)
    assert 1 not in [t.item for t in d.open_tasks("research")]
    d.advance(1)
    assert d.task("research", 1).attempt == 2
    assert d.task("research", 1).msg_id == "r1.research.1.2"
    for i in range(3):
        d.succeed("research", i, item=i)
    assert d.step("research").phase == "Succeeded"
    fe = d.step("research").forEach
    assert fe is not None and fe.retries == 1


def test_ten_thousand_items_keep_the_run_record_small() -> None:
    n = 10_000
    d = run(
        {
            "steps": [
                agent_step("gen"),
                agent_step(
                    "work",
                    dependsOn=["gen"],
                    forEach="steps.gen.output",
                    maxParallel=100,
                    input={"item": "${{ item }}"},
                ),
                agent_step("count", dependsOn=["work"], input={"n": "${{ size(steps.work.output) }}"}),
            ]
        },
        parse_every=97,  # the record's round trip is checked all along, not at each of 10,000 events
    )
    d.succeed("gen", [f"source-{i:05d}" for i in range(n)])
    assert d.step("gen").outputRef == "r1.gen"  # too large for the record
    assert d.size() < 8 * 1024
    d.run_agents(lambda t: {"len": len(t.body["input"]["item"])} if t.step == "work" else None)
    assert d.phase == "Succeeded"
    assert d.max_size < 64 * 1024
    assert len(d.dispatched) == n + 2
    assert d.dispatched[-1].body["input"] == {"n": n}
    assert d.step("work").outputRef == "r1.work.*"
    assert sum(1 for k in d.store if k.startswith("r1.work.")) == n


# --------------------------------------------------------------------------- retries


RETRY = {"limit": 4, "backoff": {"initial": "1s", "factor": 2, "max": "5s", "jitter": 0.5}}


def test_retryable_failures_are_retried_with_capped_exponential_backoff_and_jitter() -> None:
    d = run({"steps": [agent_step("a", retry=RETRY)]})
    delays = []
    for attempt in range(1, 5):
        d.now += 0.25
        failed_at = d.now
        d.fail("a", retryable=True)
        timer = d.state.timers[f"retry:a:{attempt + 1}"]
        assert (timer.kind, timer.step, timer.attempt) == ("retry", "a", attempt + 1)
        delays.append(timer.at - failed_at)
        assert not d.open_tasks("a")
        d.fire_next_timer()
        assert d.task("a").attempt == attempt + 1
        assert d.step("a").attempts[-1].queuedAt == timer.at
    bases = [1, 2, 4, 5]  # 1s * 2^n, capped at 5s
    for delay, base in zip(delays, bases, strict=True):
        assert base * 0.5 <= delay <= base
    assert len(set(delays)) == 4
    d.fail("a", retryable=True)
    assert d.step("a").phase == "Failed"
    assert d.step("a").error is not None and d.step("a").error["retriesExhausted"] is True
    assert d.step("a").attempt == 5
    assert [a.outcome for a in d.step("a").attempts] == ["Failed"] * 5
    assert d.step("a").retries == 4
    assert d.phase == "Failed"


def test_the_jitter_is_deterministic() -> None:
    one = run({"steps": [agent_step("a", retry=RETRY)]})
    two = run({"steps": [agent_step("a", retry=RETRY)]})
    other = run({"steps": [agent_step("a", retry=RETRY)]}, run="r2")
    for d in (one, two, other):
        d.fail("a", retryable=True)
    assert one.state.timers == two.state.timers
    assert one.state.timers["retry:a:2"].at != other.state.timers["retry:a:2"].at


def test_a_redelivered_retry_timer_does_not_start_the_next_attempt_early() -> None:
    d = run({"steps": [agent_step("a", retry={"limit": 3, "backoff": {"initial": "10s", "jitter": 0}})]})
    d.fail("a", retryable=True)
    d.fire_next_timer()  # starts attempt 2
    fired = d.applied[-1]
    d.fail("a", retryable=True)  # attempt 3 is due 20s later
    assert not d.replay(fired).changed
    # also as the runtime sends it today, without the time it was armed for
    assert not d.send({"type": "timer", "timer": fired["timer"]}, at=fired["at"]).changed
    assert not d.open_tasks()
    assert d.step("a").attempt == 2


def test_no_jitter_gives_the_exact_backoff() -> None:
    d = run(
        {
            "steps": [
                agent_step("a", retry={"limit": 3, "backoff": {"initial": "2s", "factor": 3, "jitter": 0}})
            ]
        }
    )
    d.fail("a", retryable=True)
    assert d.state.timers["retry:a:2"].at == T0 + 2
    d.fire_next_timer()
    d.fail("a", retryable=True)
    assert d.state.timers["retry:a:3"].at == T0 + 2 + 6


def test_a_fatal_error_is_not_retried() -> None:
    d = run({"steps": [agent_step("a", retry=RETRY)]})
    d.fail("a", retryable=False, kind="FatalError", message="bad input")
    st = d.step("a")
    assert st.phase == "Failed"
    assert st.attempt == 1 and not d.state.timers
    assert st.error == {"type": "FatalError", "message": "bad input", "retryable": False}
    assert st.message == "FatalError: bad input"
    assert d.phase == "Failed"
    assert d.state.message == "step a failed: FatalError: bad input"


def test_without_a_retry_policy_a_retryable_error_fails_the_step() -> None:
    d = run({"steps": [agent_step("a")]})
    d.fail("a", retryable=True)
    assert d.step("a").phase == "Failed"
    assert "retriesExhausted" not in (d.step("a").error or {})


def test_attempts_are_recorded_with_their_times_and_worker() -> None:
    d = run({"steps": [agent_step("a", timeout="1m", retry={"limit": 2, "backoff": {"jitter": 0}})]})
    d.now = T0 + 1
    d.started("a")
    d.now = T0 + 3
    d.fail("a", retryable=True, message="flaky")
    d.fire_next_timer()
    d.now += 1
    d.started("a")
    d.now += 2
    d.succeed("a", "fine")
    a1, a2 = d.step("a").attempts
    assert (a1.n, a1.queuedAt, a1.startedAt, a1.finishedAt, a1.outcome, a1.worker) == (
        1,
        T0,
        T0 + 1,
        T0 + 3,
        "Failed",
        "w1",
    )
    assert a1.error is not None and a1.error["message"] == "flaky"
    assert (a2.n, a2.queuedAt, a2.startedAt, a2.finishedAt, a2.outcome) == (
        2,
        T0 + 4,
        T0 + 5,
        T0 + 7,
        "Succeeded",
    )
    assert d.step("a").output == "fine"
    assert d.step("a").firstQueuedAt == T0


def test_the_attempt_records_are_capped() -> None:
    d = run({"steps": [agent_step("a", retry={"limit": 50, "backoff": {"initial": "0s"}})]})
    for _ in range(30):
        d.fail("a", retryable=True)
        d.fire_next_timer()
    assert d.task("a").attempt == 31
    assert len(d.step("a").attempts) == MAX_ATTEMPT_RECORDS
    assert d.step("a").attempts[-1].n == 31


def test_a_timed_out_attempt_is_cancelled_and_retried() -> None:
    d = run(
        {
            "steps": [
                agent_step("a", timeout="30s", retry={"limit": 1, "backoff": {"initial": "1s", "jitter": 0}})
            ]
        }
    )
    d.now += 2
    d.started("a")
    timer = d.state.timers["timeout:a:1"]
    assert timer.at == T0 + 2 + 30 + 1  # start-to-close, plus a grace for the agent's own report
    d.fire_next_timer()
    st = d.step("a")
    assert st.attempts[0].outcome == "TimedOut"
    assert st.attempts[0].error is not None and st.attempts[0].error["type"] == "Timeout"
    assert d.ops("cancelTasks")[-1]["body"] == {"run": "r1", "step": "a", "item": None}
    # the first attempt's late answer is dropped
    assert not d.succeed("a", "late").changed
    d.fire_next_timer()  # the retry
    assert d.task("a").attempt == 2
    assert "timeout:a:2" not in d.state.timers  # start-to-close: nothing runs until it starts
    d.started("a")
    d.fire_next_timer()  # times out again
    assert d.step("a").phase == "Failed"
    assert d.step("a").error is not None and d.step("a").error["retriesExhausted"] is True
    assert d.phase == "Failed"


def test_an_agent_reported_timeout_is_retried_too() -> None:
    d = run({"steps": [agent_step("a", timeout="5s", retry={"limit": 1})]})
    d.fail("a", retryable=True, kind="Timeout", timeout=True)
    assert d.step("a").attempts[0].outcome == "TimedOut"
    assert "timeout:a:1" not in d.state.timers
    assert d.state.timers["retry:a:2"].kind == "retry"


def test_the_timeout_counts_from_the_start_not_from_the_dispatch() -> None:
    """An attempt queued behind a busy agent is not timed out before it began (it would be
    retried, and the agent would later run the abandoned attempt too)."""
    d = run({"steps": [agent_step("a", timeout="10s")]})
    assert not d.state.timers
    d.now += 60  # queued for a minute
    d.started("a")
    assert d.state.timers["timeout:a:1"].at == T0 + 60 + 11
    d.fire_next_timer()
    assert d.step("a").phase == "Failed"
    assert d.step("a").attempts[0].outcome == "TimedOut"


def test_an_attempt_no_agent_starts_fails_on_its_queue_timeout_and_is_retried() -> None:
    d = run(
        {
            "steps": [
                agent_step(
                    "a",
                    queueTimeout="5s",
                    timeout="10s",
                    retry={"limit": 1, "backoff": {"initial": "1s", "jitter": 0}},
                )
            ]
        }
    )
    assert d.state.timers["queue:a:1"].at == T0 + 5
    d.lose("a")
    d.fire_next_timer()
    st = d.step("a")
    assert st.attempts[0].outcome == "TimedOut"
    assert st.attempts[0].error is not None and st.attempts[0].error["type"] == "QueueTimeout"
    d.fire_next_timer()  # the retry
    assert d.task("a").attempt == 2
    d.now += 1
    d.started("a")  # started in time: the queue timer is disarmed, the timeout armed
    assert "queue:a:2" not in d.state.timers
    assert d.state.timers["timeout:a:2"].at == d.now + 11
    d.succeed("a")
    assert d.phase == "Succeeded"


# --------------------------------------------------------------------------- heartbeats


def test_an_agent_that_stops_heartbeating_times_out() -> None:
    d = run(
        {"steps": [agent_step("a", heartbeatTimeout="10s", retry={"limit": 1, "backoff": {"jitter": 0}})]}
    )
    d.now += 1
    d.started("a")
    assert d.state.timers["heartbeat:a:1"].at == T0 + 11
    d.now = T0 + 6
    d.heartbeat("a")
    d.now = T0 + 9
    d.heartbeat("a")
    d.fire_next_timer()  # due at 11: a heartbeat came at 9, look again at 19
    assert d.step("a").phase == "Running"
    assert d.state.timers["heartbeat:a:1"].at == T0 + 19
    d.fire_next_timer()
    st = d.step("a")
    assert st.attempts[0].outcome == "TimedOut"
    assert st.attempts[0].error is not None and st.attempts[0].error["type"] == "HeartbeatTimeout"
    assert d.ops("cancelTasks")
    d.fire_next_timer()  # the retry
    assert d.task("a").attempt == 2


def test_an_agent_that_dies_after_starting_its_task_times_out_on_heartbeats() -> None:
    d = run({"steps": [agent_step("a", heartbeatTimeout="10s")]})
    d.started("a")
    d.lose("a")
    d.fire_next_timer()
    assert d.step("a").phase == "Failed"
    assert d.step("a").error is not None and d.step("a").error["type"] == "HeartbeatTimeout"


def test_a_redelivered_heartbeat_changes_nothing() -> None:
    d = run({"steps": [agent_step("a", heartbeatTimeout="10s")]})
    d.now += 3
    d.heartbeat("a")
    assert not d.replay(d.applied[-1]).changed
    assert not d.send({"type": "heartbeat", "step": "a", "item": None, "attempt": 1}, at=T0 + 1).changed


def test_a_redelivered_heartbeat_check_does_not_fail_the_attempt() -> None:
    d = run({"steps": [agent_step("a", heartbeatTimeout="10s")]})
    d.started("a")
    d.now += 5
    d.heartbeat("a")
    d.fire_next_timer()  # due at 10: re-armed at 15 under the same id
    check = d.applied[-1]
    assert d.state.timers["heartbeat:a:1"].at == T0 + 15
    assert not d.replay(check).changed
    assert d.step("a").phase == "Running"


# --------------------------------------------------------------------------- deadline


def test_the_workflow_deadline_fails_the_run() -> None:
    d = run({"steps": [agent_step("a"), agent_step("b"), agent_step("c", dependsOn=["a"])], "deadline": "1m"})
    assert d.state.timers["deadline"].at == T0 + 60
    d.succeed("b")
    d.advance(60)
    assert d.phase == "Failed"
    assert d.state.message == "deadline of 1m exceeded"
    assert d.phases() == {"a": "Cancelled", "b": "Succeeded", "c": "Skipped"}
    assert d.ops("cancelTasks")[-1]["body"] == {"run": "r1"}
    assert not d.state.timers
    assert not d.succeed("a").changed  # too late


def test_a_run_that_finishes_in_time_disarms_its_deadline() -> None:
    d = run({"steps": [agent_step("a")], "deadline": "1h"})
    d.succeed("a")
    assert d.phase == "Succeeded"
    assert not d.state.timers


# --------------------------------------------------------------------------- onFailure


def test_on_failure_fail_stops_the_run() -> None:
    d = run({"steps": [agent_step("a"), agent_step("b"), agent_step("c", dependsOn=["a"])]})
    d.fail("a")
    assert d.phase == "Failed"
    assert d.phases() == {"a": "Failed", "b": "Cancelled", "c": "Skipped"}
    assert d.ops("cancelTasks")
    assert transitions(d, None)[-1] == ("Running", "Failed")


def test_on_failure_continue_lets_dependents_run() -> None:
    d = run(
        {
            "steps": [
                agent_step("a", onFailure="continue"),
                agent_step("b", dependsOn=["a"], input="${{ steps.a.phase }}"),
            ]
        }
    )
    d.fail("a")
    assert d.task("b").body["input"] == "Failed"
    d.succeed("b")
    assert d.phase == "Succeeded"
    assert d.step("a").phase == "Failed"


def test_a_fallback_step_runs_only_when_its_step_fails() -> None:
    spec = {
        "steps": [
            agent_step("primary", onFailure="backup"),
            agent_step("backup", input={"why": "${{ steps.primary.error.message }}"}),
            agent_step("after", dependsOn=["primary"]),
        ]
    }
    happy = run(spec)
    assert [t.step for t in happy.open_tasks()] == ["primary"]
    happy.succeed("primary")
    happy.succeed("after")
    assert happy.phase == "Succeeded"
    assert happy.step("backup").phase == "Skipped"
    assert happy.step("backup").message == ""

    d = run(spec)
    d.fail("primary", message="down")
    assert [t.step for t in d.open_tasks()] == ["backup"]
    assert d.task("backup").body["input"] == {"why": "down"}
    assert d.step("backup").activated
    d.succeed("backup")
    assert d.step("primary").recoveredBy == "backup"
    d.succeed("after")
    assert d.phase == "Succeeded"


def test_a_failing_fallback_fails_the_run() -> None:
    d = run({"steps": [agent_step("a", onFailure="b"), agent_step("b"), agent_step("c", dependsOn=["a"])]})
    d.fail("a")
    d.fail("b")
    assert d.phase == "Failed"
    assert d.step("c").phase == "Skipped"


def test_a_skipped_fallback_does_not_recover_the_failure() -> None:
    d = run(
        {
            "steps": [
                agent_step("a", onFailure="b"),
                agent_step("b", when="input.recover"),
                agent_step("c", dependsOn=["a"]),
            ]
        },
        input={"recover": False},
    )
    d.fail("a")
    assert d.step("b").phase == "Skipped"
    assert d.phase == "Failed"
    assert d.step("c").phase == "Skipped"


# --------------------------------------------------------------------------- onExit


EXIT = {"agent": "notifier", "input": {"phase": "${{ run.phase }}", "a": "${{ steps.a.phase }}"}}


def test_on_exit_runs_after_success_and_sees_the_run_phase() -> None:
    d = run({"steps": [agent_step("a")], "onExit": EXIT, "output": "${{ steps.a.output }}"})
    d.succeed("a", 42)
    assert d.phase == "Running"  # until onExit is done
    assert d.state.exitPhase == "Succeeded"
    assert d.task("onExit").body["input"] == {"phase": "Succeeded", "a": "Succeeded"}
    assert d.task("onExit").agent == "notifier"
    d.succeed("onExit")
    assert d.phase == "Succeeded"
    assert d.state.outputs == 42
    assert d.step("onExit").phase == "Succeeded"


def test_on_exit_runs_after_failure() -> None:
    d = run({"steps": [agent_step("a"), agent_step("b", dependsOn=["a"])], "onExit": EXIT})
    d.fail("a")
    assert d.phase == "Running"
    assert d.task("onExit").body["input"] == {"phase": "Failed", "a": "Failed"}
    d.succeed("onExit")
    assert d.phase == "Failed"
    assert d.state.message == "step a failed: FatalError: boom"


def test_on_exit_is_retried_even_when_the_run_failed() -> None:
    d = run({"steps": [agent_step("a")], "onExit": {**EXIT, "retry": {"limit": 2}}})
    d.fail("a")
    d.fail("onExit", retryable=True)
    assert d.step("onExit").phase == "Running"
    d.fire_next_timer()
    assert d.task("onExit").attempt == 2
    d.succeed("onExit")
    assert d.phase == "Failed"


def test_a_failing_on_exit_does_not_change_the_run_phase() -> None:
    d = run({"steps": [agent_step("a")], "onExit": EXIT})
    d.succeed("a")
    d.fail("onExit")
    assert d.step("onExit").phase == "Failed"
    assert d.phase == "Succeeded"


# --------------------------------------------------------------------------- approvals


def approval_spec(**approval: Any) -> dict[str, Any]:
    return {
        "steps": [
            {"name": "refund_ok", "approval": {"message": "Refund?", **approval}},
            agent_step("refund", dependsOn=["refund_ok"], input="${{ steps.refund_ok.output }}"),
        ]
    }


def test_an_approval_records_who_when_and_the_comment() -> None:
    d = run(approval_spec())
    st = d.step("refund_ok")
    assert st.phase == "WaitingApproval"
    assert st.message == "Refund?"
    d.now += 5
    d.send({"type": "approval", "step": "refund_ok", "approved": True, "by": "alice", "comment": "fine"})
    st = d.step("refund_ok")
    assert st.phase == "Succeeded"
    assert st.approval == {"decision": "approved", "by": "alice", "at": T0 + 5, "comment": "fine"}
    assert d.task("refund").body["input"] == st.approval
    assert transitions(d, "refund_ok") == [("Pending", "WaitingApproval"), ("WaitingApproval", "Succeeded")]
    assert [a["actor"] for a in d.audit if a["step"] == "refund_ok"][-1] == "alice"


def test_a_rejection_fails_the_step() -> None:
    d = run(approval_spec())
    d.send({"type": "approval", "step": "refund_ok", "approved": False, "by": "bob", "comment": "no"})
    st = d.step("refund_ok")
    assert st.phase == "Failed"
    assert st.approval is not None and st.approval["decision"] == "rejected" and st.approval["by"] == "bob"
    assert st.error == {"type": "Rejected", "message": "rejected by bob: no"}
    assert d.phase == "Failed"
    assert d.step("refund").phase == "Skipped"


@pytest.mark.parametrize(
    ("on_timeout", "decision", "phase"),
    [("reject", "rejected", "Failed"), ("approve", "approved", "Succeeded")],
)
def test_an_approval_times_out(on_timeout: str, decision: str, phase: str) -> None:
    d = run(approval_spec(timeout="1h", onTimeout=on_timeout))
    assert d.state.timers["approval:refund_ok"].at == T0 + 3600
    d.advance(3600)
    st = d.step("refund_ok")
    assert st.phase == phase
    assert st.approval == {
        "decision": decision,
        "by": "timeout",
        "at": T0 + 3600,
        "comment": "no decision within 1h",
    }


def test_only_approvers_may_decide() -> None:
    d = run(approval_spec(approvers=["alice"]))
    dec = d.send({"type": "approval", "step": "refund_ok", "approved": True, "by": "mallory"})
    assert d.step("refund_ok").phase == "WaitingApproval"
    assert "not an approver" in dec.audit[0]["reason"]
    assert not d.replay(d.applied[-1]).changed  # a redelivery is not audited twice
    d.now += 1
    again = d.send({"type": "approval", "step": "refund_ok", "approved": True, "by": "mallory"})
    assert "not an approver" in again.audit[0]["reason"]  # a new attempt is
    d.send({"type": "approval", "step": "refund_ok", "approved": True, "by": "alice"})
    assert d.step("refund_ok").phase == "Succeeded"


def test_a_decision_for_a_step_that_does_not_wait_changes_nothing() -> None:
    d = run(approval_spec())
    assert not d.send({"type": "approval", "step": "refund", "approved": True, "by": "x"}).changed
    assert not d.send({"type": "approval", "step": "nope", "approved": True, "by": "x"}).changed
    d.send({"type": "approval", "step": "refund_ok", "approved": True, "by": "x"})
    assert not d.send({"type": "approval", "step": "refund_ok", "approved": False, "by": "y"}).changed
    assert d.step("refund_ok").approval is not None and d.step("refund_ok").approval["by"] == "x"


# --------------------------------------------------------------------------- cancellation


def test_cancelling_a_run_cancels_its_tasks() -> None:
    d = run({"steps": [agent_step("a"), agent_step("b"), agent_step("c", dependsOn=["a"])], "onExit": EXIT})
    d.succeed("b")
    d.send({"type": "cancel", "by": "carol", "reason": "wrong input"})
    assert d.state.cancelledBy == "carol"
    assert d.phases() == {"a": "Cancelled", "b": "Succeeded", "c": "Skipped", "onExit": "Running"}
    assert d.ops("cancelTasks") == [
        {"op": "cancelTasks", "subject": "cadenza.cancel.default.r1", "body": {"run": "r1"}}
    ]
    assert d.task("onExit").body["input"]["phase"] == "Cancelled"
    d.succeed("onExit")
    assert d.phase == "Cancelled"
    assert d.state.message == "cancelled by carol: wrong input"
    assert not d.send({"type": "cancel", "by": "dave"}).changed
    assert not d.succeed("a").changed


def test_cancelling_cancels_waiting_approvals_and_pending_retries() -> None:
    d = run({"steps": [{"name": "ok", "approval": {"timeout": "1h"}}, agent_step("a", retry={"limit": 3})]})
    d.fail("a", retryable=True)
    d.send({"type": "cancel", "by": "carol"})
    assert d.phase == "Cancelled"
    assert d.phases() == {"ok": "Cancelled", "a": "Cancelled"}
    assert not d.state.timers


def test_a_cancel_while_the_run_already_fails_changes_nothing() -> None:
    d = run({"steps": [agent_step("a"), agent_step("b")], "onExit": EXIT})
    d.fail("a")
    assert d.state.failing == "failed"
    assert not d.send({"type": "cancel", "by": "carol"}).changed
    d.succeed("onExit")
    assert d.phase == "Failed"
    assert d.state.cancelledBy is None


def test_a_cancel_while_on_exit_runs_after_success_changes_nothing() -> None:
    d = run({"steps": [agent_step("a")], "onExit": EXIT})
    d.succeed("a")
    assert not d.send({"type": "cancel", "by": "carol"}).changed
    d.succeed("onExit")
    assert d.phase == "Succeeded"


# --------------------------------------------------------------------------- signals


SIGNAL = {
    "steps": [
        agent_step("a"),
        {"name": "wait", "dependsOn": ["a"], "waitFor": {"signal": "go", "timeout": "5m"}},
        agent_step("b", dependsOn=["wait"], input="${{ steps.wait.output }}"),
    ]
}


def test_a_step_waits_for_its_signal() -> None:
    d = run(SIGNAL)
    d.succeed("a")
    assert d.step("wait").phase == "Running"
    assert d.step("wait").message == "waiting for signal go"
    assert d.state.timers["signal:wait"].at == T0 + 300
    d.send({"type": "signal", "name": "go", "payload": {"ok": 1}, "by": "ops"})
    assert d.step("wait").phase == "Succeeded"
    assert d.task("b").body["input"] == {"ok": 1}
    assert "signal:wait" not in d.state.timers


def test_a_signal_that_arrives_before_the_step_starts_is_kept() -> None:
    d = run(SIGNAL)
    d.send({"type": "signal", "name": "go", "payload": "early"})
    assert d.state.signals == {"go": "early"}
    assert d.step("wait").phase == "Pending"
    d.succeed("a")
    assert d.step("wait").phase == "Succeeded"
    assert d.task("b").body["input"] == "early"


def test_a_signal_that_does_not_come_in_time_fails_the_step() -> None:
    d = run(SIGNAL)
    d.succeed("a")
    d.advance(300)
    assert d.step("wait").phase == "Failed"
    assert d.phase == "Failed"


def test_a_signal_no_step_waits_for_is_not_kept() -> None:
    d = run(SIGNAL)
    assert not d.send({"type": "signal", "name": "spam-1", "payload": "x" * 1000}).changed
    assert d.state.signals == {}


def test_a_repeated_signal_changes_nothing() -> None:
    d = run(SIGNAL)
    d.send({"type": "signal", "name": "go", "payload": 1})
    assert not d.send({"type": "signal", "name": "go", "payload": 2}).changed
    assert d.state.signals == {"go": 1}


# --------------------------------------------------------------------------- sub-workflows


def test_a_sub_workflow_step_starts_a_child_and_completes_with_its_result() -> None:
    parent = run(
        {
            "steps": [
                {"name": "sub", "workflow": "child", "input": {"x": "${{ input.x }}"}},
                agent_step("after", dependsOn=["sub"], input="${{ steps.sub.output }}"),
            ]
        },
        input={"x": 5},
    )
    (start,) = parent.ops("startChild")
    assert start["run"] == "r1-sub-1"
    assert (start["workflow"], start["input"], start["scope"]) == ("child", {"x": 5}, "r1")
    assert start["parent"] == {"run": "r1", "namespace": "default", "step": "sub", "item": None, "attempt": 1}
    assert parent.step("sub").child == "r1-sub-1"

    child = Driver(
        compile_spec(
            {
                "steps": [agent_step("double", input="${{ input.x * 2 }}")],
                "output": {"y": "${{ steps.double.output }}"},
            },
            name="child",
        ),
        input=start["input"],
        run=start["run"],
        parent=start["parent"],
    )
    child.start()
    assert child.task("double").body["input"] == 10
    child.succeed("double", 10)
    assert child.phase == "Succeeded"
    (publish,) = child.ops("publish")
    assert publish["subject"] == "cadenza.event.default.r1"
    assert publish["msgId"] == "child:r1-sub-1"
    parent.send({k: v for k, v in publish["body"].items() if k != "run"})
    assert parent.step("sub").phase == "Succeeded"
    assert parent.task("after").body["input"] == {"y": 10}


def test_a_failed_child_fails_the_step() -> None:
    parent = run({"steps": [{"name": "sub", "workflow": "child"}]})
    child = Driver(
        compile_spec({"steps": [agent_step("x")]}, name="child"),
        run="r1-sub-1",
        parent=parent.ops("startChild")[0]["parent"],
    )
    child.start()
    child.fail("x", message="nope")
    body = child.ops("publish")[0]["body"]
    assert body["type"] == "failed"
    parent.send({k: v for k, v in body.items() if k != "run"})
    st = parent.step("sub")
    assert st.phase == "Failed"
    assert st.error is not None and st.error["type"] == "ChildFailed" and st.error["child"] == "r1-sub-1"
    assert parent.phase == "Failed"


def test_a_sub_workflow_attempt_times_out_and_is_retried_with_a_new_child() -> None:
    parent = run({"steps": [{"name": "sub", "workflow": "child", "timeout": "1m", "retry": {"limit": 1}}]})
    assert parent.state.timers["timeout:sub:1"].at == T0 + 61
    parent.fire_next_timer()
    (cancel,) = parent.ops("publish")
    assert cancel["body"]["run"] == "r1-sub-1" and cancel["body"]["type"] == "cancel"
    assert parent.step("sub").attempts[0].outcome == "TimedOut"
    parent.fire_next_timer()  # the retry
    assert [c["run"] for c in parent.ops("startChild")] == ["r1-sub-1", "r1-sub-2"]
    assert parent.step("sub").child == "r1-sub-2"
    parent.succeed("sub", {"ok": True})
    assert parent.phase == "Succeeded"


def test_cancelling_the_parent_cancels_the_child() -> None:
    parent = run({"steps": [{"name": "sub", "workflow": "child"}]})
    parent.send({"type": "cancel", "by": "carol"})
    (cancel,) = parent.ops("publish")
    assert cancel["subject"] == "cadenza.event.default.r1-sub-1"
    assert cancel["body"]["type"] == "cancel"


def test_cancelling_a_for_each_of_sub_workflows_cancels_every_child_in_flight() -> None:
    parent = run(
        {"steps": [{"name": "sub", "workflow": "child", "forEach": "input.xs", "maxParallel": 2}]},
        input={"xs": [1, 2, 3]},
    )
    assert [c["run"] for c in parent.ops("startChild")] == ["r1-sub-0-1", "r1-sub-1-1"]
    parent.send({"type": "cancel", "by": "carol"})
    assert sorted(c["body"]["run"] for c in parent.ops("publish")) == ["r1-sub-0-1", "r1-sub-1-1"]


def test_a_failed_child_item_cancels_its_sibling_children() -> None:
    parent = run(
        {"steps": [{"name": "sub", "workflow": "child", "forEach": "input.xs", "maxParallel": 2}]},
        input={"xs": [1, 2, 3]},
    )
    failed = {
        "type": "failed",
        "step": "sub",
        "item": 0,
        "attempt": 1,
        "worker": "run:r1-sub-0-1",
        "error": {"type": "ChildFailed", "message": "x", "retryable": False},
    }
    parent.send(failed)
    assert parent.step("sub").phase == "Failed"
    assert [c["body"]["run"] for c in parent.ops("publish")] == ["r1-sub-1-1"]


# --------------------------------------------------------------------------- outputs kept apart


def test_a_large_output_is_stored_apart_and_loaded_when_read() -> None:
    big = {"text": "x" * (INLINE_OUTPUT_BYTES + 10)}
    d = run(
        {
            "steps": [
                agent_step("a"),
                agent_step("b", dependsOn=["a"], input="${{ size(steps.a.output.text) }}"),
                agent_step("c", dependsOn=["b"]),
            ]
        }
    )
    dec = d.succeed("a", big)
    assert dec.stores == {"r1.a": big}
    assert d.step("a").output is None and d.step("a").outputRef == "r1.a"
    assert d.size() < 2048
    assert d.task("b").body["input"] == INLINE_OUTPUT_BYTES + 10
    d.forget()  # another engine takes over: it loads the output only when an expression reads it
    d.succeed("b")
    assert "r1.a" not in d.loaded
    d.succeed("c")
    assert d.phase == "Succeeded"


# --------------------------------------------------------------------------- audit and duplicates


def test_every_transition_is_audited_in_sequence() -> None:
    d = run({"steps": [agent_step("a", retry={"limit": 1}), agent_step("b", dependsOn=["a"], when="false")]})
    d.fail("a", retryable=True)
    d.fire_next_timer()
    d.succeed("a")
    assert [a["seq"] for a in d.audit] == list(range(1, len(d.audit) + 1))
    assert d.state.auditSeq == len(d.audit)
    assert [(a["step"], a["from"], a["to"]) for a in d.audit if a["from"] != a["to"]] == [
        (None, "Pending", "Running"),
        ("a", "Pending", "Running"),
        ("a", "Running", "Succeeded"),
        ("b", "Pending", "Skipped"),
        (None, "Running", "Succeeded"),
    ]
    retry = next(a for a in d.audit if a.get("retry"))
    assert retry["step"] == "a" and retry["attempt"] == 1 and "retry in" in retry["reason"]
    first = d.audit[0]
    assert {k: first[k] for k in ("run", "workflow", "namespace", "event", "actor", "at")} == {
        "run": "r1",
        "workflow": "wf",
        "namespace": "default",
        "event": "start",
        "actor": "engine",
        "at": T0,
    }
    assert next(a for a in d.audit if a["to"] == "Succeeded" and a["step"] == "a")["actor"] == "w1"


def test_replaying_any_applied_event_changes_nothing() -> None:
    d = run(
        {
            "steps": [
                agent_step("a", timeout="1m", heartbeatTimeout="10s", retry={"limit": 2}),
                {"name": "ok", "dependsOn": ["a"], "approval": {}},
                {"name": "sig", "dependsOn": ["a"], "waitFor": {"signal": "s"}},
                agent_step("each", dependsOn=["ok", "sig"], forEach="[1, 2, 3]", maxParallel=2),
            ],
            "onExit": EXIT,
        }
    )
    d.now += 1
    d.started("a")
    d.now += 5
    d.heartbeat("a")
    d.fire_next_timer()  # heartbeat check: re-armed
    d.fire_next_timer()  # heartbeat lost
    d.fire_next_timer()  # retry
    d.started("a")
    d.succeed("a", {"x": 1})
    d.send({"type": "approval", "step": "ok", "approved": True, "by": "u"})
    d.send({"type": "signal", "name": "s", "payload": 1})
    d.run_agents()
    assert d.phase == "Succeeded"
    final = d.state.to_bytes()
    for ev in list(d.applied):
        dec = d.replay(ev)
        assert not dec.changed, ev
    assert d.state.to_bytes() == final
    # ... and against the state right after each event, too
    replayer = Driver(d.wf)
    for i, ev in enumerate(d.applied):
        replayer.replay(ev)
        snapshot = replayer.state.to_bytes()
        for earlier in d.applied[max(0, i - 3) : i + 1]:
            assert not decide(replayer.state, earlier, d.wf, replayer.store).changed, (ev, earlier)
        assert replayer.state.to_bytes() == snapshot


def test_events_for_unknown_steps_or_attempts_change_nothing() -> None:
    d = run({"steps": [agent_step("a")]})
    for ev in (
        {"type": "result", "step": "a", "item": None, "attempt": 2, "output": 1},
        {"type": "result", "step": "zzz", "item": None, "attempt": 1},
        {"type": "failed", "step": "a", "item": 3, "attempt": 1, "error": {}},
        {"type": "timer", "timer": "retry:a:2"},
        {"type": "heartbeat", "step": "a", "item": None, "attempt": 7},
        {"type": "start"},
        {"type": "something-new"},
    ):
        assert not d.send(ev).changed, ev


def test_decide_does_not_mutate_its_input() -> None:
    wf = compile_spec({"steps": [agent_step("a")]})
    state = RunState(run="r", workflow="wf", definition=wf.key, createdAt=0)
    before = state.model_dump()
    dec = decide(state, {"type": "start", "at": 1.0}, wf)
    assert state.model_dump() == before
    assert dec.state.phase == "Running"


def test_the_driver_catches_a_decide_that_breaks_its_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's own checks (used by every test here) do fail on a broken decide."""
    from . import helpers

    def silent_change(*args: Any, **kwargs: Any) -> Any:
        dec = decide(*args, **kwargs)
        dec.state.message = "changed behind the caller's back"
        dec.changed = False
        dec.commands, dec.audit = [], []
        return dec

    def skipped_seq(*args: Any, **kwargs: Any) -> Any:
        dec = decide(*args, **kwargs)
        for rec in dec.audit:
            rec["seq"] += 1
        return dec

    for broken, message in (
        (silent_change, "unchanged decision changed the state"),
        (skipped_seq, "audit seq"),
    ):
        monkeypatch.setattr(helpers, "decide", broken)
        with pytest.raises(AssertionError, match=message):
            run({"steps": [agent_step("a")]})


# ------------------------------------------------------------- queue timers and claims


def queued(**fields: Any) -> Driver:
    step = agent_step(
        "a", queueTimeout="5s", timeout="10s", retry={"limit": 1, "backoff": {"initial": "1s", "jitter": 0}}
    )
    return run({"steps": [step]}, **fields)


def test_a_queue_timer_whose_attempt_an_agent_claimed_starts_it_instead_of_failing_it() -> None:
    """The agent claimed the attempt (cadenza.nats.claim_attempt) before the engine could;
    its start report has not arrived yet. The attempt is the one that runs: no retry,
    started when it was claimed, its timeout counting from then."""
    d = queued()
    claimed_at = T0 + 4.5
    decision = d.fire("queue:a:1", claimed=True, claimedBy="host:1", claimedAt=claimed_at)
    assert decision.changed
    st = d.step("a")
    assert (st.phase, st.attempt, st.running, st.startedAt) == ("Running", 1, True, claimed_at)
    assert (st.attempts[0].startedAt, st.attempts[0].worker, st.attempts[0].outcome) == (
        claimed_at,
        "host:1",
        None,
    )
    assert st.retries == 0 and "retry:a:2" not in d.state.timers and "queue:a:1" not in d.state.timers
    assert d.state.timers["timeout:a:1"].at == claimed_at + 11
    assert not d.started("a").changed  # the start report, arriving after, changes nothing
    assert not d.replay(d.applied[-1]).changed  # nor does the timer, redelivered
    d.succeed("a")
    assert d.phase == "Succeeded"
    assert [t.attempt for t in d.dispatched] == [1]


def test_a_claim_time_after_the_timer_counts_as_the_timer_time() -> None:
    d = queued()
    d.fire("queue:a:1", claimed=True, claimedBy="host:1", claimedAt=T0 + 60)  # a clock ahead
    assert d.step("a").startedAt == T0 + 5


def test_a_queue_timer_whose_attempt_the_engine_claimed_fails_it_and_retries() -> None:
    d = queued()
    d.fire("queue:a:1", claimed=False)
    st = d.step("a")
    assert st.attempts[0].outcome == "TimedOut"
    assert st.attempts[0].error is not None and st.attempts[0].error["type"] == "QueueTimeout"
    assert not d.replay(d.applied[-1]).changed  # the timer redelivered
    d.fire_next_timer()  # the retry
    assert d.task("a").attempt == 2
    assert "queue:a:2" in d.state.timers


def test_a_claimed_forEach_item_is_started_not_retried() -> None:
    d = run(
        {
            "steps": [
                agent_step("f", forEach="input.xs", maxParallel=2, queueTimeout="5s", heartbeatTimeout="3s")
            ]
        },
        input={"xs": [1, 2]},
    )
    d.fire("queue:f:0:1", claimed=True, claimedBy="host:1", claimedAt=T0 + 1)
    slot = d.step("f").forEach
    assert slot is not None and slot.running["0"].startedAt == T0 + 1 and slot.retries == 0
    assert d.state.timers["heartbeat:f:0:1"].at == T0 + 4
    d.fire("queue:f:1:1", claimed=False)  # no retry policy: the item fails
    each = d.step("f").forEach
    assert each is not None and each.failed == [1] and each.counts == {"Failed": 1}
