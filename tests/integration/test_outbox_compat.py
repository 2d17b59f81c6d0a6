"""A run record written by the engine before commands were typed (its outbox a list of
`{"op": ...}` objects) still loads and executes: an engine that died after writing it
leaves its commands to the next one, which may be the new version. And a decision's
outbox is still that JSON, byte for byte."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
from cadenza import Agent
from cadenza.wire import dumps, event_subject, task_subject
from cadenza_operator.engine.commands import Dispatch, from_wire
from cadenza_operator.engine.decide import decide, outbox
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.engine.infra import ensure_agent_consumer
from cadenza_operator.engine.runtime import Engine, EngineSettings
from cadenza_operator.engine.state import RunState
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec

from .harness import serving, unique_namespace

SPEC = WorkflowSpec.model_validate(
    {
        "steps": [{"name": "a", "agent": "echo", "input": {"n": "${{ input.n }}"}}],
        "output": "${{ steps.a.output }}",
    }
)


def old_outbox(namespace: str, run: str) -> list[dict[str, Any]]:
    """The outbox of a run's start as the previous engine wrote it (hand-written JSON)."""
    return [
        {
            "op": "dispatch",
            "subject": task_subject(namespace, "echo"),
            "msgId": f"{run}.a.1",
            "body": {
                "run": run,
                "workflow": "echo-wf",
                "step": "a",
                "item": None,
                "attempt": 1,
                "input": {"n": 7},
                "scope": run,
                "timeout": None,
                "heartbeat": None,
                "queueTimeout": None,
                "queuedAt": 1.0,
                "notifyStart": False,
                "reportStartAfter": 0.25,
            },
            "agent": "echo",
        },
    ]


async def test_an_outbox_written_by_the_previous_engine_is_executed(fresh_nats: NatsServer) -> None:
    namespace = unique_namespace()
    wf = compile_workflow("echo-wf", SPEC, namespace)
    run = "echo-wf-old-outbox"
    state = RunState(
        run=run,
        namespace=namespace,
        workflow=wf.name,
        definition=wf.key,
        createdAt=1.0,
        input={"n": 7},
        scope=run,
    )
    decision = decide(state, {"type": "start", "run": run, "at": 1.0}, wf)
    written = outbox(decision)
    old = old_outbox(namespace, run)
    assert written[: len(old)] == old and written[-1]["op"] == "audit"  # the same JSON as before
    assert dumps(written[0]) == dumps(old[0])  # key order too
    assert [from_wire(c) for c in old] == [c for c in decision.commands if isinstance(c, Dispatch)]

    # The record as an engine of the previous version left it: written, its outbox not
    # carried out (it died in between).
    record = decision.state
    record.outbox = old
    nc = await nats.connect(fresh_nats.url)
    engine = Engine(nc, EngineSettings(sweep_interval=3600))
    await engine.open()
    client = engine.client
    await client.publish_definition(wf)
    await ensure_agent_consumer(nc.jetstream(), namespace, "echo")
    await client.kv.put(run, record.to_bytes())

    agent = Agent("echo")

    @agent.handler
    async def echo(task: Any) -> dict[str, Any]:
        return {"n": task.input["n"]}

    await engine.start()
    try:
        async with serving(agent, fresh_nats.url, namespace):
            # Any event makes the engine load the record; it carries out the outbox first.
            await nc.jetstream().publish(
                event_subject(namespace, run), dumps({"type": "signal", "run": run, "name": "nudge"})
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            final = await client.get(run)
            while (final is None or not final.terminal) and loop.time() < deadline:
                await asyncio.sleep(0.1)
                final = await client.get(run)
    finally:
        await engine.stop()
        await nc.close()
    assert final is not None and final.phase == "Succeeded", final
    assert final.outputs == {"n": 7}
