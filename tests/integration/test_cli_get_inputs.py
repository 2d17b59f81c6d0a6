"""`cadenza get RUN`'s text tree shows each step's input on one line, as a user reads it
piped (a subprocess on a real nats-server): rich markup in it printed literally, a 10 KiB
input cut to one line of MAX_INPUT_CHARS, a forEach step's template with its item count,
and a step that has not run labelled exactly as `--output json` labels it."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

from cadenza import Agent
from cadenza_operator.engine.definition import compile_workflow
from cadenza_operator.local.nats_server import NatsServer
from cadenza_operator.models import WorkflowSpec
from cadenza_operator.observe.tree import MAX_INPUT_CHARS

from ..conftest import cadenza
from .harness import poll, running_engine, serving, unique_namespace

MARKUP = "[red]x[/red] [bold]not bold[/bold]"
BLOB = "z" * 10 * 1024
SPEC = {
    "steps": [
        {"name": "loud", "agent": "worker", "input": {"v": "${{ input.v }}"}},
        {"name": "big", "agent": "worker", "input": {"blob": "${{ input.blob }}", "tail": "END"}},
        {"name": "each", "agent": "worker", "forEach": "input.names", "input": {"n": "${{ item }}"}},
        {"name": "gate", "approval": {}, "dependsOn": ["loud", "big", "each"]},
        {"name": "after", "agent": "worker", "dependsOn": ["gate"], "input": {"v": "${{ input.v }}"}},
    ]
}


def worker() -> Agent:
    agent = Agent("worker", concurrency=8)

    @agent.handler
    async def handle(task: Any) -> str:
        return str(task.step)

    return agent


async def cli(*args: str) -> str:
    result: subprocess.CompletedProcess[str] = await asyncio.to_thread(cadenza, *args)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result
    return result.stdout


def step_lines(tree: str, step: str) -> list[str]:
    """The lines of `step`'s node: its label, then its children up to the next step."""
    lines = tree.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip("│├└─ ").startswith(f"{step}  "))
    node = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith("│   ") and not line.startswith("    "):
            break
        node.append(line)
    return node


def input_lines(tree: str, step: str) -> list[str]:
    return [line.lstrip("│├└─ ") for line in step_lines(tree, step) if "input: " in line]


async def test_get_shows_each_step_s_input_on_one_line(nats_server: NatsServer) -> None:
    namespace = unique_namespace()
    wf = compile_workflow("inputs", WorkflowSpec.model_validate(SPEC), namespace)
    ns = ("--nats", nats_server.url, "-n", namespace)
    async with (
        running_engine(nats_server.url, namespace) as engine,
        serving(worker(), nats_server.url, namespace),
    ):
        run = await engine.client.start(wf, {"v": MARKUP, "blob": BLOB, "names": [1, 2, 3]})

        async def at_the_gate() -> bool:
            state = await engine.client.get(run)
            return state is not None and state.steps["gate"].phase == "WaitingApproval"

        await poll(at_the_gate, timeout=60)
        tree = await cli("get", run, *ns)
        document = json.loads(await cli("get", run, *ns, "--output", "json"))

    # the markup is user data: printed as written, not read as rich markup
    (loud,) = input_lines(tree, "loud")
    assert loud == f'input: {{"v":"{MARKUP}"}}  (rendered input (what attempt 1 received))', tree

    # 10 KiB: one line, cut with an ellipsis; the JSON has it whole
    (big,) = input_lines(tree, "big")
    shown = big.removeprefix("input: ").split("  (")[0]
    assert len(shown) == MAX_INPUT_CHARS and shown.endswith("…") and shown.startswith('{"blob":"zzz')
    assert "END" not in big and len(big) < 200
    assert all(len(line) < 300 for line in tree.splitlines())  # not a 10 KiB line, nor wrapped pieces
    assert document["steps"]["big"]["input"]["value"] == {"blob": BLOB, "tail": "END"}

    # forEach: the template, with the item count, as the JSON has it
    (each,) = input_lines(tree, "each")
    assert each == 'input: {"n":"${{ item }}"}  (template, rendered for each of 3 items)', tree
    assert document["steps"]["each"]["input"]["items"] == 3

    # an approval step takes no input (null in the JSON): no line; a step that has not run
    # is labelled as the JSON labels it
    assert document["steps"]["gate"]["input"]["value"] is None and input_lines(tree, "gate") == []
    after = document["steps"]["after"]["input"]
    assert after["label"] == "template: the step's inputs are not available yet"
    assert input_lines(tree, "after") == [
        'input: {"v":"${{ input.v }}"}  (template: the step\'s inputs are not available yet)'
    ]
    for name, step in document["steps"].items():
        if step["input"]["value"] is not None:  # every label of the JSON, in the tree too
            assert [line.endswith(f"  ({step['input']['label']})") for line in input_lines(tree, name)] == [
                True
            ]
