"""The CLI as a user runs it: exit codes, JSON output, error messages, and no process left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ..conftest import EXAMPLES, ROOT, cadenza


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def nats_servers() -> set[int]:
    """Embedded servers and agents whose `cadenza run` is gone (orphans), so that another
    cadenza running on the machine at the same time is not mistaken for a leak."""
    candidates = set(processes_mentioning("cadenza-nats-")) | set(processes_mentioning("cadenza-run-"))
    return {
        pid for pid in candidates if _parent(pid) in (1, -1) or not Path(f"/proc/{_parent(pid)}").exists()
    }


def test_hello_example_json_output() -> None:
    before = nats_servers()
    result = cadenza("run", str(EXAMPLES / "hello"), "--input", '{"name": "Ada"}', "--output", "json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["phase"] == "Succeeded"
    assert doc["workflow"] == "hello"
    assert doc["outputs"]["greeting"] == "Hello, Ada!"
    assert doc["outputs"]["shouted"] == "HELLO, ADA!"
    assert set(doc["steps"]) == {"greet", "shout", "count"}
    assert all(s["attempts"] == 1 and s["phase"] == "Succeeded" for s in doc["steps"].values())
    assert nats_servers() <= before, "cadenza run left a nats-server or agent running"


def test_text_output_has_summary_and_outputs() -> None:
    result = cadenza("run", str(EXAMPLES / "hello"))
    assert result.returncode == 0, result.stderr
    assert "Succeeded" in result.stdout
    assert "Hello, world!" in result.stdout


def write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(textwrap.dedent(text))
    return path


AGENT = """
apiVersion: cadenza.dev/v1alpha1
kind: Agent
metadata: {name: classifier}
spec: {command: ["python", "agents.py"]}
"""


@pytest.mark.parametrize(
    ("workflow", "expected"),
    [
        (
            """
         apiVersion: cadenza.dev/v1alpha1
         kind: Workflow
         metadata: {name: triage}
         spec:
           steps:
             - {name: classify, agent: classifier}
             - {name: lookup, agent: classifier, dependsOn: [classify]}
             - {name: route, agent: classifier, dependsOn: [lokup]}
         """,
            "workflow.yaml: Workflow/triage: spec.steps[2].dependsOn[0]: unknown step 'lokup'",
        ),
        (
            """
         apiVersion: cadenza.dev/v1alpha1
         kind: Workflow
         metadata: {name: triage}
         spec:
           steps:
             - {name: a, agent: classifier, dependsOn: [b]}
             - {name: b, agent: classifier, dependsOn: [a]}
         """,
            "Workflow/triage: spec.steps[0].dependsOn: dependency cycle: a -> b -> a",
        ),
        (
            """
         apiVersion: cadenza.dev/v1alpha1
         kind: Workflow
         metadata: {name: triage}
         spec:
           steps:
             - {name: classify, agent: clasifier}
         """,
            "Workflow/triage: spec.steps[0].agent: unknown agent 'clasifier'",
        ),
        (
            """
         apiVersion: cadenza.dev/v1alpha1
         kind: Workflow
         metadata: {name: triage}
         spec:
           steps:
             - {name: classify, agent: classifier}
             - {name: classify, agent: classifier}
         """,
            "Workflow/triage: spec.steps: Value error, duplicate step name 'classify' at steps[1]",
        ),
        (
            """
         apiVersion: cadenza.dev/v1alpha1
         kind: Workflow
         metadata: {name: triage}
         spec:
           steps:
             - {name: Classify-1, agent: classifier}
         """,
            "Workflow/triage: spec.steps[0].name: String should match pattern",
        ),
        (
            """
         apiVersion: cadenza.dev/v1alpha1
         kind: Workflow
         metadata: {name: triage}
         spec:
           steps:
             - {name: classify, agent: classifier, when: "input.x =="}
         """,
            "Workflow/triage: spec.steps[0].when: expression 'input.x ==' does not compile",
        ),
        (
            """
         apiVersion: cadenza.dev/v1alpha1
         kind: Workflow
         metadata: {name: triage}
         spec:
           steps:
             - {name: classify, agent: classifier, input: {x: "${{ inptu.x }}"}}
         """,
            "Workflow/triage: spec.steps[0].input.x: expression 'inptu.x' uses unknown variable 'inptu'",
        ),
        (
            """
         apiVersion: cadenza.dev/v1alpha1
         kind: Gizmo
         metadata: {name: triage}
         spec: {}
         """,
            "workflow.yaml: Gizmo/triage: kind: unknown kind 'Gizmo'",
        ),
        (
            """
         apiVersion: cadenza.dev/v1alpha1
         kind: Workflow
         metadata: {name: triage}
         spec:
           steps: [{name: a, agent: classifier, retyr: {limit: 2}}]
         """,
            "Workflow/triage: spec.steps[0].retyr: unknown field",
        ),
        ("kind: Workflow\nmetadata: {name: x\n", "workflow.yaml: line"),
    ],
)
def test_invalid_manifests_exit_2_naming_file_object_and_field(
    tmp_path: Path, workflow: str, expected: str
) -> None:
    write(tmp_path, "agent.yaml", AGENT)
    write(tmp_path, "workflow.yaml", workflow)
    for command in ("validate", "run"):
        result = cadenza(command, str(tmp_path))
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert expected in " ".join(result.stderr.split()), result.stderr


def test_invalid_input_is_rejected_before_the_run_starts() -> None:
    result = cadenza("run", str(EXAMPLES / "hello"), "--input", '{"name": 42}')
    assert result.returncode == 2
    assert "Workflow/hello: input.name: 42 is not of type 'string'" in result.stderr


def test_validate_accepts_the_examples() -> None:
    result = cadenza("validate", str(EXAMPLES / "hello"))
    assert result.returncode == 0, result.stderr
    assert "ok: 2 agent(s), 1 workflow(s)" in result.stdout


def test_ctrl_c_stops_agents_and_server(tmp_path: Path) -> None:
    marker = f"sleeper-{os.getpid()}-{time.monotonic_ns()}"
    write(
        tmp_path,
        "agents.py",
        f"""
        import asyncio
        from cadenza import Agent
        agent = Agent("sleeper")

        @agent.handler
        async def sleep(task):
            await asyncio.sleep(120)
            return {{}}

        if __name__ == "__main__":
            agent.run()  # {marker}
        """,
    )
    write(
        tmp_path,
        "manifests.yaml",
        f"""
        apiVersion: cadenza.dev/v1alpha1
        kind: Agent
        metadata: {{name: sleeper}}
        spec: {{command: ["python", "agents.py", "{marker}"]}}
        ---
        apiVersion: cadenza.dev/v1alpha1
        kind: Workflow
        metadata: {{name: slow}}
        spec:
          steps: [{{name: nap, agent: sleeper}}]
        """,
    )
    before = nats_servers()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cadenza_operator.cli", "run", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            if processes_mentioning(marker):
                break
            time.sleep(0.1)
        assert processes_mentioning(marker), "the agent never started"
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 130, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
    for _ in range(300):  # bounded: 30 s
        if not processes_mentioning(marker):
            break
        time.sleep(0.1)
    assert processes_mentioning(marker) == []
    assert nats_servers() <= before
