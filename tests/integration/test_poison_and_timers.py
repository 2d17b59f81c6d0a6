"""The control layer keeps its promise under concurrency and poison (issue 9, items 1-3).

- Timers with several engines: a retry timer can never fire before the record that arms
  it is committed, and a committed timer nobody announced (its engine died in between)
  is still fired, by the sweeper.
- The engine's consumer has the ack wait it is configured with and bounded deliveries.
- Malformed events and tasks, an event that fails every time and a task whose input
  kills its agent are dead-lettered with the reason, once, and the run is told.
- An attempt the engine abandoned is never started by an agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from cadenza import Agent, RetryableError
from cadenza._protocol import (
    EVENTS_STREAM,
    RUNS_BUCKET,
    TASKS_STREAM,
    consumer_name,
    dumps,
    event_subject,
    task_subject,
)
from cadenza_operator.engine.client import RunClient
from cadenza_operator.engine.deadletters import read_dead_letters
from cadenza_operator.engine.decide import decide
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.engine.infra import ENGINE_CONSUMER, TIMERS_BUCKET, ensure_agent_consumer
from cadenza_operator.engine.runtime import Engine, EngineSettings
from cadenza_operator.engine.state import RunState
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec

from ..conftest import cadenza
from ..kube.fixtures import wait_for
from .harness import agent_manifest, run_project, serving, start_engine, unique_namespace, write_project

TERMINAL = ("Succeeded", "Failed", "Cancelled")

RETRYING = WorkflowSpec.model_validate(
    {
        "steps": [
            {"name": "a", "agent": "flaky", "input": {"n": "${{ input.n }}"}},
            {
                "name": "b",
                "agent": "flaky",
                "dependsOn": ["a"],
                "input": {"n": "${{ input.n }}", "fail": 2},
                "retry": {"limit": 3, "backoff": {"initial": "1ms", "factor": 2, "max": "10ms"}},
            },
        ],
        "output": {"n": "${{ steps.b.output.n }}", "attempt": "${{ steps.b.output.attempt }}"},
    }
)


def flaky_agent(executions: list[tuple[str, str, int]] | None = None) -> Agent:
    agent = Agent("flaky", concurrency=64)

    @agent.handler
    async def handle(task: Any) -> dict[str, Any]:
        if executions is not None:
            executions.append((task.run_id, task.step, task.attempt))
        if task.attempt <= int(task.input.get("fail", 0)):
            raise RetryableError(f"attempt {task.attempt} fails on purpose")
        if task.input.get("sleep"):
            await asyncio.sleep(float(task.input["sleep"]))
        return {"n": task.input.get("n"), "attempt": task.attempt}

    return agent


@contextlib.contextmanager
def engine_processes(
    url: str, count: int, log_dir: Path, **env: str
) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = []
    try:
        for i in range(count):
            procs.append(start_engine(url, f"e{i}", log_dir, **env))
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def phases(client: RunClient, runs: list[str], timeout: float) -> dict[str, RunState | None]:
    """The runs' records once all are terminal, or as they are when `timeout` runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        states = dict(zip(runs, await asyncio.gather(*(client.get(r) for r in runs)), strict=True))
        if all(s is not None and s.phase in TERMINAL for s in states.values()) or loop.time() > deadline:
            return states
        await asyncio.sleep(0.2)


async def test_two_engines_never_lose_a_retry_timer(tmp_path: Path, fresh_nats: NatsServer) -> None:
    """Two engines, 100 runs retrying with 1 ms backoff: every run finishes.

    Before timers were announced only from committed records, one engine's timer fired
    before its record was written, the other engine found no timer and acknowledged the
    firing, and the real firing was then dropped as a duplicate: 13-30 % stuck for ever.
    """
    namespace = unique_namespace()
    wf = compile_workflow("retrying", RETRYING, namespace)
    nc = await nats.connect(fresh_nats.url)
    engine_side = Engine(nc)
    await engine_side.open()  # the infrastructure, as an engine makes it
    client = engine_side.client
    await client.publish_definition(wf)
    await ensure_agent_consumer(nc.jetstream(), namespace, "flaky")
    # The sweeper would mend a lost timer within its interval: make it slower than the
    # test's bound, so that this test shows timers are not lost in the first place.
    with engine_processes(fresh_nats.url, 2, tmp_path, CADENZA_ENGINE_SWEEP_INTERVAL="3600"):
        async with serving(flaky_agent(), fresh_nats.url, namespace):
            runs = [await client.start(wf, {"n": i}, run_id=f"retrying-{i:03d}") for i in range(100)]
            states = await phases(client, runs, timeout=120)
    await nc.close()
    stuck = {r: s.timers if s else None for r, s in states.items() if s is None or s.phase not in TERMINAL}
    assert stuck == {}
    for i, run in enumerate(runs):
        state = states[run]
        assert state is not None
        assert state.phase == "Succeeded", (run, state.message)
        assert state.outputs == {"n": i, "attempt": 3}


