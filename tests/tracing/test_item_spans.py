"""The spans of forEach items' attempts, from decisions made by the real `decide` (the
in-memory driver of the control-layer tests) and carried as the run record's outbox
carries them (JSON, read back by `commands.from_wire`): one span per attempt of each
item, under the step, with its waiting and executing inside; the trace context of an
item's task names that span; ids any engine derives alike; and the record keeps no
attempts of items, with traces on as off."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from cadenza_operator.engine import commands
from cadenza_operator.engine.decide import Decision, outbox
from cadenza_operator.engine.decide.attempts import SPAN_ERROR_CHARS
from cadenza_operator.engine.definition import CompiledWorkflow
from cadenza_operator.engine.state import RunState
from cadenza_operator.engine.tracing import SpanData, finished_spans, span_id, trace_id, traceparent

from ..unit.helpers import T0, Driver, Failure, Task, agent_step, compile_spec


def each(
    window: int = 3, over: str = "input.xs", before: tuple[dict[str, Any], ...] = (), **fields: Any
) -> CompiledWorkflow:
    """A forEach step `each` (after the steps `before`), an item retried once after 1 s."""
    return compile_spec(
        {
            "steps": [
                *before,
                agent_step(
                    "each",
                    forEach=over,
                    maxParallel=window,
                    input={"x": "${{ item }}"},
                    retry={"limit": 1, "backoff": {"initial": "1s"}},
                    **fields,
                ),
            ]
        }
    )


def carried(decision: Decision) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The audit records and item attempts of a decision, as an engine reads them from the
    stored outbox (the one that wrote it, or one that takes the run over)."""
    records: list[dict[str, Any]] = []
    ended: list[dict[str, Any]] = []
    for cmd in map(commands.from_wire, json.loads(json.dumps(outbox(decision)))):
        if isinstance(cmd, commands.Audit):
            records += cmd.records
            ended += cmd.item_attempts
    return records, ended


@dataclass
class Traced(Driver):
    """The driver as an engine with traces on: the spans each decision finished."""

    trace: bool = True
    spans: list[SpanData] = field(default_factory=list)
    outbox_bytes: int = 0  # the largest outbox a decision left in the record

    def send(self, event: dict[str, Any], at: float | None = None) -> Decision:
        decision = super().send(event, at)
        self.outbox_bytes = max(self.outbox_bytes, len(json.dumps(outbox(decision))))
        self.spans += finished_spans(decision.state, *carried(decision))
        return decision

    def named(self, name: str) -> SpanData:
        (span,) = [s for s in self.spans if s.name == name]
        return span


def retried_item(run: str = "r1") -> Traced:
    """Three items at once; item 1 fails, is retried after its backoff and succeeds."""
    d = Traced(each(), input={"xs": ["a", "b", "c"]}, run=run)
    d.start()
    d.now = T0 + 1
    for i in range(3):
        d.started("each", item=i)
    d.now = T0 + 2
    d.fail("each", item=1, retryable=True, kind="RuntimeError", message="item 1 broke")
    d.advance(5)  # the retry timer fires: attempt 2 of item 1 is dispatched
    d.started("each", item=1)
    d.now += 3
    for i in (0, 2, 1):
        d.succeed("each", {"i": i}, item=i)
    assert d.phase == "Succeeded"
    return d


def inside(child: SpanData, parent: SpanData) -> None:
    assert parent.start <= child.start <= child.end <= parent.end, (child, parent)


