"""Call an agent's handler without a NATS server, for the agent author's own tests.

from cadenza.testing import run_handler
from agents import classifier

def test_billing():
    assert run_handler(classifier, {"ticket": "refund"}) == {"category": "billing"}
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ._agent import Agent
from ._context import MemoryContext
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
    """Run the handler once, as the worker would; errors propagate (RetryableError, FatalError, ...).

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
    return json.loads(json.dumps(output))


def run_handler(agent: Agent, input: Any, **kwargs: Any) -> Any:
    """Synchronous form of `call_handler` for plain test functions."""
    return asyncio.run(call_handler(agent, input, **kwargs))


__all__ = ["MemoryContext", "call_handler", "run_handler"]
