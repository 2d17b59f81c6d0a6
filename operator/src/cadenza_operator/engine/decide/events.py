"""One handler per event type, and the table `apply` dispatches on.

Each handler is idempotent: an event about an attempt that is no longer current, a
signal already received, an approval for a step that no longer waits, a heartbeat no
newer than the last, changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cadenza.protocol import (
    ApprovalEvent,
    CancelEvent,
    ContextEvent,
    FailedEvent,
    HeartbeatEvent,
    ResultEvent,
    RunPhase,
    SignalEvent,
    StartedEvent,
    StartEvent,
    StepPhase,
    TaskFailure,
)

from ..state import Timer
from . import attempts, budget, foreach, graph, lifecycle, reuse, timers
from .context import CONTEXT_KEY, Decider, whole


def apply(d: Decider) -> None:
    """Apply the event to the state, then let the graph move on."""
    ev = d.ev
    if d.s.terminal and ev.type != "start":
        return
    HANDLERS[ev.type](d, ev)
    if d.s.phase in (RunPhase.RUNNING, RunPhase.PAUSED):  # paused: what is ready is held
        graph.advance(d)


def on_start(d: Decider, ev: StartEvent) -> None:
    if d.s.phase != RunPhase.PENDING:
        return
    d.s.phase = RunPhase.RUNNING
    d.s.startedAt = d.now
    d.audit(None, RunPhase.PENDING, RunPhase.RUNNING, "run started")
    if d.wf.deadline is not None:
        d.arm("deadline", Timer(at=d.now + d.wf.deadline, kind="deadline"))
    for name in d.wf.order:
        d.st(name)
    reuse.reuse_steps(d, ev)


def on_cancel(d: Decider, ev: CancelEvent) -> None:
    # Once the run winds down (a failure, the deadline, a cancel) or its graph is done,
    # only onExit is left, and onExit always runs: a cancel has nothing left to stop.
    if d.s.phase not in (RunPhase.RUNNING, RunPhase.PAUSED) or d.s.failing or d.s.exitPhase is not None:
        return
    d.s.cancelledBy = d.actor
    lifecycle.wind_down(
        d,
        "cancelled",
        f"cancelled by {d.actor}" + (f": {ev.reason}" if ev.reason else ""),
    )


def on_signal(d: Decider, ev: SignalEvent) -> None:
    name = str(ev.name)
    if name in d.s.signals:
        return
    if name not in d.wf.signals:
        return  # no step waits for it: kept, any sender could grow the record without end
    d.s.signals[name] = ev.payload
    d.audit(None, None, None, f"signal {name} received")
    for step_name, st in d.s.steps.items():
        cs = d.wf.steps.get(step_name)
        if cs and cs.kind == "signal" and st.phase == StepPhase.RUNNING and cs.signal == name:
            d.disarm(f"signal:{step_name}")
            graph.succeed_step(d, step_name, ev.payload, f"signal {name} received")


GROUP_PREFIX = "group:"


def is_approver(approvers: list[str], by: str) -> bool:
    """Whether `by` may decide an approval with these `approvers` (empty: anyone).

    An entry is a user name or `group:NAME`. `by` is a user name, or `USER [group:NAME]`
    for a decision whose sender vouches for the group (the operator, after Kubernetes
    admission checked the user's groups); the control responder refuses that form from a
    client, so a NATS client cannot claim a group."""
    if not approvers or by in approvers:
        return True
    user, _, group = by.partition(f" [{GROUP_PREFIX}")
    if not group.endswith("]"):
        return False
    return user in approvers or f"{GROUP_PREFIX}{group[:-1]}" in approvers


def on_approval(d: Decider, ev: ApprovalEvent) -> None:
    name = str(ev.step)
    st = d.s.steps.get(name)
    cs = d.wf.steps.get(name)
    if st is None or cs is None or st.phase != StepPhase.WAITING_APPROVAL or cs.approval is None:
        return
    approvers = cs.approval.approvers
    by = str(ev.by or "unknown")
    if not is_approver(approvers, by):
        if st.deniedAt is not None and d.now <= st.deniedAt:
            return  # that decision was ignored (and audited) already: a redelivery
        st.deniedAt = d.now
        d.audit(name, st.phase, st.phase, f"decision by {by!r} ignored: not an approver")
        return
    decide_approval(d, name, bool(ev.approved), by, ev.comment)


def decide_approval(d: Decider, name: str, approved: bool, by: str, comment: Any) -> None:
    """An approval step's outcome: from an approver, or from its timeout (`onTimeout`)."""
    st = d.st(name)
    d.disarm(f"approval:{name}")
    st.approval = {
        "decision": "approved" if approved else "rejected",
        "by": by,
        "at": d.now,
        "comment": comment,
    }
    if approved:
        graph.succeed_step(d, name, dict(st.approval), f"approved by {by}")
    else:
        rejected = TaskFailure(
            type="Rejected", message=f"rejected by {by}" + (f": {comment}" if comment else "")
        )
        st.error = rejected.wire()
        graph.fail_step(d, name, rejected.message)


def on_started(d: Decider, ev: StartedEvent) -> None:
    slot, name, item = d.find_slot(ev)
    if slot is None or slot.startedAt is not None:
        return
    attempts.mark_started(d, name, item, slot, ev.startedAt, ev.worker)


def on_heartbeat(d: Decider, ev: HeartbeatEvent) -> None:
    slot, _, _ = d.find_slot(ev)
    if slot is None or (slot.lastHeartbeat is not None and slot.lastHeartbeat >= d.now):
        return  # a redelivered (or older) heartbeat says nothing new
    slot.lastHeartbeat = d.now
    d.changed()


def on_context(d: Decider, ev: ContextEvent) -> None:
    """An agent wrote the run's shared context: one audit record (key, step, item,
    attempt, revision, never the value) and no other change. Recorded whether or not
    the attempt is still current: the write happened. An event for a step the workflow
    does not have, or that does not say what was written, records nothing. The agent's
    repeats are dropped by JetStream (Nats-Msg-Id); an engine redelivery records the
    write again, under the same key and revision, which tell it is the same write."""
    name, key, revision, attempt, item, scope = ev.step, ev.key, ev.revision, ev.attempt, ev.item, ev.scope
    exit_step = d.wf.on_exit.name if d.wf.on_exit is not None else None
    if not isinstance(name, str) or (name not in d.wf.steps and name != exit_step):
        return
    if not (isinstance(key, str) and CONTEXT_KEY.match(key)):
        return
    if not (whole(revision, 1) and whole(attempt, 1) and (item is None or whole(item, 0))):
        return
    d.audit(
        name,
        None,
        None,
        f"context key {key} written (revision {revision})",
        key=key,
        revision=revision,
        attempt=attempt,
        item=item,
        scope=scope if isinstance(scope, str) and scope != d.s.scope and len(scope) <= 253 else None,
    )


def on_result(d: Decider, ev: ResultEvent) -> None:
    slot, name, item = d.find_slot(ev)
    if slot is None:
        return
    attempts.finish_attempt(d, name, item, slot, "Succeeded", None)
    output = ev.output
    if item is None:
        attempts.record_output(d, name, output)
        graph.succeed_step(d, name, output, "attempt succeeded")
    else:
        foreach.item_done(d, name, item, output, failed=False)


def on_failed(d: Decider, ev: FailedEvent) -> None:
    slot, name, item = d.find_slot(ev)
    if slot is None:
        return
    error = attempts.bounded_error(d, ev.error.wire())
    attempts.attempt_failed(d, name, item, slot, error, "TimedOut" if error.get("timeout") else "Failed")


HANDLERS: dict[str, Callable[[Decider, Any], None]] = {
    "start": on_start,
    "cancel": on_cancel,
    "signal": on_signal,
    "approval": on_approval,
    "started": on_started,
    "heartbeat": on_heartbeat,
    "context": on_context,
    "result": on_result,
    "failed": on_failed,
    "timer": timers.on_timer,
    "usage": budget.on_usage,
    "resume": budget.on_resume,
}
"""Every event type (cadenza.protocol.Event) and its handler."""
