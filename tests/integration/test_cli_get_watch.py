"""`cadenza get RUN --watch`, piped, as a subprocess on a real nats-server: it prints each
new state of the run as it is committed (one JSON document a line, or a tree per state a
blank line apart) and ends by itself, exit 0, once the run has ended; a finished run is
printed once; Ctrl-C is exit 130 without a traceback; a run it does not hold is exit 2."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cadenza import Agent
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.engine.runtime import Engine
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec

from ..conftest import cadenza, cadenza_process
from .harness import poll, running_engine, serving, unique_namespace

SPEC = {
    "steps": [
        {"name": "held", "agent": "worker", "input": {"v": "${{ input.v }}"}},
        {"name": "after", "agent": "worker", "dependsOn": ["held"]},
    ]
}
WAIT = 60  # bounded waits for what must happen, not timings


def worker(gate: asyncio.Event) -> Agent:
    agent = Agent("worker", concurrency=4)

    @agent.handler
    async def handle(task: Any) -> str:
        if task.step == "held":  # waits for the test's go, so the run is seen Running
            await gate.wait()
        return str(task.step)

    return agent


@pytest.fixture
async def stack(nats_server: NatsServer) -> AsyncIterator[dict[str, Any]]:
    namespace = unique_namespace()
    gate = asyncio.Event()
    async with (
        running_engine(nats_server.url, namespace) as engine,
        serving(worker(gate), nats_server.url, namespace),
    ):
        wf = compile_workflow("watched", WorkflowSpec.model_validate(SPEC), namespace)
        yield {"engine": engine, "gate": gate, "url": nats_server.url, "namespace": namespace, "wf": wf}
        gate.set()


async def watch(stack: dict[str, Any], run: str, *more: str) -> asyncio.subprocess.Process:
    return await cadenza_process(
        "get", run, "--watch", *more, "--nats", stack["url"], "-n", stack["namespace"]
    )


async def held_running(engine: Engine, run: str) -> bool:
    state = await engine.client.get(run)
    return state is not None and state.steps["held"].phase == "Running"


async def next_document(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), WAIT)
    if not line:  # say why: the exit code and what it printed
        assert proc.stderr is not None
        code = await asyncio.wait_for(proc.wait(), WAIT)
        err = (await proc.stderr.read()).decode()
        raise AssertionError(f"the watch ended before the run did (exit {code}): {err}")
    doc: dict[str, Any] = json.loads(line)
    return doc


async def ended(proc: asyncio.subprocess.Process) -> tuple[int, bytes, bytes]:
    assert proc.stdout is not None and proc.stderr is not None
    code = await asyncio.wait_for(proc.wait(), WAIT)
    return code, await proc.stdout.read(), await proc.stderr.read()


async def killed(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def test_json_watch_prints_each_state_and_ends_with_the_run(stack: dict[str, Any]) -> None:
    engine = stack["engine"]
    run = await engine.client.start(stack["wf"], {"v": "[red]x[/red]"})
    await poll(lambda: held_running(engine, run), WAIT)
    proc = await watch(stack, run, "-o", "json")
    try:
        first = await next_document(proc)
        # printed while the step is still executing: watched, not read at the end
        assert first["phase"] == "Running" and first["steps"]["held"]["phase"] == "Running", first
        assert first["steps"]["held"]["input"]["value"] == {"v": "[red]x[/red]"}, first
        stack["gate"].set()
        docs = [first]
        while docs[-1]["phase"] == "Running":
            docs.append(await next_document(proc))
        # the run's end is printed, with what `get -o json` prints for it, and ends the watch
        assert docs[-1]["phase"] == "Succeeded", docs[-1]
        assert docs[-1]["steps"]["after"]["phase"] == "Succeeded", docs[-1]
        code, rest, err = await ended(proc)
        assert (code, rest) == (0, b""), err
        assert b"Traceback" not in err
        once = await asyncio.to_thread(
            cadenza, "get", run, "--nats", stack["url"], "-n", stack["namespace"], "-o", "json"
        )
        assert json.loads(once.stdout) == docs[-1]
    finally:
        await killed(proc)


async def test_text_watch_prints_a_tree_per_state_without_redraw_codes(stack: dict[str, Any]) -> None:
    engine = stack["engine"]
    run = await engine.client.start(stack["wf"], {"v": 1})
    await poll(lambda: held_running(engine, run), WAIT)
    proc = await watch(stack, run)
    assert proc.stdout is not None
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), WAIT)
        assert first.decode().startswith(run) and "Running" in first.decode(), first
        stack["gate"].set()
        code, rest, err = await ended(proc)
        assert code == 0 and b"Traceback" not in err, err
        text = (first + rest).decode()
        trees = text.split("\n\n")
        assert len(trees) >= 2 and all(tree.startswith(run) for tree in trees), text
        assert "Succeeded" in trees[-1].splitlines()[0], trees[-1]
        assert "\x1b" not in text  # piped: no cursor movement, no colour
    finally:
        await killed(proc)


async def test_on_a_terminal_the_tree_is_redrawn_in_place(stack: dict[str, Any]) -> None:
    engine = stack["engine"]
    run = await engine.client.start(stack["wf"], {"v": 5})
    await poll(lambda: held_running(engine, run), WAIT)
    controller, terminal = pty.openpty()
    env = {**os.environ, "CADENZA_LOG_FORMAT": "json", "COLUMNS": "120", "LINES": "40", "TERM": "xterm"}
    args = ("get", run, "--watch", "--nats", stack["url"], "-n", stack["namespace"])
    proc = await cadenza_process(*args, stdout=terminal, env=env)
    os.close(terminal)
    screen = bytearray()

    def read_screen() -> None:  # until the last holder of the terminal is gone
        with contextlib.suppress(OSError):
            while chunk := os.read(controller, 4096):
                screen.extend(chunk)

    reader = asyncio.create_task(asyncio.to_thread(read_screen))
    try:
        await poll(lambda: _true(b"Running" in screen), WAIT)
        stack["gate"].set()
        assert proc.stderr is not None
        code = await asyncio.wait_for(proc.wait(), WAIT)
        err = await proc.stderr.read()
        assert code == 0 and b"Traceback" not in err, err
        await asyncio.wait_for(reader, WAIT)
        text = screen.decode(errors="replace")
        assert "\x1b[1A" in text and "\x1b[2K" in text  # redrawn in place: cursor up, line erased
        assert "Succeeded" in text.rsplit(run, 1)[-1]  # the tree left on screen is the end
    finally:
        await killed(proc)
        os.close(controller)


async def _true(value: bool) -> bool:
    return value


async def test_a_finished_run_is_printed_once(stack: dict[str, Any]) -> None:
    engine = stack["engine"]
    stack["gate"].set()
    run = await engine.client.start(stack["wf"], {"v": 2})

    async def succeeded() -> bool:
        state = await engine.client.get(run)
        return state is not None and state.phase == "Succeeded"

    await poll(succeeded, WAIT)
    proc = await watch(stack, run, "-o", "json")
    try:
        code, out, err = await ended(proc)
        assert code == 0, err
        lines = out.decode().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["phase"] == "Succeeded", lines
    finally:
        await killed(proc)


async def test_ctrl_c_ends_the_watch_with_130_and_no_traceback(stack: dict[str, Any]) -> None:
    engine = stack["engine"]
    run = await engine.client.start(stack["wf"], {"v": 3})
    await poll(lambda: held_running(engine, run), WAIT)
    # a few times: on Python 3.11 a Ctrl-C that came with a new record could be lost (a
    # watch that never ends), one time in several (observe/watch._cancelled_yet)
    for _ in range(3):
        proc = await watch(stack, run, "-o", "json")
        try:
            assert (await next_document(proc))["phase"] == "Running"  # watching now
            proc.send_signal(signal.SIGINT)
            code, _, err = await ended(proc)
            assert code == 130, err
            assert b"Traceback" not in err, err
        finally:
            await killed(proc)


async def test_a_run_it_does_not_hold_is_exit_2(stack: dict[str, Any]) -> None:
    url, ns = stack["url"], stack["namespace"]
    missing = await asyncio.to_thread(cadenza, "get", "no-such-run-123", "--watch", "--nats", url, "-n", ns)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing
    assert f"no run no-such-run-123 in namespace {ns}" in missing.stderr
    stack["gate"].set()
    run = await stack["engine"].client.start(stack["wf"], {"v": 4})
    elsewhere = await asyncio.to_thread(cadenza, "get", run, "-w", "--nats", url, "-n", "another")
    assert elsewhere.returncode == 2 and f"(run {run} is in namespace {ns})" in elsewhere.stderr, elsewhere
    assert elsewhere.stdout == ""


async def test_a_run_removed_while_watched_ends_the_watch_with_1(stack: dict[str, Any]) -> None:
    engine = stack["engine"]
    run = await engine.client.start(stack["wf"], {"v": 6})
    await poll(lambda: held_running(engine, run), WAIT)
    proc = await watch(stack, run, "-o", "json")
    try:
        assert (await next_document(proc))["phase"] == "Running"
        await engine.client.kv.delete(run)  # as the bucket's TTL, or a person, would
        code, _, err = await ended(proc)
        assert code == 1 and f"run {run} was removed while watched" in err.decode(), err
        assert b"Traceback" not in err
    finally:
        await killed(proc)
