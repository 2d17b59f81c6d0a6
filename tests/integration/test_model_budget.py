"""A model call in a run over budget raises BudgetExceeded instead of calling, on a real
nats-server with a real OpenAI-compatible server (tests/integration/chat_server.py): the
calls past the budget never reach the server (its count proves it), the run pauses with
BudgetExceeded without spending a retry, `cadenza resume` with a higher budget resumes it,
it succeeds, and its usage is what the server counted. `stream` and the sync twins are
refused the same way."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

import nats
import nats.js.errors
import pytest
from cadenza import BudgetExceeded, Task
from cadenza._budget import guard_for
from cadenza.models import ModelRegistry, ModelSpec
from cadenza_operator.engine.client import RunClient

from ..conftest import NatsServer
from .chat_server import INPUT_TOKENS, OUTPUT_TOKENS, ChatServer
from .harness import poll

HELLO = [{"role": "user", "content": "hello"}]
CALLS = 6
PER_CALL = INPUT_TOKENS + OUTPUT_TOKENS  # 18: the budget of 50 is reached after 3 calls
BEFORE_THE_BUDGET = 3

AGENT_CODE = f"""
from cadenza import Agent, Task

agent = Agent("talker")


@agent.handler
async def talk(task: Task) -> dict:
    m = task.model("fast")
    for n in range({CALLS}):  # one after another: no call in flight when the budget is reached
        await m.chat([{{"role": "user", "content": f"call {{n}}"}}])
    return {{"calls": {CALLS}}}


agent.run()
"""

MANIFESTS = """
apiVersion: cadenza.dev/v1alpha1
kind: Model
metadata: {{name: fast}}
spec: {{provider: openai, baseURL: "{url}", model: tiny}}
---
apiVersion: cadenza.dev/v1alpha1
kind: Agent
metadata: {{name: talker}}
spec: {{command: ["python", "agent.py"], models: [fast]}}
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {{name: {workflow}}}
spec:
  budget: {{tokens: 50}}
  steps:
    - {{name: a, agent: talker}}
"""


async def _cadenza(cwd: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cadenza_operator.cli",
        *args,
        cwd=cwd,
        env={**os.environ, "CADENZA_LOG_FORMAT": "json"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )


async def test_calls_past_the_budget_are_refused_the_run_pauses_and_resumes(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    workflow = f"talk-{uuid.uuid4().hex[:8]}"
    url = nats_server.url
    async with ChatServer() as server:
        (tmp_path / "agent.py").write_text(AGENT_CODE)
        (tmp_path / "manifests.yaml").write_text(MANIFESTS.format(url=server.url, workflow=workflow))
        proc = await _cadenza(
            tmp_path, "run", str(tmp_path), "--output", "json", "--timeout", "150", "--nats", url
        )
        try:
            nc = await nats.connect(url)
            client = RunClient(nc)

            async def paused() -> str | None:
                try:
                    if client.kv is None:
                        await client.open()
                    runs = [r for r in await client.list("default") if r.workflow == workflow]
                except nats.js.errors.NotFoundError:
                    return None
                return runs[0].run if runs and runs[0].phase == "Paused" else None

            try:
                run = await poll(paused, timeout=90)
                record = await client.get(run)
            finally:
                await nc.close()
            # The fourth call was refused before it was sent: only three reached the server.
            assert len(server.arrivals) == BEFORE_THE_BUDGET
            assert record is not None and record.message.startswith("BudgetExceeded"), record
            assert record.steps["a"].retries == 0  # held by the pause, not retried

            resume = await _cadenza(
                tmp_path, "resume", run, "--tokens", "1000", "--by", "alice", "--nats", url
            )
            _, err = await asyncio.wait_for(resume.communicate(), 120)
            assert resume.returncode == 0, err.decode()

            stdout, stderr = await asyncio.wait_for(proc.communicate(), 150)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    doc = json.loads(stdout)
    assert doc["phase"] == "Succeeded"
    counted = len(server.arrivals)
    assert counted == BEFORE_THE_BUDGET + CALLS  # the second attempt made all its calls
    assert doc["usage"]["calls"] == counted
    assert (doc["usage"]["inputTokens"], doc["usage"]["outputTokens"]) == (
        counted * INPUT_TOKENS,
        counted * OUTPUT_TOKENS,
    )
    step = doc["steps"]["a"]
    first = step["history"][0]
    assert first["error"]["type"] == "BudgetExceeded", first
    assert first["usage"]["calls"] == BEFORE_THE_BUDGET
    assert len(step["history"]) == 2


class _Record:
    """A runs-KV entry of a run paused for its budget."""

    value = json.dumps({"phase": "Paused", "message": "BudgetExceeded: run budget reached"}).encode()


async def test_stream_and_the_sync_twins_are_refused_without_reaching_the_server() -> None:
    async def read(key: str) -> _Record:
        return _Record()

    async with ChatServer() as server:
        task = Task(input=None, run_id="r1", step="s")
        task._models = ModelRegistry(
            {"fast": ModelSpec.from_spec("fast", {"baseURL": server.url, "model": "tiny"})}
        )
        task._budget = guard_for(
            {"run": "r1", "step": "s", "attempt": 1, "budget": {"run": {"tokens": 1}}}, read
        )
        m = task.model("fast")
        with pytest.raises(BudgetExceeded, match="paused: BudgetExceeded"):
            await m.chat(HELLO)
        with pytest.raises(BudgetExceeded):
            [piece async for piece in m.stream(HELLO)]

        def sync_handler() -> None:  # a sync handler runs in a worker thread
            with pytest.raises(BudgetExceeded):
                m.chat_sync(HELLO)
            with pytest.raises(BudgetExceeded):
                list(m.stream_sync(HELLO))

        await asyncio.to_thread(sync_handler)
        assert server.arrivals == []
