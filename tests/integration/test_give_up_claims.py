"""An attempt the engine has given up (the run cancelled, its forEach cancelled) is never
started, however the agent that takes its task later looks at it.

The CI soak once saw an agent start a task of a cancelled run: the task was fresh from
the queue, so the agent did not read the run record, and the engine's cancel notice had
not reached it (the engine that committed the cancel was killed before sending it). The
engine now marks every attempt it gives up `abandoned` in the claims bucket before it
commits, and the agent claims each attempt before starting it (cadenza._claims).

Here the agent's look at the run record always answers "current" (as a fresh task, or a
read from before the commit, would) and the agent starts after the cancel notice was
sent, so it never hears it: only the claim can keep the handler from running.
"""

from __future__ import annotations

from typing import Any

import pytest
from cadenza import Agent
from cadenza import _agent as agent_module
from cadenza.wire import TASKS_STREAM, consumer_name
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec

from .harness import poll, running_engine, serving, unique_namespace
from .test_poison_and_timers import phases

STEPS = {
    "one": {"name": "a", "agent": "worker", "input": {"n": 1}},
    "forEach": {"name": "a", "agent": "worker", "forEach": "[1, 2, 3, 4, 5]", "input": {"n": "${{ item }}"}},
}


@pytest.mark.parametrize("shape", sorted(STEPS))
async def test_an_agent_never_starts_a_task_of_a_cancelled_run(
    fresh_nats: NatsServer, monkeypatch: pytest.MonkeyPatch, shape: str
) -> None:
    namespace = unique_namespace()
    wf = compile_workflow("cancelled", WorkflowSpec.model_validate({"steps": [STEPS[shape]]}), namespace)
    run = f"cancel-{shape.lower()}"

    async def looks_current(runs_kv: Any, body: dict[str, Any]) -> str | None:
        return None  # the record read from before the commit (or not read: a fresh task)

    monkeypatch.setattr(agent_module, "abandoned", looks_current)
    starts: list[tuple[str, Any]] = []
    agent = Agent("worker", concurrency=8)

    @agent.handler
    async def handle(task: Any) -> dict[str, Any]:
        starts.append((task.run_id, task.item))
        return {}

    async with running_engine(fresh_nats.url, namespace) as engine:

        async def queue() -> Any:
            return await engine.js.consumer_info(TASKS_STREAM, consumer_name(namespace, "worker"))

        async def queued() -> bool:
            return bool((await queue()).num_pending >= (5 if shape == "forEach" else 1))

        async def drained() -> bool:
            info = await queue()
            return bool(info.num_pending == 0 and info.num_ack_pending == 0)

        await engine.client.start(wf, {}, run_id=run)
        await poll(queued)  # the tasks wait: no agent yet
        await engine.client.cancel(namespace, run, by="test")
        state = (await phases(engine.client, [run], timeout=30))[run]
        assert state is not None and state.phase == "Cancelled", state
        async with serving(agent, fresh_nats.url, namespace):
            await poll(drained)  # every task taken and settled
    assert starts == []
