"""A budget on a real nats-server: an agent records model usage (`task.record_usage`),
the run pauses with BudgetExceeded before its next dispatch, `cadenza resume` with a
higher budget resumes it, it succeeds, and its usage in `--output json` is what the
agent recorded."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import nats
import nats.js.errors
from cadenza_operator.engine.client import RunClient

from ..conftest import NatsServer, cadenza

AGENTS = """
import json, sys
from cadenza import Agent

agent = Agent("spender")
LEDGER = {ledger!r}


@agent.handler
async def spend(task):
    # Two calls made "another way": each is recorded, and written to the ledger the test
    # compares the run's usage with.
    for inp, out, cost in ((30, 10, 0.02), (15, 5, 0.01)):
        task.record_usage(model="fast", input_tokens=inp, output_tokens=out, cost=cost)
        with open(LEDGER, "a") as ledger:
            ledger.write(json.dumps([inp, out, cost]) + "\\n")
    return {{"step": task.step}}


if __name__ == "__main__":
    agent.run()
"""

MANIFESTS = """
apiVersion: cadenza.dev/v1alpha1
kind: Agent
metadata: {{name: spender}}
spec: {{command: ["python", "agents.py"]}}
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {{name: {workflow}}}
spec:
  budget: {{tokens: 100}}
  steps:
    - {{name: a, agent: spender}}
    - {{name: b, agent: spender, dependsOn: [a]}}
    - {{name: c, agent: spender, dependsOn: [b]}}
"""


OPTS = ("--timeout", "150", "--nats")


async def paused_run(url: str, workflow: str) -> str:
    """The run once it is Paused (the buckets appear when `cadenza run` has made them)."""
    nc = await nats.connect(url)
    try:

        async def poll() -> str:
            client = RunClient(nc)
            while True:
                try:
                    if client.kv is None:
                        await client.open()
                    runs = [r for r in await client.list("default") if r.workflow == workflow]
                except nats.js.errors.NotFoundError:
                    runs = []
                if runs and runs[0].phase == "Paused":
                    return runs[0].run
                await asyncio.sleep(0.1)

        return await asyncio.wait_for(poll(), timeout=90)
    finally:
        await nc.close()


def test_a_run_over_budget_pauses_and_resumes_with_a_higher_budget(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    workflow = f"spend-{uuid.uuid4().hex[:8]}"
    ledger = tmp_path / "ledger.jsonl"
    (tmp_path / "agents.py").write_text(textwrap.dedent(AGENTS.format(ledger=str(ledger))))
    (tmp_path / "manifests.yaml").write_text(textwrap.dedent(MANIFESTS.format(workflow=workflow)))
    url = nats_server.url
    proc = subprocess.Popen(
        [sys.executable, "-m", "cadenza_operator.cli", "run", str(tmp_path), "--output", "json", *OPTS, url],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        # a and b use 60 tokens each: b is dispatched (60 < 100), c is not (120 >= 100).
        run = asyncio.run(paused_run(url, workflow))
        assert proc.poll() is None

        refused = cadenza("resume", "no-such-run", "--tokens", "1000", "--nats", url)
        assert refused.returncode == 2 and "no run no-such-run" in refused.stderr, refused.stderr

        resumed = cadenza("resume", run, "--tokens", "1000", "--by", "alice", "--nats", url)
        assert resumed.returncode == 0, resumed.stderr
        assert "1000" in resumed.stdout

        stdout, stderr = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    doc = json.loads(stdout)
    assert doc["phase"] == "Succeeded"
    calls = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert doc["usage"] == {
        "inputTokens": sum(c[0] for c in calls),
        "outputTokens": sum(c[1] for c in calls),
        "cost": round(sum(c[2] for c in calls), 9),
        "calls": len(calls),
    }
    assert doc["usage"]["calls"] == 6
    assert doc["steps"]["c"]["usage"]["calls"] == 2
    assert doc["steps"]["a"]["history"][0]["usage"]["inputTokens"] == 45

    audit = cadenza("audit", run, "--output", "json", "--nats", url)
    assert audit.returncode == 0, audit.stderr
    records = json.loads(audit.stdout)
    paused = [r for r in records if r.get("to") == "Paused"]
    assert len(paused) == 1 and "BudgetExceeded" in paused[0]["reason"]
    back = [r for r in records if r.get("from") == "Paused" and r.get("to") == "Running"]
    assert len(back) == 1 and back[0]["actor"] == "alice" and back[0]["tokens"] == 1000
