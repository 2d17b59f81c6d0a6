"""The wire protocol between agents, clients and the engine, typed.

Every message on a run's event subject is one of the `Event` models, told apart by
`"type"`. The models describe the JSON as it is sent; fields that an older sender does
not send have defaults, and fields a newer sender adds are kept (`extra="allow"`), so
an agent built on an earlier SDK and an engine built on a later one understand each
other. `parse_event` validates once; nothing needs to validate the same event again.

`TaskFailure` is the one shape of an attempt's error, whoever builds it: the SDK
(`failure_of`, a timeout, a poison task), the engine (a timer, a child run, a child that
could not start) or the local supervisor (an agent that cannot start). `wire()` gives
its JSON: exactly the fields that were set, so the JSON stays what it was.

`StepPhase` and `RunPhase` are `StrEnum`s: a member equals its string ("Running"), so
records, status and tests that hold strings compare as before.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

__all__ = [
    "MODEL_OUTCOMES",
    "ApprovalEvent",
    "AttemptEvent",
    "CancelEvent",
    "ContextEvent",
    "Event",
    "FailedEvent",
    "HeartbeatEvent",
    "ResultEvent",
    "ResumeEvent",
    "RunPhase",
    "SignalEvent",
    "StartEvent",
    "StartedEvent",
    "StepPhase",
    "TaskFailure",
    "TimerEvent",
    "UsageEvent",
    "parse_event",
]


class StepPhase(enum.StrEnum):
    """Where a step is. Skipped and WaitingApproval are a step's only."""

    PENDING = "Pending"
    RUNNING = "Running"
    WAITING_APPROVAL = "WaitingApproval"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"
    SKIPPED = "Skipped"

    @property
    def is_terminal(self) -> bool:
        """The step is done: it will not run (again) in this run."""
        return self in _TERMINAL_STEP


class RunPhase(enum.StrEnum):
    """Where a run is. Paused: its budget was reached; what runs finishes, nothing new is
    dispatched until it is resumed (not terminal)."""

    PENDING = "Pending"
    RUNNING = "Running"
    PAUSED = "Paused"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def is_terminal(self) -> bool:
        """The run is over: no event changes it any more."""
        return self in _TERMINAL_RUN


_TERMINAL_STEP = frozenset({StepPhase.SUCCEEDED, StepPhase.FAILED, StepPhase.CANCELLED, StepPhase.SKIPPED})
_TERMINAL_RUN = frozenset({RunPhase.SUCCEEDED, RunPhase.FAILED, RunPhase.CANCELLED})


