"""An attempt with a queueTimeout is started by an agent or abandoned by the engine, never
both: one claim per attempt (KV create in `cadenza_claims`) decides between the agent's
start and the queue timer (the soak once saw an agent start an attempt 0.46 s after the
engine had committed its QueueTimeout: the agent's read of the run record came first).

The interleavings are made deterministic by sending the queue timer's event by hand (a
firing with the armed timer's due time, as the engine's own firing or its sweeper sends
it) at the point each test needs; the step's own queueTimeout is too long to fire by itself.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from cadenza import Agent
from cadenza import _agent as agent_module
from cadenza._protocol import dumps, event_subject
from cadenza._publish import Publisher
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.engine.infra import ensure_agent_consumer
from cadenza_operator.engine.runtime import Engine
from cadenza_operator.engine.state import RunState
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec

from ..durability.measure import judge_starts, read_trail
from ..kube.fixtures import wait_for
from .harness import unique_namespace
from .test_poison_and_timers import phases, serving


def queued_workflow(namespace: str, queue_timeout: str, retry_limit: int = 1, name: str = "queued") -> Any:
    spec = WorkflowSpec.model_validate(
        {
            "steps": [
                {
                    "name": "a",
                    "agent": "worker",
                    "queueTimeout": queue_timeout,
                    "retry": {"limit": retry_limit, "backoff": {"initial": "10ms", "max": "10ms"}},
                    "input": {"n": "${{ input.n }}"},
                }
            ]
        }
    )
    return compile_workflow(name, spec, namespace)


async def fire_queue_timer(nc: Any, engine: Engine, namespace: str, run: str, attempt: int) -> None:
    """Send the armed queue timer's firing, and wait until it is stored."""
    state = await engine.client.get(run)
    assert state is not None
    timer = state.timers[f"queue:a:{attempt}"]
    body = {"type": "timer", "run": run, "timer": f"queue:a:{attempt}", "due": timer.at}
    await nc.jetstream().publish(event_subject(namespace, run), dumps(body))


async def record(engine: Engine, run: str, check: Any) -> RunState:
    """The run's record once `check` holds for it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        state = await engine.client.get(run)
        if state is not None and check(state):
            return state
        assert loop.time() < deadline, state
        await asyncio.sleep(0.02)


def counting_agent(starts: list[tuple[str, int]], gates: dict[str, asyncio.Event] | None = None) -> Agent:
    agent = Agent("worker", concurrency=1)

    @agent.handler
    async def handle(task: Any) -> dict[str, Any]:
        starts.append((task.run_id, task.attempt))
        if gates and task.run_id in gates:
            await gates[task.run_id].wait()
        return {"n": task.input.get("n"), "attempt": task.attempt}

    return agent


async def test_an_attempt_the_agent_claimed_before_its_queue_timer_is_the_one_that_runs(
    fresh_nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent has decided to start the attempt (it claimed it; before claims: it read
    the record and found it current); its queue timer is decided before its start report.
    The run must not retry: attempt 1 runs, once."""
    namespace = unique_namespace()
    wf = queued_workflow(namespace, "60s")
    nc = await nats.connect(fresh_nats.url)
    engine = Engine(nc)
    await engine.start()
    await ensure_agent_consumer(nc.jetstream(), namespace, "worker")
    run = "claimed-1"

    class TimerFirstPublisher(Publisher):
        """The agent's publisher: its start report goes out only once the queue timer's
        firing is stored ahead of it."""

        async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> int:
            if b'"type":"started"' in data.replace(b" ", b""):
                await fire_queue_timer(nc, engine, namespace, run, 1)
            return await super().publish(subject, data, headers)

    monkeypatch.setattr(agent_module, "Publisher", TimerFirstPublisher)
    starts: list[tuple[str, int]] = []
    try:
        await engine.client.start(wf, {"n": 1}, run_id=run)
        async with serving(counting_agent(starts), fresh_nats.url, namespace):
            state = (await phases(engine.client, [run], timeout=60))[run]
    finally:
        await engine.stop()
        await nc.close()
    assert state is not None and state.phase == "Succeeded", state
    st = state.steps["a"]
    assert st.attempt == 1 and st.retries == 0, st.attempts
    assert st.attempts[0].startedAt is not None and st.attempts[0].outcome == "Succeeded"
    assert starts == [(run, 1)]


