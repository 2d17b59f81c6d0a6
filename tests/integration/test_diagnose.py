"""`cadenza diagnose` on a real nats-server, a real engine and real agent handlers.

Twelve runs of one workflow start in quick succession. `rand` answers the same input with a random
output; `det` answers it the same every time; `flaky` fails its first attempt then
succeeds; `slow` belongs to an agent that takes one task at a time, so its attempts queue
behind each other and wait far longer than they run. The CLI's JSON must flag exactly
those steps, each for its own symptom, and count the audit trail as the stream holds it.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from typing import Any

from cadenza import Agent
from cadenza.wire import AUDIT_STREAM, audit_subject
from cadenza_operator.engine.audit import read_audit
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.engine.infra import ensure_agent_consumer
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec

from ..conftest import cadenza
from .harness import poll, running_engine, serving, unique_namespace

RUNS = 12
EXECUTE = 3.0
"""Seconds each quick-agent step runs: long enough that the time the engine and the agent
take to dispatch and pick up a task, on a loaded machine (seconds, seen with 48 tasks at
once on two busy cores), stays below it; else every step would rightly wait more than it
executes. `flaky` waits twice (two attempts) for each time it executes."""
SLOW = 1.0
APART = 0.4
"""Seconds between run starts: the one-at-a-time agent gets a task faster than it finishes
one (its queue grows), while the engine is not handed all the runs' events in one burst."""

SPEC = {
    "steps": [
        {"name": "rand", "agent": "quick", "input": {"q": "${{ input.q }}"}},
        {"name": "det", "agent": "quick", "input": {"q": "${{ input.q }}"}},
        {
            "name": "flaky",
            "agent": "quick",
            "input": {"q": "${{ input.q }}"},
            "retry": {"limit": 2, "backoff": {"initial": "100ms"}},
        },
        {"name": "slow", "agent": "single", "input": {"q": "${{ input.q }}"}},
    ]
}


def agents() -> tuple[Agent, Agent]:
    quick, single = Agent("quick", concurrency=64), Agent("single", concurrency=1)

    @quick.handler
    async def answer(task):  # type: ignore[no-untyped-def]
        if task.step == "flaky" and task.attempt == 1:
            raise ConnectionResetError("the first attempt always fails")
        await asyncio.sleep(EXECUTE)
        if task.step == "rand":
            return {"pick": random.random()}
        return {"echo": task.input["q"]}

    @single.handler
    async def one_at_a_time(task):  # type: ignore[no-untyped-def]
        await asyncio.sleep(SLOW)
        return {"echo": task.input["q"]}

    return quick, single


async def diagnose_cli(url: str, namespace: str, workflow: str, *args: str) -> Any:
    return await asyncio.to_thread(cadenza, "diagnose", workflow, "-n", namespace, "--nats", url, *args)


async def test_diagnose_flags_each_symptom_on_its_step_and_counts_the_audit_stream(
    nats_server: NatsServer,
) -> None:
    namespace = unique_namespace()
    quick, single = agents()
    async with running_engine(nats_server.url, namespace, "quick") as engine:
        js = engine.js
        await ensure_agent_consumer(js, namespace, "single")
        client = engine.client
        wf = compile_workflow("diag", WorkflowSpec.model_validate(SPEC), namespace)
        idle = compile_workflow("idle", WorkflowSpec.model_validate(SPEC), namespace)
        await client.publish_definition(wf)
        await client.publish_definition(idle)
        async with serving(quick, nats_server.url, namespace), serving(single, nats_server.url, namespace):
            runs = []
            for _ in range(RUNS):
                runs.append(await client.start(wf, {"q": "same"}))
                await asyncio.sleep(APART)

            async def all_finished() -> list[str] | None:
                states = [await client.get(r) for r in runs]
                phases = [s.phase for s in states if s is not None and s.terminal]
                return phases if len(phases) == RUNS else None

            assert set(await poll(all_finished, timeout=120)) == {"Succeeded"}

        done = await diagnose_cli(nats_server.url, namespace, "diag", "--output", "json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["runs"] == {"total": RUNS, "byPhase": {"Succeeded": RUNS}}
        assert report["nondeterminism"]["flagged"] == ["rand"]
        (rand,) = report["nondeterminism"]["steps"]
        assert rand["attemptsCompared"] == RUNS and rand["inputsWithDifferentOutputs"] == 1
        assert sorted(report["nondeterminism"]["stepsCompared"]) == ["det", "flaky", "rand", "slow"]
        assert report["waiting"]["flagged"] == ["slow"], json.dumps(report["steps"], indent=1)
        assert report["retries"]["flagged"] == ["flaky"]
        assert report["load"]["flagged"] == []  # twelve runs: too few to compare halves
        by_step = {s["step"]: s for s in report["steps"]}
        assert by_step["flaky"]["retries"] == RUNS and by_step["flaky"]["attempts"] == 2 * RUNS
        assert by_step["slow"]["attempts"] == RUNS and by_step["rand"]["retries"] == 0
        assert by_step["slow"]["waiting"]["p95"] > by_step["slow"]["executing"]["p95"]

        # The audit trail as the stream holds it: messages per run subject (one STREAM.INFO)
        # and records per run, read back one by one.
        info = await js.stream_info(AUDIT_STREAM, subjects_filter=audit_subject(namespace, ">"))
        subjects = info.state.subjects or {}
        trace = report["trace"]
        assert trace["auditMessages"] == sum(subjects.values())
        assert len(trace["topRuns"]) == min(RUNS, 10)
        records_total = 0
        for run in runs:
            records_total += len(await read_audit(js, namespace, run, idle=0.3))
        assert trace["auditRecords"] == records_total
        for top in trace["topRuns"]:
            records = await read_audit(js, namespace, top["run"], idle=0.3)
            assert top["auditMessages"] == subjects[audit_subject(namespace, top["run"])]
            assert top["auditRecords"] == len(records)
            assert top["steps"] == dict(Counter(r.get("step") or "" for r in records))

        # The text: every flag on its step's row, one line per row even when piped.
        text = await diagnose_cli(nats_server.url, namespace, "diag")
        assert text.returncode == 0, text.stderr
        rows: dict[str, str] = {}  # the first table's rows (the steps'), by step
        for line in text.stdout.splitlines():
            if line.count("│") > 3:
                rows.setdefault(line.split("│")[1].strip(), line)
        assert "non-deterministic" in rows["rand"] and "waits" in rows["slow"]
        assert "retries" in rows["flaky"] and rows["det"].split("│")[-2].strip() == ""  # no flag
        assert f"{RUNS} run(s) started in the last 1h" in text.stdout

        # A workflow with no runs in the window is a report; an unknown one is an error.
        quiet = await diagnose_cli(nats_server.url, namespace, "idle")
        assert quiet.returncode == 0, quiet.stderr
        assert f"no runs of workflow idle in namespace {namespace}" in quiet.stdout
        unknown = await diagnose_cli(nats_server.url, namespace, "nosuch")
        assert unknown.returncode == 2
        assert f"workflow 'nosuch' is not known in namespace '{namespace}'" in unknown.stderr
        assert "Traceback" not in unknown.stderr
