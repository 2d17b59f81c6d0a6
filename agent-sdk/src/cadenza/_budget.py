"""The budget check before each `task.model()` call: a run over budget refuses the call.

The engine holds budgets at dispatch (a run whose usage reached its budget pauses before
its next attempt starts); this holds them inside an attempt, so a handler making many
calls stops at the budget, and a run overshoots by at most the calls already in flight.

The engine puts the effective limits in the task body (`budget: {"run": {...}, "step":
{...}}`, only when a budget exists), and the check reads the run's status (one KV get
per call; a task without a budget reads nothing): what the engine lets agents know of a
run, in the run record's shape (engine/run_status.py; agents cannot read run records).
A limit raised by `resume` (the status's `budget`, `steps[name].budget`) takes precedence
over the task's.

The status's usage lags the calls: an agent's `usage` events reach it through the engine.
So the check adds what this attempt has recorded beyond what the status already counts
for it (the attempt's own `usage`); a forEach item's attempt has no usage of its own
there, so for it the status alone counts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ._errors import BudgetExceeded
from ._protocol import TERMINAL_RUN_PHASES, loads


def _spent(usage: Any) -> tuple[int, float]:
    """(tokens, cost) of a record's `usage`."""
    if not isinstance(usage, dict):
        return 0, 0.0
    return int(usage.get("inputTokens") or 0) + int(usage.get("outputTokens") or 0), float(
        usage.get("cost") or 0.0
    )


def _reached(scope: str, limit: Any, tokens: int, cost: float) -> str | None:
    if not isinstance(limit, dict):
        return None
    if limit.get("tokens") is not None and tokens >= limit["tokens"]:
        return f"{scope} budget reached: {tokens} tokens used of a budget of {limit['tokens']}"
    if limit.get("cost") is not None and cost >= limit["cost"]:
        return f"{scope} budget reached: cost {cost:g} of a budget of {limit['cost']:g}"
    return None


def refusal(
    record: dict[str, Any] | None,
    body: dict[str, Any],
    local: tuple[int, float] = (0, 0.0),
) -> str | None:
    """Why a model call of the attempt `body` carries may not be made now, or None.

    `record` is the run's status, or its record from an engine from before statuses (None:
    gone); `local` is the (tokens, cost) this attempt has recorded so far.
    """
    if record is None:
        return "the run no longer exists"
    phase = record.get("phase")
    if phase in TERMINAL_RUN_PHASES:
        return f"the run is {phase}"
    if record.get("failing"):
        return "the run is ending"
    message = str(record.get("message") or "")
    if phase == "Paused" and message.startswith("BudgetExceeded"):
        return f"the run is paused: {message}"
    limits = body.get("budget") or {}
    step = (record.get("steps") or {}).get(body["step"]) or {}
    unseen_tokens, unseen_cost = 0, 0.0
    if body.get("item") is None:
        counted = next(
            (a.get("usage") for a in step.get("attempts") or [] if a.get("n") == body["attempt"]), None
        )
        seen_tokens, seen_cost = _spent(counted)
        unseen_tokens, unseen_cost = max(0, local[0] - seen_tokens), max(0.0, local[1] - seen_cost)
    run_tokens, run_cost = _spent(record.get("usage"))
    step_tokens, step_cost = _spent(step.get("usage"))
    return _reached(
        "run", record.get("budget") or limits.get("run"), run_tokens + unseen_tokens, run_cost + unseen_cost
    ) or _reached(
        f"step {body['step']}",
        step.get("budget") or limits.get("step"),
        step_tokens + unseen_tokens,
        step_cost + unseen_cost,
    )


class BudgetGuard:
    """One attempt's check: `await guard.check()` before a call, `guard.count()` after it."""

    def __init__(self, body: dict[str, Any], read: Callable[[str], Awaitable[Any]]) -> None:
        self._body = body
        self._read = read  # the run's status by run id: an entry, or raises KeyNotFoundError
        self._tokens = 0
        self._cost = 0.0

    def count(self, input_tokens: int, output_tokens: int, cost: float | None) -> None:
        self._tokens += input_tokens + output_tokens
        self._cost += cost or 0.0

    async def check(self) -> None:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self._read(self._body["run"])
            record = loads(entry.value) if entry.value else None
        except KeyNotFoundError:
            record = None
        why = refusal(record, self._body, (self._tokens, self._cost))
        if why is not None:
            raise BudgetExceeded(f"model call refused: {why}")


def guard_for(body: dict[str, Any], read: Callable[[str], Awaitable[Any]]) -> BudgetGuard | None:
    """The attempt's guard, or None when its run has no budget (then no call reads anything)."""
    return BudgetGuard(body, read) if body.get("budget") else None
