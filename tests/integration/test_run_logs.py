"""Per-run logs (issue 14): what handlers log through `task.log` reaches `cadenza logs RUN
[STEP]`, from a real agent process and a real engine on a real nats-server: two runs
interleaving on one agent process come apart by run and step, in order, with the attempt
of each line right after a retry; `--follow` prints lines as they are logged and ends
with the run; an unknown run is exit 2."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.engine.runtime import Engine
from cadenza_operator.local.processes import AgentProcesses
from cadenza_operator.models import Agent, WorkflowSpec

from ..conftest import cadenza, cadenza_process
from .harness import poll, running_engine, unique_namespace

AGENT = """
import asyncio
import os
from pathlib import Path
from cadenza import Agent

agent = Agent("talker")

@agent.handler
async def handle(task):
    tag = task.input["tag"]
    if task.step == "work":
        for i in range(task.input["n"]):
            task.log.info(f"{tag} line {i}", i=i, tag=tag)
            await asyncio.sleep(0.01)  # the two runs' lines interleave on this one process
        return {"tag": tag}
    if task.step == "flaky":
        task.log.warning(f"{tag} try", tag=tag)
        if task.attempt == 1:
            raise ConnectionResetError("first attempt fails")
        return "ok"
    if task.step == "gated":  # logs, waits for the test's go, logs again
        task.log.info("before the gate", markup="[red]not markup[/red]")
        gate = Path(os.environ["GATE_DIR"]) / task.run_id
        while not gate.exists():
            await asyncio.sleep(0.05)
        task.log.info("after the gate")
        return "done"
    return None

if __name__ == "__main__":
    agent.run()
