"""The task a handler receives."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import structlog

from ._context import KVContext, MemoryContext


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
    _cancelled: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

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
            self._bound = structlog.get_logger("cadenza.task").bind(
                run=t.run_id, step=t.step, attempt=t.attempt, agent=t.agent, **extra
            )
        return getattr(self._bound, name)