async def test_a_committed_timer_that_nobody_announced_still_fires(fresh_nats: NatsServer) -> None:
    """An engine killed after committing a record with a retry timer, before announcing
    the timer: no engine has it scheduled, and restarting every engine used not to help.
    The sweeper finds it in the committed record and fires it."""
    namespace = unique_namespace()
    wf = compile_workflow("retrying", RETRYING, namespace)
    run = "retrying-orphan"
    # The record as the killed engine left it: b's attempt 1 failed, attempt 2 armed for
    # a time long past.
    state = RunState(
        run=run, namespace=namespace, workflow=wf.name, definition=wf.key, createdAt=1.0, input={"n": 7}
    )
    state = decide(state, {"type": "start", "run": run, "at": 1.0}, wf).state
    state = decide(state, {"type": "result", "run": run, "step": "a", "attempt": 1, "at": 2.0}, wf).state
    failure = {"type": "RetryableError", "message": "boom", "retryable": True}
    event = {"type": "failed", "run": run, "step": "b", "attempt": 1, "error": failure, "at": 3.0}
    state = decide(state, event, wf).state
    assert list(state.timers) == ["retry:b:2"]
    state.outbox = []

    nc = await nats.connect(fresh_nats.url)
    engine_side = Engine(nc, EngineSettings(sweep_interval=3600))
    await engine_side.open()  # the infrastructure, as an engine makes it
    client = engine_side.client
    await client.publish_definition(wf)
    await ensure_agent_consumer(nc.jetstream(), namespace, "flaky")
    await client.kv.put(run, state.to_bytes())
    timers = await nc.jetstream().key_value(TIMERS_BUCKET)
    with pytest.raises(Exception, match="not found"):
        await timers.get(run)  # never announced

    engine = Engine(nc, EngineSettings(name="restarted", sweep_interval=0.5))
    await engine.start()
    try:
        async with serving(flaky_agent(), fresh_nats.url, namespace):
            final = (await phases(client, [run], timeout=60))[run]
    finally:
        await engine.stop()
        await nc.close()
    assert final is not None
    assert final.phase == "Succeeded", final.model_dump(exclude_defaults=True)
    assert final.outputs == {"n": 7, "attempt": 3}


async def test_the_engine_consumer_has_the_configured_ack_wait_and_bounded_deliveries(
    fresh_nats: NatsServer,
) -> None:
    nc = await nats.connect(fresh_nats.url)
    js = nc.jetstream()
    try:
        await Engine(nc, EngineSettings(ack_wait=2, max_deliveries=4)).open()
        info = await js.consumer_info(EVENTS_STREAM, ENGINE_CONSUMER)
        assert info.config.ack_wait == 2
        assert 4 < info.config.max_deliver <= 10
        # Changed settings update the existing consumer.
        await Engine(nc, EngineSettings(ack_wait=7, max_deliveries=6)).open()
        info = await js.consumer_info(EVENTS_STREAM, ENGINE_CONSUMER)
        assert info.config.ack_wait == 7
        assert 6 < info.config.max_deliver <= 12
        # The environment variable the chart and the durability tests set is honoured.
        os.environ["CADENZA_ENGINE_ACK_WAIT"] = "3"
        try:
            await Engine(nc).open()
        finally:
            del os.environ["CADENZA_ENGINE_ACK_WAIT"]
        assert (await js.consumer_info(EVENTS_STREAM, ENGINE_CONSUMER)).config.ack_wait == 3
        # An agent's consumer is bounded too (it used to be max_deliver=-1).
        await ensure_agent_consumer(js, "default", "some-agent", 5)
        agent_info = await js.consumer_info(TASKS_STREAM, consumer_name("default", "some-agent"))
        assert agent_info.config.ack_wait == 5
        assert 0 < agent_info.config.max_deliver <= 10
    finally:
        await nc.close()


