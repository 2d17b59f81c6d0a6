"""Which spans a committed decision finishes, from its audit records and the record it
wrote (engine/tracing.py, pure): ids that any engine derives alike, one span per thing
finished, children inside their parents whatever the two clocks say."""

from __future__ import annotations

import pytest
from cadenza_operator.engine.state import Attempt, RunState, StepState, Usage
from cadenza_operator.engine.tracing import (
    SpanData,
    attempt_parent,
    enabled,
    finished_spans,
    span_id,
    trace_id,
    traceparent,
)


def state(**steps: StepState) -> RunState:
    return RunState(
        run="r1", workflow="wf", definition="wf", createdAt=100.0, startedAt=100.0, scope="root", steps=steps
    )


def rec(step: str | None, old: str | None, new: str | None, **extra: object) -> dict[str, object]:
    return {"step": step, "from": old, "to": new, "at": 200.0, **extra}


def names(spans: list[SpanData]) -> list[str]:
    return [s.name for s in spans]


RETRIED = StepState(
    phase="Succeeded",
    finishedAt=130.0,
    attempts=[
        Attempt(
            n=1,
            readyAt=101.0,
            queuedAt=102.0,
            startedAt=103.0,
            finishedAt=110.0,
            outcome="Failed",
            error={"type": "RuntimeError", "message": "boom"},
        ),
        Attempt(
            n=2,
            readyAt=111.0,
            queuedAt=111.0,
            startedAt=112.0,
            finishedAt=130.0,
            outcome="Succeeded",
            usage=Usage(inputTokens=3),
        ),
    ],
)


def test_a_retried_attempt_then_the_step_each_once_with_the_failure_as_error() -> None:
    retried = RETRIED.model_copy(deep=True)
    retried.phase, retried.finishedAt, retried.retryAt = "Running", None, 111.0
    retried.attempts[1].finishedAt = retried.attempts[1].outcome = None
    first = finished_spans(state(a=retried), [rec("a", "Running", "Running", attempt=1, retry=True)])
    assert names(first) == ["attempt a #1", "waiting", "executing"]
    attempt = first[0]
    assert attempt.error == "boom" and attempt.attributes["error.type"] == "RuntimeError"
    assert attempt.parent_id == span_id("r1", "step", "a")
    # The step ends: its last attempt and the step itself, not the first attempt again.
    done = finished_spans(state(a=RETRIED), [rec("a", "Running", "Succeeded")])
    assert names(done) == ["attempt a #2", "waiting", "executing", "step a"]
    assert done[0].error is None and done[0].attributes["cadenza.usage.input_tokens"] == 3
    step = done[-1]
    assert (step.start, step.end, step.parent_id) == (101.0, 130.0, span_id("r1", "run"))


def test_a_step_cancelled_during_its_backoff_does_not_make_its_last_attempt_again() -> None:
    waiting = RETRIED.model_copy(deep=True)
    waiting.attempts = waiting.attempts[:1]
    waiting.phase, waiting.retryAt = "Cancelled", 111.0
    spans = finished_spans(state(a=waiting), [rec("a", "Running", "Cancelled")])
    assert names(spans) == ["step a"]


def test_an_attempt_named_twice_in_one_decision_is_made_once() -> None:
    failed = RETRIED.model_copy(deep=True)
    failed.attempts[1].outcome = "TimedOut"
    failed.phase = "Failed"
    records = [rec("a", "Running", "Failed", attempt=2, outcome="TimedOut")]
    spans = finished_spans(state(a=failed), records)
    assert names(spans) == ["attempt a #2", "waiting", "executing", "step a"]
    assert spans[0].error == "TimedOut" and spans[-1].error is not None


def test_the_run_span_is_the_root_of_a_root_run_and_under_the_parent_attempt_of_a_child() -> None:
    root = state()
    root.phase, root.finishedAt = "Failed", 150.0
    (span,) = finished_spans(root, [rec(None, "Running", "Failed")])
    assert span.parent_id is None and span.error is not None and span.trace_id == trace_id("root")
    child = state()
    child.run, child.phase, child.finishedAt = "r1-c", "Succeeded", 150.0
    child.parent = {"run": "r1", "namespace": "default", "step": "c", "item": None, "attempt": 2}
    (span,) = finished_spans(child, [rec(None, "Running", "Succeeded")])
    assert span.parent_id == span_id("r1", "attempt", "c", None, 2) and span.error is None
    assert span.trace_id == trace_id("root")  # the root's trace, not one of its own


def test_forged_records_and_unchanged_phases_finish_nothing() -> None:
    spans = finished_spans(
        state(a=RETRIED),
        [rec("a", "Running", "Succeeded", forged=True, attempt=2), rec("a", "Succeeded", "Succeeded")],
    )
    assert spans == []


def test_times_from_two_clocks_are_clamped_into_the_attempt() -> None:
    skewed = StepState(
        phase="Succeeded",
        finishedAt=120.0,
        # The agent's clock is behind the engine's: it says it started before it was ready.
        attempts=[
            Attempt(
                n=1, readyAt=110.0, queuedAt=111.0, startedAt=105.0, finishedAt=108.0, outcome="Succeeded"
            )
        ],
    )
    attempt, waiting, executing, _ = finished_spans(state(a=skewed), [rec("a", "Running", "Succeeded")])
    for child in (waiting, executing):
        assert attempt.start <= child.start <= child.end <= attempt.end
        assert child.parent_id == attempt.span_id
    assert waiting.end <= executing.start


def test_ids_are_the_same_for_every_engine_and_distinct_per_thing() -> None:
    ids = {
        span_id("r1", "run"),
        span_id("r1", "step", "a"),
        span_id("r1", "attempt", "a", None, 1),
        span_id("r1", "attempt", "a", None, 2),
        span_id("r1", "attempt", "a", 0, 1),
        span_id("r2", "attempt", "a", None, 1),
        span_id("r1", "waiting", "a", None, 1),
    }
    assert len(ids) == 7 and span_id("r1", "step", "a") == span_id("r1", "step", "a")
    tp = traceparent(state(), "a", None, 2)
    assert tp == f"00-{trace_id('root'):032x}-{span_id('r1', 'attempt', 'a', None, 2):016x}-01"
    # A forEach item's work nests under that item's attempt, not under the step.
    assert attempt_parent("r1", "a", 3, 1) == span_id("r1", "attempt", "a", 3, 1)
    assert len({attempt_parent("r1", "a", i, n) for i in (None, 0, 3) for n in (1, 2)}) == 6


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
    ],
)
def test_traces_are_on_only_when_the_standard_variables_say_so(env: dict[str, str], on: bool) -> None:
    from cadenza import _tracing

    assert enabled(env) is on
    assert _tracing.enabled(env) is on  # the agent's twin agrees
