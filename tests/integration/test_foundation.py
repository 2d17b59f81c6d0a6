"""Foundation: a run succeeds; FatalError fails it; RetryableError is retried; a SIGKILLed
agent's task is redelivered to another replica and applied once. Real nats-server."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from cadenza_operator.engine.audit import read_audit
from cadenza_operator.local.nats_server import NatsServer

from .harness import agent_manifest, pid_in, run_project, unique_namespace, write_project

AGENTS = """
import os, sys, time
from pathlib import Path
from cadenza import Agent, FatalError, RetryableError

worker = Agent("worker")

@worker.handler
async def handle(task):
    mode = task.input.get("mode", "echo")
    if mode == "fatal":
        raise FatalError("the ticket is not valid", details={"field": "ticket"})
    if mode == "flaky" and task.attempt < 3:
        raise RetryableError(f"rate limited on attempt {task.attempt}")
    if mode == "crash-once":
        marker = Path(task.input["marker"])
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            time.sleep(60)   # the test SIGKILLs this process meanwhile
        return {"finishedBy": os.getpid(), "killed": int(marker.read_text())}
    return {"echo": task.input.get("value"), "attempt": task.attempt}

if __name__ == "__main__":
    worker.run()
"""

WORKFLOW = """
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {{name: wf}}
spec:
  steps:
    - name: first
      agent: worker
      input:
        mode: "${{{{ input.mode }}}}"
        value: "${{{{ input.value }}}}"
        marker: "${{{{ input.marker }}}}"
      retry: {{limit: 3, backoff: {{initial: 50ms, factor: 2, max: 1s}}}}
    - name: left
      agent: worker
      dependsOn: [first]
      input: {{value: "${{{{ steps.first.output }}}}"}}
    - name: right
      agent: worker
      dependsOn: [first]
      input: {{value: 2}}
  output: {{first: "${{{{ steps.first.output }}}}", right: "${{{{ steps.right.output.echo }}}}"}}
"""


def project(tmp_path: Path, replicas: int = 1, ack_wait: str = "30s") -> Path:
    return write_project(
        tmp_path / "proj", AGENTS, agent_manifest("worker", replicas, 4, ack_wait) + WORKFLOW.format()
    )


async def test_run_succeeds_with_parallel_steps_and_outputs(tmp_path: Path, nats_server: NatsServer) -> None:
    summary, code = await run_project(
        project(tmp_path), nats_server.url, input={"mode": "echo", "value": "hi", "marker": ""}
    )
    assert code == 0, summary
    assert summary["phase"] == "Succeeded"
    assert summary["outputs"] == {"first": {"echo": "hi", "attempt": 1}, "right": 2}
    steps = summary["steps"]
    assert {n: s["phase"] for n, s in steps.items()} == {
        "first": "Succeeded",
        "left": "Succeeded",
        "right": "Succeeded",
    }
    # left and right were both queued when first finished: dispatched together
    assert steps["left"]["queuedAt"] == steps["right"]["queuedAt"] >= steps["first"]["finishedAt"] - 1


async def test_fatal_error_fails_the_run_with_the_error_in_step_status(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    summary, code = await run_project(
        project(tmp_path), nats_server.url, input={"mode": "fatal", "value": 0, "marker": ""}
    )
    assert code == 1
    assert summary["phase"] == "Failed"
    first = summary["steps"]["first"]
    assert first["phase"] == "Failed"
    assert first["attempts"] == 1  # fatal: never retried
    assert first["error"]["type"] == "FatalError"
    assert first["error"]["message"] == "the ticket is not valid"
    assert first["error"]["details"] == {"field": "ticket"}
    assert summary["steps"]["left"]["phase"] == "Skipped"
    assert "first" in summary["message"]


async def test_retryable_error_is_retried_until_success(tmp_path: Path, nats_server: NatsServer) -> None:
    summary, code = await run_project(
        project(tmp_path), nats_server.url, input={"mode": "flaky", "value": 0, "marker": ""}
    )
    assert code == 0, summary
    first = summary["steps"]["first"]
    assert first["attempts"] == 3
    assert [a["outcome"] for a in first["history"]] == ["Failed", "Failed", "Succeeded"]
    assert first["history"][0]["error"]["message"] == "rate limited on attempt 1"
    assert summary["outputs"]["first"]["attempt"] == 3


async def test_sigkilled_agent_task_is_redelivered_and_applied_once(
    tmp_path: Path, fresh_nats: NatsServer
) -> None:
    import nats

    marker = tmp_path / "marker"
    namespace = unique_namespace()
    run = asyncio.create_task(
        run_project(
            project(tmp_path, replicas=2, ack_wait="2s"),
            fresh_nats.url,
            input={"mode": "crash-once", "value": 0, "marker": str(marker)},
            namespace=namespace,
        )
    )
    victim = await pid_in(marker)
    os.kill(victim, signal.SIGKILL)
    summary, code = await asyncio.wait_for(run, 60)
    assert code == 0, summary
    first = summary["steps"]["first"]
    assert first["output"]["killed"] == victim
    assert first["output"]["finishedBy"] != victim  # another replica finished it
    assert first["attempts"] == 1  # a redelivery is not a new attempt
    # The audit trail shows the step succeeded exactly once.
    nc = await nats.connect(fresh_nats.url)
    try:
        records = await read_audit(nc.jetstream(), namespace, summary["run"])
        succeeded = [r for r in records if r["step"] == "first" and r["to"] == "Succeeded"]
        assert len(succeeded) == 1
        assert [r["seq"] for r in records] == sorted({r["seq"] for r in records})
    finally:
        await nc.close()


async def test_sigterm_lets_an_agent_finish_its_in_flight_task(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    agents = """
import asyncio, os
from pathlib import Path
from cadenza import Agent

