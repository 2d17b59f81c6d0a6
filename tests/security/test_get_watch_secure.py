"""`cadenza get RUN --watch` with a client credential, on a `dev --secure` stack: the
credential may read run records by key but create no consumer on the runs bucket, so the
watch polls the record; it still prints the waiting state, then the end, and exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from cadenza_operator.local.dev import DevServer
from cadenza_operator.manifests import load

from ..conftest import ROOT
from ..integration.harness import poll

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
    (tmp_path / "workflow.yaml").write_text(WORKFLOW)
    bundle = load([tmp_path], namespace="default")
    async with DevServer(bundle, secure=True) as server:
        credentials = server.stack.credentials
        assert credentials is not None
        engine = server.engine
        run = "gated-watched"
        await engine.client.start(bundle.compiled["gated"], {}, run_id=run)

        async def waiting() -> bool:
            state = await engine.client.get(run)
            return state is not None and state.steps["gate"].phase == "WaitingApproval"

        await poll(waiting, WAIT)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cadenza_operator.cli",
            "get",
            run,
            "--watch",
            "-o",
            "json",
            "--nats",
            server.url,
            "--creds",
            credentials.client("alice"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, "CADENZA_LOG_FORMAT": "json"},
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
