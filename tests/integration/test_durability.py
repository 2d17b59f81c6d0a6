"""Durability: engines SIGKILLed at seeded random moments while 200 runs execute.

Three engine processes share one nats-server; a killer follows a seeded schedule of
30 kills, each time SIGKILLing one engine and starting a replacement, while the runs are
fed in across the whole schedule so the kills land mid-run. Then it
counts runs lost, steps executed twice by agents, steps applied twice (audit trail)
and runs stuck — all must be 0.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import textwrap
import time
from collections import Counter
from pathlib import Path

import nats
from cadenza_operator.engine.audit import read_audit
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.engine.infra import ensure_agent_consumer
from cadenza_operator.engine.runtime import Engine
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.local.processes import AgentProcesses
from cadenza_operator.models import Agent, WorkflowSpec

from .harness import start_engine, unique_namespace

SEED = 20261121
RUNS = int(os.environ.get("CRASH_RUNS", "200"))
# after the last kill the runs get this long to finish; then the stuck ones are counted
MAX_SECONDS = int(os.environ.get("CRASH_SECONDS", "240"))
MAX_KILLS = int(os.environ.get("CRASH_KILLS", "30"))  # the number of SIGKILLs, whatever the speed
KILL_EVERY = (0.3, 1.5)  # seconds between kills: engines die mid-start-up and mid-batch alike

# Each task takes 50-250 ms, so a run lasts a few hundred ms on any machine and runs
# overlap: the kills find work in flight however fast the engines are.
AGENT = """
import asyncio
import os
import random
from cadenza import Agent

agent = Agent("noop")
log = open(os.environ["EXEC_LOG"] + f".{os.getpid()}", "a", buffering=1)

@agent.handler
async def handle(task):
    log.write(f"{task.run_id} {task.step} {task.item} {task.attempt}\\n")
    await asyncio.sleep(random.uniform(0.05, 0.25))
    return {"step": task.step, "item": task.item}

if __name__ == "__main__":
    agent.run()
