"""What the soak counts once the runs are done, from what the system left behind: the run
records, the agents' start log, the audit trail and the dead-letter stream."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cadenza._protocol import loads
from cadenza_operator.engine.audit import read_audit
from cadenza_operator.engine.state import TERMINAL_RUN, RunState

from .workload import PlannedRun

DEAD_LETTER_STREAM = "CADENZA_DEADLETTERS"
REASON = "Cadenza-Dead-Reason"
SOURCE = "Cadenza-Dead-Source"
SUBJECT = "Cadenza-Dead-Subject"
DELIVERIES = "Cadenza-Dead-Deliveries"
ABANDONED = ("TimedOut", "Cancelled")
TERMINAL = TERMINAL_RUN
CHECK_GRACE = 0.25  # seconds between an agent's look at the record and its handler's start


def summary(state: RunState | None) -> dict[str, Any] | None:
    """A run record, cut down to what explains where a run is."""
    if state is None:
        return None
    steps: dict[str, Any] = {}
    for name, st in state.steps.items():
        entry: dict[str, Any] = {"phase": st.phase, "attempt": st.attempt, "running": st.running}
        if st.message:
            entry["message"] = st.message
        if st.attempts:
            entry["attempts"] = [a.model_dump(exclude_none=True, exclude={"error"}) for a in st.attempts]
        if st.forEach is not None:
            entry["forEach"] = st.forEach.model_dump(exclude_defaults=True)
        steps[name] = entry
    return {
        "phase": state.phase,
        "message": state.message,
        "failing": state.failing,
        "createdAt": state.createdAt,
        "finishedAt": state.finishedAt,
        "timers": {k: t.model_dump(exclude_none=True) for k, t in state.timers.items()},
        "steps": steps,
        "outbox": [c.get("op") for c in state.outbox],
    }


@dataclass
class Outcomes:
    lost: list[str]
    stuck: list[str]
    wrong: list[dict[str, Any]]
    phases: Counter[str]


def outcomes(plan: list[PlannedRun], started: set[str], records: dict[str, RunState | None]) -> Outcomes:
    lost, stuck, wrong = [], [], []
    phases: Counter[str] = Counter()
    for run in plan:
        if run.id not in started:
            continue
        state = records.get(run.id)
        if state is None:
            lost.append(run.id)
            continue
        phases[state.phase] += 1
        if not state.terminal:
            stuck.append(run.id)
            continue
        expected = run.expected_outputs()
        if state.phase != run.expected_phase or (expected is not None and state.outputs != expected):
            wrong.append(
                {
                    "run": run.id,
                    "kind": run.kind,
                    "phase": state.phase,
                    "expectedPhase": run.expected_phase,
                    "outputs": state.outputs,
                    "expected": expected,
                    "message": state.message,
                }
            )
    return Outcomes(lost, stuck, wrong, phases)


@dataclass
class Trail:
    """What the audit trail says, each record once. A decision counts from its commit
    (`committedAt`, stamped by the engine once the write was acknowledged; the time of the
    event it decided on, `at`, can be long before: the event waits in the stream while its
    engine is killed, and a task redelivered meanwhile may start, before anything gave its
    attempt up). A record without it (a trail written before it was stamped) counts from
    `at`, which is stricter."""

    applied: Counter[tuple[str, str]]  # (run, step) -> transitions into Succeeded
    finished: dict[str, float]  # run -> the commit of its first decision to a terminal phase
    given_up: dict[tuple[str, str, int], tuple[str, float]]  # attempt -> (outcome, committed at)


def trail_of(records: Iterable[dict[str, Any]]) -> Trail:
    """The trail of audit records (each once, in (run, seq) order). An attempt is given up
    by a record naming it with its outcome TimedOut or Cancelled (a timer ended it, or its
    step was cancelled while it ran); items are not judged by attempt."""
    trail = Trail(Counter(), {}, {})
    for rec in records:
        run, step, to = rec["run"], rec["step"], rec["to"]
        if step and to == "Succeeded" and rec["from"] != "Succeeded":
            trail.applied[(run, step)] += 1
        committed = rec.get("committedAt", rec["at"])
        if step is None and to in TERMINAL and run not in trail.finished:
            trail.finished[run] = committed
        if step and rec.get("outcome") in ABANDONED and rec.get("attempt") and rec.get("item") is None:
            trail.given_up.setdefault((run, step, rec["attempt"]), (rec["outcome"], committed))
    return trail


async def read_trail(js: Any, namespace: str, idle: float = 2.0) -> Trail:
    return trail_of(await read_audit(js, namespace, idle=idle))


@dataclass
class Starts:
    """Handler starts logged by the agents, judged against the committed run records."""

    executions: int
    abandoned: list[dict[str, Any]]  # started after the engine timed it out, cancelled it, or the run ended
    repeated: int  # (run, step, item, attempt) started more than once


def read_starts(exec_log: Path) -> list[tuple[str, str, int | None, int, float]]:
    starts = []
    for path in exec_log.parent.glob(exec_log.name + ".*"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) != 5:
                continue  # a line cut short by a SIGKILL
            run, step, item, attempt, at = parts
            starts.append((run, step, None if item == "None" else int(item), int(attempt), float(at)))
    return starts


def judge_starts(exec_log: Path, trail: Trail) -> Starts:
    """An attempt must not start once the engine has committed giving it up. The agent
    reads the record just before its handler starts: an abandonment committed within that
    hop cannot be seen, hence CHECK_GRACE."""
    starts = read_starts(exec_log)
    seen: Counter[tuple[str, str, int | None, int]] = Counter()
    abandoned: list[dict[str, Any]] = []
    for run, step, item, attempt, at in starts:
        seen[(run, step, item, attempt)] += 1
        where = {"run": run, "step": step, "item": item, "attempt": attempt, "startedAt": at}
        finished = trail.finished.get(run)
        if finished is not None and at > finished + CHECK_GRACE:
            abandoned.append({**where, "why": "run finished", "committedAt": finished, "late": at - finished})
            continue
        given_up = trail.given_up.get((run, step, attempt)) if item is None else None
        if given_up is not None and at > given_up[1] + CHECK_GRACE:
            outcome, when = given_up
            abandoned.append({**where, "why": f"attempt {outcome}", "committedAt": when, "late": at - when})
    return Starts(len(starts), abandoned, sum(1 for n in seen.values() if n > 1))


@dataclass
class Applied:
    twice: list[dict[str, Any]]  # a step (or forEach item count) moved to Succeeded more than once
    missing: list[dict[str, Any]]  # a Succeeded step with no audit record of it


def judge_applied(trail: Trail, records: dict[str, RunState | None]) -> Applied:
    twice = [{"run": r, "step": s, "times": n} for (r, s), n in trail.applied.items() if n > 1]
    missing = []
    for run, state in records.items():
        if state is None:
            continue
        for name, st in state.steps.items():
            if st.phase == "Succeeded" and not trail.applied[(run, name)]:
                missing.append({"run": run, "step": name})
            fe = st.forEach
            if fe is not None and fe.counts.get("Succeeded", 0) + fe.counts.get("Failed", 0) > fe.total:
                twice.append({"run": run, "step": name, "items": fe.counts, "total": fe.total})
    return Applied(twice, missing)


def engine_warnings(workdir: Path) -> list[dict[str, Any]]:
    """The warnings and errors the engines logged (JSON lines), oldest first."""
    found = []
    for path in sorted(workdir.glob("engine-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("level") in ("warning", "error", "critical"):
                found.append({"engine": path.stem, **entry})
    return sorted(found, key=lambda e: str(e.get("timestamp")))


async def read_dead_letters(js: Any, namespace: str) -> list[dict[str, Any]] | None:
    """Every dead letter of `namespace`, or None while the stream does not exist.

    Each message's body is the original message; its headers say why, from which stream,
    from which subject and after how many deliveries.
    """
    from nats.js.errors import NotFoundError

    try:
        info = await js.stream_info(DEAD_LETTER_STREAM)
    except NotFoundError:
        return None
    letters: list[dict[str, Any]] = []
    if not info.state.messages:
        return letters
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(DEAD_LETTER_STREAM, seq)
        except NotFoundError:
            continue
        headers = msg.headers or {}
        subject = headers.get(SUBJECT, "")
        if subject.split(".")[2:3] != [namespace]:
            continue
        letters.append(
            {
                "subject": subject,
                "source": headers.get(SOURCE),
                "reason": headers.get(REASON),
                "deliveries": headers.get(DELIVERIES),
                "body": (msg.data or b"")[:200].decode(errors="replace"),
            }
        )
    return letters
