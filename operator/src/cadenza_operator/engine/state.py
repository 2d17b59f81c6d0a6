"""The run record: execution state of one run, stored in JetStream KV under the run id.

Kept bounded whatever the workload: forEach item outputs live in the outputs bucket, a
forEach keeps only its in-flight items and counts, attempts are capped.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from cadenza.protocol import RunPhase, StepPhase
from pydantic import BaseModel, ConfigDict, Field

# The terminal phases as sets, for code that holds a phase as a string (a status dict);
# a phase of the record says it itself: `state.phase.is_terminal`.
TERMINAL_RUN = frozenset(p for p in RunPhase if p.is_terminal)
TERMINAL_STEP = frozenset(p for p in StepPhase if p.is_terminal)
MAX_ATTEMPT_RECORDS = 20
RUN_ID = re.compile(r"^[A-Za-z0-9_=-][A-Za-z0-9_.=-]{0,252}$")
"""A run id: a JetStream KV key and one subject token (no dots first, no wildcards)."""
MAX_FAILED_ITEMS = 20


class _State(BaseModel):
    model_config = ConfigDict(extra="ignore")


MAX_USAGE_IDS = 256
"""Usage event ids a run remembers, to count an engine's redelivery once (JetStream
already drops an agent's repeated publish by its Nats-Msg-Id)."""


class Usage(_State):
    """Model usage summed: four numbers, whatever the number of calls."""

    inputTokens: int = 0
    outputTokens: int = 0
    cost: float = 0.0
    calls: int = 0

    @property
    def tokens(self) -> int:
        return self.inputTokens + self.outputTokens

    def add(self, other: Usage) -> None:
        self.inputTokens += other.inputTokens
        self.outputTokens += other.outputTokens
        self.cost += other.cost
        self.calls += other.calls


class Budget(_State):
    """A limit on usage (None: no limit on that)."""

    tokens: int | None = None
    cost: float | None = None


class Attempt(_State):
    """One attempt's life: ready (it could have run) -> queued (the engine dispatched it)
    -> started (an agent began it) -> finished. Ready to queued is time spent behind
    maxParallel, maxActiveRuns or a busy engine; queued to started, waiting for an agent."""

    n: int
    readyAt: float | None = None
    queuedAt: float
    startedAt: float | None = None
    finishedAt: float | None = None
    outcome: str | None = None  # Succeeded | Failed | TimedOut | Cancelled
    error: dict[str, Any] | None = None
    worker: str | None = None
    agent: str | None = None  # the Agent its events came from, verified by their subject
    usage: Usage | None = None
    # sha256 (16 hex) of the rendered input and of the output, as canonical JSON (a value
    # passed by reference: of the reference): `cadenza diagnose` groups attempts by input
    # to find steps whose output differs for the same input.
    inputHash: str | None = None
    outputHash: str | None = None


class Slot(_State):
    """One dispatchable unit: a step, or one item of a forEach step."""

    attempt: int = 0
    running: bool = False
    readyAt: float | None = None
    queuedAt: float | None = None
    startedAt: float | None = None
    lastHeartbeat: float | None = None
    retryAt: float | None = None


class Timing(_State):
    """Where a step's time went, summed over its attempts (and items): seconds from ready
    to queued (scheduling), queued to started (queued) and started to finished (executing)."""

    scheduling: float = 0.0
    queued: float = 0.0
    executing: float = 0.0
    attempts: int = 0  # finished attempts measured

    @property
    def waiting(self) -> float:
        return self.scheduling + self.queued

    def add(self, scheduling: float, queued: float, executing: float | None) -> None:
        self.scheduling += scheduling
        self.queued += queued
        self.executing += executing or 0.0
        self.attempts += 1


def attempt_stages(
    ready: float | None, queued: float | None, started: float | None, finished: float
) -> tuple[float, float, float | None]:
    """Seconds an attempt spent ready -> queued, queued -> started and started -> finished
    (None if it never started: it waited until it ended). The times come from different
    clocks (engine and agent hosts), so each stage is clamped at zero."""
    queued = queued if queued is not None else finished
    ready = ready if ready is not None else queued
    scheduling = max(0.0, queued - ready)
    if started is None:
        return scheduling, max(0.0, finished - queued), None
    return scheduling, max(0.0, started - queued), max(0.0, finished - started)


