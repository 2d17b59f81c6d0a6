"""Decisions over NATS carry the credential's identity: on a `dev --secure` stack, the CLI
with a client credential approves as its JWT's user, checked against the step's approvers;
a `--by` naming someone else is no way in."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from cadenza_operator.engine.control import MAX_LISTED, as_user
from cadenza_operator.engine.state import RunState
from cadenza_operator.local.dev import DevServer
from cadenza_operator.manifests import load

from ..conftest import cadenza
from ..integration.harness import poll
from .conftest import held_at_gate

WORKFLOW = """
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: gated}
spec:
  steps:
    - name: gate
      approval: {approvers: [alice], timeout: 10m}
"""


def test_a_request_on_a_users_subject_decides_as_that_user() -> None:
    assert as_user({"op": "approve", "by": "cli"}, "alice") == {"op": "approve", "by": "alice"}
    shown = as_user({"op": "approve", "by": "Alice A.", "comment": "ok"}, "alice")
    assert shown["by"] == "alice"
    assert shown["comment"] == "[--by Alice A., not verified] ok"
    assert as_user({"op": "cancel", "by": "alice"}, "mallory")["by"] == "mallory"


async def test_the_cli_approves_as_its_credentials_user(tmp_path: Path) -> None:
    run = "gated-1"
    async with held_at_gate(tmp_path, WORKFLOW, run) as (server, credentials):
        engine = server.engine

        async def phase_of(step: str | None = None) -> Any:
            state = await engine.client.get(run)
            if state is None:
                return None
            return state.steps[step].phase if step else state.phase

        async def approve(user: str, by: str) -> Any:
            creds = credentials.client(user)
            args = ("approve", run, "gate", "--nats", server.url, "--creds", creds, "--by", by)
            return await asyncio.to_thread(cadenza, *args)

        # mallory's credential claiming to be alice: decided as mallory, not an approver
        forged = await approve("mallory", "alice")
        assert forged.returncode == 1, forged.stderr
        assert "mallory" in forged.stderr
        assert await phase_of("gate") == "WaitingApproval"

        approved = await approve("alice", "Alice A.")
        assert approved.returncode == 0, approved.stderr
        assert await poll(lambda: _equals(phase_of(), "Succeeded"))
        records = await engine.client.audit("default", run)
        decision = [r for r in records if r.get("step") == "gate" and r.get("to") == "Succeeded"]
        assert decision and decision[0]["actor"] == "alice", records

        # a retry with the same credential: the engine starts it as alice (issue 14)
        creds = credentials.client("alice")
        common = ("--nats", server.url, "--creds", creds, "-n", "default")
        bad = await asyncio.to_thread(cadenza, "retry", run, "--from", "nope", *common)
        assert bad.returncode == 2 and "--from nope: run gated-1 has no such step" in bad.stderr, bad
        retried = await asyncio.to_thread(cadenza, "retry", run, "--from", "gate", *common, "--by", "eve")
        assert retried.returncode == 0, retried.stderr
        again = retried.stdout.split()[-1]
        assert await poll(lambda: _equals(_phase(engine, again), "Running"))
        started = [r for r in await engine.client.audit("default", again) if r.get("reason") == "run started"]
        assert started and started[0]["actor"] == "alice", started
        shown = await asyncio.to_thread(cadenza, "get", again, *common)
        assert shown.returncode == 0 and f"retry of run {run}" in shown.stdout, shown
        # the list, which a client credential cannot read itself: an engine answers it
        listed = await asyncio.to_thread(cadenza, "list", *common, "--output", "json")
        assert listed.returncode == 0, listed.stderr
        assert [(r["run"], r["retryOf"]) for r in json.loads(listed.stdout)] == [(again, run), (run, None)]
        table = await asyncio.to_thread(cadenza, "list", *common, "--phase", "Succeeded")
        assert table.returncode == 0 and [line.split()[0] for line in table.stdout.splitlines()] == [
            "NAME",
            run,
        ]


async def _phase(engine: Any, run: str) -> Any:
    state = await engine.client.get(run)
    return state.phase if state is not None else None


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_a_client_credential_is_told_when_its_list_is_cut(tmp_path: Path) -> None:
    """An engine answers `list` with MAX_LISTED runs at most (one message): a client asking
    for more gets those and a note saying so, never a silently shorter list."""
    (tmp_path / "workflow.yaml").write_text(WORKFLOW)
    async with DevServer(load([tmp_path], namespace="default"), secure=True) as server:
        assert server.stack.credentials is not None
        kv = server.engine.client.kv
        for n in range(MAX_LISTED + 1):  # records as an engine writes them, of ended runs
            done = RunState(
                run=f"old-{n:04d}", workflow="gated", definition="d", createdAt=1000.0 + n, phase="Succeeded"
            )
            await kv.put(done.run, done.to_bytes())
        common = ("--nats", server.url, "--creds", server.stack.credentials.client("alice"), "-n", "default")

        cut = await asyncio.to_thread(cadenza, "list", *common, "--limit", "1000", "--output", "json")
        assert cut.returncode == 0, cut.stderr
        runs = [r["run"] for r in json.loads(cut.stdout)]
        assert runs == [f"old-{n:04d}" for n in range(MAX_LISTED, 0, -1)]  # the newest, newest first
        assert f"at most {MAX_LISTED} runs" in cut.stderr

        whole = await asyncio.to_thread(cadenza, "list", *common, "--limit", "20", "--output", "json")
        assert whole.returncode == 0 and len(json.loads(whole.stdout)) == 20, whole.stderr
        assert "at most" not in whole.stderr
