"""One view of a run: what every reader of a run record shows, computed once.

The WorkflowRun status writer (`kube/status.py`), the live table of `cadenza run`
(`local/progress.py`), its `--output json` document (`document` below) and the transition
log of `cadenza dev` all read a `RunView` rather than the run record itself, so a step's
attempts, its forEach counts, its queued-vs-running state and its timing mean the same
thing everywhere. Pure: built from a `RunState` alone, no I/O, no clock.

A view shares the record's values (outputs, attempt history): it is read, never changed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .state import (
    TERMINAL_RUN,
    TERMINAL_STEP,
    Attempt,
    RunState,
    Slot,
    StepState,
    Timing,
    Usage,
    run_timing,
)

SUMMARY_OUTPUT_BYTES = 16 * 1024
"""Step outputs larger than this are named, not copied, in the `--output json` document."""


def waits_for_agent(slot: Slot) -> bool:
    """Dispatched to an agent and not started by one yet (a slot of an agent step)."""
    return slot.running and slot.queuedAt is not None and slot.startedAt is None


@dataclass(frozen=True)
class Items:
    """A forEach step's items, as counts: bounded whatever the number of items."""

    total: int
    counts: Mapping[str, int]  # finished items by outcome (Succeeded / Failed), as recorded
    in_flight: int  # items holding a slot: dispatched, or waiting for a retry
    retries: int
    failed: list[int]  # the first failed indexes (bounded by the record)

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    @property
    def pending(self) -> int:
        """Items not started yet."""
        return max(0, self.total - self.done - self.in_flight)


@dataclass(frozen=True)
class StepView:
    name: str
    phase: str
    attempts: int
    """Attempts made: a forEach step's are its finished items plus their retries."""
    attempt: int
    """The step's own attempt number (0 for a forEach step: its items have the attempts)."""
    message: str
    error: Mapping[str, Any] | None
    items: Items | None
    dispatched: int
    """Attempts handed to an agent and not finished (a forEach step: one per item in flight)."""
    queued: int
    """Of those, the ones no agent has started yet: waiting in the agent's queue."""
    approval: Mapping[str, Any] | None
    child: str | None
    timing: Timing | None
    queued_at: float | None  # the first attempt's
    started_at: float | None
    finished_at: float | None
    retries: int
    recovered_by: str | None
    history: list[Attempt]
    output: Any
    output_ref: str | None
    usage: Usage | None = None
    """Model usage its attempts recorded (each attempt's is in `history`)."""

    @property
    def reason(self) -> str:
        """Why it is as it is: its message, else its error's."""
        return self.message or (str(self.error.get("message", "")) if self.error else "")

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_STEP


@dataclass(frozen=True)
class RunView:
    run: str
    namespace: str
    workflow: str
    phase: str
    message: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    outputs: Any
    outputs_ref: str | None
    steps: dict[str, StepView]
    timing: Timing
    """Summed over the steps' finished attempts (`run_timing`)."""
    usage: Usage = field(default_factory=Usage)
    """Model usage the run's attempts recorded."""
    retry_of: str | None = None
    """The run this one retries (`cadenza retry`), reusing what it finished well."""

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_RUN

    @property
    def duration(self) -> float | None:
        if self.finished_at is None or self.started_at is None:
            return None
        return self.finished_at - self.started_at

    @property
    def finished_steps(self) -> int:
        return sum(1 for s in self.steps.values() if s.terminal)

    @property
    def waiting_approval(self) -> list[str]:
        return [name for name, s in self.steps.items() if s.phase == "WaitingApproval"]

    def phases(self) -> dict[str, str]:
        """What transitions are computed from: the run's phase (key "") and each step's."""
        phases = {name: s.phase for name, s in self.steps.items()}
        phases[""] = self.phase
        return phases


def step_view(name: str, st: StepState) -> StepView:
    items = None
    attempts = st.attempt
    slots: list[Slot] = [st] if st.running else []
    if st.forEach is not None:
        fe = st.forEach
        items = Items(fe.total, fe.counts, len(fe.running), fe.retries, fe.failed)
        attempts = items.done + fe.retries
        slots = [slot for slot in fe.running.values() if slot.running]
    return StepView(
        name=name,
        phase=st.phase,
        attempts=attempts,
        attempt=st.attempt,
        message=st.message,
        error=st.error,
        items=items,
        dispatched=len(slots),
        queued=sum(1 for slot in slots if waits_for_agent(slot)),
        approval=st.approval,
        child=st.child,
        timing=st.timing,
        queued_at=st.firstQueuedAt,
        started_at=st.startedAt,
        finished_at=st.finishedAt,
        retries=st.retries,
        recovered_by=st.recoveredBy,
        history=st.attempts,
        output=st.output,
        output_ref=st.outputRef,
        usage=st.usage,
    )


def run_view(state: RunState) -> RunView:
    return RunView(
        run=state.run,
        namespace=state.namespace,
        workflow=state.workflow,
        phase=state.phase,
        message=state.message,
        created_at=state.createdAt,
        started_at=state.startedAt,
        finished_at=state.finishedAt,
        outputs=state.outputs,
        outputs_ref=state.outputsRef,
        steps={name: step_view(name, st) for name, st in state.steps.items()},
        timing=run_timing(state),
        usage=state.usage or Usage(),
        retry_of=state.retryOf,
    )


