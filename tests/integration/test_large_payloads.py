"""Large values flow through the object store without the agent author noticing.

A run input, a step output passed to another step's input, into an interpolated string,
a sub-workflow and the run output, from a few hundred KB (enough to pass NATS's 1 MiB
max payload once in the run record) to 64 MiB. A value over the limit
(CADENZA_MAX_VALUE_BYTES) fails its step or run, or is rejected at start, saying so.
Real nats-server.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cadenza_operator.engine.inputs import InputError
from cadenza_operator.local.nats_server import NatsServer

from ..conftest import cadenza
from .harness import agent_manifest, run_project, write_project

AGENTS = """
import hashlib
from cadenza import Agent, FatalError

worker = Agent("worker")

def blob(size):
    # Deterministic: the test computes the same value and its digest.
    unit = hashlib.sha256(str(size).encode()).hexdigest()
    return (unit * (size // len(unit) + 1))[:size]

def digest(value):
    return {"length": len(value), "sha256": hashlib.sha256(value.encode()).hexdigest()}

@worker.handler
def handle(task):
    mode = task.input["mode"]
    if mode == "make":
        return {"data": blob(task.input["size"])}
    if mode == "digest":
        return digest(task.input["data"])
    if mode == "echo":
        return task.input["data"]
    if mode == "fail":
        raise FatalError("!" * task.input["size"])
    raise ValueError(mode)

if __name__ == "__main__":
    worker.run()
"""


def blob(size: int) -> str:
    unit = hashlib.sha256(str(size).encode()).hexdigest()
    return (unit * (size // len(unit) + 1))[:size]


def digest(value: str) -> dict[str, object]:
    return {"length": len(value), "sha256": hashlib.sha256(value.encode()).hexdigest()}


# The run input goes to two steps at once (two dispatches in one decision), comes back as
# the output of one, and is the run's output twice over.
INPUT_WORKFLOW = """
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: wf}
spec:
  steps:
    - name: echo
      agent: worker
      input: {mode: echo, data: "${{ input.data }}"}
    - name: check
      agent: worker
      input: {mode: digest, data: "${{ input.data }}"}
  output: {input: "${{ input.data }}", echo: "${{ steps.echo.output }}", check: "${{ steps.check.output }}"}
"""

# Step `make` produces the value; `check` reads it whole, `wrap` inside a longer string,
# and the run output carries it.
PASS_WORKFLOW = """
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: wf}
spec:
  steps:
    - name: make
      agent: worker
      input: {mode: make, size: "${{ input.size }}"}
    - name: check
      agent: worker
      dependsOn: [make]
      input: {mode: digest, data: "${{ steps.make.output.data }}"}
    - name: wrap
      agent: worker
      dependsOn: [make]
      input: {mode: digest, data: "<${{ steps.make.output.data }}>"}
  output:
    data: "${{ steps.make.output.data }}"
    check: "${{ steps.check.output }}"
    wrap: "${{ steps.wrap.output }}"
"""


# A sub-workflow takes the value as its input and gives it back as its output: the
# parent's command to start the child, and the child's result, carry it.
CHILD_WORKFLOW = """
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: parent}
spec:
  steps:
    - name: make
      agent: worker
      input: {mode: make, size: "${{ input.size }}"}
    - name: child
      dependsOn: [make]
      workflow: child
      input: {data: "${{ steps.make.output.data }}"}
    - name: check
      agent: worker
      dependsOn: [child]
      input: {mode: digest, data: "${{ steps.child.output.data }}"}
  output: {check: "${{ steps.check.output }}"}
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: child}
spec:
  steps:
    - name: echo
      agent: worker
      input: {mode: echo, data: "${{ input.data }}"}
  output: {data: "${{ steps.echo.output }}"}
"""

# A handler fails with an exception message of 600 KB (the step, its attempt and the audit
# record of the failure would each hold it).
FAIL_WORKFLOW = """
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: wf}
spec:
  steps:
    - name: fail
      agent: worker
      input: {mode: fail, size: 614400}
"""

# Over the limit the test sets (1 MiB), with `make` producing `size` bytes: a handler's
# output; a step input interpolating a value within the limit twice; the run output
# holding it twice. (size, extra steps, run output, failing step, message).
LIMITED_WORKFLOW = """
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {{name: wf}}
spec:
  steps:
    - name: make
      agent: worker
      input: {{mode: make, size: {size}}}
{steps}
  output: {output}
"""
TWICE = "${{ steps.make.output.data }}${{ steps.make.output.data }}"
OVER_THE_LIMIT = {
    "handler output": (2 * 1024 * 1024, "", "{}", "make", "the output is 2,097,"),
    "step input": (
        700 * 1024,
        f"""    - name: twice
      agent: worker
      dependsOn: [make]
      input: {{mode: digest, data: "{TWICE}"}}""",
        "{}",
        "twice",
        "the input is 1,433,",
    ),
    "run output": (700 * 1024, "", f'{{data: "{TWICE}"}}', None, "the output is 1,433,"),
}
LIMIT = 1024 * 1024


def project(tmp_path: Path, workflow: str) -> Path:
    return write_project(tmp_path / "proj", AGENTS, agent_manifest("worker") + workflow)


def brief(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary without its outputs (megabytes), for an assertion's message."""
    return {k: v for k, v in summary.items() if k != "outputs"}


