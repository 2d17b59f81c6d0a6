"""`cadenza get RUN --watch` with a client credential, on a `dev --secure` stack: the
credential may read run records by key but create no consumer on the runs bucket, so the
watch polls the record; it still prints the waiting state, then the end, and exits 0."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from ..conftest import cadenza_process
from .conftest import held_at_gate

WORKFLOW = """
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: gated}
spec:
  steps:
    - name: gate
      approval: {timeout: 10m}
"""
WAIT = 60  # bounded waits for what must happen, not timings


async def test_a_client_credential_watches_by_polling(tmp_path: Path) -> None:
    run = "gated-watched"
    async with held_at_gate(tmp_path, WORKFLOW, run) as (server, credentials):
        engine = server.engine
        creds = credentials.client("alice")
        proc = await cadenza_process(
            "get", run, "--watch", "-o", "json", "--nats", server.url, "--creds", creds
        )
        assert proc.stdout is not None and proc.stderr is not None
        try:
            first: dict[str, Any] = json.loads(await asyncio.wait_for(proc.stdout.readline(), WAIT))
            assert first["steps"]["gate"]["phase"] == "WaitingApproval", first
            await engine.client.approve("default", run, "gate", by="test")
            code = await asyncio.wait_for(proc.wait(), WAIT)
            rest = (await proc.stdout.read()).decode().splitlines()
            err = (await proc.stderr.read()).decode()
            assert code == 0 and "Traceback" not in err, err
            assert rest and json.loads(rest[-1])["phase"] == "Succeeded", rest
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
