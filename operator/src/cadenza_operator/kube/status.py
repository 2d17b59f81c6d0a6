"""Pure functions that turn observed state into the `status` of Cadenza resources.

WorkflowRun status is a bounded summary of the run record kept in JetStream: its size
does not grow with the number of forEach items (counts per phase, the first failed
items) nor with the size of outputs (large ones become a reference), and only a bounded
number of steps is listed. Workflow status is derived from the WorkflowRuns that exist;
Agent status from the Deployment and the agent's JetStream consumer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cadenza.wire import OUTPUTS_BUCKET

from ..engine.state import TERMINAL_RUN, TERMINAL_STEP, RunState
from ..engine.view import RunView, StepView, run_view, usage_doc
from ..engine.view import transitions as changes

MAX_STEPS_LISTED = 50
"""Steps listed in WorkflowRun status; beyond it, finished ones are left out first."""
MAX_MESSAGE = 512
"""Characters of an error message copied into status (the full one is in the audit stream)."""

Json = dict[str, Any]


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_duration(seconds: float) -> str:
    """`kubectl`-style: 450ms, 12s, 3m5s, 2h3m, 4d2h."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m{secs}s" if secs else f"{minutes}m"
    return f"{secs}s"


def _clip(text: str, limit: int = MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def condition(type_: str, status: str, reason: str, message: str = "", at: float | None = None) -> Json:
    cond: Json = {"type": type_, "status": status, "reason": reason, "message": _clip(message)}
    if at is not None:
        cond["lastTransitionTime"] = rfc3339(at)
    return cond


def with_transition_times(
    conditions: Iterable[Json], previous: Iterable[Mapping[str, Any]], now: float
) -> list[Json]:
    """Conditions stamped with lastTransitionTime: kept from `previous` while a condition's
    status is unchanged (so re-reconciling an unchanged object writes nothing), now otherwise."""
    before = {str(c.get("type")): c for c in previous}
    out = []
    for cond in conditions:
        old = before.get(str(cond.get("type")))
        at = old.get("lastTransitionTime") if old and old.get("status") == cond.get("status") else None
        out.append({**cond, "lastTransitionTime": at or rfc3339(now)})
    return out


# --------------------------------------------------------------------- WorkflowRun


def step_summary(s: StepView) -> Json:
    """One step, bounded: phase, attempts, message; forEach steps as counts per phase."""
    summary: Json = {"phase": s.phase, "attempts": s.attempts}
    if s.reason:
        summary["message"] = _clip(s.reason)
    if s.items is not None:
        items = s.items
        counts = {"total": items.total, **{k: v for k, v in sorted(items.counts.items())}}
        if items.in_flight:
            counts["Running"] = items.in_flight
        if items.pending and not s.terminal:
            counts["Pending"] = items.pending
        summary["items"] = counts
        if items.failed:
            summary["failedItems"] = list(items.failed)
    if s.approval:
        summary["approval"] = {k: v for k, v in s.approval.items() if k in ("decision", "by", "comment")}
    if s.child:
        summary["childRun"] = s.child
    if s.timing is not None:
        summary["waiting"] = human_duration(s.timing.waiting)
        summary["executing"] = human_duration(s.timing.executing)
    return summary


_STEP_INTEREST = {
    "Failed": 0,
    "WaitingApproval": 1,
    "Running": 2,
    "Cancelled": 3,
    "Pending": 4,
    "Succeeded": 5,
    "Skipped": 6,
}


def _listed_steps(steps: Mapping[str, StepView]) -> list[str]:
    names = list(steps)
    if len(names) <= MAX_STEPS_LISTED:
        return names
    # Keep what a reader looks for first: failures, waits, the running; in graph order.
    keep = sorted(names, key=lambda n: (_STEP_INTEREST.get(steps[n].phase, 9), names.index(n)))[
        :MAX_STEPS_LISTED
    ]
    kept = set(keep)
    return [n for n in names if n in kept]


def bounded_outputs(state: RunState, limit: int) -> Any:
    """The run outputs, or a reference string when they would make the object large."""
    if state.outputsRef is not None:  # too large for the run record, so for status too
        return f"kv://{OUTPUTS_BUCKET}/{state.outputsRef} (too large for status)"
    if state.outputs is None:
        return None
    size = len(json.dumps(state.outputs, separators=(",", ":"), default=str))
    if size <= limit:
        return state.outputs
    return f"kv://cadenza_runs/{state.run}#outputs ({size} bytes; too large for status)"


def waiting_message(state: RunState | RunView) -> str:
    view = state if isinstance(state, RunView) else run_view(state)
    waiting = view.waiting_approval
    if not waiting:
        return ""
    return (
        "waiting for approval of "
        + ", ".join(waiting)
        + (f" (kubectl annotate wfr NAME cadenza.dev/approve={waiting[0]})")
    )


NOT_WITH_AN_AGENT = frozenset(TERMINAL_STEP) | {"Pending", "WaitingApproval"}
"""Step phases in which a step is not handed to its agent (any other phase is)."""


def agent_waits_message(
    state: RunState, step_agents: Mapping[str, str | None], crash_looping: Mapping[str, str]
) -> str:
    """Says "step X waits for agent Y, which is crash-looping: LAST LINE" for the run's started,
    unfinished steps whose agent crash-loops. `step_agents` maps step names to agents (from
    the run's definition); `crash_looping` maps agents to their last log line. The run is
    not failed: Kubernetes keeps restarting the agent, a fix may be rolled out, and the
    step's queueTimeout bounds the wait."""
    waits: dict[str, list[str]] = {}
    for name, st in state.steps.items():
        agent = step_agents.get(name)
        if agent and agent in crash_looping and st.phase not in NOT_WITH_AN_AGENT:
            waits.setdefault(agent, []).append(name)
    parts = []
    for agent, steps in waits.items():
        who = f"step {steps[0]} waits" if len(steps) == 1 else f"steps {', '.join(steps)} wait"
        line = crash_looping[agent]
        parts.append(f"{who} for agent {agent}, which is crash-looping" + (f": {line}" if line else ""))
    return "; ".join(parts)


def run_conditions(state: RunState | RunView) -> list[Json]:
    """A `Succeeded` condition (Unknown while running), and `WaitingApproval` while a step waits."""
    view = state if isinstance(state, RunView) else run_view(state)
    if view.phase == "Succeeded":
        conds = [condition("Succeeded", "True", "Succeeded", "the run succeeded", view.finished_at)]
    elif view.phase in ("Failed", "Cancelled"):
        conds = [condition("Succeeded", "False", view.phase, view.message, view.finished_at)]
    else:
        reason = view.phase if view.phase in ("Running", "Paused") else "Pending"
        message = view.message if view.phase == "Paused" else ""
        conds = [condition("Succeeded", "Unknown", reason, message, view.started_at or view.created_at)]
    if view.waiting_approval and not view.terminal:
        conds.append(condition("WaitingApproval", "True", "ApprovalRequested", waiting_message(view)))
    return conds


def run_status(state: RunState, *, outputs_limit: int = 8192, blocked: str = "") -> Json:
    """WorkflowRun status mirrored from a run record (pure, bounded). `blocked` says what
    the run waits on outside it (`agent_waits_message`): the message shows it after the
    approvals it waits for, unless the run has ended or has a message of its own."""
    view = run_view(state)
    listed = _listed_steps(view.steps)
    duration = view.duration
    status: Json = {
        "phase": view.phase,
        "runId": view.run,
        "startedAt": rfc3339(view.started_at),
        "finishedAt": rfc3339(view.finished_at),
        "progress": f"{view.finished_steps}/{len(view.steps)}" if view.steps else "",
        "duration": human_duration(duration) if duration is not None else "",
        "steps": {name: step_summary(view.steps[name]) for name in listed},
        **_timing_fields(view),
        **_usage_fields(view),
        "outputs": bounded_outputs(state, outputs_limit),
        "message": _clip(view.message or _waits(view, blocked)),
        "conditions": run_conditions(view),
    }
    if len(listed) < len(view.steps):
        status["stepsNotListed"] = len(view.steps) - len(listed)
    return status


def _waits(view: RunView, blocked: str) -> str:
    waits = [waiting_message(view), "" if view.terminal else blocked]
    return "; ".join(w for w in waits if w)


def _timing_fields(view: RunView) -> Json:
    timing = view.timing
    if not timing.attempts:
        return {}
    return {"waiting": human_duration(timing.waiting), "executing": human_duration(timing.executing)}


def _usage_fields(view: RunView) -> Json:
    if not view.usage.calls:
        return {}
    return {"usage": {**usage_doc(view.usage), "tokens": view.usage.tokens}}


def merge_patch_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> Json:
    """The JSON merge patch (RFC 7386) taking `old` to `new`: changed keys, nested maps
    as nested patches, removed keys as null (a merge patch merges maps: a key left out
    would stay, e.g. a forEach's Running count after the step finished)."""
    patch: Json = {}
    for key, value in new.items():
        before = old.get(key)
        if before == value:
            continue
        if isinstance(before, Mapping) and isinstance(value, Mapping):
            patch[key] = merge_patch_diff(before, value)
        else:
            patch[key] = value
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


def merge_patch_apply(target: Mapping[str, Any], patch: Mapping[str, Any]) -> Json:
    """Apply a JSON merge patch (what the API server does with it)."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_patch_apply(out[key], value)
        else:
            out[key] = value
    return out


# -------------------------------------------------------------------------- Events


@dataclass(frozen=True)
class RunEvent:
    """A Kubernetes Event to post about a WorkflowRun."""

    type: str  # Normal | Warning
    reason: str
    message: str


def phases_of(state: RunState) -> dict[str, str]:
    """What transitions are computed from: the run's phase (key "") and each step's."""
    return run_view(state).phases()


def phases_of_status(status: Mapping[str, Any]) -> dict[str, str]:
    """The same, from a WorkflowRun status already written (so a restart posts nothing twice)."""
    phases = {name: str(s.get("phase", "")) for name, s in (status.get("steps") or {}).items()}
    if status.get("phase"):
        phases[""] = str(status["phase"])
    return phases


def transitions(before: Mapping[str, str], state: RunState) -> list[RunEvent]:
    """Events for what changed since `before`: run started/succeeded/failed/cancelled,
    paused on its budget and resumed, step failed, retries exhausted, approval waiting."""
    view = run_view(state)
    events: list[RunEvent] = []
    for change in changes(before, view):
        if change.step == "":
            events += _run_events(view, change.before)
            continue
        name, s = change.step, view.steps[change.step]
        if s.phase == "Failed":
            if s.attempt > 1:
                events.append(
                    RunEvent(
                        "Warning",
                        "RetriesExhausted",
                        _clip(f"step {name} failed after {s.attempt} attempts: {s.reason}"),
                    )
                )
            else:
                events.append(RunEvent("Warning", "StepFailed", _clip(f"step {name} failed: {s.reason}")))
        elif s.phase == "WaitingApproval":
            events.append(
                RunEvent(
                    "Normal",
                    "ApprovalWaiting",
                    _clip(
                        f"step {name} waits for approval: "
                        f"kubectl annotate wfr NAME cadenza.dev/approve={name}"
                        + (f" ({s.message})" if s.message else "")
                    ),
                )
            )
    return events


def _run_events(view: RunView, old: str | None) -> list[RunEvent]:
    events = []
    if old in (None, "", "Pending") and (view.phase in ("Running", "Paused") or view.terminal):
        events.append(RunEvent("Normal", "RunStarted", f"run {view.run} started"))
    if view.phase == "Paused":
        # The engine pauses a run only when its budget is reached; the message says which.
        events.append(RunEvent("Warning", "BudgetExceeded", _clip(view.message or f"run {view.run} paused")))
    elif view.phase == "Running" and old == "Paused":
        events.append(RunEvent("Normal", "Resumed", f"run {view.run} resumed"))
    elif view.phase == "Succeeded":
        took = human_duration((view.finished_at or 0) - (view.started_at or 0)) if view.started_at else ""
        events.append(
            RunEvent("Normal", "RunSucceeded", f"run {view.run} succeeded" + (f" in {took}" if took else ""))
        )
    elif view.phase == "Failed":
        events.append(RunEvent("Warning", "RunFailed", _clip(view.message or f"run {view.run} failed")))
    elif view.phase == "Cancelled":
        events.append(RunEvent("Warning", "RunCancelled", _clip(view.message or f"run {view.run} cancelled")))
    return events


# ------------------------------------------------------------------------ Workflow


@dataclass(frozen=True)
class RunRecord:
    """What Workflow status needs to know of one WorkflowRun (kept in a kopf index)."""

    name: str
    phase: str
    created: str  # RFC 3339: sorts chronologically as text
    finished: str
    mirrored: bool  # labelled cadenza.dev/workflow: subject to runHistoryLimit


def workflow_run_counts(runs: Iterable[RunRecord]) -> Json:
    """activeRuns, lastRun, lastRunPhase and finished runs by phase."""
    runs = list(runs)
    finished: dict[str, int] = {}
    active = 0
    for run in runs:
        if run.phase in TERMINAL_RUN:
            finished[run.phase] = finished.get(run.phase, 0) + 1
        else:
            active += 1
    last = max(runs, key=lambda r: (r.created, r.name), default=None)
    return {
        "activeRuns": active,
        "lastRun": last.name if last else "",
        "lastRunPhase": (last.phase or "Pending") if last else "",
        "runs": dict(sorted(finished.items())),
    }


def runs_to_collect(runs: Iterable[RunRecord], history_limit: int) -> list[str]:
    """Finished mirrored runs beyond the newest `history_limit`: the ones to delete."""
    finished = [r for r in runs if r.mirrored and r.phase in TERMINAL_RUN]
    finished.sort(key=lambda r: (r.finished or r.created, r.name), reverse=True)
    return [r.name for r in finished[history_limit:]]


# --------------------------------------------------------------------------- Agent


def agent_status(
    *,
    generation: int,
    replicas: int,
    ready_replicas: int,
    pending: int | None,
    in_flight: int | None,
    deployment_problem: str = "",
    queue_problem: str = "",
    crash_loop: str = "",
    previous: Iterable[Mapping[str, Any]] = (),
    now: float | None = None,
) -> Json:
    """Agent status: counts, `ready` as "r/n", and Ready/Degraded conditions with a reason.
    `crash_loop` describes a crash-looping agent container (`pods.CrashLoop.message`):
    Degraded with reason CrashLoopBackOff, the most specific thing to say once pods exist.

    `previous` conditions keep their lastTransitionTime while their status is unchanged,
    so an unchanged Agent produces an identical status (and no write).
    """
    if deployment_problem:
        ready = ("False", "DeploymentFailed", deployment_problem)
    elif replicas == 0:
        ready = ("True", "ScaledToZero", "no replicas wanted: the queue is empty")
    elif ready_replicas >= replicas:
        ready = ("True", "ReplicasReady", f"{ready_replicas}/{replicas} replicas ready")
    else:
        ready = ("False", "ReplicasNotReady", f"{ready_replicas}/{replicas} replicas ready")
    if deployment_problem:
        degraded = ("True", "DeploymentFailed", deployment_problem)
    elif crash_loop:
        degraded = ("True", "CrashLoopBackOff", crash_loop)
    elif queue_problem:
        degraded = ("True", "QueueUnavailable", queue_problem)
    elif replicas and ready_replicas == 0 and (pending or 0) > 0:
        degraded = ("True", "NoReadyReplicas", f"{pending} tasks wait and no replica is ready")
    elif ready_replicas < replicas:
        degraded = (
            "True",
            "ReplicasUnavailable",
            f"{replicas - ready_replicas} of {replicas} replicas not ready",
        )
    else:
        degraded = ("False", "AsExpected", "")
    before = {str(c.get("type")): c for c in previous}
    conditions = []
    for type_, (status, reason, message) in (("Ready", ready), ("Degraded", degraded)):
        old = before.get(type_)
        at = old.get("lastTransitionTime") if old and old.get("status") == status else rfc3339(now)
        cond = {"type": type_, "status": status, "reason": reason, "message": _clip(message)}
        if at:
            cond["lastTransitionTime"] = at
        conditions.append(cond)
    return {
        "replicas": replicas,
        "readyReplicas": ready_replicas,
        "pending": pending or 0,
        "inFlight": in_flight or 0,
        "ready": f"{ready_replicas}/{replicas}",
        "observedGeneration": generation,
        "conditions": conditions,
    }