"""

TWO_STEPS = {
    "steps": [
        {"name": "work", "agent": "talker", "input": {"tag": "${{ input.tag }}", "n": 30}},
        {
            "name": "flaky",
            "agent": "talker",
            "dependsOn": ["work"],
            "input": {"tag": "${{ input.tag }}"},
            "retry": {"limit": 1, "backoff": {"initial": "100ms"}},
        },
    ]
}
GATED = {"steps": [{"name": "gated", "agent": "talker", "input": {"tag": "g"}}]}


@pytest.fixture
async def stack(nats_server: Any, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """An engine in this process and one real `talker` agent process (concurrency 4)."""
    namespace = unique_namespace()
    (tmp_path / "agents.py").write_text(textwrap.dedent(AGENT))
    (tmp_path / "gates").mkdir()
    agent = Agent.model_validate(
        {
            "metadata": {"name": "talker"},
            "spec": {
                "command": [sys.executable, "agents.py"],
                "replicas": 1,
                "concurrency": 4,
                "env": [{"name": "GATE_DIR", "value": str(tmp_path / "gates")}],
            },
        }
    )
    async with running_engine(nats_server.url, namespace, "talker") as engine:
        agents = AgentProcesses(nats_server.url, namespace, tmp_path)
        agents.start(agent, tmp_path)
        try:
            yield {
                "engine": engine,
                "namespace": namespace,
                "gates": tmp_path / "gates",
                "url": nats_server.url,
            }
        finally:
            agents.stop()


async def finished(engine: Engine, run: str) -> str:
    async def phase() -> str | None:
        state = await engine.client.get(run)
        return state.phase if state is not None and state.phase.is_terminal else None

    return str(await poll(phase, timeout=60))


def logs(url: str, namespace: str, *args: str) -> Any:
    return cadenza("logs", *args, "--nats", url, "-n", namespace, timeout=60)


async def test_two_runs_on_one_agent_process_come_apart_by_run_and_step(stack: dict[str, Any]) -> None:
    engine, ns, url = stack["engine"], stack["namespace"], stack["url"]
    wf = compile_workflow("chatty", WorkflowSpec.model_validate(TWO_STEPS), ns)
    runs = await asyncio.gather(*(engine.client.start(wf, {"tag": tag}) for tag in ("A", "B")))
    assert [await finished(engine, run) for run in runs] == ["Succeeded", "Succeeded"]

    for run, tag in zip(runs, ("A", "B"), strict=True):
        shown = await asyncio.to_thread(logs, url, ns, run, "work", "--output", "json")
        assert shown.returncode == 0, shown.stderr
        records = [json.loads(line) for line in shown.stdout.splitlines()]
        # exactly this run's step: the other run's lines, interleaved on the same
        # process, and this run's other step are left out; in the order logged
        assert [r["event"] for r in records] == [f"{tag} line {i}" for i in range(30)]
        assert {(r["run"], r["step"], r["attempt"], r["agent"]) for r in records} == {
            (run, "work", 1, "talker")
        }
        assert [r["fields"]["i"] for r in records] == list(range(30))
        assert all(r["worker"] and r["level"] == "info" for r in records)

        flaky = await asyncio.to_thread(logs, url, ns, run, "flaky")
        assert flaky.returncode == 0, flaky.stderr
        lines = flaky.stdout.splitlines()
        # the retry's line says attempt 2, the first attempt's (and its failure) attempt 1
        assert [line.split(" ", 5)[1:5] for line in lines if f"{tag} try" in line] == [
            ["flaky", "attempt", "1", "WARNING"],
            ["flaky", "attempt", "2", "WARNING"],
        ]
        assert any("handler raised" in line and "attempt 1 ERROR" in line for line in lines)
        only_second = await asyncio.to_thread(logs, url, ns, run, "flaky", "--attempt", "2")
        assert only_second.stdout.splitlines() == [next(line for line in lines if "attempt 2" in line)]

        everything = await asyncio.to_thread(logs, url, ns, run, "--output", "json")
        steps = [json.loads(line)["step"] for line in everything.stdout.splitlines()]
        assert steps.count("work") == 30 and steps.count("flaky") == 3


async def test_follow_prints_lines_as_they_come_and_ends_with_the_run(stack: dict[str, Any]) -> None:
    engine, ns, url = stack["engine"], stack["namespace"], stack["url"]
    wf = compile_workflow("gate", WorkflowSpec.model_validate(GATED), ns)
    run = await engine.client.start(wf, {})
    follower = await cadenza_process("logs", run, "gated", "--follow", "--nats", url, "-n", ns)
    assert follower.stdout is not None
    try:
        first = await asyncio.wait_for(follower.stdout.readline(), 60)
        # printed while the handler is still waiting: followed, not read at the end
        assert "before the gate" in first.decode()
        assert "[red]not markup[/red]" in first.decode()  # user data printed as is, not as markup
        assert (await engine.client.get(run)).phase == "Running"  # type: ignore[union-attr]
        (stack["gates"] / run).touch()
        second = await asyncio.wait_for(follower.stdout.readline(), 60)
        assert "after the gate" in second.decode()
        # the run ends: so does --follow, by itself, exit 0
        assert await asyncio.wait_for(follower.wait(), 60) == 0
        assert await finished(engine, run) == "Succeeded"
        assert await follower.stdout.read() == b""
    finally:
        if follower.returncode is None:
            follower.kill()
            await follower.wait()


async def test_an_unknown_run_or_step_name_is_exit_2(stack: dict[str, Any]) -> None:
    ns, url = stack["namespace"], stack["url"]
    missing = await asyncio.to_thread(logs, url, ns, "no-such-run-123")
    assert missing.returncode == 2
    # RUN is resolved for every command taking one (cli.resolve_run), before logs reads anything
    assert f"no run no-such-run-123 in namespace {ns}" in missing.stderr and "Traceback" not in missing.stderr
    engine = stack["engine"]
    wf = compile_workflow("chatty", WorkflowSpec.model_validate(GATED), ns)
    run = await engine.client.start(wf, {})
    (stack["gates"] / run).touch()
    await finished(engine, run)
    bad_step = await asyncio.to_thread(logs, url, ns, run, "not a step")
    assert bad_step.returncode == 2 and "'not a step' is not a step name" in bad_step.stderr
    elsewhere = await asyncio.to_thread(cadenza, "logs", run, "--nats", url, "-n", "another")
    assert elsewhere.returncode == 2 and f"it is in namespace {ns}" in elsewhere.stderr
    # a step that logged nothing: nothing on stdout, a note on stderr, exit 0
    silent = await asyncio.to_thread(logs, url, ns, run, "other")
    assert (silent.returncode, silent.stdout) == (0, "")
    assert f"no lines logged through task.log by step other of run {run}" in silent.stderr


def test_a_bus_no_engine_has_used_is_exit_2(fresh_nats: Any) -> None:
    shown = logs(fresh_nats.url, "default", "some-run")
    assert shown.returncode == 2 and "Traceback" not in shown.stderr
    assert "no run 'some-run'" in shown.stderr