def test_each_attempt_of_each_item_is_a_span_under_the_step_with_its_waiting_and_executing() -> None:
    d = retried_item()
    step = d.named("step each")
    attempts = [s for s in d.spans if s.name.startswith("attempt ")]
    assert sorted(s.name for s in attempts) == [
        "attempt each#0 #1",
        "attempt each#1 #1",
        "attempt each#1 #2",
        "attempt each#2 #1",
    ]
    failed, retried = d.named("attempt each#1 #1"), d.named("attempt each#1 #2")
    assert failed.error == "item 1 broke" and failed.attributes["outcome"] == "Failed"
    assert failed.attributes["error.type"] == "RuntimeError"
    assert retried.error is None and retried.attributes["outcome"] == "Succeeded"
    assert failed.end <= retried.start
    # Attempt 2 was ready when its backoff ended, not when the step started.
    assert T0 + 2 < retried.start <= T0 + 3  # 1 s less jitter
    for a in attempts:
        item, n = a.attributes["cadenza.item"], a.attributes["cadenza.attempt"]
        assert a.span_id == span_id("r1", "attempt", "each", item, n)
        assert a.parent_id == step.span_id and a.trace_id == trace_id("r1")
        assert a.attributes["cadenza.worker"] == "w1" and a.attributes["cadenza.step"] == "each"
        inside(a, step)
        kids = {s.name: s for s in d.spans if s.parent_id == a.span_id}
        assert set(kids) == {"waiting", "executing"}, a.name
        for kid in kids.values():
            inside(kid, a)
            assert kid.attributes["cadenza.item"] == item and kid.trace_id == a.trace_id
        assert kids["waiting"].end == kids["executing"].start  # the agent's start splits them
        assert [name for name, _ in kids["waiting"].events] == ["queued"]
    # Every span once, though the step's and the run's decisions came with the last item.
    assert len({s.span_id for s in d.spans}) == len(d.spans) == 4 * 3 + 2
    assert step.attributes["cadenza.foreach.succeeded"] == 3 and step.start == T0


def test_an_item_tasks_trace_context_names_that_item_attempts_span() -> None:
    d = retried_item()
    made = {s.span_id: s for s in d.spans}
    items = [t for t in d.dispatched if t.item is not None]
    assert len(items) == 4
    for task in items:
        parent = int(traceparent(d.state, task.step, task.item, task.attempt).split("-")[2], 16)
        span = made[parent]  # a span that is made, so the agent's handler nests under it
        assert span.name == f"attempt each#{task.item} #{task.attempt}"


def test_another_engine_makes_the_same_ids_and_times() -> None:
    def key(s: SpanData) -> tuple[Any, ...]:
        return (s.name, s.trace_id, s.span_id, s.parent_id, s.start, s.end, s.error)

    assert [key(s) for s in retried_item().spans] == [key(s) for s in retried_item().spans]
    other_run = {s.span_id for s in retried_item("r2").spans}
    assert other_run.isdisjoint(s.span_id for s in retried_item().spans)


def test_items_in_flight_when_one_fails_end_cancelled_and_the_failed_one_in_error() -> None:
    d = Traced(each(), input={"xs": ["a", "b", "c"]})
    d.start()
    d.now = T0 + 1
    d.started("each", item=2)  # item 1 never started: it waited all its attempt
    d.now = T0 + 4
    d.fail("each", item=0, retryable=False, message="fatal")
    assert d.phase == "Failed"
    item0, item1, item2 = (d.named(f"attempt each#{i} #1") for i in range(3))
    assert item0.error == "fatal" and d.named("step each").error is not None
    for cancelled in (item1, item2):
        assert cancelled.error is None and cancelled.attributes["outcome"] == "Cancelled"
        assert cancelled.end == T0 + 4
    assert {s.name for s in d.spans if s.parent_id == item1.span_id} == {"waiting"}
    assert {s.name for s in d.spans if s.parent_id == item2.span_id} == {"waiting", "executing"}


def test_a_timed_out_item_attempt_is_in_error() -> None:
    d = Traced(each(timeout="10s"), input={"xs": ["a"]})
    d.start()
    d.started("each", item=0)
    d.advance(30)  # the engine's timeout timer ends attempt 1; attempt 2 follows the backoff
    timed_out = d.named("attempt each#0 #1")
    assert timed_out.attributes["outcome"] == "TimedOut" and timed_out.error is not None
    d.run_agents()
    assert d.named("attempt each#0 #2").error is None and d.phase == "Succeeded"


