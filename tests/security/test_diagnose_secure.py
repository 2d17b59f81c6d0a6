"""`cadenza diagnose` with a client credential, on a `dev --secure` stack: the credential
may read no run records in bulk and no audit stream, so an engine makes the report, over
the namespace the credential may send requests for and no other."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from cadenza_operator.engine.client import RunClient
from cadenza_operator.engine.state import RunState
from cadenza_operator.observe.diagnose import diagnose

from ..conftest import cadenza
from ..integration.harness import poll
from .conftest import Connection, held_at_gate

WORKFLOW = """
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: gated}
spec:
  steps:
    - name: gate
      approval: {timeout: 10m}
"""


async def test_a_client_credential_gets_its_namespaces_report_from_an_engine(tmp_path: Path) -> None:
    run = "gated-1"
    async with held_at_gate(tmp_path, WORKFLOW, run) as (server, credentials):
        client = server.engine.client
        await client.approve("default", run, "gate", by="test")

        async def ended() -> bool:
            state = await client.get(run)
            return state is not None and state.phase == "Succeeded"

        await poll(ended, 60)
        # Runs of another namespace, one of a workflow of the same name: not in the report.
        for name, workflow in (("gated-theirs", "gated"), ("secret-1", "secret")):
            theirs = RunState(
                run=name, namespace="team-b", workflow=workflow, definition="d", createdAt=time.time()
            )
            await client.kv.put(theirs.run, theirs.to_bytes())
        common = ("--nats", server.url, "--creds", credentials.client("alice"), "-n", "default")

        as_json = await asyncio.to_thread(
            cadenza, "diagnose", "gated", "--since", "1h", "-o", "json", *common
        )
        assert as_json.returncode == 0, as_json.stderr
        report = json.loads(as_json.stdout)
        direct = (await diagnose(client, "default", "gated", 3600)).to_dict()  # as the engine reads
        assert report["runs"] == direct["runs"] == {"total": 1, "byPhase": {"Succeeded": 1}}
        assert report["namespace"] == "default" and report["steps"] == direct["steps"]
        assert report["trace"]["auditRecords"] == direct["trace"]["auditRecords"] > 0

        as_text = await asyncio.to_thread(cadenza, "diagnose", "gated", *common)
        assert as_text.returncode == 0, as_text.stderr
        assert "gated in namespace default: 1 run(s) started in the last" in as_text.stdout

        secret = await asyncio.to_thread(cadenza, "diagnose", "secret", *common)
        assert secret.returncode == 2, secret
        assert "workflow 'secret' is not known in namespace 'default'" in secret.stderr
        assert "Traceback" not in secret.stderr

        # What the CLI would never send, sent on alice's own subject: refused, by name.
        alice = await Connection().open(server.url, credentials.client("alice"))
        try:
            for request, error in (
                ({"op": "diagnose", "since": 60}, "'workflow' must be a workflow name"),
                ({"op": "diagnose", "workflow": "gated", "since": "1h"}, "'since' must be seconds above 0"),
                ({"op": "diagnose", "workflow": "gated", "since": -5}, "'since' must be seconds above 0"),
                ({"op": "diagnose", "workflow": "gated", "since": True}, "'since' must be seconds above 0"),
            ):
                reply: Any = await RunClient(alice.nc).request("default", request, 60, user="alice")
                assert reply is not None and reply["ok"] is False and error in reply["error"], (
                    request,
                    reply,
                )
        finally:
            await alice.nc.close()
