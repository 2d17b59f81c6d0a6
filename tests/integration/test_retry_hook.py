"""The engine tells its process's hook (`Engine.on_run_started`, the operator's makes a
WorkflowRun) of each retry it starts when asked, and of nothing it refuses; a failing hook
never turns a started retry into an error. A real nats-server, two engines."""

from __future__ import annotations

import asyncio
from typing import Any

from cadenza_operator.engine.client import RunClient
from cadenza_operator.engine.control import ControlResponder
from cadenza_operator.engine.definition import CompiledWorkflow, compile_workflow
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec

from .harness import running_engine, unique_namespace
from .test_poison_and_timers import phases

GATE = {"steps": [{"name": "gate", "approval": {}}]}


async def _waiting(client: RunClient, run: str) -> None:
    """Until the run's gate waits for approval (a bounded poll)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while loop.time() < deadline:
        state = await client.get(run)
        if (
            state is not None
            and (st := state.steps.get("gate")) is not None
            and st.phase == "WaitingApproval"
        ):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{run}: gate never waited for approval")


async def test_each_engine_answering_a_retry_tells_its_hook_of_the_same_new_run(
    nats_server: NatsServer,
) -> None:
    namespace = unique_namespace()
    wf = compile_workflow("gated", WorkflowSpec.model_validate(GATE), namespace)
    told: list[tuple[str, str, dict[str, Any]]] = []

    async def hook(started: CompiledWorkflow, run: str, info: dict[str, Any]) -> None:
        told.append((started.name, run, info))

    def failing(started: CompiledWorkflow, run: str, info: dict[str, Any]) -> None:
        told.append((started.name, run, info))
        raise RuntimeError("the API server is away")

    async with (
        running_engine(nats_server.url, namespace) as one,
        running_engine(nats_server.url, namespace) as two,
    ):
        one.on_run_started, two.on_run_started = hook, failing
        first = await one.client.start(wf, {"v": 1})
        running = await one.client.start(wf, {"v": 2})
        for run in (first, running):
            await _waiting(one.client, run)
        await one.client.approve(namespace, first, "gate", False, by="ada")
        assert (await phases(one.client, [first], timeout=60))[first].phase == "Failed"

        refused = await ControlResponder(one).answer(
            {"op": "retry", "run": running, "namespace": namespace, "by": "ada"}
        )
        assert not refused["ok"] and told == []  # a run still going is not retried: nothing to tell

        request = {
            "op": "retry",
            "run": first,
            "namespace": namespace,
            "by": "ada",
            "key": "k",
            "from": "gate",
        }
        replies = [await ControlResponder(e).answer(dict(request)) for e in (one, two)]
        assert all(r["ok"] for r in replies), replies  # the failing hook did not fail the retry
        (new,) = {r["newRun"] for r in replies}
        assert await one.client.get(new) is not None
    info = {"source": "retry", "retryOf": first, "from": "gate", "by": "ada"}
    assert told == [("gated", new, info), ("gated", new, info)]
