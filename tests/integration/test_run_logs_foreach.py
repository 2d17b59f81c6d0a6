"""Per-run logs of a forEach step, end to end (issue 14): a real agent process logs through
`task.log` for each of five items, four at a time so their lines interleave, and one item
fails once and is retried; `cadenza logs RUN STEP#ITEM` gives back exactly one item's lines
in the order logged, its attempts told apart, `cadenza logs RUN STEP` every item's lines
each labelled STEP#ITEM, and the console's step panel shows them labelled the same way and
says how to read one item's."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.local.processes import AgentProcesses
from cadenza_operator.models import Agent, WorkflowSpec
from cadenza_operator.observe.web import Console, serve

from ..conftest import cadenza
from .harness import poll, running_engine, unique_namespace

AGENT = """
import asyncio
from cadenza import Agent

agent = Agent("itemizer")

@agent.handler
async def handle(task):
    name = task.input["name"]
    for i in range(4):
        task.log.info(f"{name} line {i}", i=i)
        await asyncio.sleep(0.02)  # the items in flight together interleave their lines
    if name == "c" and task.attempt == 1:
        task.log.warning(f"{name} gives up")
        raise ConnectionResetError("the first attempt of item c fails")
    return name

if __name__ == "__main__":
    agent.run()
"""

NAMES = ["a", "b", "c", "d", "e"]
FLAKY = NAMES.index("c")
EACH = {
    "steps": [
        {
            "name": "each",
            "agent": "itemizer",
            "forEach": "input.names",
            "maxParallel": 4,
            "input": {"name": "${{ item }}"},
            "retry": {"limit": 1, "backoff": {"initial": "100ms"}},
        }
    ]
}


def logged(name: str) -> list[str]:
    return [f"{name} line {i}" for i in range(4)]


@pytest.fixture
async def finished_run(nats_server: Any, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """A forEach run that has ended, its engine still up: {engine, namespace, url, run}."""
    namespace = unique_namespace()
    (tmp_path / "agents.py").write_text(textwrap.dedent(AGENT))
    agent = Agent.model_validate(
        {
            "metadata": {"name": "itemizer"},
            "spec": {"command": [sys.executable, "agents.py"], "replicas": 1, "concurrency": 4},
        }
    )
    async with running_engine(nats_server.url, namespace, "itemizer") as engine:
        agents = AgentProcesses(nats_server.url, namespace, tmp_path)
        agents.start(agent, tmp_path)
        try:
            wf = compile_workflow("itemized", WorkflowSpec.model_validate(EACH), namespace)
            run = await engine.client.start(wf, {"names": NAMES})

            async def ended() -> str | None:
                state = await engine.client.get(run)
                return state.phase if state is not None and state.phase.is_terminal else None

            assert await poll(ended, timeout=90) == "Succeeded"
            yield {"engine": engine, "namespace": namespace, "url": nats_server.url, "run": run}
        finally:
            agents.stop()


async def logs(stack: dict[str, Any], *args: str) -> Any:
    return await asyncio.to_thread(
        cadenza, "logs", stack["run"], *args, "--nats", stack["url"], "-n", stack["namespace"], timeout=60
    )


def records(shown: Any) -> list[dict[str, Any]]:
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown
    return [json.loads(line) for line in shown.stdout.splitlines()]


async def test_each_item_s_lines_come_back_apart_in_order_with_attempts(finished_run: dict[str, Any]) -> None:
    run = finished_run["run"]
    for index, name in enumerate(NAMES):
        mine = records(await logs(finished_run, f"each#{index}", "--output", "json"))
        # only this item's lines, though four items logged at once on one process
        assert {(r["run"], r["step"], r["item"], r["agent"]) for r in mine} == {
            (run, "each", index, "itemizer")
        }
        ours = [(r["attempt"], r["event"]) for r in mine if r["event"].startswith(f"{name} ")]
        if index != FLAKY:
            assert ours == [(1, line) for line in logged(name)]
            assert [r["fields"]["i"] for r in mine] == [0, 1, 2, 3]
            continue
        # the retried item: attempt 1 (with its failure), then attempt 2, each in order
        assert ours == [
            *((1, line) for line in logged(name)),
            (1, f"{name} gives up"),
            *((2, line) for line in logged(name)),
        ]
        assert any(
            r["attempt"] == 1 and r["level"] == "error" and "handler raised" in r["event"] for r in mine
        )
        second = records(await logs(finished_run, f"each#{index}", "--attempt", "2", "--output", "json"))
        assert [(r["item"], r["attempt"], r["event"]) for r in second] == [
            (index, 2, line) for line in logged(name)
        ]

    # the text form: each line names the item and the attempt
    text = await logs(finished_run, f"each#{FLAKY}")
    assert text.returncode == 0, text
    labels = [line.split(" ", 5)[1:4] for line in text.stdout.splitlines() if " c line 0" in line]
    assert labels == [[f"each#{FLAKY}", "attempt", "1"], [f"each#{FLAKY}", "attempt", "2"]]

    # followed after the run ended: the same lines, then the end by itself
    followed = records(await logs(finished_run, "each#1", "--follow", "--output", "json"))
    assert [r["event"] for r in followed] == logged("b")


async def test_the_step_without_an_item_shows_every_item_s_lines_labelled(
    finished_run: dict[str, Any],
) -> None:
    lines = (await logs(finished_run, "each")).stdout.splitlines()
    where = [line.split(" ", 5)[1:3] for line in lines]
    # every line labelled by its item; none of them bare "each"
    assert {label for label, _ in where} == {f"each#{i}" for i in range(len(NAMES))}
    for index, name in enumerate(NAMES):
        mine = [line.split(" ", 5)[5] for line in lines if line.split(" ", 2)[1] == f"each#{index}"]
        as_text = [f"{line} i={i}" for i, line in enumerate(logged(name))]  # its fields follow
        assert [m for m in mine if m.startswith(f"{name} line")] == as_text * (2 if index == FLAKY else 1)


async def test_a_bad_item_is_exit_2_and_an_item_that_logged_nothing_says_so(
    finished_run: dict[str, Any],
) -> None:
    for bad in ("each#x", "each#", "each#-1", "#2"):
        shown = await logs(finished_run, bad)
        assert shown.returncode == 2, (bad, shown)
        assert f"STEP {bad!r} is not a step name" in shown.stderr and "STEP#ITEM" in shown.stderr
        assert "Traceback" not in shown.stderr
    none = await logs(finished_run, "each#99")
    assert (none.returncode, none.stdout) == (0, "")
    assert "no lines logged through task.log by step each#99" in none.stderr


async def test_the_console_s_forEach_panel_shows_the_items_lines_and_how_to_read_one(
    finished_run: dict[str, Any],
) -> None:
    engine, namespace, run = finished_run["engine"], finished_run["namespace"], finished_run["run"]
    runner, port = await serve(Console(engine=lambda: engine), "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http:
            response = await http.get(f"http://127.0.0.1:{port}/runs/{namespace}/{run}/live")
            assert response.status == 200
            html = await response.text()
    finally:
        await runner.cleanup()
    panel = re.search(r'<details class="step" id="step-each".*?</details>', html, re.S)
    assert panel is not None, html
    logs_text = re.search(r'<pre class="logs">(.*?)</pre>', panel.group(0), re.S)
    assert logs_text is not None, panel.group(0)
    for index, name in enumerate(NAMES):
        assert f"each#{index} attempt 1 INFO {name} line 0" in logs_text.group(1)
    assert f"each#{FLAKY} attempt 2 INFO c line 3" in logs_text.group(1)
    assert f"cadenza logs {run} each#ITEM -n {namespace}" in panel.group(0)
