"""The pure heart of the engine: `decide(state, event, workflow) -> Decision`.

No I/O and no clock: time comes in the event (`event["at"]`, the JetStream timestamp of
the message, so a redelivered event carries the same time). Every event is idempotent:
a result for an attempt that is no longer running, a timer that is no longer armed (or,
when the event says which time it was armed for, `due`, armed for another time), an
approval for a step that no longer waits, a heartbeat no newer than the last, change
nothing. That is what makes redelivery after a crash safe.

Where each part of the semantics is decided:

* `events`: one handler per event type, behind the `HANDLERS` table. A `context` event
  (an agent wrote the shared context) appends one audit record and changes nothing else.
* `timers`: one function per timer kind, behind the `TIMERS` table.
* `attempts`: dispatch, an attempt's timers and end, retries with backoff, failures.
* `foreach`: items in a window of `maxParallel`, their outcomes, cancelling them.
* `graph`: readiness, skip propagation, fallbacks, starting a step.
* `budget`: model usage added per attempt, step and run; a budget reached before a
  dispatch pauses the run (`Paused`, what comes due is held) or fails it; `resume`.
* `lifecycle`: winding down (a failure, the deadline, a cancel), onExit, the finish.
  Once the run winds down or its graph has finished, only onExit is left and a cancel
  changes nothing.
* `context`: the `Decider` every part shares (state, event, times, helpers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from cadenza.protocol import Event, parse_event
from cadenza.wire import MAX_VALUE_BYTES
from pydantic import BaseModel

from ..commands import Audit
from ..definition import CompiledWorkflow
from ..state import RunState
from .attempts import MAX_ERROR_BYTES, START_REPORT_AFTER, capped_backoff, step_input_now
from .context import (
    INLINE_OUTPUT_BYTES,
    OBJECT_REF_PREFIX,
    Decider,
    Decision,
    MissingOutputs,
    ValueTooLarge,
    json_size,
    value_hash,
)
from .events import HANDLERS, apply

__all__ = [
    "INLINE_OUTPUT_BYTES",
    "MAX_ERROR_BYTES",
    "OBJECT_REF_PREFIX",
    "START_REPORT_AFTER",
    "Decision",
    "MissingOutputs",
    "ValueTooLarge",
    "audit_commands",
    "capped_backoff",
    "decide",
    "outbox",
    "step_input_now",
    "value_hash",
]


def decide(
    state: RunState,
    event: Event | Mapping[str, Any],
    wf: CompiledWorkflow,
    outputs: Mapping[str, Any] | None = None,
    *,
    memo: dict[str, Any] | None = None,
    copy: bool = True,
    size_of: Callable[[Any], int] | None = None,
    max_value_bytes: int = MAX_VALUE_BYTES,
    trace: bool = False,
) -> Decision:
    """Apply one event to a copy of `state`; return the new state and what to do.

    `outputs` holds values stored outside the record (outputs-bucket keys -> values) that
    the runtime has loaded; when one is needed and missing, MissingOutputs is raised.
    `memo` caches values that cannot change once computed (a started forEach's list);
    `copy=False` lets a caller that parsed `state` for this call skip the deep copy.
    A step input or run output that renders larger than `max_value_bytes` fails.
    `trace` (traces are on) keeps the times of the forEach item attempts it ends, for
    their spans (`Decision.item_attempts`); off, nothing of them is kept.
    `event` is a parsed `cadenza.protocol.Event` (the runtime parses each event once), or
    its JSON object, validated here.
    """
    if not isinstance(event, BaseModel):
        if event.get("type") not in HANDLERS:  # a type this engine does not know changes nothing
            return Decision(state=state.model_copy(deep=True) if copy else state)
        event = parse_event(dict(event))
    d = Decider(
        state.model_copy(deep=True) if copy else state,
        wf,
        event,
        outputs=outputs or {},
        size_of=size_of or json_size,
        memo=memo if memo is not None else {},
        max_value_bytes=max_value_bytes,
        trace=trace,
    )
    apply(d)
    return d.decision


def audit_commands(
    records: list[dict[str, Any]], item_attempts: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """A decision's audit records, kept in the run record's outbox: the runtime publishes
    them to the audit stream after the write, and again whenever it carries out the outbox
    again, so a committed decision's records cannot be lost on the way. The item attempts
    it ended (traces on) go along, for their spans only."""
    return [Audit(records, item_attempts or []).wire()] if records or item_attempts else []


def outbox(decision: Decision) -> list[dict[str, Any]]:
    """What the run record keeps of a decision: its commands and audit records, as JSON."""
    return [cmd.wire() for cmd in decision.commands] + audit_commands(decision.audit, decision.item_attempts)