async def test_an_attempt_the_engine_abandoned_first_is_not_started_by_the_agent_that_takes_it(
    fresh_nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue timer fires while the attempt waits behind a busy agent (concurrency 1);
    the engine abandons it and retries. The agent then takes the abandoned task with a
    read of the run record from before that commit (what a shared read, or a read just
    before the commit, sees): it must still not start it. Attempt 2 runs, once."""
    namespace = unique_namespace()
    wf = queued_workflow(namespace, "60s")
    nc = await nats.connect(fresh_nats.url)
    engine = Engine(nc)
    await engine.start()
    await ensure_agent_consumer(nc.jetstream(), namespace, "worker")

    async def read_before_the_commit(runs_kv: Any, body: dict[str, Any]) -> str | None:
        return None  # the attempt looked current when the record was read

    monkeypatch.setattr(agent_module, "abandoned", read_before_the_commit)
    starts: list[tuple[str, int]] = []
    gates = {"busy-1": asyncio.Event()}
    try:
        async with serving(counting_agent(starts, gates), fresh_nats.url, namespace):
            await engine.client.start(wf, {"n": 0}, run_id="busy-1")
            await wait_for(lambda: starts, timeout=30)  # the agent is busy with it
            await engine.client.start(wf, {"n": 1}, run_id="waiting-1")
            await record(engine, "waiting-1", lambda s: "queue:a:1" in s.timers)
            await fire_queue_timer(nc, engine, namespace, "waiting-1", 1)
            await record(engine, "waiting-1", lambda s: s.steps["a"].attempt == 2)
            gates["busy-1"].set()
            states = await phases(engine.client, ["busy-1", "waiting-1"], timeout=60)
    finally:
        await engine.stop()
        await nc.close()
    state = states["waiting-1"]
    assert state is not None and state.phase == "Succeeded", state
    first, second = state.steps["a"].attempts
    assert first.outcome == "TimedOut" and first.error is not None and first.error["type"] == "QueueTimeout"
    assert first.startedAt is None
    assert second.outcome == "Succeeded" and second.startedAt is not None
    assert [s for s in starts if s[0] == "waiting-1"] == [("waiting-1", 2)]


async def test_a_busy_agent_never_starts_an_attempt_its_queue_timeout_abandoned(
    fresh_nats: NatsServer, tmp_path: Path
) -> None:
    """Stress: one agent of concurrency 1, 40 runs' attempts queued at once with a short
    queueTimeout, so queue timers keep firing while the agent takes tasks. Every attempt
    a handler started must be one the run record holds as started (never one the engine
    gave up on in the queue), and none starts twice."""
    namespace = unique_namespace()
    wf = queued_workflow(namespace, "150ms", retry_limit=8)
    nc = await nats.connect(fresh_nats.url)
    engine = Engine(nc)
    await engine.start()
    await ensure_agent_consumer(nc.jetstream(), namespace, "worker")
    exec_log = tmp_path / "exec.log"
    logged: list[str] = []  # what the soak's agents log, one line per start
    agent = Agent("worker", concurrency=1)

    @agent.handler
    async def handle(task: Any) -> dict[str, Any]:
        logged.append(f"{task.run_id} {task.step} {task.item} {task.attempt} {time.time()}\n")
        await asyncio.sleep(0.01)
        return {"n": task.input.get("n")}

    runs = [f"stress-{i}" for i in range(40)]
    # A few runs whose attempts may wait a minute in the queue start for certain, however
    # slow the machine: the check below is never passed by no attempt having started.
    patient = queued_workflow(namespace, "60s", name="patient")
    sure = [f"sure-{i}" for i in range(4)]
    try:
        async with serving(agent, fresh_nats.url, namespace):
            await asyncio.gather(
                *(engine.client.start(wf, {"n": i}, run_id=r) for i, r in enumerate(runs)),
                *(engine.client.start(patient, {"n": i}, run_id=r) for i, r in enumerate(sure)),
            )
            runs += sure
            states = await phases(engine.client, runs, timeout=120)
        trail = await read_trail(nc.jetstream(), namespace)
        Path(f"{exec_log}.0").write_text("".join(logged))
    finally:
        await engine.stop()
        await nc.close()
    assert all(s is not None and s.terminal for s in states.values()), states
    starts = judge_starts(exec_log, trail)
    assert starts.executions > 0 and starts.repeated == 0
    assert starts.abandoned == []
    for line in Path(f"{exec_log}.0").read_text().splitlines():
        run, _, _, attempt, _ = line.split()
        state = states[run]
        assert state is not None
        held = {a.n: a for a in state.steps["a"].attempts}[int(attempt)]
        # Started in the record, and not given up on in the queue: no grace, no timing.
        assert held.startedAt is not None, (run, attempt, held)
        assert held.error is None or held.error.get("type") != "QueueTimeout", (run, attempt, held)
    timed_out = sum(
        1 for s in states.values() if s is not None for a in s.steps["a"].attempts if a.outcome == "TimedOut"
    )
    assert timed_out > 0  # the queue timers did fire while tasks waited: the race was run
