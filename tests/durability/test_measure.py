"""The soak's counting, on made-up evidence: a soak that cannot see a fault proves nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cadenza_operator.engine.state import Attempt, RunState, StepState

from .measure import CHECK_GRACE, judge_applied, judge_starts, outcomes, trail_of
from .soak import failures
from .workload import PlannedRun


def audit(
    run: str, seq: int, step: str | None, old: str | None, new: str | None, at: float, **extra: Any
) -> dict[str, Any]:
    """An audit record as decide writes it."""
    return {"seq": seq, "run": run, "step": step, "from": old, "to": new, "at": at, **extra}


def test_starts_after_the_commit_that_gave_them_up_are_abandoned(tmp_path: Path) -> None:
    (tmp_path / "exec.1").write_text(
        "r1 slow None 1 100.0\n"  # before the timeout was committed: fine
        f"r1 slow None 1 {110 + CHECK_GRACE + 0.1}\n"  # a redelivery after it: abandoned
        "r1 fan 0 1 150.0\n"  # an item after the run finished: abandoned
        "r2 a None 1 99.0\n"
        "r2 a None"  # cut short by a SIGKILL
    )
    trail = trail_of(
        [
            audit("r1", 1, "slow", "Running", "Failed", 110.0, attempt=1, outcome="TimedOut"),
            audit("r1", 2, None, "Running", "Failed", 120.0),
            audit("r1", 3, None, "Failed", "Failed", 130.0),  # not its first end
            audit("r2", 1, None, "Running", "Succeeded", 100.0),
        ]
    )
    starts = judge_starts(tmp_path / "exec", trail)
    assert starts.executions == 4
    assert starts.repeated == 1
    assert [(a["run"], a["step"], a["why"]) for a in starts.abandoned] == [
        ("r1", "slow", "attempt TimedOut"),
        ("r1", "fan", "run finished"),
    ]


def test_a_start_after_its_step_was_cancelled_or_its_attempt_retried_is_abandoned(tmp_path: Path) -> None:
    (tmp_path / "exec.1").write_text(
        f"r1 a None 2 {50 + CHECK_GRACE + 0.1}\n"  # its step cancelled while it ran
        f"r1 b None 1 {40 + CHECK_GRACE + 0.1}\n"  # timed out, retried: attempt 1 is over
        f"r1 b None 2 {40 + CHECK_GRACE + 0.1}\n"  # the retry: fine
        f"r1 c None 1 {40 + CHECK_GRACE + 0.1}\n"  # failed: not given up by the engine
    )
    trail = trail_of(
        [
            audit("r1", 1, "b", "Running", "Running", 40.0, attempt=1, outcome="TimedOut", retry=True),
            audit("r1", 2, "c", "Running", "Running", 40.0, attempt=1, retry=True),
            audit("r1", 3, "a", "Running", "Cancelled", 50.0, attempt=2, outcome="Cancelled"),
            audit("r1", 4, "d", "Running", "Running", 50.0, item=0, attempt=1, outcome="TimedOut"),
        ]
    )
    assert trail.given_up == {("r1", "b", 1): ("TimedOut", 40.0), ("r1", "a", 2): ("Cancelled", 50.0)}
    starts = judge_starts(tmp_path / "exec", trail)
    assert [(a["step"], a["attempt"], a["why"]) for a in starts.abandoned] == [
        ("a", 2, "attempt Cancelled"),
        ("b", 1, "attempt TimedOut"),
    ]


def test_outcomes_count_lost_stuck_and_wrong() -> None:
    spec = {"n": 1, "failA": 0, "items": [2, 3], "failItem": -1, "slowUntil": 0}
    plan = [PlannedRun(f"r{i}", "main", "soak", spec, "soak") for i in range(5)]
    right = {"sum": 2 + 4 + 9 + 1 + 3, "items": [{"sq": 4}, {"sq": 9}], "by": "soak"}
    assert plan[0].expected_outputs() == right

    def record(run: str, phase: Any, outputs: Any = None) -> RunState:
        return RunState(run=run, workflow="soak", definition="d", createdAt=0, phase=phase, outputs=outputs)

    records: dict[str, RunState | None] = {
        "r0": record("r0", "Succeeded", right),
        "r1": None,
        "r2": record("r2", "Running"),
        "r3": record("r3", "Succeeded", {**right, "sum": 0}),
    }
    got = outcomes(plan, {"r0", "r1", "r2", "r3"}, records)  # r4 never started: not counted here
    assert (got.lost, got.stuck, [w["run"] for w in got.wrong]) == (["r1"], ["r2"], ["r3"])


def test_a_step_applied_twice_or_missing_from_the_audit_is_counted() -> None:
    state = RunState(
        run="r",
        workflow="w",
        definition="d",
        createdAt=0,
        steps={
            "a": StepState(phase="Succeeded", attempts=[Attempt(n=1, queuedAt=0)]),
            "b": StepState(phase="Succeeded"),
        },
    )
    twice = [audit("r", n, "a", "Running", "Succeeded", float(n)) for n in (1, 2)]
    applied = judge_applied(trail_of(twice), {"r": state})
    assert applied.twice == [{"run": "r", "step": "a", "times": 2}]
    assert applied.missing == [{"run": "r", "step": "b"}]


def test_failures_name_every_broken_promise() -> None:
    report = {
        "not_started": 0,
        "lost": 0,
        "stuck": 2,
        "wrong_outputs": 0,
        "abandoned_attempts_started": 1,
        "applied_twice": 0,
        "audit_missing": 0,
        "dead_letters": None,
        "dead_letters_expected": 6,
        "dead_letters_of_poison_run": 0,
        "dead_letters_listed_by_cli": None,
        "unplanned_exits": {"engines": 0, "fragile": 5},
        "faults": {"engine_faults": 3, "engine_faults_with_runs_in_flight": 3, "agent_faults": 2},
    }
    assert failures(report) == [
        "stuck=2",
        "abandoned_attempts_started=1",
        "no CADENZA_DEADLETTERS stream (expected 6 dead letters)",
        "agent faults missed the runs (0 of 2 with runs in flight)",
        "nats faults missed the runs (0 of 0 with runs in flight)",
    ]


def test_a_start_counts_against_the_commit_not_the_event_decided_on(tmp_path: Path) -> None:
    """The run's last result was stored at 100 but decided and committed at 106 (the engine
    that took it first was killed): a task redelivered and started at 105 came before
    anything gave it up; one started after the commit did not."""
    (tmp_path / "exec.1").write_text(
        "r1 join None 1 99.5\n"
        "r1 join None 1 105.0\n"  # redelivered before the commit: a repeat, not abandoned
        f"r1 join None 1 {106 + CHECK_GRACE + 0.1}\n"  # after it: abandoned
    )
    trail = trail_of(
        [
            audit("r1", 1, "join", "Running", "Succeeded", 100.0, committedAt=106.0),
            audit("r1", 2, None, "Running", "Succeeded", 100.0, committedAt=106.0),
        ]
    )
    starts = judge_starts(tmp_path / "exec", trail)
    late = 106 + CHECK_GRACE + 0.1
    assert [(a["startedAt"], a["why"]) for a in starts.abandoned] == [(late, "run finished")]
