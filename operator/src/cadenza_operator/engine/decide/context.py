"""What every part of a decision shares: the decision being built, the state it changes,
the event, its times, and the small helpers on them (audit, commands, timers, slots,
expression environments, values stored apart from the record).

One `Decider` per `decide()` call; the concern modules (events, timers, attempts,
foreach, graph, lifecycle) are functions of it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cadenza.protocol import AttemptEvent, Event, StartEvent, StepPhase
from cadenza.wire import (
    MAX_VALUE_BYTES,
    REF_KEY,
    cancel_subject,
    dumps,
    event_subject,
    is_ref,
    task_id,
    too_large,
)

from ..commands import CancelTasks, Command, Publish
from ..definition import CompiledStep, CompiledWorkflow
from ..state import RunState, Slot, StepState, Timer

OBJECT_REF_PREFIX = "obj:"
"""An outputRef naming an object-store entry rather than an outputs-bucket key."""
INLINE_OUTPUT_BYTES = 32 * 1024
"""Step and run outputs larger than this are stored apart (`stores`), keeping the run record small."""

CONTEXT_KEY = re.compile(r"^[-_=a-zA-Z0-9]{1,256}$")
"""A shared-context key as the SDK allows it (cadenza._context): the audit keeps it."""


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
    commands: list[Command] = field(default_factory=list)
    stores: dict[str, Any] = field(default_factory=dict)  # outputs to store *before* the state write
    audit: list[dict[str, Any]] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)  # steps with an attempt that timed out (metrics)
    # (step, seconds ready -> queued, queued -> started, started -> finished or None) of each
    # attempt finished by this decision (metrics)
    timings: list[tuple[str, float, float, float | None]] = field(default_factory=list)
    # (model, input tokens, output tokens, cost) of each usage event counted (metrics)
    usage: list[tuple[str, int, int, float]] = field(default_factory=list)
    # (model, HTTP requests by outcome, seconds waited for rate limits, seconds of the last
    # exchange) of each usage event counted that measured its call (metrics)
    calls: list[tuple[str, dict[str, int], float | None, float | None]] = field(default_factory=list)
    # Each forEach item attempt this decision ended, as an Attempt's fields plus `step` and
    # `item`, when traces are on (`Decider.trace`): the record keeps no attempts of items
    # (bounded for 10,000 of them), so their spans get their times from here, through the
    # outbox (engine/tracing.py).
    item_attempts: list[dict[str, Any]] = field(default_factory=list)
    changed: bool = False

    def absorb(self, later: Decision) -> None:
        """Add a later decision on the same state (a batch of events) to this one."""
        self.commands += later.commands
        self.audit += later.audit
        self.timed_out += later.timed_out
        self.timings += later.timings
        self.usage += later.usage
        self.calls += later.calls
        self.item_attempts += later.item_attempts
        self.stores.update(later.stores)
        self.changed |= later.changed


def whole(value: Any, least: int) -> bool:
    """An int (not a bool) of at least `least`: a revision, an attempt, an item index."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def json_size(value: Any) -> int:
    return len(dumps(value))  # the size it will have on the wire and in the record


HASH_CHARS = 16
"""Hex characters of an attempt's input and output hash: 64 bits, ample to tell apart the
values of one step over any window `cadenza diagnose` reads."""


