"""Attempts: dispatch (a task for an agent, or a child run), the attempt's timers, its
end, and what a failure leads to (a retry after backoff, or the step's failure).

Retries: every failure is retried, up to `retry.limit` more attempts, after exponential
backoff with deterministic jitter, except a non-retryable one: FatalError (the agent
says `retryable: false`) or a handler exception whose class or a base is named in the
step's `retry.nonRetryable` (matched here, on the type names the agent sends). A
winding-down run starts no new attempt, except of `onExit`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Any

from cadenza.errors import MAX_TYPE_NAME_CHARS, MAX_TYPE_NAMES, non_retryable_match
from cadenza.protocol import AttemptEvent, FailedEvent, ResultEvent, StepPhase, TaskFailure, TimerEvent
from cadenza.wire import task_id, task_subject

from ...expressions import ExpressionError
from ..commands import Dispatch, StartChild
from ..definition import CompiledStep, CompiledWorkflow
from ..state import MAX_ATTEMPT_RECORDS, Attempt, RunState, Slot, Timer, Timing, attempt_stages
from . import budget, foreach, graph
from .context import Decider, ValueTooLarge, json_size, timer_id, value_hash

START_REPORT_AFTER = 0.25
"""Seconds after which an attempt with no timer still running reports its start."""
MAX_ERROR_BYTES = 16 * 1024
"""An attempt's error larger than this (as JSON) is cut down before the record keeps it."""
SPAN_ERROR_CHARS = 1024
"""Characters of a forEach item attempt's error type and message kept for its span."""


def timed_out(kind: str, message: str) -> dict[str, Any]:
    """The failure of an attempt one of its timers ended: retryable, and counted as a timeout."""
    return TaskFailure(type=kind, message=message, retryable=True, timeout=True).wire()


def capped_backoff(initial: float, factor: float, cap: float, attempt: int) -> float:
    """`initial * factor ** (attempt - 1)`, at most `cap`, for any attempt.

    Compared in log space: the power itself overflows a float (factor 1e308 at the
    third attempt raised OverflowError, and the run never decided again), whereas its
    logarithm stays small and tells whether the cap is reached.
    """
    if initial <= 0 or cap <= 0:
        return 0.0
    exponent = math.log(initial) + (attempt - 1) * math.log(max(factor, 1.0))
    if exponent >= math.log(cap):
        return cap
    try:
        return min(cap, initial * factor ** (attempt - 1))  # exact, for the usual factors
    except OverflowError:  # a tiny initial times a power that alone overflows
        return math.exp(exponent)


def backoff(d: Decider, cs: CompiledStep, name: str, item: int | None, attempt: int) -> float:
    base = capped_backoff(cs.backoff_initial, cs.backoff_factor, cs.backoff_max, attempt)
    # Jitter without a random source: a hash of the attempt's identity, so decide stays
    # pure and a replay computes the same delay.
    seed = zlib.crc32(f"{d.s.run}/{name}/{item}/{attempt}".encode()) / 0xFFFFFFFF
    return max(0.0, base * (1 - cs.backoff_jitter * seed))


def bounded_error(d: Decider, error: dict[str, Any]) -> dict[str, Any]:
    """An attempt's error, cut to MAX_ERROR_BYTES: the record keeps it three times over
    (step, attempt, audit), and a handler's message may be megabytes."""
    if d.size_of(error) <= MAX_ERROR_BYTES:
        return error
    limit = MAX_ERROR_BYTES // 4

    def clip(text: Any) -> str:
        text = str(text)
        return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters in all)"

    bounded = TaskFailure(
        type=clip(error.get("type", "Error"))[:200],
        message=clip(error.get("message", "")),
        retryable=bool(error.get("retryable")),
        truncated=True,
    )
    if error.get("timeout"):
        bounded.timeout = True
    if isinstance(error.get("types"), list):  # what retry.nonRetryable matches
        bounded.types = [str(t)[:MAX_TYPE_NAME_CHARS] for t in error["types"][:MAX_TYPE_NAMES]]
    if "traceback" in error:
        bounded.traceback = str(error["traceback"])[-limit:]
    return bounded.wire()


# ------------------------------------------------------------------ dispatch
def render_input(d: Decider, name: str, item: int | None = None) -> Any:
    """Step `name`'s input (or forEach item `item`'s) rendered over the record as it is:
    the run input, the outputs of the steps it reads (MissingOutputs for those kept apart
    and not loaded), `run`. What dispatch sends, and hashes into the attempt's inputHash."""
    cs = d.step_def(name)
    if item is None:
        return cs.input.render(d.resolve_lazy(d.env(), cs.input.steps))
    items = foreach.foreach_items(d, name)
    return cs.input.render(d.resolve_lazy(d.env(items[item], item), cs.input.steps))