async def dead_letters(js: Any, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    async def enough() -> bool:
        found[:] = await read_dead_letters(js)
        return len(found) >= count

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await enough():
        assert loop.time() < deadline, f"{len(found)} dead letters, expected {count}: {found}"
        await asyncio.sleep(0.1)
    return found


async def settled(js: Any, stream: str, durable: str, timeout: float = 30) -> Any:
    """The consumer's info once nothing is pending or unacknowledged on it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        info = await js.consumer_info(stream, durable)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return info
        assert loop.time() < deadline, info
        await asyncio.sleep(0.1)


async def test_malformed_events_are_dead_lettered_once_with_the_reason(
    fresh_nats: NatsServer, tmp_path: Path
) -> None:
    from prometheus_client import REGISTRY

    namespace = unique_namespace()
    nc = await nats.connect(fresh_nats.url)
    js = nc.jetstream()
    engine = Engine(nc, EngineSettings(max_deliveries=3))
    await engine.start()
    before = REGISTRY.get_sample_value(
        "cadenza_dead_letters_total", {"source": EVENTS_STREAM, "reason": "malformed"}
    )
    try:
        subject = event_subject(namespace, "x")
        poison = [
            b"garbage",
            b'{"run":"a*b","type":"cancel"}',
            b'{"run":5,"type":"start"}',
            b"[1, 2]",
            b'{"run":"ok","type":"nonsense"}',
        ]
        for body in poison:
            await js.publish(subject, body)
        # A start whose definition does not exist: it can never be applied.
        start = {"type": "start", "run": "orphan-1", "workflow": "gone", "definition": "gone@0", "input": {}}
        await js.publish(event_subject(namespace, "orphan-1"), dumps(start))
        found = await dead_letters(js, len(poison) + 1)
        await settled(js, EVENTS_STREAM, ENGINE_CONSUMER)
    finally:
        await engine.stop()
    # Each once, with its original body and a reason that says what is wrong.
    reasons = {r["data"]: r["reason"] for r in found}
    assert len(found) == len(reasons) == len(poison) + 1
    assert all(r["source"] == EVENTS_STREAM for r in found)
    assert "not JSON" in reasons["garbage"]
    assert "'a*b'" in reasons['{"run":"a*b","type":"cancel"}']
    assert "'run' is 5" in reasons['{"run":5,"type":"start"}']
    assert "not an object" in reasons["[1, 2]"]
    assert "'nonsense'" in reasons['{"run":"ok","type":"nonsense"}']
    assert "definition 'gone@0' not found" in reasons[dumps(start).decode()]
    after = REGISTRY.get_sample_value(
        "cadenza_dead_letters_total", {"source": EVENTS_STREAM, "reason": "malformed"}
    )
    assert (after or 0) - (before or 0) == len(poison)
    await nc.close()

    # The command line lists them, from another process.
    listed = cadenza("dead-letters", "--nats", fresh_nats.url, "--output", "json")
    assert listed.returncode == 0, listed.stderr
    assert {r["data"]: r["reason"] for r in json.loads(listed.stdout)} == reasons
    text = cadenza("dead-letters", "--nats", fresh_nats.url)
    assert text.returncode == 0 and "garbage" in text.stdout and "not JSON" in text.stdout


async def test_an_event_that_fails_every_time_is_dead_lettered_after_bounded_deliveries(
    fresh_nats: NatsServer,
) -> None:
    """A run record that cannot be read (corrupted) fails every event of its run: the
    engine gives up after max_deliveries instead of retrying for ever."""
    namespace = unique_namespace()
    nc = await nats.connect(fresh_nats.url)
    js = nc.jetstream()
    engine = Engine(nc, EngineSettings(max_deliveries=2))
    await engine.start()
    try:
        runs = await js.key_value(RUNS_BUCKET)
        await runs.put("broken-1", b"\x00 not a run record")
        await RunClient(nc).cancel(namespace, "broken-1", by="test")
        found = await dead_letters(js, 1)
        await settled(js, EVENTS_STREAM, ENGINE_CONSUMER)
    finally:
        await engine.stop()
        await nc.close()
    assert found[0]["deliveries"] == 3
    assert "delivered 3 times" in found[0]["reason"]
    assert json.loads(found[0]["data"])["run"] == "broken-1"


async def test_malformed_tasks_are_dead_lettered_by_the_agent(fresh_nats: NatsServer) -> None:
    namespace = unique_namespace()
    nc = await nats.connect(fresh_nats.url)
    js = nc.jetstream()
    await Engine(nc).open()
    await ensure_agent_consumer(js, namespace, "flaky")
    executions: list[tuple[str, str, int]] = []
    try:
        async with serving(flaky_agent(executions), fresh_nats.url, namespace):
            for body in (b"garbage", b"{}", b'{"run": "r", "step": "s", "attempt": "one"}'):
                await js.publish(task_subject(namespace, "flaky"), body)
            found = await dead_letters(js, 3)
            await settled(js, TASKS_STREAM, consumer_name(namespace, "flaky"))
    finally:
        await nc.close()
    assert [r["data"] for r in found] == ["garbage", "{}", '{"run": "r", "step": "s", "attempt": "one"}']
    assert all(r["source"] == TASKS_STREAM and "malformed task" in r["reason"] for r in found)
    assert executions == []


POISON_AGENT = """
import os
from cadenza import Agent

agent = Agent("fragile")

@agent.handler
async def handle(task):
    with open(os.environ["EXEC_LOG"], "a") as log:
        log.write(f"{task.run_id} {task.step} {task.attempt} {os.getpid()}\\n")
    if task.input.get("poison"):
        os._exit(1)   # what a segfaulting native library or an OOM kill looks like
    return {"ok": True}

if __name__ == "__main__":
    agent.run()
"""


async def test_a_task_that_kills_its_agent_is_dead_lettered_and_fails_its_step(
    tmp_path: Path, fresh_nats: NatsServer
) -> None:
    exec_log = tmp_path / "exec.log"
    manifests = agent_manifest("fragile", ack_wait="1s").replace(
        "  ackWait: 1s", f"  ackWait: 1s\n  env: [{{name: EXEC_LOG, value: '{exec_log}'}}]"
    )
    manifests += """
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: poisoned}
spec:
  steps:
    - name: crash
      agent: fragile
      input: {poison: true}
      retry: {limit: 2}
