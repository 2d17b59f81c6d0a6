"""The audit trail on a real nats-server: every committed record reaches it, once.

The engine publishes each decision's audit records after committing the decision, and
again when an outbox is carried out again. The trail used to copy revisions of the runs
bucket, which keeps RUNS_HISTORY per run: a run that wrote more while the copy stalled (a
server restart) lost the superseded ones.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
from cadenza import Agent
from cadenza.wire import AUDIT_STREAM, AUDIT_SUBJECTS, RUNS_BUCKET, audit_subject, dumps
from cadenza_operator.engine import commands
from cadenza_operator.engine.audit import read_audit
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.engine.infra import RUNS_HISTORY, ensure_agent_consumer, ensure_infrastructure
from cadenza_operator.engine.runtime import Engine
from cadenza_operator.engine.state import RunState
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec

from .harness import poll, serving, start_engine, unique_namespace

STEPS = [f"s{i}" for i in range(12)]  # a chain: two revisions a step, far more than RUNS_HISTORY
PAUSE_AT = "s5"  # the step whose task waits while nats-server restarts

SPEC = {
    "steps": [
        {"name": name, "agent": "chain", **({"dependsOn": [STEPS[i - 1]]} if i else {})}
        for i, name in enumerate(STEPS)
    ]
}


async def test_every_record_of_a_long_run_survives_a_server_restart(
    tmp_path: Path, fresh_nats: NatsServer
) -> None:
    namespace = unique_namespace()
    agent = Agent("chain")
    paused, release = asyncio.Event(), asyncio.Event()

    @agent.handler
    async def handle(task):  # type: ignore[no-untyped-def]
        if task.step == PAUSE_AT:
            paused.set()
            await release.wait()
        return {"step": task.step}

    nc = await nats.connect(fresh_nats.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    engine = start_engine(fresh_nats.url, "engine-0", tmp_path)
    try:
        side = Engine(nc)
        await side.open()
        client = side.client
        await ensure_agent_consumer(nc.jetstream(), namespace, "chain")
        wf = compile_workflow("chain", WorkflowSpec.model_validate(SPEC), namespace)
        await client.publish_definition(wf)
        async with serving(agent, fresh_nats.url, namespace):
            run = await client.start(wf, {})
            await asyncio.wait_for(paused.wait(), 60)
            fresh_nats.restart()
            release.set()

            async def finished() -> str | None:
                try:
                    state = await client.get(run)
                except Exception:  # still reconnecting
                    return None
                return state.phase if state and state.terminal else None

            assert await poll(finished, timeout=120) == "Succeeded"

        js = nc.jetstream()
        records = await read_audit(js, namespace, run, idle=1)
        assert [r["seq"] for r in records] == list(range(1, len(records) + 1))  # none missing, none twice
        succeeded = [r["step"] for r in records if r["step"] and r["to"] == "Succeeded"]
        assert sorted(succeeded) == sorted(STEPS)
        assert [r["to"] for r in records if r["step"] is None][-1] == "Succeeded"
        # More decisions than the runs bucket keeps revisions of this run: the old trail
        # could only have been complete had it copied each before it was superseded.
        history = await (await js.key_value(RUNS_BUCKET)).history(run)
        assert len(history) <= RUNS_HISTORY < len({r["at"] for r in records})
        # The stream holds audit records only, on the run's subject.
        info = await js.stream_info(AUDIT_STREAM)
        assert not info.config.sources and info.config.subjects == [AUDIT_SUBJECTS]
    finally:
        engine.terminate()
        engine.wait(30)
        await nc.close()


async def test_an_outbox_carried_out_twice_yields_each_record_once(nats_server: NatsServer) -> None:
    namespace = unique_namespace()
    nc = await nats.connect(nats_server.url)
    try:
        engine = Engine(nc)
        await engine.open()
        state = RunState(run="r1", namespace=namespace, workflow="wf", definition="wf", createdAt=0.0)
        first = [{"seq": 1, "run": "r1", "step": None, "to": "Running"}, {"seq": 2, "run": "r1", "step": "a"}]
        second = [{"seq": 3, "run": "r1", "step": "a", "to": "Succeeded"}]
        await engine._execute(state, [], first)  # the committing engine
        await engine._execute(state, [commands.Audit(first)])  # the next engine, again
        await engine._execute(state, [commands.Audit(second)])
        # A repeat after JetStream's duplicate window: stored again, read once.
        await nc.jetstream().publish(audit_subject(namespace, "r1"), dumps(first))
        records = await read_audit(nc.jetstream(), namespace, "r1")
        # Each once, stamped with the time of its commit (the committing engine's is kept).
        assert [{k: v for k, v in r.items() if k != "committedAt"} for r in records] == [*first, *second]
        assert all(isinstance(r["committedAt"], float) for r in records)
        assert await read_audit(nc.jetstream(), namespace) == records
    finally:
        await nc.close()


async def test_an_audit_stream_that_sourced_the_runs_bucket_is_updated_in_place(
    fresh_nats: NatsServer,
) -> None:
    from nats.js.api import StreamConfig, StreamSource

    nc = await nats.connect(fresh_nats.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=AUDIT_STREAM, sources=[StreamSource(name=f"KV_{RUNS_BUCKET}")]))
        await ensure_infrastructure(js)
        info = await js.stream_info(AUDIT_STREAM)
        assert not info.config.sources and info.config.subjects == [AUDIT_SUBJECTS]
    finally:
        await nc.close()
