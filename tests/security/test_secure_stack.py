"""`cadenza run --secure` / `dev --secure`: the embedded nats-server in operator mode, the
engine and each agent process with a credential of its own, a workflow run to its end."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
from cadenza.wire import RUNS_BUCKET
from cadenza_operator.engine.infra import ensure_infrastructure
from cadenza_operator.engine.state import RunState
from cadenza_operator.local.runner import RunOptions, execute
from cadenza_operator.manifests import load
from cadenza_operator.security.nats_auth import client_permissions, engine_permissions

from ..conftest import cadenza
from ..integration.harness import agent_manifest, write_project
from .conftest import SecureBus

AGENTS = """
import json, os, sys
from cadenza import Agent

name = sys.argv[1]
agent = Agent(name)

@agent.handler
async def handle(task):
    await task.context.put("seen-by-" + name, os.environ.get("CADENZA_NATS_CREDS", ""))
    return {"by": name, "value": task.input["value"], "creds": os.environ.get("CADENZA_NATS_CREDS", "")}

agent.run()
"""

WORKFLOW = """
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: secure}
spec:
  steps:
    - {name: first, agent: alpha, input: {value: "${{ input.value }}"}}
    - {name: second, agent: beta, dependsOn: [first], input: {value: "${{ steps.first.output.value }}"}}
  output: {first: "${{ steps.first.output }}", second: "${{ steps.second.output }}"}
"""


async def test_a_workflow_succeeds_on_the_secure_stack_each_agent_with_its_own_credential(
    tmp_path: Path,
) -> None:
    manifests = agent_manifest("alpha") + "---" + agent_manifest("beta") + WORKFLOW
    root = write_project(tmp_path / "proj", AGENTS, manifests)
    bundle = load([root], namespace="secure-ns")
    wf = bundle.compiled["secure"]
    opts = RunOptions(workflow=wf, bundle=bundle, input={"value": 7}, timeout=60, secure=True)
    summary, code = await execute(opts)
    assert code == 0, summary
    assert summary["phase"] == "Succeeded"
    first, second = summary["outputs"]["first"], summary["outputs"]["second"]
    assert (first["by"], first["value"], second["by"], second["value"]) == ("alpha", 7, "beta", 7)
    # each process connected with its own Agent's credential, none with the engine's
    assert Path(first["creds"]).name == "agent-alpha.creds"
    assert Path(second["creds"]).name == "agent-beta.creds"


def test_secure_with_an_external_server_is_refused(tmp_path: Path) -> None:
    root = write_project(tmp_path / "proj", AGENTS, agent_manifest("alpha") + WORKFLOW)
    result = cadenza("run", str(root), "--secure", "--nats", "nats://127.0.0.1:1", timeout=60)
    assert result.returncode == 2
    assert "--secure" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["approve", "cancel"])
def test_a_missing_creds_file_is_named(command: str, tmp_path: Path) -> None:
    args = [command, "run-1", *(["step"] if command == "approve" else [])]
    result = cadenza(*args, "--nats", "nats://127.0.0.1:1", "--creds", str(tmp_path / "none.creds"))
    assert result.returncode == 2
    assert f"--creds {tmp_path / 'none.creds'}: no such file" in result.stderr
    assert "Traceback" not in result.stderr


async def test_the_cli_on_a_secure_server_says_what_is_wrong(secure_bus: SecureBus) -> None:
    engine = await nats.connect(
        secure_bus.server.url, user_credentials=secure_bus.creds("engine", engine_permissions())
    )
    try:
        await ensure_infrastructure(engine.jetstream())
        # a run the client may look up by id (RUN is resolved before the audit is read)
        record = RunState(run="run-1", workflow="w", definition="w-1", createdAt=1.0, phase="Failed")
        await (await engine.jetstream().key_value(RUNS_BUCKET)).put("run-1", record.to_bytes())
    finally:
        await engine.close()
    url = secure_bus.server.url
    anonymous = await asyncio.to_thread(cadenza, "audit", "run-1", "--nats", url)
    assert anonymous.returncode == 3, anonymous.stderr
    assert "Traceback" not in anonymous.stderr

    # the audit stream is the engine's to read: a client credential gets no answer
    client = secure_bus.creds("alice", client_permissions("default", "alice"))
    refused = await asyncio.to_thread(cadenza, "audit", "run-1", "--nats", url, "--creds", client)
    assert refused.returncode == 3, refused.stderr
    assert "not allowed" in refused.stderr and "Traceback" not in refused.stderr
    assert "permissions violation" in refused.stderr.lower()

    # a run by its id is the client's to read; the list of runs an engine answers (none here)
    got = await asyncio.to_thread(cadenza, "get", "run-1", "--nats", url, "--creds", client)
    assert got.returncode == 0 and got.stdout.startswith("run-1  Failed  workflow w"), got
    listed = await asyncio.to_thread(cadenza, "list", "--nats", url, "--creds", client)
    assert listed.returncode == 3 and "Traceback" not in listed.stderr, listed
    assert "no engine answered" in listed.stderr
    everywhere = await asyncio.to_thread(cadenza, "list", "-A", "--nats", url, "--creds", client)
    assert everywhere.returncode == 2 and "lists the runs of its namespace only" in everywhere.stderr
