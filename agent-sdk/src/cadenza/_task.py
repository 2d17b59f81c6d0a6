"""The task a handler receives."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from ._context import KVContext, MemoryContext

if TYPE_CHECKING:
    from ._budget import BudgetGuard
    from ._runlog import AttemptLog
    from .models import Model, ModelRegistry, Usage


@dataclass
class Task:
    """One attempt of one step (or of one forEach item) handed to an agent.

    `input` is the step's evaluated input; `attempt` counts from 1; `log` is a structlog
    logger already bound with the run, step, attempt and agent.
    """

    input: Any
    run_id: str
    step: str
    attempt: int = 1
    item: int | None = None
    workflow: str = ""
    namespace: str = "default"
    agent: str = ""
    timeout: float | None = None
    context: KVContext | MemoryContext = field(default_factory=MemoryContext)
    log: Any = None
    _usage: Callable[[str, int, int, float | None, dict[str, Any] | None], None] | None = field(
        default=None, repr=False
    )
    _cancelled: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _models: ModelRegistry | None = field(default=None, repr=False)
    _budget: BudgetGuard | None = field(default=None, repr=False)  # None: the run has no budget
    _runlog: AttemptLog | None = field(default=None, repr=False)  # None: stderr only (cadenza.testing)

    def __post_init__(self) -> None:
        if self.log is None:
            # Bound lazily: most handlers of a busy agent never log.
            self.log = _LazyLogger(self)

    @property
    def cancelled(self) -> bool:
        """True once the run was cancelled or this attempt timed out: stop work and return."""
        return self._cancelled.is_set()

    async def wait_cancelled(self) -> None:
        """Wait until the task is cancelled (useful in asyncio.wait alongside real work)."""
        await self._cancelled.wait()

    def record_usage(
        self, model: str, input_tokens: int, output_tokens: int, cost: float | None = None
    ) -> None:
        """Count a model call against the run: its tokens (and cost, in the Model's cost
        units) go to the attempt's, the step's and the run's usage and budget. For calls
        made another way than `task.model()`, which records its own. Never blocks."""
        if input_tokens < 0 or output_tokens < 0 or (cost is not None and cost < 0):
            raise ValueError("record_usage: tokens and cost cannot be negative")
        self._record(model, int(input_tokens), int(output_tokens), cost, None)

    def model(self, name: str) -> Model:
        """One of the Agent's Models (`spec.models`): `await m.chat(messages)` waits for the
        Model's cluster-wide limits and counts the call's usage against this task. In a run
        over its budget (or paused for it, or ending) a call raises BudgetExceeded instead."""
        from .models import ModelRegistry

        if self._models is None:  # cadenza.testing: the Models in CADENZA_MODELS, unlimited
            self._models = ModelRegistry.from_env()
        return self._models.model(
            name,
            self._record_call,
            check=self._budget.check if self._budget is not None else None,
        )

    def _record_call(self, model: str, u: Usage) -> None:
        """A call through `task.model()`, failed ones too: recorded as `record_usage` does,
        with what it measured (requests by outcome, rate-limit wait, latency) for the
        engine's model metrics."""
        measured = {"requests": dict(u.requests), "waited": u.waited, "latency": u.latency}
        self._record(model, u.input_tokens, u.output_tokens, u.cost, measured)

    def _record(
        self,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cost: float | None,
        measured: dict[str, Any] | None,
    ) -> None:
        if self._usage is not None:  # None under cadenza.testing: nothing to send it to
            self._usage(model, input_tokens, output_tokens, cost, measured)
        if self._budget is not None:
            self._budget.count(input_tokens, output_tokens, cost)

    def cancel(self) -> None:
        self._cancelled.set()


class _LazyLogger:
    """A structlog logger bound with the task's identity on first use."""

    __slots__ = ("_bound", "_task")

    def __init__(self, task: Task) -> None:
        self._task = task
        self._bound: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._bound is None:
            t = self._task
            extra = {"item": t.item} if t.item is not None else {}
            # With a run log, each line also goes to the run's log stream (cadenza._runlog).
            base = (
                structlog.get_logger("cadenza.task")
                if t._runlog is None
                else t._runlog.logger("cadenza.task")
            )
            self._bound = base.bind(run=t.run_id, step=t.step, attempt=t.attempt, agent=t.agent, **extra)
        return getattr(self._bound, name)