# --------------------------------------------------------------------- transitions


@dataclass(frozen=True)
class Transition:
    """A phase change between two views: of the run (`step` "") or of one step."""

    step: str
    before: str | None  # None: not seen before
    after: str


def transitions(before: Mapping[str, str], view: RunView) -> list[Transition]:
    """What changed since `before` (a `RunView.phases()`, possibly empty): the run first,
    then the steps in the run's order."""
    changes = []
    if view.phase != before.get(""):
        changes.append(Transition("", before.get(""), view.phase))
    for name, s in view.steps.items():
        if s.phase != before.get(name):
            changes.append(Transition(name, before.get(name), s.phase))
    return changes


# --------------------------------------------------------------- the JSON document


def timing_doc(t: Timing) -> dict[str, float]:
    """Where time went, in seconds: waiting (= scheduling + queued) and executing."""
    return {
        "waiting": round(t.waiting, 3),
        "scheduling": round(t.scheduling, 3),
        "queued": round(t.queued, 3),
        "executing": round(t.executing, 3),
    }


def usage_doc(u: Usage) -> dict[str, Any]:
    """Model usage: tokens in and out, cost (in the Models' pricing units), calls."""
    return {
        "inputTokens": u.inputTokens,
        "outputTokens": u.outputTokens,
        "cost": round(u.cost, 9),
        "calls": u.calls,
    }


def step_document(s: StepView) -> dict[str, Any]:
    entry: dict[str, Any] = {"phase": s.phase, "attempts": s.attempts}
    if s.items is not None:
        entry["items"] = {"total": s.items.total, **s.items.counts, "retries": s.items.retries}
        if s.items.failed:
            entry["failedItems"] = s.items.failed
    entry["queuedAt"] = s.queued_at
    entry["startedAt"] = s.started_at
    entry["finishedAt"] = s.finished_at
    if s.history:
        entry["history"] = [a.model_dump(exclude_none=True) for a in s.history]
    if s.timing is not None:
        entry["timing"] = timing_doc(s.timing)
    if s.usage is not None:
        entry["usage"] = usage_doc(s.usage)
    if s.retries:
        entry["retries"] = s.retries
    if s.output is not None:
        size = len(json.dumps(s.output, default=str))
        entry["output"] = s.output if size <= SUMMARY_OUTPUT_BYTES else {"omitted": f"{size} bytes"}
    elif s.output_ref:
        entry["outputRef"] = s.output_ref
    if s.error:
        entry["error"] = s.error
    if s.message:
        entry["message"] = s.message
    if s.approval:
        entry["approval"] = s.approval
    if s.recovered_by:
        entry["recoveredBy"] = s.recovered_by
    if s.child:
        entry["childRun"] = s.child
    return entry


@dataclass(frozen=True)
class RunFilter:
    """Which runs `cadenza list` shows: all of them for every field left None."""

    workflow: str | None = None
    phase: str | None = None
    since: float | None = None
    """Seconds: runs created at most this long ago."""

    def keeps(self, state: RunState, now: float) -> bool:
        return (
            (self.workflow is None or state.workflow == self.workflow)
            and (self.phase is None or str(state.phase).lower() == self.phase.lower())
            and (self.since is None or state.createdAt >= now - self.since)
        )


MAX_SUMMARY_MESSAGE = 200
"""Characters of a run's message in its summary (`document` has it whole)."""


def summary(view: RunView, now: float) -> dict[str, Any]:
    """One run as a list shows it (`cadenza list`, the engine's `list` answer): no steps,
    no outputs, the message cut short, so hundreds fit in one reply."""
    end = view.finished_at if view.finished_at is not None else now
    message = " ".join(view.message.split())
    if len(message) > MAX_SUMMARY_MESSAGE:
        message = message[: MAX_SUMMARY_MESSAGE - 1] + "…"
    return {
        "run": view.run,
        "namespace": view.namespace,
        "workflow": view.workflow,
        "phase": str(view.phase),
        "createdAt": view.created_at,
        "startedAt": view.started_at,
        "finishedAt": view.finished_at,
        "durationSeconds": (end - view.started_at) if view.started_at is not None else None,
        "progress": f"{view.finished_steps}/{len(view.steps)}",
        "message": message,
        "retryOf": view.retry_of,
        "usage": usage_doc(view.usage),
    }


def document(view: RunView) -> dict[str, Any]:
    """The `cadenza run --output json` document (outputs as in the record: a caller with
    the outputs bucket replaces them when they were kept apart)."""
    duration = view.duration if view.finished_at and view.started_at else None
    return {
        "workflow": view.workflow,
        "run": view.run,
        "namespace": view.namespace,
        "phase": view.phase,
        "outputs": view.outputs,
        "message": view.message,
        "startedAt": view.started_at,
        "finishedAt": view.finished_at,
        "durationSeconds": duration,
        "timing": timing_doc(view.timing),
        "usage": usage_doc(view.usage),
        "steps": {name: step_document(s) for name, s in view.steps.items()},
    } | ({"retryOf": view.retry_of} if view.retry_of else {})
