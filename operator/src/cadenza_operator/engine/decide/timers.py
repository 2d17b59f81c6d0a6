"""A timer fired: one function per timer kind.

A timer that is no longer armed, or (when the event says when it was armed for, `due`)
was armed again for another time since, changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from cadenza.protocol import StepPhase, TaskFailure, TimerEvent

from ..state import Slot, Timer
from . import attempts, events, graph, lifecycle
from .context import Decider, timer_id


def on_timer(d: Decider, ev: TimerEvent) -> None:
    tid = str(ev.timer)
    timer = d.s.timers.get(tid)
    if timer is None:
        return
    due = ev.due
    if due is not None and abs(float(due) - timer.at) > 1e-3:
        # A fire of an earlier arming of this id (a heartbeat check re-arms its own id),
        # redelivered: the timer armed now is not due.
        return
    del d.s.timers[tid]
    d.changed()
    TIMERS[timer.kind](d, timer)


def deadline_passed(d: Decider, timer: Timer) -> None:
    lifecycle.wind_down(d, "deadline", f"deadline of {d.wf.spec.deadline} exceeded")


def approval_timed_out(d: Decider, timer: Timer) -> None:
    cs = d.wf.steps[timer.step or ""]
    approval = cs.approval
    if approval is not None and d.st(cs.name).phase == StepPhase.WAITING_APPROVAL:
        events.decide_approval(
            d,
            cs.name,
            approval.onTimeout == "approve",
            "timeout",
            f"no decision within {approval.timeout}",
        )


def signal_timed_out(d: Decider, timer: Timer) -> None:
    name = timer.step or ""
    if d.st(name).phase == StepPhase.RUNNING:
        d.st(name).error = TaskFailure(type="Timeout", message="no signal in time").wire()
        graph.fail_step(d, name, "timed out waiting for a signal")


def retry_due(d: Decider, timer: Timer) -> None:
    attempts.dispatch(d, timer.step or "", timer.item, retry=True)


def _current(d: Decider, timer: Timer) -> Slot | None:
    """The attempt an attempt timer was armed for, if it still runs."""
    slot = d.slot(timer.step or "", timer.item)
    if slot is None or not slot.running or slot.attempt != timer.attempt:
        return None
    return slot


def queue_timed_out(d: Decider, timer: Timer) -> None:
    slot = _current(d, timer)
    if slot is None or slot.startedAt is not None:
        return  # started in time (the start disarms it; this is a stale firing)
    ev = d.ev
    if isinstance(ev, TimerEvent) and ev.claimed:
        # An agent claimed the attempt before the engine could (cadenza.nats.claim_attempt,
        # done by the runtime): it has started, and its start report is on its way.
        attempts.mark_started(d, timer.step or "", timer.item, slot, ev.claimedAt, ev.claimedBy)
        return
    cs = d.step_def(timer.step or "")
    # The engine holds the attempt's claim (or, with no claim asked, an agent on an older
    # SDK may hold the task): the task stays queued, and the agent that takes it finds
    # the claim taken and does not start it.
    error = attempts.timed_out("QueueTimeout", f"no agent started the attempt within {cs.queue_timeout:g}s")
    attempts.attempt_failed(d, timer.step or "", timer.item, slot, error, "TimedOut")


def heartbeat_due(d: Decider, timer: Timer) -> None:
    slot = _current(d, timer)
    if slot is None:
        return
    cs = d.step_def(timer.step or "")
    # Armed at the start (start-to-close): the start counts until a heartbeat.
    last = slot.lastHeartbeat or slot.startedAt or d.now
    assert cs.heartbeat is not None
    if last + cs.heartbeat > timer.at + 1e-6:  # a heartbeat came since: look again later
        d.arm(
            timer_id("heartbeat", timer.step or "", timer.item, slot.attempt),
            Timer(
                at=last + cs.heartbeat,
                kind="heartbeat",
                step=timer.step,
                item=timer.item,
                attempt=slot.attempt,
            ),
        )
        return
    error = attempts.timed_out("HeartbeatTimeout", f"no heartbeat for {cs.heartbeat:g}s")
    attempts.abandon(d, timer.step or "", timer.item, slot, error)


def attempt_timed_out(d: Decider, timer: Timer) -> None:
    slot = _current(d, timer)
    if slot is None:
        return
    cs = d.step_def(timer.step or "")
    error = attempts.timed_out("Timeout", f"attempt exceeded its timeout of {cs.timeout:g}s")
    attempts.abandon(d, timer.step or "", timer.item, slot, error)


TIMERS: dict[str, Callable[[Decider, Timer], None]] = {
    "deadline": deadline_passed,
    "approval": approval_timed_out,
    "signal": signal_timed_out,
    "retry": retry_due,
    "queue": queue_timed_out,
    "heartbeat": heartbeat_due,
    "timeout": attempt_timed_out,
}
"""Every Timer.kind, and what its firing does."""
