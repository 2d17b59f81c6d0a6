"""The pure heart of the engine: `decide(state, event, workflow) -> Decision`.

No I/O and no clock: time comes in the event (`event["at"]`, the JetStream timestamp of
the message, so a redelivered event carries the same time). Every event is idempotent:
a result for an attempt that is no longer running, a timer that is no longer armed (or,
when the event says which time it was armed for, `due`, armed for another time), an
approval for a step that no longer waits, a heartbeat no newer than the last, change
nothing. That is what makes redelivery after a crash safe.

Semantics, in one place:

* A step is ready when each dependency is *satisfied*: Succeeded, Skipped, Failed with
  `onFailure: continue`, or Failed and recovered by its fallback step (the fallback
  satisfied in turn; a fallback that was skipped recovers nothing).
* Skip propagation: a step whose dependencies were all Skipped is Skipped too, unless it
  says `ifDependenciesSkipped: run`. A `when` that is false skips the step; a `when`
  that gives no bool, or fails to evaluate, fails it.
* A step whose dependency failed for good never runs: the run fails fast, running steps
  are cancelled, pending ones skipped; `onExit` then runs; the run ends Failed.
* A fallback step (named by some step's `onFailure`) runs only when that step fails.
* Retries: every failure is retried, up to `retry.limit` more attempts, after exponential
  backoff with deterministic jitter, except a non-retryable one: FatalError (the agent says
  `retryable: false`) or a handler exception whose class or a base is named in the step's
  `retry.nonRetryable` (matched here, on the type names the agent sends).
  A winding-down run starts no new attempt, except of `onExit`.
* forEach: items run up to `maxParallel` at once; the output is the ordered list of item
  outputs; a failed item fails the step and cancels the items in flight. With
  `onFailure: continue` every item runs, the step still ends Failed (its output holds
  null for the failed items) and dependents go on.
* onExit runs once the graph is done, whatever its outcome, and sees `run.phase`; its own
  failure is recorded on its step and does not change the run's phase.
* A `context` event (an agent wrote the shared context) appends one audit record (key,
  step, item, attempt, revision) and changes nothing else.
* Cancellation stops the graph like a failure and ends the run Cancelled. Once the run
  winds down (a failure, the deadline, a cancel) or its graph has finished, only onExit
  is left and a cancel changes nothing.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cadenza._errors import MAX_TYPE_NAME_CHARS, MAX_TYPE_NAMES, non_retryable_match
from cadenza._protocol import (
    MAX_VALUE_BYTES,
    REF_KEY,
    cancel_subject,
    dumps,
    event_subject,
    is_ref,
    task_id,
    task_subject,
    too_large,
)

from ..expressions import ExpressionError
from .definition import CompiledStep, CompiledWorkflow
from .state import (
    MAX_ATTEMPT_RECORDS,
    MAX_FAILED_ITEMS,
    TERMINAL_STEP,
    Attempt,
    ForEachState,
    RunState,
    Slot,
    StepState,
    Timer,
    Timing,
    attempt_stages,
)

OBJECT_REF_PREFIX = "obj:"
"""An outputRef naming an object-store entry rather than an outputs-bucket key."""
INLINE_OUTPUT_BYTES = 32 * 1024
"""Step and run outputs larger than this are stored apart (`stores`), keeping the run record small."""


START_REPORT_AFTER = 0.25
"""Seconds after which an attempt with no timer still running reports its start."""
MAX_ERROR_BYTES = 16 * 1024
"""An attempt's error larger than this (as JSON) is cut down before the record keeps it."""


class MissingOutputs(Exception):
    """decide needs outputs stored outside the record; the runtime loads them and calls again."""

    def __init__(self, keys: set[str]) -> None:
        super().__init__(", ".join(sorted(keys)))
        self.keys = keys


class ValueTooLarge(ValueError):
    """A value decide rendered (a step's input, the run output) is larger than the most a
    value may be: it fails the step (or the run) instead of being sent on."""


@dataclass
class Decision:
    state: RunState
    commands: list[dict[str, Any]] = field(default_factory=list)
    stores: dict[str, Any] = field(default_factory=dict)  # outputs to store *before* the state write
    audit: list[dict[str, Any]] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)  # steps with an attempt that timed out (metrics)
    # (step, seconds ready -> queued, queued -> started, started -> finished or None) of each
    # attempt finished by this decision (metrics)
    timings: list[tuple[str, float, float, float | None]] = field(default_factory=list)
    changed: bool = False

    def absorb(self, later: Decision) -> None:
        """Add a later decision on the same state (a batch of events) to this one."""
        self.commands += later.commands
        self.audit += later.audit
        self.timed_out += later.timed_out
        self.timings += later.timings
        self.stores.update(later.stores)
        self.changed |= later.changed


def decide(
    state: RunState,
    event: Mapping[str, Any],
    wf: CompiledWorkflow,
    outputs: Mapping[str, Any] | None = None,
    *,
    memo: dict[str, Any] | None = None,
    copy: bool = True,
    size_of: Callable[[Any], int] | None = None,
    max_value_bytes: int = MAX_VALUE_BYTES,
) -> Decision:
    """Apply one event to a copy of `state`; return the new state and what to do.

    `outputs` holds values stored outside the record (outputs-bucket keys -> values) that
    the runtime has loaded; when one is needed and missing, MissingOutputs is raised.
    `memo` caches values that cannot change once computed (a started forEach's list);
    `copy=False` lets a caller that parsed `state` for this call skip the deep copy.
    A step input or run output that renders larger than `max_value_bytes` fails.
    """
    d = _Decider(
        state.model_copy(deep=True) if copy else state,
        wf,
        event,
        outputs=outputs or {},
        size_of=size_of or _json_size,
        memo=memo if memo is not None else {},
        max_value_bytes=max_value_bytes,
    )
    d.apply()
    return d.decision


def _timed_out(kind: str, message: str) -> dict[str, Any]:
    """The failure of an attempt one of its timers ended: retryable, and counted as a timeout."""
    return {"type": kind, "message": message, "retryable": True, "timeout": True}