def test_an_item_attempts_long_error_is_kept_short_for_its_span() -> None:
    d = Traced(each(), input={"xs": ["a"]})
    d.start()
    d.fail("each", item=0, retryable=True, message="x" * 10_000)
    d.advance(5)
    (ended,) = carried(d.fail("each", item=0, retryable=True, message="y" * 10_000))[1]
    assert ended["error"] == {"type": "RetryableError", "message": "y" * SPAN_ERROR_CHARS}
    assert d.named("attempt each#0 #1").error == "x" * SPAN_ERROR_CHARS


def test_traces_off_keep_nothing_of_item_attempts_and_on_the_record_is_the_same() -> None:
    d = Driver(each(), input={"xs": ["a", "b", "c"]})  # trace=False: an engine with traces off
    d.start()
    decision = d.succeed("each", "out", item=0)
    assert decision.item_attempts == []
    assert "itemAttempts" not in json.dumps(outbox(decision))
    # On, the record each decision writes is byte for byte what it is off: item attempts
    # live only in the decision's outbox.
    on, off = Traced(each(), input={"xs": ["a", "b", "c"]}), Driver(each(), input={"xs": ["a", "b", "c"]})
    for driver in (on, off):
        driver.start()
        driver.fail("each", item=1, retryable=True)
        driver.succeed("each", "out", item=0)
    assert on.state.to_bytes() == off.state.to_bytes()
    assert len(on.spans) == 2 * 2  # item 1's and item 0's attempts, each with its waiting


def test_an_outbox_from_before_item_attempts_still_reads() -> None:
    old = {"op": "audit", "records": [{"seq": 1, "step": "each"}]}
    cmd = commands.from_wire(old)
    assert isinstance(cmd, commands.Audit) and cmd.item_attempts == [] and cmd.wire() == old


def test_ten_thousand_items_with_traces_on_leave_the_record_as_small_as_a_hundred() -> None:
    # The list comes from a step's output, kept apart from the record (as a list this long
    # is), so that the record holds nothing that grows with the count but the counts.
    wf = each(window=50, over="steps.make.output", before=(agent_step("make"),), dependsOn=["make"])

    def drive(n: int) -> Traced:
        d = Traced(wf, parse_every=100)
        d.start()
        fail_once: set[int] = set()

        def behave(task: Task) -> Any:
            if task.step == "make":
                return list(range(n))
            if task.item in (7, n - 7) and task.item not in fail_once:
                fail_once.add(task.item)
                return Failure(retryable=True)
            return task.item

        d.run_agents(behave)
        assert d.phase == "Succeeded"
        return d

    small, large = drive(100), drive(10_000)
    assert sum(s.name.startswith("attempt each#") for s in large.spans) == 10_000 + 2
    # The record and the outbox of a decision hold no attempts of items: what grows with
    # the count is the digits of a few numbers.
    assert large.max_size < small.max_size + 200, (large.max_size, small.max_size)
    assert large.outbox_bytes < small.outbox_bytes + 200, (large.outbox_bytes, small.outbox_bytes)


def test_the_child_run_of_a_workflow_items_attempt_is_under_that_attempt() -> None:
    wf = compile_spec({"steps": [{"name": "sub", "workflow": "child", "forEach": "input.xs"}]})
    d = Traced(wf, input={"xs": ["a", "b"]})
    d.start()
    d.succeed("sub", "out", item=1)  # the child run of item 1 ended
    attempt = d.named("attempt sub#1 #1")
    child = RunState(run="r1-c", workflow="child", definition="child", createdAt=T0, scope="r1")
    child.parent = {"run": "r1", "namespace": "default", "step": "sub", "item": 1, "attempt": 1}
    child.phase, child.finishedAt = "Succeeded", T0 + 1
    (run_span,) = finished_spans(child, [{"step": None, "from": "Running", "to": "Succeeded", "at": T0 + 1}])
    assert run_span.parent_id == attempt.span_id and run_span.trace_id == attempt.trace_id
