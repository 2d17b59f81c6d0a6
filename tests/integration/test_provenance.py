"""Result provenance: the engine applies an attempt's events only from the Agent its step
names, told by the subject (engine/provenance.py), not by the body anyone can write.

The attack from issue 13: while the real agent works, another client publishes a result
for the attempt, with the Nats-Msg-Id an agent's result had before dispatch nonces, so
that JetStream would also drop the real result as a duplicate. Here it comes on another
agent's subject, on the run's own subject (provenance required, as with credentials) and,
as a cancel, on the real agent's subject (which carries attempt events only).
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats
from cadenza import Agent
from cadenza.wire import TASKS_STREAM, agent_event_subject, consumer_name, dumps, event_subject
from cadenza_operator import metrics
from cadenza_operator.engine.audit import read_audit
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.engine.infra import ensure_agent_consumer
from cadenza_operator.engine.runtime import Engine
from cadenza_operator.engine.settings import EngineSettings
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec

from .harness import poll, serving, unique_namespace
from .test_poison_and_timers import phases


def forged_count(namespace: str, kind: str) -> float:
    return float(metrics.FORGED_EVENTS.labels(namespace, kind)._value.get())


async def test_a_forged_result_is_rejected_and_the_real_one_wins(fresh_nats: NatsServer) -> None:
    namespace = unique_namespace()
    spec = WorkflowSpec.model_validate({"steps": [{"name": "pay", "agent": "payer", "input": {"n": 1}}]})
    wf = compile_workflow("payment", spec, namespace)
    nc = await nats.connect(fresh_nats.url)
    js = nc.jetstream()
    engine = Engine(nc, EngineSettings(require_provenance=True))
    await engine.start()
    await ensure_agent_consumer(js, namespace, "payer")
    run = "pay-1"
    working, release = asyncio.Event(), asyncio.Event()
    agent = Agent("payer")

    @agent.handler
    async def handle(task: Any) -> dict[str, Any]:
        working.set()
        await release.wait()
        return {"approved": False, "amount": 10}

    forged = {
        "type": "result",
        "run": run,
        "step": "pay",
        "item": None,
        "attempt": 1,
        "worker": "evil:1",
        "output": {"approved": True, "amount": 1000000},
    }
    expected_id = {"Nats-Msg-Id": f"result:{run}.pay.None.1"}  # an agent's result id before nonces

    async def forged_records() -> list[dict[str, Any]] | None:
        records = [r for r in await read_audit(js, namespace, run, idle=0.2) if r.get("forged")]
        return records if len(records) == 3 else None

    try:
        async with serving(agent, fresh_nats.url, namespace):
            await engine.client.start(wf, {}, run_id=run)
            await asyncio.wait_for(working.wait(), 30)
            await js.publish(agent_event_subject(namespace, run, "spy"), dumps(forged), headers=expected_id)
            await js.publish(event_subject(namespace, run), dumps(forged))
            cancel = {"type": "cancel", "run": run, "by": "payer"}
            await js.publish(agent_event_subject(namespace, run, "payer"), dumps(cancel))
            records = await poll(forged_records, timeout=30)
            release.set()
            state = (await phases(engine.client, [run], timeout=30))[run]
        assert state is not None and state.phase == "Succeeded", state
        assert state.steps["pay"].output == {"approved": False, "amount": 10}
        attempt = state.steps["pay"].attempts[-1]
        assert attempt.worker and attempt.worker != "evil:1" and attempt.agent == "payer"
        by_claim = {(r["event"], r["claimedAgent"]): r for r in records}
        assert set(by_claim) == {("result", "spy"), ("result", None), ("cancel", "payer")}
        spy = by_claim[("result", "spy")]
        assert spy["agent"] == "payer" and spy["step"] == "pay" and spy["attempt"] == 1
        assert "'spy'" in spy["reason"] and "'payer'" in spy["reason"]
        assert "naming no agent" in by_claim[("result", None)]["reason"]
        assert forged_count(namespace, "result") == 2
        assert forged_count(namespace, "cancel") == 1
    finally:
        await engine.stop()
        await nc.close()


async def test_an_old_agent_on_the_run_subject_still_works_without_provenance(fresh_nats: NatsServer) -> None:
    """An engine without credentials (provenance not required) still takes an old agent's
    result on the run's own subject; one on another agent's subject is rejected anyway."""
    namespace = unique_namespace()
    spec = WorkflowSpec.model_validate({"steps": [{"name": "a", "agent": "worker", "input": {}}]})
    wf = compile_workflow("old", spec, namespace)
    nc = await nats.connect(fresh_nats.url)
    js = nc.jetstream()
    engine = Engine(nc, EngineSettings())
    assert not engine.settings.provenance_required
    await engine.start()
    run = "old-1"
    result = {"type": "result", "run": run, "step": "a", "item": None, "attempt": 1, "output": {"v": 1}}
    result["agent"] = "worker"  # what a body says of its sender is not taken
    try:
        await engine.client.start(wf, {}, run_id=run)
        await poll(lambda: _dispatched(engine, run))
        await js.publish(agent_event_subject(namespace, run, "other"), dumps({**result, "output": {"v": 2}}))
        await js.publish(event_subject(namespace, run), dumps(result))
        state = (await phases(engine.client, [run], timeout=30))[run]
        assert state is not None and state.phase == "Succeeded", state
        assert state.steps["a"].output == {"v": 1}
        assert state.steps["a"].attempts[-1].agent is None  # not proven by a subject
        assert forged_count(namespace, "result") == 1
    finally:
        await engine.stop()
        await nc.close()


async def _dispatched(engine: Engine, run: str) -> bool:
    state = await engine.client.get(run)
    return state is not None and state.steps.get("a") is not None and state.steps["a"].attempt == 1


class _Recording:
    """A JetStream context that records the consumer calls an agent makes."""

    def __init__(self, js: Any) -> None:
        self.js = js
        self.calls: list[str] = []

    async def consumer_info(self, *args: Any) -> Any:
        self.calls.append("info")
        return await self.js.consumer_info(*args)

    async def add_consumer(self, *args: Any) -> Any:
        self.calls.append("add")
        return await self.js.add_consumer(*args)


async def test_an_agent_with_credentials_waits_for_its_consumer_and_never_creates_it(
    fresh_nats: NatsServer,
) -> None:
    """An agent credential may not create consumers: with credentials the agent looks its
    consumer up until the engine has created it. Without, it creates it as before."""
    namespace = unique_namespace()
    nc = await nats.connect(fresh_nats.url)
    engine = Engine(nc)
    await engine.open()  # the streams, no consumer for the agent yet
    js = _Recording(nc.jetstream())
    agent = Agent("worker")
    durable = consumer_name(namespace, "worker")
    stop = asyncio.Event()
    try:
        looking = asyncio.create_task(
            agent._ensure_consumer(js, durable, namespace, 30.0, stop, create=False)
        )
        await poll(lambda: _async(js.calls.count("info") >= 2))  # looked, waited, looked again
        assert "add" not in js.calls and not looking.done()
        await ensure_agent_consumer(nc.jetstream(), namespace, "worker")
        await asyncio.wait_for(looking, 30)
        assert "add" not in js.calls
        other = consumer_name(namespace, "open")
        await Agent("open")._ensure_consumer(js, other, namespace, 30.0, stop)
        assert js.calls[-1] == "add"
        assert (await nc.jetstream().consumer_info(TASKS_STREAM, other)).name == other
    finally:
        stop.set()
        await engine.stop()
        await nc.close()


async def _async(value: bool) -> bool:
    return value