MAX_APPROVAL_MESSAGE = 2000
"""Characters of a rendered approval message kept: it is stored in the record and the audit."""


def _clip_message(text: str) -> str:
    return text if len(text) <= MAX_APPROVAL_MESSAGE else text[: MAX_APPROVAL_MESSAGE - 1] + "…"


_CONTEXT_KEY = re.compile(r"^[-_=a-zA-Z0-9]{1,256}$")
"""A shared-context key as the SDK allows it (cadenza._context): the audit keeps it."""


def _whole(value: Any, least: int) -> bool:
    """An int (not a bool) of at least `least`: a revision, an attempt, an item index."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _json_size(value: Any) -> int:
    return len(dumps(value))  # the size it will have on the wire and in the record


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


class _Decider:
    def __init__(
        self,
        state: RunState,
        wf: CompiledWorkflow,
        event: Mapping[str, Any],
        *,
        outputs: Mapping[str, Any],
        size_of: Callable[[Any], int],
        memo: dict[str, Any],
        max_value_bytes: int = MAX_VALUE_BYTES,
    ) -> None:
        self.memo = memo
        self.max_value_bytes = max_value_bytes
        self.s = state
        self.wf = wf
        self.ev = event
        self.now = float(event.get("at", 0.0))
        # When the engine handled the event (`at` is when it was stored): attempts dispatched
        # now are queued at this time, so a busy engine shows as time spent before the queue.
        self.handled = max(self.now, float(event.get("handledAt") or self.now))
        # When steps made ready by this event became ready: its time, or for a run start held
        # back by maxActiveRuns, when the run was asked for.
        requested = event.get("requestedAt") if event.get("type") == "start" else None
        self.ready = min(self.now, float(requested)) if requested is not None else self.now
        self.outputs = outputs
        self.size_of = size_of
        self.decision = Decision(state=state)
        self.actor = str(event.get("by") or event.get("worker") or "engine")

    # ------------------------------------------------------------------ helpers
    def changed(self) -> None:
        self.decision.changed = True

    def audit(self, step: str | None, old: str | None, new: str | None, reason: str, **extra: Any) -> None:
        self.s.auditSeq += 1
        record = {
            "seq": self.s.auditSeq,
            "run": self.s.run,
            "workflow": self.s.workflow,
            "namespace": self.s.namespace,
            "step": step,
            "event": self.ev.get("type"),
            "from": old,
            "to": new,
            "reason": reason,
            "actor": self.actor,
            "at": self.now,
        }
        record.update({k: v for k, v in extra.items() if v is not None})
        self.decision.audit.append(record)
        self.changed()

    def command(self, **cmd: Any) -> None:
        self.decision.commands.append(cmd)
        self.changed()

    def step_def(self, name: str) -> CompiledStep:
        if self.wf.on_exit is not None and name == self.wf.on_exit.name:
            return self.wf.on_exit
        return self.wf.steps[name]

    def st(self, name: str) -> StepState:
        st = self.s.steps.get(name)
        if st is None:
            st = self.s.steps[name] = StepState()
        return st

    def set_phase(self, name: str, phase: str, reason: str, **extra: Any) -> None:
        st = self.st(name)
        old = st.phase
        if old == phase:
            return
        st.phase = phase  # type: ignore[assignment]
        if phase in TERMINAL_STEP:
            st.finishedAt = self.now
            st.running = False
        self.audit(name, old, phase, reason, **extra)

    # -------------------------------------------------------------- expressions
    def env(self, item: Any = None, index: int | None = None) -> dict[str, Any]:
        steps: dict[str, Any] = {}
        for name, st in self.s.steps.items():
            steps[name] = {
                "phase": st.phase,
                "output": self._output_of(name, st),
                "error": st.error,
                "attempts": st.attempt,
            }
        env: dict[str, Any] = {
            "input": self.run_input(),
            "steps": steps,
            "run": {
                "id": self.s.run,
                "workflow": self.s.workflow,
                "namespace": self.s.namespace,
                "phase": self.s.exitPhase or self.s.phase,
                "message": self.s.message,
            },
        }
        if index is not None:
            env["item"] = item
            env["index"] = index
        return env

    def run_input(self) -> Any:
        return self.s.input if self.s.inputRef is None else self.stored(self.s.inputRef)

    def run_output(self) -> Any:
        return self.s.outputs if self.s.outputsRef is None else self.stored(self.s.outputsRef)

    def stored(self, ref: str) -> Any:
        """A value stored apart from the record: stored by this decision, or loaded."""
        if ref in self.decision.stores:
            return self.decision.stores[ref]
        if ref not in self.outputs:
            raise MissingOutputs({ref})
        return self.outputs[ref]

    def stored_apart(self, key: str, value: Any, size: int | None = None) -> tuple[Any, str | None]:
        """(value, None) to keep in the record, or (None, reference) once it is in `stores`."""
        if is_ref(value):  # already in the object store (an agent offloaded it)
            return None, OBJECT_REF_PREFIX + value[REF_KEY]
        if (self.size_of(value) if size is None else size) > INLINE_OUTPUT_BYTES:
            self.decision.stores[key] = value
            return None, key
        return value, None

    def sized(self, what: str, value: Any) -> int:
        """The size of a rendered value; ValueTooLarge above the most a value may be."""
        size = self.size_of(value)
        if size > self.max_value_bytes:
            raise ValueTooLarge(f"{what} is {too_large(size, self.max_value_bytes)}")
        return size

    def _output_of(self, name: str, st: StepState) -> Any:
        if st.outputRef is None:
            return st.output
        return _Lazy(self, name, st)

    def resolve_lazy(self, env: dict[str, Any], needed: frozenset[str]) -> dict[str, Any]:
        """Load outputs stored outside the record where an expression reads them (else null)."""
        missing: set[str] = set()
        for name, entry in env["steps"].items():
            out = entry["output"]
            if isinstance(out, _Lazy):
                if name not in needed:
                    entry["output"] = None
                    continue
                try:
                    entry["output"] = out.value()
                except MissingOutputs as exc:
                    missing |= exc.keys
        if missing:
            raise MissingOutputs(missing)
        return env

    # ------------------------------------------------------------------- events
    def apply(self) -> None:
        kind = self.ev.get("type")
        if self.s.terminal and kind != "start":
            return
        handler = getattr(self, f"on_{kind}", None)
        if handler is None:
            return
        handler()
        if self.s.phase == "Running":
            self.advance()

    def on_start(self) -> None:
        if self.s.phase != "Pending":
            return
        self.s.phase = "Running"
        self.s.startedAt = self.now
        self.audit(None, "Pending", "Running", "run started")
        if self.wf.deadline is not None:
            self.arm("deadline", Timer(at=self.now + self.wf.deadline, kind="deadline"))
        for name in self.wf.order:
            self.st(name)

    def on_cancel(self) -> None:
        # Once the run winds down (a failure, the deadline, a cancel) or its graph is done,
        # only onExit is left, and onExit always runs: a cancel has nothing left to stop.
        if self.s.phase != "Running" or self.s.failing or self.s.exitPhase is not None:
            return
        self.s.cancelledBy = self.actor
        self.wind_down(
            "cancelled",
            f"cancelled by {self.actor}" + (f": {self.ev['reason']}" if self.ev.get("reason") else ""),
        )

    def on_signal(self) -> None:
        name = str(self.ev.get("name"))
        if name in self.s.signals:
            return
        if name not in self.wf.signals:
            return  # no step waits for it: kept, any sender could grow the record without end
        self.s.signals[name] = self.ev.get("payload")
        self.audit(None, None, None, f"signal {name} received")
        for step_name, st in self.s.steps.items():
            cs = self.wf.steps.get(step_name)
            if cs and cs.kind == "signal" and st.phase == "Running" and cs.spec.waitFor.signal == name:  # type: ignore[union-attr]
                self.disarm(f"signal:{step_name}")
                self.succeed_step(step_name, self.ev.get("payload"), f"signal {name} received")

    def on_approval(self) -> None:
        name = str(self.ev.get("step"))
        st = self.s.steps.get(name)
        cs = self.wf.steps.get(name)
        if st is None or cs is None or st.phase != "WaitingApproval" or cs.spec.approval is None:  # type: ignore[union-attr]
            return
        approvers = cs.spec.approval.approvers  # type: ignore[union-attr]
        by = str(self.ev.get("by") or "unknown")
        if approvers and by not in approvers:
            if st.deniedAt is not None and self.now <= st.deniedAt:
                return  # that decision was ignored (and audited) already: a redelivery
            st.deniedAt = self.now
            self.audit(name, st.phase, st.phase, f"decision by {by!r} ignored: not an approver")
            return
        self.decide_approval(name, bool(self.ev.get("approved")), by, self.ev.get("comment"))

    def decide_approval(self, name: str, approved: bool, by: str, comment: Any) -> None:
        st = self.st(name)
        self.disarm(f"approval:{name}")
        st.approval = {
            "decision": "approved" if approved else "rejected",
            "by": by,
            "at": self.now,
            "comment": comment,
        }
        if approved:
            self.succeed_step(name, dict(st.approval), f"approved by {by}")
        else:
            st.error = {
                "type": "Rejected",
                "message": f"rejected by {by}" + (f": {comment}" if comment else ""),
            }
            self.fail_step(name, st.error["message"])

    def on_started(self) -> None:
        slot, name, item = self.find_slot()
        if slot is None or slot.startedAt is not None:
            return
        # The agent's start time (a report may come a moment after the start), never later
        # than the report was stored.
        slot.startedAt = min(float(self.ev.get("startedAt") or self.now), self.now)
        self.record_attempt(name, item, startedAt=slot.startedAt, worker=self.ev.get("worker"))
        self.disarm(self.timer_id("queue", name, item, slot.attempt))
        self.arm_attempt_timers(name, item, slot)
        self.changed()

    def on_heartbeat(self) -> None:
        slot, _, _ = self.find_slot()
        if slot is None or (slot.lastHeartbeat is not None and slot.lastHeartbeat >= self.now):
            return  # a redelivered (or older) heartbeat says nothing new
        slot.lastHeartbeat = self.now
        self.changed()

    def on_context(self) -> None:
        """An agent wrote the run's shared context: one audit record (key, step, item,
        attempt, revision, never the value) and no other change. Recorded whether or not
        the attempt is still current: the write happened. An event for a step the workflow
        does not have, or that does not say what was written, records nothing. The agent's
        repeats are dropped by JetStream (Nats-Msg-Id); an engine redelivery records the
        write again, under the same key and revision, which tell it is the same write."""
        name = self.ev.get("step")
        key, revision, attempt, item, scope = (
            self.ev.get(k) for k in ("key", "revision", "attempt", "item", "scope")
        )
        exit_step = self.wf.on_exit.name if self.wf.on_exit is not None else None
        if not isinstance(name, str) or (name not in self.wf.steps and name != exit_step):
            return
        if not (isinstance(key, str) and _CONTEXT_KEY.match(key)):
            return
        if not (_whole(revision, 1) and _whole(attempt, 1) and (item is None or _whole(item, 0))):
            return
        self.audit(
            name,
            None,
            None,
            f"context key {key} written (revision {revision})",
            key=key,
            revision=revision,
            attempt=attempt,
            item=item,
            scope=scope if isinstance(scope, str) and scope != self.s.scope and len(scope) <= 253 else None,
        )

    def on_result(self) -> None:
        slot, name, item = self.find_slot()
        if slot is None:
            return
        self.finish_attempt(name, item, slot, "Succeeded", None)
        output = self.ev.get("output")
        if item is None:
            self.succeed_step(name, output, "attempt succeeded")
        else:
            self.item_done(name, item, output, failed=False)

    def on_failed(self) -> None:
        slot, name, item = self.find_slot()
        if slot is None:
            return
        error = self.bounded_error(dict(self.ev.get("error") or {}))
        self.attempt_failed(name, item, slot, error, "TimedOut" if error.get("timeout") else "Failed")

    def bounded_error(self, error: dict[str, Any]) -> dict[str, Any]:
        """An attempt's error, cut to MAX_ERROR_BYTES: the record keeps it three times over
        (step, attempt, audit), and a handler's message may be megabytes."""
        if self.size_of(error) <= MAX_ERROR_BYTES:
            return error
        limit = MAX_ERROR_BYTES // 4

        def clip(text: Any) -> str:
            text = str(text)
            return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters in all)"

        bounded: dict[str, Any] = {
            "type": clip(error.get("type", "Error"))[:200],
            "message": clip(error.get("message", "")),
            "retryable": bool(error.get("retryable")),
            "truncated": True,
        }
        if error.get("timeout"):
            bounded["timeout"] = True
        if isinstance(error.get("types"), list):  # what retry.nonRetryable matches
            bounded["types"] = [str(t)[:MAX_TYPE_NAME_CHARS] for t in error["types"][:MAX_TYPE_NAMES]]
        if "traceback" in error:
            bounded["traceback"] = str(error["traceback"])[-limit:]
        return bounded

    def on_timer(self) -> None:
        timer_id = str(self.ev.get("timer"))
        timer = self.s.timers.get(timer_id)
        if timer is None:
            return
        due = self.ev.get("due")
        if due is not None and abs(float(due) - timer.at) > 1e-3:
            # A fire of an earlier arming of this id (a heartbeat check re-arms its own id),
            # redelivered: the timer armed now is not due.
            return
        del self.s.timers[timer_id]
        self.changed()
        if timer.kind == "deadline":
            self.wind_down("deadline", f"deadline of {self.wf.spec.deadline} exceeded")
        elif timer.kind == "approval":
            cs = self.wf.steps[timer.step or ""]
            on_timeout = cs.spec.approval.onTimeout  # type: ignore[union-attr]
            if self.st(cs.name).phase == "WaitingApproval":
                self.decide_approval(
                    cs.name,
                    on_timeout == "approve",
                    "timeout",
                    f"no decision within {cs.spec.approval.timeout}",  # type: ignore[union-attr]
                )
        elif timer.kind == "signal":
            name = timer.step or ""
            if self.st(name).phase == "Running":
                self.st(name).error = {"type": "Timeout", "message": "no signal in time"}
                self.fail_step(name, "timed out waiting for a signal")
        elif timer.kind == "retry":
            self.dispatch(timer.step or "", timer.item, retry=True)
        elif timer.kind in ("queue", "timeout", "heartbeat"):
            slot = self.slot(timer.step or "", timer.item)
            if slot is None or not slot.running or slot.attempt != timer.attempt:
                return
            if timer.kind == "queue":
                if slot.startedAt is not None:
                    return  # started in time (the start disarms it; this is a stale firing)
                cs = self.step_def(timer.step or "")
                # The task stays queued; the agent that takes it finds the attempt abandoned.
                error = _timed_out(
                    "QueueTimeout", f"no agent started the attempt within {cs.queue_timeout:g}s"
                )
                self.attempt_failed(timer.step or "", timer.item, slot, error, "TimedOut")
                return
            if timer.kind == "heartbeat":
                cs = self.step_def(timer.step or "")
                # Armed at the start (start-to-close): the start counts until a heartbeat.
                last = slot.lastHeartbeat or slot.startedAt or self.now
                assert cs.heartbeat is not None
                if last + cs.heartbeat > timer.at + 1e-6:  # a heartbeat came since: look again later
                    self.arm(
                        self.timer_id("heartbeat", timer.step or "", timer.item, slot.attempt),
                        Timer(
                            at=last + cs.heartbeat,
                            kind="heartbeat",
                            step=timer.step,
                            item=timer.item,
                            attempt=slot.attempt,
                        ),
                    )
                    return
                error = _timed_out("HeartbeatTimeout", f"no heartbeat for {cs.heartbeat:g}s")
            else:
                cs = self.step_def(timer.step or "")
                error = _timed_out("Timeout", f"attempt exceeded its timeout of {cs.timeout:g}s")
            if cs.kind == "workflow":  # the attempt is a child run
                self.cancel_child(self.child_id(cs.name, timer.item, slot.attempt), str(error["message"]))
            else:
                self.command(
                    op="cancelTasks",
                    subject=cancel_subject(self.s.namespace, self.s.run),
                    body={"run": self.s.run, "step": timer.step, "item": timer.item},
                )
            self.attempt_failed(timer.step or "", timer.item, slot, error, "TimedOut")

    # ------------------------------------------------------------------ slots
    def slot(self, name: str, item: int | None) -> Slot | None:
        st = self.s.steps.get(name)
        if st is None:
            return None
        if item is None:
            return st if st.forEach is None else None
        if st.forEach is None:
            return None
        return st.forEach.running.get(str(item))

    def find_slot(self) -> tuple[Slot | None, str, int | None]:
        name = str(self.ev.get("step"))
        item = self.ev.get("item")
        slot = self.slot(name, item)
        if slot is None or not slot.running or slot.attempt != self.ev.get("attempt"):
            return None, name, item
        if self.st(name).phase != "Running":
            return None, name, item
        return slot, name, item

    @staticmethod
    def timer_id(kind: str, name: str, item: int | None, attempt: int | None = None) -> str:
        parts = [kind, name] + ([str(item)] if item is not None else []) + ([str(attempt)] if attempt else [])
        return ":".join(parts)

    def arm(self, timer_id: str, timer: Timer) -> None:
        self.s.timers[timer_id] = timer
        self.changed()

    def disarm(self, timer_id: str) -> None:
        if self.s.timers.pop(timer_id, None) is not None:
            self.changed()

    def disarm_slot(self, name: str, item: int | None, attempt: int) -> None:
        for kind in ("queue", "timeout", "heartbeat"):
            self.disarm(self.timer_id(kind, name, item, attempt))

    def arm_attempt_timers(self, name: str, item: int | None, slot: Slot) -> None:
        cs = self.step_def(name)
        start = slot.startedAt or self.now
        if cs.timeout is not None:
            # The agent enforces the timeout itself; this timer is the backstop for one
            # that died or hangs, with a little grace so the agent's own report wins.
            self.arm(
                self.timer_id("timeout", name, item, slot.attempt),
                Timer(
                    at=start + cs.timeout + 1.0, kind="timeout", step=name, item=item, attempt=slot.attempt
                ),
            )
        if cs.heartbeat is not None:
            self.arm(
                self.timer_id("heartbeat", name, item, slot.attempt),
                Timer(at=start + cs.heartbeat, kind="heartbeat", step=name, item=item, attempt=slot.attempt),
            )

    def record_attempt(self, name: str, item: int | None, **fields: Any) -> None:
        if item is not None:
            return  # items keep counts only: the record stays bounded for 10,000 items
        st = self.st(name)
        for rec in reversed(st.attempts):
            if rec.n == st.attempt:
                for k, v in fields.items():
                    if v is not None:
                        setattr(rec, k, v)
                return

    def finish_attempt(
        self, name: str, item: int | None, slot: Slot, outcome: str, error: dict[str, Any] | None
    ) -> None:
        self.disarm_slot(name, item, slot.attempt)
        started = self.ev.get("startedAt") or slot.startedAt
        finished = float(self.ev.get("finishedAt") or self.now)
        self.record_attempt(
            name,
            item,
            outcome=outcome,
            error=error,
            finishedAt=finished,
            startedAt=started,
            worker=self.ev.get("worker"),
        )
        stages = attempt_stages(slot.readyAt, slot.queuedAt, started, finished)
        st = self.st(name)
        st.timing = st.timing or Timing()
        st.timing.add(*stages)
        self.decision.timings.append((name, *stages))
        slot.running = False
        if started is not None:
            slot.startedAt = started

    # ----------------------------------------------------------------- failures
    def attempt_failed(
        self, name: str, item: int | None, slot: Slot, error: dict[str, Any], outcome: str
    ) -> None:
        cs = self.step_def(name)
        # The step's retry.nonRetryable overrides the agent's verdict: the agent does not
        # know the step's policy, so it sends the exception's type names and this decides.
        if error.get("retryable") and (entry := non_retryable_match(error, cs.non_retryable)):
            error = {**error, "retryable": False, "nonRetryable": entry}
        self.finish_attempt(name, item, slot, outcome, error)
        if outcome == "TimedOut":
            self.decision.timed_out.append(name)
        st = self.st(name)
        retryable = bool(error.get("retryable"))
        # A winding-down run starts no new attempts, except of onExit, which runs *because*
        # the run is winding down.
        if retryable and slot.attempt < cs.retry_limit + 1 and (cs.is_exit or not self.s.failing):
            delay = self.backoff(cs, name, item, slot.attempt)
            slot.retryAt = self.now + delay
            st.retries += 1
            if st.forEach is not None:
                st.forEach.retries += 1
            # One timer id per attempt it starts: a redelivered fire of the timer that
            # started attempt N cannot start attempt N+1 early.
            self.arm(
                self.timer_id("retry", name, item, slot.attempt + 1),
                Timer(at=self.now + delay, kind="retry", step=name, item=item, attempt=slot.attempt + 1),
            )
            where = name if item is None else f"{name}[{item}]"
            self.audit(
                name,
                "Running",
                "Running",
                f"attempt {slot.attempt} of {where} failed ({error.get('type')}: {error.get('message')}); "
                f"retry in {delay:.2f}s",
                item=item,
                attempt=slot.attempt,
                retry=True,
            )
            if item is None:
                st.message = f"retrying after {error.get('type')}: {error.get('message')}"
            return
        if retryable and slot.attempt >= cs.retry_limit + 1 and cs.retry_limit > 0:
            error = {**error, "retriesExhausted": True}
        if item is None:
            st.error = error
            self.fail_step(
                name,
                f"{error.get('type', 'Error')}: {error.get('message', '')}",
                exhausted=bool(error.get("retriesExhausted")),
            )
        else:
            self.item_done(name, item, None, failed=True, error=error)

    def backoff(self, cs: CompiledStep, name: str, item: int | None, attempt: int) -> float:
        base = capped_backoff(cs.backoff_initial, cs.backoff_factor, cs.backoff_max, attempt)
        # Jitter without a random source: a hash of the attempt's identity, so decide stays
        # pure and a replay computes the same delay.
        seed = zlib.crc32(f"{self.s.run}/{name}/{item}/{attempt}".encode()) / 0xFFFFFFFF
        return max(0.0, base * (1 - cs.backoff_jitter * seed))

    def fail_step(self, name: str, message: str, exhausted: bool = False) -> None:
        st = self.st(name)
        st.message = message
        self.set_phase(name, "Failed", message, retriesExhausted=exhausted or None)
        cs = self.step_def(name)
        if cs.on_failure not in ("fail", "continue") and not self.s.failing:
            fallback = self.st(cs.on_failure)
            if not fallback.activated:
                fallback.activated = True
                self.audit(cs.on_failure, fallback.phase, fallback.phase, f"fallback for failed step {name}")

    def succeed_step(self, name: str, output: Any, reason: str) -> None:
        st = self.st(name)
        st.output, st.outputRef = self.stored_apart(f"{self.s.run}.{name}", output)
        st.message = ""
        self.set_phase(name, "Succeeded", reason)

    # ------------------------------------------------------------------ forEach
    def item_done(
        self, name: str, item: int, output: Any, *, failed: bool, error: dict[str, Any] | None = None
    ) -> None:
        st = self.st(name)
        fe = st.forEach
        assert fe is not None
        fe.running.pop(str(item), None)
        outcome = "Failed" if failed else "Succeeded"
        fe.counts[outcome] = fe.counts.get(outcome, 0) + 1
        self.decision.stores[f"{self.s.run}.{name}.{item}"] = output
        self.changed()
        if failed:
            if len(fe.failed) < MAX_FAILED_ITEMS:
                fe.failed.append(item)
            st.error = {**(error or {}), "item": item}
            self.audit(
                name, "Running", "Running", f"item {item} failed: {(error or {}).get('message')}", item=item
            )
            if self.step_def(name).on_failure != "continue":
                message = f"item {item} failed: {(error or {}).get('type')}: {(error or {}).get('message')}"
                self.cancel_items(name, message)
                self.fail_step(name, message, exhausted=bool((error or {}).get("retriesExhausted")))
                return
        self.fill_window(name)
        if not fe.running and fe.next >= fe.total:
            st.outputRef = f"{self.s.run}.{name}.*"
            n_failed = fe.counts.get("Failed", 0)
            if n_failed:
                st.message = f"{n_failed} of {fe.total} items failed"
                self.set_phase(name, "Failed", st.message)
            else:
                self.set_phase(name, "Succeeded", f"{fe.total} items succeeded")

    def cancel_child(self, child: str, reason: str) -> None:
        self.command(
            op="publish",
            subject=event_subject(self.s.namespace, child),
            msgId=f"cancel:{child}",
            body={"type": "cancel", "run": child, "by": self.actor, "reason": reason},
        )

    def cancel_items(self, name: str, reason: str) -> None:
        st = self.st(name)
        if st.forEach is None:
            return
        is_workflow = self.step_def(name).kind == "workflow"
        for key, slot in list(st.forEach.running.items()):
            if is_workflow and slot.running:  # items of a sub-workflow step are child runs
                self.cancel_child(self.child_id(name, int(key), slot.attempt), reason)
            self.disarm_slot(name, int(key), slot.attempt)
            self.disarm(self.timer_id("retry", name, int(key), slot.attempt + 1))
        st.forEach.running.clear()
        self.command(
            op="cancelTasks",
            subject=cancel_subject(self.s.namespace, self.s.run),
            body={"run": self.s.run, "step": name},
        )

    def fill_window(self, name: str) -> None:
        cs = self.step_def(name)
        fe = self.st(name).forEach
        assert fe is not None
        if self.s.failing:
            return
        while len(fe.running) < cs.window and fe.next < fe.total:
            index = fe.next
            fe.next += 1
            fe.running[str(index)] = Slot()
            self.dispatch(name, index)

    # ----------------------------------------------------------------- dispatch
    def dispatch(self, name: str, item: int | None, retry: bool = False) -> None:
        """Send attempt N+1 of a step or item: a task for an agent, or a child run."""
        cs = self.step_def(name)
        st = self.st(name)
        slot = st if item is None else (st.forEach.running.get(str(item)) if st.forEach else None)
        if slot is None or (retry and slot.running):
            return
        if retry and st.phase != "Running":
            return
        try:
            if item is None:
                payload = cs.input.render(self.resolve_lazy(self.env(), cs.input.steps))
            else:
                items = self.foreach_items(name)
                payload = cs.input.render(self.resolve_lazy(self.env(items[item], item), cs.input.steps))
            self.sized("the input", payload)
        except (ExpressionError, ValueTooLarge) as exc:
            error = {
                "type": "ValueTooLarge" if isinstance(exc, ValueTooLarge) else "ExpressionError",
                "message": str(exc),
            }
            if item is None:
                st.error = error
                self.fail_step(name, str(exc) if isinstance(exc, ValueTooLarge) else f"input: {exc}")
            else:
                slot.running = True
                slot.attempt += 1
                self.item_done(name, item, None, failed=True, error=error)
            return
        if retry and slot.retryAt is not None:
            ready = min(slot.retryAt, self.now)  # ready when its backoff ended
        elif item is not None and slot.attempt == 0:
            ready = st.startedAt or self.now  # every item is ready when the step starts
        else:
            ready = self.ready
        slot.attempt += 1
        slot.running = True
        slot.readyAt = ready
        slot.queuedAt = self.handled
        slot.startedAt = None
        slot.lastHeartbeat = None
        slot.retryAt = None
        if item is None:
            st.attempt = slot.attempt
            st.firstQueuedAt = st.firstQueuedAt or self.handled
            st.attempts.append(Attempt(n=slot.attempt, readyAt=ready, queuedAt=self.handled))
            del st.attempts[:-MAX_ATTEMPT_RECORDS]
        if cs.kind == "workflow":
            child = self.child_id(name, item, slot.attempt)
            st.child = child if item is None else st.child
            self.command(
                op="startChild",
                run=child,
                workflow=cs.workflow,
                namespace=self.s.namespace,
                input=payload,
                scope=self.s.scope or self.s.run,
                parent={
                    "run": self.s.run,
                    "namespace": self.s.namespace,
                    "step": name,
                    "item": item,
                    "attempt": slot.attempt,
                },
            )
            slot.startedAt = self.now
            if cs.timeout:
                self.arm_attempt_timers(name, item, slot)
        else:
            body = {
                "run": self.s.run,
                "workflow": self.s.workflow,
                "step": name,
                "item": item,
                "attempt": slot.attempt,
                "input": payload,
                "scope": self.s.scope or self.s.run,
                "timeout": cs.timeout,
                "heartbeat": cs.heartbeat,
                "queueTimeout": cs.queue_timeout,
                "queuedAt": self.handled,
                # Timers that count from the start need it at once (a queueTimeout that
                # fired on a started attempt would run it twice). Otherwise an attempt still
                # running after a moment reports it, so status tells queued from running;
                # a quick one's result carries its start time.
                "notifyStart": bool(cs.timeout or cs.heartbeat or cs.queue_timeout is not None),
                "reportStartAfter": START_REPORT_AFTER,
            }
            self.command(
                op="dispatch",
                subject=task_subject(self.s.namespace, cs.agent or ""),
                msgId=task_id(self.s.run, name, item, slot.attempt),
                body=body,
                agent=cs.agent,
            )
            # `timeout` and `heartbeatTimeout` are start-to-close: their timers are armed
            # when the agent reports the start (on_started), never at dispatch, so an
            # attempt waiting behind a busy agent is not timed out (and retried, and then
            # run twice) before it began. Waiting has a limit of its own: queueTimeout.
            if cs.queue_timeout is not None:
                self.arm(
                    self.timer_id("queue", name, item, slot.attempt),
                    Timer(
                        at=self.now + cs.queue_timeout,
                        kind="queue",
                        step=name,
                        item=item,
                        attempt=slot.attempt,
                    ),
                )
        self.changed()

    def child_id(self, name: str, item: int | None, attempt: int) -> str:
        return task_id(self.s.run, name, item, attempt).replace(".", "-")

    def foreach_items(self, name: str) -> list[Any]:
        # What a forEach reads is final once the step starts, so its list is computed once
        # per engine and run, not once per item dispatched.
        key = f"{self.s.run}/{name}/items"
        if key in self.memo:
            return self.memo[key]  # type: ignore[no-any-return]
        cs = self.step_def(name)
        assert cs.for_each is not None
        value = cs.for_each.evaluate(self.resolve_lazy(self.env(), cs.for_each.steps))
        if not isinstance(value, list):
            raise ExpressionError(f"forEach {cs.for_each.source!r} gave {type(value).__name__}, not a list")
        self.memo[key] = value
        return value

    # ------------------------------------------------------------------ advance
    def dep_state(self, dep: str) -> str:
        """ok | skipped | wait | blocked."""
        st = self.st(dep)
        if st.phase == "Succeeded":
            return "ok"
        if st.phase == "Skipped":
            return "skipped"
        if st.phase == "Failed":
            cs = self.step_def(dep)
            if cs.on_failure == "continue":
                return "ok"
            if cs.on_failure == "fail":
                return "blocked"
            fallback = self.dep_state(cs.on_failure)
            if fallback == "ok":
                st.recoveredBy = cs.on_failure
            # A fallback that was skipped (its `when`) recovered nothing: the failure stands.
            return "blocked" if fallback == "skipped" else fallback
        if st.phase == "Cancelled":
            return "blocked"
        return "wait"

    def start_step(self, name: str) -> None:
        cs = self.wf.steps[name]
        st = self.st(name)
        env: dict[str, Any] | None = None
        if cs.when is not None:
            try:
                env = self.resolve_lazy(self.env(), cs.when.steps)
                go = cs.when.evaluate(env)
                if not isinstance(go, bool):
                    raise ExpressionError(f"{cs.when.source!r} gave {type(go).__name__}, not a bool")
            except ExpressionError as exc:
                st.error = {"type": "ExpressionError", "message": str(exc)}
                self.fail_step(name, f"when: {exc}")
                return
            if not go:
                self.set_phase(name, "Skipped", f"when {cs.when.source!r} is {str(go).lower()}")
                return
        st.phase = "Running"
        st.startedAt = self.now
        if cs.kind == "approval":
            st.phase = "WaitingApproval"
            st.message = self.approval_message(cs)
            self.audit(name, "Pending", "WaitingApproval", st.message)
            if cs.approval_timeout is not None:
                self.arm(
                    f"approval:{name}", Timer(at=self.now + cs.approval_timeout, kind="approval", step=name)
                )
            return
        self.audit(name, "Pending", "Running", "dependencies satisfied")
        if cs.kind == "signal":
            signal = cs.spec.waitFor.signal  # type: ignore[union-attr]
            if signal in self.s.signals:
                self.succeed_step(name, self.s.signals[signal], f"signal {signal} already received")
                return
            st.message = f"waiting for signal {signal}"
            if cs.signal_timeout is not None:
                self.arm(f"signal:{name}", Timer(at=self.now + cs.signal_timeout, kind="signal", step=name))
            return
        if cs.for_each is not None:
            try:
                items = self.foreach_items(name)
            except ExpressionError as exc:
                st.error = {"type": "ExpressionError", "message": str(exc)}
                self.fail_step(name, f"forEach: {exc}")
                return
            st.forEach = ForEachState(total=len(items))
            if not items:
                st.outputRef = f"{self.s.run}.{name}.*"
                self.set_phase(name, "Succeeded", "forEach over an empty list")
                return
            self.fill_window(name)
            return
        self.dispatch(name, None)

    def approval_message(self, cs: CompiledStep) -> str:
        """What the approver is asked, its `${{ }}` rendered once, when the step starts waiting.

        A message that cannot be rendered (a key missing from this run's input) must not
        fail the run over a prompt: the approver sees the raw text and the error instead.
        """
        raw = cs.spec.approval.message or "waiting for approval"  # type: ignore[union-attr]
        template = cs.approval_message
        if template is None:
            return raw
        try:
            value = template.render(self.resolve_lazy(self.env(), template.steps))
        except ExpressionError as exc:
            return _clip_message(f"{raw} (message not rendered: {exc})")
        return _clip_message(value if isinstance(value, str) else dumps(value).decode())

    def failure_message(self, name: str) -> str:
        """Why the run fails: the step, and each fallback in its chain that failed too."""
        message = f"step {name} failed: {self.st(name).message}"
        seen = {name}
        fallback = self.step_def(name).on_failure
        while fallback not in ("fail", "continue") and fallback not in seen:
            seen.add(fallback)
            st = self.st(fallback)
            if st.phase != "Failed":
                break
            message += f"; its fallback {fallback} failed too: {st.message}"
            fallback = self.step_def(fallback).on_failure
        return message

    def advance(self) -> None:
        progress = True
        while progress and self.s.phase == "Running":
            progress = False
            if not self.s.failing:
                for name in self.wf.order:
                    st = self.st(name)
                    if st.phase != "Pending":
                        continue
                    cs = self.wf.steps[name]
                    if name in self.wf.fallbacks and not st.activated:
                        continue
                    states = [self.dep_state(d) for d in cs.deps]
                    if "wait" in states or "blocked" in states:
                        continue
                    if (
                        states
                        and all(x == "skipped" for x in states)
                        and cs.spec.ifDependenciesSkipped == "skip"  # type: ignore[union-attr]
                    ):
                        self.set_phase(name, "Skipped", "all dependencies were skipped")
                    else:
                        self.start_step(name)
                    progress = True
                blocked = [
                    n
                    for n in self.wf.order
                    if self.st(n).phase == "Failed" and self.dep_state(n) == "blocked"
                ]
                if blocked:
                    self.wind_down("failed", self.failure_message(blocked[0]))
                    progress = True
            if not progress:
                self.maybe_finish()

    def active(self) -> bool:
        for name, st in self.s.steps.items():
            if st.phase in ("Running", "WaitingApproval"):
                return True
            if st.phase == "Pending" and not self.s.failing and name in self.wf.steps:
                cs = self.wf.steps[name]
                if name in self.wf.fallbacks and not st.activated:
                    continue
                if "blocked" not in [self.dep_state(d) for d in cs.deps]:
                    return True
        return False

    def wind_down(self, why: str, message: str) -> None:
        """Stop the graph: cancel what runs, skip what waits; onExit and the end follow."""
        if self.s.failing:
            return
        self.s.failing = why
        self.s.message = message
        self.audit(None, "Running", "Running", f"winding down: {message}")
        any_running = False
        for name, st in self.s.steps.items():
            if self.wf.on_exit is not None and name == self.wf.on_exit.name:
                continue
            if st.phase in ("Running", "WaitingApproval"):
                any_running = True
                if st.forEach is not None:
                    self.cancel_items(name, message)
                for tid in [t for t, tm in self.s.timers.items() if tm.step == name]:
                    self.disarm(tid)
                if st.child and st.forEach is None:
                    self.cancel_child(st.child, message)
                st.message = message  # not the approval prompt or the wait it was in
                self.set_phase(name, "Cancelled", message)
        if any_running:
            self.command(
                op="cancelTasks",
                subject=cancel_subject(self.s.namespace, self.s.run),
                body={"run": self.s.run},
            )
        self.disarm("deadline")
        self.maybe_finish()

    def maybe_finish(self) -> None:
        if self.s.phase != "Running" or self.active():
            return
        exit_def = self.wf.on_exit
        if self.s.exitPhase is None:
            phase = {"cancelled": "Cancelled", "failed": "Failed", "deadline": "Failed"}.get(
                self.s.failing or ""
            )
            if phase is None:
                phase = "Succeeded"
                try:
                    outputs = self.wf.output.render(self.resolve_lazy(self.env(), self.wf.output.steps))
                    self.s.outputs, self.s.outputsRef = self.stored_apart(
                        f"{self.s.run}._output", outputs, self.sized("the output", outputs)
                    )
                except ValueTooLarge as exc:
                    phase = "Failed"
                    self.s.message = str(exc)
                except ExpressionError as exc:
                    phase = "Failed"
                    self.s.message = f"output: {exc}"
            self.s.exitPhase = phase  # type: ignore[assignment]
            for name in self.wf.order:
                st = self.st(name)
                if st.phase == "Pending":
                    why = (
                        "not needed: no step failed over to it"
                        if name in self.wf.fallbacks
                        else "not run: the run stopped before it"
                    )
                    self.set_phase(name, "Skipped", why)
            if exit_def is not None:
                self.st(exit_def.name).phase = "Running"
                self.st(exit_def.name).startedAt = self.now
                self.audit(exit_def.name, "Pending", "Running", f"onExit (run {phase})")
                self.dispatch(exit_def.name, None)
                if self.st(exit_def.name).phase == "Running":
                    return
        if exit_def is not None and self.st(exit_def.name).phase not in TERMINAL_STEP:
            return
        self.finish(self.s.exitPhase or "Succeeded")

    def finish(self, phase: str) -> None:
        old = self.s.phase
        self.s.phase = phase  # type: ignore[assignment]
        self.s.finishedAt = self.now
        self.s.timers.clear()
        if phase == "Succeeded":
            self.s.message = ""
        self.audit(None, old, phase, self.s.message or "all steps finished")
        parent = self.s.parent
        if parent:
            base = {
                "run": parent["run"],
                "step": parent["step"],
                "item": parent.get("item"),
                "attempt": parent["attempt"],
                "worker": f"run:{self.s.run}",
            }
            if phase == "Succeeded":
                body = {"type": "result", **base, "output": self.run_output()}
            else:
                body = {
                    "type": "failed",
                    **base,
                    "error": {
                        "type": f"Child{phase}",
                        "message": f"sub-workflow {self.s.workflow} {phase.lower()}: {self.s.message}",
                        "retryable": False,
                        "child": self.s.run,
                    },
                }
            self.command(
                op="publish",
                subject=event_subject(parent.get("namespace", self.s.namespace), parent["run"]),
                msgId=f"child:{self.s.run}",
                body=body,
            )


class _Lazy:
    """An output stored outside the record, loaded only when an expression reads it."""

    __slots__ = ("d", "name", "st")

    def __init__(self, d: _Decider, name: str, st: StepState) -> None:
        self.d = d
        self.name = name
        self.st = st

    def value(self) -> Any:
        ref = self.st.outputRef or ""
        if ref.endswith(".*"):
            fe = self.st.forEach
            total = fe.total if fe else 0
            keys = [f"{ref[:-2]}.{i}" for i in range(total)]
            missing = {k for k in keys if k not in self.d.outputs and k not in self.d.decision.stores}
            if missing:
                raise MissingOutputs({ref})
            return [self.d.decision.stores.get(k, self.d.outputs.get(k)) for k in keys]
        return self.d.stored(ref)


def audit_commands(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A decision's audit records, kept in the run record's outbox: the server copies each
    record revision into the audit stream, so writing the record is appending to the trail."""
    return [{"op": "audit", "records": records}] if records else []