def step_input_now(state: RunState, wf: CompiledWorkflow, name: str, outputs: Mapping[str, Any]) -> Any:
    """Step `name`'s input rendered over `state` as it is now, for display (observe/
    step_input.py): the record keeps only its hash per attempt, to keep each decision's
    write small. Not for a forEach step (its items are rendered one by one). `outputs`
    holds the values kept apart already loaded (MissingOutputs names the others), as for
    `decide`; ExpressionError when it does not render. The state is not changed."""
    # A Decider is built around an event; this one is never applied, only its env read.
    d = Decider(state, wf, TimerEvent(run=state.run), outputs=outputs, size_of=json_size, memo={})
    return render_input(d, name)


def dispatch(d: Decider, name: str, item: int | None, retry: bool = False) -> None:
    """Send attempt N+1 of a step or item: a task for an agent, or a child run."""
    cs = d.step_def(name)
    st = d.st(name)
    slot = st if item is None else (st.forEach.running.get(str(item)) if st.forEach else None)
    if slot is None or (retry and slot.running):
        return
    if retry and st.phase != StepPhase.RUNNING:
        return
    if budget.held(d, name, item, retry):
        return
    try:
        payload = render_input(d, name, item)
        d.sized("the input", payload)
    except (ExpressionError, ValueTooLarge) as exc:
        error = TaskFailure(
            type="ValueTooLarge" if isinstance(exc, ValueTooLarge) else "ExpressionError", message=str(exc)
        ).wire()
        if item is None:
            st.error = error
            graph.fail_step(d, name, str(exc) if isinstance(exc, ValueTooLarge) else f"input: {exc}")
        else:
            slot.running = True
            slot.attempt += 1
            foreach.item_done(d, name, item, None, failed=True, error=error)
        return
    if retry and slot.retryAt is not None:
        ready = min(slot.retryAt, d.now)  # ready when its backoff ended
    elif item is not None and slot.attempt == 0:
        ready = st.startedAt or d.now  # every item is ready when the step starts
    else:
        ready = d.ready
    slot.attempt += 1
    slot.running = True
    slot.readyAt = ready
    slot.queuedAt = d.handled
    slot.startedAt = None
    slot.lastHeartbeat = None
    slot.retryAt = None
    if item is None:
        st.attempt = slot.attempt
        st.firstQueuedAt = st.firstQueuedAt or d.handled
        st.attempts.append(
            Attempt(n=slot.attempt, readyAt=ready, queuedAt=d.handled, inputHash=value_hash(payload))
        )
        del st.attempts[:-MAX_ATTEMPT_RECORDS]
    if cs.kind == "workflow":
        child = d.child_id(name, item, slot.attempt)
        st.child = child if item is None else st.child
        d.command(
            StartChild(
                run=child,
                workflow=cs.workflow,
                namespace=d.s.namespace,
                input=payload,
                scope=d.s.scope or d.s.run,
                parent={
                    "run": d.s.run,
                    "namespace": d.s.namespace,
                    "step": name,
                    "item": item,
                    "attempt": slot.attempt,
                },
            )
        )
        slot.startedAt = d.now
        if cs.timeout:
            arm_attempt_timers(d, name, item, slot)
    else:
        body = {
            "run": d.s.run,
            "workflow": d.s.workflow,
            "step": name,
            "item": item,
            "attempt": slot.attempt,
            "input": payload,
            "scope": d.s.scope or d.s.run,
            "timeout": cs.timeout,
            "heartbeat": cs.heartbeat,
            "queueTimeout": cs.queue_timeout,
            "queuedAt": d.handled,
            # Timers that count from the start need it at once (a queueTimeout that
            # fired on a started attempt would run it twice). Otherwise an attempt still
            # running after a moment reports it, so status tells queued from running;
            # a quick one's result carries its start time.
            "notifyStart": bool(cs.timeout or cs.heartbeat or cs.queue_timeout is not None),
            "reportStartAfter": START_REPORT_AFTER,
        }
        if limits := budget.task_limits(d, name):
            body["budget"] = limits  # the agent refuses model calls past it (cadenza._budget)
        d.command(
            Dispatch(
                subject=task_subject(d.s.namespace, cs.agent or ""),
                msg_id=task_id(d.s.run, name, item, slot.attempt),
                body=body,
                agent=cs.agent,
            )
        )
        # `timeout` and `heartbeatTimeout` are start-to-close: their timers are armed
        # when the agent reports the start (on_started), never at dispatch, so an
        # attempt waiting behind a busy agent is not timed out (and retried, and then
        # run twice) before it began. Waiting has a limit of its own: queueTimeout.
        if cs.queue_timeout is not None:
            d.arm(
                timer_id("queue", name, item, slot.attempt),
                Timer(at=d.now + cs.queue_timeout, kind="queue", step=name, item=item, attempt=slot.attempt),
            )
    d.changed()


