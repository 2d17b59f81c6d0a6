"""A task of an attempt that already finished is not started again, told by its claim
alone: the engine marks every attempt that stops running (finished ones too) in the
claims bucket, under `<ns>.<agent>.<task id>`, so agents need not read run records.

Here the agent's look at the run record always answers "current", and the finished
attempt's task comes again (as a redelivery after a lost ack would).
"""

from __future__ import annotations

from typing import Any

import pytest
from cadenza import Agent
from cadenza import _agent as agent_module
from cadenza.wire import (
    CLAIMS_BUCKET,
    RUN_STATUS_BUCKET,
    RUNS_BUCKET,
    TASKS_STREAM,
    claim_key,
    consumer_name,
    dumps,
    loads,
    run_status_key,
    task_subject,
)
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec

from .harness import poll, running_engine, serving, unique_namespace
from .test_poison_and_timers import phases


async def test_a_finished_attempt_is_not_started_again(
    fresh_nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    namespace = unique_namespace()
    spec = WorkflowSpec.model_validate({"steps": [{"name": "a", "agent": "worker", "input": {"n": 1}}]})
    wf = compile_workflow("once", spec, namespace)

    async def looks_current(runs_kv: Any, body: dict[str, Any]) -> str | None:
        return None

    monkeypatch.setattr(agent_module, "abandoned", looks_current)
    starts: list[str] = []
    agent = Agent("worker")

    @agent.handler
    async def handle(task: Any) -> dict[str, Any]:
        starts.append(task.run_id)
        return {"ok": True}

    async def drained(js: Any) -> bool:
        info = await js.consumer_info(TASKS_STREAM, consumer_name(namespace, "worker"))
        return info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.stream_seq >= 2

    run = "once-1"
    async with running_engine(fresh_nats.url, namespace) as engine, serving(agent, fresh_nats.url, namespace):
        js = engine.js
        await engine.client.start(wf, {}, run_id=run)
        state = (await phases(engine.client, [run], timeout=30))[run]
        assert state is not None and state.phase == "Succeeded", state
        claims = await js.key_value(CLAIMS_BUCKET)
        key = claim_key(namespace, "worker", f"{run}.a.1")
        assert (await claims.get(key)).value == b"abandoned"  # finished: nobody starts it again
        again = {"run": run, "step": "a", "item": None, "attempt": 1, "input": {"n": 1}}
        subject = task_subject(namespace, "worker")
        await js.publish(subject, dumps(again), headers={"Nats-Msg-Id": "again"})
        await poll(lambda: drained(js))
    assert starts == [run]


async def test_an_agent_reads_no_run_record_only_its_runs_status(
    fresh_nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent credential cannot read the runs bucket: the agent opens only the run status
    bucket, which holds what its checks need (engine/run_status.py), written by then."""
    from nats.js.client import JetStreamContext

    namespace = unique_namespace()
    spec = WorkflowSpec.model_validate(
        {"budget": {"tokens": 1000}, "steps": [{"name": "a", "agent": "worker", "input": {"n": 1}}]}
    )
    wf = compile_workflow("status", spec, namespace)
    opened: list[str] = []
    key_value = JetStreamContext.key_value

    async def recording(self: Any, bucket: str) -> Any:
        opened.append(bucket)
        return await key_value(self, bucket)

    seen: list[Any] = []
    agent = Agent("worker")

    @agent.handler
    async def handle(task: Any) -> dict[str, Any]:
        seen.append(loads((await task._budget._read(task.run_id)).value))  # what its budget check reads
        return {"ok": True}

    run = "status-1"
    async with running_engine(fresh_nats.url, namespace) as engine:
        monkeypatch.setattr(JetStreamContext, "key_value", recording)  # the agent's, from here
        async with serving(agent, fresh_nats.url, namespace):
            await engine.client.start(wf, {}, run_id=run)
            state = (await phases(engine.client, [run], timeout=30))[run]
            assert state is not None and state.phase == "Succeeded", state
        monkeypatch.undo()
        status = await (await engine.js.key_value(RUN_STATUS_BUCKET)).get(run_status_key(namespace, run))
    assert RUNS_BUCKET not in opened and RUN_STATUS_BUCKET in opened, opened
    assert seen == [{"phase": "Running"}]
    assert loads(status.value) == {"phase": "Succeeded"}


async def test_a_run_without_a_budget_writes_no_status(fresh_nats: NatsServer) -> None:
    """Its agents have no model call to refuse, and its claims say whether an attempt may
    start: the status would be two writes per run (and one computed per decision) for nothing."""
    from nats.js.errors import KeyNotFoundError

    namespace = unique_namespace()
    spec = WorkflowSpec.model_validate({"steps": [{"name": "a", "agent": "worker", "input": {"n": 1}}]})
    wf = compile_workflow("plain", spec, namespace)
    agent = Agent("worker")

    @agent.handler
    async def handle(task: Any) -> dict[str, Any]:
        return {"ok": True}

    async with running_engine(fresh_nats.url, namespace) as engine:
        async with serving(agent, fresh_nats.url, namespace):
            await engine.client.start(wf, {}, run_id="plain-1")
            state = (await phases(engine.client, ["plain-1"], timeout=30))["plain-1"]
            assert state is not None and state.phase == "Succeeded", state
        with pytest.raises(KeyNotFoundError):
            await (await engine.js.key_value(RUN_STATUS_BUCKET)).get(run_status_key(namespace, "plain-1"))