class TaskFailure(BaseModel):
    """Why an attempt failed. Only `type` and `message` are always there; the rest is sent
    where it means something, and `wire()` leaves out what was not set."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(
        "Error", description="The exception's class name, or the engine's reason (Timeout, ...)."
    )
    message: str = ""
    retryable: bool | None = Field(None, description="False: no retry, whatever the step's policy.")
    timeout: bool | None = Field(
        None, description="A timeout ended the attempt (counted apart, never matched by nonRetryable)."
    )
    types: list[str] | None = Field(
        None, description="The class and its bases, `module.QualName`: what nonRetryable matches."
    )
    traceback: str | None = None
    details: Any = Field(None, description="A TaskError's details, as the handler gave them.")
    truncated: bool | None = Field(None, description="The engine cut the error down to its size limit.")
    nonRetryable: str | None = Field(None, description="The step's retry.nonRetryable entry that matched.")
    retriesExhausted: bool | None = None
    child: str | None = Field(None, description="The child run that failed, for a sub-workflow step.")

    def wire(self) -> dict[str, Any]:
        """The JSON object sent and stored: only the fields that were set (a None given
        explicitly, like a TaskError's missing details, is kept)."""
        return self.model_dump(exclude_unset=True)


class _Event(BaseModel):
    model_config = ConfigDict(extra="allow")

    run: str = ""  # the engine refuses an event without one before it is parsed
    at: float | None = Field(
        None, description="When the event was stored (the engine sets it from JetStream)."
    )
    handledAt: float | None = None


class StartEvent(_Event):
    type: Literal["start"] = "start"
    workflow: str | None = None
    namespace: str | None = None
    definition: str | None = None
    input: Any = None
    labels: dict[str, str] | None = None
    parent: dict[str, Any] | None = None
    scope: str | None = None
    requestedAt: float | None = None
    retryOf: str | None = None
    """The finished run this one retries (`cadenza retry`)."""
    reuse: dict[str, dict[str, Any]] | None = None
    """Steps of the retried run whose results this run takes as they are, by step name:
    {"output": value} or {"outputRef": key, "items": n} (a forEach's or a large output,
    kept where the retried run stored it)."""
    by: str | None = None
    """Who asked for the run (a retry's requester), the audit's actor."""


class CancelEvent(_Event):
    type: Literal["cancel"] = "cancel"
    by: str | None = None
    reason: str | None = None


class SignalEvent(_Event):
    type: Literal["signal"] = "signal"
    name: Any = None
    payload: Any = None
    by: str | None = None


class ApprovalEvent(_Event):
    type: Literal["approval"] = "approval"
    step: Any = None
    approved: Any = None
    by: str | None = None
    comment: Any = None
    sentAt: float | None = None


class TimerEvent(_Event):
    type: Literal["timer"] = "timer"
    timer: Any = None
    due: float | None = None
    # Set by the engine that handles a queue timer, never sent: the outcome of its claim
    # on the attempt (cadenza.nats.claim_attempt), so that decide, which does no I/O,
    # knows whether an agent claimed the attempt first.
    claimed: bool | None = Field(
        None, description="An agent claimed the attempt before its queueTimeout (None: not asked)."
    )
    claimedBy: str | None = Field(None, description="The worker that claimed it.")
    claimedAt: float | None = Field(None, description="When it claimed it: the attempt's start.")


class ResumeEvent(_Event):
    """Resume a run paused by its budget, with new limits (None: the limit stays)."""

    type: Literal["resume"] = "resume"
    by: str | None = None
    tokens: int | None = None
    cost: float | None = None


class AttemptEvent(_Event):
    """About one attempt of a step (or of one forEach item), sent by the agent running it
    (or, for a sub-workflow step, by the child run)."""

    step: Any = None
    item: Any = None
    attempt: Any = None
    worker: str | None = None
    agent: str | None = None
    """The Agent whose subject the event came on: set by the engine from the subject (what
    a body says is overwritten), None on the run's own subject (engine/provenance.py)."""


class StartedEvent(AttemptEvent):
    type: Literal["started"] = "started"
    startedAt: float | None = None


class HeartbeatEvent(AttemptEvent):
    type: Literal["heartbeat"] = "heartbeat"


class ResultEvent(AttemptEvent):
    """An attempt succeeded; also how a child run reports success to its parent."""

    type: Literal["result"] = "result"
    output: Any = None
    startedAt: float | None = None
    finishedAt: float | None = None


class FailedEvent(AttemptEvent):
    """An attempt failed; also how a child run reports its failure to its parent."""

    type: Literal["failed"] = "failed"
    error: TaskFailure = Field(default_factory=TaskFailure)
    startedAt: float | None = None
    finishedAt: float | None = None


class ContextEvent(AttemptEvent):
    """The agent wrote the run's shared context (audited, nothing else changes)."""

    type: Literal["context"] = "context"
    scope: Any = None
    key: Any = None
    revision: Any = None


class UsageEvent(AttemptEvent):
    """Model usage an attempt recorded (`task.record_usage`): counted against the run's
    budget. `id` is unique per call (also its Nats-Msg-Id): the engine counts it once."""

    type: Literal["usage"] = "usage"
    id: str | None = None
    model: str | None = None
    inputTokens: int = Field(0, ge=0)
    outputTokens: int = Field(0, ge=0)
    cost: float | None = Field(None, ge=0)
    calls: int = Field(1, ge=0)
    # What `task.model()` measured of the call (absent from `task.record_usage` and older
    # agents). A failed call is reported too, with zero tokens.
    requests: dict[str, int] | None = None
    """HTTP requests the call made, retries included, by outcome (MODEL_OUTCOMES)."""
    waited: float | None = Field(None, ge=0)
    """Seconds the call waited for rate limits: the Model's shared limits and 429 Retry-After."""
    latency: float | None = Field(None, ge=0)
    """Seconds of the call's last HTTP exchange (the answer that decided its outcome)."""


MODEL_OUTCOMES = ("ok", "ratelimited", "error", "unreachable", "other")
"""How one HTTP request to a Model ended: answered 2xx, 429, another 4xx/5xx, no answer
(connection error, timeout); `other` for an outcome a newer agent names. A fixed set: it is
a metric label."""


Event = Annotated[
    StartEvent
    | CancelEvent
    | SignalEvent
    | ApprovalEvent
    | TimerEvent
    | StartedEvent
    | HeartbeatEvent
    | ResultEvent
    | FailedEvent
    | ContextEvent
    | ResumeEvent
    | UsageEvent,
    Field(discriminator="type"),
]

_EVENT: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(data: bytes | str | dict[str, Any]) -> Event:
    """One event, validated once: JSON bytes (or an already decoded object).
    Raises pydantic.ValidationError for anything that is not an event."""
    if isinstance(data, dict):
        return _EVENT.validate_python(data)
    return _EVENT.validate_json(data)