"""

SPEC = {
    "steps": [
        {"name": "a", "agent": "noop", "input": {"n": "${{ input.n }}"}},
        {"name": "b", "agent": "noop", "dependsOn": ["a"]},
        {
            "name": "c",
            "agent": "noop",
            "dependsOn": ["a"],
            "forEach": "[1, 2, 3]",
            "input": {"x": "${{ item }}"},
        },
        {
            "name": "d",
            "agent": "noop",
            "dependsOn": ["b", "c"],
            "input": {"b": "${{ steps.b.output.step }}", "c": "${{ size(steps.c.output) }}"},
        },
    ],
    "output": {"items": "${{ steps.c.output }}"},
}


def engine(url: str, index: int, log_dir: Path) -> subprocess.Popen[bytes]:
    return start_engine(url, f"engine-{index}", log_dir, CADENZA_ENGINE_ACK_WAIT="2")


async def test_engines_killed_at_random_points_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    namespace = unique_namespace()
    (tmp_path / "agents.py").write_text(textwrap.dedent(AGENT))
    exec_log = tmp_path / "exec"
    agent = Agent.model_validate(
        {
            "metadata": {"name": "noop"},
            "spec": {
                "command": ["python", "agents.py"],
                "replicas": 2,
                "concurrency": 64,
                "ackWait": "10s",
                "env": [{"name": "EXEC_LOG", "value": str(exec_log)}],
            },
        }
    )
    wf = compile_workflow("crashy", WorkflowSpec.model_validate(SPEC), namespace)

    with NatsServer() as server:
        nc = await nats.connect(server.url)
        engine_side = Engine(nc)
        await engine_side.open()  # the infrastructure, as an engine makes it
        client = engine_side.client
        await ensure_agent_consumer(nc.jetstream(), namespace, "noop", 10)
        agents = AgentProcesses(server.url, namespace, tmp_path)
        agents.start(agent, tmp_path)
        engines = [engine(server.url, i, tmp_path) for i in range(int(os.environ.get("CRASH_ENGINES", "3")))]
        # The kill schedule is drawn up front from the seed, and the runs are fed in
        # evenly across its whole window: every kill lands while runs are in flight,
        # however fast or slow the machine is.
        schedule = [(rng.uniform(*KILL_EVERY), rng.randrange(len(engines))) for _ in range(MAX_KILLS)]
        window = sum(interval for interval, _ in schedule)
        run_ids = [f"crashy-{i:04d}" for i in range(RUNS)]
        states: dict[str, str] = {}
        started: list[str] = []
        kills = kills_with_runs_in_flight = 0

        async def feed() -> None:
            for i, run_id in enumerate(run_ids):
                started.append(await client.start(wf, {"n": i}, run_id=run_id))
                await asyncio.sleep(window / RUNS)

        async def poll(runs: list[str]) -> list[str]:
            """Refresh the phases of ``runs``; return those not finished."""
            pending = [r for r in runs if states.get(r) not in ("Succeeded", "Failed", "Cancelled")]
            for state in await asyncio.gather(*(client.get(r) for r in pending)):
                if state is not None:
                    states[state.run] = state.phase
            return [r for r in pending if states.get(r) not in ("Succeeded", "Failed", "Cancelled")]

        try:
            await client.publish_definition(wf)
            feeder = asyncio.create_task(feed())
            next_index = len(engines)
            for interval, victim in schedule:
                await asyncio.sleep(interval)
                if await poll(list(started)):
                    kills_with_runs_in_flight += 1
                engines[victim].send_signal(signal.SIGKILL)
                engines[victim].wait()
                kills += 1
                engines[victim] = engine(server.url, next_index, tmp_path)
                next_index += 1
            await feeder

            deadline = time.monotonic() + MAX_SECONDS
            while await poll(run_ids):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)

            lost = sum(1 for r in run_ids if r not in states)
            stuck = sum(
                1 for r in run_ids if r in states and states[r] not in ("Succeeded", "Failed", "Cancelled")
            )
            failed = sum(1 for r in run_ids if states.get(r) in ("Failed", "Cancelled"))

            executions: Counter[tuple[str, ...]] = Counter()
            for path in tmp_path.glob("exec.*"):
                for line in path.read_text().splitlines():
                    run, step, item, _attempt = line.split()
                    executions[(run, step, item)] += 1
            steps_duplicated = sum(1 for n in executions.values() if n > 1)

            applied: Counter[tuple[str, str]] = Counter()
            for rec in await read_audit(nc.jetstream(), namespace, ">", idle=2):
                if rec["step"] and rec["to"] == "Succeeded" and rec["from"] != "Succeeded":
                    applied[(rec["run"], rec["step"])] += 1
            applied_twice = sum(1 for n in applied.values() if n > 1)
            audit_missing = RUNS * 4 - len(applied)  # every step's success is in the audit trail
            expected_executions = RUNS * (3 + 3)  # a, b, d and three items of c

            print(
                f"\ncrash test: {RUNS} runs, {kills} engine SIGKILLs "
                f"({kills_with_runs_in_flight} with runs in flight, seed {SEED}): "
                f"runs lost={lost}, runs stuck={stuck}, runs failed={failed}, "
                f"steps duplicated={steps_duplicated}, results applied twice={applied_twice}, "
                f"audit records missing={audit_missing}, "
                f"agent executions={sum(executions.values())}/{expected_executions}"
            )
            for run in [r for r in run_ids if states.get(r) not in ("Succeeded", "Failed", "Cancelled")][:3]:
                state = await client.get(run)
                print("STUCK", run, state.model_dump_json(exclude_defaults=True)[:1500] if state else None)
            # Most kills must hit a busy engine fleet, or the test proves little.
            assert kills_with_runs_in_flight >= kills * 2 // 3, "the kills missed the runs"
            assert (lost, stuck, failed, steps_duplicated, applied_twice, audit_missing) == (0, 0, 0, 0, 0, 0)
            assert len(executions) == expected_executions
            for run in run_ids[:5]:
                state = await client.get(run)
                assert state is not None
                assert state.outputs == {"items": [{"step": "c", "item": i} for i in range(3)]}
        finally:
            for proc in engines:
                proc.kill()
                proc.wait()
            agents.stop()
            await nc.close()