def value_hash(value: Any) -> str:
    """sha256 of a value's canonical JSON (sorted keys, compact), cut to HASH_CHARS.

    A value passed by reference (`{REF_KEY: name}`, here or nested) is hashed as the
    reference: its content is never read (a payload may be megabytes, and decide does no
    I/O). References carry no digest of their content, so two runs passing the same large
    value by reference hash differently: diagnose cannot compare those."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:HASH_CHARS]


def timer_id(kind: str, name: str, item: int | None, attempt: int | None = None) -> str:
    parts = [kind, name] + ([str(item)] if item is not None else []) + ([str(attempt)] if attempt else [])
    return ":".join(parts)


class Decider:
    """One decision in the making: the state (a copy, changed in place) and the event."""

    def __init__(
        self,
        state: RunState,
        wf: CompiledWorkflow,
        event: Event,
        *,
        outputs: Mapping[str, Any],
        size_of: Callable[[Any], int],
        memo: dict[str, Any],
        max_value_bytes: int = MAX_VALUE_BYTES,
        trace: bool = False,
    ) -> None:
        self.memo = memo
        self.max_value_bytes = max_value_bytes
        self.trace = trace  # keep what item attempts' spans need (Decision.item_attempts)
        self.s = state
        self.wf = wf
        self.ev = event
        self.now = float(event.at or 0.0)
        # When the engine handled the event (`at` is when it was stored): attempts dispatched
        # now are queued at this time, so a busy engine shows as time spent before the queue.
        self.handled = max(self.now, float(event.handledAt or self.now))
        # When steps made ready by this event became ready: its time, or for a run start held
        # back by maxActiveRuns, when the run was asked for.
        requested = event.requestedAt if isinstance(event, StartEvent) else None
        self.ready = min(self.now, float(requested)) if requested is not None else self.now
        self.outputs = outputs
        self.size_of = size_of
        self.decision = Decision(state=state)
        # Who caused the event: a person or client (`by`), the agent's worker, or the engine.
        self.actor = str(getattr(event, "by", None) or getattr(event, "worker", None) or "engine")

    # ------------------------------------------------------------ the decision
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
            "event": self.ev.type,
            "from": old,
            "to": new,
            "reason": reason,
            "actor": self.actor,
            "at": self.now,
        }
        record.update({k: v for k, v in extra.items() if v is not None})
        self.decision.audit.append(record)
        self.changed()

    def command(self, cmd: Command) -> None:
        self.decision.commands.append(cmd)
        self.changed()

    def cancel_tasks(self, **scope: Any) -> None:
        """Tell agents to stop this run's tasks: all of them, or those of `step` (and `item`)."""
        self.command(CancelTasks(cancel_subject(self.s.namespace, self.s.run), {"run": self.s.run, **scope}))

    def cancel_child(self, child: str, reason: str) -> None:
        self.command(
            Publish(
                event_subject(self.s.namespace, child),
                f"cancel:{child}",
                {"type": "cancel", "run": child, "by": self.actor, "reason": reason},
            )
        )

    def child_id(self, name: str, item: int | None, attempt: int) -> str:
        return task_id(self.s.run, name, item, attempt).replace(".", "-")

    # ------------------------------------------------------------------ steps
    def step_def(self, name: str) -> CompiledStep:
        if self.wf.on_exit is not None and name == self.wf.on_exit.name:
            return self.wf.on_exit
        return self.wf.steps[name]

    def st(self, name: str) -> StepState:
        st = self.s.steps.get(name)
        if st is None:
            st = self.s.steps[name] = StepState()
        return st

    def set_phase(self, name: str, phase: StepPhase, reason: str, **extra: Any) -> None:
        st = self.st(name)
        old = st.phase
        if old == phase:
            return
        st.phase = phase
        if phase.is_terminal:
            st.finishedAt = self.now
            st.running = False
        self.audit(name, old, phase, reason, **extra)

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

    def find_slot(self, ev: AttemptEvent) -> tuple[Slot | None, str, int | None]:
        """The running attempt the event is about, if it is still the current one."""
        name = str(ev.step)
        item = ev.item
        slot = self.slot(name, item)
        if slot is None or not slot.running or slot.attempt != ev.attempt:
            return None, name, item
        if self.st(name).phase != StepPhase.RUNNING:
            return None, name, item
        return slot, name, item

    # ----------------------------------------------------------------- timers
    def arm(self, tid: str, timer: Timer) -> None:
        self.s.timers[tid] = timer
        self.changed()

    def disarm(self, tid: str) -> None:
        if self.s.timers.pop(tid, None) is not None:
            self.changed()

    def disarm_slot(self, name: str, item: int | None, attempt: int) -> None:
        for kind in ("queue", "timeout", "heartbeat"):
            self.disarm(timer_id(kind, name, item, attempt))

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

    # ------------------------------------------------------ values kept apart
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


class _Lazy:
    """An output stored outside the record, loaded only when an expression reads it."""

    __slots__ = ("d", "name", "st")

    def __init__(self, d: Decider, name: str, st: StepState) -> None:
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