@pytest.mark.parametrize("size", [600 * 1024, 2 * 1024 * 1024], ids=["600KB", "2MB"])
async def test_a_large_run_input_reaches_steps_and_the_run_output(
    tmp_path: Path, nats_server: NatsServer, size: int
) -> None:
    value = blob(size)
    summary, code = await run_project(
        project(tmp_path, INPUT_WORKFLOW), nats_server.url, input={"data": value}, timeout=60
    )
    assert code == 0, brief(summary)
    assert summary["outputs"]["check"] == digest(value)
    assert digest(summary["outputs"]["input"]) == digest(value)
    assert digest(summary["outputs"]["echo"]) == digest(value)


@pytest.mark.parametrize("size", [1100 * 1024, 64 * 1024 * 1024], ids=["1.1MB", "64MiB"])
async def test_a_large_step_output_flows_into_inputs_strings_and_the_run_output(
    tmp_path: Path, nats_server: NatsServer, size: int
) -> None:
    summary, code = await run_project(
        project(tmp_path, PASS_WORKFLOW), nats_server.url, input={"size": size}, timeout=180
    )
    assert code == 0, brief(summary)
    expected = blob(size)
    outputs = summary["outputs"]
    assert outputs["check"] == digest(expected)
    assert outputs["wrap"] == digest(f"<{expected}>")
    assert digest(outputs["data"]) == digest(expected)


@pytest.mark.parametrize("output", ["json", "text"])
def test_cli_runs_a_2mb_input_file_and_prints_the_whole_output(tmp_path: Path, output: str) -> None:
    root = project(tmp_path, INPUT_WORKFLOW)
    value = blob(2 * 1024 * 1024)
    (tmp_path / "big.json").write_text(json.dumps({"data": value}))
    result = cadenza(
        "run", str(root), "--input", f"@{tmp_path / 'big.json'}", "--output", output, "--timeout", "120"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    if output == "text":  # a terminal gets the size of the outputs, not 4 MB of them
        assert "Succeeded" in result.stdout
        assert "bytes of JSON, not shown here (--output json prints them)" in result.stdout
        assert len(result.stdout) < 10_000
        return
    doc = json.loads(result.stdout)
    assert doc["phase"] == "Succeeded"
    assert doc["outputs"]["check"] == digest(value)
    assert digest(doc["outputs"]["input"]) == digest(value)
    assert digest(doc["outputs"]["echo"]) == digest(value)


async def test_a_large_value_goes_to_a_sub_workflow_and_comes_back(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    size = 1100 * 1024
    summary, code = await run_project(
        project(tmp_path, CHILD_WORKFLOW), nats_server.url, workflow="parent", input={"size": size}
    )
    assert code == 0, brief(summary)
    assert summary["outputs"]["check"] == digest(blob(size))


@pytest.mark.parametrize("case", list(OVER_THE_LIMIT))
async def test_a_value_over_the_limit_fails_its_step_or_run_saying_so(
    tmp_path: Path, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    size, steps, output, failed_step, message = OVER_THE_LIMIT[case]
    monkeypatch.setenv("CADENZA_MAX_VALUE_BYTES", str(LIMIT))  # the engine's and the agent's
    workflow = LIMITED_WORKFLOW.format(size=size, steps=steps, output=output)
    summary, code = await run_project(project(tmp_path, workflow), nats_server.url, timeout=30)
    assert code == 1, brief(summary)
    assert summary["phase"] == "Failed"
    assert message in summary["message"] and "CADENZA_MAX_VALUE_BYTES" in summary["message"]
    if failed_step is not None:
        step = summary["steps"][failed_step]
        assert step["phase"] == "Failed"
        assert step["error"]["type"] == "ValueTooLarge"
        assert message in step["error"]["message"]


async def test_a_huge_error_message_fails_the_step_cut_short(tmp_path: Path, nats_server: NatsServer) -> None:
    summary, code = await run_project(project(tmp_path, FAIL_WORKFLOW), nats_server.url, timeout=30)
    assert code == 1, brief(summary)
    error = summary["steps"]["fail"]["error"]
    assert error["type"] == "FatalError" and error["truncated"] is True
    assert error["message"].startswith("!!!!") and error["message"].endswith("(614,400 characters in all)")
    assert summary["phase"] == "Failed" and len(summary["message"]) < 10_000


async def test_a_run_input_over_the_limit_is_rejected_at_start(
    tmp_path: Path, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CADENZA_MAX_VALUE_BYTES", str(LIMIT))
    with pytest.raises(InputError, match=r"input: 2,097,1\d\d bytes of JSON, more than the 1,048,576"):
        await run_project(
            project(tmp_path, INPUT_WORKFLOW), nats_server.url, input={"data": blob(2 * 1024 * 1024)}
        )


def test_cli_rejects_an_input_file_over_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CADENZA_MAX_VALUE_BYTES", str(LIMIT))
    root = project(tmp_path, INPUT_WORKFLOW)
    (tmp_path / "big.json").write_text(json.dumps({"data": blob(2 * 1024 * 1024)}))
    result = cadenza("run", str(root), "--input", f"@{tmp_path / 'big.json'}", "--output", "json")
    assert result.returncode == 2, result.stdout[-2000:]
    assert "CADENZA_MAX_VALUE_BYTES" in result.stderr
