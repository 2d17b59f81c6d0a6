"""`cadenza diagnose`'s analysis, pure: synthetic run records in, a report out.

Each test builds the records that would break one promise: a step that waits more than it
executes, outputs that differ for one input (and the same outputs that must not be
flagged), retries that rise only with load (and a constant rate that must not be), a
history the record keeps only in part, and 10,000 runs of 10 steps.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tracemalloc

import pytest
from cadenza_operator.engine.state import Attempt, ForEachState, RunState, StepState, Timing, attempt_stages
from cadenza_operator.observe.diagnose import (
    MIN_LOAD_SAMPLES,
    Report,
    analyse,
    render,
    report_from_answer,
    top_traced_runs,
)
from cadenza_operator.observe.web.app import _templates
from rich.console import Console

NOW = 100_000.0


def attempt(
    n: int,
    ready: float,
    started: float | None,
    finished: float | None,
    outcome: str = "Succeeded",
    inp: str | None = "in",
    out: str | None = "out",
) -> Attempt:
    return Attempt(
        n=n,
        readyAt=ready,
        queuedAt=ready,
        startedAt=started,
        finishedAt=finished,
        outcome=outcome if finished is not None else None,
        inputHash=inp,
        outputHash=out if outcome == "Succeeded" else None,
    )


def step(*attempts: Attempt, retries: int | None = None, first: float | None = None) -> StepState:
    timing = Timing()
    for a in attempts:
        if a.finishedAt is not None:
            timing.add(*attempt_stages(a.readyAt, a.queuedAt, a.startedAt, a.finishedAt))
    failed = sum(a.outcome in ("Failed", "TimedOut") for a in attempts)
    return StepState(
        phase="Succeeded",
        attempt=len(attempts),
        attempts=list(attempts),
        retries=failed if retries is None else retries,
        timing=timing if timing.attempts else None,
        firstQueuedAt=first if first is not None else (attempts[0].queuedAt if attempts else None),
    )


def run(
    rid: str, start: float, end: float | None, steps: dict[str, StepState], audit: int = 0, wf: str = "wf"
) -> RunState:
    return RunState(
        run=rid,
        namespace="ns",
        workflow=wf,
        definition="d",
        phase="Succeeded" if end is not None else "Running",
        createdAt=start,
        startedAt=start,
        finishedAt=end,
        steps=steps,
        auditSeq=audit,
    )


def simple(rid: str, t: float, **steps: StepState) -> RunState:
    return run(rid, t, t + 50, dict(steps))


def test_a_step_that_waits_more_than_it_executes_is_flagged_with_sums_and_percentiles() -> None:
    t = NOW - 1000
    runs = [
        simple(
            f"r{i}",
            t + i,
            queued=step(attempt(1, t + i, t + i + 4 + i, t + i + 5 + i)),  # waits 4+i s, runs 1 s
            busy=step(attempt(1, t + i, t + i + 0.1, t + i + 2.1)),  # waits 0.1 s, runs 2 s
        )
        for i in range(5)
    ]
    report = analyse(runs, {}, NOW)
    assert report.waiting_steps == ["queued"]
    queued = next(s for s in report.steps if s.step == "queued")
    assert queued.waiting.total == pytest.approx(4 + 5 + 6 + 7 + 8)
    assert queued.executing.total == pytest.approx(5.0)
    assert (queued.waiting.p50, queued.waiting.p95) == (pytest.approx(6.0), pytest.approx(8.0))
    assert queued.executing.p50 == pytest.approx(1.0)
    out = report.to_dict()
    assert out["waiting"]["flagged"] == ["queued"]
    assert out["steps"][0]["step"] == "busy" and out["steps"][0]["waitingExceedsExecuting"] is False


def test_too_few_attempts_are_not_flagged_as_waiting() -> None:
    runs = [simple("r0", NOW - 10, queued=step(attempt(1, NOW - 10, NOW - 5, NOW - 4)))]
    assert analyse(runs, {}, NOW).waiting_steps == []


def test_identical_inputs_with_identical_outputs_are_not_flagged() -> None:
    runs = [
        simple(f"r{i}", NOW - 100 + i, same=step(attempt(1, NOW - 100 + i, NOW - 99 + i, NOW - 98 + i)))
        for i in range(30)
    ]
    report = analyse(runs, {}, NOW)
    assert report.nondeterministic == []
    assert report.to_dict()["nondeterminism"]["stepsCompared"] == ["same"]


def test_outputs_that_differ_for_one_input_are_flagged_with_example_runs() -> None:
    runs = []
    for i in range(12):
        t = NOW - 100 + i
        runs.append(
            simple(
                f"r{i:02}",
                t,
                # same input every run, a different output every third run
                random=step(attempt(1, t, t + 1, t + 2, out=f"o{i % 3}")),
                # different inputs, different outputs: deterministic
                keyed=step(attempt(1, t, t + 1, t + 2, inp=f"i{i}", out=f"o{i}")),
                # failed then succeeded with the same output: the failure has no output
                flaky=step(attempt(1, t, t + 1, t + 1, "Failed"), attempt(2, t + 2, t + 2, t + 3)),
            )
        )
    report = analyse(runs, {}, NOW)
    out = report.to_dict()["nondeterminism"]
    assert out["flagged"] == ["random"]
    (nd,) = out["steps"]
    assert nd["attemptsCompared"] == 12 and nd["inputsWithDifferentOutputs"] == 1
    (group,) = nd["examples"]
    assert group["inputHash"] == "in"
    assert [(o["outputHash"], o["count"], o["runs"]) for o in group["outputs"]] == [
        ("o0", 4, ["r00", "r03", "r06"]),  # example runs capped at 3
        ("o1", 4, ["r01", "r04", "r07"]),
        ("o2", 4, ["r02", "r05", "r08"]),
    ]
    assert report.retrying_steps == ["flaky"]


def load_runs(n_calm: int, n_busy: int) -> list[RunState]:
    """n_calm runs one after another (load 1), then n_busy runs all in flight at once
    (load up to n_busy). Step `loady` retries only under load; `steady` every third run."""
    runs = []
    base = NOW - 3500  # inside the default window
    for i in range(n_calm + n_busy):
        busy = i >= n_calm
        start = base + 2000 + i * 0.01 if busy else base + i * 10
        end = base + 2100 if busy else start + 1
        loady = step(attempt(1, start, start, start + 0.5, "Failed"), attempt(2, start, start, start + 0.5))
        calm = step(attempt(1, start, start, start + 0.5))
        steady_retry = i % 3 == 0
        steady = loady if steady_retry else calm
        runs.append(run(f"r{i:04}", start, end, {"loady": loady if busy else calm, "steady": steady}))
    return runs


def test_retries_that_happen_only_under_load_are_flagged_a_constant_rate_is_not() -> None:
    report = analyse(load_runs(100, 100), {}, NOW)
    assert report.load_steps == ["loady"]
    loady = next(s for s in report.steps if s.step == "loady")
    assert loady.loadCompared and loady.retriesRiseWithLoad and not loady.timeoutsRiseWithLoad
    # The first of the busy runs started alone (load 1): the low half's only retry.
    assert (loady.low.retried, loady.low.maxLoad) == (1, 1)
    assert loady.high.retried == loady.high.executions == 99
    steady = next(s for s in report.steps if s.step == "steady")
    assert steady.loadCompared and not steady.rises_with_load
    # Both retry: both are flagged for their rate, only one for load.
    assert report.retrying_steps == ["loady", "steady"]
    assert "median load" in report.to_dict()["load"]["rule"]


def test_a_small_sample_is_not_flagged_for_load() -> None:
    n = MIN_LOAD_SAMPLES - 1  # each half one short of the minimum
    report = analyse(load_runs(n, n), {}, NOW)
    assert report.load_steps == []
    assert all(not s.loadCompared for s in report.steps)


def test_timeouts_are_counted_and_rise_with_load_too() -> None:
    runs = load_runs(60, 60)
    for r in runs[60:]:
        st = r.steps["steady"]
        st.attempts[0].outcome = "TimedOut"
        st.attempts[0].outputHash = None
        st.attempts.append(attempt(2, r.createdAt, r.createdAt, r.createdAt + 1))
        st.attempt = 2
        st.retries = 1
    report = analyse(runs, {}, NOW)
    steady = next(s for s in report.steps if s.step == "steady")
    assert steady.timeouts == 60 and steady.timeoutsRiseWithLoad
    assert report.to_dict()["steps"][1]["timeoutRate"] == pytest.approx(60 / steady.attemptsRecorded)


def test_a_partial_history_is_used_and_said() -> None:
    t = NOW - 100
    capped = step(*[attempt(n, t, t, t + 1, "Failed") for n in range(6, 25)], attempt(25, t, t, t + 1))
    capped.attempt, capped.retries = 25, 24  # 25 attempts made, the last 20 kept
    capped.timing = Timing(executing=25.0, attempts=25)
    each = StepState(
        phase="Succeeded",
        forEach=ForEachState(total=100, next=100, counts={"Succeeded": 100}, retries=3),
        retries=3,
        timing=Timing(scheduling=2.0, queued=3.0, executing=50.0, attempts=103),
    )
    old = step(attempt(1, t, t + 1, t + 2, inp=None, out=None))  # an older engine: no hashes
    runs = [run("r1", t, t + 10, {"capped": capped, "each": each, "old": old}), run("r2", t, None, {})]
    report = analyse(runs, {}, NOW)
    out = report.to_dict()
    by_step = {s["step"]: s for s in out["steps"]}
    assert by_step["capped"]["attempts"] == 25 and by_step["capped"]["attemptsRecorded"] == 20
    assert by_step["capped"]["retries"] == 24 and by_step["capped"]["historyCapped"] == 1
    assert (
        by_step["each"]["forEach"] and by_step["each"]["attempts"] == 103 and by_step["each"]["retries"] == 3
    )
    assert by_step["each"]["waiting"] == {"total": 5.0, "p50": None, "p95": None}
    assert out["nondeterminism"]["attemptsWithoutHashes"] == 1
    notes = " | ".join(out["notes"])
    assert "1 run(s) still running" in notes
    assert "capped at 20 per step in: capped (1)" in notes
    assert "forEach steps keep counts only for their items (each)" in notes
    assert "1 succeeded attempt(s) carry no input/output hash" in notes
    assert out["runs"] == {"total": 2, "byPhase": {"Running": 1, "Succeeded": 1}}


def test_runs_outside_the_window_or_of_another_workflow_are_left_out_but_count_for_load() -> None:
    old = run("old", NOW - 7200, None, {"a": step(attempt(1, NOW - 7200, NOW - 7200, NOW - 7199))})
    other = run("other", NOW - 10, NOW - 5, {}, wf="other")
    new = run("new", NOW - 10, NOW - 5, {"a": step(attempt(1, NOW - 10, NOW - 10, NOW - 9))})
    report = analyse([old, new, other], {}, NOW, workflow="wf", since=3600)
    assert report.runs == 1
    assert analyse([], {}, NOW, workflow="wf", namespace="ns").to_dict()["runs"]["total"] == 0
    # `old` is still running: with it known, `new` ran at load 2.
    with_old = analyse([new], {}, NOW, load_records=[old, new], since=3600)
    assert with_old.steps[0].low.minLoad is None  # too few to split, but measured:
    assert with_old.steps[0].executions == 1


def test_audit_counts_top_runs_and_the_steps_that_dominate_them() -> None:
    runs = [simple(f"r{i:02}", NOW - 100 + i) for i in range(15)]
    for i, r in enumerate(runs):
        r.auditSeq = 10 + i
    counts = {r.run: r.auditSeq // 2 for r in runs}
    steps = {"r14": {"chatty": 20, "": 4}, "r13": {"chatty": 19, "quiet": 4}}
    report = analyse(runs, counts, NOW, audit_steps=steps)
    trace = report.to_dict()["trace"]
    assert trace["auditRecords"] == sum(range(10, 25))
    assert trace["auditMessages"] == sum(counts.values())
    assert [r["run"] for r in trace["topRuns"]] == [f"r{i:02}" for i in range(14, 4, -1)]
    assert trace["topRuns"][0] == {
        "run": "r14",
        "auditRecords": 24,
        "auditMessages": 12,
        "steps": {"chatty": 20, "": 4},
    }
    assert trace["topRuns"][2]["steps"] is None  # not read
    assert trace["steps"][0] == {"step": "chatty", "records": 39, "share": pytest.approx(39 / 47)}
    assert top_traced_runs(runs, NOW, 3600, 2) == ["r14", "r13"]
    # The stream not read: said, not guessed.
    assert analyse(runs, None, NOW).to_dict()["trace"]["auditMessages"] is None


@pytest.mark.timeout(300)
def test_ten_thousand_runs_of_ten_steps_in_bounded_memory_and_output() -> None:
    # Built without validation (model_construct): the records are the test's input, and
    # validating a million fields would take longer than the analysis under test.
    runs = []
    timing = Timing.model_construct(queued=0.01, executing=0.19, attempts=1, scheduling=0.0)
    for i in range(10_000):
        t = NOW - 3000 + i * 0.25
        steps = {}
        for k in range(10):
            a = Attempt.model_construct(
                n=1,
                readyAt=t,
                queuedAt=t,
                startedAt=t + 0.01,
                finishedAt=t + 0.2,
                outcome="Succeeded",
                inputHash="in",
                outputHash=f"o{i}" if k == 0 else "o",  # s0: a new output every run
            )
            steps[f"s{k}"] = StepState.model_construct(
                phase="Succeeded", attempt=1, attempts=[a], timing=timing, firstQueuedAt=t, retries=0
            )
        runs.append(
            RunState.model_construct(
                run=f"r{i:05}",
                namespace="ns",
                workflow="wf",
                phase="Succeeded",
                createdAt=t,
                startedAt=t,
                finishedAt=t + 1,
                steps=steps,
                auditSeq=20,
            )
        )
    tracemalloc.start()
    try:
        report = analyse(runs, {r.run: 20 for r in runs}, NOW)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out = report.to_dict()
    assert out["runs"]["total"] == 10_000 and len(out["steps"]) == 10
    assert all(s["attempts"] == 10_000 for s in out["steps"])
    # s0 answers one input with 10,000 outputs: one group, examples capped.
    assert out["nondeterminism"]["flagged"] == ["s0"]
    (group,) = out["nondeterminism"]["steps"][0]["examples"]
    assert group["distinctOutputs"] == 10_000 and len(group["outputs"]) == 3
    assert peak < 64 * 1024 * 1024, f"analysis peaked at {peak / 1e6:.0f} MB"
    assert len(json.dumps(out)) < 64 * 1024  # whatever the number of runs


def test_the_text_escapes_user_data_and_states_the_rules() -> None:
    t = NOW - 100
    name = "[red]not markup[/red]"
    runs = [
        simple(f"[b]r{i}", t + i, **{name: step(attempt(1, t + i, t + i + 5, t + i + 6, out=f"o{i}"))})
        for i in range(3)
    ]
    buf = io.StringIO()
    render(analyse(runs, {}, NOW, workflow="wf", namespace="ns"), Console(file=buf, width=10_000))
    text = buf.getvalue()
    assert name in text and "[b]r0" in text
    assert "waits, non-deterministic" in text
    assert "median load" in text
    buf = io.StringIO()
    render(analyse([], {}, NOW, workflow="wf", namespace="ns"), Console(file=buf, width=200))
    assert buf.getvalue().strip() == "no runs of workflow wf in namespace ns started in the last 1h"


def test_a_report_carried_in_an_engines_answer_is_the_same_report() -> None:
    """`cadenza diagnose` under a client credential gets the report from an engine, as JSON
    (`dataclasses.asdict`): every part of it (steps, load halves, output groups with their
    (count, runs) pairs, traced runs, notes) comes back as it was, and prints the same."""
    runs = load_runs(100, 100)
    for i in range(12):
        t = NOW - 100 + i
        runs.append(simple(f"nd{i:02}", t, random=step(attempt(1, t, t + 1, t + 2, out=f"o{i % 3}"))))
    counts = {r.run: 7 for r in runs}
    report = analyse(runs, counts, NOW, audit_steps={runs[-1].run: {"random": 3, "": 2}})
    report.notes.append("a note")
    assert report.nondeterministic and report.load_steps and report.topRuns  # every part there
    wire = json.loads(json.dumps(dataclasses.asdict(report)))
    again = report_from_answer(wire)
    assert again == report
    assert again.to_dict() == report.to_dict()

    def printed(r: Report) -> str:
        console = Console(file=io.StringIO(), width=200)
        render(r, console)
        return console.file.getvalue()  # type: ignore[attr-defined]

    assert printed(again) == printed(report)
    with pytest.raises(ValueError):
        report_from_answer({**wire, "steps": [{"step": 3}]})


def test_a_foreach_step_shows_no_empty_percentiles_and_no_timeouts_it_does_not_keep() -> None:
    """Its items keep no per-attempt history: the report has no percentiles and no timeouts
    for it, and neither the console's page nor the text shows them as blank or as 0. A step
    flagged for waiting is named under that heading too."""
    t = NOW - 100
    each = StepState(
        phase="Succeeded",
        forEach=ForEachState(total=3, next=3, counts={"Succeeded": 3}),
        timing=Timing(scheduling=0.010, queued=0.004, executing=0.004, attempts=3),
    )
    plain = step(attempt(1, t, t + 1, t + 2))
    report = analyse([run("r1", t, t + 10, {"fan": each, "plain": plain})], {}, NOW, workflow="wf")
    html = (
        _templates()
        .get_template("diagnose.html")
        .render(title="t", live_every=1, report=report.to_dict(), namespace="ns", workflow="wf", since="1h")
    )
    assert "( / )" not in html and '<p id="diagnose-waiting">fan</p>' in html
    fan_row = html.split('data-step="fan"')[1].split("</tr>")[0]
    assert "not kept" in fan_row and "<td>4 ms</td>" in fan_row and '>14 ms <span class="phase' in fan_row
    plain_row = html.split('data-step="plain"')[1].split("</tr>")[0]
    assert "<td>1.0 s (1.0 s / 1.0 s)</td>" in plain_row
    assert "0 0.0%" in plain_row  # its timeouts are kept: none

    buf = io.StringIO()
    render(report, Console(file=buf, width=400))
    fan_line = next(line for line in buf.getvalue().splitlines() if "fan (forEach)" in line)
    assert "0 (-)" not in fan_line and " - " in fan_line
