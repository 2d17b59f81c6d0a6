"""Call an agent's handler without a NATS server, for the agent author's own tests.

from cadenza.testing import run_handler
from agents import classifier

def test_billing():
    assert run_handler(classifier, {"ticket": "refund"}) == {"category": "billing"}
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

from ._agent import Agent
from ._context import MemoryContext
from ._errors import FatalError, failure_of, non_retryable_match
from ._task import Task


async def call_handler(
    agent: Agent,
    input: Any,
    *,
    attempt: int = 1,
    step: str = "test",
    run_id: str = "test-run",
    item: int | None = None,
    context: MemoryContext | None = None,
) -> Any:
    """Run the handler once, as the worker would; errors propagate (RetryableError, FatalError, ...):
    `is_retryable(exc, [...])` says whether a run would retry them.

    The input and the output go through JSON, as they do on the wire, so a handler that
    returns something JSON cannot carry fails here as it would in a run.
    """
    task = Task(
        input=json.loads(json.dumps(input)),
        run_id=run_id,
        step=step,
        attempt=attempt,
        item=item,
        agent=agent.name,
        context=context if context is not None else MemoryContext(),
    )
    if isinstance(task.context, MemoryContext):
        task.context._loop = asyncio.get_running_loop()
    output = await agent.call(task)
    try:
        return json.loads(json.dumps(output))
    except (TypeError, ValueError) as exc:  # what the worker reports: not retried
        raise FatalError(f"the output cannot be sent as JSON: {exc}") from exc


def run_handler(agent: Agent, input: Any, **kwargs: Any) -> Any:
    """Synchronous form of `call_handler` for plain test functions."""
    return asyncio.run(call_handler(agent, input, **kwargs))


def failure(exc: BaseException) -> dict[str, Any]:
    """The `error` the worker sends when a handler raises `exc` (type, types, message,
    retryable, traceback or details): call it in the `except` block of a handler test."""
    return failure_of(exc)


def is_retryable(exc: BaseException, non_retryable: Iterable[str] = ()) -> bool:
    """Whether the engine retries an attempt whose handler raised `exc`, for a step with
    `retry.nonRetryable: non_retryable` and retries left: every exception is, except
    FatalError and the types listed (matched on the class and its bases)."""
    error = failure_of(exc)
    return bool(error["retryable"]) and non_retryable_match(error, non_retryable) is None


__all__ = ["MemoryContext", "call_handler", "failure", "is_retryable", "run_handler"]