class ForEachState(_State):
    total: int = 0
    next: int = 0
    running: dict[str, Slot] = Field(default_factory=dict)  # str(index) -> slot, bounded by the window
    counts: dict[str, int] = Field(default_factory=dict)  # Succeeded / Failed
    failed: list[int] = Field(default_factory=list)  # first MAX_FAILED_ITEMS failed indexes
    retries: int = 0


class StepState(Slot):
    phase: StepPhase = StepPhase.PENDING
    attempts: list[Attempt] = Field(default_factory=list)
    output: Any = None
    outputRef: str | None = None  # key in the outputs bucket (forEach and large outputs)
    error: dict[str, Any] | None = None
    message: str = ""
    firstQueuedAt: float | None = None
    finishedAt: float | None = None
    activated: bool = False  # a fallback step called in by a failure
    recoveredBy: str | None = None
    approval: dict[str, Any] | None = None
    deniedAt: float | None = None  # time of the last approval ignored (sender not an approver)
    forEach: ForEachState | None = None
    child: str | None = None
    retries: int = 0
    timing: Timing | None = None
    usage: Usage | None = None
    budget: Budget | None = None  # raised by a resume; else the step's spec budget


class Timer(_State):
    at: float
    kind: Literal["retry", "queue", "timeout", "heartbeat", "approval", "signal", "deadline"]
    step: str | None = None
    item: int | None = None
    attempt: int | None = None


class RunState(_State):
    run: str
    namespace: str = "default"
    workflow: str
    definition: str  # key of the compiled definition
    phase: RunPhase = RunPhase.PENDING
    input: Any = None
    inputRef: str | None = None  # a large input lives in the outputs bucket under this key
    createdAt: float
    startedAt: float | None = None
    finishedAt: float | None = None
    steps: dict[str, StepState] = Field(default_factory=dict)
    outputs: Any = None
    outputsRef: str | None = None  # large run outputs live in the outputs bucket under this key
    message: str = ""
    timers: dict[str, Timer] = Field(default_factory=dict)
    signals: dict[str, Any] = Field(default_factory=dict)
    parent: dict[str, Any] | None = None  # {run, namespace, step, item, attempt}
    scope: str = ""  # shared-context scope: the root run's id
    failing: str | None = None  # why the run is winding down (a failure, a deadline, a cancel)
    exitPhase: RunPhase | None = None  # the phase to finish with once onExit is done
    cancelledBy: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    retryOf: str | None = None  # the finished run this one retries, reusing its succeeded steps
    auditSeq: int = 0
    usage: Usage | None = None
    usageSeen: list[str] = Field(default_factory=list)  # the last MAX_USAGE_IDS usage ids
    budget: Budget | None = None  # raised by a resume; else the workflow's spec budget
    held: list[tuple[str, int | None, bool]] = Field(default_factory=list)  # (step, item, retry) a pause held
    outbox: list[dict[str, Any]] = Field(default_factory=list)  # commands of the last decision

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_RUN  # a str set by hand compares too

    def to_bytes(self) -> bytes:
        # The serializer's bytes directly: model_dump_json would build a str to encode again.
        return self.__pydantic_serializer__.to_json(self, exclude_defaults=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> RunState:
        return cls.model_validate_json(data)

    def running_attempts(self) -> set[tuple[str, int | None, int]]:
        """(step, item, attempt) of every attempt the record has running."""
        found: set[tuple[str, int | None, int]] = set()
        for name, st in self.steps.items():
            if st.forEach is not None:
                running = st.forEach.running.items()
                found.update((name, int(i), slot.attempt) for i, slot in running if slot.running)
            elif st.running:
                found.add((name, None, st.attempt))
        return found


def run_timing(state: RunState) -> Timing:
    """The run's time summed over its steps' finished attempts. Steps run in parallel, so
    the sums can exceed the run's wall-clock duration: they say where agent time went."""
    total = Timing()
    for st in state.steps.values():
        if st.timing is not None:
            total.add(st.timing.scheduling, st.timing.queued, st.timing.executing)
            total.attempts += st.timing.attempts - 1
    return total