def mark_started(
    d: Decider, name: str, item: int | None, slot: Slot, at: float | None, worker: str | None
) -> None:
    """The attempt has begun (its start report, or its claim won before the queue timer):
    no queue timer any more, its start-to-close timers from the start."""
    # The agent's start time (a report may come a moment after the start), never later
    # than the event was stored.
    slot.startedAt = min(float(at or d.now), d.now)
    agent = d.ev.agent if isinstance(d.ev, AttemptEvent) else None
    record_attempt(d, name, item, startedAt=slot.startedAt, worker=worker, agent=agent)
    d.disarm(timer_id("queue", name, item, slot.attempt))
    arm_attempt_timers(d, name, item, slot)
    d.changed()


def arm_attempt_timers(d: Decider, name: str, item: int | None, slot: Slot) -> None:
    cs = d.step_def(name)
    start = slot.startedAt or d.now
    if cs.timeout is not None:
        # The agent enforces the timeout itself; this timer is the backstop for one
        # that died or hangs, with a little grace so the agent's own report wins.
        d.arm(
            timer_id("timeout", name, item, slot.attempt),
            Timer(at=start + cs.timeout + 1.0, kind="timeout", step=name, item=item, attempt=slot.attempt),
        )
    if cs.heartbeat is not None:
        d.arm(
            timer_id("heartbeat", name, item, slot.attempt),
            Timer(at=start + cs.heartbeat, kind="heartbeat", step=name, item=item, attempt=slot.attempt),
        )


# ---------------------------------------------------------------- the end
def record_attempt(d: Decider, name: str, item: int | None, **fields: Any) -> None:
    if item is not None:
        return  # items keep counts only: the record stays bounded for 10,000 items
    st = d.st(name)
    for rec in reversed(st.attempts):
        if rec.n == st.attempt:
            for k, v in fields.items():
                if v is not None:
                    setattr(rec, k, v)
            return


def record_output(d: Decider, name: str, output: Any) -> None:
    """The hash of the step attempt's output (items keep counts only), beside its input's."""
    record_attempt(d, name, None, outputHash=value_hash(output))


def finish_attempt(
    d: Decider, name: str, item: int | None, slot: Slot, outcome: str, error: dict[str, Any] | None
) -> None:
    d.disarm_slot(name, item, slot.attempt)
    # An agent's outcome says when it started and finished; the engine's own end of an
    # attempt (a timer, a cancel) does not.
    ev = d.ev
    outcome_event = ev if isinstance(ev, ResultEvent | FailedEvent) else None
    started = (outcome_event.startedAt if outcome_event else None) or slot.startedAt
    finished = float((outcome_event.finishedAt if outcome_event else None) or d.now)
    record_attempt(
        d,
        name,
        item,
        outcome=outcome,
        error=error,
        finishedAt=finished,
        startedAt=started,
        worker=ev.worker if isinstance(ev, AttemptEvent) else None,
        agent=ev.agent if isinstance(ev, AttemptEvent) else None,
    )
    if item is not None:
        item_attempt_ended(
            d,
            name,
            item,
            slot,
            outcome,
            started=started,
            finished=finished,
            error=error,
            worker=ev.worker if isinstance(ev, AttemptEvent) else None,
            agent=ev.agent if isinstance(ev, AttemptEvent) else None,
        )
    stages = attempt_stages(slot.readyAt, slot.queuedAt, started, finished)
    st = d.st(name)
    st.timing = st.timing or Timing()
    st.timing.add(*stages)
    d.decision.timings.append((name, *stages))
    slot.running = False
    if started is not None:
        slot.startedAt = started