"""
    root = write_project(tmp_path / "p", POISON_AGENT, manifests)
    summary, code = await run_project(root, fresh_nats.url, timeout=120)
    assert code == 1, summary
    assert summary["phase"] == "Failed"
    crash = summary["steps"]["crash"]
    assert crash["phase"] == "Failed"
    assert "PoisonTask" in json.dumps(crash), crash
    # Bounded: one attempt (not retried: the input is what kills the agent), delivered at
    # most MAX_DELIVERIES times, then dead-lettered exactly once.
    starts = exec_log.read_text().splitlines()
    assert 1 < len(starts) <= 5, starts
    assert {line.split()[2] for line in starts} == {"1"}
    nc = await nats.connect(fresh_nats.url)
    found = await read_dead_letters(nc.jetstream())
    await nc.close()
    assert len(found) == 1
    assert found[0]["source"] == TASKS_STREAM
    assert "delivered 6 times" in found[0]["reason"]


async def wait_until_dispatched(engine: Engine, run: str) -> None:
    for _ in range(600):
        state = await engine.client.get(run)
        if state and state.steps.get("a") and state.steps["a"].running:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{run} was never dispatched")


async def test_an_attempt_abandoned_while_queued_is_never_started(fresh_nats: NatsServer) -> None:
    """An agent busy with one task (concurrency 1) while another run's task waits behind
    it; that run is cancelled. When the agent gets to the waiting task, it must see that
    the attempt was abandoned and not run it (side effects after a cancel)."""
    namespace = unique_namespace()
    spec = WorkflowSpec.model_validate(
        {
            "steps": [
                {
                    "name": "a",
                    "agent": "flaky",
                    "input": {"n": "${{ input.n }}", "sleep": "${{ input.sleep }}"},
                }
            ]
        }
    )
    wf = compile_workflow("queued", spec, namespace)
    nc = await nats.connect(fresh_nats.url)
    js = nc.jetstream()
    engine = Engine(nc)
    await engine.start()
    await ensure_agent_consumer(js, namespace, "flaky")
    executions: list[tuple[str, str, int]] = []
    agent = flaky_agent(executions)
    agent.concurrency = 1
    try:
        async with serving(agent, fresh_nats.url, namespace):
            busy = await engine.client.start(wf, {"n": 1, "sleep": 2}, run_id="queued-busy")
            await wait_for(lambda: executions, timeout=30)
            waiting = await engine.client.start(wf, {"n": 2, "sleep": 0}, run_id="queued-waiting")

            await wait_until_dispatched(engine, waiting)
            await RunClient(nc).cancel(namespace, waiting, by="test")
            states = await phases(engine.client, [busy, waiting], timeout=60)
            await settled(js, TASKS_STREAM, consumer_name(namespace, "flaky"))
    finally:
        await engine.stop()
        await nc.close()
    assert states[busy] is not None and states[busy].phase == "Succeeded"
    assert states[waiting] is not None and states[waiting].phase == "Cancelled"
    assert [run for run, _, _ in executions] == [busy]


async def test_a_signal_that_arrives_before_its_run_is_started_is_not_lost(fresh_nats: NatsServer) -> None:
    """With several engines, a start and a signal sent right after it are handled at once;
    the signal may reach an engine before the start's record exists. It used to be
    acknowledged and dropped, leaving the run waiting for ever."""
    from cadenza_operator.engine.client import RunClient

    namespace = unique_namespace()
    spec = WorkflowSpec.model_validate(
        {"steps": [{"name": "go", "waitFor": {"signal": "go"}}], "output": {"got": "${{ steps.go.output }}"}}
    )
    wf = compile_workflow("signalled", spec, namespace)
    nc = await nats.connect(fresh_nats.url)
    js = nc.jetstream()
    engine = Engine(nc)
    await engine.start()
    try:
        await engine.client.publish_definition(wf)
        await RunClient(nc).signal(namespace, "signalled-1", "go", {"n": 1}, by="test")
        # The engine has seen the signal (and found no run) before the run starts.
        for _ in range(600):
            info = await js.consumer_info(EVENTS_STREAM, ENGINE_CONSUMER)
            if info.delivered.consumer_seq >= 1:
                break
            await asyncio.sleep(0.05)
        assert (await engine.client.get("signalled-1")) is None
        await engine.client.start(wf, {}, run_id="signalled-1")
        final = (await phases(engine.client, ["signalled-1"], timeout=60))["signalled-1"]
    finally:
        await engine.stop()
        await nc.close()
    assert final is not None
    assert final.phase == "Succeeded", final.model_dump(exclude_defaults=True)
    assert final.outputs == {"got": {"n": 1}}


async def test_a_timeout_counts_from_the_start_not_from_the_wait_behind_a_busy_agent(
    fresh_nats: NatsServer,
) -> None:
    """An agent with concurrency 1 is busy for 3 s; a step with `timeout: 1s` waits behind
    it. The timeout is start-to-close: the waiting attempt runs once, and in time."""
    namespace = unique_namespace()
    spec = WorkflowSpec.model_validate(
        {
            "steps": [
                {
                    "name": "a",
                    "agent": "flaky",
                    "timeout": "1s",
                    "input": {"n": "${{ input.n }}", "sleep": "${{ input.sleep }}"},
                }
            ]
        }
    )
    wf = compile_workflow("timed", spec, namespace)
    blocker = compile_workflow(
        "blocker",
        WorkflowSpec.model_validate(
            {"steps": [{"name": "a", "agent": "flaky", "input": {"n": 0, "sleep": "${{ input.sleep }}"}}]}
        ),
        namespace,
    )
    nc = await nats.connect(fresh_nats.url)
    engine = Engine(nc)
    await engine.start()
    await ensure_agent_consumer(nc.jetstream(), namespace, "flaky")
    executions: list[tuple[str, str, int]] = []
    agent = flaky_agent(executions)
    agent.concurrency = 1
    try:
        async with serving(agent, fresh_nats.url, namespace):
            busy = await engine.client.start(blocker, {"sleep": 3}, run_id="blocker-1")
            await wait_for(lambda: executions, timeout=30)
            timed = await engine.client.start(wf, {"n": 5, "sleep": 0}, run_id="timed-1")
            states = await phases(engine.client, [busy, timed], timeout=60)
    finally:
        await engine.stop()
        await nc.close()
    state = states[timed]
    assert state is not None
    assert state.phase == "Succeeded", state.steps["a"].attempts
    assert state.steps["a"].attempt == 1
    assert [e for e in executions if e[0] == timed] == [(timed, "a", 1)]
