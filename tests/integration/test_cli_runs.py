"""The run-centric CLI on a real nats-server, run as a user runs it (a subprocess, stdout
piped): `cadenza list`, `cadenza get`, `cadenza retry`, `--version`, and RUN given as
something that is no run."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

from cadenza import Agent, FatalError
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec
from cadenza_operator.observe.step_input import Rendering, step_input

from ..conftest import cadenza
from .harness import poll, running_engine, serving, unique_namespace
from .test_poison_and_timers import phases

# 300 characters with rich markup in them: printed literally, on one line.
LOUD = "[red]boom[/red] and [bold]not bold[/bold] " + "x" * 258
assert len(LOUD) == 300

SPEC = {
    "steps": [
        {"name": "a", "agent": "worker", "input": {"v": "${{ input.v }}"}},
        {"name": "loud", "agent": "worker", "dependsOn": ["a"], "input": {"v": "${{ steps.a.output.v }}"}},
    ],
    "output": {"v": "${{ steps.loud.output.v }}"},
}


def worker(calls: list[str], failing: set[str]) -> Agent:
    agent = Agent("worker", concurrency=8)

    @agent.handler
    async def handle(task: Any) -> dict[str, Any]:
        calls.append(task.step)
        if task.step in failing:
            raise FatalError(LOUD)
        return {"v": task.input["v"]}

    return agent


async def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cadenza, *args)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def invalid(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, result
    assert message in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr + result.stdout


async def test_list_get_and_retry_from_the_command_line(nats_server: NatsServer) -> None:
    namespace = unique_namespace()
    wf = compile_workflow("loud", WorkflowSpec.model_validate(SPEC), namespace)
    calls: list[str] = []
    failing = {"loud"}
    nats = ("--nats", nats_server.url)
    ns = (*nats, "-n", namespace)
    async with (
        running_engine(nats_server.url, namespace) as engine,
        serving(worker(calls, failing), nats_server.url, namespace),
    ):
        client = engine.client
        first = await client.start(wf, {"v": 3})
        assert (await phases(client, [first], 60))[first].phase == "Failed"  # type: ignore[union-attr]

        # get: a tree, piped: the 300-character message on one line, its brackets literal.
        tree = ok(await cli("get", first, *ns))
        lines = tree.splitlines()
        assert any(LOUD in line for line in lines), tree
        assert lines[0].startswith(f"{first}  Failed  workflow loud, namespace {namespace}")
        assert any(line.lstrip("│├└─ ").startswith("a  Succeeded  attempts 1") for line in lines), tree
        assert any(line.lstrip("│├└─ ").startswith("loud  Failed  attempts 1") for line in lines), tree
        document = json.loads(ok(await cli("get", first, *ns, "--output", "json")))
        assert document["phase"] == "Failed" and document["steps"]["a"]["output"] == {"v": 3}
        assert LOUD in document["steps"]["loud"]["error"]["message"]
        # Each step's input as it was rendered (re-rendered, checked by hash), not its template.
        assert document["steps"]["loud"]["input"] == {
            "shown": "rendered",
            "label": "rendered input (what attempt 1 received)",
            "value": {"v": 3},
            "attempt": 1,
        }

        # list: the run, its progress, its message with literal brackets on one line.
        listed = ok(await cli("list", *ns))
        header, *rows = listed.splitlines()
        assert header.split()[:6] == ["NAME", "WORKFLOW", "PHASE", "STARTED", "DURATION", "PROGRESS"]
        assert len(rows) == 1 and rows[0].split()[:3] == [first, "loud", "Failed"], listed
        assert "2/2" in rows[0] and "[red]boom[/red]" in rows[0]
        assert ok(await cli("list", *ns, "--phase", "Succeeded")) == ""
        invalid(await cli("list", *ns, "--since", "soon"), "--since 'soon': not a duration")

        # retry: a new run that takes a as it was and runs loud again.
        failing.clear()
        out = ok(await cli("retry", first, *ns, "--by", "ada"))
        assert out.startswith(f"retry of {first} started: run "), out
        again = out.split()[-1]
        state = (await phases(client, [again], 60))[again]
        assert state is not None and state.phase == "Succeeded" and state.retryOf == first
        assert sorted(calls) == ["a", "loud", "loud"]
        assert json.loads(ok(await cli("get", again, *ns, "--output", "json")))["retryOf"] == first

        # newest first, every namespace's with -A; JSON rows
        rows = json.loads(ok(await cli("list", *ns, "--output", "json")))
        assert [r["run"] for r in rows] == [again, first]
        assert rows[0]["retryOf"] == first and rows[0]["progress"] == "2/2"
        wide = ok(await cli("list", *ns, "--output", "wide")).splitlines()
        assert "RETRY OF" in wide[0] and wide[1].split()[:3] == [again, "loud", "Succeeded"]
        assert first in wide[1].split()  # the run it retries
        everywhere = ok(await cli("list", *nats, "-A", "--limit", "100000")).splitlines()
        assert everywhere[0].split()[0] == "NAMESPACE"
        assert any(line.split()[:2] == [namespace, again] for line in everywhere)
        assert len(json.loads(ok(await cli("list", *ns, "--output", "json", "--limit", "1")))) == 1

        # what cannot be done, said clearly
        invalid(await cli("retry", again, *ns, "--from", "nope"), "--from nope: run")
        invalid(await cli("get", "nosuch-run", *ns), f"no run nosuch-run in namespace {namespace}")
        invalid(await cli("retry", "nosuch-run", *ns), f"no run nosuch-run in namespace {namespace}")
        failing.add("a")
        gate = compile_workflow(
            "gate", WorkflowSpec.model_validate({"steps": [{"name": "g", "approval": {}}]}), namespace
        )
        waiting = await client.start(gate, {})

        async def started() -> bool:
            s = await client.get(waiting)
            return s is not None and s.phase == "Running"

        await poll(started)
        refused = await cli("retry", waiting, *ns)
        assert refused.returncode == 1 and "only a finished run" in refused.stderr, refused
        elsewhere = await cli("retry", first, *nats, "-n", "elsewhere")
        assert elsewhere.returncode == 1 and f"no run {first} in namespace elsewhere" in elsewhere.stderr


BIG = {
    "steps": [
        {"name": "a", "agent": "big"},
        {"name": "b", "agent": "big", "dependsOn": ["a"], "input": {"prev": "${{ steps.a.output }}"}},
    ]
}


async def test_get_shows_an_input_read_from_an_output_kept_apart(nats_server: NatsServer) -> None:
    """b's input is a's 40 KB output, which the record keeps apart (the outputs bucket):
    get loads it as the engine did, and the hash matches; past the load limit, the template."""
    namespace = unique_namespace()
    wf = compile_workflow("big", WorkflowSpec.model_validate(BIG), namespace)
    agent = Agent("big")
    blob = "y" * 40_000

    @agent.handler
    async def handle(task: Any) -> dict[str, Any]:
        return {"blob": blob} if task.step == "a" else {"got": len(task.input["prev"]["blob"])}

    async with (
        running_engine(nats_server.url, namespace) as engine,
        serving(agent, nats_server.url, namespace),
    ):
        run = await engine.client.start(wf, {})
        state = (await phases(engine.client, [run], 60))[run]
        assert state is not None and state.phase == "Succeeded"
        assert state.steps["a"].outputRef is not None  # kept apart: the case under test
        document = json.loads(
            ok(await cli("get", run, "--nats", nats_server.url, "-n", namespace, "-o", "json"))
        )
        b = document["steps"]["b"]["input"]
        assert (b["shown"], b["value"]) == ("rendered", {"prev": {"blob": blob}}), b["label"]
        cut = await step_input(engine.client, state, wf, "b", limit=10_000)
        assert cut is not None and cut.shown is Rendering.TEMPLATE
        assert cut.value == {"prev": "${{ steps.a.output }}"}
        assert cut.label == "template: the input is too large to show (over 10000 bytes to read)"


def test_a_bus_no_engine_has_used_has_no_runs(fresh_nats: NatsServer) -> None:
    nats = ("--nats", fresh_nats.url)
    listed = cadenza("list", *nats)
    assert listed.returncode == 0 and "no runs in namespace default" in listed.stderr, listed
    got = cadenza("get", "run-1", *nats)
    assert got.returncode == 2 and "no run run-1 in namespace default" in got.stderr, got
    assert "Traceback" not in listed.stderr + got.stderr


def test_version() -> None:
    from importlib.metadata import version

    result = cadenza("--version")
    assert result.returncode == 0, result
    assert result.stdout.strip() == f"cadenza {version('cadenza')}"