def item_attempt_ended(
    d: Decider,
    name: str,
    item: int,
    slot: Slot,
    outcome: str,
    *,
    started: float | None,
    finished: float,
    error: dict[str, Any] | None = None,
    worker: str | None = None,
    agent: str | None = None,
) -> None:
    """Keep, when traces are on, what the span of a forEach item's attempt needs: the
    record keeps no attempts of items, and the slot holding its times is emptied or gone
    once the decision is made. It travels in the decision's outbox (commands.Audit) to
    engine/tracing.py, and is not kept afterwards."""
    if not d.trace:
        return
    queued = slot.queuedAt if slot.queuedAt is not None else finished
    # What a span shows of an error: its type and the start of its message (a batch may end
    # many items, and the outbox is part of the record), not its traceback.
    shown = (
        {k: str(error[k])[:SPAN_ERROR_CHARS] for k in ("type", "message") if k in error} if error else None
    )
    fields = {
        "step": name,
        "item": item,
        "n": slot.attempt,
        "readyAt": slot.readyAt if slot.readyAt is not None else queued,
        "queuedAt": queued,
        "startedAt": started,
        "finishedAt": finished,
        "outcome": outcome,
        "error": shown,
        "worker": worker,
        "agent": agent,
    }
    d.decision.item_attempts.append({k: v for k, v in fields.items() if v is not None})


def abandon(d: Decider, name: str, item: int | None, slot: Slot, error: dict[str, Any]) -> None:
    """End an attempt the engine gave up on (its timeout, a missed heartbeat): stop it
    where it runs, then treat it as a timed-out failure."""
    cs = d.step_def(name)
    if cs.kind == "workflow":  # the attempt is a child run
        d.cancel_child(d.child_id(cs.name, item, slot.attempt), str(error["message"]))
    else:
        d.cancel_tasks(step=name, item=item)
    attempt_failed(d, name, item, slot, error, "TimedOut")


def attempt_failed(
    d: Decider, name: str, item: int | None, slot: Slot, error: dict[str, Any], outcome: str
) -> None:
    cs = d.step_def(name)
    # The step's retry.nonRetryable overrides the agent's verdict: the agent does not
    # know the step's policy, so it sends the exception's type names and this decides.
    if error.get("retryable") and (entry := non_retryable_match(error, cs.non_retryable)):
        error = {**error, "retryable": False, "nonRetryable": entry}
    finish_attempt(d, name, item, slot, outcome, error)
    # Its audit records say how the attempt ended when the engine ended it: a judge of the
    # trail flags an agent that starts it afterwards.
    ended = outcome if outcome == "TimedOut" else None
    if ended:
        d.decision.timed_out.append(name)
    st = d.st(name)
    retryable = bool(error.get("retryable"))
    if retryable and budget.refused_call(d, name, error) and (cs.is_exit or not d.s.failing):
        # The agent refused a model call for the budget: no backoff and no retry spent;
        # the next attempt is held by the pause (or the run fails, onExceeded: fail).
        where = name if item is None else f"{name}[{item}]"
        d.audit(
            name,
            StepPhase.RUNNING,
            StepPhase.RUNNING,
            f"attempt {slot.attempt} of {where} stopped by the budget ({error.get('message')})",
            item=item,
            attempt=slot.attempt,
            outcome=ended,
        )
        dispatch(d, name, item, retry=True)
        return
    # A winding-down run starts no new attempts, except of onExit, which runs *because*
    # the run is winding down.
    if retryable and slot.attempt < cs.retry_limit + 1 and (cs.is_exit or not d.s.failing):
        delay = backoff(d, cs, name, item, slot.attempt)
        slot.retryAt = d.now + delay
        st.retries += 1
        if st.forEach is not None:
            st.forEach.retries += 1
        # One timer id per attempt it starts: a redelivered fire of the timer that
        # started attempt N cannot start attempt N+1 early.
        d.arm(
            timer_id("retry", name, item, slot.attempt + 1),
            Timer(at=d.now + delay, kind="retry", step=name, item=item, attempt=slot.attempt + 1),
        )
        where = name if item is None else f"{name}[{item}]"
        d.audit(
            name,
            StepPhase.RUNNING,
            StepPhase.RUNNING,
            f"attempt {slot.attempt} of {where} failed ({error.get('type')}: {error.get('message')}); "
            f"retry in {delay:.2f}s",
            item=item,
            attempt=slot.attempt,
            outcome=ended,
            retry=True,
        )
        if item is None:
            st.message = f"retrying after {error.get('type')}: {error.get('message')}"
        return
    if retryable and slot.attempt >= cs.retry_limit + 1 and cs.retry_limit > 0:
        error = {**error, "retriesExhausted": True}
    if item is None:
        st.error = error
        graph.fail_step(
            d,
            name,
            f"{error.get('type', 'Error')}: {error.get('message', '')}",
            exhausted=bool(error.get("retriesExhausted")),
            attempt=slot.attempt if ended else None,
            outcome=ended,
        )
    else:
        foreach.item_done(d, name, item, None, failed=True, error=error)