worker = Agent("worker")

@worker.handler
async def handle(task):
    Path(task.input["marker"]).write_text(str(os.getpid()))
    await asyncio.sleep(1.5)          # SIGTERM arrives meanwhile
    return {"finishedBy": os.getpid()}

if __name__ == "__main__":
    worker.run()
"""
    marker = tmp_path / "marker"
    root = write_project(
        tmp_path / "proj",
        agents,
        agent_manifest("worker")
        + """
---
apiVersion: cadenza.dev/v1alpha1
kind: Workflow
metadata: {name: drain}
spec:
  steps: [{name: only, agent: worker, input: {marker: "${{ input.marker }}"}}]
""",
    )
    run = asyncio.create_task(run_project(root, nats_server.url, input={"marker": str(marker)}))
    stopping = await pid_in(marker)
    os.kill(stopping, signal.SIGTERM)
    summary, code = await asyncio.wait_for(run, 60)
    assert code == 0, summary
    only = summary["steps"]["only"]
    assert only["output"]["finishedBy"] == stopping  # it finished before exiting
    assert only["attempts"] == 1


async def test_an_agent_exits_on_sigterm_even_when_nats_is_gone(tmp_path: Path) -> None:
    import subprocess
    import sys

    import nats as nats_client
    from cadenza_operator.engine.infra import ensure_infrastructure

    (tmp_path / "agent.py").write_text(
        "from cadenza import Agent\nagent = Agent('lonely')\n\n@agent.handler\nasync def h(task):\n"
        "    return {}\n\nagent.run()\n"
    )
    server = NatsServer().start()
    try:
        nc = await nats_client.connect(server.url)
        await ensure_infrastructure(nc.jetstream())
        await nc.close()
        env = {**os.environ, "CADENZA_NATS_URL": server.url, "CADENZA_AGENT": "lonely"}
        proc = subprocess.Popen(  # noqa: ASYNC220 - the agent runs alongside the test
            [sys.executable, "agent.py"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdout is not None
        ready = await asyncio.to_thread(proc.stdout.readline)  # "agent ready" once connected
        assert b"agent ready" in ready, ready
    finally:
        server.stop()  # NATS goes away under the running agent
    await asyncio.sleep(1)
    proc.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.to_thread(proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0
